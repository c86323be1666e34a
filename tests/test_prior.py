"""MultiViewPrior: the one object for the multi-view model's conditioning, cameras and noise
maths; multiview-sds, sampled-views and the sample command go through it."""

from __future__ import annotations

import ast
import inspect

import pytest
import torch
import torch.nn.functional as F

from engine.cameras import Cameras
from engine.errors import ConfigError
from engine.images import load_reference_image
from engine.plugin import RunInputs
from guidance.conditioners import OpenCLIPTextConditioner
from guidance.multiview import noise
from guidance.multiview.cameras import CONVENTIONS, camera_vectors
from guidance.multiview.model import MultiViewDiffusionModel
from guidance.multiview.openclip import build_openclip, tiny_openclip_config
from guidance.multiview.prior import MultiViewPrior

# the tiny model folder the multiview-sds tests use, shared rather than built twice
from test_multiview_sds import image_model_dir, unet_cfg  # noqa: E402,F401


@pytest.fixture(scope="module")
def text_v_model():
    """A pixel-space, text-conditioned, v-predicting tiny model."""
    cond = OpenCLIPTextConditioner.from_clip(build_openclip(tiny_openclip_config(), seed=1),
                                             tiny_openclip_config())
    return MultiViewDiffusionModel.build_random(unet_cfg(3), "pixel", conditioner=cond, seed=1,
                                                init_std=0.05, conditioning="text",
                                                prediction_type="v_prediction")


def four_views():
    return Cameras.from_spherical(15.0, torch.arange(4.0) * 90.0, 2.5, 40.0, views_per_object=4)


def old_multiview_sds_context(model, image, dtype=torch.float32):
    """The picture's context as multiview-sds computed it before the prior existed."""
    rgb = image.rgb.permute(2, 0, 1)[None]
    rgb = F.interpolate(rgb, size=(256, 256), mode="bicubic", align_corners=False,
                        antialias=True).clamp(0, 1)
    dev = next(model.parameters()).device
    with torch.no_grad():
        return model.embed_image(rgb.to(dev, dtype))


# -- conditioning ----------------------------------------------------------------------------

def test_picture_context_is_bit_identical_to_multiview_sds_before(image_model_dir, rgba_image):
    from guidance.multiview_sds import MultiViewSDS

    image = load_reference_image(rgba_image, 64)
    prior = MultiViewPrior.load(image_model_dir)
    assert prior.conditioning == "image" and prior.convention == "mvdream"
    before = old_multiview_sds_context(prior.model, image)
    assert before.shape == (1, 1, 32) and before.abs().sum() > 0
    assert torch.equal(prior.encode_image(image), before)
    # the same picture as a tensor [N, 3, H, W]; a straight RGBA one is composited on white
    assert torch.equal(prior.encode_image(image.rgb.permute(2, 0, 1)[None]), before)
    colour, alpha = torch.rand(32, 32, 3), torch.rand(32, 32, 1)
    assert torch.equal(prior.encode_image(torch.cat([colour, alpha], dim=-1)),
                       prior.encode_image(colour * alpha + (1 - alpha)))
    cond, uncond = prior.contexts(image=image)
    assert torch.equal(cond, before) and torch.equal(uncond, torch.zeros_like(before))
    g = MultiViewSDS(MultiViewSDS.Config(model=str(image_model_dir)),
                     inputs=RunInputs(image=image))
    assert isinstance(g.prior, MultiViewPrior)
    assert torch.equal(g.context_cond, before) and torch.equal(g.context_uncond, uncond)


def test_contexts_name_the_missing_input(image_model_dir, text_v_model):
    prior = MultiViewPrior.load(image_model_dir)
    with pytest.raises(ConfigError, match="guidance x conditions on an image: add image=PATH"):
        prior.contexts(prompt="a chair", who="guidance x")
    text = MultiViewPrior(text_v_model)
    with pytest.raises(ConfigError, match='add prompt="..."'):
        text.contexts()
    cond, uncond = text.contexts(prompt="a red chair", negative_prompt="ugly")
    assert torch.equal(cond, text.encode_text("a red chair"))
    assert torch.equal(uncond, text.encode_text(["ugly"]))
    assert torch.equal(text.uncond_context(2), text_v_model.unconditional_context(2))
    with pytest.raises(ConfigError, match="camera_convention"):
        MultiViewPrior(text_v_model, camera_convention="opencv")


