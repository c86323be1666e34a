"""The `gaussians` representation: contract, initialisation, densification with the
optimiser's state, checkpoints across a change of count, export helpers."""

import numpy as np
import pytest
import torch

from engine import registry
from engine.cameras import orbit
from engine.config import validate
from engine.errors import ConfigError
from engine.plugin import StepInfo
from engine.testing import check_representation
from representations.lib import gaussian_fields as fields
from representations.lib.gaussian_densify import DensifyConfig, densify_and_prune

TINY = {"count": 64, "backend": "torch"}


def gs_cls():
    return registry.get("representation", "gaussians")


def build(cfg=None, **kw):
    cls = gs_cls()
    torch.manual_seed(0)
    return cls(validate(cls.Config, dict(TINY, **(cfg or {}))), **kw)


def step(s):
    return StepInfo("gs", 0, s, 1000, s)


class White(torch.nn.Module):
    def forward(self, dirs):
        return torch.ones_like(dirs)


def test_meets_the_contract():
    check_representation(gs_cls(), TINY, size=12)


def test_meets_the_contract_with_view_dependent_colour():
    rep = check_representation(gs_cls(), dict(TINY, sh_degree=1), size=12)
    assert rep.sh_rest.shape == (64, 3, 3)


def test_is_created_from_a_nerf():
    from tests.test_contracts import TINY_NERF

    nerf_cls = registry.get("representation", "nerf")
    torch.manual_seed(0)
    nerf = nerf_cls(validate(nerf_cls.Config, TINY_NERF))
    rep = check_representation(gs_cls(), TINY, size=12, create_from=nerf)
    made = gs_cls().create_from(nerf, rep.cfg)
    # placed where the NeRF is dense: its blob at the centre, not uniformly in the ball
    assert made.xyz.norm(dim=-1).mean() < 0.6


def test_renders_a_blob_where_it_is():
    rep = build({"count": 200, "init_radius": 0.3, "init_opacity": 0.9})
    rep.eval()
    cams = orbit(2, elevation_deg=0.0, distance=2.5)
    with torch.no_grad():
        out = rep.render(cams, 16, 16, background=White(), step=step(0))
    assert out["opacity"][:, 6:10, 6:10].min() > 0.95       # centre covered
    assert out["opacity"][:, 0, 0].max() < 0.01             # corners empty
    assert out["rgb"][:, 0, 0].min() > 0.99                 # background shows there
    depth = out["depth"][:, 8, 8, 0] / out["opacity"][:, 8, 8, 0]
    assert ((depth > 2.1) & (depth < 2.6)).all()             # ~ front of a 0.3 ball at 2.5


def test_point_cloud_files(tmp_path):
    pts = np.random.default_rng(0).uniform(-0.3, 0.3, (50, 6)).astype(np.float32)
    pts[:, 3:] = [[255, 0, 0]]
    np.save(tmp_path / "p.npy", pts)
    rep = build({"init": "points", "points": str(tmp_path / "p.npy")})
    assert rep.count == 50
    assert torch.allclose(rep.rgb()[:, 0], torch.tensor(0.98), atol=1e-4)
    import trimesh
    trimesh.PointCloud(pts[:, :3]).export(tmp_path / "p.ply")
    assert build({"init": "points", "points": str(tmp_path / "p.ply")}).count == 50
    (tmp_path / "bad.ply").write_text("not a ply at all")
    (tmp_path / "bad.npy").write_bytes(b"garbage")
    np.save(tmp_path / "flat.npy", np.zeros(7))
    for bad in ("bad.ply", "bad.npy", "flat.npy", "missing.npy"):
        with pytest.raises(ConfigError) as info:
            build({"init": "points", "points": str(tmp_path / bad)})
        assert "\n" not in str(info.value) and str(info.value).startswith("points:")


@pytest.mark.parametrize("settings, message", [
    ({"densify": {"start": 500, "stop": 100}}, "out of order"),
    ({"densify": {"every": 0}}, "densify.every"),
    ({"init": "points"}, "points"),
    ({"sh_degree": 3}, "sh_degree"),
    ({"backend": "cuda"}, "backend"),
])
def test_bad_settings_are_one_line(settings, message):
    with pytest.raises(ConfigError, match=message) as info:
        validate(gs_cls().Config, dict(TINY, **settings))
    assert "\n" not in str(info.value)


def _train(rep, steps, lr=0.01, size=16):
    opt = torch.optim.Adam([{"params": p, "name": n} for n, ps in rep.param_groups().items()
                            for p in ps], lr=lr)
    cams = orbit(4, distance=2.5)
    target = torch.zeros(4, size, size, 3)
    target[:, 4:12, 4:12, 0] = 1.0
    for s in range(steps):
        opt.zero_grad(set_to_none=True)
        out = rep.render(cams, size, size, background=White(), step=step(s))
        ((out["rgb"] - target) ** 2).mean().backward()
        opt.step()
        rep.after_step(step(s), opt)
    return opt


