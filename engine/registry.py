"""Per-kind plugin registries, filled in-tree by a decorator and by third parties through
Python entry points.

Every plugin, in-tree or third-party, is found the same way: an entry point in the group of
its kind, the entry-point name being the registry key (this project's own are in its
pyproject.toml, so an editable checkout needs ``pip install -e .`` again after adding one).
``@register(kind, name)`` on the class records the same name when its module is imported (and
lets tests and notebooks register classes that no package declares)::

    [project.entry-points."engine.guidance"]
    my-sds = "my_package.guidance:MySDS"

Entry points are read (names only) when first needed and each is imported only when its name
is looked up, or when everything is listed. A name registered twice by two different objects
is an error that names both origins.
"""

from __future__ import annotations


import importlib.metadata as importlib_metadata
import threading
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Tuple

from engine.errors import RegistryError, did_you_mean

#: plugin kind -> entry-point group
KINDS: Dict[str, str] = {
    "representation": "engine.representations",
    "guidance": "engine.guidance",
    "conditioner": "engine.conditioners",
    "background": "engine.backgrounds",
    "cameras": "engine.cameras",
}
RECIPE_GROUP = "engine.recipes"

#: distribution name of this project; its entry points are shown as in-tree
OWN_DISTRIBUTION = "distill-engine"
#: top-level packages of this distribution (origins of decorator-registered classes)
OWN_PACKAGES = ("engine", "representations", "guidance")


@dataclass
class Entry:
    """One registered plugin. ``obj`` is None until an entry point is loaded."""

    kind: str
    name: str
    origin: str
    obj: Any = None
    entry_point: Any = None
    extra: Dict[str, Any] = field(default_factory=dict)

    def load(self) -> Any:
        if self.obj is None:
            try:
                self.obj = self.entry_point.load()
            except Exception as exc:  # a broken plugin must not look like our bug
                raise RegistryError(
                    f"{self.kind} '{self.name}' from {self.origin} failed to import "
                    f"({type(exc).__name__}: {exc}); fix or uninstall that package"
                ) from exc
        return self.obj

    @property
    def description(self) -> str:
        obj = self.load()
        text = getattr(obj, "description", None) or (obj.__doc__ or "")
        if not isinstance(text, str):
            return ""
        paragraph = text.strip().split("\n\n")[0]  # the docstring's first paragraph
        return " ".join(line.strip() for line in paragraph.splitlines())


def _object_origin(obj: Any) -> str:
    module = getattr(obj, "__module__", "?")
    qualname = getattr(obj, "__qualname__", getattr(obj, "__name__", "?"))
    return f"{module}:{qualname}"


def _own_entry_points(group: str) -> List[Any]:
    """This distribution's own entry points of ``group`` (the in-tree plugins)."""
    try:
        dist = importlib_metadata.distribution(OWN_DISTRIBUTION)
    except importlib_metadata.PackageNotFoundError:
        raise RegistryError(f"{OWN_DISTRIBUTION} is not installed, so its own plugins cannot be "
                            "found (they are entry points); run pip install -e . in the "
                            "checkout") from None
    return [ep for ep in dist.entry_points if ep.group == group]


def _entry_points(group: str) -> List[Any]:
    """Other installed packages' entry points of ``group`` (patched in tests to mock the
    table)."""
    return [ep for ep in importlib_metadata.entry_points(group=group)
            if getattr(getattr(ep, "dist", None), "name", None) != OWN_DISTRIBUTION]


def _dist_label(ep: Any) -> str:
    dist = getattr(ep, "dist", None)
    if dist is None:
        return f"entry point {ep.value}"
    name = dist.metadata["Name"] if hasattr(dist, "metadata") else getattr(dist, "name", "?")
    if name == OWN_DISTRIBUTION:
        return f"in-tree ({ep.value})"
    return f"{name} {dist.version} ({ep.value})"


