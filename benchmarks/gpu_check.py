"""The one GPU check: what a fresh CUDA machine with the project installed can and cannot do,
in one table, within 10 minutes (the first five parts; the Gaussian parts add about as much
again on a machine's first gsplat build).

    bash benchmarks/gpu_check.sh [out=gpu_check.json]
        [parts=[env,tests,backends,estimate,real,gaussians,gs-full]]
        [recipes=[isotropic3d,mvdream,isotropic3d-gs]]
    python benchmarks/gpu_check.py ...                 # the same

Parts (each in its own process where it could crash; a failing part is a row, not an end):

* ``env``: torch, CUDA, the GPU and its memory;
* ``tests``: the test files whose CUDA tests run when a GPU (and a backend) is there, on it:
  hash grid vs tinycudann, rasterizer vs nvdiffrast, marching tets vs kaolin, devices;
* ``backends``: which optional fast backends import (tinycudann, nvdiffrast, kaolin,
  nerfacc with its CUDA path, gsplat); the machine has no network, so none is installed here;
* ``estimate``: ``python -m engine.run recipe=isotropic3d --estimate`` (the prediction the
  real run below is compared with);
* ``real``: the real-size isotropic3d, mvdream and isotropic3d-gs recipes with random
  real-size weights (``model: random:...``), two steps of every phase of every stage (NeRF at
  64 and 256 px, DMTet at 256 and 512 px on grid 128, Gaussians at 128 and 256 px), the
  stage-end renders at 256 px and the export at the recipe's settings; seconds per step and
  peak CUDA memory per phase;
* ``gaussians``: gsplat's CUDA kernels built (JIT, once per machine: minutes), the test that
  holds gsplat equal to the torch rasteriser, and benchmarks/bench_gaussians.py on CUDA with
  both backends (median ms of 5k/20k/50k Gaussians at 64/128/256 px, 4 views);
* ``gs-full``: the whole isotropic3d-gs recipe (500 Gaussian steps with densification, 500
  DMTet steps, export) with random real-size weights: wall time, seconds per step and peak
  memory per stage (issue 25's aim: under 3 minutes on one H100-class GPU).

Where imageio-ffmpeg is missing (a GPU machine without network), turntables are written as
GIF only, and the table says so.

Without CUDA (CI, a laptop) the parts that need it say so and the rest run: ``env``,
``backends`` and the table (tests/test_gpu_check.py runs those). ``real`` on a CPU takes
tens of minutes; tests/test_real_size.py does it in the slow tier.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Optional

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from _runs import stage_steps  # noqa: E402  (this folder is on sys.path, as a script's is)

PARTS = ("env", "tests", "backends", "estimate", "real", "gaussians", "gs-full")
CUDA_TEST_FILES = ("tests/test_encodings.py", "tests/test_rasterizer.py",
                   "tests/test_marching_tets.py", "tests/test_run.py", "tests/test_dmtet.py")
BACKENDS = ("tinycudann", "nvdiffrast.torch", "kaolin", "nerfacc", "gsplat")
#: real-size recipes, their conditioning input, and their random model
REAL_RECIPES = {
    "isotropic3d": ("image=examples/toy/blue-mushroom.png", "random:isotropic3d"),
    "mvdream": ("prompt=a blue mushroom", "random:mvdream"),
    "isotropic3d-gs": ("image=examples/toy/blue-mushroom.png", "random:isotropic3d"),
}


class Table:
    """Rows of (part, item, result, seconds)."""

    def __init__(self):
        self.rows: List[Dict[str, object]] = []

    def add(self, part: str, item: str, result: str, seconds: Optional[float] = None):
        row = {"part": part, "item": item, "result": result,
               "seconds": None if seconds is None else round(seconds, 1)}
        self.rows.append(row)
        print(f"[{part}] {item}: {result}", flush=True)

    def format(self) -> str:
        width = max([len(r["item"]) for r in self.rows] + [4])
        lines = [f"{'part':<9} {'item':<{width}} {'seconds':>8}  result"]
        for r in self.rows:
            secs = "" if r["seconds"] is None else f"{r['seconds']:8.1f}"
            lines.append(f"{r['part']:<9} {r['item']:<{width}} {secs:>8}  {r['result']}")
        return "\n".join(lines)


def _run(cmd: List[str], timeout: float, env: Optional[dict] = None):
    t = time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                              env={**os.environ, **(env or {})})
        return proc.returncode, proc.stdout + proc.stderr, time.perf_counter() - t
    except subprocess.TimeoutExpired as exc:
        out = (exc.stdout or b"").decode() if isinstance(exc.stdout, bytes) else (exc.stdout or "")
        return 124, out + f"\n(timed out after {timeout:.0f} s)", time.perf_counter() - t


@contextlib.contextmanager
def _run_folder(keep: Optional[str], name: str):
    """A run's output folder: kept as KEEP/NAME when ``keep`` is given (to read a run that a
    time limit cut short), else a temporary one."""
    if keep:
        folder = Path(keep) / name
        shutil.rmtree(folder, ignore_errors=True)
        folder.parent.mkdir(parents=True, exist_ok=True)
        yield str(folder)
        return
    with tempfile.TemporaryDirectory() as tmp:
        yield str(Path(tmp) / "run")


def _pytest_summary(text: str) -> str:
    """pytest's closing count line (``3 failed, 92 passed in 88 s``), else the last line."""
    import re

    counts = [line.strip("= ") for line in text.splitlines()
              if re.search(r"\d+ (passed|failed|error)", line)]
    return counts[-1][:160] if counts else _last_line(text)


