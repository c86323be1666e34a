"""The released Point-E diffusion: schedules, training loss, Karras/Heun sampler.

Clouds are [B, K, 6]: x, y, z, r, g, b. In raw units xyz lie in about [-0.5, 0.5] and rgb in
0..255; the model works in its scaled space ``x_s = x * scales + biases`` with scales
[2, 2, 2, 1/127.5 x3] and biases [0, 0, 0, -1 x3] (xyz * 2, rgb / 127.5 - 1: all in [-1, 1]).

Schedules (T = 1024 steps, float64): the base models use the cosine schedule
``alpha_bar(s) = cos^2((s + 0.008) / 1.008 * pi / 2)``, ``beta_i = min(1 - alpha_bar((i+1)/T)
/ alpha_bar(i/T), 0.999)``; the upsampler linear betas from 1e-4 to 0.02, scaled by 1000/T.

The model predicts eps (channels 0..5) and a variance value v in [-1, 1] per channel
(channels 6..11, "learned_range"): ``log var = (v+1)/2 log beta_t + (1-v)/2 log beta~_t``
between the posterior variance beta~_t (its t=0 value clipped to that of t=1) and beta_t.

Training loss (improved DDPM, ``loss_type="mse"``): ``mse = mean (eps - eps_hat)^2`` plus
``vb = mean KL(q(x_{t-1} | x_t, x_0) || p(x_{t-1} | x_t)) / ln 2`` (bits per dimension)
computed with eps_hat detached, so the bound trains only the variance; at t = 0 the release
uses no decoder term (vb = 0 there).

Sampler as released (Karras et al. 2022, Algorithm 2, on the discrete model): sigmas
``(smax^(1/rho) + i/(n-1) (smin^(1/rho) - smax^(1/rho)))^rho`` then 0, in float32; each step
optionally raises sigma by ``gamma = min(s_churn / n, sqrt 2 - 1)`` with fresh noise, then a
Heun step (Euler into sigma = 0). The denoiser at sigma maps ``alpha = 1 / (sigma^2 + 1)`` to
a timestep by interpolating alphas_cumprod, truncated to an integer, feeds
``x / sqrt(sigma^2 + 1)`` to the model and returns its x0 prediction clamped to [-1, 1].
Classifier-free guidance runs the batch twice, the second half with every model input but
the points zeroed (the condition and the upsampler's coarse cloud), and mixes the clamped
predictions ``x0 = x0_u + s (x0_c - x0_u)``; the scale 0 or 1 means no guidance (as released).
The stage's result is the last x0 prediction, unscaled.
"""

from __future__ import annotations

import math
from typing import Dict, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import Tensor

from guidance.pointcloud.transformer import CHANNEL_BIASES, CHANNEL_SCALES, PointTransformer

TIMESTEPS = 1024
#: the released sampler settings per stage: base, upsampler
BASE_SAMPLER = dict(steps=64, sigma_min=1e-3, sigma_max=120.0, s_churn=3.0, rho=7.0,
                    guidance_scale=3.0)
UPSAMPLE_SAMPLER = dict(steps=64, sigma_min=1e-3, sigma_max=160.0, s_churn=0.0, rho=7.0,
                        guidance_scale=3.0)


def cosine_betas(steps: int = TIMESTEPS, max_beta: float = 0.999) -> Tensor:
    """beta_i = min(1 - abar((i+1)/T) / abar(i/T), max_beta), abar(s) = cos^2((s+0.008)/1.008
    pi/2), float64 [T]."""
    def abar(s: float) -> float:
        return math.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2
    return torch.tensor([min(1 - abar((i + 1) / steps) / abar(i / steps), max_beta)
                         for i in range(steps)], dtype=torch.float64)


def linear_betas(steps: int = TIMESTEPS) -> Tensor:
    """Ho et al.'s linear betas 1e-4..0.02 scaled by 1000/T, float64 [T]."""
    scale = 1000 / steps
    return torch.linspace(scale * 1e-4, scale * 0.02, steps, dtype=torch.float64)


