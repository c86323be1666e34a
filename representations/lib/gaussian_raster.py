"""A differentiable rasteriser of 3D Gaussians (3D Gaussian splatting), in pure torch.

Each Gaussian has a mean ``mu`` [3], a covariance ``Sigma = R S S^T R^T`` built from log
scales ``s`` [3] (``S = diag(exp(s))``) and a unit quaternion ``q = (w, x, y, z)`` [4]
(``R = R(q / |q|)``), an opacity ``o`` in (0, 1) and a feature vector (colour, ...).

Rendering a camera (Kerbl et al. 2023, Zwicker et al.'s EWA splatting):

1. **Projection.** World -> camera ``t = W (mu - c)`` with ``W = R_c2w^T`` (OpenGL camera
   axes: the camera looks down -z, so its depth is ``z = -t_z``); pixel coordinates
   ``u = W_img/2 + f t_x / z`` and ``v = H_img/2 - f t_y / z`` (row 0 at the top;
   ``f = H_img / (2 tan(fovy / 2))``, square pixels, pixel centres at half-integers).
2. **EWA.** The 2D covariance ``Sigma' = J W Sigma W^T J^T + 0.3 I`` with the Jacobian of
   the projection at the mean, ``J = [[f/z, 0, f t_x/z^2], [0, -f/z, -f t_y/z^2]]``; ``t_x/z``
   and ``t_y/z`` are clamped to 1.3 tan(fov/2) inside J, so Gaussians far outside the frustum
   do not blow up. The 0.3 px^2 dilation keeps sub-pixel Gaussians at least one pixel wide
   (anti-aliasing). The conic is ``Sigma'^{-1}``.
3. **Alpha.** At a pixel centre ``p``, ``d = p - (u, v)`` and
   ``alpha = min(0.99, o exp(-d^T Sigma'^{-1} d / 2))``; pairs with ``alpha < 1/255`` are
   skipped. Where ``alpha >= 1/255`` holds exactly inside the ellipse
   ``d^T Sigma'^{-1} d <= 2 ln(255 o)``, whose bounding box bounds the pixels visited.
4. **Compositing,** front to back by camera depth ``z`` (a per-view sort of the means):
   ``T_i = prod_{j<i} (1 - alpha_j)``, ``w_i = alpha_i T_i``, ``C = sum_i w_i c_i + T_N bg``.
   **Early termination:** a pixel stops once ``T < 1e-4`` (the Gaussians behind it are never
   differentiated, as in the reference CUDA rasteriser).

Implementation (vectorised per pixel, no tiles). A non-differentiable pass
(:func:`find_pairs`) walks the depth-sorted Gaussians in a few front-to-back slices; in each
it lists the (pixel, Gaussian) pairs inside each Gaussian's box (by broadcasting over one
stencil when the boxes are alike), drops those below 1/255 and those on pixels already
terminated, groups them by pixel keeping depth order (a stable sort of 16- or 32-bit pixel
keys) and drops the pairs behind the early-termination point. Only the surviving pairs go
through autograd:
alpha, a segmented exclusive cumulative sum of ``log(1 - alpha)`` (float64, so long pixel
runs keep their precision) for ``T``, and ``index_add`` of ``w c`` into the pixels. Memory
and time scale with the number of surviving pairs, not with pixels x Gaussians.

Differentiable with respect to means, log scales, quaternions, opacities and features (not
with respect to the cameras, and not through the depth order or the box bounds, which are
piecewise constant).

Backends (``rasterize_gaussians(..., backend=)``), all returning the same dict:

* ``torch``: this module, end to end (any device; also differentiable twice).
* ``cpp``: CPU only. Steps 1-2, the boxes and the depth order (:func:`screen_boxes`, the same
  code as :func:`find_pairs`) stay in torch; steps 3-4 and their backward run in a C++ kernel
  (:mod:`representations.lib.gaussian_raster_cpp`, compiled on first use), which splats each
  view's Gaussians in depth order into a per-pixel transmittance, skipping dead pixels, with
  the same thresholds and pixel centres. It gives the torch backend's images and gradients up
  to float rounding, several times faster (docs/results/gaussians.md).
* ``gsplat``: gsplat's CUDA kernels (when it imports).
* ``auto``: gsplat on CUDA when it imports; else on a CPU ``cpp`` when its kernel builds
  (a failed build prints one warning line and falls back to torch for the rest of the
  process; ``DISTILL_GAUSSIANS_CPP=0`` or ``gaussian_raster_cpp.set_cpp_enabled(False)``
  keeps it on torch); else ``torch``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict

import torch
from torch import Tensor

from engine.cameras import Cameras
from representations.lib import gaussian_raster_cpp

ALPHA_MIN = 1.0 / 255.0
ALPHA_MAX = 0.99
T_MIN = 1e-4
DILATION = 0.3
NEAR = 0.01
BACKENDS = ("auto", "torch", "cpp", "gsplat")


# ---------------------------------------------------------------------------------------
# geometry (differentiable)
# ---------------------------------------------------------------------------------------

def quaternion_to_rotation(quats: Tensor) -> Tensor:
    """Rotation matrices [N, 3, 3] of quaternions [N, 4] (w, x, y, z), normalised first."""
    q = quats / quats.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    w, x, y, z = q.unbind(-1)
    return torch.stack([
        1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y),
        2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x),
        2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y),
    ], dim=-1).reshape(-1, 3, 3)


def covariance_3d(log_scales: Tensor, quats: Tensor) -> Tensor:
    """``Sigma = R S S^T R^T`` [N, 3, 3] from log scales [N, 3] and quaternions [N, 4]."""
    m = quaternion_to_rotation(quats) * log_scales.exp()[:, None, :]   # R S
    return m @ m.transpose(1, 2)


def shortest_axis(log_scales: Tensor, quats: Tensor) -> Tensor:
    """Unit direction [N, 3] of each Gaussian's shortest axis (its normal when flat)."""
    rot = quaternion_to_rotation(quats)
    idx = log_scales.argmin(dim=-1)
    return rot.gather(2, idx[:, None, None].expand(-1, 3, 1))[..., 0]


