"""``python -m engine.batch``: one run per picture, over a pool of workers or a Ray cluster.

    python -m engine.batch recipe=NAME images=FOLDER_OR_GLOB out=DIR [workers=N]
        [backend=local|ray] [address=RAY_ADDRESS] [retries=N] [key=value ...]

Each picture gets an ordinary run folder ``DIR/STEM`` made by ``python -m engine.run``
itself (a subprocess: ``recipe=NAME image=PICTURE out=DIR/STEM key=value ...``), so every run
can be looked at, resumed and exported from the command line as any other. Running the same
command again skips the pictures whose run finished (its export is there; with ``export=null``
its last stage's final render), resumes the interrupted ones (``resume=DIR/STEM``) and starts
again the ones that stopped before their first checkpoint. A picture that fails does not stop
the others. At the end one table (picture, status, seconds, run folder) is printed and
written to ``DIR/batch.md`` and ``DIR/batch.json``; each run's output is in ``DIR/logs/``.

Backends: ``local`` (default) runs ``workers`` runs at a time on this machine, each in its
own process; with CUDA GPUs visible each run gets one of them (``CUDA_VISIBLE_DEVICES``,
``workers`` defaults to their count, else 1). ``ray`` makes one Ray task per picture
(``num_gpus=1`` each where CUDA is visible, else ``num_cpus=1``): on this machine
(``ray.init(num_cpus=workers)``) or on a running cluster (``address=auto`` or
``ray://HOST:10001``), where ``out=`` must be a folder every node sees. A run whose process
dies (killed, a lost Ray worker) is tried again ``retries`` times (default 1), resuming from
its last checkpoint; a run that fails on its own (exit code 1, 2 or 3) is not.

Exit codes: 0 every picture finished, 1 some failed, 2 a mistake in the command (checked
before any run starts: nothing is written), 130 interrupted (Ctrl-C stops every run with a
checkpoint; the same command resumes them).
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from engine.errors import ConfigError

USAGE = """\
usage: python -m engine.batch recipe=NAME images=FOLDER_OR_GLOB out=DIR [workers=N]
           [backend=local|ray] [address=RAY_ADDRESS] [retries=N] [key=value ...]

One run of recipe NAME per picture (PNG, JPEG, WebP) of FOLDER (or matching GLOB, quoted),
each in its own run folder DIR/PICTURE_STEM made by python -m engine.run; every other
key=value is an override of each run, as python -m engine.run takes it. Running the same
command again skips finished runs and resumes interrupted ones. The summary is printed and
written to DIR/batch.md and DIR/batch.json; each run's output goes to DIR/logs/STEM.log.

