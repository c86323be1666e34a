"""The ``textured-mesh`` representation (refinement from views): the contract, the
back-projection on hand-built fixtures, the bounded offsets and their regularisers, a short fit,
create_from a DMTet, and (slow) the one2345pp-toy recipe end to end."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from engine import registry
from engine.cameras import Cameras, orbit
from engine.config import validate
from engine.plugin import StepInfo
from engine.testing import check_representation
from representations.lib.texture_project import (backproject_views, closest_surface_points,
                                                 sample_texture)

ROOT = Path(__file__).resolve().parent.parent
TINY_HASH = {"n_levels": 2, "n_features": 2, "log2_table_size": 8, "base_resolution": 4,
             "per_level_scale": 2.0, "backend": "torch"}
TINY_DMTET = {"resolution": 16, "color": TINY_HASH, "color_hidden": 8, "init_radius": 0.5,
              "marching_backend": "torch", "raster_backend": "torch"}
TINY = {"texture_size": 32, "raster_backend": "torch"}
STEP = StepInfo("test", 0, 0, 1, 0)


def tm_cls():
    return registry.get("representation", "textured-mesh")


def make(cfg=None, mesh=None):
    cls = tm_cls()
    return cls(validate(cls.Config, dict(TINY, **(cfg or {}))), mesh=mesh)


class White(torch.nn.Module):
    def forward(self, dirs):
        return torch.ones_like(dirs)


# -- contract -------------------------------------------------------------------------------

def test_textured_mesh_meets_the_contract():
    check_representation(tm_cls(), TINY, size=16)
    check_representation(tm_cls(), dict(TINY, vertex_color=True), size=16)


def test_textured_mesh_is_created_from_a_dmtet_and_a_nerf():
    dcls = registry.get("representation", "dmtet")
    torch.manual_seed(0)
    dmtet = dcls(validate(dcls.Config, TINY_DMTET))
    check_representation(tm_cls(), TINY, size=16, create_from=dmtet)
    ncls = registry.get("representation", "nerf")
    nerf = ncls(validate(ncls.Config, {"hash_grid": TINY_HASH, "mlp_hidden": 8,
                                       "samples_per_ray": 8, "occupancy": {"enabled": False},
                                       "composite_backend": "torch", "isosurface_threshold": 3.0}))
    check_representation(tm_cls(), dict(TINY, mesh_resolution=16), size=12, create_from=nerf)


# -- back-projection, hand-built ------------------------------------------------------------
# A square in the plane x = 0, facing +x, spanning y, z in [-1, 1]. The camera at azimuth 0 sits
# on +x at distance 2 with tan(fovy / 2) = 1 / 2, so the square fills its image exactly: image
# column j <-> y, row i <-> z (row 0 at the top, z = +1; the picture's right is +y).

D = 2.0
FOVY = math.degrees(2.0 * math.atan(1.0 / D))


def front_camera(azimuth=0.0):
    return Cameras.from_spherical([0.0], [azimuth], [D], [FOVY])


def texel_points(n):
    """Centres of an n x n grid over the square, in image order: [n * n, 3]."""
    c = (torch.arange(n, dtype=torch.float32) + 0.5) / n * 2.0 - 1.0
    z, y = torch.meshgrid(-c, c, indexing="ij")          # row 0: z near +1
    return torch.stack([torch.zeros_like(y), y, z], dim=-1).reshape(-1, 3)


def test_backprojection_gives_each_point_its_pixel_colour_weighted_by_the_cosine():
    n = 4
    image = torch.rand(1, n, n, 3, generator=torch.Generator().manual_seed(0))
    points = texel_points(n)
    normals = torch.tensor([[1.0, 0.0, 0.0]]).expand_as(points)
    cams = front_camera()
    depth = torch.full((1, 2 * n, 2 * n), D)             # the square is at view depth 2
    colours, weight = backproject_views(points, normals, image, cams.world_to_clip(n, n),
                                        cams.position, depth)
    # every point projects onto a pixel centre: its colour exactly
    assert torch.allclose(colours, image.reshape(-1, 3), atol=1e-6)
    # weight = cos(view angle) = 2 / |camera - point|
    expected = D / torch.sqrt(D ** 2 + points[:, 1] ** 2 + points[:, 2] ** 2)
    assert torch.allclose(weight, expected, atol=1e-6)


def test_backprojection_blends_views_by_cosine_and_skips_hidden_and_back_facing_ones():
    p = torch.tensor([[0.0, 0.0, 0.0]])
    nrm = torch.tensor([[1.0, 0.0, 0.0]])
    # views at azimuth 0 (head-on), 60 (cos 1/2), 180 (behind: back-facing), 90 (edge-on)
    azim = [0.0, 60.0, 180.0, 90.0]
    cams = Cameras.from_spherical([0.0] * 4, azim, [D] * 4, [FOVY] * 4)
    colours = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 1.0], [0.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
    images = colours[:, None, None, :].expand(4, 4, 4, 3).contiguous()
    depth = torch.full((4, 4, 4), D)                     # the origin is at view depth 2
    col, w = backproject_views(p, nrm, images, cams.world_to_clip(4, 4), cams.position, depth)
    assert w.item() == pytest.approx(1.5, abs=1e-5)
    # (1 * red + 0.5 * blue) / 1.5
    assert torch.allclose(col[0], torch.tensor([2.0 / 3.0, 0.0, 1.0 / 3.0]), atol=1e-5)
    # an occluder in front (the depth map sees a surface 0.5 nearer) hides the point
    near = depth.clone()
    near[1] = D - 0.5
    col, w = backproject_views(p, nrm, images, cams.world_to_clip(4, 4), cams.position, near)
    assert w.item() == pytest.approx(1.0, abs=1e-5)
    assert torch.allclose(col[0], colours[0], atol=1e-6)
    # masks weight the views: a view whose mask is 0 there gives nothing
    masks = torch.ones(4, 4, 4, 1)
    masks[0] = 0.0
    col, w = backproject_views(p, nrm, images, cams.world_to_clip(4, 4), cams.position, depth,
                               masks=masks)
    assert torch.allclose(col[0], colours[1], atol=1e-6) and w.item() == pytest.approx(0.5)


def quad_mesh():
    """The square as two triangles (outward +x), its UVs covering the whole texture:
    u = (y + 1) / 2, v = (z + 1) / 2."""
    verts = np.array([[0, -1, -1], [0, 1, -1], [0, 1, 1], [0, -1, 1]], dtype=np.float32)
    faces = np.array([[0, 1, 2], [0, 2, 3]], dtype=np.int64)
    uvs = (verts[:, 1:] + 1.0) / 2.0
    return verts, faces, np.arange(4), faces.copy(), uvs.astype(np.float32)


def test_texture_from_views_gives_the_exact_texel_colours_of_a_known_image():
    n = 8
    rep = make({"texture_size": n, "texture_padding": 0}, mesh=quad_mesh())
    image = torch.rand(1, n, n, 3, generator=torch.Generator().manual_seed(1))
    seen = rep.texture_from_views(image, None, front_camera())
    assert seen == n * n
    # texel (row r, col c) is at v = 1 - (r + .5) / n, u = (c + .5) / n: z and y of pixel (r, c)
    assert torch.allclose(rep.texture.detach(), image[0], atol=1e-5)
    # seen from behind, nothing is back-projected: the texture stays as it was
    before = rep.texture.detach().clone()
    assert rep.texture_from_views(torch.zeros(1, n, n, 3), None, front_camera(180.0)) == 0
    assert torch.equal(rep.texture.detach(), before)
    # and the kept views give their cameras back
    rgb, mask, cams = rep.target_views()
    assert rgb.shape == (1, n, n, 3) and torch.allclose(cams.c2w, front_camera(180.0).c2w)


def test_albedo_at_world_points_reads_the_texture_through_the_nearest_face():
    n = 8
    rep = make({"texture_size": n, "texture_padding": 0}, mesh=quad_mesh())
    with torch.no_grad():
        rep.texture.copy_(torch.rand(n, n, 3, generator=torch.Generator().manual_seed(2)))
    pts = texel_points(n)
    assert torch.allclose(rep.albedo(pts), rep.texture.detach().reshape(-1, 3), atol=1e-5)
    face, bary = closest_surface_points(pts.numpy() + [0.01, 0, 0], quad_mesh()[0],
                                        quad_mesh()[1])
    assert np.all(bary >= 0) and np.allclose(bary.sum(1), 1.0)


def test_sample_texture_hits_texel_centres():
    tex = torch.arange(12, dtype=torch.float32).reshape(2, 2, 3)
    uv = torch.tensor([[0.25, 0.75], [0.75, 0.25]])      # top-left, bottom-right texels
    assert torch.equal(sample_texture(tex, uv), torch.stack([tex[0, 0], tex[1, 1]]))


# -- offsets and regularisers ---------------------------------------------------------------

def test_offsets_stay_within_the_bound():
    rep = make({"max_offset": 0.03})
    with torch.no_grad():
        rep.offsets.copy_(torch.randn_like(rep.offsets) * 1e3)
    moved = rep.vertices() - rep.base_vertices
    assert moved.abs().max().item() <= 0.03 + 1e-7
    assert moved.abs().max().item() > 0.029


def test_laplacian_is_zero_for_zero_offsets_and_positive_otherwise():
    rep = make()
    regs = rep.regularizers({}, STEP)
    assert regs["laplacian"].item() == 0.0
    assert regs["normal_consistency"].item() > 0.0       # an icosphere is not flat
    with torch.no_grad():
        rep.offsets.normal_(generator=torch.Generator().manual_seed(0))
    assert rep.regularizers({}, STEP)["laplacian"].item() > 0.0
    # a constant shift is smooth
    with torch.no_grad():
        rep.offsets.fill_(0.5)
    assert rep.regularizers({}, STEP)["laplacian"].item() < 1e-12


def test_a_short_fit_to_renders_of_a_known_texture_lowers_the_colour_error():
    truth = make()
    u = torch.linspace(0, 1, 32)
    with torch.no_grad():
        truth.texture.copy_(torch.stack(torch.meshgrid(u, u.flip(0), indexing="ij")
                                        + (torch.full((32, 32), 0.3),), dim=-1))
    cams = orbit(4, elevation_deg=20.0, distance=2.0, fovy_deg=45.0)
    with torch.no_grad():
        target = truth.render(cams, 24, 24, background=White(), step=STEP)["rgb"]
    rep = make()
    opt = torch.optim.Adam([rep.texture], lr=0.1)

    def error():
        return (rep.render(cams, 24, 24, background=White(), step=STEP)["rgb"]
                - target).pow(2).mean()

    start = error().item()
    for _ in range(25):
        opt.zero_grad()
        loss = error()
        loss.backward()
        opt.step()
    assert error().item() < 0.2 * start


def test_create_from_a_dmtet_keeps_its_surface():
    import trimesh

    dcls = registry.get("representation", "dmtet")
    torch.manual_seed(0)
    dmtet = dcls(validate(dcls.Config, TINY_DMTET))
    rep = tm_cls().create_from(dmtet, validate(tm_cls().Config, TINY))
    src = trimesh.Trimesh(*[t.numpy() for t in dmtet.surface()], process=False)
    got = trimesh.Trimesh(*[t.numpy() for t in rep.surface()], process=False)
    def to_surface(points, mesh):
        """Distances of points [N, 3] to the surface of ``mesh``."""
        face, bary = closest_surface_points(points, mesh.vertices, mesh.faces, candidates=16)
        q = (bary[:, :, None] * mesh.vertices[mesh.faces[face]]).sum(1)
        return np.linalg.norm(points - q, axis=1)

    chamfer = 0.5 * (to_surface(got.sample(4000), src).mean()
                     + to_surface(src.sample(4000), got).mean())
    assert chamfer < 1e-3                                 # the cells are 0.125 wide
    assert rep.faces.shape[0] > 100
    # its texture is the DMTet's colour field baked: a render matches the DMTet's albedo
    cams = orbit(2, elevation_deg=20.0, distance=2.5, fovy_deg=45.0)
    with torch.no_grad():
        a_img = dmtet.render(cams, 32, 32, background=White(), step=STEP)["albedo"]
        b_img = rep.render(cams, 32, 32, background=White(), step=STEP)["albedo"]
    both = (a_img.sum(-1) > 0) & (b_img.sum(-1) > 0)
    assert (a_img[both] - b_img[both]).abs().mean().item() < 0.05


# -- the recipe, end to end -----------------------------------------------------------------

@pytest.mark.slow
def test_one2345pp_toy_runs_exports_and_lowers_the_texture_noise(tmp_path):
    from engine.evaluate.texture_noise import compare_run
    from engine.run import main

    out = tmp_path / "run"
    code = main(["recipe=one2345pp-toy", f"image={ROOT / 'examples/toy/red-mug.png'}",
                 f"out={out}", "output.progress=false", "output.render_every=0",
                 # the DMTet stage keeps its 150 SDS steps: they make the speckle (after 30
                 # it is still smooth, and the views' grain is noisier than it)
                 "stages.views.steps=60", "stages.refine.steps=5",
                 *[f"stages.{s}.guidance.{k}" for s in ("views", "refine")
                   for k in ("candidates=1", "sample_steps=10")],
                 "export.turntable.enabled=false", "export.texture_size=64"])
    assert code == 0
    run = out if (out / "metrics.jsonl").is_file() else next(out.parent.glob("run*"))
    meshes = list(run.rglob("mesh.glb"))
    assert meshes and meshes[0].stat().st_size > 0
    scores = compare_run(run)                             # 128 px, as the docs quote
    assert scores["refine"]["laplacian_noise"] < scores["dmtet"]["laplacian_noise"]
    assert scores["refine"]["psnr"] > scores["dmtet"]["psnr"]


# -- the refine stage's targets are the views stage's group ---------------------------------

def test_a_later_sampled_views_stage_reuses_the_group_and_hands_it_to_the_representation(
        monkeypatch):
    from engine.config import PROJECT_ROOT
    from engine.plugin import ReferenceImage, RunInputs
    import guidance.multiview.sample
    from guidance import sampled_views as sv

    calls = []

    def fake(model, cond, uncond, cam16, n, steps, scale, eta, generator, clip_sample=None,
             progress=None):
        calls.append(int(generator.initial_seed()))
        g = torch.Generator().manual_seed(int(generator.initial_seed()))
        return torch.rand(n, 3, 32, 32, generator=g)

    monkeypatch.setattr(guidance.multiview.sample, "sample_views", fake)
    mask = torch.zeros(32, 32, 1)
    mask[8:24, 8:24] = 1.0
    inputs = RunInputs(image=ReferenceImage((mask * 0.3 + (1 - mask)).expand(32, 32, 3), mask,
                                        "p.png"))
    cams = Cameras.from_spherical(0.0, torch.tensor([0.0, 90.0, 180.0, 270.0]), 2.75, 40.0,
                                  views_per_object=4)
    cfg = sv.SampledViewsL2.Config(model=str(PROJECT_ROOT / "models/toy/stage2"), candidates=2,
                                   sample_steps=3)
    first = sv.SampledViewsL2(cfg, device="cpu", inputs=inputs)
    first.draw(cams)
    assert len(calls) == 2
    later = sv.SampledViewsL2(cfg, device="cpu", inputs=inputs)     # another stage's instance
    outputs = {"rgb": torch.ones(4, 32, 32, 3), "opacity": torch.zeros(4, 32, 32, 1)}
    later(outputs, cams, STEP)
    assert len(calls) == 2                                            # not sampled again
    assert torch.equal(later.rgb, first.rgb) and later.chosen == first.chosen
    # the targets ride along in the outputs for the representation's regularizers()
    assert torch.equal(outputs["target_rgb"], first.targets(32)[0])
    rep = make()
    rep.render(cams, 32, 32, background=White(), step=STEP)
    rep.regularizers(outputs, STEP)
    assert float(rep.texture_ready) == 1.0 and rep.target_views()[0].shape == (4, 32, 32, 3)
