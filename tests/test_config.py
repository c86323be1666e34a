"""Recipe merging, overrides, aliases and the validation errors users see."""

import pytest
import yaml

from engine import config
from engine.errors import ConfigError


def load(*items, recipe="fit-image"):
    return config.load(recipe, list(items))


def test_precedence_defaults_recipe_cli():
    cfg, resolved = load("image=x.png")
    assert cfg.output.root == "outputs"                     # configs/defaults.yaml
    assert cfg.output.render_every == 100                   # the recipe overrides the default
    assert cfg.stages["fit"].steps == 300
    cfg, _ = load("image=x.png", "output.render_every=7", "stages.fit.steps=5")
    assert cfg.output.render_every == 7 and cfg.stages["fit"].steps == 5


def test_aliases_map_to_full_keys_and_last_one_wins():
    cfg, _ = load("image=a.png", "seed=3", "device=cpu", "out=/tmp/o", "prompt=a chair")
    assert cfg.inputs.image == "a.png" and cfg.system.seed == 3 and cfg.system.device == "cpu"
    assert cfg.output.dir == "/tmp/o" and cfg.inputs.prompt == "a chair"
    cfg, _ = load("seed=3", "system.seed=4")
    assert cfg.system.seed == 4
    cfg, _ = load("system.seed=4", "seed=3")
    assert cfg.system.seed == 3


def test_plugin_defaults_are_filled_in_resolved_config():
    _, resolved = load()
    rep = resolved.stages.fit.representation
    assert rep.type == "voxel-grid" and rep.blob_radius == 0.5      # plugin default
    assert resolved.stages.fit.background.color == [1.0, 1.0, 1.0]


def test_resolved_config_reloads_to_the_same_thing(tmp_path):
    cfg, resolved = load("image=x.png", "stages.fit.steps=9")
    saved = yaml.safe_load(config.to_yaml(resolved))
    cfg2, resolved2 = config.load(None, [], base=saved)
    assert config.to_yaml(resolved2) == config.to_yaml(resolved)
    assert cfg2.stages["fit"].steps == 9


def test_schedules_parse_from_cli():
    cfg, _ = load("stages.fit.losses.rgb=[0, 1.0, 0.5, 10]")
    assert cfg.stages["fit"].loss_weights["rgb"](5) == pytest.approx(0.75)


@pytest.mark.parametrize("item, words", [
    ("stages.fit.stepz=3", ["stages.fit.stepz", "did you mean 'steps'"]),
    ("output.render_evry=3", ["output.render_evry", "did you mean 'render_every'"]),
    ("stages.fit.representation.resolutoin=8",
     ["stages.fit.representation.resolutoin", "did you mean 'resolution'"]),
    ("stages.fit.steps=abc", ["stages.fit.steps", "Integer"]),
    ("stages.fit.steps=-1", ["stages.fit.steps", ">= 1"]),
    ("stages.fit.resolution=0", ["stages.fit.resolution", ">= 8"]),
    ("stages.fit.representation.resolution=0", ["stages.fit.representation.resolution", ">= 2"]),
    ("system.device=tpu", ["system.device", "tpu"]),
    ("stages.fitt.steps=3", ["no stage 'fitt'", "did you mean 'fit'"]),
    ("stages.fit.representation.type=voxle-grid", ["voxle-grid", "did you mean 'voxel-grid'"]),
    ("stages.fit.losses.rbg=1", ["stages.fit.losses.rbg", "did you mean 'rgb'"]),
    ("stages.fit.optimizer.type=sgd", ["stages.fit.optimizer.type", "adam"]),
    ("stages.fit.background.color=[2, 0, 0]", ["stages.fit.background.color", "[0, 1]"]),
    ("stages.fit.init_from=nerf", ["init_from", "not an earlier stage"]),
    ("justakey", ["not key=value"]),
    ("stages.fit.optimizer.lr.colour=0.1", ["stages.fit.optimizer.lr.colour", "did you mean 'color'"]),
    ("stages.fit.optimizer.lr.color=-1", ["stages.fit.optimizer.lr.color", ">= 0"]),
])
def test_user_errors_name_the_key(item, words):
    with pytest.raises(ConfigError) as e:
        load(item)
    msg = str(e.value)
    assert "\n" not in msg
    for w in words:
        assert w in msg, msg


def test_unknown_recipe_suggests():
    with pytest.raises(ConfigError, match="did you mean 'fit-image'"):
        config.load("fit-imag", [])


def test_recipe_by_path_and_bad_yaml(tmp_path):
    good = tmp_path / "mine.yaml"
    good.write_text((config.RECIPES_DIR / "fit-image.yaml").read_text())
    cfg, _ = config.load(str(good), [])
    assert cfg.recipe == "mine"
    bad = tmp_path / "bad.yaml"
    bad.write_text("stages: {fit: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        config.load(str(bad), [])
    with pytest.raises(ConfigError, match="recipe file not found"):
        config.load(str(tmp_path / "nope.yaml"), [])


def test_missing_required_input():
    cfg, _ = load()
    with pytest.raises(ConfigError, match="needs an input image: add image="):
        config.check_inputs(cfg)
