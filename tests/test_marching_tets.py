"""Marching tetrahedra: exact single-tet fixtures, orientation, watertightness, accuracy on
analytic SDFs, gradients, the diagonal a quad is split along (mesh quality), and the kaolin
backend (when installed)."""

import math
from collections import Counter

import numpy as np
import pytest
import torch

from representations.lib.marching_tets import (DIAGONALS, TRIANGLE_COUNTS, _kaolin_available,
                                               _prefer_other_diagonal, marching_tets,
                                               resolve_backend, triangle_min_angles)
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


@pytest.mark.parametrize("diagonal", DIAGONALS)
def test_all_sign_cases_on_random_tets_are_oriented_outwards(diagonal):
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        corners = torch.randn(4, 3, generator=g, dtype=torch.float64)
        if signed_volumes(corners, ONE_TET)[0] < 0:
            corners = corners[[0, 1, 3, 2]]
        for code in range(16):
            mag = torch.rand(4, generator=g, dtype=torch.float64) + 0.1
            inside = torch.tensor([code >> i & 1 for i in range(4)], dtype=torch.bool)
            sdf = torch.where(inside, -mag, mag)
            verts, faces = marching_tets(corners, ONE_TET, sdf, backend="torch",
                                         diagonal=diagonal)
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


# -- the diagonal of the quad (2 corners inside, 2 outside) --------------------------------
# A positive tet whose quad, cut at the edge midpoints (SDF -1 inside, +1 outside), is the long,
# thin parallelogram (0, 0), (1.5, -0.5), (3.5, -0.5), (2, 0) in the plane z = 0: sides 2 and
# sqrt(2.5), diagonals sqrt(0.5) (from (2, 0) to (1.5, -0.5)) and sqrt(12.5). The triangle
# table's diagonal (crossings on edges 0-2 and 1-3) is the long one.
THIN = torch.tensor([[0.0, 0, -1], [4, 0, -1], [0, 0, 1], [3, -1, 1]], dtype=torch.float64)
THIN_SDF = torch.tensor([-1.0, -1.0, 1.0, 1.0], dtype=torch.float64)


def _face_sets(verts, faces):
    return sorted(sorted(tuple(verts[i].tolist()) for i in f) for f in faces.tolist())


def _diagonal(verts, faces):
    """The edge the two triangles of a split quad share, as a set of two points."""
    undirected, _ = _edge_use(faces)
    (shared,) = [e for e, n in undirected.items() if n == 2]
    return {tuple(verts[i].tolist()) for i in shared}


def test_long_thin_quad_is_split_along_its_short_diagonal():
    assert signed_volumes(THIN, ONE_TET)[0] > 0
    out_dir = THIN[2:].mean(0) - THIN[:2].mean(0)
    short = {(2.0, 0.0, 0.0), (1.5, -0.5, 0.0)}
    long = {(0.0, 0.0, 0.0), (3.5, -0.5, 0.0)}
    for diagonal in ("angle", "shorter"):                   # the default is "angle"
        verts, faces = marching_tets(THIN, ONE_TET, THIN_SDF, backend="torch", diagonal=diagonal)
        assert _face_sets(verts, faces) == [
            [(0.0, 0.0, 0.0), (1.5, -0.5, 0.0), (2.0, 0.0, 0.0)],
            [(1.5, -0.5, 0.0), (2.0, 0.0, 0.0), (3.5, -0.5, 0.0)]]
        assert _diagonal(verts, faces) == short
        assert (_normals(verts, faces) @ out_dir > 0).all()     # still counter-clockwise
        # both triangles are (0, 0), (2, 0), (1.5, 0.5) up to a half turn: angles atan(1/3)
        # (at the origin), 45 and 180 - 45 - atan(1/3) degrees
        angles = triangle_min_angles(verts, faces)
        assert torch.allclose(angles, torch.full((2,), math.degrees(math.atan(1 / 3)),
                                                 dtype=torch.float64), atol=1e-12, rtol=0)
    assert torch.equal(marching_tets(THIN, ONE_TET, THIN_SDF, backend="torch")[1],
                       marching_tets(THIN, ONE_TET, THIN_SDF, backend="torch",
                                     diagonal="angle")[1])
    # the rule before the choice (the table's diagonal) and "longer" take the long diagonal:
    # triangles (0, 0), (2, 0), (3.5, -0.5) and (0, 0), (3.5, -0.5), (1.5, -0.5), whose
    # smallest angle is atan(1/7) at the origin (8.13 degrees against 18.43)
    for diagonal in ("fixed", "longer"):
        verts, faces = marching_tets(THIN, ONE_TET, THIN_SDF, backend="torch", diagonal=diagonal)
        assert _diagonal(verts, faces) == long
        assert (_normals(verts, faces) @ out_dir > 0).all()
        assert triangle_min_angles(verts, faces).min().item() == pytest.approx(
            math.degrees(math.atan(1 / 7)), abs=1e-12)


