"""Coloured point clouds: sampled from meshes, in Point-E's units, read and written as .ply.

A cloud is an array [N, 6]: x, y, z, r, g, b with rgb in [0, 1] (float). Library code shared by
the Point-E toy training (:mod:`guidance.training.points`), the cloud sampler command
(:mod:`guidance.pointcloud.sample`), the point-cloud initialisation of the representations
(:mod:`representations.lib.point_init`) and whatever else learns from clouds (a Compress3D-like
autoencoder reads the same clouds).

Units and frames. The engine's world is z up, objects inside the unit sphere; the toy world's
objects reach ``OBJECT_RADIUS`` (0.8) from their bounding-box centre. Point-E's clouds live in
about [-0.5, 0.5] (its model works in xyz * 2, i.e. [-1, 1]): :func:`to_pointe` divides the
engine's coordinates by ``WORLD_SCALE`` (1.6 = 0.8 / 0.5, so a toy object's farthest point
lands at 0.5) and :func:`from_pointe` multiplies back. The axes are kept (z up). A cloud drawn
for a picture taken from azimuth ``a`` is turned by ``-a`` about z (:func:`rotate_z`), so the
camera that took the picture sits at azimuth 0 (on +x, looking at the origin), where the
engine puts the input view's camera.

Files: :func:`write_ply` writes a binary little-endian PLY with float x, y, z and uchar red,
green, blue (what MeshLab, Open3D, trimesh and plyfile read); :func:`read_cloud` reads such a
file (any vertex element with x, y, z and optional colours, ASCII or binary, via trimesh), a
mesh's vertices, or a ``.npy`` [N, 3] / [N, 6] array, and refuses anything else in one line
(:class:`engine.errors.InputError`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Tuple

import numpy as np

from engine.errors import InputError

#: the toy world's objects reach this far from their centre (engine.datasets.toy_shapes)
OBJECT_RADIUS = 0.8
#: Point-E's clouds reach about this far from the origin (its model works in xyz * 2)
POINTE_RADIUS = 0.5
#: engine world units per Point-E unit
WORLD_SCALE = OBJECT_RADIUS / POINTE_RADIUS
#: the largest cloud read from a file (points); a larger file is refused, not read
MAX_POINTS = 5_000_000
GREY = 0.5


def sample_surface(mesh, count: int, seed: int = 0) -> np.ndarray:
    """``count`` points uniform on the surface of a trimesh ``mesh`` (by area), with the
    mesh's colours: [count, 6] float32, xyz in the mesh's units, rgb in [0, 1].

    Colours: vertex colours interpolated barycentrically inside each face (the toy world's
    meshes carry palette colours per vertex), else face colours, else a texture's colour at
    the interpolated UV, else grey. Seeded: the same mesh, count and seed give the same cloud.
    """
    vertices = np.asarray(mesh.vertices, dtype=np.float64)
    faces = np.asarray(mesh.faces, dtype=np.int64)
    if count < 1:
        raise ValueError(f"count must be >= 1, got {count}")
    if len(faces) == 0:
        raise InputError("the mesh has no faces: no surface to sample")
    tri = vertices[faces]                                                     # [F, 3, 3]
    area = 0.5 * np.linalg.norm(np.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0]), axis=1)
    total = float(area.sum())
    if not np.isfinite(total) or total <= 0:
        raise InputError("the mesh has no area: no surface to sample")
    rng = np.random.default_rng(seed)
    face = rng.choice(len(faces), size=count, p=area / total)
    u, v = rng.random(count), rng.random(count)
    flip = u + v > 1.0                                 # fold the square onto the triangle
    u[flip], v[flip] = 1.0 - u[flip], 1.0 - v[flip]
    bary = np.stack([1.0 - u - v, u, v], axis=1)                              # [count, 3]
    xyz = np.einsum("nk,nkd->nd", bary, tri[face])
    rgb = _surface_colours(mesh, faces, face, bary)
    return np.concatenate([xyz, rgb], axis=1).astype(np.float32)


def _surface_colours(mesh, faces: np.ndarray, face: np.ndarray, bary: np.ndarray) -> np.ndarray:
    visual = getattr(mesh, "visual", None)
    kind = getattr(visual, "kind", None)
    if kind == "vertex":
        vc = np.asarray(visual.vertex_colors, dtype=np.float64)[:, :3] / 255.0
        return np.einsum("nk,nkc->nc", bary, vc[faces[face]])
    if kind == "face":
        return np.asarray(visual.face_colors, dtype=np.float64)[face, :3] / 255.0
    if kind == "texture":
        try:
            uv = np.asarray(visual.uv, dtype=np.float64)
            uv_points = np.einsum("nk,nkc->nc", bary, uv[faces[face]])
            rgba = visual.material.to_color(uv_points)
            return np.asarray(rgba, dtype=np.float64)[:, :3] / 255.0
        except Exception:   # a material without an image, or no UVs: grey below
            pass
    return np.full((len(face), 3), GREY)


def to_pointe(cloud: np.ndarray, scale: float = WORLD_SCALE) -> np.ndarray:
    """Engine world units -> Point-E's (xyz / scale; rgb untouched)."""
    out = np.array(cloud, dtype=np.float32, copy=True)
    out[:, :3] /= scale
    return out


