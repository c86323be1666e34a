"""The toy world's objects: primitives and 16 kinds of small compositions, coloured from a
named palette, in the engine's z-up frame with a front facing +x (see
:mod:`engine.datasets.toy_world`, which renders them into a multi-view dataset)."""

from __future__ import annotations

import math
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import trimesh

#: named colours (linear RGB albedo in [0, 1]); captions use the names
PALETTE: Dict[str, Tuple[float, float, float]] = {
    "red": (0.85, 0.13, 0.12),
    "green": (0.18, 0.68, 0.22),
    "blue": (0.14, 0.32, 0.86),
    "yellow": (0.96, 0.84, 0.12),
    "orange": (0.97, 0.50, 0.08),
    "purple": (0.55, 0.22, 0.76),
    "grey": (0.74, 0.74, 0.76),
    "brown": (0.50, 0.30, 0.14),
    "pink": (0.96, 0.52, 0.72),
    "cyan": (0.12, 0.74, 0.80),
}
COLOR_NAMES = tuple(PALETTE)

#: the farthest point of every object from the origin
OBJECT_RADIUS = 0.8
SMOOTH_ANGLE = math.radians(40.0)   # edges sharper than this are shaded flat


# ---------------------------------------------------------------------------------------
# primitives (natural units; the object is normalised afterwards)
# ---------------------------------------------------------------------------------------

def _move(mesh: trimesh.Trimesh, at=(0.0, 0.0, 0.0), ry: float = 0.0, rx: float = 0.0,
          pivot=(0.0, 0.0, 0.0)) -> trimesh.Trimesh:
    """Rotate about x then y (degrees; +ry tilts +z towards +x) around ``pivot``, then move."""
    m = trimesh.transformations
    rot = m.rotation_matrix(math.radians(ry), [0, 1, 0]) @ m.rotation_matrix(math.radians(rx),
                                                                               [1, 0, 0])
    pivot = np.asarray(pivot, dtype=float)
    tf = m.translation_matrix(np.asarray(at, float) + pivot) @ rot @ m.translation_matrix(-pivot)
    mesh.apply_transform(tf)
    return mesh


def box(ext, at=(0, 0, 0)) -> trimesh.Trimesh:
    """Box with extents ``ext`` centred at ``at``."""
    return _move(trimesh.creation.box(extents=ext), at)


def cylinder(r, h, at=(0, 0, 0), sections=28) -> trimesh.Trimesh:
    """Vertical cylinder centred at ``at``."""
    return _move(trimesh.creation.cylinder(radius=r, height=h, sections=sections), at)


def cone(r, h, base=(0, 0, 0), sections=28) -> trimesh.Trimesh:
    """Cone with its base centred at ``base`` and its apex ``h`` above."""
    return _move(trimesh.creation.cone(radius=r, height=h, sections=sections), base)


def sphere(r, at=(0, 0, 0), subdivisions=2) -> trimesh.Trimesh:
    m = trimesh.creation.icosphere(subdivisions=subdivisions, radius=r)
    return _move(m, at)


def solid_of_revolution(profile, sections=28) -> trimesh.Trimesh:
    """Closed solid from (radius, z) points running from the axis at the bottom to the
    axis at the top."""
    return trimesh.creation.revolve(np.asarray(profile, dtype=float), sections=sections)


# ---------------------------------------------------------------------------------------
# kinds: rng -> (parts [(mesh, colour slot)], display name, number of colour slots)
# ---------------------------------------------------------------------------------------

Parts = List[Tuple[trimesh.Trimesh, int]]
_BUILDERS: Dict[str, Tuple[str, int, Callable[[np.random.Generator], Parts]]] = {}


def _kind(name: str, display: str, slots: int):
    def deco(fn):
        _BUILDERS[name] = (display, slots, fn)
        return fn
    return deco


@_kind("box", "box", 1)
def _box(rng):
    return [(box(rng.uniform([0.5, 0.5, 0.35], [1.0, 1.0, 1.0])), 0)]


@_kind("ball", "ball", 1)
def _ball(rng):
    m = sphere(1.0, subdivisions=3)
    m.apply_scale([1.0, 1.0, rng.uniform(0.75, 1.1)])
    return [(m, 0)]


