"""Memory-lean hash-grid encoding: a torch.autograd.Function that recomputes in backward.

The vectorised path of :mod:`representations.lib.encodings` builds per-level, per-corner
tensors (indices, weights, gathered features: several KiB per point with the published grid)
and autograd keeps them all until backward. This Function keeps only the points and a
reference to the table, as tinycudann's fused kernel does: backward walks the levels again,
recomputes the corner indices and trilinear weights of each level and scatters the gradient
into the table with ``index_add_``. Work is done level by level and in blocks of points, so
the transient memory is bounded too; what stays alive between forward and backward is
proportional to the points, not to points x levels x corners.

Two outputs are available: the encoding ``enc [N, L * F]`` and, optionally, its spatial
Jacobian ``jac [N, L * F, 3]`` (analytic normals). Gradients flow to the table and to the
points from both. Backward is written with differentiable torch ops, so double backward
(``create_graph=True``) works too; it then records the recomputation like any torch code
(correct, not memory-lean).

Arithmetic and layout are those of ``encodings.hash_grid_encode``: same scales, corner order
(``k = b0 + 2 b1 + 4 b2``), dense / hashed indexing and clamping of the points to [0, 1]
(zero gradient outside and on the bounds, as ``encodings.clamp_unit``). This module does not import ``encodings``;
the caller passes the per-level constants (:class:`Level`).
"""

from __future__ import annotations

from typing import NamedTuple, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

# points per block inside one level: bounds the transient tensors (about 1 KiB per point
# with the Jacobian) and keeps them cache-friendly
BLOCK = 1 << 16


class Level(NamedTuple):
    """Constants of one level (plain Python numbers)."""

    scale: float                    # s_l: a point x in [0, 1] sits at x * s_l + 0.5
    mult: Tuple[int, int, int]      # dense strides (1, r, r^2) or the hash primes
    size: int                       # table entries of the level
    offset: int                     # first entry of the level in the stacked table
    dense: bool                     # dense indexing (else hashed; size a power of two)


class _Corners(NamedTuple):
    idx: Tensor                         # [8 * B] int64 rows of the stacked table
    t: Tuple[Tensor, Tensor, Tensor]    # per-axis (1 - frac, frac): [1, 1, 2, B], [1, 2, 1, B],
    #                                     [2, 1, 1, B] (corner k = b0 + 2 b1 + 4 b2)
    scale: Tensor                       # 0-dim, the level scale in the points' dtype


_SIGNS = {}


def _signs(dtype, device) -> Tuple[Tensor, Tensor, Tensor]:
    """d t / d frac per axis, shaped like the per-axis terms of :func:`_corners`."""
    key = (dtype, device)
    if key not in _SIGNS:
        s = torch.tensor([-1.0, 1.0], dtype=dtype, device=device)
        _SIGNS[key] = (s.view(1, 1, 2, 1), s.view(1, 2, 1, 1), s.view(2, 1, 1, 1))
    return _SIGNS[key]


# Points are handled transposed ([3, B], [F, 8, B], ...): every elementwise op then runs on
# long contiguous rows instead of broadcasting over inner dimensions of 2, 3 or 8 (measured
# several times faster on CPU), and the table is gathered / scattered transposed ([F, T]),
# one level's rows of a feature being contiguous.

def _corners(x: Tensor, lv: Level) -> _Corners:
    """Table rows and per-axis interpolation terms of the 8 corners of each point's cell at one
    level. ``x`` [3, B] already clamped to [0, 1]."""
    b = x.shape[1]
    # a 0-dim float32 scale in the points' dtype: the vectorised path's exact arithmetic
    scale = torch.tensor(lv.scale, dtype=torch.float32, device=x.device).to(x.dtype)
    pos = x * scale + 0.5
    lo = torch.floor(pos)
    frac = pos - lo                      # d frac / d pos = 1; floor carries no gradient
    c = lo.detach().to(torch.int64)
    m = lv.mult
    a = [torch.stack([c[d] * m[d], c[d] * m[d] + m[d]]) for d in range(3)]     # [2, B] each
    a0, a1, a2 = a[0].view(1, 1, 2, b), a[1].view(1, 2, 1, b), a[2].view(2, 1, 1, b)
    if lv.dense:
        idx = torch.remainder(a0 + a1 + a2, lv.size)
    else:                                # non-negative, size a power of two: remainder == mask
        idx = (a0 ^ a1 ^ a2) & (lv.size - 1)
    t = [torch.stack([1.0 - frac[d], frac[d]]) for d in range(3)]
    return _Corners((idx + lv.offset).view(8 * b),
                    (t[0].view(1, 1, 2, b), t[1].view(1, 2, 1, b), t[2].view(2, 1, 1, b)),
                    scale)


