"""Our Point-E models against an independent re-implementation of the release
(tests/pointe_reference.py): tiny random reference models in the release's naming are saved
as .pt state dicts, converted by our converter, loaded by our loader, and must reproduce the
reference's outputs, losses and samples. No weights are downloaded."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import pointe_reference as ref
from engine.errors import UserError
from guidance.pointcloud import convert
from guidance.pointcloud.diffusion import (PointDiffusion, cosine_betas, karras_sigmas,
                                           linear_betas, sample_cloud, sample_stage)
from guidance.pointcloud.pretrained import load_point_model
from guidance.pointcloud.transformer import (CHANNEL_BIASES, CHANNEL_SCALES, RELEASED,
                                             PointTransformer, count_parameters, preset)

ROOT = Path(__file__).resolve().parent.parent
TINY_KINDS = ["tiny-uncond", "tiny-imagevec", "tiny-grid", "tiny-upsample"]


# -- helpers ---------------------------------------------------------------------------

@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models: one thread is faster than several (and far faster on a busy machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def make_reference(name: str, seed: int = 0) -> torch.nn.Module:
    """The release's module for a tiny preset, every weight random."""
    c = preset(name)
    common = dict(input_channels=c.channels, output_channels=c.out_channels, width=c.width,
                  layers=c.layers, heads=c.heads)
    if c.kind == "uncond":
        model = ref.PointDiffusionTransformer(**common)
    elif c.kind == "image-vec":
        model = ref.CLIPImagePointDiffusionTransformer(feature_dim=c.clip_dim, **common)
    elif c.kind == "image-grid":
        model = ref.CLIPImageGridPointDiffusionTransformer(grid_feature_dim=c.grid_dim, **common)
    else:
        model = ref.CLIPImageGridUpsamplePointDiffusionTransformer(
            grid_feature_dim=c.grid_dim, grid_tokens=c.grid_tokens,
            channel_scales=[2.0, 2.0, 2.0] + [0.007843137255] * 3,
            channel_biases=[0.0, 0.0, 0.0, -1.0, -1.0, -1.0], **common)
    return ref.randomize(model, seed).eval()


def make_inputs(name: str, batch: int = 2, seed: int = 1):
    """(x [B, K, 6] scaled space, t [B], cond or None, low_res [B, K', 6] raw or None)."""
    c = preset(name)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, c.points, 6, generator=g)
    t = torch.randint(0, 1024, (batch,), generator=g)
    cond = low_res = None
    if c.kind == "image-vec":
        cond = torch.nn.functional.normalize(torch.randn(batch, c.clip_dim, generator=g), dim=-1)
    elif c.kind in ("image-grid", "upsample"):
        cond = torch.randn(batch, c.grid_dim, c.grid_tokens, generator=g)
    if c.kind == "upsample":
        xyz = 0.5 * torch.rand(batch, c.coarse_points, 3, generator=g) - 0.25
        rgb = 255 * torch.rand(batch, c.coarse_points, 3, generator=g)
        low_res = torch.cat([xyz, rgb], -1)
    return x, t, cond, low_res


def ref_kwargs(cond, low_res) -> dict:
    """The release's keyword arguments: embeddings / low_res, [N, C, T] layouts."""
    kw = {}
    if cond is not None:
        kw["embeddings"] = cond
    if low_res is not None:
        kw["low_res"] = low_res.transpose(1, 2)
    return kw


def ref_forward(model, x, t, cond=None, low_res=None):
    """The reference on our layout: [B, K, C] in and out."""
    return model(x.transpose(1, 2), t, **ref_kwargs(cond, low_res)).transpose(1, 2)


def save_release(model, path: Path, extra=None) -> Path:
    sd = dict(model.state_dict())
    sd.update(extra or {})
    torch.save(sd, path)
    return path


def convert_and_load(model, name, tmp_path, *extra_args):
    tmp_path.mkdir(parents=True, exist_ok=True)
    src = save_release(model, tmp_path / f"{name}.pt")
    out = tmp_path / f"{name}.converted"
    assert convert.main([str(src), str(out), f"model={name}", *extra_args]) == 0
    return load_point_model(out)