def test_angle_rule_can_prefer_the_longer_diagonal():
    # a planar kite whose corner 1 lies close to the diagonal 0-2: split there, the triangle
    # (0, 0), (10, 2), (20, 0) has angles atan(0.2) = 11.3 degrees; the longer diagonal 1-3
    # gives two triangles mirror to (0, 0), (10, 2), (10, -30), smallest angle atan(1/3)
    quad = torch.tensor([[0.0, 0, 0], [10, 2, 0], [20, 0, 0], [10, -30, 0]], dtype=torch.float64)
    p = quad.T[:, :, None]                                          # [3, 4, 1]
    assert not _prefer_other_diagonal(p, "shorter").item()        # 0-2 is 20 long, 1-3 32
    assert _prefer_other_diagonal(p, "longer").item()
    assert _prefer_other_diagonal(p, "angle").item()
    # the same in float32, scaled down to a fine grid's cell size, and for a tie (a square)
    assert _prefer_other_diagonal((p * 1e-4).float(), "angle").item()
    square = torch.tensor([[0.0, 0, 0], [1, 0, 0], [1, 1, 0], [0, 1, 0]]).T[:, :, None]
    assert not _prefer_other_diagonal(square, "angle").item()
    assert not _prefer_other_diagonal(square, "shorter").item()


def test_angle_rule_takes_the_better_split_of_every_quad():
    # random positive tets, 2 inside / 2 outside: whichever diagonal "angle" takes, its
    # smallest angle is the larger of the two splits' (which "shorter" and "longer" give)
    g = torch.Generator().manual_seed(3)
    best_wins = {"shorter": 0, "longer": 0}
    for _ in range(200):
        corners = torch.randn(4, 3, generator=g, dtype=torch.float64)
        if signed_volumes(corners, ONE_TET)[0] < 0:
            corners = corners[[0, 1, 3, 2]]
        code = [3, 5, 6, 9, 10, 12][int(torch.randint(6, (1,), generator=g))]
        mag = torch.rand(4, generator=g, dtype=torch.float64) + 0.1
        inside = torch.tensor([code >> i & 1 for i in range(4)], dtype=torch.bool)
        sdf = torch.where(inside, -mag, mag)
        worst = {}
        for rule in ("angle", "shorter", "longer"):
            verts, faces = marching_tets(corners, ONE_TET, sdf, backend="torch", diagonal=rule)
            worst[rule] = triangle_min_angles(verts, faces).min().item()
        assert worst["angle"] == pytest.approx(max(worst["shorter"], worst["longer"]), abs=1e-9)
        best_wins["shorter"] += worst["shorter"] > worst["longer"]
        best_wins["longer"] += worst["longer"] > worst["shorter"]
    assert best_wins["shorter"] > best_wins["longer"] > 0   # the rules differ, both happen


def test_noisy_sphere_has_fewer_slivers_than_the_table_diagonal():
    # grid 64 (cell 1/32), a sphere of radius 0.6 with N(0, 0.005^2) noise on its SDF.
    # Measured: faces under 5 degrees fixed 2943, longer 3136, shorter 2278, angle 2213;
    # median smallest angle 29.6, 28.8, 32.2, 32.2 degrees (43228 faces each)
    vertices, tets = tet_grid(64)
    g = torch.Generator().manual_seed(0)
    sdf = _sphere_sdf(vertices) + 0.005 * torch.randn(vertices.shape[0], generator=g)
    stats, meshes = {}, {}
    for rule in DIAGONALS:
        verts, faces = marching_tets(vertices, tets, sdf, backend="torch", diagonal=rule)
        angles = triangle_min_angles(verts, faces)
        stats[rule] = (int((angles < 5).sum()), angles.median().item())
        meshes[rule] = (verts, faces)
    # the same vertices (the choice only reorders the quads' triangles), as many faces
    for rule in DIAGONALS:
        assert torch.equal(meshes[rule][0], meshes["fixed"][0])
        assert meshes[rule][1].shape == meshes["fixed"][1].shape
    assert stats["angle"][0] < 0.8 * stats["fixed"][0]
    assert stats["shorter"][0] < 0.8 * stats["fixed"][0]
    assert stats["angle"][0] < stats["shorter"][0]              # the rule that maximises it
    assert stats["fixed"][0] < stats["longer"][0]
    assert stats["angle"][1] > stats["fixed"][1] + 2.0           # degrees
    _assert_closed(meshes["angle"][1])
    assert torch.equal(marching_tets(vertices, tets, sdf, backend="torch")[1],
                       meshes["angle"][1])                       # the default rule


def test_unknown_diagonal_is_refused():
    with pytest.raises(ValueError, match="diagonal 'best'"):
        marching_tets(THIN, ONE_TET, THIN_SDF, backend="torch", diagonal="best")


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


