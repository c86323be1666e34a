"""Fault injection (issue 24, items 4, 5 and 7): kills at random moments, damaged and crafted
checkpoints, full disks, read-only folders, racing processes. Each test breaks something on
purpose and checks the promise README's "Crashes, resume and errors" makes about it: files
are whole or absent, a resume continues bit-exactly, a user's mistake is one line and exit
code 2. The kill -9 tests run the engine in a subprocess and are marked slow. Hostile recipe
files and absurd sizes: tests/test_hostile_inputs.py."""

from __future__ import annotations

import errno
import json
import multiprocessing
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import tiny_fit_args
from engine import atomic, checkpoint
from engine.outputs import LOCK_NAME, create_run_dir
from engine.run import main

ROOT = Path(__file__).resolve().parent.parent
TINY_EXPORT = ["export.mesh_resolution=16", "export.texture_size=32", "export.decimate_faces=0",
               "export.turntable.frames=2", "export.turntable.size=16"]


def one_error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def folder_bytes(run_dir: Path) -> dict:
    return {str(p.relative_to(run_dir)): p.read_bytes()
            for p in sorted(run_dir.rglob("*")) if p.is_file()}


def temps(run_dir: Path) -> list:
    return [p for p in run_dir.rglob("*") if p.name.startswith(".") and ".tmp" in p.name]


def exported_run(image: Path, out: Path, steps: int = 4) -> list:
    args = [a for a in tiny_fit_args(image, out, steps=steps) if a != "export=null"]
    return args + TINY_EXPORT


def assert_same_state(a: Path, b: Path) -> None:
    sa, sb = load_file(str(a)), load_file(str(b))
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


# -- atomic writes ------------------------------------------------------------------------

def test_atomic_write_is_durable_and_leaves_no_temp(tmp_path, monkeypatch):
    synced = []
    real_fsync = os.fsync
    monkeypatch.setattr(atomic.os, "fsync", lambda fd: synced.append(fd) or real_fsync(fd))
    path = tmp_path / "a" / "file.txt"
    atomic.atomic_write_text(path, "one")
    atomic.atomic_write_text(path, "two")
    assert path.read_text() == "two" and os.listdir(path.parent) == ["file.txt"]
    assert len(synced) == 4          # the file and its folder, each time


def test_a_write_that_fails_keeps_the_old_file_and_is_one_line(tmp_path):
    path = tmp_path / "mesh.obj"
    atomic.atomic_write_text(path, "complete\n")

    def disk_full(tmp):
        Path(tmp).write_text("trunc")
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(atomic.WriteFailed) as info:
        atomic.atomic_write(path, disk_full)
    assert path.read_text() == "complete\n" and os.listdir(tmp_path) == ["mesh.obj"]
    assert "No space left on device" in str(info.value) and "\n" not in str(info.value)


def test_every_file_a_run_writes_is_written_atomically(rgba_image, tmp_path, monkeypatch):
    """Checkpoints, config.yaml, renders and every export file go through atomic_write;
    only the append-only metrics.jsonl (flushed each line), the TensorBoard event files and
    the lock do not."""
    import re

    written = []
    real = atomic._fsync_file

    def fsync(tmp):        # every atomic write syncs its temp file: record the final name
        written.append(tmp.with_name(re.match(r"^\.(.+)\.[0-9a-f]{8}\.tmp", tmp.name)[1]))
        real(tmp)
    monkeypatch.setattr(atomic, "_fsync_file", fsync)
    run = tmp_path / "run"
    assert main(exported_run(rgba_image, run) + ["output.render_every=2"]) == 0
    # append-only logs (metrics.jsonl, TensorBoard event files) are not written atomically
    files = {p for p in run.rglob("*") if p.is_file() and p.parent.name != "tensorboard"} \
        - {run / "metrics.jsonl"}
    assert {p.name for p in files} >= {"config.yaml", "fit-final.png", "fit-000002.png",
                                       "mesh.glb", "mesh.obj", "mesh.mtl", "mesh_albedo.png",
                                       "turntable.gif", "turntable.mp4"}
    assert files <= set(written), sorted(str(p) for p in files - set(written))


# -- checkpoints: checksum, fallback, crafted metadata, stale temps --------------------------

