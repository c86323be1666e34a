"""Reading recipe YAML as untrusted input: recipes are shared, so a file or an override must
not be able to pin the CPU, exhaust memory or copy the environment into a run folder.

* Size: a recipe, fragment or saved config.yaml is read up to :data:`MAX_BYTES` (1 MiB, a
  hundred times the largest shipped recipe); longer is refused before it is parsed. The read
  itself is bounded, so ``recipe=/dev/zero`` is refused too.
* Encoding: UTF-8 only; anything else is one line naming the file and the byte offset.
* Aliases: YAML anchors and aliases (``&sds`` ... ``*sds``, used by the shipped recipes) are
  allowed, but a few hundred bytes of nested aliases expand to billions of values once the
  config is merged (each level multiplies). The node graph is composed first (PyYAML shares
  aliased nodes, so this is cheap) and the values the document expands to are counted, each
  shared node once per reference, without expanding anything; more than
  :data:`MAX_EXPANDED_NODES` is refused.
* Interpolations: ``${key}`` references to other settings are fine. A resolver call
  (``${oc.env:HOME}``, ``${env:...}``, ``${oc.decode:...}`` or any registered one) is refused
  in recipes and overrides: config.yaml stores every value resolved, so an environment read
  there would copy a secret of whoever runs a shared recipe into their run folder.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Dict

import yaml

from engine.errors import ConfigError

MAX_BYTES = 1 << 20
MAX_EXPANDED_NODES = 200_000

# "${name:" opens a resolver call; "${key}" or "${.key}" is a plain reference
_RESOLVER = re.compile(r"\$\{\s*([A-Za-z_][\w.\-]*)\s*:")


def read_text(path: Path, what: str = "recipe") -> str:
    """The file's text: at most MAX_BYTES, UTF-8. ConfigError (one line) otherwise."""
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_BYTES + 1)
    except FileNotFoundError:
        raise ConfigError(f"{what} file not found: {path}") from None
    except IsADirectoryError:
        raise ConfigError(f"{what} {path} is a folder, not a YAML file") from None
    except OSError as exc:
        raise ConfigError(f"{what} {path} cannot be read: {exc.strerror or exc}") from None
    if len(data) > MAX_BYTES:
        raise ConfigError(f"{what} {path} is larger than {MAX_BYTES // 2**20} MiB, the limit "
                          "for a recipe file")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{what} {path} is not UTF-8 text (byte 0x{data[exc.start]:02x} at "
                          f"offset {exc.start}); save it as UTF-8") from None


def expanded_size(node: yaml.Node, memo: Dict[int, int]) -> int:
    """How many values ``node`` stands for once every alias is expanded (shared nodes are
    counted once per reference, computed once each)."""
    key = id(node)
    if key in memo:
        return memo[key]
    memo[key] = 1            # a recursive alias (&a [*a]) counts once; PyYAML refuses it later
    if isinstance(node, yaml.SequenceNode):
        total = 1 + sum(expanded_size(n, memo) for n in node.value)
    elif isinstance(node, yaml.MappingNode):
        total = 1 + sum(expanded_size(k, memo) + expanded_size(v, memo) for k, v in node.value)
    else:
        total = 1
    memo[key] = min(total, 1 << 62)
    return memo[key]


def load_yaml(text: str, where: str) -> Any:
    """``yaml.safe_load`` with the alias-expansion bound; ``where`` names the source in the
    error. Raises yaml.YAMLError for malformed YAML (the caller words it)."""
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        size = expanded_size(node, {})
        if size > MAX_EXPANDED_NODES:
            raise ConfigError(f"{where}: its aliases expand to {size:,} values, more than the "
                              f"limit {MAX_EXPANDED_NODES:,}; write the settings out instead")
        return loader.construct_document(node)
    finally:
        loader.dispose()


def check_interpolations(data: Any, where: str, prefix: str = "") -> None:
    """Refuse resolver calls (``${oc.env:...}`` and the like) anywhere in ``data``, naming
    the key and where it came from."""
    if isinstance(data, dict):
        for k, v in data.items():
            check_interpolations(k, where, prefix)
            check_interpolations(v, where, f"{prefix}{k}.")
    elif isinstance(data, (list, tuple)):
        for i, v in enumerate(data):
            check_interpolations(v, where, f"{prefix}{i}.")
    elif isinstance(data, str):
        found = _RESOLVER.search(data)
        if found:
            name = found.group(1)
            key = prefix.rstrip(".") or "a key"
            reads = "reads the environment" if name in ("oc.env", "env") else \
                "calls a resolver"
            raise ConfigError(f"{key} ({where}): '${{{name}:...}}' {reads}; recipes and "
                              "overrides may only use ${other.key} references, write the "
                              "value itself")
