"""Hash-grid NeRF: blob, normals, occupancy skipping, compositing backends, gradients,
fitting, surface export; shading helpers."""

import math

import pytest
import torch

from engine import config as engine_config
from engine import registry
from engine.cameras import Cameras, orbit
from engine.errors import ConfigError
from representations.backgrounds import SolidBackground
from representations.lib.encodings import HashGridConfig
from representations.nerf import NeRF, NeRFConfig, OccupancyConfig
from representations.lib.occupancy import OccupancyGrid, cell_index
from representations.lib.shading import (ShadingConfig, choose_shading, random_light_positions,
                                     shade)

TINY_GRID = dict(n_levels=4, n_features=2, log2_table_size=12, base_resolution=4,
                 per_level_scale=2.0, backend="torch")


def tiny_nerf(seed=0, **kw) -> NeRF:
    torch.manual_seed(seed)
    kw.setdefault("hash_grid", HashGridConfig(**TINY_GRID))
    kw.setdefault("mlp_hidden", 16)
    kw.setdefault("samples_per_ray", 32)
    kw.setdefault("occupancy", OccupancyConfig(resolution=16))
    kw.setdefault("composite_backend", "torch")
    return NeRF(NeRFConfig(**kw))


def randomize(rep: NeRF, scale=0.5, seed=1):
    torch.manual_seed(seed)
    with torch.no_grad():
        rep.encoding.table.uniform_(-scale, scale)


def cams(n=2, distance=2.5):
    return orbit(n, elevation_deg=20.0, distance=distance, fovy_deg=45.0)


def test_registered_and_config_validates():
    assert registry.get("representation", "nerf") is NeRF
    cls, cfg = engine_config.validate_component(
        "representation", {"type": "nerf", "samples_per_ray": 16,
                           "occupancy": {"resolution": 32}}, "stages.nerf.representation")
    assert cls is NeRF and cfg.samples_per_ray == 16 and cfg.occupancy.resolution == 32
    assert cfg.hash_grid.log2_table_size == 19 and cfg.blob_density == 10.0
    with pytest.raises(ConfigError, match="normal_mode"):
        engine_config.validate_component("representation",
                                         {"type": "nerf", "normal_mode": "sobel"}, "r")
    with pytest.raises(ConfigError, match="hash_grid.backend"):
        engine_config.validate_component("representation",
                                         {"type": "nerf", "hash_grid": {"backend": "x"}}, "r")


def test_untrained_density_follows_the_blob():
    rep = tiny_nerf()
    pts = torch.tensor([[0.0, 0.0, 0.0], [0.9, 0.0, 0.0], [0.0, -0.9, 0.0], [0.5, 0.5, 0.4]])
    sigma = rep.density(pts)
    assert sigma[0] > 9.0                       # softplus(10 + ~0)
    assert (sigma[0] > sigma[1:]).all() and sigma[1] < 0.05
    expected = torch.nn.functional.softplus(10.0 * (1 - pts.norm(dim=-1) / 0.5))
    torch.testing.assert_close(sigma, expected, rtol=0, atol=1e-2)


def test_analytic_normals_equal_autograd_gradient():
    rep = tiny_nerf()
    randomize(rep, 2.0)          # the grid and MLP dominate over the blob
    rep.cfg.blob_density = 1.0
    pts = (torch.rand(64, 3) * 1.6 - 0.8).requires_grad_()
    n = rep.field(pts, need_normals=True)["normal"]
    (g,) = torch.autograd.grad(rep._pre_density(pts).sum(), pts)
    torch.testing.assert_close(n, -g / g.norm(dim=-1, keepdim=True), rtol=1e-4, atol=1e-4)


def test_analytic_and_finite_difference_normals_agree_on_smooth_field():
    rep = tiny_nerf()
    randomize(rep, 0.05)   # a gentle grid on top of the smooth blob
    dirs = torch.nn.functional.normalize(torch.randn(100, 3), dim=-1)
    pts = dirs * (0.2 + 0.6 * torch.rand(100, 1))
    analytic = rep.field(pts, need_normals=True)["normal"]
    rep.cfg.normal_mode = "finite_difference"
    rep.cfg.finite_difference_eps = 1e-3
    fd = rep.field(pts, need_normals=True)["normal"]
    cos = (analytic * fd).sum(-1)
    assert cos.min() > 0.99
    # and both point outwards from the blob
    assert (analytic * dirs).sum(-1).min() > 0.9


