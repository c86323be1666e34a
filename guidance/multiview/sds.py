"""Score distillation sampling, as MVDream and Isotropic3D use it. Pure functions.

Two forms of the loss, both returning a scalar whose gradient with respect to ``x0`` (the
encoded renders) is the SDS update:

* ``reconstruction`` (MVDream's): predict x0 from the guided noise, rescale its standard
  deviation towards the unguided prediction's (per object, over all its views), and pull the
  renders towards it: ``0.5 * ||x0 - x0_hat.detach()||^2 / N``.
* ``classic`` (DreamFusion's): ``grad = w(t) (eps_hat - eps)`` with ``w(t) = 1 - alpha_bar_t``,
  written as ``0.5 * ||x0 - (x0 - grad).detach()||^2 / N``.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

NUM_TRAIN_TIMESTEPS = 1000
LOSS_FORMS = ("reconstruction", "classic")


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


def add_noise(x0: Tensor, noise: Tensor, t: Tensor, alphas_cumprod: Tensor) -> Tensor:
    """Forward diffusion q(x_t | x0). t: [N] integer timesteps."""
    a = alphas_cumprod[t].to(x0).view(-1, *([1] * (x0.dim() - 1)))
    return a.sqrt() * x0 + (1 - a).sqrt() * noise


def predict_x0(x_t: Tensor, eps: Tensor, t: Tensor, alphas_cumprod: Tensor) -> Tensor:
    """x0 from x_t and a noise prediction (epsilon parameterisation)."""
    a = alphas_cumprod[t].to(x_t).view(-1, *([1] * (x_t.dim() - 1)))
    return (x_t - (1 - a).sqrt() * eps) / a.sqrt()


def classifier_free_guidance(eps_uncond: Tensor, eps_cond: Tensor, scale: float) -> Tensor:
    return eps_uncond + scale * (eps_cond - eps_uncond)


def reconstruction_loss(x0: Tensor, x_t: Tensor, t: Tensor, eps_guided: Tensor, eps_cond: Tensor,
                        alphas_cumprod: Tensor, num_views: int, std_rescale: float = 0.5) -> Tensor:
    """MVDream's x0-reconstruction SDS loss.

    Args:
        x0: [N, C, H, W] encoded renders (N = objects * views, view-contiguous).
        x_t: noisy x0; t: [N]; eps_guided / eps_cond: CFG and conditional noise predictions.
        std_rescale: r in x0_hat = r * x0_hat * std(x0_cond)/std(x0_hat) + (1 - r) * x0_hat,
            the std taken per object over all its views.
    Returns:
        scalar; its gradient w.r.t. x0 is (x0 - x0_hat) / N. Differentiable w.r.t. x0 only.
    """
    with torch.no_grad():
        x0_hat = predict_x0(x_t, eps_guided, t, alphas_cumprod)
        if std_rescale > 0:
            x0_cond = predict_x0(x_t, eps_cond, t, alphas_cumprod)
            per_obj = x0_hat.shape[0] // num_views
            std_hat = x0_hat.reshape(per_obj, -1).std(dim=1) + 1e-8
            std_cond = x0_cond.reshape(per_obj, -1).std(dim=1) + 1e-8
            factor = (std_cond / std_hat).repeat_interleave(num_views).view(-1, 1, 1, 1)
            x0_hat = std_rescale * x0_hat * factor + (1 - std_rescale) * x0_hat
    return 0.5 * ((x0 - x0_hat) ** 2).sum() / x0.shape[0]


def classic_loss(x0: Tensor, noise: Tensor, t: Tensor, eps_guided: Tensor,
                 alphas_cumprod: Tensor) -> Tensor:
    """DreamFusion's SDS: gradient w(t) (eps_guided - noise) w.r.t. x0, per element / N.

    Differentiable w.r.t. x0 only.
    """
    with torch.no_grad():
        w = (1 - alphas_cumprod[t]).to(x0).view(-1, 1, 1, 1)
        grad = torch.nan_to_num(w * (eps_guided - noise))
        target = x0 - grad
    return 0.5 * ((x0 - target) ** 2).sum() / x0.shape[0]
