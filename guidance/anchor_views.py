"""The ``anchor-views`` guidance and cameras: Envision3D's anchor views, the dense views drawn
between them, and a coarse-to-fine fit to both.

Envision3D (../shared/seeds/003) draws a few anchor views of the picture with a multi-view
model, then a second model interpolates many dense views between the anchors, conditioned on
them; reconstruction fits the anchor views first (the global shape and texture) and then all
views in step windows, each view with its own weight. At toy scale:

1. **Anchors**: one group (4 views 90 degrees apart, ``views.anchor_*``) drawn by the stage-2
   model exactly as ``sampled-views`` draws its group (``candidates`` seeds, the one whose
   view at ``input_view`` looks most like the picture kept).
2. **Dense views**: the interpolation model (``dense_model``, fine-tuning mode ``anchors``,
   recipe ``toy-anchors``) draws the ``views.dense_*`` cameras, in groups of the model's
   ``num_views``, each group conditioned on the clean anchors with their cameras
   (:func:`guidance.multiview.sample.sample_views` ``anchors=``) and on the picture's
   embedding. Each view keeps its camera.
3. **The fit** (this guidance + the ``anchor-views`` camera sampler): the stage's first
   ``anchor_steps`` steps render the anchor cameras only; after that each step renders one
   window of ``views_per_step`` views, the windows cycling through anchors then dense views,
   so every view is seen every ``ceil(n / views_per_step)`` steps. The loss is
   ``mean_i w_i * (MSE(rgb_i) , MSE(mask_i))`` with ``w_i`` = ``anchor_weight`` or
   ``dense_weight`` (schedulable, e.g. ``[0, 0.2, 1.0, 300]``): the drawn dense views agree
   with the anchors less than the anchors with each other, so they refine rather than decide.

The picture's own pixels are never a target (as ``sampled-views``). A later stage with the
same guidance settings (the ``refine`` stage of ``envision3d-toy``) reuses the views drawn
earlier in the run instead of sampling again.
"""

from __future__ import annotations

import hashlib
import math
import sys
from dataclasses import asdict, dataclass, field
from typing import Any, Dict, List, Optional

import torch
from torch import Tensor

from engine.cameras import Cameras, check_framing
from engine.errors import ConfigError
from engine.plugin import Guidance, RunInputs, StepInfo
from engine.registry import register
from engine.schedules import Schedule
from guidance.multiview.prior import PRECISIONS, MultiViewPrior, resolve_precision
from guidance.multiview.sample import draw_best_group
from guidance.multiview.targets import MASK_HIGH, MASK_LOW, DrawnViews, ViewTargets, clean_views


@dataclass
class ViewLayout:
    """The anchor and dense cameras (degrees; engine convention: azimuth 0 on +x). The views
    are numbered anchors first, then dense views, in the order given."""

    anchor_elevation: List[float] = field(default_factory=lambda: [0.0, 0.0, 0.0, 0.0])
    anchor_azimuth: List[float] = field(default_factory=lambda: [0.0, 90.0, 180.0, 270.0])
    dense_elevation: List[float] = field(default_factory=lambda: [0.0] * 4 + [25.0] * 4)
    dense_azimuth: List[float] = field(
        default_factory=lambda: [45.0, 135.0, 225.0, 315.0, 0.0, 90.0, 180.0, 270.0])
    distance: float = 2.75                 # 1 / tan(fovy / 2): framed as the toy world renders
    fovy: float = 40.0

    def __post_init__(self):
        for kind in ("anchor", "dense"):
            el, az = getattr(self, f"{kind}_elevation"), getattr(self, f"{kind}_azimuth")
            if len(el) != len(az):
                raise ConfigError(f"views.{kind}_elevation / {kind}_azimuth: need lists of the "
                                  f"same length, got {len(el)} and {len(az)}")
            if any(not -89.0 <= e <= 89.0 for e in el):
                raise ConfigError(f"views.{kind}_elevation: values must lie in [-89, 89]")
        if len(self.anchor_azimuth) < 2:
            raise ConfigError("views.anchor_azimuth: Envision3D's interpolation needs at least "
                              f"2 anchor views, got {len(self.anchor_azimuth)}")
        check_framing(self.distance, self.fovy, "views.")

    @property
    def num_anchors(self) -> int:
        return len(self.anchor_azimuth)

    @property
    def num_views(self) -> int:
        return len(self.anchor_azimuth) + len(self.dense_azimuth)

    def cameras(self, device=None) -> Cameras:
        """All views' cameras (anchors first), ``index`` = 0 .. n-1."""
        el = list(self.anchor_elevation) + list(self.dense_elevation)
        az = list(self.anchor_azimuth) + list(self.dense_azimuth)
        cams = Cameras.from_spherical(el, az, self.distance, self.fovy,
                                      views_per_object=len(az), device=device)
        cams.index = torch.arange(len(az), device=cams.c2w.device)
        return cams


