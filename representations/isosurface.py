"""Surfaces of density fields: sample on a grid, marching cubes (scikit-image)."""

from __future__ import annotations

from typing import Callable, Tuple

import torch
from torch import Tensor


@torch.no_grad()
def sample_grid(field: Callable[[Tensor], Tensor], resolution: int, radius: float,
                device=None, chunk: int = 1 << 18) -> Tensor:
    """``field`` ([N, 3] world points -> [N]) at the vertices of a resolution^3 grid spanning
    [-radius, radius]^3, indexed (x, y, z). Not differentiable."""
    axis = torch.linspace(-radius, radius, resolution, device=device)
    pts = torch.stack(torch.meshgrid(axis, axis, axis, indexing="ij"), dim=-1).reshape(-1, 3)
    out = torch.cat([field(pts[i:i + chunk]).reshape(-1) for i in range(0, len(pts), chunk)])
    return out.reshape(resolution, resolution, resolution)


def isosurface(grid: Tensor, level: float, radius: float) -> Tuple[Tensor, Tensor]:
    """Marching cubes of a grid from :func:`sample_grid` where values are high inside.

    Returns vertices [V, 3] (world, float32) and faces [F, 3] (long), counter-clockwise seen
    from outside. Raises ValueError when ``level`` is outside the grid's range.
    """
    from skimage.measure import marching_cubes

    values = grid.detach().float().cpu().numpy()
    if not values.min() < level < values.max():
        raise ValueError(f"no surface at level {level:g}: the field lies in "
                         f"[{values.min():.3g}, {values.max():.3g}]")
    spacing = 2.0 * radius / (grid.shape[0] - 1)
    verts, faces, _, _ = marching_cubes(values, level=level, spacing=(spacing,) * 3)
    verts = torch.from_numpy(verts.copy()).float() - radius
    # skimage winds faces clockwise seen from the high side; high is inside, so reverse
    faces = torch.from_numpy(faces[:, ::-1].copy()).long()
    return verts, faces