keys:   workers=N      runs at a time (default: the visible CUDA GPUs, else 1)
        backend=B      local (processes on this machine) or ray (one Ray task per picture)
        address=A      ray only: a running cluster (auto, ray://HOST:10001); default: start
                       a local one with `workers` CPUs
        retries=N      tries again a run whose process died (default 1)
exit:   0 all finished, 1 some failed, 2 a mistake in the command, 130 interrupted
"""

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
#: keys each run gets from the batch
OWN_KEYS = {"image": "images=", "inputs.image": "images=", "out": "out=",
            "output.dir": "out=", "resume": "the batch (it resumes runs itself)",
            "output.name": "the batch (the folder is the picture's stem)"}
#: exit codes of engine.run that are the run's own verdict (not a process that died)
FINAL_CODES = (0, 1, 2, 3, 130)
SUMMARY_JSON, SUMMARY_MD, LOGS = "batch.json", "batch.md", "logs"
#: seconds a task Ray tried again waits for the lost try's run to let go of its folder
LOST_RUN_WAIT = 30.0


@dataclass
class Job:
    image: str              # absolute path of the picture
    name: str               # the run folder's name (the picture's stem, made unique)
    run_dir: str            # absolute
    log: str                # absolute
    argv: List[str]         # engine.run items for a new run (recipe=, image=, out=, overrides)
    retries: int = 1
    cwd: str = field(default_factory=os.getcwd)
    # Ray: this batch's id. Each try of the run writes "# batch TOKEN: attempt N" to the
    # log first, so a task Ray tries again (its worker was lost) counts on from there
    token: str = ""


@dataclass
class Result:
    image: str
    status: str             # done | skipped | failed | interrupted
    seconds: float
    run_dir: str
    how: str = ""           # new | resumed | restarted | finished before
    message: str = ""
    attempts: int = 0


def command():
    from engine.cli import Command, Key

    return Command("python -m engine.batch", USAGE, [
        Key("recipe", str, required=True, help="the recipe of every run"),
        Key("images", str, required=True, help="a folder of pictures or a glob"),
        Key("out", str, required=True, help="the folder of the run folders"),
        Key("workers", int, None, help="runs at a time"),
        Key("backend", str, "local", choices=["local", "ray"], help="local or ray"),
        Key("address", str, None, help="a running Ray cluster"),
        Key("retries", int, 1, help="tries again a run whose process died"),
    ], passthrough=True)


# -- inputs --------------------------------------------------------------------------------

def find_images(spec: str) -> List[Path]:
    """The pictures of a folder (not its sub-folders) or of a glob, sorted."""
    path = Path(spec).expanduser()
    if path.is_dir():
        found = [p for p in path.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES]
        if not found:
            raise ConfigError(f"images={spec}: the folder holds no picture "
                              f"({', '.join(IMAGE_SUFFIXES)})")
        return sorted(found)
    if glob.has_magic(spec):
        found = [Path(p) for p in glob.glob(os.path.expanduser(spec), recursive=True)]
        found = [p for p in found if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES]
        if not found:
            raise ConfigError(f"images={spec}: no picture ({', '.join(IMAGE_SUFFIXES)}) "
                              "matches the pattern")
        return sorted(found)
    if path.is_file():
        if path.suffix.lower() not in IMAGE_SUFFIXES:
            raise ConfigError(f"images={spec} is not a picture ({', '.join(IMAGE_SUFFIXES)})")
        return [path]
    raise ConfigError(f"images={spec}: no such folder or file (give a folder of pictures or "
                      "a quoted glob such as 'pictures/*.png')")


def run_names(images: Sequence[Path]) -> List[str]:
    """A folder name per picture: its stem, made safe and unique (cat.png and cat.jpg:
    cat-png and cat-jpg)."""
    from engine.outputs import slug

    stems = [slug(p.stem, 80) for p in images]
    names = []
    for p, stem in zip(images, stems):
        same = [q.suffix.lower() for q, t in zip(images, stems) if t == stem]
        differ = len(same) > 1 and len(set(same)) == len(same)
        names.append(f"{stem}-{slug(p.suffix, 8)}" if differ else stem)
    used: set = set()
    for i, name in enumerate(names):     # still equal (a/cat.png and b/cat.png): number them
        n, candidate = 1, name
        while candidate in used:
            n += 1
            candidate = f"{name}-{n}"
        names[i] = candidate
        used.add(candidate)
    return names


def check_overrides(overrides: Sequence[str]) -> None:
    for item in overrides:
        key = item.split("=", 1)[0].strip()
        if key in OWN_KEYS:
            raise ConfigError(f"{key}= is set by {OWN_KEYS[key]} for each run; drop it")


def validate(recipe: str, images: Sequence[Path], out: Path, overrides: Sequence[str]):
    """Everything engine.run checks before it writes (the recipe, the overrides, the device,
    the weights), once, with the first picture: a mistake here is one line and no run
    starts. Returns the run config."""
    from engine import config
    from engine.run import _preflight, resolve_device

    check_overrides(overrides)
    cfg, _ = config.load(recipe, [f"image={images[0]}", f"out={out / 'check'}",
                                  *overrides])
    if "image" not in cfg.inputs.requires:
        raise ConfigError(f"recipe '{cfg.recipe}' does not take a picture (it needs "
                          f"{', '.join(cfg.inputs.requires) or 'no input'}); a batch runs a "
                          "picture recipe on each picture")
    config.check_inputs(cfg)
    resolve_device(cfg.system.device)
    _preflight(cfg)
    return cfg


# -- one run -------------------------------------------------------------------------------

def is_finished(run_dir: Path) -> bool:
    """Whether the run in ``run_dir`` finished: its export files are there (every mesh
    format and turntable format its config.yaml asks for), or, with ``export: null``, its
    last stage's final render and stage-end checkpoint."""
    from engine import checkpoint
    from engine.recipe_files import load_yaml

    try:
        cfg = load_yaml((run_dir / "config.yaml").read_text(), "config.yaml")
        stages = list(cfg["stages"])
    except Exception:
        return False
    export = cfg.get("export")
    if export is None:
        last = stages[-1]
        steps = cfg["stages"][last].get("steps")
        end = run_dir / "checkpoints" / checkpoint.checkpoint_name(len(stages) - 1, last, steps)
        return (run_dir / "renders" / f"{last}-final.png").is_file() and end.is_file()
    out = run_dir / "export"
    files = [out / f"mesh.{f}" for f in export.get("formats") or []]
    tt = export.get("turntable") or {}
    if tt.get("enabled", True):
        files += [out / f"turntable.{f}" for f in tt.get("formats") or []]
    return bool(files) and all(f.is_file() and f.stat().st_size > 0 for f in files)


def _state(run_dir: Path) -> str:
    """new | finished | resumable | restart (a folder without a checkpoint) | busy:PID"""
    from engine import checkpoint
    from engine.outputs import LOCK_NAME, _alive, _read_pid

    if not run_dir.exists():
        return "new"
    pid = _read_pid(run_dir / LOCK_NAME)
    if pid is not None and pid != os.getpid() and _alive(pid):
        return f"busy:{pid}"
    if is_finished(run_dir):
        return "finished"
    if checkpoint.list_checkpoints(run_dir / "checkpoints"):
        return "resumable"
    return "restart"


def _last_error(log: Path) -> str:
    try:
        lines = log.read_text(errors="replace").splitlines()
    except OSError:
        return ""
    for line in reversed(lines):
        if line.startswith(("error: ", "aborted: ")):
            return line
    for line in reversed(lines):       # a traceback's last line
        if line.strip():
            return line.strip()[:300]
    return ""


def _attempts_before(log: Path, token: str) -> int:
    """How many tries of this batch (``token``) the log records: a Ray task tried again
    after its worker died counts on from them."""
    if not token:
        return 0
    try:
        text = log.read_text(errors="replace")
    except OSError:
        return 0
    mark = f"# batch {token}: attempt "
    return sum(line.startswith(mark) for line in text.splitlines())


def _die_with_parent():
    """A ``preexec_fn`` (Linux) that has the run's process SIGKILLed when the process that
    started it dies, so a run does not outlive a lost Ray worker (it would hold its folder's
    lock while Ray tries the task again). libc's ``prctl`` is looked up here, before the
    fork, so the child only calls it; None where it is not available."""
    import ctypes
    import signal

    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    parent = os.getpid()

    def preexec() -> None:
        prctl(1, int(signal.SIGKILL))          # PR_SET_PDEATHSIG
        if os.getppid() != parent:             # the parent died before that: go too
            os._exit(137)

    return preexec


def run_job(job: Job, env: Optional[Dict[str, str]] = None,
            die_with_parent: bool = False) -> Result:
    """Run (or resume, or skip) one picture's run; the decision is made here, when the run
    starts, so a task that is tried again (a lost worker) resumes what the first try did.
    ``die_with_parent``: the run's process is killed when this process dies (Linux; the Ray
    backend: a lost worker takes its run with it)."""
    start = time.time()
    run_dir, log = Path(job.run_dir), Path(job.log)
    before = _attempts_before(log, job.token)
    state = _state(run_dir)
    if before:
        # Ray tries the task again as soon as it learns its worker died; the run's process
        # (killed with it) may not be gone (reaped) yet: give it a moment to let go
        deadline = time.time() + LOST_RUN_WAIT
        while state.startswith("busy:") and time.time() < deadline:
            time.sleep(0.2)
            state = _state(run_dir)
    if state == "finished":
        return Result(job.image, "skipped", 0.0, job.run_dir, "finished before")
    if state.startswith("busy:"):
        return Result(job.image, "failed", 0.0, job.run_dir, "",
                      f"the run folder is in use by process {state[5:]}")
    how = {"new": "new", "resumable": "resumed", "restart": "restarted"}[state]
    code = None
    full_env = dict(os.environ, **(env or {}))
    log.parent.mkdir(parents=True, exist_ok=True)
    attempts = before
    if before:
        with open(log, "a") as f:
            f.write(f"# the worker running attempt {before} was lost; Ray tried the task "
                    "again\n")
    preexec = _die_with_parent() if die_with_parent and sys.platform.startswith("linux") \
        else None
    while True:
        attempts += 1
        state = _state(run_dir)
        if state == "restart":      # stopped before its first checkpoint: nothing to keep
            shutil.rmtree(run_dir)
        items = [f"resume={run_dir}"] if state == "resumable" else job.argv
        with open(log, "a") as f:
            if job.token:
                f.write(f"# batch {job.token}: attempt {attempts}\n")
            f.write(f"$ python -m engine.run {' '.join(items)}\n")
            f.flush()
            cwd = job.cwd if os.path.isdir(job.cwd) else None   # (another Ray node)
            code = subprocess.call([sys.executable, "-m", "engine.run", *items], cwd=cwd,
                                   stdout=f, stderr=subprocess.STDOUT, env=full_env,
                                   preexec_fn=preexec)
        if code in FINAL_CODES or attempts > job.retries:   # (this batch's tries in all)
            break
        with open(log, "a") as f:
            f.write(f"# the run's process died (exit code {code}); trying again\n")
    seconds = round(time.time() - start, 1)
    if code == 0:
        return Result(job.image, "done", seconds, job.run_dir, how, "", attempts)
    if code == 130:
        return Result(job.image, "interrupted", seconds, job.run_dir, how,
                      "stopped by Ctrl-C; run the same command again to resume", attempts)
    message = _last_error(log) or f"exit code {code}"
    if code not in FINAL_CODES:
        message = f"the process died (exit code {code}): {message}"
    return Result(job.image, "failed", seconds, job.run_dir, how, message, attempts)


# -- backends ------------------------------------------------------------------------------

def _cuda_count() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def visible_gpus(device: str) -> List[str]:
    """The GPUs a local batch spreads its runs over, each as the ``CUDA_VISIBLE_DEVICES``
    entry that shows a run that GPU alone: the batch's own ``CUDA_VISIBLE_DEVICES`` entries
    when it is set (``2,3``: the runs get ``2`` or ``3``, never ``0``), else ``0`` to
    ``count - 1``. None for a recipe on ``device=cpu``, or on one named GPU (``cuda:N``:
    every run uses that one, as the command says), or where CUDA shows no GPU."""
    if device not in ("auto", "cuda"):
        return []
    count = _cuda_count()
    if count <= 0:
        return []
    given = os.environ.get("CUDA_VISIBLE_DEVICES")
    if given is not None:
        ids = [entry.strip() for entry in given.split(",") if entry.strip()]
        if len(ids) >= count:
            return ids[:count]          # CUDA uses the leading entries it can read
    return [str(i) for i in range(count)]


def run_local(jobs: List[Job], workers: int, gpus: Sequence[str], report) -> List[Result]:
    """``workers`` runs at a time, each its own process. With ``gpus`` (visible_gpus) each
    worker has one of them, round robin (more workers than GPUs share them), and every run
    it starts sees that GPU alone (``CUDA_VISIBLE_DEVICES``)."""
    from concurrent.futures import ThreadPoolExecutor

    import queue

    free: "queue.Queue[Optional[str]]" = queue.Queue()
    for i in range(max(workers, 1)):
        free.put(gpus[i % len(gpus)] if gpus else None)

    def one(job: Job) -> Result:
        slot = free.get()
        try:
            env = {"CUDA_VISIBLE_DEVICES": slot} if slot is not None else {}
            result = run_job(job, env)
        finally:
            free.put(slot)
        report(result)
        return result

    pool = ThreadPoolExecutor(max_workers=max(workers, 1))
    try:
        futures = [pool.submit(one, job) for job in jobs]
        return [f.result() for f in futures]
    finally:      # Ctrl-C: the runs (in this terminal's process group) stop with a
        pool.shutdown(wait=True, cancel_futures=True)    # checkpoint; queued ones never start


def run_ray(jobs: List[Job], workers: int, address: Optional[str], retries: int,
            report) -> List[Result]:
    """One Ray task per picture: ``num_gpus=1`` where CUDA is visible, else ``num_cpus=1``.
    Ray tries a task again when its worker dies (``max_retries``); the task resumes."""
    try:
        import ray
    except ImportError:
        raise ConfigError('backend=ray needs the ray package, which is not installed: '
                          'pip install "distill-engine[batch]" (or use backend=local)') from None
    started = not ray.is_initialized()
    if started:
        kwargs = dict(include_dashboard=False, logging_level="ERROR", log_to_driver=False)
        if address:
            ray.init(address=address, **kwargs)
        else:
            ray.init(num_cpus=max(workers, 1), object_store_memory=100 * 2**20, **kwargs)
    try:
        gpus = ray.cluster_resources().get("GPU", 0)
        resources = {"num_gpus": 1} if gpus else {"num_cpus": 1}
        task = ray.remote(max_retries=retries, **resources)(_ray_task)
        token = f"{os.getpid()}-{time.time_ns()}"
        pending = {task.remote(replace(job, token=token)): job for job in jobs}
        results: Dict[str, Result] = {}
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1)
            ref = done[0]
            job = pending.pop(ref)
            try:
                result = Result(**ray.get(ref))
            except Exception as exc:     # the task failed more than `retries` times
                first = " ".join(str(exc).split())[:200]
                result = Result(job.image, "failed", 0.0, job.run_dir, "",
                                f"the Ray task failed: {first}")
            results[job.image] = result
            report(result)
        return [results[job.image] for job in jobs]
    finally:
        if started:
            ray.shutdown()


