"""The multi-view diffusion model object: spaces, schedule, conditioning, folder round trip."""

import json
import math

import pytest
import torch

from engine.errors import ConfigError, UserError
from guidance.conditioners import OpenCLIPImageConditioner, OpenCLIPTextConditioner
from guidance.multiview.openclip import build_openclip, tiny_openclip_config
from guidance.multiview.model import INDEX_FILE, MultiViewDiffusionModel
from guidance.multiview.unet import MultiViewUNetConfig

TINY_VAE = dict(in_channels=3, out_channels=3, latent_channels=4,
                down_block_types=["DownEncoderBlock2D"] * 2,
                up_block_types=["UpDecoderBlock2D"] * 2, block_out_channels=[32, 32],
                layers_per_block=1, norm_num_groups=8, sample_size=16)


def unet_cfg(channels=4):
    return MultiViewUNetConfig(sample_size=8, in_channels=channels, out_channels=channels,
                               block_out_channels=[32, 32], layers_per_block=1,
                               attention_head_dim=[2, 2], cross_attention_dim=32,
                               norm_num_groups=8)


def image_conditioner(seed=0):
    return OpenCLIPImageConditioner.from_clip(build_openclip(tiny_openclip_config(), seed=seed),
                                              tiny_openclip_config())


@pytest.fixture(scope="module")
def latent_model():
    return MultiViewDiffusionModel.build_random(unet_cfg(), "latent",
                                                conditioner=image_conditioner(),
                                                vae_config=TINY_VAE, seed=0, init_std=0.05)


def noisy_batch(model, n=8, seed=1):
    g = torch.Generator().manual_seed(seed)
    c = model.unet.config.in_channels
    return (torch.randn(n, c, 8, 8, generator=g), torch.randint(0, 1000, (n,), generator=g),
            torch.randn(n, 16, generator=g))


def test_schedule_is_scaled_linear_and_stays_float32(latent_model):
    betas = torch.linspace(math.sqrt(0.00085), math.sqrt(0.012), 1000, dtype=torch.float64) ** 2
    expected = torch.cumprod(1 - betas, 0)
    ac = latent_model.alphas_cumprod
    assert ac.shape == (1000,) and ac.dtype == torch.float32
    assert torch.allclose(ac.double(), expected, rtol=1e-5)
    half = MultiViewDiffusionModel.build_random(unet_cfg(3), "pixel", seed=0).half()
    assert half.dtype == torch.float16 and half.alphas_cumprod.dtype == torch.float32
    assert torch.equal(half.alphas_cumprod, ac)


def test_noise_and_x0_are_inverse(latent_model):
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(3, 4, 8, 8, generator=g), torch.randn(3, 4, 8, 8, generator=g)
    t = torch.tensor([0, 500, 999])
    x_t = latent_model.add_noise(x0, noise, t)
    a = latent_model.alphas_cumprod[t].view(-1, 1, 1, 1)
    assert torch.allclose(x_t, a.sqrt() * x0 + (1 - a).sqrt() * noise, atol=1e-6)
    assert torch.allclose(latent_model.predict_x0(x_t, t, noise), x0, atol=1e-4)


def test_pixel_space_encode_decode():
    model = MultiViewDiffusionModel.build_random(unet_cfg(3), "pixel", seed=0)
    assert model.info.image_size == 8 and model.vae is None
    img = torch.rand(2, 3, 8, 8)
    assert torch.equal(model.encode(img), img * 2 - 1)
    assert torch.allclose(model.decode(model.encode(img)), img, atol=1e-6)


def test_latent_encode_is_scaled_posterior_sample_and_differentiable(latent_model):
    img = torch.rand(2, 3, 16, 16, requires_grad=True)
    x0 = latent_model.encode(img, generator=torch.Generator().manual_seed(5))
    assert x0.shape == (2, 4, 8, 8)
    with torch.no_grad():
        dist = latent_model.vae.encode(img * 2 - 1).latent_dist
        ref = dist.sample(generator=torch.Generator().manual_seed(5)) * 0.18215
    assert torch.allclose(x0, ref, atol=1e-6)
    x0.square().sum().backward()
    assert img.grad is not None and img.grad.abs().sum() > 0
    assert latent_model.decode(x0.detach()).shape == (2, 3, 16, 16)


def test_frozen_by_default_and_trainable_on_request(latent_model):
    assert not latent_model.training
    assert not any(p.requires_grad for p in latent_model.parameters())
    model = MultiViewDiffusionModel.build_random(unet_cfg(3), "pixel", trainable=True, seed=0)
    assert model.unet.training and all(p.requires_grad for p in model.unet.parameters())


