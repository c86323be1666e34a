"""Camera model, the engine's conventions, and camera samplers.

Conventions (every module of the engine uses these):

* World: right-handed, **z up**. The object sits at the origin inside the unit-radius
  bounding sphere.
* Spherical coordinates (degrees): elevation above the xy-plane; azimuth measured from +x
  towards +y, so azimuth 0 puts the camera on the +x axis looking back at the origin. This is
  threestudio's convention; MVDream's azimuth is ours + 90 (see ``guidance`` for conversion).
* Camera-to-world matrices ``c2w`` [..., 4, 4] use OpenGL camera axes: the columns of the
  rotation are the camera's right, up and backward (-forward) directions in world space; the
  last column is the camera position.
* Images: row 0 is the top. A pixel's centre is at (col + 0.5, row + 0.5). ``fovy`` is the
  vertical field of view in radians; pixels are square.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, List, Optional, Tuple

import torch
from torch import Tensor

from engine.errors import ConfigError
from engine.registry import register
from engine.schedules import Schedule


def _normalize(v: Tensor) -> Tensor:
    return v / v.norm(dim=-1, keepdim=True).clamp_min(1e-12)


def look_at(eye: Tensor, target: Tensor, up: Optional[Tensor] = None) -> Tensor:
    """Camera-to-world matrices for cameras at ``eye`` looking at ``target``.

    Args:
        eye, target: [B, 3]. up: [3] world up (default +z). Where the view direction is
            parallel to ``up``, +y is used instead so the result stays a rotation.
    Returns:
        c2w [B, 4, 4]. Differentiable with respect to ``eye`` and ``target``.
    """
    if up is None:
        up = torch.tensor([0.0, 0.0, 1.0], dtype=eye.dtype, device=eye.device)
    forward = _normalize(target - eye)
    up = up.expand_as(forward)
    right = torch.cross(forward, up, dim=-1)
    degenerate = right.norm(dim=-1, keepdim=True) < 1e-6
    alt_up = torch.tensor([0.0, 1.0, 0.0], dtype=eye.dtype, device=eye.device).expand_as(up)
    right = torch.where(degenerate, torch.cross(forward, alt_up, dim=-1), right)
    right = _normalize(right)
    cam_up = torch.cross(right, forward, dim=-1)
    c2w = torch.zeros(eye.shape[0], 4, 4, dtype=eye.dtype, device=eye.device)
    c2w[:, :3, 0] = right
    c2w[:, :3, 1] = cam_up
    c2w[:, :3, 2] = -forward
    c2w[:, :3, 3] = eye
    c2w[:, 3, 3] = 1.0
    return c2w


def spherical_to_position(elevation_deg: Tensor, azimuth_deg: Tensor, distance: Tensor) -> Tensor:
    """Camera positions [B, 3] from elevation, azimuth (degrees) and distance, each [B]."""
    el = torch.deg2rad(elevation_deg)
    az = torch.deg2rad(azimuth_deg)
    return torch.stack(
        [distance * torch.cos(el) * torch.cos(az),
         distance * torch.cos(el) * torch.sin(az),
         distance * torch.sin(el)], dim=-1)


@dataclass
class Cameras:
    """A batch of B pinhole cameras looking at the origin.

    ``views_per_object`` groups the batch: views of one object are contiguous (all views of
    object 0, then object 1, ...), which multi-view guidance relies on.
    """

    c2w: Tensor                      # [B, 4, 4]
    fovy: Tensor                     # [B] radians
    elevation: Tensor                # [B] degrees
    azimuth: Tensor                  # [B] degrees
    distance: Tensor                 # [B]
    views_per_object: int = 1
    # which view of a dataset each camera is, when a sampler draws them from one (else None)
    index: Optional[Tensor] = None

    @staticmethod
    def from_spherical(elevation_deg, azimuth_deg, distance, fovy_deg,
                       views_per_object: int = 1, device=None) -> "Cameras":
        """Cameras on a sphere around the origin; arguments are numbers or [B] tensors."""
        el, az, d, fov = (torch.as_tensor(x, dtype=torch.float32, device=device).reshape(-1)
                          for x in (elevation_deg, azimuth_deg, distance, fovy_deg))
        el, az, d, fov = torch.broadcast_tensors(el, az, d, fov)
        eye = spherical_to_position(el, az, d)
        c2w = look_at(eye, torch.zeros_like(eye))
        return Cameras(c2w, torch.deg2rad(fov), el.clone(), az.clone(), d.clone(),
                       views_per_object)

    def __len__(self) -> int:
        return self.c2w.shape[0]

    @property
    def device(self) -> torch.device:
        return self.c2w.device

    @property
    def position(self) -> Tensor:
        """Camera centres [B, 3]."""
        return self.c2w[:, :3, 3]

    def to(self, device) -> "Cameras":
        moved = {k: getattr(self, k).to(device)
                 for k in ("c2w", "fovy", "elevation", "azimuth", "distance")}
        return replace(self, index=None if self.index is None else self.index.to(device), **moved)

    def __getitem__(self, index) -> "Cameras":
        index = torch.as_tensor(index).reshape(-1)
        return replace(self, c2w=self.c2w[index], fovy=self.fovy[index],
                       elevation=self.elevation[index], azimuth=self.azimuth[index],
                       distance=self.distance[index], views_per_object=1,
                       index=None if self.index is None else self.index[index])

    def focal(self, height: int) -> Tensor:
        """Focal length in pixels [B] for an image ``height`` pixels tall."""
        return 0.5 * height / torch.tan(0.5 * self.fovy)

    def rays(self, height: int, width: int) -> Tuple[Tensor, Tensor]:
        """World-space rays through pixel centres.

        Returns:
            origins [B, H, W, 3] and unit directions [B, H, W, 3]. Differentiable with
            respect to ``c2w`` and ``fovy``.
        """
        dev, dt = self.c2w.device, self.c2w.dtype
        rows = torch.arange(height, device=dev, dtype=dt) + 0.5
        cols = torch.arange(width, device=dev, dtype=dt) + 0.5
        v, u = torch.meshgrid(rows, cols, indexing="ij")
        f = self.focal(height)[:, None, None]
        x = (u - 0.5 * width) / f
        y = -(v - 0.5 * height) / f
        d_cam = torch.stack([x, y, -torch.ones_like(x)], dim=-1)
        dirs = _normalize(torch.einsum("bij,bhwj->bhwi", self.c2w[:, :3, :3], d_cam))
        origins = self.position[:, None, None, :].expand_as(dirs)
        return origins, dirs

    def projection(self, height: int, width: int, near: float = 0.1, far: float = 100.0) -> Tensor:
        """OpenGL perspective matrices [B, 4, 4] (camera space -> clip space).

        NDC y = +1 is the top row of the image, x = +1 the right column.
        """
        f = 1.0 / torch.tan(0.5 * self.fovy)
        p = torch.zeros(len(self), 4, 4, dtype=self.c2w.dtype, device=self.c2w.device)
        p[:, 0, 0] = f * height / width
        p[:, 1, 1] = f
        p[:, 2, 2] = -(far + near) / (far - near)
        p[:, 2, 3] = -2.0 * far * near / (far - near)
        p[:, 3, 2] = -1.0
        return p

    def world_to_clip(self, height: int, width: int, near: float = 0.1,
                      far: float = 100.0) -> Tensor:
        """Model-view-projection matrices [B, 4, 4]: world points -> clip space."""
        return self.projection(height, width, near, far) @ torch.linalg.inv(self.c2w)


def ndc_to_pixel(ndc_xy: Tensor, height: int, width: int) -> Tensor:
    """NDC xy in [-1, 1] -> continuous pixel coordinates (col, row), row 0 at the top."""
    col = (ndc_xy[..., 0] + 1.0) * 0.5 * width
    row = (1.0 - ndc_xy[..., 1]) * 0.5 * height
    return torch.stack([col, row], dim=-1)


def orbit(n: int, elevation_deg: float = 15.0, distance: float = 2.5, fovy_deg: float = 40.0,
          start_azimuth_deg: float = 0.0, device=None) -> Cameras:
    """``n`` cameras evenly spaced in azimuth (a turntable), one object's worth of views."""
    az = start_azimuth_deg + torch.arange(n, dtype=torch.float32) * 360.0 / n
    return Cameras.from_spherical(elevation_deg, az, distance, fovy_deg, views_per_object=n,
                                  device=device)


