"""The web app's runs (``python -m engine.app``), without the web page: checking a request
the way ``python -m engine.run`` checks it, a queue with one run at a time per device, each
run a ``python -m engine.run`` subprocess, and what a run folder shows while it trains.

A run started here is a CLI run: the same command line (printed on the page), the same run
folder (``config.yaml``, ``metrics.jsonl``, ``checkpoints/``, ``renders/``, ``export/``), the
same exit codes; Cancel sends SIGINT, which is Ctrl-C (a checkpoint, exit 130), so a
cancelled run continues with ``python -m engine.run resume=FOLDER``. Nothing here imports
gradio; :mod:`engine.app` is the page.
"""

from __future__ import annotations

import hashlib
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
import traceback
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

from engine.errors import ConfigError, UserError

#: keys the app sets itself (a new folder under the outputs, the picture and recipe boxes)
APP_KEYS = {"out": "out=", "output.dir": "out=", "resume": "resume=", "recipe": "recipe="}
#: states of a run: waiting, training, stopping after a Cancel, and the four ends
ACTIVE = ("running", "stopping")
ENDED = ("done", "cancelled", "failed", "interrupted")
#: files of export/ offered for download (the OBJ with its material and texture)
DOWNLOADS = ("mesh.glb", "mesh.obj", "mesh.mtl", "mesh_albedo.png", "gaussians.ply",
             "turntable.mp4", "turntable.gif")
_CHECK_LOCK = threading.Lock()       # config loading and the plugin registry: one at a time


def one_line(exc: BaseException) -> str:
    """A user error as the command line prints it (engine.errors.run_cli)."""
    return f"error: {' '.join(str(exc).split())}"


def override_lines(text: str) -> List[str]:
    """The overrides box: one ``key=value`` a line; blank lines and ``#`` comments skipped,
    quotes around a whole line (pasted from a shell) dropped. Keys the app sets itself and
    ``--options`` are refused in one line."""
    items = []
    for raw in (text or "").splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if len(line) > 1 and line[0] == line[-1] and line[0] in "'\"":
            line = line[1:-1].strip()
        if line.startswith("-"):
            raise ConfigError(f"'{line}': the app takes key=value lines only (options such as "
                              "--dry-run are for python -m engine.run)")
        key = line.split("=", 1)[0].strip()
        if key in APP_KEYS:
            raise ConfigError(f"{APP_KEYS[key]} is set by the app (each run gets a new folder "
                              "under the outputs); to continue a run use python -m engine.run "
                              "resume=FOLDER")
        items.append(line)
    return items


def yaml_text(value: str) -> str:
    """``value`` written so that the config's YAML reading gives back exactly this string
    (a prompt such as ``a cat: sitting`` would otherwise be read as a mapping)."""
    from engine.cli import yaml_value

    return value if yaml_value(value) == value else json.dumps(value)


def device_key(device) -> str:
    """A torch.device as the name of its queue: ``cpu``, ``cuda:0``, ..."""
    if device.type == "cuda" and device.index is None:
        import torch

        return f"cuda:{torch.cuda.current_device()}"
    return str(device)


@dataclass
class Request:
    """A checked request: the ``engine.run`` items (without ``out=``) and what the page shows."""

    recipe: str
    items: List[str]
    device: str
    stages: Dict[str, int]                    # stage name -> steps
    image: Optional[str] = None               # the picture to keep (the upload), if any
    image_name: Optional[str] = None
    prompt: Optional[str] = None
    note: str = ""                            # what the engine decided about the picture
    reference: Any = None                     # the picture as the engine sees it (loaded)


