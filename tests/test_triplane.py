"""Triplane representation (issue 27, first part): contract, a hand-built field, a short
fit, distillation from a NeRF, DMTet from a triplane, config errors."""

import copy

import pytest
import torch

from engine import config as engine_config
from engine import registry, testing
from engine.cameras import orbit
from engine.errors import ConfigError
from representations.backgrounds import SolidBackground
from representations.lib.encodings import HashGridConfig
from representations.lib.triplane_field import sample_planes, total_variation
from representations.nerf import NeRF, NeRFConfig, OccupancyConfig
from representations.triplane import DistillConfig, Triplane, TriplaneConfig

TINY = {"resolution": 8, "channels": 4, "decoder_hidden": 8, "samples_per_ray": 8,
        "occupancy": {"resolution": 8, "update_every": 1}, "composite_backend": "torch"}
TINY_GRID = HashGridConfig(n_levels=4, n_features=2, log2_table_size=12, base_resolution=4,
                           per_level_scale=2.0, backend="torch")


def cams(n=2, distance=2.5):
    return orbit(n, elevation_deg=20.0, distance=distance, fovy_deg=45.0)


def test_registered_and_config_validates():
    assert registry.get("representation", "triplane") is Triplane
    cls, cfg = engine_config.validate_component(
        "representation", {"type": "triplane", "resolution": 32, "combine": "concat",
                           "occupancy": {"resolution": 16}, "distill": {"steps": 10}},
        "stages.s.representation")
    assert cls is Triplane and cfg.resolution == 32 and cfg.occupancy.resolution == 16
    assert cfg.distill.steps == 10 and cfg.channels == 16


@pytest.mark.parametrize("settings,message", [
    ({"resolution": 0}, "resolution: must be >= 2"),
    ({"channels": -1}, "channels: must be >= 1"),
    ({"combine": "mean"}, "combine: 'mean' is not one of sum, concat, product"),
    ({"normal_mode": "sobel"}, "normal_mode"),
    ({"distill": {"steps": -1}}, "distill.steps"),
])
def test_bad_settings_are_one_line_config_errors(settings, message):
    with pytest.raises(ConfigError, match=message) as info:
        engine_config.validate_component("representation", dict(type="triplane", **settings),
                                          "stages.s.representation")
    assert "\n" not in str(info.value)


def test_meets_the_contract_with_occupancy_and_shading():
    cfg = dict(TINY, shading={"ambient_only_steps": 0, "textureless_prob": 0.0})
    rep = testing.check_representation(Triplane, cfg, size=12)
    assert rep.planes.shape == (3, 4, 8, 8)


def test_meets_the_contract_concat_finite_differences():
    cfg = dict(TINY, combine="concat", normal_mode="finite_difference",
               occupancy={"enabled": False})
    testing.check_representation(Triplane, cfg, size=12)


def test_sample_planes_axes_and_align_corners():
    # plane c = 0: value = u coordinate (x for xy, x for xz, y for yz); c = 1: v coordinate
    r = 5
    lin = torch.linspace(-1, 1, r)
    u = lin[None, :].expand(r, r)           # [v, u]: varies along the width
    v = lin[:, None].expand(r, r)
    planes = torch.stack([u, v])[None].expand(3, 2, r, r).contiguous()
    p = torch.tensor([[0.1, -0.3, 0.7], [1.0, -1.0, 1.0]])
    f = sample_planes(planes, p, bound=1.0)               # [3, N, 2]
    expect = torch.stack([p[:, [0, 1]], p[:, [0, 2]], p[:, [1, 2]]])
    assert torch.allclose(f, expect, atol=1e-6)          # linear data: exact, corners included
    assert total_variation(planes) > 0
    assert total_variation(torch.ones(3, 2, 4, 4)) == 0


