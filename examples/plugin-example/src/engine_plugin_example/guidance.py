"""Guidance ``example-l1``: L1 losses between the rendered reference view and the input picture.

L1 is less sensitive than the in-tree L2 (``reference-view``) to the few pixels where the
picture's mask and the render disagree (anti-aliased edges, a slightly off mask), so colour
gradients stay bounded there; a Huber variant (``huber_delta > 0``) keeps L2's smooth minimum.

This module is the plugin half of docs/writing-a-guidance-plugin.md: a pure function on
tensors does the maths, a small :class:`engine.plugin.Guidance` subclass wires it to the
engine (its nested ``Config``, ``loss_names`` and the run's inputs).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from engine.cameras import Cameras
from engine.errors import ConfigError
from engine.plugin import Guidance, RunInputs, StepInfo


def resize_square(image: Tensor, size: int) -> Tensor:
    """[H, W, C] -> [size, size, C]; area averaging when shrinking, bilinear when growing.

    Differentiable with respect to ``image``.
    """
    if image.shape[0] == size and image.shape[1] == size:
        return image
    x = image.permute(2, 0, 1)[None]
    if size <= image.shape[0]:
        y = F.interpolate(x, size=(size, size), mode="area")
    else:
        y = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    return y[0].permute(1, 2, 0)


def _distance(a: Tensor, b: Tensor, huber_delta: float) -> Tensor:
    """Elementwise |a - b| (huber_delta == 0) or the Huber loss divided by its delta, which
    equals |a - b| - delta / 2 far from the target, so both settings have slope 1 there."""
    if huber_delta == 0.0:
        return (a - b).abs()
    return F.huber_loss(a, b, reduction="none", delta=huber_delta) / huber_delta


def l1_reference_losses(rgb: Tensor, opacity: Tensor, target_rgb: Tensor, target_mask: Tensor,
                        *, masked_rgb: bool = True, huber_delta: float = 0.0
                        ) -> Dict[str, Tensor]:
    """L1 colour and mask losses of B renders of the reference view.

    Args:
        rgb [B, H, W, 3] in [0, 1], opacity [B, H, W, 1] in [0, 1]: the renders.
        target_rgb [H, W, 3], target_mask [H, W, 1]: the picture at the same size
            (broadcast over B).
        masked_rgb: average the colour loss over the object's pixels only (weighted by the
            mask); otherwise over every pixel, against the picture composited on its
            background (the render must then use the same background colour).
        huber_delta: 0 for plain L1; > 0 for a Huber loss with that delta (scaled by 1/delta).
    Returns:
        {"rgb_l1": scalar, "mask_l1": scalar}. Differentiable with respect to rgb and
        opacity (and the targets, which are normally constants).
    """
    rgb_err = _distance(rgb, target_rgb.expand_as(rgb), huber_delta)
    if masked_rgb:
        weight = target_mask.expand_as(opacity)
        # sum over colour channels, then mean over the weighted pixels: a per-pixel L1
        rgb_loss = (weight * rgb_err.mean(-1, keepdim=True)).sum() / weight.sum().clamp_min(1.0)
    else:
        rgb_loss = rgb_err.mean()
    mask_loss = _distance(opacity, target_mask.expand_as(opacity), huber_delta).mean()
    return {"rgb_l1": rgb_loss, "mask_l1": mask_loss}


class ExampleL1(Guidance):
    """L1 (or Huber) colour + mask losses between the rendered reference view and the input image.

    The stage's cameras must include the reference view (azimuth 0, elevation 0, the
    ``fixed`` sampler in the ``example-fit`` recipe): every rendered view is compared with
    the picture.
    """

    loss_names = ("rgb_l1", "mask_l1")

    @dataclass
    class Config:
        masked_rgb: bool = True      # colour loss on the object's pixels only
        huber_delta: float = 0.0     # 0: plain L1; > 0: Huber with this delta (smooth near 0)

        def __post_init__(self):
            if self.huber_delta < 0:
                raise ConfigError(f"huber_delta: must be >= 0, got {self.huber_delta}")

    def __init__(self, cfg: Optional["ExampleL1.Config"] = None, device=None,
                 inputs: Optional[RunInputs] = None):
        super().__init__()
        self.cfg = cfg or ExampleL1.Config()
        if inputs is None or inputs.image is None:
            raise ConfigError("guidance example-l1 needs an input image: add image=PATH")
        # not persistent: the picture is an input of the run, not state of the guidance
        self.register_buffer("target_rgb", inputs.image.rgb.to(device), persistent=False)
        self.register_buffer("target_mask", inputs.image.mask.to(device), persistent=False)

    def forward(self, outputs: Dict[str, Tensor], cameras: Cameras,
                step: StepInfo) -> Dict[str, Tensor]:
        size = outputs["rgb"].shape[1]
        return l1_reference_losses(
            outputs["rgb"], outputs["opacity"],
            resize_square(self.target_rgb, size), resize_square(self.target_mask, size),
            masked_rgb=self.cfg.masked_rgb, huber_delta=self.cfg.huber_delta)