def error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith("error: "), err
    return err[0]


# -- the models ------------------------------------------------------------------------

def test_reference_has_the_release_key_names():
    keys = set(make_reference("tiny-upsample").state_dict())
    for key in ("time_embed.c_fc.weight", "time_embed.c_proj.bias", "ln_pre.weight",
                "backbone.resblocks.1.attn.c_qkv.weight", "backbone.resblocks.0.attn.c_proj.bias",
                "backbone.resblocks.0.ln_1.weight", "backbone.resblocks.0.ln_2.bias",
                "backbone.resblocks.1.mlp.c_fc.weight", "backbone.resblocks.1.mlp.c_proj.weight",
                "ln_post.bias", "input_proj.weight", "output_proj.weight", "clip_embed.0.weight",
                "clip_embed.1.weight", "cond_point_proj.weight", "channel_scales",
                "channel_biases"):
        assert key in keys, key
    assert "clip_embed.weight" in make_reference("tiny-imagevec").state_dict()


@pytest.mark.parametrize("name", TINY_KINDS)
def test_converted_model_reproduces_the_reference(name, tmp_path, capsys):
    reference = make_reference(name)
    ours = convert_and_load(reference, name, tmp_path)
    n = len(reference.state_dict())                        # every key converted, none left
    assert capsys.readouterr().out.splitlines()[0] == (f"checkpoint: {n} tensors; model {name}; "
                                                       f"{n} tensors converted")
    x, t, cond, low_res = make_inputs(name)
    with torch.no_grad():
        want = ref_forward(reference, x, t, cond, low_res)
        got = ours(x, t, cond=cond, low_res=low_res)
    assert want.abs().max() > 0.5                          # a real signal, not zeros
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    # fractional timesteps and another batch too
    x, t, cond, low_res = make_inputs(name, batch=3, seed=7)
    tf = t.float() + 0.37
    with torch.no_grad():
        torch.testing.assert_close(ours(x, tf, cond=cond, low_res=low_res),
                                   ref_forward(reference, x, tf, cond, low_res),
                                   atol=1e-5, rtol=1e-5)


def test_points_are_permutation_equivariant_and_any_count_works():
    model = load_point_model("random:tiny-grid")
    x, t, cond, _ = make_inputs("tiny-grid")
    perm = torch.randperm(x.shape[1])
    with torch.no_grad():
        out = model(x, t, cond=cond)
        torch.testing.assert_close(model(x[:, perm], t, cond=cond), out[:, perm],
                                   atol=1e-5, rtol=1e-5)
        assert model(x[:, :5], t, cond=cond).shape == (2, 5, 12)


def test_the_per_head_qkv_layout_is_reordered():
    heads, d, width = 4, 3, 12
    rows = torch.arange(3 * width, dtype=torch.float32)     # row r holds the value r
    ours = convert.per_head_to_blocked(rows, heads)
    for j in range(3):                                        # q, k, v
        for h in range(heads):
            for c in range(d):
                assert ours[j * width + h * d + c] == h * 3 * d + j * d + c
    weight = torch.arange(3 * width * 2, dtype=torch.float32).view(3 * width, 2)
    torch.testing.assert_close(convert.per_head_to_blocked(weight, heads)[:, 0],
                               ours * 2)


def test_reading_qkv_as_q_k_v_blocks_would_be_wrong():
    """The trap exercised: the same tensors, renamed only, give another model."""
    name = "tiny-grid"
    reference = make_reference(name)
    sd = reference.state_dict()
    right, _ = convert.release_to_ours(sd, preset(name))
    naive = {convert.rename_release_key(k): v for k, v in sd.items()}
    x, t, cond, _ = make_inputs(name)
    with torch.no_grad():
        want = ref_forward(reference, x, t, cond)
        outs = []
        for state in (right, naive):
            model = PointTransformer(preset(name)).eval()
            model.load_state_dict(state)
            outs.append(model(x, t, cond=cond))
    torch.testing.assert_close(outs[0], want, atol=1e-5, rtol=1e-5)
    assert (outs[1] - want).abs().max() > 1e-2


