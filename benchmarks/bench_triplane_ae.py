"""Reconstruction quality of a triplane autoencoder (Compress3D's first stage) on the toy
benchmark's held-out objects, beside the one-latent-for-all baseline.

    python benchmarks/bench_triplane_ae.py model=DIR [data=data/toy] [objects=20]
        [points=1024] [resolution=64] [out=DIR] [threads=0]

Each held-out object's true mesh (mesh.obj) gives ``points`` coloured surface points (seed 0,
:func:`engine.datasets.point_clouds.sample_surface`), the model's input cloud; its latent's
mean is decoded and the occupancy's zero level meshed by marching cubes on a
``resolution``^3 grid (:func:`guidance.compress3d.autoencoder.decode_mesh`). Scores against the
true mesh, as the toy benchmark scores a recipe's mesh (:func:`engine.evaluate.metrics.compare_meshes`:
normalised, yaw-searched and ICP-aligned Chamfer, volume IoU, F-score at 0.05), and
``colour``: the mean absolute rgb error of the decoded colour at 4096 other true surface
points (no alignment: the autoencoder works in the object's own frame).

Baseline ``mean latent``: the mean of the training objects' latents, decoded once, for every
object (what the decoder makes of no information about the object). Writes OUT/results.json
and results.md and prints the table.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from _toy_objects import kind_of, load_mesh, truth_cloud, write_results  # noqa: E402


def command():
    from engine.cli import Command, Key

    return Command("python benchmarks/bench_triplane_ae.py", __doc__, [
        Key("model", str, "outputs/finetune/toy-triplane-ae/model",
            help="triplane autoencoder folder"),
        Key("data", str, "data/toy", help="the toy world (made there when missing)"),
        Key("objects", int, 20, help="held-out objects (1..20)"),
        Key("points", int, 1024, help="points of the input cloud"),
        Key("resolution", int, 64, help="marching-cubes grid"),
        Key("out", str, "outputs/bench-triplane-ae", help="folder for the tables"),
        Key("threads", int, 0, help="torch threads (0: torch's default)"),
    ])


def cloud_of(obj: Path, count: int, seed: int = 0) -> torch.Tensor:
    return torch.from_numpy(truth_cloud(obj, count, seed))


@torch.no_grad()
def colour_error(model, latent: torch.Tensor, truth: torch.Tensor) -> float:
    planes = model.decode(latent[None])
    rgb = model.query(planes, truth[None, :, :3])[1][0]
    return float((rgb - truth[:, 3:]).abs().mean())


def score(model, latent, obj: Path, resolution: int) -> Dict:
    from engine.evaluate.metrics import compare_meshes
    from guidance.compress3d.autoencoder import decode_mesh

    t = time.perf_counter()
    mesh = decode_mesh(model, latent, resolution)
    decode_s = time.perf_counter() - t
    truth = cloud_of(obj, 4096, seed=1)
    out = {"colour": colour_error(model, latent, truth), "decode_s": decode_s}
    if mesh is None:
        return {**out, "chamfer": float("nan"), "volume_iou": 0.0, "f_score": 0.0,
                "empty": True}
    s = compare_meshes(mesh, load_mesh(obj))
    return {**out, "chamfer": s.chamfer, "volume_iou": s.volume_iou, "f_score": s.f_score}


def run(argv: List[str]) -> int:
    from engine.errors import ConfigError
    from engine.evaluate.benchmark import bench_objects
    from guidance.compress3d.autoencoder import TriplaneAutoencoder

    args = command().parse(argv)
    if not 1 <= args.objects <= 20 or args.points < 1 or args.resolution < 8:
        raise ConfigError("objects must be in [1, 20], points >= 1, resolution >= 8")
    if args.threads:
        torch.set_num_threads(args.threads)
    data = Path(args.data)
    objs = bench_objects(data, args.objects, 0, generate_missing=True)
    record = json.loads((data / "dataset.json").read_text())
    train = [data / oid for oid in record["splits"]["train"]]
    model = TriplaneAutoencoder.from_pretrained(args.model)
    with torch.no_grad():
        mean_latent = torch.stack([model.encode(cloud_of(o, args.points)[None]).mode()[0]
                                   for o in train]).mean(0)
    rows: List[Dict] = []
    for obj in objs:
        cloud = cloud_of(obj, args.points)
        t = time.perf_counter()
        with torch.no_grad():
            latent = model.encode(cloud[None]).mode()[0]
        encode_s = time.perf_counter() - t
        row = {"object": obj.name, "kind": kind_of(obj), "method": "autoencoder",
               **score(model, latent, obj, args.resolution)}
        # seconds: encoding and decoding the mesh (not the scoring's alignment)
        row["seconds"] = round(encode_s + row.pop("decode_s"), 2)
        rows.append(row)
        rows.append({"object": obj.name, "kind": kind_of(obj), "method": "mean latent",
                     **score(model, mean_latent, obj, args.resolution)})
        rows[-1].pop("decode_s")
        print(f"{obj.name} ({row['kind']}): chamfer {row['chamfer']:.4f} IoU "
              f"{row['volume_iou']:.3f} colour {row['colour']:.3f} "
              f"(mean latent: {rows[-1]['chamfer']:.4f})", file=sys.stderr)
    means = {}
    for name in ("autoencoder", "mean latent"):
        mine = [r for r in rows if r["method"] == name]
        means[name] = {k: float(np.nanmean([r[k] for r in mine]))
                       for k in ("chamfer", "volume_iou", "f_score", "colour")}
        means[name]["empty"] = sum(bool(r.get("empty")) for r in mine)
        means[name]["rows"] = len(mine)
        if name == "autoencoder":
            means[name]["seconds"] = float(np.mean([r["seconds"] for r in mine]))
    command_line = "python benchmarks/bench_triplane_ae.py " + " ".join(argv)
    c = model.config
    lines = [f"`{command_line}`", "",
             f"{args.model}: volume {c.volume}, width {c.width}, latent {list(c.latent_shape)}; "
             f"{args.points}-point input clouds, marching cubes at {args.resolution}", "",
             "| method | chamfer ↓ | IoU ↑ | F-score ↑ | colour error ↓ | empty | s / object |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for name, m in means.items():
        lines.append(f"| {name} | {m['chamfer']:.4f} | {m['volume_iou']:.3f} | "
                     f"{m['f_score']:.3f} | {m['colour']:.3f} | {m['empty']} / {m['rows']} | "
                     f"{m.get('seconds', float('nan')):.1f} |")
    write_results(Path(args.out), lines, {"command": command_line, "means": means,
                                          "rows": rows})
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    from engine.errors import run_cli

    return run_cli(run, sys.argv[1:] if argv is None else argv)


if __name__ == "__main__":
    sys.exit(main())
