"""Regularisers of a mesh with fixed topology (library): the uniform Laplacian of a per-vertex
field, normal consistency of adjacent faces and the total variation of a texture.

The topology (edges, adjacent face pairs) is computed once by :func:`mesh_topology` and
reused every step, as the ``textured-mesh`` representation's faces never change. All losses
are scalars, differentiable with respect to the field / vertices / texture.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as Fn
from torch import Tensor


@dataclass
class MeshTopology:
    src: Tensor          # [2E] long: both directions of every unique edge
    dst: Tensor          # [2E] long
    degree: Tensor       # [V] float: neighbours of each vertex
    face_pairs: Tensor   # [P, 2] long: faces sharing an edge


def mesh_topology(faces: Tensor, n_vertices: int) -> MeshTopology:
    """Edges and adjacent face pairs of ``faces`` [F, 3] (long) over ``n_vertices``."""
    faces = faces.long()
    edges = faces[:, [0, 1, 1, 2, 2, 0]].reshape(-1, 2)
    sorted_edges = torch.sort(edges, dim=1).values
    unique = torch.unique(sorted_edges, dim=0)
    src = torch.cat([unique[:, 0], unique[:, 1]])
    dst = torch.cat([unique[:, 1], unique[:, 0]])
    degree = torch.zeros(n_vertices, device=faces.device).index_add(
        0, src, torch.ones(src.shape[0], device=faces.device))
    # pairs of faces sharing an edge: sort the 3F edge keys, neighbours with equal keys
    key = sorted_edges[:, 0] * (n_vertices + 1) + sorted_edges[:, 1]
    order = torch.argsort(key)
    key, face_of = key[order], (torch.arange(edges.shape[0], device=faces.device) // 3)[order]
    same = key[1:] == key[:-1]
    pairs = torch.stack([face_of[:-1][same], face_of[1:][same]], dim=1)
    return MeshTopology(src, dst, degree, pairs)


def uniform_laplacian(values: Tensor, topo: MeshTopology) -> Tensor:
    """Mean over vertices with neighbours of || mean(values of neighbours) - value ||^2.

    ``values`` [V, C] (e.g. vertex offsets): 0 for a constant field (zero offsets among them),
    positive for any field that differs between neighbours.
    """
    used = topo.degree > 0
    if not bool(used.any()):
        return values.sum() * 0.0
    total = torch.zeros_like(values).index_add(0, topo.src, values[topo.dst])
    delta = total[used] / topo.degree[used, None].to(values) - values[used]
    return delta.pow(2).sum(-1).mean()


def normal_consistency(vertices: Tensor, faces: Tensor, topo: MeshTopology) -> Tensor:
    """Mean (1 - cos) of the angle between the normals of faces sharing an edge."""
    if topo.face_pairs.shape[0] == 0:
        return vertices.sum() * 0.0
    p = vertices[faces]
    n = Fn.normalize(torch.cross(p[:, 1] - p[:, 0], p[:, 2] - p[:, 0], dim=-1), dim=-1,
                     eps=1e-12)
    return (1.0 - (n[topo.face_pairs[:, 0]] * n[topo.face_pairs[:, 1]]).sum(-1)).mean()


def texture_tv(texture: Tensor, used: Tensor, eps: float = 1e-3) -> Tensor:
    """Total variation of ``texture`` [T, T, C] between 4-neighbour texels both inside a UV
    chart (``used`` [T, T] bool): mean of sqrt(|t_a - t_b|^2 + eps^2) - eps (a smooth L1,
    0 for a constant texture; it flattens grain and keeps colour edges sharper than L2)."""
    dy = texture[1:] - texture[:-1]
    dx = texture[:, 1:] - texture[:, :-1]
    my = used[1:] & used[:-1]
    mx = used[:, 1:] & used[:, :-1]
    parts = []
    if bool(my.any()):
        parts.append((dy[my].pow(2).sum(-1) + eps * eps).sqrt() - eps)
    if bool(mx.any()):
        parts.append((dx[mx].pow(2).sum(-1) + eps * eps).sqrt() - eps)
    if not parts:
        return texture.sum() * 0.0
    return torch.cat(parts).mean()


@torch.no_grad()
def harmonic_fill(values: Tensor, known: Tensor, topo: MeshTopology,
                  iterations: int = 200) -> Tensor:
    """Fill a per-vertex field where it is unknown: ``values`` [V, C] are kept where ``known``
    [V] (bool); each other vertex becomes the mean of its neighbours, repeated ``iterations``
    times (Jacobi steps towards the harmonic interpolation of the known values), starting
    from the mean of the known values. Vertices no known value reaches keep that mean. Not
    differentiable. With nothing known, ``values`` is returned as it is."""
    if not bool(known.any()) or bool(known.all()):
        return values.clone()
    out = torch.where(known[:, None], values, values[known].mean(0, keepdim=True))
    deg = topo.degree.to(values).clamp_min(1.0)[:, None]
    for _ in range(iterations):
        avg = torch.zeros_like(out).index_add(0, topo.src, out[topo.dst]) / deg
        out = torch.where(known[:, None] | (topo.degree[:, None] == 0), out, avg)
    return out
