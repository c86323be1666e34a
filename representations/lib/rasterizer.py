"""Differentiable triangle rasterisation: visibility, barycentrics, silhouette antialiasing.

Two backends, chosen by ``backend: auto|torch|nvdiffrast`` (``auto`` = nvdiffrast when it
imports and the tensors are on CUDA, else torch). Both follow the engine's image convention:
NDC y = +1 is image row 0 (top), pixel centres at (col + 0.5, row + 0.5).

The torch path, in three steps:

1. Visibility (not differentiable). Each triangle's screen bounding box gives candidate
   (triangle, pixel) pairs, generated for all triangles at once. Coverage is tested with
   edge functions in 8-bit sub-pixel fixed point (int64), so the test is exact: a pixel
   centre on an edge shared by two triangles is covered by both (inclusive rule) and meshes
   are watertight. The depth test is a z-buffer: ``scatter_reduce(amin)`` over keys packing
   (float32 bits of the view depth, triangle id), so ties go to the lower triangle id.
   Triangles with a vertex behind the near plane (clip z < -w) or with w <= 0 are dropped.
2. Barycentrics (differentiable w.r.t. ``clip_pos``). For the winning triangle at a pixel of
   NDC (x, y), the perspective-correct barycentrics b satisfy sum_i b_i (X_i - x W_i) = 0 and
   sum_i b_i (Y_i - y W_i) = 0 with sum_i b_i = 1, so b is the cross product of those two
   3-vectors, normalised. Attributes interpolated with b, and the depth sum_i b_i W_i, carry
   gradients to the vertex positions.
3. Antialiasing (differentiable w.r.t. ``clip_pos`` and the colour), analytic along
   silhouette edges in the manner of nvdiffrast. A silhouette edge (per view) is an edge
   with no single neighbouring face across it (boundary, non-manifold) or whose two faces
   face opposite ways on screen; the edge topology is rebuilt on every call (a sort of the
   3F edge keys), so changing meshes (DMTet) are fine. For each pair of horizontally or
   vertically adjacent pixels showing different triangles, take the nearer one's triangle
   (or the only covered one) and find where the segment between the two pixel centres
   leaves it, at fraction t from the near pixel; pairs that leave through a non-silhouette
   edge are skipped. With a one-pixel box filter along the segment, the pixel holding the
   crossing point is partly covered: if t > 1/2 the far pixel gets (t - 1/2) of the near
   colour, if t < 1/2 the near pixel gets (1/2 - t) of the far colour. d(colour)/dt is the
   colour step across the edge and t depends on the edge's projected vertices, so a loss on
   the image (the mask too) moves silhouette vertices. Deltas from up to four neighbours
   add up, so a one-pixel-wide sliver can leave [0, 1] (mesh_render clamps the opacity).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional, Tuple

import torch
from torch import Tensor

BACKENDS = ("auto", "torch", "nvdiffrast")

#: sub-pixel bits of the fixed-point coverage test
SUBPIXEL_BITS = 8
#: screen coordinates are clamped to +- this many pixels so the int64 products stay exact
_GUARD_PIXELS = 1 << 20
#: candidate (triangle, pixel) pairs processed per chunk, bounds memory for huge triangles
MAX_CANDIDATES = 1 << 23
#: largest box side (pixels, a power of two) evaluated as a dense block
_BUCKET_MAX = 16
_EMPTY_KEY = torch.iinfo(torch.int64).max


@dataclass
class Fragments:
    """What the rasteriser sees at each pixel.

    ``native`` holds backend-private data (nvdiffrast's raster output) for :func:`antialias`.
    """

    face_id: Tensor   # [B, H, W] long, -1 where no triangle
    bary: Tensor      # [B, H, W, 3] perspective-correct, differentiable w.r.t. clip_pos
    depth: Tensor     # [B, H, W] view-space distance along -z (0 where empty)
    native: Any = field(default=None, repr=False)


# ---------------------------------------------------------------------------------------
# backend choice
# ---------------------------------------------------------------------------------------

_NVDIFFRAST: Optional[bool] = None
_NV_CONTEXTS = {}


def _nvdiffrast_available() -> bool:
    global _NVDIFFRAST
    if _NVDIFFRAST is None:
        try:
            import nvdiffrast.torch  # noqa: F401
            _NVDIFFRAST = True
        except Exception:
            _NVDIFFRAST = False
    return _NVDIFFRAST


def resolve_backend(backend: str, device: torch.device) -> str:
    """``auto`` -> ``nvdiffrast`` when it imports and ``device`` is CUDA, else ``torch``.
    Asking for ``nvdiffrast`` where it cannot run is an error rather than a silent fallback."""
    if backend not in BACKENDS:
        raise ValueError(f"rasterizer backend '{backend}' is not one of {BACKENDS}")
    usable = device.type == "cuda" and _nvdiffrast_available()
    if backend == "nvdiffrast" and not usable:
        raise RuntimeError("rasterizer backend 'nvdiffrast' needs the nvdiffrast package and "
                           f"CUDA tensors (got device {device}); use backend 'auto' or 'torch'")
    if backend != "auto":
        return backend
    return "nvdiffrast" if usable else "torch"


# ---------------------------------------------------------------------------------------
# rasterize
# ---------------------------------------------------------------------------------------

def rasterize(clip_pos: Tensor, faces: Tensor, height: int, width: int,
              backend: str = "auto") -> Fragments:
    """Rasterise triangles given in clip space.

    Args:
        clip_pos: [B, V, 4] clip-space vertices (``Cameras.world_to_clip`` applied).
        faces: [F, 3] long vertex indices (no back-face culling).
        height, width: image size.
    Returns:
        :class:`Fragments` with face_id [B, H, W] (-1 where empty), bary [B, H, W, 3] and
        depth [B, H, W] (the view depth w, 0 where empty). ``bary`` and ``depth`` are
        differentiable with respect to ``clip_pos``; ``face_id`` is not.
    """
    if clip_pos.dim() != 3 or clip_pos.shape[-1] != 4:
        raise ValueError(f"clip_pos must be [B, V, 4], got {tuple(clip_pos.shape)}")
    faces = faces.long()
    if resolve_backend(backend, clip_pos.device) == "nvdiffrast":
        return _rasterize_nvdiffrast(clip_pos, faces, height, width)
    face_id = _visibility(clip_pos.detach(), faces, height, width)
    bary, depth = _barycentrics(clip_pos, faces, face_id, height, width)
    return Fragments(face_id, bary, depth)


def _screen_fixed(clip: Tensor, height: int, width: int) -> Tensor:
    """Clip [..., 4] -> fixed-point pixel coordinates [..., 2] int64 (col, row)."""
    w = clip[..., 3].clamp_min(1e-12)
    scale = float(1 << SUBPIXEL_BITS)
    col = (clip[..., 0] / w + 1.0) * (0.5 * width)
    row = (1.0 - clip[..., 1] / w) * (0.5 * height)
    xy = torch.stack([col, row], dim=-1).clamp(-_GUARD_PIXELS, _GUARD_PIXELS)
    return torch.round(xy.double() * scale).long()


def _ceil_pow2(n: Tensor) -> Tensor:
    return torch.where(n <= 1, torch.ones_like(n),
                       2 ** torch.ceil(torch.log2(n.clamp_min(1).double())).long())


def _visibility(clip: Tensor, faces: Tensor, height: int, width: int) -> Tensor:
    """Z-buffer: the id of the nearest triangle covering each pixel centre, [B, H, W].

    Every triangle's bounding box is scanned. Triangles are grouped by their box size
    rounded up to powers of two (up to ``_BUCKET_MAX`` pixels a side) and each group is
    evaluated as one dense [triangles, rows, cols] block: the edge functions and 1/depth
    are affine in the pixel offset, so they are sums of a per-row and a per-column term and
    no per-candidate gathers are needed. Larger boxes go through a flat candidate list.
    """
    B = clip.shape[0]
    F = faces.shape[0]
    dev = clip.device
    zbuf = torch.full((B * height * width,), _EMPTY_KEY, dtype=torch.int64, device=dev)
    if F == 0:
        return torch.full((B, height, width), -1, dtype=torch.long, device=dev)

    tri = clip[:, faces].reshape(B * F, 3, 4)
    w = tri[..., 3]
    ok = ((w > 1e-8) & (tri[..., 2] >= -w)).all(dim=-1)       # in front of the near plane
    fx = _screen_fixed(tri, height, width)                    # [BF, 3, 2]
    x0, x1, x2 = fx[:, 0, 0], fx[:, 1, 0], fx[:, 2, 0]
    y0, y1, y2 = fx[:, 0, 1], fx[:, 1, 1], fx[:, 2, 1]
    area = (x1 - x0) * (y2 - y0) - (x2 - x0) * (y1 - y0)     # twice the signed area
    ok &= area != 0
    one = 1 << SUBPIXEL_BITS
    half = one // 2
    # pixels whose centre (c + 1/2) lies in [min, max]: c in [ceil(min - 1/2), floor(max - 1/2)]
    xmin = torch.minimum(torch.minimum(x0, x1), x2)
    xmax = torch.maximum(torch.maximum(x0, x1), x2)
    ymin = torch.minimum(torch.minimum(y0, y1), y2)
    ymax = torch.maximum(torch.maximum(y0, y1), y2)
    c0 = torch.div(xmin - half + one - 1, one, rounding_mode="floor").clamp_min(0)
    c1 = torch.div(xmax - half, one, rounding_mode="floor").clamp_max(width - 1)
    r0 = torch.div(ymin - half + one - 1, one, rounding_mode="floor").clamp_min(0)
    r1 = torch.div(ymax - half, one, rounding_mode="floor").clamp_max(height - 1)
    nx = (c1 - c0 + 1).clamp_min(0)
    ny = (r1 - r0 + 1).clamp_min(0)
    ok &= (nx > 0) & (ny > 0)

    live = ok.nonzero().squeeze(1)
    if live.numel() == 0:
        return torch.full((B, height, width), -1, dtype=torch.long, device=dev)
    x0, x1, x2, y0, y1, y2 = (t[live] for t in (x0, x1, x2, y0, y1, y2))
    area, c0, r0, nx, ny, w = area[live], c0[live], r0[live], nx[live], ny[live], w[live]
    sgn = torch.sign(area)
    # edge functions at the first pixel centre of the box and their per-pixel steps, with
    # the orientation folded in so that "inside" is e_i >= 0 for all i; e_i / area is the
    # screen-space barycentric of vertex i
    px0 = c0 * one + half
    py0 = r0 * one + half
    xs = torch.stack([x1, x2, x0], -1), torch.stack([x2, x0, x1], -1)
    ys = torch.stack([y1, y2, y0], -1), torch.stack([y2, y0, y1], -1)
    ex = (xs[1] - xs[0]) * sgn[:, None]
    ey = (ys[1] - ys[0]) * sgn[:, None]
    e_start = ex * (py0[:, None] - ys[0]) - ey * (px0[:, None] - xs[0])   # [n, 3]
    e_dx = -ey * one
    e_dy = ex * one
    # 1 / depth = sum_i lambda_i / w_i is affine in the pixel offset too
    iw = 1.0 / (w.double() * area.abs().double()[:, None])
    # float32 is plenty to order depths and halves the work of the dense blocks
    d_start = (e_start.double() * iw).sum(-1).float()
    d_dx = (e_dx.double() * iw).sum(-1).float()
    d_dy = (e_dy.double() * iw).sum(-1).float()
    face = live % F
    pix0 = torch.div(live, F, rounding_mode="floor") * (height * width) + r0 * width + c0
    face_data = (e_start, e_dx, e_dy, d_start, d_dx, d_dy, face, pix0, c0, r0, nx, ny)

    bx, by = _ceil_pow2(nx), _ceil_pow2(ny)
    # dense blocks hold small triangles only (unclamped extent too), so their fixed-point
    # edge functions fit in int32: |e| < 2 * (17 * 256)^2 < 2^26
    extent_ok = ((xmax[live] - xmin[live]) <= _BUCKET_MAX * one) & (
        (ymax[live] - ymin[live]) <= _BUCKET_MAX * one)
    small = (bx <= _BUCKET_MAX) & (by <= _BUCKET_MAX) & extent_ok
    bucket_key = torch.where(small, bx * (_BUCKET_MAX + 1) + by, torch.full_like(bx, -1))
    # sort once by bucket so that each bucket is a contiguous slice
    bucket_key, order = torch.sort(bucket_key)
    face_data = [t.index_select(0, order) for t in face_data]
    keys, counts = torch.unique_consecutive(bucket_key, return_counts=True)
    start = 0
    for key, count in zip(keys.tolist(), counts.tolist()):
        data = [t[start:start + count] for t in face_data]
        start += count
        if key < 0:
            _scan_flat(zbuf, data, height, width)
        else:
            _scan_block(zbuf, data, key // (_BUCKET_MAX + 1), key % (_BUCKET_MAX + 1),
                        height, width)
    face_id = torch.where(zbuf == _EMPTY_KEY, torch.full_like(zbuf, -1), zbuf & 0xFFFFFFFF)
    return face_id.view(B, height, width)


def _depth_key(inv_depth: Tensor, face: Tensor) -> Tensor:
    """Pack (depth, face) into int64 keys ordered by depth first (float32 bits of positive
    numbers sort like the numbers)."""
    depth = inv_depth.float().reciprocal_()
    return (depth.view(torch.int32).long() << 32).bitwise_or_(face)


def _scan_block(zbuf: Tensor, data, sx: int, sy: int, height: int, width: int) -> None:
    """Fold triangles whose boxes fit in sx x sy pixels into ``zbuf`` (dense evaluation)."""
    e_start, e_dx, e_dy, d_start, d_dx, d_dy, face, pix0, c0, r0, nx, ny = data
    dev = zbuf.device
    # int32 (exact here, see _visibility) halves the memory traffic of the dense blocks
    e_start, e_dx, e_dy = e_start.int(), e_dx.int(), e_dy.int()
    lx = torch.arange(sx, device=dev, dtype=torch.int32)
    ly = torch.arange(sy, device=dev, dtype=torch.int32)
    # offsets beyond the clamped box would leave the image (or wrap rows): veto them
    bad_x = lx[None, :] >= nx[:, None]                        # [n, sx]
    bad_y = ly[None, :] >= ny[:, None]                        # [n, sy]
    veto = torch.iinfo(torch.int32).min // 4
    any_neg = None
    for i in range(3):
        row_term = e_start[:, i, None] + e_dy[:, i, None] * ly      # [n, sy]
        col_term = e_dx[:, i, None] * lx                            # [n, sx]
        if i == 0:
            row_term = row_term.masked_fill(bad_y, veto)
            col_term = col_term.masked_fill(bad_x, veto)
        e = row_term[:, :, None] + col_term[:, None, :]             # [n, sy, sx]
        # the sign bit of e0 | e1 | e2 is set iff one of them is negative
        any_neg = e if any_neg is None else any_neg.bitwise_or_(e)
    hit = (any_neg >= 0).view(-1).nonzero().squeeze(1)
    if hit.numel() == 0:
        return
    # depth and pixel index only where covered (about a third of a block)
    tri = torch.div(hit, sx * sy, rounding_mode="floor")
    rem = hit - tri * (sx * sy)
    oy = torch.div(rem, sx, rounding_mode="floor")
    ox = rem - oy * sx
    inv_d = d_start.index_select(0, tri) + d_dx.index_select(0, tri) * ox \
        + d_dy.index_select(0, tri) * oy
    key = _depth_key(inv_d, face.index_select(0, tri))
    pix = pix0.index_select(0, tri) + oy * width + ox
    zbuf.scatter_reduce_(0, pix, key, reduce="amin", include_self=True)


def _scan_flat(zbuf: Tensor, data, height: int, width: int) -> None:
    """Fold large triangles into ``zbuf`` through a flat list of candidate pixels, in chunks
    of whole triangles of at most ``MAX_CANDIDATES`` pairs (unless one triangle is bigger)."""
    counts = data[10] * data[11]
    ends = counts.cumsum(0)
    start, n = 0, counts.numel()
    while start < n:
        base = int(ends[start - 1]) if start > 0 else 0
        stop = max(int(torch.searchsorted(ends, base + MAX_CANDIDATES, right=True)), start + 1)
        _scan_flat_chunk(zbuf, [t[start:stop] for t in data], height, width)
        start = stop


def _scan_flat_chunk(zbuf: Tensor, data, height: int, width: int) -> None:
    e_start, e_dx, e_dy, d_start, d_dx, d_dy, face, pix0, c0, r0, nx, ny = data
    dev = zbuf.device
    counts = nx * ny
    total = int(counts.sum())
    tri = torch.repeat_interleave(torch.arange(counts.numel(), device=dev), counts,
                                  output_size=total)
    local = torch.arange(total, device=dev) - (counts.cumsum(0) - counts).index_select(0, tri)
    nxt = nx.index_select(0, tri)
    ly = torch.div(local, nxt, rounding_mode="floor")
    lx = local - ly * nxt
    e = (e_start.index_select(0, tri) + e_dx.index_select(0, tri) * lx[:, None]
         + e_dy.index_select(0, tri) * ly[:, None])
    inside = (e >= 0).all(dim=-1)
    inv_d = (d_start.index_select(0, tri) + d_dx.index_select(0, tri) * lx
             + d_dy.index_select(0, tri) * ly)
    key = _depth_key(inv_d, face.index_select(0, tri)).masked_fill_(~inside, _EMPTY_KEY)
    pix = pix0.index_select(0, tri) + ly * width + lx
    zbuf.scatter_reduce_(0, pix, key, reduce="amin", include_self=True)


def _pixel_ndc(pix: Tensor, height: int, width: int, dtype) -> Tuple[Tensor, Tensor]:
    row = torch.div(pix, width, rounding_mode="floor") % height
    col = pix % width
    x = (col.to(dtype) + 0.5) * (2.0 / width) - 1.0
    y = 1.0 - (row.to(dtype) + 0.5) * (2.0 / height)
    return x, y


def _barycentrics(clip_pos: Tensor, faces: Tensor, face_id: Tensor, height: int,
                  width: int) -> Tuple[Tensor, Tensor]:
    """Perspective-correct barycentrics [B, H, W, 3] and depth [B, H, W] of the winners."""
    B, V, _ = clip_pos.shape
    pix, b, fv = _covered(face_id, faces)
    idx = (fv + (b * V)[:, None]).reshape(-1)
    # one gather per clip coordinate: cheaper backward than slicing a gathered [N, 3, 4]
    X, Y, Wc = (clip_pos[..., k].reshape(-1).index_select(0, idx).view(-1, 3) for k in (0, 1, 3))
    x, y = _pixel_ndc(pix, height, width, clip_pos.dtype)
    u = X - x[:, None] * Wc
    v = Y - y[:, None] * Wc
    u0, u1, u2 = u.unbind(-1)
    v0, v1, v2 = v.unbind(-1)
    bc = torch.stack([u1 * v2 - u2 * v1, u2 * v0 - u0 * v2, u0 * v1 - u1 * v0], dim=-1)
    bc = bc / bc.sum(-1, keepdim=True)
    depth = (bc * Wc).sum(-1)
    bary = clip_pos.new_zeros(B * height * width, 3).index_put((pix,), bc)
    dense_depth = clip_pos.new_zeros(B * height * width).index_put((pix,), depth)
    return bary.view(B, height, width, 3), dense_depth.view(B, height, width)


def _covered(face_id: Tensor, faces: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
    """Flat indices [N] of covered pixels, their view index [N] and face vertices [N, 3]."""
    B, H, W = face_id.shape
    flat = face_id.reshape(-1)
    pix = (flat >= 0).nonzero().squeeze(1)
    b = torch.div(pix, H * W, rounding_mode="floor")
    fv = faces.index_select(0, flat.index_select(0, pix))
    return pix, b, fv


def _gather_vertices(table: Tensor, offset: Tensor, fv: Tensor) -> Tensor:
    """Rows of ``table`` [B*V, C] for vertex ids ``fv`` [N, 3] of views at row ``offset``
    [N] -> [N, 3, C] (index_select: its backward is a cheap index_add)."""
    idx = (fv + offset[:, None]).reshape(-1)
    return table.index_select(0, idx).view(fv.shape[0], 3, table.shape[-1])


# ---------------------------------------------------------------------------------------
# interpolate
# ---------------------------------------------------------------------------------------

def interpolate(attr: Tensor, frags: Fragments, faces: Tensor) -> Tensor:
    """Interpolate per-vertex attributes with the fragments' barycentrics.

    Args:
        attr: [V, C] (shared by all views) or [B, V, C].
        frags: from :func:`rasterize`; faces: [F, 3] long.
    Returns:
        [B, H, W, C], 0 where no triangle. Differentiable with respect to ``attr`` and
        ``frags.bary`` (hence the vertex positions).
    """
    B, H, W = frags.face_id.shape
    C = attr.shape[-1]
    pix, b, fv = _covered(frags.face_id, faces.long())
    if attr.dim() == 2:
        table, idx = attr, fv.t()
    else:
        V = attr.shape[1]
        table, idx = attr.reshape(-1, C), (fv + (b * V)[:, None]).t()
    bary = frags.bary.reshape(-1, 3).index_select(0, pix).to(attr.dtype).t()
    vals = _Interpolate.apply(table, bary, idx.contiguous())
    out = attr.new_zeros(B * H * W, C).index_put((pix,), vals)
    return out.view(B, H, W, C)


class _Interpolate(torch.autograd.Function):
    """sum_k bary[k, n] * table[idx[k, n]] -> [N, C], with a hand-written backward: the
    autograd version materialises a [3, N, C] gradient and then scatters it, which is the
    single most expensive step of a mesh render on CPU."""

    @staticmethod
    def forward(ctx, table: Tensor, bary: Tensor, idx: Tensor) -> Tensor:
        # vertex-major [3, N, C]: the sum runs over the leading dimension, the fast one
        a = table.index_select(0, idx.reshape(-1)).view(3, -1, table.shape[-1])
        ctx.save_for_backward(table, bary, idx)
        return (a * bary[..., None]).sum(0)

    @staticmethod
    def backward(ctx, grad: Tensor):
        table, bary, idx = ctx.saved_tensors
        grad_table = grad_bary = None
        if ctx.needs_input_grad[0]:
            grad_table = torch.zeros_like(table)
            for k in range(3):
                grad_table.index_add_(0, idx[k], grad * bary[k, :, None])
        if ctx.needs_input_grad[1]:
            a = table.index_select(0, idx.reshape(-1)).view(3, -1, table.shape[-1])
            grad_bary = (a * grad[None]).sum(-1)
        return grad_table, grad_bary, None


# ---------------------------------------------------------------------------------------
# antialias
# ---------------------------------------------------------------------------------------

def antialias(color: Tensor, frags: Fragments, clip_pos: Tensor, faces: Tensor) -> Tensor:
    """Blend colours across silhouette edges (analytic coverage along pixel pairs).

    Args:
        color: [B, H, W, C] image rendered from ``frags`` (already over the background).
        frags: fragments of ``clip_pos`` / ``faces``; clip_pos: [B, V, 4]; faces: [F, 3].
    Returns:
        [B, H, W, C]. Differentiable with respect to ``color`` and ``clip_pos`` (through the
        position where silhouette edges cross the lines between pixel centres).
    """
    if frags.native is not None:
        return _antialias_nvdiffrast(color, frags, clip_pos, faces)
    faces = faces.long()
    B, H, W, C = color.shape
    V = clip_pos.shape[1]
    screen, front = _screen_float(clip_pos, H, W)                    # [B, V, 2], [B, V]
    silhouette = _silhouette_edges(screen.detach(), front, faces)   # [B, F, 3]
    near_pix, far_pix, near_f = _edge_pairs(frags, silhouette.any(-1))
    flat = color.reshape(-1, C)
    if near_pix.numel() == 0:
        return color
    b = torch.div(near_pix, H * W, rounding_mode="floor")
    fv = faces.index_select(0, near_f)                                # [M, 3]
    tri = _gather_vertices(screen.reshape(B * V, 2), b * V, fv)       # [M, 3, 2]
    sil = silhouette.reshape(-1, 3).index_select(0, b * faces.shape[0] + near_f)
    t, ok = _edge_crossing(tri, sil, near_pix, far_pix, H, W)
    keep = ok.nonzero().squeeze(1)
    near_pix, far_pix = near_pix.index_select(0, keep), far_pix.index_select(0, keep)
    t = t.index_select(0, keep).to(color.dtype)[:, None]
    c_near, c_far = flat.index_select(0, near_pix), flat.index_select(0, far_pix)
    # box-filter coverage: whichever pixel holds the crossing point takes the other's colour
    into_far = (t > 0.5).squeeze(1)
    target = torch.where(into_far, far_pix, near_pix)
    delta = torch.where(into_far[:, None], (t - 0.5) * (c_near - c_far),
                        (0.5 - t) * (c_far - c_near))
    return flat.index_add(0, target, delta).view(B, H, W, C)


def _screen_float(clip_pos: Tensor, H: int, W: int) -> Tuple[Tensor, Tensor]:
    """Continuous pixel coordinates (col, row) [B, V, 2] (differentiable) and w > 0 [B, V]."""
    w = clip_pos[..., 3]
    front = w > 1e-8
    w = torch.where(front, w, torch.ones_like(w))
    col = (clip_pos[..., 0] / w + 1.0) * (0.5 * W)
    row = (1.0 - clip_pos[..., 1] / w) * (0.5 * H)
    return torch.stack([col, row], dim=-1), front


def edge_neighbours(faces: Tensor) -> Tensor:
    """For each face edge k (vertices k, k+1), the face across it: [F, 3] long, -1 on a
    boundary edge or an edge shared by more than two faces."""
    F = faces.shape[0]
    a, b = faces, faces.roll(-1, dims=1)
    n = int(faces.max()) + 1 if F else 1
    key = (torch.minimum(a, b) * n + torch.maximum(a, b)).reshape(-1)
    sk, perm = torch.sort(key)
    same = sk[1:] == sk[:-1]
    false = torch.zeros(1, dtype=torch.bool, device=faces.device)
    same_next = torch.cat([same, false])
    same_prev = torch.cat([false, same])
    after_next = torch.cat([same[1:], false, false])
    first = (same_next & ~same_prev & ~after_next).nonzero().squeeze(1)   # groups of two
    i, j = perm[first], perm[first + 1]
    opp = torch.full((3 * F,), -1, dtype=torch.long, device=faces.device)
    opp[i] = torch.div(j, 3, rounding_mode="floor")
    opp[j] = torch.div(i, 3, rounding_mode="floor")
    return opp.view(F, 3)


def _silhouette_edges(screen: Tensor, front: Tensor, faces: Tensor) -> Tensor:
    """[B, F, 3] bool: edge k of a face is a silhouette in view b when it has no single
    neighbour across it or the neighbour faces the other way on screen (as nvdiffrast
    decides with its topology hash)."""
    B = screen.shape[0]
    F = faces.shape[0]
    opp = edge_neighbours(faces)
    tri = screen[:, faces]                                           # [B, F, 3, 2]
    d1, d2 = tri[:, :, 1] - tri[:, :, 0], tri[:, :, 2] - tri[:, :, 0]
    orient = torch.sign(d1[..., 0] * d2[..., 1] - d1[..., 1] * d2[..., 0])
    orient = torch.where(front[:, faces].all(-1), orient, torch.zeros_like(orient))
    other = orient.gather(1, opp.clamp_min(0).reshape(1, -1).expand(B, 3 * F)).view(B, F, 3)
    return (opp < 0)[None] | (other != orient[..., None]) | (orient[..., None] == 0)


def _edge_pairs(frags: Fragments, has_silhouette: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
    """Adjacent pixel pairs showing different triangles, oriented occluder first.

    Returns flat pixel indices (near, far) and the near pixel's face id, keeping only pairs
    whose near triangle has a silhouette edge in that view (``has_silhouette`` [B, F]).
    """
    fid = frags.face_id
    B, H, W = fid.shape
    flat_f = fid.reshape(-1)
    flat_d = frags.depth.detach().reshape(-1)
    out = []
    # horizontal pairs (p, p + 1) and vertical pairs (p, p + W), p's index from the slice
    for step, differs in ((1, fid[:, :, :-1] != fid[:, :, 1:]),
                          (W, fid[:, :-1, :] != fid[:, 1:, :])):
        bb, rr, cc = differs.nonzero(as_tuple=True)
        p_idx = (bb * H + rr) * W + cc
        out.append((p_idx, p_idx + step))
    p_idx = torch.cat([o[0] for o in out])
    q_idx = torch.cat([o[1] for o in out])
    pf, qf = flat_f.index_select(0, p_idx), flat_f.index_select(0, q_idx)
    pd, qd = flat_d.index_select(0, p_idx), flat_d.index_select(0, q_idx)
    # the occluder is the covered pixel, or the nearer of two covered ones
    p_front = (qf < 0) | ((pf >= 0) & (pd <= qd))
    near_pix = torch.where(p_front, p_idx, q_idx)
    far_pix = torch.where(p_front, q_idx, p_idx)
    near_f = torch.where(p_front, pf, qf)
    b = torch.div(near_pix, H * W, rounding_mode="floor")
    F = has_silhouette.shape[1]
    keep = has_silhouette.reshape(-1).index_select(0, b * F + near_f).nonzero().squeeze(1)
    return (near_pix.index_select(0, keep), far_pix.index_select(0, keep),
            near_f.index_select(0, keep))


def _edge_crossing(tri: Tensor, silhouette: Tensor, near_pix: Tensor, far_pix: Tensor,
                   H: int, W: int) -> Tuple[Tensor, Tensor]:
    """Where the segment from the near pixel's centre to the far one's leaves the near
    triangle ``tri`` [M, 3, 2] (pixel coordinates), as a fraction t in [0, 1].

    Returns t [M] (differentiable w.r.t. ``tri``) and a validity mask [M]: the segment
    leaves through an edge and that edge is a silhouette (``silhouette`` [M, 3]).
    """
    sx, sy = tri[..., 0], tri[..., 1]

    def centre(pix):
        r = torch.div(pix, W, rounding_mode="floor") % H
        return (pix % W).to(sx.dtype) + 0.5, r.to(sx.dtype) + 0.5

    ax, ay = centre(near_pix)
    bx, by = centre(far_pix)
    # edge k joins vertices k and k+1; e_k(x) > 0 on the triangle's side
    ex, ey = sx.roll(-1, dims=1) - sx, sy.roll(-1, dims=1) - sy
    area = (ex[:, 0] * (sy[:, 2] - sy[:, 0]) - ey[:, 0] * (sx[:, 2] - sx[:, 0])).detach()
    orient = torch.sign(area)[:, None]
    e_a = (ex * (ay[:, None] - sy) - ey * (ax[:, None] - sx)) * orient
    e_b = (ex * (by[:, None] - sy) - ey * (bx[:, None] - sx)) * orient
    crosses = (e_b.detach() < 0) & (e_a.detach() >= 0)
    denom = torch.where(crosses, e_a - e_b, torch.ones_like(e_a))
    t = torch.where(crosses, e_a / denom, torch.full_like(e_a, 2.0))
    # the segment leaves through the first edge it crosses; only a silhouette edge counts
    t_min, k = t.min(dim=1)
    exit_sil = silhouette.gather(1, k[:, None]).squeeze(1)
    ok = crosses.any(dim=1) & exit_sil & (area != 0)
    return t_min.clamp(0.0, 1.0), ok


# ---------------------------------------------------------------------------------------
# nvdiffrast backend
# ---------------------------------------------------------------------------------------

def _nv_context(device: torch.device):
    import nvdiffrast.torch as dr

    key = str(device)
    if key not in _NV_CONTEXTS:
        _NV_CONTEXTS[key] = dr.RasterizeCudaContext(device=device)
    return _NV_CONTEXTS[key]


def _rasterize_nvdiffrast(clip_pos: Tensor, faces: Tensor, height: int, width: int) -> Fragments:
    import nvdiffrast.torch as dr

    pos = clip_pos.float().contiguous()
    tri = faces.int().contiguous()
    rast, _ = dr.rasterize(_nv_context(clip_pos.device), pos, tri, (height, width))
    depth, _ = dr.interpolate(pos[..., 3:4].contiguous(), rast, tri)
    # nvdiffrast's row 0 is NDC y = -1; ours is y = +1
    r = rast.flip(1)
    face_id = r[..., 3].long() - 1
    covered = (face_id >= 0)[..., None].to(pos.dtype)
    u, v = r[..., 0], r[..., 1]
    bary = torch.stack([u, v, 1.0 - u - v], dim=-1) * covered
    return Fragments(face_id, bary.to(clip_pos.dtype),
                     (depth.flip(1)[..., 0] * covered[..., 0]).to(clip_pos.dtype),
                     native=(rast, tri))


def _antialias_nvdiffrast(color: Tensor, frags: Fragments, clip_pos: Tensor,
                          faces: Tensor) -> Tensor:
    import nvdiffrast.torch as dr

    rast, tri = frags.native
    out = dr.antialias(color.flip(1).float().contiguous(), rast,
                       clip_pos.float().contiguous(), tri)
    return out.flip(1).to(color.dtype)
