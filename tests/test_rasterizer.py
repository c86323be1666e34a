"""Rasteriser: exact coverage and barycentrics on hand-built fixtures, the depth test,
watertightness, gradient checks and the silhouette gradient's sign."""

import pytest
import torch

from representations.lib import rasterizer as R
from representations.lib.rasterizer import antialias, interpolate, rasterize


def _clip(ndc_xy, w, z=0.0, dtype=torch.float64):
    """Clip-space vertices [1, V, 4] whose projection is ``ndc_xy`` with the given w."""
    xy = torch.tensor(ndc_xy, dtype=dtype)
    w = torch.as_tensor(w, dtype=dtype).expand(xy.shape[0])
    z = torch.as_tensor(z, dtype=dtype).expand(xy.shape[0])
    return torch.cat([xy * w[:, None], (z * w)[:, None], w[:, None]], dim=-1)[None]


# Pixel centres of a 4x4 image in NDC: x = -0.75, -0.25, 0.25, 0.75 (cols 0..3),
# y = 0.75, 0.25, -0.25, -0.75 (rows 0..3; row 0 is the top).
TRI = [[-1.0, -1.0], [1.0, -1.0], [-1.0, 1.0]]
FACE = torch.tensor([[0, 1, 2]])
# the hypotenuse x + y = 0 passes through pixel centres, which count as covered
TRI_IDS = torch.tensor([[0, -1, -1, -1],
                        [0, 0, -1, -1],
                        [0, 0, 0, -1],
                        [0, 0, 0, 0]])


def _screen_bary(x, y):
    # for TRI: x = -1 + 2 b1, y = -1 + 2 b2
    b1, b2 = (x + 1) / 2, (y + 1) / 2
    return torch.tensor([1 - b1 - b2, b1, b2], dtype=torch.float64)


def test_single_triangle_coverage_and_barycentrics():
    frags = rasterize(_clip(TRI, 1.0), FACE, 4, 4, backend="torch")
    expected = TRI_IDS
    assert torch.equal(frags.face_id[0], expected)
    xs = [-0.75, -0.25, 0.25, 0.75]
    ys = [0.75, 0.25, -0.25, -0.75]
    for r in range(4):
        for c in range(4):
            if expected[r, c] >= 0:
                assert torch.allclose(frags.bary[0, r, c], _screen_bary(xs[c], ys[r]), atol=1e-12)
                assert frags.depth[0, r, c].item() == pytest.approx(1.0)
            else:
                assert torch.all(frags.bary[0, r, c] == 0) and frags.depth[0, r, c] == 0


def test_perspective_correct_barycentrics_and_depth():
    w = torch.tensor([1.0, 2.0, 4.0], dtype=torch.float64)
    frags = rasterize(_clip(TRI, w), FACE, 4, 4, backend="torch")
    # same screen footprint as with w = 1
    assert torch.equal(frags.face_id[0], TRI_IDS)
    lam = _screen_bary(-0.75, -0.75)                 # pixel (row 3, col 0): (0.75, .125, .125)
    persp = (lam / w) / (lam / w).sum()              # (0.888.., 0.0740.., 0.0370..)
    assert torch.allclose(frags.bary[0, 3, 0], persp, atol=1e-12)
    assert frags.depth[0, 3, 0].item() == pytest.approx(1.0 / (lam / w).sum().item())
    assert frags.depth[0, 3, 0].item() == pytest.approx(1.0 / 0.84375)


# A quad (two triangles) x in [-0.5, 0.5], y in [-0.3, 0.6]; its diagonal v0-v2 passes no
# pixel centre. Face 0 = (v0, v1, v2) lies below the diagonal, face 1 = (v0, v2, v3) above.
QUAD = [[-0.5, -0.3], [0.5, -0.3], [0.5, 0.6], [-0.5, 0.6]]
QUAD_FACES = torch.tensor([[0, 1, 2], [0, 2, 3]])
QUAD_IDS = torch.tensor([[-1, -1, -1, -1],
                         [-1, 1, 0, -1],
                         [-1, 0, 0, -1],
                         [-1, -1, -1, -1]])


def test_quad_face_ids():
    frags = rasterize(_clip(QUAD, 1.0), QUAD_FACES, 4, 4, backend="torch")
    assert torch.equal(frags.face_id[0], QUAD_IDS)
    # barycentrics of the top-left covered pixel (x=-0.25, y=0.25) in face 1 = (v0, v2, v3):
    # p = b0 v0 + b1 v2 + b2 v3 -> solve by hand: x: -0.5 + b1 = -0.25 -> b1 = 0.25;
    # y: -0.3 + 0.9 (b1 + b2) = 0.25 -> b1 + b2 = 0.6111.. -> b2 = 0.3611.., b0 = 0.3888..
    b2 = 0.55 / 0.9 - 0.25
    assert torch.allclose(frags.bary[0, 1, 1],
                          torch.tensor([1 - 0.25 - b2, 0.25, b2], dtype=torch.float64))