class Registry:
    """All plugin tables. Use the module-level :data:`REGISTRY` and helpers."""

    def __init__(self) -> None:
        self._tables: Dict[str, Dict[str, Entry]] = {k: {} for k in KINDS}
        self._entry_points_scanned = False
        self._absorbed = 0
        self._lock = threading.RLock()

    # -- registration -------------------------------------------------------------------
    def add(self, kind: str, name: str, obj: Any, origin: Optional[str] = None) -> None:
        if kind not in self._tables:
            raise RegistryError(f"unknown plugin kind '{kind}'{did_you_mean(kind, KINDS)}")
        if origin is None:
            top = getattr(obj, "__module__", "").split(".")[0]
            in_tree = top in OWN_PACKAGES
            origin = f"in-tree ({_object_origin(obj)})" if in_tree else _object_origin(obj)
        table = self._tables[kind]
        old = table.get(name)
        if old is not None:
            if old.obj is None and old.entry_point is not None:
                # An entry point whose module registers itself through the decorator.
                if old.entry_point.value.split(":")[0] == getattr(obj, "__module__", None):
                    old.obj = obj
                    return
            elif old.obj is obj or _object_origin(old.obj) == _object_origin(obj):
                return  # the same object seen again (module re-import)
            raise RegistryError(
                f"{kind} '{name}' is registered twice: by {old.origin} and by {origin}; "
                "rename one of them"
            )
        table[name] = Entry(kind, name, origin, obj=obj)

    # -- discovery ----------------------------------------------------------------------
    def _ensure_loaded(self) -> None:
        with self._lock:
            self._absorb_declared()
            if not self._entry_points_scanned:
                self._entry_points_scanned = True
                for kind, group in KINDS.items():
                    for ep in _own_entry_points(group) + _entry_points(group):
                        self._add_entry_point(kind, ep)

    def _absorb_declared(self) -> None:
        """Take in what ``@register`` declared since the last look (imports add more)."""
        while self._absorbed < len(_DECLARED):
            kind, name, obj = _DECLARED[self._absorbed]
            self._absorbed += 1
            self.add(kind, name, obj)

    def _add_entry_point(self, kind: str, ep: Any) -> None:
        table = self._tables[kind]
        origin = _dist_label(ep)
        old = table.get(ep.name)
        if old is not None:
            same_target = old.obj is not None and _object_origin(old.obj).replace(
                ":", "."
            ) == ep.value.replace(":", ".")
            if same_target:
                return  # our own in-tree plugin also listed as an entry point
            raise RegistryError(
                f"{kind} '{ep.name}' is registered twice: by {old.origin} and by {origin}; "
                "rename one of them or uninstall one package"
            )
        table[ep.name] = Entry(kind, ep.name, origin, entry_point=ep)

    # -- lookup -------------------------------------------------------------------------
    def get(self, kind: str, name: str) -> Any:
        """The plugin object registered as ``name`` for ``kind`` (imported on first use)."""
        self._ensure_loaded()
        if kind not in self._tables:
            raise RegistryError(f"unknown plugin kind '{kind}'{did_you_mean(kind, KINDS)}")
        table = self._tables[kind]
        if name not in table:
            self._absorb_declared()
        if name not in table:
            known = ", ".join(sorted(table)) or "none"
            raise RegistryError(
                f"no {kind} named '{name}'{did_you_mean(name, table)}; known: {known} "
                "(see python -m engine.run --list)"
            )
        obj = table[name].load()
        self._absorb_declared()  # a loaded plugin module may declare more plugins
        return obj

    def entries(self, kind: str) -> List[Entry]:
        self._ensure_loaded()
        return [self._tables[kind][n] for n in sorted(self._tables[kind])]

    def names(self, kind: str) -> List[str]:
        self._ensure_loaded()
        return sorted(self._tables[kind])


REGISTRY = Registry()

#: (kind, name, object) in the order ``@register`` saw them; registries read this list
_DECLARED: List[Tuple[str, str, Any]] = []


def register(kind: str, name: str) -> Callable[[Any], Any]:
    """Class decorator: ``@register("guidance", "multiview-sds")``."""
    if kind not in KINDS:
        raise RegistryError(f"unknown plugin kind '{kind}'{did_you_mean(kind, KINDS)}")

    def decorate(obj: Any) -> Any:
        _DECLARED.append((kind, name, obj))
        obj.registry_name = name
        return obj

    return decorate


def get(kind: str, name: str) -> Any:
    return REGISTRY.get(kind, name)


def recipe_entry_points() -> Dict[str, Entry]:
    """Recipes shipped by installed packages (group ``engine.recipes``), not yet loaded.

    The entry point's object is a path (str, Path or importlib Traversable) to a YAML file,
    a callable returning one, or a dict holding the recipe itself.
    """
    found: Dict[str, Entry] = {}
    for ep in _entry_points(RECIPE_GROUP):
        if ep.name in found:
            raise RegistryError(
                f"recipe '{ep.name}' is shipped twice: by {found[ep.name].origin} and by "
                f"{_dist_label(ep)}"
            )
        found[ep.name] = Entry("recipe", ep.name, _dist_label(ep), entry_point=ep)
    return found
