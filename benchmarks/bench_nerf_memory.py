"""Peak memory and time of ONE NeRF step of the published Isotropic3D recipe, old path vs new.

One step = the training render of the recipe's cameras at the recipe's resolution, then
backward of ``mean(rgb^2) + orientation`` (the recipe weights the orientation regulariser
from step 0, so analytic normals are computed every step). Settings come from
recipes/isotropic3d.yaml, stage ``nerf``, at the given step: step 0 renders 2 groups x 4 views
at 64 px, step 5000 one group of 4 views at 256 px (diffuse / textureless shading from there
on); the NeRF has the published defaults (16 levels x 2 features, 2^19 table, 64 samples per
ray). The occupancy grid is filled once from the untrained field (the blob), as the first
step of a run does.

Paths:
    old    vectorised hash grid under plain autograd (``hash_grid.recompute: false``), the
           render in one piece (``train_chunk: 0``): what ran before
    lean   the recomputing hash-grid Function, render in one piece
    chunk  the vectorised grid, render in checkpointed chunks of ``train_chunk`` rays
    new    the recomputing Function and checkpointed chunks (the defaults)

Each (step, path) runs in a fresh child process (so peaks do not mix). Memory: the child's
peak resident set size (``ru_maxrss``) minus its resident size right after building the model
and cameras, i.e. what the render, its graph and backward add on top of the model (the
representation's share; the guidance is not in it). The child's address space is capped at
``max_gib`` above that point, so a configuration that needs more fails cleanly (printed as
``> max_gib``) instead of pushing a shared machine into swap or the OOM killer. Time: median
of ``repeats`` steps after one warm-up step, and per evaluated (live) sample. A last,
untimed step runs under :func:`engine.memory.measure` (the project's tensor accounting): the
peak bytes of live tensors the step creates, free of allocator and page-cache effects.

    python benchmarks/bench_nerf_memory.py                       # steps [0, 5000], old + new
    python benchmarks/bench_nerf_memory.py steps=[5000] paths=[new,chunk] repeats=3
        [threads=N] [max_gib=10] [train_chunk=32768] [recipe=isotropic3d]
"""

from __future__ import annotations

import multiprocessing as mp
import os
import resource
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from engine.cli import Command, Key  # noqa: E402
from engine.errors import ConfigError  # noqa: E402

PATHS = ("old", "lean", "chunk", "new")
GIB = 1 << 30


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _vm_size() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")


def _setup(recipe: str, step: int, path: str, train_chunk):
    """The recipe's NeRF (with the path's switches), cameras, background and resolution."""
    import torch

    from engine.cameras import RandomMultiViewSampler
    from engine.config import load_recipe, validate, validate_component
    from engine.schedules import Schedule

    _, raw, _ = load_recipe(recipe)
    stage = raw["stages"]["nerf"]
    rep_spec = dict(stage["representation"])
    rep_spec["hash_grid"] = {**rep_spec.get("hash_grid", {}), "backend": "torch",
                             "recompute": path in ("lean", "new")}
    if path in ("old", "lean"):
        rep_spec["train_chunk"] = 0
    elif train_chunk is not None:
        rep_spec["train_chunk"] = train_chunk
    cls, cfg = validate_component("representation", rep_spec, "stages.nerf.representation")
    torch.manual_seed(0)
    rep = cls(cfg).train()
    rep.update_occupancy()
    cam_spec = dict(stage["cameras"])
    cam_spec.pop("type")
    sampler = RandomMultiViewSampler(validate(RandomMultiViewSampler.Config, cam_spec))
    cameras = sampler.sample(step, torch.Generator().manual_seed(0))
    _, bg_cfg = validate_component("background", stage["background"], "background")
    from representations.backgrounds import SolidBackground
    size = int(Schedule.parse(stage["resolution"], "resolution")(step))
    return rep, cameras, SolidBackground(bg_cfg), size