def from_pointe(cloud, scale: float = WORLD_SCALE):
    """Point-E's units -> the engine's world (xyz * scale); numpy array or torch tensor."""
    out = cloud.clone() if hasattr(cloud, "clone") else np.array(cloud, dtype=np.float32)
    out[..., :3] = out[..., :3] * scale
    return out


def rotate_z(cloud, degrees: float):
    """The cloud turned by ``degrees`` about the z axis (counter-clockwise seen from +z: +x
    goes towards +y); numpy [N, C>=3] or torch [..., C>=3]."""
    c, s = np.cos(np.radians(degrees)), np.sin(np.radians(degrees))
    if hasattr(cloud, "clone"):
        out = cloud.clone()
        x, y = cloud[..., 0], cloud[..., 1]
    else:
        out = np.array(cloud, copy=True)
        x, y = cloud[..., 0], cloud[..., 1]
    out[..., 0] = c * x - s * y
    out[..., 1] = s * x + c * y
    return out


# -- files ----------------------------------------------------------------------------------

def ply_bytes(cloud) -> bytes:
    """A binary little-endian PLY of a cloud [N, 3] or [N, 6] (rgb in [0, 1]): float x, y, z
    and, with colours, uchar red, green, blue."""
    arr = np.asarray(cloud, dtype=np.float64)
    if arr.ndim != 2 or arr.shape[1] not in (3, 6):
        raise ValueError(f"a cloud is [N, 3] or [N, 6], got {list(arr.shape)}")
    n = arr.shape[0]
    fields = [("x", "<f4"), ("y", "<f4"), ("z", "<f4")]
    if arr.shape[1] == 6:
        fields += [("red", "u1"), ("green", "u1"), ("blue", "u1")]
    rec = np.empty(n, dtype=fields)
    for i, axis in enumerate("xyz"):
        rec[axis] = arr[:, i]
    if arr.shape[1] == 6:
        rgb = np.clip(np.round(arr[:, 3:] * 255.0), 0, 255).astype(np.uint8)
        for i, name in enumerate(("red", "green", "blue")):
            rec[name] = rgb[:, i]
    props = [f"property float {a}" for a in "xyz"]
    if arr.shape[1] == 6:
        props += [f"property uchar {c}" for c in ("red", "green", "blue")]
    header = "\n".join(["ply", "format binary_little_endian 1.0",
                        "comment distill-engine point cloud, engine frame (z up)",
                        f"element vertex {n}", *props, "end_header"]) + "\n"
    return header.encode("ascii") + rec.tobytes()


def write_ply(path, cloud) -> Path:
    """Write :func:`ply_bytes` atomically (temporary file, fsync, rename)."""
    from engine.atomic import atomic_write_bytes

    path = Path(path)
    atomic_write_bytes(path, ply_bytes(cloud))
    return path


