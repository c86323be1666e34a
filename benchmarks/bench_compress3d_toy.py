"""Compress3D's feed-forward path on the toy benchmark's 20 held-out objects: picture ->
shape embedding -> triplane latent -> decoded mesh, for one or more models (e.g. with and
without the shape embedding: the paper's ablation), scored as the toy benchmark scores a
recipe's mesh.

    python benchmarks/bench_compress3d_toy.py [models=[models/toy/compress3d,...]]
        [data=data/toy] [objects=20] [seed=0] [steps=0] [guidance_scale=-1]
        [resolution=64] [out=DIR] [threads=0]

Each held-out object's front view (r0.png, the picture the toy benchmark gives every recipe,
camera at azimuth 0) goes through :meth:`guidance.compress3d.pipeline.Compress3D.generate`;
the mesh (marching cubes at ``resolution``) is written to OUT/meshes/MODEL/OBJECT.ply and
scored against the true mesh:

* ``chamfer``, ``IoU``, ``F-score``: :func:`engine.evaluate.metrics.compare_files`, the toy
  benchmark's protocol (normalised, yaw-searched, ICP-aligned; F at 0.05);
* ``colour``: mean absolute rgb error of the decoded colour at 4096 true surface points
  (seed 1), in the picture's frame (no alignment: azimuth 0 is the object's own frame);
* ``shape swap`` and ``right kind`` (chance in brackets):
  :func:`engine.evaluate.benchmark.shape_checks`, as the toy benchmark's table;
* ``s / object``: loading the picture, sampling both models and decoding the mesh (not the
  scoring), on this machine.

Rows whose decoded field has no surface count as failed (``empty``). Writes OUT/results.json
and results.md and prints the table.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from _toy_objects import kind_of, truth_cloud, write_results  # noqa: E402


def command():
    from engine.cli import Command, Key

    return Command("python benchmarks/bench_compress3d_toy.py", __doc__, [
        Key("models", list, ["models/toy/compress3d"], help="Compress3D model folders"),
        Key("data", str, "data/toy", help="the toy world (made there when missing)"),
        Key("objects", int, 20, help="held-out objects (1..20)"),
        Key("seed", int, 0, help="the samplers' seed"),
        Key("steps", int, 0, help="DDIM steps (0: the model's)"),
        Key("guidance_scale", float, -1.0, help="guidance (-1: the model's)"),
        Key("resolution", int, 64, help="marching-cubes grid"),
        Key("out", str, "outputs/bench-compress3d-toy", help="folder for the tables"),
        Key("threads", int, 0, help="torch threads (0: torch's default)"),
        Key("checks", bool, True, help="shape swap / right kind (slow on CPU: 400 mesh "
                                       "comparisons per model)"),
    ])


@torch.no_grad()
def colour_error(model, latent: torch.Tensor, truth: np.ndarray) -> float:
    ae = model.autoencoder
    t = torch.from_numpy(truth).float()
    rgb = ae.query(ae.decode(latent[None].to(model.device)), t[None, :, :3].to(model.device))[1]
    return float((rgb[0].cpu() - t[:, 3:]).abs().mean())


def run(argv: List[str]) -> int:
    from engine.errors import ConfigError
    from engine.evaluate.benchmark import bench_objects, shape_checks
    from engine.evaluate.metrics import compare_files
    from guidance.compress3d.pipeline import Compress3D, describe

    args = command().parse(argv)
    if not 1 <= args.objects <= 20 or args.resolution < 8 or not args.models:
        raise ConfigError("objects must be in [1, 20], resolution >= 8, models not empty")
    if args.threads:
        torch.set_num_threads(args.threads)
    objs = bench_objects(Path(args.data), args.objects, 0, generate_missing=True)
    out = Path(args.out)
    rows: List[Dict] = []
    names = []
    for spec in args.models:
        model = Compress3D.load(spec, key="models")
        name = Path(spec).name if Path(spec).name != "model" else Path(spec).parent.name
        names.append(name)
        print(describe(model), file=sys.stderr)
        for obj in objs:
            row = {"recipe": name, "object": obj.name, "kind": kind_of(obj), "ok": False}
            result = model.generate(obj / "r0.png", seed=args.seed, steps=args.steps or None,
                                    guidance_scale=None if args.guidance_scale < 0
                                    else args.guidance_scale, resolution=args.resolution)
            row["seconds"] = round(sum(result.seconds.values()), 2)
            row["colour"] = colour_error(model, result.latent, truth_cloud(obj, 4096, seed=1))
            if result.mesh is None:
                row["empty"] = True
            else:
                path = out / "meshes" / name / f"{obj.name}.ply"
                path.parent.mkdir(parents=True, exist_ok=True)
                result.mesh.export(str(path))
                m = compare_files(str(path), str(obj / "mesh.obj"))
                row.update(mesh=str(path), chamfer=m.chamfer, volume_iou=m.volume_iou,
                           f_score=m.f_score, ok=True)
            rows.append(row)
            print(f"{name} {obj.name} ({row['kind']}): chamfer {row.get('chamfer', float('nan')):.4f}"
                  f" IoU {row.get('volume_iou', 0.0):.3f} F {row.get('f_score', 0.0):.3f} "
                  f"colour {row['colour']:.3f} "
                  f"({row['seconds']:.1f} s)", file=sys.stderr)
    checks = (shape_checks(rows, {o.name: o for o in objs}, names) if args.checks
              else {n: {} for n in names})
    means = {}
    for name in names:
        mine = [r for r in rows if r["recipe"] == name]
        ok = [r for r in mine if r["ok"]]
        means[name] = {k: (float(np.mean([r[k] for r in ok])) if ok else float("nan"))
                       for k in ("chamfer", "volume_iou", "f_score")}
        means[name].update(colour=float(np.mean([r["colour"] for r in mine])),
                           seconds=float(np.median([r["seconds"] for r in mine])),
                           empty=len(mine) - len(ok), rows=len(mine), **checks[name])
    command_line = "python benchmarks/bench_compress3d_toy.py " + " ".join(argv)
    lines = [f"`{command_line}`", "",
             f"{args.objects} held-out objects, r0.png, seed {args.seed}; marching cubes at "
             f"{args.resolution}", "",
             "| model | chamfer ↓ | IoU ↑ | F-score ↑ | colour error ↓ | shape swap ↑ | "
             "right kind ↑ (chance) | empty | s / object (median) |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name, m in means.items():
        kind = ("—" if m.get("right_kind") is None else
                f"{m['right_kind']:g} / {m['kind_rows']} ({m['right_kind_chance']:.1f})")
        swap = "—" if m.get("shape_swap") is None else f"{m['shape_swap']:.3f}"
        lines.append(f"| {name} | {m['chamfer']:.4f} | {m['volume_iou']:.3f} | "
                     f"{m['f_score']:.3f} | {m['colour']:.3f} | {swap} | {kind} | "
                     f"{m['empty']} / {m['rows']} | {m['seconds']:.1f} |")
    write_results(out, lines, {"command": command_line, "means": means, "rows": rows})
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    from engine.errors import run_cli

    return run_cli(run, sys.argv[1:] if argv is None else argv)


if __name__ == "__main__":
    sys.exit(main())
