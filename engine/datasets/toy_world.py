"""The toy world: procedural coloured objects rendered into a multi-view dataset.

    python -m engine.datasets.toy_world out=DIR [count=200] [heldout=20] [heldout_pool=0] [seed=0]
        [size=64] [groups=2] [references=2]

Each object is a primitive or a small composition of primitives (a table, a mushroom, a
snowman, ...) with one or two named colours, random proportions, in the engine's z-up frame:
centred on its bounding box at the origin, scaled so its farthest point is 0.8 from it, and
with a front facing +x (azimuth 0): asymmetric parts (a chair's back at -x, a snowman's nose,
a lamp's arm, an L-shape's arm point at +x), so the yaw of a reconstruction matters.

Rendered with representations.lib.mesh_render.render_mesh into RGBA views (alpha = coverage):
``groups`` MVDream-style groups (4 views 90 degrees apart in azimuth from a random offset,
elevation uniform in [0, 30]), the canonical front view (azimuth 0, elevation 0; always the
first reference, r0.png) and ``references`` free reference views (random azimuth, elevation
in [-10, 40]). The lighting is a fixed world light baked into vertex colours,
albedo * (0.6 + 0.4 max(0, n.l)), so every view shows the same view-independent colour field.
The ground truth (the union of the parts, watertight, vertex colours) is kept as mesh.obj.
Object i depends only on (seed, i); the held-out split is a seeded subset of the first
``heldout_pool`` objects (0: of all), so a bigger world made with the same seed and
``heldout_pool`` keeps a smaller one's objects and its held-out set (count=2000
heldout_pool=200 holds out what count=200 does). Output is byte-identical for the same
arguments.
"""

from __future__ import annotations

import math
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import trimesh

USAGE = __doc__.split("\n\n")[1]
_ONE_LINE_USAGE = " ".join(USAGE.split())

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
#: fixed world light of the baked shading
LIGHT = np.array([0.6, 0.3, 1.0]) / np.linalg.norm([0.6, 0.3, 1.0])
AMBIENT = 0.6
#: camera groups: elevation, and how much of the frame height the bounding sphere fills
GROUP_ELEVATION = (0.0, 30.0)
REFERENCE_ELEVATION = (-10.0, 40.0)
FOVY_RANGE = (35.0, 45.0)
FILL_RANGE = (0.75, 0.85)
#: the canonical front view: the view the image-to-3D examples use
FRONT_FOVY, FRONT_FILL = 40.0, 0.8
SMOOTH_ANGLE = math.radians(40.0)   # edges sharper than this are shaded flat


def camera_distance(fovy_deg, fill) -> float:
    """Distance at which the object's bounding sphere spans ``fill`` of the frame height."""
    half = math.atan(fill * math.tan(math.radians(fovy_deg) / 2.0))
    return OBJECT_RADIUS / math.sin(half)


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


def shaded_colours(vertices: torch.Tensor, faces: torch.Tensor,
                   albedo: torch.Tensor) -> torch.Tensor:
    """Vertex colours [V, 3] = albedo * (AMBIENT + (1 - AMBIENT) max(0, n . LIGHT)), with the
    renderer's area-weighted vertex normals. Not differentiated (data generation)."""
    from representations.lib.mesh_render import vertex_normals

    n = vertex_normals(vertices, faces)
    light = torch.as_tensor(LIGHT, dtype=vertices.dtype)
    return albedo * (AMBIENT + (1.0 - AMBIENT) * (n @ light).clamp_min(0.0))[:, None]


