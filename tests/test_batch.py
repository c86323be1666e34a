"""python -m engine.batch: one ordinary run folder per picture, skips, resumes, failures alone,
the summary, the one-line mistakes, and the Ray backend."""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from engine import batch, checkpoint

ROOT = Path(__file__).resolve().parent.parent

#: a fit-image run of a few seconds with a small export (a GLB; no turntable)
TINY = ["stages.fit.steps=8", "stages.fit.resolution=16",
        "stages.fit.representation.resolution=8", "stages.fit.representation.samples_per_ray=16",
        "inputs.image_size=32", "output.render_size=16", "output.render_views=2",
        "output.render_every=0", "output.checkpoint_every=4", "output.tensorboard=false",
        "export.formats=[glb]", "export.mesh_resolution=16", "export.texture_size=16",
        "export.decimate_faces=0", "export.turntable.enabled=false"]


PICTURES = [("red", (220, 40, 30), (10, 40, 5, 25)), ("blue", (30, 60, 220), (20, 50, 30, 50)),
            ("green", (40, 200, 60), (15, 45, 20, 44))]


def _pictures(folder: Path, count: int = 2) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name, colour, (r0, r1, c0, c1) in PICTURES[:count]:
        a = np.zeros((64, 64, 4), np.uint8)
        a[r0:r1, c0:c1] = (*colour, 255)
        Image.fromarray(a).save(folder / f"{name}.png")
    return folder


