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
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np
import torch
import trimesh

# the objects live in toy_shapes; their names are this module's public face too
from engine.datasets.toy_shapes import (COLOR_NAMES, KINDS, OBJECT_RADIUS, PALETTE,
                                        caption_for, display_name, make_object)

__all__ = ["COLOR_NAMES", "KINDS", "OBJECT_RADIUS", "PALETTE", "caption_for", "display_name",
           "make_object", "generate", "render_object", "sample_cameras", "split_ids", "main"]

USAGE = __doc__.split("\n\n")[1]

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


def camera_distance(fovy_deg, fill) -> float:
    """Distance at which the object's bounding sphere spans ``fill`` of the frame height."""
    half = math.atan(fill * math.tan(math.radians(fovy_deg) / 2.0))
    return OBJECT_RADIUS / math.sin(half)


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
    from representations.lib.mesh_render import render_mesh

    m = mesh.metadata.get("render_parts", mesh)
    v = torch.as_tensor(np.asarray(m.vertices), dtype=torch.float32)
    f = torch.as_tensor(np.asarray(m.faces), dtype=torch.long)
    albedo = torch.as_tensor(np.asarray(m.visual.vertex_colors)[:, :3], dtype=torch.float32) / 255
    out = render_mesh(v, f, cameras, size, size, background=torch.zeros_like,   # black
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


def command():
    from engine.cli import Command, Key

    title = __doc__.split("\n\n")[0]
    return Command("python -m engine.datasets.toy_world", f"usage: {USAGE.strip()}\n\n{title}", [
        Key("out", str, required=True, help="where to write the dataset"),
        Key("count", int, _DEFAULTS["count"], help="objects (>= 1)"),
        Key("heldout", int, _DEFAULTS["heldout"], help="held-out objects"),
        Key("heldout_pool", int, _DEFAULTS["heldout_pool"],
            help="held-out objects are drawn among the first N (0: all)"),
        Key("seed", int, _DEFAULTS["seed"]),
        Key("size", int, _DEFAULTS["size"], help="view size in pixels (>= 16)",
            maximum=4096),
        Key("groups", int, _DEFAULTS["groups"], help="4-view groups (>= 1)", maximum=256),
        Key("references", int, _DEFAULTS["references"], help="free reference views (>= 0)"),
    ])


def parse_args(argv: List[str]) -> dict:
    from engine.errors import ConfigError

    args = command().parse(argv).as_dict()
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


def run(argv: List[str]) -> int:
    args = parse_args(argv)
    summary = generate(args["out"], **{k: args[k] for k in _DEFAULTS},
                       log=lambda s: print(s, file=sys.stderr))
    n = len(summary["ids"])
    print(f"wrote {n} objects ({len(summary['splits']['train'])} train, "
          f"{len(summary['splits']['heldout'])} held out) to {args['out']} in "
          f"{summary['seconds']:.1f} s ({summary['per_object']:.3f} s per object)")
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    from engine.errors import run_cli

    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv:
        command().print_help()
        return 0
    return run_cli(run, argv)   # --help: the usage, exit code 0 (SystemExit)


if __name__ == "__main__":
    sys.exit(main())
