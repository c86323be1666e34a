"""Forward + backward time of a NeRF training render (published hash grid: 16 levels x 2
features, 2^19 entries, 64-wide MLPs; 64 samples per ray; 4 views).

Variants:
    naive      per-level / per-corner Python loop for the grid, no occupancy skipping
    eager      vectorised grid, no skipping
    eager+occ  vectorised grid, occupancy skipping with a trained-like grid (the blob: a ball
               of radius ~0.55 is occupied, the rest of the bounding sphere empty)
    compiled   vectorised grid under torch.compile, no skipping
    compiled+occ
    compiled+occ+normals   as above, with analytic normals and the orientation regulariser
                           (what the published recipe computes every step)

Prints the median over ``repeats`` timed steps (after warm-up steps; compiling happens in
the warm-up and its time is printed separately). The compiled kernels run single-threaded
(``HashGridConfig.compile_threads = 1``) whatever ``threads`` says; ``threads`` sets
torch's intra-op threads for everything else.

    python benchmarks/bench_nerf.py                      # everything, 32x32 and 64x64
    python benchmarks/bench_nerf.py sizes=[32] variants=[eager+occ,compiled+occ]
        [repeats=5] [naive_repeats=1] [threads=N]
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from engine.cameras import orbit  # noqa: E402
from engine.cli import Command, Key  # noqa: E402
from engine.errors import ConfigError  # noqa: E402
from representations.backgrounds import SolidBackground  # noqa: E402
from representations.lib.encodings import HashGridConfig  # noqa: E402
from representations.nerf import NeRF, NeRFConfig, OccupancyConfig  # noqa: E402

VARIANTS = ("naive", "eager", "eager+occ", "compiled", "compiled+occ", "compiled+occ+normals")


def build(variant: str) -> NeRF:
    torch.manual_seed(0)
    cfg = NeRFConfig(hash_grid=HashGridConfig(backend="torch", compile="compiled" in variant),
                     occupancy=OccupancyConfig(enabled="occ" in variant),
                     orientation_normals="normals" in variant, composite_backend="torch")
    rep = NeRF(cfg).train()
    if variant == "naive":
        rep.encoding.forward = rep.encoding.reference
    if "occ" in variant:
        rep.update_occupancy()
    return rep


def step(rep: NeRF, cameras, size: int, bg) -> None:
    out = rep.render(cameras, size, size, background=bg, step=0)
    loss = out["rgb"].square().mean()
    if "orientation" in out:
        loss = loss + rep.regularizers(out, None)["orientation"]
    loss.backward()


def bench(variant: str, size: int, repeats: int, warmup: int) -> None:
    rep = build(variant)
    cameras = orbit(4, elevation_deg=15.0, distance=2.5, fovy_deg=40.0)
    bg = SolidBackground()
    t0 = time.perf_counter()
    for _ in range(warmup):
        step(rep, cameras, size, bg)
        rep.zero_grad(set_to_none=True)
    first = time.perf_counter() - t0
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        step(rep, cameras, size, bg)
        times.append(time.perf_counter() - t)
        rep.zero_grad(set_to_none=True)
    n_rays = 4 * size * size
    occ = f"  occupied cells {rep.occupancy.occupied_fraction:.1%}" if "occ" in variant else ""
    print(f"4x{size}x{size}  {variant:22s} median {1000 * statistics.median(times):8.1f} ms  "
          f"(min {1000 * min(times):.1f}, n={repeats}, warm-up {first:.1f} s; "
          f"{n_rays * rep.cfg.samples_per_ray} samples){occ}", flush=True)


COMMAND = Command("python benchmarks/bench_nerf.py", __doc__, [
    Key("sizes", list, [32, 64], help="render sizes, e.g. [32, 64]"),
    Key("variants", list, list(VARIANTS), choices=VARIANTS),
    Key("repeats", int, 5),
    Key("naive_repeats", int, 1, help="the naive loop is slow"),
    Key("threads", int, None, help="torch.set_num_threads"),
])


def main(argv=None) -> int:
    args = COMMAND.parse(sys.argv[1:] if argv is None else argv)
    for size in args.sizes:
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise ConfigError(f"sizes: expected positive integers such as [32, 64], got "
                              f"'{size}'")
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    for size in args.sizes:
        for v in args.variants:
            naive = v == "naive"
            bench(v, size, args.naive_repeats if naive else args.repeats,
                  warmup=0 if naive else (2 if "compiled" in v else 1))
    return 0


if __name__ == "__main__":
    from engine.errors import run_cli

    sys.exit(run_cli(main, sys.argv[1:]))