def _canonical_faces(verts, faces):
    """Each face as its rounded vertex positions, with winding, from its smallest corner."""
    v = np.round(verts.detach().cpu().double().numpy(), 5)
    out = []
    for f in faces.cpu().tolist():
        a = f.index(min(f, key=lambda i: tuple(v[i])))
        out.append(tuple(tuple(v[i]) for i in f[a:] + f[:a]))
    return out


@pytest.mark.skipif(not _kaolin_available() or not torch.cuda.is_available(),
                    reason="kaolin (and CUDA) not available")
def test_kaolin_backend_matches_torch():
    vertices, tets = tet_grid(16, device="cuda")
    sdf = _box_sdf(vertices.cpu()).cuda() + 0.01 * torch.sin(7 * vertices).sum(-1)
    # "fixed" is kaolin's own table's diagonal: per tet, the triangles of one of the two
    # splits, which the "shorter" and "longer" rules give between them; "angle" re-splits
    # kaolin's quads as the torch backend splits them (ties aside: both keep their table's)
    fixed = marching_tets(vertices, tets, sdf, backend="kaolin", diagonal="fixed",
                          return_tet_idx=True)
    splits = [marching_tets(vertices, tets, sdf, backend="torch", diagonal=rule,
                            return_tet_idx=True) for rule in ("shorter", "longer")]
    assert all(s[0].shape == fixed[0].shape and s[1].shape == fixed[1].shape for s in splits)
    got = _per_tet(*fixed)
    options = [_per_tet(*s) for s in splits]
    assert set(got) == set(options[0])
    assert all(got[t] in (options[0][t], options[1][t]) for t in got)
    a = marching_tets(vertices, tets, sdf, backend="torch", diagonal="angle")
    b = marching_tets(vertices, tets, sdf, backend="kaolin", diagonal="angle")
    assert torch.equal((triangle_min_angles(*a) < 5).sum(), (triangle_min_angles(*b) < 5).sum())


def _per_tet(verts, faces, tet_idx):
    """{tet: sorted canonical faces} of a mesh with its faces' source tets."""
    out = {}
    for face, tet in zip(_canonical_faces(verts, faces), tet_idx.tolist()):
        out.setdefault(tet, []).append(face)
    return {t: sorted(f) for t, f in out.items()}


@pytest.mark.parametrize("diagonal", ["angle", "shorter"])
def test_kaolin_adapter_resplits_and_reorients_on_cpu(monkeypatch, diagonal):
    """The kaolin path's own work (re-splitting its quads by the rule, re-orienting its faces)
    on a stand-in for kaolin: the torch backend's table diagonal, faces shuffled, windings
    flipped at random, kaolin's batched outputs and sign convention."""
    import sys
    import types

    from representations.lib import marching_tets as mt

    g = torch.Generator().manual_seed(5)

    def marching_tetrahedra(v, t, occupancy, return_tet_idx=False):
        verts, faces, tet_idx = marching_tets(v[0], t, -occupancy[0], backend="torch",
                                              diagonal="fixed", return_tet_idx=True)
        perm = torch.randperm(faces.shape[0], generator=g)
        faces, tet_idx = faces[perm], tet_idx[perm]
        flip = torch.rand(faces.shape[0], generator=g) < 0.5
        faces = torch.where(flip[:, None], faces[:, [0, 2, 1]], faces)
        return [verts], [faces.int()], [tet_idx]

    conversions = types.ModuleType("kaolin.ops.conversions")
    conversions.marching_tetrahedra = marching_tetrahedra
    for name, module in (("kaolin", types.ModuleType("kaolin")),
                         ("kaolin.ops", types.ModuleType("kaolin.ops")),
                         ("kaolin.ops.conversions", conversions)):
        monkeypatch.setitem(sys.modules, name, module)

    vertices, tets = tet_grid(12, dtype=torch.float64)
    sdf = _box_sdf(vertices) + 0.01 * torch.sin(7 * vertices).sum(-1)
    got = mt._marching_tets_kaolin(vertices, tets, sdf, diagonal)
    want = marching_tets(vertices, tets, sdf, backend="torch", diagonal=diagonal,
                         return_tet_idx=True)
    assert _per_tet(*got) == _per_tet(*want)          # same triangles, same windings
    _assert_closed(got[1])
    # and the stand-in alone (diagonal "fixed") is only re-oriented
    fixed = mt._marching_tets_kaolin(vertices, tets, sdf, "fixed")
    assert _per_tet(*fixed) == _per_tet(*marching_tets(vertices, tets, sdf, backend="torch",
                                                       diagonal="fixed", return_tet_idx=True))
    assert _per_tet(*fixed) != _per_tet(*got)          # some quads were re-split
