"""UV textures and views (library): back-projecting target views onto a UV texture, sampling a
texture at UV coordinates, and finding the UV of world points on a mesh.

Used by the ``textured-mesh`` representation (its initial texture, its renders and its
export through :func:`engine.export.export_representation`, which asks for colours at world
points). Pure functions; only :func:`sample_texture` is meant for gradients.

Conventions: UVs in [0, 1] with v = 0 at the bottom of the image (the OBJ / trimesh and
:func:`engine.export.rasterize_uv` convention), so texture row 0 is v = 1. Images are
[H, W, C] with row 0 at the top and pixel centres at (col + 0.5, row + 0.5), as the
rasteriser and :meth:`engine.cameras.Cameras.rays` use.
"""

from __future__ import annotations

from typing import Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as Fn
from torch import Tensor


def sample_texture(texture: Tensor, uv: Tensor) -> Tensor:
    """Bilinear lookup of ``texture`` [T_h, T_w, C] at ``uv`` [..., 2] -> [..., C].

    u = 0 / 1 are the left / right edges of the image, v = 0 / 1 its bottom / top edges;
    outside [0, 1] the border texel is repeated. Differentiable with respect to ``texture``
    (and ``uv``).
    """
    lead = uv.shape[:-1]
    grid = torch.stack([uv[..., 0] * 2.0 - 1.0, 1.0 - uv[..., 1] * 2.0], dim=-1)
    grid = grid.reshape(1, 1, -1, 2).to(texture.dtype)
    img = texture.permute(2, 0, 1)[None]
    out = Fn.grid_sample(img, grid, mode="bilinear", padding_mode="border", align_corners=False)
    return out[0, :, 0].t().reshape(*lead, texture.shape[-1])


def _sample_image(images: Tensor, col: Tensor, row: Tensor) -> Tensor:
    """Bilinear samples of images [K, H, W, C] at continuous pixel coordinates col, row
    [K, N] (pixel centres at +0.5) -> [K, N, C]; border texels repeated outside."""
    K, H, W, C = images.shape
    grid = torch.stack([col / W * 2.0 - 1.0, row / H * 2.0 - 1.0], dim=-1)[:, None]  # [K,1,N,2]
    out = Fn.grid_sample(images.permute(0, 3, 1, 2), grid.to(images.dtype), mode="bilinear",
                         padding_mode="border", align_corners=False)             # [K,C,1,N]
    return out[:, :, 0].permute(0, 2, 1)