class PointDiffusion:
    """The Gaussian diffusion of one Point-E stage (all tables float64 [T])."""

    def __init__(self, schedule: str = "cosine", steps: int = TIMESTEPS,
                 channel_scales: Sequence[float] = CHANNEL_SCALES,
                 channel_biases: Sequence[float] = CHANNEL_BIASES):
        if schedule not in ("cosine", "linear"):
            raise ValueError(f"unknown schedule {schedule!r}")
        self.schedule = schedule
        betas = cosine_betas(steps) if schedule == "cosine" else linear_betas(steps)
        self.betas = betas
        self.num_timesteps = steps
        ac = torch.cumprod(1 - betas, 0)
        prev = torch.cat([torch.ones(1, dtype=torch.float64), ac[:-1]])
        self.alphas_cumprod, self.alphas_cumprod_prev = ac, prev
        self.posterior_variance = betas * (1 - prev) / (1 - ac)
        pv = self.posterior_variance
        self.posterior_log_variance_clipped = torch.log(torch.cat([pv[1:2], pv[1:]]))
        self.posterior_mean_coef1 = betas * prev.sqrt() / (1 - ac)
        self.posterior_mean_coef2 = (1 - prev) * (1 - betas).sqrt() / (1 - ac)
        self.channel_scales = torch.tensor(channel_scales, dtype=torch.float64)
        self.channel_biases = torch.tensor(channel_biases, dtype=torch.float64)
        # alpha_bar -> timestep interpolation table, increasing in alpha_bar
        self._interp_alpha = ac.flip(0).numpy()
        self._interp_t = np.arange(steps, dtype=np.float64)[::-1].copy()

    @classmethod
    def for_model(cls, model) -> "PointDiffusion":
        """The diffusion a model (or its PointModelConfig) was trained with."""
        config = getattr(model, "config", model)
        return cls(schedule=config.schedule)

    # -- the model's space ------------------------------------------------------------
    def scale(self, cloud: Tensor) -> Tensor:
        """Raw units -> the model's space (last axis = channels)."""
        return cloud * self.channel_scales.to(cloud) + self.channel_biases.to(cloud)

    def unscale(self, x: Tensor) -> Tensor:
        """The model's space -> raw units."""
        return (x - self.channel_biases.to(x)) / self.channel_scales.to(x)

    # -- the process ------------------------------------------------------------------
    @staticmethod
    def _at(table: Tensor, t: Tensor, like: Tensor) -> Tensor:
        """table[t] shaped [B, 1, 1] in ``like``'s dtype and device."""
        values = table[t.long().cpu()].to(device=like.device, dtype=like.dtype)
        return values.view(-1, *([1] * (like.dim() - 1)))

    def q_sample(self, x0: Tensor, t: Tensor, noise: Tensor) -> Tensor:
        """x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) noise."""
        a = self._at(self.alphas_cumprod, t, x0)
        return a.sqrt() * x0 + (1 - a).sqrt() * noise

    def predict_x0(self, x_t: Tensor, t: Tensor, eps: Tensor) -> Tensor:
        """x0 = sqrt(1/abar_t) x_t - sqrt(1/abar_t - 1) eps."""
        a = self._at(self.alphas_cumprod, t, x_t)
        return (1 / a).sqrt() * x_t - (1 / a - 1).sqrt() * eps

    def posterior(self, x0: Tensor, x_t: Tensor, t: Tensor) -> Tuple[Tensor, Tensor]:
        """Mean and clipped log variance of q(x_{t-1} | x_t, x0)."""
        mean = (self._at(self.posterior_mean_coef1, t, x_t) * x0
                + self._at(self.posterior_mean_coef2, t, x_t) * x_t)
        return mean, self._at(self.posterior_log_variance_clipped, t, x_t)

    def model_log_variance(self, v: Tensor, t: Tensor) -> Tensor:
        """learned_range: v in [-1, 1] -> log variance between log beta~_t and log beta_t."""
        frac = (v + 1) / 2
        return (frac * self._at(self.betas.log(), t, v)
                + (1 - frac) * self._at(self.posterior_log_variance_clipped, t, v))

    # -- training ---------------------------------------------------------------------
    def training_losses(self, model: PointTransformer, cloud: Tensor, t: Optional[Tensor] = None,
                        cond: Optional[Tensor] = None, low_res: Optional[Tensor] = None,
                        noise: Optional[Tensor] = None,
                        generator: Optional[torch.Generator] = None) -> Dict[str, Tensor]:
        """The released loss for a batch of clouds [B, K, 6] in raw units: a dict of [B]
        tensors ``loss = mse + vb``, ``mse``, ``vb``. ``t`` defaults to uniform timesteps,
        ``noise`` to fresh Gaussian noise (both from ``generator``). The model's train mode
        decides the condition dropout."""
        x0 = self.scale(cloud.to(torch.promote_types(cloud.dtype, torch.float32)))
        b = x0.shape[0]
        if t is None:
            t = torch.randint(0, self.num_timesteps, (b,), generator=generator).to(x0.device)
        if noise is None:
            noise = torch.randn(x0.shape, generator=generator).to(x0)
        x_t = self.q_sample(x0, t, noise)
        out = model(x_t, t, cond=cond, low_res=low_res).to(x0.dtype)
        c = x0.shape[-1]
        eps, v = out[..., :c], out[..., c:]
        mse = ((noise - eps) ** 2).flatten(1).mean(1)
        vb = self.vb_bits(x0, x_t, t, eps.detach(), v)
        return {"loss": mse + vb, "mse": mse, "vb": vb}

    def vb_bits(self, x0: Tensor, x_t: Tensor, t: Tensor, eps: Tensor, v: Tensor) -> Tensor:
        """KL(q(x_{t-1}|x_t,x0) || p(x_{t-1}|x_t)) per row, mean over elements, in bits;
        0 where t = 0 (the release has no decoder term). p's mean uses the unclamped x0."""
        true_mean, true_logvar = self.posterior(x0, x_t, t)
        pred_mean, _ = self.posterior(self.predict_x0(x_t, t, eps), x_t, t)
        logvar = self.model_log_variance(v, t)
        kl = 0.5 * (-1.0 + logvar - true_logvar + torch.exp(true_logvar - logvar)
                    + (true_mean - pred_mean) ** 2 * torch.exp(-logvar))
        kl = kl.flatten(1).mean(1) / math.log(2.0)
        return torch.where(t.to(kl.device) == 0, torch.zeros_like(kl), kl)

    # -- sampling ---------------------------------------------------------------------
    def sigma_to_t(self, sigma: float) -> int:
        """The timestep whose alpha_bar is 1 / (sigma^2 + 1), interpolated, truncated."""
        alpha = 1.0 / (sigma ** 2 + 1)
        if alpha > self.alphas_cumprod[0].item():
            return 0
        if alpha <= self.alphas_cumprod[-1].item():
            return self.num_timesteps - 1
        return int(np.interp(alpha, self._interp_alpha, self._interp_t))

    def denoise(self, model: PointTransformer, x: Tensor, sigma: float,
                cond: Optional[Tensor] = None, low_res: Optional[Tensor] = None,
                clip: bool = True) -> Tensor:
        """The clamped x0 prediction [B, K, 6] of the noisy points x = x0 + sigma n."""
        t = self.sigma_to_t(sigma)
        x_in = x * (1.0 / (sigma ** 2 + 1) ** 0.5)
        tt = torch.full((x.shape[0],), t, device=x.device, dtype=torch.long)
        eps = model(x_in, tt, cond=cond, low_res=low_res)[..., :x.shape[-1]].to(x.dtype)
        x0 = self.predict_x0(x_in, tt, eps)
        return x0.clamp(-1, 1) if clip else x0


