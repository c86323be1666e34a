"""Adaptive density control of 3D Gaussians (Kerbl et al. 2023; DreamGaussian's settings).

Every ``every`` steps between ``start`` and ``stop``, with ``g`` the mean norm of a
Gaussian's view-space (NDC) position gradient over the views that saw it since the last
densification:

* **clone** the Gaussians with ``g > grad_threshold`` that are small (largest scale
  ``<= percent_dense * extent``): a copy at the same place; the optimiser moves both;
* **split** those that are large: ``split_into`` samples drawn from the Gaussian itself,
  scales divided by ``0.8 * split_into``; the original is removed;
* **prune** the Gaussians whose opacity is below ``min_opacity`` or whose largest scale is
  above ``max_scale * extent`` (the exploding ones).

Every ``opacity_reset_every`` steps (0: never) opacities are lowered to at most
``reset_opacity``, so floaters must earn their opacity back or get pruned.

Each edited parameter becomes a new ``nn.Parameter`` swapped into the module and the
optimiser; its per-parameter state (Adam's moments) is edited with the same row operations,
new rows starting from zero. Nothing here is differentiable.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, Optional

import torch
from torch import Tensor, nn

from engine.errors import ConfigError


@dataclass
class DensifyConfig:
    enabled: bool = True
    start: int = 100                 # first step that densifies
    stop: int = 3000                 # no densification from this step on
    every: int = 100                 # steps between densifications
    grad_threshold: float = 0.01     # mean view-space (NDC) gradient norm that densifies
    percent_dense: float = 0.01      # clone below / split above this fraction of the extent
    extent: float = 0.5              # the scene's extent (world units; the object's radius)
    split_into: int = 2
    min_opacity: float = 0.01        # prune below this opacity
    max_scale: float = 0.1           # prune above this fraction of the extent (largest axis)
    opacity_reset_every: int = 0     # 0: never; DreamGaussian: 700 when used
    reset_opacity: float = 0.01
    max_gaussians: int = 0           # 0: no cap; otherwise densification stops growing here

    def __post_init__(self):
        if self.every < 1:
            raise ConfigError(f"densify.every: must be >= 1, got {self.every}")
        if self.start < 0 or self.stop < 0:
            raise ConfigError(f"densify.start/stop: must be >= 0, got {self.start}, {self.stop}")
        if self.enabled and self.start >= self.stop:
            raise ConfigError(f"densify: the schedule is out of order: start ({self.start}) must "
                              f"come before stop ({self.stop})")
        if self.grad_threshold <= 0 or self.extent <= 0 or self.percent_dense <= 0:
            raise ConfigError("densify: grad_threshold, extent and percent_dense must be > 0")
        if self.split_into < 2:
            raise ConfigError(f"densify.split_into: must be >= 2, got {self.split_into}")
        if not 0.0 <= self.min_opacity < 1.0 or not 0.0 < self.reset_opacity < 1.0:
            raise ConfigError("densify: min_opacity must be in [0, 1) and reset_opacity in "
                              "(0, 1)")
        if self.opacity_reset_every < 0 or self.max_gaussians < 0:
            raise ConfigError("densify: opacity_reset_every and max_gaussians must be >= 0")


def edit_rows(module: nn.Module, names, optimizer: Optional[torch.optim.Optimizer],
              keep: Tensor, new: Dict[str, Tensor]) -> None:
    """Keep the rows ``keep`` [N] bool of each parameter ``module.<name>`` (dim 0) and append
    ``new[name]`` rows. Each becomes a new ``nn.Parameter`` (autograd caches a leaf's shape,
    so resizing one in place breaks the next backward), swapped into the module and into the
    optimiser's groups; its per-row state follows (kept rows keep theirs, new rows get
    zeros)."""
    for name in names:
        old = getattr(module, name)
        added = new.get(name, old.data[:0])
        param = nn.Parameter(torch.cat([old.data[keep], added.to(old)], 0),
                             requires_grad=old.requires_grad)
        setattr(module, name, param)
        if optimizer is None:
            continue
        for group in optimizer.param_groups:
            group["params"] = [param if q is old else q for q in group["params"]]
        state = optimizer.state.pop(old, None)
        if state is None:
            continue
        for key, value in list(state.items()):
            if isinstance(value, Tensor) and value.dim() and value.shape[0] == old.shape[0]:
                zeros = value.new_zeros((added.shape[0],) + tuple(value.shape[1:]))
                state[key] = torch.cat([value[keep], zeros], 0)
        optimizer.state[param] = state


def reset_state_rows(param: nn.Parameter, optimizer) -> None:
    """Zero the optimiser state of ``param`` (after its values were reset)."""
    if optimizer is None:
        return
    for value in (optimizer.state.get(param) or {}).values():
        if isinstance(value, Tensor) and value.dim():
            value.zero_()


@torch.no_grad()
def accumulate_gradients(total: Tensor, count: Tensor, grad2d: Tensor, visible: Tensor,
                         height: int, width: int) -> None:
    """Add one render's view-space gradient norms into ``total`` [N] and the number of views
    that saw each Gaussian into ``count`` [N] (in place; ``total / count`` is the mean that
    :func:`densify_and_prune` compares with the threshold).

    grad2d [B, N, 2]: the pixel-space gradient of the projected means; it is measured in NDC
    (pixels / (size / 2), so ``d/dndc = d/dpixel * size / 2``) as 3DGS measures it.
    visible [B, N] bool."""
    scale = torch.tensor([0.5 * width, 0.5 * height], device=grad2d.device)
    total += ((grad2d * scale).norm(dim=-1) * visible).sum(0)
    count += visible.float().sum(0)


@torch.no_grad()
def densify_and_prune(module: nn.Module, names, optimizer, grad: Tensor,
                      cfg: DensifyConfig, scales: Tensor, rotations: Tensor,
                      opacities: Tensor, generator: Optional[torch.Generator] = None
                      ) -> Dict[str, int]:
    """One round of clone, split and prune (see the module docstring).

    Args:
        module, names: the per-Gaussian parameters are ``module.<name>``, each [N, ...];
            ``names`` must include ``xyz`` (means) and ``scaling`` (log scales).
        grad: [N] mean view-space gradient norms. scales [N, 3] (activated),
            rotations [N, 3, 3], opacities [N] (activated).
    Returns:
        counts {"cloned", "split", "pruned", "total"}.
    """
    n = grad.shape[0]
    big = scales.max(-1).values > cfg.percent_dense * cfg.extent
    hot = grad >= cfg.grad_threshold
    if cfg.max_gaussians:
        room = max(0, cfg.max_gaussians - n)
        hot = _limit(hot, grad, room)
    clone = hot & ~big
    split = hot & big
    if cfg.max_gaussians:     # a split adds split_into - 1 net; keep under the cap
        room = max(0, cfg.max_gaussians - n - int(clone.sum()))
        split = _limit(split, grad, room // (cfg.split_into - 1))
    k = cfg.split_into
    params = {name: getattr(module, name) for name in names}
    new = {name: p.data[clone] for name, p in params.items()}
    if bool(split.any()):
        s = scales[split].repeat(k, 1)
        samples = torch.randn(s.shape, generator=generator).to(s) * s
        offset = torch.einsum("nij,nj->ni", rotations[split].repeat(k, 1, 1), samples)
        for name, p in params.items():
            rows = p.data[split].repeat(k, *([1] * (p.dim() - 1)))
            if name == "xyz":
                rows = rows + offset
            elif name == "scaling":
                rows = rows - math.log(0.8 * k)
            new[name] = torch.cat([new[name], rows], 0)
    # prune: the split originals, and the transparent or exploded (old and new alike)
    drop = split | (opacities < cfg.min_opacity) | \
        (scales.max(-1).values > cfg.max_scale * cfg.extent)
    edit_rows(module, names, optimizer, ~drop, new)
    return {"cloned": int(clone.sum()), "split": int(split.sum()),
            "pruned": int(drop.sum()) - int(split.sum()), "total": module.xyz.shape[0]}


def _limit(mask: Tensor, score: Tensor, room: int) -> Tensor:
    """``mask`` reduced to at most ``room`` entries, keeping the highest ``score``."""
    if int(mask.sum()) <= room:
        return mask
    out = torch.zeros_like(mask)
    if room > 0:
        top = torch.where(mask, score, torch.full_like(score, -float("inf"))).topk(room).indices
        out[top] = True
    return out