def box_field(occupancy=True) -> Triplane:
    """Density 80 inside the box [-0.3, 0.3]^3, ~0 outside: one channel, 1 on each plane
    inside the box's projection; the decoder fires only when all three read 1 (sum > 2.5)."""
    cfg = TriplaneConfig(resolution=21, channels=1, decoder_hidden=1, blob_density=0.0,
                         samples_per_ray=96, composite_backend="torch",
                         occupancy=OccupancyConfig(enabled=occupancy, resolution=16))
    rep = Triplane(cfg)
    with torch.no_grad():
        rep.planes.zero_()
        rep.planes[:, :, 7:14, 7:14] = 1.0           # texels at -0.3 .. 0.3 (spacing 0.1)
        d0, d1 = rep.density_mlp.layers
        d0.weight.fill_(1.0), d0.bias.fill_(-2.5)
        d1.weight.fill_(200.0), d1.bias.fill_(-20.0)
        c0, c1 = rep.color_mlp.layers
        c0.weight.zero_(), c0.bias.fill_(1.0)
        c1.weight.zero_(), c1.bias.copy_(torch.tensor([5.0, -5.0, -5.0]))   # red
    return rep.eval()


def _box_hits(cameras, h, w, half):
    """Length of each pixel ray inside the box [-half, half]^3 (slab method)."""
    o, d = cameras.rays(h, w)
    inv = 1.0 / torch.where(d.abs() < 1e-9, torch.full_like(d, 1e-9), d)
    t0, t1 = (-half - o) * inv, (half - o) * inv
    near = torch.minimum(t0, t1).amax(-1)
    far = torch.maximum(t0, t1).amin(-1)
    return (far - near).clamp_min(0.0)


def test_hand_built_box_is_opaque_inside_and_empty_elsewhere():
    rep = box_field()
    inside = torch.tensor([[0.0, 0.0, 0.0], [0.25, -0.25, 0.25]])
    outside = torch.tensor([[0.5, 0.0, 0.0], [0.2, 0.2, 0.45], [0.0, -0.8, 0.0]])
    assert (rep.density(inside) > 70).all() and (rep.density(outside) < 1e-6).all()
    cameras = cams(3)
    rep.update_occupancy()
    assert rep.occupancy.occupied_fraction < 0.3          # empty space is skipped...
    out = rep.render(cameras, 24, 24, background=SolidBackground(), step=0)
    opacity = out["opacity"][..., 0]
    through = _box_hits(cameras, 24, 24, 0.3)
    misses = _box_hits(cameras, 24, 24, 0.42) == 0        # one texel of margin
    assert (opacity[through > 0.1] > 0.99).all()
    assert (opacity[misses] < 1e-3).all()
    assert through.gt(0.1).sum() > 50 and misses.sum() > 200
    red = out["rgb"][through > 0.1]
    assert (red[:, 0] > 0.98).all() and (red[:, 1:] < 0.02).all()
    full = box_field(occupancy=False).render(cameras, 24, 24, background=SolidBackground(),
                                             step=0)       # ...without changing the render
    assert torch.allclose(full["opacity"], out["opacity"], atol=1e-4)
    verts, faces = rep.surface(32)
    assert len(faces) > 0 and verts.abs().max() < 0.42


def _sphere_target(cameras, h, w, radius=0.5):
    o, d = cameras.rays(h, w)
    b = (o * d).sum(-1)
    hit = (b * b - ((o * o).sum(-1) - radius ** 2)) > 0
    return torch.where(hit[..., None], torch.tensor([0.9, 0.1, 0.1]), torch.ones(3))


def test_short_fit_to_a_sphere_reduces_the_loss():
    torch.manual_seed(0)
    rep = Triplane(TriplaneConfig(resolution=16, channels=4, decoder_hidden=16, blob_radius=0.3,
                                  samples_per_ray=24, orientation_normals=False,
                                  composite_backend="torch",
                                  occupancy=OccupancyConfig(enabled=False))).train()
    cameras = cams(2)
    target = _sphere_target(cameras, 12, 12)
    groups = rep.param_groups()
    opt = torch.optim.Adam([{"params": groups["planes"], "lr": 0.1},
                            {"params": groups["decoder"], "lr": 0.02}], betas=(0.9, 0.99))
    losses = []
    for it in range(30):
        out = rep.render(cameras, 12, 12, background=SolidBackground(), step=it)
        loss = (out["rgb"] - target).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.2 * losses[0], losses          # measured 0.017x


def small_nerf() -> NeRF:
    """A NeRF whose density is its blob strongly perturbed by a random hash grid and MLP."""
    torch.manual_seed(0)
    nerf = NeRF(NeRFConfig(hash_grid=TINY_GRID, mlp_hidden=16, samples_per_ray=32,
                           occupancy=OccupancyConfig(resolution=16), composite_backend="torch",
                           blob_density=20.0))
    with torch.no_grad():
        nerf.encoding.table.uniform_(-1, 1)
        for layer in nerf.density_mlp.layers:
            layer.weight.mul_(3.0)
    return nerf


