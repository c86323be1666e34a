"""The ``cpp`` backend of the Gaussian rasteriser: a fused C++ compositing kernel for CPUs.

:mod:`representations.lib.gaussian_raster` keeps projection, EWA and the covariances in
differentiable torch (O(N) work per view); this module does the O(pairs) part, pair finding
and front-to-back compositing and their backward, in one C++ pass
(``csrc/gaussian_raster.cpp``), wrapped in a ``torch.autograd.Function``.

Inputs (one row per view b and Gaussian n; float32 or float64):
``means2d`` [B, N, 2] (pixel col, row), ``conics`` [B, N, 3] (a, b, c of ``Sigma'^{-1}``),
``opacities`` [N], ``depths`` [B, N] (camera z), ``features`` [B, N, C] (stride 0 over views
when they do not depend on the view), and, not differentiated, ``boxes`` [B, N, 4] int32
(x0, y0, x1, y1, exclusive: the pixel centres inside the bounding box of the ellipse
``d^T Sigma'^{-1} d <= 2 ln(255 o)``, as :func:`gaussian_raster.find_pairs` computes them),
``order`` [B, K] int64 (each view's drawn Gaussians sorted near to far) and ``counts`` [B].

Forward, per view (and band of rows when torch has several threads; ``at::parallel_for``):
the Gaussians are visited in depth order and splatted into a per-pixel transmittance ``T``
(float64). At a box pixel whose ``T >= 1e-4`` still (early termination), ``alpha = min(0.99,
o exp(-q/2))`` with ``q = a dx^2 + 2 b dx dy + c dy^2`` at the pixel centre; ``alpha < 1/255``
is skipped; else ``w = alpha T`` adds ``w z`` and ``w f`` to the pixel and ``T *= 1 - alpha``.
These are the torch backend's rules, so both give the same images up to float rounding (T is
a float64 running product here, ``exp`` of a float64 sum of ``log(1 - alpha)`` there). Each
composited pair (Gaussian, pixel, T before it) is recorded, in order.

Backward: the recorded pairs in reverse (back to front per pixel), with the reference 3DGS
recursion, ``g_i = dL/dF . f_i + dL/dD z_i``, ``accum`` (the later pairs' ``g`` composited
behind pair i) and ``P`` (the later pairs' ``prod (1 - alpha)``):
``dL/dalpha_i = T_i (g_i - accum_i + dL/dA P_i)``, then through alpha to ``means2d``,
``conics`` and ``opacities``, and ``dL/dz_i = w_i dL/dD``, ``dL/df_i = w_i dL/dF``.
``means2d`` is an input of the Function, so its ``.grad`` (``retain_grad``) is the
view-space gradient densification accumulates, as with the torch backend.

Loading: :func:`load_extension` compiles the source with ``torch.utils.cpp_extension.load``
on first use (g++ and ninja; about 30 s on a 2-core CPU, cached in torch's extensions
folder, so once per machine and source version; a compile prints one line saying so, on
stderr). Float32 and float64 tensors on a CPU only. When it cannot be built the caller falls
back to the torch backend: one ``warning:`` line on stderr, never a traceback, and no second
try in that process. ``DISTILL_GAUSSIANS_CPP=0`` (or :func:`set_cpp_enabled(False)`) keeps ``auto`` on
the torch backend.
"""

from __future__ import annotations

import logging
import math
import os
import sys
import time
from pathlib import Path
from typing import Optional

import torch
from torch import Tensor

SOURCE = Path(__file__).resolve().parent / "csrc" / "gaussian_raster.cpp"
EXTENSION_NAME = "distill_gaussian_raster"
ENV_SWITCH = "DISTILL_GAUSSIANS_CPP"

_state = {"module": None, "tried": False, "error": None, "enabled": None, "seconds": None}


def set_cpp_enabled(enabled: Optional[bool]) -> None:
    """Force the ``cpp`` backend off (False) or allowed (True) for ``auto`` in this process;
    None: back to the environment (``DISTILL_GAUSSIANS_CPP=0`` turns it off)."""
    _state["enabled"] = enabled


def cpp_enabled() -> bool:
    """Whether ``auto`` may pick the ``cpp`` backend (see :func:`set_cpp_enabled`)."""
    if _state["enabled"] is not None:
        return bool(_state["enabled"])
    return os.environ.get(ENV_SWITCH, "1").strip().lower() not in ("0", "false", "no", "off")


def reset_extension() -> None:
    """Forget the loaded module and any failure, so the next call loads again (tests)."""
    _state.update(module=None, tried=False, error=None, seconds=None)