def read_cloud(path, what: str = "point cloud") -> np.ndarray:
    """A cloud file -> [N, 6] float32 (rgb in [0, 1]; grey where the file has no colours).

    ``.ply`` (a vertex element with x, y, z, optional red/green/blue or a mesh's vertex
    colours; trimesh's reader) or ``.npy`` ([N, 3] or [N, 6], rgb in [0, 1] or 0..255). A
    missing, unreadable, empty, non-finite or wrongly shaped file is one InputError line
    naming ``what`` and the file."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"{what} {path}: no such file")
    if not path.is_file():
        raise InputError(f"{what} {path} is not a file")
    suffix = path.suffix.lower()
    if suffix not in (".ply", ".npy"):
        raise InputError(f"{what} {path} is not a point cloud file (expected .ply or .npy)")
    try:
        arr = _read_npy(path) if suffix == ".npy" else _read_ply(path)
    except InputError:
        raise
    except Exception as exc:
        detail = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else ""
        raise InputError(f"{what} {path} cannot be read as a point cloud "
                         f"({type(exc).__name__}{': ' + detail if detail else ''})") from None
    return check_cloud(arr, f"{what} {path}")


def _read_npy(path: Path) -> np.ndarray:
    arr = np.load(path, allow_pickle=False, mmap_mode="r")
    if arr.ndim == 2 and arr.shape[0] > MAX_POINTS:
        raise InputError(f"{path} holds {arr.shape[0]} points; at most {MAX_POINTS} are read")
    return np.asarray(arr)


def _read_ply(path: Path) -> np.ndarray:
    import trimesh

    with open(path, "rb") as fh:
        if fh.read(3) != b"ply":
            raise InputError(f"{path} is not a PLY file (no 'ply' magic)")
    loaded = trimesh.load(str(path), file_type="ply", process=False)
    xyz = np.asarray(getattr(loaded, "vertices", np.zeros((0, 3))), dtype=np.float64)
    if xyz.shape[0] > MAX_POINTS:
        raise InputError(f"{path} holds {xyz.shape[0]} points; at most {MAX_POINTS} are read")
    cols = None
    visual = getattr(loaded, "visual", None)
    if visual is not None and getattr(visual, "kind", None) == "vertex":
        cols = visual.vertex_colors
    elif getattr(loaded, "colors", None) is not None and len(loaded.colors):
        cols = loaded.colors
    if cols is not None and len(cols) == len(xyz):
        return np.concatenate([xyz, np.asarray(cols, dtype=np.float64)[:, :3] / 255.0], 1)
    return xyz


def check_cloud(arr, what: str = "point cloud") -> np.ndarray:
    """[N, 3] or [N, 6] finite numbers with N > 0 -> [N, 6] float32 (rgb scaled to [0, 1]
    when it is 0..255; grey for [N, 3]); InputError otherwise."""
    arr = np.asarray(arr)
    if arr.ndim != 2 or arr.shape[1] not in (3, 6) or arr.shape[0] == 0 \
            or not np.issubdtype(arr.dtype, np.number):
        raise InputError(f"{what} holds {arr.dtype} {list(arr.shape)}; expected a cloud of "
                         "[N, 3] (xyz) or [N, 6] (xyz + rgb) numbers with N > 0")
    arr = arr.astype(np.float64)
    if not np.isfinite(arr).all():
        raise InputError(f"{what} holds NaN or infinite values")
    if arr.shape[1] == 3:
        arr = np.concatenate([arr, np.full_like(arr, GREY)], 1)
    elif arr[:, 3:].max() > 1.0:
        arr[:, 3:] = arr[:, 3:] / 255.0
    arr[:, 3:] = np.clip(arr[:, 3:], 0.0, 1.0)
    return arr.astype(np.float32)


# -- measures -------------------------------------------------------------------------------

def chamfer(a, b) -> float:
    """Chamfer distance between two clouds (xyz of [N, >=3], [M, >=3]): the mean of the two
    directions' mean nearest-neighbour Euclidean distances (the benchmark's definition)."""
    from scipy.spatial import cKDTree

    a = np.asarray(a, dtype=np.float64)[:, :3]
    b = np.asarray(b, dtype=np.float64)[:, :3]
    return 0.5 * float(cKDTree(b).query(a)[0].mean() + cKDTree(a).query(b)[0].mean())


def colour_error(pred, truth) -> float:
    """Mean absolute rgb difference between each predicted point and its nearest true point
    (in [0, 1]; how right the colours are where the points are)."""
    from scipy.spatial import cKDTree

    pred, truth = np.asarray(pred, dtype=np.float64), np.asarray(truth, dtype=np.float64)
    idx = cKDTree(truth[:, :3]).query(pred[:, :3])[1]
    return float(np.abs(pred[:, 3:6] - truth[idx, 3:6]).mean())


def best_yaw_chamfer(pred, truth, step: float = 5.0) -> Tuple[float, float]:
    """(the smallest Chamfer distance over turns of ``pred`` about z in ``step`` degrees, that
    angle): the benchmark's yaw search, for clouds."""
    best: Optional[Tuple[float, float]] = None
    for yaw in np.arange(0.0, 360.0, step):
        d = chamfer(rotate_z(np.asarray(pred)[:, :3], yaw), truth)
        if best is None or d < best[0]:
            best = (d, float(yaw))
    return best


__all__ = ["OBJECT_RADIUS", "POINTE_RADIUS", "WORLD_SCALE", "sample_surface", "to_pointe",
           "from_pointe", "rotate_z", "ply_bytes", "write_ply", "read_cloud", "check_cloud",
           "chamfer", "colour_error", "best_yaw_chamfer"]
