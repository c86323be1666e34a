"""Compress3D's second and third models (our implementation from the paper; no code or weights
of it are public): the **shape-embedding prior** and the **triplane latent diffusion**.

Both are diffusion models over the triplane autoencoder's space
(:mod:`guidance.compress3d.autoencoder`), conditioned on a picture's CLIP image embedding
``e`` ``[B, D]`` (unit norm, as the point models read it):

* the prior draws the shape embedding ``s`` ``[B, S]`` (S = 3 c: the latent's per-plane,
  per-channel texel means, :meth:`TriplaneAutoencoder.shape_embedding`) given ``e``. Its
  denoiser (:class:`ShapePriorNet`) is an MLP of residual blocks, every block told the
  timestep and ``e``;
* the latent diffusion draws the latent ``z`` ``[B, 3, c, r, r]`` given ``e`` and ``s``. Its
  denoiser (:class:`TriplaneDenoiser`) is a transformer over the ``3 r^2`` texel tokens of the
  three planes (a learnt position per plane and texel, so attention relates the planes as the
  paper's 3D-aware layers do) with three condition tokens in front: the timestep, ``e`` and
  ``s`` (``shape_condition: false``, the paper's ablation, leaves ``s`` out).

Both train on the v-prediction target with a cosine noise schedule (diffusers'
``DDPMScheduler``: ``add_noise``, ``get_velocity``) on **normalised** quantities: the latent
per plane and channel, and ``s`` per entry, by the training set's means and standard
deviations, kept as buffers so a saved model carries them. Classifier-free guidance: with
probability ``cfg_dropout`` a row's conditions are zeroed (for the latent model ``e`` and ``s``
together), and sampling (DDIM, ``eta = 0``, trailing timesteps) mixes
``uncond + scale * (cond - uncond)``.

At training the latent model reads the **true** ``s`` of its target latent; at sampling it reads
the prior's draw (the paper's two-stage inference).

``cond_tokens: K > 1`` conditions both models on the embeddings of a group of K views
``[B, K, D]`` instead of one picture (One-2-3-45++'s 3D prior conditioned on generated views):
the prior reads them side by side, the latent denoiser as K condition tokens.

Example::

    model = Compress3DDiffusion(LatentDiffusionConfig(latent_shape=(3, 4, 8, 8), cond_dim=64))
    losses = model.losses(latents, embeddings, generator=g)        # {"prior", "latent"}
    z, s = model.sample(embeddings, steps=25, guidance_scale=3.0, generator=g)
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn as nn
from torch import Tensor

from engine.errors import ConfigError
from guidance.compress3d.folders import build_and_load, read_model_record, save_model_folder

KIND = "compress3d-latent-diffusion"


@dataclass
class LatentDiffusionConfig:
    """Sizes of the two denoisers and their noise schedule."""

    latent_shape: List[int] = field(default_factory=lambda: [3, 4, 8, 8])  # [3, c, r, r]
    cond_dim: int = 64                 # the CLIP image embedding's size (set by the run)
    # embeddings per condition: 1 (one picture, Compress3D) or K (the K views of a generated
    # group, One-2-3-45++'s multi-view-conditioned 3D prior); e is [B, D] or [B, K, D]
    cond_tokens: int = 1
    width: int = 128                   # latent denoiser: token width
    layers: int = 4                    # ... transformer layers
    heads: int = 4
    prior_width: int = 256             # shape prior: MLP width
    prior_layers: int = 3              # ... residual blocks
    shape_condition: bool = True       # the latent model reads the shape embedding
    timesteps: int = 1000
    beta_schedule: str = "squaredcos_cap_v2"

    def __post_init__(self):
        shape = list(self.latent_shape)
        if len(shape) != 4 or shape[0] != 3 or min(shape) < 1:
            raise ConfigError(f"latent_shape: expected [3, c, r, r], got {shape}")
        self.latent_shape = shape
        for key in ("cond_dim", "cond_tokens", "width", "layers", "heads", "prior_width",
                    "prior_layers"):
            if int(getattr(self, key)) < 1:
                raise ConfigError(f"{key}: must be >= 1, got {getattr(self, key)}")
        if self.width % self.heads:
            raise ConfigError(f"width: {self.width} is not a multiple of heads ({self.heads})")
        if not 2 <= self.timesteps <= 10000:
            raise ConfigError(f"timesteps: must be in [2, 10000], got {self.timesteps}")
        if self.beta_schedule not in ("squaredcos_cap_v2", "linear", "scaled_linear"):
            raise ConfigError(f"beta_schedule: '{self.beta_schedule}' is not squaredcos_cap_v2, "
                              "linear or scaled_linear")

    @property
    def shape_dim(self) -> int:
        return 3 * self.latent_shape[1]

    @property
    def tokens(self) -> int:
        return 3 * self.latent_shape[2] * self.latent_shape[3]


def timestep_embedding(t: Tensor, dim: int) -> Tensor:
    """Sinusoidal embedding of timesteps ``t`` [B] (any dtype) -> [B, dim] (float32):
    ``[cos(t w_k), sin(t w_k)]`` with ``w_k = 10000^(-k / (dim / 2))``."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=t.device) / max(half, 1))
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    return nn.functional.pad(emb, (0, dim - 2 * half))


