"""multiview-sds against the released code, written out independently here.

The facts come from the two releases this plugin reproduces:

* bytedance/MVDream-threestudio ``threestudio/models/guidance/multiview_diffusion_guidance.py``
  and pkunliu/Isotropic3D's copy of it: one timestep per step,
  ``t = randint(min_step, max_step + 1, [1])`` repeated over every view, with
  ``min_step = int(1000 * min_step_percent)`` and ``max_step = int(1000 * max_step_percent)``
  (the percents annealed by threestudio's ``C``: ``v0 + (v1 - v0) * clamp((s - s0) / (s1 - s0))``);
  the noise drawn by ``randn_like`` after the timestep; ``x_t = q_sample(x0, t, noise)``; the
  UNet run once on both halves (MVDream orders them (text, uncond), Isotropic3D (uncond,
  cond): the order is the caller's, the pairing is what matters);
  ``eps_hat = eps_u + s (eps_c - eps_u)``.
  Reconstruction form: ``x0_hat = predict_start_from_noise(x_t, t, eps_hat)`` and the same from
  the *conditional* prediction (``nocfg``); ``factor = (std_nocfg + 1e-8) / (std_cfg + 1e-8)``,
  each std over (views, C, H, W) of one object (``view(-1, n_view, ...).std([1, 2, 3, 4])``,
  torch's unbiased std); ``x0_hat = r * x0_hat * factor + (1 - r) * x0_hat``;
  ``loss = 0.5 * mse(x0, x0_hat.detach(), sum) / N``.
  Classic form: ``grad = nan_to_num(w * (eps_hat - noise))``, ``w = 1 - alphas_cumprod[t]``,
  ``loss = 0.5 * mse(x0, (x0 - grad).detach(), sum) / N``.
* bytedance/MVDream ``mvdream/ldm/interface.py`` (``register_schedule``, ``q_sample``,
  ``predict_start_from_noise``) and ``.../diffusionmodules/util.py`` (``make_beta_schedule``):
  betas = linspace(sqrt(0.00085), sqrt(0.012), 1000, float64) ** 2, alphas_cumprod their
  cumulative product of (1 - beta) in float64, buffers stored in float32;
  ``q_sample = sqrt_alphas_cumprod[t] x0 + sqrt_one_minus_alphas_cumprod[t] noise``;
  ``predict_start_from_noise = sqrt_recip_alphas_cumprod[t] x_t -
  sqrt_recipm1_alphas_cumprod[t] eps`` with sqrt(1 / a) and sqrt(1 / a - 1).

The expected values are computed in float64 from what the plugin fed its UNet and what the
UNet answered (recorded by a spy), so every step after the UNet, and the UNet's inputs, are
checked end to end through ``MultiViewSDS.forward``.
"""

from __future__ import annotations

import math

import pytest
import torch

from engine.cameras import Cameras
from engine.plugin import RunInputs, StepInfo
from guidance.multiview import noise, sds
from guidance.multiview.model import scaled_linear_scheduler
from guidance.multiview_sds import MultiViewSDS

import test_multiview_sds as mv_sds_tests

# the tiny model folders the multiview-sds tests build (latent + image conditioning, the
# Isotropic3D shape; pixel + text conditioning, the MVDream shape), shared as fixtures
image_model_dir = mv_sds_tests.image_model_dir
text_model_dir = mv_sds_tests.text_model_dir

T_TRAIN = 1000
VIEWS = 4
SCALE = 7.5                       # not the default 10, so a hard-coded scale would show


# -- the release's schedule and annealing, written out --------------------------------------

def release_alphas_cumprod() -> torch.Tensor:
    """LDM's "linear" schedule as MVDream registers it: float64 throughout."""
    betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, T_TRAIN, dtype=torch.float64) ** 2
    return torch.cumprod(1.0 - betas, dim=0)


def release_percent(spec, step: int) -> float:
    """threestudio's C() for [start_step, start_value, end_value, end_step] (integer steps)."""
    s0, v0, v1, s1 = spec
    return v0 + (v1 - v0) * max(min(1.0, (step - s0) / (s1 - s0)), 0.0)


