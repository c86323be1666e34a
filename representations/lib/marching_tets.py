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

A tet with two corners inside and two outside cuts a quad, split into two triangles along one
of its diagonals. The diagonal lies inside the tet (never on a tet face), so the choice is
per tet and keeps the mesh watertight; it is a discrete, gradient-free decision made on the
interpolated (detached) vertex positions, the vertices themselves stay differentiable.
``diagonal`` picks it: ``angle`` (default) the diagonal whose two triangles have the larger
smallest angle (the Delaunay-like choice), ``shorter`` / ``longer`` by length, ``fixed`` the
one the triangle table lists (the crossings on edges (i0, o0) and (i1, o1); the behaviour
before the choice existed, and the cheapest). ``angle`` is the default because slivers are
what hurt (normals, rasterised gradients, UV atlases) and it maximises exactly the smallest
angle, at the cost of a few more elementwise ops than ``shorter``. Measured on a sphere of
radius 0.6 with N(0, 0.005^2) noise on its SDF at grid 64 (43228 faces), faces under 5 degrees
/ median smallest angle: fixed 2943 / 29.6, longer 3136 / 28.8, shorter 2278 / 32.2, angle
2213 / 32.2; forward and forward + backward cost 1-3 ms (5-15%) more than ``fixed`` on the cut
cells' tets, one thread (benchmarks/bench_marching_tets.py).

Two backends: ``torch`` (here, runs everywhere) and ``kaolin``
(``kaolin.ops.conversions.marching_tetrahedra``, imported lazily); ``auto`` picks kaolin when
it imports and the tensors are on CUDA. The kaolin output is re-oriented to this module's
convention and its quads re-split by the same ``diagonal`` rule, so both give the same mesh up
to vertex and face order (with ``fixed``, up to the diagonal of each quad: kaolin's table has
its own).
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


def _build_tables() -> Tuple[Tensor, Tensor, Tensor]:
    """Triangle table [32, 2, 3] (local edge indices, -1 = no triangle), triangle counts [16]
    and quad table [16, 4] for every inside-code (bit i set = local vertex i inside).

    Rows 0-15 of the triangle table split a quad (2 inside, 2 outside) along the diagonal
    from quad corner 0 to corner 2, rows 16-31 (code + 16) along the one from corner 1 to
    corner 3; the two halves are equal for the other codes. The quad table lists the quad's
    4 cut edges in cycle order (-1 for codes without a quad).

    Built once from geometry rather than typed in: orientation on a reference tet of positive
    volume holds for every positive tet, because an edge-triangle can never pass through the
    tet vertex it is oriented against while its corners slide along their edges.
    """
    ref = torch.tensor([[0.0, 0, 0], [1, 0, 0], [0, 1, 0], [0, 0, 1]], dtype=torch.float64)
    table = torch.full((32, 2, 3), -1, dtype=torch.long)
    counts = torch.zeros(16, dtype=torch.long)
    quads = torch.full((16, 4), -1, dtype=torch.long)
    for code in range(16):
        inside = [v for v in range(4) if code >> v & 1]
        if len(inside) in (0, 4):
            continue
        cut = [e for e, (a, b) in enumerate(TET_EDGES) if (a in inside) != (b in inside)]
        if len(cut) == 3:
            splits = [[cut], [cut]]
        else:
            # 2 in / 2 out: the 4 cut edges form a quad; walk it so consecutive edges share a
            # tet vertex (and hence lie on a common tet face), then split it on a diagonal
            (i0, i1), outside = inside, [v for v in range(4) if v not in inside]
            o0, o1 = outside
            edge = {frozenset(p): e for e, p in enumerate(TET_EDGES)}
            quad = [edge[frozenset(p)] for p in ((i0, o0), (i0, o1), (i1, o1), (i1, o0))]
            quads[code] = torch.tensor(quad)
            q0, q1, q2, q3 = quad
            splits = [[[q0, q1, q2], [q0, q2, q3]], [[q0, q1, q3], [q1, q2, q3]]]
        for half, tris in enumerate(splits):
            for t, tri in enumerate(tris):
                table[code + 16 * half, t] = torch.tensor(_orient(tri, inside, ref))
        counts[code] = len(splits[0])
    return table, counts, quads


_TABLES = _build_tables()
#: [16, 2, 3]: the triangles of each inside-code, quads split along the table's diagonal
TRIANGLE_TABLE = _TABLES[0][:16]
#: [16, 2, 3]: the same with quads split along the other diagonal
TRIANGLE_TABLE_OTHER = _TABLES[0][16:]
TRIANGLE_COUNTS = _TABLES[1]
#: [16, 4]: the quad's cut edges in cycle order (-1: no quad)
QUAD_EDGES = _TABLES[2]
_EDGES = torch.tensor(TET_EDGES, dtype=torch.long)                  # [6, 2]
#: default clamp of the crossing's fraction along an edge (see ``marching_tets``)
MIN_WEIGHT = 1e-3
#: rules for the diagonal a quad is split along (see the module doc)
DIAGONALS = ("angle", "shorter", "longer", "fixed")