@torch.no_grad()
def render_object(mesh: trimesh.Trimesh, cameras, size: int) -> np.ndarray:
    """RGBA views of an object from ``make_object`` (or any mesh with vertex colours).

    Args:
        mesh: uses ``mesh.metadata["render_parts"]`` when present. cameras: B Cameras.
    Returns:
        uint8 [B, size, size, 4]: straight (not premultiplied) shaded colour, alpha = the
        rasteriser's antialiased coverage.
    """
    from representations.backgrounds import SolidBackground
    from representations.lib.mesh_render import render_mesh

    m = mesh.metadata.get("render_parts", mesh)
    v = torch.as_tensor(np.asarray(m.vertices), dtype=torch.float32)
    f = torch.as_tensor(np.asarray(m.faces), dtype=torch.long)
    albedo = torch.as_tensor(np.asarray(m.visual.vertex_colors)[:, :3], dtype=torch.float32) / 255
    black = SolidBackground(SolidBackground.Config(color=[0.0, 0.0, 0.0]))
    out = render_mesh(v, f, cameras, size, size, background=black,
                      vertex_colors=shaded_colours(v, f, albedo), backend="torch")
    a = out["opacity"]
    # over black the antialiased colour is premultiplied: divide by coverage to straighten
    c = torch.where(a > 0, out["rgb"] / a.clamp_min(1e-6), torch.zeros_like(out["rgb"]))
    a8 = torch.round(a * 255)
    c8 = torch.where(a8 > 0, torch.round(c.clamp(0, 1) * 255), torch.zeros_like(c))
    return torch.cat([c8, a8], dim=-1).to(torch.uint8).numpy()


def sample_cameras(rng: np.random.Generator, groups: int = 2, references: int = 2):
    """The views of one object.

    Returns:
        (Cameras of all views, [[4 view indices] per group], [reference view indices]); the
        first reference is the canonical front view (azimuth 0, elevation 0, fovy FRONT_FOVY).
    """
    from engine.cameras import Cameras

    el, az, dist, fov = [], [], [], []
    for _ in range(groups):
        e, off = rng.uniform(*GROUP_ELEVATION), rng.uniform(0.0, 360.0)
        fv, fill = rng.uniform(*FOVY_RANGE), rng.uniform(*FILL_RANGE)
        for k in range(4):
            el.append(e)
            az.append((off + 90.0 * k) % 360.0)
            dist.append(camera_distance(fv, fill))
            fov.append(fv)
    el.append(0.0), az.append(0.0), fov.append(FRONT_FOVY)
    dist.append(camera_distance(FRONT_FOVY, FRONT_FILL))
    for _ in range(references):
        fv, fill = rng.uniform(*FOVY_RANGE), rng.uniform(*FILL_RANGE)
        el.append(rng.uniform(*REFERENCE_ELEVATION))
        az.append(rng.uniform(0.0, 360.0))
        dist.append(camera_distance(fv, fill))
        fov.append(fv)
    cams = Cameras.from_spherical(el, az, dist, fov)
    group_idx = [list(range(4 * g, 4 * g + 4)) for g in range(groups)]
    return cams, group_idx, list(range(4 * groups, 4 * groups + 1 + references))


def object_rng(seed: int, index: int) -> np.random.Generator:
    return np.random.default_rng([int(seed), int(index)])


def split_ids(ids: Sequence[str], heldout: int, seed: int, pool: int = 0
              ) -> Dict[str, List[str]]:
    """Seeded held-out subset of the first ``pool`` ids (0: all; kept in id order) and the
    rest as train."""
    pool = pool or len(ids)
    pick = set(np.random.default_rng([int(seed), 104729]).choice(pool, heldout,
                                                                  replace=False).tolist())
    return {"train": [o for i, o in enumerate(ids) if i not in pick],
            "heldout": [o for i, o in enumerate(ids) if i in pick]}


def generate(out, count: int = 200, heldout: int = 20, seed: int = 0, size: int = 64,
             groups: int = 2, references: int = 2, log: Optional[Callable[[str], None]] = None,
             heldout_pool: int = 0) -> dict:
    """Write a toy-world dataset to ``out``; returns a summary (ids, splits, seconds)."""
    if not 0 <= heldout <= (heldout_pool or count) <= count:
        from engine.errors import ConfigError
        raise ConfigError(f"need 0 <= heldout ({heldout}) <= heldout_pool ({heldout_pool}; "
                          f"0: all) <= count ({count})")
    out = Path(out)
    threads = torch.get_num_threads()
    # the renders are small: one thread is faster than contending for the cores, and the
    # output does not depend on the machine's core count
    torch.set_num_threads(1)
    try:
        return _generate(out, count, heldout, seed, size, groups, references, log,
                         heldout_pool)
    finally:
        torch.set_num_threads(threads)