def karras_sigmas(steps: int, sigma_min: float, sigma_max: float, rho: float = 7.0) -> Tensor:
    """The Karras schedule, float32 [steps + 1] ending in 0 (as released)."""
    ramp = torch.linspace(0, 1, steps)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return torch.cat([(hi + ramp * (lo - hi)) ** rho, torch.zeros(1)])


def _guided(diffusion: PointDiffusion, model: PointTransformer, cond: Optional[Tensor],
            low_res: Optional[Tensor], scale: float, clip: bool):
    """x, sigma -> x0: conditional only, or the guided mix of conditional and zeroed inputs."""
    if scale in (0, 1):
        return lambda x, sigma: diffusion.denoise(model, x, sigma, cond, low_res, clip)
    both = [None if v is None else torch.cat([v, torch.zeros_like(v)]) for v in (cond, low_res)]

    def guided(x: Tensor, sigma: float) -> Tensor:
        x0 = diffusion.denoise(model, torch.cat([x, x]), sigma, both[0], both[1], clip)
        x0_c, x0_u = x0.chunk(2)
        return x0_u + scale * (x0_c - x0_u)
    return guided


@torch.no_grad()
def sample_stage(model: PointTransformer, diffusion: PointDiffusion, batch: int, points: int,
                 cond: Optional[Tensor] = None, low_res: Optional[Tensor] = None, *,
                 steps: int = 64, sigma_min: float = 1e-3, sigma_max: float = 120.0,
                 s_churn: float = 0.0, rho: float = 7.0, guidance_scale: float = 3.0,
                 s_tmin: float = 0.0, s_tmax: float = float("inf"), s_noise: float = 1.0,
                 clip_denoised: bool = True, generator: Optional[torch.Generator] = None,
                 dtype: torch.dtype = torch.float32) -> Tensor:
    """One stage of the released sampler: the last x0 prediction [B, points, 6] in raw
    units. Noise is drawn from ``generator`` on the model's device as [B, 6, K] (the
    release's layout, so a seed gives the release's sample), one draw per step."""
    device = model.device
    channels = model.config.channels
    denoiser = _guided(diffusion, model, cond, low_res, guidance_scale, clip_denoised)

    def randn() -> Tensor:
        n = torch.randn((batch, channels, points), generator=generator, device=device)
        return n.transpose(1, 2).to(dtype)

    sigmas = karras_sigmas(steps, sigma_min, sigma_max, rho)
    x = randn() * sigma_max
    x0 = x
    for i in range(steps):
        s = sigmas[i]
        gamma = min(s_churn / steps, 2 ** 0.5 - 1) if s_tmin <= s <= s_tmax else 0.0
        eps = randn() * s_noise
        s_hat = s * (gamma + 1)
        if gamma > 0:
            x = x + eps * (s_hat ** 2 - s ** 2) ** 0.5
        x0 = denoiser(x, s_hat.item())
        d = (x - x0) / s_hat
        dt = sigmas[i + 1] - s_hat
        if sigmas[i + 1] == 0:
            x = x + d * dt
        else:
            x2 = x + d * dt
            d2 = (x2 - denoiser(x2, sigmas[i + 1].item())) / sigmas[i + 1]
            x = x + (d + d2) / 2 * dt
    return diffusion.unscale(x0)