def test_render_outputs_eval():
    rep = tiny_nerf(blob_density=100.0).eval()     # a sharp ball of radius ~0.5
    out = rep.render(cams(2), 12, 10, background=SolidBackground(), step=None)
    for k, c in [("rgb", 3), ("opacity", 1), ("depth", 1), ("normal", 3), ("albedo", 3)]:
        assert out[k].shape == (2, 12, 10, c), k
    assert rep.last_shading == "albedo"
    # the centre pixel is covered, the corner ray misses the bounding sphere and shows the
    # white background
    assert out["opacity"][0, 6, 5, 0] > 0.99 and out["opacity"][0, 0, 0, 0] < 1e-3
    torch.testing.assert_close(out["rgb"][0, 0, 0], torch.ones(3), rtol=0, atol=1e-3)
    # the camera is 2.5 from the origin: the centre ray stops near the ball's surface and
    # the normal there faces the camera
    assert 1.9 < out["depth"][0, 6, 5, 0] < 2.2
    cam_dir = torch.nn.functional.normalize(cams(2).position[0], dim=0)
    assert (out["normal"][0, 6, 5] * cam_dir).sum() > 0.9


def test_eval_chunking_does_not_change_the_render():
    rep = tiny_nerf().eval()
    randomize(rep, 0.5)
    a = rep.render(cams(1), 9, 9, background=SolidBackground(), step=None)
    rep.cfg.eval_chunk_rays = 7
    b = rep.render(cams(1), 9, 9, background=SolidBackground(), step=None)
    for k in ("rgb", "opacity", "depth", "normal"):
        torch.testing.assert_close(a[k], b[k])


def test_composite_backends_equal():
    pytest.importorskip("nerfacc")
    rep = tiny_nerf().eval()
    randomize(rep, 0.5)
    a = rep.render(cams(2), 8, 8, background=SolidBackground(), step=None)
    rep.cfg.composite_backend = "nerfacc"
    b = rep.render(cams(2), 8, 8, background=SolidBackground(), step=None)
    for k in ("rgb", "opacity", "depth", "normal"):
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-5)


def test_occupancy_all_occupied_gives_identical_render():
    rep = tiny_nerf()
    randomize(rep, 0.5)
    rep.train()
    rep.occupancy.mark_all_occupied()
    torch.manual_seed(5)
    a = rep.render(cams(2), 8, 8, background=SolidBackground(), step=None)
    rep.cfg.occupancy.enabled = False
    torch.manual_seed(5)
    b = rep.render(cams(2), 8, 8, background=SolidBackground(), step=None)
    for k in ("rgb", "opacity", "depth", "normal", "orientation"):
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)


def test_occupancy_skips_only_empty_space():
    # a sharp blob: density is ~1e-40 beyond |x| = 0.8, so those samples contribute nothing
    rep = tiny_nerf(blob_density=200.0, blob_radius=0.5,
                    occupancy=OccupancyConfig(resolution=16, threshold=1e-6)).eval()
    rep.before_step(0)
    frac = rep.occupancy.occupied_fraction
    assert 0.05 < frac < 0.6
    cameras = cams(2)
    o, d = (t.reshape(-1, 3) for t in cameras.rays(8, 8))
    from representations.lib import volume
    near, far, hit = volume.ray_sphere_bounds(o, d, 1.0)
    t0, t1 = volume.stratified_samples(near, far, 32, perturb=False)
    pts = o[:, None] + d[:, None] * (0.5 * (t0 + t1))[..., None]
    kept = rep.sample_mask(pts, hit)
    assert kept.sum() < 0.7 * hit.sum() * 32           # a good part of the samples dropped
    a = rep.render(cameras, 8, 8, background=SolidBackground(), step=None)
    rep.cfg.occupancy.enabled = False
    b = rep.render(cameras, 8, 8, background=SolidBackground(), step=None)
    for k in ("rgb", "opacity", "depth", "normal"):
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-5)