@_kind("cylinder", "cylinder", 1)
def _cylinder(rng):
    return [(cylinder(rng.uniform(0.25, 0.6), rng.uniform(0.5, 1.4), sections=32), 0)]


@_kind("cone", "cone", 1)
def _cone(rng):
    return [(cone(rng.uniform(0.3, 0.6), rng.uniform(0.6, 1.4), sections=32), 0)]


@_kind("capsule", "capsule", 1)
def _capsule(rng):
    r = rng.uniform(0.2, 0.4)
    return [(trimesh.creation.capsule(height=rng.uniform(0.3, 1.0), radius=r,
                                      count=[16, 10]), 0)]


@_kind("ring", "ring", 1)
def _ring(rng):
    # standing, facing +x: the front view looks through the hole, a side view sees a bar
    m = trimesh.creation.torus(0.5, rng.uniform(0.1, 0.2), major_sections=32, minor_sections=12)
    return [(_move(m, ry=90.0), 0)]


@_kind("vase", "vase", 1)
def _vase(rng):
    h = rng.uniform(0.8, 1.3)
    radii = rng.uniform([0.18, 0.25, 0.12, 0.12], [0.3, 0.45, 0.25, 0.28])
    # a smooth profile through the random radii (cosine-interpolated)
    zz = np.linspace(0.0, h, 13)
    idx = np.minimum((zz / h * 3).astype(int), 2)
    t = zz / h * 3 - idx
    w = 0.5 - 0.5 * np.cos(np.pi * t)
    rr = radii[idx] * (1 - w) + radii[idx + 1] * w
    profile = [(0.0, 0.0)] + list(zip(rr, zz)) + [(0.0, h)]
    return [(solid_of_revolution(profile), 0)]


def _legs(rx, ry, r, h, top_z):
    """Four vertical legs at (+-rx, +-ry) reaching from the floor into the part above."""
    return [cylinder(r, h + 0.02, (sx * rx, sy * ry, top_z - (h + 0.02) / 2 + 0.02), 12)
            for sx in (-1, 1) for sy in (-1, 1)]


@_kind("table", "table", 2)
def _table(rng):
    dx, dy = rng.uniform(0.6, 0.9), rng.uniform(0.95, 1.4)
    t, h, r = rng.uniform(0.05, 0.1), rng.uniform(0.5, 0.8), rng.uniform(0.035, 0.06)
    legs = _legs(dx / 2 - 2 * r, dy / 2 - 2 * r, r, h, h)
    return [(box([dx, dy, t], (0, 0, h + t / 2)), 0), (trimesh.util.concatenate(legs), 1)]


@_kind("chair", "chair", 2)
def _chair(rng):
    s, t, h = rng.uniform(0.5, 0.7), rng.uniform(0.06, 0.1), rng.uniform(0.45, 0.6)
    r, back_h, back_t = rng.uniform(0.03, 0.05), rng.uniform(0.45, 0.75), rng.uniform(0.05, 0.09)
    legs = _legs(s / 2 - 1.5 * r, s / 2 - 1.5 * r, r, h, h)
    # the back stands at -x, so the chair faces +x; it is inset a little so that no face
    # of it is coplanar with the seat's (booleans of coplanar faces leave slivers)
    back = box([back_t, 0.96 * s, back_h + 0.02],
               (-s / 2 + back_t / 2 + 0.01, 0, h + t + back_h / 2 - 0.01))
    return [(box([s, s, t], (0, 0, h + t / 2)), 0), (back, 0),
            (trimesh.util.concatenate(legs), 1)]


@_kind("mushroom", "mushroom", 2)
def _mushroom(rng):
    sr, sh = rng.uniform(0.1, 0.18), rng.uniform(0.4, 0.7)
    cr, squash, tilt = rng.uniform(0.35, 0.55), rng.uniform(0.5, 0.9), rng.uniform(12, 25)
    a = np.linspace(0.0, np.pi / 2, 10)
    cap = solid_of_revolution([(0.0, 0.0)] + list(zip(cr * np.cos(a), cr * squash * np.sin(a)))
                              + [(0.0, cr * squash)])
    # the cap leans towards +x, about the top of the stem
    cap = _move(cap, (0, 0, sh - 0.04), ry=tilt)
    return [(cap, 0), (cylinder(sr, sh, (0, 0, sh / 2)), 1)]