def _weights(c: _Corners) -> Tensor:
    t0, t1, t2 = c.t
    return (t2 * t1 * t0).reshape(8, -1)


def _dweights(c: _Corners, signs) -> Tensor:
    """d weight / d grid position [3, 8, B]."""
    t0, t1, t2 = c.t
    s0, s1, s2 = signs
    return torch.stack([(t2 * t1 * s0).reshape(8, -1), (t2 * s1 * t0).reshape(8, -1),
                        (s2 * t1 * t0).reshape(8, -1)])


def _forward_block(x: Tensor, table_t: Tensor, levels: Sequence[Level], enc: Tensor,
                   jac: Optional[Tensor]) -> None:
    """Fill ``enc`` [L, F, B] (and ``jac`` [L, F, 3, B]) for the clamped points ``x`` [3, B];
    ``table_t`` [F, T]."""
    b, nf = x.shape[1], table_t.shape[0]
    signs = _signs(x.dtype, x.device) if jac is not None else None
    for li, lv in enumerate(levels):
        c = _corners(x, lv)
        feats = table_t.index_select(1, c.idx).view(nf, 8, b)
        enc[li] = (feats * _weights(c)).sum(dim=1)
        if jac is not None:
            dw = _dweights(c, signs)                                    # [3, 8, B]
            jac[li] = (feats.unsqueeze(1) * dw).sum(dim=2) * c.scale


def _backward_block(x: Tensor, table_t: Optional[Tensor], levels: Sequence[Level],
                    g_enc: Optional[Tensor], g_jac: Optional[Tensor],
                    g_table_t: Optional[Tensor]) -> Optional[Tensor]:
    """Scatter the gradient of one block into ``g_table_t`` [F, T] (in place, when given) and
    return the gradient with respect to the clamped points [3, B] when ``table_t`` [F, T] is
    given (it is needed for that only), else None.

    g_enc [L, F, B] and g_jac [L, F, 3, B] may each be None (no gradient reached them).
    """
    b = x.shape[1]
    signs = _signs(x.dtype, x.device)
    need_x = table_t is not None
    g_x = None
    for li, lv in enumerate(levels):
        c = _corners(x, lv)
        dw = _dweights(c, signs) if need_x or g_jac is not None else None
        ge = g_enc[li] if g_enc is not None else None                   # [F, B]
        gj = g_jac[li] * c.scale if g_jac is not None else None          # [F, 3, B]
        if g_table_t is not None:
            g_corner = None                                             # [F, 8, B]
            if ge is not None:
                g_corner = ge.unsqueeze(1) * _weights(c)
            if gj is not None:
                term = (gj.unsqueeze(2) * dw).sum(dim=1)
                g_corner = term if g_corner is None else g_corner + term
            g_table_t.index_add_(1, c.idx, g_corner.reshape(-1, 8 * b).to(g_table_t.dtype))
        if not need_x:
            continue
        feats = table_t.index_select(1, c.idx).view(-1, 8, b)           # [F, 8, B]
        g_pos = None                                                    # d loss / d pos [3, B]
        if ge is not None:
            fe = (feats * ge.unsqueeze(1)).sum(dim=0)                   # [8, B]
            g_pos = (dw * fe).sum(dim=1)
        if gj is not None:
            h = (feats.unsqueeze(1) * gj.unsqueeze(2)).sum(dim=0)       # [3, 8, B]
            t0, t1, t2 = c.t
            s0, s1, s2 = signs
            # second derivatives of the trilinear weights (zero on the diagonal)
            d01 = (t2 * s1 * s0).reshape(8, b)
            d02 = (s2 * t1 * s0).reshape(8, b)
            d12 = (s2 * s1 * t0).reshape(8, b)
            term = torch.stack([(d01 * h[1] + d02 * h[2]).sum(dim=0),
                                (d01 * h[0] + d12 * h[2]).sum(dim=0),
                                (d02 * h[0] + d12 * h[1]).sum(dim=0)])
            g_pos = term if g_pos is None else g_pos + term
        if g_pos is not None:
            g_pos = g_pos * c.scale                                      # d pos / d x = s_l
            g_x = g_pos if g_x is None else g_x + g_pos
    return g_x


