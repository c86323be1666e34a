"""``python -m engine.compare``: two real tiny runs side by side, and its one-line errors."""

from __future__ import annotations

import csv
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import tiny_fit_args
from engine.compare import PALETTE, main
from engine.run import main as run_main

ROOT = Path(__file__).resolve().parent.parent


def records(run: Path):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    """Two finished fit-image runs that differ (steps, learning rate): (a, b)."""
    root = tmp_path_factory.mktemp("runs")
    pixels = np.zeros((64, 64, 4), np.uint8)
    pixels[10:40, 5:25] = [220, 40, 30, 255]
    image = root / "block.png"
    Image.fromarray(pixels).save(image)
    a, b = root / "a", root / "b"
    assert run_main(tiny_fit_args(image, a, steps=6, extra=["output.tensorboard=false"])) == 0
    assert run_main(tiny_fit_args(image, b, steps=8, extra=[
        "output.tensorboard=false", "stages.fit.optimizer.lr.density=0.03"])) == 0
    return a, b


def table_rows(text: str) -> dict:
    """The printed markdown table as {run: {column: cell}}."""
    lines = [ln for ln in text.splitlines() if ln.startswith("|")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    rows = [[c.strip() for c in ln.strip("|").split("|")] for ln in lines[2:]]
    return {r[0]: dict(zip(header, r)) for r in rows}


def test_two_runs_give_one_table_and_one_chart(two_runs, tmp_path, capsys):
    a, b = two_runs
    out = tmp_path / "cmp"
    assert main([str(a), str(b), f"out={out}"]) == 0
    printed = capsys.readouterr().out
    rows = table_rows(printed)
    assert set(rows) == {"a", "b"}
    for run, steps in ((a, 6), (b, 8)):
        row, last = rows[run.name], records(run)[-1]
        assert row["recipe"] == "fit-image" and row["stages"] == "fit"
        assert row["steps"] == str(steps)
        for key in ("loss", "loss/rgb", "loss/mask", "loss/opacity_sparsity"):
            assert row[key] == f"{last[key]:.4g}", key
    # the CSV holds the same values at full precision
    with open(out / "compare.csv") as f:
        by_run = {r["run"]: r for r in csv.DictReader(f)}
    for run in (a, b):
        last = records(run)[-1]
        assert float(by_run[run.name]["loss"]) == last["loss"]
        assert float(by_run[run.name]["loss/rgb"]) == last["loss/rgb"]
        assert int(by_run[run.name]["steps"]) == len(records(run))
        assert 0 < float(by_run[run.name]["train_seconds"]) < 60
    assert (out / "compare.md").read_text() in printed
    # the chart: a PNG with one panel per loss and both runs' colours drawn
    chart = np.asarray(Image.open(out / "losses.png").convert("RGB"))
    for colour in PALETTE[:2]:
        assert np.all(chart == np.array(colour, np.uint8), axis=-1).sum() > 100, colour
    assert chart.shape[0] > 4 * 200


def test_metrics_evaluation_scores_and_unfinished_runs(two_runs, tmp_path, capsys):
    a, b = two_runs
    # an evaluation written into the run folder (python -m engine.evaluate ... json=)
    scored = tmp_path / "scored"
    shutil.copytree(a, scored)
    (scored / "eval.json").write_text(json.dumps({"chamfer": 0.0421, "volume_iou": 0.61,
                                                  "f_score": 0.5, "seconds": 3.2}))
    # a toy-benchmark row: OUT/runs/RECIPE/OBJECT beside OUT/results.json
    bench_run = tmp_path / "bench" / "runs" / "fit-image" / "obj-0007"
    shutil.copytree(b, bench_run)
    (tmp_path / "bench" / "results.json").write_text(json.dumps({"rows": [
        {"recipe": "fit-image", "object": "obj-0007", "ok": True, "psnr": 21.5, "ssim": 0.8,
         "chamfer": 0.09, "run": "somewhere/else/runs/fit-image/obj-0007"}]}))
    # a run stopped after 3 of its 6 steps, its last line cut short by the kill
    cut = tmp_path / "cut"
    shutil.copytree(a, cut)
    lines = (cut / "metrics.jsonl").read_text().splitlines()
    (cut / "metrics.jsonl").write_text("\n".join(lines[:3]) + "\n" + lines[3][:25])
    assert main([str(scored), str(bench_run), str(cut), f"out={tmp_path / 'o'}",
                 "metric=loss/rgb", "metric=lr/density", "smooth=0.5"]) == 0
    rows = table_rows(capsys.readouterr().out)
    assert list(rows["scored"])[5:] == ["loss/rgb", "lr/density", "chamfer", "volume_iou",
                                        "f_score", "psnr", "ssim"]
    assert rows["scored"]["chamfer"] == "0.0421" and rows["scored"]["psnr"] == "-"
    assert rows["obj-0007"]["psnr"] == "21.5" and rows["obj-0007"]["chamfer"] == "0.09"
    assert rows["obj-0007"]["lr/density"] == "0.03"
    assert rows["cut"]["steps"] == "3/6"
    assert rows["cut"]["loss/rgb"] == f"{json.loads(lines[2])['loss/rgb']:.4g}"
    assert (tmp_path / "o" / "losses.png").is_file()


def one_error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def _not_a_run(tmp_path, a, b):
    (tmp_path / "empty").mkdir()
    return [str(tmp_path / "empty")]


def _parent_of_runs(tmp_path, a, b):
    return [str(a.parent)]


def _a_file(tmp_path, a, b):
    return [str(a / "metrics.jsonl")]


def _empty_metrics(tmp_path, a, b):
    run = tmp_path / "r"
    shutil.copytree(a, run)
    (run / "metrics.jsonl").write_text("")
    return [str(run), str(b)]


def _corrupt_metrics(tmp_path, a, b):
    run = tmp_path / "r"
    shutil.copytree(a, run)
    lines = (run / "metrics.jsonl").read_text().splitlines()
    lines[2] = lines[2][:30]
    (run / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    return [str(run)]


def _not_records(tmp_path, a, b):
    run = tmp_path / "r"
    shutil.copytree(a, run)
    (run / "metrics.jsonl").write_text('[1, 2]\n{"step": 1}\n')
    return [str(run)]


def _no_metrics(tmp_path, a, b):
    run = tmp_path / "r"
    shutil.copytree(a, run)
    (run / "metrics.jsonl").unlink()
    return [str(run)]


def _corrupt_config(tmp_path, a, b):
    run = tmp_path / "r"
    shutil.copytree(a, run)
    (run / "config.yaml").write_text("stages: [unclosed\n")
    return [str(run)]


@pytest.mark.parametrize("make, words", [
    (lambda t, a, b: [], ["no run folders given", "python -m engine.compare RUN RUN"]),
    (lambda t, a, b: [str(t / "nope")], ["no such folder"]),
    (_not_a_run, ["is not a run folder", "no config.yaml"]),
    (_parent_of_runs, ["holds 2 run folders", "a, b"]),
    (_a_file, ["is a file, not a run folder", "give its folder"]),
    (_no_metrics, ["is not a run folder", "no metrics.jsonl"]),
    (_empty_metrics, ["holds no step records", "resume="]),
    (_corrupt_metrics, ["line 3 is not JSON", "remove that line"]),
    (_not_records, ["line 1 is not a step record"]),
    (_corrupt_config, ["is not valid YAML"]),
    (lambda t, a, b: [str(a), str(a) + "/"], ["given twice"]),
    (lambda t, a, b: [str(a), "metric=loss/rbg"], ["metric=loss/rbg", "did you mean 'loss/rgb'"]),
    (lambda t, a, b: [str(a), "smooth=1.5"], ["smooth", "[0, 1)"]),
    (lambda t, a, b: [str(a), "metrics=loss"], ["unknown key 'metrics'", "did you mean 'metric'"]),
], ids=["no-runs", "missing", "not-a-run", "parent-of-runs", "a-file", "no-metrics",
        "empty-metrics", "corrupt-metrics", "not-records", "corrupt-config", "twice",
        "unknown-metric", "smooth", "unknown-key"])
def test_bad_input_is_one_line_exit_2(two_runs, tmp_path, capsys, make, words):
    argv = make(tmp_path, *two_runs) + [f"out={tmp_path / 'out'}"]
    capsys.readouterr()
    assert main(argv) == 2
    line = one_error_line(capsys.readouterr().err)
    assert line.startswith("error: ")
    for w in words:
        assert w in line, line
    assert not (tmp_path / "out").exists()


def test_the_command_line_without_torch(two_runs, tmp_path):
    """``python -m engine.compare``: --help is exit 0, a mistake one line and exit 2, and a
    comparison never imports torch (it starts in well under a second)."""
    cmd = [sys.executable, "-m", "engine.compare"]
    done = subprocess.run(cmd + ["--help"], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0 and "python -m engine.compare RUN RUN" in done.stdout
    done = subprocess.run(cmd + [str(tmp_path / "nope")], cwd=ROOT, capture_output=True,
                          text=True)
    assert done.returncode == 2 and "no such folder" in one_error_line(done.stderr)
    check = ("import sys; from engine.compare import main; "
             f"assert main([{str(two_runs[0])!r}, 'out={tmp_path / 'o'}']) == 0; "
             "sys.exit(3 if 'torch' in sys.modules else 0)")
    done = subprocess.run([sys.executable, "-c", check], cwd=ROOT, capture_output=True,
                          text=True)
    assert done.returncode == 0, done.stderr
