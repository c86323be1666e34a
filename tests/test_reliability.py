"""Fault tests of issue 24: resume as a transaction, nothing non-finite saved, NaN/inf
config values refused, race-free run folders and the run lock."""

from __future__ import annotations

import json
import multiprocessing
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import tiny_fit_args
from engine import checkpoint
from engine.outputs import LOCK_NAME, RunLock, create_run_dir
from engine.run import main
from engine.trainer import Trainer


def folder_bytes(run_dir: Path) -> dict:
    """Every file of a run folder (relative path -> bytes)."""
    return {str(p.relative_to(run_dir)): p.read_bytes()
            for p in sorted(run_dir.rglob("*")) if p.is_file()}


def strict_records(run_dir: Path) -> list:
    """metrics.jsonl parsed as strict JSON: a bare NaN/Infinity fails the test."""
    def refuse(token):
        raise AssertionError(f"metrics.jsonl holds {token}, which is not JSON")
    return [json.loads(line, parse_constant=refuse)
            for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def all_checkpoint_tensors_finite(run_dir: Path) -> None:
    found = checkpoint.list_checkpoints(run_dir / "checkpoints")
    assert found
    for path in found:
        for key, value in load_file(str(path)).items():
            if value.is_floating_point():
                assert torch.isfinite(value).all(), f"{path.name}: {key} is not finite"


def one_error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


# -- 1. resume is a transaction ---------------------------------------------------------

@pytest.mark.parametrize("override, key", [
    ("stages.fit.representation.resolution=12", "stages.fit.representation.resolution"),
    ("stages.fit.steps=5", "stages.fit.steps"),          # below the checkpoint's step 8
])
def test_a_refused_resume_leaves_the_folder_byte_identical(rgba_image, tmp_path, capsys,
                                                           override, key):
    run = tmp_path / "run"
    assert main(tiny_fit_args(rgba_image, run, steps=8)) == 0
    before = folder_bytes(run)
    capsys.readouterr()
    assert main([f"resume={run}", override]) == 2
    assert key in one_error_line(capsys.readouterr().err)
    assert folder_bytes(run) == before          # config.yaml, metrics.jsonl, checkpoints
    assert main([f"resume={run}"]) == 0         # and the run still resumes


def test_a_resume_changed_in_config_yaml_is_one_line(rgba_image, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(tiny_fit_args(rgba_image, run, steps=4)) == 0
    cfg = run / "config.yaml"
    cfg.write_text(cfg.read_text().replace("resolution: 8\n", "resolution: 10\n", 1))
    before = folder_bytes(run)
    capsys.readouterr()
    assert main([f"resume={run}"]) == 2
    assert "stages.fit.representation" in one_error_line(capsys.readouterr().err)
    assert folder_bytes(run) == before


def test_steps_can_be_extended_and_shortened_on_resume(rgba_image, tmp_path):
    def state(run, steps):
        return load_file(str(run / "checkpoints" / checkpoint.checkpoint_name(0, "fit", steps)))

    ref8, ref16 = tmp_path / "ref8", tmp_path / "ref16"
    assert main(tiny_fit_args(rgba_image, ref8, steps=8)) == 0
    assert main(tiny_fit_args(rgba_image, ref16, steps=16)) == 0
    run = tmp_path / "run"
    assert main(tiny_fit_args(rgba_image, run, steps=12)) == 0
    # shorten: from the checkpoint at step 4, the stage now ends at 8
    assert main([f"resume={run / 'checkpoints' / checkpoint.checkpoint_name(0, 'fit', 4)}",
                 "stages.fit.steps=8"]) == 0
    for k, v in state(ref8, 8).items():
        torch.testing.assert_close(state(run, 8)[k], v, rtol=0, atol=1e-6)
    # extend: the stage that ended at 8 continues to 16
    assert main([f"resume={run}", "stages.fit.steps=16"]) == 0
    for k, v in state(ref16, 16).items():
        torch.testing.assert_close(state(run, 16)[k], v, rtol=0, atol=1e-6)
    assert [r["step"] for r in strict_records(run)] == list(range(16))


# -- 2. nothing non-finite is saved -----------------------------------------------------

def test_nan_learning_rate_is_undone_and_aborts_with_the_last_good_state(
        rgba_image, tmp_path, capsys, monkeypatch):
    """A NaN learning rate from step 5 on: finite loss and gradient, a NaN update."""
    original = Trainer._apply_lr

    def nan_from_5(self, parts, stage, step):
        lrs = original(self, parts, stage, step)
        if step >= 5:
            for group in parts.optimizer.param_groups:
                group["lr"] = float("nan")
            lrs = {k: float("nan") for k in lrs}
        return lrs

    extra = ["output.checkpoint_every=5"]
    good = tmp_path / "good"
    assert main(tiny_fit_args(rgba_image, good, extra=extra)) == 0
    monkeypatch.setattr(Trainer, "_apply_lr", nan_from_5)
    bad = tmp_path / "bad"
    capsys.readouterr()
    assert main(tiny_fit_args(rgba_image, bad, extra=extra)) == 3
    err = capsys.readouterr().err
    assert "update" in err and "NaN/inf for 5 steps in a row" in err
    all_checkpoint_tensors_finite(bad)
    # the abort's checkpoint (step 9) is exactly the state after the 5 good steps
    aborted = load_file(str(bad / "checkpoints" / checkpoint.checkpoint_name(0, "fit", 9)))
    reference = load_file(str(good / "checkpoints" / checkpoint.checkpoint_name(0, "fit", 5)))
    assert aborted.keys() == reference.keys()
    for k, v in reference.items():
        torch.testing.assert_close(aborted[k], v, rtol=0, atol=0)
    recs = strict_records(bad)             # strict JSON: NaN learning rates are null
    assert [r["step"] for r in recs] == list(range(10))   # the aborting step is logged
    assert recs[-1]["skipped"] and recs[-1]["lr/density"] is None
    assert all(r.get("nonfinite", "").startswith("the update") for r in recs[5:])


def test_overflowing_optimiser_state_is_reported_not_frozen(rgba_image, tmp_path, capsys):
    """losses.rgb=1e38: gradients are finite, Adam's second moment overflows to inf."""
    run = tmp_path / "huge"
    assert main(tiny_fit_args(rgba_image, run, extra=["stages.fit.losses.rgb=1.0e+38"])) == 3
    err = capsys.readouterr().err
    assert "optimiser state" in err and "Traceback" not in err
    all_checkpoint_tensors_finite(run)
    recs = strict_records(run)
    assert recs[0]["skipped"] and "optimiser state" in recs[0]["nonfinite"]


@pytest.mark.parametrize("override, key", [
    ("stages.fit.optimizer.lr.density=.nan", "stages.fit.optimizer.lr.density"),
    ("stages.fit.resolution=.inf", "stages.fit.resolution"),
    ("stages.fit.representation.resolution=.nan", "stages.fit.representation.resolution"),
    ("stages.fit.representation.samples_per_ray=-.inf",
     "stages.fit.representation.samples_per_ray"),
    ("stages.fit.losses.rgb=[0, .nan, 1.0, 10]", "stages.fit.losses.rgb"),
    ("inputs.object_fraction=.nan", "inputs.object_fraction"),
    ("stages.fit.optimizer.eps=.inf", "stages.fit.optimizer.eps"),
])
def test_nan_and_inf_config_values_are_refused_naming_the_key(rgba_image, tmp_path, capsys,
                                                              override, key):
    assert main(tiny_fit_args(rgba_image, tmp_path / "run", extra=[override])) == 2
    line = one_error_line(capsys.readouterr().err)
    assert key in line and "finite" in line
    assert not (tmp_path / "run").exists()


# -- 5. run folders: race-free creation, empty out=, the lock ----------------------------

def _create(args):
    root, start = args
    while time.time() < start:      # every process leaves this loop at the same moment
        pass
    try:
        path, lock = create_run_dir(str(root), "fit", "same", None, None, None)
    except Exception as exc:        # noqa: BLE001 (the failure is the test's finding)
        return f"{type(exc).__name__}: {exc}"
    lock.release()
    return str(path)


def test_concurrent_run_folder_creation_gives_each_process_its_own(tmp_path, monkeypatch):
    monkeypatch.setattr("time.strftime", lambda fmt: "20260101-000000")  # the same second
    n, rounds = 8, 4
    ctx = multiprocessing.get_context("fork")
    with ctx.Pool(n) as pool:
        for r in range(rounds):
            root = tmp_path / str(r)
            paths = pool.map(_create, [(root, time.time() + 0.3)] * n, chunksize=1)
            assert len(set(paths)) == n, paths
            assert all(Path(p).is_dir() and not any(Path(p).iterdir()) for p in paths), paths


def test_out_an_existing_empty_folder_is_used(rgba_image, tmp_path):
    out = tmp_path / "empty"
    out.mkdir()
    assert main(tiny_fit_args(rgba_image, out, steps=2)) == 0
    assert (out / "config.yaml").is_file() and not (out / LOCK_NAME).exists()
    assert main(tiny_fit_args(rgba_image, out, steps=2)) == 0     # not empty now: a suffix
    assert (tmp_path / "empty-1" / "config.yaml").is_file()


def test_a_run_folder_in_use_is_refused_and_a_stale_lock_taken_over(rgba_image, tmp_path,
                                                                    capsys):
    run = tmp_path / "run"
    assert main(tiny_fit_args(rgba_image, run, steps=4)) == 0
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (run / LOCK_NAME).write_text(f"{holder.pid}\n")
        before = folder_bytes(run)
        capsys.readouterr()
        assert main([f"resume={run}"]) == 2
        line = one_error_line(capsys.readouterr().err)
        assert str(holder.pid) in line and "in use" in line
        assert folder_bytes(run) == before
    finally:
        holder.kill()
        holder.wait()
    # the holder is gone (as after kill -9): its lock is taken over with a note
    assert main([f"resume={run}"]) == 0
    err = capsys.readouterr().err
    assert f"taking over the lock of process {holder.pid}" in err
    assert not (run / LOCK_NAME).exists()


def test_lock_is_exclusive_and_released(tmp_path):
    a = RunLock(tmp_path).acquire()
    assert (tmp_path / LOCK_NAME).read_text().split()[0] == str(os.getpid())
    a.release()
    assert not (tmp_path / LOCK_NAME).exists()


def test_resume_across_a_stage_boundary_and_finished_stages_keep_their_steps(
        rgba_image, tmp_path, capsys):
    stage = {"steps": 4, "resolution": 16,
             "representation": {"type": "voxel-grid", "resolution": 8, "samples_per_ray": 16},
             "guidance": {"type": "reference-view"}, "background": {"type": "solid"},
             "cameras": {"type": "fixed", "elevation": [0.0], "azimuth": [0.0]},
             "losses": {"rgb": 1.0, "mask": 1.0},
             "optimizer": {"type": "adam", "lr": {"density": 0.1, "color": 0.1}}}
    recipe = tmp_path / "two.yaml"
    recipe.write_text(json.dumps({
        "description": "two tiny stages", "inputs": {"requires": ["image"], "image_size": 32},
        "output": {"progress": False, "render_size": 16, "render_views": 2, "render_every": 0,
                   "checkpoint_every": 2, "keep_checkpoints": 100},
        "export": None, "stages": {"a": stage, "b": dict(stage, steps=6)}}))
    run = tmp_path / "run"
    assert main([f"recipe={recipe}", f"image={rgba_image}", f"out={run}"]) == 0
    end = checkpoint.checkpoint_name(1, "b", 6)
    reference = load_file(str(run / "checkpoints" / end))
    # a refused change of a finished stage's steps leaves everything as it was
    before = folder_bytes(run)
    capsys.readouterr()
    mid_b = run / "checkpoints" / checkpoint.checkpoint_name(1, "b", 2)
    assert main([f"resume={mid_b}", "stages.a.steps=6"]) == 2
    assert "stages.a.steps" in one_error_line(capsys.readouterr().err)
    assert folder_bytes(run) == before
    # from the end of stage a, stage b is redone to the same result
    assert main([f"resume={run / 'checkpoints' / checkpoint.checkpoint_name(0, 'a', 4)}"]) == 0
    again = load_file(str(run / "checkpoints" / end))
    for k, v in reference.items():
        torch.testing.assert_close(again[k], v, rtol=0, atol=1e-6)
    assert [(r["stage"], r["step"]) for r in strict_records(run)] == \
        [("a", s) for s in range(4)] + [("b", s) for s in range(6)]