def release_bounds(step: int, min_spec=(0, 0.98, 0.02, 8000), max_spec=(0, 0.98, 0.50, 8000)):
    return (int(T_TRAIN * release_percent(min_spec, step)),
            int(T_TRAIN * release_percent(max_spec, step)))


# -- the release's SDS step on recorded UNet outputs, in float64 -----------------------------

def release_x_t(x0, eps, t):
    a = release_alphas_cumprod()[t]
    return a.sqrt() * x0 + (1 - a).sqrt() * eps


def release_predict_start(x_t, t, eps):
    a = release_alphas_cumprod()[t]
    return (1.0 / a).sqrt() * x_t - (1.0 / a - 1.0).sqrt() * eps


def release_reconstruction(x0, eps, t, eps_u, eps_c, scale, views, r):
    """(loss, d loss / d x0) of the x0-reconstruction form, every tensor float64 [N, C, H, W]."""
    n = x0.shape[0]
    x_t = release_x_t(x0, eps, t)
    eps_hat = eps_u + scale * (eps_c - eps_u)
    recon = release_predict_start(x_t, t, eps_hat)
    if r > 0:
        recon_nocfg = release_predict_start(x_t, t, eps_c)
        objects = n // views
        std_nocfg = recon_nocfg.reshape(objects, views, *x0.shape[1:]).std(dim=(1, 2, 3, 4))
        std_cfg = recon.reshape(objects, views, *x0.shape[1:]).std(dim=(1, 2, 3, 4))
        factor = (std_nocfg + 1e-8) / (std_cfg + 1e-8)             # [objects]
        per_row = factor.repeat_interleave(views).reshape(n, 1, 1, 1)
        recon = r * recon * per_row + (1 - r) * recon
    loss = 0.5 * ((x0 - recon) ** 2).sum() / n
    return loss, (x0 - recon) / n


def release_classic(x0, eps, t, eps_u, eps_c, scale):
    """(loss, d loss / d x0) of the classic form, float64."""
    n = x0.shape[0]
    eps_hat = eps_u + scale * (eps_c - eps_u)
    w = 1.0 - release_alphas_cumprod()[t]
    grad = torch.nan_to_num(w * (eps_hat - eps))
    return 0.5 * (grad ** 2).sum() / n, grad / n


# -- running the plugin with its random draws fixed and its UNet recorded --------------------

def groups(n_objects: int) -> Cameras:
    az = torch.arange(VIEWS * n_objects, dtype=torch.float32) * 90.0 + 10.0
    el = torch.tensor([5.0, 15.0, 25.0, 10.0] * n_objects)
    return Cameras.from_spherical(el, az, 2.5, 40.0, views_per_object=VIEWS)


def renders(n_objects: int, size: int) -> torch.Tensor:
    """[N, H, W, 3]: the objects and their views differ in contrast, so the per-object std,
    a per-view std and one std over the whole batch all give different factors."""
    gen = torch.Generator().manual_seed(7)
    rgb = torch.rand(VIEWS * n_objects, size, size, 3, generator=gen)
    contrast = torch.linspace(1.0, 0.25, VIEWS * n_objects).view(-1, 1, 1, 1)
    contrast = contrast * torch.tensor([1.0, 0.6, 0.9, 0.4] * n_objects).view(-1, 1, 1, 1)
    return (0.5 + (rgb - 0.5) * contrast).requires_grad_(True)


#: per-row amplitudes of the conditional answer's extra term (views and objects differ)
AMPLITUDES = (1.0, 0.3, 0.7, 1.5, 0.5, 0.2, 0.9, 0.4)