def intrinsics(cameras: Cameras, height: int, width: int):
    """(focal [B], cx, cy) in pixels for the engine's cameras (see engine.cameras)."""
    return cameras.focal(height), 0.5 * width, 0.5 * height


@dataclass
class Projected:
    """Per-view screen-space Gaussians, each [B, N, ...]: pixel ``means2d`` [B, N, 2] (col,
    row), ``cov2d`` [B, N, 3] (a, b, c of the dilated 2D covariance [[a, b], [b, c]], px^2),
    ``conics`` [B, N, 3] (the same of its inverse), camera ``depths`` [B, N], and whether
    each is in front of the near plane ``valid`` [B, N]."""
    means2d: Tensor
    conics: Tensor
    depths: Tensor
    cov2d: Tensor
    valid: Tensor


def project(means: Tensor, cov3d: Tensor, cameras: Cameras, height: int, width: int,
            dilation: float = DILATION) -> Projected:
    """Project N Gaussians (means [N, 3], covariances [N, 3, 3]) into B cameras (EWA).

    Differentiable with respect to ``means`` and ``cov3d``."""
    c2w = cameras.c2w.to(means.dtype)
    rot_w2c = c2w[:, :3, :3].transpose(1, 2)                               # [B, 3, 3]
    t = torch.einsum("bij,bnj->bni", rot_w2c, means[None] - c2w[:, None, :3, 3])
    z = -t[..., 2]
    valid = z > NEAR
    zs = torch.where(valid, z, torch.ones_like(z))
    focal, cx, cy = intrinsics(cameras, height, width)
    f = focal.to(means.dtype)[:, None]
    u = cx + f * t[..., 0] / zs
    v = cy - f * t[..., 1] / zs
    # the Jacobian at the mean, with the lateral offset clamped (outside 1.3x the frustum)
    lim_x = 1.3 * (0.5 * width / f)
    lim_y = 1.3 * (0.5 * height / f)
    tx = (t[..., 0] / zs).clamp(-lim_x, lim_x) * zs
    ty = (t[..., 1] / zs).clamp(-lim_y, lim_y) * zs
    # M = J W, row by row, one [B, N] tensor per entry: J is sparse, and batched 2x3 @ 3x3
    # products or broadcasts over [B, N, 3, 3] are slow on a CPU (many tiny inner loops)
    w = rot_w2c[:, :, :, None]                                             # [B, 3, 3, 1]
    fz, fx, fy = f / zs, f * tx / zs ** 2, f * ty / zs ** 2                # [B, N]
    m0 = [fz * w[:, 0, j] + fx * w[:, 2, j] for j in range(3)]
    m1 = [-fz * w[:, 1, j] - fy * w[:, 2, j] for j in range(3)]
    sig = [[cov3d[:, i, j] for j in range(3)] for i in range(3)]           # [N] each
    s0 = [sig[i][0] * m0[0] + sig[i][1] * m0[1] + sig[i][2] * m0[2] for i in range(3)]
    s1 = [sig[i][0] * m1[0] + sig[i][1] * m1[1] + sig[i][2] * m1[2] for i in range(3)]
    a = m0[0] * s0[0] + m0[1] * s0[1] + m0[2] * s0[2] + dilation          # M Sigma M^T
    b = m1[0] * s0[0] + m1[1] * s0[1] + m1[2] * s0[2]
    c = m1[0] * s1[0] + m1[1] * s1[1] + m1[2] * s1[2] + dilation
    det = (a * c - b * b).clamp_min(1e-12)
    conics = torch.stack([c / det, -b / det, a / det], dim=-1)
    return Projected(torch.stack([u, v], dim=-1), conics, z,
                     torch.stack([a, b, c], dim=-1), valid)


