"""Hash-grid encoding: layout, exact indexing, reference equality, gradients, backends."""

import pytest
import torch

from engine.errors import ConfigError
from representations.lib.encodings import (PRIMES, HashGridConfig, HashGridEncoding, grid_layout,
                                       hash_grid_encode, hash_grid_encode_with_jacobian,
                                       hash_grid_reference, layout_levels, layout_tensors)
from representations.lib.hashgrid_autograd import hash_grid_encode_lean


def _enc(**kw):
    torch.manual_seed(0)
    enc = HashGridEncoding(HashGridConfig(backend="torch", **kw))
    with torch.no_grad():   # larger values than the 1e-4 init so differences are visible
        enc.table.uniform_(-1.0, 1.0)
    return enc


def test_default_layout_matches_instant_ngp_rules():
    lay = grid_layout(HashGridConfig())
    assert lay.resolutions[:6] == (16, 24, 34, 49, 71, 102)
    assert lay.dense == (True,) * 5 + (False,) * 11
    # dense sizes are res^3 rounded up to a multiple of 8; hashed levels get 2^19 entries
    assert lay.sizes[:5] == (4096, 13824, 39304, 117656, 357912)
    assert set(lay.sizes[5:]) == {2 ** 19}
    assert lay.offsets[1] == 4096 and lay.n_entries == 532792 + 11 * 2 ** 19
    enc = HashGridEncoding(HashGridConfig())
    assert enc.output_dim == 32 and tuple(enc.table.shape) == (lay.n_entries, 2)
    assert enc.table.abs().max() <= 1e-4


def test_dense_level_indexing_exact():
    # one level, scale 2 -> 3 nodes per side, dense 27 entries (table of 32)
    enc = HashGridEncoding(HashGridConfig(n_levels=1, n_features=1, base_resolution=3,
                                          log2_table_size=8, backend="torch"))
    assert enc.layout.resolutions == (3,) and enc.layout.dense == (True,)
    assert enc.layout.sizes == (32,)
    with torch.no_grad():
        enc.table.copy_(torch.arange(32, dtype=torch.float32)[:, None])
    # value = node index i + 3 j + 9 k is linear in the node, so trilinear interpolation
    # gives exactly pos_x + 3 pos_y + 9 pos_z with pos = 2 * u + 0.5, u in [0, 1]
    u = torch.tensor([[0.25, 0.25, 0.25],     # node (1, 1, 1): 13
                      [0.0, 0.0, 0.0],        # pos 0.5 everywhere: 6.5
                      [0.5, 0.1, 0.7],
                      [0.05, 0.6, 0.3]])
    pos = 2.0 * u + 0.5
    expected = pos[:, 0] + 3 * pos[:, 1] + 9 * pos[:, 2]
    got = enc(u * 2.0 - 1.0)[:, 0]
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
    assert got[0].item() == pytest.approx(13.0) and got[1].item() == pytest.approx(6.5)


def test_hashed_level_indexing_exact():
    # one level with 27 nodes but a 16-entry table: hashed (pos >= 0.5, so nodes >= 1)
    enc = HashGridEncoding(HashGridConfig(n_levels=1, n_features=1, base_resolution=3,
                                          log2_table_size=4, backend="torch"))
    assert enc.layout.dense == (False,) and enc.layout.sizes == (16,)
    with torch.no_grad():
        enc.table.copy_(torch.arange(16, dtype=torch.float32)[:, None] * 10.0)
    for node in [(1, 2, 1), (2, 1, 1), (1, 1, 2), (2, 2, 2)]:
        h = (node[0] * PRIMES[0]) ^ (node[1] * PRIMES[1]) ^ (node[2] * PRIMES[2])
        expected = ((h % 2 ** 32) % 16) * 10.0
        u = (torch.tensor(node, dtype=torch.float32) - 0.5) / 2.0   # exactly on the node
        assert enc(u[None] * 2.0 - 1.0).item() == pytest.approx(expected)