def test_occupancy_grid_update_and_lookup():
    grid = OccupancyGrid(resolution=4, radius=1.0, threshold=0.01, decay=0.5, dilate=0)
    assert grid.lookup(torch.tensor([[0.9, 0.9, 0.9]])).item()     # all occupied before update
    # density 100 in the cell x in [0, 0.5), y, z in [-0.5, 0), else 0
    def density(p):
        inside = ((p[:, 0] >= 0) & (p[:, 0] < 0.5) & (p[:, 1] >= -0.5) & (p[:, 1] < 0)
                  & (p[:, 2] >= -0.5) & (p[:, 2] < 0))
        return inside.float() * 100.0
    grid.update(density, step_size=0.05)
    assert grid.occupied.sum() == 1
    assert cell_index(torch.tensor([0.25, -0.25, -0.25]), 4, 1.0) == (2 * 4 + 1) * 4 + 1
    assert grid.lookup(torch.tensor([[0.25, -0.25, -0.25], [0.75, -0.25, -0.25]])).tolist() == \
        [True, False]
    # the running estimate decays instead of forgetting at once
    grid.update(lambda p: torch.zeros(p.shape[0]), step_size=0.05)
    assert grid.density.max() == 50.0 and grid.occupied.sum() == 1


def test_gradients_reach_every_parameter():
    rep = tiny_nerf(shading=ShadingConfig(ambient_only_steps=0, textureless_prob=0.0)).train()
    randomize(rep, 0.1)
    out = rep.render(cams(2), 8, 8, background=SolidBackground(), step=10)
    assert rep.last_shading == "diffuse"
    regs = rep.regularizers(out, None)
    assert set(regs) == {"orientation", "opacity_sparsity"}
    loss = out["rgb"].square().mean() + regs["orientation"] + regs["opacity_sparsity"]
    loss.backward()
    groups = rep.param_groups()
    assert set(groups) == {"encoding", "mlp"}
    params = [p for g in groups.values() for p in g]
    assert len(params) == len(list(rep.parameters()))
    for p in params:
        assert p.grad is not None and p.grad.abs().sum() > 0
    # the orientation term alone reaches the grid through the normals
    rep.zero_grad()
    out = rep.render(cams(2), 8, 8, background=SolidBackground(), step=10)
    rep.regularizers(out, None)["orientation"].backward()
    assert rep.encoding.table.grad.abs().sum() > 0


def test_orientation_loss_hand_computed():
    rep = tiny_nerf()
    w = torch.tensor([[0.5, 0.25]])
    normal = torch.tensor([[[0.0, 0.0, 1.0], [0.6, 0.0, 0.8]]])
    d = torch.tensor([[0.0, 0.0, 1.0]])
    facing = (normal * d[:, None]).sum(-1).clamp_min(0)
    per_ray = (w * facing ** 2).sum(1, keepdim=True)
    assert per_ray.item() == pytest.approx(0.5 + 0.25 * 0.64)
    out = {"opacity": torch.tensor([[0.0], [1.0]]), "orientation": torch.tensor([[1.0], [3.0]])}
    regs = rep.regularizers(out, None)
    assert regs["orientation"].item() == pytest.approx(2.0)
    assert regs["opacity_sparsity"].item() == pytest.approx((0.1 + math.sqrt(1.01)) / 2)


def _sphere_target(cameras, h, w, radius=0.5):
    """Analytic render of a solid red sphere over white."""
    o, d = cameras.rays(h, w)
    b = (o * d).sum(-1)
    c = (o * o).sum(-1) - radius ** 2
    hit = (b * b - c) > 0
    red = torch.tensor([0.9, 0.1, 0.1])
    return torch.where(hit[..., None], red, torch.ones(3))


def test_short_fit_to_a_sphere_reduces_the_loss():
    rep = tiny_nerf(blob_radius=0.3, orientation_normals=False,
                    occupancy=OccupancyConfig(enabled=False)).train()
    cameras = cams(2)
    target = _sphere_target(cameras, 16, 16)
    groups = rep.param_groups()
    opt = torch.optim.Adam([{"params": groups["encoding"], "lr": 3e-2},
                            {"params": groups["mlp"], "lr": 1e-2}], betas=(0.9, 0.99), eps=1e-15)
    bg = SolidBackground()
    losses = []
    for it in range(36):
        out = rep.render(cameras, 16, 16, background=bg, step=it)
        loss = (out["rgb"] - target).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.2 * losses[0], losses