def check_request(recipe: str, image: Optional[str], prompt: Optional[str],
                  overrides: str, image_name: Optional[str] = None) -> Request:
    """Check a request as ``python -m engine.run`` checks it, in the same order and with the
    same functions (items, config, inputs, device, memory, weights, the picture), so a mistake
    is the same one-line UserError. ``image_name`` replaces the upload's temporary path in
    messages."""
    from engine import config
    from engine.bounds import check_memory
    from engine.images import load_reference_image
    from engine.run import _preflight, command, resolve_device

    if not recipe:
        raise ConfigError("no recipe given: pick one (python -m engine.run --list shows them)")
    items = [f"recipe={recipe}"]
    if prompt:
        items.append(f"prompt={yaml_text(prompt)}")
    user = override_lines(overrides)
    notes: List[str] = []
    reference = None
    with _CHECK_LOCK:
        try:
            cmd = command()
            args = cmd.parse(items + ([f"image={yaml_text(image)}"] if image else []) + user)
            try:
                cfg, resolved = config.load(args.recipe, args.rest)
            except ConfigError as exc:   # as engine.run: a misspelt key of its own
                raise ConfigError(f"{exc}{cmd.misspelt(args.rest)}") from None
            config.check_inputs(cfg)
            device = resolve_device(cfg.system.device)
            check_memory(config.plain(resolved), device)
            _preflight(cfg)
            if cfg.inputs.image:
                reference = load_reference_image(cfg.inputs.image, cfg.inputs.image_size,
                                                 cfg.inputs.object_fraction, log=notes.append)
        except UserError as exc:
            if image and image_name:
                raise UserError(str(exc).replace(str(image), image_name)) from None
            raise
    # the picture given in the overrides (image=PATH on the server) wins, as on the CLI
    given = [i for i in user if i.split("=", 1)[0].strip() in ("image", "inputs.image")]
    uploaded = image if image and not given else None
    return Request(recipe=recipe, items=items + user, device=device_key(device),
                   stages={s: int(st.steps) for s, st in cfg.stages.items()},
                   image=uploaded, image_name=image_name, prompt=prompt, reference=reference,
                   note=" ".join(notes).replace(str(image), image_name or str(image))
                   if image else " ".join(notes))


def keep_upload(path: str, name: Optional[str], folder: Path) -> Path:
    """The uploaded picture, copied to ``folder/SHA/NAME`` (content-addressed, kept beside
    the runs): the run's config.yaml points at it, so resume= finds it after the web
    server's temporary files are gone."""
    from engine.outputs import slug

    src = Path(path)
    digest = hashlib.sha256(src.read_bytes()).hexdigest()[:16]
    name = Path(name or src.name)
    dest = folder / digest / (slug(name.stem) + name.suffix.lower()[:8])
    if not dest.is_file():
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(f".{dest.name}.{os.getpid()}.tmp")
        shutil.copyfile(src, tmp)
        os.replace(tmp, dest)
    return dest.resolve()


@dataclass
class Job:
    """One run: queued, then a ``python -m engine.run`` subprocess."""

    id: str
    request: Request
    state: str = "queued"
    submitted: float = field(default_factory=time.time)
    started: Optional[float] = None
    ended: Optional[float] = None
    run_dir: Optional[Path] = None
    argv: List[str] = field(default_factory=list)
    returncode: Optional[int] = None
    error: str = ""                       # the last line the run printed on stderr, if it failed
    cancels: int = 0
    zip: Optional[Path] = None
    log: Optional[Path] = None            # the run's output (stdout and stderr), a file
    process: Any = None

    @property
    def command(self) -> str:
        """The command line of this run, to copy into a terminal."""
        return shlex.join(["python"] + self.argv[1:]) if self.argv else ""

    def log_lines(self, count: int = 40, limit: int = 32768) -> List[str]:
        """The last lines of the run's output (a progress bar's \\r updates: the last one)."""
        if self.log is None:
            return []
        try:
            with open(self.log, "rb") as f:
                size = f.seek(0, os.SEEK_END)
                f.seek(max(0, size - limit))
                data = f.read().decode("utf-8", "replace")
        except OSError:
            return []
        lines = [line.split("\r")[-1].rstrip() for line in data.replace("\r\n", "\n").split("\n")]
        return [line for line in lines[1 if size > limit else 0:] if line][-count:]