@pytest.mark.parametrize("kw", [dict(n_levels=4, log2_table_size=10, base_resolution=4),
                                dict(log2_table_size=14)])
def test_vectorised_equals_reference_values_and_gradients(kw):
    enc = _enc(**kw)
    torch.manual_seed(1)
    pts = (torch.rand(3000, 3) * 2 - 1).requires_grad_()
    upstream = torch.randn(3000, enc.output_dim)
    out = enc(pts)
    g_table, g_pts = torch.autograd.grad((out * upstream).sum(), [enc.table, pts])
    ref = enc.reference(pts)
    r_table, r_pts = torch.autograd.grad((ref * upstream).sum(), [enc.table, pts])
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-5)
    torch.testing.assert_close(g_table, r_table, rtol=0, atol=1e-4)
    torch.testing.assert_close(g_pts, r_pts, rtol=1e-4, atol=1e-3)


def test_gradcheck_tiny_grid_float64():
    lay = grid_layout(HashGridConfig(n_levels=3, n_features=2, log2_table_size=6,
                                     base_resolution=3, per_level_scale=1.5))
    assert lay.dense[0] and not lay.dense[-1]
    consts = layout_tensors(lay)
    torch.manual_seed(0)
    table = torch.randn(lay.n_entries, 2, dtype=torch.float64, requires_grad=True)
    # keep points off cell borders so the finite differences stay inside one cell
    x = (torch.rand(6, 3, dtype=torch.float64) * 0.8 + 0.1).requires_grad_()
    assert torch.autograd.gradcheck(lambda t, p: hash_grid_encode(p, t, *consts), (table, x),
                                    eps=1e-7, atol=1e-6)
    ref = hash_grid_reference(x, table, lay)
    torch.testing.assert_close(hash_grid_encode(x, table, *consts), ref)


def test_closed_form_jacobian_matches_autograd():
    enc = _enc(n_levels=4, log2_table_size=10, base_resolution=4)
    pts = torch.rand(50, 3, dtype=torch.float32) * 1.6 - 0.8
    out, jac = enc.forward_with_jacobian(pts)
    torch.testing.assert_close(out, enc(pts))
    auto = torch.autograd.functional.jacobian(lambda p: enc(p[None])[0], pts[7])   # [D, 3]
    torch.testing.assert_close(jac[7], auto, rtol=1e-4, atol=1e-4)
    # and the Jacobian carries a gradient to the table
    (g,) = torch.autograd.grad(jac.sum(), enc.table)
    assert g.abs().sum() > 0


def test_points_outside_bound_are_clamped():
    enc = _enc(n_levels=2, log2_table_size=8, base_resolution=4)
    inside = torch.tensor([[1.0, -1.0, 0.3]])
    outside = torch.tensor([[1.7, -3.0, 0.3]])
    torch.testing.assert_close(enc(outside), enc(inside))


def test_config_errors():
    with pytest.raises(ConfigError, match="backend"):
        HashGridConfig(backend="cuda")
    with pytest.raises(ConfigError, match="per_level_scale"):
        HashGridConfig(per_level_scale=0.5)


def _tcnn_cuda():
    try:
        import tinycudann  # noqa: F401
    except Exception:
        return False
    return torch.cuda.is_available()