# ---------------------------------------------------------------------------------------
# pair finding (not differentiable)
# ---------------------------------------------------------------------------------------

@torch.no_grad()
def find_pairs(proj: Projected, opacities: Tensor, height: int, width: int,
               early_stop: bool = True, chunks: int = 0):
    """The (Gaussian, pixel) pairs that composite, grouped by pixel in depth order.

    The depth-sorted Gaussians of every view are taken in ``chunks`` slices (0: one per
    10,000 Gaussian-views, at most 16), front to back, keeping a running transmittance per
    pixel: a later slice skips the Gaussians whose box
    has no live pixel left (counted with a summed-area table of the live pixels) and the
    pairs landing on dead pixels, so the sort and the differentiable pass see little of
    what lies behind an opaque surface (early termination, where it is cheap in torch).

    Args:
        proj: :class:`Projected` of B views; opacities [N] in (0, 1).
    Returns:
        ``gauss`` [M] (Gaussian index), ``view`` [M], ``pixel`` [M] (flat index into
        B * H * W), and ``first`` [M] bool (True where a pixel's run starts); pairs with
        alpha < 1/255 and those behind a pixel's early-termination point are left out.
    """
    B, N = proj.depths.shape
    dev = proj.depths.device
    P = B * height * width
    op, mean, x0, y0, bw, bh, keep, order = screen_boxes(proj, opacities, height, width)
    n_keep = int(keep.sum(1).max()) if N else 0
    order = order[:, :n_keep]
    view_of = torch.arange(B, device=dev)[:, None].expand_as(order)
    # per slot (view, depth rank): everything the pair search needs, packed in one table
    table = torch.stack([mean[..., 0], mean[..., 1], proj.conics.detach().float()[..., 0],
                         proj.conics.detach().float()[..., 1],
                         proj.conics.detach().float()[..., 2], op[None].expand(B, N),
                         x0, y0, bw, bh, keep.float()], -1)
    table = table.gather(1, order[..., None].expand(-1, -1, table.shape[-1]))  # [B, n, 11]
    log_t = torch.zeros(P, device=dev)            # running log transmittance per pixel
    log_min = math.log(T_MIN)
    found = []
    chunks = chunks or min(16, max(1, B * N // 10000))
    bounds = torch.linspace(0, n_keep, chunks + 1).long().tolist()
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        if hi <= lo:
            continue
        rows = table[:, lo:hi].reshape(-1, table.shape[-1])
        slot_gauss = order[:, lo:hi].reshape(-1)
        slot_view = view_of[:, lo:hi].reshape(-1)
        live = rows[:, 10] > 0
        if early_stop and lo > 0:
            # a Gaussian whose whole box is dead (T < 1e-4) cannot show: skip it
            alive = (log_t >= log_min).float().reshape(B, height, width)
            sat = torch.nn.functional.pad(alive.cumsum(1).cumsum(2), (1, 0, 1, 0))
            xa, ya = rows[:, 6].long(), rows[:, 7].long()
            xb, yb = xa + rows[:, 8].long(), ya + rows[:, 9].long()
            flat = sat.reshape(B, -1)
            w1 = width + 1
            n_alive = (flat[slot_view, yb * w1 + xb] - flat[slot_view, ya * w1 + xb]
                       - flat[slot_view, yb * w1 + xa] + flat[slot_view, ya * w1 + xa])
            live &= n_alive > 0.5
        sel = live.nonzero().squeeze(1)
        rows, slot_gauss, slot_view = rows[sel], slot_gauss[sel], slot_view[sel]
        pair_slot, pixel, alpha = _box_pairs(rows, slot_view, height, width)
        if pair_slot.numel() == 0:
            continue
        if early_stop and lo > 0:
            sel = (log_t[pixel] >= log_min).nonzero().squeeze(1)
            pair_slot, alpha, pixel = pair_slot[sel], alpha[sel], pixel[sel]
        perm = _sort_by_pixel(pixel, P)
        pair_slot, alpha, pixel = pair_slot[perm], alpha[perm], pixel[perm]
        first = torch.ones_like(pixel, dtype=torch.bool)
        first[1:] = pixel[1:] != pixel[:-1]
        log1m = torch.log1p(-alpha.double())
        before = segment_exclusive_cumsum(log1m, first) + log_t[pixel].double()
        if early_stop:
            sel = (before >= log_min).nonzero().squeeze(1)
            pair_slot, pixel, log1m = pair_slot[sel], pixel[sel], log1m[sel]
        log_t.index_add_(0, pixel, log1m.float())
        found.append((slot_gauss[pair_slot], slot_view[pair_slot], pixel))
    empty = torch.zeros(0, dtype=torch.long, device=dev)
    if not found:
        return empty, empty, empty, torch.zeros(0, dtype=torch.bool, device=dev)
    gauss, view, pixel = (torch.cat(parts) for parts in zip(*found))
    if len(found) > 1:
        # chunks come front to back and each is pixel-sorted: one stable sort by pixel
        # makes every pixel's run depth-ordered
        perm = _sort_by_pixel(pixel, P)
        gauss, view, pixel = gauss[perm], view[perm], pixel[perm]
    first = torch.ones_like(pixel, dtype=torch.bool)
    first[1:] = pixel[1:] != pixel[:-1]
    return gauss, view, pixel, first


@torch.no_grad()
def screen_boxes(proj: Projected, opacities: Tensor, height: int, width: int):
    """Each Gaussian's pixel box and the views' depth order (float32, not differentiable).

    Returns ``op`` [N] (opacities clamped to [1e-8, 1]), ``mean`` [B, N, 2], ``x0``, ``y0``,
    ``bw``, ``bh`` [B, N] (the first column/row and the box size: the pixels whose centres
    lie in the bounding box of the ellipse ``d^T Sigma'^{-1} d <= 2 ln(255 o)``, clipped to
    the image), ``keep`` [B, N] (in front of the near plane, o > 1/255, a non-empty box) and
    ``order`` [B, N] (per view, the kept Gaussians near to far first, then the others)."""
    op = opacities.detach().float().clamp(1e-8, 1.0)
    # squared Mahalanobis radius where alpha = 1/255: only Gaussians with o > 1/255 show
    qmax = 2.0 * torch.log(op * 255.0)                                     # [N]
    cov = proj.cov2d.detach().float()
    mean = proj.means2d.detach().float()
    hx = torch.sqrt(qmax.clamp_min(0) * cov[..., 0])                      # [B, N]
    hy = torch.sqrt(qmax.clamp_min(0) * cov[..., 2])
    # pixel centres at (i + 0.5): the columns whose centres fall in [u - hx, u + hx]
    x0 = torch.ceil(mean[..., 0] - hx - 0.5).clamp(0, width)
    x1 = torch.floor(mean[..., 0] + hx - 0.5).clamp(-1, width - 1) + 1
    y0 = torch.ceil(mean[..., 1] - hy - 0.5).clamp(0, height)
    y1 = torch.floor(mean[..., 1] + hy - 0.5).clamp(-1, height - 1) + 1
    bw = (x1 - x0).clamp_min(0)
    bh = (y1 - y0).clamp_min(0)
    keep = proj.valid & (qmax > 0)[None] & torch.isfinite(mean).all(-1) & (bw * bh > 0)
    depth = torch.where(keep, proj.depths.detach().float(),
                        torch.full_like(bw, float("inf")))
    order = torch.argsort(depth, dim=1)                                    # [B, N]
    return op, mean, x0, y0, bw, bh, keep, order


def _box_pairs(rows: Tensor, slot_view: Tensor, height: int, width: int):
    """The pairs (slot [M], pixel [M], alpha [M]) of the slots ``rows`` [S, 11] (see
    :func:`find_pairs`) with alpha >= 1/255, slot by slot in order.

    When the boxes are of similar sizes, every slot is evaluated on one stencil of the
    largest box, by broadcasting (no per-pair gathers); when a few large boxes would make
    that wasteful, each pixel of each box is listed instead (``repeat_interleave``)."""
    dev = rows.device
    u, v, ca, cb, cc, op = rows[:, :6].unbind(1)
    x0, y0, bw, bh = rows[:, 6], rows[:, 7], rows[:, 8], rows[:, 9]
    counts = (bw * bh).long()
    total = int(counts.sum())
    if total == 0:
        empty = torch.zeros(0, dtype=torch.long, device=dev)
        return empty, empty, torch.zeros(0, device=dev)
    kw, kh = int(bw.max()), int(bh.max())
    if rows.shape[0] * kw * kh <= 6 * total:
        ox = torch.arange(kw, device=dev, dtype=rows.dtype)
        oy = torch.arange(kh, device=dev, dtype=rows.dtype)
        dx = (x0[:, None] + ox + 0.5 - u[:, None])[:, None, :]          # [S, 1, kw]
        dy = (y0[:, None] + oy + 0.5 - v[:, None])[:, :, None]          # [S, kh, 1]
        q = (ca[:, None, None] * dx * dx + cc[:, None, None] * dy * dy) \
            + (2.0 * cb)[:, None, None] * dx * dy                        # [S, kh, kw]
        alpha = (op[:, None, None] * torch.exp(-0.5 * q)).clamp_max(ALPHA_MAX)
        ok = (alpha >= ALPHA_MIN) & (ox < bw[:, None])[:, None, :] \
            & (oy < bh[:, None])[:, :, None]
        sel = ok.reshape(-1).nonzero().squeeze(1)
        slot = sel // (kw * kh)
        rest = sel % (kw * kh)
        px = x0.long()[slot] + rest % kw
        py = y0.long()[slot] + rest // kw
        alpha = alpha.reshape(-1)[sel]
    else:
        slot = torch.repeat_interleave(torch.arange(rows.shape[0], device=dev), counts)
        local = torch.arange(total, device=dev) - (torch.cumsum(counts, 0) - counts)[slot]
        bw_p = bw.long()[slot]
        px = x0.long()[slot] + local % bw_p
        py = y0.long()[slot] + local // bw_p
        dx = px.to(rows.dtype) + 0.5 - u[slot]
        dy = py.to(rows.dtype) + 0.5 - v[slot]
        q = ca[slot] * dx * dx + 2.0 * cb[slot] * dx * dy + cc[slot] * dy * dy
        alpha = (op[slot] * torch.exp(-0.5 * q)).clamp_max(ALPHA_MAX)
        sel = (alpha >= ALPHA_MIN).nonzero().squeeze(1)
        slot, px, py, alpha = slot[sel], px[sel], py[sel], alpha[sel]
    pixel = (slot_view[slot] * height + py) * width + px
    return slot, pixel, alpha


def _sort_by_pixel(pixel: Tensor, n_pixels: int) -> Tensor:
    """Stable argsort of pixel indices, on the narrowest integer type that holds them
    (a 16-bit sort is about twice as fast as a 64-bit one on a CPU)."""
    if n_pixels <= 2 ** 15 - 1:
        key = pixel.to(torch.int16)
    elif n_pixels <= 2 ** 31 - 1:
        key = pixel.to(torch.int32)
    else:
        key = pixel
    return torch.sort(key, stable=True).indices


def segment_exclusive_cumsum(x: Tensor, first: Tensor) -> Tensor:
    """Exclusive cumulative sum of ``x`` [M] restarting where ``first`` [M] is True.

    ``out_i = sum_{j in run(i), j < i} x_j``. Differentiable in ``x``; pass float64 for long
    runs (the running total of all runs is subtracted back out)."""
    inclusive = torch.cumsum(x, 0)
    exclusive = inclusive - x
    run = torch.cumsum(first.long(), 0) - 1                                # run id [M]
    base = exclusive[first]                                                # [runs]
    return exclusive - base[run]


# ---------------------------------------------------------------------------------------
# rendering
# ---------------------------------------------------------------------------------------

def rasterize_gaussians(means: Tensor, log_scales: Tensor, quats: Tensor, opacities: Tensor,
                        features: Tensor, cameras: Cameras, height: int, width: int,
                        backend: str = "auto") -> Dict[str, Tensor]:
    """Splat N Gaussians into B cameras; returns premultiplied sums, without background.

    Args:
        means [N, 3], log_scales [N, 3], quats [N, 4] (w, x, y, z; any norm),
        opacities [N] in (0, 1), features [N, C] or, when they depend on the view (colour
        from spherical harmonics, normals facing the camera), [B, N, C]: colour and any
        other per-Gaussian values to composite. backend: ``auto | torch | cpp | gsplat``
        (``auto``: gsplat on CUDA when it imports, else the C++ kernel on a CPU when it
        builds, else torch; see the module docstring).
    Returns:
        ``features`` [B, H, W, C] (``sum_i w_i f_i``), ``alpha`` [B, H, W, 1]
        (``1 - T_final``), ``depth`` [B, H, W, 1] (``sum_i w_i z_i``, camera z), and
        ``means2d`` [B, N, 2] (pixel means, a graph node whose gradient is the view-space
        gradient densification uses) and ``visible`` [B, N] bool (the Gaussian touched at
        least one pixel of that view).
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend: expected one of {', '.join(BACKENDS)}, got '{backend}'")
    if backend == "gsplat" or (backend == "auto" and means.is_cuda and gsplat_available()):
        return _rasterize_gsplat(means, log_scales, quats, opacities, features, cameras,
                                 height, width)
    if backend == "cpp":
        if means.device.type != "cpu" or means.dtype not in (torch.float32, torch.float64):
            raise ValueError("backend: 'cpp' takes float32 or float64 tensors on a CPU, got "
                             f"{means.dtype} on {means.device}; use auto or torch")
        if gaussian_raster_cpp.load_extension() is None:
            raise RuntimeError("backend: 'cpp': the C++ kernel could not be built "
                               f"({gaussian_raster_cpp.build_error()}); use backend: torch")
    if backend == "cpp" or (backend == "auto" and means.device.type == "cpu"
                            and means.dtype in (torch.float32, torch.float64)
                            and gaussian_raster_cpp.cpp_available()):
        return _rasterize_cpp(means, log_scales, quats, opacities, features, cameras,
                              height, width)
    return _rasterize_torch(means, log_scales, quats, opacities, features, cameras,
                            height, width)


def _rasterize_torch(means, log_scales, quats, opacities, features, cameras, height, width):
    B, N, C = len(cameras), means.shape[0], features.shape[-1]
    cov3d = covariance_3d(log_scales, quats)
    proj = project(means, cov3d, cameras, height, width)
    gauss, view, pixel, first = find_pairs(proj, opacities, height, width)
    # everything a pair needs from its (view, Gaussian), packed so one index_select gathers
    # it (and its backward is one index_add): u, v, conic a, b, c, opacity, depth, features
    feats = features[None].expand(B, N, C) if features.dim() == 2 else features
    table = torch.cat([proj.means2d, proj.conics, opacities[None, :, None].expand(B, N, 1),
                       proj.depths[..., None], feats], -1).reshape(B * N, 7 + C)
    rows = table.index_select(0, view * N + gauss)                         # [M, 7 + C]
    px = (pixel % width).to(means.dtype) + 0.5
    py = ((pixel // width) % height).to(means.dtype) + 0.5
    dx, dy = px - rows[:, 0], py - rows[:, 1]
    q = rows[:, 2] * dx * dx + 2 * rows[:, 3] * dx * dy + rows[:, 4] * dy * dy
    alpha = (rows[:, 5] * torch.exp(-0.5 * q)).clamp_max(ALPHA_MAX)
    log1m = torch.log1p(-alpha)
    log_t = segment_exclusive_cumsum(log1m.double(), first).to(means.dtype)
    weight = alpha * torch.exp(log_t)                                      # [M]
    out = means.new_zeros(B * height * width, 1 + C)
    out = out.index_add(0, pixel, weight[:, None] * rows[:, 6:])          # depth, features
    out = out.reshape(B, height, width, 1 + C)
    # 1 - T_final from the sum of log(1 - alpha) (exact, unlike 1 - sum of weights in float32)
    log_final = means.new_zeros(B * height * width).index_add(0, pixel, log1m)
    alpha_img = (1.0 - torch.exp(log_final)).reshape(B, height, width, 1)
    visible = torch.zeros(B * N, dtype=torch.bool, device=means.device)
    visible[view * N + gauss] = True
    return {"features": out[..., 1:], "depth": out[..., :1], "alpha": alpha_img,
            "means2d": proj.means2d, "visible": visible.reshape(B, N)}


def _rasterize_cpp(means, log_scales, quats, opacities, features, cameras, height, width):
    """Projection in torch, pair finding and compositing in the C++ kernel (same rules)."""
    cov3d = covariance_3d(log_scales, quats)
    proj = project(means, cov3d, cameras, height, width)
    _, _, x0, y0, bw, bh, keep, order = screen_boxes(proj, opacities, height, width)
    counts = keep.sum(1)
    n_keep = int(counts.max()) if means.shape[0] else 0
    boxes = torch.stack([x0, y0, x0 + bw, y0 + bh], -1).to(torch.int32)
    feats, depth, alpha, visible = gaussian_raster_cpp.composite(
        proj.means2d, proj.conics, opacities, proj.depths, features, boxes,
        order[:, :n_keep], counts, height, width, (ALPHA_MIN, ALPHA_MAX, T_MIN))
    return {"features": feats, "depth": depth, "alpha": alpha, "means2d": proj.means2d,
            "visible": visible}


def gsplat_available() -> bool:
    try:
        import gsplat  # noqa: F401
    except Exception:
        return False
    return True


def _rasterize_gsplat(means, log_scales, quats, opacities, features, cameras, height, width):
    """The same render through gsplat's CUDA kernels (OpenCV camera axes, our pixel grid)."""
    from gsplat import rasterization

    flip = torch.diag(torch.tensor([1.0, -1.0, -1.0, 1.0], device=means.device))
    viewmats = torch.linalg.inv(cameras.c2w.to(means.device).float() @ flip)   # OpenCV w2c
    focal, cx, cy = intrinsics(cameras, height, width)
    ks = torch.zeros(len(cameras), 3, 3, device=means.device)
    ks[:, 0, 0] = focal
    ks[:, 1, 1] = focal
    ks[:, 0, 2] = cx
    ks[:, 1, 2] = cy
    ks[:, 2, 2] = 1.0
    # per-view features [B, N, C] are gsplat's [cameras, N, D] colours as they are
    colors, alphas, meta = rasterization(
        means, quats / quats.norm(dim=-1, keepdim=True), log_scales.exp(), opacities,
        features, viewmats, ks, width, height, render_mode="RGB+D", eps2d=DILATION,
        near_plane=NEAR, packed=False)
    C = features.shape[-1]
    return {"features": colors[..., :C], "depth": colors[..., C:C + 1], "alpha": alphas,
            "means2d": meta["means2d"],
            # radii are [B, N] or, in newer gsplat, [B, N, 2]
            "visible": (meta["radii"] > 0).reshape(len(cameras), means.shape[0], -1).all(-1)}


def ray_distance_factor(cameras: Cameras, height: int, width: int) -> Tensor:
    """[B, H, W, 1] factor turning camera depth z into distance along each pixel's unit ray
    (``|(x/f, y/f, -1)|``), so depths match the volume renderers'."""
    focal, cx, cy = intrinsics(cameras, height, width)
    dev = cameras.c2w.device
    cols = (torch.arange(width, device=dev) + 0.5 - cx)[None, None, :]
    rows = (torch.arange(height, device=dev) + 0.5 - cy)[None, :, None]
    f = focal[:, None, None]
    return torch.sqrt(1.0 + (cols / f) ** 2 + (rows / f) ** 2)[..., None]