def _child(recipe, step, path, repeats, threads, max_gib, train_chunk, queue) -> None:
    import torch

    from engine.memory import measure

    if threads:
        torch.set_num_threads(threads)
    try:
        rep, cameras, bg, size = _setup(recipe, step, path, train_chunk)
        live = []
        field = rep.field

        def counting_field(points, need_normals):
            if torch.is_grad_enabled():        # the forward, not a checkpoint's recompute
                live[-1] += points.shape[0]
            return field(points, need_normals)

        rep.field = counting_field
        base = _rss()
        limit = _vm_size() + int(max_gib * GIB)
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
        def one_step(seed: int) -> None:
            torch.manual_seed(seed)
            out = rep.render(cameras, size, size, background=bg, step=step)
            loss = out["rgb"].square().mean() + rep.regularizers(out, step)["orientation"]
            del out
            loss.backward()
            rep.zero_grad(set_to_none=True)

        times = []
        for i in range(repeats + 1):
            live.append(0)
            t = time.perf_counter()
            one_step(i)
            times.append(time.perf_counter() - t)
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        counted = statistics.median(live[1:])
        # the same step once more under the project's tensor accounting (slower; not timed)
        tensors = measure(lambda: one_step(0)).peak
        n_rays = len(cameras) * size * size
        queue.put(dict(ok=True, size=size, views=len(cameras), rays=n_rays,
                       samples=n_rays * rep.cfg.samples_per_ray,
                       live=counted, base=base, mem=peak - base,
                       tensors=tensors,
                       median=statistics.median(times[1:]), min=min(times[1:]),
                       occupied=rep.occupancy.occupied_fraction, chunk=rep.cfg.train_chunk))
    except (MemoryError, RuntimeError) as exc:
        if isinstance(exc, RuntimeError) and "alloc" not in str(exc).lower():
            raise
        queue.put(dict(ok=False, why=f"> {max_gib:g} GiB ({type(exc).__name__})"))


def run_one(recipe, step, path, repeats, threads, max_gib, train_chunk) -> dict:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_child, args=(recipe, step, path, repeats, threads, max_gib,
                                            train_chunk, queue))
    proc.start()
    proc.join()
    if not queue.empty():
        return queue.get()
    return dict(ok=False, why=f"child died (exit code {proc.exitcode})")


COMMAND = Command("python benchmarks/bench_nerf_memory.py", __doc__, [
    Key("steps", list, [0, 5000], help="recipe steps (resolution, views, shading follow)"),
    Key("paths", list, ["old", "new"], choices=PATHS),
    Key("repeats", int, 3),
    Key("threads", int, None, help="torch.set_num_threads in the children"),
    Key("max_gib", float, 10.0, help="address-space cap of a child above its model"),
    Key("train_chunk", int, None, help="rays per checkpointed chunk (default: the NeRF's)"),
    Key("recipe", str, "isotropic3d"),
])


def main(argv=None) -> int:
    args = COMMAND.parse(sys.argv[1:] if argv is None else argv)
    for s in args.steps:
        if isinstance(s, bool) or not isinstance(s, int) or s < 0:
            raise ConfigError(f"steps: expected non-negative integers such as [0, 5000], "
                              f"got '{s}'")
    if args.max_gib <= 0:
        raise ConfigError(f"max_gib: must be > 0, got {args.max_gib}")
    import torch

    print(f"torch {torch.__version__}, {args.threads or torch.get_num_threads()} threads, "
          f"recipe {args.recipe}, {args.repeats} timed steps after 1 warm-up, "
          f"one child process per row")
    print(f"{'step':>5} {'px':>4} {'views':>5} {'path':6} {'chunk':>6} {'live samples':>17} "
          f"{'peak RSS':>10} {'tensors':>10} {'median':>9} {'min':>9} {'us/live sample':>14}")
    for step in args.steps:
        for path in args.paths:
            r = run_one(args.recipe, step, path, args.repeats, args.threads, args.max_gib,
                        args.train_chunk)
            if not r["ok"]:
                print(f"{step:>5} {'':>4} {'':>5} {path:6} {'':>6} {'':>17} {r['why']}",
                      flush=True)
                continue
            live = f"{r['live'] / 1e6:.2f}M/{r['samples'] / 1e6:.1f}M"
            print(f"{step:>5} {r['size']:>4} {r['views']:>5} {path:6} {r['chunk']:>6} "
                  f"{live:>17} {r['mem'] / GIB:>6.2f} GiB {r['tensors'] / GIB:>6.2f} GiB "
                  f"{r['median']:>8.2f}s "
                  f"{r['min']:>8.2f}s {1e6 * r['median'] / max(r['live'], 1):>14.2f}",
                  flush=True)
    print("peak RSS: the child's peak resident size minus its size after building the model and "
          "cameras (render + graph + backward); tensors: peak bytes of the tensors one step "
          "creates (engine.memory.measure); occupancy filled from the untrained blob")
    return 0


if __name__ == "__main__":
    from engine.errors import run_cli

    sys.exit(run_cli(main, sys.argv[1:]))
