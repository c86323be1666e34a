"""OpenCLIP conditioners: the image embedding of Isotropic3D and the text tokens of MVDream.

* ``openclip-image``: an RGB picture already composited on white, in [0, 1], is resized to the
  tower's input size (224 for ViT-H-14; bicubic, antialiased), normalised with the CLIP
  mean/std and fed to ``visual``; its pooled, projected embedding (not L2-normalised) is the
  whole cross-attention context, one token: [N, 1, D] (``tokens: pooled``, Isotropic3D's).
  ``tokens: patches`` appends every patch token (after ``ln_post``, through the same
  projection, so in the same D-space): [N, 1 + P, D], P = (image_size / patch_size)^2 (257
  tokens for ViT-H-14), which keeps where the parts of the picture are. The unconditional
  context is zeros of the same shape.
* ``openclip-text``: OpenCLIP tokens -> token + positional embedding -> every transformer block
  but the last (the "penultimate layer" of SD 2 / MVDream) -> ``ln_final``: [N, 77, D].

The OpenCLIP building, loading and saving behind them (weights sources, folder format, tiny
test configs) is the library :mod:`guidance.multiview.openclip`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import torch
import torch.nn as nn
from torch import Tensor

from engine.errors import ConfigError, UserError
from engine.registry import register
from guidance.multiview.openclip import (DEFAULT_KEY, IMAGE_TOKENS, TOKENS_KEY, clip_image_size,
                                         clip_preprocess,
                                         load_openclip_folder, resolve_openclip,
                                         save_openclip_folder, saved_image_tokens,
                                         strip_towers, text_penultimate)


# -- plugins -------------------------------------------------------------------------------

class _OpenCLIPConditioner(nn.Module):
    """Shared parts: a frozen, stripped OpenCLIP model and its folder format."""

    kind = "image"
    tower = "image"

    @dataclass
    class Config:
        model: str = "ViT-H-14"               # arch name | local-dir:PATH | PATH | hf-hub:org/repo
        pretrained: str = "laion2b_s32b_b79k"  # tag or weights file (arch names only)

        def __post_init__(self):
            if not self.model:
                raise ConfigError("model: must name an OpenCLIP architecture, folder or hub id")

    def __init__(self, cfg=None, device=None, clip: Optional[nn.Module] = None,
                 model_cfg: Optional[dict] = None, key: str = DEFAULT_KEY):
        super().__init__()
        self.cfg = cfg or self.Config()
        if clip is None:
            clip, model_cfg = resolve_openclip(self.cfg.model, self.cfg.pretrained, self.tower,
                                               key)
        elif model_cfg is None:
            raise ValueError("model_cfg is required with clip")
        self.clip = strip_towers(clip, self.tower)
        self.model_cfg = model_cfg
        self.requires_grad_(False)
        self.eval()
        if device is not None:
            self.to(device)

    @classmethod
    def from_clip(cls, clip: nn.Module, model_cfg: dict):
        """Wrap an OpenCLIP model built elsewhere (tests, conversion)."""
        return cls(clip=clip, model_cfg=model_cfg)

    @classmethod
    def from_pretrained(cls, folder, device=None, dtype=None, key: str = DEFAULT_KEY):
        """Load a folder written by :meth:`save_pretrained`."""
        clip, model_cfg = load_openclip_folder(folder, cls.tower, key)
        module = cls(clip=clip, model_cfg=model_cfg)
        kwargs = {k: v for k, v in (("device", device), ("dtype", dtype)) if v is not None}
        return module.to(**kwargs) if kwargs else module

    def save_pretrained(self, folder) -> Path:
        return save_openclip_folder(self.clip, self.model_cfg, folder, keep=self.tower)

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def train(self, mode: bool = True):
        return super().train(False)  # frozen: dropout and friends stay off


@register("conditioner", "openclip-image")
class OpenCLIPImageConditioner(_OpenCLIPConditioner):
    """OpenCLIP image embedding (pooled, projected, not normalised) as a one-token context
    [N, 1, D], Isotropic3D's conditioning; with ``tokens: patches`` the projected patch tokens
    follow it: [N, 1 + P, D]. Zeros when unconditional."""

    kind = "image"
    tower = "image"

    @dataclass
    class Config(_OpenCLIPConditioner.Config):
        tokens: str = "pooled"    # pooled: [N, 1, D] | patches: pooled + patch tokens [N, 1+P, D]

        def __post_init__(self):
            super().__post_init__()
            if self.tokens not in IMAGE_TOKENS:
                raise ConfigError(f"tokens: must be one of {', '.join(IMAGE_TOKENS)}, got "
                                  f"{self.tokens!r}")

    def __init__(self, cfg=None, device=None, clip: Optional[nn.Module] = None,
                 model_cfg: Optional[dict] = None, key: str = DEFAULT_KEY):
        super().__init__(cfg, device, clip, model_cfg, key)
        pools = getattr(self.clip.visual, "attn_pool", None) is not None
        if self.cfg.tokens == "patches" and pools:
            raise UserError("tokens: patches needs a ViT whose patch tokens are its outputs; "
                            "this model pools them with attention (CoCa-style): use tokens: pooled")

    @classmethod
    def from_clip(cls, clip: nn.Module, model_cfg: dict, tokens: str = "pooled"):
        """Wrap an OpenCLIP model built elsewhere (tests, conversion)."""
        return cls(cls.Config(tokens=tokens), clip=clip, model_cfg=model_cfg)

    @classmethod
    def from_pretrained(cls, folder, device=None, dtype=None, key: str = DEFAULT_KEY):
        """Load a folder written by :meth:`save_pretrained` (its token layout included)."""
        tokens = saved_image_tokens(folder, key)
        clip, model_cfg = load_openclip_folder(folder, cls.tower, key)
        module = cls(cls.Config(model=str(folder), tokens=tokens), clip=clip,
                     model_cfg=model_cfg)
        kwargs = {k: v for k, v in (("device", device), ("dtype", dtype)) if v is not None}
        return module.to(**kwargs) if kwargs else module

    def save_pretrained(self, folder) -> Path:
        return save_openclip_folder(self.clip, self.model_cfg, folder, keep=self.tower,
                                    extra={TOKENS_KEY: self.cfg.tokens})

    @property
    def embed_dim(self) -> int:
        return int(self.model_cfg["embed_dim"])

    @property
    def image_size(self) -> int:
        return clip_image_size(self.clip)

    @property
    def num_tokens(self) -> int:
        """L of the context: 1, or 1 + the number of patches."""
        if self.cfg.tokens == "pooled":
            return 1
        grid = self.clip.visual.grid_size
        return 1 + int(grid[0]) * int(grid[1])

    def forward(self, rgb: Tensor) -> Tensor:
        """[N, 3, H, W] in [0, 1], composited on white -> [N, L, D] (model dtype), L =
        :attr:`num_tokens`.

        Differentiable with respect to ``rgb``.
        """
        x = clip_preprocess(rgb.to(self.device, torch.float32), self.image_size).to(self.dtype)
        visual = self.clip.visual
        if self.cfg.tokens == "pooled":
            return visual(x)[:, None, :]
        before = visual.output_tokens
        visual.output_tokens = True     # OpenCLIP's switch for (pooled, patch tokens)
        try:
            pooled, patches = visual(x)
        finally:
            visual.output_tokens = before
        if visual.proj is not None:     # the pooled token's projection, so both share D
            patches = patches @ visual.proj
        return torch.cat([pooled[:, None, :], patches], dim=1)

    def unconditional(self, n: int) -> Tensor:
        return torch.zeros(n, self.num_tokens, self.embed_dim, device=self.device,
                           dtype=self.dtype)


@register("conditioner", "openclip-text")
class OpenCLIPTextConditioner(_OpenCLIPConditioner):
    """OpenCLIP text tokens from the penultimate transformer layer, ``ln_final`` applied:
    [N, 77, D] (SD 2 / MVDream). Unconditional: the empty prompt."""

    kind = "text"
    tower = "text"

    @dataclass
    class Config(_OpenCLIPConditioner.Config):
        pass

    @property
    def embed_dim(self) -> int:
        return int(self.clip.token_embedding.weight.shape[1])

    @property
    def context_length(self) -> int:
        return int(self.clip.positional_embedding.shape[0])

    def tokenize(self, texts: Sequence[str]) -> Tensor:
        import open_clip

        return open_clip.tokenize(list(texts), context_length=self.context_length)

    def forward(self, texts: Sequence[str]) -> Tensor:
        """list of N strings -> [N, L, D]. No gradient path (text is discrete)."""
        if isinstance(texts, str):
            texts = [texts]
        tokens = self.tokenize(texts).to(self.device)
        return text_penultimate(self.clip, tokens)

    def unconditional(self, n: int) -> Tensor:
        return self.forward([""] * n)


CONDITIONER_TYPES = {"image": "openclip-image", "text": "openclip-text"}


def conditioner_for(kind: str):
    """The plugin class for a conditioning kind ("image" | "text")."""
    return {"image": OpenCLIPImageConditioner, "text": OpenCLIPTextConditioner}[kind]