def test_released_presets_have_the_released_sizes():
    sizes = {n: (c.kind, c.width, c.layers, c.heads, c.points) for n, c in RELEASED.items()}
    assert sizes["base40M-imagevec"] == ("image-vec", 512, 12, 8, 1024)
    assert sizes["base40M"] == ("image-grid", 512, 12, 8, 1024)
    assert sizes["base300M"] == ("image-grid", 1024, 24, 16, 1024)
    assert sizes["base1B"] == ("image-grid", 2048, 24, 32, 1024)
    assert sizes["upsample"] == ("upsample", 512, 12, 8, 3072)
    assert RELEASED["upsample"].coarse_points == 1024
    assert RELEASED["upsample"].schedule == "linear" and RELEASED["base1B"].schedule == "cosine"
    assert (RELEASED["base40M"].grid_dim, RELEASED["base40M"].grid_tokens) == (1024, 256)
    with torch.device("meta"):
        millions = {n: count_parameters(PointTransformer(RELEASED[n])) / 1e6
                    for n in ("base40M", "base300M", "base1B", "upsample")}
    assert 38 < millions["base40M"] < 42 and 38 < millions["upsample"] < 42
    assert 290 < millions["base300M"] < 330 and 1100 < millions["base1B"] < 1300


def test_condition_dropout_in_training_is_the_zero_condition():
    model = load_point_model("random:tiny-imagevec", trainable=True)
    x, t, cond, _ = make_inputs("tiny-imagevec")
    with torch.no_grad():
        uncond = model(x, t)
        model.train()
        model.config.__dict__["cond_drop_prob"] = 1.0      # every row dropped
        dropped = model(x, t, cond=cond)
        model.eval()
        kept = model(x, t, cond=cond)
    torch.testing.assert_close(dropped, uncond)
    assert (kept - uncond).abs().max() > 1e-3


def test_a_fresh_model_has_the_released_initialisation():
    model = PointTransformer(preset("tiny-grid"))
    assert model.point_out.weight.abs().max() == 0
    std = model.blocks[0].mlp.fc_in.weight.std().item()
    assert abs(std - 0.25 / math.sqrt(32)) < 0.01


# -- the diffusion -----------------------------------------------------------------------

def test_cosine_schedule_matches_its_closed_form():
    diffusion = PointDiffusion("cosine")
    f = lambda s: math.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2   # noqa: E731
    for t in (0, 1, 100, 511, 1000, 1022):
        want = f((t + 1) / 1024) / f(0)          # the product of (1 - beta) telescopes
        assert diffusion.alphas_cumprod[t].item() == pytest.approx(want, rel=1e-9)
    assert cosine_betas()[-1].item() == pytest.approx(0.999)
    assert diffusion.alphas_cumprod.dtype == torch.float64


def test_linear_schedule_is_scaled_to_1024_steps():
    betas = linear_betas()
    assert betas[0].item() == pytest.approx(1e-4 * 1000 / 1024)
    assert betas[-1].item() == pytest.approx(0.02 * 1000 / 1024)
    assert betas[1].item() - betas[0].item() == pytest.approx((0.02 - 1e-4) * 1000 / 1024 / 1023)
    diffusion = PointDiffusion("linear")
    assert diffusion.alphas_cumprod[200].item() == pytest.approx(
        float(np.prod(1 - betas[:201].numpy())), rel=1e-12)


@pytest.mark.parametrize("schedule", ["cosine", "linear"])
def test_diffusion_tables_match_the_reference(schedule):
    ours, theirs = PointDiffusion(schedule), ref.ref_diffusion(schedule)
    for name in ("alphas_cumprod", "posterior_variance", "posterior_log_variance_clipped",
                 "posterior_mean_coef1", "posterior_mean_coef2"):
        np.testing.assert_allclose(getattr(ours, name).numpy(), getattr(theirs, name),
                                   rtol=1e-12, err_msg=name)


