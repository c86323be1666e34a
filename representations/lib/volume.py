"""Volume rendering along rays: bounds, stratified samples, alpha compositing.

Pure functions on tensors. Compositing has two backends held equal by tests: ``torch``
(reference, runs everywhere) and ``nerfacc`` (its dense ``render_weight_from_density``, which
works on CPU and CUDA). ``auto`` picks nerfacc when it imports.
"""

from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch
from torch import Tensor

BACKENDS = ("auto", "torch", "nerfacc")


def ray_sphere_bounds(origins: Tensor, dirs: Tensor, radius: float = 1.0,
                      min_near: float = 0.05) -> Tuple[Tensor, Tensor, Tensor]:
    """Where rays enter and leave the sphere of ``radius`` at the origin.

    Args:
        origins, dirs: [N, 3], dirs unit length.
    Returns:
        near [N], far [N] (near >= min_near) and hit [N] bool. For missed rays near = far.
        Not differentiable (bounds are treated as constants).
    """
    with torch.no_grad():
        b = (origins * dirs).sum(-1)
        c = (origins * origins).sum(-1) - radius * radius
        disc = b * b - c
        hit = disc > 0
        sq = disc.clamp_min(0).sqrt()
        near = (-b - sq).clamp_min(min_near)
        far = (-b + sq).clamp_min(min_near)
        hit = hit & (far > near)
        far = torch.where(hit, far, near)
    return near, far, hit


def stratified_samples(near: Tensor, far: Tensor, n_samples: int, perturb: bool = True,
                       generator: Optional[torch.Generator] = None) -> Tuple[Tensor, Tensor]:
    """``n_samples`` intervals per ray, one random point per equal bin when ``perturb``.

    Args:
        near, far: [N].
    Returns:
        t_starts, t_ends: [N, S] interval bounds along each ray (contiguous, covering
        [near, far]); the sample point is their midpoint. Not differentiable.
    """
    n = near.shape[0]
    edges = torch.linspace(0.0, 1.0, n_samples + 1, device=near.device, dtype=near.dtype)
    if perturb:
        jitter = torch.rand(n, n_samples + 1, device="cpu", generator=generator).to(near)
        width = 1.0 / n_samples
        inner = edges[1:-1] + (jitter[:, 1:-1] - 0.5) * width
        edges = torch.cat([edges[:1].expand(n, 1), inner, edges[-1:].expand(n, 1)], dim=1)
    else:
        edges = edges.expand(n, n_samples + 1)
    t = near[:, None] + (far - near)[:, None] * edges
    return t[:, :-1], t[:, 1:]


def weights_from_density(sigmas: Tensor, t_starts: Tensor, t_ends: Tensor,
                         backend: str = "auto") -> Tensor:
    """Rendering weights w_i = T_i (1 - exp(-sigma_i delta_i)).

    Args:
        sigmas, t_starts, t_ends: [N, S].
    Returns:
        weights [N, S]. Differentiable with respect to ``sigmas``.
    """
    if resolve_backend(backend) == "nerfacc":
        import nerfacc

        weights, _, _ = nerfacc.render_weight_from_density(t_starts, t_ends, sigmas)
        return weights
    delta = t_ends - t_starts
    sigma_delta = sigmas * delta
    alphas = 1.0 - torch.exp(-sigma_delta)
    # exclusive cumulative sum in log space: T_i = exp(-sum_{j<i} sigma_j delta_j)
    trans = torch.exp(-torch.cumsum(torch.cat(
        [torch.zeros_like(sigma_delta[:, :1]), sigma_delta[:, :-1]], dim=1), dim=1))
    return trans * alphas


def composite(weights: Tensor, values: Tensor) -> Tensor:
    """Sum of ``values`` [N, S, C] weighted by ``weights`` [N, S] -> [N, C]."""
    return (weights[..., None] * values).sum(dim=1)


def render_rays(sigmas: Tensor, rgbs: Tensor, t_starts: Tensor, t_ends: Tensor,
                background: Optional[Tensor] = None, normals: Optional[Tensor] = None,
                backend: str = "auto") -> Dict[str, Tensor]:
    """Composite per-sample density and colour into per-ray outputs.

    Args:
        sigmas [N, S], rgbs [N, S, 3], t_starts/t_ends [N, S]; background [N, 3] (optional);
        normals [N, S, 3] (optional).
    Returns:
        rgb [N, 3] (over the background when given), opacity [N, 1], depth [N, 1]
        (expected distance, 0 where empty), weights [N, S] and, with normals, normal [N, 3].
        Differentiable with respect to sigmas, rgbs, background and normals.
    """
    weights = weights_from_density(sigmas, t_starts, t_ends, backend)
    opacity = weights.sum(dim=1, keepdim=True)
    rgb = composite(weights, rgbs)
    if background is not None:
        rgb = rgb + (1.0 - opacity) * background
    mid = 0.5 * (t_starts + t_ends)
    out = {"rgb": rgb, "opacity": opacity, "depth": composite(weights, mid[..., None]),
           "weights": weights}
    if normals is not None:
        out["normal"] = composite(weights, normals)
    return out


def resolve_backend(backend: str) -> str:
    """``auto`` -> ``nerfacc`` when it imports, else ``torch``."""
    if backend not in BACKENDS:
        raise ValueError(f"volume backend '{backend}' is not one of {BACKENDS}")
    if backend != "auto":
        return backend
    return "nerfacc" if _nerfacc_available() else "torch"


_NERFACC: Optional[bool] = None


def _nerfacc_available() -> bool:
    global _NERFACC
    if _NERFACC is None:
        try:
            import nerfacc  # noqa: F401
            _NERFACC = True
        except Exception:
            _NERFACC = False
    return _NERFACC
