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
they only pick among the model's own samples. The model and its conditioning are a
:class:`guidance.multiview.prior.MultiViewPrior`; the drawing and the choice are
:func:`guidance.multiview.sample.draw_best_group`, which the sample command shares.
"""

from __future__ import annotations

import hashlib
import sys
from dataclasses import dataclass
from typing import Any, Dict, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from engine.cameras import Cameras
from engine.errors import ConfigError
from engine.plugin import Guidance, RunInputs, StepInfo
from engine.registry import register
from guidance.multiview.prior import PRECISIONS, MultiViewPrior, resolve_precision
from guidance.multiview.sample import draw_best_group
from guidance.multiview.targets import MASK_HIGH, MASK_LOW, DrawnViews, ViewTargets


#: groups drawn in this process, by everything that decides them (settings, model, contexts,
#: cameras): a later stage with the same guidance settings and cameras (one2345pp-toy's refine
#: stage after its views stage) takes the same group without sampling again
_DRAWN = DrawnViews(4)


def _draw_key(cfg, model_id: str, *tensors: Tensor) -> str:
    import guidance.multiview.sample as mv_sample

    # the sampler's identity too: a test that swaps it never sees another sampler's group
    h = hashlib.sha1(repr((model_id, id(mv_sample.sample_views), cfg.guidance_scale,
                           cfg.sample_steps, cfg.candidates, cfg.seed, cfg.input_view,
                           cfg.mask_low, cfg.mask_high, cfg.precision)).encode())
    for t in tensors:
        h.update(repr((tuple(t.shape), str(t.dtype))).encode())
        h.update(t.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


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
        precision: str = "auto"              # as multiview-sds: auto = bf16/fp16 on CUDA

        def __post_init__(self):
            if self.precision not in PRECISIONS:
                raise ConfigError(f"precision: '{self.precision}' is not one of "
                                  f"{', '.join(PRECISIONS)}")
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

    @classmethod
    def estimate_memory(cls, cfg: "SampledViewsL2.Config", batch: int, size: int,
                        device_type: str) -> Dict[str, Any]:
        """Bytes of the frozen model and its sampling (counted as an SDS step on the batch,
        an upper bound: sampling runs the UNet without the VAE's backward)."""
        from guidance.multiview.memory import guidance_estimate

        return guidance_estimate(cfg.model, "auto", cfg.precision, batch, size, device_type)

    def __init__(self, cfg: "SampledViewsL2.Config" = None, device=None,
                 inputs: RunInputs = None, model=None):
        super().__init__()
        self.cfg = cfg = cfg or SampledViewsL2.Config()
        inputs = inputs or RunInputs()
        if cfg.input_view is not None and inputs.image is None:
            raise ConfigError("guidance sampled-views picks its views by the input picture: "
                              "add image=PATH (or set input_view: null)")
        # the same model loading and conditioning as score distillation
        self._model_id = cfg.model if model is None else f"object {id(model)}"
        self.prior = MultiViewPrior.load(cfg.model if model is None else model, device=device,
                                         dtype=resolve_precision(cfg.precision, device))
        cond, uncond = self.prior.contexts(inputs.image, inputs.prompt,
                                           who="guidance sampled-views")
        self.prior.drop_conditioner()
        self.register_buffer("context_cond", cond, persistent=False)
        self.register_buffer("context_uncond", uncond, persistent=False)
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
        cfg = self.cfg
        n = len(cameras)
        if cameras.views_per_object != n:
            raise ConfigError(f"guidance sampled-views needs one group of views per step; the "
                              f"cameras give {n // cameras.views_per_object} groups of "
                              f"{cameras.views_per_object} (use cameras: {{type: fixed, ...}})")
        if cfg.input_view is not None and cfg.input_view >= n:
            raise ConfigError(f"input_view: {cfg.input_view} but the stage has {n} cameras")
        cam16 = self.prior.camera_vectors(cameras).to(self.context_cond)
        key = _draw_key(cfg, self._model_id, self.context_cond, self.context_uncond, cam16)
        drawn = _DRAWN.get(key)
        if drawn is not None:
            self.rgb, self.mask, self.chosen, self.errors = drawn
            print(f"sampled-views: the group drawn earlier in this run for these settings and "
                  f"cameras (candidate {self.chosen}) is reused", file=sys.stderr)
            self.c2w = cameras.c2w.detach().clone()
            self._resized = {}
            return
        self.rgb, self.mask, self.chosen, self.errors = draw_best_group(
            self.prior, self.context_cond, self.context_uncond, cam16, cfg.candidates,
            cfg.seed, cfg.sample_steps, cfg.guidance_scale, cfg.input_view, self.inputs.image,
            cfg.mask_low, cfg.mask_high)
        _DRAWN.put(key, (self.rgb, self.mask, self.chosen, self.errors))
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
        # hand the targets to the representation (its regularizers() sees these outputs):
        # textured-mesh back-projects them onto its texture once (representations/
        # textured_mesh.py); others ignore the keys
        outputs["target_rgb"], outputs["target_mask"] = rgb.detach(), mask.detach()
        return {"rgb": F.mse_loss(outputs["rgb"], rgb.to(outputs["rgb"])),
                "mask": F.mse_loss(outputs["opacity"], mask.to(outputs["opacity"]))}
