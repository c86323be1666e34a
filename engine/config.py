"""Recipes: lookup, merge with the defaults in configs/, CLI overrides, validation.

Precedence, lowest first: ``configs/defaults.yaml`` -> the recipe -> command-line
``key=value`` items in the order given (short aliases such as ``image=`` are rewritten to
their full key first, so an alias and its full key obey the same "last one wins" rule).

The run-level schema is the dataclasses below; each plugin's settings are validated against
its own ``Config`` dataclass. Every mistake raises :class:`engine.errors.ConfigError` with
the full key, e.g. ``stages.fit.optimizer.lr.gird: unknown key (did you mean 'grid'?)``.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import yaml
from omegaconf import MISSING, DictConfig, ListConfig, OmegaConf
from omegaconf import errors as oc_errors

from engine import registry
from engine.bounds import check_limits
from engine.errors import ConfigError, did_you_mean
from engine.export import ExportConfig
from engine.schedules import Schedule, parse_all

from engine.resources import CHECKOUT_ROOT, resource_dir

#: the source checkout's root (labels of in-tree recipe files; not used to find anything)
PROJECT_ROOT = CHECKOUT_ROOT
CONFIGS_DIR = resource_dir("configs")
RECIPES_DIR = resource_dir("recipes")

ALIASES: Dict[str, str] = {
    "image": "inputs.image",
    "prompt": "inputs.prompt",
    "out": "output.dir",
    "seed": "system.seed",
    "device": "system.device",
}

INPUT_KINDS = ("image", "prompt")


# -- run-level schema (defaults live in configs/defaults.yaml) ---------------------------

@dataclass
class InputsConfig:
    image: Optional[str] = MISSING
    prompt: Optional[str] = MISSING
    requires: List[str] = MISSING        # which inputs the recipe needs: image, prompt
    image_size: int = MISSING            # side of the square reference image after loading
    object_fraction: float = MISSING     # largest side of the object / side of the frame

    def __post_init__(self):
        for r in self.requires:
            if r not in INPUT_KINDS:
                raise ConfigError(f"requires: '{r}' is not one of {', '.join(INPUT_KINDS)}"
                                  f"{did_you_mean(r, INPUT_KINDS)}")
        if self.image_size < 32:
            raise ConfigError(f"image_size: must be >= 32, got {self.image_size}")
        if not 0.1 <= self.object_fraction <= 1.0:
            raise ConfigError(f"object_fraction: must be in [0.1, 1], got {self.object_fraction}")


@dataclass
class OutputConfig:
    root: str = MISSING                  # runs go to ROOT/RECIPE/NAME-TIMESTAMP
    dir: Optional[str] = MISSING         # exact folder instead (alias out=)
    name: Optional[str] = MISSING        # NAME above; default: image stem, prompt or recipe
    checkpoint_every: int = MISSING      # steps between checkpoints (0: only at stage ends)
    keep_checkpoints: int = MISSING      # periodic checkpoints kept; stage ends always kept
    render_every: int = MISSING          # steps between progress renders (0: never)
    render_views: int = MISSING
    render_size: int = MISSING
    progress: bool = MISSING             # show the progress bar
    tensorboard: bool = MISSING          # event files in RUN/tensorboard (engine/experiment_log.py)
    wandb: bool = MISSING                # also log to Weights & Biases (pip install wandb)
    wandb_project: str = MISSING         # the W&B project of output.wandb
    live_view: bool = False              # a live viser view while training (engine/live_view.py)
    live_view_port: int = 8080           # its port (0: any free one; a taken one: the next free)
    live_view_host: str = "127.0.0.1"    # its address (0.0.0.0: every interface)
    live_view_refresh: float = 1.0       # seconds between frames (and at most 4% of the time)
    live_view_size: int = 128            # frame height in pixels
    results_page: bool = True            # RUN/results.html after the export (engine/results_page.py)

    def __post_init__(self):
        from engine.experiment_log import wandb_installed, wandb_missing
        from engine.live_view import check_settings

        if self.wandb and not wandb_installed():
            raise wandb_missing(prefix="")
        check_settings(self)
        for k in ("checkpoint_every", "render_every"):
            if getattr(self, k) < 0:
                raise ConfigError(f"{k}: must be >= 0, got {getattr(self, k)}")
        for k in ("keep_checkpoints", "render_views"):
            if getattr(self, k) < 1:
                raise ConfigError(f"{k}: must be >= 1, got {getattr(self, k)}")
        if self.render_size < 8:
            raise ConfigError(f"render_size: must be >= 8, got {self.render_size}")


@dataclass
class SystemConfig:
    seed: int = MISSING
    device: str = MISSING                # auto | cpu | cuda | cuda:N
    max_nan_steps: int = MISSING         # consecutive non-finite steps before the run aborts
    deterministic: bool = MISSING        # torch.use_deterministic_algorithms
    threads: int = MISSING               # CPU threads for torch (0: torch's default)

    def __post_init__(self):
        if not (self.device in ("auto", "cpu", "cuda") or self.device.startswith("cuda:")
                or self.device == "mps"):
            raise ConfigError(f"device: expected auto, cpu, cuda or cuda:N, got '{self.device}'")
        if self.threads < 0:
            raise ConfigError(f"threads: must be >= 0, got {self.threads}")
        if self.max_nan_steps < 1:
            raise ConfigError(f"max_nan_steps: must be >= 1, got {self.max_nan_steps}")


@dataclass
class OptimizerConfig:
    type: str = MISSING                  # adam | adamw
    lr: Dict[str, Any] = MISSING         # group name (or 'default') -> schedule
    betas: List[float] = MISSING
    eps: float = MISSING
    weight_decay: float = MISSING

    def __post_init__(self):
        if self.type not in ("adam", "adamw"):
            raise ConfigError(f"type: '{self.type}' is not adam or adamw"
                              f"{did_you_mean(self.type, ('adam', 'adamw'))}")
        self.lr_schedules = parse_all(self.lr, "lr")
        for name, s in self.lr_schedules.items():
            s.check(f"lr.{name}", minimum=0.0)
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ConfigError(f"betas: expected two values in [0, 1), got {list(self.betas)}")


@dataclass
class StageConfig:
    steps: int = MISSING
    representation: Dict[str, Any] = MISSING   # {type: NAME, ...that plugin's settings}
    guidance: Dict[str, Any] = MISSING
    background: Dict[str, Any] = MISSING
    cameras: Dict[str, Any] = MISSING
    losses: Dict[str, Any] = MISSING           # loss name -> weight schedule
    optimizer: OptimizerConfig = MISSING
    resolution: Any = MISSING                  # render size, a schedule
    init_from: Optional[str] = MISSING         # previous stage whose representation seeds this

    def __post_init__(self):
        if self.steps < 1:
            raise ConfigError(f"steps: must be >= 1, got {self.steps}")
        self.loss_weights = parse_all(self.losses, "losses")
        self.resolution_schedule = Schedule.parse(self.resolution, "resolution").check(
            "resolution", minimum=8, integer=True)


@dataclass
class RunConfig:
    recipe: str = MISSING
    description: str = MISSING
    inputs: InputsConfig = MISSING
    output: OutputConfig = MISSING
    system: SystemConfig = MISSING
    stages: Dict[str, StageConfig] = MISSING
    export: Optional[ExportConfig] = MISSING   # null: no mesh / video at the end

    def __post_init__(self):
        if not self.stages:
            raise ConfigError("stages: the recipe defines no stage")
        # Filled by resolve(): stage -> component field -> (plugin class, validated Config).
        self.components: Dict[str, Dict[str, Tuple[type, Any]]] = {}


COMPONENT_KINDS = {"representation": "representation", "guidance": "guidance",
                   "background": "background", "cameras": "cameras"}


# -- reading YAML ------------------------------------------------------------------------

def read_yaml(path: Path, what: str = "recipe") -> dict:
    """A recipe, fragment or saved config as a mapping, read as untrusted input (size,
    encoding and alias-expansion limits: engine/recipe_files.py); mistakes are one line."""
    from engine.recipe_files import load_yaml, read_text

    text = read_text(Path(path), what)
    try:
        data = load_yaml(text, f"{what} {path}")
    except RecursionError:
        raise ConfigError(f"{what} {path} is nested too deeply to read") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise ConfigError(f"{what} {path} is not valid YAML{where}: "
                          f"{getattr(exc, 'problem', exc)}")
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{what} {path} must be a YAML mapping, got {type(data).__name__}")
    return data


def available_recipes() -> Dict[str, Tuple[str, Any]]:
    """Recipe name -> (origin, path or entry) for in-tree and plugin-shipped recipes."""
    found: Dict[str, Tuple[str, Any]] = {}
    if RECIPES_DIR.is_dir():
        for p in sorted(RECIPES_DIR.glob("*.yaml")):
            found[p.stem] = ("in-tree", p)
    for name, entry in registry.recipe_entry_points().items():
        if name in found:
            raise ConfigError(f"recipe '{name}' exists twice: in-tree ({found[name][1]}) and "
                              f"from {entry.origin}; rename one")
        found[name] = (entry.origin, entry)
    return found


def load_recipe(name_or_path: str, subfolder: Optional[str] = None,
                what: str = "recipe") -> Tuple[str, dict, Optional[Path]]:
    """Find a recipe by name or by path: the one recipe lookup of every command.

    A name is a run recipe (recipes/NAME.yaml, or shipped by a plugin) or, with ``subfolder``,
    a plain recipe of recipes/SUBFOLDER/ (``load_recipe("toy-clip", "finetune",
    "fine-tuning recipe")``). An unknown name is a one-line ConfigError naming the closest
    and the known ones (``what`` says which kind).

    Returns (name, raw mapping, file path or None for a recipe given as a mapping)."""
    p = Path(name_or_path)
    if p.suffix in (".yaml", ".yml") or p.exists():
        if not p.is_file():
            raise ConfigError(f"recipe file not found: {p}")
        return p.stem, read_yaml(p), p
    if subfolder is not None:
        folder = RECIPES_DIR / subfolder
        recipes = {q.stem: ("in-tree", q) for q in sorted(folder.glob("*.yaml"))} \
            if folder.is_dir() else {}
    else:
        recipes = available_recipes()
    if name_or_path not in recipes:
        raise ConfigError(
            f"no {what} named '{name_or_path}'{did_you_mean(name_or_path, recipes)}; "
            f"known: {', '.join(sorted(recipes)) or 'none'} (or give a path to a YAML file)")
    origin, where = recipes[name_or_path]
    if isinstance(where, Path):
        return name_or_path, read_yaml(where), where
    obj = where.load()
    if callable(obj):
        obj = obj()
    if isinstance(obj, dict):
        return name_or_path, obj, None
    return name_or_path, read_yaml(Path(str(obj))), Path(str(obj))


# -- command line items -------------------------------------------------------------------

def parse_overrides(items: List[str]) -> List[Tuple[str, Any]]:
    """``key=value`` items -> [(full_key, value)], aliases rewritten, values YAML-typed
    (with the recipe files' alias bound; resolver interpolations refused)."""
    from engine.recipe_files import check_interpolations, load_yaml

    out = []
    for item in items:
        if "=" not in item:
            raise ConfigError(f"'{item}' is not key=value (e.g. image=cat.png or "
                              "stages.nerf.steps=100); see --help")
        key, value = item.split("=", 1)
        key = ALIASES.get(key.strip(), key.strip())
        if not key:
            raise ConfigError(f"'{item}' has an empty key")
        try:
            parsed = load_yaml(value, f"override {key}") if value != "" else None
        except (yaml.YAMLError, RecursionError):
            parsed = value
        check_interpolations(parsed, "command line", f"{key}.")
        out.append((key, parsed))
    return out


def apply_overrides(cfg: DictConfig, overrides: List[Tuple[str, Any]]) -> None:
    known_stages = set(cfg.get("stages") or {})
    for key, value in overrides:
        parts = key.split(".")
        if parts[0] == "stages" and len(parts) > 1 and parts[1] not in known_stages:
            raise ConfigError(f"{key}: the recipe has no stage '{parts[1]}'"
                              f"{did_you_mean(parts[1], known_stages)}; stages: "
                              f"{', '.join(known_stages) or 'none'}")
        if (len(parts) == 4 and parts[0] == "stages" and parts[2] in COMPONENT_KINDS
                and parts[3] == "type"):
            current = OmegaConf.select(cfg, ".".join(parts[:3]))
            if current is not None and current.get("type") != value:
                OmegaConf.update(cfg, ".".join(parts[:3]), {"type": value}, merge=False,
                                 force_add=True)   # another plugin: its old settings go
                continue
        try:
            OmegaConf.update(cfg, key, value, merge=True, force_add=True)
        except (oc_errors.OmegaConfBaseException, ValueError) as exc:
            raise ConfigError(f"{key}: cannot set to {value!r} ({str(exc).splitlines()[0]})")


# -- validation ---------------------------------------------------------------------------

def _format_oc_error(exc: Exception, prefix: str = "") -> ConfigError:
    key = getattr(exc, "full_key", None) or getattr(exc, "key", None) or "?"
    key = f"{prefix}{key}" if prefix else str(key)
    if isinstance(exc, oc_errors.ConfigKeyError):
        parent = getattr(exc, "parent_node", None)
        bad = str(key).split(".")[-1]
        valid = list(parent.keys()) if parent is not None else []
        return ConfigError(f"{key}: unknown key{did_you_mean(bad, valid)}"
                           + (f"; valid keys: {', '.join(map(str, valid))}" if valid else ""))
    if isinstance(exc, oc_errors.MissingMandatoryValue):
        return ConfigError(f"{key}: missing value; set it in the recipe or with {key}=...")
    msg = str(exc).splitlines()[0]
    return ConfigError(f"{key}: {msg}")


def validate(schema: type, data: Any, prefix: str = "") -> Any:
    """Check ``data`` (a mapping) against a dataclass ``schema`` and instantiate it.

    Unknown keys, wrong types, missing required values and impossible values (raised by the
    dataclass's ``__post_init__``) all become a ConfigError naming the full key.
    """
    if data is None:
        data = {}
    if not isinstance(data, (dict, DictConfig)):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got "
                          f"{type(data).__name__} {data!r}")
    check_finite(data, prefix)
    try:
        merged = OmegaConf.merge(OmegaConf.structured(schema), data)
        return _instantiate(merged, prefix)
    except oc_errors.OmegaConfBaseException as exc:
        raise _format_oc_error(exc, prefix) from None


