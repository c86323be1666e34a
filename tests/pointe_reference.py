"""An independent re-implementation of the ORIGINAL Point-E modules and maths, for tests.

Written from the published code's facts (openai/point-e, point_e/models/transformer.py,
point_e/diffusion/gaussian_diffusion.py, k_diffusion.py, sampler.py), not from our
implementation, and kept in the original's shapes and names:

* modules with the release's parameter names, so ``state_dict()`` has the release's keys:
  ``time_embed.c_fc`` / ``time_embed.c_proj``, ``ln_pre``, ``backbone.resblocks.N.{ln_1,
  attn.c_qkv, attn.c_proj, ln_2, mlp.c_fc, mlp.c_proj}``, ``ln_post``, ``input_proj``,
  ``output_proj``; ``clip_embed`` (a Linear for the image-vector model, a
  Sequential(LayerNorm, Linear) -> ``clip_embed.0`` / ``clip_embed.1`` for the grid models);
  the upsampler's ``cond_point_proj`` and ``channel_scales`` / ``channel_biases`` buffers;
* the release's layouts: clouds [N, C, T] (channels first), the fused qkv projection read
  per head (view [N, T, heads, 3 d], then split into q, k, v), the attention scale
  d^-1/4 applied to q and to k, softmax in float32 (float64 stays float64 here, so the
  float64 tests compare exactly);
* the release's GaussianDiffusion formulas (learned_range variance, epsilon prediction,
  mse + vb loss) and Karras/Heun sampler with its guidance and the sigma -> t mapping through
  scipy's interp1d, in whatever dtype the inputs have (float64 in the tests).

No CLIP: the conditions are given as the embeddings the released wrappers would compute.
"""

from __future__ import annotations

import math
from typing import Callable, Dict, Optional

import numpy as np
import torch
import torch.nn as nn


def ref_timestep_embedding(timesteps, dim, max_period=10000):
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(0, half, dtype=torch.float32) / half)
    args = timesteps[:, None].to(timesteps.dtype) * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


class MLP(nn.Module):
    def __init__(self, width):
        super().__init__()
        self.c_fc = nn.Linear(width, 4 * width)
        self.c_proj = nn.Linear(4 * width, width)
        self.gelu = nn.GELU()

    def forward(self, x):
        return self.c_proj(self.gelu(self.c_fc(x)))


class QKVMultiheadAttention(nn.Module):
    """The release's attention core: per-head interleaved q, k, v."""

    def __init__(self, heads):
        super().__init__()
        self.heads = heads

    def forward(self, qkv):
        bs, n_ctx, width = qkv.shape
        attn_ch = width // self.heads // 3
        scale = 1 / math.sqrt(math.sqrt(attn_ch))
        qkv = qkv.view(bs, n_ctx, self.heads, -1)
        q, k, v = torch.split(qkv, attn_ch, dim=-1)
        weight = torch.einsum("bthc,bshc->bhts", q * scale, k * scale)
        wdtype = weight.dtype       # softmax in float32 as released (float64 kept for tests)
        weight = torch.softmax(weight.to(torch.promote_types(wdtype, torch.float32)),
                               dim=-1).type(wdtype)
        return torch.einsum("bhts,bshc->bthc", weight, v).reshape(bs, n_ctx, -1)


class MultiheadAttention(nn.Module):
    def __init__(self, width, heads):
        super().__init__()
        self.c_qkv = nn.Linear(width, 3 * width)
        self.c_proj = nn.Linear(width, width)
        self.attention = QKVMultiheadAttention(heads)

    def forward(self, x):
        return self.c_proj(self.attention(self.c_qkv(x)))


class ResidualAttentionBlock(nn.Module):
    def __init__(self, width, heads):
        super().__init__()
        self.attn = MultiheadAttention(width, heads)
        self.ln_1 = nn.LayerNorm(width)
        self.mlp = MLP(width)
        self.ln_2 = nn.LayerNorm(width)

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class Transformer(nn.Module):
    def __init__(self, width, layers, heads):
        super().__init__()
        self.width = width
        self.resblocks = nn.ModuleList([ResidualAttentionBlock(width, heads)
                                        for _ in range(layers)])

    def forward(self, x):
        for block in self.resblocks:
            x = block(x)
        return x


