"""Envision3D at toy scale: the anchors fine-tuning mode, sampling between anchors, the
``anchor-views`` guidance and cameras (coarse-to-fine windows, per-view weights), the recipe.

Tiny models are trained here through the command line on a hand-made 2-group dataset; the
slow test runs recipe envision3d-toy with the shipped models.
"""

import json
from pathlib import Path

import pytest
import torch
import yaml

from engine.cameras import Cameras
from engine.datasets.mvdataset import MultiViewDataset, write_index, write_object
from engine.errors import ConfigError
from engine.plugin import ReferenceImage, RunInputs, StepInfo
from guidance.anchor_views import (AnchorViewSampler, AnchorViewsL2, ViewLayout,
                                   window_indices)
from guidance.multiview.openclip import build_openclip, save_openclip_folder, tiny_openclip_config
from guidance.training.command import main
from guidance.training.config import build_config
from guidance.training.diffusion import DiffusionTrainer
from guidance.training.losses import make_diffusion_batch
from test_finetune import SIZE, TINY_UNET, block_view, one_thread  # noqa: F401 (autouse fixture)

COLOURS = [(220, 40, 30), (40, 60, 220), (40, 200, 60)]


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """3 objects with two camera groups (elevations 0 and 20, offsets 0 and 45) and a
    reference each, plus a one-group object; a tiny CLIP folder."""
    root = tmp_path_factory.mktemp("anchors")
    ids = []
    for i, colour in enumerate(COLOURS):
        views = [(block_view(colour, 90.0 * k), Cameras.from_spherical(0.0, 90.0 * k, 2.0, 40.0))
                 for k in range(4)]
        views += [(block_view(colour, 45.0 + 90.0 * k),
                   Cameras.from_spherical(20.0, 45.0 + 90.0 * k, 2.0, 40.0)) for k in range(4)]
        views.append((block_view(colour, 10.0), Cameras.from_spherical(5.0, 10.0, 2.0, 40.0)))
        ids.append(f"obj_{i}")
        write_object(root / "data", ids[-1], views, groups=[[0, 1, 2, 3], [4, 5, 6, 7]],
                     references=[8])
    one = [(block_view((200, 200, 0), 90.0 * k), Cameras.from_spherical(0.0, 90.0 * k, 2.0, 40.0))
           for k in range(5)]
    write_object(root / "data", "single", one, groups=[[0, 1, 2, 3]], references=[4])
    write_index(root / "data", ids + ["single"], {"train": ids + ["single"]}, image_size=SIZE)
    save_openclip_folder(build_openclip(tiny_openclip_config(), seed=0), tiny_openclip_config(),
                         root / "clip")
    return root


def recipe(work, **extra):
    data = {"mode": "anchors", "data": {"root": str(work / "data")}, "device": "cpu",
            "steps": 2, "batch_size": 2, "lr": 1e-3, "log_every": 1, "sample_every": -1,
            "checkpoint_every": 0, "cfg_dropout": 0.0,
            "model": {"init": "random", "space": "pixel", "unet": TINY_UNET,
                      "conditioner": {"model": str(work / "clip")}}}
    data.update(extra)
    path = work / f"anchors-{len(list(work.glob('*.yaml')))}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.fixture(scope="module")
def tiny_model(work):
    """A tiny mode-anchors model (2 steps through the command line)."""
    out = work / "run"
    assert main([f"recipe={recipe(work)}", f"out={out}"]) == 0
    return out / "model"


# -- the maths -----------------------------------------------------------------------------