def check_finite(data: Any, prefix: str = "") -> None:
    """Refuse NaN and inf anywhere in ``data`` (every numeric value of every config: run
    settings, schedules, plugin settings), naming the full key. Part of :func:`validate`, so
    it covers every component's ``Config`` too."""
    if isinstance(data, (DictConfig, ListConfig)):
        data = OmegaConf.to_container(data, resolve=False)
    if isinstance(data, dict):
        for k, v in data.items():
            check_finite(v, f"{prefix}{k}.")
    elif isinstance(data, (list, tuple)):
        for i, v in enumerate(data):
            check_finite(v, f"{prefix}{i}.")
    elif isinstance(data, float) and not math.isfinite(data):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: must be a finite number, got "
                          f"{data}")


def _instantiate(node: Any, path: str) -> Any:
    """Build nested dataclasses bottom-up so a ``__post_init__`` error gets its full key."""
    if isinstance(node, DictConfig):
        values = {str(k): _instantiate(node[k], f"{path}{k}.") for k in node.keys()}
        obj_type = OmegaConf.get_type(node)
        if dataclasses.is_dataclass(obj_type):
            try:
                return obj_type(**values)
            except ConfigError as exc:
                raise ConfigError(f"{path}{exc}") from None
        return values
    if isinstance(node, ListConfig):
        return [_instantiate(v, f"{path}{i}.") for i, v in enumerate(node)]
    return node