def load_extension():
    """The compiled kernel module, or None when it cannot be built (then one warning line on
    stderr, once per process). Compiles on the first call on a machine."""
    if _state["tried"]:
        return _state["module"]
    _state["tried"] = True
    t0 = time.perf_counter()
    logger = logging.getLogger("torch.utils.cpp_extension")
    level = logger.level
    try:
        # importing it logs a line about CUDA_HOME on CPU-only machines: not ours to show
        logger.setLevel(logging.ERROR)
        from torch.utils import cpp_extension

        if not SOURCE.is_file():
            raise FileNotFoundError(f"{SOURCE} is missing")
        module = cpp_extension.load(
            name=EXTENSION_NAME, sources=[str(SOURCE)],
            extra_cflags=["-O3", "-fopenmp"], extra_ldflags=["-fopenmp"], verbose=False)
    except BaseException as exc:  # noqa: BLE001 - a compiler failure must not stop a run
        if isinstance(exc, KeyboardInterrupt):
            raise
        first = " ".join(str(exc).split()) or type(exc).__name__
        if len(first) > 320:                    # the compiler's own error is at the end
            first = f"{first[:100]} ... {first[-200:]}"
        _state["error"] = f"{type(exc).__name__}: {first}"
        print("warning: the Gaussian rasteriser's C++ kernel could not be built, using the "
              f"slower torch backend ({_state['error']})", file=sys.stderr)
        return None
    finally:
        logger.setLevel(level)
    _state["module"] = module
    _state["seconds"] = time.perf_counter() - t0
    if _state["seconds"] > 5.0:                 # it was compiled, not just loaded
        print(f"compiled the Gaussian rasteriser's C++ kernel in {_state['seconds']:.0f} s "
              "(once per machine: torch caches the build)", file=sys.stderr)
    return module


def build_error() -> Optional[str]:
    """Why the kernel could not be built in this process (None if it was, or not tried)."""
    return _state["error"]


def cpp_available() -> bool:
    """Whether the ``cpp`` backend is allowed and its kernel loads (compiling it if needed)."""
    return cpp_enabled() and load_extension() is not None


def load_seconds() -> Optional[float]:
    """Seconds the (first) load took in this process: compile time on a fresh machine."""
    return _state["seconds"]


def bands_for(views: int, height: int) -> int:
    """Row bands per view: 1 with one torch thread, else enough tasks for every thread."""
    threads = torch.get_num_threads()
    if threads <= 1:
        return 1
    return max(1, min(height, math.ceil(2 * threads / max(views, 1))))


class _Composite(torch.autograd.Function):
    """(means2d, conics, opacities, depths, features) -> (depth+features [B, H, W, 1 + C],
    alpha [B, H, W, 1], visible [B * bands, N] uint8); see the module docstring."""

    @staticmethod
    def forward(ctx, means2d, conics, opacities, depths, features, boxes, order, counts,
                height, width, bands, thresholds):
        ext = load_extension()
        alpha_min, alpha_max, t_min = thresholds
        out, tfinal, visible, gauss, pixel, trans, offsets = ext.forward(
            means2d, conics, opacities, depths, features, boxes, order, counts,
            height, width, bands, alpha_min, alpha_max, t_min)
        ctx.save_for_backward(means2d, conics, opacities, depths, features, gauss, pixel,
                              trans, offsets, tfinal)
        ctx.shape = (height, width, bands, alpha_max)
        ctx.mark_non_differentiable(visible)
        return out, (1.0 - tfinal)[..., None], visible

    @staticmethod
    def backward(ctx, grad_out, grad_alpha, _grad_visible):
        means2d, conics, opacities, depths, features, gauss, pixel, trans, offsets, tfinal = \
            ctx.saved_tensors
        height, width, bands, alpha_max = ctx.shape
        B, N, C = features.shape
        if grad_out is None:
            grad_out = means2d.new_zeros(B, height, width, 1 + C)
        if grad_alpha is None:
            grad_alpha = means2d.new_zeros(B, height, width, 1)
        grads = load_extension().backward(
            means2d, conics, opacities, depths, features, gauss, pixel, trans, offsets,
            tfinal, grad_out.contiguous(), grad_alpha.reshape(B, height, width).contiguous(),
            height, width, bands, alpha_max)
        grads = grads.reshape(B, bands, N, 7 + C)
        grads = grads[:, 0] if bands == 1 else grads.sum(1)
        return (grads[..., 0:2], grads[..., 2:5], grads[..., 5].sum(0), grads[..., 6],
                grads[..., 7:], None, None, None, None, None, None, None)


def composite(means2d: Tensor, conics: Tensor, opacities: Tensor, depths: Tensor,
              features: Tensor, boxes: Tensor, order: Tensor, counts: Tensor, height: int,
              width: int, thresholds) -> tuple:
    """Composite projected Gaussians with the C++ kernel (shapes in the module docstring;
    ``features`` [N, C] or [B, N, C]; ``thresholds`` = (alpha_min, alpha_max, t_min)).

    Returns ``features`` [B, H, W, C], ``depth`` [B, H, W, 1], ``alpha`` [B, H, W, 1] and
    ``visible`` [B, N] bool; differentiable in the first five arguments."""
    B, N = depths.shape
    dtype = means2d.dtype
    if features.dim() == 2:
        feats = features.to(dtype).contiguous()[None].expand(B, N, features.shape[-1])
    else:
        feats = features.to(dtype).contiguous()
    bands = bands_for(B, height)
    out, alpha, visible = _Composite.apply(
        means2d.contiguous(), conics.to(dtype).contiguous(), opacities.to(dtype).contiguous(),
        depths.to(dtype).contiguous(), feats, boxes.to(torch.int32).contiguous(),
        order.to(torch.int64).contiguous(), counts.to(torch.int64).contiguous(),
        int(height), int(width), bands, tuple(float(t) for t in thresholds))
    visible = visible.reshape(B, bands, N).any(1).to(torch.bool)
    return out[..., 1:], out[..., :1], alpha, visible
