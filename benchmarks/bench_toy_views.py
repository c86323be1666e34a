"""Do the toy model's sampled views show the right object? Scored on held-out toy objects.

    python benchmarks/bench_toy_views.py [model=models/toy/stage2] [data=data/toy]
        [split=heldout] [limit=20] [steps=30] [scale=2] [seed=0] [seeds=2]
        [object_fraction=0.7] [condition=image|caption] [candidates=1]
        [out=outputs/bench-views]

For every object of the split: its canonical front view (r0.png) goes through
``python -m guidance.multiview.sample`` (4 views, elevation 15, azimuths 0/90/180/270), once per seed
(seed, seed + 1, ...: the same noise for every object, so objects and models are compared on
equal terms; one seed alone is noisy - a pattern in one view's noise can show in every
object); the views are scored against every object's ground-truth mesh rendered at the same
cameras (engine.evaluate.view_scores), averaged over the seeds. Prints per object: its own silhouette
IoU (mean and worst view), the object whose truth the views match best, the rank of its own
truth, the hue error; then the summary: mean own IoU, the swap-test accuracy over pairs of
different kinds (chance 0.5; blind to size), how many objects are identified (own truth the
best match; biased to big compact truths), the right kind (the best match's kind; also on
scores centred per truth, engine.evaluate.view_scores.right_kind_share, which discounts the truth every
blob overlaps, with its chance), and the hue. The grids and scores.json go to out=.
``condition=caption`` gives a text model (models/toy/text) the object's caption instead of
its picture: whether the multi-view model can draw a kind when it is told the kind in words,
which tells a weak UNet from a weak image conditioning. ``candidates=K`` samples K seeds per
object and seed and keeps the group whose first view is most like the picture (guidance.multiview.sample
candidates=K; the seeds of the runs are then K apart), as recipe isotropic3d-toy-views does.
The data folder is the models' own dataset (``python -m engine.datasets.toy_world out=data/toy``).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np


def main(argv=None) -> int:
    from engine.cli import Command, Key
    from engine.errors import ConfigError, InputError

    args = Command("python benchmarks/bench_toy_views.py", __doc__, [
        Key("model", str, "models/toy/stage2", help="the multi-view model folder"),
        Key("data", str, "data/toy", help="a toy-world dataset"),
        Key("split", str, "heldout"),
        Key("limit", int, 20, help="first N objects of the split"),
        Key("steps", int, 30),
        Key("scale", float, 2.0, help="guidance scale"),
        Key("seed", int, 0),
        Key("seeds", int, 2),
        Key("object_fraction", float, 0.7),
        Key("condition", str, "image", choices=("image", "caption")),
        Key("candidates", int, 1),
        Key("out", str, "outputs/bench-views"),
    ]).parse(sys.argv[1:] if argv is None else argv)

    import trimesh

    from engine.evaluate import view_scores as vs
    from guidance.multiview.sample import main as sample, read_views

    data, out = Path(args.data), Path(args.out)
    if not (data / "dataset.json").is_file():
        raise InputError(f"no toy dataset in {data}; make it with python -m "
                         f"engine.datasets.toy_world out={data} (the models' own: count=200 "
                         "heldout=20 seed=0) or pass data=")
    index = json.loads((data / "dataset.json").read_text())
    if args.split not in index.get("splits", {}):
        raise ConfigError(f"split: {data} has no split '{args.split}'; it has "
                          f"{', '.join(index.get('splits', {}))}")
    ids = index["splits"][args.split][:args.limit]
    samples, truths, kinds = {}, {}, {}      # samples: {seed: {object: views}}
    t0 = time.perf_counter()
    for oid in ids:
        mesh = trimesh.load(data / oid / "mesh.obj", force="mesh", process=False)
        record = json.loads((data / oid / "object.json").read_text())
        kinds[oid] = record.get("kind", "?")
        if args.condition == "caption" and not record.get("caption"):
            raise InputError(f"{oid} has no caption; condition=caption needs one")
        condition = (f"prompt={record['caption']}" if args.condition == "caption"
                     else f"image={data / oid / 'r0.png'}")
        for seed in range(args.seed, args.seed + args.seeds):
            grid = out / f"{oid}-seed{seed}.png"
            first = args.seed + (seed - args.seed) * args.candidates
            extra = [f"candidates={args.candidates}"] if args.candidates > 1 else []
            code = sample([condition, f"out={grid}",
                           f"model={args.model}", f"steps={args.steps}", f"scale={args.scale}",
                           f"seed={first}", f"object_fraction={args.object_fraction}",
                           "device=cpu", *extra])
            if code != 0:
                raise SystemExit(f"guidance.multiview.sample failed on {oid}")
            samples.setdefault(seed, {})[oid] = read_views(grid)
        truths[oid] = vs.ground_truth_views(mesh, samples[args.seed][oid].shape[1])
    seconds = time.perf_counter() - t0

    m = np.mean([vs.iou_matrix(by_object, truths) for by_object in samples.values()], axis=0)
    rows = []
    print(f"{'object':<10} {'kind':<9} {'own IoU':>7} {'worst':>6} {'best match':<20} "
          f"{'rank':>4} {'hue err':>7}")
    for i, oid in enumerate(ids):
        ious = np.mean([vs.view_ious(s[oid], truths[oid]) for s in samples.values()], axis=0)
        best = ids[int(np.argmax(m[i]))]
        rank = 1 + int((m[i] > m[i, i]).sum())
        hue_err = float(np.mean([vs.hue_distance(vs.sample_hue(s[oid]), vs.truth_hue(truths[oid]))
                                 for s in samples.values()]))
        rows.append({"object": oid, "kind": kinds[oid], "own_iou": float(ious.mean()),
                     "worst_view_iou": float(ious.min()), "best_match": best,
                     "best_kind": kinds[best], "rank": rank, "hue_error": hue_err})
        print(f"{oid:<10} {kinds[oid]:<9} {ious.mean():7.3f} {ious.min():6.3f} "
              f"{best + ' (' + kinds[best] + ')':<20} {rank:4d} {hue_err:7.1f}")
    n = len(rows)
    kind_list = [kinds[o] for o in ids]
    summary = {
        "model": args.model, "condition": args.condition, "objects": n, "seeds": args.seeds,
        "candidates": args.candidates, "scale": args.scale,
        "seconds": round(seconds, 1),
        "mean_own_iou": float(np.mean([r["own_iou"] for r in rows])),
        "swap_test": vs.swap_test_accuracy(m, kind_list),
        "identified": int(sum(r["rank"] == 1 for r in rows)),
        "right_kind": int(sum(r["best_kind"] == r["kind"] for r in rows)),
        "right_kind_centred": float(vs.right_kind_share(m, kind_list).sum()),
        "right_kind_chance": float(sum(kind_list.count(k) for k in kind_list) / n),
        "mean_rank": float(np.mean([r["rank"] for r in rows])),
        "hue_within_30": int(sum(r["hue_error"] <= 30 for r in rows)),
    }
    print(f"\n{args.model}: {n} objects, mean own IoU {summary['mean_own_iou']:.3f}, "
          f"swap test {summary['swap_test']:.3f} (chance 0.5), "
          f"identified {summary['identified']}/{n}, right kind {summary['right_kind']}/{n} "
          f"({summary['right_kind_centred']:g}/{n} centred, chance "
          f"{summary['right_kind_chance']:.1f}), "
          f"mean rank {summary['mean_rank']:.2f} (chance {(n + 1) / 2:.1f}), hue within 30 deg "
          f"{summary['hue_within_30']}/{n}; sampling {seconds:.0f} s")
    out.mkdir(parents=True, exist_ok=True)
    (out / "scores.json").write_text(json.dumps({"summary": summary, "objects": rows,
                                                 "iou_matrix": m.round(4).tolist(),
                                                 "ids": ids}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    from engine.errors import run_cli

    sys.exit(run_cli(main, sys.argv[1:]))
