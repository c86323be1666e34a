"""Score distillation sampling, as MVDream and Isotropic3D use it. Pure functions.

Two forms of the loss, both returning a scalar whose gradient with respect to ``x0`` (the
encoded renders) is the SDS update:

* ``reconstruction`` (MVDream's): predict x0 from the guided noise, rescale its standard
  deviation towards the unguided prediction's (per object, over all its views), and pull the
  renders towards it: ``0.5 * ||x0 - x0_hat.detach()||^2 / N``.
* ``classic`` (DreamFusion's): ``grad = w(t) (eps_hat - eps)`` with ``w(t) = 1 - alpha_bar_t``,
  written as ``0.5 * ||x0 - (x0 - grad).detach()||^2 / N``.

The noise maths (add_noise, predict_x0, timesteps) is :mod:`guidance.multiview.noise`.
"""

from __future__ import annotations

import torch
from torch import Tensor

from guidance.multiview.noise import predict_x0

LOSS_FORMS = ("reconstruction", "classic")


def classifier_free_guidance(eps_uncond: Tensor, eps_cond: Tensor, scale: float) -> Tensor:
    """eps_uncond + scale (eps_cond - eps_uncond)."""
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
        x0_hat = predict_x0(x_t, t, eps_guided, alphas_cumprod)
        if std_rescale > 0:
            x0_cond = predict_x0(x_t, t, eps_cond, alphas_cumprod)
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