@pytest.mark.skipif(not _tcnn_cuda(), reason="needs tinycudann and CUDA")
def test_tcnn_backend_equals_torch():
    torch.manual_seed(0)
    enc = HashGridEncoding(HashGridConfig(n_levels=8, log2_table_size=14, backend="tcnn")).cuda()
    with torch.no_grad():
        enc.table.uniform_(-1, 1)
    pts = (torch.rand(4096, 3, device="cuda") * 2 - 1).requires_grad_()
    out = enc(pts)
    (g_tcnn,) = torch.autograd.grad(out.square().sum(), enc.table)
    enc.cfg.backend = "torch"
    ref = enc(pts)
    (g_torch,) = torch.autograd.grad(ref.square().sum(), enc.table)
    torch.testing.assert_close(out, ref, rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(g_tcnn, g_torch, rtol=1e-3, atol=1e-3)


def test_compiled_path_equals_eager():
    # one compile of the hot path (tens of seconds on 2 cores); two sample counts share it
    torch._dynamo.reset()
    enc = _enc(n_levels=3, log2_table_size=8, base_resolution=4)
    for n in (257, 1000):
        pts = (torch.rand(n, 3) * 2 - 1).requires_grad_()
        enc.cfg.compile = True
        out = enc(pts)
        g_table, g_pts = torch.autograd.grad(out.square().sum(), [enc.table, pts])
        enc.cfg.compile = False
        ref = enc(pts)
        r_table, r_pts = torch.autograd.grad(ref.square().sum(), [enc.table, pts])
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(g_table, r_table, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(g_pts, r_pts, rtol=1e-4, atol=1e-4)


# -- the recomputing Function (hashgrid_autograd) -------------------------------------------

def _cell_boundary_points(lay, n_random=400, seed=2):
    """Random points plus points exactly on cell faces / nodes of every level, on the cube's
    bounds and outside it."""
    g = torch.Generator().manual_seed(seed)
    pts = [torch.rand(n_random, 3, generator=g)]
    for s in lay.scales:
        # grid position x * s + 0.5 an integer: on a cell face along that axis (float32 exact
        # enough that floor() lands on either side consistently in both paths)
        k = torch.randint(1, max(2, int(s)), (20, 3), generator=g).float()
        on = ((k - 0.5) / s).clamp(0.0, 1.0)
        mixed = torch.rand(20, 3, generator=g)
        mixed[:, 0] = on[:, 0]                          # one face
        pts += [on, mixed]
    pts.append(torch.tensor([[0.0, 0.0, 0.0], [1.0, 1.0, 1.0], [0.0, 0.5, 1.0],
                             [-0.2, 0.3, 1.4], [1.0, 0.0, 0.25]]))
    return torch.cat(pts)


@pytest.mark.parametrize("kw", [dict(n_levels=4, log2_table_size=10, base_resolution=4),
                                dict(n_levels=6, log2_table_size=12, base_resolution=3,
                                     per_level_scale=2.0)])
@pytest.mark.parametrize("with_jacobian", [False, True])
def test_recompute_function_equals_vectorised_path(kw, with_jacobian):
    cfg = HashGridConfig(backend="torch", **kw)
    lay = grid_layout(cfg)
    assert any(lay.dense) and not all(lay.dense)
    levels, consts = layout_levels(lay), layout_tensors(lay)
    torch.manual_seed(0)
    table = torch.empty(lay.n_entries, 2).uniform_(-1.0, 1.0).requires_grad_()
    x = _cell_boundary_points(lay).requires_grad_()
    d = lay.n_levels * 2
    up_e, up_j = torch.randn(x.shape[0], d), torch.randn(x.shape[0], d, 3)

    def loss(out):
        return (out[0] * up_e).sum() + (out[1] * up_j).sum() if with_jacobian \
            else (out * up_e).sum()

    # a block smaller than the batch, so blocks and their borders are exercised
    new = hash_grid_encode_lean(x, table, levels, with_jacobian, block=97)
    old = hash_grid_encode_with_jacobian(x, table, *consts) if with_jacobian \
        else hash_grid_encode(x, table, *consts)
    for a, b in zip(new if with_jacobian else [new], old if with_jacobian else [old]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    g_new = torch.autograd.grad(loss(new), [table, x])
    g_old = torch.autograd.grad(loss(old), [table, x])
    torch.testing.assert_close(g_new[0], g_old[0], rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(g_new[1], g_old[1], rtol=1e-4, atol=1e-3)
    # coordinates outside the cube or on its bounds get no gradient (clamp), as in the old path
    clamped = (x <= 0) | (x >= 1)
    assert clamped.any() and (g_new[1][clamped] == 0).all()


@pytest.mark.parametrize("with_jacobian", [False, True])
def test_recompute_function_on_an_empty_batch(with_jacobian):
    lay = grid_layout(HashGridConfig(n_levels=3, log2_table_size=8, base_resolution=4))
    table = torch.randn(lay.n_entries, 2, requires_grad=True)
    x = torch.zeros(0, 3, requires_grad=True)
    out = hash_grid_encode_lean(x, table, layout_levels(lay), with_jacobian)
    if with_jacobian:
        assert out[0].shape == (0, 6) and out[1].shape == (0, 6, 3)
        loss = out[0].sum() + out[1].sum()
    else:
        assert out.shape == (0, 6)
        loss = out.sum()
    g_table, g_x = torch.autograd.grad(loss, [table, x])
    assert g_x.shape == (0, 3) and g_table.shape == table.shape and not g_table.any()


def _tiny_float64():
    lay = grid_layout(HashGridConfig(n_levels=3, n_features=2, log2_table_size=6,
                                     base_resolution=3, per_level_scale=1.5))
    assert lay.dense[0] and not lay.dense[-1]
    torch.manual_seed(0)
    table = torch.randn(lay.n_entries, 2, dtype=torch.float64, requires_grad=True)
    # off cell borders so the finite differences stay inside one cell
    x = (torch.rand(6, 3, dtype=torch.float64) * 0.8 + 0.1).requires_grad_()
    return layout_levels(lay), table, x


@pytest.mark.slow          # 20-30 s each: float64 gradcheck through every level
@pytest.mark.parametrize("with_jacobian", [False, True])
def test_recompute_function_gradcheck_float64(with_jacobian):
    levels, table, x = _tiny_float64()

    def fn(t, p):
        return hash_grid_encode_lean(p, t, levels, with_jacobian, block=4)

    assert torch.autograd.gradcheck(fn, (table, x), eps=1e-7, atol=1e-6)
    # double backward (create_graph through the recomputing backward)
    assert torch.autograd.gradgradcheck(fn, (table, x), eps=1e-7, atol=1e-6)


def test_recompute_function_saves_only_the_points():
    # what autograd keeps between forward and backward: the points and the table (a reference
    # to the parameter), nothing per level or per corner
    lay = grid_layout(HashGridConfig(n_levels=8, log2_table_size=12, base_resolution=4))
    table = torch.randn(lay.n_entries, 2, requires_grad=True)
    x = torch.rand(5000, 3)
    saved = []

    def pack(t):
        saved.append(t)
        return t

    def saved_bytes_per_point(fn):
        saved.clear()
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            fn()
        return sum(t.numel() * t.element_size() for t in saved
                   if t.data_ptr() != table.data_ptr()) / x.shape[0]

    lean = saved_bytes_per_point(lambda: hash_grid_encode_lean(x, table, layout_levels(lay), True))
    old = saved_bytes_per_point(lambda: hash_grid_encode_with_jacobian(x, table,
                                                                       *layout_tensors(lay)))
    assert lean <= 3 * 4                     # the points, float32
    assert old > 100 * 4                     # the vectorised path keeps per-corner tensors


def test_module_recompute_switch_and_default():
    assert HashGridConfig().recompute
    enc = _enc(n_levels=4, log2_table_size=10, base_resolution=4)
    pts = (torch.rand(500, 3) * 2 - 1).requires_grad_()
    outs = {}
    for flag in (True, False):
        enc.cfg.recompute = flag
        e, j = enc.forward_with_jacobian(pts)
        loss = enc(pts).square().sum() + e.sum() + j.square().sum()
        outs[flag] = (e, j) + torch.autograd.grad(loss, [enc.table, pts])
    for a, b in zip(outs[True], outs[False]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