def _last_line(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[-1].strip()[:160] if lines else "(no output)"


def part_env(table: Table) -> bool:
    import torch

    table.add("env", "torch", f"{torch.__version__} (CUDA build {torch.version.cuda})")
    if not torch.cuda.is_available():
        table.add("env", "cuda", "not available: the CUDA parts are skipped")
        return False
    props = torch.cuda.get_device_properties(0)
    table.add("env", "gpu", f"{props.name}, {props.total_memory / 2**30:.0f} GiB, "
                            f"capability {props.major}.{props.minor}, bf16 "
                            f"{'yes' if torch.cuda.is_bf16_supported() else 'no'}")
    return True


def part_tests(table: Table, cuda: bool) -> None:
    if not cuda:
        table.add("tests", "cuda subset", "skipped (no CUDA)")
        return
    workers = ["-n", str(min(8, os.cpu_count() or 1))] if (os.cpu_count() or 1) > 2 else []
    code, out, secs = _run([sys.executable, "-m", "pytest", "-q", "-o", "addopts=", "-m",
                            "not slow", "-rfEs", *workers, *CUDA_TEST_FILES], timeout=300)
    summary = _pytest_summary(out)
    failed = [line[len("FAILED "):][:140] for line in out.splitlines()
              if line.startswith("FAILED ")]
    skipped = [line for line in out.splitlines() if line.startswith("SKIPPED")]
    table.add("tests", "cuda subset", ("ok: " if code == 0 else f"FAILED ({code}): ") + summary,
              secs)
    for line in failed[:8]:
        table.add("tests", "failed", line)
    for line in skipped[:6]:
        table.add("tests", "skipped", line[len("SKIPPED "):][:140])


def part_backends(table: Table, cuda: bool) -> None:
    for name in BACKENDS:
        code, out, secs = _run([sys.executable, "-c", f"import {name}; print('ok')"], 120)
        table.add("backends", name, "imports" if code == 0 else
                  "not installed (" + _last_line(out)[:80] + ")", secs)
    if not cuda:
        return
    probe = ("import torch, nerfacc; d = torch.rand(64, 16, device='cuda'); "
             "t = torch.linspace(0, 1, 17, device='cuda').expand(64, 17); "
             "w, *_ = nerfacc.render_weight_from_density(t[:, :-1], t[:, 1:], d); "
             "print(float(w.sum()))")
    code, out, secs = _run([sys.executable, "-c", probe], 120)
    table.add("backends", "nerfacc on cuda", "runs" if code == 0 else
              "fails (" + _last_line(out)[:80] + ")", secs)


def part_estimate(table: Table) -> Dict[str, float]:
    code, out, secs = _run([sys.executable, "-m", "engine.run", "recipe=isotropic3d",
                            "--estimate"], 300)
    if code != 0:
        table.add("estimate", "isotropic3d", f"FAILED ({code}): {_last_line(out)}", secs)
        return {}
    peak = next((line for line in out.splitlines() if line.startswith("peak:")), "")
    table.add("estimate", "isotropic3d", peak or _last_line(out), secs)
    return {"isotropic3d": peak}


def video_overrides() -> List[str]:
    """GIF-only turntables where imageio-ffmpeg (the MP4 writer) is not installed."""
    import importlib.util

    return [] if importlib.util.find_spec("imageio_ffmpeg") else ["export.turntable.formats=[gif]"]


def random_weights_argv(recipe: str, stages: List[str], out: str, device: str) -> List[str]:
    """engine.run's arguments for ``recipe`` with random real-size weights in every stage's
    guidance, no progress renders or checkpoints, and GIF turntables without imageio-ffmpeg."""
    given, model = REAL_RECIPES[recipe]
    return ([f"recipe={recipe}", given, f"out={out}", f"device={device}",
             "output.progress=false", "output.render_every=0", "output.checkpoint_every=0"]
            + [f"stages.{sname}.guidance.model={model}" for sname in stages]
            + video_overrides())


def real_size_argv(recipe: str, out: str, device: str, steps_per_phase: int = 2) -> List[str]:
    """engine.run's arguments for the real-size check of ``recipe``: random real-size
    weights, every phase of every stage for ``steps_per_phase`` steps, the stage-end renders
    at the recipe's size and the export at its settings."""
    from engine import config
    from engine.estimate import phase_overrides

    cfg, _ = config.load(recipe, [])
    argv = random_weights_argv(recipe, list(cfg.stages), out, device)
    argv += phase_overrides(cfg, steps_per_phase)
    for i, sname in enumerate(cfg.stages):
        rcfg = cfg.components[sname]["representation"][1]
        source = cfg.stages[sname].init_from
        if (source is not None and hasattr(rcfg, "init_threshold")
                and cfg.components[source]["representation"][0].__name__ != "Gaussians"):
            # a few steps of a random model leave the NeRF at its initial blob (peak density
            # 10), under the recipe's level 25: start the mesh at level 5 so that there is a
            # surface to refine and export (from Gaussians the level is the silhouette match's,
            # which finds the initial ball)
            argv.append(f"stages.{sname}.representation.init_threshold=5.0")
        if hasattr(rcfg, "shading"):
            # shaded renders (not only albedo) from the first stage's second phase on, as
            # the recipe's switch at step 5000
            argv.append(f"stages.{sname}.representation.shading.ambient_only_steps="
                        f"{steps_per_phase if i == 0 else 0}")
    return argv


def summarise_run(run_dir: Path) -> List[str]:
    """One line per phase of a finished run: steps, seconds per step, peak CUDA memory."""
    return [f"{stage}: {len(secs)} steps, s/step " + " ".join(f"{x:.2f}" for x in secs)
            + (f", peak {mem:.1f} GiB" if mem else "")
            for stage, (secs, mem) in stage_steps(run_dir).items()]


def part_real(table: Table, cuda: bool, recipes=tuple(REAL_RECIPES),
              keep: Optional[str] = None) -> None:
    if not cuda:
        table.add("real", "real-size recipes", "skipped (no CUDA; tests/test_real_size.py runs "
                                               "them on CPU in the slow tier)")
        return
    for recipe in recipes:
        with _run_folder(keep, recipe) as out:
            code, text, secs = _run([sys.executable, "-m", "engine.run",
                                     *real_size_argv(recipe, out, "cuda")], 400)
            if code != 0:
                table.add("real", recipe, f"FAILED ({code}): {_last_line(text)}", secs)
                continue
            for line in summarise_run(Path(out)):
                table.add("real", recipe, line)
            exported = sorted(p.name for p in (Path(out) / "export").glob("*"))
            table.add("real", recipe, "export: " + (", ".join(exported) or "nothing"), secs)


GSPLAT_BUILD = ("import time, torch; t = time.perf_counter(); "
                "from gsplat.cuda._backend import _C; "
                "assert _C is not None, 'gsplat built no kernels (no CUDA toolkit?)'; "
                "print(f'built or loaded in {time.perf_counter() - t:.0f} s')")


def part_gaussians(table: Table, cuda: bool) -> Optional[bool]:
    """Returns whether gsplat's kernels built (None without CUDA)."""
    if not cuda:
        table.add("gaussians", "gsplat and bench", "skipped (no CUDA; bench_gaussians.py "
                                                   "times the CPU backends)")
        return None
    # no TORCH_CUDA_ARCH_LIST: the build's flags must be the later runs' own, or torch's
    # ninja builds it all again inside the first run (seen: 90 s lost in a first step)
    code, out, secs = _run([sys.executable, "-c", GSPLAT_BUILD], 600, env={"MAX_JOBS": "12"})
    built = code == 0
    table.add("gaussians", "gsplat kernels", ("ok: " if built else f"FAILED ({code}): ")
              + _last_line(out), secs)
    if built:
        code, out, secs = _run([sys.executable, "-m", "pytest", "-q", "-o", "addopts=", "-rs",
                                "tests/test_gaussians_raster.py", "-k", "gsplat"], 300)
        table.add("gaussians", "gsplat = torch test", ("ok: " if code == 0 else
                                                       f"FAILED ({code}): ") + _pytest_summary(out),
                  secs)
    backends = "[torch,gsplat]" if built else "[torch]"
    code, out, secs = _run([sys.executable, "benchmarks/bench_gaussians.py", "device=cuda",
                            f"backends={backends}", "repeats=10"], 400)
    rows = [line for line in out.splitlines() if line.startswith("| ") and "---" not in line]
    if code != 0 or not rows:
        table.add("gaussians", "bench", f"FAILED ({code}): {_last_line(out)}", secs)
    for line in rows:
        table.add("gaussians", "bench", line, None)
    return built


def gs_full_argv(out: str, device: str, backend: str = "auto") -> List[str]:
    """engine.run's arguments for the whole isotropic3d-gs recipe with random real-size
    weights (every step, the stage-end renders and the export at the recipe's settings)."""
    return (random_weights_argv("isotropic3d-gs", ["gs", "dmtet"], out, device)
            + [f"stages.gs.representation.backend={backend}"])


def part_gs_full(table: Table, cuda: bool, keep: Optional[str] = None,
                 gsplat_built: Optional[bool] = None) -> None:
    if not cuda:
        table.add("gs-full", "isotropic3d-gs", "skipped (no CUDA)")
        return
    # where gsplat failed to build, auto would try the build again inside the run: use torch
    backend = "torch" if gsplat_built is False else "auto"
    with _run_folder(keep, "gs-full") as out:
        code, text, secs = _run([sys.executable, "-m", "engine.run",
                                 *gs_full_argv(out, "cuda", backend)], 540)
        if code != 0:
            table.add("gs-full", "isotropic3d-gs", f"FAILED ({code}): {_last_line(text)}",
                      secs)
            return
        for stage, (steps, mem) in stage_steps(Path(out)).items():
            # the median step after the first (which carries the stage's warm-up)
            later = sorted(steps[1:])
            median = later[len(later) // 2] if later else 0.0
            table.add("gs-full", stage, f"{len(steps)} steps in {sum(steps):.1f} s, "
                                        f"median {median:.3f} s/step, peak {mem:.1f} GiB")
        exported = sorted(p.name for p in (Path(out) / "export").glob("*"))
        table.add("gs-full", "isotropic3d-gs", f"whole run (backend {backend}; model build, "
                  "training, export): " + ", ".join(exported), secs)


def main(argv: Optional[List[str]] = None) -> int:
    from engine.cli import Command, Key
    from engine.errors import run_cli

    def run(args_list: List[str]) -> int:
        args = Command("python benchmarks/gpu_check.py", __doc__, [
            Key("out", str, None, help="also write the table as JSON here"),
            Key("parts", list, list(PARTS), choices=PARTS, help="which parts to run"),
            Key("runs", str, None, help="keep the real-size runs' folders here (default: "
                "temporary)"),
            Key("recipes", list, list(REAL_RECIPES), choices=tuple(REAL_RECIPES),
                help="the real-size recipes of part real"),
        ]).parse(args_list)
        table = Table()
        cuda = part_env(table) if "env" in args.parts else False
        if "env" not in args.parts:
            import torch

            cuda = torch.cuda.is_available()
        if cuda and video_overrides() and {"real", "gs-full"} & set(args.parts):
            table.add("env", "turntables", "GIF only: imageio-ffmpeg (the MP4 writer) is not "
                                           "installed")
        if "tests" in args.parts:
            part_tests(table, cuda)
        if "backends" in args.parts:
            part_backends(table, cuda)
        if "estimate" in args.parts:
            part_estimate(table)
        if "real" in args.parts:
            part_real(table, cuda, [str(r) for r in args.recipes], args.runs)
        built = part_gaussians(table, cuda) if "gaussians" in args.parts else None
        if "gs-full" in args.parts:
            part_gs_full(table, cuda, args.runs, built)
        print("\n" + table.format())
        if args.out:
            Path(args.out).write_text(json.dumps(table.rows, indent=2))
        return 0

    return run_cli(run, sys.argv[1:] if argv is None else argv)


if __name__ == "__main__":
    sys.exit(main())