def flip_a_bit(path: Path, from_end: int = 3) -> None:
    data = bytearray(path.read_bytes())
    data[-from_end] ^= 0x10            # inside the last tensor's data, not the header
    path.write_bytes(bytes(data))


def test_a_flipped_bit_in_tensor_data_is_caught(tmp_path):
    path = tmp_path / checkpoint.checkpoint_name(0, "fit", 1)
    checkpoint.save(path, modules={"m": torch.nn.Linear(3, 3)}, optimizer=None,
                    info={"stage": "fit", "step": 1})
    checkpoint.load(path)
    flip_a_bit(path)
    with pytest.raises(checkpoint.CheckpointDamaged, match="checksum"):
        checkpoint.load(path)


def test_a_damaged_newest_checkpoint_falls_back_to_the_newest_intact_one(rgba_image, tmp_path,
                                                                       capsys):
    ref, run = tmp_path / "ref", tmp_path / "run"
    assert main(tiny_fit_args(rgba_image, ref, steps=12)) == 0
    assert main(tiny_fit_args(rgba_image, run, steps=12)) == 0
    ckdir = run / "checkpoints"
    end = ckdir / checkpoint.checkpoint_name(0, "fit", 12)
    flip_a_bit(end)
    # asked for by name, the damaged file is refused
    capsys.readouterr()
    assert main([f"resume={end}"]) == 2
    assert "damaged" in one_error_line(capsys.readouterr().err)
    # a run folder falls back to step 8 with one line, and redoes steps 8..11 exactly
    assert main([f"resume={run}"]) == 0
    notes = [line for line in capsys.readouterr().err.splitlines() if "damaged" in line]
    assert len(notes) == 1 and end.name in notes[0] and \
        checkpoint.checkpoint_name(0, "fit", 8) in notes[0], notes
    assert_same_state(end, ref / "checkpoints" / end.name)
    assert [json.loads(line)["step"] for line in
            (run / "metrics.jsonl").read_text().splitlines()] == list(range(12))


