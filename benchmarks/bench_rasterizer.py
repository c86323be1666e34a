"""Benchmark of the mesh renderer: median (and best) milliseconds of ``render_mesh`` forward
and forward + backward at 256x256 with an icosphere of 20480 faces, for 1 and 4 views.

    python benchmarks/bench_rasterizer.py [threads=N] [device=cpu|cuda]
        [backend=auto|torch|nvdiffrast] [size=256] [subdivisions=5] [repeats=15]

The loss touches rgb, opacity, depth and normal, so every differentiable path runs backward.
"""

from __future__ import annotations

import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
import trimesh  # noqa: E402

from engine.cameras import Cameras  # noqa: E402
from engine.cli import Command, Key  # noqa: E402
from representations.backgrounds import SolidBackground  # noqa: E402
from representations.lib.mesh_render import render_mesh  # noqa: E402


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def bench(vertices, faces, colors, cameras, size, backend, device, backward, repeats):
    background = SolidBackground().to(device)
    times = []
    for i in range(repeats + 2):
        v = vertices.detach().requires_grad_(backward)
        _sync(device)
        t0 = time.perf_counter()
        out = render_mesh(v, faces, cameras, size, size, background=background,
                          vertex_colors=colors, backend=backend)
        if backward:
            loss = (out["rgb"].mean() + out["opacity"].mean() + out["depth"].mean()
                    + out["normal"].mean())
            loss.backward()
        _sync(device)
        if i >= 2:                                   # first calls warm up allocators
            times.append((time.perf_counter() - t0) * 1000.0)
    return statistics.median(times), min(times)


COMMAND = Command("python benchmarks/bench_rasterizer.py", __doc__, [
    Key("threads", int, 0, help="torch threads (0: torch default)"),
    Key("device", str, "cpu"),
    Key("backend", str, "auto", choices=("auto", "torch", "nvdiffrast")),
    Key("size", int, 256),
    Key("subdivisions", int, 5, help="icosphere level (5: 20480 faces)"),
    Key("repeats", int, 15),
])


def main(argv=None) -> int:
    args = COMMAND.parse(sys.argv[1:] if argv is None else argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    mesh = trimesh.creation.icosphere(subdivisions=args.subdivisions)
    vertices = torch.tensor(mesh.vertices, dtype=torch.float32, device=args.device) * 0.8
    faces = torch.tensor(mesh.faces, dtype=torch.long, device=args.device)
    colors = vertices * 0.5 + 0.5
    print(f"device={args.device} backend={args.backend} threads={torch.get_num_threads()} "
          f"faces={faces.shape[0]} size={args.size} load={os.getloadavg()[0]:.2f}")
    for views in (1, 4):
        cams = Cameras.from_spherical([15.0] * views, [90.0 * i for i in range(views)], 2.5,
                                      40.0, views_per_object=views, device=args.device)
        for backward in (False, True):
            med, best = bench(vertices, faces, colors, cams, args.size, args.backend,
                              args.device, backward, args.repeats)
            what = "forward+backward" if backward else "forward"
            print(f"views={views} {what:17s} median {med:8.1f} ms   best {best:8.1f} ms")
    return 0


if __name__ == "__main__":
    from engine.errors import run_cli

    sys.exit(run_cli(main, sys.argv[1:]))