def validate_component(kind: str, spec: Any, key: str) -> Tuple[type, Any]:
    """Look up a ``{type: NAME, ...}`` component in the registry and validate its settings."""
    if isinstance(spec, DictConfig):
        spec = OmegaConf.to_container(spec, resolve=True)
    if not isinstance(spec, dict) or "type" not in spec:
        raise ConfigError(f"{key}: expected a mapping with a 'type' key naming a {kind} "
                          f"(one of: {', '.join(registry.REGISTRY.names(kind))})")
    spec = dict(spec)
    name = spec.pop("type")
    try:
        cls = registry.get(kind, name)
    except ConfigError:
        raise
    except Exception as exc:
        raise ConfigError(f"{key}.type: {exc}") from None
    schema = getattr(cls, "Config", None)
    if schema is None:
        if spec:
            raise ConfigError(f"{key}: {kind} '{name}' takes no settings, got "
                              f"{', '.join(spec)}")
        return cls, None
    return cls, validate(schema, spec, f"{key}.")


def component_to_dict(name: str, cfg: Any) -> dict:
    """A validated component back to a plain ``{type: NAME, ...}`` mapping (for config.yaml)."""
    out = {"type": name}
    if cfg is not None:
        out.update(OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True))
    return out


def build(kind: str, spec: Tuple[type, Any], **kwargs) -> Any:
    """Instantiate a validated component ``(cls, cfg)``."""
    cls, cfg = spec
    return cls(cfg, **kwargs) if cfg is not None else cls(**kwargs)


