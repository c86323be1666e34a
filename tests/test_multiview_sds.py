"""The multiview-sds guidance plugin with tiny random models saved in the engine's format."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from engine.cameras import Cameras
from engine.images import load_reference_image
from engine.plugin import RunInputs, StepInfo
from engine.run import main
from guidance.conditioners import OpenCLIPImageConditioner, OpenCLIPTextConditioner
from guidance.multiview.model import MultiViewDiffusionModel
from guidance.multiview.openclip import build_openclip, tiny_openclip_config
from guidance.multiview.prior import MultiViewPrior
from guidance.multiview_sds import MultiViewSDS
from guidance.multiview.unet import MultiViewUNetConfig

TINY_VAE = dict(in_channels=3, out_channels=3, latent_channels=4,
                down_block_types=["DownEncoderBlock2D"] * 2,
                up_block_types=["UpDecoderBlock2D"] * 2, block_out_channels=[32, 32],
                layers_per_block=1, norm_num_groups=8, sample_size=16)


def unet_cfg(channels):
    return MultiViewUNetConfig(sample_size=8, in_channels=channels, out_channels=channels,
                               block_out_channels=[32, 32], layers_per_block=1,
                               attention_head_dim=[2, 2], cross_attention_dim=32,
                               norm_num_groups=8)


@pytest.fixture(scope="module")
def image_model_dir(tmp_path_factory) -> Path:
    """A latent-space, image-conditioned model (the Isotropic3D shape), saved to a folder."""
    cond = OpenCLIPImageConditioner.from_clip(build_openclip(tiny_openclip_config(), seed=0),
                                              tiny_openclip_config())
    model = MultiViewDiffusionModel.build_random(unet_cfg(4), "latent", conditioner=cond,
                                                 vae_config=TINY_VAE, seed=0, init_std=0.05,
                                                 conditioning="image",
                                                 camera_convention="mvdream")
    folder = tmp_path_factory.mktemp("models") / "tiny-iso"
    model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def text_model_dir(tmp_path_factory) -> Path:
    """A pixel-space, text-conditioned model (the MVDream shape)."""
    cond = OpenCLIPTextConditioner.from_clip(build_openclip(tiny_openclip_config(), seed=1),
                                             tiny_openclip_config())
    model = MultiViewDiffusionModel.build_random(unet_cfg(3), "pixel", conditioner=cond, seed=1,
                                                 init_std=0.05, conditioning="text",
                                                 camera_convention="mvdream")
    folder = tmp_path_factory.mktemp("models") / "tiny-mv"
    model.save_pretrained(folder)
    return folder


def four_views(n_objects=1):
    az = torch.arange(4 * n_objects, dtype=torch.float32) * 90.0
    return Cameras.from_spherical(15.0, az, 2.5, 40.0, views_per_object=4)


def step(s=0):
    return StepInfo("s", 0, s, 100, s)


def test_loss_is_finite_and_only_the_render_gets_gradients(image_model_dir, rgba_image):
    inputs = RunInputs(image=load_reference_image(rgba_image, 64))
    g = MultiViewSDS(MultiViewSDS.Config(model=str(image_model_dir)), inputs=inputs)
    assert g.conditioning == "image" and g.convention == "mvdream"
    assert isinstance(g.prior, MultiViewPrior) and g.model is g.prior.model
    assert g.model.conditioner is None                      # freed after embedding
    assert g.context_cond.shape == (1, 1, 32) and g.context_cond.abs().sum() > 0
    assert torch.equal(g.context_uncond, torch.zeros_like(g.context_uncond))
    for loss_form in ("reconstruction", "classic"):
        g.cfg.loss = loss_form
        rgb = torch.rand(8, 24, 24, 3, requires_grad=True)
        torch.manual_seed(0)
        loss = g({"rgb": rgb}, four_views(2), step())["sds"]
        assert loss.ndim == 0 and torch.isfinite(loss)
        loss.backward()
        assert rgb.grad is not None and rgb.grad.abs().sum() > 0
        assert all(p.grad is None and not p.requires_grad for p in g.model.parameters())


def test_text_model_needs_a_prompt_and_uses_it(text_model_dir):
    with pytest.raises(Exception, match="add prompt="):
        MultiViewSDS(MultiViewSDS.Config(model=str(text_model_dir)), inputs=RunInputs())
    a = MultiViewSDS(MultiViewSDS.Config(model=str(text_model_dir)),
                     inputs=RunInputs(prompt="a red chair"))
    b = MultiViewSDS(MultiViewSDS.Config(model=str(text_model_dir)),
                     inputs=RunInputs(prompt="a blue lamp"))
    assert a.context_cond.shape[1] == 77 and not torch.equal(a.context_cond, b.context_cond)
    rgb = torch.rand(4, 16, 16, 3, requires_grad=True)
    a({"rgb": rgb}, four_views(), step(5))["sds"].backward()
    assert rgb.grad.abs().sum() > 0


def test_timestep_range_reads_the_run_clock_across_stages(image_model_dir, rgba_image,
                                                         monkeypatch):
    from guidance.multiview import noise

    seen = []
    monkeypatch.setattr(noise, "sample_timestep",
                        lambda lo, hi, g=None: seen.append((lo, hi)) or lo)
    inputs = RunInputs(image=load_reference_image(rgba_image, 64))
    rgb = torch.rand(4, 16, 16, 3)
    second_stage = StepInfo("dmtet", 1, 0, 5000, 10000)
    for clock in ("run", "stage"):
        g = MultiViewSDS(MultiViewSDS.Config(model=str(image_model_dir), schedule_clock=clock),
                         inputs=inputs)
        g({"rgb": rgb}, four_views(), second_stage)
    assert seen == [(20, 500), (980, 980)]


def test_guidance_scale_schedule_follows_the_clock(image_model_dir, rgba_image, monkeypatch):
    from guidance.multiview import sds

    inputs = RunInputs(image=load_reference_image(rgba_image, 64))
    rgb = torch.rand(4, 16, 16, 3)
    second_stage = StepInfo("dmtet", 1, 50, 150, 250)       # stage step 50, run step 250
    annealed = MultiViewSDS(MultiViewSDS.Config(model=str(image_model_dir),
                                                guidance_scale=[0, 3.0, 1.0, 400]), inputs=inputs)
    assert annealed.guidance_scale(0) == 3.0 and annealed.guidance_scale(9999) == 1.0
    # the scheduled loss is the constant-scale loss at the schedule's value (same noise, same t)
    constant = MultiViewSDS(MultiViewSDS.Config(model=str(image_model_dir), guidance_scale=1.75),
                            inputs=inputs)
    losses = []
    for g in (annealed, constant):
        torch.manual_seed(0)
        losses.append(g({"rgb": rgb}, four_views(), second_stage)["sds"])
    assert torch.allclose(losses[0], losses[1])
    torch.manual_seed(0)
    at_three = MultiViewSDS(MultiViewSDS.Config(model=str(image_model_dir), guidance_scale=3.0),
                            inputs=inputs)({"rgb": rgb}, four_views(), second_stage)["sds"]
    assert not torch.allclose(losses[0], at_three)
    # on the stage clock the same step reads the schedule at 50
    seen = []
    real = sds.classifier_free_guidance
    monkeypatch.setattr(sds, "classifier_free_guidance",
                        lambda u, c, scale: seen.append(scale) or real(u, c, scale))
    annealed.cfg.schedule_clock = "stage"
    annealed({"rgb": rgb}, four_views(), second_stage)
    assert seen == [pytest.approx(2.75)]


@pytest.mark.parametrize("value, message", [
    (-1.0, "guidance_scale: every value must be >= 0, got -1"),
    ([[0, 3.0], [100, -0.5]], "guidance_scale: every value must be >= 0, got -0.5"),
    ("strong", "guidance_scale: expected a number"),
])
def test_bad_guidance_scale_is_named(value, message):
    from engine.errors import ConfigError

    with pytest.raises(ConfigError, match=message.replace("[", r"\[")):
        MultiViewSDS.Config(guidance_scale=value)


def test_release_camera_convention_can_be_forced(image_model_dir, rgba_image):
    inputs = RunInputs(image=load_reference_image(rgba_image, 64))
    g = MultiViewSDS(MultiViewSDS.Config(model=str(image_model_dir),
                                         camera_convention="isotropic3d-release"), inputs=inputs)
    assert g.convention == "isotropic3d-release"


def sds_recipe(tmp_path: Path, model: str) -> Path:
    recipe = {
        "description": "tiny SDS run for tests",
        "export": None,
        "inputs": {"requires": ["image"], "image_size": 32},
        "output": {"progress": False, "render_size": 16, "render_views": 2,
                   "render_every": 0, "checkpoint_every": 0},
        "stages": {"coarse": {
            "steps": 3, "resolution": 16,
            "representation": {"type": "voxel-grid", "resolution": 8, "samples_per_ray": 8},
            "guidance": {"type": "multiview-sds", "model": model},
            "cameras": {"type": "random-multiview", "groups": 1, "views": 4},
            "losses": {"sds": 1.0},
            "optimizer": {"type": "adam", "lr": {"default": 0.01}},
        }},
    }
    path = tmp_path / "sds-tiny.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def test_engine_run_with_a_converted_tiny_model(image_model_dir, rgba_image, tmp_path):
    out = tmp_path / "run"
    rc = main([f"recipe={sds_recipe(tmp_path, str(image_model_dir))}", f"image={rgba_image}",
               f"out={out}"])
    assert rc == 0
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(records) == 3 and all(r["loss/sds"] > 0 for r in records)


def test_missing_weights_fail_at_start_with_one_line(rgba_image, tmp_path, capsys):
    out = tmp_path / "never"
    rc = main([f"recipe={sds_recipe(tmp_path, str(tmp_path / 'no-such-model'))}",
               f"image={rgba_image}", f"out={out}"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err.startswith("error: ") and "\n" not in err
    assert "stages.coarse.guidance.model" in err or "guidance.model" in err
    assert not out.exists()                                 # nothing started


def test_sample_cli_writes_a_grid_of_views(image_model_dir, rgba_image, tmp_path, capsys):
    from PIL import Image

    import numpy as np

    from guidance.multiview.sample import main as sample_main, read_views

    out = tmp_path / "views.png"
    assert sample_main([f"image={rgba_image}", f"out={out}", f"model={image_model_dir}",
                        "steps=2", "device=cpu"]) == 0
    grid = Image.open(out)
    assert grid.size == (5 * 16, 16)                    # the input, then 4 views of 16 px
    views = read_views(out)
    pixels = np.asarray(grid.convert("RGB"))
    assert views.shape == (4, 16, 16, 3)
    assert np.array_equal(views[0], pixels[:, 16:32]) and np.array_equal(views[3], pixels[:, 64:])
    assert read_views(out, with_input=False).shape == (5, 16, 16, 3)
    assert sample_main([f"out={out}"]) == 2
    assert "image=PATH or prompt=TEXT" in capsys.readouterr().err
    assert sample_main([f"image={rgba_image}", f"out={out}", "object_fraction=1.5"]) == 2
    assert "object_fraction: must be in [0.1, 1]" in capsys.readouterr().err


def tiny_isotropic3d_args(model: Path, image: Path, out: Path) -> list:
    """recipes/isotropic3d.yaml shrunk to a few seconds, with a tiny model substituted."""
    small_grid = "{n_levels: 2, n_features: 2, log2_table_size: 8, base_resolution: 4}"
    args = ["recipe=isotropic3d", f"image={image}", f"out={out}", "inputs.image_size=32",
            "output.progress=false", "output.render_size=16", "output.render_views=2",
            "export.mesh_resolution=16", "export.texture_size=32", "export.decimate_faces=0",
            "export.turntable.frames=2", "export.turntable.size=16",
            "stages.dmtet.representation.resolution=8",
            f"stages.dmtet.representation.color={small_grid}"]
    for stage in ("nerf", "dmtet"):
        args += [f"stages.{stage}.steps=2", f"stages.{stage}.resolution=16",
                 f"stages.{stage}.cameras.groups=1", f"stages.{stage}.guidance.model={model}"]
    args += [f"stages.nerf.representation.hash_grid={small_grid}",
             "stages.nerf.representation.samples_per_ray=8",
             "stages.nerf.representation.isosurface_threshold=5"]
    return args


def test_isotropic3d_recipe_runs_end_to_end_with_a_tiny_model(image_model_dir, rgba_image,
                                                              tmp_path, capsys):
    out = tmp_path / "iso"
    assert main(tiny_isotropic3d_args(image_model_dir, rgba_image, out)) == 0
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [(r["stage"], r["step"]) for r in records] == [("nerf", 0), ("nerf", 1),
                                                         ("dmtet", 0), ("dmtet", 1)]
    assert all(r["loss/sds"] > 0 for r in records)
    assert "glb: " in capsys.readouterr().out
    # the finished two-stage run rebuilds (dmtet created from the nerf) for evaluation
    from engine.trainer import load_finished_representation

    rep = load_finished_representation(out)
    assert rep.registry_name == "dmtet"
    verts, faces = rep.surface(8)
    assert len(faces) > 0 and torch.isfinite(verts).all()


def test_isotropic3d_without_weights_stops_at_once(rgba_image, tmp_path, capsys):
    out = tmp_path / "iso"
    args = tiny_isotropic3d_args(tmp_path / "missing-weights", rgba_image, out)
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "stages.nerf.guidance.model" in err and not out.exists()
