"""The multi-view UNet (MVDream / Isotropic3D) on diffusers' UNet2DConditionModel.

MVDream's network is the Stable Diffusion 2.1-base UNet with two changes, both expressed with
stock diffusers parts:

* a camera embedding, Linear(16, 1280) - SiLU - Linear(1280, 1280), added to the time
  embedding: ``class_embed_type="projection"`` with a 16-d input, the camera passed as
  ``class_labels``;
* joint self-attention across the V views of one object: every ``attn1`` gets
  :class:`MultiViewAttnProcessor`, which reshapes tokens (b*v, l, c) -> (b, v*l, c), attends,
  and splits back. Cross-attention and feed-forward stay per view; no weight is added.

MVDream's sd-v1.5-4view is the SD 1.5 UNet with the same two changes: 1x1-convolution
projections in its transformers (``use_linear_projection: false``), 8 heads a level, a 768-wide
context. :mod:`guidance.multiview.ldm_config` reads any such size from the release's LDM YAML or
infers it from a checkpoint.

Batches must be view-contiguous: all views of object 0, then object 1, ...
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import List, Optional, Tuple, Union

from torch import Tensor

from engine.errors import ConfigError

SD21_BASE = dict(
    sample_size=32, in_channels=4, out_channels=4,
    block_out_channels=[320, 640, 1280, 1280], layers_per_block=2,
    attention_head_dim=[5, 10, 20, 20],   # diffusers' name; for SD2 it holds heads per level
    cross_attention_dim=1024,
)


@dataclass
class MultiViewUNetConfig:
    """Sizes of the UNet. ``preset: sd21-base`` is MVDream's; anything else is explicit.

    ``attention_head_dim`` holds the number of attention HEADS per level (diffusers' naming
    quirk, kept for SD 2.x compatibility). ``use_linear_projection``: the transformers'
    proj_in/proj_out are Linear layers (SD 2.x, MVDream sd-v2.1) or, when False, 1x1
    convolutions (SD 1.x, MVDream sd-v1.5). ``transformer_layers_per_block``: transformer
    blocks in each spatial transformer, one number or one per level (the middle block uses
    the last level's). Configs saved before these fields existed load with the defaults,
    which are the old behaviour.
    """

    sample_size: int = 32
    in_channels: int = 4
    out_channels: int = 4
    block_out_channels: List[int] = field(default_factory=lambda: [320, 640, 1280, 1280])
    layers_per_block: int = 2
    attention_head_dim: List[int] = field(default_factory=lambda: [5, 10, 20, 20])
    cross_attention_dim: int = 1024
    camera_dim: int = 16
    norm_num_groups: int = 32
    # which levels (finest first) carry attention; None: every level but the coarsest, as in
    # SD 2.1. Small models drop the finest level: its joint attention over V*H*W tokens is
    # most of a step's cost (toy model, 4 x 32 x 32 tokens: 1.2 s -> 0.45 s a step on 2 cores)
    attention_levels: Optional[List[bool]] = None
    use_linear_projection: bool = True
    transformer_layers_per_block: Union[int, List[int]] = 1

    def __post_init__(self):
        if len(self.block_out_channels) != len(self.attention_head_dim):
            raise ConfigError("attention_head_dim: needs one entry per block_out_channels level")
        depth = self.transformer_layers_per_block
        depths = depth if isinstance(depth, (list, tuple)) else [depth]
        if isinstance(depth, (list, tuple)) and len(depth) != len(self.block_out_channels):
            raise ConfigError("transformer_layers_per_block: needs one number or one per "
                              "block_out_channels level")
        if not all(isinstance(d, int) and not isinstance(d, bool) and d >= 1 for d in depths):
            raise ConfigError(f"transformer_layers_per_block: {depth} is not a whole number "
                              ">= 1 (or a list of them)")
        if self.attention_levels is not None:
            if len(self.attention_levels) != len(self.block_out_channels):
                raise ConfigError("attention_levels: needs one true/false per "
                                  "block_out_channels level")
            if not any(self.attention_levels):
                raise ConfigError("attention_levels: at least one level needs attention, or "
                                  "the views never see each other except in the middle block")
        for c in self.block_out_channels:
            if c % self.norm_num_groups:
                raise ConfigError(f"block_out_channels: {c} is not a multiple of "
                                  f"norm_num_groups={self.norm_num_groups}")

    @staticmethod
    def sd21_base() -> "MultiViewUNetConfig":
        return MultiViewUNetConfig(**SD21_BASE)

    def diffusers_kwargs(self) -> dict:
        n = len(self.block_out_channels)
        levels = self.attention_levels
        if levels is None:                  # every level but the coarsest, as in SD 2.1
            levels = [True] * (n - 1) + [False]
        down = ["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in levels]
        up = ["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(levels)]
        depth = self.transformer_layers_per_block
        return dict(
            sample_size=self.sample_size, in_channels=self.in_channels,
            out_channels=self.out_channels, block_out_channels=tuple(self.block_out_channels),
            layers_per_block=self.layers_per_block,
            attention_head_dim=tuple(self.attention_head_dim),
            cross_attention_dim=self.cross_attention_dim, down_block_types=tuple(down),
            up_block_types=tuple(up), use_linear_projection=self.use_linear_projection,
            transformer_layers_per_block=tuple(depth) if isinstance(depth, (list, tuple))
            else depth,
            flip_sin_to_cos=True, freq_shift=0, norm_num_groups=self.norm_num_groups,
            class_embed_type="projection",
            projection_class_embeddings_input_dim=self.camera_dim,
        )

    def to_dict(self) -> dict:
        return asdict(self)


class MultiViewAttnProcessor:
    """Attention processor: joint over the views of one object when ``joint`` (attn1),
    per view otherwise (attn2). ``num_views`` comes through ``cross_attention_kwargs``."""

    def __init__(self, joint: bool):
        from diffusers.models.attention_processor import AttnProcessor2_0

        self.joint = joint
        self.inner = AttnProcessor2_0()

    def __call__(self, attn, hidden_states: Tensor, encoder_hidden_states: Optional[Tensor] = None,
                 attention_mask: Optional[Tensor] = None, temb: Optional[Tensor] = None,
                 num_views: int = 1) -> Tensor:
        if not self.joint or num_views == 1 or encoder_hidden_states is not None:
            return self.inner(attn, hidden_states, encoder_hidden_states, attention_mask, temb)
        bv, length, channels = hidden_states.shape
        if bv % num_views:
            raise ValueError(f"batch of {bv} is not a whole number of {num_views}-view groups")
        joined = hidden_states.reshape(bv // num_views, num_views * length, channels)
        out = self.inner(attn, joined, None, attention_mask, temb)
        return out.reshape(bv, length, channels)


def install_multiview_attention(unet) -> None:
    """Put :class:`MultiViewAttnProcessor` on every attention layer of a diffusers UNet."""
    processors = {}
    for name in unet.attn_processors:
        processors[name] = MultiViewAttnProcessor(joint=name.endswith("attn1.processor"))
    unet.set_attn_processor(processors)


def build_unet(cfg: MultiViewUNetConfig):
    """A diffusers UNet2DConditionModel with camera embedding and multi-view attention."""
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel(**cfg.diffusers_kwargs())
    install_multiview_attention(unet)
    return unet


def unet_forward(unet, x: Tensor, t: Tensor, context: Tensor, camera: Tensor,
                 num_views: int) -> Tensor:
    """Predict noise for a view-contiguous batch.

    Args:
        x: [B*V, C, H, W] noisy inputs. t: [B*V] timesteps. context: [B*V, L, D]
        cross-attention tokens. camera: [B*V, 16] camera vectors. num_views: V.
    Returns:
        [B*V, C, H, W]. Differentiable with respect to x, context and camera.
    """
    return unet(x, t, encoder_hidden_states=context, class_labels=camera,
                cross_attention_kwargs={"num_views": num_views}).sample


def count_parameters(module) -> Tuple[int, int]:
    total = sum(p.numel() for p in module.parameters())
    trainable = sum(p.numel() for p in module.parameters() if p.requires_grad)
    return total, trainable
