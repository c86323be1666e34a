"""Render a triangle mesh with the engine's cameras: albedo, antialiased rgb and mask,
depth, normals and world positions (the DMTet stage's renderer; export's previews)."""

from __future__ import annotations

from typing import Callable, Dict, Optional

import torch
import torch.nn.functional as Fn
from torch import Tensor

from engine.cameras import Cameras
from representations.lib.rasterizer import antialias, interpolate, rasterize


def vertex_normals(vertices: Tensor, faces: Tensor) -> Tensor:
    """Area-weighted unit vertex normals.

    Args:
        vertices: [V, 3]; faces: [F, 3] long, counter-clockwise seen from outside.
    Returns:
        [V, 3] unit normals (a vertex used by no face gets 0). Differentiable with respect
        to ``vertices``.
    """
    faces = faces.long()
    v0, v1, v2 = vertices[faces[:, 0]], vertices[faces[:, 1]], vertices[faces[:, 2]]
    # the cross product's length is twice the area, which gives the area weighting
    fn = torch.cross(v1 - v0, v2 - v0, dim=-1)
    n = torch.zeros_like(vertices)
    n = n.index_add(0, faces.reshape(-1), fn.repeat_interleave(3, dim=0))
    return Fn.normalize(n, dim=-1, eps=1e-20)


def world_to_clip(vertices: Tensor, cameras: Cameras, height: int, width: int) -> Tensor:
    """World vertices [V, 3] -> clip space [B, V, 4] for each camera. Differentiable."""
    mvp = cameras.world_to_clip(height, width).to(vertices)
    homo = torch.cat([vertices, torch.ones_like(vertices[:, :1])], dim=-1)
    return torch.einsum("bij,vj->bvi", mvp, homo)


def render_mesh(vertices: Tensor, faces: Tensor, cameras: Cameras, height: int, width: int, *,
                background, color_fn: Optional[Callable[[Tensor], Tensor]] = None,
                vertex_colors: Optional[Tensor] = None, backend: str = "auto"
                ) -> Dict[str, Tensor]:
    """Rasterise a mesh from B cameras.

    Args:
        vertices: [V, 3] world positions; faces: [F, 3] long.
        cameras: B cameras. background: a Background (dirs [B,H,W,3] -> rgb [B,H,W,3]).
        color_fn: albedo at world points [N, 3] -> [N, 3], evaluated only at covered pixels;
            or vertex_colors [V, 3] interpolated. With neither, the albedo is white.
    Returns:
        albedo [B,H,W,3] (0 where empty), rgb [B,H,W,3] (albedo over the background,
        antialiased), opacity [B,H,W,1] (antialiased mask in [0, 1]), depth [B,H,W,1]
        (view depth, 0 where empty), normal [B,H,W,3] (interpolated unit vertex normals,
        world, 0 where empty), position [B,H,W,3] (world, 0 where empty).
        Differentiable with respect to ``vertices`` (through interpolation and, for rgb and
        opacity, the silhouette), ``vertex_colors`` and the parameters of ``color_fn``.
    """
    faces = faces.long()
    clip = world_to_clip(vertices, cameras, height, width)
    frags = rasterize(clip, faces, height, width, backend=backend)
    covered = frags.face_id >= 0
    mask = covered[..., None].to(vertices.dtype)

    # one interpolation pass for every per-vertex attribute
    attrs = [vertices, vertex_normals(vertices, faces)]
    if color_fn is None and vertex_colors is not None:
        attrs.append(vertex_colors.to(vertices.dtype))
    # split (one backward cat) rather than slices (one zero-filled buffer each)
    interp = interpolate(torch.cat(attrs, dim=-1), frags, faces).split(
        [a.shape[-1] for a in attrs], dim=-1)
    position = interp[0]
    normal = Fn.normalize(interp[1], dim=-1, eps=1e-20)
    if color_fn is not None and bool(covered.any()):
        cols = color_fn(position[covered])
        albedo = cols.new_zeros(*covered.shape, cols.shape[-1]).index_put((covered,), cols)
    elif color_fn is not None:
        # nothing covered: no colour query (some encoders reject empty batches)
        albedo = torch.zeros_like(position)
    elif vertex_colors is not None:
        albedo = interp[2]
    else:
        albedo = mask.expand(*covered.shape, 3)

    _, dirs = cameras.rays(height, width)
    bg = background(dirs.to(vertices)).to(albedo.dtype)
    rgb = albedo + (1.0 - mask.to(albedo.dtype)) * bg
    # one antialiasing pass for colour and mask together
    aa = antialias(torch.cat([rgb, mask.to(rgb.dtype)], dim=-1), frags, clip, faces)
    return {
        "albedo": albedo,
        "rgb": aa[..., :3],
        "opacity": aa[..., 3:].clamp(0.0, 1.0),
        "depth": frags.depth[..., None],
        "normal": normal,
        "position": position,
    }