class _Block(nn.Module):
    """x + MLP(LN(x) * (1 + scale) + shift), scale and shift from the condition vector."""

    def __init__(self, width: int):
        super().__init__()
        self.norm = nn.LayerNorm(width, elementwise_affine=False)
        self.film = nn.Linear(width, 2 * width)
        self.mlp = nn.Sequential(nn.Linear(width, 2 * width), nn.SiLU(), nn.Linear(2 * width, width))
        nn.init.zeros_(self.mlp[-1].weight)
        nn.init.zeros_(self.mlp[-1].bias)

    def forward(self, x: Tensor, cond: Tensor) -> Tensor:
        scale, shift = self.film(cond).chunk(2, dim=-1)
        return x + self.mlp(self.norm(x) * (1 + scale) + shift)


def condition_tokens(e: Tensor, tokens: int) -> Tensor:
    """Embeddings [B, D] or [B, K, D] -> [B, K, D], checking K against the model's."""
    if e.dim() == 2:
        e = e[:, None]
    if e.dim() != 3 or e.shape[1] != tokens:
        raise ValueError(f"this model reads {tokens} embedding(s) per condition, [B, {tokens}, D]"
                         f"; got {tuple(e.shape)}")
    return e


class ShapePriorNet(nn.Module):
    """Denoiser of the shape embedding: (s_t [B, S], t [B], e [B, D] or [B, K, D]) -> v [B, S];
    the K embeddings are read side by side."""

    def __init__(self, c: LatentDiffusionConfig):
        super().__init__()
        w = c.prior_width
        self.time = nn.Sequential(nn.Linear(w, w), nn.SiLU(), nn.Linear(w, w))
        self.cond = nn.Linear(c.cond_tokens * c.cond_dim, w)
        self.tokens = c.cond_tokens
        self.x_in = nn.Linear(c.shape_dim, w)
        self.blocks = nn.ModuleList(_Block(w) for _ in range(c.prior_layers))
        self.out = nn.Sequential(nn.LayerNorm(w), nn.Linear(w, c.shape_dim))
        self.width = w

    def forward(self, x: Tensor, t: Tensor, e: Tensor) -> Tensor:
        e = condition_tokens(e, self.tokens).flatten(1)
        cond = nn.functional.silu(self.time(timestep_embedding(t, self.width)) + self.cond(e))
        h = self.x_in(x)
        for block in self.blocks:
            h = block(h, cond)
        return self.out(h)


