"""The DDPM noise maths of the multi-view models, in one place.

Every function takes the schedule's ``alphas_cumprod`` [T] (float32) and integer timesteps
``t`` [N], one per row of a batch [N, ...]. The arithmetic runs in float32 whatever the
inputs' dtype (fp16 latents lose the image at small ``sqrt(alpha_bar)`` otherwise) and the
result is cast back (to the first tensor argument's dtype, except :func:`v_target`, a
training target, which stays float32). All are differentiable with respect to their tensor
inputs other than ``t`` and ``alphas_cumprod``.

The one argument order: the noisy or clean sample first, then ``t``, then the other tensor,
then ``alphas_cumprod`` (``add_noise`` and ``v_target`` take ``(x0, noise, t, ...)``, the
forward process's natural order).
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

#: the length of every schedule these models are trained on
NUM_TRAIN_TIMESTEPS = 1000


def _gather(values: Tensor, t: Tensor, like: Tensor) -> Tensor:
    """values[t] shaped [N, 1, 1, 1] for broadcasting against ``like`` [N, ...]."""
    out = values.to(like.device)[t.to(like.device).long()]
    return out.view(-1, *([1] * (like.dim() - 1)))


def add_noise(x0: Tensor, noise: Tensor, t: Tensor, alphas_cumprod: Tensor) -> Tensor:
    """Forward diffusion q(x_t | x0): x_t = sqrt(a_t) x0 + sqrt(1 - a_t) noise, in x0's dtype."""
    a = _gather(alphas_cumprod.float(), t, x0)
    return (a.sqrt() * x0.float() + (1 - a).sqrt() * noise.float()).to(x0.dtype)


def v_target(x0: Tensor, noise: Tensor, t: Tensor, alphas_cumprod: Tensor) -> Tensor:
    """v = sqrt(a_t) noise - sqrt(1 - a_t) x0, the v-prediction target (float32)."""
    a = _gather(alphas_cumprod.float(), t, x0)
    return a.sqrt() * noise.float() - (1 - a).sqrt() * x0.float()


def eps_from_v(x_t: Tensor, t: Tensor, v: Tensor, alphas_cumprod: Tensor) -> Tensor:
    """epsilon = sqrt(a_t) v + sqrt(1 - a_t) x_t, in v's dtype."""
    a = _gather(alphas_cumprod.float(), t, x_t)
    return (a.sqrt() * v.float() + (1 - a).sqrt() * x_t.float()).to(v.dtype)


def predict_x0(x_t: Tensor, t: Tensor, eps: Tensor, alphas_cumprod: Tensor) -> Tensor:
    """x0 = (x_t - sqrt(1 - a_t) eps) / sqrt(a_t) from an epsilon prediction, in x_t's dtype."""
    a = _gather(alphas_cumprod.float(), t, x_t)
    return ((x_t.float() - (1 - a).sqrt() * eps.float()) / a.sqrt()).to(x_t.dtype)


def timestep_bounds(min_percent: float, max_percent: float,
                    num_train_timesteps: int = NUM_TRAIN_TIMESTEPS) -> Tuple[int, int]:
    """Integer [t_min, t_max] from fractions of the schedule (clamped into range)."""
    lo = int(num_train_timesteps * min_percent)
    hi = int(num_train_timesteps * max_percent)
    hi = max(0, min(num_train_timesteps - 1, hi))
    lo = max(0, min(hi, lo))
    return lo, hi


def sample_timestep(t_min: int, t_max: int, generator: Optional[torch.Generator] = None) -> int:
    """One timestep, uniform on the integers [t_min, t_max], shared by every view."""
    return int(torch.randint(t_min, t_max + 1, (1,), generator=generator).item())


__all__ = ["NUM_TRAIN_TIMESTEPS", "add_noise", "v_target", "eps_from_v", "predict_x0",
           "timestep_bounds", "sample_timestep"]