def _batch(argv):
    """main(argv) in-process: (exit code, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = batch.main(list(argv))
    return code, out.getvalue(), err.getvalue()


def _summary(out: Path):
    data = json.loads((out / batch.SUMMARY_JSON).read_text())
    return {Path(r["image"]).stem: r for r in data["runs"]}, data


def _records(run_dir: Path):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def finished_batch(tmp_path_factory):
    """Two pictures, two workers: the batch the slow tests below start from (about 30 s on a
    2-core CPU shared with other jobs: each run is its own process, which imports torch)."""
    base = tmp_path_factory.mktemp("batch")
    pics = _pictures(base / "pics")
    out = base / "out"
    argv = ["recipe=fit-image", f"images={pics}", f"out={out}", "workers=2", *TINY]
    code, stdout, stderr = _batch(argv)
    return base, pics, out, argv, code, stdout, stderr


@pytest.mark.slow
def test_each_picture_gets_a_finished_ordinary_run_folder(finished_batch):
    base, pics, out, argv, code, stdout, stderr = finished_batch
    assert code == 0, stderr
    runs, data = _summary(out)
    assert sorted(runs) == ["blue", "red"]
    for name in ("red", "blue"):
        run_dir = out / name
        r = runs[name]
        assert (r["status"], r["run_dir"], r["how"]) == ("done", str(run_dir.resolve()), "new")
        assert r["seconds"] > 0
        # an ordinary run folder of that picture, exported
        config = (run_dir / "config.yaml").read_text()
        assert f"image: {(pics / f'{name}.png').resolve()}" in config
        assert [rec["step"] for rec in _records(run_dir)] == list(range(8))
        assert (run_dir / "export" / "mesh.glb").read_bytes()[:4] == b"glTF"
        assert batch.is_finished(run_dir)
        # its output went to the batch's log, and the command there is the run's own
        log = (out / "logs" / f"{name}.log").read_text()
        picture = (pics / f"{name}.png").resolve()
        assert log.startswith(f"$ python -m engine.run recipe=fit-image image={picture}")
        assert f"output: {run_dir.resolve()}" in log
    assert data["counts"] == {"done": 2, "skipped": 0, "failed": 0, "interrupted": 0}
    assert data["workers"] == 2 and data["backend"] == "local"
    # the table: printed, and in batch.md
    md = (out / batch.SUMMARY_MD).read_text()
    for text in (stdout, md):
        assert "| image | status | seconds | run folder | note |" in text
        assert "| red.png | done |" in text and "| red |" in text
        assert "| blue.png | done |" in text


@pytest.mark.slow
def test_running_the_same_command_again_skips_finished_runs(finished_batch, tmp_path):
    base, pics, out, argv, code, _, _ = finished_batch
    assert code == 0
    before = {n: (out / n / "metrics.jsonl").stat().st_mtime_ns for n in ("red", "blue")}
    start = time.time()
    code, stdout, _ = _batch(argv)
    assert code == 0
    assert time.time() - start < 15       # nothing trained
    runs, data = _summary(out)
    assert {n: r["status"] for n, r in runs.items()} == {"red": "skipped", "blue": "skipped"}
    assert data["counts"]["skipped"] == 2
    assert {n: (out / n / "metrics.jsonl").stat().st_mtime_ns for n in ("red", "blue")} == before
    assert "[2/2]" in stdout and "skipped" in stdout


def _interrupt_after_first_checkpoint(run_dir: Path) -> None:
    """Make a finished run look like one killed after its step-4 checkpoint."""
    shutil.rmtree(run_dir / "export")
    (run_dir / "renders" / "fit-final.png").unlink()
    (run_dir / "checkpoints" / checkpoint.checkpoint_name(0, "fit", 8)).unlink()
    assert (run_dir / "checkpoints" / checkpoint.checkpoint_name(0, "fit", 4)).is_file()
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    (run_dir / "metrics.jsonl").write_text("\n".join(lines[:6]) + "\n")   # 2 steps past it


@pytest.mark.slow
def test_interrupted_runs_resume_and_a_bad_picture_fails_alone(finished_batch, tmp_path):
    base, pics, out0, _, code, _, _ = finished_batch
    assert code == 0
    out = tmp_path / "out"
    shutil.copytree(out0, out)
    pics2 = tmp_path / "pics"
    shutil.copytree(pics, pics2)
    (pics2 / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n but not a picture")
    _interrupt_after_first_checkpoint(out / "red")
    code, stdout, stderr = _batch(["recipe=fit-image", f"images={pics2}", f"out={out}",
                                   "workers=2", *TINY])
    assert code == 1
    runs, data = _summary(out)
    assert (runs["blue"]["status"], runs["red"]["status"], runs["broken"]["status"]) == \
        ("skipped", "done", "failed")
    assert runs["red"]["how"] == "resumed"
    # resumed from the step-4 checkpoint: every step once, and the export is back
    assert [rec["step"] for rec in _records(out / "red")] == list(range(8))
    assert batch.is_finished(out / "red")
    assert f"$ python -m engine.run resume={(out / 'red').resolve()}" in \
        (out / "logs" / "red.log").read_text()
    # the bad picture's own one-line error, in the table and its run never finished
    assert runs["broken"]["message"].startswith("error: ") and "broken.png" in \
        runs["broken"]["message"]
    assert not batch.is_finished(out / "broken")
    assert "| broken.png | failed |" in stdout
    assert data["counts"] == {"done": 1, "skipped": 1, "failed": 1, "interrupted": 0}


@pytest.mark.slow
def _kill_after_checkpoint(run_dir: Path, kill, killed: dict, seconds: float):
    """A started watcher thread: once the run in ``run_dir`` has written its step-4
    checkpoint, ``kill(pid of the run, read from run.lock)``, once (``kill`` fills
    ``killed``), polling every 20 ms for at most ``seconds``."""
    def watch():
        end = time.time() + seconds
        ckpt = run_dir / "checkpoints" / checkpoint.checkpoint_name(0, "fit", 4)
        while time.time() < end and not killed:
            lock = run_dir / "run.lock"
            if ckpt.is_file() and lock.is_file():
                try:
                    kill(int(lock.read_text().split()[0]))
                except (ValueError, IndexError, OSError):
                    pass          # the lock half-written, or the process already gone
            time.sleep(0.02)

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    return thread


def test_a_run_whose_process_is_killed_is_tried_again_and_resumes(finished_batch, tmp_path):
    """kill -9 of a run's process mid-run (a lost worker): the batch tries it again
    (retries=1), which resumes from its last checkpoint."""
    base, pics, _, _, _, _, _ = finished_batch
    one = tmp_path / "pics"
    one.mkdir()
    shutil.copy(pics / "red.png", one / "red.png")
    out = tmp_path / "out"
    run_dir = out / "red"
    killed = {}

    def kill_run(run_pid: int) -> None:
        os.kill(run_pid, signal.SIGKILL)
        killed.update(run=run_pid)

    thread = _kill_after_checkpoint(run_dir, kill_run, killed, seconds=60)
    slow = [o if not o.startswith("stages.fit.steps=") else "stages.fit.steps=200"
            for o in TINY] + ["export=null"]
    code, stdout, stderr = _batch(["recipe=fit-image", f"images={one}", f"out={out}", *slow])
    thread.join(timeout=5)
    assert killed, "the run finished before it could be killed"
    assert code == 0, stdout + stderr
    runs, _ = _summary(out)
    assert runs["red"]["status"] == "done" and runs["red"]["attempts"] == 2
    log = (out / "logs" / "red.log").read_text()
    assert "the run's process died (exit code -9); trying again" in log
    assert f"$ python -m engine.run resume={run_dir.resolve()}" in log
    steps = [rec["step"] for rec in _records(run_dir)]
    assert steps == list(range(200))          # the redone steps once each


# -- mistakes: one line, exit 2, nothing written -------------------------------------------------

@pytest.mark.parametrize("items, message", [
    (["images={tmp}/nowhere"], "images={tmp}/nowhere: no such folder or file"),
    (["images={tmp}/empty"], "images={tmp}/empty: the folder holds no picture"),
    (["images={tmp}/empty/*.png"], "no picture (.png, .jpg, .jpeg, .webp) matches"),
    (["recipe=no-such-recipe"], "no-such-recipe"),
    (["stages.fit.stpes=3"], "stages.fit.stpes: unknown key (did you mean 'steps'?)"),
    (["image=x.png"], "image= is set by images= for each run; drop it"),
    (["resume=somewhere"], "resume= is set by the batch"),
    (["workers=0"], "workers: must be >= 1, got 0"),
    (["backend=spark"], "backend: 'spark' is not one of local, ray"),
    (["address=auto"], "address= is for backend=ray"),
    (["recipe=mvdream"], "recipe 'mvdream' does not take a picture"),
    (["device=cuda:7"], "device=cuda:7 but no CUDA device is visible"),
])
def test_mistakes_are_one_line_exit_2_and_write_nothing(tmp_path, items, message):
    pics = _pictures(tmp_path / "pics")
    if "device=cuda:7" in items:
        import torch

        if torch.cuda.is_available():
            pytest.skip("a CUDA device is visible")
    (tmp_path / "empty").mkdir()
    out = tmp_path / "out"
    argv = {"recipe": "recipe=fit-image", "images": f"images={pics}", "out": f"out={out}"}
    extra = []
    for item in items:
        key = item.split("=", 1)[0]
        if key in argv:
            argv[key] = item.replace("{tmp}", str(tmp_path))
        else:
            extra.append(item)
    code, stdout, stderr = _batch([*argv.values(), *extra])
    assert code == 2
    err = stderr.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: "), err
    assert message.replace("{tmp}", str(tmp_path)) in err
    assert not out.exists() and stdout == ""


def test_missing_out_and_images_are_named(tmp_path):
    code, _, err = _batch(["recipe=fit-image", f"images={tmp_path}"])
    assert code == 2 and err.startswith("error: out= is required")
    code, _, err = _batch(["recipe=fit-image", f"out={tmp_path / 'o'}"])
    assert code == 2 and err.startswith("error: images= is required")


def test_folder_names_are_the_stems_made_unique(tmp_path):
    images = [Path("a/cat.png"), Path("a/cat.jpg"), Path("a/Dog Photo.png"),
              Path("b/dog-photo.png")]
    assert batch.run_names(images) == ["cat-png", "cat-jpg", "dog-photo", "dog-photo-2"]


def test_is_finished_follows_the_runs_export_settings(tmp_path):
    run = tmp_path / "run"
    (run / "export").mkdir(parents=True)
    (run / "config.yaml").write_text(
        "stages: {fit: {steps: 3}}\n"
        "export: {formats: [glb, obj], turntable: {enabled: true, formats: [gif]}}\n")
    assert not batch.is_finished(run)
    for name in ("mesh.glb", "mesh.obj"):
        (run / "export" / name).write_text("x")
    assert not batch.is_finished(run)                   # the turntable is missing
    (run / "export" / "turntable.gif").write_text("x")
    assert batch.is_finished(run)
    assert not batch.is_finished(tmp_path / "nothing")


# -- Ray ------------------------------------------------------------------------------------

def _ray_batch(pics: Path, out: Path, extra, timeout=900):
    return subprocess.run([sys.executable, "-m", "engine.batch", "recipe=fit-image",
                           f"images={pics}/*.png", f"out={out}", "backend=ray", "workers=2",
                           "system.threads=1", *extra], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout, env=dict(os.environ, OMP_NUM_THREADS="1"))


@pytest.mark.slow
def test_the_ray_backend_runs_a_task_per_picture(tmp_path):
    """A local Ray cluster the batch starts with 2 CPUs (two workers), 3 pictures (about
    45 s on 2 busy cores, most of it Ray starting)."""
    pytest.importorskip("ray",
                        reason='ray is not installed (pip install "distill-engine[batch]")')
    pics = _pictures(tmp_path / "pics", 3)
    out = tmp_path / "out"
    fast = [o for o in TINY if not o.startswith("export")] + ["export=null"]
    proc = _ray_batch(pics, out, fast)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    runs, data = _summary(out)
    assert {n: (r["status"], r["attempts"]) for n, r in runs.items()} == \
        {"red": ("done", 1), "blue": ("done", 1), "green": ("done", 1)}
    assert data["backend"] == "ray" and data["workers"] == 2
    assert "backend ray, 2 workers" in proc.stdout
    for name in ("red", "blue", "green"):
        assert [rec["step"] for rec in _records(out / name)] == list(range(8))
        assert batch.is_finished(out / name)
        log = (out / "logs" / f"{name}.log").read_text()
        assert log.count(": attempt ") == 1 and "# batch " in log


def _parent(pid: int) -> int:
    stat = Path(f"/proc/{pid}/stat").read_text()
    return int(stat[stat.rindex(")") + 2:].split()[1])


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs Linux's /proc")
def test_a_killed_ray_worker_s_picture_is_tried_again_and_resumes(tmp_path):
    """3 pictures on 2 Ray workers; once red's run has written its step-4 checkpoint the
    Ray worker running it is killed (SIGKILL: a lost node or the OOM killer). Ray tries the
    task again (max_retries=retries=1) on a new worker, which resumes the run from that
    checkpoint; the run's own process went with its worker. All 3 finish, red in 2
    attempts, every step logged once (about 60 s)."""
    pytest.importorskip("ray",
                        reason='ray is not installed (pip install "distill-engine[batch]")')
    pics = _pictures(tmp_path / "pics", 3)
    out = tmp_path / "out"
    run_dir = out / "red"
    killed = {}

    def kill_worker(run_pid: int) -> None:
        worker = _parent(run_pid)
        cmdline = Path(f"/proc/{worker}/cmdline").read_bytes()
        os.kill(worker, signal.SIGKILL)
        lines = (run_dir / "metrics.jsonl").read_text().splitlines()[:4]
        killed.update(run=run_pid, worker=worker, cmdline=cmdline, lines=lines)

    thread = _kill_after_checkpoint(run_dir, kill_worker, killed, seconds=850)
    slow = [o if not o.startswith("stages.fit.steps=") else "stages.fit.steps=200"
            for o in TINY if not o.startswith("export")] + ["export=null"]
    proc = _ray_batch(pics, out, slow)
    thread.join(timeout=5)
    assert killed, "red's run finished before its worker could be killed"
    assert b"ray" in killed["cmdline"].lower(), killed["cmdline"]   # a Ray worker process
    assert proc.returncode == 0, proc.stdout + proc.stderr
    runs, data = _summary(out)
    assert {n: r["status"] for n, r in runs.items()} == \
        {"red": "done", "blue": "done", "green": "done"}
    assert data["counts"]["done"] == 3
    assert runs["red"]["attempts"] == 2 and runs["red"]["how"] == "resumed"
    assert runs["blue"]["attempts"] == 1 and runs["green"]["attempts"] == 1
    # the run's process died with its worker (it would hold run.lock otherwise)
    assert not Path(f"/proc/{killed['run']}").exists() or \
        "Z" in Path(f"/proc/{killed['run']}/stat").read_text().split(")")[1][:3]
    log = (run_dir.parent / "logs" / "red.log").read_text()
    assert "# the worker running attempt 1 was lost; Ray tried the task again" in log
    assert f"$ python -m engine.run resume={run_dir.resolve()}" in log
    # resumed from a checkpoint, not trained again from step 0: the records of the steps
    # before it are those the first try wrote (their times would differ), every step once
    steps = [rec["step"] for rec in _records(run_dir)]
    assert steps == list(range(200))
    assert (run_dir / "metrics.jsonl").read_text().splitlines()[:4] == killed["lines"]


# -- GPUs: backend=local gives each run its own (faked here: no GPU on the CI machine) ------

#: stands in for engine.run in the batch's processes: writes what it was given (its
#: CUDA_VISIBLE_DEVICES, its start and end) to the run folder, then exits 0
_FAKE_RUN = """
import json, os, sys, time
out = [a[4:] for a in sys.argv[1:] if a.startswith("out=")][0]
os.makedirs(out, exist_ok=True)
start = time.time()
time.sleep(float(os.environ["FAKE_RUN_SECONDS"]))
with open(os.path.join(out, "env.json"), "w") as f:
    json.dump({"gpu": os.environ.get("CUDA_VISIBLE_DEVICES"), "start": start,
               "end": time.time(), "marker": os.environ.get("FAKE_RUN_MARKER")}, f)
