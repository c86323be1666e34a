"""Where the shipped data lives: recipes, configs and the toy models.

An installed distribution carries them as package data of this package
(``engine/resources/{recipes,configs,toy_models}``, mapped from the checkout's top-level
``recipes/``, ``configs/`` and ``models/toy/`` by pyproject.toml); a source checkout (editable
install, or the repository on ``sys.path``) has them at its root. :func:`resource_dir` looks in
that order, so ``pip install .`` works from any directory and a checkout uses its own files.
"""

from __future__ import annotations

from pathlib import Path
from typing import Dict

HERE = Path(__file__).resolve().parent
#: the checkout's root when running from a source tree (engine/ sits directly under it)
CHECKOUT_ROOT = HERE.parent.parent

#: resource name -> its folder in a source checkout (relative to the root)
CHECKOUT_LAYOUT: Dict[str, str] = {
    "recipes": "recipes",
    "configs": "configs",
    "toy_models": "models/toy",
}


def resource_dir(name: str) -> Path:
    """The folder of resource ``name`` (``recipes``, ``configs`` or ``toy_models``): the
    installed package data when present, else the source checkout's folder."""
    if name not in CHECKOUT_LAYOUT:
        raise KeyError(f"unknown resource '{name}'; known: {', '.join(CHECKOUT_LAYOUT)}")
    installed = HERE / name
    if installed.is_dir():
        return installed
    return CHECKOUT_ROOT / CHECKOUT_LAYOUT[name]


def toy_model_path(path: Path) -> Path:
    """A relative ``models/toy/...`` path as the shipped toy model it names: recipes say
    ``model: models/toy/stage2``, which must resolve from any directory once installed.
    Other paths are returned unchanged."""
    parts = Path(path).parts
    if len(parts) >= 2 and parts[0] == "models" and parts[1] == "toy":
        return resource_dir("toy_models").joinpath(*parts[2:])
    return Path(path)