def test_channel_scaling_is_the_released_one():
    diffusion = PointDiffusion()
    raw = torch.tensor([[[0.5, -0.5, 0.0, 255.0, 0.0, 127.5]]])
    scaled = diffusion.scale(raw)
    torch.testing.assert_close(scaled, torch.tensor([[[1.0, -1.0, 0.0, 1.0, -1.0, 0.0]]]))
    torch.testing.assert_close(diffusion.unscale(scaled), raw)
    assert CHANNEL_SCALES[3] == pytest.approx(0.007843137255)
    assert CHANNEL_BIASES == (0.0, 0.0, 0.0, -1.0, -1.0, -1.0)


@pytest.mark.parametrize("schedule", ["cosine", "linear"])
def test_sigma_to_t_interpolates_and_truncates_like_the_release(schedule):
    ours = PointDiffusion(schedule)
    theirs = ref.RefGaussianToKarrasDenoiser(None, ref.ref_diffusion(schedule))
    for sigma in karras_sigmas(64, 1e-3, 160.0)[:-1].tolist() + [1e-5, 0.05, 3.3, 500.0]:
        assert ours.sigma_to_t(sigma) == int(theirs.sigma_to_t(sigma)), sigma
    ac = ours.alphas_cumprod
    between = 0.3 * ac[400].item() + 0.7 * ac[401].item()       # alpha_bar of t = 400.7
    assert ours.sigma_to_t(math.sqrt(1 / between - 1)) == 400
    assert ours.sigma_to_t(1e-6) == 0 and ours.sigma_to_t(1e6) == 1023


def test_karras_sigmas_are_the_released_schedule():
    sigmas = karras_sigmas(64, 1e-3, 120.0)
    assert sigmas.dtype == torch.float32 and sigmas.shape == (65,)
    assert sigmas[0].item() == pytest.approx(120.0) and sigmas[63].item() == pytest.approx(1e-3)
    assert sigmas[64] == 0 and bool((sigmas[1:] < sigmas[:-1]).all())
    torch.testing.assert_close(sigmas, ref.ref_get_sigmas_karras(64, 1e-3, 120.0))
    mid = (120 ** (1 / 7) + 0.5 * (1e-3 ** (1 / 7) - 120 ** (1 / 7))) ** 7
    assert karras_sigmas(3, 1e-3, 120.0)[1].item() == pytest.approx(mid, rel=1e-5)


@pytest.mark.parametrize("name", ["tiny-grid", "tiny-upsample"])
def test_training_loss_matches_the_reference(name, tmp_path):
    reference = make_reference(name).double()
    ours = convert_and_load(make_reference(name), name, tmp_path).double()
    c = preset(name)
    g = torch.Generator().manual_seed(3)
    x, _, cond, low_res = make_inputs(name, batch=4)
    cloud = torch.cat([0.5 * torch.rand(4, c.points, 3, generator=g) - 0.25,
                       255 * torch.rand(4, c.points, 3, generator=g)], -1).double()
    t = torch.tensor([0, 5, 300, 1023])
    noise = torch.randn(4, c.points, 6, generator=g).double()
    cond = cond.double()
    low_res = None if low_res is None else low_res.double()
    got = PointDiffusion.for_model(ours).training_losses(ours, cloud, t, cond=cond,
                                                         low_res=low_res, noise=noise)
    want = ref.ref_diffusion(c.schedule).training_losses(
        reference, cloud.transpose(1, 2), t, noise.transpose(1, 2), ref_kwargs(cond, low_res))
    for key in ("loss", "mse", "vb"):
        torch.testing.assert_close(got[key], want[key], atol=1e-9, rtol=1e-9)
    assert got["vb"][0] == 0 and bool((got["vb"][1:] > 0).all())


def test_the_bound_trains_only_the_variance_channels():
    model = load_point_model("random:tiny-uncond", trainable=True)
    cloud = torch.rand(2, 16, 6)
    losses = PointDiffusion().training_losses(model, cloud, torch.tensor([10, 500]),
                                              generator=torch.Generator().manual_seed(0))
    losses["vb"].sum().backward()
    grad = model.point_out.weight.grad
    assert grad[:6].abs().max() == 0 and grad[6:].abs().max() > 0


