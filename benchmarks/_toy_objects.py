"""What the toy benchmarks share: the held-out objects' truths (mesh, coloured surface
points, kind) and writing a table beside its raw rows.

Imported by the scripts in this folder (``from _toy_objects import ...`` works because a
script's own folder is on ``sys.path``)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import List

import numpy as np


def load_mesh(obj: Path):
    """The object's true mesh (``mesh.obj``) as a trimesh, unprocessed."""
    import trimesh

    return trimesh.load(str(Path(obj) / "mesh.obj"), process=False, force="mesh")


def truth_cloud(obj: Path, count: int, seed: int = 0) -> np.ndarray:
    """``count`` coloured points on the object's true mesh, [count, 6] (xyz, rgb in [0, 1]),
    seeded (:func:`engine.datasets.point_clouds.sample_surface`)."""
    from engine.datasets.point_clouds import sample_surface

    return sample_surface(load_mesh(obj), count, seed=seed)


def kind_of(obj: Path) -> str:
    """The object's kind from its object.json (its folder name when it has none)."""
    return json.loads((Path(obj) / "object.json").read_text()).get("kind", Path(obj).name)


def write_results(out: Path, lines: List[str], payload: dict) -> None:
    """OUT/results.md (``lines``) and OUT/results.json (``payload``), then the table printed."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(payload, indent=1))
    (out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