def test_anchor_batch_appends_clean_anchors_with_their_cameras():
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(2, 4, 3, 8, 8, generator=g)
    anchors, a_cam = torch.randn(2, 3, 3, 8, 8, generator=g), torch.randn(2, 3, 16, generator=g)
    cond, cams = torch.randn(2, 1, 32, generator=g), torch.randn(2, 4, 16, generator=g)
    ac = torch.linspace(0.99, 0.01, 1000)
    args = (x0, cond, torch.zeros(1, 1, 32), cams, ac)
    b = make_diffusion_batch(*args, torch.Generator().manual_seed(1), 0.0, (anchors, a_cam))
    plain = make_diffusion_batch(*args, torch.Generator().manual_seed(1), 0.0)
    assert b.group == 7 and b.num_views == 4
    x = b.x_t.view(2, 7, 3, 8, 8)
    assert torch.equal(x[:, 4:], anchors)                        # clean, after the noisy views
    assert torch.equal(x[:, :4].flatten(0, 1), plain.x_t)        # the same noising draws
    assert (b.t.view(2, 7)[:, 4:] == 0).all() and (b.t.view(2, 7)[:, :4] > 0).any()
    assert torch.equal(b.camera.view(2, 7, 16)[:, 4:], a_cam)    # each anchor its own camera
    assert torch.equal(b.context.view(2, 7, 1, 32)[:, 6], cond)
    assert torch.equal(b.target, plain.target)                   # the loss sees noisy views only


def test_window_indices_anchors_first_then_cycling_windows():
    assert [window_indices(s, 4, 12, 3, 4) for s in range(3)] == [[0, 1, 2, 3]] * 3
    assert [window_indices(s, 4, 12, 3, 4) for s in range(3, 7)] == [
        [0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11], [0, 1, 2, 3]]
    assert [window_indices(s, 2, 5, 0, 2) for s in range(4)] == [[0, 1], [2, 3], [4], [0, 1]]
    sampler = AnchorViewSampler(AnchorViewSampler.Config(anchor_steps=2, views_per_step=5))
    first, later = sampler.sample(0, None), sampler.sample(3, None)
    assert first.index.tolist() == [0, 1, 2, 3] and later.index.tolist() == [5, 6, 7, 8, 9]
    layout = ViewLayout()
    assert torch.allclose(later.azimuth, torch.deg2rad(torch.tensor(
        layout.dense_azimuth[1:6]))) or torch.allclose(
        later.azimuth, torch.tensor(layout.dense_azimuth[1:6]))


def test_dataset_anchor_group_is_another_group_and_one_group_objects_are_skipped(work, capsys):
    ds = MultiViewDataset(work / "data", image_size=8, anchor_group=True)
    assert "single" not in ds.ids and ds.skipped[0][0] == "single"
    for i in range(len(ds)):
        for seed in range(4):
            torch.manual_seed(seed)
            item = ds[i]
            assert item["anchor_images"].shape == (4, 3, 8, 8)
            assert not torch.allclose(item["anchor_c2w"], item["c2w"])   # never the same group
            anchor = MultiViewDataset.anchor_cameras(item)
            assert anchor.elevation.unique().numel() == 1
            assert float(anchor.elevation[0]) != float(item["elevation"][0])
    plain = MultiViewDataset(work / "data", image_size=8)
    torch.manual_seed(3)
    assert "anchor_images" not in plain[0] and "single" in plain.ids


def test_anchor_mode_puts_k_anchor_views_of_the_other_group_in_the_attention(work,
                                                                             monkeypatch):
    import guidance.multiview.unet as mv_unet

    seen = []
    real = mv_unet.unet_forward

    def spy(net, x, t, context, camera, group):
        seen.append((group, x.detach().clone(), t.clone(), camera.detach().clone()))
        return real(net, x, t, context, camera, group)

    monkeypatch.setattr(mv_unet, "unet_forward", spy)
    cfg = build_config(yaml.safe_load(recipe(work, anchor_views=[2, 4]).read_text()))
    job = DiffusionTrainer(cfg, work / "spy")
    batch = next(iter(job.loader))
    from guidance.training.diffusion import camera_vectors_from_c2w

    anchor_x0 = job.model.encode(batch["anchor_images"].flatten(0, 1)).view(2, 4, 3, 8, 8)
    anchor_cam = camera_vectors_from_c2w(batch["anchor_c2w"].flatten(0, 1).float()).view(2, 4, 16)
    counts = set()
    for s in range(10):
        seen.clear()
        with torch.no_grad():
            _, logs = job.compute_loss(batch, torch.Generator().manual_seed(s))
        group, x, t, cam = seen[0]
        K = int(logs["anchors"])
        counts.add(K)
        assert group == 4 + K and 2 <= K <= 4
        x, t, cam = x.view(2, group, 3, 8, 8), t.view(2, group), cam.view(2, group, 16)
        assert (t[:, 4:] == 0).all()
        for b in range(2):        # each appended view is one of the object's anchor views
            for k in range(4, group):
                assert any(torch.allclose(x[b, k], anchor_x0[b, j])
                           and torch.allclose(cam[b, k], anchor_cam[b, j], atol=1e-5)
                           for j in range(4))
    assert counts == {2, 3, 4}
    cfg = build_config(yaml.safe_load(recipe(work, anchor_dropout=1.0).read_text()))
    job = DiffusionTrainer(cfg, work / "spy-drop")
    seen.clear()
    with torch.no_grad():
        _, logs = job.compute_loss(next(iter(job.loader)), torch.Generator().manual_seed(0))
    assert seen[0][0] == 4 and logs["anchors"] == 0


