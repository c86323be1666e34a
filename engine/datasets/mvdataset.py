"""The multi-view dataset format (docs/dataset.md): writer, validating loader, collate.

On disk, a folder with ``dataset.json`` (object ids, optional splits, image size) and one
folder per object holding RGBA PNG views and ``object.json``: MVDream-style camera groups
(views 360/V degrees apart in azimuth sharing elevation, fovy and distance), free reference
views, an optional caption and an optional ground-truth mesh. Cameras follow
engine.cameras (z-up world, azimuth 0 on +x, OpenGL camera axes in ``c2w``); angles are
stored in degrees.

The loader checks every object when it is built (files present and decodable, cameras
self-consistent, group sizes and spacing) so that a bad entry is reported once, up front,
and never stops an epoch half-way: bad objects are skipped and listed in ``.skipped``, or,
with ``strict=True``, the first one raises :class:`engine.errors.InputError`.
"""

from __future__ import annotations

import json
import math
import re
import sys
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as Fn
from PIL import Image

from engine.cameras import Cameras, spherical_to_position
from engine.errors import InputError, did_you_mean

FORMAT = "engine-multiview"
VERSION = 1
CAM_KEYS = ("file", "elevation", "azimuth", "distance", "fovy", "c2w")
_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")

# Tolerances of the camera checks: loose enough for cameras written by other tools in
# float32, tight enough to catch a wrong convention (y-up, degrees vs radians, mirrored
# azimuth), which would otherwise train silently on wrong cameras.
POSITION_TOL = 5e-3           # camera centre vs. (elevation, azimuth, distance), x distance
ROTATION_TOL = 1e-3           # |R^T R - I|
LOOK_AT_TOL_DEG = 1.0         # the camera must look at the origin
GROUP_ANGLE_TOL_DEG = 1.0     # shared elevation / fovy, azimuth spacing
GROUP_DISTANCE_TOL = 1e-2     # shared distance, relative


# ---------------------------------------------------------------------------------------
# writing
# ---------------------------------------------------------------------------------------

def _num(x) -> float:
    """A float32 value as the shortest decimal that reads back to the same float32, so the
    JSON stays readable and a write -> load round trip is exact."""
    return float(str(np.float32(x)))


def camera_record(cam: Cameras, file: str) -> dict:
    """The CAM entry of object.json for a one-camera ``Cameras``."""
    if len(cam) != 1:
        raise ValueError(f"expected Cameras of 1 view for {file}, got {len(cam)}")
    c2w = cam.c2w[0].detach().cpu().float()
    if not bool(torch.isfinite(c2w).all()):
        raise ValueError(f"camera of {file} is not finite")
    return {"file": file,
            "elevation": _num(cam.elevation[0]),
            "azimuth": _num(cam.azimuth[0]),
            "distance": _num(cam.distance[0]),
            "fovy": _num(math.degrees(float(cam.fovy[0]))),
            "c2w": [[_num(v) for v in row] for row in c2w.tolist()]}


def _check_id(object_id: str) -> None:
    if not _ID_RE.match(object_id):
        raise ValueError(f"object id {object_id!r} must be a plain folder name "
                         "(letters, digits, '.', '_', '-')")


_FLAT_LIST = re.compile(r"\[\s*([^\[\]{}\"]*?)\s*\]")


def _dump(record: dict, path: Path) -> None:
    """Indented JSON with lists of numbers kept on one line (a c2w is four short lines)."""
    text = json.dumps(record, indent=1)
    text = _FLAT_LIST.sub(lambda m: "[" + ", ".join(x.strip() for x in m.group(1).split(","))
                          + "]" if m.group(1) else "[]", text)
    with open(path, "w") as f:
        f.write(text + "\n")