def test_surface_of_a_sphere_density():
    # softplus(50 (1 - |x|)) = 25 at |x| = 0.5 (softplus(25) = 25 + 1e-11)
    rep = tiny_nerf(blob_density=50.0, blob_radius=1.0)
    verts, faces = rep.surface(40)
    r = verts.norm(dim=-1)
    assert faces.dtype == torch.long and faces.shape[1] == 3 and len(faces) > 500
    assert (r - 0.5).abs().max() < 0.01
    tri = verts[faces]
    signed_volume = (tri[:, 0] * torch.cross(tri[:, 1], tri[:, 2], dim=-1)).sum() / 6
    assert signed_volume.item() == pytest.approx(4 / 3 * math.pi * 0.125, rel=0.03)
    rep.cfg.isosurface_threshold = 1000.0
    with pytest.raises(RuntimeError, match="isosurface_threshold"):
        rep.surface(16)


def test_color_field_is_the_nerf_albedo_and_self_contained():
    import copy
    rep = tiny_nerf()
    randomize(rep, 0.5)
    pts = torch.rand(20, 3) * 2 - 1
    field = copy.deepcopy(rep.color_field)
    torch.testing.assert_close(field(pts), rep.albedo(pts))
    a = field(pts)
    assert a.shape == (20, 3) and (a >= 0).all() and (a <= 1).all()


# -- shading --------------------------------------------------------------------------------

def test_shade_modes_exact():
    albedo = torch.tensor([[0.5, 0.2, 1.0], [0.5, 0.2, 1.0]])
    normal = torch.tensor([[0.0, 0.0, 1.0], [0.0, 0.0, 1.0]])
    light = torch.tensor([[0.0, 0.6, 0.8], [0.0, 0.0, -1.0]])   # n.l = 0.8 and -1 (clamped)
    torch.testing.assert_close(shade(albedo, normal, light, "albedo"), albedo)
    diff = shade(albedo, normal, light, "diffuse", ambient=0.1, diffuse=0.9)
    torch.testing.assert_close(diff, albedo * torch.tensor([[0.82], [0.1]]))
    tl = shade(albedo, normal, light, "textureless", ambient=0.1, diffuse=0.9)
    torch.testing.assert_close(tl, torch.tensor([[0.82] * 3, [0.1] * 3]))


def test_choose_shading_schedule():
    cfg = ShadingConfig(ambient_only_steps=100, textureless_prob=0.5)
    g = torch.Generator().manual_seed(0)
    assert choose_shading(cfg, 5000, False, g) == "albedo"
    assert choose_shading(cfg, 99, True, g) == "albedo"
    modes = [choose_shading(cfg, 100, True, g) for _ in range(400)]
    assert set(modes) == {"diffuse", "textureless"}
    assert 150 < modes.count("textureless") < 250
    assert choose_shading(ShadingConfig(ambient_only_steps=0, textureless_prob=0.0), 0, True,
                          g) == "diffuse"


def test_random_light_positions_near_the_camera():
    cameras = Cameras.from_spherical([10.0, 20.0, 0.0], [0.0, 90.0, 200.0], [2.0, 3.0, 2.5],
                                     40.0)
    cfg = ShadingConfig()
    g = torch.Generator().manual_seed(0)
    light = torch.cat([random_light_positions(cameras, cfg, g) for _ in range(50)])
    cam = cameras.position.repeat(50, 1)
    ratio = light.norm(dim=-1) / cam.norm(dim=-1)
    assert ratio.min() >= 0.8 - 1e-5 and ratio.max() <= 1.5 + 1e-5
    cos = torch.nn.functional.cosine_similarity(light, cam, dim=-1)
    assert cos.mean() > 0.7      # on the camera's side of the object


def test_shading_config_errors():
    with pytest.raises(ConfigError, match="textureless_prob"):
        ShadingConfig(textureless_prob=2.0)
    with pytest.raises(ConfigError, match="light_distance_range"):
        ShadingConfig(light_distance_range=[2.0, 1.0])


# -- memory: checkpointed training chunks, the recomputing grid, early occupancy ------------