class RunManager:
    """The queue: runs start in the order they were submitted, one at a time on each
    device; each is a subprocess in its own session, writing its output to a file (Ctrl-C in
    the app's terminal reaches the runs only through :meth:`shutdown`, and a run outlives an
    app that is killed). ``work``: the app's own files (logs, zips, previews); a temporary
    folder, removed at the end, when not given."""

    def __init__(self, outputs: Path, python: str = sys.executable,
                 cwd: Optional[Path] = None, work: Optional[Path] = None):
        import tempfile

        self.outputs = Path(outputs).resolve()
        self.uploads = self.outputs / "uploads"
        self.python, self.cwd = python, cwd
        self._own_work = work is None
        self.work = Path(work) if work else Path(tempfile.mkdtemp(prefix="distill-app-"))
        self.jobs: Dict[str, Job] = {}
        self._lock = threading.RLock()
        self._next = 1

    # -- the queue ----------------------------------------------------------------------

    def submit(self, request: Request) -> Job:
        if request.image:
            request.image = str(keep_upload(request.image, request.image_name, self.uploads))
        request.reference = None
        with self._lock:
            job = Job(str(self._next), request)
            self._next += 1
            self.jobs[job.id] = job
            self._schedule()
        return job

    def get(self, job_id: Any) -> Optional[Job]:
        return self.jobs.get(str(job_id).strip()) if job_id not in (None, "") else None

    def ahead(self, job: Job) -> int:
        """Runs that will use this job's device before it."""
        with self._lock:
            order = list(self.jobs.values())
            return sum(1 for j in order[:order.index(job)]
                       if j.request.device == job.request.device
                       and (j.state in ACTIVE or j.state == "queued"))

    def _schedule(self) -> None:
        with self._lock:
            busy = {j.request.device for j in self.jobs.values() if j.state in ACTIVE}
            for job in self.jobs.values():
                if job.state == "queued" and job.request.device not in busy:
                    busy.add(job.request.device)
                    self._start(job)

    def _start(self, job: Job) -> None:
        from engine.outputs import create_run_dir

        req = job.request
        try:   # the folder the CLI would choose, claimed now; an empty out= folder is used
            run_dir, lock = create_run_dir(str(self.outputs), req.recipe, None, None,
                                           req.image_name if req.image else None, req.prompt)
            lock.release()
        except UserError as exc:
            self._end(job, "failed", one_line(exc))
            return
        job.run_dir = run_dir.resolve()
        image = [f"image={yaml_text(req.image)}"] if req.image else []
        job.argv = [self.python, "-m", "engine.run", *req.items[:1], *image, *req.items[1:],
                    f"out={yaml_text(str(job.run_dir))}"]
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        job.log = self.work / "logs" / f"run-{job.id}.log"
        try:
            job.log.parent.mkdir(parents=True, exist_ok=True)
            with open(job.log, "wb") as out:
                job.process = subprocess.Popen(job.argv, cwd=self.cwd, env=env,
                                               stdin=subprocess.DEVNULL, stdout=out,
                                               stderr=subprocess.STDOUT, start_new_session=True)
        except OSError as exc:
            self._end(job, "failed", f"error: cannot start {self.python}: {exc}")
            return
        job.state, job.started = "running", time.time()
        threading.Thread(target=self._wait, args=(job,), daemon=True).start()

    def _wait(self, job: Job) -> None:
        code = job.process.wait()
        job.returncode = code
        lines = job.log_lines(200)
        last = next((t for t in reversed(lines) if t.startswith(("error:", "aborted:"))), "")
        if code == 0:
            state, message = "done", ""
        elif code == 130:
            state, message = ("cancelled" if job.cancels else "interrupted"), last
        else:
            state = "failed"
            message = last or f"error: the run exited with code {code}" + \
                (f": {lines[-1]}" if lines else "")
            if code == 1:        # a traceback: its last line says what
                message = ("error: the engine crashed (exit 1, a bug; the log has the "
                           f"traceback): {lines[-1] if lines else ''}")
        try:
            job.zip = zip_run(job.run_dir, self.work / "zips" / f"run-{job.id}") \
                if job.run_dir else None
        except OSError as exc:
            message = message or f"error: the run folder could not be zipped: {exc}"
        self._end(job, state, message)

    def _end(self, job: Job, state: str, message: str) -> None:
        with self._lock:
            job.state, job.error, job.ended = state, message, time.time()
            self._schedule()

    def cancel(self, job_id: Any) -> str:
        """Cancel a run: a queued one never starts; a running one gets SIGINT (Ctrl-C: the
        step finishes, a checkpoint is written, exit 130); a second Cancel stops it at once
        (a second Ctrl-C). Returns what happened, in one line."""
        with self._lock:
            job = self.get(job_id)
            if job is None:
                return f"error: no run {job_id!s} in this app" if job_id else "no run to cancel"
            if job.state == "queued":
                self._end(job, "cancelled", "")
                return f"run {job.id} cancelled before it started"
            if job.state not in ACTIVE:
                return f"run {job.id} has already ended ({job.state})"
            job.cancels += 1
            job.state = "stopping"
        try:
            os.kill(job.process.pid, signal.SIGINT)
        except ProcessLookupError:
            pass
        if job.cancels == 1:
            return (f"run {job.id}: stopping after this step (a checkpoint is written); "
                    "Cancel again to stop at once")
        return f"run {job.id}: stopping at once"

    def shutdown(self, timeout: float = 120.0, out=None) -> None:
        """The app is closing: queued runs are dropped, running ones are stopped as Ctrl-C
        stops them (a checkpoint each) and waited for; each prints how to continue it."""
        out = out or sys.stderr
        with self._lock:
            for job in self.jobs.values():
                if job.state == "queued":
                    job.state = "cancelled"
            running = [j for j in self.jobs.values() if j.state in ACTIVE]
        for job in running:
            self.cancel(job.id)
        deadline = time.time() + timeout
        try:
            for job in running:
                job.process.wait(timeout=max(0.1, deadline - time.time()))
        except (subprocess.TimeoutExpired, KeyboardInterrupt):
            for job in running:
                if job.process.poll() is None:
                    self.cancel(job.id)            # the second SIGINT: stop at once
        for job in running:
            if job.process.poll() is None:
                try:
                    job.process.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    job.process.kill()
            print(f"run {job.id} stopped (exit {job.process.returncode}); continue with: "
                  f"python -m engine.run resume={job.run_dir}", file=out)
        if self._own_work:
            shutil.rmtree(self.work, ignore_errors=True)