@_kind("snowman", "snowman", 2)
def _snowman(rng):
    r0 = rng.uniform(0.35, 0.45)
    radii = [r0, r0 * rng.uniform(0.65, 0.8)]
    if rng.random() < 0.5:
        radii.append(radii[1] * rng.uniform(0.65, 0.8))
    parts, z = [], 0.0
    for i, r in enumerate(radii):
        # neighbouring balls overlap by a quarter of their radii
        z = r if i == 0 else z + 0.75 * (radii[i - 1] + r)
        parts.append((sphere(r, (0, 0, z)), 0))
    head = radii[-1]
    nose_r, nose_l = rng.uniform(0.05, 0.08), rng.uniform(0.2, 0.32)
    # the nose points at +x from inside the head
    nose = _move(cone(nose_r, nose_l + 0.5 * head), (0.5 * head, 0, z), ry=90.0)
    return parts + [(nose, 1)]


@_kind("lamp", "lamp", 2)
def _lamp(rng):
    br, bh = rng.uniform(0.22, 0.32), rng.uniform(0.05, 0.08)
    pr, ph = rng.uniform(0.025, 0.04), rng.uniform(0.7, 1.0)
    arm = rng.uniform(0.25, 0.4)
    sr0, sr1, sh = rng.uniform(0.07, 0.1), rng.uniform(0.16, 0.24), rng.uniform(0.15, 0.25)
    base = cylinder(br, bh, (0, 0, bh / 2))
    pole = cylinder(pr, ph, (0, 0, bh + ph / 2 - 0.01), 12)
    # the arm reaches to +x from the pole's top and holds a downward shade; it is thinner
    # than the pole (equal radii would make the two surfaces tangent, which booleans dislike)
    ar, top = 0.75 * pr, bh + ph - pr
    arm_m = _move(cylinder(ar, arm + pr, (0, 0, 0), 12), (arm / 2, 0, top), ry=90.0)
    shade = solid_of_revolution([(0.0, 0.0), (sr1, 0.0), (sr0, sh), (0.0, sh)])
    # (the shade's top cuts the arm between two of its vertex rings: no degenerate cut)
    shade = _move(shade, (arm, 0, top - sh + 0.4 * ar))
    return [(base, 1), (pole, 1), (arm_m, 1), (shade, 0)]


@_kind("lshape", "L-shaped block", 2)
def _lshape(rng):
    w, d, h, arm = (rng.uniform(0.25, 0.4), rng.uniform(0.25, 0.5), rng.uniform(0.8, 1.2),
                    rng.uniform(0.5, 0.9))
    ah = rng.uniform(0.6, 1.0) * w
    column = box([w, d, h], (0, 0, h / 2))
    # the arm lies along +x at the foot of the column
    arm_m = box([arm + 0.02, 0.9 * d, ah], (w / 2 + arm / 2 - 0.01, 0, ah / 2 + 0.01))
    return [(column, 0), (arm_m, 1)]


@_kind("mug", "mug", 2)
def _mug(rng):
    r, h = rng.uniform(0.28, 0.4), rng.uniform(0.55, 0.9)
    hr, ht = rng.uniform(0.14, 0.2) * h / 0.6, rng.uniform(0.035, 0.05)
    hr = min(hr, 0.45 * h - ht)
    body = cylinder(r, h, (0, 0, h / 2), 32)
    # handle on +y: the front view shows it on the right
    handle = trimesh.creation.torus(hr, ht, major_sections=24, minor_sections=8)
    handle = _move(handle, (0, r + 0.2 * hr, h / 2), ry=90.0)
    return [(body, 0), (handle, 1)]


