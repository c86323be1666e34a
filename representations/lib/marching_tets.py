"""Marching tetrahedra: a signed distance field sampled on a tet grid -> a triangle mesh.

Convention: ``sdf < 0`` is inside, ``sdf >= 0`` outside (a vertex exactly on the level set
counts as outside). Output faces are counter-clockwise seen from outside, so their right-hand
normals point outwards (towards increasing SDF), for tets listed with positive signed volume
(as :func:`representations.lib.tets.tet_grid` makes them).

Each output vertex is the zero crossing on one tet edge (a, b) whose endpoints have opposite
signs, linearly interpolated from the endpoint SDFs:
``p = (p_a * s_b - p_b * s_a) / (s_b - s_a)`` (its fraction along the edge kept within
[1e-3, 1 - 1e-3] by default, so a level set through a grid vertex cannot collapse triangles
to points). Crossings are found per unique edge, so the
tets on either side of a face share their vertices and a level set that stays inside the grid
gives a closed, watertight mesh. Only tets whose vertices' signs differ are processed.

Two backends: ``torch`` (here, runs everywhere) and ``kaolin``
(``kaolin.ops.conversions.marching_tetrahedra``, imported lazily); ``auto`` picks kaolin when
it imports and the tensors are on CUDA. The kaolin output is re-oriented to this module's
convention, so both give the same mesh up to vertex and face order.
"""

from __future__ import annotations

from itertools import combinations
from typing import List, Optional, Tuple

import torch
from torch import Tensor

BACKENDS = ("auto", "torch", "kaolin")

#: the 6 edges of a tet as pairs of local vertex indices
TET_EDGES: Tuple[Tuple[int, int], ...] = tuple(combinations(range(4), 2))


def _orient(tri: List[int], inside: List[int], ref: Tensor) -> List[int]:
    """Order the edge-triangle ``tri`` so its normal points away from the inside vertices
    of the reference tet ``ref`` [4, 3] (crossings at edge midpoints)."""
    mids = torch.stack([ref[list(TET_EDGES[e])].mean(0) for e in tri])
    normal = torch.cross(mids[1] - mids[0], mids[2] - mids[0], dim=0)
    outside = [v for v in range(4) if v not in inside]
    towards_out = ref[outside].mean(0) - ref[inside].mean(0)
    return tri if float(normal @ towards_out) > 0 else [tri[0], tri[2], tri[1]]


def _build_tables() -> Tuple[Tensor, Tensor]:
    """Triangle table [16, 2, 3] (local edge indices, -1 = no triangle) and triangle counts [16]
    for every inside-code (bit i set = local vertex i inside).

    Built once from geometry rather than typed in: orientation on a reference tet of positive
    volume holds for every positive tet, because an edge-triangle can never pass through the
    tet vertex it is oriented against while its corners slide along their edges.
    """
    ref = torch.tensor([[0.0, 0, 0], [1, 0, 0], [0, 1, 0], [0, 0, 1]], dtype=torch.float64)
    table = torch.full((16, 2, 3), -1, dtype=torch.long)
    counts = torch.zeros(16, dtype=torch.long)
    for code in range(16):
        inside = [v for v in range(4) if code >> v & 1]
        if len(inside) in (0, 4):
            continue
        cut = [e for e, (a, b) in enumerate(TET_EDGES) if (a in inside) != (b in inside)]
        if len(cut) == 3:
            tris = [cut]
        else:
            # 2 in / 2 out: the 4 cut edges form a quad; walk it so consecutive edges share a
            # tet vertex (and hence lie on a common tet face), then split it on a diagonal
            (i0, i1), outside = inside, [v for v in range(4) if v not in inside]
            o0, o1 = outside
            edge = {frozenset(p): e for e, p in enumerate(TET_EDGES)}
            quad = [edge[frozenset(p)] for p in ((i0, o0), (i0, o1), (i1, o1), (i1, o0))]
            tris = [quad[:3], [quad[0], quad[2], quad[3]]]
        for t, tri in enumerate(tris):
            table[code, t] = torch.tensor(_orient(tri, inside, ref))
        counts[code] = len(tris)
    return table, counts


TRIANGLE_TABLE, TRIANGLE_COUNTS = _build_tables()
_EDGES = torch.tensor(TET_EDGES, dtype=torch.long)                  # [6, 2]
#: default clamp of the crossing's fraction along an edge (see ``marching_tets``)
MIN_WEIGHT = 1e-3


def marching_tets(vertices: Tensor, tets: Tensor, sdf: Tensor, backend: str = "auto",
                  return_tet_idx: bool = False, min_weight: float = MIN_WEIGHT):
    """Extract the zero level set of ``sdf`` as a triangle mesh.

    Args:
        vertices: [V, 3] grid vertex positions (float).
        tets: [T, 4] long, positively oriented tets.
        sdf: [V] signed distance (< 0 inside).
        backend: ``auto`` | ``torch`` | ``kaolin``.
        return_tet_idx: also return the source tet of each face.
        min_weight: torch backend only: the crossing's fraction along its edge is clamped to
            [min_weight, 1 - min_weight] (no gradient to the SDF where clamped), so a level
            set through a grid vertex gives small, not degenerate, triangles. 0 disables.
    Returns:
        verts [M, 3] (dtype of ``vertices``), faces [F, 3] long (counter-clockwise seen from
        outside) and, with ``return_tet_idx``, tet_idx [F] long. Empty (M = F = 0) when the
        level set does not cross the grid. ``verts`` is differentiable with respect to
        ``vertices`` and ``sdf``; faces are integers.
    """
    if resolve_backend(backend, vertices) == "kaolin":
        out = _marching_tets_kaolin(vertices, tets, sdf)
    else:
        out = _marching_tets_torch(vertices, tets, sdf, min_weight)
    return out if return_tet_idx else out[:2]