def _held_out(nerf, n=4000):
    """Uniform points in the cube and points next to where the NeRF is dense."""
    g = torch.Generator().manual_seed(99)
    uniform = (torch.rand(n, 3, generator=g) * 2 - 1) * 0.95
    with torch.no_grad():
        dense = uniform[nerf.density(uniform) > 1.0]
    near = dense.repeat(4, 1) + 0.03 * torch.randn(len(dense) * 4, 3, generator=g)
    return torch.cat([uniform, near])


def _distilled(steps):
    nerf = small_nerf()
    cfg = TriplaneConfig(resolution=16, channels=8, decoder_hidden=32, samples_per_ray=32,
                         blob_density=0.0, composite_backend="torch",
                         occupancy=OccupancyConfig(resolution=16),
                         distill=DistillConfig(steps=steps, points=2048))
    torch.manual_seed(0)
    return nerf, Triplane.create_from(nerf, cfg)


def _log_density_error(nerf, tri):
    pts = _held_out(nerf)
    with torch.no_grad():
        err = (torch.log1p(nerf.density(pts)) - torch.log1p(tri.density(pts))).abs()
        step = 2.0 / 32
        agree = ((1 - torch.exp(-nerf.density(pts) * step)) > 0.5) == \
                ((1 - torch.exp(-tri.density(pts) * step)) > 0.5)
    return err, agree.float().mean()


def test_create_from_a_nerf_distils_its_density_quick():
    nerf, tri = _distilled(40)
    err, _ = _log_density_error(nerf, tri)
    untrained = Triplane(tri.cfg)
    err0, _ = _log_density_error(nerf, untrained)
    assert err.mean() < 0.7 * err0.mean()   # measured 0.43 against 0.69


@pytest.mark.slow
def test_create_from_a_nerf_reproduces_its_density_at_held_out_points():
    # stated tolerance, on uniform points plus points near the NeRF's dense parts:
    # |log1p(sigma_tri) - log1p(sigma_nerf)| mean < 0.06 and 95th percentile < 0.2, and the
    # two agree on "opaque over one render step" at >= 95% (measured 0.042, 0.158, 97.3%)
    nerf, tri = _distilled(200)
    err, agree = _log_density_error(nerf, tri)
    assert err.mean() < 0.06 and err.quantile(0.95) < 0.2 and agree >= 0.95, \
        (err.mean(), err.quantile(0.95), agree)
    testing.check_representation(Triplane, tri.cfg, size=8, create_from=nerf)


def test_a_triplane_continues_a_triplane_and_refuses_other_sizes():
    src = box_field()
    rep = Triplane.create_from(src, src.cfg)
    assert torch.equal(rep.planes, src.planes) and rep.planes is not src.planes
    other = TriplaneConfig(resolution=8, channels=1, decoder_hidden=1)
    with pytest.raises(ConfigError, match="same resolution"):
        Triplane.create_from(src, other)


def test_color_field_is_the_albedo_and_self_contained():
    rep = Triplane(TriplaneConfig(resolution=8, channels=4))
    field = copy.deepcopy(rep.color_field)
    pts = torch.rand(50, 3) * 2 - 1
    with torch.no_grad():
        assert torch.allclose(field(pts), rep.albedo(pts))
        rep.planes.add_(1.0)
        assert not torch.allclose(field(pts), rep.albedo(pts))


def test_dmtet_is_created_from_a_triplane():
    dmtet_cls = registry.get("representation", "dmtet")
    tri = box_field()
    made = testing.check_representation(
        dmtet_cls, {"resolution": 8, "color": {"n_levels": 2, "n_features": 2,
                                               "log2_table_size": 8, "base_resolution": 4,
                                               "backend": "torch"}, "color_hidden": 8,
                    "init_threshold": 25.0, "marching_backend": "torch",
                    "raster_backend": "torch"},
        size=16, create_from=tri)
    built = dmtet_cls.create_from(tri, made.cfg)
    assert built.start_level == 25.0
    verts, faces = built.surface()
    assert len(faces) > 0 and verts.abs().max() < 0.55
    pts = torch.tensor([[0.0, 0.0, 0.0]])
    with torch.no_grad():
        assert torch.allclose(built.albedo(pts), tri.albedo(pts))