def _rewrite(path: Path, edit) -> None:
    """Re-save a checkpoint with its metadata (and tensors) changed by ``edit`` but its
    checksum kept, as a hand-crafted file would."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        raw = f.metadata()
    tensors = load_file(str(path))
    meta = json.loads(raw[checkpoint.META_KEY])
    edit(meta, tensors)
    raw[checkpoint.META_KEY] = json.dumps(meta)
    if getattr(checkpoint, "CHECKSUM_KEY", None) in raw:     # a consistent checksum
        raw[checkpoint.CHECKSUM_KEY] = checkpoint.tensors_checksum(tensors)
    save_file(tensors, str(path), metadata=raw)


def _set(path, value):
    def edit(meta, tensors):
        node = meta
        for key in path[:-1]:
            node = node[key]
        node[path[-1]] = value
    return edit


def _rename_state(meta, tensors):
    name = next(k for k in tensors if k.startswith("optimizer.state."))
    tensors["optimizer.state.x"] = tensors.pop(name)


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Path:
    """A tiny finished run with checkpoints at steps 2 and 4 (tests change copies of it)."""
    import numpy as np
    from PIL import Image

    folder = tmp_path_factory.mktemp("finished")
    a = np.zeros((64, 64, 4), np.uint8)
    a[10:40, 5:25] = [220, 40, 30, 255]
    Image.fromarray(a).save(folder / "block.png")
    run = folder / "run"
    assert main(tiny_fit_args(folder / "block.png", run, steps=4,
                              extra=["output.checkpoint_every=2"])) == 0
    return run


@pytest.mark.parametrize("edit", [
    _set(["info"], "a string"),
    _set(["info", "step"], "eight"),
    _set(["info", "step"], -3),
    _set(["info", "stage_end"], "yes"),
    _set(["optimizer", "param_groups"], "zzz"),
    _set(["optimizer", "param_groups", 0, "betas"], "ab"),
    _set(["optimizer", "param_groups", 0, "eps"], None),
    _set(["optimizer", "scalars"], {"x": 1}),
    _rename_state,
], ids=["info", "step-text", "step-negative", "stage-end", "groups", "betas", "eps",
        "scalars", "tensor-name"])
def test_crafted_checkpoint_metadata_is_one_line(finished_run, tmp_path, capsys, edit):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    ck = run / "checkpoints" / checkpoint.checkpoint_name(0, "fit", 2)
    _rewrite(ck, edit)
    before = folder_bytes(run)
    capsys.readouterr()
    assert main([f"resume={ck}"]) == 2
    one_error_line(capsys.readouterr().err)
    assert folder_bytes(run) == before


def test_stale_temp_files_are_removed_when_a_run_resumes(rgba_image, tmp_path):
    run = tmp_path / "run"
    assert main(tiny_fit_args(rgba_image, run, steps=4)) == 0
    stale = [run / "checkpoints" / ".01-fit-0000004.safetensors.0a1b2c3d.tmp.safetensors",
             run / "checkpoints" / ".01-fit-0000004.safetensors.k2p9s.tmp",    # older writer
             run / ".config.yaml.0a1b2c3d.tmp.yaml"]
    for p in stale:
        p.write_bytes(b"")
    assert main([f"resume={run}"]) == 0
    assert not any(p.exists() for p in stale) and temps(run) == []


def test_a_kill_before_the_final_render_and_export_is_made_good_on_resume(
        rgba_image, tmp_path, capsys):
    """A kill after the stage's last checkpoint but before its final render and the export
    leaves the folder as below; the resume must write what it then reports."""
    run = tmp_path / "run"
    assert main(exported_run(rgba_image, run)) == 0
    (run / "renders" / "fit-final.png").unlink()
    for p in (run / "export").iterdir():
        p.unlink()
    capsys.readouterr()
    assert main([f"resume={run}"]) == 0
    out = capsys.readouterr().out
    reported = [Path(line.split(": ", 1)[1]) for line in out.splitlines()
                if ": /" in line]
    assert run / "renders" / "fit-final.png" in reported
    assert len(reported) >= 6 and all(p.exists() for p in reported), out


# -- disk full, read-only folders ----------------------------------------------------------

def _fill_disk_at(monkeypatch, name_start: str) -> None:
    """The disk fills while the file whose name starts with ``name_start`` is written."""
    real = atomic._fsync_file

    def fsync(tmp):
        if Path(tmp).name.startswith("." + name_start):
            raise OSError(errno.ENOSPC, "No space left on device")
        real(tmp)
    monkeypatch.setattr(atomic, "_fsync_file", fsync)


def test_disk_full_mid_export_keeps_earlier_files_and_exits_2(rgba_image, tmp_path, capsys,
                                                             monkeypatch):
    import trimesh

    run = tmp_path / "run"
    _fill_disk_at(monkeypatch, "mesh.obj")
    assert main(exported_run(rgba_image, run)) == 2
    line = one_error_line(capsys.readouterr().err)
    assert "mesh.obj" in line and "No space left" in line
    assert trimesh.load(run / "export" / "mesh.glb", force="mesh").vertices.shape[0] > 0
    assert not (run / "export" / "mesh.obj").exists() and temps(run) == []
    monkeypatch.undo()                 # space freed: the run exports on resume
    assert main([f"resume={run}"]) == 0
    assert (run / "export" / "mesh.obj").is_file()


def test_disk_full_writing_a_checkpoint_exits_2_and_the_run_resumes(rgba_image, tmp_path,
                                                                    capsys, monkeypatch):
    ref, run = tmp_path / "ref", tmp_path / "run"
    assert main(tiny_fit_args(rgba_image, ref, steps=8)) == 0
    _fill_disk_at(monkeypatch, checkpoint.checkpoint_name(0, "fit", 8))
    capsys.readouterr()
    assert main(tiny_fit_args(rgba_image, run, steps=8)) == 2
    assert "No space left" in one_error_line(capsys.readouterr().err)
    assert [p.name for p in checkpoint.list_checkpoints(run / "checkpoints")] == \
        [checkpoint.checkpoint_name(0, "fit", 4)] and temps(run) == []
    monkeypatch.undo()
    assert main([f"resume={run}"]) == 0
    name = checkpoint.checkpoint_name(0, "fit", 8)
    assert_same_state(run / "checkpoints" / name, ref / "checkpoints" / name)


def test_disk_full_writing_metrics_exits_2_and_the_run_resumes(rgba_image, tmp_path, capsys,
                                                               monkeypatch):
    import builtins

    class FillsUp:
        """metrics.jsonl on a disk that fills at its 6th line."""

        def __init__(self, f):
            self.f, self.lines = f, 0

        def write(self, text):
            self.lines += 1
            if self.lines == 6:
                raise OSError(errno.ENOSPC, "No space left on device")
            return self.f.write(text)

        def close(self):
            self.f.close()

    real_open = builtins.open
    monkeypatch.setattr("engine.outputs.open", lambda path, *a, **k: FillsUp(
        real_open(path, *a, **k)), raising=False)
    run = tmp_path / "run"
    assert main(tiny_fit_args(rgba_image, run, steps=8)) == 2
    assert "metrics.jsonl" in one_error_line(capsys.readouterr().err)
    monkeypatch.undo()
    assert main([f"resume={run}"]) == 0
    assert [json.loads(line)["step"] for line in
            (run / "metrics.jsonl").read_text().splitlines()] == list(range(8))


def test_a_read_only_out_folder_is_one_line(rgba_image, tmp_path, capsys, monkeypatch):
    """(root ignores permissions, so the file system's refusal is simulated)"""
    out = tmp_path / "ro"
    out.mkdir()
    real_open = os.open

    def read_only(path, *args, **kwargs):
        if str(path).startswith(str(out)):
            raise OSError(errno.EROFS, "Read-only file system")
        return real_open(path, *args, **kwargs)
    monkeypatch.setattr("engine.outputs.os.open", read_only)
    assert main(tiny_fit_args(rgba_image, out, steps=2)) == 2
    line = one_error_line(capsys.readouterr().err)
    assert str(out) in line and "Read-only" in line


def test_an_image_in_a_folder_that_cannot_be_searched_is_one_line(rgba_image, tmp_path,
                                                                  capsys, monkeypatch):
    real_stat = Path.stat

    def stat(self, *args, **kwargs):
        if self == rgba_image:
            raise PermissionError(errno.EACCES, "Permission denied", str(self))
        return real_stat(self, *args, **kwargs)
    monkeypatch.setattr(Path, "stat", stat)
    assert main(tiny_fit_args(rgba_image, tmp_path / "run", steps=2)) == 2
    assert "Permission denied" in one_error_line(capsys.readouterr().err)


# -- concurrency ---------------------------------------------------------------------------

def _claim_exact(args):
    root, start = args
    while time.time() < start:
        pass
    try:
        path, lock = create_run_dir(str(root), "fit", None, str(root / "out"), None, None)
    except Exception as exc:        # noqa: BLE001 (the failure is the test's finding)
        return f"{type(exc).__name__}: {exc}"
    return str(path)           # the lock stays held, as while a run trains in the folder


def test_many_processes_given_the_same_empty_out_folder_each_get_their_own(tmp_path):
    n = 8
    ctx = multiprocessing.get_context("fork")
    with ctx.Pool(n) as pool:
        for r in range(3):
            root = tmp_path / str(r)
            (root / "out").mkdir(parents=True)
            paths = pool.map(_claim_exact, [(root, time.time() + 0.3)] * n, chunksize=1)
            assert len(set(paths)) == n and str(root / "out") in paths, paths
            assert all((Path(p) / LOCK_NAME).is_file() for p in paths)


# -- kill -9 -------------------------------------------------------------------------------

KILLER = textwrap.dedent("""
    # runs engine.run, killing itself with SIGKILL at a chosen moment
    import os, signal, sys
    sys.path[:0] = [{root!r}, {tests!r}]
    from engine import atomic
    from engine.run import main
    from engine.trainer import Trainer

    where, at = sys.argv[1], int(sys.argv[2])
    if where == "step":                          # before step ``at`` is taken
        real = Trainer._apply_lr
        def apply_lr(self, parts, stage, step):
            if step == at:
                os.kill(os.getpid(), signal.SIGKILL)
            return real(self, parts, stage, step)
        Trainer._apply_lr = apply_lr
    elif where == "write":                       # mid-write of the at-th atomic file
        real = atomic._fsync_file
        count = [0]
        def fsync(tmp):
            count[0] += 1
            if count[0] == at:
                os.kill(os.getpid(), signal.SIGKILL)
            real(tmp)
        atomic._fsync_file = fsync
    else:                                        # mid-write of the file named ``where``
        real = atomic._fsync_file
        def fsync(tmp):
            if tmp.name.startswith("." + where):
                os.kill(os.getpid(), signal.SIGKILL)
            real(tmp)
        atomic._fsync_file = fsync
    sys.exit(main(sys.argv[3:]))
""")


def kill_run(tmp_path: Path, where: str, at: int, args: list) -> None:
    script = tmp_path / "killer.py"
    script.write_text(KILLER.format(root=str(ROOT), tests=str(ROOT / "tests")))
    proc = subprocess.run([sys.executable, str(script), where, str(at), *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=240)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]


def check_resume_is_exact(rgba_image, tmp_path, where, at, capsys):
    steps = 12
    ref = tmp_path / "ref"
    assert main(tiny_fit_args(rgba_image, ref, steps=steps)) == 0
    run = tmp_path / "run"
    kill_run(tmp_path, where, at, tiny_fit_args(rgba_image, run, steps=steps))
    if not checkpoint.list_checkpoints(run / "checkpoints"):
        capsys.readouterr()
        assert main([f"resume={run}"]) == 2      # killed before the first checkpoint
        assert "before its first checkpoint" in one_error_line(capsys.readouterr().err)
        return
    assert main([f"resume={run}"]) == 0          # a lock left by the dead process is taken
    name = checkpoint.checkpoint_name(0, "fit", steps)
    assert_same_state(run / "checkpoints" / name, ref / "checkpoints" / name)
    assert temps(run) == [] and not (run / LOCK_NAME).exists()
    assert [json.loads(line)["step"] for line in
            (run / "metrics.jsonl").read_text().splitlines()] == list(range(steps))


@pytest.mark.slow
def test_kill_9_while_a_checkpoint_is_written_then_resume_is_exact(rgba_image, tmp_path,
                                                                   capsys):
    # files written atomically in a tiny run: config.yaml, then checkpoints at 4, 8, 12
    check_resume_is_exact(rgba_image, tmp_path, "write", 3, capsys)


# before one of the 12 steps, or while writing config.yaml (1), a checkpoint (2-4) or the
# final render (5); four distinct moments drawn at random (seeded, so a failure reproduces)
MOMENTS = random.Random(24).sample([("step", k) for k in range(12)]
                                   + [("write", k) for k in range(1, 6)], 4)


@pytest.mark.slow
@pytest.mark.parametrize("where, at", MOMENTS)
def test_kill_9_at_random_moments_then_resume_is_exact(rgba_image, tmp_path, capsys, where, at):
    check_resume_is_exact(rgba_image, tmp_path, where, at, capsys)


@pytest.mark.slow
def test_kill_9_mid_export_then_resume_writes_every_file_whole(rgba_image, tmp_path, capsys):
    import trimesh

    run = tmp_path / "run"
    kill_run(tmp_path, "mesh.obj", 0, exported_run(rgba_image, run))
    assert (run / "export" / "mesh.glb").is_file() and not (run / "export" / "mesh.obj").exists()
    capsys.readouterr()
    assert main([f"resume={run}"]) == 0
    reported = [Path(line.split(": ", 1)[1]) for line in capsys.readouterr().out.splitlines()
                if ": /" in line]
    assert all(p.exists() for p in reported) and temps(run) == []
    for name in ("mesh.glb", "mesh.obj"):
        assert trimesh.load(run / "export" / name, force="mesh").faces.shape[0] > 0


@pytest.mark.slow
@pytest.mark.parametrize("override, code, words", [
    ("stages.fit.optimizer.lr.density=.nan", 2, "stages.fit.optimizer.lr.density"),
    ("stages.fit.losses.rgb=1.0e+38", 3, "optimiser state"),
    ("inputs.image_size=1000000", 2, "inputs.image_size"),
])
def test_exit_codes_from_a_real_process(rgba_image, tmp_path, override, code, words):
    proc = subprocess.run([sys.executable, "-m", "engine.run",
                           *tiny_fit_args(rgba_image, tmp_path / "run", extra=[override])],
                          cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert proc.returncode == code, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr and words in proc.stderr
