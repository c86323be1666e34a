"""Recipe composition: extends, include, cycles, component replacement, provenance."""

from pathlib import Path

import pytest
import yaml

from engine import config
from engine.errors import ConfigError
from engine.run import main


def write(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data))
    return path


def test_extends_by_name_changes_two_values_and_records_sources(tmp_path):
    child = write(tmp_path / "child.yaml", {"extends": "fit-image", "system": {"seed": 9},
                                            "stages": {"fit": {"steps": 7}}})
    cfg, resolved = config.load(str(child), ["image=x.png"])
    assert cfg.recipe == "child" and cfg.system.seed == 9 and cfg.stages["fit"].steps == 7
    # untouched values come from the parent, merged key by key
    assert resolved.stages.fit.representation.resolution == 32
    assert resolved.stages.fit.losses.rgb == 1.0
    p = cfg.provenance
    assert p["system.seed"] == str(child) and p["stages.fit.steps"] == str(child)
    assert p["stages.fit.representation.resolution"] == "recipes/fit-image.yaml"
    assert p["output.root"] == "configs/defaults.yaml"
    assert p["stages.fit.optimizer.betas"] == "configs/defaults.yaml (stage)"
    assert p["stages.fit.representation.blob_radius"] == "default of voxel-grid"
    assert p["inputs.image"] == "command line"


def test_shipped_composition_example():
    cfg, resolved = config.load("fit-image-quick", [])
    assert cfg.stages["fit"].steps == 100 and resolved.stages.fit.representation.resolution == 24
    assert resolved.stages.fit.guidance.type == "reference-view"


def test_extends_a_path_relative_to_the_file_and_includes(tmp_path):
    (tmp_path / "sub").mkdir()
    parent = write(tmp_path / "sub" / "parent.yaml",
                   {"extends": "fit-image", "stages": {"fit": {"steps": 11}}})
    frag = write(tmp_path / "sub" / "fast.yaml", {"output": {"render_every": 3}})
    child = write(tmp_path / "sub" / "child.yaml",
                  {"extends": "parent.yaml", "include": ["fast.yaml"],
                   "output": {"render_size": 32}})
    cfg, _ = config.load(str(child), [])
    assert cfg.stages["fit"].steps == 11 and cfg.output.render_every == 3
    assert cfg.output.render_size == 32
    assert cfg.provenance["output.render_every"] == str(frag)
    assert cfg.provenance["stages.fit.steps"] == str(parent)


def test_cycles_and_missing_parents_are_clear(tmp_path):
    a, b = tmp_path / "a.yaml", tmp_path / "b.yaml"
    write(a, {"extends": "b.yaml", "stages": {}})
    write(b, {"extends": "a.yaml", "stages": {}})
    with pytest.raises(ConfigError, match=r"recipe cycle: .*a\.yaml -> .*b\.yaml -> .*a\.yaml"):
        config.load(str(a), [])
    orphan = write(tmp_path / "orphan.yaml", {"extends": "no-such-recipe", "stages": {}})
    with pytest.raises(ConfigError, match=r"orphan\.yaml: extends 'no-such-recipe': no recipe"):
        config.load(str(orphan), [])
    bad = write(tmp_path / "bad.yaml", {"extends": "fit-image", "include": ["nope.yaml"]})
    with pytest.raises(ConfigError, match="include 'nope.yaml' not found"):
        config.load(str(bad), [])


def test_a_new_component_type_replaces_the_old_settings(tmp_path):
    child = write(tmp_path / "c.yaml", {"extends": "fit-image", "stages": {"fit": {
        "representation": {"type": "nerf", "samples_per_ray": 8},
        "optimizer": {"lr": {"encoding": 0.01, "mlp": 0.001}},
        "losses": {"rgb": 1.0, "mask": 1.0, "opacity_sparsity": 0.0}}}})
    _, resolved = config.load(str(child), [])
    rep = resolved.stages.fit.representation
    assert rep.type == "nerf" and rep.samples_per_ray == 8 and "resolution" not in rep
    # the same from the command line
    _, resolved = config.load("fit-image", ["stages.fit.background.type=environment"])
    assert resolved.stages.fit.background.type == "environment"
    assert "color" not in resolved.stages.fit.background


def test_dry_run_shows_where_values_come_from(tmp_path, capsys):
    child = write(tmp_path / "child.yaml", {"extends": "fit-image",
                                            "stages": {"fit": {"steps": 5}}})
    assert main([f"recipe={child}", "seed=3", "--dry-run"]) == 0
    out = capsys.readouterr().out
    line = next(l for l in out.splitlines() if l.startswith("# stages.fit.steps "))
    assert "= 5" in line and line.endswith(str(child))
    seed = next(l for l in out.splitlines() if l.startswith("# system.seed "))
    assert seed.endswith("<- command line")
    yaml.safe_load(out)                         # still one valid YAML document


def test_an_extending_recipe_runs(tmp_path, rgba_image):
    child = write(tmp_path / "child.yaml", {"extends": "fit-image-quick", "export": None,
                                            "stages": {"fit": {"steps": 3, "resolution": 16}}})
    out = tmp_path / "run"
    assert main([f"recipe={child}", f"image={rgba_image}", f"out={out}",
                 "output.progress=false", "inputs.image_size=32"]) == 0
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 3


def test_extending_isotropic3d_changes_two_values_with_sources(tmp_path, capsys):
    child = write(tmp_path / "iso-short.yaml", {
        "extends": "isotropic3d",
        "stages": {"nerf": {"steps": 2000, "guidance": {"guidance_scale": 7.5}}}})
    assert main([f"recipe={child}", "image=cat.png", "--dry-run"]) == 0
    out = capsys.readouterr().out
    rows = {l.split("=")[0].strip("# ").strip(): l for l in out.splitlines() if l.startswith("# ")}
    assert rows["stages.nerf.steps"].endswith(str(child)) and "= 2000" in rows["stages.nerf.steps"]
    assert rows["stages.nerf.guidance.guidance_scale"].endswith(str(child))
    assert rows["stages.dmtet.steps"].endswith("recipes/isotropic3d.yaml")
    assert rows["stages.nerf.guidance.loss"].endswith("recipes/isotropic3d.yaml")
