"""Envision3D's interpolation at toy scale, scored: views drawn between anchor views against
the truth, on held-out toy objects, with and without the anchors as conditions.

    python benchmarks/bench_anchor_views.py [model=models/toy/anchors]
        [baseline=models/toy/stage2] [data=data/toy] [split=heldout] [limit=20] [steps=30]
        [scale=1] [seed=0] [anchors=4] [out=outputs/bench-anchor-views]

For every object of the split, camera group 0's 4 views are the anchors and group 1's 4 views
(another elevation and azimuth offset) the targets; the picture that conditions every model
is the object's canonical front view r0.png. Rows (same noise for every row and object):

* ``truth anchors``: ``model`` draws group 1 with ``anchors`` of group 0's TRUE views (its
  first ``anchors`` views) in its attention: the interpolation mode itself;
* ``sampled anchors``: as the recipe envision3d-toy runs it: ``baseline`` draws group 0 for
  the picture (its anchors), then ``model`` draws group 1 between them;
* ``no anchors``: ``model`` draws group 1 from the picture alone (it trained a tenth of its
  steps so);
* ``baseline``: ``baseline`` (the stage-2 model) draws group 1 from the picture alone, as
  every earlier toy recipe's views are drawn.

Scores per target view against the truth (both on white, 32 px): PSNR, SSIM, silhouette IoU
(masks at 0.5; the sample's from its distance to white, as the recipes read it), mean over
views and objects. Prints the table; writes scores.json and a contact sheet (per object:
truth, then each row's views) to out=.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROWS = ("truth anchors", "sampled anchors", "no anchors", "baseline")


def view_scores(rgb: torch.Tensor, mask: torch.Tensor, true_rgb: torch.Tensor,
                true_mask: torch.Tensor) -> dict:
    """Mean PSNR, SSIM and silhouette IoU of views rgb [V, S, S, 3], mask [V, S, S, 1]
    against the truth (same shapes, on white)."""
    from engine.evaluate.metrics import psnr, ssim

    window = min(11, rgb.shape[1] - 1 + rgb.shape[1] % 2)     # odd, within tiny test views
    p = [psnr(a, b) for a, b in zip(rgb, true_rgb)]
    s = [ssim(a, b, window=window) for a, b in zip(rgb, true_rgb)]
    a, b = mask > 0.5, true_mask > 0.5
    iou = [float((x & y).sum()) / max(float((x | y).sum()), 1.0) for x, y in zip(a, b)]
    return {"psnr": float(np.mean(p)), "ssim": float(np.mean(s)), "iou": float(np.mean(iou))}


def main(argv=None) -> int:
    from engine.cli import Command, Key
    from engine.errors import ConfigError, InputError, run_cli

    cmd = Command("python benchmarks/bench_anchor_views.py", __doc__, [
        Key("model", str, "models/toy/anchors", help="a mode-anchors model folder"),
        Key("baseline", str, "models/toy/stage2", help="draws the anchors; the baseline row"),
        Key("data", str, "data/toy", help="a toy-world dataset (2 camera groups per object)"),
        Key("split", str, "heldout"),
        Key("limit", int, 20, help="first N objects of the split"),
        Key("steps", int, 30, help="DDIM steps"),
        Key("scale", float, 1.0, help="guidance scale"),
        Key("seed", int, 0),
        Key("anchors", int, 4, help="truth anchors given (the first N views of group 0)"),
        Key("out", str, "outputs/bench-anchor-views"),
    ])

    def run(items):
        args = cmd.parse(items)
        if not 1 <= args.anchors <= 4:
            raise ConfigError(f"anchors: must be in 1..4, got {args.anchors}")
        data = Path(args.data)
        if not (data / "dataset.json").is_file():
            raise InputError(f"no toy dataset in {data}; make it with python -m "
                             f"engine.datasets.toy_world out={data} count=200 heldout=20 seed=0")
        return bench(args)

    return run_cli(run, sys.argv[1:] if argv is None else argv)


@torch.no_grad()
def bench(args) -> int:
    from engine.datasets.mvdataset import MultiViewDataset, camera_tensors, load_view
    from engine.outputs import save_grid
    from engine.plugin import ReferenceImage
    from guidance.multiview.prior import MultiViewPrior
    from guidance.multiview.targets import clean_views

    ds = MultiViewDataset(args.data, split=args.split, num_views=4, with_reference=True,
                          anchor_group=True)
    model = MultiViewPrior.load(args.model, device="cpu")
    base = MultiViewPrior.load(args.baseline, device="cpu")
    size = model.image_size
    totals = {r: [] for r in ROWS}
    per_object, sheet = [], []
    t0 = time.perf_counter()
    for i, oid in enumerate(ds.ids[:args.limit]):
        rec, folder = ds.records[i], Path(args.data) / oid
        rgb0, mask0 = load_view(folder / "r0.png", 64)
        picture = ReferenceImage(rgb0.permute(1, 2, 0), mask0.permute(1, 2, 0), str(folder))
        views = {}
        for g in (0, 1):
            cams = rec["groups"][g]
            rgbs, masks = zip(*(load_view(folder / c["file"], size) for c in cams))
            views[g] = (torch.stack(rgbs).permute(0, 2, 3, 1), torch.stack(masks)
                        .permute(0, 2, 3, 1), MultiViewDataset.cameras(camera_tensors(cams)))
        true_rgb, true_mask, target_cams = views[1]

        contexts = {id(p): p.contexts(picture) for p in (model, base)}   # once per object

        def draw(prior, anchors=None, seed=args.seed):
            cond, uncond = contexts[id(prior)]
            cam16 = prior.camera_vectors(target_cams).to(cond)
            out = prior.sample(cond, uncond, cam16, args.steps, args.scale, 0.0,
                               torch.Generator().manual_seed(seed), anchors=anchors)
            return clean_views(out.float().permute(0, 2, 3, 1), 0.08, 0.2)

        def anchors_of(rgb):
            k = list(range(args.anchors))
            cams = views[0][2][k]
            x0 = model.encode(rgb[k].permute(0, 3, 1, 2))
            return x0, model.camera_vectors(cams).to(x0)

        # the anchors the recipe would have: the baseline's group 0 for the picture
        cond_b, uncond_b = contexts[id(base)]
        drawn = base.sample(cond_b, uncond_b, base.camera_vectors(views[0][2]).to(cond_b),
                            args.steps, args.scale, 0.0,
                            torch.Generator().manual_seed(args.seed + 500))
        drawn_rgb, _ = clean_views(drawn.float().permute(0, 2, 3, 1), 0.08, 0.2)
        results = {"truth anchors": draw(model, anchors_of(views[0][0])),
                   "sampled anchors": draw(model, anchors_of(drawn_rgb)),
                   "no anchors": draw(model),
                   "baseline": draw(base)}
        row = {"object": oid, "kind": json.loads((folder / "object.json").read_text())
               .get("kind", "?")}
        for name, (rgb, mask) in results.items():
            s = view_scores(rgb, mask, true_rgb, true_mask)
            totals[name].append(s)
            row[name] = s
        per_object.append(row)
        print(f"{oid} ({row['kind']}): " + ", ".join(
            f"{n} {row[n]['psnr']:.2f} dB / {row[n]['iou']:.3f}" for n in ROWS), flush=True)
        sheet.append(torch.cat([true_rgb] + [results[n][0] for n in ROWS]))
    seconds = time.perf_counter() - t0
    mean = {n: {k: float(np.mean([s[k] for s in totals[n]])) for k in ("psnr", "ssim", "iou")}
            for n in ROWS}
    n_obj = len(per_object)
    print(f"\n{n_obj} objects of {args.data} ({args.split}), {args.steps} DDIM steps, scale "
          f"{args.scale}, {args.anchors} truth anchors; {seconds:.0f} s\n")
    print("| views of group 1 | PSNR | SSIM | silhouette IoU |\n|---|---:|---:|---:|")
    for n in ROWS:
        print(f"| {n} | {mean[n]['psnr']:.2f} | {mean[n]['ssim']:.3f} | {mean[n]['iou']:.3f} |")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "scores.json").write_text(json.dumps({
        "settings": {k: getattr(args, k) for k in ("model", "baseline", "data", "split",
                                                    "limit", "steps", "scale", "seed",
                                                    "anchors")},
        "seconds": round(seconds, 1), "mean": mean, "objects": per_object}, indent=1) + "\n")
    save_grid(out / "contact-sheet.png", sheet)
    print(f"\nscores: {out / 'scores.json'}\ncontact sheet: {out / 'contact-sheet.png'} (per "
          "object: truth, " + ", ".join(ROWS) + ")")
    return 0


if __name__ == "__main__":
    sys.exit(main())
