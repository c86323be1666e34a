"""End to end through `python -m engine.run`: outputs, resume, interrupts, NaN guard, errors."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import List

import pytest
import torch
from safetensors.torch import load_file

from conftest import tiny_fit_args
from engine import checkpoint, registry
from engine.run import main
from guidance.reference import ReferenceViewGuidance

ROOT = Path(__file__).resolve().parent.parent


class FaultyGuidance(ReferenceViewGuidance):
    """Reference-view losses, NaN at chosen steps and Ctrl-C at another (for tests)."""

    @dataclass
    class Config:
        nan_steps: List[int] = field(default_factory=list)
        interrupt_at: int = -1

    def __init__(self, cfg, device=None, inputs=None):
        super().__init__(None, device=device, inputs=inputs)
        self.cfg = cfg

    def forward(self, outputs, cameras, step):
        losses = super().forward(outputs, cameras, step)
        if step.step == self.cfg.interrupt_at:
            signal.raise_signal(signal.SIGINT)   # as if the user pressed Ctrl-C now
        if step.step in self.cfg.nan_steps:
            losses["rgb"] = losses["rgb"] * float("nan")
        return losses


registry.REGISTRY.add("guidance", "test-faulty", FaultyGuidance)


def records(run_dir: Path):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def final_state(run_dir: Path, steps: int = 12):
    return load_file(str(run_dir / "checkpoints" / checkpoint.checkpoint_name(0, "fit", steps)))


def test_run_writes_the_output_folder_and_learns(rgba_image, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(tiny_fit_args(rgba_image, out, steps=30)) == 0
    printed = capsys.readouterr().out
    assert f"output: {out}" in printed
    assert (out / "config.yaml").is_file()
    recs = records(out)
    assert [r["step"] for r in recs] == list(range(30))
    assert recs[-1]["loss"] < 0.5 * recs[0]["loss"]           # the fit makes progress
    names = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert names == [checkpoint.checkpoint_name(0, "fit", s) for s in (4, 8, 12, 16, 20, 24, 28, 30)]
    assert (out / "renders" / "fit-final.png").is_file()
    # the same out= again never overwrites: a suffixed folder is made
    assert main(tiny_fit_args(rgba_image, out, steps=2)) == 0
    assert (tmp_path / "run-1" / "config.yaml").is_file()
    assert len(records(out)) == 30


def test_periodic_checkpoints_are_pruned_but_stage_end_kept(rgba_image, tmp_path):
    out = tmp_path / "run"
    assert main(tiny_fit_args(rgba_image, out, steps=13, extra=["output.keep_checkpoints=2"])) == 0
    names = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert names == [checkpoint.checkpoint_name(0, "fit", s) for s in (8, 12, 13)]


def test_same_seed_same_result_and_resume_equals_uninterrupted(rgba_image, tmp_path, capsys):
    a, b = tmp_path / "a", tmp_path / "b"
    assert main(tiny_fit_args(rgba_image, a)) == 0
    faulty = ["stages.fit.guidance.type=test-faulty", "stages.fit.guidance.interrupt_at=5"]
    assert main(tiny_fit_args(rgba_image, b, extra=faulty)) == 130
    err = capsys.readouterr().err
    assert "interrupted in stage fit after step 6" in err and f"resume={b}" in err
    assert (b / "checkpoints" / checkpoint.checkpoint_name(0, "fit", 6)).is_file()
    # resume with the interrupt switched off; it continues in the same folder
    assert main([f"resume={b}", "stages.fit.guidance.interrupt_at=-1"]) == 0
    sa, sb = final_state(a), final_state(b)
    for key in sa:
        if key.startswith("representation."):
            torch.testing.assert_close(sa[key], sb[key], rtol=0, atol=1e-6)
    assert [r["step"] for r in records(b)] == list(range(12))
    ra, rb = records(a), records(b)
    assert [r["loss"] for r in ra] == pytest.approx([r["loss"] for r in rb], rel=1e-5)


def test_resume_from_an_earlier_checkpoint_file(rgba_image, tmp_path):
    a = tmp_path / "a"
    assert main(tiny_fit_args(rgba_image, a)) == 0
    reference = final_state(a)
    mid = a / "checkpoints" / checkpoint.checkpoint_name(0, "fit", 4)
    for p in (a / "checkpoints").iterdir():
        if p != mid:
            p.unlink()
    assert main([f"resume={mid}"]) == 0
    torch.testing.assert_close(final_state(a)["representation.density_grid"],
                               reference["representation.density_grid"], rtol=0, atol=1e-6)


def test_nan_steps_are_skipped(rgba_image, tmp_path):
    out = tmp_path / "nan"
    extra = ["stages.fit.guidance.type=test-faulty", "stages.fit.guidance.nan_steps=[2, 3]"]
    assert main(tiny_fit_args(rgba_image, out, extra=extra)) == 0
    skipped = [r["step"] for r in records(out) if r["skipped"]]
    assert skipped == [2, 3]
    state = final_state(out)
    assert all(torch.isfinite(v).all() for k, v in state.items() if k.startswith("represent"))


def test_repeated_nan_aborts_and_keeps_a_checkpoint(rgba_image, tmp_path, capsys):
    out = tmp_path / "nan"
    extra = ["stages.fit.guidance.type=test-faulty",
             "stages.fit.guidance.nan_steps=[5, 6, 7, 8, 9, 10, 11]", "system.max_nan_steps=3"]
    assert main(tiny_fit_args(rgba_image, out, extra=extra)) == 3
    err = capsys.readouterr().err
    assert "NaN/inf for 3 steps in a row" in err and "Traceback" not in err
    state = load_file(str(out / "checkpoints" / checkpoint.checkpoint_name(0, "fit", 7)))
    assert all(torch.isfinite(v).all() for v in state.values())
    assert (out / "checkpoints" / checkpoint.checkpoint_name(0, "fit", 4)).is_file()


def test_checkpoint_write_is_atomic(tmp_path, monkeypatch):
    import errno

    from engine import atomic

    module = torch.nn.Linear(2, 2)
    path = tmp_path / "checkpoints" / checkpoint.checkpoint_name(0, "fit", 1)
    checkpoint.save(path, modules={"m": module}, optimizer=None, info={"step": 1})
    before = path.read_bytes()

    def disk_full(tmp):          # the data is in the temp file; the disk fills on the flush
        Path(tmp).write_bytes(b"half a file")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(atomic, "_fsync_file", disk_full)
    with torch.no_grad():
        module.weight.add_(1.0)
    with pytest.raises(atomic.WriteFailed, match="No space left"):
        checkpoint.save(path, modules={"m": module}, optimizer=None, info={"step": 1})
    assert path.read_bytes() == before                         # the old checkpoint survives
    assert [p.name for p in path.parent.iterdir()] == [path.name]   # no temp file left


def test_damaged_checkpoint_is_a_user_error(rgba_image, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(tiny_fit_args(rgba_image, out, steps=4)) == 0
    ck = out / "checkpoints" / checkpoint.checkpoint_name(0, "fit", 4)
    ck.write_bytes(ck.read_bytes()[:100])
    assert main([f"resume={ck}"]) == 2
    assert "damaged" in capsys.readouterr().err


@pytest.mark.parametrize("args, words", [
    (["recipe=fit-image"], "needs an input image"),
    (["recipe=fit-image", "image=/nonexistent/cat.png"], "image not found"),
    (["recipe=nope"], "no recipe named 'nope'"),
    (["recipe=fit-image", "image=x.png", "stages.fit.steps=0"], "stages.fit.steps"),
    (["recipe=fit-image", "--fast"], "unknown option --fast"),
    (["resume=/nonexistent/run"], "does not exist"),
    (["image=x.png"], "no recipe given"),
    (["recipie=fit-image"], "did you mean 'recipe'?"),
    (["recipe=fit-image", "recipe=nope"], "recipe is given twice"),
    (["recipe=fit-image", "--dry-run=yes"], "--dry-run takes no value"),
    (["recipe=fit-image", "stages.fit.steps"], "'stages.fit.steps' is not key=value"),
    (["recipe=fit-image", "device=gpu"], "device"),
])
def test_user_errors_exit_2_with_one_line(args, words, capsys):
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and words in err and "\n" not in err


def test_cli_subprocess_exit_code_and_no_traceback(tmp_path):
    bad = tmp_path / "bad.png"
    bad.write_text("not an image")
    proc = subprocess.run([sys.executable, "-m", "engine.run", "recipe=fit-image", f"image={bad}"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr and "not an image" in proc.stderr


def test_resolve_device():
    import torch

    from engine.errors import ConfigError
    from engine.run import resolve_device

    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type in ("cpu", "cuda")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="no CUDA device"):
            resolve_device("cuda:0")


def test_list_and_dry_run(capsys):
    assert main(["--list"]) == 0
    out = capsys.readouterr().out
    assert "fit-image" in out and "voxel-grid" in out and "in-tree" in out
    assert main(["recipe=fit-image", "seed=7", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "seed: 7" in out and "blob_radius: 0.5" in out
    with pytest.raises(SystemExit) as exit_info:    # --help exits 0, as every command
        main(["--help"])
    assert exit_info.value.code == 0
    assert "usage:" in capsys.readouterr().out
    assert main([]) == 0 and "usage:" in capsys.readouterr().out


def test_run_exports_a_textured_mesh_and_turntable(rgba_image, tmp_path, capsys):
    import trimesh

    out = tmp_path / "exp"
    args = [a for a in tiny_fit_args(rgba_image, out, steps=30) if a != "export=null"]
    args += ["stages.fit.representation.resolution=16", "export.mesh_resolution=24",
             "export.texture_size=64", "export.turntable.frames=3", "export.turntable.size=32",
             "stages.fit.representation.isosurface_threshold=3.0"]
    assert main(args) == 0
    printed = dict(line.split(": ", 1) for line in capsys.readouterr().out.splitlines())
    glb = Path(printed["glb"])
    assert glb.parent == out / "export" and Path(printed["obj"]).is_file()
    mesh = trimesh.load(glb, force="mesh")
    assert len(mesh.faces) > 0 and mesh.visual.material.baseColorTexture is not None
    assert Path(printed["gif"]).is_file() and Path(printed["mp4"]).is_file()


@pytest.mark.parametrize("module, words", [
    ("imageio_ffmpeg", ["MP4 turntable", "imageio-ffmpeg", "formats=[gif]"]),
    ("pymeshlab", ["mesh clean-up", "libGL.so.1", "export=null"]),
])
def test_an_export_library_that_does_not_import_stops_the_run_before_training(
        module, words, rgba_image, tmp_path, monkeypatch, capsys):
    """Seen on a GPU machine: pymeshlab without the system's libGL, and no imageio-ffmpeg,
    failed only at the export, after all of the training."""
    import importlib

    real = importlib.import_module

    def import_module(name, *a, **k):
        if name == module:
            raise ImportError("libGL.so.1: cannot open shared object file")
        return real(name, *a, **k)

    monkeypatch.setattr(importlib, "import_module", import_module)
    out = tmp_path / "exp"
    args = [a for a in tiny_fit_args(rgba_image, out, steps=30) if a != "export=null"]
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and all(w in err[0] for w in words), err
    assert not out.exists()                          # nothing trained, nothing written
    # GIF only needs no imageio-ffmpeg
    if module == "imageio_ffmpeg":
        from engine.export import ExportConfig, check_export_libraries

        check_export_libraries(ExportConfig(turntable={"formats": ["gif"]}))


def test_export_of_a_representation_without_a_mesh_is_refused_at_load(capsys):
    from engine import config
    from engine.errors import ConfigError

    with pytest.raises(ConfigError, match="cannot export a mesh"):
        config.load("fit-image", ["stages.fit.representation.type=test-no-mesh"])


class NoMesh(torch.nn.Module):
    """A representation that cannot give a mesh (for the export check)."""

    from engine.plugin import Representation as _R
    from representations.voxel_grid import VoxelGrid as _V
    Config = _V.Config
    surface = _R.surface
    albedo = _R.albedo
    loss_names = ("opacity_sparsity",)
    param_group_names = ("density", "color")


registry.REGISTRY.add("representation", "test-no-mesh", NoMesh)


def test_a_reader_that_goes_away_is_no_traceback():
    """``python -m engine.run ... --dry-run | head -1``: the closed pipe ends the command
    quietly (exit 141, as a Unix tool killed by SIGPIPE), without a BrokenPipeError trace."""
    proc = subprocess.Popen([sys.executable, "-m", "engine.run", "recipe=isotropic3d-toy",
                             "image=examples/toy/red-mug.png", "--dry-run"], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()           # the reader leaves before the config is written
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) in (0, 141), err
    assert "Traceback" not in err and "BrokenPipe" not in err, err