def write_object(root, object_id: str, views: Sequence[Tuple[np.ndarray, Cameras]],
                 groups: Sequence[Sequence[int]], references: Sequence[int] = (),
                 caption: Optional[str] = None, mesh=None, *,
                 names: Optional[Sequence[str]] = None, extra: Optional[dict] = None) -> Path:
    """Write one object: its PNG views, object.json and the optional mesh.obj.

    Args:
        root: the dataset folder (created if needed).
        views: (rgba uint8 [H, W, 4] straight (not premultiplied) colour + alpha, Cameras of
            one view) per view.
        groups: lists of view indices, one list per camera group (MVDream: 4 views 90
            degrees apart with shared elevation, fovy and distance).
        references: view indices of the free reference views.
        caption: optional text. mesh: optional trimesh.Trimesh in the engine world frame,
            written as mesh.obj (vertex colours kept).
        names: optional file stem per view; default ``g{group}_v{k}`` for group views and
            ``r{k}`` for references (a view used twice is written once, under its first name).
        extra: more keys for object.json (the loader ignores keys it does not know).
    Returns:
        The object's folder.
    """
    _check_id(object_id)
    for index in [i for g in groups for i in g] + list(references):
        if not 0 <= index < len(views):
            raise ValueError(f"view index {index} out of range (0..{len(views) - 1})")
    for index, (rgba, _) in enumerate(views):
        rgba = np.asarray(rgba)
        if rgba.dtype != np.uint8 or rgba.ndim != 3 or rgba.shape[2] != 4:
            raise ValueError(f"view {index}: expected uint8 [H, W, 4], got {rgba.dtype} "
                             f"{list(rgba.shape)}")
        if rgba.shape[0] != rgba.shape[1]:
            raise ValueError(f"view {index}: images must be square, got {rgba.shape[:2]}")
    files: Dict[int, str] = {}

    def file_of(index: int, default: str) -> str:
        if index not in files:
            files[index] = f"{names[index] if names else default}.png"
        return files[index]

    record: dict = {}
    if caption is not None:
        record["caption"] = str(caption)
    record["groups"] = [{"views": [camera_record(views[i][1], file_of(i, f"g{g}_v{k}"))
                                   for k, i in enumerate(group)]}
                        for g, group in enumerate(groups)]
    record["references"] = [camera_record(views[i][1], file_of(i, f"r{k}"))
                            for k, i in enumerate(references)]
    if mesh is not None:
        record["mesh"] = "mesh.obj"
    if extra:
        record.update({k: v for k, v in extra.items() if k not in record})

    folder = Path(root) / object_id
    folder.mkdir(parents=True, exist_ok=True)
    for index, name in files.items():
        Image.fromarray(np.asarray(views[index][0]), "RGBA").save(folder / name)
    if mesh is not None:
        mesh.export(folder / "mesh.obj", file_type="obj")
    _dump(record, folder / "object.json")
    return folder


