"""Marching tetrahedra: exact single-tet fixtures, orientation, watertightness, accuracy on
analytic SDFs, gradients, and the kaolin backend (when installed)."""

from collections import Counter

import numpy as np
import pytest
import torch

from representations.lib.marching_tets import (TRIANGLE_COUNTS, _kaolin_available, marching_tets,
                                           resolve_backend)
from representations.lib.tets import signed_volumes, tet_grid

REF = torch.tensor([[0.0, 0, 0], [1, 0, 0], [0, 1, 0], [0, 0, 1]], dtype=torch.float64)
ONE_TET = torch.tensor([[0, 1, 2, 3]])


def _normals(verts, faces):
    p = verts[faces]
    return torch.cross(p[:, 1] - p[:, 0], p[:, 2] - p[:, 0], dim=-1)


def _edge_use(faces):
    """Counts of undirected and directed edges of a triangle list."""
    directed = faces[:, [0, 1, 1, 2, 2, 0]].reshape(-1, 2).tolist()
    undirected = Counter(tuple(sorted(e)) for e in directed)
    return undirected, Counter(map(tuple, directed))


def _assert_closed(faces):
    undirected, directed = _edge_use(faces)
    assert set(undirected.values()) == {2}          # every edge shared by exactly 2 faces
    assert set(directed.values()) == {1}            # ...with opposite windings


def _sphere_sdf(p, r=0.6):
    return p.norm(dim=-1) - r


def _box_sdf(p, half=(0.5, 0.4, 0.3)):
    q = p.abs() - torch.tensor(half, dtype=p.dtype)
    return q.clamp_min(0).norm(dim=-1) + q.max(-1).values.clamp_max(0)


def test_single_tet_one_inside_exact_triangle():
    sdf = torch.tensor([-1.0, 1.0, 3.0, 1.0], dtype=torch.float64)
    verts, faces = marching_tets(REF, ONE_TET, sdf, backend="torch")
    assert faces.shape == (1, 3)
    # crossings at s_a / (s_a - s_b) along each edge from vertex 0: 1/2, 1/4, 1/2
    expected = {(0.5, 0.0, 0.0), (0.0, 0.25, 0.0), (0.0, 0.0, 0.5)}
    assert {tuple(v) for v in verts[faces[0]].tolist()} == expected
    assert verts.shape == (3, 3)
    # counter-clockwise seen from outside: the normal points away from the inside vertex 0
    n = _normals(verts, faces)[0]
    assert (n > 0).all()


def test_single_tet_three_inside_faces_the_outside_vertex():
    sdf = torch.tensor([-1.0, -1.0, 1.0, -3.0], dtype=torch.float64)   # vertex 2 outside
    verts, faces = marching_tets(REF, ONE_TET, sdf, backend="torch")
    expected = {(0.0, 0.5, 0.0), (0.5, 0.5, 0.0), (0.0, 0.75, 0.25)}
    assert faces.shape == (1, 3)
    assert {tuple(v) for v in verts[faces[0]].tolist()} == expected
    centroid = verts[faces[0]].mean(0)
    assert float(_normals(verts, faces)[0] @ (REF[2] - centroid)) > 0


def test_single_tet_two_inside_gives_an_oriented_quad():
    sdf = torch.tensor([-1.0, -1.0, 1.0, 1.0], dtype=torch.float64)
    verts, faces = marching_tets(REF, ONE_TET, sdf, backend="torch")
    assert faces.shape == (2, 3) and verts.shape == (4, 3)
    expected = {(0.0, 0.5, 0.0), (0.0, 0.0, 0.5), (0.5, 0.5, 0.0), (0.5, 0.0, 0.5)}
    assert {tuple(v) for v in verts.tolist()} == expected
    undirected, _ = _edge_use(faces)
    assert sorted(undirected.values()) == [1, 1, 1, 1, 2]             # a quad split once
    out_dir = REF[2:].mean(0) - REF[:2].mean(0)
    assert (_normals(verts, faces) @ out_dir > 0).all()


