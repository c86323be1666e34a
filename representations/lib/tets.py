"""Regular tetrahedral grids for DMTet.

The cube [-bound, bound]^3 is cut into N^3 cells and each cell into 6 tetrahedra by the
Kuhn (Freudenthal) subdivision: every tet is a monotone path from the cell's lowest corner to
its highest corner, one unit step along each axis in the order given by a permutation of
(x, y, z). All cells are split the same way (no mirroring), so the two triangles of every
cube face are cut along the diagonal from its lowest to its highest corner in both cells
that share it: neighbouring tets share whole faces and there are no T-junctions.

Indexing: vertex (i, j, k) (integer steps along x, y, z) has index ``(i * (N+1) + j) * (N+1) + k``
and position ``-bound + 2 * bound * (i, j, k) / N``. Every tet is listed with positive signed
volume ``det(v1 - v0, v2 - v0, v3 - v0) / 6 > 0``.
"""

from __future__ import annotations

from itertools import permutations
from typing import Tuple

import torch
from torch import Tensor


def _kuhn_offsets() -> Tensor:
    """[6, 4, 3] integer corner offsets of the 6 Kuhn tets of the unit cell, positively
    oriented: odd permutations get their last two vertices swapped."""
    eye = torch.eye(3, dtype=torch.long)
    tets = []
    for perm in permutations(range(3)):
        corners = [torch.zeros(3, dtype=torch.long)]
        for axis in perm:
            corners.append(corners[-1] + eye[axis])
        # det(e_p0, e_p1, e_p2) is the permutation's sign; swapping two vertices flips it
        inversions = sum(1 for a in range(3) for b in range(a + 1, 3) if perm[a] > perm[b])
        if inversions % 2 == 1:
            corners[2], corners[3] = corners[3], corners[2]
        tets.append(torch.stack(corners))
    return torch.stack(tets)


def tet_grid(resolution: int, bound: float = 1.0, device=None,
             dtype: torch.dtype = torch.float32) -> Tuple[Tensor, Tensor]:
    """A tetrahedral grid of the cube [-bound, bound]^3.

    Args:
        resolution: N >= 1 cells per side.
        bound: half the side of the cube.
    Returns:
        vertices [(N+1)^3, 3] (``dtype``) and tets [6 N^3, 4] (long), all positively
        oriented; the 6 tets of cell (i, j, k) are rows ``6 * ((i*N + j)*N + k) + 0..5``.
        Not differentiable (a constant grid).
    """
    n = int(resolution)
    if n < 1:
        raise ValueError(f"tet grid resolution must be >= 1, got {resolution}")
    if not bound > 0:
        raise ValueError(f"tet grid bound must be > 0, got {bound}")
    m = n + 1
    steps = torch.arange(m, device=device)
    ijk = torch.stack(torch.meshgrid(steps, steps, steps, indexing="ij"), dim=-1).reshape(-1, 3)
    vertices = (ijk.to(dtype) * (2.0 * bound / n) - bound).contiguous()

    cells = ijk.reshape(m, m, m, 3)[:n, :n, :n].reshape(-1, 1, 1, 3)     # lowest corners
    corners = cells + _kuhn_offsets().to(device)[None]                  # [C, 6, 4, 3]
    tets = (corners[..., 0] * m + corners[..., 1]) * m + corners[..., 2]
    return vertices, tets.reshape(-1, 4).contiguous()


def signed_volumes(vertices: Tensor, tets: Tensor) -> Tensor:
    """Signed volumes [T] of tets [T, 4] over vertices [V, 3]; differentiable w.r.t. vertices."""
    v = vertices[tets]
    a, b, c = v[:, 1] - v[:, 0], v[:, 2] - v[:, 0], v[:, 3] - v[:, 0]
    return (torch.cross(a, b, dim=-1) * c).sum(-1) / 6.0


def tet_faces(tets: Tensor) -> Tensor:
    """The 4 triangular faces of each tet, [T, 4, 3] vertex indices, each ordered
    counter-clockwise seen from outside the tet (for a positively oriented tet). Not
    differentiable (integer)."""
    # face opposite vertex i, ordered so its normal points away from vertex i
    local = torch.tensor([[1, 2, 3], [0, 3, 2], [0, 1, 3], [0, 2, 1]], device=tets.device)
    return tets[:, local]


def cut_cell_tets(sdf: Tensor, resolution: int) -> Tensor:
    """Indices [K] (long) of the tets of :func:`tet_grid` lying in cells whose 8 corners do not
    all have the same sign of ``sdf`` [(N+1)^3] (``< 0`` vs ``>= 0``). Every tet that marching
    tets would cut is among them, so ``tets[cut_cell_tets(sdf, N)]`` gives the same mesh at a
    fraction of the cost: the test reads contiguous slices of the grid instead of gathering
    4 values per tet. Works on deformed grids too (only the indexing is used). Not
    differentiable (integer)."""
    n = int(resolution)
    m = n + 1
    if sdf.numel() != m ** 3:
        raise ValueError(f"sdf has {sdf.numel()} values, a grid of resolution {n} has {m ** 3}")
    inside = (sdf.detach() < 0).reshape(m, m, m)
    any_in = torch.zeros(n, n, n, dtype=torch.bool, device=sdf.device)
    all_in = torch.ones(n, n, n, dtype=torch.bool, device=sdf.device)
    for di in (0, 1):
        for dj in (0, 1):
            for dk in (0, 1):
                corner = inside[di:di + n, dj:dj + n, dk:dk + n]
                any_in |= corner
                all_in &= corner
    cells = torch.nonzero((any_in & ~all_in).reshape(-1)).squeeze(1)
    return (cells[:, None] * 6 + torch.arange(6, device=sdf.device)).reshape(-1)
