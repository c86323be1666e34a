"""The contract-test kit (engine.testing) applied to the in-tree plugins, and shown to fail on
broken ones."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import yaml
from torch import nn

from engine import registry
from engine.images import load_reference_image
from engine.plugin import Representation, RunInputs
from engine.testing import (check_background, check_conditioner, check_guidance,
                            check_representation, run_recipe_steps, tiny_inputs)

TINY_HASH = {"n_levels": 2, "n_features": 2, "log2_table_size": 8, "base_resolution": 4,
             "per_level_scale": 2.0, "backend": "torch"}
TINY_NERF = {"hash_grid": TINY_HASH, "mlp_hidden": 8, "samples_per_ray": 8,
             "occupancy": {"enabled": False}, "composite_backend": "torch"}
TINY_DMTET = {"resolution": 8, "color": TINY_HASH, "color_hidden": 8,
              "marching_backend": "torch", "raster_backend": "torch"}


def rep_cls(name):
    return registry.get("representation", name)


# -- representations ------------------------------------------------------------------------

def test_voxel_grid_meets_the_contract():
    rep = check_representation(rep_cls("voxel-grid"), {"resolution": 6, "samples_per_ray": 8,
                                                       "backend": "torch"})
    assert rep.density_grid.shape == (1, 1, 6, 6, 6)


def test_nerf_meets_the_contract():
    check_representation(rep_cls("nerf"), TINY_NERF, size=12)


def test_nerf_with_occupancy_and_normals_meets_the_contract():
    cfg = dict(TINY_NERF, occupancy={"enabled": True, "resolution": 8, "update_every": 1},
               normal_mode="finite_difference")
    check_representation(rep_cls("nerf"), cfg, size=8)


def test_dmtet_meets_the_contract_and_is_created_from_a_nerf():
    from engine.config import validate

    nerf_cls = rep_cls("nerf")
    torch.manual_seed(0)
    nerf = nerf_cls(validate(nerf_cls.Config, TINY_NERF))
    check_representation(rep_cls("dmtet"), TINY_DMTET, size=16, create_from=nerf)


TINY_TRIPLANE = {"resolution": 8, "channels": 4, "decoder_hidden": 8, "samples_per_ray": 8,
                 "occupancy": {"resolution": 8, "update_every": 1}, "composite_backend": "torch",
                 "distill": {"steps": 5, "points": 256}}


def test_triplane_meets_the_contract_and_is_created_from_a_nerf():
    from engine.config import validate

    nerf_cls = rep_cls("nerf")
    torch.manual_seed(0)
    nerf = nerf_cls(validate(nerf_cls.Config, TINY_NERF))
    check_representation(rep_cls("triplane"), TINY_TRIPLANE, size=12, create_from=nerf)


def test_dmtet_is_created_from_a_triplane():
    from engine.config import validate

    tri_cls = rep_cls("triplane")
    torch.manual_seed(0)
    tri = tri_cls(validate(tri_cls.Config, TINY_TRIPLANE))
    check_representation(rep_cls("dmtet"), TINY_DMTET, size=16, create_from=tri)


TINY_TEXTURED = {"texture_size": 16, "mesh_resolution": 8, "raster_backend": "torch"}


def test_textured_mesh_meets_the_contract_and_is_created_from_a_dmtet():
    from engine.config import validate

    dmtet_cls = rep_cls("dmtet")
    torch.manual_seed(0)
    dmtet = dmtet_cls(validate(dmtet_cls.Config, TINY_DMTET))
    verts, faces = dmtet.surface()
    rep = check_representation(rep_cls("textured-mesh"), TINY_TEXTURED, size=12,
                               create_from=dmtet)
    assert rep.texture.shape == (16, 16, 3)
    # the created mesh is the DMTet's surface (cleaned and unwrapped, not the icosphere)
    created = rep_cls("textured-mesh").create_from(
        dmtet, validate(rep_cls("textured-mesh").Config, TINY_TEXTURED))
    assert created.faces.shape[0] > 0
    assert torch.allclose(created.base_vertices.norm(dim=-1).mean(),
                          verts.norm(dim=-1).mean(), atol=1e-3)
    # a resumed run loads the created mesh's checkpoint into an instance built from the Config
    # (an icosphere of another size): it must take the mesh and render the same
    from engine.cameras import orbit
    from engine.plugin import StepInfo

    fresh = rep_cls("textured-mesh")(validate(rep_cls("textured-mesh").Config, TINY_TEXTURED))
    assert fresh.faces.shape != created.faces.shape
    fresh.load_state_dict(created.state_dict())
    cams = orbit(2, elevation_deg=20.0, distance=2.5, fovy_deg=45.0)
    step = StepInfo("check", 0, 0, 1, 0)
    bg = registry.get("background", "solid")(
        validate(registry.get("background", "solid").Config, {"color": [0.5, 0.5, 0.5]}))
    with torch.no_grad():
        a = created.eval().render(cams, 12, 12, background=bg, step=step)
        b = fresh.eval().render(cams, 12, 12, background=bg, step=step)
    assert a["opacity"].sum() > 0
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in ("rgb", "opacity", "depth"))


def test_create_from_an_incompatible_stage_is_reported():
    voxels = rep_cls("voxel-grid")(rep_cls("voxel-grid").Config(resolution=4))
    with pytest.raises(AssertionError, match=r"create_from\(voxel-grid\) failed: ConfigError"):
        check_representation(rep_cls("dmtet"), TINY_DMTET, size=8, create_from=voxels)


# -- backgrounds ----------------------------------------------------------------------------

@pytest.mark.parametrize("name,cfg", [("solid", {"color": [0.2, 0.4, 0.6]}), ("random", None),
                                      ("environment", {"hidden": 8, "frequencies": 2})])
def test_backgrounds_meet_the_contract(name, cfg):
    bg = check_background(registry.get("background", name), cfg)
    if name == "solid":
        assert torch.allclose(bg(torch.zeros(1, 1, 1, 3))[0, 0, 0], torch.tensor([0.2, 0.4, 0.6]))


# -- guidance -------------------------------------------------------------------------------

def test_reference_view_meets_the_contract(rgba_image):
    g = check_guidance(registry.get("guidance", "reference-view"),
                       inputs=RunInputs(image=load_reference_image(rgba_image, 32)), views=1)
    assert g.target_rgb.shape == (32, 32, 3)


def test_reference_view_with_the_synthetic_inputs():
    check_guidance(registry.get("guidance", "reference-view"), size=8, views=2)


@pytest.fixture(scope="module")
def tiny_clip():
    from guidance.conditioners import OpenCLIPImageConditioner, OpenCLIPTextConditioner
    from guidance.multiview.openclip import build_openclip, tiny_openclip_config

    cfg = tiny_openclip_config()
    return (OpenCLIPImageConditioner.from_clip(build_openclip(cfg, seed=0), cfg),
            OpenCLIPTextConditioner.from_clip(build_openclip(cfg, seed=1), cfg))


def _tiny_mv_model(folder: Path, conditioner) -> Path:
    from guidance.multiview.model import MultiViewDiffusionModel
    from guidance.multiview.unet import MultiViewUNetConfig

    unet = MultiViewUNetConfig(sample_size=8, in_channels=3, out_channels=3,
                               block_out_channels=[32, 32], layers_per_block=1,
                               attention_head_dim=[2, 2], cross_attention_dim=32,
                               norm_num_groups=8)
    model = MultiViewDiffusionModel.build_random(unet, "pixel", conditioner=conditioner, seed=0,
                                                 init_std=0.05, conditioning="image",
                                                 camera_convention="mvdream")
    model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def tiny_mv_model(tmp_path_factory, tiny_clip) -> Path:
    return _tiny_mv_model(tmp_path_factory.mktemp("models") / "tiny-mv", tiny_clip[0])


def test_multiview_sds_meets_the_contract(tiny_mv_model):
    g = check_guidance(registry.get("guidance", "multiview-sds"),
                       {"model": str(tiny_mv_model), "guidance_scale": 5.0}, size=16, views=4,
                       steps=(0, 500))
    assert g.conditioning == "image"


def test_sampled_views_meets_the_contract(tiny_mv_model):
    g = check_guidance(registry.get("guidance", "sampled-views"),
                       {"model": str(tiny_mv_model), "candidates": 2, "sample_steps": 2},
                       size=16, views=4, steps=(0, 1, 2))
    assert g.chosen in (0, 1) and g.rgb.shape[0] == 4


def test_multiview_sds_with_a_patch_token_model(tmp_path, tiny_clip):
    from guidance.conditioners import OpenCLIPImageConditioner

    image = tiny_clip[0]
    folder = _tiny_mv_model(tmp_path / "tiny-mv-patches", OpenCLIPImageConditioner.from_clip(
        image.clip, image.model_cfg, tokens="patches"))
    g = check_guidance(registry.get("guidance", "multiview-sds"),
                       {"model": str(folder), "guidance_scale": 5.0}, size=16, views=4,
                       steps=(0, 500))
    assert g.context_cond.shape == (1, 17, 32) and g.context_uncond.shape == (1, 17, 32)
    assert g.context_uncond.abs().max() == 0 and g.context_cond.abs().max() > 0


# -- conditioners ---------------------------------------------------------------------------

def test_openclip_conditioners_meet_the_contract(tiny_clip):
    image, text = tiny_clip
    check_conditioner(image)
    check_conditioner(text)
    assert image(torch.rand(3, 3, 32, 32)).shape == (3, 1, 32)


def test_patch_token_conditioner_meets_the_contract_and_a_wrong_length_is_caught(tiny_clip):
    from guidance.conditioners import OpenCLIPImageConditioner

    image = tiny_clip[0]
    patches = OpenCLIPImageConditioner.from_clip(image.clip, image.model_cfg, tokens="patches")
    check_conditioner(patches)
    assert patches(torch.rand(3, 3, 32, 32)).shape == (3, 17, 32)

    class Claims(torch.nn.Module):      # says one token, gives the 17
        kind, embed_dim, num_tokens = "image", 32, 1

        def __init__(self):
            super().__init__()
            self.inner = patches

        def forward(self, rgb):
            return self.inner(rgb)

        def unconditional(self, n):
            return self.inner.unconditional(n)

    with pytest.raises(AssertionError, match=r"shape \(2, 17, 32\), expected \[2, 1, D\]"):
        check_conditioner(Claims())


# -- a short run --------------------------------------------------------------------------

def test_fit_image_runs_two_steps(rgba_image, tmp_path):
    run_dir = run_recipe_steps("fit-image", steps=2, out=tmp_path / "run", image=rgba_image,
                               overrides=["stages.fit.resolution=16",
                                          "stages.fit.representation.resolution=8",
                                          "stages.fit.representation.samples_per_ray=8",
                                          "inputs.image_size=32"])
    assert run_dir == tmp_path / "run"
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [(r["stage"], r["step"]) for r in lines] == [("fit", 0), ("fit", 1)]
    assert {"loss/rgb", "loss/mask"} <= set(lines[0])
    assert "export" not in {p.name for p in run_dir.iterdir()}
    assert [p.name for p in (run_dir / "checkpoints").iterdir()] == ["00-fit-0000002.safetensors"]
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert saved["stages"]["fit"]["steps"] == 2 and saved["export"] is None


def test_run_recipe_steps_shortens_every_stage_of_a_recipe_file(rgba_image, tmp_path):
    stage = {"resolution": 8, "representation": {"type": "voxel-grid", "resolution": 4,
                                                 "samples_per_ray": 4},
             "guidance": {"type": "reference-view"},
             "cameras": {"type": "fixed", "elevation": [0.0], "azimuth": [0.0]},
             "losses": {"rgb": 1.0}, "optimizer": {"type": "adam", "lr": {"default": 0.01}}}
    recipe = tmp_path / "two-stages.yaml"
    recipe.write_text(yaml.safe_dump({
        "description": "two tiny stages", "inputs": {"requires": ["image"], "image_size": 32},
        "stages": {"a": dict(stage, steps=500), "b": dict(stage, steps=700, init_from=None)}}))
    # ``out`` already holds a file: the run goes to a fresh folder beside it, which is returned
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "other.txt").write_text("x")
    run_dir = run_recipe_steps(str(recipe), steps=3, out=tmp_path / "run", image=rgba_image)
    assert run_dir != tmp_path / "run" and run_dir.parent == tmp_path
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [(r["stage"], r["step"]) for r in lines] == [(s, i) for s in "ab" for i in range(3)]


def test_run_recipe_steps_reports_a_failing_run(tmp_path):
    with pytest.raises(AssertionError, match="exited with 2.*needs an input image"):
        run_recipe_steps("fit-image", steps=1, out=tmp_path / "run")


# -- the kit must be able to fail -------------------------------------------------------------

class _Tiny(Representation):
    """A sphere-less toy: a constant opacity and colour per pixel from two parameters."""

    param_group_names = ("color",)
    loss_names = ("l1",)

    @dataclass
    class Config:
        flaw: str = "none"      # none | unused | range | groups | nan | loss | stateless

    def __init__(self, cfg=None, device=None):
        super().__init__()
        self.cfg = cfg or _Tiny.Config()
        self.color = nn.Parameter(torch.rand(3) * 0.5 + 0.25)
        self.alpha = nn.Parameter(torch.zeros(()))
        self.unused = nn.Parameter(torch.zeros(2))
        self.stateless = torch.rand(()) if self.cfg.flaw == "stateless" else torch.zeros(())

    def render(self, cameras, height, width, *, background, step):
        b = len(cameras)
        _, dirs = cameras.rays(height, width)
        a = torch.sigmoid(self.alpha).expand(b, height, width, 1)
        color = self.color + self.stateless
        if self.cfg.flaw == "range":
            color = color * 3.0
        if self.cfg.flaw == "nan":
            color = color * torch.tensor(float("nan"))
        rgb = a * color + (1 - a) * background(dirs)
        return {"rgb": rgb, "opacity": a}

    def param_groups(self):
        params = [self.color, self.alpha]
        if self.cfg.flaw == "unused":
            params.append(self.unused)
        groups = {"color": params}
        if self.cfg.flaw == "groups":
            groups = {"colour": params}
        return groups

    def regularizers(self, outputs, step):
        name = "l2" if self.cfg.flaw == "loss" else "l1"
        return {name: outputs["opacity"].mean() * 0.0}


def test_the_kit_names_trainable_parameters_outside_any_group():
    with pytest.raises(AssertionError, match="not in any param_groups"):
        check_representation(_Tiny, size=4)   # 'unused' is trainable but in no group


@pytest.mark.parametrize("flaw,message", [
    ("unused", r"got no gradient.*color/unused \(2,\)"),
    ("range", r"output 'rgb' goes above 1"),
    ("nan", r"'rgb' has \d+ non-finite"),
    ("groups", r"groups \['colour'\] but the class declares param_group_names = \('color',\)"),
    ("loss", r"loss 'l2' not in loss_names"),
    ("stateless", r"eval render 'rgb' differs"),
])
def test_the_kit_fails_on_broken_representations(flaw, message):
    class Broken(_Tiny):
        def __init__(self, cfg=None, device=None):
            super().__init__(cfg, device)
            if self.cfg.flaw != "unused":
                self.unused.requires_grad_(False)

    with pytest.raises(AssertionError, match=message):
        check_representation(Broken, {"flaw": flaw}, size=4)


def test_the_kit_accepts_the_toy_without_flaws():
    class Fixed(_Tiny):
        def __init__(self, cfg=None, device=None):
            super().__init__(cfg, device)
            self.unused.requires_grad_(False)

    check_representation(Fixed, size=4)


class _LeakyGuidance(nn.Module):
    loss_names = ("l2",)

    def __init__(self, device=None, inputs=None, detach=False):
        super().__init__()
        self.net = nn.Linear(3, 3)
        self.detach = detach

    def before_step(self, step):
        pass

    def forward(self, outputs, cameras, step):
        rgb = outputs["rgb"].detach() if self.detach else outputs["rgb"]
        return {"l2": self.net(rgb).pow(2).mean()}


def test_the_kit_fails_on_broken_guidance():
    with pytest.raises(AssertionError, match="parameters that require grad: net.weight"):
        check_guidance(_LeakyGuidance, size=4, views=1)

    class Detached(_LeakyGuidance):
        def __init__(self, device=None, inputs=None):
            super().__init__(device, inputs, detach=True)
            self.requires_grad_(False)

    with pytest.raises(AssertionError, match="give no gradient to the render"):
        check_guidance(Detached, size=4, views=1)

    class Noisy(_LeakyGuidance):
        def __init__(self, device=None, inputs=None):
            super().__init__(device, inputs)
            self.requires_grad_(False)
            self.g = torch.Generator().manual_seed(0)

        def forward(self, outputs, cameras, step):
            noise = torch.rand((), generator=self.g)
            return {"l2": (outputs["rgb"] - noise).pow(2).mean()}

    with pytest.raises(AssertionError, match="not deterministic"):
        check_guidance(Noisy, size=4, views=1)


def test_the_kit_fails_on_a_bad_background():
    from engine.plugin import Background

    class Bright(Background):
        def __init__(self, device=None):
            super().__init__()

        def forward(self, dirs):
            return dirs.abs() * 2.0

    with pytest.raises(AssertionError, match="goes above 1"):
        check_background(Bright)


def test_tiny_inputs_is_a_red_square_on_white():
    inputs = tiny_inputs(8)
    assert inputs.image.rgb.shape == (8, 8, 3) and inputs.image.mask.sum() == 16
    assert torch.equal(inputs.image.rgb[0, 0], torch.ones(3)) and inputs.prompt
