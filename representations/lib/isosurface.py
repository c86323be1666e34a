"""Surfaces of density fields: sample on a grid, marching cubes (scikit-image)."""

from __future__ import annotations

from typing import Callable, Tuple

import numpy as np
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


def fill_cavities(values: np.ndarray, level: float) -> np.ndarray:
    """Raise every below-``level`` region not connected to the grid's border above it.

    Fields fitted to images are often hollow (only the visible surface is dense); marching
    cubes would then give an inner shell too. Filling the cavities keeps the outer surface
    exactly as it was and makes the solid what it looks like from outside.
    """
    from scipy import ndimage

    empty = values <= level
    labels, _ = ndimage.label(empty)
    border = np.unique(np.concatenate([labels[0].ravel(), labels[-1].ravel(),
                                       labels[:, 0].ravel(), labels[:, -1].ravel(),
                                       labels[:, :, 0].ravel(), labels[:, :, -1].ravel()]))
    cavity = empty & ~np.isin(labels, border[border > 0])
    filled = values.copy()
    filled[cavity] = level + 0.5 * (values.max() - level)
    return filled


def isosurface(grid: Tensor, level: float, radius: float,
               solid: bool = True) -> Tuple[Tensor, Tensor]:
    """Marching cubes of a grid from :func:`sample_grid` where values are high inside.

    ``solid`` fills enclosed cavities first (see :func:`fill_cavities`), so only the outer
    surface is extracted. Returns vertices [V, 3] (world, float32) and faces [F, 3] (long),
    counter-clockwise seen from outside. Raises ValueError when ``level`` is outside the
    grid's range.
    """
    from skimage.measure import marching_cubes

    values = grid.detach().float().cpu().numpy()
    if not values.min() < level < values.max():
        raise ValueError(f"no surface at level {level:g}: the field lies in "
                         f"[{values.min():.3g}, {values.max():.3g}]")
    if solid:
        values = fill_cavities(values, level)
    spacing = 2.0 * radius / (grid.shape[0] - 1)
    verts, faces, _, _ = marching_cubes(values, level=level, spacing=(spacing,) * 3)
    verts = torch.from_numpy(verts.copy()).float() - radius
    # skimage winds faces clockwise seen from the high side; high is inside, so reverse
    faces = torch.from_numpy(faces[:, ::-1].copy()).long()
    return verts, faces
