"""The one GPU check: what a fresh CUDA machine with the project installed can and cannot do,
in one table, within 10 minutes.

    bash benchmarks/gpu_check.sh [out=gpu_check.json] [parts=[env,tests,backends,estimate,real]]
    python benchmarks/gpu_check.py ...                 # the same

Parts (each in its own process where it could crash; a failing part is a row, not an end):

* ``env``: torch, CUDA, the GPU and its memory;
* ``tests``: the test files whose CUDA tests run when a GPU (and a backend) is there, on it:
  hash grid vs tinycudann, rasterizer vs nvdiffrast, marching tets vs kaolin, devices;
* ``backends``: which optional fast backends import (tinycudann, nvdiffrast, kaolin,
  nerfacc with its CUDA path, gsplat); the machine has no network, so none is installed here;
* ``estimate``: ``python -m engine.run recipe=isotropic3d --estimate`` (the prediction the
  real run below is compared with);
* ``real``: the real-size isotropic3d and mvdream recipes with random real-size weights
  (``model: random:...``), two steps of every phase of every stage (NeRF at 64 and 256 px,
  DMTet at 256 and 512 px on grid 128), the stage-end renders at 256 px and the export at
  the recipe's settings; seconds per step and peak CUDA memory per phase.

Without CUDA (CI, a laptop) the parts that need it say so and the rest run: ``env``,
``backends`` and the table (tests/test_gpu_check.py runs those). ``real`` on a CPU takes
tens of minutes; tests/test_real_size.py does it in the slow tier.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Optional

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

PARTS = ("env", "tests", "backends", "estimate", "real")
CUDA_TEST_FILES = ("tests/test_encodings.py", "tests/test_rasterizer.py",
                   "tests/test_marching_tets.py", "tests/test_run.py", "tests/test_dmtet.py")
BACKENDS = ("tinycudann", "nvdiffrast.torch", "kaolin", "nerfacc", "gsplat")
#: real-size recipes, their conditioning input, and their random model
REAL_RECIPES = {
    "isotropic3d": ("image=examples/toy/blue-mushroom.png", "random:isotropic3d"),
    "mvdream": ("prompt=a blue mushroom", "random:mvdream"),
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
    code, out, secs = _run([sys.executable, "-m", "pytest", "-q", "-m", "not slow", "-rs",
                            *CUDA_TEST_FILES], timeout=240)
    summary = _last_line(out)
    skipped = [line for line in out.splitlines() if line.startswith("SKIPPED")]
    table.add("tests", "cuda subset", ("ok: " if code == 0 else f"FAILED ({code}): ") + summary,
              secs)
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


def real_size_argv(recipe: str, out: str, device: str, steps_per_phase: int = 2) -> List[str]:
    """engine.run's arguments for the real-size check of ``recipe``: random real-size
    weights, every phase of every stage for ``steps_per_phase`` steps, the stage-end renders
    at the recipe's size and the export at its settings."""
    from engine import config
    from engine.estimate import phase_overrides

    given, model = REAL_RECIPES[recipe]
    cfg, _ = config.load(recipe, [])
    argv = [f"recipe={recipe}", given, f"out={out}", f"device={device}",
            "output.progress=false", "output.render_every=0", "output.checkpoint_every=0"]
    argv += phase_overrides(cfg, steps_per_phase)
    for i, sname in enumerate(cfg.stages):
        argv.append(f"stages.{sname}.guidance.model={model}")
        rcfg = cfg.components[sname]["representation"][1]
        if cfg.stages[sname].init_from is not None and hasattr(rcfg, "init_threshold"):
            # a few steps of a random model leave the NeRF at its initial blob (peak density
            # 10), under the recipe's level 25: start the mesh at level 5 so that there is a
            # surface to refine and export
            argv.append(f"stages.{sname}.representation.init_threshold=5.0")
        if hasattr(rcfg, "shading"):
            # shaded renders (not only albedo) from the first stage's second phase on, as
            # the recipe's switch at step 5000
            argv.append(f"stages.{sname}.representation.shading.ambient_only_steps="
                        f"{steps_per_phase if i == 0 else 0}")
    return argv


def summarise_run(run_dir: Path) -> List[str]:
    """One line per phase of a finished run: steps, seconds per step, peak CUDA memory."""
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()
               if line.strip()]
    lines, last = [], {}
    for rec in records:
        prev = last.get(rec["stage"], 0.0)
        rec["seconds"] = rec["time"] - prev
        last[rec["stage"]] = rec["time"]
    for stage in dict.fromkeys(r["stage"] for r in records):
        recs = [r for r in records if r["stage"] == stage]
        secs = " ".join(f"{r['seconds']:.2f}" for r in recs)
        mem = max((r.get("cuda_peak_gib", 0.0) for r in recs), default=0.0)
        lines.append(f"{stage}: {len(recs)} steps, s/step {secs}"
                     + (f", peak {mem:.1f} GiB" if mem else ""))
    return lines


def part_real(table: Table, cuda: bool, recipes=tuple(REAL_RECIPES)) -> None:
    if not cuda:
        table.add("real", "real-size recipes", "skipped (no CUDA; tests/test_real_size.py runs "
                                               "them on CPU in the slow tier)")
        return
    for recipe in recipes:
        with tempfile.TemporaryDirectory() as tmp:
            out = str(Path(tmp) / "run")
            code, text, secs = _run([sys.executable, "-m", "engine.run",
                                     *real_size_argv(recipe, out, "cuda")], 400)
            if code != 0:
                table.add("real", recipe, f"FAILED ({code}): {_last_line(text)}", secs)
                continue
            for line in summarise_run(Path(out)):
                table.add("real", recipe, line)
            exported = sorted(p.name for p in (Path(out) / "export").glob("*"))
            table.add("real", recipe, "export: " + (", ".join(exported) or "nothing"), secs)


def main(argv: Optional[List[str]] = None) -> int:
    from engine.cli import Command, Key
    from engine.errors import run_cli

    def run(args_list: List[str]) -> int:
        args = Command("python benchmarks/gpu_check.py", __doc__, [
            Key("out", str, None, help="also write the table as JSON here"),
            Key("parts", list, list(PARTS), choices=PARTS, help="which parts to run"),
        ]).parse(args_list)
        table = Table()
        cuda = part_env(table) if "env" in args.parts else False
        if "env" not in args.parts:
            import torch

            cuda = torch.cuda.is_available()
        if "tests" in args.parts:
            part_tests(table, cuda)
        if "backends" in args.parts:
            part_backends(table, cuda)
        if "estimate" in args.parts:
            part_estimate(table)
        if "real" in args.parts:
            part_real(table, cuda)
        print("\n" + table.format())
        if args.out:
            Path(args.out).write_text(json.dumps(table.rows, indent=2))
        return 0

    return run_cli(run, sys.argv[1:] if argv is None else argv)


if __name__ == "__main__":
    sys.exit(main())
