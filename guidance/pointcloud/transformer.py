"""The point-cloud diffusion transformer family of Point-E, under our own module names.

A cloud of K points is a tensor [B, K, C] (C = 6: x, y, z, r, g, b in the model's scaled
space, see :mod:`guidance.pointcloud.diffusion`). Every point is one token; there is no
positional embedding, so the model is permutation-equivariant over the points and accepts
any K (``points`` records the count it was trained with). One forward pass:

    h_points = point_in(x)                                    [B, K, W]
    h_time   = time_mlp(sinusoid(t, W))                       [B, 1, W]
    prefix   = the condition tokens of the kind (below)       [B, P, W]
    h = norm_in(cat[prefix, h_points])                        [B, P + K, W]
    h = blocks(h)       pre-LN: h += attn(norm_attn(h)); h += mlp(norm_mlp(h))
    out = point_out(norm_out(h)[:, P:])                       [B, K, 12] = 6 eps + 6 variance

Kinds (token order as released; it does not change the result, attention ignores order):

* ``uncond``:     prefix [time]
* ``image-vec``:  prefix [cond_in(sqrt(D) * e), time] for one CLIP image embedding e [B, D]
  (unit norm, D = 768 for ViT-L/14; the sqrt(D) gives the features unit variance)
* ``image-grid``: prefix [time, cond_in(cond_norm(g^T))] for the ViT-L/14 patch grid
  g [B, 1024, 256] (channels first, as the released CLIP wrapper returns it: the last layer's
  256 patch tokens before ln_post, no CLS), i.e. 256 tokens
* ``upsample``:   prefix [time, grid tokens, coarse_in(c * coarse_scales + coarse_biases)] for
  the coarse cloud c [B, K', 6] in raw units (xyz, rgb 0..255; the stored buffers map it to
  the model's space); only the new points are denoised and returned.

A missing condition (``cond=None``) is the unconditional input as released: zeros. In
training mode each row's condition is zeroed with probability ``cond_drop_prob`` (the
classifier-free guidance dropout); the upsampler's coarse cloud is never dropped.

Attention: one fused ``qkv`` projection laid out [Q | K | V] (rows h*d..(h+1)*d of each part
are head h), scale d^-1/2. The release fuses them per head instead ([q_h k_h v_h] for each
head h in turn); :mod:`guidance.pointcloud.convert` reorders the rows.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Dict, List, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from engine.errors import ConfigError, did_you_mean

KINDS = ("uncond", "image-vec", "image-grid", "upsample")
SCHEDULES = ("cosine", "linear")
#: the model's space: xyz * 2 and rgb / 127.5 - 1 (the upsampler's coarse-cloud buffers)
CHANNEL_SCALES = (2.0, 2.0, 2.0, 1 / 127.5, 1 / 127.5, 1 / 127.5)
CHANNEL_BIASES = (0.0, 0.0, 0.0, -1.0, -1.0, -1.0)


@dataclass(frozen=True)
class PointModelConfig:
    """The sizes of one Point-E model (the fields of the released MODEL_CONFIGS, renamed).

    ``points`` is the released ``n_ctx`` (points denoised), ``coarse_points`` the upsampler's
    ``cond_ctx``; ``clip_dim`` the image-vec embedding size, ``grid_dim`` x ``grid_tokens``
    the image grid; ``schedule`` the noise schedule it was trained on (cosine for the base
    models, linear for the upsampler)."""

    kind: str = "image-grid"
    width: int = 512
    layers: int = 12
    heads: int = 8
    points: int = 1024
    channels: int = 6
    out_channels: int = 12
    init_scale: float = 0.25
    cond_drop_prob: float = 0.1
    clip_dim: int = 768
    grid_dim: int = 1024
    grid_tokens: int = 256
    coarse_points: int = 1024
    schedule: str = "cosine"

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ConfigError(f"point model kind '{self.kind}' is not one of "
                              f"{', '.join(KINDS)}{did_you_mean(self.kind, KINDS)}")
        if self.schedule not in SCHEDULES:
            raise ConfigError(f"point model schedule '{self.schedule}' is not one of "
                              f"{', '.join(SCHEDULES)}")
        if self.width % self.heads:
            raise ConfigError(f"point model width {self.width} is not a multiple of "
                              f"heads {self.heads}")

    @property
    def head_dim(self) -> int:
        return self.width // self.heads

    def to_dict(self) -> Dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Dict) -> "PointModelConfig":
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ConfigError(f"unknown point model config key '{unknown[0]}'"
                              f"{did_you_mean(unknown[0], names)}")
        return cls(**data)


_BASE = dict(points=1024, channels=6, out_channels=12, init_scale=0.25, cond_drop_prob=0.1)

#: the released models (point_e/models/configs.py), by their release names
RELEASED: Dict[str, PointModelConfig] = {
    "base40M-imagevec": PointModelConfig("image-vec", 512, 12, 8, **_BASE),
    "base40M-uncond": PointModelConfig("uncond", 512, 12, 8, **dict(_BASE, cond_drop_prob=0.0)),
    "base40M": PointModelConfig("image-grid", 512, 12, 8, **_BASE),
    "base300M": PointModelConfig("image-grid", 1024, 24, 16, **_BASE),
    "base1B": PointModelConfig("image-grid", 2048, 24, 32, **_BASE),
    "upsample": PointModelConfig("upsample", 512, 12, 8, **dict(_BASE, points=3072),
                                 coarse_points=1024, schedule="linear"),
}

_TINY = dict(width=32, layers=2, heads=4, points=16, clip_dim=12, grid_dim=20, grid_tokens=9)
#: small sizes for tests (4 heads, so a wrong qkv layout shows)
TINY: Dict[str, PointModelConfig] = {
    "tiny-uncond": PointModelConfig("uncond", **_TINY),
    "tiny-imagevec": PointModelConfig("image-vec", **_TINY),
    "tiny-grid": PointModelConfig("image-grid", **_TINY),
    "tiny-upsample": PointModelConfig("upsample", **dict(_TINY, points=24), coarse_points=8,
                                      schedule="linear"),
}
PRESETS: Dict[str, PointModelConfig] = {**RELEASED, **TINY}


def preset(name: str) -> PointModelConfig:
    """A named config (a released model or a tiny test size); ConfigError otherwise."""
    if name not in PRESETS:
        raise ConfigError(f"unknown point model '{name}'{did_you_mean(name, PRESETS)}; "
                          f"known: {', '.join(PRESETS)}")
    return PRESETS[name]


def timestep_embedding(t: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
    """Sinusoids [N, dim] = [cos(t f_i), sin(t f_i)], f_i = max_period^(-i / (dim//2)),
    i < dim//2 (a zero column when dim is odd), computed in float32; t [N] may be fractional."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period)
                      * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


class MLP(nn.Module):
    """fc_out(GELU(fc_in(h))): width -> 4 width -> width (exact GELU, as released)."""

    def __init__(self, width: int):
        super().__init__()
        self.fc_in = nn.Linear(width, 4 * width)
        self.fc_out = nn.Linear(4 * width, width)

    def forward(self, h: Tensor) -> Tensor:
        return self.fc_out(F.gelu(self.fc_in(h)))


class SelfAttention(nn.Module):
    """Multi-head self-attention over all tokens, no mask; ``qkv`` rows are [Q | K | V]."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width)
        self.out = nn.Linear(width, width)

    def forward(self, h: Tensor) -> Tensor:
        b, n, w = h.shape
        q, k, v = self.qkv(h).view(b, n, 3, self.heads, w // self.heads).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v)          # [B, H, N, d], softmax(qk^T/sqrt d)
        return self.out(a.transpose(1, 2).reshape(b, n, w))


class Block(nn.Module):
    """Pre-LN residual block: h + attn(norm_attn(h)), then + mlp(norm_mlp(h))."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.norm_attn = nn.LayerNorm(width)
        self.attn = SelfAttention(width, heads)
        self.norm_mlp = nn.LayerNorm(width)
        self.mlp = MLP(width)

    def forward(self, h: Tensor) -> Tensor:
        h = h + self.attn(self.norm_attn(h))
        return h + self.mlp(self.norm_mlp(h))


class PointTransformer(nn.Module):
    """One Point-E model of any kind (see the module docstring); ``config`` gives its sizes."""

    def __init__(self, config: PointModelConfig):
        super().__init__()
        self.config = c = config
        self.point_in = nn.Linear(c.channels, c.width)
        self.time_mlp = MLP(c.width)
        if c.kind == "image-vec":
            self.cond_in = nn.Linear(c.clip_dim, c.width)
        elif c.kind in ("image-grid", "upsample"):
            self.cond_norm = nn.LayerNorm(c.grid_dim)
            self.cond_in = nn.Linear(c.grid_dim, c.width)
        if c.kind == "upsample":
            self.coarse_in = nn.Linear(c.channels, c.width)
            self.register_buffer("coarse_scales", torch.tensor(CHANNEL_SCALES))
            self.register_buffer("coarse_biases", torch.tensor(CHANNEL_BIASES))
        self.norm_in = nn.LayerNorm(c.width)
        self.blocks = nn.ModuleList(Block(c.width, c.heads) for _ in range(c.layers))
        self.norm_out = nn.LayerNorm(c.width)
        self.point_out = nn.Linear(c.width, c.out_channels)
        if not self.point_out.weight.is_meta:          # built to load into: nothing to draw
            self.reset_parameters()

    def reset_parameters(self) -> None:
        """The released initialisation: the blocks' and the time MLP's linear layers
        N(0, init_scale^2 / width) with zero biases, the output projection zero (so a new
        model predicts eps = 0), the rest PyTorch's defaults."""
        std = self.config.init_scale / math.sqrt(self.config.width)
        for module in [self.time_mlp, *self.blocks]:
            for layer in module.modules():
                if isinstance(layer, nn.Linear):
                    nn.init.normal_(layer.weight, std=std)
                    nn.init.zeros_(layer.bias)
        nn.init.zeros_(self.point_out.weight)
        nn.init.zeros_(self.point_out.bias)

    @property
    def dtype(self) -> torch.dtype:
        return self.point_in.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.point_in.weight.device

    def forward(self, x: Tensor, t: Tensor, cond: Optional[Tensor] = None,
                low_res: Optional[Tensor] = None) -> Tensor:
        """x [B, K, channels] (scaled space), t [B] timesteps (0..1023, may be fractional),
        cond: the image embedding [B, clip_dim] (image-vec) or grid [B, grid_dim,
        grid_tokens] (image-grid, upsample), None = unconditional (zeros); low_res: the
        upsampler's coarse cloud [B, K', channels] in raw units. Returns [B, K,
        out_channels] (eps, then the variance interpolation values) in the model's dtype."""
        c = self.config
        if x.dim() != 3 or x.shape[-1] != c.channels:
            raise ValueError(f"points must be [B, K, {c.channels}], got {tuple(x.shape)}")
        if cond is not None and c.kind == "uncond":
            raise ValueError("an unconditional point model takes no condition")
        if low_res is not None and c.kind != "upsample":
            raise ValueError(f"a {c.kind} point model takes no coarse cloud (low_res)")
        b = x.shape[0]
        x = x.to(self.dtype)
        t = t.to(self.device).reshape(-1).expand(b) if t.numel() == 1 else t.to(self.device)
        time = self.time_mlp(timestep_embedding(t, c.width).to(self.dtype))[:, None]
        if c.kind == "uncond":
            prefix = [time]
        elif c.kind == "image-vec":
            e = self._condition(cond, (b, c.clip_dim))
            prefix = [self.cond_in(math.sqrt(c.clip_dim) * e)[:, None], time]
        else:
            g = self._condition(cond, (b, c.grid_dim, c.grid_tokens))
            prefix = [time, self.cond_in(self.cond_norm(g.transpose(1, 2)))]
            if c.kind == "upsample":
                prefix.append(self._embed_coarse(low_res, b))
        h = torch.cat(prefix + [self.point_in(x)], dim=1)
        h = self.norm_in(h)
        for block in self.blocks:
            h = block(h)
        h = self.norm_out(h)[:, h.shape[1] - x.shape[1]:]
        return self.point_out(h)

    def _condition(self, cond: Optional[Tensor], shape) -> Tensor:
        """The condition checked against ``shape``, zeros when absent, dropped per row with
        probability cond_drop_prob in training mode."""
        if cond is None:
            return torch.zeros(shape, device=self.device, dtype=self.dtype)
        if tuple(cond.shape) != tuple(shape):
            what = "image embedding" if len(shape) == 2 else "image grid [B, channels, tokens]"
            raise ValueError(f"{self.config.kind} model: the {what} must be {tuple(shape)}, "
                             f"got {tuple(cond.shape)}")
        cond = cond.to(device=self.device, dtype=self.dtype)
        if self.training and self.config.cond_drop_prob > 0:
            keep = torch.rand(shape[0], device=self.device) >= self.config.cond_drop_prob
            cond = cond * keep.view(-1, *([1] * (cond.dim() - 1))).to(cond.dtype)
        return cond

    def _embed_coarse(self, low_res: Optional[Tensor], b: int) -> Tensor:
        if low_res is None or low_res.dim() != 3 or low_res.shape[0] != b \
                or low_res.shape[-1] != self.config.channels:
            got = None if low_res is None else tuple(low_res.shape)
            raise ValueError(f"the upsampler needs low_res, the coarse cloud [{b}, K', "
                             f"{self.config.channels}] in raw units; got {got}")
        low_res = low_res.to(device=self.device, dtype=self.dtype)
        return self.coarse_in(low_res * self.coarse_scales + self.coarse_biases)


def build_point_model(config) -> PointTransformer:
    """A model with the released initialisation, from a config or a preset name."""
    return PointTransformer(preset(config) if isinstance(config, str) else config)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


__all__: List[str] = ["PointModelConfig", "PointTransformer", "build_point_model", "preset",
                      "PRESETS", "RELEASED", "TINY", "KINDS", "CHANNEL_SCALES",
                      "CHANNEL_BIASES", "timestep_embedding", "count_parameters"]
