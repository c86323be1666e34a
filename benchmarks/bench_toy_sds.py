"""The toy UNet's SDS call in each precision: median milliseconds and the output's distance
from fp32's, all precisions in one process, their timed calls interleaved.

    python benchmarks/bench_toy_sds.py [model=models/toy/stage2] [precisions=[fp32,bf16]]
        [threads=1] [repeats=20]

The call is the one a toy recipe's multiview-sds step makes: 4 views at 32 px, classifier-free
guidance (a batch of 8 through the UNet), no gradient through the UNet. ``fast`` resolves to
bf16 on a CPU whose oneDNN computes it (AVX-512), else fp32 (guidance.multiview.prior).
"""

from __future__ import annotations

import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from engine.cli import Command, Key  # noqa: E402
from guidance.multiview.model import MultiViewDiffusionModel  # noqa: E402
from guidance.multiview.prior import PRECISIONS, resolve_precision  # noqa: E402

COMMAND = Command("python benchmarks/bench_toy_sds.py", __doc__, [
    Key("model", str, "models/toy/stage2"),
    Key("precisions", list, ["fp32", "bf16"], choices=tuple(PRECISIONS)),
    Key("threads", int, 1, help="torch threads (the toy recipes use 1)"),
    Key("repeats", int, 20),
])


def main(argv=None) -> int:
    from engine.errors import run_cli

    return run_cli(_bench, sys.argv[1:] if argv is None else argv)


def _bench(argv) -> int:
    args = COMMAND.parse(argv)
    torch.set_num_threads(args.threads)
    names = [str(p) for p in args.precisions]
    models = {p: MultiViewDiffusionModel.from_pretrained(args.model,
                                                         dtype=resolve_precision(p, "cpu")).eval()
              for p in names}
    g = torch.Generator().manual_seed(0)
    first = models[names[0]]
    x = torch.randn(8, first.unet.config.in_channels, 32, 32, generator=g)
    t = torch.full((8,), 500)
    ctx = torch.randn(8, 1, first.unet.config.cross_attention_dim, generator=g)
    cam = torch.randn(8, 16, generator=g)
    times = {p: [] for p in names}
    outs = {}
    with torch.no_grad():
        for p in names:                              # warm-up (allocations, oneDNN plans)
            outs[p] = models[p].predict_noise(x, t, ctx, cam, 4)
        for _ in range(args.repeats):
            for p in names:
                t0 = time.perf_counter()
                models[p].predict_noise(x, t, ctx, cam, 4)
                times[p].append((time.perf_counter() - t0) * 1000.0)
    ref = outs[names[0]]
    print(f"threads={args.threads} load={os.getloadavg()[0]:.2f} model={args.model}")
    print(f"| precision | dtype | median ms | vs {names[0]} | output off {names[0]}'s |")
    print("| --- | --- | ---: | ---: | ---: |")
    base = statistics.median(times[names[0]])
    for p in names:
        med = statistics.median(times[p])
        err = float((outs[p] - ref).norm() / ref.norm())
        print(f"| {p} | {str(models[p].dtype).replace('torch.', '')} | {med:.1f} | "
              f"{base / med:.2f}x | {100 * err:.2f}% |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