def compose(recipe: str, overrides: List[Tuple[str, Any]], base: Optional[dict] = None,
            provenance: Optional[Dict[str, str]] = None) -> DictConfig:
    """defaults <- recipe chain (extends / include; or ``base``, a saved config) <- overrides,
    merged but not validated. ``provenance``, when given, is filled with key -> source."""
    from engine.recipe_files import check_interpolations
    from engine.recipes import Source, drop_replaced_components, flatten, recipe_chain

    defaults = read_yaml(CONFIGS_DIR / "defaults.yaml", "defaults")
    stage_defaults = defaults.pop("stage", {})
    if base is None:
        name, layers = recipe_chain(recipe)
    else:
        name, layers = recipe, [Source("saved config.yaml", dict(base))]
    sources = [Source("configs/defaults.yaml", defaults)] + layers
    merged: dict = {}
    prov: Dict[str, str] = {}
    for src in sources:
        data = src.data
        check_interpolations(data, src.label)     # no ${oc.env:...} from any recipe layer
        stages = data.get("stages")
        if stages is not None and not (isinstance(stages, dict)
                                       and all(isinstance(v, dict) for v in stages.values())):
            raise ConfigError(f"{src.label}: stages must map stage names to settings")
        drop_replaced_components(merged, data)
        merged = OmegaConf.to_container(OmegaConf.merge(OmegaConf.create(merged),
                                                        OmegaConf.create(data)))
        for key in flatten(data):
            prov[key] = src.label
    if not merged.get("stages"):
        raise ConfigError(f"recipe '{name}' must define stages: a mapping of stage name -> "
                          "settings")
    cfg = OmegaConf.create(merged)
    cfg.recipe = name
    prov["recipe"] = layers[-1].label
    for sname in list(merged["stages"]):
        cfg.stages[sname] = OmegaConf.merge(OmegaConf.create(stage_defaults), cfg.stages[sname])
        for key in flatten(stage_defaults):
            prov.setdefault(f"stages.{sname}.{key}", "configs/defaults.yaml (stage)")
    apply_overrides(cfg, overrides)
    for key, value in overrides:
        for leaf in (flatten(value, key + ".") if isinstance(value, dict) else {key: value}):
            prov[leaf] = "command line"
    if provenance is not None:
        provenance.update(prov)
    return cfg