@_kind("house", "house", 2)
def _house(rng):
    bx, by, bz = rng.uniform(0.6, 0.9), rng.uniform(0.8, 1.2), rng.uniform(0.45, 0.75)
    rh, o = rng.uniform(0.3, 0.55), rng.uniform(0.03, 0.08)
    body = box([bx, by, bz], (0, 0, bz / 2))
    zb = bz - 0.01
    pts = [(sx * (bx / 2 + o), sy * (by / 2 + o), zb) for sx in (-1, 1) for sy in (-1, 1)]
    pts += [(0.0, sy * (by / 2 + o), zb + rh) for sy in (-1, 1)]
    roof = trimesh.convex.convex_hull(np.array(pts))
    dw, dh = rng.uniform(0.18, 0.26), rng.uniform(0.3, 0.42) * bz / 0.6
    # the door is on the +x wall: the house faces +x
    door = box([0.06, dw, dh], (bx / 2, 0, dh / 2 + 0.02))
    return [(body, 0), (roof, 1), (door, 1)]


@_kind("tree", "tree", 2)
def _tree(rng):
    tr, th = rng.uniform(0.07, 0.12), rng.uniform(0.3, 0.5)
    trunk = cylinder(tr, th + 0.05, (0, 0, (th + 0.05) / 2), 16)
    if rng.random() < 0.5:
        crown = cone(rng.uniform(0.35, 0.5), rng.uniform(0.7, 1.0), (0, 0, th))
    else:
        cr = rng.uniform(0.35, 0.5)
        crown = sphere(cr, (0, 0, th + 0.85 * cr))
    return [(crown, 0), (trunk, 1)]


KINDS: List[str] = list(_BUILDERS)
# colour preferences that make some kinds look like themselves (slot -> (name, probability))
_PREFERRED = {"tree": {0: ("green", 0.6), 1: ("brown", 0.6)},
              "snowman": {0: ("grey", 0.5), 1: ("orange", 0.5)},
              "mushroom": {1: ("grey", 0.5)}}
_SAME_COLOUR_P = 0.25    # two-slot kinds painted in one colour
_ATTEMPTS = 5


def _pick_colours(rng: np.random.Generator, kind: str, slots: int) -> List[str]:
    names: List[str] = []
    for slot in range(slots):
        pref = _PREFERRED.get(kind, {}).get(slot)
        if slot == 1 and rng.random() < _SAME_COLOUR_P:
            names.append(names[0])
            continue
        if pref and rng.random() < pref[1] and pref[0] not in names:
            names.append(pref[0])
            continue
        choices = [c for c in COLOR_NAMES if c not in names]
        names.append(choices[int(rng.integers(len(choices)))])
    return names


def display_name(kind: str) -> str:
    """The class name captions use for ``kind`` ("lshape" -> "L-shaped block")."""
    return _BUILDERS[kind][0]


def caption_for(display: str, colours: Sequence[str]) -> str:
    """"a red table", "an orange and blue snowman"."""
    unique = list(dict.fromkeys(colours))
    words = " and ".join(unique)
    article = "an" if words[0] in "aeiou" else "a"
    return f"{article} {words} {display}"


# ---------------------------------------------------------------------------------------
# objects
# ---------------------------------------------------------------------------------------

