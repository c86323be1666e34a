"""The CPU parts of the GPU check (benchmarks/gpu_check.py): the table, the backend probes, the
real-size run's arguments and the per-phase summary of a run."""

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

import gpu_check  # noqa: E402


def test_cpu_parts_print_one_table_and_write_json(tmp_path, capsys):
    out = tmp_path / "check.json"
    assert gpu_check.main(["parts=[env,backends,tests,real]", f"out={out}"]) == 0
    text = capsys.readouterr().out
    rows = json.loads(out.read_text())
    items = {(r["part"], r["item"]) for r in rows}
    assert ("env", "torch") in items
    assert {("backends", b) for b in gpu_check.BACKENDS} <= items
    import torch

    if not torch.cuda.is_available():
        results = {r["part"]: r["result"] for r in rows if r["part"] in ("tests", "real")}
        assert results["tests"].startswith("skipped") and results["real"].startswith("skipped")
    table = text[text.index("part "):]
    assert all(r["item"] in table for r in rows)


def test_bad_arguments_are_one_line(capsys):
    assert gpu_check.main(["parts=[env,warp]"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "warp" in err[0]


def test_real_size_arguments_keep_every_phase_and_load():
    from engine import config
    from engine.estimate import stage_phases

    argv = gpu_check.real_size_argv("isotropic3d", "/tmp/unused", "cpu", steps_per_phase=2)
    assert "stages.nerf.guidance.model=random:isotropic3d" in argv
    assert "stages.dmtet.guidance.model=random:isotropic3d" in argv
    overrides = [a for a in argv if a.startswith("stages.")]
    cfg, _ = config.load("isotropic3d", overrides)
    got = [(s, p.first_step, p.batch, p.size) for s in cfg.stages for p in stage_phases(cfg, s)]
    assert got == [("nerf", 0, 8, 64), ("nerf", 2, 4, 256),
                   ("dmtet", 0, 4, 256), ("dmtet", 2, 4, 512)]
    assert cfg.stages["nerf"].steps == 4 and cfg.stages["dmtet"].steps == 4
    assert cfg.components["nerf"]["representation"][1].shading.ambient_only_steps == 2


def test_run_summary_gives_seconds_per_step_and_peak_memory(tmp_path):
    records = [
        {"stage": "nerf", "step": 0, "time": 1.5, "cuda_peak_gib": 3.0},
        {"stage": "nerf", "step": 1, "time": 2.0, "cuda_peak_gib": 5.25},
        {"stage": "dmtet", "step": 0, "time": 4.0},
        {"stage": "dmtet", "step": 1, "time": 10.0},
    ]
    (tmp_path / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in records) + "\n")
    assert gpu_check.summarise_run(tmp_path) == [
        "nerf: 2 steps, s/step 1.50 0.50, peak 5.2 GiB",
        "dmtet: 2 steps, s/step 4.00 6.00",
    ]


def test_gaussian_real_size_run_keeps_the_silhouette_level_and_every_phase():
    argv = gpu_check.real_size_argv("isotropic3d-gs", "/tmp/unused", "cpu", steps_per_phase=2)
    assert "stages.gs.guidance.model=random:isotropic3d" in argv
    # DMTet from Gaussians takes its level from their silhouettes, not the NeRF's level 5
    assert not any("init_threshold" in a for a in argv)
    assert "stages.gs.steps=4" in argv and "stages.dmtet.steps=2" in argv


def test_gs_full_run_is_summarised_per_stage_and_falls_back_to_torch(tmp_path, monkeypatch):
    calls = []

    def fake_run(cmd, timeout, env=None):
        calls.append(cmd)
        out = Path(next(a for a in cmd if a.startswith("out="))[4:])
        (out / "export").mkdir(parents=True)
        recs = ([{"stage": "gs", "time": 0.5 + 0.1 * i, "cuda_peak_gib": 3.0} for i in range(5)]
                + [{"stage": "dmtet", "time": 1.0 + 0.2 * i, "cuda_peak_gib": 4.5}
                   for i in range(3)])
        (out / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in recs))
        (out / "export" / "mesh.glb").write_bytes(b"")
        return 0, "done", 12.0

    monkeypatch.setattr(gpu_check, "_run", fake_run)
    table = gpu_check.Table()
    gpu_check.part_gs_full(table, True, str(tmp_path), gsplat_built=False)
    assert "stages.gs.representation.backend=torch" in calls[0]
    results = [r["result"] for r in table.rows]
    assert results[0] == "5 steps in 0.9 s, median 0.100 s/step, peak 3.0 GiB"
    assert results[1] == "3 steps in 1.4 s, median 0.200 s/step, peak 4.5 GiB"
    assert "mesh.glb" in results[2] and table.rows[2]["seconds"] == 12.0
    assert (tmp_path / "gs-full" / "metrics.jsonl").is_file()     # kept for reading later


def test_pytest_summary_is_the_count_line_not_a_trailing_warning():
    text = "== 5 failed, 92 passed, 3 skipped in 113.88s ==\nwarner(PytestBenchmarkWarning(text))"
    assert gpu_check._pytest_summary(text) == "5 failed, 92 passed, 3 skipped in 113.88s"


@pytest.mark.slow
def test_shell_wrapper_runs_from_another_directory(tmp_path):
    import subprocess

    proc = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "parts=[env]"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "torch" in proc.stdout
