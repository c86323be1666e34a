"""python -m guidance.training: every mode on a tiny dataset with tiny models.

One module-scoped text run (through the command line) feeds the image stage, which feeds the
ema stage, as in the toy recipes; the maths of a step are checked on hand-built tensors.
"""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from engine.cameras import Cameras
from engine.errors import ConfigError
from engine.datasets.mvdataset import write_index, write_object
from guidance.multiview.model import MultiViewDiffusionModel
from guidance.multiview.openclip import build_openclip, save_openclip_folder, tiny_openclip_config
from guidance.multiview.unet import unet_forward
from guidance.training.average import WeightAverage
from guidance.training.clip import ClipTrainer
from guidance.training.command import main
from guidance.training.config import build_config
from guidance.training.data import StepBatchSampler
from guidance.training.diffusion import DiffusionTrainer, build_diffusion_model
from guidance.training.loop import lr_at
from guidance.training.losses import (clip_loss, diffusion_loss, foreground_pixel_weights,
                                      make_diffusion_batch, snr_loss_weights)

COLOURS = {"red": (220, 40, 30), "green": (40, 200, 60), "blue": (40, 60, 220),
           "yellow": (230, 210, 40)}
SIZE = 16         # the files; the loader resizes them to the model's 8 px
TINY_UNET = dict(sample_size=8, block_out_channels=[16, 32], layers_per_block=1,
                 attention_head_dim=[1, 2], norm_num_groups=8)