def _train_step(rep, chunk, seed=3):
    rep.cfg.train_chunk = chunk
    rep.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    out = rep.render(cams(2), 8, 8, background=SolidBackground(), step=10)
    regs = rep.regularizers(out, None)
    (out["rgb"].square().mean() + regs["orientation"] + regs["opacity_sparsity"]).backward()
    return out, {n: p.grad.clone() for n, p in rep.named_parameters()}


@pytest.mark.parametrize("mode", ["diffuse", "albedo"])
def test_checkpointed_training_chunks_equal_the_whole_render(mode):
    # diffuse: normals, lights and the orientation term inside the checkpointed chunks
    steps = 0 if mode == "diffuse" else 10 ** 6
    rep = tiny_nerf(shading=ShadingConfig(ambient_only_steps=steps,
                                          textureless_prob=0.0)).train()
    randomize(rep, 0.5)
    rep.update_occupancy()
    assert rep.occupancy.occupied_fraction < 1.0
    whole, g_whole = _train_step(rep, 0)
    assert rep.last_shading == mode
    # 128 rays in chunks of 37 (the last one shorter), and chunks of all the rays
    for chunk in (37, 128):
        part, g_part = _train_step(rep, chunk)
        for k in ("rgb", "opacity", "depth", "normal", "albedo", "orientation"):
            torch.testing.assert_close(part[k], whole[k], rtol=0, atol=1e-6)
        for name, g in g_whole.items():
            assert g.abs().sum() > 0, name
            torch.testing.assert_close(g_part[name], g, rtol=1e-4, atol=1e-7)


def test_checkpointed_chunks_recompute_in_backward():
    # the chunked render keeps no per-sample tensor alive until backward: the field runs
    # once per chunk in forward and once more per chunk in backward
    rep = tiny_nerf().train()
    calls = []
    field = rep.field
    rep.field = lambda p, n: calls.append((p.shape[0], torch.is_grad_enabled())) or field(p, n)
    rep.cfg.train_chunk = 40
    out = rep.render(cams(2), 8, 8, background=SolidBackground(), step=0)
    assert len(calls) == 4                       # 128 rays: 40 + 40 + 40 + 8
    out["rgb"].sum().backward()
    assert len(calls) == 8 and sorted(calls[4:]) == sorted(calls[:4])    # last chunk first
    # not training with grad: chunks without checkpointing, one pass
    calls.clear()
    with torch.no_grad():
        rep.render(cams(2), 8, 8, background=SolidBackground(), step=0)
    assert len(calls) == 4


def test_train_chunk_config():
    assert NeRFConfig().train_chunk == 32768      # the published 64 px phase (8 x 64 x 64)
    with pytest.raises(ConfigError, match="train_chunk"):
        NeRFConfig(train_chunk=-1)


def test_recomputing_grid_gives_the_same_training_step():
    # the whole NeRF step (analytic normals, orientation, diffuse shading) through the
    # recomputing hash-grid Function against the vectorised autograd path
    grads = {}
    for flag in (True, False):
        rep = tiny_nerf(shading=ShadingConfig(ambient_only_steps=0, textureless_prob=0.0),
                        train_chunk=0).train()
        rep.encoding.cfg.recompute = flag
        randomize(rep, 0.5)
        grads[flag] = _train_step(rep, 0)
    (a, ga), (b, gb) = grads[True], grads[False]
    for k in ("rgb", "opacity", "normal", "orientation"):
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)
    for name in ga:
        torch.testing.assert_close(ga[name], gb[name], rtol=1e-4, atol=1e-6)


def test_occupancy_prunes_from_the_first_step():
    # the published defaults: step 0's before_step fills the grid from the untrained blob
    # (density softplus(10 (1 - |x| / 0.5))), so the first render already skips empty space
    rep = NeRF().train()
    assert rep.occupancy.occupied_fraction == 1.0
    rep.before_step(0)
    assert rep.occupancy.occupied_fraction < 0.2
    # nothing visible is pruned: every cell whose centre has density above 0.1 is kept
    r = rep.occupancy.resolution
    centres = (torch.stack(torch.meshgrid(*[torch.arange(r)] * 3, indexing="ij"), -1)
               .reshape(-1, 3) + 0.5) * (2.0 / r) - 1.0
    with torch.no_grad():
        dense = rep.density(centres) > 0.1
    assert rep.occupancy.occupied[dense].all()
