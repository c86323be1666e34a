"""Held-out quality of a toy point model: its clouds of the 20 held-out toy objects against
their true clouds, beside two baselines that need no model.

    python benchmarks/bench_pointe_toy.py [model=models/toy/pointe] [data=data/toy]
        [objects=20] [seeds=1] [steps=0] [guidance_scale=-1] [out=DIR]

Each held-out object's canonical front view (r0.png, the picture the toy benchmark gives every
recipe) goes through the model (its own picture preparation and sampler; ``seeds`` draws per
object, seeds 0..); the truth is 2048 points on the object's mesh.obj with its colours
(engine.datasets.point_clouds.sample_surface). Scores per object, then means:

* ``chamfer``: the toy benchmark's protocol for clouds: both centred on their bounding box and
  scaled so its largest side is 1, the prediction turned about z in 5-degree steps to its
  best fit (the benchmark's yaw search), Chamfer = the mean of the two directions' mean
  nearest-neighbour distances;
* ``chamfer_world``: Chamfer in the engine's world units with no alignment at all (right
  place, size and turn: the picture's camera at azimuth 0);
* ``colour``: mean absolute rgb error of each predicted point against its nearest true point;
* ``right_kind`` and ``shape_swap`` on C[i, j] = chamfer of object i's cloud to truth j
  (engine.evaluate.view_scores, as the benchmark's shape checks; chance in brackets).

Baselines: ``mean cloud`` - one cloud for every object, the training object's cloud with the
least mean Chamfer to all training clouds (the medoid: the best single answer under the
metric); ``retrieval`` - the training object whose front view's CLIP embedding is nearest the
picture's (what the embedding alone tells, no generation). Writes OUT/results.json and
results.md, prints the table.
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

from _toy_objects import kind_of, write_results  # noqa: E402
from _toy_objects import truth_cloud as toy_truth_cloud  # noqa: E402

TRUTH_POINTS = 2048


def command():
    from engine.cli import Command, Key

    return Command("python benchmarks/bench_pointe_toy.py", __doc__, [
        Key("model", str, "models/toy/pointe", help="point-model folder"),
        Key("data", str, "data/toy", help="the toy world (made there when missing)"),
        Key("objects", int, 20, help="held-out objects (1..20)"),
        Key("seeds", int, 1, help="clouds per object"),
        Key("steps", int, 0, help="sampler steps (0: the model's)"),
        Key("guidance_scale", float, -1.0, help="guidance (-1: the model's)"),
        Key("points", int, 0, help="points (0: the model's)"),
        Key("out", str, "outputs/bench-pointe-toy", help="folder for the tables"),
        Key("threads", int, 0, help="torch threads (0: torch's default)"),
    ])


def normalise(xyz: np.ndarray) -> np.ndarray:
    lo, hi = xyz.min(0), xyz.max(0)
    return (xyz - (lo + hi) / 2) / max(float((hi - lo).max()), 1e-9)


def protocol_chamfer(pred: np.ndarray, truth: np.ndarray, step: float = 5.0) -> float:
    from engine.datasets.point_clouds import best_yaw_chamfer

    return best_yaw_chamfer(normalise(pred[:, :3]), normalise(truth[:, :3]), step)[0]


def truth_cloud(obj: Path, seed: int = 0) -> np.ndarray:
    return toy_truth_cloud(obj, TRUTH_POINTS, seed)


def run(argv: List[str]) -> int:
    from engine.datasets.point_clouds import chamfer, colour_error
    from engine.errors import ConfigError
    from engine.evaluate.benchmark import bench_objects
    from engine.evaluate.view_scores import right_kind_share, swap_test_accuracy
    from guidance.pointcloud.picture import PointCloudModel, describe

    args = command().parse(argv)
    if not 1 <= args.objects <= 20 or args.seeds < 1:
        raise ConfigError("objects must be in [1, 20] and seeds >= 1")
    if args.threads:
        torch.set_num_threads(args.threads)
    data = Path(args.data)
    objs = bench_objects(data, args.objects, 0, generate_missing=True)
    record = json.loads((data / "dataset.json").read_text())
    train = [data / oid for oid in record["splits"]["train"]]
    model = PointCloudModel.load(args.model)
    s = model.settings
    print(describe(model), file=sys.stderr)

    # truths and the baselines' material
    truths = [truth_cloud(o) for o in objs]
    train_clouds = [truth_cloud(o)[:: TRUTH_POINTS // 512] for o in train]
    t0 = time.perf_counter()
    sub = [c[::4] for c in train_clouds]                  # 128 points: the medoid's search
    mean_d = [np.mean([chamfer(a, b) for b in sub]) for a in sub]
    medoid = int(np.argmin(mean_d))
    print(f"mean cloud: {train[medoid].name} ({kind_of(train[medoid])}), "
          f"{time.perf_counter() - t0:.0f} s", file=sys.stderr)

    def embed(obj: Path) -> torch.Tensor:
        picture = model.picture(obj / "r0.png")
        return model.encoder.embedding(picture.rgb.permute(2, 0, 1)[None])[0]

    train_emb = torch.stack([embed(o) for o in train])

    rows: List[Dict] = []
    methods: Dict[str, List[np.ndarray]] = {"model": [], "mean cloud": [], "retrieval": []}
    for i, obj in enumerate(objs):
        picture = model.picture(obj / "r0.png")
        clouds = []
        t = time.perf_counter()
        for seed in range(args.seeds):
            clouds.append(model.cloud(picture.rgb, seed=seed, steps=args.steps or None,
                                      guidance_scale=None if args.guidance_scale < 0
                                      else args.guidance_scale,
                                      points=args.points or None).numpy())
        seconds = (time.perf_counter() - t) / args.seeds
        emb = model.encoder.embedding(picture.rgb.permute(2, 0, 1)[None])[0]
        nearest = int(torch.argmax(train_emb @ emb))
        candidates = {"model": clouds, "mean cloud": [train_clouds[medoid]],
                      "retrieval": [train_clouds[nearest]]}
        for name, cs in candidates.items():
            methods[name].append(cs[0])
            rows.append({"object": obj.name, "kind": kind_of(obj), "method": name,
                         "chamfer": float(np.mean([protocol_chamfer(c, truths[i]) for c in cs])),
                         "chamfer_world": float(np.mean([chamfer(c, truths[i]) for c in cs])),
                         "colour": float(np.mean([colour_error(c, truths[i]) for c in cs])),
                         **({"seconds": round(seconds, 2)} if name == "model" else {}),
                         **({"retrieved": train[nearest].name} if name == "retrieval" else {})})
        print(f"{obj.name} ({kind_of(obj)}): " + ", ".join(
            f"{r['method']} {r['chamfer']:.4f}" for r in rows[-3:]), file=sys.stderr)

    kinds = [kind_of(o) for o in objs]
    means = {}
    for name, clouds in methods.items():
        mine = [r for r in rows if r["method"] == name]
        c = np.array([[protocol_chamfer(p, t, 15.0) for t in truths] for p in clouds])
        chance = float(sum(kinds.count(k) for k in kinds) / len(kinds))
        means[name] = {k: float(np.mean([r[k] for r in mine]))
                       for k in ("chamfer", "chamfer_world", "colour")}
        means[name].update({"right_kind": float(right_kind_share(-c, kinds).sum()),
                            "right_kind_chance": chance,
                            "shape_swap": swap_test_accuracy(-c, kinds),
                            "rows": len(mine)})
        if name == "model":
            means[name]["seconds"] = float(np.mean([r["seconds"] for r in mine]))
    command_line = "python benchmarks/bench_pointe_toy.py " + " ".join(argv)
    lines = [f"`{command_line}`", "", f"{describe(model)}; {args.seeds} seed(s) per object, "
             f"{args.steps or s.steps} steps, guidance {args.guidance_scale if args.guidance_scale >= 0 else s.guidance_scale}",
             "", "| method | chamfer ↓ | chamfer, world, unaligned ↓ | colour error ↓ | "
             "right kind ↑ (chance) | shape swap ↑ | s / cloud |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for name, m in means.items():
        lines.append(f"| {name} | {m['chamfer']:.4f} | {m['chamfer_world']:.4f} | "
                     f"{m['colour']:.3f} | {m['right_kind']:g} / {m['rows']} "
                     f"({m['right_kind_chance']:.1f}) | {m['shape_swap']:.3f} | "
                     f"{m.get('seconds', float('nan')):.1f} |")
    write_results(Path(args.out), lines, {"command": command_line, "means": means,
                                          "rows": rows})
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    from engine.errors import run_cli

    return run_cli(run, sys.argv[1:] if argv is None else argv)


if __name__ == "__main__":
    sys.exit(main())
