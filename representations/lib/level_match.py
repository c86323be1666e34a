"""The density level whose level set looks, from around the object, like the volume render.

A NeRF trained by score distillation is soft: its density rises gradually into the object,
so which level set "is" the surface is a choice. A fixed level (the recipe's
``isosurface_threshold``) suits one field and not the next: on the toy world's fields level
10 is a small core of what the NeRF renders. This module picks the level per field instead:
the one whose silhouette, seen from a ring of cameras, best matches (IoU) where the volume
render is opaque (opacity > 0.5).

Along one ray the level set {density > level} is hit exactly when the ray's peak density
exceeds the level, so every candidate level's silhouette comes from one pass of samples and
the search is a sort: no mesh is built. For a Gaussian blob ``A exp(-r^2 / s^2)`` the
answer is known in closed form, ``ln 2 / (s sqrt(pi))`` whatever ``A`` (tests hold it).

Nothing here is differentiable: it runs once, under ``torch.no_grad``, to initialise a stage.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import Tensor

from engine.cameras import Cameras
from representations.lib import volume


@dataclass
class LevelMatch:
    """The chosen ``level`` and how well its silhouette matched (``iou`` in [0, 1]) over
    ``rays`` rays, of which ``opaque`` rendered with opacity above the threshold."""
    level: float
    iou: float
    rays: int
    opaque: int


def ring_cameras(radius: float, device=None) -> Cameras:
    """16 cameras framing the sphere of ``radius``: 8 azimuths at elevations 0 and 30
    degrees (the range the multi-view guidance samples), 40 degree field of view."""
    fovy = 40.0
    distance = 1.1 * radius / math.sin(math.radians(fovy / 2))
    elevation = torch.tensor([0.0] * 8 + [30.0] * 8)
    azimuth = torch.cat([torch.arange(8) * 45.0, torch.arange(8) * 45.0 + 22.5])
    return Cameras.from_spherical(elevation, azimuth, distance, fovy, device=device)


def ray_opacity_and_peak(density: Callable[[Tensor], Tensor], origins: Tensor, dirs: Tensor,
                         radius: float, samples: int = 128, chunk: int = 1 << 16):
    """Volume-rendered opacity and peak sampled density of each ray inside the sphere.

    Args:
        density: points [P, 3] -> density [P] or [P, 1] (non-negative).
        origins, dirs: [N, 3], dirs unit length.
    Returns:
        opacity [N] (``1 - exp(-sum sigma delta)`` over ``samples`` evenly spaced midpoints;
        0 for rays missing the sphere) and peak [N] (largest sampled density; 0 on a miss).
    """
    near, far, hit = volume.ray_sphere_bounds(origins, dirs, radius)
    t0, t1 = volume.stratified_samples(near, far, samples, perturb=False)
    points = origins[:, None, :] + dirs[:, None, :] * (0.5 * (t0 + t1))[..., None]
    flat = points.reshape(-1, 3)
    sigma = torch.cat([density(part).reshape(-1) for part in flat.split(chunk)])
    sigma = sigma.reshape(t0.shape).float().clamp_min(0.0) * hit[:, None]
    opacity = 1.0 - torch.exp(-(sigma * (t1 - t0)).sum(-1))
    return opacity, sigma.max(-1).values


def best_silhouette_level(opacity: Tensor, peak: Tensor,
                          opacity_threshold: float = 0.5) -> Optional[LevelMatch]:
    """The level whose silhouette ``peak > level`` best matches ``opacity > threshold``.

    Args:
        opacity, peak: [N] per ray.
    Returns:
        The level maximising IoU, halfway between the peak of the last ray it takes in and
        the next lower peak (so the level set keeps a margin on both sides); ties go to the
        higher level. None when no ray is opaque: there is no silhouette to match.
    """
    target = opacity.reshape(-1) > opacity_threshold
    peak = peak.reshape(-1).float()
    n_target = int(target.sum())
    if n_target == 0:
        return None
    order = torch.argsort(peak, descending=True)
    peak_sorted, target_sorted = peak[order], target[order]
    # taking in the k highest-peaked rays: intersection and union with the target
    inter = torch.cumsum(target_sorted.float(), 0)
    union = n_target + torch.cumsum((~target_sorted).float(), 0)
    iou = inter / union
    # only cut between distinct peaks: rays of equal peak enter together
    lower = torch.cat([peak_sorted[1:], peak_sorted.new_zeros(1)])
    valid = (peak_sorted > lower) & (peak_sorted > 0)
    if not bool(valid.any()):
        return None
    iou = torch.where(valid, iou, torch.full_like(iou, -1.0))
    k = int(torch.argmax(iou))          # first maximum: the highest level among ties
    level = 0.5 * float(peak_sorted[k] + lower[k])
    return LevelMatch(level=level, iou=float(iou[k]), rays=int(peak.numel()), opaque=n_target)


def silhouette_level(density: Callable[[Tensor], Tensor], radius: float,
                     cameras: Optional[Cameras] = None, size: int = 32, samples: int = 128,
                     opacity_threshold: float = 0.5, device=None) -> Optional[LevelMatch]:
    """The density level whose silhouettes best match the volume render's opaque region,
    over ``cameras`` (default: ``ring_cameras(radius)``) at ``size`` x ``size`` pixels.
    None when nothing renders opaque (an empty field). See ``best_silhouette_level``."""
    cameras = cameras if cameras is not None else ring_cameras(radius, device=device)
    with torch.no_grad():
        origins, dirs = cameras.rays(size, size)
        opacity, peak = ray_opacity_and_peak(density, origins.reshape(-1, 3),
                                             dirs.reshape(-1, 3), radius, samples)
    return best_silhouette_level(opacity, peak, opacity_threshold)
