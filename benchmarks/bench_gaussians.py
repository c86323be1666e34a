"""Benchmark of the Gaussian rasteriser: median (and best) milliseconds of forward and
forward + backward for 5k, 20k and 50k Gaussians at 64, 128 and 256 px, 4 views.

    python benchmarks/bench_gaussians.py [threads=N] [device=cpu|cuda]
        [backend=auto|torch|cpp|gsplat] [backends=[torch,cpp]] [counts=[5000,20000,50000]]
        [sizes=[64,128,256]] [repeats=5]

The scene is what the ``gaussians`` representation starts from: Gaussians uniform in a ball
of radius 0.5, scales from the spacing to their 3 nearest neighbours (so more Gaussians are
smaller ones), opacity 0.5, random colours, 4 cameras 90 degrees apart at distance 2.75 with
a 40 degree field of view (the toy recipes' framing). The loss touches colour, opacity and
depth, so every differentiable path runs backward. With backend=auto on CUDA both
backends are timed when gsplat imports. ``backends=[torch,cpp]`` times several backends in
one process, each size's rows side by side with the forward + backward time relative to the
first backend's (the ``cpp`` kernel is compiled, or loaded, before any timing).
"""

from __future__ import annotations

import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from engine.cameras import Cameras  # noqa: E402
from engine.cli import Command, Key  # noqa: E402
from representations.lib.gaussian_fields import neighbour_spacing, random_in_ball  # noqa: E402
from representations.lib.gaussian_raster import (  # noqa: E402
    BACKENDS, gsplat_available, rasterize_gaussians)
from representations.lib.gaussian_raster_cpp import load_extension, load_seconds  # noqa: E402


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def scene(n: int, device: str):
    g = torch.Generator().manual_seed(0)
    means = random_in_ball(n, 0.5, generator=g)
    log_scales = neighbour_spacing(means).log()[:, None] + 0.05 * torch.randn(n, 3, generator=g)
    quats = torch.randn(n, 4, generator=g)
    opacities = torch.full((n,), 0.5)
    colors = torch.rand(n, 3, generator=g)
    return [t.to(device) for t in (means, log_scales, quats, opacities, colors)]


def bench(params, cameras, size, backend, device, backward, repeats):
    times = []
    for i in range(repeats + 1):
        leaves = [p.detach().requires_grad_(backward) for p in params]
        _sync(device)
        t0 = time.perf_counter()
        out = rasterize_gaussians(*leaves, cameras, size, size, backend=backend)
        if backward:
            (out["features"].mean() + out["alpha"].mean() + out["depth"].mean()).backward()
        _sync(device)
        if i >= 1:                                   # the first call warms up allocators
            times.append((time.perf_counter() - t0) * 1000.0)
    return statistics.median(times), min(times)


def _ms(ms: float) -> str:
    """Whole milliseconds, with decimals below 10 ms (a GPU's times)."""
    return f"{ms:.0f}" if ms >= 10 else f"{ms:.2f}"


COMMAND = Command("python benchmarks/bench_gaussians.py", __doc__, [
    Key("threads", int, 0, help="torch threads (0: torch default)"),
    Key("device", str, "cpu"),
    Key("backend", str, "auto", choices=BACKENDS),
    Key("backends", list, [], help="several backends in one run, e.g. [torch,cpp] "
        "(overrides backend)"),
    Key("counts", list, [5000, 20000, 50000]),
    Key("sizes", list, [64, 128, 256]),
    Key("repeats", int, 5),
])


def main(argv=None) -> int:
    args = COMMAND.parse(sys.argv[1:] if argv is None else argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    backends = [args.backend]
    if args.backends:
        backends = [str(b) for b in args.backends]
        unknown = [b for b in backends if b not in BACKENDS]
        if unknown:
            raise ValueError(f"backends: expected some of {', '.join(BACKENDS)}, "
                             f"got {', '.join(unknown)}")
    elif args.backend == "auto" and args.device.startswith("cuda") and gsplat_available():
        backends = ["torch", "gsplat"]
    if "cpp" in backends or (backends == ["auto"] and not args.device.startswith("cuda")):
        if load_extension() is not None:
            print(f"cpp kernel: loaded in {load_seconds():.1f} s (includes compiling on a "
                  "machine's first use)")
    cams = Cameras.from_spherical([15.0] * 4, [0.0, 90.0, 180.0, 270.0], 2.75, 40.0,
                                  views_per_object=4, device=args.device)
    print(f"device={args.device} threads={torch.get_num_threads()} views=4 "
          f"load={os.getloadavg()[0]:.2f}")
    print("| backend | Gaussians | px | forward ms (best) | forward+backward ms (best) | "
          f"vs {backends[0]} |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for n in args.counts:
        params = scene(int(n), args.device)
        for size in args.sizes:
            first = None
            for backend in backends:
                f_med, f_best = bench(params, cams, int(size), backend, args.device, False,
                                      args.repeats)
                b_med, b_best = bench(params, cams, int(size), backend, args.device, True,
                                      args.repeats)
                first = first or b_med
                print(f"| {backend} | {n} | {size} | {_ms(f_med)} ({_ms(f_best)}) | "
                      f"{_ms(b_med)} ({_ms(b_best)}) | {first / b_med:.1f}x |", flush=True)
    return 0


if __name__ == "__main__":
    from engine.errors import run_cli

    sys.exit(run_cli(main, sys.argv[1:]))