def marching_tets(vertices: Tensor, tets: Tensor, sdf: Tensor, backend: str = "auto",
                  return_tet_idx: bool = False, min_weight: float = MIN_WEIGHT,
                  diagonal: str = "angle"):
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
        diagonal: how a tet's quad (2 corners inside, 2 outside) is split: ``angle`` |
            ``shorter`` | ``longer`` | ``fixed`` (module doc); with kaolin, ``fixed`` is
            kaolin's table's diagonal and the others re-split its quads.
    Returns:
        verts [M, 3] (dtype of ``vertices``), faces [F, 3] long (counter-clockwise seen from
        outside) and, with ``return_tet_idx``, tet_idx [F] long. Empty (M = F = 0) when the
        level set does not cross the grid. ``verts`` is differentiable with respect to
        ``vertices`` and ``sdf``; faces are integers.
    """
    if diagonal not in DIAGONALS:
        raise ValueError(f"marching tets diagonal '{diagonal}' is not one of {DIAGONALS}")
    if resolve_backend(backend, vertices) == "kaolin":
        out = _marching_tets_kaolin(vertices, tets, sdf, diagonal)
    else:
        out = _marching_tets_torch(vertices, tets, sdf, min_weight, diagonal)
    return out if return_tet_idx else out[:2]


def _marching_tets_torch(vertices: Tensor, tets: Tensor, sdf: Tensor, min_weight: float,
                         diagonal: str = "angle") -> Tuple[Tensor, Tensor, Tensor]:
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
        a, b = keys // n_verts, keys % n_verts

    s_a, s_b = sdf[a], sdf[b]
    # p = (p_a s_b - p_b s_a) / (s_b - s_a), written as p_a + w (p_b - p_a) so that w can be
    # kept off the edge's ends: a crossing exactly at a grid vertex would make several output
    # vertices coincide and their triangles degenerate (undefined normals, exploding gradients)
    w = (s_a / (s_a - s_b)).clamp(min_weight, 1.0 - min_weight).unsqueeze(-1)
    verts = vertices[a] + w * (vertices[b] - vertices[a])

    with torch.no_grad():
        counts = TRIANGLE_COUNTS.to(device)[code]                               # [Tv]
        row = code
        if diagonal != "fixed":
            # the split of each quad: a discrete choice on the detached crossings, so the
            # output vertices (and their gradients) are the same whichever diagonal is taken
            # (index_select / gather: several times faster than advanced indexing on a CPU)
            q_rows = torch.nonzero(counts == 2).squeeze(1)
            q_edges = QUAD_EDGES.to(device).index_select(0, code.index_select(0, q_rows))
            corners = edge_to_vert.index_select(0, q_rows).gather(1, q_edges)     # [Q, 4]
            # coordinate-major [3, 4, Q]: each step below is one pass over Q contiguous values
            quad_xyz = verts.detach().T.contiguous().index_select(
                1, corners.T.reshape(-1)).view(3, 4, -1)
            other = _prefer_other_diagonal(quad_xyz, diagonal)                  # [Q]
            row = code.index_add(0, q_rows, other.long() << 4)
        tri = _TABLES[0].to(device)[row]                                        # [Tv, 2, 3]
        has = counts[:, None] > torch.arange(2, device=device)
        rows = torch.arange(tet_idx.shape[0], device=device)[:, None, None].expand_as(tri)
        faces = edge_to_vert[rows[has], tri[has]]                               # [F, 3]
        face_tet = tet_idx[:, None].expand(-1, 2)[has]
    return verts, faces, face_tet


def _prefer_other_diagonal(p: Tensor, rule: str) -> Tensor:
    """For quads p [3, 4, Q] (coordinate, corner in cycle order, quad): True where ``rule``
    prefers the diagonal 1-3 to the diagonal 0-2 (ties keep 0-2, the table's).

    ``angle`` compares the smaller of the two triangles' minimum angles through the squared
    sine of the minimum angle, 4 area^2 / (product of the two longer sides^2) (the minimum
    angle is at most 60 degrees, where sine is increasing, so this orders the angles exactly,
    with no trigonometry and no square roots).
    """
    dev, n = p.device, p.shape[-1]
    vec = p.index_select(1, _SEG_HEAD.to(dev)) - p.index_select(1, _SEG_TAIL.to(dev))  # [3,6,Q]
    length2 = (vec * vec).sum(0)                                          # [6, Q]
    if rule == "shorter":
        return length2[5] < length2[4]
    if rule == "longer":
        return length2[5] > length2[4]
    # the triangles 012, 023 (diagonal 02) and 013, 123 (diagonal 13): twice their areas as
    # cross products of two of their sides, and the squared lengths of their three sides,
    # over the squared diagonals' sum so that float32 stays far from underflow on fine grids
    tiny = torch.finfo(p.dtype).tiny
    scale = (length2[4] + length2[5]).clamp_min(tiny)
    u, v = vec.index_select(1, _TRI_U.to(dev)), vec.index_select(1, _TRI_V.to(dev))  # [3,4,Q]
    cx = u[1] * v[2] - u[2] * v[1]
    cy = u[2] * v[0] - u[0] * v[2]
    cz = u[0] * v[1] - u[1] * v[0]
    area2 = (cx * cx + cy * cy + cz * cz) / (scale * scale)               # [4, Q]
    sides = (length2 / scale).index_select(0, _TRI_SIDES.to(dev).view(-1)).view(4, 3, n)
    # sin^2 of the smallest angle (opposite the shortest side): (2 A)^2 / (other two)^2
    sin2 = area2 * sides.amin(1) / sides.prod(1).clamp_min(tiny)
    return sin2[2:].amin(0) > sin2[:2].amin(0)


#: quad segments (head - tail): sides 01, 12, 23, 30, diagonals 02, 13
_SEG_HEAD = torch.tensor([1, 2, 3, 0, 2, 3])
_SEG_TAIL = torch.tensor([0, 1, 2, 3, 0, 1])
#: per triangle 012, 023, 013, 123: two of its sides (segment indices) and all three
_TRI_U = torch.tensor([0, 4, 0, 1])
_TRI_V = torch.tensor([4, 3, 3, 5])
_TRI_SIDES = torch.tensor([[0, 1, 4], [4, 2, 3], [0, 5, 3], [1, 2, 5]])


def triangle_min_angles(verts: Tensor, faces: Tensor) -> Tensor:
    """The smallest interior angle of each triangle, in degrees [F] (0 for a degenerate one);
    a mesh-quality statistic (no gradient)."""
    with torch.no_grad():
        p = verts.detach()[faces]                                 # [F, 3, 3]
        u = torch.roll(p, -1, dims=1) - p                         # edge leaving each corner
        v = torch.roll(p, 1, dims=1) - p                          # edge arriving, reversed
        sin = torch.cross(u, v, dim=-1).norm(dim=-1)
        cos = (u * v).sum(-1)
        return torch.rad2deg(torch.atan2(sin, cos)).min(-1).values


def _marching_tets_kaolin(vertices: Tensor, tets: Tensor, sdf: Tensor, diagonal: str = "angle"
                          ) -> Tuple[Tensor, Tensor, Tensor]:
    from kaolin.ops.conversions import marching_tetrahedra

    # kaolin treats sdf > 0 as occupied; its face winding follows its own table, so re-orient
    # every face against the inside vertices of the tet it came from
    verts, faces, tet_idx = marching_tetrahedra(vertices[None], tets, -sdf[None],
                                                return_tet_idx=True)
    verts, faces, tet_idx = verts[0], faces[0].long(), tet_idx[0].long()
    if faces.shape[0]:
        with torch.no_grad():
            if diagonal != "fixed":
                faces = _resplit_quads(verts.detach(), faces, tet_idx, diagonal)
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


def _resplit_quads(verts: Tensor, faces: Tensor, tet_idx: Tensor, rule: str) -> Tensor:
    """Faces [F, 3] with each quad (the two faces of one tet, in any order and winding) split
    along the diagonal ``rule`` prefers; the other faces and the face order are kept, the
    windings of re-split quads follow the first face's (re-orient them afterwards)."""
    order = torch.argsort(tet_idx, stable=True)
    pair = torch.nonzero(tet_idx[order[1:]] == tet_idx[order[:-1]]).squeeze(1)
    if pair.numel() == 0:
        return faces
    first, second = order[pair], order[pair + 1]
    f1, f2 = faces[first], faces[second]                                      # [Q, 3]
    # f1 = (a, b, c) rotated so that b is its corner off the shared edge a-c, d is f2's
    own1 = ~(f1[:, :, None] == f2[:, None, :]).any(-1)                        # [Q, 3]
    own2 = ~(f2[:, :, None] == f1[:, None, :]).any(-1)
    j = own1.long().argmax(-1)
    rows = torch.arange(f1.shape[0], device=faces.device)
    a, b, c = f1[rows, (j + 2) % 3], f1[rows, j], f1[rows, (j + 1) % 3]
    d = f2[rows, own2.long().argmax(-1)]
    cycle = torch.stack([a, b, c, d], dim=0)                                  # [4, Q]
    other = _prefer_other_diagonal(verts.T.contiguous()[:, cycle], rule)
    faces = faces.clone()
    faces[first[other]] = torch.stack([a, b, d], dim=-1)[other]
    faces[second[other]] = torch.stack([b, c, d], dim=-1)[other]
    return faces


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