class PointDiffusionTransformer(nn.Module):
    """The release's base class with time_token_cond=True (as every released config)."""

    def __init__(self, input_channels=6, output_channels=12, width=512, layers=12, heads=8):
        super().__init__()
        self.time_embed = MLP(width)
        self.ln_pre = nn.LayerNorm(width)
        self.backbone = Transformer(width, layers, heads)
        self.ln_post = nn.LayerNorm(width)
        self.input_proj = nn.Linear(input_channels, width)
        self.output_proj = nn.Linear(width, output_channels)

    def _time(self, t):
        return self.time_embed(ref_timestep_embedding(t, self.backbone.width).to(
            self.input_proj.weight.dtype))

    def forward(self, x, t):
        return self._forward_with_cond(x, [(self._time(t), True)])

    def _forward_with_cond(self, x, cond_as_token):
        h = self.input_proj(x.permute(0, 2, 1))
        for emb, as_token in cond_as_token:
            if not as_token:
                h = h + emb[:, None]
        extra = [(emb[:, None] if emb.dim() == 2 else emb) for emb, tok in cond_as_token if tok]
        if extra:
            h = torch.cat(extra + [h], dim=1)
        h = self.ln_pre(h)
        h = self.backbone(h)
        h = self.ln_post(h)
        if extra:
            h = h[:, sum(e.shape[1] for e in extra):]
        return self.output_proj(h).permute(0, 2, 1)


class CLIPImagePointDiffusionTransformer(PointDiffusionTransformer):
    """token_cond=True: one CLIP embedding token, scaled by sqrt(feature_dim)."""

    def __init__(self, feature_dim=768, cond_drop_prob=0.0, **kw):
        super().__init__(**kw)
        self.clip_embed = nn.Linear(feature_dim, self.backbone.width)
        self.cond_drop_prob = cond_drop_prob

    def forward(self, x, t, embeddings=None):
        t_embed = self._time(t)
        clip_out = embeddings if embeddings is not None else torch.zeros(
            len(x), self.clip_embed.in_features, dtype=x.dtype)
        clip_out = math.sqrt(clip_out.shape[1]) * clip_out
        clip_embed = self.clip_embed(clip_out)
        return self._forward_with_cond(x, [(clip_embed, True), (t_embed, True)])


class CLIPImageGridPointDiffusionTransformer(PointDiffusionTransformer):
    def __init__(self, grid_feature_dim=1024, cond_drop_prob=0.0, **kw):
        super().__init__(**kw)
        self.clip_embed = nn.Sequential(nn.LayerNorm(grid_feature_dim),
                                        nn.Linear(grid_feature_dim, self.backbone.width))
        self.cond_drop_prob = cond_drop_prob

    def forward(self, x, t, embeddings=None):
        t_embed = self._time(t)
        clip_embed = self.clip_embed(embeddings.permute(0, 2, 1))
        return self._forward_with_cond(x, [(t_embed, True), (clip_embed, True)])


