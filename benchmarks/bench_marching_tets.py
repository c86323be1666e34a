"""Marching tets speed and mesh quality at a tet grid of resolution 64 (6 * 64^3 tets).

The surface is a sphere of radius 0.6 with seeded Gaussian noise added to its SDF
(``noise`` * N(0, 1) per grid vertex; 0 gives the clean sphere). For each ``diagonal`` rule
(how the quad of a tet with two corners inside is split, see
``representations.lib.marching_tets``; ``fixed`` is the rule before the choice existed, the
table's diagonal) it prints the mesh quality - faces whose smallest angle is under 5 (and 1)
degrees, the median of the faces' smallest angles - and the median ms of forward and forward +
backward (a loss on the output vertices, gradients to the SDF and the grid vertices), on all
tets ("generic") and on the tets of the cells the surface crosses, found with
``tets.cut_cell_tets`` as DMTet does ("grid"). The rules are timed interleaved (one call of
each per repeat), so a machine shared with other work slows them alike.

    python benchmarks/bench_marching_tets.py [resolution=64] [repeats=20] [device=cpu]
                                             [backend=torch] [threads=N] [noise=0.005]
                                             [diagonals=[fixed,angle]] [seed=0]

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
from representations.lib.marching_tets import (DIAGONALS, marching_tets,  # noqa: E402
                                               triangle_min_angles)
from representations.lib.tets import cut_cell_tets, tet_grid  # noqa: E402


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _median_ms(fns, repeats: int, device: str):
    """Median ms of each of ``fns``, called in turn within each repeat."""
    for fn in fns:
        fn()  # warm-up
    times = [[] for _ in fns]
    for _ in range(repeats):
        for fn, out in zip(fns, times):
            _sync(device)
            start = time.perf_counter()
            fn()
            _sync(device)
            out.append((time.perf_counter() - start) * 1000.0)
    return [statistics.median(t) for t in times]


COMMAND = Command("python benchmarks/bench_marching_tets.py", __doc__, [
    Key("resolution", int, 64, help="tet grid resolution"),
    Key("repeats", int, 20, help="timed calls per median"),
    Key("device", str, "cpu"),
    Key("backend", str, "torch", choices=("torch", "kaolin", "auto")),
    Key("threads", int, 0, help="torch threads (0: default)"),
    Key("noise", float, 0.005, help="std of the Gaussian noise added to the sphere's SDF"),
    Key("seed", int, 0, help="seed of the noise"),
    Key("diagonals", list, ["fixed", "angle"],
        help=f"quad split rules to compare, of {', '.join(DIAGONALS)} (fixed: the old one)"),
])


def main(argv=None) -> int:
    args = COMMAND.parse(sys.argv[1:] if argv is None else argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    rules = [str(r) for r in args.diagonals]
    bad = [r for r in rules if r not in DIAGONALS]
    if bad or not rules:
        raise SystemExit(f"diagonals: {bad or rules} not a list of {', '.join(DIAGONALS)}")

    vertices, tets = tet_grid(args.resolution, device=args.device)
    g = torch.Generator().manual_seed(args.seed)
    noise = torch.randn(vertices.shape[0], generator=g).to(vertices)
    sdf_value = vertices.norm(dim=-1) - 0.6 + args.noise * noise

    verts = vertices.clone().requires_grad_(True)
    sdf = sdf_value.clone().requires_grad_(True)
    n = args.resolution

    def select(grid: bool, sdf_now):
        return tets[cut_cell_tets(sdf_now, n)] if grid else tets

    def forward(rule, grid=False):
        with torch.no_grad():
            return marching_tets(vertices, select(grid, sdf_value), sdf_value,
                                 backend=args.backend, diagonal=rule)

    def forward_backward(rule, grid=False):
        v, _ = marching_tets(verts, select(grid, sdf), sdf, backend=args.backend,
                             diagonal=rule)
        (v ** 2).sum().backward()
        verts.grad = sdf.grad = None

    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, device {args.device}, "
          f"backend {args.backend}")
    v, f = forward(rules[0])
    print(f"grid {args.resolution}: {vertices.shape[0]} vertices, {tets.shape[0]} tets; sphere "
          f"r = 0.6 + {args.noise:g} * N(0, 1) noise (seed {args.seed}) -> {v.shape[0]} "
          f"vertices, {f.shape[0]} faces")
    print("diagonal   faces  < 5 deg  < 1 deg  min-angle median  (degrees)")
    for rule in rules:
        v, f = forward(rule)
        angles = triangle_min_angles(v, f)
        print(f"{rule:8s} {f.shape[0]:7d}  {int((angles < 5).sum()):7d}  "
              f"{int((angles < 1).sum()):7d}  {angles.median().item():16.2f}")
    print("diagonal  tets      forward ms  forward + backward ms  (medians)")
    for grid in (False, True):
        name = "grid" if grid else "generic"
        fwd = _median_ms([lambda r=r: forward(r, grid) for r in rules], args.repeats,
                         args.device)
        both = _median_ms([lambda r=r: forward_backward(r, grid) for r in rules], args.repeats,
                          args.device)
        for rule, a, b in zip(rules, fwd, both):
            print(f"{rule:8s}  {name:8s} {a:10.1f}  {b:21.1f}")
    return 0


if __name__ == "__main__":
    from engine.errors import run_cli

    sys.exit(run_cli(main, sys.argv[1:]))
