"""TensorBoard event files (and W&B) beside metrics.jsonl: engine/experiment_log.py.

Each test is a tiny fit-image run in-process (about a second); the event files are read back
with TensorBoard's own reader, which applies the purge a resume asks for."""

from __future__ import annotations

import errno
import io
import json
import sys
import types
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from conftest import tiny_fit_args
from engine import checkpoint
from engine.experiment_log import TENSORBOARD_DIR, WANDB_ID_FILE
from engine.run import main

NOT_SCALARS = ("stage", "stage_index", "step", "global_step", "nonfinite")


def records(run: Path):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def events(run: Path) -> EventAccumulator:
    ea = EventAccumulator(str(run / TENSORBOARD_DIR),
                          size_guidance={"scalars": 0, "images": 0, "tensors": 0})
    ea.Reload()
    return ea


def expected_scalars(recs):
    """{tag: {global_step: value}} from metrics.jsonl, as the trainer logged it."""
    out = {}
    for r in recs:
        for k, v in r.items():
            if k in NOT_SCALARS or v is None:
                continue
            out.setdefault(f"{r['stage']}/{k}", {})[r["global_step"]] = float(v)
    return out


def assert_scalars_match(ea: EventAccumulator, recs) -> None:
    expected = expected_scalars(recs)
    assert set(ea.Tags()["scalars"]) == set(expected)
    for tag, by_step in expected.items():
        got = ea.Scalars(tag)
        steps = [e.step for e in got]
        assert steps == sorted(by_step), (tag, steps)          # each step once, in order
        for e in got:                   # event files hold float32
            assert e.value == pytest.approx(by_step[e.step], rel=1e-6, abs=1e-12), (tag, e.step)


def test_event_files_hold_every_metric_and_the_renders(rgba_image, tmp_path):
    run = tmp_path / "run"
    assert main(tiny_fit_args(rgba_image, run, steps=6, extra=["output.render_every=4"])) == 0
    recs = records(run)
    ea = events(run)
    assert_scalars_match(ea, recs)
    assert {"fit/loss", "fit/loss/rgb", "fit/weight/rgb", "fit/lr/density", "fit/time",
            "fit/skipped"} <= set(ea.Tags()["scalars"])
    # the render after 4 steps is at the global step of the 4th (3), the final one at 5
    assert ea.Tags()["images"] == ["fit/render"]
    images = ea.Images("fit/render")
    assert [e.step for e in images] == [3, 5]
    for e, name in zip(images, ("fit-000004.png", "fit-final.png")):
        logged = np.asarray(Image.open(io.BytesIO(e.encoded_image_string)).convert("RGB"))
        saved = np.asarray(Image.open(run / "renders" / name).convert("RGB"))
        assert np.array_equal(logged, saved), name
    assert "config/text_summary" in ea.Tags()["tensors"]      # the resolved config, as text


def test_turned_off_it_writes_nothing(rgba_image, tmp_path):
    run = tmp_path / "run"
    assert main(tiny_fit_args(rgba_image, run, steps=2,
                              extra=["output.tensorboard=false"])) == 0
    assert len(records(run)) == 2 and not (run / TENSORBOARD_DIR).exists()


def test_a_resume_from_an_earlier_checkpoint_does_not_duplicate_steps(rgba_image, tmp_path):
    """Steps 4-11 are redone with another learning rate: TensorBoard shows each step once,
    with the values of the redone steps, as metrics.jsonl does."""
    run = tmp_path / "run"
    assert main(tiny_fit_args(rgba_image, run, steps=12)) == 0
    mid = run / "checkpoints" / checkpoint.checkpoint_name(0, "fit", 4)
    assert main([f"resume={mid}", "stages.fit.optimizer.lr.color=0.01"]) == 0
    assert len(list((run / TENSORBOARD_DIR).glob("events.out.tfevents.*"))) == 2
    recs = records(run)
    assert [r["global_step"] for r in recs] == list(range(12))
    ea = events(run)
    assert_scalars_match(ea, recs)
    lr = {e.step: e.value for e in ea.Scalars("fit/lr/color")}
    assert [lr[s] for s in (0, 3, 4, 11)] == pytest.approx([0.1, 0.1, 0.01, 0.01])
    assert [e.step for e in ea.Images("fit/render")] == [11]