# -- noise maths -----------------------------------------------------------------------------

def test_add_noise_and_predict_x0_round_trip_fp16_inputs_in_fp32(image_model_dir):
    prior = MultiViewPrior.load(image_model_dir)
    a = prior.alphas_cumprod
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(4, 4, 8, 8, generator=g), torch.randn(4, 4, 8, 8, generator=g)
    t = torch.tensor([0, 300, 700, 980])
    x0h, epsh = x0.half(), eps.half()
    x_t = prior.add_noise(x0h, epsh, t)
    assert x_t.dtype == torch.float16
    # the arithmetic is float32's, rounded once at the end
    assert torch.equal(x_t, noise.add_noise(x0h.float(), epsh.float(), t, a).half())
    x0_back = prior.predict_x0(x_t, t, epsh)
    assert x0_back.dtype == torch.float16
    assert torch.equal(x0_back, noise.predict_x0(x_t.float(), t, epsh.float(), a).half())
    # round trip: exact up to the fp16 rounding of x_t, amplified by 1 / sqrt(alpha_bar)
    err = (x0_back.float() - x0h.float()).abs().amax(dim=(1, 2, 3))
    assert float(err[0]) < 2e-3 and float(err[2]) < 2e-2 and bool(torch.isfinite(err).all())
    # the fp32 model method and the prior agree
    assert torch.equal(prior.model.add_noise(x0, eps, t), prior.add_noise(x0, eps, t))


def test_v_and_eps_conversions_are_consistent(text_v_model):
    prior = MultiViewPrior(text_v_model)
    assert prior.prediction_type == "v_prediction" and prior.space == "pixel"
    g = torch.Generator().manual_seed(1)
    x0, eps = torch.randn(4, 3, 8, 8, generator=g), torch.randn(4, 3, 8, 8, generator=g)
    t = torch.tensor([1, 250, 600, 999])
    x_t = prior.add_noise(x0, eps, t)
    v = prior.v_target(x0, eps, t)
    assert torch.allclose(prior.eps_from_v(x_t, t, v), eps, atol=1e-5)
    assert torch.allclose(prior.predict_x0(x_t, t, prior.eps_from_v(x_t, t, v))[:3], x0[:3],
                          atol=1e-3)
    # predict_eps hands out epsilon for a v model: the raw output converted
    ctx = prior.encode_text(["a red chair"])
    cams = prior.camera_vectors(four_views())
    with torch.no_grad():
        raw = text_v_model.predict_output(x_t, t, ctx.expand(4, -1, -1), cams, 4)
        eps_hat = prior.predict_eps(x_t, t, ctx, cams, 4)
        uncond, cond = prior.predict_eps_pair(x_t, t, ctx, prior.uncond_context(), cams, 4)
    assert torch.allclose(eps_hat, prior.eps_from_v(x_t, t, raw), atol=1e-6)
    assert torch.allclose(cond, eps_hat, atol=1e-5)
    assert not torch.allclose(uncond, cond, atol=1e-4)


def test_camera_vectors_are_the_conventions(image_model_dir):
    prior = MultiViewPrior.load(image_model_dir)
    cams = four_views()
    assert torch.equal(prior.camera_vectors(cams), camera_vectors(cams, "mvdream"))
    for convention in CONVENTIONS:
        assert torch.equal(prior.camera_vectors(cams, convention),
                           camera_vectors(cams, convention))
    forced = MultiViewPrior.load(image_model_dir, camera_convention="isotropic3d-release")
    assert torch.equal(forced.camera_vectors(cams),
                       camera_vectors(cams, "isotropic3d-release"))