def test_depth_test_nearer_wins_in_any_order():
    far = _clip(TRI, 3.0)
    near = _clip(TRI, 2.0)
    for first, second, near_id in ((far, near, 1), (near, far, 0)):
        clip = torch.cat([first, second], dim=1)
        faces = torch.tensor([[0, 1, 2], [3, 4, 5]])
        frags = rasterize(clip, faces, 4, 4, backend="torch")
        covered = frags.face_id[0] >= 0
        assert torch.all(frags.face_id[0][covered] == near_id)
        depth = frags.depth[0][covered]
        assert torch.allclose(depth, torch.full_like(depth, 2.0))


def test_partial_overlap_depth_test():
    # a small near triangle in front of the big far one: only its pixels change
    big = _clip(TRI, 3.0)
    small = _clip([[-1.0, -1.0], [0.0, -1.0], [-1.0, 0.0]], 2.0)
    frags = rasterize(torch.cat([big, small], 1), torch.tensor([[0, 1, 2], [3, 4, 5]]), 4, 4,
                      backend="torch")
    expected = torch.tensor([[0, -1, -1, -1],
                             [0, 0, -1, -1],
                             [1, 0, 0, -1],
                             [1, 1, 0, 0]])
    assert torch.equal(frags.face_id[0], expected)


def test_near_plane_and_behind_camera_are_dropped():
    clip = _clip(TRI, 1.0).clone()
    clip[0, 0, 3] = -1.0                          # a vertex behind the camera
    assert torch.all(rasterize(clip, FACE, 4, 4, backend="torch").face_id == -1)
    clip = _clip(TRI, 1.0, z=-1.5)                # in front of the near plane (z < -w)
    assert torch.all(rasterize(clip, FACE, 4, 4, backend="torch").face_id == -1)
    empty = rasterize(clip[:, :0], torch.zeros(0, 3, dtype=torch.long), 4, 4, backend="torch")
    assert torch.all(empty.face_id == -1)


def test_batch_views_are_independent():
    clip = torch.cat([_clip(TRI, 1.0), _clip(QUAD[:3], 1.0)], dim=0)
    frags = rasterize(clip, FACE, 4, 4, backend="torch")
    single = rasterize(clip[1:], FACE, 4, 4, backend="torch")
    assert torch.equal(frags.face_id[1], single.face_id[0])
    assert torch.equal(frags.face_id[0], rasterize(clip[:1], FACE, 4, 4).face_id[0])


def test_large_triangles_and_chunking_agree(monkeypatch):
    # boxes larger than the dense buckets go through the flat path; chunk it finely too
    h = w = 48
    clip = _clip(QUAD, torch.tensor([1.0, 1.5, 2.0, 1.2]).double())
    ref = rasterize(clip, QUAD_FACES, h, w, backend="torch")
    ys = 1 - (torch.arange(h, dtype=torch.float64) + 0.5) * 2 / h
    xs = (torch.arange(w, dtype=torch.float64) + 0.5) * 2 / w - 1
    inside = ((xs[None, :].abs() <= 0.5) & (ys[:, None] >= -0.3) & (ys[:, None] <= 0.6))
    assert torch.equal(ref.face_id[0] >= 0, inside)
    monkeypatch.setattr(R, "MAX_CANDIDATES", 100)
    chunked = rasterize(clip, QUAD_FACES, h, w, backend="torch")
    assert torch.equal(chunked.face_id, ref.face_id)
    assert torch.allclose(chunked.bary, ref.bary)


def test_closed_mesh_is_watertight():
    trimesh = pytest.importorskip("trimesh")
    from engine.cameras import Cameras
    from representations.lib.mesh_render import world_to_clip

    mesh = trimesh.creation.icosphere(subdivisions=3)
    v = torch.tensor(mesh.vertices, dtype=torch.float32)
    f = torch.tensor(mesh.faces)
    cams = Cameras.from_spherical([10.0, 40.0], [0.0, 33.0], 3.0, 40.0)
    frags = rasterize(world_to_clip(v, cams, 96, 96), f, 96, 96, backend="torch")
    # every pixel well inside the silhouette disc is covered (no cracks along shared edges)
    origins, dirs = cams.rays(96, 96)
    t = -(origins * dirs).sum(-1)
    miss = (origins + t[..., None] * dirs).norm(dim=-1)
    assert torch.all(frags.face_id[miss < 0.9] >= 0)
    assert torch.all(frags.face_id[miss > 1.0] == -1)


