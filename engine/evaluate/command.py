"""``python -m engine.evaluate``: score a predicted mesh against a reference mesh.

    python -m engine.evaluate PRED_MESH REF_MESH [threshold=0.05] [icp=true] [samples=10000]
        [json=OUT.json]
    python -m engine.evaluate bench=toy recipe=NAME [recipe=NAME ...] [out=DIR] [objects=N]
        [seed=S] [data=DIR] [initial_from=RECIPE] [key=value overrides for every run]

Both meshes are normalised (centred, largest side 1); the prediction is aligned by a yaw
search and ICP (icp=false: the yaw search only); Chamfer distance, volume IoU (64^3) and
F-score (at distance ``threshold``, on ``samples`` surface points) are printed (see
engine/evaluate/metrics.py for the definitions) and, with json=, also written to that file.
The second form is the held-out toy benchmark (engine/evaluate/benchmark.py): it runs recipes
over toy objects and writes tables, a chart and a contact sheet.

Mistakes (a misspelt key, a mesh that cannot be read) are one line on stderr, exit code 2.
"""

from __future__ import annotations

import json
import sys
import time
from typing import List, Optional


USAGE = """\
usage: python -m engine.evaluate PRED_MESH REF_MESH [threshold=0.05] [icp=true]
                                 [samples=10000] [json=OUT.json]
       python -m engine.evaluate bench=toy recipe=NAME [recipe=NAME ...] [key=value ...]
                                 (python -m engine.evaluate bench=toy --help)

""" + __doc__.split("\n\n", 2)[2]


def command():
    from engine.cli import Command, Key

    return Command("python -m engine.evaluate", USAGE, [
        Key("threshold", float, 0.05, help="F-score distance (> 0)"),
        Key("icp", bool, True, help="refine the yaw alignment with ICP"),
        Key("json", str, help="also write the scores to this JSON file"),
        Key("samples", int, 10000, help="surface points per mesh (>= 100)",
            maximum=10_000_000),
    ], positional=("pred", "ref"))


def run(argv: List[str]) -> int:
    from engine.errors import ConfigError, InputError
    from engine.evaluate.metrics import compare_files

    args = command().parse(argv)
    if args.threshold <= 0:
        raise ConfigError(f"threshold: must be > 0, got {args.threshold}")
    if args.samples < 100:
        raise ConfigError(f"samples: must be >= 100 surface points, got {args.samples}")
    t0 = time.time()
    scores = compare_files(args.pred, args.ref, samples=args.samples,
                           threshold=args.threshold, icp=args.icp)
    result = {**scores.as_dict(), "seconds": round(time.time() - t0, 2)}
    for k, v in result.items():
        print(f"{k:>12}: {v:.4f}" if isinstance(v, float) else f"{k:>12}: {v}")
    if args.json:
        try:
            with open(args.json, "w") as f:
                json.dump(result, f, indent=2)
        except OSError as exc:
            raise InputError(f"json={args.json}: cannot write it ({exc.strerror})") from None
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if any(a.startswith("bench=") for a in argv):
        from engine.evaluate.benchmark import main as bench_main

        return bench_main(argv)
    from engine.errors import run_cli

    if not argv:
        command().print_help()
        return 0
    return run_cli(run, argv)   # --help: the usage, exit code 0 (SystemExit)


if __name__ == "__main__":
    sys.exit(main())