def test_training_loss_decreases_when_overfitting_one_cloud():
    torch.manual_seed(0)
    model = PointTransformer(preset("tiny-uncond")).train()
    diffusion = PointDiffusion()
    g = torch.Generator().manual_seed(0)
    cloud = torch.cat([0.5 * torch.rand(1, 16, 3, generator=g) - 0.25,
                       255 * torch.rand(1, 16, 3, generator=g)], -1).expand(8, -1, -1)
    t = torch.linspace(20, 1000, 8).long()
    noise = torch.randn(8, 16, 6, generator=g)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    history = []
    for _ in range(40):
        loss = diffusion.training_losses(model, cloud, t, noise=noise)["loss"].mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        history.append(loss.item())
    assert all(math.isfinite(v) for v in history)
    assert history[-1] < 0.5 * history[0], history


# -- sampling ----------------------------------------------------------------------------

def _stage_pair(name, tmp_path, seed=0):
    reference = make_reference(name, seed).double()
    ours = convert_and_load(make_reference(name, seed), name, tmp_path).double()
    return reference, ours


@pytest.mark.parametrize("scale,churn", [(3.0, 3.0), (1.0, 0.0)])
def test_sampler_matches_the_reference_with_fixed_noise(scale, churn, tmp_path):
    reference, ours = _stage_pair("tiny-grid", tmp_path)
    _, _, cond, _ = make_inputs("tiny-grid")
    cond = cond.double()
    settings = dict(steps=6, sigma_min=1e-3, sigma_max=120.0)
    got = sample_stage(ours, PointDiffusion("cosine"), 2, 16, cond, s_churn=churn,
                       guidance_scale=scale, generator=torch.Generator().manual_seed(5),
                       dtype=torch.float64, **settings)
    kwargs = {"embeddings": torch.cat([cond, torch.zeros_like(cond)]) if scale != 1 else cond}
    want = ref.ref_karras_sample(ref.ref_diffusion("cosine"), reference, (2, 6, 16),
                                 model_kwargs=kwargs, s_churn=churn, guidance_scale=scale,
                                 generator=torch.Generator().manual_seed(5),
                                 dtype=torch.float64, **settings).transpose(1, 2)
    assert want.abs().max() > 0.1
    torch.testing.assert_close(got, want, atol=1e-8, rtol=1e-8)


def test_two_stage_sample_cloud_matches_the_reference(tmp_path):
    base_ref, base = _stage_pair("tiny-grid", tmp_path / "b", seed=0)
    up_ref, up = _stage_pair("tiny-upsample", tmp_path / "u", seed=1)
    _, _, grid, _ = make_inputs("tiny-grid")
    grid = grid.double()
    got = sample_cloud(base, up, {"grid": grid}, steps=(5, 4),
                       generator=torch.Generator().manual_seed(11), dtype=torch.float64)
    stages = [dict(model=base_ref, diffusion=ref.ref_diffusion("cosine"), num_points=16,
                   guidance_scale=3.0, steps=5, sigma_min=1e-3, sigma_max=120.0, s_churn=3.0),
              dict(model=up_ref, diffusion=ref.ref_diffusion("linear"), num_points=24,
                   guidance_scale=3.0, steps=4, sigma_min=1e-3, sigma_max=160.0, s_churn=0.0)]
    want = ref.ref_sample_stages(stages, 2, {"embeddings": grid},
                                 generator=torch.Generator().manual_seed(11),
                                 dtype=torch.float64).transpose(1, 2)
    want = torch.cat([want[..., :3], want[..., 3:].clamp(0, 255) / 255], -1)
    assert got.shape == (2, 16 + 24, 6)
    torch.testing.assert_close(got, want, atol=1e-7, rtol=1e-7)
    assert float(got[..., 3:].min()) >= 0 and float(got[..., 3:].max()) <= 1


class _Spy(torch.nn.Module):
    """Wraps a model and records the condition and coarse cloud of every call."""

    def __init__(self, model):
        super().__init__()
        self.model, self.calls = model, []
        self.config = model.config

    @property
    def device(self):
        return self.model.device

    def forward(self, x, t, cond=None, low_res=None):
        self.calls.append((cond, low_res))
        return self.model(x, t, cond=cond, low_res=low_res)