# ---------------------------------------------------------------------------------------
# gradients
# ---------------------------------------------------------------------------------------

def test_interpolate_gradcheck_wrt_attributes():
    clip = _clip(QUAD, torch.tensor([1.0, 1.5, 2.0, 1.2]).double())
    frags = rasterize(clip, QUAD_FACES, 4, 4, backend="torch")
    attr = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a: interpolate(a, frags, QUAD_FACES), (attr,))
    attr_b = torch.randn(1, 4, 2, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a: interpolate(a, frags, QUAD_FACES), (attr_b,))
    # values: a vertex attribute equal to the clip position's w reproduces the depth
    depth = interpolate(clip[0, :, 3:], frags, QUAD_FACES)[..., 0]
    assert torch.allclose(depth, frags.depth)


def test_barycentrics_gradcheck_wrt_vertices():
    clip0 = _clip(QUAD, torch.tensor([1.0, 1.5, 2.0, 1.2]).double())
    clip = clip0.clone().requires_grad_(True)

    def fn(c):
        fr = rasterize(c, QUAD_FACES, 4, 4, backend="torch")
        return fr.bary, fr.depth

    assert torch.autograd.gradcheck(fn, (clip,))
    # and through interpolation of a fixed attribute
    attr = torch.randn(4, 3, dtype=torch.float64)
    assert torch.autograd.gradcheck(
        lambda c: interpolate(attr, rasterize(c, QUAD_FACES, 4, 4, backend="torch"),
                              QUAD_FACES), (clip,))


def _aa_fixture():
    # a quad on an 8x8 image, edges between pixel centres and off the half-way points
    quad = [[-0.55, -0.32], [0.41, -0.45], [0.58, 0.6], [-0.47, 0.52]]
    clip = _clip(quad, torch.tensor([1.0, 1.3, 1.6, 1.1]).double())
    frags = rasterize(clip, QUAD_FACES, 8, 8, backend="torch")
    mask = (frags.face_id >= 0)[..., None].double()
    color = torch.cat([mask, torch.rand(1, 8, 8, 2, dtype=torch.float64)], dim=-1)
    return clip, color


def test_antialias_gradcheck_wrt_vertices_and_colour():
    clip0, color0 = _aa_fixture()
    clip = clip0.clone().requires_grad_(True)
    color = color0.clone().requires_grad_(True)

    def fn(c, col):
        fr = rasterize(c, QUAD_FACES, 8, 8, backend="torch")
        return antialias(col, fr, c, QUAD_FACES)

    assert torch.autograd.gradcheck(fn, (clip, color))
    out = fn(clip, color)
    out[..., 0].sum().backward()
    # only silhouette vertices matter and they do
    assert clip.grad[..., :2].abs().sum() > 0


def test_antialias_values_on_a_vertical_edge():
    # the right edge of a rectangle at NDC x = 0.3 on a 4-wide image: pixel centres at
    # x = 0.25 (inside) and 0.75 (outside); the crossing is at t = 0.1 of the way, so the
    # inside pixel keeps 0.6 of its colour and the outside one is untouched
    rect = [[-2.0, -2.0], [0.3, -2.0], [0.3, 2.0], [-2.0, 2.0]]
    clip = _clip(rect, 1.0)
    frags = rasterize(clip, QUAD_FACES, 4, 4, backend="torch")
    mask = (frags.face_id >= 0)[..., None].double()
    out = antialias(mask, frags, clip, QUAD_FACES)[0, :, :, 0]
    expected_row = torch.tensor([1.0, 1.0, 0.6, 0.0], dtype=torch.float64)
    assert torch.allclose(out, expected_row.expand(4, 4))
    # past the half-way point the outside pixel takes (t - 1/2) of the inside colour
    rect[1][0] = rect[2][0] = 0.6                    # t = 0.7
    clip = _clip(rect, 1.0)
    frags = rasterize(clip, QUAD_FACES, 4, 4, backend="torch")
    mask = (frags.face_id >= 0)[..., None].double()
    out = antialias(mask, frags, clip, QUAD_FACES)[0, :, :, 0]
    expected_row = torch.tensor([1.0, 1.0, 1.0, 0.2], dtype=torch.float64)
    assert torch.allclose(out, expected_row.expand(4, 4))