class CLIPImageGridUpsamplePointDiffusionTransformer(PointDiffusionTransformer):
    def __init__(self, grid_feature_dim=1024, grid_tokens=256, channel_scales=None,
                 channel_biases=None, cond_drop_prob=0.0, **kw):
        super().__init__(**kw)
        self.cond_point_proj = nn.Linear(kw.get("input_channels", 6), self.backbone.width)
        self.register_buffer("channel_scales", torch.tensor(channel_scales))
        self.register_buffer("channel_biases", torch.tensor(channel_biases))
        self.clip_embed = nn.Sequential(nn.LayerNorm(grid_feature_dim),
                                        nn.Linear(grid_feature_dim, self.backbone.width))
        self.grid_feature_dim, self.grid_tokens = grid_feature_dim, grid_tokens
        self.cond_drop_prob = cond_drop_prob

    def forward(self, x, t, low_res=None, embeddings=None):
        t_embed = self._time(t)
        lr = low_res * self.channel_scales[None, :, None] + self.channel_biases[None, :, None]
        low_res_embed = self.cond_point_proj(lr.permute(0, 2, 1))
        if embeddings is None:
            embeddings = torch.zeros(len(x), self.grid_feature_dim, self.grid_tokens,
                                     dtype=x.dtype)
        clip_embed = self.clip_embed(embeddings.permute(0, 2, 1))
        return self._forward_with_cond(x, [(t_embed, True), (clip_embed, True),
                                           (low_res_embed, True)])


