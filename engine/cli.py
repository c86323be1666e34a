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
None, ``lr=1e-4`` a float) and then checked against the key's type; a ``str`` key keeps the
text as typed (``out=007`` is ``"007"``), except that an empty value or ``null`` is None.
An empty value is refused where the key has a default other than None (``count=``), unless
its type is None (any YAML value).
``choices`` limit a key's values (every element, for a list); ``maximum`` bounds a number
that sizes an allocation (one line naming the key, the value and the limit). ``positional`` names items
given without a key, in order, all of them required (``python -m engine.evaluate PRED REF``;
a positional that contains ``=`` is taken as one when it looks like a path, ``out/a=b.obj``).
``repeat=True`` keys collect every occurrence into a list (``recipe=a recipe=b``); any other
key given twice is an error. With ``passthrough=True``, items whose key is not declared are
kept, in order, in ``args.rest`` for the caller (dot-list config overrides) instead of being
refused. ``--flags`` are only those declared (``args.flags``) and take no value.
``--help`` / ``-h`` anywhere prints the usage and exits with code 0 (``SystemExit``, which
:func:`~engine.errors.run_cli` lets through, so every command's ``main(["--help"])`` exits
0; :meth:`Command.wants_help` tells whether ``argv`` asks for it).
"""

from __future__ import annotations

import difflib
import re
import sys
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence

import yaml

from engine.errors import ConfigError, did_you_mean

HELP = ("-h", "--help")
_RESERVED = {"values", "flags", "rest", "as_dict"}          # Args' own attributes
_FLOAT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")  # 1e-4: a string to YAML 1.1
_NUMBER = re.compile(r"-\d|-\.\d")                          # "-1": a value, not an option


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
    maximum: Optional[float] = None      # a size that allocates: refused above this


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
    """A command-line value read as YAML (``20`` -> 20, ``[1, 2]`` -> list, ``1e-4`` -> float,
    empty -> None); text that is not valid YAML stays a string."""
    if text == "":
        return None
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        return text
    if isinstance(value, str) and _FLOAT.fullmatch(value.strip()):
        return float(value)
    return value


def _show(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return "null" if value is None else str(value)


def coerce(name: str, value: Any, kind: Any) -> Any:
    """``value`` as ``kind``, or a ConfigError naming the key, the value and the type."""
    if kind is None or value is None:
        return value
    if kind is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in ("true", "false"):
            return value.strip().lower() == "true"
        raise ConfigError(f"{name}: expected true or false, got '{_show(value)}'")
    if kind is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, str):
            try:
                return int(value.strip())
            except ValueError:
                pass
        raise ConfigError(f"{name}: expected an integer, got '{_show(value)}'")
    if kind is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value.strip())
            except ValueError:
                pass
        raise ConfigError(f"{name}: expected a number, got '{_show(value)}'")
    if kind is list:
        if isinstance(value, list):
            return value
        raise ConfigError(f"{name}: expected a list such as [1, 2], got '{_show(value)}'")
    if kind is str:
        return value if isinstance(value, str) else str(value)
    try:
        return kind(value)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{name}: '{_show(value)}' is not a valid "
                          f"{getattr(kind, '__name__', kind)} ({exc})") from None


def _value(key: Key, text: str) -> Any:
    if key.type is str:     # the text as typed: out=007 stays "007", name=yes stays "yes"
        return None if text in ("", "null") else text
    return coerce(key.name, yaml_value(text), key.type)


class Command:
    """A command's keys, flags and positionals, and its usage text (``--help``)."""

    def __init__(self, prog: str, usage: str, keys: Sequence[Key] = (), *,
                 flags: Sequence[str] = (), positional: Sequence[str] = (),
                 passthrough: bool = False):
        self.prog, self.usage = prog, (usage or "").strip("\n")
        self.keys = {k.name: k for k in keys}
        clash = (set(self.keys) & _RESERVED) | (set(self.keys) & set(positional))
        if clash or len(self.keys) != len(keys):
            raise ValueError(f"{prog}: key names clash or repeat: "
                             f"{sorted(clash) or [k.name for k in keys]}")
        self.flags = set(flags) | {"--help"}
        self.positional = list(positional)
        self.passthrough = passthrough

    @staticmethod
    def wants_help(argv: Sequence[str]) -> bool:
        """Whether ``argv`` asks for the usage (``--help`` or ``-h`` anywhere)."""
        return any(item in HELP for item in argv)

    def print_help(self, file=None) -> None:
        print(self.usage or f"usage: {self.prog} key=value ...", file=file or sys.stdout)

    def misspelt(self, rest: Sequence[str]) -> str:
        """A hint for a passthrough command's error, ``"; 'recipie' is not a key of PROG
        (did you mean 'recipe'?)"``, when an item of ``rest`` without a dot is close to a
        declared key, else ``""``. The caller adds it to the error the overrides caused (only
        the config knows whether they are right)."""
        for item in rest:
            name = item.split("=", 1)[0].strip()
            hint = did_you_mean(name, self.keys) if "." not in name else ""
            if hint:
                return f"; '{name}' is not a key of {self.prog}{hint}"
        return ""

    def _refuse_option(self, item: str) -> None:
        flag = item.split("=", 1)[0]
        if flag in self.flags:
            raise ConfigError(f"{flag} takes no value; options are key=value items, "
                              "e.g. seed=3 (see --help)")
        bare = flag.lstrip("-").replace("-", "_")
        key = self.keys.get(bare)
        negated = self.keys.get(bare[3:]) if bare.startswith("no_") else None
        if key is not None:
            write = f"{bare}=true" if key.type is bool else f"{bare}=VALUE"
        elif negated is not None and negated.type is bool:
            write = f"{negated.name}=false"
        else:
            known = sorted(self.flags - {"--help"})
            # compared without their dashes, which make any two options look alike
            names = {k.lstrip("-").replace("-", "_"): k for k in known}
            close = difflib.get_close_matches(bare, names, n=1, cutoff=0.6)
            hint = f" (did you mean '{names[close[0]]}'?)" if close else ""
            raise ConfigError(f"unknown option {flag}{hint}; "
                              f"{self.prog} takes key=value items (e.g. seed=3)"
                              + (f" and the options {', '.join(known)}" if known else "")
                              + " (see --help)")
        raise ConfigError(f"unknown option {flag}: {self.prog} takes key=value items; "
                          f"write {write} (see --help)")

    def parse(self, argv: Optional[Sequence[str]] = None) -> Args:
        """Parse ``argv`` (default ``sys.argv[1:]``). ``--help`` / ``-h`` prints the usage and
        exits with code 0; every mistake is a one-line ConfigError."""
        argv = list(sys.argv[1:] if argv is None else argv)
        if self.wants_help(argv):
            self.print_help()
            sys.exit(0)
        args = Args()
        found: Dict[str, Any] = {}
        positionals: List[str] = []
        for item in argv:
            if item.startswith("-") and len(item) > 1 and not _NUMBER.match(item):
                if item.startswith("--") and item in self.flags:
                    args.flags.add(item)
                    continue
                self._refuse_option(item)
            name, sep, text = item.partition("=")
            name = name.strip()
            pathlike = "/" in name or "\\" in name
            if not sep or not name or pathlike:
                if len(positionals) < len(self.positional):
                    positionals.append(item)
                    continue
                if self.positional and len(positionals) == len(self.positional):
                    raise ConfigError(f"'{item}': {self.prog} takes "
                                      f"{len(self.positional)} items without a key "
                                      f"({' '.join(p.upper() for p in self.positional)}), "
                                      "the rest are key=value (see --help)")
                raise ConfigError(f"'{item}' is not key=value (e.g. seed=3); see "
                                  f"{self.prog} --help")
            key = self.keys.get(name)
            if key is None:
                if self.passthrough:
                    args.rest.append(item)
                    continue
                raise ConfigError(f"unknown key '{name}'{did_you_mean(name, self.keys)}; "
                                  f"{self.prog} knows: {', '.join(self.keys) or 'none'}")
            value = _value(key, text)
            if value is None and key.default is not None and key.type is not None:
                raise ConfigError(f"{name}= needs a value (default {_show(key.default)}; "
                                  f"see {self.prog} --help)")
            if key.choices is not None:
                for v in (value if isinstance(value, list) else [value]):
                    if v not in key.choices:
                        raise ConfigError(f"{name}: '{_show(v)}' is not one of "
                                          f"{', '.join(map(str, key.choices))}"
                                          f"{did_you_mean(_show(v), map(str, key.choices))}")
            if key.maximum is not None and isinstance(value, (int, float)) \
                    and not isinstance(value, bool) and value > key.maximum:
                raise ConfigError(f"{name}={_show(value)} is above the limit "
                                  f"{_show(key.maximum)}; lower it")
            if key.repeat:
                if value is None:
                    raise ConfigError(f"{name}= needs a value (see {self.prog} --help)")
                found.setdefault(name, []).append(value)
            elif name in found:
                raise ConfigError(f"{name} is given twice ({name}={_show(found[name])} and "
                                  f"{name}={_show(value)}); give it once")
            else:
                found[name] = value
        if len(positionals) < len(self.positional):
            missing = " ".join(p.upper() for p in self.positional[len(positionals):])
            raise ConfigError(f"missing {missing}: usage {self.prog} "
                              f"{' '.join(p.upper() for p in self.positional)} [key=value ...] "
                              "(see --help)")
        for key in self.keys.values():
            given = found.get(key.name)
            if key.required and given in (None, []):
                raise ConfigError(f"{key.name}= is required: {key.help or key.name} "
                                  f"(see {self.prog} --help)")
            if key.name not in found:
                found[key.name] = list(key.default or []) if key.repeat else key.default
        found.update(zip(self.positional, positionals))
        args.values = found
        return args