def test_edge_neighbours():
    assert torch.equal(R.edge_neighbours(QUAD_FACES), torch.tensor([[-1, -1, 1], [0, -1, -1]]))
    # an edge shared by three faces is not a manifold edge: no neighbour across it
    fan = torch.tensor([[0, 1, 2], [1, 0, 3], [0, 1, 4]])
    assert torch.all(R.edge_neighbours(fan)[:, 0] == -1)


def test_interior_edges_are_not_blended():
    # a quad covering the whole image, its two faces coloured apart: the diagonal between
    # them is interior (same orientation on both sides), so antialiasing changes nothing
    big = [[-2.0, -2.0], [2.0, -2.0], [2.0, 2.0], [-2.0, 2.0]]
    clip = _clip(big, 1.0)
    frags = rasterize(clip, QUAD_FACES, 8, 8, backend="torch")
    assert set(frags.face_id.unique().tolist()) == {0, 1}
    color = torch.nn.functional.one_hot(frags.face_id, 2).double()
    assert torch.equal(antialias(color, frags, clip, QUAD_FACES), color)


def test_silhouette_gradient_grows_square_towards_bigger_target():
    h = w = 16
    # edges off the half-way points between pixel centres (where dt changes pixel)
    square = [[-0.47, -0.47], [0.47, -0.47], [0.47, 0.47], [-0.47, 0.47]]
    clip = _clip(square, 1.0).requires_grad_(True)
    ys = 1 - (torch.arange(h, dtype=torch.float64) + 0.5) * 2 / h
    xs = (torch.arange(w, dtype=torch.float64) + 0.5) * 2 / w - 1
    target = ((xs[None, :].abs() <= 0.75) & (ys[:, None].abs() <= 0.75)).double()[None, ..., None]

    def loss_of(c):
        fr = rasterize(c, QUAD_FACES, h, w, backend="torch")
        mask = (fr.face_id >= 0)[..., None].double()
        return ((antialias(mask, fr, c, QUAD_FACES) - target) ** 2).sum()

    loss = loss_of(clip)
    loss.backward()
    outward = torch.tensor(square, dtype=torch.float64).sign()
    g = clip.grad[0, :, :2]
    assert torch.all((g * outward) < 0), g           # moving outward lowers the loss
    with torch.no_grad():
        moved = clip - 0.01 * clip.grad / clip.grad.norm()
    assert loss_of(moved) < loss


def test_backend_choice():
    assert R.resolve_backend("torch", torch.device("cpu")) == "torch"
    assert R.resolve_backend("auto", torch.device("cpu")) == "torch"
    with pytest.raises(ValueError):
        R.resolve_backend("opengl", torch.device("cpu"))
    with pytest.raises(RuntimeError, match="nvdiffrast"):
        R.resolve_backend("nvdiffrast", torch.device("cpu"))


def _has_nvdiffrast():
    try:
        import nvdiffrast.torch  # noqa: F401
        return torch.cuda.is_available()
    except Exception:
        return False


@pytest.mark.skipif(not _has_nvdiffrast(), reason="nvdiffrast and CUDA needed")
def test_nvdiffrast_matches_torch():
    trimesh = pytest.importorskip("trimesh")
    from engine.cameras import Cameras
    from representations.lib.mesh_render import world_to_clip

    mesh = trimesh.creation.icosphere(subdivisions=3)
    v = torch.tensor(mesh.vertices, dtype=torch.float32, device="cuda")
    f = torch.tensor(mesh.faces, device="cuda")
    cams = Cameras.from_spherical([10.0, 40.0], [0.0, 33.0], 3.0, 40.0, device="cuda")
    clip = world_to_clip(v, cams, 64, 64)
    a = rasterize(clip, f, 64, 64, backend="torch")
    b = rasterize(clip, f, 64, 64, backend="nvdiffrast")
    same = a.face_id == b.face_id
    assert same.float().mean() > 0.99            # ties on shared edges may differ
    assert torch.allclose(a.bary[same], b.bary[same], atol=1e-4)
    assert torch.allclose(a.depth[same], b.depth[same], atol=1e-4)
    attr = torch.rand(v.shape[0], 3, device="cuda")
    ia, ib = interpolate(attr, a, f), interpolate(attr, b, f)
    assert torch.allclose(ia[same], ib[same], atol=1e-4)
    mask_a = (a.face_id >= 0)[..., None].float()
    mask_b = (b.face_id >= 0)[..., None].float()
    assert (antialias(mask_a, a, clip, f) - antialias(mask_b, b, clip, f)).abs().mean() < 0.02
