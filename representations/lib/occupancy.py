"""Occupancy grid for empty-space skipping, pure torch (CPU and CUDA).

A ``res^3`` grid over the cube [-radius, radius]^3 keeps a running estimate of the density in
each cell (``max(decay * old, new)`` from one jittered point per cell, as Instant-NGP and
nerfacc do) and marks a cell occupied when the opacity of one render step through it,
``1 - exp(-density * step)``, exceeds ``min(threshold, mean)``, then grows the occupied set by
``dilate`` cells: one jittered point can miss the dense part of a cell that a surface crosses,
and its neighbour towards the inside is then reliably occupied. Samples falling in empty
cells are dropped before the field is evaluated; compositing sees zero density there.

Until the first update every cell counts as occupied, so skipping never changes a render of a
grid that was not yet filled.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import Tensor, nn

from engine.errors import ConfigError


@dataclass
class OccupancyConfig:
    """Settings of :class:`OccupancyGrid` as a representation's ``occupancy:`` block (the NeRF's
    and the triplane's)."""
    enabled: bool = True
    resolution: int = 64
    update_every: int = 16            # steps between grid refreshes
    threshold: float = 0.01           # opacity of one render step below which a cell is empty
    decay: float = 0.95               # running estimate: max(decay * old, new)
    dilate: int = 1                   # grow the occupied cells by this many cells

    def __post_init__(self):
        if self.resolution < 2:
            raise ConfigError(f"resolution: must be >= 2, got {self.resolution}")
        if self.update_every < 1:
            raise ConfigError(f"update_every: must be >= 1, got {self.update_every}")
        if not 0.0 <= self.threshold < 1.0:
            raise ConfigError(f"threshold: must be in [0, 1), got {self.threshold}")
        if not 0.0 <= self.decay <= 1.0:
            raise ConfigError(f"decay: must be in [0, 1], got {self.decay}")
        if self.dilate < 0:
            raise ConfigError(f"dilate: must be >= 0, got {self.dilate}")



def cell_index(points: Tensor, resolution: int, radius: float) -> Tensor:
    """Flat cell index [...] (x-major: i * R^2 + j * R + k) of points [..., 3]; points outside
    the cube are clamped to the border cells. Not differentiable."""
    g = ((points.detach() + radius) * (resolution / (2.0 * radius))).floor().long()
    g = g.clamp_(0, resolution - 1)
    return (g[..., 0] * resolution + g[..., 1]) * resolution + g[..., 2]


def jittered_cell_points(resolution: int, radius: float, device=None,
                         generator: Optional[torch.Generator] = None) -> Tensor:
    """One uniformly random point in every cell, [R^3, 3], in :func:`cell_index` order."""
    r = torch.arange(resolution, device=device, dtype=torch.float32)
    ijk = torch.stack(torch.meshgrid(r, r, r, indexing="ij"), dim=-1).reshape(-1, 3)
    jitter = torch.rand(ijk.shape, generator=generator).to(ijk)
    return (ijk + jitter) * (2.0 * radius / resolution) - radius


class OccupancyGrid(nn.Module):
    """Occupancy of ``resolution^3`` cells over [-radius, radius]^3 (buffers, checkpointed).

    ``density`` [R^3] float (running max-decay estimate), ``occupied`` [R^3] bool.
    """

    def __init__(self, resolution: int = 64, radius: float = 1.0, threshold: float = 0.01,
                 decay: float = 0.95, dilate: int = 1, device=None):
        super().__init__()
        self.resolution, self.radius = int(resolution), float(radius)
        self.threshold, self.decay = float(threshold), float(decay)
        self.dilate = int(dilate)
        n = self.resolution ** 3
        self.register_buffer("density", torch.zeros(n, device=device))
        self.register_buffer("occupied", torch.ones(n, dtype=torch.bool, device=device))

    @torch.no_grad()
    def update(self, density_fn: Callable[[Tensor], Tensor], step_size: float,
               chunk: int = 65536) -> None:
        """Re-evaluate ``density_fn(points [M, 3]) -> [M]`` at jittered cell points and
        refresh ``occupied``. ``step_size``: the length of one render step (sets the opacity
        scale of the threshold)."""
        pts = jittered_cell_points(self.resolution, self.radius, self.density.device)
        new = torch.cat([density_fn(p).reshape(-1).float() for p in pts.split(chunk)])
        self.density.copy_(torch.maximum(self.density * self.decay, new))
        alpha = 1.0 - torch.exp(-self.density * step_size)
        thr = min(self.threshold, float(alpha.mean()))
        occ = alpha > thr
        if self.dilate > 0:
            r, k = self.resolution, 2 * self.dilate + 1
            occ = torch.nn.functional.max_pool3d(occ.float().reshape(1, 1, r, r, r), k, 1,
                                                 self.dilate).reshape(-1) > 0
        self.occupied.copy_(occ)

    def mark_all_occupied(self) -> None:
        self.occupied.fill_(True)

    def lookup(self, points: Tensor) -> Tensor:
        """Whether each point [..., 3] lies in an occupied cell -> bool [...]."""
        return self.occupied[cell_index(points, self.resolution, self.radius)]

    @property
    def occupied_fraction(self) -> float:
        return float(self.occupied.float().mean())
