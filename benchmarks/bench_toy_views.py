"""Do the toy model's sampled views show the right object? Scored on held-out toy objects.

    python benchmarks/bench_toy_views.py [--model models/toy/stage2] [--data data/toy]
        [--split heldout] [--limit 20] [--steps 30] [--scale 2] [--seed 0] [--seeds 2]
        [--object-fraction 0.7] [--condition image|caption] [--candidates 1]
        [--out outputs/bench-views]

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
blob overlaps, with its chance), and the hue. The grids and scores.json go to --out.
``--condition caption`` gives a text model (models/toy/text) the object's caption instead of
its picture: whether the multi-view model can draw a kind when it is told the kind in words,
which tells a weak UNet from a weak image conditioning. ``--candidates K`` samples K seeds per
object and seed and keeps the group whose first view is most like the picture (guidance.multiview.sample
candidates=K; the seeds of the runs are then K apart), as recipe isotropic3d-toy-views does.
The data folder is the models' own dataset (``python -m engine.datasets.toy_world out=data/toy``).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="models/toy/stage2")
    ap.add_argument("--data", default="data/toy")
    ap.add_argument("--split", default="heldout")
    ap.add_argument("--limit", type=int, default=20)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--scale", type=float, default=2.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--seeds", type=int, default=2)
    ap.add_argument("--object-fraction", type=float, default=0.7)
    ap.add_argument("--condition", choices=("image", "caption"), default="image")
    ap.add_argument("--candidates", type=int, default=1)
    ap.add_argument("--out", default="outputs/bench-views")
    args = ap.parse_args()

    import trimesh

    from engine.evaluate import view_scores as vs
    from guidance.multiview.sample import main as sample, read_views

    data, out = Path(args.data), Path(args.out)
    if not (data / "dataset.json").is_file():
        raise SystemExit(f"error: no toy dataset in {data}; make it with python -m "
                         f"engine.datasets.toy_world out={data} (the models' own: count=200 heldout=20 "
                         "seed=0) or pass --data")
    index = json.loads((data / "dataset.json").read_text())
    if args.split not in index.get("splits", {}):
        raise SystemExit(f"error: {data} has no split '{args.split}'; it has "
                         f"{', '.join(index.get('splits', {}))}")
    ids = index["splits"][args.split][:args.limit]
    samples, truths, kinds = {}, {}, {}      # samples: {seed: {object: views}}
    t0 = time.perf_counter()
    for oid in ids:
        mesh = trimesh.load(data / oid / "mesh.obj", force="mesh", process=False)
        record = json.loads((data / oid / "object.json").read_text())
        kinds[oid] = record.get("kind", "?")
        if args.condition == "caption" and not record.get("caption"):
            raise SystemExit(f"error: {oid} has no caption; --condition caption needs one")
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


if __name__ == "__main__":
    main()
