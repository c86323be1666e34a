"""The ``multiview-sds`` guidance: score distillation from a multi-view diffusion model.

Isotropic3D conditions the model on the CLIP image embedding of the input picture only;
MVDream conditions it on a prompt. Renders are resized to the model's resolution (and
VAE-encoded for a latent model); one timestep per step is shared by all views; classifier-free
guidance; the reconstruction or the classic form of the loss (guidance/multiview/sds.py).
Gradients reach the renders only: the model is frozen and runs under no_grad. The model, its
conditioning, cameras and noise maths are a :class:`guidance.multiview.prior.MultiViewPrior`;
this plugin is its settings and the SDS step.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict

import torch
from torch import Tensor

from engine.cameras import Cameras
from engine.errors import ConfigError
from engine.plugin import Guidance, RunInputs, StepInfo
from engine.registry import register
from engine.schedules import Schedule
from guidance.multiview import noise, sds
from guidance.multiview.cameras import CONVENTIONS
from guidance.multiview.prior import PRECISIONS, MultiViewPrior, resolve_precision


def _choice(key: str, value: str, options) -> None:
    if value not in options:
        raise ConfigError(f"{key}: '{value}' is not one of {', '.join(options)}")


@register("guidance", "multiview-sds")
class MultiViewSDS(Guidance):
    """Score distillation from a multi-view diffusion model (Isotropic3D image embedding or
    MVDream prompt conditioning)."""

    loss_names = ("sds",)

    @dataclass
    class Config:
        # a converted folder (python -m guidance.multiview.convert), a raw .ckpt/.pt, or a hub id
        model: str = "pkunliu/Isotropic3D"
        conditioning: str = "auto"          # auto (the model's) | image | text
        # a number or a schedule (engine/schedules.py) on the same clock as the t-range, e.g.
        # [0, 3.0, 1.0, 400]: strong guidance while the shape forms, weaker while it refines
        guidance_scale: Any = 10.0
        # fractions of the 1000-step schedule; MVDream anneals both over the first 8000 steps
        min_step_percent: Any = field(default_factory=lambda: [0, 0.98, 0.02, 8000])
        max_step_percent: Any = field(default_factory=lambda: [0, 0.98, 0.50, 8000])
        loss: str = "reconstruction"        # reconstruction | classic
        std_rescale: float = 0.5            # reconstruction form only
        camera_convention: str = "auto"     # auto (the model's) | mvdream | isotropic3d-release
        # the frozen model's dtype: auto = bf16 (or fp16) on CUDA, fp32 on CPU; fast = auto,
        # but bf16 on CPUs that compute it (AVX-512); or fp32 | fp16 | bf16. The loss maths
        # runs in fp32 whatever this is.
        precision: str = "auto"
        negative_prompt: str = ""           # text conditioning only
        keep_conditioner: bool = False      # free the image/text encoder once embedded
        # the step the t-range and guidance-scale schedules read: "run" counts across stages
        # (so a refinement stage continues where the NeRF stage's annealing ended), "stage"
        # restarts at 0
        schedule_clock: str = "run"

        def __post_init__(self):
            _choice("conditioning", self.conditioning, ("auto", "image", "text"))
            _choice("loss", self.loss, sds.LOSS_FORMS)
            _choice("camera_convention", self.camera_convention, ("auto",) + CONVENTIONS)
            _choice("precision", self.precision, tuple(PRECISIONS))
            _choice("schedule_clock", self.schedule_clock, ("run", "stage"))
            self.scale_schedule = Schedule.parse(self.guidance_scale, "guidance_scale").check(
                "guidance_scale", minimum=0)
            if not 0 <= self.std_rescale <= 1:
                raise ConfigError(f"std_rescale: must be in [0, 1], got {self.std_rescale}")
            self.min_schedule = Schedule.parse(self.min_step_percent, "min_step_percent")
            self.max_schedule = Schedule.parse(self.max_step_percent, "max_step_percent")
            for key, s in (("min_step_percent", self.min_schedule),
                           ("max_step_percent", self.max_schedule)):
                for v in s.values():
                    if not 0 <= v <= 1:
                        raise ConfigError(f"{key}: values must be in [0, 1], got {v:g}")

    @classmethod
    def preflight(cls, cfg: "MultiViewSDS.Config", key: str = "stages.<stage>.guidance") -> None:
        from guidance.multiview.pretrained import check_available

        check_available(cfg.model, key=f"{key}.model")

    @classmethod
    def estimate_memory(cls, cfg: "MultiViewSDS.Config", batch: int, size: int,
                        device_type: str) -> Dict[str, Any]:
        """Bytes of the frozen model and one step's activations on ``batch`` renders of
        ``size`` px (engine/estimate.py; real-size models on fake tensors)."""
        from guidance.multiview.memory import guidance_estimate

        return guidance_estimate(cfg.model, cfg.conditioning, cfg.precision, batch, size,
                                 device_type, keep_conditioner=cfg.keep_conditioner)

    def __init__(self, cfg: "MultiViewSDS.Config" = None, device=None, inputs: RunInputs = None,
                 model=None):
        super().__init__()
        self.cfg = cfg = cfg or MultiViewSDS.Config()
        inputs = inputs or RunInputs()
        self.prior = MultiViewPrior.load(cfg.model if model is None else model, device=device,
                                         dtype=resolve_precision(cfg.precision, device),
                                         camera_convention=cfg.camera_convention,
                                         conditioning=cfg.conditioning)
        cond, uncond = self.prior.contexts(inputs.image, inputs.prompt, cfg.negative_prompt,
                                           who="guidance multiview-sds")
        self.register_buffer("context_cond", cond, persistent=False)
        self.register_buffer("context_uncond", uncond, persistent=False)
        if not cfg.keep_conditioner:
            self.prior.drop_conditioner()

    @property
    def model(self):
        """The frozen MultiViewDiffusionModel (the prior's)."""
        return self.prior.model

    @property
    def conditioning(self) -> str:
        return self.prior.conditioning

    @property
    def convention(self) -> str:
        return self.prior.convention

    def t_range(self, step: int):
        """[t_min, t_max] at this step of the schedule clock."""
        return noise.timestep_bounds(self.cfg.min_schedule(step), self.cfg.max_schedule(step))

    def guidance_scale(self, step: int) -> float:
        """The classifier-free guidance scale at this step of the schedule clock."""
        return self.cfg.scale_schedule(step)

    def _clock(self, step: StepInfo) -> int:
        return step.global_step if self.cfg.schedule_clock == "run" else step.step

    def forward(self, outputs: Dict[str, Tensor], cameras: Cameras,
                step: StepInfo) -> Dict[str, Tensor]:
        prior = self.prior
        rgb = outputs["rgb"].permute(0, 3, 1, 2)
        n, views = rgb.shape[0], cameras.views_per_object
        if n % views:
            raise ValueError(f"{n} renders are not whole groups of {views} views")
        # latents in fp32: a half-precision model's output, the loss and its gradient in full
        x0 = prior.encode(rgb).float()
        clock = self._clock(step)
        t_min, t_max = self.t_range(clock)
        t = torch.full((n,), noise.sample_timestep(t_min, t_max), device=x0.device,
                       dtype=torch.long)
        epsilon = torch.randn_like(x0)
        camera = prior.camera_vectors(cameras)
        with torch.no_grad():
            x_t = prior.add_noise(x0.detach(), epsilon, t)
            eps_uncond, eps_cond = prior.predict_eps_pair(x_t, t, self.context_cond,
                                                          self.context_uncond, camera, views)
            eps_guided = sds.classifier_free_guidance(eps_uncond, eps_cond,
                                                      self.guidance_scale(clock))
        alphas = prior.alphas_cumprod.to(x0.device)
        if self.cfg.loss == "reconstruction":
            loss = sds.reconstruction_loss(x0, x_t, t, eps_guided, eps_cond, alphas, views,
                                           self.cfg.std_rescale)
        else:
            loss = sds.classic_loss(x0, epsilon, t, eps_guided, alphas)
        return {"sds": loss.float()}