def _generate(out: Path, count, heldout, seed, size, groups, references, log,
              heldout_pool) -> dict:
    from engine.datasets.mvdataset import write_index, write_object

    kinds = np.random.default_rng([int(seed), 7]).permutation(len(KINDS))
    ids, t0 = [], time.perf_counter()
    for i in range(count):
        oid = f"obj_{i:05d}"
        rng = object_rng(seed, i)
        mesh, caption, kind = make_object(rng, KINDS[kinds[i % len(KINDS)]])
        cams, group_idx, ref_idx = sample_cameras(rng, groups, references)
        rgba = render_object(mesh, cams, size)
        names = [f"g{g}_v{k}" for g in range(groups) for k in range(4)] + \
                [f"r{k}" for k in range(len(ref_idx))]
        write_object(out, oid, [(rgba[j], cams[j]) for j in range(len(cams))], group_idx,
                     ref_idx, caption=caption, mesh=mesh, names=names,
                     extra={"kind": kind, "colors": mesh.metadata["colours"],
                            "front_view": "r0.png"})
        ids.append(oid)
        if log and (i + 1) % 50 == 0:
            log(f"{i + 1}/{count} objects")
    splits = split_ids(ids, heldout, seed, heldout_pool)
    write_index(out, ids, splits, size)
    seconds = time.perf_counter() - t0
    return {"ids": ids, "splits": splits, "seconds": seconds,
            "per_object": seconds / max(count, 1)}


# ---------------------------------------------------------------------------------------
# command line
# ---------------------------------------------------------------------------------------

_DEFAULTS = {"count": 200, "heldout": 20, "heldout_pool": 0, "seed": 0, "size": 64,
             "groups": 2, "references": 2}


def parse_args(argv: List[str]) -> dict:
    from engine.errors import ConfigError, did_you_mean

    args: dict = {}
    for item in argv:
        if "=" not in item:
            raise ConfigError(f"'{item}' is not key=value; usage: {_ONE_LINE_USAGE}")
        k, v = item.split("=", 1)
        if k == "out":
            args[k] = v
            continue
        if k not in _DEFAULTS:
            raise ConfigError(f"unknown argument '{k}'{did_you_mean(k, ['out', *_DEFAULTS])}; "
                              f"usage: {_ONE_LINE_USAGE}")
        try:
            args[k] = int(v)
        except ValueError:
            raise ConfigError(f"{k}: expected an integer, got '{v}'")
    if not args.get("out"):
        raise ConfigError("out=DIR is required (where to write the dataset)")
    args = {**_DEFAULTS, **args}
    if args["count"] < 1 or args["groups"] < 1 or args["references"] < 0:
        raise ConfigError("count and groups must be >= 1 and references >= 0")
    pool = args["heldout_pool"] or args["count"]
    if not 0 <= pool <= args["count"]:
        raise ConfigError(f"heldout_pool: must be in [0, count={args['count']}] (0: all "
                          f"objects), got {args['heldout_pool']}")
    if not 0 <= args["heldout"] <= pool:
        raise ConfigError(f"heldout: must be in [0, {pool}] (count, or heldout_pool when "
                          f"set), got {args['heldout']}")
    if args["size"] < 16:
        raise ConfigError(f"size: must be >= 16 pixels, got {args['size']}")
    out = Path(args["out"])
    if out.exists() and (not out.is_dir() or (any(out.iterdir())
                                              and not (out / "dataset.json").exists())):
        raise ConfigError(f"out: {out} exists and is not an (empty or toy) dataset folder; "
                          "choose a new folder")
    return args


def main(argv: Optional[List[str]] = None) -> int:
    from engine.errors import UserError

    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__.split("\n\n")[0] + "\n\n" + USAGE)
        return 0
    try:
        args = parse_args(argv)
        summary = generate(args["out"], **{k: args[k] for k in _DEFAULTS},
                           log=lambda s: print(s, file=sys.stderr))
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    n = len(summary["ids"])
    print(f"wrote {n} objects ({len(summary['splits']['train'])} train, "
          f"{len(summary['splits']['heldout'])} held out) to {args['out']} in "
          f"{summary['seconds']:.1f} s ({summary['per_object']:.3f} s per object)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