def _ray_task(job: Job) -> dict:
    return asdict(run_job(job, die_with_parent=True))


# -- summary ---------------------------------------------------------------------------------

def table(results: Sequence[Result], out: Path) -> str:
    def rel(p: str) -> str:
        try:
            return str(Path(p).relative_to(out.resolve()))
        except ValueError:
            return p

    rows = [("image", "status", "seconds", "run folder", "note")]
    for r in results:
        note = r.message or ("" if r.how in ("new", "finished before") else r.how)
        rows.append((Path(r.image).name, r.status, f"{r.seconds:.1f}", rel(r.run_dir), note))
    lines = ["| " + " | ".join(row) + " |" for row in rows]
    lines.insert(1, "|" + "|".join("---" for _ in rows[0]) + "|")
    return "\n".join(lines)


def write_summary(out: Path, results: Sequence[Result], meta: dict) -> None:
    from engine.atomic import atomic_write_text

    counts = {s: sum(r.status == s for r in results)
              for s in ("done", "skipped", "failed", "interrupted")}
    data = dict(meta, counts=counts, runs=[asdict(r) for r in results])
    atomic_write_text(out / SUMMARY_JSON, json.dumps(data, indent=2) + "\n")
    head = (f"# Batch: {meta['recipe']} on {len(results)} pictures\n\n"
            f"`{meta['command']}`\n\n{meta['finished_at']}, {meta['wall_seconds']:.1f} s wall, "
            f"backend {meta['backend']}, {meta['workers']} workers: "
            + ", ".join(f"{n} {s}" for s, n in counts.items() if n) + "\n\n")
    atomic_write_text(out / SUMMARY_MD, head + table(results, out) + "\n")


