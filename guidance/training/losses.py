"""The maths of one training step, on tensors: noising a multi-view batch, the diffusion
loss and its weights (per timestep: min-SNR; per pixel: the object's alpha), and CLIP's
contrastive loss. No model, no I/O: each function is checked on hand-built tensors.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor


def drop_context(context: Tensor, uncond: Tensor, drop: Tensor) -> Tensor:
    """context [B, L, D]; uncond [1, L, D]; drop [B] bool -> [B, L, D] with the dropped
    objects' context replaced by ``uncond``. Differentiable with respect to both."""
    return torch.where(drop.view(-1, 1, 1).to(context.device),
                       uncond.to(context).expand_as(context), context)


@dataclass
class DiffusionBatch:
    """One training batch for the UNet, view-contiguous: B objects x G views each."""

    x_t: Tensor          # [B*G, C, h, w] noisy views (then the clean reference or anchors)
    t: Tensor            # [B*G] long (the reference's: 0)
    context: Tensor      # [B*G, L, D]
    camera: Tensor       # [B*G, 16]
    noise: Tensor        # [B*V, C, h, w] the noise added to the V noisy views
    target: Tensor       # [B*V, C, h, w] what the UNet should output there (noise, or v)
    dropped: Tensor      # [B] bool: which objects got the unconditional context
    num_views: int       # V
    group: int           # G = V (text, image), V + 1 (ema) or V + K (anchors)


def make_diffusion_batch(x0: Tensor, context: Tensor, uncond: Tensor, camera: Tensor,
                         alphas_cumprod: Tensor, generator: torch.Generator,
                         cfg_dropout: float, reference: Optional[Tuple[Tensor, Tensor]] = None,
                         prediction_type: str = "epsilon") -> DiffusionBatch:
    """Noise a batch of multi-view objects.

    Args:
        x0: [B, V, C, h, w] clean views in the model's space. context: [B, L, D]; uncond:
        [1, L, D]. camera: [B, V, 16]. generator: a CPU generator; the draws, in order, are
        t [B] ~ U{0..999} (shared by an object's views), noise [B, V, C, h, w] ~ N(0, 1),
        u [B] ~ U[0, 1) (dropped where u < cfg_dropout).
        reference: (ref_x0 [B, C, h, w], ref_camera [B, 16]) for ema: appended as the last
        view of each group, clean, timestep 0, same context; or (ref_x0 [B, K, C, h, w],
        ref_camera [B, K, 16]) for mode anchors: K clean views appended, each at timestep 0
        with its own camera (G = V + K).
        prediction_type: epsilon (target = noise) or v_prediction (target = v).
    Returns:
        :class:`DiffusionBatch`. Differentiable with respect to x0, context and camera.
    """
    from guidance.multiview.model import SCHEDULER_KWARGS, add_noise, v_target

    B, V = x0.shape[:2]
    dev = x0.device
    steps = SCHEDULER_KWARGS["num_train_timesteps"]
    t = torch.randint(0, steps, (B,), generator=generator).to(dev)
    noise = torch.randn(x0.shape, generator=generator, dtype=torch.float32).to(dev, x0.dtype)
    dropped = torch.rand(B, generator=generator) < cfg_dropout
    ctx = drop_context(context, uncond, dropped)
    t_views = t.repeat_interleave(V)
    x_t = add_noise(x0.flatten(0, 1), noise.flatten(0, 1), t_views, alphas_cumprod).view(x0.shape)
    target = noise.flatten(0, 1)
    if prediction_type == "v_prediction":
        target = v_target(x0.flatten(0, 1), target, t_views, alphas_cumprod).to(x0.dtype)
    t_all = t[:, None].expand(B, V)
    cam = camera
    G = V
    if reference is not None:
        ref_x0, ref_cam = reference
        if ref_x0.dim() == x0.dim() - 1:                     # one reference: K = 1
            ref_x0, ref_cam = ref_x0[:, None], ref_cam[:, None]
        K = ref_x0.shape[1]
        x_t = torch.cat([x_t, ref_x0.to(x_t)], dim=1)
        t_all = torch.cat([t_all, torch.zeros(B, K, dtype=t.dtype, device=dev)], dim=1)
        cam = torch.cat([camera, ref_cam.to(camera)], dim=1)
        G = V + K
    return DiffusionBatch(
        x_t=x_t.flatten(0, 1), t=t_all.reshape(-1), camera=cam.flatten(0, 1),
        context=ctx.repeat_interleave(G, dim=0), noise=noise.flatten(0, 1), target=target,
        dropped=dropped,
        num_views=V, group=G)