def test_guidance_zeroes_every_input_of_the_unconditional_half():
    up = _Spy(load_point_model("random:tiny-upsample"))
    _, _, grid, low_res = make_inputs("tiny-upsample")
    sample_stage(up, PointDiffusion("linear"), 2, 24, grid, low_res, steps=2,
                 guidance_scale=3.0, generator=torch.Generator().manual_seed(0))
    assert len(up.calls) == 3                       # Heun, then Euler into sigma = 0
    for cond, coarse in up.calls:
        assert cond.shape[0] == coarse.shape[0] == 4
        torch.testing.assert_close(cond[:2], grid)
        torch.testing.assert_close(coarse[:2], low_res)
        assert cond[2:].abs().max() == 0 and coarse[2:].abs().max() == 0


def test_guidance_mixes_the_clamped_predictions():
    model = load_point_model("random:tiny-grid", dtype=torch.float64)
    with torch.no_grad():
        torch.nn.init.normal_(model.point_out.weight, std=2.0)      # predictions beyond [-1, 1]
    diffusion = PointDiffusion()
    _, _, grid, _ = make_inputs("tiny-grid")
    grid = grid.double()
    x = 3 * torch.randn(2, 16, 6, generator=torch.Generator().manual_seed(2)).double()
    from guidance.pointcloud.diffusion import _guided

    with torch.no_grad():
        c = diffusion.denoise(model, x, 2.5, grid)
        u = diffusion.denoise(model, x, 2.5, torch.zeros_like(grid))
        guided = _guided(diffusion, model, grid, None, 3.0, True)(x, 2.5)
        plain = _guided(diffusion, model, grid, None, 1.0, True)(x, 2.5)
    assert c.abs().max() == 1 and (c - u).abs().max() > 0.1
    torch.testing.assert_close(guided, u + 3.0 * (c - u))
    assert guided.abs().max() > 1                  # mixed after clamping, not clamped again
    torch.testing.assert_close(plain, c)