def _union(meshes: List[trimesh.Trimesh]) -> Optional[trimesh.Trimesh]:
    """Boolean union of closed meshes (pymeshlab); None on failure. Each vertex takes the
    colour of the nearest part vertex, so colours stay palette colours (vertices made on the
    intersection curves take either side's)."""
    # Booleans dominate the generation time: first gather parts whose bounding boxes are
    # apart into one mesh each (greedy colouring of the overlap graph), so a snowman or a
    # lamp needs one union instead of three.
    bins: List[List[trimesh.Trimesh]] = []
    for m in meshes:
        lo, hi = m.bounds
        for b in bins:
            if all(np.any(lo > o.bounds[1] + 1e-6) or np.any(hi < o.bounds[0] - 1e-6)
                   for o in b):
                b.append(m)
                break
        else:
            bins.append([m])
    meshes = [trimesh.util.concatenate(b) if len(b) > 1 else b[0] for b in bins]
    if len(meshes) == 1:
        return meshes[0].copy()
    import pymeshlab

    from scipy.spatial import cKDTree

    ms = pymeshlab.MeshSet()
    for m in meshes:
        ms.add_mesh(pymeshlab.Mesh(np.asarray(m.vertices, np.float64),
                                   np.asarray(m.faces, np.int32)))
    current = 0
    try:
        for k in range(1, len(meshes)):
            ms.generate_boolean_union(first_mesh=current, second_mesh=k)
            current = ms.current_mesh_id()
    except pymeshlab.PyMeshLabException:
        return None
    out = ms.mesh(current)
    # The exact union leaves coincident vertices and zero-area slivers along the cut
    # curves. Snap to the precision mesh.obj keeps, merge, drop the slivers: the file then
    # reloads (trimesh merges duplicates on load) as the same watertight mesh.
    verts = np.round(out.vertex_matrix(), 7)
    mesh = trimesh.Trimesh(verts, out.face_matrix(), process=False)
    mesh.merge_vertices()
    mesh.update_faces(mesh.nondegenerate_faces(height=1e-9))
    mesh.remove_unreferenced_vertices()
    source = np.concatenate([m.vertices for m in meshes])
    source_colours = np.concatenate([m.visual.vertex_colors for m in meshes])
    mesh.visual.vertex_colors = source_colours[cKDTree(source).query(mesh.vertices)[1]]
    return mesh if mesh.is_watertight and mesh.is_winding_consistent else None


def make_object(rng: np.random.Generator, kind: Optional[str] = None
                ) -> Tuple[trimesh.Trimesh, str, str]:
    """One random object.

    Args:
        rng: numpy Generator (the object depends on nothing else). kind: one of KINDS, or
            None for a random kind.
    Returns:
        (mesh, caption, kind): the watertight ground-truth mesh (union of the parts, engine
        frame: z up, front +x, bounding-box centre at the origin, farthest vertex at
        OBJECT_RADIUS) with per-vertex RGBA colours (albedo); ``mesh.metadata`` holds
        "colours" (names), "display" (the class name in the caption) and "render_parts"
        (the parts, split at sharp edges, for clean flat/smooth shading; render_object uses
        them).
    """
    if kind is None:
        kind = KINDS[int(rng.integers(len(KINDS)))]
    if kind not in _BUILDERS:
        from engine.errors import ConfigError, did_you_mean
        raise ConfigError(f"kind: unknown '{kind}'{did_you_mean(kind, KINDS)}; kinds: "
                          f"{', '.join(KINDS)}")
    display, slots, build = _BUILDERS[kind]
    for _ in range(_ATTEMPTS):
        mesh, render_parts, colours, parts = _attempt(rng, kind, build, slots)
        if mesh is not None:
            break
    if mesh is None:   # keep the parts: still right for rendering and Chamfer distance
        mesh = trimesh.util.concatenate([m for m, _ in parts])
    mesh.metadata.update({"colours": colours, "display": display, "kind": kind,
                          "render_parts": render_parts})
    return mesh, caption_for(display, [colours[s] for _, s in parts]), kind


def _attempt(rng, kind, build, slots):
    """Build, paint, normalise and unite one draw of ``kind``; the union is None when the
    boolean failed (the caller draws again: rare, and deterministic given the rng)."""
    parts = build(rng)
    colours = _pick_colours(rng, kind, slots)
    # normalise: bounding-box centre at the origin, farthest point at OBJECT_RADIUS
    allv = np.concatenate([m.vertices for m, _ in parts])
    centre = (allv.min(0) + allv.max(0)) / 2.0
    scale = OBJECT_RADIUS / float(np.linalg.norm(allv - centre, axis=1).max())
    painted = []
    for m, slot in parts:
        m.apply_translation(-centre)
        m.apply_scale(scale)
        rgb = np.round(np.asarray(PALETTE[colours[slot]]) * 255).astype(np.uint8)
        m.visual.vertex_colors = np.append(rgb, 255)
        painted.append(m)
    render_parts = []
    for m in painted:
        smooth = trimesh.graph.smooth_shade(m, angle=SMOOTH_ANGLE)
        smooth.visual.vertex_colors = m.visual.vertex_colors[0]
        render_parts.append(smooth)
    return _union(painted), trimesh.util.concatenate(render_parts), colours, parts