class _HashGridFunction(torch.autograd.Function):
    """(x [N, 3] in [0, 1], table [T, F]) -> enc [N, L * F] (and jac [N, L * F, 3])."""

    @staticmethod
    def forward(ctx, x: Tensor, table: Tensor, levels: Tuple[Level, ...], with_jac: bool,
                block: int):
        ctx.save_for_backward(x, table)
        ctx.levels, ctx.block = levels, block
        n, nl, nf = x.shape[0], len(levels), table.shape[1]
        dtype = torch.promote_types(x.dtype, table.dtype)
        enc = torch.empty(nl, nf, n, dtype=dtype, device=x.device)
        jac = torch.empty(nl, nf, 3, n, dtype=dtype, device=x.device) if with_jac else None
        if n:
            xt = x.detach().clamp(0.0, 1.0).t().contiguous()
            table_t = table.detach().t().contiguous()
            for i in range(0, n, block):
                _forward_block(xt[:, i:i + block], table_t, levels, enc[..., i:i + block],
                               jac[..., i:i + block] if with_jac else None)
        enc = enc.permute(2, 0, 1).reshape(n, nl * nf)
        if with_jac:
            return enc, jac.permute(3, 0, 1, 2).reshape(n, nl * nf, 3)
        return enc

    @staticmethod
    def backward(ctx, g_enc: Optional[Tensor], g_jac: Optional[Tensor] = None):
        x, table = ctx.saved_tensors
        levels, block = ctx.levels, ctx.block
        need_x, need_table = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        n, nl, nf = x.shape[0], len(levels), table.shape[1]
        if (g_enc is None and g_jac is None) or not (need_x or need_table):
            return None, None, None, None, None
        if g_enc is not None:
            g_enc = g_enc.reshape(n, nl, nf).permute(1, 2, 0).contiguous()
        if g_jac is not None:
            g_jac = g_jac.reshape(n, nl, nf, 3).permute(1, 2, 3, 0).contiguous()
        g_table_t = table.new_zeros(nf, table.shape[0]) if need_table else None
        table_t = table.t().contiguous() if need_x else None
        xt = x.clamp(0.0, 1.0).t()
        parts = []
        for i in range(0, n, block):
            sl = slice(i, i + block)
            g = _backward_block(xt[:, sl], table_t, levels,
                                g_enc[..., sl] if g_enc is not None else None,
                                g_jac[..., sl] if g_jac is not None else None, g_table_t)
            if need_x:
                parts.append(g if g is not None else xt[:, sl].new_zeros(xt[:, sl].shape))
        g_x = g_table = None
        if need_x:
            g_x = torch.cat(parts, dim=1).t() if parts else torch.zeros_like(x)
            # the clamp's backward: the gradient passes where 0 < x < 1 only, as
            # encodings.clamp_unit (Tensor.clamp's rule at the bounds varies by torch release)
            g_x = g_x * ((x > 0.0) & (x < 1.0)).to(g_x.dtype)
        if need_table:
            g_table = g_table_t.t().contiguous()
        return g_x, g_table, None, None, None


def hash_grid_encode_lean(x: Tensor, table: Tensor, levels: Sequence[Level],
                          with_jacobian: bool = False,
                          block: int = BLOCK) -> Union[Tensor, Tuple[Tensor, Tensor]]:
    """The hash-grid encoding with memory proportional to the points (see the module doc).

    Args:
        x: [N, 3] points in [0, 1] (values outside are clamped). table: [T, F] stacked level
        tables. levels: one :class:`Level` per level. block: points per inner block.
    Returns:
        enc [N, L * F], level-major; with ``with_jacobian`` also jac [N, L * F, 3] = d enc / d x
        (normalised units). Differentiable with respect to ``table`` and ``x`` (also twice).
    """
    return _HashGridFunction.apply(x, table, tuple(levels), bool(with_jacobian), int(block))
