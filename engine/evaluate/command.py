"""``python -m engine.evaluate``: score a predicted mesh against a reference mesh.

    python -m engine.evaluate PRED_MESH REF_MESH [--threshold 0.05] [--no-icp] [--json OUT]
    python -m engine.evaluate bench=toy recipe=NAME [recipe=NAME ...] [out=DIR] [objects=N]
        [seed=S] [data=DIR] [initial_from=RECIPE] [key=value overrides for every run]

Both meshes are normalised (centred, largest side 1); the prediction is aligned by a yaw
search and ICP; Chamfer distance, volume IoU (64^3) and F-score are printed (see
engine/metrics.py for the definitions). The second form is the held-out toy benchmark
(engine/benchmark.py): it runs recipes over toy objects and writes tables, a chart and a
contact sheet.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import List, Optional


def main(argv: Optional[List[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if any(a.startswith("bench=") for a in argv):
        from engine.evaluate.benchmark import main as bench_main

        return bench_main(argv)
    from engine.errors import UserError
    from engine.evaluate.metrics import compare_files

    parser = argparse.ArgumentParser(prog="python -m engine.evaluate", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("pred")
    parser.add_argument("ref")
    parser.add_argument("--threshold", type=float, default=0.05, help="F-score distance")
    parser.add_argument("--samples", type=int, default=10000)
    parser.add_argument("--no-icp", action="store_true")
    parser.add_argument("--json", help="also write the scores to this JSON file")
    args = parser.parse_args(argv)
    try:
        if args.threshold <= 0 or args.samples < 100:
            raise UserError("--threshold must be > 0 and --samples >= 100")
        t0 = time.time()
        scores = compare_files(args.pred, args.ref, samples=args.samples,
                               threshold=args.threshold, icp=not args.no_icp)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    result = {**scores.as_dict(), "seconds": round(time.time() - t0, 2)}
    for k, v in result.items():
        print(f"{k:>12}: {v:.4f}" if isinstance(v, float) else f"{k:>12}: {v}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
