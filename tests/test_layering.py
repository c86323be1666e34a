"""The layering of docs/design.md, enforced on every import (those inside functions too).

Four kinds of code, told apart by where they live:

* core: the modules directly in ``engine/`` (and ``engine/resources``);
* libraries: ``representations/lib/``, ``guidance/multiview/``, ``guidance/pointcloud/``,
  ``guidance/compress3d/``, ``engine/datasets/mvdataset.py``;
* plugins: the modules directly in ``representations/`` and ``guidance/`` (registered classes);
* tools: ``engine/evaluate/``, ``engine/datasets/toy_world.py``, ``guidance/training/``,
  ``benchmarks/``.

Rules: the core imports the core and libraries; libraries import the core and libraries;
plugins import the core and libraries (never another plugin, never a tool); tools import
anything. Nobody imports a private (``_name``) module or name from another package.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path
from typing import Iterator, List, Optional, Tuple

import pytest

ROOT = Path(__file__).resolve().parent.parent
SOURCE_PACKAGES = ("engine", "representations", "guidance")
MAX_LINES = 650

ALLOWED = {
    "core": {"core", "library"},
    "library": {"core", "library"},
    "plugin": {"core", "library"},
    "tool": {"core", "library", "plugin", "tool"},
}


def kind_of(module: str) -> Optional[str]:
    """core | library | plugin | tool for a module of this project; None for anything else
    (the standard library, third-party packages, package ``__init__`` docs)."""
    parts = module.split(".")
    top = parts[0]
    if top == "benchmarks":
        return "tool"
    if top == "engine":
        if len(parts) == 1 or parts[1] == "resources":
            return "core"
        if parts[1] == "evaluate":
            return "tool"
        if parts[1] == "datasets":
            return "tool" if parts[2:3] == ["toy_world"] else "library"
        return "core"
    if top in ("representations", "guidance"):
        if len(parts) == 1:
            return None
        if parts[1] in ("lib", "multiview", "pointcloud", "compress3d"):
            return "library"
        if parts[1] == "training":
            return "tool"
        return "plugin"
    return None


def package_of(module: str, is_package: bool) -> str:
    return module if is_package else module.rsplit(".", 1)[0]


def module_name(path: Path) -> Tuple[str, bool]:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    is_package = parts[-1] == "__init__"
    if is_package:
        parts = parts[:-1]
    return ".".join(parts), is_package


def imports(source: str, module: str, is_package: bool) -> Iterator[Tuple[int, str, Optional[str]]]:
    """(line, imported module, imported name or None) for every import statement."""
    package = package_of(module, is_package)
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name, None
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            for alias in node.names:
                # "from pkg import mod" imports a module when pkg.mod is one of ours
                candidate = f"{base}.{alias.name}"
                if _is_project_module(candidate):
                    yield node.lineno, candidate, None
                else:
                    yield node.lineno, base, alias.name


def _is_project_module(module: str) -> bool:
    path = ROOT.joinpath(*module.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def violations_in(source: str, module: str, is_package: bool = False) -> List[str]:
    """The layering rules broken by one module's source (empty when it keeps them)."""
    found = []
    own_kind = kind_of(module)
    own_package = package_of(module, is_package)
    for line, target, name in imports(source, module, is_package):
        target_kind = kind_of(target)
        where = f"{module}:{line}"
        if own_kind and target_kind and target_kind not in ALLOWED[own_kind]:
            found.append(f"{where}: a {own_kind} module imports the {target_kind} {target}")
        if target_kind is None and target.split(".")[0] not in SOURCE_PACKAGES:
            continue
        other_package = target.rsplit(".", 1)[0] != own_package and target != own_package
        private_module = any(p.startswith("_") and not p.startswith("__")
                             for p in target.split(".")[1:])
        if other_package and private_module:
            found.append(f"{where}: imports the private module {target}")
        if name and name.startswith("_") and not name.startswith("__") and \
                target != own_package and target.rsplit(".", 1)[0] != own_package:
            found.append(f"{where}: imports the private name {target}.{name}")
    return found


def source_files() -> List[Path]:
    files = []
    for top in SOURCE_PACKAGES + ("benchmarks",):
        files += sorted((ROOT / top).rglob("*.py"))
    return [f for f in files if "resources" not in f.relative_to(ROOT).parts[1:2]
            or f.name == "__init__.py"]


def test_every_import_keeps_the_layering():
    problems = []
    for path in source_files():
        module, is_package = module_name(path)
        problems += violations_in(path.read_text(), module, is_package)
    problems = list(dict.fromkeys(problems))      # one line per import statement
    assert not problems, "layering broken:\n" + "\n".join(problems)


def test_every_module_has_a_kind():
    for path in source_files():
        module, is_package = module_name(path)
        if is_package and module in SOURCE_PACKAGES[1:]:
            continue
        assert kind_of(module) is not None, module


@pytest.mark.parametrize("module,source,expected", [
    ("engine.trainer", "def f():\n    from representations.nerf import NeRF\n",
     "a core module imports the plugin representations.nerf"),
    ("engine.config", "import guidance.training.loop\n",
     "a core module imports the tool guidance.training.loop"),
    ("representations.dmtet", "from representations.nerf import ColorField\n",
     "a plugin module imports the plugin representations.nerf"),
    ("guidance.multiview.prior", "from guidance.multiview_sds import MultiViewSDS\n",
     "a library module imports the plugin"),
    ("guidance.training.loop", "from guidance.conditioners import _folder_weights\n",
     "imports the private name guidance.conditioners._folder_weights"),
    ("guidance.multiview.sample", "from engine.run import _resolve_device\n",
     "imports the private name engine.run._resolve_device"),
])
def test_the_checker_catches_each_kind_of_violation(module, source, expected):
    found = violations_in(source, module)
    assert any(expected in v for v in found), found


@pytest.mark.parametrize("module,source", [
    ("guidance.training.loop", "from guidance.conditioners import conditioner_for\n"),
    ("representations.dmtet", "from representations.lib.fields import ColorField\n"),
    ("engine.export", "def f():\n    from representations.lib.mesh import clean_mesh\n"),
    ("guidance.multiview.model", "from guidance.multiview.unet import _private_helper\n"),
])
def test_the_checker_allows_what_the_rules_allow(module, source):
    assert violations_in(source, module) == []


def test_in_tree_plugins_live_where_plugins_live():
    if sys.version_info < (3, 11):
        pytest.skip("tomllib")
    import tomllib

    eps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["entry-points"]
    for group, table in eps.items():
        for name, target in table.items():
            module = target.split(":")[0]
            assert kind_of(module) in ("plugin", "core"), (group, name, module)


def test_no_source_module_is_too_long():
    long = [f"{p.relative_to(ROOT)}: {n}" for p in source_files()
            if (n := len(p.read_text().splitlines())) > MAX_LINES]
    assert not long, f"modules over {MAX_LINES} lines: {long}"