"""


def _fake_gpu_batch(tmp_path, monkeypatch, gpus: int, items=(), pictures: int = 3,
                    seconds: float = 0.5):
    """engine.batch as it runs on a machine with ``gpus`` CUDA GPUs (the count faked), each
    run a real process (a stand-in for engine.run): (exit code, stdout, {picture: what its
    process saw})."""
    real_call = subprocess.call
    commands = []

    def call(argv, **kwargs):          # python -m engine.run ITEMS -> python -c FAKE ITEMS
        assert argv[1:3] == ["-m", "engine.run"], argv
        commands.append(argv)
        return real_call([sys.executable, "-c", _FAKE_RUN, *argv[3:]], **kwargs)

    monkeypatch.setattr(batch, "_cuda_count", lambda: gpus)
    monkeypatch.setattr(batch.subprocess, "call", call)
    monkeypatch.setenv("FAKE_RUN_SECONDS", str(seconds))
    monkeypatch.setenv("FAKE_RUN_MARKER", "the batch's environment")
    pics = _pictures(tmp_path / "pics", pictures)
    out = tmp_path / "out"
    code, stdout, stderr = _batch(["recipe=fit-image", f"images={pics}", f"out={out}",
                                   *items])
    assert code == 0, (stdout, stderr)
    seen = {p.parent.name: json.loads(p.read_text()) for p in out.glob("*/env.json")}
    assert len(seen) == len(commands) == pictures, (seen, commands)
    return code, stdout, seen


def _overlapping(seen: dict):
    runs = list(seen.values())
    return [(a, b) for i, a in enumerate(runs) for b in runs[i + 1:]
            if a["start"] < b["end"] and b["start"] < a["end"]]


def test_each_run_gets_its_own_visible_gpu(tmp_path, monkeypatch):
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    _, stdout, seen = _fake_gpu_batch(tmp_path, monkeypatch, gpus=2, pictures=3)
    # workers default to the GPUs' count; every run saw one GPU, both GPUs were used
    assert "2 workers on GPUs 0,1;" in stdout, stdout
    assert sorted({s["gpu"] for s in seen.values()}) == ["0", "1"], seen
    # runs side by side never share one; the rest of the environment is the batch's
    assert _overlapping(seen), seen                    # two did run at once
    assert all(a["gpu"] != b["gpu"] for a, b in _overlapping(seen)), seen
    assert {s["marker"] for s in seen.values()} == {"the batch's environment"}


def test_more_workers_than_gpus_share_them_round_robin(tmp_path, monkeypatch):
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    _, stdout, seen = _fake_gpu_batch(tmp_path, monkeypatch, gpus=2, items=["workers=3"],
                                      pictures=3, seconds=1.0)
    assert "3 workers on GPUs 0,1;" in stdout, stdout
    assert sorted(s["gpu"] for s in seen.values()) == ["0", "0", "1"], seen


def test_the_batchs_own_visible_gpus_are_the_ones_handed_out(tmp_path, monkeypatch):
    """Started with CUDA_VISIBLE_DEVICES=3,5 the batch sees two GPUs; its runs get 3 and 5
    (CUDA's numbering inside the batch, 0 and 1, would be the machine's GPUs 0 and 1)."""
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,5")
    _, stdout, seen = _fake_gpu_batch(tmp_path, monkeypatch, gpus=2, pictures=2)
    assert "2 workers on GPUs 3,5;" in stdout, stdout
    assert sorted(s["gpu"] for s in seen.values()) == ["3", "5"], seen


def test_cpu_runs_get_no_gpu(tmp_path, monkeypatch):
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    _, stdout, seen = _fake_gpu_batch(tmp_path, monkeypatch, gpus=2, items=["device=cpu"],
                                      pictures=2, seconds=0.1)
    assert "1 worker;" in stdout, stdout
    assert [s["gpu"] for s in seen.values()] == [None, None], seen
    assert not _overlapping(seen)


def test_visible_gpus_follow_the_recipes_device(monkeypatch):
    monkeypatch.setattr(batch, "_cuda_count", lambda: 3)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert batch.visible_gpus("auto") == batch.visible_gpus("cuda") == ["0", "1", "2"]
    # the CPU, or one GPU the command names (every run on it: no spreading)
    assert batch.visible_gpus("cpu") == batch.visible_gpus("cuda:1") == []
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "GPU-aaaa, GPU-bbbb,GPU-cccc")
    assert batch.visible_gpus("auto") == ["GPU-aaaa", "GPU-bbbb", "GPU-cccc"]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1,4,6,9")   # CUDA counted the first 3
    assert batch.visible_gpus("auto") == ["1", "4", "6"]
    monkeypatch.setattr(batch, "_cuda_count", lambda: 0)
    assert batch.visible_gpus("auto") == []