# ---------------------------------------------------------------------------------------
# Samplers: registered as kind "cameras"; a stage's ``cameras: {type: ..., ...}`` picks one.
# ---------------------------------------------------------------------------------------

def _check_range(key: str, rng: List[float], lo: float, hi: float) -> None:
    if len(rng) != 2 or rng[0] > rng[1]:
        raise ConfigError(f"{key}: expected [min, max] with min <= max, got {list(rng)}")
    if rng[0] < lo or rng[1] > hi:
        raise ConfigError(f"{key}: values must lie in [{lo:g}, {hi:g}], got {list(rng)}")


@register("cameras", "random-multiview")
class RandomMultiViewSampler:
    """Groups of views 360/views degrees apart in azimuth with a shared random offset,
    elevation, field of view and distance (MVDream / Isotropic3D training cameras)."""

    @dataclass
    class Config:
        groups: Any = 1                    # objects per batch; a schedule (e.g. 2 then 1)
        views: int = 4                     # views per group
        elevation_range: List[float] = field(default_factory=lambda: [0.0, 30.0])
        fovy_range: List[float] = field(default_factory=lambda: [15.0, 60.0])
        distance_range: List[float] = field(default_factory=lambda: [0.8, 1.0])
        # distance = sampled value / tan(fovy / 2): the object keeps its size on screen
        relative_distance: bool = True

        def __post_init__(self):
            self.groups_schedule = Schedule.parse(self.groups, "groups").check(
                "groups", minimum=1, integer=True)
            if self.views < 1:
                raise ConfigError(f"views: must be >= 1, got {self.views}")
            _check_range("elevation_range", self.elevation_range, -89.0, 89.0)
            _check_range("fovy_range", self.fovy_range, 1.0, 179.0)
            _check_range("distance_range", self.distance_range, 1e-3, 1e6)

    def __init__(self, cfg: "RandomMultiViewSampler.Config", device=None):
        self.cfg = cfg
        self.device = device

    def sample(self, step: int, generator: torch.Generator) -> Cameras:
        c = self.cfg
        g = int(c.groups_schedule(step))

        def uniform(rng):
            return rng[0] + (rng[1] - rng[0]) * torch.rand(g, generator=generator)

        el, fov, dist = uniform(c.elevation_range), uniform(c.fovy_range), uniform(c.distance_range)
        offset = torch.rand(g, generator=generator) * 360.0
        if c.relative_distance:
            dist = dist / torch.tan(torch.deg2rad(fov) * 0.5)
        spacing = torch.arange(c.views, dtype=torch.float32) * 360.0 / c.views
        az = (offset[:, None] + spacing[None, :]) % 360.0
        rep = lambda x: x[:, None].expand(g, c.views).reshape(-1)  # noqa: E731
        return Cameras.from_spherical(rep(el), az.reshape(-1), rep(dist), rep(fov),
                                      views_per_object=c.views, device=self.device)