def test_all_sign_cases_on_random_tets_are_oriented_outwards():
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        corners = torch.randn(4, 3, generator=g, dtype=torch.float64)
        if signed_volumes(corners, ONE_TET)[0] < 0:
            corners = corners[[0, 1, 3, 2]]
        for code in range(16):
            mag = torch.rand(4, generator=g, dtype=torch.float64) + 0.1
            inside = torch.tensor([code >> i & 1 for i in range(4)], dtype=torch.bool)
            sdf = torch.where(inside, -mag, mag)
            verts, faces = marching_tets(corners, ONE_TET, sdf, backend="torch")
            assert faces.shape[0] == TRIANGLE_COUNTS[code]
            if faces.shape[0] == 0:
                assert verts.shape == (0, 3)
                continue
            assert verts.shape[0] == (3 if faces.shape[0] == 1 else 4)
            # every output vertex is a zero of the linear interpolant of the SDF on its tet
            bary = torch.linalg.solve(
                torch.cat([corners.T, torch.ones(1, 4, dtype=torch.float64)]),
                torch.cat([verts.T, torch.ones(1, verts.shape[0], dtype=torch.float64)]))
            assert torch.allclose(bary.T @ sdf, torch.zeros(verts.shape[0], dtype=torch.float64),
                                  atol=1e-9)
            out_dir = corners[~inside].mean(0) - corners[inside].mean(0)
            assert (_normals(verts, faces) @ out_dir > 0).all()


def test_two_adjacent_tets_share_their_face_vertices():
    # two positive tets glued on the face (1, 2, 3); vertex 1 alone inside
    vertices = torch.cat([REF, torch.tensor([[1.0, 1, 1]], dtype=torch.float64)])
    tets = torch.tensor([[0, 1, 2, 3], [4, 1, 3, 2]])
    assert (signed_volumes(vertices, tets) > 0).all()
    sdf = torch.tensor([1.0, -1.0, 1.0, 1.0, 1.0], dtype=torch.float64)
    verts, faces = marching_tets(vertices, tets, sdf, backend="torch")
    # cut edges: 1-0, 1-2, 1-3 (2 and 3 shared by both tets), 1-4 -> 4 vertices, not 6
    assert verts.shape == (4, 3) and faces.shape == (2, 3)
    undirected, directed = _edge_use(faces)
    assert sorted(undirected.values()) == [1, 1, 1, 1, 2]
    assert set(directed.values()) == {1}               # consistent winding across the face


def test_one_cell_around_a_corner():
    vertices, tets = tet_grid(1, dtype=torch.float64)
    sdf = torch.ones(8, dtype=torch.float64)
    sdf[0] = -1.0
    verts, faces = marching_tets(vertices, tets, sdf, backend="torch")
    # vertex 0 joins 7 edges (3 axes, 3 face diagonals, 1 main diagonal); one face per tet
    assert verts.shape == (7, 3) and faces.shape == (6, 3)
    _, directed = _edge_use(faces)
    assert set(directed.values()) == {1}
    assert ((verts - vertices[0]).norm(dim=-1) > 0).all()


