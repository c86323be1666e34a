"""An independent reference of MVDream's original multi-view UNet, in LDM module names.

Written for the tests from the published facts of MVDream's
``mvdream/ldm/modules/diffusionmodules/openaimodel.py`` (``MultiViewUNetModel``) and
``mvdream/ldm/modules/attention.py`` (``SpatialTransformer3D``), without diffusers, so that a
converted diffusers UNet can be checked against it output for output:

* ``ReferenceUNet(**unet_config_params)`` takes the YAML's ``unet_config.params`` as they are
  (model_channels, channel_mult, num_res_blocks, attention_resolutions, num_heads or
  num_head_channels, context_dim, use_linear_in_transformer, transformer_depth, camera_dim,
  legacy, ...); its ``state_dict()`` has the release's key names (prefix them with
  ``model.diffusion_model.``);
* res blocks: GroupNorm(32) - SiLU - conv3x3, plus Linear(time embedding) added, GroupNorm -
  SiLU - dropout - conv3x3, skip 1x1 conv when the width changes;
* spatial transformers: GroupNorm(32, eps 1e-6), proj_in (1x1 conv or Linear), blocks of
  [self-attention over the V views of one object jointly: tokens (b*v, l, c) -> (b, v*l, c);
  cross-attention to the context; GEGLU feed-forward], each after a LayerNorm and residual,
  proj_out, residual around the whole;
* time: sinusoidal embedding (cos half first, max period 10000) -> Linear - SiLU - Linear,
  plus camera_embed Linear - SiLU - Linear of the camera vector;
* down: conv3x3 stride 2 (``op``); up: nearest x2 then conv3x3 (``conv``);
* skip connections concatenated on the channel axis in the output blocks.

One deliberate difference: every transformer block of a depth > 1 transformer reads the same
context (MVDream's own code indexes a one-element context list per block, so only depth 1 runs
there).
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F


def sinusoidal(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32) / half)
    angles = t.float()[:, None] * freqs[None]
    out = torch.cat([angles.cos(), angles.sin()], dim=1)
    if dim % 2:
        out = torch.cat([out, torch.zeros_like(out[:, :1])], dim=1)
    return out


class ResBlock(nn.Module):
    def __init__(self, cin: int, emb: int, cout: int):
        super().__init__()
        self.in_layers = nn.Sequential(nn.GroupNorm(32, cin), nn.SiLU(),
                                       nn.Conv2d(cin, cout, 3, padding=1))
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb, cout))
        self.out_layers = nn.Sequential(nn.GroupNorm(32, cout), nn.SiLU(), nn.Dropout(0.0),
                                        nn.Conv2d(cout, cout, 3, padding=1))
        self.skip_connection = nn.Identity() if cin == cout else nn.Conv2d(cin, cout, 1)

    def forward(self, x, emb):
        h = self.in_layers(x) + self.emb_layers(emb)[:, :, None, None]
        return self.skip_connection(x) + self.out_layers(h)


class Downsample(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.op = nn.Conv2d(ch, ch, 3, stride=2, padding=1)

    def forward(self, x):
        return self.op(x)


class Upsample(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2, mode="nearest"))


class Attention(nn.Module):
    """Plain softmax attention, written out (no fused kernel)."""

    def __init__(self, dim: int, kv_dim: int, heads: int, head_dim: int):
        super().__init__()
        inner = heads * head_dim
        self.heads, self.scale = heads, head_dim ** -0.5
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_k = nn.Linear(kv_dim, inner, bias=False)
        self.to_v = nn.Linear(kv_dim, inner, bias=False)
        self.to_out = nn.Sequential(nn.Linear(inner, dim), nn.Dropout(0.0))

    def forward(self, x, context=None):
        context = x if context is None else context
        q, k, v = self.to_q(x), self.to_k(context), self.to_v(context)

        def split(t):                                # (b, n, h*d) -> (b, h, n, d)
            return t.reshape(t.shape[0], t.shape[1], self.heads, -1).transpose(1, 2)

        q, k, v = split(q), split(k), split(v)
        weights = torch.softmax(q @ k.transpose(-1, -2) * self.scale, dim=-1)
        out = (weights @ v).transpose(1, 2).reshape(x.shape[0], x.shape[1], -1)
        return self.to_out(out)


class GEGLU(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.proj = nn.Linear(dim, 2 * hidden)

    def forward(self, x):
        value, gate = self.proj(x).chunk(2, dim=-1)
        return value * F.gelu(gate)


class FeedForward(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.net = nn.Sequential(GEGLU(dim, 4 * dim), nn.Dropout(0.0), nn.Linear(4 * dim, dim))

    def forward(self, x):
        return self.net(x)


class TransformerBlock3D(nn.Module):
    def __init__(self, dim: int, heads: int, head_dim: int, context_dim: int):
        super().__init__()
        self.attn1 = Attention(dim, dim, heads, head_dim)
        self.ff = FeedForward(dim)
        self.attn2 = Attention(dim, context_dim, heads, head_dim)
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)

    def forward(self, x, context, num_views):
        bv, n, c = x.shape
        joint = x.reshape(bv // num_views, num_views * n, c)     # the views of one object
        joint = self.attn1(self.norm1(joint)) + joint
        x = joint.reshape(bv, n, c)
        x = self.attn2(self.norm2(x), context) + x
        return self.ff(self.norm3(x)) + x


class SpatialTransformer3D(nn.Module):
    def __init__(self, ch: int, heads: int, head_dim: int, depth: int, context_dim: int,
                 linear: bool):
        super().__init__()
        inner = heads * head_dim
        self.linear = linear
        self.norm = nn.GroupNorm(32, ch, eps=1e-6)
        self.proj_in = nn.Linear(ch, inner) if linear else nn.Conv2d(ch, inner, 1)
        self.transformer_blocks = nn.ModuleList(
            TransformerBlock3D(inner, heads, head_dim, context_dim) for _ in range(depth))
        self.proj_out = nn.Linear(inner, ch) if linear else nn.Conv2d(inner, ch, 1)

    def forward(self, x, context, num_views):
        b, c, h, w = x.shape
        y = self.norm(x)
        if not self.linear:
            y = self.proj_in(y)
        y = y.flatten(2).transpose(1, 2)                          # (b, h*w, c)
        if self.linear:
            y = self.proj_in(y)
        for block in self.transformer_blocks:
            y = block(y, context, num_views)
        if self.linear:
            y = self.proj_out(y)
        y = y.transpose(1, 2).reshape(b, -1, h, w)
        if not self.linear:
            y = self.proj_out(y)
        return y + x


class Step(nn.Sequential):
    """One entry of input_blocks / middle_block / output_blocks: runs its layers in order,
    giving each what it takes."""

    def forward(self, x, emb, context, num_views):
        for layer in self:
            if isinstance(layer, ResBlock):
                x = layer(x, emb)
            elif isinstance(layer, SpatialTransformer3D):
                x = layer(x, context, num_views)
            else:
                x = layer(x)
        return x


class ReferenceUNet(nn.Module):
    """MVDream's MultiViewUNetModel (spatial transformers, camera embedding), from its YAML
    params. Options the conversion refuses are not implemented here either."""

    def __init__(self, in_channels, out_channels, model_channels, num_res_blocks,
                 attention_resolutions, channel_mult, context_dim, camera_dim, num_heads=-1,
                 num_head_channels=-1, transformer_depth=1, use_linear_in_transformer=False,
                 legacy=True, image_size=32, **_unused):
        super().__init__()
        self.model_channels = model_channels
        emb = 4 * model_channels
        self.time_embed = nn.Sequential(nn.Linear(model_channels, emb), nn.SiLU(),
                                        nn.Linear(emb, emb))
        self.camera_embed = nn.Sequential(nn.Linear(camera_dim, emb), nn.SiLU(),
                                          nn.Linear(emb, emb))

        def transformer(ch):
            if num_head_channels == -1:
                heads, head_dim = num_heads, ch // num_heads
            else:
                heads, head_dim = ch // num_head_channels, num_head_channels
            if legacy:
                head_dim = ch // heads
            return SpatialTransformer3D(ch, heads, head_dim, transformer_depth, context_dim,
                                        use_linear_in_transformer)

        self.input_blocks = nn.ModuleList([Step(nn.Conv2d(in_channels, model_channels, 3,
                                                          padding=1))])
        skips, ch, rate = [model_channels], model_channels, 1
        for level, mult in enumerate(channel_mult):
            for _ in range(num_res_blocks):
                layers = [ResBlock(ch, emb, mult * model_channels)]
                ch = mult * model_channels
                if rate in attention_resolutions:
                    layers.append(transformer(ch))
                self.input_blocks.append(Step(*layers))
                skips.append(ch)
            if level != len(channel_mult) - 1:
                self.input_blocks.append(Step(Downsample(ch)))
                skips.append(ch)
                rate *= 2
        self.middle_block = Step(ResBlock(ch, emb, ch), transformer(ch), ResBlock(ch, emb, ch))
        self.output_blocks = nn.ModuleList()
        for level in reversed(range(len(channel_mult))):
            mult = channel_mult[level]
            for i in range(num_res_blocks + 1):
                layers = [ResBlock(ch + skips.pop(), emb, mult * model_channels)]
                ch = mult * model_channels
                if rate in attention_resolutions:
                    layers.append(transformer(ch))
                if level and i == num_res_blocks:
                    layers.append(Upsample(ch))
                    rate //= 2
                self.output_blocks.append(Step(*layers))
        self.out = nn.Sequential(nn.GroupNorm(32, ch), nn.SiLU(),
                                 nn.Conv2d(model_channels, out_channels, 3, padding=1))

    def forward(self, x, timesteps, context, camera, num_views):
        emb = self.time_embed(sinusoidal(timesteps, self.model_channels))
        emb = emb + self.camera_embed(camera)
        hs, h = [], x
        for block in self.input_blocks:
            h = block(h, emb, context, num_views)
            hs.append(h)
        h = self.middle_block(h, emb, context, num_views)
        for block in self.output_blocks:
            h = block(torch.cat([h, hs.pop()], dim=1), emb, context, num_views)
        return self.out(h)


def randomise(module: nn.Module, seed: int = 0) -> nn.Module:
    """Every parameter random and O(1)-preserving (weights N(0, 1/fan_in), biases and norm
    offsets N(0, 0.1^2), norm scales 1 + N(0, 0.1^2)), so no path is zero (the original
    zero-initialises proj_out and the last conv, which would hide a wrong mapping)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if p.dim() >= 2:
                p.copy_(noise / math.sqrt(p[0].numel()))
            elif name.endswith("weight"):          # GroupNorm / LayerNorm scales
                p.copy_(1 + 0.1 * noise)
            else:
                p.copy_(0.1 * noise)
    return module
