"""Engine cameras -> MVDream camera vectors, with exact fixtures."""

import math

import numpy as np
import pytest
import torch

from engine.cameras import Cameras
from guidance.multiview.cameras import (MVDREAM_AZIMUTH_OFFSET, camera_vectors,
                                         isotropic3d_release_vectors, mvdream_vectors)


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


# -- worked by hand ------------------------------------------------------------------------------
#
# MVDream's camera_utils.create_camera_to_world_matrix(E, A) (degrees, converted by np.radians),
# y-up OpenGL world: position p = (cos E sin A, sin E, cos E cos A); forward f = -p;
# right = normalise(f x (0, 1, 0)) = (cos A, 0, -sin A); up = right x f
# = (-sin A sin E, cos E, -cos A sin E); columns [right, up, -f = p], translation p.
# convert_opengl_to_blender left-multiplies by [[1,0,0,0],[0,0,-1,0],[0,1,0,0],[0,0,0,1]]:
# row 0 stays, row 1 becomes -(old row 2), row 2 becomes old row 1. Flattened row-major:
#
#   [ cA, -sA sE,  cE sA,  cE sA,
#     sA,  cA sE, -cE cA, -cE cA,
#      0,     cE,     sE,     sE,
#      0,      0,      0,      1 ]        (cX = cos X, sX = sin X)
#
# The translation column is the camera's position in the z-up world: (cE sA, -cE cA, sE), i.e.
# MVDream azimuth 0 looks from -y and azimuth 90 from +x (engine azimuth = MVDream's - 90).

R2, R3, R6 = math.sqrt(2.0), math.sqrt(3.0), math.sqrt(6.0)

HAND_WORKED = {
    # E = 0, A = 0: cA = 1, sA = 0, cE = 1, sE = 0; the camera at (0, -1, 0)
    (0.0, 0.0): [1, 0, 0, 0,
                 0, 0, -1, -1,
                 0, 1, 0, 0,
                 0, 0, 0, 1],
    # E = 0, A = 90: cA = 0, sA = 1; the camera at (1, 0, 0), right = +y, up = +z
    (0.0, 90.0): [0, 0, 1, 1,
                  1, 0, 0, 0,
                  0, 1, 0, 0,
                  0, 0, 0, 1],
    # E = 30, A = 45: cE = sqrt(3)/2, sE = 1/2, cA = sA = sqrt(2)/2;
    # sA sE = sqrt(2)/4, cE sA = sqrt(6)/4; the camera at (sqrt(6)/4, -sqrt(6)/4, 1/2)
    (30.0, 45.0): [R2 / 2, -R2 / 4, R6 / 4, R6 / 4,
                   R2 / 2, R2 / 4, -R6 / 4, -R6 / 4,
                   0, R3 / 2, 0.5, 0.5,
                   0, 0, 0, 1],
    # E = 30, A = 180: cA = -1, sA = 0; the camera at (0, sqrt(3)/2, 1/2) (engine azimuth 90)
    (30.0, 180.0): [-1, 0, 0, 0,
                    0, -0.5, R3 / 2, R3 / 2,
                    0, R3 / 2, 0.5, 0.5,
                    0, 0, 0, 1],
}


@pytest.mark.parametrize("el, az", sorted(HAND_WORKED))
def test_mvdream_vectors_worked_by_hand(el, az):
    expected = torch.tensor(HAND_WORKED[(el, az)], dtype=torch.float32)
    got = mvdream_vectors(el, az)
    assert got.shape == (1, 16) and got.dtype == torch.float32
    torch.testing.assert_close(got[0], expected, atol=1e-6, rtol=0)


@pytest.mark.parametrize("el, az", sorted(HAND_WORKED))
@pytest.mark.parametrize("radius", [1.0, 2.5, 0.8])
def test_engine_cameras_at_any_radius_give_the_hand_worked_vector(el, az, radius):
    """An engine camera at (el, MVDream az - 90) gives the same vector at every radius: the
    translation is scaled to unit length (MVDream's normalize_camera: t / (|t| + 1e-8), which
    differs from t / |t| by under 1e-8 relative at these radii)."""
    cams = Cameras.from_spherical(el, az - MVDREAM_AZIMUTH_OFFSET, radius, 40.0)
    assert cams.c2w[0, :3, 3].norm().item() == pytest.approx(radius, rel=1e-6)
    expected = torch.tensor(HAND_WORKED[(el, az)], dtype=torch.float32)
    torch.testing.assert_close(camera_vectors(cams, "mvdream")[0], expected, atol=1e-6, rtol=0)


def test_a_batch_mixes_radii_without_mixing_vectors():
    cams = Cameras.from_spherical([0.0, 0.0, 30.0], [-90.0, 0.0, -45.0], [1.0, 2.5, 3.7], 40.0)
    expected = torch.tensor([HAND_WORKED[(0.0, 0.0)], HAND_WORKED[(0.0, 90.0)],
                             HAND_WORKED[(30.0, 45.0)]], dtype=torch.float32)
    torch.testing.assert_close(camera_vectors(cams, "mvdream"), expected, atol=1e-6, rtol=0)
    assert cams.c2w[1, :3, 3].norm().item() == pytest.approx(2.5)   # the input is untouched


# Isotropic3D's guidance get_camera_cond(elevation, azimuth) takes threestudio's angles in
# degrees (engine convention, no azimuth shift), applies np.deg2rad, and hands the radians to
# create_camera_to_world_matrix, which applies np.radians again. Engine elevation 30,
# azimuth 90:
#   E = 30 pi/180 = pi/6 = 0.5235988, read as degrees: E = pi^2/1080 = 0.009138523 rad
#   A = 90 pi/180 = pi/2 = 1.5707963, read as degrees: A = pi^2/360  = 0.027415568 rad
#   sE = E - E^3/6 = 0.009138523 - 0.000000127 = 0.009138395
#   cE = 1 - E^2/2 = 1 - 0.000041756           = 0.999958244
#   sA = A - A^3/6 = 0.027415568 - 0.000003434 = 0.027412134
#   cA = 1 - A^2/2 + A^4/24 = 1 - 0.000375807 + 0.000000024 = 0.999624217
#   sA sE = 0.000250503, cE sA = 0.027410989, cA sE = 0.009134961, cE cA = 0.999582477
ISOTROPIC_30_90 = [0.999624217, -0.000250503, 0.027410989, 0.027410989,
                   0.027412134, 0.009134961, -0.999582477, -0.999582477,
                   0.0, 0.999958244, 0.009138395, 0.009138395,
                   0.0, 0.0, 0.0, 1.0]


def test_isotropic3d_release_worked_by_hand():
    expected = torch.tensor(ISOTROPIC_30_90, dtype=torch.float32)
    torch.testing.assert_close(isotropic3d_release_vectors(torch.tensor([30.0]),
                                                           torch.tensor([90.0]))[0],
                               expected, atol=2e-6, rtol=0)
    # through engine cameras: only the stored angles count, not the radius or c2w
    for radius in (1.0, 2.5):
        cams = Cameras.from_spherical(30.0, 90.0, radius, 40.0)
        torch.testing.assert_close(camera_vectors(cams, "isotropic3d-release")[0], expected,
                                   atol=2e-6, rtol=0)
    # what the same camera gives in the mvdream convention: MVDream azimuth 180, by hand above
    torch.testing.assert_close(camera_vectors(Cameras.from_spherical(30.0, 90.0, 2.5, 40.0),
                                              "mvdream")[0],
                               torch.tensor(HAND_WORKED[(30.0, 180.0)], dtype=torch.float32),
                               atol=1e-6, rtol=0)
