"""Tetrahedral grid: exact fixtures, orientation, conformity (faces shared, no T-junctions)."""

from collections import Counter

import pytest
import torch

from representations.lib.marching_tets import marching_tets
from representations.lib.tets import cut_cell_tets, signed_volumes, tet_faces, tet_grid


def _face_counts(tets):
    faces = tet_faces(tets).reshape(-1, 3)
    return Counter(tuple(sorted(f)) for f in faces.tolist()), faces


def test_one_cell_exact_vertices_and_tets():
    vertices, tets = tet_grid(1)
    expected_vertices = torch.tensor(
        [[-1, -1, -1], [-1, -1, 1], [-1, 1, -1], [-1, 1, 1],
         [1, -1, -1], [1, -1, 1], [1, 1, -1], [1, 1, 1]], dtype=torch.float32)
    # Kuhn subdivision: each tet a path 0 -> 7 along the axes in one order
    expected_tets = torch.tensor(
        [[0, 4, 6, 7], [0, 4, 7, 5], [0, 2, 7, 6], [0, 2, 3, 7], [0, 1, 5, 7], [0, 1, 7, 3]])
    assert vertices.dtype == torch.float32 and tets.dtype == torch.long
    assert torch.equal(vertices, expected_vertices)
    assert torch.equal(tets, expected_tets)
    volumes = signed_volumes(vertices, tets)
    assert torch.allclose(volumes, torch.full((6,), 8.0 / 6.0))
    assert volumes.sum().item() == pytest.approx(8.0)


def test_one_cell_faces_interior_shared_boundary_single():
    _, tets = tet_grid(1)
    counts, _ = _face_counts(tets)
    # 6 tets x 4 faces = 24 = 12 boundary faces (2 per cube side) + 2 x 6 interior faces
    assert sorted(Counter(counts.values()).items()) == [(1, 12), (2, 6)]


@pytest.mark.parametrize("n,bound", [(2, 1.0), (3, 0.5), (4, 2.0)])
def test_grid_is_a_conforming_positive_tiling(n, bound):
    vertices, tets = tet_grid(n, bound=bound, dtype=torch.float64)
    assert vertices.shape == ((n + 1) ** 3, 3) and tets.shape == (6 * n ** 3, 4)
    # vertex (i, j, k) at index (i (n+1) + j)(n+1) + k
    i, j, k = 1, n, n - 1
    idx = (i * (n + 1) + j) * (n + 1) + k
    step = 2 * bound / n
    expected = torch.tensor([i, j, k], dtype=torch.float64) * step - bound
    assert torch.allclose(vertices[idx], expected)

    volumes = signed_volumes(vertices, tets)
    assert torch.allclose(volumes, torch.full_like(volumes, step ** 3 / 6))
    assert volumes.sum().item() == pytest.approx((2 * bound) ** 3)

    counts, faces = _face_counts(tets)
    on_boundary = {}
    for key in counts:
        pts = vertices[list(key)]
        on_boundary[key] = bool(((pts.abs() - bound).abs() < 1e-9).all(0).any())
    for key, c in counts.items():
        assert c == (1 if on_boundary[key] else 2), (key, c)
    assert sum(on_boundary.values()) == 6 * 2 * n * n

    # a shared face is seen with opposite windings from its two tets (consistent orientation)
    directed = Counter()
    for f in faces.tolist():
        a = f.index(min(f))
        directed[tuple(f[a:] + f[:a])] += 1
    assert max(directed.values()) == 1


def test_tet_faces_point_outwards():
    vertices, tets = tet_grid(2)
    faces = tet_faces(tets)                                  # [T, 4, 3]
    p = vertices[faces]
    normal = torch.cross(p[..., 1, :] - p[..., 0, :], p[..., 2, :] - p[..., 0, :], dim=-1)
    opposite = vertices[tets]                                # face i is opposite vertex i
    assert ((normal * (p[..., 0, :] - opposite)).sum(-1) > 0).all()


def test_cut_cell_tets_hold_every_cut_tet():
    n = 6
    vertices, tets = tet_grid(n, dtype=torch.float64)
    g = torch.Generator().manual_seed(0)
    sdf = vertices.norm(dim=-1) - 0.5 + 0.1 * torch.randn(vertices.shape[0], generator=g,
                                                           dtype=torch.float64)
    chosen = cut_cell_tets(sdf, n)
    inside = (sdf < 0)[tets]
    cut = inside.any(1) & ~inside.all(1)
    mask = torch.zeros(tets.shape[0], dtype=torch.bool)
    mask[chosen] = True
    assert (mask[cut]).all()                       # no cut tet is missed
    assert chosen.shape[0] % 6 == 0 and chosen.shape[0] < tets.shape[0]
    # whole cells: the 6 tets of each chosen cell
    cells = chosen.reshape(-1, 6)
    assert torch.equal(cells, cells[:, :1] + torch.arange(6))
    full = marching_tets(vertices, tets, sdf, backend="torch")
    fast = marching_tets(vertices, tets[chosen], sdf, backend="torch")
    assert torch.equal(full[0], fast[0]) and torch.equal(full[1], fast[1])
    assert cut_cell_tets(torch.ones_like(sdf), n).shape == (0,)
    with pytest.raises(ValueError):
        cut_cell_tets(sdf[:-1], n)


def test_bad_arguments():
    with pytest.raises(ValueError):
        tet_grid(0)
    with pytest.raises(ValueError):
        tet_grid(2, bound=0.0)