# -- what a run folder shows ----------------------------------------------------------------

def read_metrics_tail(path: Path, limit: int = 65536) -> List[dict]:
    """The last complete records of metrics.jsonl (read from its end: cheap for long runs)."""
    try:
        with open(path, "rb") as f:
            size = f.seek(0, os.SEEK_END)
            f.seek(max(0, size - limit))
            data = f.read()
    except OSError:
        return []
    lines = data.split(b"\n")
    if size > limit:
        lines = lines[1:]          # the first one is cut
    records = []
    for line in lines:
        try:
            records.append(json.loads(line))
        except ValueError:
            continue               # a line being written
    return records


def newest_render(run_dir: Optional[Path]) -> Optional[Path]:
    """The newest finished PNG of renders/ (temporary files start with a dot)."""
    if run_dir is None:
        return None
    try:
        pngs = [p for p in (run_dir / "renders").glob("*.png") if not p.name.startswith(".")]
        return max(pngs, key=lambda p: (p.stat().st_mtime_ns, p.name)) if pngs else None
    except OSError:
        return None


def export_files(run_dir: Optional[Path]) -> Dict[str, Path]:
    """export/'s files that the page offers, by name, in :data:`DOWNLOADS` order."""
    if run_dir is None:
        return {}
    return {n: run_dir / "export" / n for n in DOWNLOADS if (run_dir / "export" / n).is_file()}


def zip_run(run_dir: Path, folder: Path) -> Optional[Path]:
    """The whole run folder as ``folder/NAME.zip`` (without its lock and temporary files)."""
    if not run_dir.is_dir() or not any(run_dir.iterdir()):
        return None
    folder.mkdir(parents=True, exist_ok=True)
    dest = folder / f"{run_dir.name}.zip"
    tmp = folder / f".{run_dir.name}.zip.tmp"
    packed = (".png", ".mp4", ".gif", ".glb", ".safetensors")
    with zipfile.ZipFile(tmp, "w") as z:
        for path in sorted(run_dir.rglob("*")):
            if path.is_file() and path.name != "run.lock" and not path.name.startswith("."):
                kind = zipfile.ZIP_STORED if path.suffix in packed else zipfile.ZIP_DEFLATED
                z.write(path, Path(run_dir.name) / path.relative_to(run_dir), compress_type=kind)
    os.replace(tmp, dest)
    return dest


def _seconds(s: float) -> str:
    s = int(round(s))
    return f"{s // 3600} h {s % 3600 // 60:02d} min" if s >= 3600 else \
        f"{s // 60} min {s % 60:02d} s" if s >= 60 else f"{s} s"