def test_contexts(latent_model):
    rgb = torch.rand(2, 3, 40, 40)
    ctx = latent_model.embed_image(rgb)
    assert ctx.shape == (2, 1, 32)
    assert torch.equal(latent_model.unconditional_context(3), torch.zeros(3, 1, 32))
    with pytest.raises(UserError, match="conditioned on image, not text"):
        latent_model.embed_text(["a cat"])
    text = OpenCLIPTextConditioner.from_clip(build_openclip(tiny_openclip_config(), seed=0),
                                             tiny_openclip_config())
    tm = MultiViewDiffusionModel.build_random(unet_cfg(3), "pixel", conditioner=text, seed=0)
    assert tm.info.conditioning == "text"
    assert torch.equal(tm.unconditional_context(2), tm.embed_text(["", ""]))
    assert tm.embed_text(["a cat"]).shape == (1, 77, 32)


def test_mismatched_parts_are_config_errors():
    with pytest.raises(ConfigError, match="embeds to 32 but the UNet cross-attends to 12"):
        cfg = unet_cfg(3)
        cfg.cross_attention_dim = 12
        MultiViewDiffusionModel.build_random(cfg, "pixel", conditioner=image_conditioner())
    with pytest.raises(ConfigError, match="pixel-space UNet takes 3 channels"):
        MultiViewDiffusionModel.build_random(unet_cfg(4), "pixel")


def test_multiview_attention_joins_views(latent_model):
    x, t, cam = noisy_batch(latent_model)
    t = torch.full((8,), 300)
    ctx = torch.randn(8, 1, 32)
    x2 = x.clone()
    x2[1] += 1.0
    with torch.no_grad():
        a = latent_model.predict_noise(x, t, ctx, cam, 4)
        b = latent_model.predict_noise(x2, t, ctx, cam, 4)
        single = [latent_model.predict_noise(v, t, ctx, cam, 1) for v in (x, x2)]
    assert (a[0] - b[0]).abs().max() > 1e-7 and torch.equal(a[4:], b[4:])
    assert torch.equal(single[0][0], single[1][0])