class TriplaneDenoiser(nn.Module):
    """Denoiser of the triplane latent: (z_t [B, 3, c, r, r], t [B], e [B, D] or [B, K, D],
    s [B, S] or None) -> v [B, 3, c, r, r]. Tokens: [time, e_1..e_K, (s), texels...];
    pre-norm transformer."""

    def __init__(self, c: LatentDiffusionConfig):
        super().__init__()
        w = c.width
        ch = c.latent_shape[1]
        self.config = c
        self.time = nn.Sequential(nn.Linear(w, w), nn.SiLU(), nn.Linear(w, w))
        self.cond = nn.Linear(c.cond_dim, w)
        self.shape = nn.Linear(c.shape_dim, w) if c.shape_condition else None
        self.x_in = nn.Linear(ch, w)
        self.pos = nn.Parameter(torch.randn(c.tokens + 1 + c.cond_tokens + int(c.shape_condition),
                                            w) * 0.02)
        layer = nn.TransformerEncoderLayer(w, c.heads, 4 * w, dropout=0.0, activation="gelu",
                                           batch_first=True, norm_first=True)
        self.transformer = nn.TransformerEncoder(layer, c.layers, enable_nested_tensor=False)
        self.out_norm = nn.LayerNorm(w)
        self.x_out = nn.Linear(w, ch)
        nn.init.zeros_(self.x_out.weight)
        nn.init.zeros_(self.x_out.bias)

    def forward(self, x: Tensor, t: Tensor, e: Tensor, s: Optional[Tensor] = None) -> Tensor:
        b, three, ch, r, r2 = x.shape
        w = self.config.width
        tokens = self.x_in(x.permute(0, 1, 3, 4, 2).reshape(b, three * r * r2, ch))
        cond = [self.time(timestep_embedding(t, w))[:, None],
                self.cond(condition_tokens(e, self.config.cond_tokens))]
        if self.shape is not None:
            if s is None:
                raise ValueError("this latent model reads the shape embedding; pass s")
            cond.append(self.shape(s)[:, None])
        h = torch.cat(cond + [tokens], dim=1) + self.pos
        h = self.out_norm(self.transformer(h))[:, sum(c.shape[1] for c in cond):]
        v = self.x_out(h)                                                # [B, 3 r r, c]
        return v.reshape(b, three, r, r2, ch).permute(0, 1, 4, 2, 3)


def _schedulers(c: LatentDiffusionConfig):
    from diffusers import DDIMScheduler, DDPMScheduler

    train = DDPMScheduler(num_train_timesteps=c.timesteps, beta_schedule=c.beta_schedule,
                          prediction_type="v_prediction", clip_sample=False)
    sample = DDIMScheduler.from_config(train.config, timestep_spacing="trailing",
                                       set_alpha_to_one=False)
    return train, sample


