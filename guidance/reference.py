"""Reference-view losses: the rendered input view against the input picture.

With no diffusion prior this alone is the "fit the picture" baseline; added to score
distillation it anchors the front view (Magic123 / Zero-1-to-3 style recipes).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict

import torch.nn.functional as F
from torch import Tensor

from engine.cameras import Cameras
from engine.errors import ConfigError
from engine.plugin import Guidance, RunInputs, StepInfo
from engine.registry import register
from guidance.multiview.targets import resize_image


def reference_losses(rgb: Tensor, opacity: Tensor, target_rgb: Tensor,
                     target_mask: Tensor) -> Dict[str, Tensor]:
    """L2 colour loss inside the object and L2 mask loss everywhere.

    Args:
        rgb [B, H, W, 3], opacity [B, H, W, 1]: the render of the reference view.
        target_rgb [H, W, 3], target_mask [H, W, 1]: the input picture at the same size.
    Returns:
        {"rgb": scalar, "mask": scalar}. Differentiable with respect to rgb and opacity.
    """
    weight = target_mask.expand_as(rgb)
    rgb_loss = (weight * (rgb - target_rgb) ** 2).sum() / weight.sum().clamp_min(1.0)
    mask_loss = F.mse_loss(opacity, target_mask.expand_as(opacity))
    return {"rgb": rgb_loss, "mask": mask_loss}


@register("guidance", "reference-view")
class ReferenceViewGuidance(Guidance):
    """L2 colour + mask losses between the rendered reference view and the input image."""

    loss_names = ("rgb", "mask")

    @dataclass
    class Config:
        pass

    def __init__(self, cfg: "ReferenceViewGuidance.Config" = None, device=None,
                 inputs: RunInputs = None):
        super().__init__()
        if inputs is None or inputs.image is None:
            raise ConfigError("guidance reference-view needs an input image: add image=PATH")
        self.register_buffer("target_rgb", inputs.image.rgb.to(device), persistent=False)
        self.register_buffer("target_mask", inputs.image.mask.to(device), persistent=False)

    def forward(self, outputs: Dict[str, Tensor], cameras: Cameras,
                step: StepInfo) -> Dict[str, Tensor]:
        size = outputs["rgb"].shape[1]
        return reference_losses(outputs["rgb"], outputs["opacity"],
                                resize_image(self.target_rgb, size),
                                resize_image(self.target_mask, size))