def progress(job: Job) -> Dict[str, Any]:
    """Where a run is: its stage, step of steps, an ETA and the latest losses (from
    metrics.jsonl), the newest render, the exported files."""
    stages = job.request.stages
    info: Dict[str, Any] = {"stage": None, "stage_index": None, "stages": len(stages),
                            "step": 0, "steps": None, "eta_s": None, "losses": {},
                            "phase": "waiting" if job.state == "queued" else "starting"}
    records = read_metrics_tail(job.run_dir / "metrics.jsonl") if job.run_dir else []
    if records:
        last = records[-1]
        name, steps = last.get("stage"), stages.get(last.get("stage"), 0)
        done = int(last.get("step", 0)) + 1
        info.update(stage=name, stage_index=last.get("stage_index"), step=done, steps=steps,
                    losses={k: v for k, v in last.items()
                            if (k == "loss" or k.startswith("loss/")) and v is not None})
        same = [r for r in records if r.get("stage") == name]
        first = same[0]
        if len(same) > 1:   # seconds per step over the recent steps of this stage
            per = (last.get("time", 0.0) - first.get("time", 0.0)) / \
                max(1, last["step"] - first["step"])
        else:
            per = last.get("time", 0.0) / max(1, done)
        later = list(stages)[list(stages).index(name) + 1:] if name in stages else []
        remaining = (steps - done) + sum(stages[s] for s in later)
        info["eta_s"] = per * remaining
        info["phase"] = "training" if remaining > 0 else "exporting"
    if job.state in ENDED:
        info["phase"] = job.state
    render = newest_render(job.run_dir)
    info["render"] = str(render) if render else None
    return info


def describe(job: Job) -> Dict[str, Any]:
    """Everything the page (and the API's ``status``) shows about a run, as plain data."""
    p = progress(job)
    files = export_files(job.run_dir) if job.state in ENDED else {}
    return {"id": job.id, "state": job.state, "recipe": job.request.recipe,
            "device": job.request.device, "run_dir": str(job.run_dir or ""),
            "command": job.command, "returncode": job.returncode, "error": job.error,
            "note": job.request.note, **p,
            "glb": str(files["mesh.glb"]) if "mesh.glb" in files else None,
            "video": str(files.get("turntable.mp4") or files.get("turntable.gif") or "")
            or None,
            "files": [str(f) for f in files.values()],
            "zip": str(job.zip) if job.zip else None,
            "log": job.log_lines()}


def summary(job: Job, manager: Optional[RunManager] = None) -> str:
    """One run in a few lines of Markdown: state, stage, step, ETA, losses, the folder."""
    d = describe(job)
    head = f"**run {job.id}** · {job.request.recipe} · {d['device']} · **{job.state}**"
    lines = [head]
    if job.state == "queued":
        ahead = manager.ahead(job) if manager else 0
        lines.append(f"waiting for {d['device']}: {ahead} run{'s' * (ahead != 1)} ahead")
    elif d["stage"]:
        stage_no = (d["stage_index"] or 0) + 1
        eta = f" · about {_seconds(d['eta_s'])} of training left" \
            if d["eta_s"] and job.state in ACTIVE and d["phase"] == "training" else ""
        lines.append(f"stage **{d['stage']}** ({stage_no}/{d['stages']}) · step "
                     f"{d['step']}/{d['steps']}{eta}"
                     + (" · exporting the mesh and turntable"
                        if d["phase"] == "exporting" and job.state in ACTIVE else ""))
        if d["losses"]:
            lines.append(" · ".join(f"{k.split('/')[-1]} {v:.4g}" for k, v in d["losses"].items()
                                    if isinstance(v, (int, float))))
    elif job.state in ACTIVE:
        lines.append("starting: loading the models and the picture")
    if job.error:
        lines.append(f"`{job.error}`")
    if job.run_dir:
        lines.append(f"folder: `{job.run_dir}`")
    if job.state in ("cancelled", "interrupted") and job.run_dir and job.returncode == 130:
        lines.append(f"continue with: `python -m engine.run resume={job.run_dir}`")
    return "  \n".join(lines)


def queue_table(manager: RunManager, limit: int = 30) -> str:
    """The runs of this app, newest first (at most ``limit``), as a Markdown table."""
    if not manager.jobs:
        return "no runs yet"
    rows = ["| run | recipe | input | device | state | progress |", "|---|---|---|---|---|---|"]
    for job in list(reversed(list(manager.jobs.values())))[:limit]:
        p = progress(job) if job.state != "queued" else {}
        where = f"{p['stage']} {p['step']}/{p['steps']}" if p.get("stage") else ""
        name = job.request.image_name or job.request.prompt or ""
        rows.append(f"| {job.id} | {job.request.recipe} | {name[:40]} | {job.request.device} "
                    f"| {job.state} | {where} |")
    return "\n".join(rows)


def format_exception(exc: BaseException) -> str:
    """A bug met while checking a request: one line for the page, the traceback on stderr."""
    traceback.print_exception(type(exc), exc, exc.__traceback__, file=sys.stderr)
    return (f"error: the engine failed while checking this run ({type(exc).__name__}: "
            f"{' '.join(str(exc).split())[:200]}); the traceback is in the app's terminal")
