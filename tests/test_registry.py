"""The plugin registry: decorator, entry points (mocked table), duplicates, laziness."""

import sys
import types
from importlib.metadata import EntryPoint

import pytest

from engine import registry
from engine.errors import RegistryError


@pytest.fixture
def fresh(monkeypatch):
    """A registry with the in-tree plugins and a mocked entry-point table."""
    table = {}
    monkeypatch.setattr(registry, "_entry_points", lambda group: table.get(group, []))
    reg = registry.Registry()
    monkeypatch.setattr(registry, "REGISTRY", reg)
    return reg, table


@pytest.fixture
def fake_package(monkeypatch):
    """An importable module `fake_plugin_pkg` holding plugin classes, counting imports."""
    mod = types.ModuleType("fake_plugin_pkg")
    mod.imports = 0

    class MyGuidance:
        """A third-party guidance for tests."""

    class Other:
        """Another class."""

    MyGuidance.__module__ = Other.__module__ = "fake_plugin_pkg"
    mod.MyGuidance, mod.Other = MyGuidance, Other
    monkeypatch.setitem(sys.modules, "fake_plugin_pkg", mod)
    return mod


def ep(name, value, group):
    return EntryPoint(name=name, value=value, group=group)


def test_in_tree_plugins_are_found(fresh):
    reg, _ = fresh
    assert "voxel-grid" in reg.names("representation")
    assert "reference-view" in reg.names("guidance")
    entry = next(e for e in reg.entries("representation") if e.name == "voxel-grid")
    assert entry.origin.startswith("in-tree")
    assert entry.description.startswith("Dense density + colour grids")


def test_entry_point_plugin_loads_lazily(fresh, fake_package, monkeypatch):
    reg, table = fresh
    loaded = []
    point = ep("my-sds", "fake_plugin_pkg:MyGuidance", "engine.guidance")
    original = EntryPoint.load
    monkeypatch.setattr(EntryPoint, "load", lambda self: loaded.append(self.name) or original(self))
    table["engine.guidance"] = [point]
    assert "my-sds" in reg.names("guidance")
    assert loaded == []                         # listing names does not import the plugin
    assert reg.get("guidance", "my-sds") is fake_package.MyGuidance
    assert loaded == ["my-sds"]


def test_entry_point_clashing_with_in_tree_names_both(fresh, fake_package):
    reg, table = fresh
    table["engine.representations"] = [ep("voxel-grid", "fake_plugin_pkg:Other",
                                          "engine.representations")]
    with pytest.raises(RegistryError) as e:
        reg.names("representation")
    msg = str(e.value)
    assert "voxel-grid" in msg and "registered twice" in msg
    assert "representations.voxel_grid:VoxelGrid" in msg and "fake_plugin_pkg:Other" in msg


def test_decorator_duplicate_is_an_error(fresh, fake_package):
    reg, _ = fresh
    reg.add("guidance", "dup", fake_package.MyGuidance)
    reg.add("guidance", "dup", fake_package.MyGuidance)          # same object again: fine
    with pytest.raises(RegistryError, match="registered twice.*MyGuidance.*Other"):
        reg.add("guidance", "dup", fake_package.Other)


def test_unknown_name_and_kind(fresh):
    reg, _ = fresh
    with pytest.raises(RegistryError, match="did you mean 'voxel-grid'"):
        reg.get("representation", "voxelgrid")
    with pytest.raises(RegistryError, match="unknown plugin kind"):
        reg.get("renderer", "x")


def test_broken_entry_point_is_a_clear_error(fresh):
    reg, table = fresh
    table["engine.guidance"] = [ep("broken", "no_such_module_xyz:Thing", "engine.guidance")]
    with pytest.raises(RegistryError, match="failed to import.*ModuleNotFoundError"):
        reg.get("guidance", "broken")


def test_recipes_from_entry_points(fresh, tmp_path, monkeypatch):
    from engine import config

    recipe = tmp_path / "their.yaml"
    recipe.write_text((config.RECIPES_DIR / "fit-image.yaml").read_text())
    mod = types.ModuleType("fake_recipes_pkg")
    mod.RECIPE = str(recipe)
    monkeypatch.setitem(sys.modules, "fake_recipes_pkg", mod)
    _, table = fresh
    table[registry.RECIPE_GROUP] = [ep("their-recipe", "fake_recipes_pkg:RECIPE",
                                       registry.RECIPE_GROUP)]
    assert "their-recipe" in config.available_recipes()
    cfg, _ = config.load("their-recipe", [])
    assert cfg.recipe == "their-recipe" and "fit" in cfg.stages