def diffusion_loss(eps: Tensor, noise: Tensor, num_views: int, group: int,
                   weights: Optional[Tensor] = None,
                   pixel_weights: Optional[Tensor] = None) -> Tensor:
    """MSE over the noisy views only: eps [B*G, C, h, w] (the UNet's output, group-contiguous,
    the noisy views first), noise [B*V, C, h, w] (its target: the noise, or v) -> scalar
    (float32). Views G > V (the ema reference) are excluded. ``weights`` [B*V] (see
    :func:`snr_loss_weights`) scale each view's mean squared error; ``pixel_weights``
    [B*V, 1, h, w] (see :func:`foreground_pixel_weights`) each pixel's, before the mean. Both
    None is the plain MSE. Differentiable with respect to ``eps``."""
    B = eps.shape[0] // group
    pred = eps.view(B, group, *eps.shape[1:])[:, :num_views].float()
    target = noise.view(B, num_views, *noise.shape[1:]).float()
    if weights is None and pixel_weights is None:
        return F.mse_loss(pred, target)
    err = (pred - target) ** 2                                             # [B, V, C, h, w]
    if pixel_weights is not None:
        err = err * pixel_weights.view(B, num_views, 1, *err.shape[3:]).to(err)
    per_view = err.flatten(2).mean(dim=2)                                  # [B, V]
    if weights is None:
        return per_view.mean()
    return (per_view * weights.view(B, num_views).to(per_view)).mean()


def foreground_pixel_weights(masks: Tensor, size: Tuple[int, int], weight: float) -> Tensor:
    """Per-pixel loss weights from the views' alpha: masks [N, 1, S, S] in [0, 1] -> [N, 1, h,
    w] (float32) = 1 + weight * alpha, alpha area-averaged to ``size`` (the model's space, so
    a latent pixel weighs by the share of object it covers). The background keeps weight 1,
    as in the plain MSE, so the loss of a view grows by 1 + weight * (its object's share).
    Not differentiable (masks only)."""
    a = masks.float()
    if tuple(a.shape[-2:]) != tuple(size):
        a = F.adaptive_avg_pool2d(a, size)
    return 1.0 + weight * a.clamp(0.0, 1.0)


def snr_loss_weights(t: Tensor, alphas_cumprod: Tensor, prediction_type: str,
                     weighting: str = "min-snr", gamma: float = 5.0) -> Tensor:
    """Per-sample weights of the diffusion loss for timesteps ``t`` [N] -> [N] (float32).

    min-snr: the MSE on x0 weighted by min(SNR, gamma), SNR = alpha_bar / (1 - alpha_bar),
    expressed for the UNet's own target: an epsilon error is SNR times an x0 error, a v error
    (SNR + 1) times, so the weights are min(SNR, gamma) / SNR and min(SNR, gamma) / (SNR + 1).
    uniform: ones. Not differentiable (timesteps and schedule only).
    """
    if weighting == "uniform":
        return torch.ones(t.shape, dtype=torch.float32, device=t.device)
    from diffusers.training_utils import compute_snr

    # diffusers' compute_snr gives the SNR (it only reads the scheduler's alphas_cumprod); the
    # weights stay ours: diffusers' training scripts divide min(SNR, gamma) by the SNR, which
    # is 0 / 0 at a zero-terminal-SNR schedule's last step, where ours gives epsilon weight 1
    snr = compute_snr(SimpleNamespace(alphas_cumprod=alphas_cumprod), t)
    if prediction_type == "v_prediction":
        return (snr.clamp(max=gamma) / (snr + 1)).float()
    # min(SNR, gamma) / SNR written as min(1, gamma / SNR): 1 at SNR 0, not 0 / 0
    return (gamma / snr).clamp(max=1.0).float()


def clip_loss(image_features: Tensor, text_features: Tensor, scale: Tensor, labels: Tensor
              ) -> Tuple[Tensor, Tensor]:
    """Symmetric InfoNCE (CLIP) with several images per caption.

    Args:
        image_features: [N, D], text_features: [U, D], both L2-normalised; scale: the
        exponentiated logit scale (scalar); labels: [N] long, the caption of each image.
    Returns:
        (loss, top-1 image->text accuracy). image->text: cross-entropy to the own caption;
        text->image: cross-entropy to the uniform distribution over the caption's images.
        Differentiable with respect to features and scale.
    """
    logits = scale * image_features.float() @ text_features.float().t()      # [N, U]
    i2t = F.cross_entropy(logits, labels)
    target = F.one_hot(labels, text_features.shape[0]).float().t()          # [U, N]
    target = target / target.sum(1, keepdim=True).clamp_min(1.0)
    t2i = F.cross_entropy(logits.t(), target)
    acc = (logits.argmax(1) == labels).float().mean()
    return 0.5 * (i2t + t2i), acc
