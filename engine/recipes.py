"""Recipe composition: ``extends`` a parent recipe, ``include`` config fragments, and the
record of which file set each key (shown by ``--dry-run``).

A recipe may start with::

    extends: isotropic3d-toy          # a recipe name, or a path (relative to this file)
    include: [fragments/fast.yaml]    # fragments: plain YAML mappings, merged in order

Order, lowest first: the parent chain (each parent resolved the same way), the included
fragments, then the recipe's own keys. Mappings merge key by key; lists and scalars replace.
A stage component whose ``type`` changes (say the parent's ``representation: {type: nerf,
...}`` becomes ``{type: dmtet}``) is replaced, not merged, since the old settings belong to
another plugin. Cycles and missing parents are errors naming the chain.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

from engine.errors import ConfigError

COMPONENT_FIELDS = ("representation", "guidance", "background", "cameras")


@dataclass
class Source:
    """One layer of a composed config: where it comes from and its raw mapping."""

    label: str
    data: dict


def label_of(path: Optional[Path], fallback: str) -> str:
    if path is None:
        return fallback
    from engine.config import PROJECT_ROOT

    try:
        return str(path.resolve().relative_to(PROJECT_ROOT))
    except ValueError:
        return str(path)


def _is_path(ref: str) -> bool:
    return ref.endswith((".yaml", ".yml")) or "/" in ref or ref.startswith(".")


def _relative(ref: str, base: Optional[Path]) -> str:
    """A path reference is read relative to the file that makes it."""
    p = Path(ref)
    if base is not None and not p.is_absolute():
        candidate = base.parent / p
        if candidate.exists():
            return str(candidate)
    return ref


def recipe_chain(ref: str, _stack: Tuple[str, ...] = (), _from: Optional[Path] = None
                 ) -> Tuple[str, List[Source]]:
    """The recipe ``ref`` and its ancestors as layers, parent first; returns (name, layers)."""
    from engine.config import load_recipe, read_yaml

    if _is_path(ref):
        ref = _relative(ref, _from)
    name, data, path = load_recipe(ref)
    label = label_of(path, f"recipe '{name}'")
    key = str(path.resolve()) if path is not None else f"recipe:{name}"
    if key in _stack:
        chain = " -> ".join(label_of(Path(k), k) if not k.startswith("recipe:") else k[7:]
                            for k in _stack + (key,))
        raise ConfigError(f"recipe cycle: {chain}; remove one of the extends")
    data = dict(data)
    parent = data.pop("extends", None)
    includes = data.pop("include", None) or []
    if isinstance(includes, str):
        includes = [includes]
    layers: List[Source] = []
    if parent is not None:
        if not isinstance(parent, str) or not parent:
            raise ConfigError(f"{label}: extends must be one recipe name or path, got {parent!r}")
        try:
            _, layers = recipe_chain(parent, _stack + (key,), path)
        except ConfigError as exc:
            if str(exc).startswith("recipe cycle"):
                raise
            raise ConfigError(f"{label}: extends '{parent}': {exc}") from None
    for inc in includes:
        fragment = _fragment_path(str(inc), path, label)
        frag = read_yaml(fragment, "fragment")
        if "extends" in frag or "include" in frag:
            raise ConfigError(f"{label_of(fragment, str(inc))}: a fragment cannot extend or "
                              "include; make it a recipe")
        layers.append(Source(label_of(fragment, str(inc)), frag))
    layers.append(Source(label, data))
    return name, layers


def _fragment_path(ref: str, base: Optional[Path], label: str) -> Path:
    from engine.config import CONFIGS_DIR

    for candidate in ([base.parent / ref] if base is not None else []) + [
            Path(ref), CONFIGS_DIR / ref, CONFIGS_DIR / f"{ref}.yaml"]:
        if candidate.is_file():
            return candidate
    raise ConfigError(f"{label}: include '{ref}' not found (looked beside the recipe and in "
                      "configs/)")


def drop_replaced_components(current: Dict[str, Any], incoming: Dict[str, Any]) -> None:
    """Before merging ``incoming`` stages over ``current`` ones (plain dicts, in place): a
    component whose type changes starts from scratch."""
    for sname, stage in (incoming.get("stages") or {}).items():
        old = (current.get("stages") or {}).get(sname)
        if not isinstance(stage, dict) or not isinstance(old, dict):
            continue
        for field in COMPONENT_FIELDS:
            new, prev = stage.get(field), old.get(field)
            if isinstance(new, dict) and isinstance(prev, dict) and "type" in new \
                    and new["type"] != prev.get("type"):
                old[field] = {}


def flatten(data: Any, prefix: str = "") -> Dict[str, Any]:
    """Leaf keys of nested mappings as dotted paths (lists are leaves)."""
    if not isinstance(data, dict):
        return {prefix.rstrip("."): data} if prefix else {}
    out: Dict[str, Any] = {}
    for k, v in data.items():
        if isinstance(v, dict) and v:
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def format_sources(provenance: Dict[str, str], resolved: Dict[str, Any]) -> str:
    """``# key = value  <- where it was set`` lines for every leaf of the resolved config."""
    lines = []
    flat = flatten(resolved)
    width = min(60, max((len(k) for k in flat), default=0))
    for key, value in flat.items():
        lines.append(f"# {key:<{width}} = {value!r:<24} <- {provenance.get(key, '?')}")
    return "\n".join(lines)
