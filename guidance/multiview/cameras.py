"""Engine cameras -> the 16-vector camera conditioning of MVDream / Isotropic3D.

MVDream's vector is the camera-to-world matrix with OpenGL camera axes in a z-up world (its
Blender frame), translation scaled to unit length, flattened row-major. The engine's ``c2w``
uses exactly these axes, so the correct conversion is a normalisation and a flatten. MVDream's
azimuth is the engine's + 90 degrees (its azimuth 0 looks from -y; ours from +x).

``isotropic3d-release`` reproduces the released Isotropic3D guidance code, which converts the
(threestudio-convention) angles from degrees to radians and then passes them to MVDream's
camera builder, which converts them again. Its cameras are therefore nearly constant (every
view sits close to MVDream azimuth 0, elevation 0). Use it only to run the released
checkpoint exactly as its authors did; new models should use ``mvdream``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from engine.cameras import Cameras, look_at, spherical_to_position

CONVENTIONS = ("mvdream", "isotropic3d-release")

#: MVDream azimuth = engine azimuth + this
MVDREAM_AZIMUTH_OFFSET = 90.0


def camera_vectors(cameras: Cameras, convention: str = "mvdream") -> Tensor:
    """The [B, 16] conditioning vectors of a batch of engine cameras.

    Differentiable with respect to ``cameras.c2w`` for ``mvdream``; ``isotropic3d-release``
    uses the stored elevation/azimuth only (not differentiable).
    """
    if convention == "mvdream":
        c2w = cameras.c2w.clone()
        t = c2w[:, :3, 3]
        c2w[:, :3, 3] = t / t.norm(dim=-1, keepdim=True).clamp_min(1e-8)
        return c2w.reshape(-1, 16)
    if convention == "isotropic3d-release":
        return isotropic3d_release_vectors(cameras.elevation, cameras.azimuth)
    raise ValueError(f"camera convention '{convention}' is not one of {CONVENTIONS}")


def mvdream_vectors(elevation_deg: Tensor, mvdream_azimuth_deg: Tensor) -> Tensor:
    """MVDream's own camera vectors for (elevation, MVDream azimuth) in degrees, [B] each."""
    el = torch.as_tensor(elevation_deg, dtype=torch.float32).reshape(-1)
    az = torch.as_tensor(mvdream_azimuth_deg, dtype=torch.float32).reshape(-1) - MVDREAM_AZIMUTH_OFFSET
    el, az = torch.broadcast_tensors(el, az)
    eye = spherical_to_position(el, az, torch.ones_like(el))
    return look_at(eye, torch.zeros_like(eye)).reshape(-1, 16)


def isotropic3d_release_vectors(elevation_deg: Tensor, azimuth_deg: Tensor) -> Tensor:
    """The released Isotropic3D code's vectors: angles in degrees become radians, which are
    then read as degrees by MVDream's builder (and the threestudio azimuth is not shifted)."""
    el = torch.as_tensor(elevation_deg, dtype=torch.float64) * (math.pi / 180.0)
    az = torch.as_tensor(azimuth_deg, dtype=torch.float64) * (math.pi / 180.0)
    return mvdream_vectors(el.float(), az.float())