def write_index(root, objects: Sequence[str], splits: Optional[Dict[str, Sequence[str]]] = None,
                image_size: int = 64) -> Path:
    """Write DATASET/dataset.json listing ``objects`` (and their ``splits``); returns its path."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    for o in objects:
        _check_id(o)
    index = {"format": FORMAT, "version": VERSION, "image_size": int(image_size),
             "objects": list(objects)}
    if splits is not None:
        index["splits"] = {k: list(v) for k, v in splits.items()}
    path = root / "dataset.json"
    _dump(index, path)
    return path


# ---------------------------------------------------------------------------------------
# validation (pure functions: a parsed record -> a reason string, or None when fine)
# ---------------------------------------------------------------------------------------

class _Bad(Exception):
    """One bad entry; the message is the one-line reason."""


def _angle_diff(a: float, b: float) -> float:
    return abs((a - b + 180.0) % 360.0 - 180.0)


def check_camera(cam, where: str) -> dict:
    """Validate one CAM record; returns it with ``c2w`` as a float32 [4, 4] numpy array."""
    if not isinstance(cam, dict):
        raise _Bad(f"{where}: camera must be an object, got {type(cam).__name__}")
    missing = [k for k in CAM_KEYS if k not in cam]
    if missing:
        raise _Bad(f"{where}: camera lacks {', '.join(missing)}")
    if not isinstance(cam["file"], str) or not cam["file"] or "/" in cam["file"] \
            or "\\" in cam["file"] or cam["file"].startswith("."):
        raise _Bad(f"{where}: 'file' must be a file name inside the object folder, "
                   f"got {cam['file']!r}")
    where = f"{where} ({cam['file']})"
    vals = {}
    for k in ("elevation", "azimuth", "distance", "fovy"):
        v = cam[k]
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise _Bad(f"{where}: {k} must be a finite number, got {v!r}")
        vals[k] = float(v)
    if not -90.0 <= vals["elevation"] <= 90.0:
        raise _Bad(f"{where}: elevation {vals['elevation']:g} is outside [-90, 90] degrees")
    if vals["distance"] <= 0:
        raise _Bad(f"{where}: distance must be > 0, got {vals['distance']:g}")
    if not 0.0 < vals["fovy"] < 180.0:
        raise _Bad(f"{where}: fovy must be in (0, 180) degrees, got {vals['fovy']:g}"
                   + (" (radians? fovy is in degrees)" if vals["fovy"] < 3.2 else ""))
    try:
        c2w = np.asarray(cam["c2w"], dtype=np.float64)
    except (TypeError, ValueError):
        raise _Bad(f"{where}: c2w must be a 4x4 list of numbers")
    if c2w.shape != (4, 4) or not np.isfinite(c2w).all():
        raise _Bad(f"{where}: c2w must be a finite 4x4 list, got shape {list(c2w.shape)}")
    if np.abs(c2w[3] - [0, 0, 0, 1]).max() > 1e-6:
        raise _Bad(f"{where}: c2w's last row must be 0 0 0 1")
    rot = c2w[:3, :3]
    if np.abs(rot.T @ rot - np.eye(3)).max() > ROTATION_TOL or np.linalg.det(rot) < 0:
        raise _Bad(f"{where}: c2w's 3x3 part is not a rotation")
    expected = spherical_to_position(*(torch.tensor([vals[k]], dtype=torch.float64)
                                       for k in ("elevation", "azimuth", "distance")))[0]
    pos = c2w[:3, 3]
    err = float(np.linalg.norm(pos - expected.numpy()))
    if err > POSITION_TOL * vals["distance"]:
        raise _Bad(f"{where}: c2w puts the camera at ({pos[0]:.3g}, {pos[1]:.3g}, "
                   f"{pos[2]:.3g}) but elevation/azimuth/distance say ({expected[0]:.3g}, "
                   f"{expected[1]:.3g}, {expected[2]:.3g}); check the conventions "
                   "(z up, azimuth 0 on +x, counter-clockwise)")
    # OpenGL axes: the camera looks along -z of its frame, which must point at the origin
    forward = -rot[:, 2]
    cos = float(np.dot(forward, -pos) / max(np.linalg.norm(pos), 1e-12))
    if cos < math.cos(math.radians(LOOK_AT_TOL_DEG)):
        angle = math.degrees(math.acos(max(-1.0, min(1.0, cos))))
        raise _Bad(f"{where}: the camera looks {angle:.1f} degrees away from the origin; "
                   "c2w must use OpenGL axes (camera looks along its -z)")
    return {**cam, **vals, "c2w": c2w.astype(np.float32)}


def check_group(views: List[dict], num_views: int, where: str) -> None:
    """Shared elevation / fovy / distance and azimuths 360/V apart (any order)."""
    if len(views) != num_views:
        raise _Bad(f"{where}: has {len(views)} views, expected {num_views}")
    first = views[0]
    for v in views[1:]:
        for k in ("elevation", "fovy"):
            if abs(v[k] - first[k]) > GROUP_ANGLE_TOL_DEG:
                raise _Bad(f"{where}: views must share {k}, got {first[k]:g} and {v[k]:g}")
        if abs(v["distance"] - first["distance"]) > GROUP_DISTANCE_TOL * first["distance"]:
            raise _Bad(f"{where}: views must share distance, got {first['distance']:g} "
                       f"and {v['distance']:g}")
    offsets = sorted((v["azimuth"] - first["azimuth"]) % 360.0 for v in views)
    step = 360.0 / num_views
    if any(_angle_diff(o, k * step) > GROUP_ANGLE_TOL_DEG for k, o in enumerate(offsets)):
        raise _Bad(f"{where}: azimuths {[round(v['azimuth'], 2) for v in views]} are not "
                   f"{step:g} degrees apart")


def check_png(path: Path) -> int:
    """Check a PNG exists, decodes, is square and has alpha; returns its side in pixels."""
    name = path.name
    if not path.is_file():
        raise _Bad(f"missing image {name}")
    try:
        with Image.open(path) as img:
            size, mode, info = img.size, img.mode, dict(img.info)
            img.verify()   # chunk CRCs and the end of the stream: catches truncation
    except Exception as exc:  # Pillow raises many types for corrupt data
        raise _Bad(f"corrupt image {name} ({type(exc).__name__}: "
                   f"{str(exc).splitlines()[0] if str(exc) else 'unreadable'})")
    if size[0] != size[1]:
        raise _Bad(f"image {name} is {size[0]}x{size[1]}, views must be square")
    if mode not in ("RGBA", "LA", "PA") and not (mode == "P" and "transparency" in info):
        raise _Bad(f"image {name} has no alpha channel (mode {mode}); views must be RGBA "
                   "with alpha = object mask")
    return size[0]


def check_object(folder: Path, num_views: int, with_reference: bool) -> dict:
    """Parse and validate DATASET/<id>/object.json and its files; returns the clean record
    (caption, groups as lists of checked cameras, references, mesh path, image side)."""
    path = folder / "object.json"
    if not path.is_file():
        raise _Bad("no object.json" if folder.is_dir() else "folder missing")
    try:
        with open(path) as f:
            raw = json.load(f)
    except json.JSONDecodeError as exc:
        raise _Bad(f"object.json is not valid JSON (line {exc.lineno} column {exc.colno}: "
                   f"{exc.msg})")
    except (OSError, UnicodeDecodeError) as exc:
        raise _Bad(f"object.json cannot be read ({exc})")
    if not isinstance(raw, dict):
        raise _Bad("object.json must hold a JSON object")
    caption = raw.get("caption", "")
    if caption is None:
        caption = ""
    if not isinstance(caption, str):
        raise _Bad(f"caption must be a string, got {type(caption).__name__}")
    groups_raw = raw.get("groups")
    if not isinstance(groups_raw, list) or not groups_raw:
        raise _Bad("object.json needs a non-empty list 'groups'")
    refs_raw = raw.get("references", [])
    if not isinstance(refs_raw, list):
        raise _Bad("'references' must be a list")
    groups = []
    for g, group in enumerate(groups_raw):
        if not isinstance(group, dict) or not isinstance(group.get("views"), list):
            raise _Bad(f"group {g} must be an object with a list 'views'")
        cams = [check_camera(c, f"group {g} view {k}") for k, c in enumerate(group["views"])]
        check_group(cams, num_views, f"group {g}")
        groups.append(cams)
    refs = [check_camera(c, f"reference {k}") for k, c in enumerate(refs_raw)]
    sides = {check_png(folder / c["file"])
             for c in [c for g in groups for c in g] + (refs if with_reference else [])}
    if len(sides) > 1:
        raise _Bad(f"views have different sizes {sorted(sides)}")
    mesh = raw.get("mesh")
    if mesh is not None and (not isinstance(mesh, str) or not (folder / mesh).is_file()):
        raise _Bad(f"mesh {mesh!r} not found")
    return {"caption": caption, "groups": groups, "references": refs,
            "mesh": str(folder / mesh) if mesh else None, "side": sides.pop()}


def read_index(root: Path) -> dict:
    """Read and check dataset.json; a broken index is fatal (InputError), not skippable."""
    path = root / "dataset.json"
    if not path.is_file():
        raise InputError(f"{root} is not a multi-view dataset: {path.name} not found "
                         "(see docs/dataset.md)")
    try:
        with open(path) as f:
            index = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InputError(f"{path} is not valid JSON ({str(exc).splitlines()[0]})")
    if not isinstance(index, dict) or index.get("format") != FORMAT:
        raise InputError(f"{path}: 'format' must be \"{FORMAT}\"")
    if index.get("version") != VERSION:
        raise InputError(f"{path}: unsupported version {index.get('version')!r} "
                         f"(this engine reads version {VERSION})")
    objects = index.get("objects")
    if not isinstance(objects, list) or not all(isinstance(o, str) for o in objects):
        raise InputError(f"{path}: 'objects' must be a list of object ids")
    splits = index.get("splits")
    if splits is not None and (not isinstance(splits, dict) or not all(
            isinstance(v, list) and all(isinstance(o, str) for o in v)
            for v in splits.values())):
        raise InputError(f"{path}: 'splits' must map split names to lists of object ids")
    size = index.get("image_size")
    if size is not None and (isinstance(size, bool) or not isinstance(size, int) or size < 1):
        raise InputError(f"{path}: image_size must be a positive integer, got {size!r}")
    return index


# ---------------------------------------------------------------------------------------
# loading
# ---------------------------------------------------------------------------------------

def load_view(path: Path, size: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """An RGBA PNG -> (rgb [3, S, S] composited on white, mask [1, S, S]), floats in [0, 1].

    At the file's own size the composite is exactly ``c * a + (1 - a)`` with c, a = u8 / 255.
    Other sizes are resampled premultiplied (bilinear, antialiased) so no background colour
    bleeds into the edge."""
    with Image.open(path) as img:
        rgba = np.asarray(img.convert("RGBA"))
    t = torch.from_numpy(rgba.copy()).permute(2, 0, 1).float() / 255.0
    c, a = t[:3], t[3:]
    if t.shape[-1] != size:
        pm = torch.cat([c * a, a])[None]
        pm = Fn.interpolate(pm, size=(size, size), mode="bilinear", align_corners=False,
                            antialias=True)[0].clamp(0.0, 1.0)
        return (pm[:3] + (1.0 - pm[3:])).clamp(0.0, 1.0), pm[3:]
    return c * a + (1.0 - a), a


def camera_tensors(cams: List[dict]) -> Dict[str, torch.Tensor]:
    """Checked camera records (object.json's) -> ``c2w`` [N, 4, 4] and ``elevation``,
    ``azimuth``, ``distance``, ``fovy`` [N] (degrees), the loader's item keys."""
    return {"c2w": torch.from_numpy(np.stack([c["c2w"] for c in cams])),
            **{k: torch.tensor([c[k] for c in cams], dtype=torch.float32)
               for k in ("elevation", "azimuth", "distance", "fovy")}}


class MultiViewDataset(torch.utils.data.Dataset):
    """Objects of a multi-view dataset; each item is one random camera group of one object
    (and one random reference view), chosen with torch's global RNG.

    Args:
        root: the dataset folder. split: a name from dataset.json's splits, or None for all.
        image_size: side S of the returned images (None: dataset.json's image_size, or the
            files' own size when the index has none).
        num_views: views per group (groups of another size are invalid).
        with_reference: return a reference view (objects without references return none).
        anchor_group: also return a second camera group of the object, another than the
            item's (``anchor_images``, ``anchor_masks``, ``anchor_c2w``, ...): the clean anchor
            views of the interpolation mode (Envision3D). Objects with one group are skipped.
        strict: raise InputError on the first bad object instead of skipping it.
    Attributes:
        ids: the usable object ids. skipped: [(object id, reason)] of the bad ones.
    """

    def __init__(self, root, split: Optional[str] = None, image_size: Optional[int] = None,
                 num_views: int = 4, with_reference: bool = True, strict: bool = False,
                 anchor_group: bool = False):
        self.root = Path(root)
        self.anchor_group = anchor_group
        if num_views < 1:
            raise InputError(f"num_views must be >= 1, got {num_views}")
        if image_size is not None and image_size < 1:
            raise InputError(f"image_size must be >= 1, got {image_size}")
        index = read_index(self.root)
        if split is None:
            ids = index["objects"]
        else:
            splits = index.get("splits") or {}
            if split not in splits:
                raise InputError(f"{self.root}: no split '{split}'{did_you_mean(split, splits)}"
                                 f"; splits: {', '.join(splits) or 'none'}")
            ids = splits[split]
        self.split, self.num_views, self.with_reference = split, num_views, with_reference
        self.skipped: List[Tuple[str, str]] = []
        self.ids: List[str] = []
        self.records: List[dict] = []
        seen = set()
        for oid in ids:
            try:
                if oid in seen:
                    raise _Bad("listed twice")
                seen.add(oid)
                if not _ID_RE.match(oid):
                    raise _Bad("not a plain folder name")
                rec = check_object(self.root / oid, num_views, with_reference)
                if anchor_group and len(rec["groups"]) < 2:
                    raise _Bad("one camera group only; anchor views need a second group")
            except _Bad as exc:
                reason = " ".join(str(exc).split())
                if strict:
                    raise InputError(f"dataset {self.root}: object {oid}: {reason}")
                self.skipped.append((oid, reason))
                continue
            self.ids.append(oid)
            self.records.append(rec)
        what = f"split '{split}'" if split else "the dataset"
        if not self.ids:
            first = f"; first: {self.skipped[0][0]}: {self.skipped[0][1]}" if self.skipped else ""
            raise InputError(f"{self.root}: no usable objects in {what} ({len(self.skipped)} "
                             f"skipped{first})")
        if self.skipped:
            shown = "; ".join(f"{o}: {r}" for o, r in self.skipped[:3])
            more = f"; ... ({len(self.skipped) - 3} more in .skipped)" \
                if len(self.skipped) > 3 else ""
            print(f"warning: {self.root}: skipped {len(self.skipped)} of "
                  f"{len(self.skipped) + len(self.ids)} objects in {what} ({shown}{more})",
                  file=sys.stderr)
        self.image_size = int(image_size or index.get("image_size") or self.records[0]["side"])
        self._load_failures = 0

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict:
        # Files were checked at construction; if one vanished or broke since, fall back to
        # the next object rather than stop an epoch half-way.
        for k in range(len(self)):
            j = (int(i) + k) % len(self)
            try:
                return self._load(j)
            except (OSError, ValueError, SyntaxError) as exc:
                self._load_failures += 1
                print(f"warning: {self.root}: object {self.ids[j]} failed to load "
                      f"({type(exc).__name__}: {exc}); using the next one", file=sys.stderr)
        raise InputError(f"{self.root}: no object could be loaded")

    def _load(self, i: int) -> dict:
        rec, folder, s = self.records[i], self.root / self.ids[i], self.image_size
        g = int(torch.randint(len(rec["groups"]), (1,)))
        cams = rec["groups"][g]
        rgb, masks = zip(*(load_view(folder / c["file"], s) for c in cams))
        out = {"images": torch.stack(rgb), "masks": torch.stack(masks), **camera_tensors(cams),
               "caption": rec["caption"], "id": self.ids[i], "group": g}
        if self.anchor_group:
            # any group but the item's: anchors and targets never share a camera
            a = int(torch.randint(len(rec["groups"]) - 1, (1,)))
            anchor_cams = rec["groups"][a + (a >= g)]
            rgb, masks = zip(*(load_view(folder / c["file"], s) for c in anchor_cams))
            out["anchor_images"], out["anchor_masks"] = torch.stack(rgb), torch.stack(masks)
            out.update({f"anchor_{k}": v for k, v in camera_tensors(anchor_cams).items()})
        if self.with_reference and rec["references"]:
            ref = rec["references"][int(torch.randint(len(rec["references"]), (1,)))]
            image, mask = load_view(folder / ref["file"], s)
            out["reference"], out["reference_mask"] = image, mask
            for k, v in camera_tensors([ref]).items():
                out[f"reference_{k}"] = v[0]
        return out

    def mesh_path(self, i: int) -> Optional[str]:
        """The ground-truth mesh of object ``i``, or None."""
        return self.records[i]["mesh"]

    @staticmethod
    def cameras(sample: dict) -> Cameras:
        """The group's cameras of one item (c2w [V,4,4]) or a collated batch ([B,V,4,4]),
        as Cameras with views_per_object=V (fovy converted to radians)."""
        return _cameras(sample, "", sample["c2w"].shape[-3])

    @staticmethod
    def anchor_cameras(sample: dict) -> Cameras:
        """The anchor group's cameras of one item or a batch (``anchor_group=True``)."""
        return _cameras(sample, "anchor_", sample["anchor_c2w"].shape[-3])

    @staticmethod
    def reference_cameras(sample: dict) -> Cameras:
        """The reference view's camera(s) of one item or a batch, one view per object."""
        return _cameras(sample, "reference_", 1)

    @staticmethod
    def collate(batch: List[dict]) -> dict:
        return collate(batch)


def _cameras(sample: dict, prefix: str, views: int) -> Cameras:
    c2w = sample[prefix + "c2w"].reshape(-1, 4, 4)
    flat = {k: sample[prefix + k].reshape(-1) for k in ("elevation", "azimuth", "distance",
                                                         "fovy")}
    return Cameras(c2w, torch.deg2rad(flat["fovy"]), flat["elevation"], flat["azimuth"],
                   flat["distance"], views_per_object=views)


_REFERENCE_KEYS = ("reference", "reference_mask", "reference_c2w", "reference_elevation",
                   "reference_azimuth", "reference_distance", "reference_fovy")


def collate(batch: List[dict]) -> dict:
    """Stack items into a batch: tensors gain a leading B, ``caption``/``id`` become lists,
    ``group`` a long tensor [B]. When some items have a reference view and some not, the
    missing ones are filled (white image, empty mask, identity c2w, zero angles) and
    ``has_reference`` [B] bool says which are real; it is present whenever references are."""
    if not batch:
        raise ValueError("collate: empty batch")
    out: dict = {}
    with_ref = [all(k in b for k in _REFERENCE_KEYS) for b in batch]
    if any(with_ref):
        proto = batch[with_ref.index(True)]
        fill = {"reference": torch.ones_like(proto["reference"]),
                "reference_mask": torch.zeros_like(proto["reference_mask"]),
                "reference_c2w": torch.eye(4)}
        for k in _REFERENCE_KEYS:
            out[k] = torch.stack([b[k] if r else fill.get(k, torch.zeros(()))
                                  for b, r in zip(batch, with_ref)])
        out["has_reference"] = torch.tensor(with_ref)
    for k, v in batch[0].items():
        if k in _REFERENCE_KEYS:
            continue
        if isinstance(v, torch.Tensor):
            out[k] = torch.stack([b[k] for b in batch])
        elif k == "group":
            out[k] = torch.tensor([b[k] for b in batch], dtype=torch.long)
        else:
            out[k] = [b[k] for b in batch]
    return out