@pytest.mark.parametrize("extra, message", [
    ({"anchor_views": [3, 2]}, "anchor_views: expected"),
    ({"anchor_views": [1, 5]}, "anchor_views: expected"),
    ({"anchor_dropout": 1.5}, "anchor_dropout: must be in"),
    ({"mode": "image", "anchor_dropout": 0.5}, "anchor_dropout: only mode anchors"),
])
def test_bad_anchor_settings_are_one_line(extra, message):
    data = {"mode": "anchors", "data": {"root": "x"}}
    data.update(extra)
    with pytest.raises(ConfigError, match=message):
        build_config(data)


def test_sampling_with_anchors_feeds_them_clean_and_they_change_the_views(tiny_model,
                                                                          monkeypatch):
    from guidance.multiview.prior import MultiViewPrior

    prior = MultiViewPrior.load(str(tiny_model), device="cpu")
    g = torch.Generator().manual_seed(0)
    # 2 training steps leave diffusers' near-zero attention outputs: make the joint
    # self-attention peaked and its output large, so what the anchors show matters
    for name, p in prior.model.unet.named_parameters():
        if "attn1" in name and ("to_q" in name or "to_k" in name):
            p.data.normal_(0.0, 1.0, generator=g)
        elif "proj_out" in name or "attn1.to_out" in name:
            p.data.normal_(0.0, 0.3, generator=g)
    cond = torch.randn(1, 1, prior.model.unet.config.cross_attention_dim,
                       generator=torch.Generator().manual_seed(1))
    uncond = torch.zeros_like(cond)
    cams = Cameras.from_spherical(20.0, [45.0, 135.0, 225.0, 315.0], 2.0, 40.0,
                                  views_per_object=4)
    a_cams = Cameras.from_spherical(0.0, [0.0, 90.0, 180.0], 2.0, 40.0, views_per_object=3)
    cam16, a_cam16 = prior.camera_vectors(cams), prior.camera_vectors(a_cams)
    red = torch.rand(3, 3, 8, 8, generator=g) * torch.tensor([1.0, 0.2, 0.2])[:, None, None]
    blue = torch.rand(3, 3, 8, 8, generator=g) * torch.tensor([0.2, 0.2, 1.0])[:, None, None]
    calls = []
    real = prior.model.predict_output

    def spy(x, t, context, camera, num_views):
        out = real(x, t, context, camera, num_views)
        calls.append((x.detach().clone(), t.clone(), num_views, out.detach().clone()))
        return out

    monkeypatch.setattr(prior.model, "predict_output", spy)

    def draw(anchors):
        return prior.sample(cond, uncond, cam16, 3, 2.0, 0.0, torch.Generator().manual_seed(0),
                            anchors=anchors)

    with_red = draw((prior.encode(red), a_cam16))
    x, t, group, out_red = calls[0]
    assert group == 7 and x.shape[0] == 14                      # CFG halves of 4 + 3 views
    x, t = x.view(2, 7, 3, 8, 8), t.view(2, 7)
    assert torch.allclose(x[:, 4:], prior.encode(red)[None].expand(2, -1, -1, -1, -1))
    assert (t[:, 4:] == 0).all() and (t[:, :4] > 0).all()
    calls.clear()
    draw((prior.encode(blue), a_cam16))
    out_blue = calls[0][3]
    calls.clear()
    without = draw(None)
    assert calls[0][2] == 4 and without.shape == with_red.shape == (4, 3, 8, 8)
    # the first step's outputs for the noisy views (same noise) depend on the anchors
    noisy = lambda o: o.view(2, 7, 3, 8, 8)[:, :4].flatten(0, 1)   # noqa: E731
    assert (noisy(out_red) - noisy(out_blue)).abs().max() > 1e-3
    assert (noisy(out_red) - calls[0][3]).abs().max() > 1e-3