def block_view(colour, azimuth):
    """A coloured bar whose position follows the camera azimuth (views of one object differ)."""
    a = np.zeros((SIZE, SIZE, 4), np.uint8)
    c = int((np.cos(np.deg2rad(azimuth)) * 0.3 + 0.5) * SIZE)
    a[SIZE // 4: 3 * SIZE // 4, max(c - 3, 0):c + 3] = (*colour, 255)
    return a


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """These models are tiny: one thread beats contending for the shared cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """A 4-object dataset (one 4-view group + one reference each) and a tiny CLIP folder."""
    root = tmp_path_factory.mktemp("finetune")
    ids = []
    for i, (name, colour) in enumerate(COLOURS.items()):
        views = [(block_view(colour, 30.0 * i + 90.0 * k),
                  Cameras.from_spherical(10.0, 30.0 * i + 90.0 * k, 2.0, 40.0)) for k in range(4)]
        ref_az = 30.0 * i + 45.0
        views.append((block_view(colour, ref_az), Cameras.from_spherical(20.0, ref_az, 2.0, 40.0)))
        ids.append(f"obj_{i}")
        write_object(root / "data", ids[-1], views, groups=[[0, 1, 2, 3]], references=[4],
                     caption=f"a {name} block")
    write_index(root / "data", ids, {"train": ids}, image_size=SIZE)
    save_openclip_folder(build_openclip(tiny_openclip_config(), seed=0), tiny_openclip_config(),
                         root / "clip")
    return root


def recipe(work, mode, **extra):
    data = {"mode": mode, "data": {"root": str(work / "data")}, "device": "cpu",
            "steps": 4, "batch_size": 2, "lr": 1e-3, "log_every": 1, "sample_steps": 2,
            "sample_objects": 1, "checkpoint_every": 2, "cfg_dropout": 0.0}
    model = extra.pop("model", {})
    data["model"] = model
    data.update(extra)
    path = work / f"{mode}-{len(list(work.glob('*.yaml')))}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def text_model_spec(work):
    return {"init": "random", "space": "pixel", "unet": TINY_UNET,
            "conditioner": {"model": str(work / "clip")}}


@pytest.fixture(scope="module")
def text_run(work):
    """4 text-mode steps through the command line, checkpoints at 2 and 4."""
    out = work / "text-run"
    assert main([f"recipe={recipe(work, 'text', model=text_model_spec(work))}",
                 f"out={out}", "sample_every=2"]) == 0
    return out


def one_line_error(capsys, *argv):
    """Run the command line expecting a user error: exit 2, one line on stderr, returned."""
    assert main(list(argv)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


def fit_fixed_batch(job, steps):
    """Adam on one batch with the same draws every step; returns the losses."""
    batch = next(iter(job.loader))
    losses = []
    for _ in range(steps):
        loss, _ = job.compute_loss(batch, torch.Generator().manual_seed(0))
        job.accelerator.backward(loss)
        job.optimizer.step()
        job.optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
    return losses


# -- command line and config ------------------------------------------------------------------

def test_bad_key_is_one_line_exit_2(work, capsys):
    path = recipe(work, "text", model=text_model_spec(work))
    assert main([f"recipe={path}", "stepz=3"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "stepz" in err[0] and "did you mean 'steps'" in err[0]
    assert main([f"recipe={path}", "mode=txt"]) == 2
    assert "did you mean 'text'" in capsys.readouterr().err
    assert main(["recipe=no-such-recipe"]) == 2
    assert "no fine-tuning recipe named 'no-such-recipe'" in capsys.readouterr().err
    assert main([f"recipe={path}", "model.unet.block_out_chanels=[8]"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "model.unet.block_out_chanels" in err[0]


def test_recipes_in_tree_validate():
    root = Path(__file__).resolve().parent.parent / "recipes" / "finetune"
    names = sorted(p.stem for p in root.glob("*.yaml"))
    assert {"toy-clip", "toy-text", "toy-image", "toy-ema"} <= set(names)
    for name in names:
        cfg = build_config(yaml.safe_load((root / f"{name}.yaml").read_text()), recipe=name)
        assert cfg.mode in name or (cfg.mode, name) == ("points", "toy-pointe") or \
            (cfg.mode == "triplane-diffusion" and "compress3d" in name)


def test_lr_warmup_and_sampler_are_step_functions():
    assert lr_at(0, 1.0, 4) == 0.25 and lr_at(3, 1.0, 4) == 1.0 and lr_at(9, 1.0, 0) == 1.0
    # cosine: full lr right after the warm-up, half way down at the middle, 0 at the end
    assert lr_at(0, 2.0, 2, "cosine", 12) == 1.0 and lr_at(2, 2.0, 2, "cosine", 12) == 2.0
    assert lr_at(7, 2.0, 2, "cosine", 12) == pytest.approx(1.0)
    assert lr_at(12, 2.0, 2, "cosine", 12) == pytest.approx(0.0, abs=1e-12)
    assert lr_at(5, 2.0, 0, "cosine", 10) == pytest.approx(1.0)
    full = list(StepBatchSampler(5, 2, seed=3, start=0, steps=6, num_processes=2))
    tail = list(StepBatchSampler(5, 2, seed=3, start=4, steps=6, num_processes=2))
    assert len(full) == 12 and full[8:] == tail
    # each epoch visits every object once: positions 0..4 and 5..9 of the stream
    stream = [i for b in full for _, i in b]
    assert sorted(stream[:5]) == list(range(5)) and sorted(stream[5:10]) == list(range(5))


def test_weight_average_follows_its_formula():
    live = torch.nn.BatchNorm1d(2)
    with torch.no_grad():
        live.weight.copy_(torch.tensor([1.0, 2.0]))
    avg = WeightAverage(live, decay=0.5)
    assert avg.module.weight.requires_grad is False
    assert torch.equal(avg.module.weight, live.weight)           # starts as a copy
    with torch.no_grad():
        live.weight.copy_(torch.tensor([11.0, 12.0]))
    live.num_batches_tracked += 7
    avg.update(live)            # first update: d = min(0.5, 1/10) = 0.1
    assert torch.allclose(avg.module.weight, torch.tensor([10.0, 11.0]))
    assert int(avg.module.num_batches_tracked) == 7               # integers are copied
    with torch.no_grad():
        live.weight.copy_(torch.tensor([20.0, 21.0]))
    avg.update(live)            # d = min(0.5, 2/11) = 2/11
    assert torch.allclose(avg.module.weight, torch.tensor([10.0, 11.0]) * 2 / 11
                          + torch.tensor([20.0, 21.0]) * 9 / 11)
    for _ in range(100):
        avg.update(live)        # d capped at 0.5: converges on the live weights
    assert torch.allclose(avg.module.weight, live.weight, atol=1e-6)
    assert avg.updates == 102
    # a bad value is a config error
    with pytest.raises(ConfigError, match="average_decay"):
        build_config({"mode": "text", "data": {"root": "x"}, "average_decay": 1.0})
    with pytest.raises(ConfigError, match="lr_schedule: 'cosin'.*cosine"):
        build_config({"mode": "text", "data": {"root": "x"}, "lr_schedule": "cosin"})


# -- the maths of one step ------------------------------------------------------------------

def test_noising_dropout_and_shared_timestep():
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(3, 4, 3, 8, 8, generator=g)
    cond, uncond = torch.randn(3, 1, 32, generator=g), torch.zeros(1, 1, 32)
    cams = torch.randn(3, 4, 16, generator=g)
    ac = torch.linspace(0.99, 0.01, 1000)
    b = make_diffusion_batch(x0, cond, uncond, cams, ac, torch.Generator().manual_seed(1), 1.0)
    assert b.group == 4 and b.dropped.all()
    assert torch.equal(b.context, torch.zeros(12, 1, 32))          # cfg_dropout=1: zero context
    t = b.t.view(3, 4)
    assert (t == t[:, :1]).all()                                    # one t per object
    a = ac[b.t].view(-1, 1, 1, 1)
    assert torch.allclose(b.x_t, a.sqrt() * x0.flatten(0, 1) + (1 - a).sqrt() * b.noise,
                          atol=1e-6)
    keep = make_diffusion_batch(x0, cond, uncond, cams, ac, torch.Generator().manual_seed(1), 0.0)
    assert not keep.dropped.any()
    assert torch.equal(keep.context, cond.repeat_interleave(4, 0))
    assert torch.equal(keep.x_t, b.x_t) and torch.equal(keep.noise, b.noise)


def test_ema_reference_joins_attention_but_not_the_loss():
    from guidance.multiview.unet import MultiViewUNetConfig

    unet_cfg = MultiViewUNetConfig(in_channels=3, out_channels=3, cross_attention_dim=32,
                                   **TINY_UNET)
    model = MultiViewDiffusionModel.build_random(unet_cfg, "pixel", seed=0)
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(2, 4, 3, 8, 8, generator=g)
    ref_x0, ref_cam = torch.randn(2, 3, 8, 8, generator=g), torch.randn(2, 16, generator=g)
    cond, cams = torch.randn(2, 1, 32, generator=g), torch.randn(2, 4, 16, generator=g)
    args = (x0, cond, torch.zeros(1, 1, 32), cams, model.alphas_cumprod)
    ema = make_diffusion_batch(*args, torch.Generator().manual_seed(2), 0.0, (ref_x0, ref_cam))
    plain = make_diffusion_batch(*args, torch.Generator().manual_seed(2), 0.0)
    assert ema.group == 5 and ema.num_views == 4
    x = ema.x_t.view(2, 5, 3, 8, 8)
    assert torch.equal(x[:, 4], ref_x0)                              # last, never noised
    assert torch.equal(x[:, :4].flatten(0, 1), plain.x_t)
    assert (ema.t.view(2, 5)[:, 4] == 0).all()                       # timestep 0
    assert torch.equal(ema.camera.view(2, 5, 16)[:, 4], ref_cam)
    assert torch.equal(ema.context.view(2, 5, 1, 32)[:, 4], cond)
    with torch.no_grad():
        eps = unet_forward(model.unet, ema.x_t, ema.t, ema.context, ema.camera, 5)
        eps_plain = unet_forward(model.unet, plain.x_t, plain.t, plain.context, plain.camera, 4)
    noisy = eps.view(2, 5, 3, 8, 8)[:, :4].flatten(0, 1)
    assert (noisy - eps_plain).abs().max() > 1e-4                    # the reference is attended
    # the loss is the mean over the V noisy views only, whatever the reference's output is
    loss = diffusion_loss(eps, ema.noise, 4, 5)
    assert torch.allclose(loss, ((noisy - ema.noise) ** 2).mean())
    moved = eps.clone().view(2, 5, 3, 8, 8)
    moved[:, 4] += 100.0
    assert torch.equal(diffusion_loss(moved.flatten(0, 1), ema.noise, 4, 5), loss)
    eps_req = eps.clone().requires_grad_(True)
    diffusion_loss(eps_req, ema.noise, 4, 5).backward()
    assert eps_req.grad.view(2, 5, -1)[:, 4].abs().max() == 0


def test_clip_loss_multi_positive():
    feats = torch.nn.functional.normalize(torch.tensor([[1.0, 0.0], [0.0, 1.0]]), dim=1)
    labels = torch.tensor([0, 0, 1])
    images = feats[labels]
    loss, acc = clip_loss(images, feats, torch.tensor(100.0), labels)
    assert acc == 1.0
    # text -> image target is uniform over the two images of caption 0: log(2) at best
    loss_t2i = 0.5 * torch.log(torch.tensor(2.0)) / 2
    assert torch.allclose(loss, loss_t2i, atol=1e-3)


# -- whole runs --------------------------------------------------------------------------------

def test_text_run_outputs_and_resume_is_exact(work, text_run):
    lines = [json.loads(x) for x in (text_run / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == [1, 2, 3, 4]
    assert all(np.isfinite(x["loss"]) for x in lines)
    assert (text_run / "samples" / "step-0000002.png").is_file()
    assert (text_run / "samples" / "step-0000004.png").is_file()
    model = MultiViewDiffusionModel.from_pretrained(text_run / "model")
    assert model.info.conditioning == "text" and model.info.num_views == 4
    # resume from the step-2 checkpoint in a copy of the run: same final weights, bit for bit
    copy = work / "text-resumed"
    copy.mkdir()
    shutil.copy(text_run / "config.yaml", copy / "config.yaml")
    (copy / "checkpoints").mkdir()
    shutil.copy(text_run / "checkpoints" / "00-text-0000002.safetensors", copy / "checkpoints")
    shutil.copy(text_run / "metrics.jsonl", copy / "metrics.jsonl")
    assert main([f"resume={copy}"]) == 0
    resumed = MultiViewDiffusionModel.from_pretrained(copy / "model")
    a, b = model.unet.state_dict(), resumed.unet.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    again = [json.loads(x) for x in (copy / "metrics.jsonl").read_text().splitlines()]
    assert [x["loss"] for x in again] == [x["loss"] for x in lines]


def test_resumed_run_logs_the_whole_training_time(work, text_run):
    """elapsed_s counts the time before the resume too (toy_models' manifest reports it)."""
    from safetensors.torch import save_file

    from engine import checkpoint

    copy = work / "text-resumed-clock"
    copy.mkdir()
    shutil.copy(text_run / "config.yaml", copy / "config.yaml")
    (copy / "checkpoints").mkdir()
    ckpt = copy / "checkpoints" / "00-text-0000002.safetensors"
    tensors, meta = checkpoint.load(text_run / "checkpoints" / ckpt.name)
    assert meta["info"]["elapsed_s"] > 0
    meta["info"]["elapsed_s"] = 1000.0          # as if the first two steps took 1000 s
    save_file(tensors, str(ckpt), metadata={checkpoint.META_KEY: json.dumps(meta)})
    assert main([f"resume={copy}"]) == 0
    after = [json.loads(x) for x in (copy / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in after] == [3, 4]
    assert all(1000.0 < x["elapsed_s"] < 1000.0 + 600 for x in after)


def test_weight_average_is_what_is_saved_and_resumes_exactly(work, text_run):
    from engine import checkpoint

    out = work / "averaged"
    args = [f"recipe={recipe(work, 'text', model={'init': str(text_run / 'model')})}",
            "average_decay=0.6", "lr_schedule=cosine", "sample_every=-1"]
    assert main(args + [f"out={out}"]) == 0
    tensors, meta = checkpoint.load(out / "checkpoints" / "00-text-0000004.safetensors")
    assert meta["info"]["average_updates"] == 4
    saved = MultiViewDiffusionModel.from_pretrained(out / "model").unet.state_dict()
    start = MultiViewDiffusionModel.from_pretrained(text_run / "model").unet.state_dict()
    moved = [k for k in saved if not torch.equal(tensors["unet." + k], start[k])]
    assert moved
    # the saved model is the average, which lies strictly between the start and the live end
    assert all(torch.equal(saved[k], tensors["average." + k]) for k in saved)
    assert any(not torch.equal(saved[k], tensors["unet." + k]) for k in moved)
    assert any(not torch.equal(saved[k], start[k]) for k in moved)
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert lines[-1]["lr"] < lines[0]["lr"]                               # cosine
    # resume from step 2: the same average, bit for bit
    copy = work / "averaged-resumed"
    (copy / "checkpoints").mkdir(parents=True)
    shutil.copy(out / "config.yaml", copy / "config.yaml")
    shutil.copy(out / "checkpoints" / "00-text-0000002.safetensors", copy / "checkpoints")
    assert main([f"resume={copy}"]) == 0
    again = MultiViewDiffusionModel.from_pretrained(copy / "model").unet.state_dict()
    assert all(torch.equal(saved[k], again[k]) for k in saved)


def test_text_loss_decreases_on_a_fixed_batch(work, text_run):
    cfg = build_config(yaml.safe_load(recipe(work, "text", model={"init": str(text_run / "model")},
                                             lr=3e-3).read_text()), recipe="t")
    job = DiffusionTrainer(cfg, work / "fixed-text")
    losses = fit_fixed_batch(job, 15)
    assert all(np.isfinite(losses)) and min(losses[-3:]) < 0.5 * losses[0]


def test_image_stage_from_text_model(work, text_run):
    spec = {"init": str(text_run / "model"), "conditioner": {"model": str(work / "clip")}}
    cfg = build_config(yaml.safe_load(recipe(work, "image", model=spec, lr=3e-3).read_text()),
                       recipe="i")
    job = DiffusionTrainer(cfg, work / "image-run")
    assert job.model.info.conditioning == "image"
    assert job.model.unconditional_context(1).abs().max() == 0
    losses = fit_fixed_batch(job, 15)
    assert all(np.isfinite(losses)) and min(losses[-3:]) < 0.5 * losses[0]
    folder = job.save_model(15)
    back = MultiViewDiffusionModel.from_pretrained(folder)
    assert back.info.conditioning == "image"
    g = torch.Generator().manual_seed(3)
    x, t = torch.randn(4, 3, 8, 8, generator=g), torch.randint(0, 1000, (4,), generator=g)
    ref = torch.rand(1, 3, SIZE, SIZE, generator=g)
    cams = torch.randn(4, 16, generator=g)
    with torch.no_grad():
        ctx = job.model.embed_image(ref).expand(4, -1, -1)
        assert torch.equal(back.embed_image(ref).expand(4, -1, -1), ctx)
        assert torch.equal(back.predict_noise(x, t, ctx, cams, 4),
                           job.model.predict_noise(x, t, ctx, cams, 4))


def test_image_stage_refuses_mismatched_embedding(work, text_run):
    other = dict(tiny_openclip_config(), embed_dim=16)
    save_openclip_folder(build_openclip(other, seed=0), other, work / "clip16")
    spec = {"init": str(text_run / "model"), "conditioner": {"model": str(work / "clip16")}}
    cfg = build_config(yaml.safe_load(recipe(work, "image", model=spec).read_text()))
    with pytest.raises(ConfigError, match="16 dims .* cross-attends to 32"):
        build_diffusion_model(cfg)
    bare = {"init": str(text_run / "model")}          # a text model has no image tower
    with pytest.raises(ConfigError, match="text conditioner"):
        build_diffusion_model(build_config(yaml.safe_load(
            recipe(work, "image", model=bare).read_text())))


def test_image_stage_with_patch_tokens_keeps_them_through_ema(work, text_run, capsys):
    spec = {"init": str(text_run / "model"),
            "conditioner": {"model": str(work / "clip"), "tokens": "patches"}}
    cfg = build_config(yaml.safe_load(recipe(work, "image", model=spec, lr=3e-3).read_text()))
    job = DiffusionTrainer(cfg, work / "patch-run")
    ref = torch.rand(1, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ctx = job.model.embed_image(ref)
    assert ctx.shape == (1, 17, 32)                  # pooled + 16 patches of the tiny ViT
    assert torch.equal(job.model.unconditional_context(2), torch.zeros(2, 17, 32))
    losses = fit_fixed_batch(job, 15)
    assert all(np.isfinite(losses)) and min(losses[-3:]) < 0.5 * losses[0]
    folder = job.save_model(15)
    back = MultiViewDiffusionModel.from_pretrained(folder)
    with torch.no_grad():
        assert torch.equal(back.embed_image(ref), job.model.embed_image(ref))
    # stage 2 from it keeps its own conditioner, patch tokens and all
    ema = {"init": str(folder)}
    assert main([f"recipe={recipe(work, 'ema', model=ema)}", f"out={work / 'patch-ema'}",
                 "steps=2"]) == 0
    model = MultiViewDiffusionModel.from_pretrained(work / "patch-ema" / "model")
    assert model.unconditional_context(1).shape == (1, 17, 32)
    # asking it for another layout than it learnt, or patch tokens of a text model: one line
    pooled = {"init": str(folder), "conditioner": {"model": str(work / "clip")}}
    err = one_line_error(capsys, f"recipe={recipe(work, 'ema', model=pooled)}",
                         f"out={work / 'patch-mismatch'}")
    assert "learnt with tokens patches, this run asks for pooled" in err
    text = dict(text_model_spec(work), conditioner={"model": str(work / "clip"),
                                                    "tokens": "patches"})
    err = one_line_error(capsys, f"recipe={recipe(work, 'text', model=text)}",
                         f"out={work / 'patch-text'}")
    assert "model.conditioner.tokens: only image conditioning has patch tokens" in err
    err = one_line_error(capsys, f"recipe={recipe(work, 'image', model=spec)}",
                         "model.conditioner.tokens=grid", f"out={work / 'patch-bad'}")
    assert "model.conditioner.tokens: must be one of pooled, patches, got 'grid'" in err


def test_ema_stage_runs_and_saves_a_plain_model(work, text_run):
    spec = {"init": str(text_run / "model"), "conditioner": {"model": str(work / "clip")}}
    assert main([f"recipe={recipe(work, 'ema', model=spec, cfg_dropout=0.5)}",
                 f"out={work / 'ema-run'}", "steps=3"]) == 0
    lines = [json.loads(x) for x in (work / "ema-run" / "metrics.jsonl").read_text().splitlines()]
    assert len(lines) == 3 and all(np.isfinite(x["loss"]) for x in lines)
    model = MultiViewDiffusionModel.from_pretrained(work / "ema-run" / "model")
    text = MultiViewDiffusionModel.from_pretrained(text_run / "model", load_conditioner=False)
    assert model.info.conditioning == "image" and model.info.num_views == 4
    a, b = model.unet.state_dict(), text.unet.state_dict()
    assert set(a) == set(b) and all(a[k].shape == b[k].shape for k in a)  # no new weights
    assert any(not torch.equal(a[k], b[k]) for k in a)                  # and it learned
    assert (work / "ema-run" / "samples" / "step-0000003.png").is_file()


def test_reference_dropout_trains_some_steps_as_inference_runs(work, text_run, monkeypatch):
    import guidance.multiview.unet as mv_unet

    groups = []
    real = mv_unet.unet_forward

    def spy(net, x, t, context, camera, group):
        groups.append(group)
        return real(net, x, t, context, camera, group)

    monkeypatch.setattr(mv_unet, "unet_forward", spy)
    spec = {"init": str(text_run / "model"), "conditioner": {"model": str(work / "clip")}}
    seen = {}
    for p in (0.0, 1.0, 0.5):
        cfg = build_config(yaml.safe_load(recipe(work, "ema", model=spec,
                                                 reference_dropout=p).read_text()))
        job = DiffusionTrainer(cfg, work / f"refdrop-{p}")
        batch = next(iter(job.loader))
        groups.clear()
        with torch.no_grad():
            logs = [job.compute_loss(batch, torch.Generator().manual_seed(s))[1]
                    for s in range(12)]
        seen[p] = list(groups)
        # the 5-view group (4 noisy + the clean reference) exactly when the log says so
        assert [5 if x["with_reference"] else 4 for x in logs] == groups
    assert set(seen[0.0]) == {5} and set(seen[1.0]) == {4} and set(seen[0.5]) == {4, 5}
    with pytest.raises(ConfigError, match="reference_dropout: only mode ema"):
        build_config({"mode": "image", "data": {"root": "x"}, "reference_dropout": 0.5})


def test_clip_mode_learns_and_saves_openclip_folder(work):
    from guidance.conditioners import conditioner_for

    OpenCLIPImageConditioner, OpenCLIPTextConditioner = map(conditioner_for, ("image", "text"))

    cfg = build_config(yaml.safe_load(recipe(work, "clip", batch_size=4, lr=2e-3).read_text()))
    job = ClipTrainer(cfg, work / "clip-run")
    losses = fit_fixed_batch(job, 20)
    assert all(np.isfinite(losses)) and losses[-1] < 0.5 * losses[0]
    folder = job.save_model(20)
    assert (folder / "open_clip_config.json").is_file()
    image = OpenCLIPImageConditioner(OpenCLIPImageConditioner.Config(model=str(folder)))
    text = OpenCLIPTextConditioner(OpenCLIPTextConditioner.Config(model=str(folder)))
    rgb = torch.rand(2, 3, SIZE, SIZE)
    with torch.no_grad():
        from guidance.multiview.openclip import clip_preprocess

        expected = job.clip.visual(clip_preprocess(rgb, 32))
        assert torch.allclose(image(rgb)[:, 0], expected, atol=1e-6)
    assert text(["a red block"]).shape == (1, 77, 32)


def test_v_prediction_targets_v_and_learns(work):
    """model.prediction_type=v_prediction: the batch's target is v, the loss falls on a fixed
    batch, and the saved model says v (so predict_noise converts for SDS and sampling)."""
    from guidance.multiview.model import v_target

    spec = dict(text_model_spec(work), prediction_type="v_prediction")
    cfg = build_config(yaml.safe_load(recipe(work, "text", model=spec, lr=3e-3).read_text()),
                       recipe="v")
    job = DiffusionTrainer(cfg, work / "v-text")
    assert job.model.info.prediction_type == "v_prediction"
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(2, 4, 3, 8, 8)
    db = make_diffusion_batch(x0, torch.zeros(2, 1, 64), torch.zeros(1, 1, 64),
                              torch.zeros(2, 4, 16), job.model.alphas_cumprod, g, 0.0,
                              prediction_type="v_prediction")
    t = db.t
    assert torch.allclose(db.target, v_target(x0.flatten(0, 1), db.noise, t,
                                              job.model.alphas_cumprod), atol=1e-6)
    losses = fit_fixed_batch(job, 15)
    assert all(np.isfinite(losses)) and min(losses[-3:]) < 0.5 * losses[0]
    job.save_model(15)
    saved = MultiViewDiffusionModel.from_pretrained(work / "v-text" / "model")
    assert saved.info.prediction_type == "v_prediction"


def test_zero_terminal_snr_text_model_learns_the_image_from_pure_noise(work, capsys):
    """model.noise_schedule=zero-terminal-snr: at t = 999 the noisy views hold no image and
    the v target is -x0 (the model must make the image from the context alone); the loss
    falls on a fixed batch and the saved model carries the schedule. Misspelt or paired with
    epsilon, the recipe is refused in one line."""
    from guidance.multiview.model import add_noise, v_target

    spec = dict(text_model_spec(work), prediction_type="v_prediction",
                noise_schedule="zero-terminal-snr")
    cfg = build_config(yaml.safe_load(recipe(work, "text", model=spec, lr=3e-3).read_text()),
                       recipe="zsnr")
    job = DiffusionTrainer(cfg, work / "zsnr-text")
    ac = job.model.alphas_cumprod
    assert float(ac[999]) < 1e-6
    x0 = torch.randn(2, 4, 3, 8, 8)
    db = make_diffusion_batch(x0, torch.zeros(2, 1, 64), torch.zeros(1, 1, 64),
                              torch.zeros(2, 4, 16), ac, torch.Generator().manual_seed(0), 0.0,
                              prediction_type="v_prediction")
    last = torch.full((8,), 999)
    assert torch.allclose(add_noise(x0.flatten(0, 1), db.noise, last, ac), db.noise, atol=1e-3)
    assert torch.allclose(v_target(x0.flatten(0, 1), db.noise, last, ac), -x0.flatten(0, 1),
                          atol=1e-3)
    losses = fit_fixed_batch(job, 15)
    assert all(np.isfinite(losses)) and min(losses[-3:]) < 0.5 * losses[0]
    job.save_model(15)
    saved = MultiViewDiffusionModel.from_pretrained(work / "zsnr-text" / "model")
    assert saved.scheduler_config.get("rescale_betas_zero_snr") is True
    assert torch.equal(saved.alphas_cumprod, ac)

    path = recipe(work, "text", model=text_model_spec(work))
    assert main([f"recipe={path}", "model.noise_schedule=zero-terminal-snr"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "needs prediction_type: v_prediction" in err[0]
    assert main([f"recipe={path}", "model.prediction_type=v_prediction",
                 "model.noise_schedule=zero-terminal-snrr"]) == 2
    assert "did you mean 'zero-terminal-snr'" in capsys.readouterr().err


def test_min_snr_weights_follow_the_formula_on_a_hand_built_schedule():
    """alpha_bar 0.5 / 0.9 / 0.99 have SNR 1 / 9 / 99; with gamma 5 the x0-weights are
    1 / 5 / 5, which an epsilon loss carries as min(SNR, 5) / SNR and a v loss as
    min(SNR, 5) / (SNR + 1)."""
    ac = torch.tensor([0.5, 0.9, 0.99])
    t = torch.tensor([0, 1, 2, 1])
    eps = snr_loss_weights(t, ac, "epsilon", "min-snr", 5.0)
    v = snr_loss_weights(t, ac, "v_prediction", "min-snr", 5.0)
    assert torch.allclose(eps, torch.tensor([1.0, 5 / 9, 5 / 99, 5 / 9]))
    assert torch.allclose(v, torch.tensor([0.5, 0.5, 5 / 100, 0.5]))
    assert torch.equal(snr_loss_weights(t, ac, "epsilon", "uniform"), torch.ones(4))
    # a zero-terminal-SNR last step: epsilon keeps weight 1, v (whose target is -x0) ~0
    end = torch.tensor([2.0 ** -24])
    assert snr_loss_weights(torch.tensor([0]), end, "epsilon").item() == pytest.approx(1.0)
    assert snr_loss_weights(torch.tensor([0]), end, "v_prediction").item() < 1e-6
    exact_zero = snr_loss_weights(torch.tensor([0]), torch.tensor([0.0]), "epsilon")
    assert exact_zero.item() == 1.0


def test_weighted_diffusion_loss_scales_each_view_and_skips_the_reference():
    g = torch.Generator().manual_seed(0)
    out = torch.randn(2 * 5, 3, 4, 4, generator=g)          # 2 objects x (4 views + reference)
    target = torch.randn(2 * 4, 3, 4, 4, generator=g)
    plain = diffusion_loss(out, target, 4, 5)
    assert torch.allclose(diffusion_loss(out, target, 4, 5, torch.ones(8)), plain)
    per_view = ((out.view(2, 5, 3, 4, 4)[:, :4] - target.view(2, 4, 3, 4, 4)) ** 2
                ).flatten(2).mean(2).flatten()
    w = torch.tensor([2.0, 0.0, 1.0, 0.5, 0.0, 0.0, 3.0, 1.0])
    assert torch.allclose(diffusion_loss(out, target, 4, 5, w), (per_view * w).mean())
    moved = out.clone().view(2, 5, 3, 4, 4)
    moved[:, 4] += 100.0                                     # the reference is not in the loss
    assert torch.equal(diffusion_loss(moved.flatten(0, 1), target, 4, 5, w),
                       diffusion_loss(out, target, 4, 5, w))


def test_min_snr_training_learns_and_bad_settings_are_one_line(work, capsys, monkeypatch):
    spec = dict(text_model_spec(work), prediction_type="v_prediction")
    cfg = build_config(yaml.safe_load(recipe(work, "text", model=spec, lr=3e-3,
                                             loss_weighting="min-snr").read_text()), recipe="ms")
    job = DiffusionTrainer(cfg, work / "min-snr-text")
    seen = []
    real = snr_loss_weights
    monkeypatch.setattr("guidance.training.diffusion.snr_loss_weights",
                        lambda *a, **k: seen.append(a) or real(*a, **k))
    losses = fit_fixed_batch(job, 15)
    assert all(np.isfinite(losses)) and min(losses[-3:]) < 0.5 * losses[0]
    t, _, prediction, weighting, gamma = seen[0]
    assert t.shape == (8,) and prediction == "v_prediction"      # 2 objects x 4 views
    assert (weighting, gamma) == ("min-snr", 5.0)
    path = recipe(work, "text", model=text_model_spec(work))
    assert "did you mean 'min-snr'" in one_line_error(capsys, f"recipe={path}",
                                                      "loss_weighting=min_snr")
    assert "min_snr_gamma: must be > 0" in one_line_error(capsys, f"recipe={path}",
                                                          "min_snr_gamma=0")
    assert "mode clip has no diffusion loss" in one_line_error(
        capsys, f"recipe={recipe(work, 'clip')}", "loss_weighting=min-snr")


def test_foreground_pixel_weights_on_a_hand_built_mask():
    """A 4x4 view whose object covers its top-left quadrant, weight 3: 4 on the object, 1 (the
    plain MSE's) on the background; an empty view weighs 1 everywhere, a full one 4; at 2x2
    each pixel takes its quadrant's mean alpha."""
    m = torch.zeros(3, 1, 4, 4)
    m[0, 0, :2, :2] = 1.0                       # the top-left quadrant
    m[2] = 1.0                                  # the object fills the view
    w = foreground_pixel_weights(m, (4, 4), 3.0)
    expected = torch.ones(4, 4)
    expected[:2, :2] = 4.0
    assert torch.equal(w[0, 0], expected)
    assert torch.equal(w[1], torch.ones(1, 4, 4)) and torch.equal(w[2], torch.full((1, 4, 4), 4.0))
    half = torch.zeros(1, 1, 4, 4)
    half[0, 0, :2, :1] = 1.0                    # half of the top-left quadrant
    small = foreground_pixel_weights(half, (2, 2), 2.0)
    assert torch.allclose(small[0, 0], torch.tensor([[2.0, 1.0], [1.0, 1.0]]))


def test_foreground_weighted_loss_costs_object_errors_more_and_skips_the_reference():
    target = torch.zeros(2 * 4, 3, 4, 4)
    out = torch.zeros(2 * 5, 3, 4, 4)                        # 2 objects x (4 views + reference)
    masks = torch.zeros(8, 1, 4, 4)
    masks[:, :, :2, :2] = 1.0
    pw = foreground_pixel_weights(masks, (4, 4), 3.0)
    on_object, off_object = out.clone().view(2, 5, 3, 4, 4), out.clone().view(2, 5, 3, 4, 4)
    on_object[:, :4, :, 0, 0] = 1.0                          # the same error, on the object
    off_object[:, :4, :, 3, 3] = 1.0                         # and on the background
    fg = diffusion_loss(on_object.flatten(0, 1), target, 4, 5, pixel_weights=pw)
    bg = diffusion_loss(off_object.flatten(0, 1), target, 4, 5, pixel_weights=pw)
    plain = diffusion_loss(on_object.flatten(0, 1), target, 4, 5)
    assert fg.item() == pytest.approx(plain.item() * 4)
    assert bg.item() == pytest.approx(plain.item())
    ones = torch.ones(8, 1, 4, 4)
    assert torch.allclose(diffusion_loss(on_object.flatten(0, 1), target, 4, 5,
                                         pixel_weights=ones), plain)
    # with per-view weights too: view k of each object weighs w[k] times its weighted error
    w = torch.tensor([2.0, 0.0, 1.0, 0.5, 0.0, 0.0, 3.0, 1.0])
    both = diffusion_loss(on_object.flatten(0, 1), target, 4, 5, w, pw)
    per_view = torch.full((8,), 1 / 16 * 4)                  # 1 of 16 pixels in error
    assert both.item() == pytest.approx((per_view * w).mean().item())
    on_object[:, 4] += 100.0                                  # the reference is not in the loss
    assert diffusion_loss(on_object.flatten(0, 1), target, 4, 5, pixel_weights=pw) == fg


def test_foreground_weight_reaches_the_loss_from_the_views_alpha(work, text_run, capsys,
                                                                 monkeypatch):
    """ema mode, foreground_weight 4: the loss uses the batch's masks at the model's 8 px
    (the files are 16 px), weighs the bars more than the background, still learns, and bad
    settings are one line."""
    import guidance.training.diffusion as diffusion
    from engine.errors import UserError

    spec = {"init": str(text_run / "model"), "conditioner": {"model": str(work / "clip")}}
    cfg = build_config(yaml.safe_load(recipe(work, "ema", model=spec, lr=3e-3,
                                             foreground_weight=4.0).read_text()), recipe="fg")
    job = DiffusionTrainer(cfg, work / "fg-ema")
    seen = []
    real = diffusion.diffusion_loss
    monkeypatch.setattr(diffusion, "diffusion_loss",
                        lambda *a, **k: seen.append(a) or real(*a, **k))
    batch = next(iter(job.loader))
    with torch.no_grad():
        job.compute_loss(batch, torch.Generator().manual_seed(0))
    out, target, views, group, weights, pw = seen[0]
    assert (views, group) == (4, 5) and weights is None
    assert pw.shape == (8, 1, 8, 8)                          # 2 objects x 4 views, 8 px
    alpha = torch.nn.functional.adaptive_avg_pool2d(batch["masks"].flatten(0, 1).float(), 8)
    assert alpha.shape == pw.shape
    assert torch.allclose(pw, foreground_pixel_weights(alpha, (8, 8), 4.0))
    assert pw[alpha > 0.99].min() > 4.9 and bool((pw[alpha == 0] == 1).all())   # bars 5x
    seen.clear()
    losses = fit_fixed_batch(job, 15)
    assert all(np.isfinite(losses)) and min(losses[-3:]) < 0.7 * losses[0]
    no_masks = {k: v for k, v in batch.items() if k != "masks"}
    with pytest.raises(UserError, match="foreground_weight needs the views' masks"):
        job.compute_loss(no_masks, torch.Generator().manual_seed(0))
    path = recipe(work, "text", model=text_model_spec(work))
    assert "foreground_weight: must be >= 0" in one_line_error(capsys, f"recipe={path}",
                                                               "foreground_weight=-1")
    assert one_line_error(capsys, f"recipe={recipe(work, 'clip')}", "foreground_weight=2"
                          ).startswith("error: foreground_weight: mode clip has no diffusion")