def randomize(model: nn.Module, seed: int, std: float = 0.3) -> nn.Module:
    """Every parameter random (the release zeroes output_proj; tests need signal)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("weight") and ("ln" in name or "clip_embed.0" in name):
                p.copy_(1 + 0.2 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(std * torch.randn(p.shape, generator=g))
    return model


# -- the release's diffusion maths (gaussian_diffusion.py), in the inputs' dtype ---------

def ref_cosine_betas(n):
    def abar(t):
        return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2
    return np.array([min(1 - abar((i + 1) / n) / abar(i / n), 0.999) for i in range(n)])


def ref_linear_betas(n):
    scale = 1000 / n
    return np.linspace(scale * 0.0001, scale * 0.02, n, dtype=np.float64)


class RefGaussianDiffusion:
    def __init__(self, betas, channel_scales, channel_biases):
        self.betas = np.array(betas, dtype=np.float64)
        self.num_timesteps = len(self.betas)
        alphas = 1.0 - self.betas
        self.alphas_cumprod = np.cumprod(alphas)
        self.alphas_cumprod_prev = np.append(1.0, self.alphas_cumprod[:-1])
        self.sqrt_recip_alphas_cumprod = np.sqrt(1.0 / self.alphas_cumprod)
        self.sqrt_recipm1_alphas_cumprod = np.sqrt(1.0 / self.alphas_cumprod - 1)
        self.posterior_variance = (self.betas * (1.0 - self.alphas_cumprod_prev)
                                   / (1.0 - self.alphas_cumprod))
        self.posterior_log_variance_clipped = np.log(
            np.append(self.posterior_variance[1], self.posterior_variance[1:]))
        self.posterior_mean_coef1 = (self.betas * np.sqrt(self.alphas_cumprod_prev)
                                     / (1.0 - self.alphas_cumprod))
        self.posterior_mean_coef2 = ((1.0 - self.alphas_cumprod_prev) * np.sqrt(alphas)
                                     / (1.0 - self.alphas_cumprod))
        self.channel_scales = np.array(channel_scales)
        self.channel_biases = np.array(channel_biases)

    def _ex(self, arr, t, x):
        res = torch.from_numpy(arr)[t].to(x.dtype)
        return res.view(-1, *([1] * (x.dim() - 1))) + torch.zeros_like(x)

    def scale_channels(self, x):          # x [N, C, T]
        return (x * torch.from_numpy(self.channel_scales).to(x)[None, :, None]
                + torch.from_numpy(self.channel_biases).to(x)[None, :, None])

    def unscale_channels(self, x):
        return ((x - torch.from_numpy(self.channel_biases).to(x)[None, :, None])
                / torch.from_numpy(self.channel_scales).to(x)[None, :, None])

    def q_sample(self, x0, t, noise):
        return (self._ex(np.sqrt(self.alphas_cumprod), t, x0) * x0
                + self._ex(np.sqrt(1 - self.alphas_cumprod), t, x0) * noise)

    def q_posterior(self, x0, xt, t):
        mean = self._ex(self.posterior_mean_coef1, t, xt) * x0 + \
            self._ex(self.posterior_mean_coef2, t, xt) * xt
        return mean, self._ex(self.posterior_log_variance_clipped, t, xt)

    def p_mean_variance(self, model, x, t, clip_denoised, model_kwargs):
        C = x.shape[1]
        out = model(x, t, **model_kwargs)
        eps, var_values = torch.split(out, C, dim=1)
        min_log = self._ex(self.posterior_log_variance_clipped, t, x)
        max_log = self._ex(np.log(self.betas), t, x)
        frac = (var_values + 1) / 2
        log_var = frac * max_log + (1 - frac) * min_log
        x0 = (self._ex(self.sqrt_recip_alphas_cumprod, t, x) * x
              - self._ex(self.sqrt_recipm1_alphas_cumprod, t, x) * eps)
        if clip_denoised:
            x0 = x0.clamp(-1, 1)
        mean, _ = self.q_posterior(x0, x, t)
        return {"mean": mean, "log_variance": log_var, "pred_xstart": x0}

    def training_losses(self, model, x_start, t, noise, model_kwargs=None):
        """x_start [N, C, T] raw units -> {loss, mse, vb} (loss_type mse, learned_range)."""
        x_start = self.scale_channels(x_start)
        x_t = self.q_sample(x_start, t, noise)
        out = model(x_t, t, **(model_kwargs or {}))
        C = x_t.shape[1]
        eps, var_values = torch.split(out, C, dim=1)
        frozen = torch.cat([eps.detach(), var_values], dim=1)
        true_mean, true_logvar = self.q_posterior(x_start, x_t, t)
        p = self.p_mean_variance(lambda *a, **k: frozen, x_t, t, False, {})
        kl = 0.5 * (-1.0 + p["log_variance"] - true_logvar
                    + torch.exp(true_logvar - p["log_variance"])
                    + (true_mean - p["mean"]) ** 2 * torch.exp(-p["log_variance"]))
        kl = kl.flatten(1).mean(1) / np.log(2.0)
        vb = torch.where(t == 0, torch.zeros_like(kl), kl)    # discretized_t0=False: no NLL
        mse = ((noise - eps) ** 2).flatten(1).mean(1)
        return {"loss": mse + vb, "mse": mse, "vb": vb}


def ref_diffusion(schedule: str, n: int = 1024) -> RefGaussianDiffusion:
    betas = ref_cosine_betas(n) if schedule == "cosine" else ref_linear_betas(n)
    return RefGaussianDiffusion(betas, [2.0, 2.0, 2.0, 0.007843137255, 0.007843137255,
                                        0.007843137255], [0.0, 0.0, 0.0, -1.0, -1.0, -1.0])


# -- the release's Karras sampler (k_diffusion.py + sampler.py) ---------------------------

def ref_get_sigmas_karras(n, sigma_min, sigma_max, rho=7.0):
    ramp = torch.linspace(0, 1, n)
    min_inv_rho = sigma_min ** (1 / rho)
    max_inv_rho = sigma_max ** (1 / rho)
    sigmas = (max_inv_rho + ramp * (min_inv_rho - max_inv_rho)) ** rho
    return torch.cat([sigmas, sigmas.new_zeros([1])])


class RefGaussianToKarrasDenoiser:
    def __init__(self, model, diffusion):
        from scipy import interpolate

        self.model = model
        self.diffusion = diffusion
        self.alpha_cumprod_to_t = interpolate.interp1d(diffusion.alphas_cumprod,
                                                       np.arange(0, diffusion.num_timesteps))

    def sigma_to_t(self, sigma):
        alpha_cumprod = 1.0 / (sigma ** 2 + 1)
        if alpha_cumprod > self.diffusion.alphas_cumprod[0]:
            return 0
        elif alpha_cumprod <= self.diffusion.alphas_cumprod[-1]:
            return self.diffusion.num_timesteps - 1
        return float(self.alpha_cumprod_to_t(alpha_cumprod))

    def denoise(self, x_t, sigmas, clip_denoised, model_kwargs):
        t = torch.tensor([self.sigma_to_t(s) for s in sigmas.cpu().numpy()], dtype=torch.long)
        c_in = (1.0 / (sigmas ** 2 + 1) ** 0.5)[:, None, None]
        out = self.diffusion.p_mean_variance(self.model, x_t * c_in, t, clip_denoised,
                                             model_kwargs)
        return out["pred_xstart"]


def ref_karras_sample(diffusion, model, shape, steps, model_kwargs, sigma_min, sigma_max,
                      rho=7.0, s_churn=0.0, guidance_scale=0.0, clip_denoised=True,
                      generator=None, dtype=torch.float32,
                      on_denoise: Optional[Callable] = None):
    """The released karras_sample_progressive + sample_heun for a GaussianDiffusion; returns
    the unscaled last pred_xstart [N, C, T]. ``model_kwargs`` are already doubled (cond,
    zeros) when guiding, as PointCloudSampler does."""
    s_tmin, s_tmax, s_noise = 0.0, float("inf"), 1.0
    sigmas = ref_get_sigmas_karras(steps, sigma_min, sigma_max, rho)
    x = torch.randn(*shape, generator=generator).to(dtype) * sigma_max
    kd = RefGaussianToKarrasDenoiser(model, diffusion)

    def denoiser(x_t, sigma):
        return kd.denoise(x_t, sigma, clip_denoised, model_kwargs)

    if guidance_scale != 0 and guidance_scale != 1:
        def guided(x_t, sigma):
            x_0 = denoiser(torch.cat([x_t, x_t]), torch.cat([sigma, sigma]))
            cond_x_0, uncond_x_0 = torch.split(x_0, len(x_0) // 2, dim=0)
            return uncond_x_0 + guidance_scale * (cond_x_0 - uncond_x_0)
    else:
        guided = denoiser

    s_in = x.new_ones([x.shape[0]])
    denoised = None
    for i in range(len(sigmas) - 1):
        gamma = (min(s_churn / (len(sigmas) - 1), 2 ** 0.5 - 1)
                 if s_tmin <= sigmas[i] <= s_tmax else 0.0)
        eps = torch.randn(*x.shape, generator=generator).to(dtype) * s_noise
        sigma_hat = sigmas[i] * (gamma + 1)
        if gamma > 0:
            x = x + eps * (sigma_hat ** 2 - sigmas[i] ** 2) ** 0.5
        denoised = guided(x, sigma_hat * s_in)
        if on_denoise is not None:
            on_denoise(i, denoised)
        d = (x - denoised) / sigma_hat
        dt = sigmas[i + 1] - sigma_hat
        if sigmas[i + 1] == 0:
            x = x + d * dt
        else:
            x_2 = x + d * dt
            denoised_2 = guided(x_2, sigmas[i + 1] * s_in)
            d_2 = (x_2 - denoised_2) / sigmas[i + 1]
            x = x + (d + d_2) / 2 * dt
    return diffusion.unscale_channels(denoised)


def ref_sample_stages(stages, batch_size: int, model_kwargs: Dict, generator=None,
                      dtype=torch.float32):
    """PointCloudSampler.sample_batch: ``stages`` is a list of dicts (model, diffusion,
    num_points, guidance_scale, steps, sigma_min, sigma_max, s_churn); returns [N, 6, K]."""
    samples = None
    for st in stages:
        kwargs = dict(model_kwargs)
        if samples is not None:
            kwargs["low_res"] = samples
        if st["guidance_scale"] not in (0, 1):
            kwargs = {k: torch.cat([v, torch.zeros_like(v)]) for k, v in kwargs.items()}
        out = ref_karras_sample(st["diffusion"], st["model"], (batch_size, 6, st["num_points"]),
                                st["steps"], kwargs, st["sigma_min"], st["sigma_max"],
                                s_churn=st["s_churn"], guidance_scale=st["guidance_scale"],
                                generator=generator, dtype=dtype)
        samples = out if samples is None else torch.cat([samples, out], dim=-1)
    return samples