@pytest.mark.parametrize("shape", ["sphere", "box"])
def test_analytic_sdf_gives_closed_accurate_mesh(shape):
    trimesh = pytest.importorskip("trimesh")
    from scipy.spatial import cKDTree

    vertices, tets = tet_grid(32, dtype=torch.float64)
    sdf_fn = _sphere_sdf if shape == "sphere" else _box_sdf
    verts, faces = marching_tets(vertices, tets, sdf_fn(vertices), backend="torch")
    _assert_closed(faces)
    mesh = trimesh.Trimesh(verts.numpy(), faces.numpy(), process=False)
    assert mesh.is_watertight and mesh.is_winding_consistent
    true_volume = 4 / 3 * np.pi * 0.6 ** 3 if shape == "sphere" else 1.0 * 0.8 * 0.6
    assert mesh.volume > 0                                    # outward normals
    assert abs(mesh.volume - true_volume) / true_volume < 0.02

    # mesh -> surface: exact distance |sdf(p)| at surface samples.
    # Measured at grid 32 (cell 0.0625): sphere 0.0011, box 0.0016.
    samples = torch.from_numpy(trimesh.sample.sample_surface(mesh, 20000, seed=0)[0])
    to_surface = sdf_fn(samples).abs().mean().item()
    assert to_surface < (0.002 if shape == "sphere" else 0.0025)
    # surface -> mesh, against dense mesh samples (sampling-limited): measured 0.0036 / 0.0053
    if shape == "sphere":
        g = torch.randn(3000, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
        truth = (0.6 * g / g.norm(dim=-1, keepdim=True)).numpy()
    else:
        truth = trimesh.sample.sample_surface(trimesh.creation.box(extents=[1.0, 0.8, 0.6]),
                                              3000, seed=0)[0]
    dense = trimesh.sample.sample_surface(mesh, 100000, seed=1)[0]
    assert cKDTree(dense).query(truth)[0].mean() < 0.008


def test_sphere_normals_point_outwards():
    vertices, tets = tet_grid(16)
    verts, faces = marching_tets(vertices, tets, _sphere_sdf(vertices), backend="torch")
    n = torch.nn.functional.normalize(_normals(verts, faces), dim=-1)
    c = torch.nn.functional.normalize(verts[faces].mean(1), dim=-1)
    cos = (n * c).sum(-1)
    assert cos.mean() > 0.95 and (cos > 0).all()


def test_gradcheck_vertices_and_sdf():
    vertices = torch.cat([REF, torch.tensor([[1.0, 1, 1]], dtype=torch.float64)])
    vertices = vertices + 0.05 * torch.randn(5, 3, generator=torch.Generator().manual_seed(1),
                                             dtype=torch.float64)
    tets = torch.tensor([[0, 1, 2, 3], [4, 1, 3, 2]])
    sdf = torch.tensor([0.7, -0.4, 0.3, -0.6, 0.5], dtype=torch.float64)
    vertices.requires_grad_(True)
    sdf.requires_grad_(True)

    def fn(v, s):
        return marching_tets(v, tets, s, backend="torch")[0]

    assert fn(vertices, sdf).shape[0] > 3
    assert torch.autograd.gradcheck(fn, (vertices, sdf), eps=1e-6, atol=1e-8)


def test_loss_gradient_reaches_sdf_and_vertices_on_grid():
    vertices, tets = tet_grid(8)
    vertices = vertices.clone().requires_grad_(True)
    sdf = _sphere_sdf(vertices.detach()).requires_grad_(True)
    verts, _ = marching_tets(vertices, tets, sdf, backend="torch")
    (verts.norm(dim=-1) - 0.5).pow(2).sum().backward()
    near = sdf.detach().abs() < 0.25 * 3 ** 0.5        # within a cell diagonal of the surface
    assert sdf.grad.abs().sum() > 0 and vertices.grad.abs().sum() > 0
    # only vertices of cut edges receive gradients
    assert (sdf.grad[~near] == 0).all()


def test_no_crossing_gives_empty_mesh_with_graph():
    vertices, tets = tet_grid(2)
    sdf = torch.ones(vertices.shape[0], requires_grad=True)
    verts, faces = marching_tets(vertices, tets, sdf, backend="torch")
    assert verts.shape == (0, 3) and faces.shape == (0, 3) and faces.dtype == torch.long
    verts.sum().backward()
    assert (sdf.grad == 0).all()


def test_backend_resolution():
    assert resolve_backend("torch") == "torch"
    assert resolve_backend("auto", torch.zeros(1)) == "torch"     # CPU tensors never use kaolin
    with pytest.raises(ValueError):
        resolve_backend("cuda-magic")


def _canonical(verts, faces):
    """Faces as sets of rounded vertex positions with winding, independent of ordering."""
    v = np.round(verts.detach().cpu().double().numpy(), 5)
    out = []
    for f in faces.cpu().tolist():
        a = f.index(min(f, key=lambda i: tuple(v[i])))
        out.append(tuple(tuple(v[i]) for i in f[a:] + f[:a]))
    return sorted(out)


@pytest.mark.skipif(not _kaolin_available() or not torch.cuda.is_available(),
                    reason="kaolin (and CUDA) not available")
def test_kaolin_backend_matches_torch():
    vertices, tets = tet_grid(16, device="cuda")
    sdf = _box_sdf(vertices.cpu()).cuda() + 0.01 * torch.sin(7 * vertices).sum(-1)
    a = marching_tets(vertices, tets, sdf, backend="torch")
    b = marching_tets(vertices, tets, sdf, backend="kaolin")
    assert a[0].shape == b[0].shape and a[1].shape == b[1].shape
    assert _canonical(*a) == _canonical(*b)
