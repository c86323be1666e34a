"""Packaging: every package is listed, the shipped data is package data, and a built wheel
(not the checkout) runs a recipe from another directory."""

from __future__ import annotations

import os
import site
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

from engine.resources import CHECKOUT_LAYOUT, resource_dir, toy_model_path

ROOT = Path(__file__).resolve().parent.parent


def _listed_packages():
    tomllib = pytest.importorskip("tomllib")
    return set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
               ["packages"])


def test_every_package_is_listed_in_pyproject():
    found = {".".join(p.parent.relative_to(ROOT).parts)
             for top in ("engine", "representations", "guidance")
             for p in (ROOT / top).rglob("__init__.py")}
    listed = _listed_packages()
    assert found <= listed, f"packages missing from pyproject.toml: {sorted(found - listed)}"


def test_resources_resolve_in_a_checkout():
    assert (resource_dir("recipes") / "isotropic3d-toy.yaml").is_file()
    assert (resource_dir("configs") / "defaults.yaml").is_file()
    assert (resource_dir("toy_models") / "stage2" / "engine_model.json").is_file()
    assert toy_model_path(Path("models/toy/stage2")) == resource_dir("toy_models") / "stage2"
    assert toy_model_path(Path("weights/mine")) == Path("weights/mine")
    with pytest.raises(KeyError):
        resource_dir("nope")
    assert set(CHECKOUT_LAYOUT) == {"recipes", "configs", "toy_models"}


@pytest.mark.slow
def test_a_built_wheel_runs_the_toy_recipe_from_another_directory(tmp_path):
    """Build the wheel, unpack it, and run with it in place of the checkout: no source tree
    on the path (the editable install's hooks are not loaded: ``python -S``), the working
    directory elsewhere."""
    wheels = tmp_path / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps",
                    "--no-build-isolation", "-w", str(wheels), str(ROOT)],
                   check=True, cwd=tmp_path, capture_output=True)
    wheel = next(wheels.glob("*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    for needed in ("engine/resources/recipes/isotropic3d-toy.yaml",
                   "engine/resources/recipes/finetune/toy-clip.yaml",
                   "engine/resources/configs/defaults.yaml",
                   "engine/resources/toy_models/stage2/unet/diffusion_pytorch_model.safetensors"):
        assert needed in names, needed
    installed = tmp_path / "installed"
    zipfile.ZipFile(wheel).extractall(installed)
    work = tmp_path / "elsewhere"
    work.mkdir()
    paths = [str(installed)] + site.getsitepackages() + [sysconfig.get_paths()["purelib"]]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(paths)}
    probe = subprocess.run(
        [sys.executable, "-S", "-c",
         "import engine, guidance.multiview.pretrained as p; print(engine.__file__); "
         "from engine.resources import resource_dir; print(resource_dir('recipes'))"],
        cwd=work, env=env, capture_output=True, text=True, check=True)
    assert str(installed) in probe.stdout and str(ROOT) not in probe.stdout, probe.stdout
    image = ROOT / "examples" / "toy" / "red-mug.png"
    run = subprocess.run(
        [sys.executable, "-S", "-m", "engine.run", "recipe=isotropic3d-toy", f"image={image}",
         "out=run", "stages.nerf.steps=2", "stages.dmtet.steps=2", "output.progress=false",
         "output.render_every=0", "export.turntable.enabled=false", "export.texture_size=64",
         "export.mesh_resolution=32"],
        cwd=work, env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-2000:]
    assert (work / "run" / "export" / "mesh.glb").is_file()


def test_every_console_script_is_a_command_with_help(capsys):
    import importlib

    tomllib = pytest.importorskip("tomllib")
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert len(scripts) >= 7
    for name, target in scripts.items():
        module, func = target.split(":")
        main = getattr(importlib.import_module(module), func)
        try:
            code = main(["--help"])
        except SystemExit as exc:
            code = exc.code
        assert code in (0, None), name
        assert "python -m" in capsys.readouterr().out, name     # the usage names the command