def test_global_steps_run_on_across_stages(rgba_image, tmp_path):
    stage = {"steps": 3, "resolution": 16,
             "representation": {"type": "voxel-grid", "resolution": 8, "samples_per_ray": 16},
             "guidance": {"type": "reference-view"}, "background": {"type": "solid"},
             "cameras": {"type": "fixed", "elevation": [0.0], "azimuth": [0.0]},
             "losses": {"rgb": 1.0, "mask": 1.0},
             "optimizer": {"type": "adam", "lr": {"density": 0.1, "color": 0.1}}}
    recipe = tmp_path / "two.yaml"
    recipe.write_text(json.dumps({
        "inputs": {"requires": ["image"], "image_size": 32},
        "output": {"progress": False, "render_size": 16, "render_views": 2, "render_every": 0,
                   "checkpoint_every": 0},
        "export": None, "stages": {"a": stage, "b": dict(stage, steps=4)}}))
    run = tmp_path / "run"
    assert main([f"recipe={recipe}", f"image={rgba_image}", f"out={run}"]) == 0
    ea = events(run)
    assert_scalars_match(ea, records(run))
    assert [e.step for e in ea.Scalars("a/loss")] == [0, 1, 2]
    assert [e.step for e in ea.Scalars("b/loss")] == [3, 4, 5, 6]
    assert [e.step for e in ea.Images("a/render")] == [2]
    assert [e.step for e in ea.Images("b/render")] == [6]


@pytest.mark.filterwarnings("error::pytest.PytestUnhandledThreadExceptionWarning")
def test_a_full_disk_while_writing_event_files_does_not_stop_the_run(rgba_image, tmp_path,
                                                                    monkeypatch, capsys):
    from tensorboard.compat.tensorflow_stub.io import gfile

    real = gfile.LocalFileSystem._write
    calls = []

    def write(self, filename, content, mode):
        calls.append(filename)
        if len(calls) > 4:      # the header, config and two steps fit; then the disk is full
            raise OSError(errno.ENOSPC, "No space left on device", filename)
        return real(self, filename, content, mode)

    monkeypatch.setattr(gfile.LocalFileSystem, "_write", write)
    run = tmp_path / "run"
    capsys.readouterr()
    assert main(tiny_fit_args(rgba_image, run, steps=8)) == 0
    err = capsys.readouterr().err
    warnings = [line for line in err.splitlines() if "TensorBoard" in line]
    assert len(warnings) == 1 and "No space left on device" in warnings[0], err
    assert str(run / TENSORBOARD_DIR) in warnings[0] and "b'" not in warnings[0]
    assert "Traceback" not in err
    assert [r["step"] for r in records(run)] == list(range(8))      # metrics.jsonl is whole
    assert (run / "checkpoints" / checkpoint.checkpoint_name(0, "fit", 8)).is_file()


def test_wandb_not_installed_is_one_line_before_anything_is_written(rgba_image, tmp_path,
                                                                   monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "wandb", None)       # import wandb fails
    run = tmp_path / "run"
    capsys.readouterr()
    assert main(tiny_fit_args(rgba_image, run, steps=2, extra=["output.wandb=true"])) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and "output.wandb" in err[0] and "pip install wandb" in err[0], err
    assert not run.exists()


class FakeWandb(types.ModuleType):
    """Enough of wandb's API for the trainer: init, log, finish, Image."""

    def __init__(self):
        super().__init__("wandb")
        self.inits, self.logged, self.finished = [], [], 0
        self.history = {}                     # run id -> next step, as the service keeps it

    def init(self, **kwargs):
        self.inits.append(kwargs)
        fake = self

        class FakeRun:
            step = self.history.get(kwargs["id"], 0)

            def log(self, values, step):
                fake.logged.append((step, dict(values)))
                fake.history[kwargs["id"]] = step + 1

            def finish(self):
                fake.finished += 1
        return FakeRun()

    class Image:
        def __init__(self, pixels):
            self.shape = pixels.shape


def test_wandb_gets_the_same_scalars_and_a_resume_continues_its_run(rgba_image, tmp_path,
                                                                   monkeypatch):
    fake = FakeWandb()
    monkeypatch.setitem(sys.modules, "wandb", fake)
    run = tmp_path / "run"
    args = tiny_fit_args(rgba_image, run, steps=8,
                         extra=["output.wandb=true", "output.wandb_project=tests",
                                "output.tensorboard=false"])
    assert main(args) == 0
    assert fake.finished == 1 and fake.inits[0]["project"] == "tests"
    run_id = (run / WANDB_ID_FILE).read_text().strip()
    assert fake.inits[0]["id"] == run_id and fake.inits[0]["config"]["recipe"] == "fit-image"
    scalars = {step: v for step, v in fake.logged if "fit/loss" in v}
    assert sorted(scalars) == list(range(8))
    assert scalars[7]["fit/loss"] == pytest.approx(records(run)[7]["loss"])
    assert [(s, v["fit/render"].shape) for s, v in fake.logged if "fit/render" in v] == \
        [(7, (32, 32, 3))]
    # resumed from step 4: the same W&B run; the steps it already has are not sent again
    fake.logged.clear()
    assert main([f"resume={run / 'checkpoints' / checkpoint.checkpoint_name(0, 'fit', 4)}",
                 "stages.fit.steps=10"]) == 0
    assert fake.inits[1]["id"] == run_id and fake.inits[1]["resume"] == "allow"
    assert sorted({s for s, v in fake.logged if "fit/loss" in v}) == [8, 9]