# -- the guidance ----------------------------------------------------------------------------

def picture():
    rgb = torch.ones(16, 16, 3)
    rgb[4:12, 6:10] = torch.tensor([0.9, 0.2, 0.1])
    mask = torch.zeros(16, 16, 1)
    mask[4:12, 6:10] = 1.0
    return ReferenceImage(rgb, mask, "picture.png")


def guidance_config(model, **extra):
    layout = ViewLayout(dense_elevation=[0.0, 0.0, 20.0], dense_azimuth=[45.0, 135.0, 0.0])
    cfg = dict(model=str(model), dense_model=str(model), views=layout, sample_steps=2,
               candidates=2, anchor_weight=1.0, dense_weight=0.25)
    cfg.update(extra)
    return AnchorViewsL2.Config(**cfg)


def test_guidance_draws_anchors_then_dense_views_and_weights_each_view(tiny_model, capsys):
    import guidance.anchor_views as av

    av._DRAWN.clear()
    cfg = guidance_config(tiny_model)
    guide = AnchorViewsL2(cfg, device="cpu", inputs=RunInputs(image=picture()))
    sampler = AnchorViewSampler(AnchorViewSampler.Config(views=cfg.views, anchor_steps=1,
                                                         views_per_step=3))
    first = sampler.sample(0, None)
    out = {"rgb": torch.rand(4, 8, 8, 3, generator=torch.Generator().manual_seed(0)),
           "opacity": torch.rand(4, 8, 8, 1, generator=torch.Generator().manual_seed(1))}
    losses = guide(dict(out), first, StepInfo("views", 0, 0, 10, 0))
    assert guide.rgb.shape == (7, 8, 8, 3) and guide.mask.shape == (7, 8, 8, 1)
    assert "kept anchor group" in capsys.readouterr().err
    rgb, mask = guide.targets(8)
    assert torch.allclose(losses["rgb"], ((out["rgb"] - rgb[:4]) ** 2).mean())
    # a later window: views 3, 4, 5 = anchor 3 (weight 1) and dense 0, 1 (weight 0.25)
    cams = sampler.sample(2, None)
    assert cams.index.tolist() == [3, 4, 5]
    out3 = {k: v[:3] for k, v in out.items()}
    losses = guide(dict(out3), cams, StepInfo("views", 0, 2, 10, 2))
    err = ((out3["rgb"] - rgb[3:6]) ** 2).flatten(1).mean(1)
    assert torch.allclose(losses["rgb"], (torch.tensor([1.0, 0.25, 0.25]) * err).mean())
    err = ((out3["opacity"] - mask[3:6]) ** 2).flatten(1).mean(1)
    assert torch.allclose(losses["mask"], (torch.tensor([1.0, 0.25, 0.25]) * err).mean())
    # a second guidance with the same settings (a later stage) reuses the drawn views
    again = AnchorViewsL2(guidance_config(tiny_model, dense_weight=1.0), device="cpu",
                          inputs=RunInputs(image=picture()))
    again(dict(out3), cams, StepInfo("refine", 1, 0, 10, 12))
    assert "reused" in capsys.readouterr().err
    assert torch.equal(again.rgb, guide.rgb)


