"""The ``sampled-views`` guidance: fit the renders to views the multi-view model draws once.

Score distillation asks the model for a one-step estimate of the clean views at a random noise
level. With a weak model that estimate is the blurry average of everything the picture could
be, so SDS turns a T-shaped mushroom into a round blob, though the same model, sampled to the
end, draws the T (docs/results/toy-bench-20-views). This guidance samples the views instead,
once: a full DDIM chain for the stage's fixed cameras (one group, e.g. 4 views 90 degrees
apart), conditioned on the input picture exactly as ``multiview-sds`` is. It draws
``candidates`` groups from different seeds and keeps the one whose view at ``input_view``
(the camera the input picture was taken from) looks most like the picture; then every step
is plain L2 on colour and mask between the renders and that group, as multi-view
reconstruction (One-2-3-45++, Instant3D: generate views, then reconstruct). A later stage
with ``init_from`` refines the result with ``multiview-sds``.

The picture's own pixels are never a target (Isotropic3D keeps the input out of the loss);
they only pick among the model's own samples.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Dict, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from engine.cameras import Cameras
from engine.errors import ConfigError
from engine.plugin import Guidance, RunInputs, StepInfo
from engine.registry import register
from guidance.dataset_views import ViewTargets


#: default ramp of mask_from_white: the sampler's background grain stays below MASK_LOW, the
#: toy world's palest colour (grey, deficit 0.26) above MASK_HIGH
MASK_LOW, MASK_HIGH = 0.08, 0.2


def mask_from_white(rgb: Tensor, low: float, high: float) -> Tensor:
    """Object mask of views drawn on white: rgb [N, S, S, 3] in [0, 1] -> [N, S, S, 1].

    A pixel's distance from white is its largest channel deficit ``max(1 - rgb)``; below
    ``low`` it is background (0), above ``high`` object (1), linear in between, so the grain a
    small sampler leaves on the background is not read as fog. Differentiable with respect
    to ``rgb`` (zero gradient outside the ramp).
    """
    deficit = (1.0 - rgb).amax(dim=-1, keepdim=True)
    return ((deficit - low) / max(high - low, 1e-6)).clamp(0.0, 1.0)


def clean_views(rgb: Tensor, low: float, high: float):
    """(rgb on pure white, mask) of sampled views rgb [N, S, S, 3]: the background's grain is
    replaced by white where the mask is 0. Not differentiable (targets)."""
    mask = mask_from_white(rgb, low, high)
    return mask * rgb + (1.0 - mask), mask


def match_error(view_rgb: Tensor, view_mask: Tensor, rgb: Tensor, mask: Tensor) -> Tensor:
    """How unlike a picture each candidate view is: view_rgb [K, S, S, 3], view_mask
    [K, S, S, 1] against rgb [S, S, 3], mask [S, S, 1] -> [K] (mean squared colour error plus
    mean squared mask error). Lower is a better match."""
    colour = ((view_rgb - rgb[None]) ** 2).flatten(1).mean(dim=1)
    silhouette = ((view_mask - mask[None]) ** 2).flatten(1).mean(dim=1)
    return colour + silhouette


@torch.no_grad()
def draw_best_group(sds, cam16: Tensor, num_views: int, candidates: int, seed: int,
                    steps: int, scale: float, input_view: Optional[int], image=None,
                    mask_low: float = MASK_LOW, mask_high: float = MASK_HIGH, eta: float = 0.0):
    """Sample ``candidates`` groups of views (seeds ``seed`` .. ``seed + candidates - 1``)
    with ``sds``'s model and conditioning (a :class:`guidance.multiview_sds.MultiViewSDS`),
    and keep the one whose view ``input_view`` is most like ``image`` (a ReferenceImage;
    ``input_view`` None: the first group).

    Args:
        cam16: [V, 16] camera vectors of one group. steps, scale, eta: DDIM steps, CFG
        scale and stochasticity.
    Returns:
        (rgb [V, S, S, 3] on pure white, mask [V, S, S, 1], chosen index, errors [K] or None).
        Not differentiable.
    """
    from guidance.reference import resize_image
    from guidance.multiview.sample import sample_views

    rgbs, masks = [], []
    for k in range(candidates):
        g = torch.Generator().manual_seed(seed + k)
        views = sample_views(sds.model, sds.context_cond, sds.context_uncond, cam16, num_views,
                             steps, scale, eta, g)
        rgb, mask = clean_views(views.float().permute(0, 2, 3, 1), mask_low, mask_high)
        rgbs.append(rgb)
        masks.append(mask)
    rgbs, masks = torch.stack(rgbs), torch.stack(masks)              # [K, V, S, S, C]
    if input_view is None:
        return rgbs[0], masks[0], 0, None
    size = rgbs.shape[2]
    errors = match_error(rgbs[:, input_view], masks[:, input_view],
                         resize_image(image.rgb.to(rgbs), size),
                         resize_image(image.mask.to(rgbs), size))
    chosen = int(errors.argmin())
    return rgbs[chosen], masks[chosen], chosen, errors


@register("guidance", "sampled-views")
class SampledViewsL2(ViewTargets, Guidance):
    """L2 colour and mask losses between renders and one group of views sampled from a
    multi-view diffusion model, picked among ``candidates`` seeds by its likeness to the input
    picture. The stage's cameras must be the same group every step (``cameras: {type:
    fixed, ...}``)."""

    loss_names = ("rgb", "mask")

    @dataclass
    class Config:
        model: str = "pkunliu/Isotropic3D"   # as multiview-sds: folder, checkpoint or hub id
        guidance_scale: float = 1.0          # CFG of the sampler (the toy model draws its
                                             # best views unguided: README, scale 1)
        sample_steps: int = 30               # DDIM steps
        candidates: int = 4                  # groups drawn (seeds seed .. seed + candidates - 1)
        seed: int = 0
        # which of the stage's cameras the input picture was taken from (its view is compared
        # with the picture to choose a candidate); null: keep the first candidate
        input_view: Optional[int] = 0
        mask_low: float = MASK_LOW           # see mask_from_white
        mask_high: float = MASK_HIGH
        precision: str = "fp32"

        def __post_init__(self):
            if self.sample_steps < 1:
                raise ConfigError(f"sample_steps: must be >= 1, got {self.sample_steps}")
            if self.candidates < 1:
                raise ConfigError(f"candidates: must be >= 1, got {self.candidates}")
            if self.guidance_scale < 0:
                raise ConfigError(f"guidance_scale: must be >= 0, got {self.guidance_scale}")
            if self.input_view is not None and self.input_view < 0:
                raise ConfigError(f"input_view: must be >= 0 or null, got {self.input_view}")
            if not 0 <= self.mask_low < self.mask_high <= 1:
                raise ConfigError("mask_low, mask_high: need 0 <= mask_low < mask_high <= 1, "
                                  f"got {self.mask_low}, {self.mask_high}")

    @classmethod
    def preflight(cls, cfg: "SampledViewsL2.Config", key: str = "stages.<stage>.guidance"):
        from guidance.multiview.pretrained import check_available

        check_available(cfg.model, key=f"{key}.model")

    def __init__(self, cfg: "SampledViewsL2.Config" = None, device=None,
                 inputs: RunInputs = None, model=None):
        super().__init__()
        from guidance.multiview_sds import MultiViewSDS

        self.cfg = cfg = cfg or SampledViewsL2.Config()
        inputs = inputs or RunInputs()
        if cfg.input_view is not None and inputs.image is None:
            raise ConfigError("guidance sampled-views picks its views by the input picture: "
                              "add image=PATH (or set input_view: null)")
        # the same model loading and conditioning as score distillation
        self.sds = MultiViewSDS(MultiViewSDS.Config(model=cfg.model, precision=cfg.precision),
                                device=device, inputs=inputs, model=model)
        self.inputs = inputs
        self.register_buffer("rgb", torch.empty(0), persistent=False)
        self.register_buffer("mask", torch.empty(0), persistent=False)
        self.register_buffer("c2w", torch.empty(0), persistent=False)
        self.chosen: Optional[int] = None
        self.errors: Optional[Tensor] = None
        self._resized: Dict[int, tuple] = {}

    @torch.no_grad()
    def draw(self, cameras: Cameras) -> None:
        """Sample ``candidates`` groups of views at ``cameras`` (one group) and keep the one
        most like the input picture as the targets."""
        from guidance.multiview.cameras import camera_vectors

        cfg, sds = self.cfg, self.sds
        n = len(cameras)
        if cameras.views_per_object != n:
            raise ConfigError(f"guidance sampled-views needs one group of views per step; the "
                              f"cameras give {n // cameras.views_per_object} groups of "
                              f"{cameras.views_per_object} (use cameras: {{type: fixed, ...}})")
        if cfg.input_view is not None and cfg.input_view >= n:
            raise ConfigError(f"input_view: {cfg.input_view} but the stage has {n} cameras")
        cam16 = camera_vectors(cameras, sds.convention).to(sds.context_cond)
        self.rgb, self.mask, self.chosen, self.errors = draw_best_group(
            sds, cam16, n, cfg.candidates, cfg.seed, cfg.sample_steps, cfg.guidance_scale,
            cfg.input_view, self.inputs.image, cfg.mask_low, cfg.mask_high)
        if self.errors is not None:
            print(f"sampled-views: kept candidate {self.chosen} of {cfg.candidates} (match "
                  f"error {float(self.errors[self.chosen]):.4f}; others "
                  + ", ".join(f"{float(e):.4f}" for i, e in enumerate(self.errors)
                              if i != self.chosen) + ")", file=sys.stderr)
        self.c2w = cameras.c2w.detach().clone()
        self._resized = {}

    def forward(self, outputs: Dict[str, Tensor], cameras: Cameras,
                step: StepInfo) -> Dict[str, Tensor]:
        if self.rgb.numel() == 0:
            self.draw(cameras)
        elif cameras.c2w.shape != self.c2w.shape or not torch.allclose(
                cameras.c2w.to(self.c2w), self.c2w, atol=1e-5):
            raise ConfigError("guidance sampled-views drew its views for other cameras: the "
                              "stage's cameras must be the same every step (type: fixed)")
        rgb, mask = self.targets(outputs["rgb"].shape[1])
        return {"rgb": F.mse_loss(outputs["rgb"], rgb.to(outputs["rgb"])),
                "mask": F.mse_loss(outputs["opacity"], mask.to(outputs["opacity"]))}