def resolve(merged: DictConfig) -> Tuple[RunConfig, DictConfig]:
    """Validate a composed config; return the typed config and the fully resolved mapping
    (with every plugin default filled in), which is what config.yaml stores."""
    try:
        container = OmegaConf.to_container(merged, resolve=True)
    except oc_errors.OmegaConfBaseException as exc:
        raise _format_oc_error(exc) from None
    cfg: RunConfig = validate(RunConfig, container)
    resolved = OmegaConf.create(container)
    stage_names = list(cfg.stages)
    for i, (sname, stage) in enumerate(cfg.stages.items()):
        comps = {}
        for field_name, kind in COMPONENT_KINDS.items():
            key = f"stages.{sname}.{field_name}"
            comps[field_name] = validate_component(kind, getattr(stage, field_name), key)
            resolved.stages[sname][field_name] = component_to_dict(
                getattr(stage, field_name)["type"], comps[field_name][1])
        cfg.components[sname] = comps
        _check_loss_names(sname, stage, comps)
        _check_lr_groups(sname, stage, comps)
        if stage.init_from is not None and stage.init_from not in stage_names[:i]:
            raise ConfigError(f"stages.{sname}.init_from: '{stage.init_from}' is not an earlier "
                              f"stage{did_you_mean(stage.init_from, stage_names[:i])}; earlier "
                              f"stages: {', '.join(stage_names[:i]) or 'none'}")
    _check_exportable(cfg)
    # sizes that allocate, with every plugin default filled in (engine/bounds.py)
    check_limits(OmegaConf.to_container(resolved))
    return cfg, resolved


