"""Gaussians through `python -m engine.run`: densification inside the stage loop, resume
across a change in the number of Gaussians, one-line errors, and (slow) the toy recipe end
to end."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from engine import checkpoint
from engine.run import main

RECIPE = """
inputs: {requires: [image], image_size: 32}
output: {progress: false, render_every: 0, render_size: 16, render_views: 2,
         checkpoint_every: 3, keep_checkpoints: 100}
stages:
  fit:
    steps: 8
    resolution: 16
    representation:
      type: gaussians
      count: 150
      backend: torch
      densify: {start: 2, every: 2, stop: 7, grad_threshold: 1.0e-7, max_gaussians: 400}
    guidance: {type: reference-view}
    cameras: {type: fixed, elevation: [0.0], azimuth: [0.0], distance: 2.5, fovy: 40.0}
    losses: {rgb: 1.0, mask: 1.0}
    optimizer:
      type: adam
      lr: {xyz: 0.001, scaling: 0.005, rotation: 0.005, opacity: 0.05, color: 0.01}
export: null
"""


def _recipe(tmp_path: Path, text: str = RECIPE) -> Path:
    path = tmp_path / "gs.yaml"
    path.write_text(text)
    return path


def _state(run: Path, step: int):
    return load_file(str(run / "checkpoints" / checkpoint.checkpoint_name(0, "fit", step)))


def test_densifies_in_the_loop_and_resumes_after_it(rgba_image, tmp_path):
    recipe = _recipe(tmp_path)
    a = tmp_path / "a"
    assert main([f"recipe={recipe}", f"image={rgba_image}", f"out={a}"]) == 0
    counts = {s: _state(a, s)["representation.xyz"].shape[0] for s in (3, 6, 8)}
    assert counts[3] != 150 and counts[6] != counts[3]      # densified at steps 2, 4, 6
    reference = _state(a, 8)
    # resume from step 3, after the count changed: the resized state and Adam's moments
    # load, and the run ends where the uninterrupted one did
    mid = a / "checkpoints" / checkpoint.checkpoint_name(0, "fit", 3)
    for p in (a / "checkpoints").iterdir():
        if p != mid:
            p.unlink()
    assert main([f"resume={mid}"]) == 0
    resumed = _state(a, 8)
    assert set(resumed) == set(reference)
    for key in reference:
        torch.testing.assert_close(resumed[key], reference[key], rtol=0, atol=1e-5)
    steps = [json.loads(line)["step"] for line in (a / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(8))


@pytest.mark.parametrize("override, message", [
    ("stages.fit.representation.densify.start=9", "densify: the schedule is out of order"),
    ("stages.fit.representation.points=/nonexistent.ply", "points: no such file"),
    ("stages.fit.representation.densify.min_opacity=0.999 "
     "stages.fit.representation.densify.grad_threshold=1000", "no Gaussians left after pruning"),
])
def test_bad_input_is_one_line_and_exit_2(rgba_image, tmp_path, capsys, override, message):
    recipe = _recipe(tmp_path)
    argv = [f"recipe={recipe}", f"image={rgba_image}", f"out={tmp_path / 'run'}",
            *override.split()]
    if "points=" in override:
        argv.append("stages.fit.representation.init=points")
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err


@pytest.mark.slow
def test_toy_gs_recipe_end_to_end(tmp_path):
    import trimesh

    from representations.lib.gaussian_fields import read_3dgs_ply

    root = Path(__file__).resolve().parent.parent
    out = tmp_path / "mug"
    assert main(["recipe=isotropic3d-toy-gs", f"image={root / 'examples/toy/red-mug.png'}",
                 f"out={out}", "output.progress=false"]) == 0
    export = out / "export"
    for name in ("mesh.glb", "mesh.obj", "turntable.mp4", "turntable.gif", "gaussians.ply"):
        assert (export / name).is_file() and (export / name).stat().st_size > 0, name
    mesh = trimesh.load(export / "mesh.glb", force="mesh")
    assert len(mesh.faces) > 100
    lo, hi = mesh.bounds
    # the object sits at the origin inside the unit sphere
    assert (abs((lo + hi) / 2) < 0.3).all() and (hi - lo).max() < 2.0 and (hi - lo).min() > 0.1
    cols = read_3dgs_ply(export / "gaussians.ply")
    assert len(cols["x"]) > 100


def test_gaussians_then_dmtet(rgba_image, tmp_path):
    # Gaussians -> DMTet refinement -> a textured mesh, as recipe isotropic3d-gs chains them
    text = RECIPE.replace("export: null", """
  refine:
    steps: 2
    init_from: fit
    resolution: 16
    representation: {type: dmtet, resolution: 8, init_level: silhouette,
                     marching_backend: torch, raster_backend: torch}
    guidance: {type: reference-view}
    cameras: {type: fixed, elevation: [0.0], azimuth: [0.0], distance: 2.5, fovy: 40.0}
    losses: {rgb: 1.0, mask: 1.0}
    optimizer: {type: adam, lr: {geometry: 0.005, color: 0.01}}
export: {mesh_resolution: 16, texture_size: 32, turntable: {enabled: false}}
""")
    out = tmp_path / "run"
    assert main([f"recipe={_recipe(tmp_path, text)}", f"image={rgba_image}", f"out={out}",
                 "stages.fit.steps=3", "stages.fit.representation.densify.stop=3"]) == 0
    assert (out / "export" / "mesh.glb").is_file()
    assert not (out / "export" / "gaussians.ply").exists()     # the last stage is DMTet's