def test_save_and_load_round_trip(latent_model, tmp_path):
    latent_model.save_pretrained(tmp_path / "m")
    index = json.loads((tmp_path / "m" / INDEX_FILE).read_text())
    assert index["format"] == "distill-engine-multiview-model" and index["version"] == 1
    assert index["components"]["vae"] == "vae"
    assert index["components"]["conditioner"] == {"type": "openclip-image", "path": "conditioner"}
    assert index["info"]["unet"]["block_out_channels"] == [32, 32]
    sched = json.loads((tmp_path / "m" / "scheduler" / "scheduler_config.json").read_text())
    assert sched["beta_schedule"] == "scaled_linear" and sched["beta_end"] == 0.012
    clip_cfg = json.loads((tmp_path / "m" / "conditioner" / "open_clip_config.json").read_text())
    assert clip_cfg["model_cfg"] == tiny_openclip_config()
    files = {p.relative_to(tmp_path / "m").as_posix() for p in (tmp_path / "m").rglob("*")
             if p.is_file()}
    assert {"unet/diffusion_pytorch_model.safetensors", "unet/config.json",
            "vae/diffusion_pytorch_model.safetensors",
            "conditioner/open_clip_model.safetensors"} <= files
    back = MultiViewDiffusionModel.from_pretrained(tmp_path / "m")
    assert back.info == latent_model.info
    assert not any(p.requires_grad for p in back.parameters()) and not back.training
    x, t, cam = noisy_batch(latent_model)
    ctx = torch.randn(8, 1, 32)
    img = torch.rand(2, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(back.predict_noise(x, t, ctx, cam, 4),
                           latent_model.predict_noise(x, t, ctx, cam, 4))
        assert torch.equal(back.embed_image(img), latent_model.embed_image(img))
        assert torch.equal(back.decode(x[:2]), latent_model.decode(x[:2]))
    assert torch.equal(back.alphas_cumprod, latent_model.alphas_cumprod)
    other = MultiViewDiffusionModel.from_pretrained(tmp_path / "m",
                                                    camera_convention="isotropic3d-release",
                                                    load_conditioner=False)
    assert other.info.camera_convention == "isotropic3d-release" and other.conditioner is None


def test_missing_or_corrupt_folders_are_user_errors(latent_model, tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        MultiViewDiffusionModel.from_pretrained(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="engine_model.json missing"):
        MultiViewDiffusionModel.from_pretrained(tmp_path / "empty")
    folder = latent_model.save_pretrained(tmp_path / "m")
    weights = folder / "unet" / "diffusion_pytorch_model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(UserError, match="UNet weights .* unreadable") as err:
        MultiViewDiffusionModel.from_pretrained(folder)
    assert "\n" not in str(err.value)
    index = json.loads((folder / INDEX_FILE).read_text())
    (folder / INDEX_FILE).write_text(json.dumps(dict(index, version=99)))
    with pytest.raises(UserError, match="format version 99"):
        MultiViewDiffusionModel.from_pretrained(folder)
    (folder / INDEX_FILE).write_text("{not json")
    with pytest.raises(UserError, match="unreadable"):
        MultiViewDiffusionModel.from_pretrained(folder)


def test_v_prediction_round_trip_and_predict_noise_converts():
    from guidance.multiview.noise import eps_from_v, v_target

    model = MultiViewDiffusionModel.build_random(unet_cfg(3), "pixel", seed=0, init_std=0.05,
                                                 conditioner=image_conditioner(),
                                                 prediction_type="v_prediction")
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(4, 3, 8, 8, generator=g), torch.randn(4, 3, 8, 8, generator=g)
    t = torch.tensor([0, 300, 700, 999])
    x_t = model.add_noise(x0, noise, t)
    v = v_target(x0, noise, t, model.alphas_cumprod)
    # the exact v gives back the exact noise, and x0 through the usual formula
    assert torch.allclose(eps_from_v(x_t, t, v, model.alphas_cumprod), noise, atol=1e-5)
    # predict_noise hands out epsilon: the raw UNet output converted
    ctx, cam = torch.randn(4, 1, 32), torch.randn(4, 16)
    with torch.no_grad():
        raw = model.unet(x_t, t, encoder_hidden_states=ctx, class_labels=cam,
                         cross_attention_kwargs={"num_views": 4}).sample
        eps = model.predict_noise(x_t, t, ctx, cam, 4)
    assert torch.allclose(eps, eps_from_v(x_t, t, raw, model.alphas_cumprod), atol=1e-6)
    assert not torch.allclose(eps, raw, atol=1e-3)


def test_prediction_type_is_saved_and_checked(tmp_path):
    model = MultiViewDiffusionModel.build_random(unet_cfg(3), "pixel", seed=0,
                                                 conditioner=image_conditioner(),
                                                 prediction_type="v_prediction")
    model.save_pretrained(tmp_path / "m")
    loaded = MultiViewDiffusionModel.from_pretrained(tmp_path / "m")
    assert loaded.info.prediction_type == "v_prediction"
    sched = json.loads((tmp_path / "m" / "scheduler" / "scheduler_config.json").read_text())
    assert sched["prediction_type"] == "v_prediction"
    with pytest.raises(ConfigError, match="prediction_type"):
        MultiViewDiffusionModel.build_random(unet_cfg(3), "pixel", prediction_type="sample")


# -- noise schedules -------------------------------------------------------------------------

def _pixel_v_model(noise_schedule):
    return MultiViewDiffusionModel.build_random(unet_cfg(3), "pixel", seed=0, init_std=0.05,
                                                conditioner=image_conditioner(),
                                                prediction_type="v_prediction",
                                                noise_schedule=noise_schedule)


def test_zero_terminal_snr_leaves_no_image_in_the_last_step(tmp_path):
    """On MVDream's schedule x_999 still holds 6.8% of the image (two images under the same
    noise stay apart); on the zero-terminal-SNR one it is the noise alone, and the schedule
    goes with the saved model."""
    g = torch.Generator().manual_seed(0)
    white, black = torch.ones(1, 3, 8, 8), -torch.ones(1, 3, 8, 8)
    noise = torch.randn(1, 3, 8, 8, generator=g)
    t = torch.tensor([999])
    plain, zero = _pixel_v_model("scaled-linear"), _pixel_v_model("zero-terminal-snr")
    gap = lambda m: float((m.add_noise(white, noise, t) - m.add_noise(black, noise, t)).abs().max())
    assert gap(plain) == pytest.approx(2 * math.sqrt(plain.alphas_cumprod[999]), rel=1e-4)
    assert gap(plain) > 0.13 and gap(zero) < 1e-3
    # the schedule is the same one elsewhere (monotone, nearly 1 at t = 0), and x0 can still
    # be recovered where SDS samples t (<= 980) without dividing by zero
    ac = zero.alphas_cumprod
    assert ac[0] > 0.99 and bool((ac[1:] <= ac[:-1]).all()) and ac[999] > 0
    x0 = torch.rand(1, 3, 8, 8, generator=g) * 2 - 1
    x_t = zero.add_noise(x0, noise, torch.tensor([980]))
    assert torch.allclose(zero.predict_x0(x_t, torch.tensor([980]), noise), x0, atol=1e-3)
    zero.save_pretrained(tmp_path / "m")
    back = MultiViewDiffusionModel.from_pretrained(tmp_path / "m")
    assert torch.equal(back.alphas_cumprod, ac)
    assert back.scheduler_config["rescale_betas_zero_snr"] is True


def test_zero_terminal_snr_needs_v_prediction_and_a_known_name():
    with pytest.raises(ConfigError, match="v_prediction"):
        MultiViewDiffusionModel.build_random(unet_cfg(3), "pixel", seed=0,
                                             noise_schedule="zero-terminal-snr")
    with pytest.raises(ConfigError, match="scaled-linear"):
        MultiViewDiffusionModel.build_random(unet_cfg(3), "pixel", seed=0,
                                             prediction_type="v_prediction",
                                             noise_schedule="cosine")


def test_sampler_follows_the_model_schedule():
    """DDIM starts where the model's schedule is pure noise (t = 999 on zero terminal SNR);
    MVDream's models keep their "leading" steps offset by one."""
    from guidance.multiview.sample import ddim_scheduler

    zero = ddim_scheduler(_pixel_v_model("zero-terminal-snr"), True)
    zero.set_timesteps(10)
    assert zero.timesteps.tolist() == list(range(999, 0, -100))
    plain = ddim_scheduler(_pixel_v_model("scaled-linear"), True)
    plain.set_timesteps(10)
    assert plain.timesteps.tolist() == list(range(901, 0, -100))


def test_sampling_on_v_matches_sampling_on_epsilon():
    """The sampler guides and steps the UNet's own output (v here); on a schedule without a
    pure-noise step that is the same DDIM as stepping the converted epsilon."""
    from diffusers import DDIMScheduler

    from guidance.multiview.sample import sample_views

    model = _pixel_v_model("scaled-linear")
    cond, uncond = torch.randn(1, 1, 32), torch.zeros(1, 1, 32)
    cams = torch.randn(4, 16)
    model.set_trainable(True)     # sampling builds no graph, even through trainable weights
    views = sample_views(model, cond, uncond, cams, 4, 6, 3.0, 0.0,
                         torch.Generator().manual_seed(3))
    assert not views.requires_grad
    model.set_trainable(False)
    with torch.no_grad():
        sched = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              clip_sample=True, set_alpha_to_one=False, steps_offset=1)
        sched.set_timesteps(6)
        x = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(3))
        ctx = torch.cat([uncond.expand(4, -1, -1), cond.expand(4, -1, -1)])
        for t in sched.timesteps:
            eps = model.predict_noise(torch.cat([x, x]), torch.full((8,), int(t)), ctx,
                                      torch.cat([cams, cams]), 4)
            eps_u, eps_c = eps.chunk(2)
            x = sched.step(eps_u + 3.0 * (eps_c - eps_u), t, x, eta=0.0).prev_sample
    reference = model.decode(x).clamp(0, 1)
    assert views.std() > 0.01
    assert torch.allclose(views, reference, atol=1e-4)


@pytest.mark.parametrize("eta", [0.0, 0.5])
def test_objects_sampled_together_get_the_views_each_gets_alone(eta):
    """Batching K objects through one sampling changes nothing an object sees: its noise
    (the start and, with eta > 0, DDIM's own) comes from its own generator."""
    from guidance.multiview.sample import sample_views

    model = _pixel_v_model("scaled-linear")
    conds = torch.randn(3, 1, 32, generator=torch.Generator().manual_seed(1))
    uncond, cams = torch.zeros(1, 1, 32), torch.randn(4, 16)
    seeds = (5, 6, 5)
    together = sample_views(model, conds, uncond, cams, 4, 5, 3.0, eta,
                            [torch.Generator().manual_seed(s) for s in seeds])
    for k, seed in enumerate(seeds):
        alone = sample_views(model, conds[k:k + 1], uncond, cams, 4, 5, 3.0, eta,
                             torch.Generator().manual_seed(seed))
        assert torch.allclose(together[4 * k:4 * k + 4], alone, atol=1e-5), k
    # different contexts (objects 0 and 2 share a seed) give different views
    assert (together[:4] - together[8:]).abs().max() > 1e-2