def test_encode_resizes_to_the_model_and_decodes_back(image_model_dir):
    prior = MultiViewPrior.load(image_model_dir)
    assert prior.image_size == 16 and prior.space == "latent" and prior.num_views == 4
    rgb = torch.rand(4, 3, 24, 24, requires_grad=True)
    torch.manual_seed(0)
    x0 = prior.encode(rgb)
    assert x0.shape == (4, 4, 8, 8)
    x0.sum().backward()
    assert rgb.grad.abs().sum() > 0
    assert prior.decode(x0.detach()).shape == (4, 3, 16, 16)


# -- the users go through the prior ----------------------------------------------------------

def _imported_modules(module) -> set:
    tree = ast.parse(inspect.getsource(module))
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
    return found


def test_sampled_views_uses_the_prior_not_multiview_sds(image_model_dir, monkeypatch):
    from guidance import sampled_views as sv
    from guidance.multiview import sample

    for module in (sv, sample):
        assert not {"guidance.multiview_sds", "guidance.dataset_views",
                    "guidance.reference", "guidance.sampled_views"} & _imported_modules(module)
    calls = []
    real = MultiViewPrior.sample

    def counting(self, *args, **kwargs):
        calls.append(self)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(MultiViewPrior, "sample", counting)
    picture = torch.ones(16, 16, 3)
    mask = torch.zeros(16, 16, 1)
    mask[4:12, 4:12] = 1
    from engine.plugin import ReferenceImage

    inputs = RunInputs(image=ReferenceImage(picture * (1 - mask) + mask * 0.3, mask, "p"))
    g = sv.SampledViewsL2(sv.SampledViewsL2.Config(model=str(image_model_dir), candidates=2,
                                                   sample_steps=2), inputs=inputs)
    assert isinstance(g.prior, MultiViewPrior) and not hasattr(g, "sds")
    assert g.prior.model.conditioner is None              # freed once embedded
    assert torch.equal(g.context_cond, MultiViewPrior.load(image_model_dir).encode_image(
        inputs.image))
    g.draw(four_views())
    assert len(calls) == 2 and all(c is g.prior for c in calls)
    assert g.rgb.shape == (4, 16, 16, 3)


def test_sample_command_uses_the_prior(image_model_dir, rgba_image, tmp_path, monkeypatch):
    import guidance.multiview_sds
    from guidance.multiview.sample import main

    loaded = []
    real = MultiViewPrior.load.__func__

    def load(cls, *args, **kwargs):
        prior = real(cls, *args, **kwargs)
        loaded.append(prior)
        return prior

    def refuse(*args, **kwargs):
        raise AssertionError("the sample command built a MultiViewSDS")

    monkeypatch.setattr(MultiViewPrior, "load", classmethod(load))
    monkeypatch.setattr(guidance.multiview_sds.MultiViewSDS, "__init__", refuse)
    out = tmp_path / "views.png"
    assert main([f"image={rgba_image}", f"out={out}", f"model={image_model_dir}", "steps=2",
                 "device=cpu", "candidates=2"]) == 0
    assert out.is_file() and len(loaded) == 1


def test_fine_tuning_conditions_the_reference_as_inference_does(image_model_dir):
    """Fine-tuning's image context goes through the prior's preprocessing (the 256 px resize
    the release applies), not straight into the conditioner."""
    from guidance.multiview import prior as prior_module
    from guidance.training import diffusion

    real = prior_module.picture_context
    prior = MultiViewPrior.load(image_model_dir)
    picture = torch.rand(2, 3, 40, 40)
    direct = prior.model.embed_image(picture)
    via = real(prior.model, picture)
    assert via.shape == direct.shape and not torch.allclose(via, direct)   # the resize counts
    assert torch.equal(via, prior.encode_image(picture))
    assert diffusion.picture_context is real
    assert "picture_context(" in inspect.getsource(diffusion.DiffusionTrainer.compute_loss)
