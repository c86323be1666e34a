"""Marching tets speed: median ms at a tet grid of resolution 64 (6 * 64^3 tets) with a sphere
SDF of radius 0.6, forward and forward + backward (a loss on the output vertices,
gradients to the SDF and the grid vertices), on all tets ("generic") and on the tets of the
cells the surface crosses, found with ``tets.cut_cell_tets`` as DMTet does ("grid").

    python benchmarks/bench_marching_tets.py [resolution=64] [repeats=20] [device=cpu]
                                             [backend=torch] [threads=N]

Target on a 2-core CPU: forward <= 150 ms.
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from engine.cli import Command, Key  # noqa: E402
from representations.lib.marching_tets import marching_tets  # noqa: E402
from representations.lib.tets import cut_cell_tets, tet_grid  # noqa: E402


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _median_ms(fn, repeats: int, device: str) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append((time.perf_counter() - start) * 1000.0)
    return statistics.median(times)


COMMAND = Command("python benchmarks/bench_marching_tets.py", __doc__, [
    Key("resolution", int, 64, help="tet grid resolution"),
    Key("repeats", int, 20, help="timed calls per median"),
    Key("device", str, "cpu"),
    Key("backend", str, "torch", choices=("torch", "kaolin", "auto")),
    Key("threads", int, 0, help="torch threads (0: default)"),
])


def main(argv=None) -> int:
    args = COMMAND.parse(sys.argv[1:] if argv is None else argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    vertices, tets = tet_grid(args.resolution, device=args.device)
    sdf_value = vertices.norm(dim=-1) - 0.6

    verts = vertices.clone().requires_grad_(True)
    sdf = sdf_value.clone().requires_grad_(True)
    n = args.resolution

    def select(grid: bool, sdf_now):
        return tets[cut_cell_tets(sdf_now, n)] if grid else tets

    def forward(grid=False):
        with torch.no_grad():
            return marching_tets(vertices, select(grid, sdf_value), sdf_value,
                                 backend=args.backend)

    def forward_backward(grid=False):
        v, _ = marching_tets(verts, select(grid, sdf), sdf, backend=args.backend)
        (v ** 2).sum().backward()
        verts.grad = sdf.grad = None

    v, f = forward()
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, device {args.device}, "
          f"backend {args.backend}")
    print(f"grid {args.resolution}: {vertices.shape[0]} vertices, {tets.shape[0]} tets -> "
          f"{v.shape[0]} vertices, {f.shape[0]} faces")
    for grid in (False, True):
        name = "grid   " if grid else "generic"
        fwd = _median_ms(lambda: forward(grid), args.repeats, args.device)
        both = _median_ms(lambda: forward_backward(grid), args.repeats, args.device)
        print(f"{name}  forward: {fwd:8.1f} ms   forward + backward: {both:8.1f} ms  (medians)")
    return 0


if __name__ == "__main__":
    from engine.errors import run_cli

    sys.exit(run_cli(main, sys.argv[1:]))