def window_indices(step: int, num_anchors: int, num_views: int, anchor_steps: int,
                   views_per_step: int) -> List[int]:
    """The views a step of the coarse-to-fine schedule renders.

    Steps ``0 .. anchor_steps - 1``: the anchors ``0 .. num_anchors - 1``. Later steps: the
    views ``0 .. num_views - 1`` cut into windows of ``views_per_step`` (the last one shorter),
    one window a step, cycling. Example (4 anchors, 12 views, 20 anchor steps, 4 a step)::

        window_indices(5, 4, 12, 20, 4)    # [0, 1, 2, 3]
        window_indices(21, 4, 12, 20, 4)   # [4, 5, 6, 7]
        window_indices(22, 4, 12, 20, 4)   # [8, 9, 10, 11]
    """
    if step < anchor_steps:
        return list(range(num_anchors))
    windows = math.ceil(num_views / views_per_step)
    w = (step - anchor_steps) % windows
    return list(range(w * views_per_step, min((w + 1) * views_per_step, num_views)))


@register("cameras", "anchor-views")
class AnchorViewSampler:
    """The coarse-to-fine cameras of Envision3D's fit: anchors only, then windows of all
    views (:func:`window_indices`). ``views`` must be the guidance's (``views:
    ${stages.STAGE.guidance.views}`` in a recipe)."""

    @dataclass
    class Config:
        views: ViewLayout = field(default_factory=ViewLayout)
        anchor_steps: int = 100            # steps of the stage that fit the anchors only
        views_per_step: int = 4            # views of a window

        def __post_init__(self):
            if self.anchor_steps < 0:
                raise ConfigError(f"anchor_steps: must be >= 0, got {self.anchor_steps}")
            if self.views_per_step < 1:
                raise ConfigError(f"views_per_step: must be >= 1, got {self.views_per_step}")

    def __init__(self, cfg: "AnchorViewSampler.Config", device=None):
        self.cfg = cfg
        self.all = cfg.views.cameras(device)

    def sample(self, step: int, generator: torch.Generator) -> Cameras:
        c = self.cfg
        pick = window_indices(step, c.views.num_anchors, c.views.num_views, c.anchor_steps,
                              c.views_per_step)
        return self.all[pick]


#: views drawn in this process, by everything that decides them: a later stage with the same
#: settings (envision3d-toy's refine stage) takes them without sampling again
_DRAWN = DrawnViews(4)