def test_densification_grows_and_keeps_the_optimiser_in_step():
    rep = build({"count": 100, "densify": {"start": 2, "every": 2, "stop": 100,
                                           "grad_threshold": 1e-6}})
    rep.train()
    opt = _train(rep, 4)
    assert rep.last_densify is not None and rep.last_densify["step"] == 4
    assert rep.count > 100
    live = [p for g in opt.param_groups for p in g["params"]]
    for p in (rep.xyz, rep.scaling, rep.opacity, rep.color, rep.rotation):
        assert any(p is q for q in live)
        state = opt.state[p]
        assert state["exp_avg"].shape == p.shape and state["exp_avg_sq"].shape == p.shape
    _train(rep, 2)                                   # keeps training after the resize


def test_densify_clones_small_splits_large_prunes_transparent():
    cfg = DensifyConfig(grad_threshold=0.5, percent_dense=0.1, extent=1.0, min_opacity=0.05)
    m = torch.nn.Module()
    m.xyz = torch.nn.Parameter(torch.zeros(4, 3))
    m.scaling = torch.nn.Parameter(torch.log(torch.tensor(
        [[0.01] * 3, [0.3] * 3, [0.01] * 3, [0.01] * 3])))
    grad = torch.tensor([1.0, 1.0, 0.0, 0.0])          # 0: small + hot, 1: large + hot
    opac = torch.tensor([0.5, 0.5, 0.5, 0.01])          # 3: transparent
    opt = torch.optim.Adam([m.xyz, m.scaling])
    (m.xyz.sum() + m.scaling.sum()).backward()
    opt.step()
    counts = densify_and_prune(m, ["xyz", "scaling"], opt, grad, cfg, m.scaling.exp(),
                               torch.eye(3).repeat(4, 1, 1), opac)
    assert counts == {"cloned": 1, "split": 1, "pruned": 1, "total": 5}
    # kept 0 and 2, then the clone of 0, then two halves of 1 (scale / 1.6)
    assert torch.allclose(m.scaling.exp()[3:], torch.full((2, 3), 0.3 / 1.6), rtol=0.01)
    # the optimiser now holds the new parameters, with state of their size
    assert opt.param_groups[0]["params"][0] is m.xyz
    assert opt.state[m.scaling]["exp_avg"].shape == (5, 3)


def test_pruning_everything_is_one_clear_error():
    rep = build({"densify": {"start": 1, "every": 1, "stop": 10, "min_opacity": 0.99}})
    rep.train()
    with pytest.raises(ConfigError, match="no Gaussians left after pruning"):
        _train(rep, 1)


def test_state_dict_of_another_count_loads():
    small, big = build({"count": 10}), build({"count": 30})
    small.load_state_dict(big.state_dict())
    assert small.count == 30 and torch.equal(small.xyz, big.xyz)


def test_surface_albedo_and_ply(tmp_path):
    rep = build({"count": 400, "init_radius": 0.4, "init_opacity": 0.8})
    with torch.no_grad():
        rep.color.fill_(3.0)                            # near-white ...
        rep.color[:, 2] = -3.0                          # ... yellow
    rep.eval()
    verts, faces = rep.surface(32)
    assert faces.shape[0] > 100
    # around the ball of centres (radius 0.4), out to where the Gaussians (sigma ~0.07)
    # render opaque: the silhouette match puts it there
    r = verts.norm(dim=-1)
    assert 0.4 < r.mean() < 0.6 and r.std() < 0.05
    col = rep.albedo(verts)
    assert col[:, 0].min() > 0.9 and col[:, 2].max() < 0.1
    far = rep.albedo(torch.tensor([[0.95, 0.0, 0.0]]))  # no Gaussian reaches: nearest's
    assert far[0, 0] > 0.9
    path = rep.export_files(tmp_path)["ply"]
    cols = fields.read_3dgs_ply(path)
    for name in fields.PLY_FIELDS:
        assert name in cols and len(cols[name]) == 400
    np.testing.assert_allclose(cols["x"], rep.xyz[:, 0].detach().numpy(), rtol=1e-6)
    np.testing.assert_allclose(cols["opacity"], rep.opacity.detach().numpy(), rtol=1e-6)
    np.testing.assert_allclose(cols["f_dc_2"] * fields.SH_C0 + 0.5,
                               torch.sigmoid(rep.color[:, 2]).detach().numpy(), atol=1e-6)


def test_dmtet_is_created_from_gaussians():
    from tests.test_contracts import TINY_DMTET

    gs = build({"count": 300, "init_radius": 0.4, "init_opacity": 0.8})
    with torch.no_grad():
        gs.color.fill_(-3.0)
        gs.color[:, 1] = 3.0                            # green
    dmtet = check_representation(registry.get("representation", "dmtet"),
                                 dict(TINY_DMTET, init_level="silhouette"), size=16,
                                 create_from=gs)
    made = registry.get("representation", "dmtet").create_from(
        gs, validate(registry.get("representation", "dmtet").Config,
                     dict(TINY_DMTET, init_level="silhouette")))
    verts, faces = made.surface()
    assert faces.shape[0] > 0
    col = made.albedo(verts)
    assert col[:, 1].min() > 0.8 and col[:, 0].max() < 0.2     # the Gaussians' green
    assert dmtet is not None