def exaggerate(eps: torch.Tensor, context: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
    """A tiny random UNet answers |eps| ~ 0.05 and barely tells the picture or prompt from the
    unconditional context, so every guidance effect (the std factors, their per-object
    grouping, the cond/uncond order) would hide under float32 noise. The spy scales its answer
    and adds a conditional term whose size differs per view and per object; the expected
    values use whatever the plugin received, so the check is the same."""
    is_cond = (context == cond.to(context)).flatten(1).all(1).to(eps.dtype)
    pattern = torch.randn(eps.shape[1:], generator=torch.Generator().manual_seed(5)).to(eps)
    n = eps.shape[0] // 2
    amp = torch.tensor([AMPLITUDES[i % len(AMPLITUDES)] for i in range(n)] * 2).to(eps)
    return 10.0 * eps + (0.3 * is_cond * amp).view(-1, 1, 1, 1) * pattern


class Recorder:
    """Fixes the plugin's timestep and noise and records x0, the timestep range asked for and
    every UNet call."""

    def __init__(self, g: MultiViewSDS, monkeypatch, t: int, seed: int = 3):
        self.g, self.t, self.seed = g, t, seed
        self.x0, self.noise, self.ranges, self.calls = None, None, [], []
        prior, model = g.prior, g.prior.model
        real_encode, real_unet, real_randn_like = prior.encode, model.predict_noise, torch.randn_like

        def encode(images, generator=None):
            self.x0 = real_encode(images, generator=generator)
            self.x0.retain_grad()                   # the gradient w.r.t. the latents
            return self.x0

        def sample_timestep(t_min, t_max, generator=None):
            self.ranges.append((t_min, t_max))
            return self.t

        def randn_like(x, *args, **kwargs):
            if self.x0 is not None and x.shape == self.x0.shape:
                assert self.noise is None, "noise drawn twice in one step"
                gen = torch.Generator().manual_seed(self.seed)
                self.noise = torch.randn(x.shape, generator=gen, dtype=x.dtype)
                return self.noise.clone()
            return real_randn_like(x, *args, **kwargs)

        def predict_noise(x_t, t, context, camera, num_views):
            out = exaggerate(real_unet(x_t, t, context, camera, num_views), context,
                             g.context_cond)
            self.calls.append(dict(x_t=x_t.detach().clone(), t=t.clone(),
                                   context=context.detach().clone(), camera=camera.clone(),
                                   num_views=num_views, eps=out.detach().clone()))
            return out

        monkeypatch.setattr(prior, "encode", encode)
        monkeypatch.setattr(model, "predict_noise", predict_noise)
        monkeypatch.setattr(noise, "sample_timestep", sample_timestep)
        monkeypatch.setattr(torch, "randn_like", randn_like)

    def split(self):
        """(eps_uncond, eps_cond) [N, ...] float64, told apart by the context each row had
        (not by the plugin's own chunk order); checks the UNet's other inputs on the way."""
        assert len(self.calls) == 1, "one UNet call per step, both halves batched"
        call, g = self.calls[0], self.g
        n = self.x0.shape[0]
        ctx = call["context"]
        is_cond = (ctx == g.context_cond.to(ctx)).flatten(1).all(1)
        is_uncond = (ctx == g.context_uncond.to(ctx)).flatten(1).all(1)
        assert int(is_cond.sum()) == n and int(is_uncond.sum()) == n
        assert not (is_cond & is_uncond).any()
        # the same x_t, t and cameras in both halves, every view at the one t
        torch.testing.assert_close(call["x_t"][is_cond], call["x_t"][is_uncond], rtol=0, atol=0)
        torch.testing.assert_close(call["camera"][is_cond], call["camera"][is_uncond],
                                   rtol=0, atol=0)
        assert call["t"].tolist() == [self.t] * (2 * n)
        assert call["num_views"] == VIEWS
        return call["eps"][is_uncond].double(), call["eps"][is_cond].double()


@pytest.fixture(scope="module", params=["image-latent", "text-pixel"])
def guidance(request, image_model_dir, text_model_dir):
    """The plugin on a converted tiny model folder: Isotropic3D's shape (latent space, image
    conditioning) and MVDream's (pixel space, text conditioning)."""
    if request.param == "image-latent":
        picture = torch.rand(32, 32, 3, generator=torch.Generator().manual_seed(1))
        cfg = MultiViewSDS.Config(model=str(image_model_dir), guidance_scale=SCALE,
                                  precision="fp32")
        return MultiViewSDS(cfg, inputs=RunInputs(image=picture))
    cfg = MultiViewSDS.Config(model=str(text_model_dir), guidance_scale=SCALE,
                              negative_prompt="blurry", precision="fp32")
    return MultiViewSDS(cfg, inputs=RunInputs(prompt="a red chair"))


def run_step(g, monkeypatch, loss_form, t, std_rescale=0.5, n_objects=2, global_step=4000):
    g.cfg.loss, g.cfg.std_rescale = loss_form, std_rescale
    rec = Recorder(g, monkeypatch, t)
    rgb = renders(n_objects, g.prior.image_size)
    cams = groups(n_objects)
    loss = g({"rgb": rgb}, cams, StepInfo("s", 0, 0, 10000, global_step))["sds"]
    loss.backward()
    assert rec.ranges == [release_bounds(global_step)]        # one draw, the release's range
    assert rec.noise is not None
    # the UNet saw the release's x_t and the cameras of the prior's convention
    eps_u, eps_c = rec.split()
    x0 = rec.x0.detach().double()
    x_t = release_x_t(x0, rec.noise.double(), t)
    n = x0.shape[0]
    torch.testing.assert_close(rec.calls[0]["x_t"][:n].double(), x_t, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(rec.calls[0]["camera"][:n],
                               g.prior.camera_vectors(cams).to(rec.calls[0]["camera"]))
    return loss, rec, x0, eps_u, eps_c


# -- the tests ---------------------------------------------------------------------------------

#: relative tolerance on the loss and on the gradient (of its largest element); float32 maths
#: against float64 expectations lands near 1e-6
TOL = 2e-5


def assert_matches(got: torch.Tensor, want: torch.Tensor, wrong: dict) -> None:
    """got == want within TOL, and each of the ``wrong`` variants misses by over 100 TOL (so the
    comparison could tell them apart)."""
    scale = want.abs().max().item()
    torch.testing.assert_close(got.double(), want, rtol=TOL, atol=TOL * scale)
    for name, other in wrong.items():
        assert (other - want).abs().max().item() > 100 * TOL * scale, name


@pytest.mark.parametrize("t, std_rescale", [(20, 0.5), (500, 0.5), (980, 0.5), (500, 1.0),
                                            (980, 0.0)])
def test_reconstruction_form_matches_the_release(guidance, monkeypatch, t, std_rescale):
    loss, rec, x0, eps_u, eps_c = run_step(guidance, monkeypatch, "reconstruction", t,
                                           std_rescale)
    eps = rec.noise.double()
    want_loss, want_grad = release_reconstruction(x0, eps, t, eps_u, eps_c, SCALE, VIEWS,
                                                  std_rescale)
    assert loss.dtype == torch.float32 and loss.ndim == 0
    n = x0.shape[0]
    variants = {"cond and uncond swapped":
                release_reconstruction(x0, eps, t, eps_c, eps_u, SCALE, VIEWS, std_rescale),
                "no / N": (want_loss * n, want_grad * n)}
    if std_rescale > 0:
        variants.update({
            "std per view": release_reconstruction(x0, eps, t, eps_u, eps_c, SCALE, 1,
                                                   std_rescale),
            "std over the whole batch": release_reconstruction(x0, eps, t, eps_u, eps_c, SCALE,
                                                               n, std_rescale),
            "no std rescale": release_reconstruction(x0, eps, t, eps_u, eps_c, SCALE, VIEWS, 0.0),
        })
    torch.testing.assert_close(loss.double(), want_loss, rtol=TOL, atol=0)
    assert_matches(rec.x0.grad, want_grad, {k: v[1] for k, v in variants.items()})


@pytest.mark.parametrize("t", [20, 980])
def test_classic_form_matches_the_release(guidance, monkeypatch, t):
    loss, rec, x0, eps_u, eps_c = run_step(guidance, monkeypatch, "classic", t)
    eps = rec.noise.double()
    want_loss, want_grad = release_classic(x0, eps, t, eps_u, eps_c, SCALE)
    n = x0.shape[0]
    variants = {"cond and uncond swapped": release_classic(x0, eps, t, eps_c, eps_u, SCALE),
                "no / N": (want_loss * n, want_grad * n),
                "w = 1": (None, (want_grad / (1 - release_alphas_cumprod()[t]))),
                "the reconstruction form": release_reconstruction(x0, eps, t, eps_u, eps_c,
                                                                  SCALE, VIEWS, 0.5)}
    torch.testing.assert_close(loss.double(), want_loss, rtol=TOL, atol=0)
    assert_matches(rec.x0.grad, want_grad, {k: v[1] for k, v in variants.items()})


def test_one_object_of_four_views(guidance, monkeypatch):
    """A single object: one factor for its four views (not one per view)."""
    loss, rec, x0, eps_u, eps_c = run_step(guidance, monkeypatch, "reconstruction", 700,
                                           n_objects=1, global_step=0)
    eps = rec.noise.double()
    want_loss, want_grad = release_reconstruction(x0, eps, 700, eps_u, eps_c, SCALE, VIEWS, 0.5)
    torch.testing.assert_close(loss.double(), want_loss, rtol=TOL, atol=0)
    assert_matches(rec.x0.grad, want_grad, {
        "std per view": release_reconstruction(x0, eps, 700, eps_u, eps_c, SCALE, 1, 0.5)[1]})


# -- the pieces the release fixes exactly ---------------------------------------------------

def test_std_epsilon_sits_on_both_stds():
    """(std_nocfg + 1e-8) / (std_cfg + 1e-8): with a flat guided prediction (std 0) and a
    conditional one of std 1e-8 the factor is 2, so x0_hat becomes 0.5 * 2 x + 0.5 x = 1.5 x.
    (1e-8 on the denominator only gives 1; on neither divides by zero.)"""
    a = release_alphas_cumprod().float()
    t = torch.full((4,), 400)
    level = 1e-6
    x_t = torch.full((4, 2, 3, 3), level) * a[400].sqrt()        # x0_hat = level everywhere
    eps_guided = torch.zeros_like(x_t)
    pattern = torch.randn(4, 2, 3, 3, generator=torch.Generator().manual_seed(0),
                          dtype=torch.float64)
    pattern = (pattern - pattern.mean()) / pattern.std()
    # x0_cond = level - sqrt(1 - a) / sqrt(a) eps_cond, of std 1e-8
    eps_cond = (-pattern * 1e-8 * a[400].double().sqrt() / (1 - a[400].double()).sqrt()).float()
    x0 = torch.zeros_like(x_t, requires_grad=True)
    sds.reconstruction_loss(x0, x_t, t, eps_guided, eps_cond, a, 4, 0.5).backward()
    recon = -x0.grad * 4                                          # grad = (0 - recon) / N
    x0_hat = noise.predict_x0(x_t, t, eps_guided, a)
    assert x0_hat.std() < 1e-12
    torch.testing.assert_close(recon, 1.5 * x0_hat, rtol=1e-4, atol=0)


def test_classic_form_zeroes_nans_as_released():
    a = release_alphas_cumprod().float()
    x0 = torch.zeros(4, 1, 2, 2, requires_grad=True)
    eps_true = torch.zeros_like(x0)
    eps_guided = torch.ones_like(x0)
    eps_guided[1, 0, 0, 1] = float("nan")
    sds.classic_loss(x0, eps_true, torch.full((4,), 300), eps_guided, a).backward()
    want = torch.full_like(x0, (1 - release_alphas_cumprod()[300].item()) / 4)
    want[1, 0, 0, 1] = 0.0
    torch.testing.assert_close(x0.grad, want, rtol=1e-6, atol=0)


def test_schedule_is_mvdreams_scaled_linear():
    """The engine's alphas_cumprod (diffusers, float32 cumprod) agrees with LDM's float64 one
    to float32 accumulation error; the model folders carry the same schedule."""
    release = release_alphas_cumprod()
    ours = scaled_linear_scheduler().alphas_cumprod
    assert ours.shape == (T_TRAIN,)
    torch.testing.assert_close(ours.double(), release, rtol=2e-6, atol=0)
    # the LDM buffers predict_start_from_noise uses, at the ends of the t-range and beyond.
    # sqrt(1 / a - 1) cancels: at t = 0 (1 - a = 8.5e-4) a float32 a alone is only good to
    # ~1e-4 in it, hence the looser check there
    for t, rel in ((0, 1e-4), (20, 5e-6), (500, 5e-6), (980, 5e-6), (999, 5e-6)):
        a = ours[t].double()
        assert math.sqrt(1 / a) == pytest.approx(math.sqrt(1 / release[t]), rel=2e-6)
        assert math.sqrt(1 / a - 1) == pytest.approx(math.sqrt(1 / release[t] - 1), rel=rel)


def test_schedule_of_the_loaded_models(guidance):
    torch.testing.assert_close(guidance.prior.alphas_cumprod.double(), release_alphas_cumprod(),
                               rtol=2e-6, atol=0)
    assert guidance.prior.alphas_cumprod.dtype == torch.float32


def test_timestep_bounds_are_the_releases_ints():
    """timestep_bounds(p_min, p_max) == (int(1000 p_min), int(1000 p_max)) for every percent
    the release's annealing produces over 10000 steps, and the release's defaults."""
    assert noise.timestep_bounds(0.02, 0.98) == (20, 980)
    for step in range(0, 10001, 7):
        pmin = release_percent((0, 0.98, 0.02, 8000), step)
        pmax = release_percent((0, 0.98, 0.50, 8000), step)
        assert noise.timestep_bounds(pmin, pmax) == (int(1000 * pmin), int(1000 * pmax))


def test_annealed_range_follows_the_releases_annealing():
    """The plugin's t_range against threestudio's C() + int() at every step 0..10000: equal
    (the engine's Schedule interpolates as C() does, (v1 - v0) * ((s - s0) / (s1 - s0)); the
    other bracketing differs by an ulp, which int() turned into one step at 55 steps)."""
    g = MultiViewSDS.__new__(MultiViewSDS)     # only the schedule, no model
    g.cfg = MultiViewSDS.Config()
    for step in list(range(0, 10001)) + [20000]:
        assert g.t_range(step) == release_bounds(step), step


@pytest.mark.parametrize("lo, hi", [(980, 980), (20, 980), (500, 740), (0, 999)])
def test_sample_timestep_draws_what_the_release_draws(lo, hi):
    """randint(min_step, max_step + 1, [1]): the same number from the same generator state."""
    for seed in range(5):
        torch.manual_seed(seed)
        release = int(torch.randint(lo, hi + 1, [1], dtype=torch.long).item())
        torch.manual_seed(seed)
        assert noise.sample_timestep(lo, hi) == release
        gen = torch.Generator().manual_seed(seed)
        release = int(torch.randint(lo, hi + 1, [1], generator=gen).item())
        assert noise.sample_timestep(lo, hi, torch.Generator().manual_seed(seed)) == release
    gen = torch.Generator().manual_seed(0)
    assert {noise.sample_timestep(lo, hi, gen) for _ in range(400)} <= set(range(lo, hi + 1))


def test_random_draws_come_in_the_releases_order(text_model_dir):
    """Pixel model (encoding draws nothing): from one seed, the release draws t by randint
    and then the noise by randn_like; the plugin feeds its UNet exactly those."""
    g = MultiViewSDS(MultiViewSDS.Config(model=str(text_model_dir), precision="fp32"),
                     inputs=RunInputs(prompt="a red chair"))
    seen = []
    real = g.prior.model.predict_noise
    g.prior.model.predict_noise = lambda x_t, t, *a: seen.append((x_t, t)) or real(x_t, t, *a)
    rgb = renders(1, g.prior.image_size)
    torch.manual_seed(11)
    g({"rgb": rgb}, groups(1), StepInfo("s", 0, 0, 10000, 4000))
    x0 = rgb.detach().permute(0, 3, 1, 2) * 2 - 1
    torch.manual_seed(11)
    t = torch.randint(500, 740 + 1, [1], dtype=torch.long)
    eps = torch.randn_like(x0)
    x_t, t_in = seen[0]
    assert t_in.tolist() == [t.item()] * 8
    torch.testing.assert_close(x_t[:4].double(), release_x_t(x0.double(), eps.double(), t.item()),
                               rtol=1e-5, atol=1e-6)