def test_sample_cloud_shape_and_colour_range():
    base = load_point_model("random:tiny-imagevec")
    emb = torch.nn.functional.normalize(torch.randn(3, 12), dim=-1)
    cloud = sample_cloud(base, None, emb, steps=3, generator=torch.Generator().manual_seed(0))
    assert cloud.shape == (3, 16, 6) and torch.isfinite(cloud).all()
    assert float(cloud[..., 3:].min()) >= 0 and float(cloud[..., 3:].max()) <= 1
    again = sample_cloud(base, None, emb, steps=3, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(cloud, again)


# -- the converter's and loader's errors ---------------------------------------------------

def test_missing_file_is_one_line_and_nothing_written(tmp_path, capsys):
    out = tmp_path / "out"
    assert convert.main([str(tmp_path / "nope.pt"), str(out), "model=base40M"]) == 2
    assert "not found" in error_line(capsys)
    assert not out.exists()


def test_random_bytes_are_not_a_checkpoint(tmp_path, capsys):
    src = tmp_path / "junk.pt"
    src.write_bytes(np.random.default_rng(0).bytes(4096))
    out = tmp_path / "out"
    assert convert.main([str(src), str(out), "model=base40M"]) == 2
    assert "not a PyTorch checkpoint" in error_line(capsys)
    torch.save({"weight": torch.ones(3)}, src)                   # tensors, but not Point-E
    assert convert.main([str(src), str(out), "model=base40M"]) == 2
    assert "not a Point-E transformer checkpoint" in error_line(capsys)
    assert not out.exists()


class _Payload:
    """Unpickling this would create the marker file."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_a_pickle_with_objects_is_refused_unopened(tmp_path, capsys):
    marker = tmp_path / "unpickled"
    src = tmp_path / "evil.pt"
    sd = dict(make_reference("tiny-grid").state_dict())
    sd["payload"] = _Payload(marker)
    torch.save(sd, src)
    out = tmp_path / "out"
    assert convert.main([str(src), str(out), "model=tiny-grid"]) == 2
    assert "weights_only" in error_line(capsys)
    assert not marker.exists() and not out.exists()


@pytest.mark.parametrize("model,names", [("tiny-upsample", ("tiny-grid", "tiny-upsample")),
                                         ("base40M", ("tiny-grid", "base40M"))])
def test_a_checkpoint_of_another_model_names_both(model, names, tmp_path, capsys):
    src = save_release(make_reference("tiny-grid"), tmp_path / "grid.pt")
    out = tmp_path / "out"
    assert convert.main([str(src), str(out), f"model={model}"]) == 2
    line = error_line(capsys)
    assert all(n in line for n in names), line
    assert "model=tiny-grid" in line
    assert not out.exists()


def test_a_missing_tensor_fails_and_unknown_keys_are_listed(tmp_path, capsys):
    sd = dict(make_reference("tiny-grid").state_dict())
    del sd["backbone.resblocks.1.mlp.c_fc.bias"]
    torch.save(sd, tmp_path / "holed.pt")
    out = tmp_path / "out"
    assert convert.main([str(tmp_path / "holed.pt"), str(out), "model=tiny-grid"]) == 2
    assert "blocks.1.mlp.fc_in.bias" in error_line(capsys) and not out.exists()
    src = save_release(make_reference("tiny-grid"), tmp_path / "extra.pt",
                       {"ema.decay": torch.tensor(0.99)})
    assert convert.main([str(src), str(out), "model=tiny-grid"]) == 0
    summary = capsys.readouterr().out
    assert "unknown (not converted): 1: ema.decay" in summary
    assert json.loads((out / "config.json").read_text())["name"] == "tiny-grid"
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]


def test_dtype_and_existing_output_folder(tmp_path, capsys):
    reference = make_reference("tiny-imagevec")
    model = convert_and_load(reference, "tiny-imagevec", tmp_path, "dtype=fp16")
    assert model.dtype == torch.float16
    again = convert_and_load(reference, "tiny-imagevec", tmp_path)   # over the same folder
    assert again.dtype == torch.float32
    capsys.readouterr()
    afile = tmp_path / "afile"
    afile.write_text("x")
    assert convert.main([str(tmp_path / "tiny-imagevec.pt"), str(afile),
                         "model=tiny-imagevec"]) == 2
    assert "not a folder" in error_line(capsys)
    assert convert.main([str(tmp_path / "tiny-imagevec.pt"), str(tmp_path / "o"),
                         "model=base4M"]) == 2
    assert "base40M" in error_line(capsys)                  # did you mean


@pytest.mark.slow          # a fresh interpreter imports torch: seconds on a busy machine
def test_the_command_exits_2_without_a_traceback(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, "-m", "guidance.pointcloud.convert",
                           str(tmp_path / "base_40m.pt"), str(tmp_path / "out"), "model=base40M"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "Traceback" not in proc.stderr
    assert not (tmp_path / "out").exists()


def test_help_names_the_command(capsys):
    assert convert.main(["--help"]) == 0
    assert "python -m guidance.pointcloud.convert" in capsys.readouterr().out


@pytest.mark.parametrize("name", ["base40M", "openai/point-e", "no/such/folder"])
def test_loading_unconverted_weights_says_how_to_convert(name):
    with pytest.raises(UserError) as info:
        load_point_model(name)
    text = str(info.value)
    assert "\n" not in text and "converted locally" in text
    assert "python -m guidance.pointcloud.convert" in text and "openaipublic" in text
    if name == "base40M":
        assert "base_40m.pt" in text and "model=base40M" in text


def test_loading_a_raw_checkpoint_or_broken_folder_is_one_line(tmp_path):
    src = save_release(make_reference("tiny-grid"), tmp_path / "base_300m.pt")
    with pytest.raises(UserError, match="model=base300M"):
        load_point_model(src)
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="config.json missing"):
        load_point_model(tmp_path / "empty")
    with pytest.raises(UserError, match="not a random Point-E model"):
        load_point_model("random:base2B")