def test_guidance_refuses_cameras_that_are_not_its_views(tiny_model):
    cfg = guidance_config(tiny_model)
    guide = AnchorViewsL2(cfg, device="cpu", inputs=RunInputs(image=picture()))
    out = {"rgb": torch.rand(2, 8, 8, 3), "opacity": torch.rand(2, 8, 8, 1)}
    plain = Cameras.from_spherical(0.0, [0.0, 90.0], 2.75, 40.0, views_per_object=2)
    with pytest.raises(ConfigError, match="anchor-views camera sampler"):
        guide(dict(out), plain, StepInfo("views", 0, 0, 10, 0))
    other = ViewLayout(anchor_azimuth=[10.0, 100.0, 190.0, 280.0])
    wrong = other.cameras()[[0, 1]]
    with pytest.raises(ConfigError, match="not the guidance's views"):
        guide(dict(out), wrong, StepInfo("views", 0, 0, 10, 0))


@pytest.mark.parametrize("make, message", [
    (lambda: ViewLayout(anchor_elevation=[0.0], anchor_azimuth=[0.0]), "at least 2 anchor"),
    (lambda: ViewLayout(dense_elevation=[0.0], dense_azimuth=[0.0, 1.0]), "same length"),
    (lambda: AnchorViewsL2.Config(input_view=4), "input_view: must name an anchor"),
    (lambda: AnchorViewsL2.Config(dense_weight=-1.0), "dense_weight"),
    (lambda: AnchorViewSampler.Config(views_per_step=0), "views_per_step"),
])
def test_bad_guidance_settings_are_one_line(make, message):
    with pytest.raises(ConfigError, match=message):
        make()


def test_recipe_refuses_a_missing_interpolation_model(tmp_path, capsys):
    from engine.run import main as run_main

    code = run_main(["recipe=envision3d-toy", "image=examples/toy/red-mug.png",
                     f"out={tmp_path / 'run'}",
                     f"stages.views.guidance.dense_model={tmp_path / 'nothing'}"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "dense_model" in err[0], err
    assert not (tmp_path / "run" / "checkpoints").exists()


@pytest.mark.slow
def test_envision3d_toy_recipe_runs_end_to_end(tmp_path):
    """The shipped models, shortened stages: anchors + 8 dense views drawn, all 12 fitted,
    a textured GLB written."""
    from engine.run import main as run_main

    if not Path("models/toy/anchors").is_dir():
        pytest.skip("models/toy/anchors is not in this checkout")
    out = tmp_path / "run"
    assert run_main(["recipe=envision3d-toy", "image=examples/toy/red-mug.png", f"out={out}",
                     "stages.views.steps=40", "stages.views.cameras.anchor_steps=10",
                     "stages.views.guidance.sample_steps=10", "stages.views.guidance.candidates=1",
                     "stages.dmtet.steps=10", "stages.refine.steps=6",
                     "export.turntable.frames=4", "system.threads=1"]) == 0
    assert (out / "export" / "mesh.glb").stat().st_size > 1000
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert any(r.get("stage") == "refine" for r in rows)


def test_interpolation_bench_scores_every_row_and_is_exact_on_the_truth(work, tiny_model,
                                                                        capsys):
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
    import bench_anchor_views as bench

    truth = torch.rand(2, 8, 8, 3, generator=torch.Generator().manual_seed(0))
    mask = (torch.rand(2, 8, 8, 1, generator=torch.Generator().manual_seed(1)) > 0.5).float()
    same = bench.view_scores(truth, mask, truth, mask)
    assert same["iou"] == 1.0 and same["ssim"] > 0.999 and same["psnr"] == float("inf")
    empty = bench.view_scores(truth, torch.zeros_like(mask), truth, mask)
    assert empty["iou"] == 0.0
    out = work / "bench"
    assert bench.main([f"model={tiny_model}", f"baseline={tiny_model}",
                       f"data={work / 'data'}", "split=train", "limit=2", "steps=2",
                       f"out={out}"]) == 0
    scores = json.loads((out / "scores.json").read_text())
    assert set(scores["mean"]) == set(bench.ROWS) and len(scores["objects"]) == 2
    assert (out / "contact-sheet.png").is_file()
    assert "| truth anchors |" in capsys.readouterr().out
    assert bench.main(["data=/nonexistent"]) == 2