def check_framing(distance: float, fovy: float, key_prefix: str = "") -> None:
    """One line for a camera distance that is not positive or a vertical field of view
    outside (0, 180) degrees; ``key_prefix`` names where they sit (``views.``)."""
    if distance <= 0:
        raise ConfigError(f"{key_prefix}distance: must be > 0, got {distance}")
    if not 0 < fovy < 180:
        raise ConfigError(f"{key_prefix}fovy: must be in (0, 180) degrees, got {fovy}")


@register("cameras", "fixed")
class FixedViewSampler:
    """Always the same cameras: the reference view of an input image by default."""

    @dataclass
    class Config:
        elevation: List[float] = field(default_factory=lambda: [0.0])
        azimuth: List[float] = field(default_factory=lambda: [0.0])
        distance: float = 2.5
        fovy: float = 40.0

        def __post_init__(self):
            if len(self.elevation) != len(self.azimuth) or not self.azimuth:
                raise ConfigError("elevation/azimuth: need lists of the same non-zero length, "
                                  f"got {len(self.elevation)} and {len(self.azimuth)}")
            check_framing(self.distance, self.fovy)

    def __init__(self, cfg: "FixedViewSampler.Config", device=None):
        self.cameras = Cameras.from_spherical(cfg.elevation, cfg.azimuth, cfg.distance, cfg.fovy,
                                              views_per_object=len(cfg.azimuth), device=device)

    def sample(self, step: int, generator: torch.Generator) -> Cameras:
        return self.cameras

