"""The weight average (``average_decay``): diffusers' EMAModel over a module of its own.

The average is a module (``.module``, same keys as the live one), so it is checkpointed,
sampled from and saved like it; the EMA's shadow parameters are that module's own
parameters, so there is no second copy of the weights.
"""

from __future__ import annotations

import copy

import torch
from diffusers.training_utils import EMAModel


class _WarmupFromFirstUpdate(EMAModel):
    """EMAModel's warm-up, d = min(decay, (1 + n) / (10 + n)) with n the updates before this
    one, from the very first update. diffusers' ``get_decay`` returns 0 for the first update
    (it copies the live weights); this project's average has always moved 1/10 of the way
    there, and checkpoints count its updates that way, so that one value is kept."""

    def get_decay(self, optimization_step: int) -> float:
        n = optimization_step - 1
        return min(self.decay, (1.0 + n) / (10.0 + n))


class WeightAverage:
    """Exponential moving average of a module's parameters (diffusers' EMAModel) and of its
    floating-point buffers; integer buffers are copied.

    The average starts as a copy of the module; ``update`` after each optimiser step moves it
    towards the live weights by ``1 - d`` with ``d = min(decay, (1 + n) / (10 + n))`` (n: the
    updates so far, ``updates``), so the first steps are not held back by the initial
    weights. ``updates`` travels in the checkpoint's info; the module's weights in its tensors.
    """

    def __init__(self, module: torch.nn.Module, decay: float, device=None):
        self.module = copy.deepcopy(module).eval().requires_grad_(False)
        if device is not None:
            self.module.to(device)
        self.ema = _WarmupFromFirstUpdate([], decay=decay)
        # the shadow parameters are the module's Parameter objects (not clones), so the module
        # is the average after every step and a checkpoint restored into it restores the EMA
        self.ema.shadow_params = list(self.module.parameters())

    @property
    def updates(self) -> int:
        return self.ema.optimization_step

    @updates.setter
    def updates(self, value: int) -> None:
        self.ema.optimization_step = int(value)

    @torch.no_grad()
    def update(self, module: torch.nn.Module) -> None:
        # (EMAModel copies a frozen parameter instead of averaging it; every parameter of the
        # modules trained here learns)
        self.ema.step(module.parameters())
        # EMAModel averages parameters only; buffers (none in the UNet or the CLIP) as before
        weight = 1.0 - self.ema.cur_decay_value
        for avg, live in zip(self.module.buffers(), module.buffers()):
            if avg.dtype.is_floating_point:
                avg.lerp_(live.detach().to(avg), weight)
            else:
                avg.copy_(live)