# -- the command -----------------------------------------------------------------------------

def run(argv: List[str]) -> int:
    if not argv:
        print(USAGE)
        return 0
    args = command().parse(argv)
    overrides = list(args.rest)
    if args.workers is not None and args.workers < 1:
        raise ConfigError(f"workers: must be >= 1, got {args.workers}")
    if args.retries < 0:
        raise ConfigError(f"retries: must be >= 0, got {args.retries}")
    if args.address and args.backend != "ray":
        raise ConfigError("address= is for backend=ray")
    if args.backend == "ray":
        import importlib.util

        if importlib.util.find_spec("ray") is None:
            raise ConfigError('backend=ray needs the ray package, which is not installed: '
                              'pip install "distill-engine[batch]" (or use backend=local)')
    images = find_images(args.images)
    out = Path(args.out).expanduser()
    if out.exists() and not out.is_dir():
        raise ConfigError(f"out={args.out} is a file; give a folder")
    cfg = validate(args.recipe, images, out, overrides)
    gpus = visible_gpus(str(cfg.system.device)) if args.backend == "local" else []
    workers = args.workers or max(len(gpus), 1)

    out = out.resolve()
    names = run_names(images)
    jobs = [Job(str(p.resolve()), n, str(out / n), str(out / LOGS / f"{n}.log"),
                [f"recipe={args.recipe}", f"image={p.resolve()}", f"out={out / n}",
                 "output.progress=false", *overrides], retries=args.retries)
            for p, n in zip(images, names)]
    out.mkdir(parents=True, exist_ok=True)
    print(f"batch: {len(jobs)} pictures, recipe {cfg.recipe}, backend {args.backend}, "
          f"{workers} worker{'s' if workers > 1 else ''}"
          f"{' on GPUs ' + ','.join(gpus) if gpus else ''}; runs in {out}",
          flush=True)
    lock = threading.Lock()
    done = [0]

    def report(r: Result) -> None:
        with lock:
            done[0] += 1
            extra = f": {r.message}" if r.message else ""
            print(f"[{done[0]}/{len(jobs)}] {Path(r.image).name}: {r.status} "
                  f"({r.seconds:.1f} s){extra}", flush=True)

    start = time.time()
    try:
        if args.backend == "ray":
            results = run_ray(jobs, workers, args.address, args.retries, report)
        else:
            results = run_local(jobs, workers, gpus, report)
    except KeyboardInterrupt:
        print("interrupted: the runs stopped with a checkpoint; run the same command again "
              "to resume them", file=sys.stderr)
        return 130
    meta = {"recipe": cfg.recipe, "images": args.images, "out": str(out),
            "backend": args.backend, "workers": workers,
            "command": "python -m engine.batch " + " ".join(argv),
            "finished_at": time.strftime("%Y-%m-%d %H:%M:%S"),
            "wall_seconds": round(time.time() - start, 1)}
    write_summary(out, results, meta)
    print()
    print(table(results, out))
    print(f"\nsummary: {out / SUMMARY_MD} and {out / SUMMARY_JSON}")
    if any(r.status == "interrupted" for r in results):
        return 130
    return 0 if all(r.status in ("done", "skipped") for r in results) else 1


def main(argv: Optional[List[str]] = None) -> int:
    from engine.errors import run_cli

    return run_cli(run, sys.argv[1:] if argv is None else argv)


if __name__ == "__main__":
    sys.exit(main())
