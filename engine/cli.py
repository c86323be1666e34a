"""The one command-line style of every command: ``key=value`` items, a few ``--flags``.

Every command (``engine.run``, ``engine.evaluate``, fine-tuning, the toy world and toy models,
conversion, sampling, the benchmarks) declares its keys once and parses ``argv`` with
:class:`Command`; mistakes are :class:`~engine.errors.ConfigError` (one line, exit code 2,
through :func:`engine.errors.run_cli`) with the same wording everywhere::

    cmd = Command("python -m engine.datasets.toy_world", __doc__, [
        Key("out", str, required=True, help="folder to write"),
        Key("count", int, 200, help="objects"),
    ])
    args = cmd.parse(["out=data/toy", "count=20"])      # args.out == "data/toy"

Values are read as YAML (``count=20`` is an int, ``scales=[1, 2]`` a list, ``name=`` is
None) and then checked against the key's type. ``positional`` names items given without a
key, in order (``python -m engine.evaluate PRED REF``). ``repeat=True`` keys collect every
occurrence into a list (``recipe=a recipe=b``). With ``passthrough=True``, items whose key is
not declared are kept in ``args.rest`` for the caller (dot-list config overrides) instead of
being refused.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence

import yaml

from engine.errors import ConfigError, did_you_mean

_MISSING = object()


@dataclass
class Key:
    """One ``name=value`` item: its type (``str``, ``int``, ``float``, ``bool``, ``list`` or
    ``None`` for any YAML value), default, whether required, whether it may repeat."""

    name: str
    type: Any = str
    default: Any = None
    help: str = ""
    required: bool = False
    repeat: bool = False
    choices: Optional[Sequence[Any]] = None


@dataclass
class Args:
    """Parsed items: declared keys as attributes, plus flags, positionals and the rest."""

    values: Dict[str, Any] = field(default_factory=dict)
    flags: set = field(default_factory=set)
    rest: List[str] = field(default_factory=list)

    def __getattr__(self, name: str) -> Any:
        values = self.__dict__.get("values", {})
        if name in values:
            return values[name]
        raise AttributeError(name)

    def __getitem__(self, name: str) -> Any:
        return self.values[name]

    def as_dict(self) -> Dict[str, Any]:
        return dict(self.values)


def yaml_value(text: str) -> Any:
    """A command-line value read as YAML (``20`` -> 20, ``[1, 2]`` -> list, empty -> None);
    text that is not valid YAML stays a string."""
    if text == "":
        return None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def coerce(name: str, value: Any, kind: Any) -> Any:
    """``value`` as ``kind``, or a ConfigError naming the key, the value and the type."""
    if kind is None or value is None:
        return value
    if kind is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{name}: expected true or false, got '{value}'")
    if kind is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{name}: expected an integer, got '{value}'")
    if kind is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise ConfigError(f"{name}: expected a number, got '{value}'")
    if kind is list:
        if isinstance(value, list):
            return value
        raise ConfigError(f"{name}: expected a list such as [1, 2], got '{value}'")
    if kind is str:
        return value if isinstance(value, str) else str(value)
    return kind(value)


class Command:
    """A command's keys, flags and positionals, and its usage text (``--help``)."""

    def __init__(self, prog: str, usage: str, keys: Sequence[Key] = (), *,
                 flags: Sequence[str] = (), positional: Sequence[str] = (),
                 passthrough: bool = False):
        self.prog, self.usage = prog, (usage or "").strip("\n")
        self.keys = {k.name: k for k in keys}
        self.flags = set(flags) | {"--help"}
        self.positional = list(positional)
        self.passthrough = passthrough

    def parse(self, argv: Sequence[str]) -> Args:
        """Parse ``argv``. ``--help`` / ``-h`` prints the usage and exits with code 0."""
        args = Args()
        found: Dict[str, Any] = {}
        positionals: List[str] = []
        for item in argv:
            if item in ("-h", "--help"):
                print(self.usage or f"usage: {self.prog} key=value ...")
                sys.exit(0)
            if item.startswith("--"):
                flag = item.split("=", 1)[0]
                if flag not in self.flags:
                    raise ConfigError(f"unknown option {flag}{did_you_mean(flag, self.flags)}; "
                                      f"{self.prog} takes key=value items (see --help)")
                if "=" in item:
                    raise ConfigError(f"{flag} takes no value; options are key=value items, "
                                      "e.g. seed=3 (see --help)")
                args.flags.add(flag)
                continue
            if "=" not in item or item.startswith("="):
                if len(positionals) < len(self.positional):
                    positionals.append(item)
                    continue
                raise ConfigError(f"'{item}' is not key=value (e.g. seed=3); see "
                                  f"{self.prog} --help")
            name, text = item.split("=", 1)
            name = name.strip()
            key = self.keys.get(name)
            if key is None:
                if self.passthrough:
                    args.rest.append(item)
                    continue
                raise ConfigError(f"unknown key '{name}'{did_you_mean(name, self.keys)}; "
                                  f"{self.prog} knows: {', '.join(self.keys) or 'none'}")
            value = coerce(name, yaml_value(text), key.type)
            if key.choices is not None and value not in key.choices:
                raise ConfigError(f"{name}: '{value}' is not one of "
                                  f"{', '.join(map(str, key.choices))}"
                                  f"{did_you_mean(str(value), map(str, key.choices))}")
            if key.repeat:
                found.setdefault(name, []).append(value)
            elif name in found:
                raise ConfigError(f"{name} is given twice; give it once")
            else:
                found[name] = value
        for name, text in zip(self.positional, positionals):
            found[name] = text
        for key in self.keys.values():
            if key.name not in found:
                if key.required:
                    raise ConfigError(f"{key.name}= is required: {key.help or key.name} "
                                      f"(see {self.prog} --help)")
                found[key.name] = list(key.default or []) if key.repeat else key.default
        missing = self.positional[len(positionals):]
        for name in missing:
            found.setdefault(name, None)
        args.values = found
        return args