def condition_for(model: PointTransformer, condition) -> Optional[Tensor]:
    """The part of ``condition`` a model takes: a tensor as is, or from a dict
    ``{"embedding": [B, D], "grid": [B, C, L]}`` the embedding (image-vec) or the grid."""
    if not isinstance(condition, dict):
        return condition
    kind = model.config.kind
    if kind == "uncond":
        return None
    key = "embedding" if kind == "image-vec" else "grid"
    if key not in condition:
        raise ValueError(f"the {kind} model needs condition['{key}']")
    return condition[key]


def _batch_of(condition, batch: Optional[int]) -> int:
    if batch is not None:
        return batch
    values = list(condition.values()) if isinstance(condition, dict) else [condition]
    for v in values:
        if v is not None:
            return v.shape[0]
    raise ValueError("give batch= for unconditional sampling")


def _per_stage(value, n: int) -> list:
    return list(value) if isinstance(value, (list, tuple)) else [value] * n


def sample_cloud(base: PointTransformer, upsampler: Optional[PointTransformer], condition=None,
                 *, batch: Optional[int] = None, base_points: Optional[int] = None,
                 upsample_points: Optional[int] = None, steps=64,
                 guidance_scale=3.0, sigma_min=1e-3, sigma_max=(120.0, 160.0),
                 s_churn=(3.0, 0.0), rho: float = 7.0,
                 generator: Optional[torch.Generator] = None,
                 dtype: torch.dtype = torch.float32) -> Tensor:
    """Sample clouds as released: [B, K, 6] with xyz in raw units and rgb in [0, 1].

    ``condition``: None (unconditional models), a tensor for the base model (the embedding
    [B, D] or grid [B, C, L]; also given to the upsampler), or a dict with "embedding" and/or
    "grid" from which each model takes its own. ``steps``, ``guidance_scale``,
    ``sigma_min``, ``sigma_max``, ``s_churn``: one value for both stages or a (base,
    upsampler) pair. The upsampler denoises ``upsample_points`` new points (its config's by
    default) conditioned on the base's cloud (unclamped, raw units, as released); the result
    holds the base points first. rgb is clamped to 0..255 and divided by 255 (the release
    also rounds to integers). ``dtype``: the sampler's arithmetic (the models keep theirs)."""
    n_stages = 1 if upsampler is None else 2
    settings = {k: _per_stage(v, 2) for k, v in dict(
        steps=steps, guidance_scale=guidance_scale, sigma_min=sigma_min,
        sigma_max=sigma_max, s_churn=s_churn).items()}
    b = _batch_of(condition, batch)
    cloud = sample_stage(base, PointDiffusion.for_model(base), b,
                         base_points or base.config.points, condition_for(base, condition),
                         rho=rho, generator=generator, dtype=dtype,
                         **{k: v[0] for k, v in settings.items()})
    if n_stages == 2:
        new = sample_stage(upsampler, PointDiffusion.for_model(upsampler), b,
                           upsample_points or upsampler.config.points,
                           condition_for(upsampler, condition), low_res=cloud, rho=rho,
                           generator=generator, dtype=dtype,
                           **{k: v[1] for k, v in settings.items()})
        cloud = torch.cat([cloud, new], dim=1)
    return torch.cat([cloud[..., :3], cloud[..., 3:].clamp(0, 255) / 255.0], dim=-1)


__all__ = ["PointDiffusion", "cosine_betas", "linear_betas", "karras_sigmas", "sample_stage",
           "sample_cloud", "condition_for", "BASE_SAMPLER", "UPSAMPLE_SAMPLER", "TIMESTEPS"]