@register("guidance", "anchor-views")
class AnchorViewsL2(ViewTargets, Guidance):
    """L2 colour and mask losses between renders and Envision3D-style views: anchors drawn
    by a multi-view model for the picture, dense views drawn between them by an
    interpolation model; per-view weights. The stage's cameras must come from the
    ``anchor-views`` sampler with the same ``views``."""

    loss_names = ("rgb", "mask")

    @dataclass
    class Config:
        model: str = "models/toy/stage2"     # draws the anchors (as sampled-views' model)
        dense_model: str = "models/toy/anchors"   # mode anchors: draws between the anchors
        views: ViewLayout = field(default_factory=ViewLayout)
        guidance_scale: float = 1.0          # CFG of the anchors' sampler
        dense_scale: float = 1.0             # CFG of the dense views' sampler
        sample_steps: int = 30               # DDIM steps, both samplers
        candidates: int = 4                  # anchor groups drawn; the most like the picture kept
        seed: int = 0
        input_view: Optional[int] = 0        # the anchor the picture was taken from
        anchor_weight: Any = 1.0             # per-view loss weights (schedules allowed)
        dense_weight: Any = 0.5
        mask_low: float = MASK_LOW
        mask_high: float = MASK_HIGH
        precision: str = "auto"

        def __post_init__(self):
            if self.precision not in PRECISIONS:
                raise ConfigError(f"precision: '{self.precision}' is not one of "
                                  f"{', '.join(PRECISIONS)}")
            if self.sample_steps < 1 or self.candidates < 1:
                raise ConfigError("sample_steps and candidates: must be >= 1, got "
                                  f"{self.sample_steps} and {self.candidates}")
            if self.guidance_scale < 0 or self.dense_scale < 0:
                raise ConfigError("guidance_scale and dense_scale: must be >= 0")
            if self.input_view is not None and not \
                    0 <= self.input_view < self.views.num_anchors:
                raise ConfigError(f"input_view: must name an anchor view (0 .. "
                                  f"{self.views.num_anchors - 1}) or be null, got "
                                  f"{self.input_view}")
            self.anchor_schedule = Schedule.parse(self.anchor_weight, "anchor_weight").check(
                "anchor_weight", minimum=0.0)
            self.dense_schedule = Schedule.parse(self.dense_weight, "dense_weight").check(
                "dense_weight", minimum=0.0)
            if not 0 <= self.mask_low < self.mask_high <= 1:
                raise ConfigError("mask_low, mask_high: need 0 <= mask_low < mask_high <= 1")

    @classmethod
    def preflight(cls, cfg: "AnchorViewsL2.Config", key: str = "stages.<stage>.guidance"):
        from guidance.multiview.pretrained import check_available

        check_available(cfg.model, key=f"{key}.model")
        check_available(cfg.dense_model, key=f"{key}.dense_model")

    @classmethod
    def estimate_memory(cls, cfg: "AnchorViewsL2.Config", batch: int, size: int,
                        device_type: str) -> Dict[str, Any]:
        from guidance.multiview.memory import guidance_estimate

        return guidance_estimate(cfg.model, "auto", cfg.precision, batch, size, device_type)

    def __init__(self, cfg: "AnchorViewsL2.Config" = None, device=None,
                 inputs: RunInputs = None):
        super().__init__()
        self.cfg = cfg = cfg or AnchorViewsL2.Config()
        self.inputs = inputs = inputs or RunInputs()
        if cfg.input_view is not None and inputs.image is None:
            raise ConfigError("guidance anchor-views picks its anchors by the input picture: "
                              "add image=PATH (or set input_view: null)")
        self.device_ = device
        self.register_buffer("rgb", torch.empty(0), persistent=False)
        self.register_buffer("mask", torch.empty(0), persistent=False)
        self.all = cfg.views.cameras(device)
        self._resized: Dict[int, tuple] = {}
        self.chosen: Optional[int] = None

    # -- drawing -------------------------------------------------------------------------
    def _key(self) -> str:
        cfg = self.cfg
        settings = {k: v for k, v in asdict(cfg).items()
                    if k not in ("anchor_weight", "dense_weight")}
        h = hashlib.sha1(repr(sorted(settings.items())).encode())
        if self.inputs.image is not None:
            h.update(self.inputs.image.rgb.float().cpu().contiguous().numpy().tobytes())
        if self.inputs.prompt:
            h.update(self.inputs.prompt.encode())
        return h.hexdigest()

    @torch.no_grad()
    def draw(self) -> None:
        """Draw the anchors, then the dense views between them (see the module docstring)."""
        key = self._key()
        drawn = _DRAWN.get(key)
        if drawn is not None:
            self.rgb, self.mask, self.chosen = drawn
            print("anchor-views: the views drawn earlier in this run for these settings are "
                  "reused", file=sys.stderr)
            self._resized = {}
            return
        cfg, device = self.cfg, self.device_
        dtype = resolve_precision(cfg.precision, device)
        A = cfg.views.num_anchors
        anchor_cams, dense_cams = self.all[list(range(A))], self.all[
            list(range(A, cfg.views.num_views))]
        prior = MultiViewPrior.load(cfg.model, device=device, dtype=dtype)
        cond, uncond = prior.contexts(self.inputs.image, self.inputs.prompt,
                                      who="guidance anchor-views")
        rgb, mask, self.chosen, errors = draw_best_group(
            prior, cond, uncond, prior.camera_vectors(anchor_cams).to(cond), cfg.candidates,
            cfg.seed, cfg.sample_steps, cfg.guidance_scale, cfg.input_view, self.inputs.image,
            cfg.mask_low, cfg.mask_high)
        if errors is not None:
            print(f"anchor-views: kept anchor group {self.chosen} of {cfg.candidates} (match "
                  f"error {float(errors[self.chosen]):.4f})", file=sys.stderr)
        del prior
        rgbs, masks = [rgb], [mask]
        if len(dense_cams):
            dense_rgb, dense_mask = draw_dense(
                cfg.dense_model, self.inputs, rgb, prior_cameras=(anchor_cams, dense_cams),
                steps=cfg.sample_steps, scale=cfg.dense_scale, seed=cfg.seed + 1000,
                device=device, dtype=dtype, mask_low=cfg.mask_low, mask_high=cfg.mask_high)
            rgbs.append(dense_rgb)
            masks.append(dense_mask)
        self.rgb, self.mask = torch.cat(rgbs).to(device), torch.cat(masks).to(device)
        _DRAWN.put(key, (self.rgb, self.mask, self.chosen))
        self._resized = {}

    def view_weights(self, index: Tensor, step: int) -> Tensor:
        """[n] loss weight of each view ``index`` at stage step ``step``."""
        A = self.cfg.views.num_anchors
        a = float(self.cfg.anchor_schedule(step))
        d = float(self.cfg.dense_schedule(step))
        return torch.where(index < A, torch.tensor(a), torch.tensor(d))

    def forward(self, outputs: Dict[str, Tensor], cameras: Cameras,
                step: StepInfo) -> Dict[str, Tensor]:
        if cameras.index is None:
            raise ConfigError("guidance anchor-views needs the anchor-views camera sampler "
                              "(cameras: {type: anchor-views, views: <the guidance's views>})")
        idx = cameras.index.to(self.all.c2w.device)
        if not torch.allclose(cameras.c2w.to(self.all.c2w), self.all.c2w[idx], atol=1e-5):
            raise ConfigError("guidance anchor-views: the stage's cameras are not the "
                              "guidance's views; set the sampler's views to "
                              "${stages.STAGE.guidance.views}")
        if self.rgb.numel() == 0:
            self.draw()
        rgb, mask = self.targets(outputs["rgb"].shape[1])
        rgb, mask = rgb[idx.to(rgb.device)], mask[idx.to(mask.device)]
        outputs["target_rgb"], outputs["target_mask"] = rgb.detach(), mask.detach()
        w = self.view_weights(idx.cpu(), step.step).to(outputs["rgb"])
        err_rgb = ((outputs["rgb"] - rgb.to(outputs["rgb"])) ** 2).flatten(1).mean(1)
        err_mask = ((outputs["opacity"] - mask.to(outputs["opacity"])) ** 2).flatten(1).mean(1)
        return {"rgb": (w * err_rgb).mean(), "mask": (w * err_mask).mean()}


