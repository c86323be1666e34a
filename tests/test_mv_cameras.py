"""Engine cameras -> MVDream camera vectors, with exact fixtures."""

import math

import numpy as np
import pytest
import torch

from engine.cameras import Cameras
from guidance.multiview.cameras import camera_vectors, isotropic3d_release_vectors, mvdream_vectors


def mvdream_reference(elevation_deg: float, azimuth_deg: float) -> np.ndarray:
    """MVDream's construction written out independently: a y-up OpenGL look-at from the unit
    sphere, then the OpenGL -> Blender (z-up) flip of the world axes, flattened row-major."""
    e, a = math.radians(elevation_deg), math.radians(azimuth_deg)
    pos = np.array([math.cos(e) * math.sin(a), math.sin(e), math.cos(e) * math.cos(a)])
    fwd = -pos / np.linalg.norm(pos)
    right = np.cross(fwd, [0.0, 1.0, 0.0])
    right /= np.linalg.norm(right)
    up = np.cross(right, fwd)
    m = np.eye(4)
    m[:3, :3] = np.stack([right, up, -fwd], axis=1)
    m[:3, 3] = pos
    flip = np.array([[1, 0, 0, 0], [0, 0, -1, 0], [0, 1, 0, 0], [0, 0, 0, 1]], dtype=float)
    return (flip @ m).reshape(-1)


def test_elevation_15_azimuth_0_exact():
    c, s = math.cos(math.radians(15)), math.sin(math.radians(15))
    expected = torch.tensor([1, 0, 0, 0, 0, s, -c, -c, 0, c, s, s, 0, 0, 0, 1], dtype=torch.float32)
    torch.testing.assert_close(mvdream_vectors(15.0, 0.0)[0], expected, atol=1e-6, rtol=0)


@pytest.mark.parametrize("el, az", [(0, 0), (15, 0), (30, 90), (10, 180), (25, 270), (5, 33)])
def test_matches_mvdream_construction_and_engine_cameras(el, az):
    ref = torch.from_numpy(mvdream_reference(el, az)).float()
    torch.testing.assert_close(mvdream_vectors(el, az)[0], ref, atol=1e-5, rtol=0)
    # an engine camera at azimuth az - 90, any distance, gives the same vector
    cam = Cameras.from_spherical(el, az - 90.0, 3.7, 40.0)
    torch.testing.assert_close(camera_vectors(cam, "mvdream")[0], ref, atol=1e-5, rtol=0)


def test_isotropic3d_release_converts_twice_so_cameras_barely_move():
    cams = Cameras.from_spherical([15.0] * 4, [0.0, 90.0, 180.0, 270.0], 2.0, 40.0,
                                  views_per_object=4)
    vec = camera_vectors(cams, "isotropic3d-release")
    expected = torch.stack([torch.from_numpy(mvdream_reference(math.radians(15), math.radians(a)))
                            for a in (0, 90, 180, 270)]).float()
    torch.testing.assert_close(vec, expected, atol=1e-5, rtol=0)
    assert (vec - vec[0]).abs().max() < 0.1                  # nearly constant
    correct = camera_vectors(cams, "mvdream")
    assert (correct - correct[0]).abs().max() > 1.0          # the correct ones differ a lot
    torch.testing.assert_close(isotropic3d_release_vectors(torch.tensor([15.0]), torch.tensor([0.0])),
                               vec[:1])