@torch.no_grad()
def backproject_views(points: Tensor, normals: Tensor, images: Tensor, world_to_clip: Tensor,
                      centres: Tensor, depth: Tensor, masks: Optional[Tensor] = None,
                      depth_tol: float = 0.05, cos_power: float = 1.0,
                      mask_min: float = 0.0) -> Tuple[Tensor, Tensor]:
    """Colour of surface points from the views that see them, visibility-weighted.

    For point p_i (unit normal n_i) and view k (model-view-projection M_k, camera centre o_k,
    image I_k, optional mask A_k, depth map D_k of the surface seen from k):

        (x, y, z, w) = M_k [p_i; 1]          w: the view depth of p_i (distance along -z)
        col = (x / w + 1) / 2 * W,   row = (1 - y / w) / 2 * H    (continuous pixel coordinates)
        in_k  = w > 0 and 0 <= col < W and 0 <= row < H
        vis_k = in_k and |w - D_k[nearest pixel of (col, row) in D_k's own grid]| <= depth_tol
                (D_k = 0 where the view shows no surface: never visible there)
        cos_k = max(0, n_i . (o_k - p_i) / |o_k - p_i|)
        a_ik  = vis_k * cos_k ** cos_power * A_k(col, row) * [A_k(col, row) >= mask_min]
                (A_k = 1 without masks; the gate keeps silhouette pixels, half background,
                out of the texture)
        C_i   = sum_k a_ik I_k(col, row) / sum_k a_ik,       weight_i = sum_k a_ik

    I_k(.) and A_k(.) are bilinear samples. A point seen by no view (weight 0) gets colour 0.
    The depth maps may have another resolution than the images (a finer one makes the depth
    test sharper); col and row are rescaled to each.

    Args:
        points: [N, 3] world points; normals: [N, 3] unit normals (outward).
        images: [K, H, W, C] colours; masks: [K, H, W, 1] in [0, 1] or None.
        world_to_clip: [K, 4, 4] (``Cameras.world_to_clip(H, W)``); centres: [K, 3].
        depth: [K, H_d, W_d] view depth of the visible surface (0 where empty).
        depth_tol: largest |w - D| counted as the same surface (world units).
        cos_power: exponent of the cosine weight (0: visibility only).
        mask_min: mask values below this give no weight (with masks only).
    Returns:
        colours [N, C] and weights [N] (0 where no view sees the point). Not differentiable.
    """
    K, H, W, C = images.shape
    dt = images.dtype
    homo = torch.cat([points, torch.ones_like(points[:, :1])], dim=-1).to(world_to_clip)
    clip = torch.einsum("kij,nj->kni", world_to_clip, homo)                    # [K, N, 4]
    w = clip[..., 3]
    safe_w = torch.where(w.abs() > 1e-12, w, torch.ones_like(w))
    ndc_x, ndc_y = clip[..., 0] / safe_w, clip[..., 1] / safe_w
    col = (ndc_x + 1.0) * 0.5 * W
    row = (1.0 - ndc_y) * 0.5 * H
    inside = (w > 0) & (col >= 0) & (col < W) & (row >= 0) & (row < H)

    Hd, Wd = depth.shape[1:]
    dcol = (col * (Wd / W)).floor().long().clamp(0, Wd - 1)
    drow = (row * (Hd / H)).floor().long().clamp(0, Hd - 1)
    seen = torch.gather(depth.reshape(K, -1), 1, drow * Wd + dcol)              # [K, N]
    visible = inside & (seen > 0) & ((w - seen).abs() <= depth_tol)

    to_cam = Fn.normalize(centres[:, None, :].to(points) - points[None], dim=-1)  # [K, N, 3]
    cos = (to_cam * normals[None]).sum(-1).clamp_min(0.0)
    weight = visible.to(dt) * (cos.to(dt) ** cos_power if cos_power != 0 else 1.0)
    weight = weight * (cos > 0).to(dt)          # a back-facing point is never seen
    if masks is not None:
        a = _sample_image(masks.to(dt), col.to(dt), row.to(dt))[..., 0]
        weight = weight * a * (a >= mask_min).to(dt)
    colours = _sample_image(images, col.to(dt), row.to(dt))                     # [K, N, C]
    total = weight.sum(0)
    mean = (weight[..., None] * colours).sum(0) / total.clamp_min(1e-12)[:, None]
    return torch.where(total[:, None] > 0, mean, torch.zeros_like(mean)), total


def closest_surface_points(points: np.ndarray, vertices: np.ndarray, faces: np.ndarray,
                           candidates: int = 8) -> Tuple[np.ndarray, np.ndarray]:
    """The face under each point and the barycentrics of the point projected onto it.

    Meant for points on (or very near) the mesh, e.g. texel centres of another UV layout of
    the same surface: the ``candidates`` faces with the nearest centroids (scipy cKDTree) are
    tried; each point is projected onto their planes, the barycentrics clamped to the
    triangle (negatives to 0, renormalised) and the face whose clamped point is nearest kept.

    Args:
        points: [N, 3]; vertices: [V, 3]; faces: [F, 3] int.
    Returns:
        face index [N] int64 and barycentrics [N, 3] float64 (non-negative, summing to 1).
    """
    from scipy.spatial import cKDTree

    p = np.asarray(points, dtype=np.float64).reshape(-1, 3)
    tri = np.asarray(vertices, dtype=np.float64)[np.asarray(faces, dtype=np.int64)]  # [F,3,3]
    k = int(min(candidates, tri.shape[0]))
    _, cand = cKDTree(tri.mean(axis=1)).query(p, k=k)
    cand = np.asarray(cand).reshape(p.shape[0], k)
    a, b, c = tri[cand, 0], tri[cand, 1], tri[cand, 2]                          # [N, k, 3]
    v0, v1, v2 = b - a, c - a, p[:, None] - a
    d00, d01, d11 = (v0 * v0).sum(-1), (v0 * v1).sum(-1), (v1 * v1).sum(-1)
    d20, d21 = (v2 * v0).sum(-1), (v2 * v1).sum(-1)
    den = d00 * d11 - d01 * d01
    den = np.where(np.abs(den) > 1e-30, den, 1e-30)
    beta = (d11 * d20 - d01 * d21) / den
    gamma = (d00 * d21 - d01 * d20) / den
    bary = np.stack([1.0 - beta - gamma, beta, gamma], axis=-1).clip(0.0, None)
    bary = bary / np.maximum(bary.sum(-1, keepdims=True), 1e-30)
    q = bary[..., 0:1] * a + bary[..., 1:2] * b + bary[..., 2:3] * c
    best = ((q - p[:, None]) ** 2).sum(-1).argmin(axis=1)
    rows = np.arange(p.shape[0])
    return cand[rows, best].astype(np.int64), bary[rows, best]
