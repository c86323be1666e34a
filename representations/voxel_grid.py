"""A dense voxel-grid radiance field (DVGO-style): the smallest real 3D representation.

Density and colour live in two dense grids sampled trilinearly; rendering is the same volume
rendering as the NeRF. It is fast on a CPU at small sizes, so the engine's own tests and the
``fit-image`` recipe use it, and it makes a useful coarse stage.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from engine.cameras import Cameras
from engine.errors import ConfigError
from engine.plugin import Background, Representation, StepInfo
from engine.registry import register
from representations.lib.isosurface import isosurface, sample_grid
from representations.lib.volume import ray_sphere_bounds, render_rays, stratified_samples


@register("representation", "voxel-grid")
class VoxelGrid(Representation):
    """Dense density + colour grids, trilinear, volume rendered (fast on CPU)."""

    loss_names = ("opacity_sparsity",)
    param_group_names = ("density", "color")

    @dataclass
    class Config:
        resolution: int = 32           # cells per side of the [-radius, radius]^3 cube
        radius: float = 1.0            # bounding sphere / cube half-size
        samples_per_ray: int = 48
        blob_density: float = 5.0      # initial density bump at the centre
        blob_radius: float = 0.5
        backend: str = "auto"          # compositing: auto | torch | nerfacc
        isosurface_threshold: float = 2.5   # density of the exported surface (blob peak: 5)

        def __post_init__(self):
            if self.resolution < 2:
                raise ConfigError(f"resolution: must be >= 2, got {self.resolution}")
            if self.radius <= 0:
                raise ConfigError(f"radius: must be > 0, got {self.radius}")
            if self.samples_per_ray < 1:
                raise ConfigError(f"samples_per_ray: must be >= 1, got {self.samples_per_ray}")
            if self.backend not in ("auto", "torch", "nerfacc"):
                raise ConfigError(f"backend: expected auto, torch or nerfacc, got '{self.backend}'")

    def __init__(self, cfg: "VoxelGrid.Config" = None, device=None):
        super().__init__()
        self.cfg = cfg = cfg or VoxelGrid.Config()
        self.radius = cfg.radius
        r = cfg.resolution
        self.density_grid = nn.Parameter(torch.zeros(1, 1, r, r, r, device=device))
        self.color_grid = nn.Parameter(torch.zeros(1, 3, r, r, r, device=device))

    def _sample(self, grid: Tensor, points: Tensor) -> Tensor:
        """Trilinear lookup: points [N, 3] (world) -> [N, C]."""
        coords = (points / self.radius).view(1, -1, 1, 1, 3)
        # grid_sample reads (x, y, z) as (W, H, D): consistent as long as we always use it
        values = F.grid_sample(grid, coords, mode="bilinear", padding_mode="zeros",
                               align_corners=True)
        return values.view(grid.shape[1], -1).t()

    def density(self, points: Tensor) -> Tensor:
        """Density [N] >= 0 at world points [N, 3]."""
        blob = self.cfg.blob_density * (1.0 - points.norm(dim=-1) / self.cfg.blob_radius)
        return F.softplus(self._sample(self.density_grid, points)[:, 0] + blob)

    def albedo(self, points: Tensor) -> Tensor:
        return torch.sigmoid(self._sample(self.color_grid, points))

    def surface(self, resolution: int = 128) -> Tuple[Tensor, Tensor]:
        """Marching cubes of the density at ``isosurface_threshold``."""
        grid = sample_grid(self.density, resolution, self.radius, self.density_grid.device)
        try:
            verts, faces = isosurface(grid, self.cfg.isosurface_threshold, self.radius)
        except ValueError as exc:
            raise RuntimeError(f"{exc}; set isosurface_threshold inside that range") from None
        return verts.to(self.density_grid.device), faces.to(self.density_grid.device)

    def render(self, cameras: Cameras, height: int, width: int, *, background: Background,
               step: StepInfo) -> Dict[str, Tensor]:
        origins, dirs = cameras.rays(height, width)
        o, d = origins.reshape(-1, 3), dirs.reshape(-1, 3)
        near, far, _ = ray_sphere_bounds(o, d, self.radius)
        t0, t1 = stratified_samples(near, far, self.cfg.samples_per_ray, perturb=self.training)
        pts = o[:, None] + d[:, None] * (0.5 * (t0 + t1))[..., None]
        flat = pts.reshape(-1, 3)
        sigma = self.density(flat).view(t0.shape)
        rgb = self.albedo(flat).view(*t0.shape, 3)
        out = render_rays(sigma, rgb, t0, t1, background=background(d), backend=self.cfg.backend)
        b = len(cameras)
        return {"rgb": out["rgb"].view(b, height, width, 3),
                "opacity": out["opacity"].view(b, height, width, 1),
                "depth": out["depth"].view(b, height, width, 1)}

    def param_groups(self) -> Dict[str, List[nn.Parameter]]:
        return {"density": [self.density_grid], "color": [self.color_grid]}

    def regularizers(self, outputs: Dict[str, Tensor], step: StepInfo) -> Dict[str, Tensor]:
        # pushes the opacity of each pixel towards 0 or 1 (a crisp silhouette)
        o = outputs["opacity"].clamp(1e-4, 1 - 1e-4)
        return {"opacity_sparsity": (-(o * torch.log(o) + (1 - o) * torch.log(1 - o))).mean()}