class Compress3DDiffusion(nn.Module):
    """The shape prior and the latent denoiser, with the normalisation statistics."""

    def __init__(self, config: LatentDiffusionConfig = None):
        super().__init__()
        self.config = c = config or LatentDiffusionConfig()
        self.prior = ShapePriorNet(c)
        self.denoiser = TriplaneDenoiser(c)
        ch = c.latent_shape[1]
        self.register_buffer("latent_mean", torch.zeros(3, ch, 1, 1))
        self.register_buffer("latent_std", torch.ones(3, ch, 1, 1))
        self.register_buffer("shape_mean", torch.zeros(c.shape_dim))
        self.register_buffer("shape_std", torch.ones(c.shape_dim))
        self.train_scheduler, self.sample_scheduler = _schedulers(c)

    # -- normalisation --------------------------------------------------------------------
    @torch.no_grad()
    def set_statistics(self, latents: Tensor) -> None:
        """Means and standard deviations of training latents [N, 3, c, r, r] (per plane and
        channel) and of their shape embeddings (per entry); a floor of 1e-3 on the std."""
        self.latent_mean.copy_(latents.mean(dim=(0, 3, 4))[..., None, None])
        self.latent_std.copy_(latents.std(dim=(0, 3, 4)).clamp_min(1e-3)[..., None, None])
        s = shape_embedding(latents)
        self.shape_mean.copy_(s.mean(0))
        self.shape_std.copy_(s.std(0).clamp_min(1e-3))

    def normalise(self, latents: Tensor) -> Tuple[Tensor, Tensor]:
        """Latents [B, 3, c, r, r] -> (normalised latent, normalised shape embedding [B, S])."""
        return ((latents - self.latent_mean) / self.latent_std,
                (shape_embedding(latents) - self.shape_mean) / self.shape_std)

    # -- training -------------------------------------------------------------------------
    def losses(self, latents: Tensor, embeddings: Tensor, generator: torch.Generator = None,
               cfg_dropout: float = 0.1) -> Dict[str, Tensor]:
        """v-prediction MSE of both denoisers on latents [B, 3, c, r, r] (autoencoder units)
        with embeddings [B, D]; one timestep per row and model, fresh noise, conditions zeroed
        for ``cfg_dropout`` of the rows. Draws from ``generator`` (CPU) in a fixed order."""
        sched = self.train_scheduler
        device = latents.device
        b = latents.shape[0]
        z0, s0 = self.normalise(latents)
        keep = (torch.rand(b, generator=generator) >= cfg_dropout).float().to(device)
        e = embeddings * keep.reshape(b, *[1] * (embeddings.dim() - 1))
        out = {}
        for name, x0 in (("prior", s0), ("latent", z0)):
            t = torch.randint(0, self.config.timesteps, (b,), generator=generator)
            noise = torch.randn(x0.shape, generator=generator).to(device)
            t = t.to(device)
            xt = sched.add_noise(x0, noise, t)
            target = sched.get_velocity(x0, noise, t)
            if name == "prior":
                pred = self.prior(xt, t, e)
            else:
                pred = self.denoiser(xt, t, e, s0 * keep[:, None] if self.config.shape_condition
                                     else None)
            out[name] = (pred - target).square().mean()
        return out

    def forward(self, latents: Tensor, embeddings: Tensor, generator: torch.Generator = None,
                cfg_dropout: float = 0.1) -> Dict[str, Tensor]:
        """:meth:`losses` (so a wrapped module trains through its forward)."""
        return self.losses(latents, embeddings, generator, cfg_dropout)

    # -- sampling -------------------------------------------------------------------------
    def _ddim(self, net, shape, cond: Tuple[Tensor, ...], uncond: Tuple[Tensor, ...],
              steps: int, scale: float, generator: torch.Generator) -> Tensor:
        sched = self.sample_scheduler
        sched.set_timesteps(steps)
        device = cond[0].device
        x = torch.randn(shape, generator=generator).to(device)
        for t in sched.timesteps:
            tt = torch.full((shape[0],), int(t), device=device, dtype=torch.long)
            if scale == 1.0:
                v = net(x, tt, *cond)
            else:
                both = net(torch.cat([x, x]), torch.cat([tt, tt]),
                           *[torch.cat([c, u]) if c is not None else None
                             for c, u in zip(cond, uncond)])
                vc, vu = both.chunk(2)
                v = vu + scale * (vc - vu)
            x = sched.step(v, t, x, eta=0.0).prev_sample
        return x

    @torch.no_grad()
    def sample_shape(self, embeddings: Tensor, steps: int = 25, guidance_scale: float = 3.0,
                     generator: torch.Generator = None) -> Tensor:
        """Shape embeddings [B, S] (normalised) drawn by the prior given embeddings [B, D]."""
        b = embeddings.shape[0]
        return self._ddim(self.prior, (b, self.config.shape_dim), (embeddings,),
                          (torch.zeros_like(embeddings),), steps, guidance_scale, generator)

    @torch.no_grad()
    def sample(self, embeddings: Tensor, steps: int = 25, guidance_scale: float = 3.0,
               generator: torch.Generator = None, shape: Optional[Tensor] = None
               ) -> Tuple[Tensor, Optional[Tensor]]:
        """Latents [B, 3, c, r, r] (autoencoder units) for image embeddings [B, D]: the prior's
        shape embedding first (or ``shape`` given, normalised [B, S]), then the latent.
        Returns (latents, normalised shape embeddings or None without shape_condition)."""
        c = self.config
        b = embeddings.shape[0]
        zeros = torch.zeros_like(embeddings)
        s = None
        if c.shape_condition:
            s = shape if shape is not None else self.sample_shape(embeddings, steps,
                                                                  guidance_scale, generator)
        z = self._ddim(self.denoiser, (b, *c.latent_shape), (embeddings, s),
                       (zeros, torch.zeros_like(s) if s is not None else None), steps,
                       guidance_scale, generator)
        return z * self.latent_std + self.latent_mean, s

    # -- folders -------------------------------------------------------------------------
    def save_pretrained(self, folder, extra: dict = None) -> Path:
        return save_model_folder(self, folder, KIND, self.config, extra)

    @classmethod
    def read_record(cls, folder, key: str = "model") -> dict:
        """config.json of a saved model folder; one line naming ``key`` when it is not one."""
        return read_model_record(folder, KIND, "Compress3D model",
                                 "the toy one is models/toy/compress3d, or train one with "
                                 "python -m guidance.training recipe=toy-compress3d", key)

    @classmethod
    def from_pretrained(cls, folder, key: str = "model") -> "Compress3DDiffusion":
        return build_and_load(cls, LatentDiffusionConfig, cls.read_record(folder, key), folder,
                              key)


def shape_embedding(latents: Tensor) -> Tensor:
    """The global shape code of latents [B, 3, c, r, r] -> [B, 3 c]: texel means per plane
    and channel (the same as :meth:`TriplaneAutoencoder.shape_embedding`)."""
    return latents.mean(dim=(-1, -2)).flatten(1)


__all__ = ["LatentDiffusionConfig", "Compress3DDiffusion", "ShapePriorNet", "TriplaneDenoiser",
           "timestep_embedding", "shape_embedding"]