def _marching_tets_torch(vertices: Tensor, tets: Tensor, sdf: Tensor, min_weight: float
                         ) -> Tuple[Tensor, Tensor, Tensor]:
    device = vertices.device
    n_verts = vertices.shape[0]
    with torch.no_grad():
        inside = (sdf.detach() < 0).to(torch.uint8)
        # the only O(T) work: gather one byte per tet corner and read each tet's 4 bytes as
        # one int32, which is 0 (all outside) or 0x01010101 (all inside) exactly when the
        # tet is not cut, whatever the byte order
        occ = inside[tets]                                                      # [T, 4]
        if occ.is_contiguous() and occ.shape[0] > 0:
            word = occ.view(torch.int32).squeeze(1)
            tet_idx = torch.nonzero((word != 0) & (word != 0x01010101)).squeeze(1)
        else:
            n_in = occ.sum(-1)
            tet_idx = torch.nonzero((n_in > 0) & (n_in < 4)).squeeze(1)
        code = (occ[tet_idx].long() << torch.arange(4, device=device)).sum(-1)  # [Tv]
        local = tets[tet_idx]                                                   # [Tv, 4]

        edges = local[:, _EDGES.to(device)]                                     # [Tv, 6, 2]
        bits = (code[:, None] >> torch.arange(4, device=device)) & 1            # [Tv, 4]
        eb = bits[:, _EDGES.to(device)]
        cut = eb[..., 0] != eb[..., 1]                                          # [Tv, 6]
        cut_edges = edges[cut]                                                  # [K, 2]
        lo = torch.minimum(cut_edges[:, 0], cut_edges[:, 1])
        hi = torch.maximum(cut_edges[:, 0], cut_edges[:, 1])
        keys, inverse = torch.unique(lo * n_verts + hi, return_inverse=True)
        edge_to_vert = torch.full((tet_idx.shape[0], 6), -1, dtype=torch.long, device=device)
        edge_to_vert[cut] = inverse

        tri = TRIANGLE_TABLE.to(device)[code]                                   # [Tv, 2, 3]
        has = TRIANGLE_COUNTS.to(device)[code][:, None] > torch.arange(2, device=device)
        rows = torch.arange(tet_idx.shape[0], device=device)[:, None, None].expand_as(tri)
        faces = edge_to_vert[rows[has], tri[has]]                               # [F, 3]
        face_tet = tet_idx[:, None].expand(-1, 2)[has]
        a, b = keys // n_verts, keys % n_verts

    s_a, s_b = sdf[a], sdf[b]
    # p = (p_a s_b - p_b s_a) / (s_b - s_a), written as p_a + w (p_b - p_a) so that w can be
    # kept off the edge's ends: a crossing exactly at a grid vertex would make several output
    # vertices coincide and their triangles degenerate (undefined normals, exploding gradients)
    w = (s_a / (s_a - s_b)).clamp(min_weight, 1.0 - min_weight).unsqueeze(-1)
    verts = vertices[a] + w * (vertices[b] - vertices[a])
    return verts, faces, face_tet


def _marching_tets_kaolin(vertices: Tensor, tets: Tensor, sdf: Tensor
                          ) -> Tuple[Tensor, Tensor, Tensor]:
    from kaolin.ops.conversions import marching_tetrahedra

    # kaolin treats sdf > 0 as occupied; its face winding follows its own table, so re-orient
    # every face against the inside vertices of the tet it came from
    verts, faces, tet_idx = marching_tetrahedra(vertices[None], tets, -sdf[None],
                                                return_tet_idx=True)
    verts, faces, tet_idx = verts[0], faces[0].long(), tet_idx[0].long()
    if faces.shape[0]:
        with torch.no_grad():
            v = verts.detach()
            tri = v[faces]
            normal = torch.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0], dim=-1)
            corner = vertices.detach()[tets[tet_idx]]                          # [F, 4, 3]
            w_in = (sdf.detach()[tets[tet_idx]] < 0).to(v.dtype)[..., None]
            c_in = (corner * w_in).sum(1) / w_in.sum(1)
            c_out = (corner * (1 - w_in)).sum(1) / (1 - w_in).sum(1)
            flip = (normal * (c_out - c_in)).sum(-1) < 0
            faces = torch.where(flip[:, None], faces[:, [0, 2, 1]], faces)
    return verts, faces, tet_idx


def resolve_backend(backend: str, like: Optional[Tensor] = None) -> str:
    """``auto`` -> ``kaolin`` when it imports and ``like`` is on CUDA, else ``torch``."""
    if backend not in BACKENDS:
        raise ValueError(f"marching tets backend '{backend}' is not one of {BACKENDS}")
    if backend != "auto":
        return backend
    on_cuda = like is not None and like.is_cuda
    return "kaolin" if on_cuda and _kaolin_available() else "torch"


_KAOLIN: Optional[bool] = None


def _kaolin_available() -> bool:
    global _KAOLIN
    if _KAOLIN is None:
        try:
            from kaolin.ops.conversions import marching_tetrahedra  # noqa: F401
            _KAOLIN = True
        except Exception:
            _KAOLIN = False
    return _KAOLIN