def _check_exportable(cfg: RunConfig) -> None:
    """With ``export`` set, the last stage's representation must be able to give a mesh."""
    from engine.plugin import Representation

    if cfg.export is None:
        return
    last = list(cfg.stages)[-1]
    cls = cfg.components[last]["representation"][0]
    if cls.surface is Representation.surface or cls.albedo is Representation.albedo:
        raise ConfigError(f"export: the last stage's representation "
                          f"'{getattr(cls, 'registry_name', cls.__name__)}' cannot export a mesh; "
                          "set export=null or end with a representation that can")


def _check_loss_names(sname: str, stage: StageConfig, comps: Dict[str, Tuple[type, Any]]) -> None:
    """A weighted loss must be one a component can produce (plugins list ``loss_names``)."""
    produced = []
    for field_name in ("guidance", "representation"):
        names = getattr(comps[field_name][0], "loss_names", None)
        if names is None:
            return  # a plugin that does not declare its losses: checked at run time
        produced += list(names)
    for name in stage.losses:
        if name not in produced:
            raise ConfigError(f"stages.{sname}.losses.{name}: no component of this stage produces "
                              f"a loss named '{name}'{did_you_mean(name, produced)}; available: "
                              f"{', '.join(produced) or 'none'}")


def _check_lr_groups(sname: str, stage: StageConfig, comps: Dict[str, Tuple[type, Any]]) -> None:
    """Learning rates must name parameter groups that exist (plugins list
    ``param_group_names``), and every group needs a rate, so a typo fails before any stage."""
    groups = []
    for field_name in ("representation", "background"):
        names = getattr(comps[field_name][0], "param_group_names", None)
        if names is None:
            return  # undeclared: the trainer checks when it builds the optimiser
        groups += list(names)
    check_lr_groups(sname, stage.optimizer.lr, groups)


def check_lr_groups(sname: str, lr: Any, groups: List[str]) -> None:
    """Every learning rate names an existing parameter group (or 'default') and every group
    has a rate. Used at load time with declared names and by the trainer with real ones."""
    for name in lr:
        if name != "default" and name not in groups:
            raise ConfigError(f"stages.{sname}.optimizer.lr.{name}: no parameter group of that "
                              f"name{did_you_mean(name, groups)}; groups: "
                              f"{', '.join(groups) or 'none'} (or 'default')")
    if "default" not in lr:
        for g in groups:
            if g not in lr:
                raise ConfigError(f"stages.{sname}.optimizer.lr: no learning rate for group "
                                  f"'{g}'; add stages.{sname}.optimizer.lr.{g} or a default")


def check_inputs(cfg: RunConfig) -> None:
    """A recipe that needs an image or a prompt must be given one."""
    for need in cfg.inputs.requires:
        if getattr(cfg.inputs, need) in (None, ""):
            example = "image=path/to/picture.png" if need == "image" else 'prompt="a red chair"'
            raise ConfigError(f"recipe '{cfg.recipe}' needs an input {need}: add {example}")


def load(recipe: Optional[str], items: List[str], base: Optional[dict] = None
         ) -> Tuple[RunConfig, DictConfig]:
    """Everything above in order: the entry point used by ``engine.run``. The typed config's
    ``provenance`` maps each resolved key to the file (or "command line") that set it."""
    overrides = parse_overrides(items)
    if recipe is None and base is None:
        raise ConfigError("no recipe given: add recipe=NAME (see --list for names)")
    provenance: Dict[str, str] = {}
    merged = compose(recipe or (base or {}).get("recipe", "run"), overrides, base=base,
                     provenance=provenance)
    cfg, resolved = resolve(merged)
    from engine.recipes import flatten

    for key in flatten(OmegaConf.to_container(resolved)):
        if key not in provenance:
            parts = key.split(".")
            owner = (OmegaConf.select(resolved, ".".join(parts[:3]) + ".type")
                     if len(parts) > 3 and parts[0] == "stages" else None)
            provenance[key] = f"default of {owner}" if owner else "schema default"
    cfg.provenance = provenance
    return cfg, resolved


def plain(resolved: DictConfig) -> dict:
    """The resolved config as plain Python containers."""
    return OmegaConf.to_container(resolved)


def to_yaml(resolved: DictConfig) -> str:
    return OmegaConf.to_yaml(resolved, sort_keys=False)