@torch.no_grad()
def draw_dense(model, inputs: RunInputs, anchor_rgb: Tensor, prior_cameras, steps: int,
               scale: float, seed: int, device=None, dtype=None, mask_low: float = MASK_LOW,
               mask_high: float = MASK_HIGH, progress_label: str = "drawing dense views"):
    """Views between anchors, drawn by an interpolation model (mode anchors).

    Args:
        model: folder (or loaded model) of the interpolation model. inputs: the run's inputs
        (the picture conditions it as every image model). anchor_rgb: [A, S, S, 3] clean
        anchor views on white, in [0, 1]. prior_cameras: (anchor Cameras [A], dense Cameras
        [D]). The dense cameras are drawn in groups of the model's ``num_views``, each group
        with every anchor in its attention; group g from seed ``seed + g``.
    Returns:
        (rgb [D, S, S, 3] on white, mask [D, S, S, 1]). Not differentiable.
    """
    from engine.progress import bar

    anchor_cams, dense_cams = prior_cameras
    prior = MultiViewPrior.load(model, device=device, dtype=dtype)
    cond, uncond = prior.contexts(inputs.image, inputs.prompt, who="guidance anchor-views")
    a_x0 = prior.encode(anchor_rgb.permute(0, 3, 1, 2).to(prior.device))
    a_cam = prior.camera_vectors(anchor_cams).to(cond)
    d_cam = prior.camera_vectors(dense_cams).to(cond)
    V = prior.num_views
    chunks = [list(range(i, min(i + V, len(dense_cams)))) for i in range(0, len(dense_cams), V)]
    views = []
    with bar(len(chunks) * steps, progress_label, unit="step") as progress:
        for g, chunk in enumerate(chunks):
            gen = torch.Generator().manual_seed(seed + g)
            views.append(prior.sample(cond, uncond, d_cam[chunk], steps, scale, 0.0, gen,
                                      progress=progress, anchors=(a_x0, a_cam)))
    views = torch.cat(views).float().permute(0, 2, 3, 1)
    return clean_views(views, mask_low, mask_high)
