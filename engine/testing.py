"""Contract checks for plugin authors: call them from your own pytest tests.

Each ``check_*`` function builds a plugin (or takes an instance), exercises the contract the
trainer relies on (output shapes and ranges, gradients, frozen models, config and checkpoint
round trips, determinism) and raises :class:`AssertionError` with a message naming what broke
and how to fix it. Nothing here imports pytest, so the module is safe to import anywhere::

    from engine.testing import check_representation

    def test_my_field_meets_the_contract():
        check_representation(MyField, {"resolution": 8}, size=16)

Checks run on small random inputs with fixed seeds; they are meant to take a second or two
with small plugin settings.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import math
import sys
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from engine.cameras import Cameras, orbit
from engine.plugin import Background, ReferenceImage, RunInputs, StepInfo

__all__ = ["check_representation", "check_guidance", "check_conditioner", "check_background",
           "run_recipe_steps", "tiny_inputs"]


# -- helpers --------------------------------------------------------------------------------

def _name(cls: Any) -> str:
    return getattr(cls, "registry_name", None) or getattr(cls, "__name__", type(cls).__name__)


def _fail(what: str, message: str) -> None:
    raise AssertionError(f"{what}: {message}")


def _config(cls: type, cfg: Any) -> Any:
    """None -> the plugin's defaults; a mapping -> validated like a recipe; else as given."""
    from engine.config import validate

    schema = getattr(cls, "Config", None)
    if cfg is None:
        return schema() if schema is not None else None
    if isinstance(cfg, dict):
        if schema is None:
            _fail(_name(cls), f"takes no settings (no Config class) but got {cfg!r}")
        return validate(schema, cfg, f"{_name(cls)}.")
    return cfg


def _build(cls: type, cfg: Any, device, **context) -> Any:
    return cls(cfg, device=device, **context) if cfg is not None else cls(device=device, **context)


def _config_round_trip(cls: type, cfg: Any) -> None:
    """component_to_dict -> validate gives an equal Config (what config.yaml relies on)."""
    from engine.config import component_to_dict, validate

    if cfg is None:
        return
    what = _name(cls)
    try:
        data = component_to_dict(what, cfg)
    except Exception as exc:
        _fail(what, f"its Config cannot be written back to a mapping "
                    f"({type(exc).__name__}: {exc}); use plain fields (int, float, str, bool, "
                    "lists, dicts, nested dataclasses)")
    data.pop("type")
    try:
        again = validate(type(cfg), data, f"{what}.")
    except Exception as exc:
        _fail(what, f"its Config written out as {data!r} does not validate again "
                    f"({type(exc).__name__}: {exc})")
    if dataclasses.asdict(again) != dataclasses.asdict(cfg):
        diffs = [k for k, v in dataclasses.asdict(cfg).items()
                 if dataclasses.asdict(again).get(k) != v]
        _fail(what, f"Config round trip (component_to_dict -> validate) changed "
                    f"{', '.join(diffs) or 'the value'}: {cfg!r} became {again!r}")


def _check_image(what: str, key: str, t: Any, shape: Tuple[int, ...],
                 lo: Optional[float] = None, hi: Optional[float] = None) -> None:
    if not isinstance(t, Tensor):
        _fail(what, f"output '{key}' is a {type(t).__name__}, expected a tensor")
    if tuple(t.shape) != shape:
        _fail(what, f"output '{key}' has shape {tuple(t.shape)}, expected {shape}")
    if not t.is_floating_point():
        _fail(what, f"output '{key}' has dtype {t.dtype}, expected a float tensor")
    bad = (~torch.isfinite(t)).sum().item()
    if bad:
        _fail(what, f"output '{key}' has {bad} non-finite values (NaN/inf)")
    tol = 1e-5
    if lo is not None and t.min().item() < lo - tol:
        _fail(what, f"output '{key}' goes below {lo}: min {t.min().item():.6g}")
    if hi is not None and t.max().item() > hi + tol:
        _fail(what, f"output '{key}' goes above {hi}: max {t.max().item():.6g}")


class _GreyBackground(Background):
    """A constant mid-grey, so composited colours are neither trivially black nor white."""

    def forward(self, dirs: Tensor) -> Tensor:
        return torch.full_like(dirs, 0.5)


def _step(step: int = 0, steps: int = 2) -> StepInfo:
    return StepInfo(stage="check", stage_index=0, step=step, stage_steps=max(steps, step + 1),
                    global_step=step)


def _param_names(module: nn.Module) -> Dict[int, str]:
    return {id(p): n for n, p in module.named_parameters()}


def _check_groups(what: str, module: nn.Module, groups: Any, declared: Optional[Sequence[str]]
                  ) -> Dict[str, List[nn.Parameter]]:
    """param_groups(): a dict of parameter lists, disjoint, covering every trainable
    parameter, with the declared names."""
    if not isinstance(groups, dict):
        _fail(what, f"param_groups() returned {type(groups).__name__}, expected a dict "
                    "{group name: [parameters]}")
    names = _param_names(module)
    seen: Dict[int, str] = {}
    for g, params in groups.items():
        params = list(params)
        for p in params:
            if not isinstance(p, nn.Parameter):
                _fail(what, f"param_groups()['{g}'] holds a {type(p).__name__}, not an "
                            "nn.Parameter")
            if id(p) in seen:
                _fail(what, f"parameter '{names.get(id(p), '?')}' is in two groups "
                            f"('{seen[id(p)]}' and '{g}'); the optimiser rejects that")
            if not p.requires_grad:
                _fail(what, f"parameter '{names.get(id(p), '?')}' in group '{g}' does not "
                            "require grad; leave frozen parameters out of param_groups()")
            seen[id(p)] = g
    missing = [n for n, p in module.named_parameters() if p.requires_grad and id(p) not in seen]
    if missing:
        _fail(what, f"trainable parameters not in any param_groups() group (the optimiser "
                    f"would never update them): {', '.join(missing)}; add them to a group or "
                    "call requires_grad_(False) on them")
    if declared is not None and set(groups) != set(declared):
        _fail(what, f"param_groups() returns groups {sorted(groups)} but the class declares "
                    f"param_group_names = {tuple(declared)}; recipes are checked against the "
                    "declared names, so make them equal")
    return {g: list(ps) for g, ps in groups.items()}


def _check_reached(what: str, module: nn.Module, groups: Dict[str, List[nn.Parameter]]
                   ) -> None:
    names = _param_names(module)
    none, nonfinite = [], []
    for g, params in groups.items():
        for p in params:
            label = f"{g}/{names.get(id(p), '?')} {tuple(p.shape)}"
            if p.grad is None or p.grad.abs().sum().item() == 0:
                none.append(label)
            elif not torch.isfinite(p.grad).all():
                nonfinite.append(label)
    if nonfinite:
        _fail(what, f"non-finite gradients in: {', '.join(nonfinite)}")
    if none:
        _fail(what, f"parameters that got no gradient from a loss on rgb + opacity (+ "
                    f"regularizers): {', '.join(none)}; the render does not depend on them "
                    "(a detach, a no_grad, an unused layer?) or they belong out of "
                    "param_groups()")


def _scalar_losses(what: str, losses: Any, declared: Optional[Sequence[str]], source: str
                   ) -> Dict[str, Tensor]:
    if not isinstance(losses, dict):
        _fail(what, f"{source} returned {type(losses).__name__}, expected a dict "
                    "{name: scalar tensor}")
    for k, v in losses.items():
        if not isinstance(v, Tensor) or v.dim() != 0:
            shape = tuple(v.shape) if isinstance(v, Tensor) else type(v).__name__
            _fail(what, f"{source} loss '{k}' is {shape}, expected a scalar tensor (reduce it "
                        "with .mean())")
        if not torch.isfinite(v):
            _fail(what, f"{source} loss '{k}' is not finite ({v.item()})")
        if declared is not None and k not in declared:
            _fail(what, f"{source} returned loss '{k}' not in loss_names = {tuple(declared)}; "
                        "recipes can only weight declared losses")
    return dict(losses)


def _check_render(what: str, out: Any, b: int, size: int) -> None:
    if not isinstance(out, dict):
        _fail(what, f"render() returned {type(out).__name__}, expected a dict of tensors")
    for key in ("rgb", "opacity"):
        if key not in out:
            _fail(what, f"render() output lacks '{key}' (has: {', '.join(out) or 'nothing'})")
    _check_image(what, "rgb", out["rgb"], (b, size, size, 3), 0.0, 1.0)
    _check_image(what, "opacity", out["opacity"], (b, size, size, 1), 0.0, 1.0)
    if "depth" in out:
        _check_image(what, "depth", out["depth"], (b, size, size, 1))
    if "normal" in out:
        _check_image(what, "normal", out["normal"], (b, size, size, 3))


# -- representation -------------------------------------------------------------------------

def check_representation(cls: type, cfg: Any = None, *, device="cpu", size: int = 16,
                         views: int = 2, create_from: Optional[nn.Module] = None) -> nn.Module:
    """Check a Representation class against the engine's contract; returns the instance.

    ``cfg``: None (the Config defaults), a mapping (validated like a recipe's settings) or a
    Config instance; keep it small. Renders ``views`` orbit cameras at ``size`` x ``size`` in
    train and eval mode and checks: ``rgb`` [B,H,W,3] and ``opacity`` [B,H,W,1] finite and in
    [0, 1], ``depth`` [B,H,W,1] / ``normal`` [B,H,W,3] finite when present; regularizers are
    finite scalars named in ``loss_names`` (if declared); an L2 loss on rgb + opacity plus the
    regularizers gives a non-zero finite gradient to every parameter of ``param_groups()``;
    the groups are disjoint, cover every trainable parameter and equal
    ``param_group_names`` (if declared); the Config survives component_to_dict -> validate;
    the state_dict loaded into a fresh instance renders identically in eval mode. With
    ``create_from`` (another representation instance), ``cls.create_from(create_from, cfg)``
    must build an instance that renders correctly too.
    """
    what = f"representation {_name(cls)}"
    device = torch.device(device)
    cfg = _config(cls, cfg)
    _config_round_trip(cls, cfg)
    torch.manual_seed(0)
    rep = _build(cls, cfg, device).to(device)
    bg = _GreyBackground().to(device)
    cams = orbit(views, elevation_deg=20.0, distance=2.5, fovy_deg=45.0, device=device)
    step = _step(0)

    # train-mode render, losses and gradients
    rep.train()
    groups = _check_groups(what, rep, rep.param_groups(), getattr(cls, "param_group_names", None))
    if not groups or not any(groups.values()):
        _fail(what, "param_groups() returned no parameters: nothing would be trained")
    rep.before_step(step)
    torch.manual_seed(0)
    out = rep.render(cams, size, size, background=bg, step=step)
    _check_render(f"{what} (train mode)", out, views, size)
    regs = _scalar_losses(what, rep.regularizers(out, step), getattr(cls, "loss_names", None),
                          "regularizers()")
    gen = torch.Generator().manual_seed(1)
    target_rgb = torch.rand(out["rgb"].shape, generator=gen).to(device)
    target_opacity = torch.rand(out["opacity"].shape, generator=gen).to(device)
    loss = (out["rgb"] - target_rgb).pow(2).mean() + (out["opacity"] - target_opacity).pow(2).mean()
    for v in regs.values():
        loss = loss + v
    rep.zero_grad(set_to_none=True)
    if not loss.requires_grad:
        _fail(what, "a loss on the train-mode render does not require grad: the render is "
                    "detached from the parameters (no_grad or .detach() in render?)")
    loss.backward()
    _check_reached(what, rep, groups)

    # move away from the initialisation so the checkpoint round trip means something
    with torch.no_grad():
        gen = torch.Generator().manual_seed(2)
        for params in groups.values():
            for p in params:
                p.add_(1e-2 * torch.randn(p.shape, generator=gen).to(p))
    rep.zero_grad(set_to_none=True)

    # eval-mode render, then a fresh instance from the state_dict renders the same
    rep.eval()
    with torch.no_grad():
        torch.manual_seed(3)
        first = rep.render(cams, size, size, background=bg, step=step)
    _check_render(f"{what} (eval mode)", first, views, size)
    torch.manual_seed(1234)  # a different random initialisation than ``rep``'s
    fresh = _build(cls, cfg, device).to(device)
    try:
        fresh.load_state_dict(rep.state_dict())
    except Exception as exc:
        _fail(what, f"its state_dict does not load into a fresh instance built from the same "
                    f"Config ({type(exc).__name__}: {exc})")
    fresh.eval()
    with torch.no_grad():
        torch.manual_seed(3)
        second = fresh.render(cams, size, size, background=bg, step=step)
    for key in ("rgb", "opacity", "depth", "normal"):
        if key in first and not torch.allclose(first[key], second.get(key, first[key] + 1),
                                               atol=1e-5, rtol=1e-5):
            err = (first[key] - second[key]).abs().max().item() if key in second else "missing"
            _fail(what, f"after state_dict -> load_state_dict into a fresh instance, eval "
                        f"render '{key}' differs (max abs difference {err}); some state that "
                        "affects rendering is not in the state_dict (a plain attribute or a "
                        "non-persistent buffer?)")

    if create_from is not None:
        src = _name(type(create_from))
        try:
            made = cls.create_from(create_from, cfg, device=device)
        except Exception as exc:
            _fail(what, f"create_from({src}) failed: {type(exc).__name__}: {exc}")
        if not isinstance(made, cls):
            _fail(what, f"create_from({src}) returned {type(made).__name__}, not {cls.__name__}")
        made = made.to(device)
        made.train()
        torch.manual_seed(0)
        out = made.render(cams, size, size, background=bg, step=step)
        _check_render(f"{what} (created from {src})", out, views, size)
        made.eval()
        with torch.no_grad():
            _check_render(f"{what} (created from {src}, eval mode)",
                          made.render(cams, size, size, background=bg, step=step), views, size)
    return rep


# -- guidance -------------------------------------------------------------------------------

def tiny_inputs(size: int = 32, prompt: str = "a red cube") -> RunInputs:
    """A synthetic RunInputs: a ``size`` x ``size`` picture of a red square on white (mask 1
    on the square) and ``prompt``."""
    mask = torch.zeros(size, size, 1)
    lo, hi = size // 4, size - size // 4
    mask[lo:hi, lo:hi] = 1.0
    rgb = torch.ones(size, size, 3)
    rgb[lo:hi, lo:hi] = torch.tensor([0.85, 0.15, 0.1])
    return RunInputs(image=ReferenceImage(rgb=rgb, mask=mask, path="<synthetic>"), prompt=prompt)


def check_guidance(cls: type, cfg: Any = None, *, inputs: Optional[RunInputs] = None,
                   device="cpu", size: int = 16, views: int = 4,
                   steps: Iterable[int] = (0, 1)) -> nn.Module:
    """Check a Guidance class against the engine's contract; returns the instance.

    Builds it with ``inputs`` (default :func:`tiny_inputs`), then at each of ``steps`` calls
    ``before_step`` and ``forward({"rgb": [views,size,size,3], "opacity": [...,1]}, cameras
    of one object seen from ``views`` azimuths, step)`` on a random render requiring grad
    and checks: a dict of finite scalar losses named in ``loss_names`` (if declared); their
    sum gives a non-zero finite gradient to the render; no parameter of the guidance (its
    frozen model) requires grad or receives a gradient; the same torch seed gives the same
    losses.
    """
    what = f"guidance {_name(cls)}"
    device = torch.device(device)
    cfg = _config(cls, cfg)
    _config_round_trip(cls, cfg)
    inputs = inputs if inputs is not None else tiny_inputs()
    guidance = _build(cls, cfg, device, inputs=inputs).to(device)
    trainable = [n for n, p in guidance.named_parameters() if p.requires_grad]
    if trainable:
        _fail(what, f"parameters that require grad: {', '.join(trainable[:8])}"
                    f"{' ...' if len(trainable) > 8 else ''}; freeze the model "
                    "(requires_grad_(False)): only the render may receive gradients")
    az = torch.arange(views, dtype=torch.float32) * 360.0 / views
    cams = Cameras.from_spherical(15.0, az, 2.5, 40.0, views_per_object=views, device=device)
    steps = list(steps)
    total_steps = max(steps) + 1 if steps else 1
    declared = getattr(cls, "loss_names", None)
    gen = torch.Generator().manual_seed(0)
    for s in steps:
        info = _step(s, total_steps)
        rgb = torch.rand(views, size, size, 3, generator=gen).to(device).requires_grad_(True)
        opacity = torch.rand(views, size, size, 1, generator=gen).to(device).requires_grad_(True)
        guidance.before_step(info)
        torch.manual_seed(0)
        losses = _scalar_losses(f"{what} at step {s}",
                                guidance({"rgb": rgb, "opacity": opacity}, cams, info),
                                declared, "forward()")
        if not losses:
            _fail(what, f"forward() at step {s} returned no losses")
        total = sum(losses.values())
        if not total.requires_grad:
            _fail(what, f"the summed losses {sorted(losses)} at step {s} give no gradient to "
                        "the render (they do not require grad); is something detached or "
                        "computed under no_grad?")
        total.backward()
        grads = [t.grad for t in (rgb, opacity) if t.grad is not None]
        if not grads or all(g.abs().sum().item() == 0 for g in grads):
            _fail(what, f"the summed losses {sorted(losses)} at step {s} give no gradient to "
                        "the render (rgb, opacity); is something detached?")
        if not all(torch.isfinite(g).all() for g in grads):
            _fail(what, f"non-finite gradient on the render at step {s}")
        reached = [n for n, p in guidance.named_parameters() if p.grad is not None]
        if reached:
            _fail(what, f"parameters of the guidance got gradients: {', '.join(reached[:8])}; "
                        "the frozen model must not be trained")
        with torch.no_grad():
            torch.manual_seed(0)
            again = guidance({"rgb": rgb.detach(), "opacity": opacity.detach()}, cams, info)
        for k, v in losses.items():
            if k not in again or not torch.allclose(v.detach(), again[k], rtol=1e-5, atol=1e-6):
                _fail(what, f"not deterministic: with the same torch seed loss '{k}' was "
                            f"{v.item():.6g}, then {float(again.get(k, float('nan'))):.6g}; "
                            "draw noise and timesteps from the global torch RNG (the trainer "
                            "seeds it every step) or a generator seeded from it")
    return guidance


# -- conditioner ----------------------------------------------------------------------------

def check_conditioner(conditioner: nn.Module, *, kind: Optional[str] = None) -> None:
    """Check a conditioner instance (an image or a text encoder).

    ``kind`` ("image" | "text", default ``conditioner.kind``). Image: ``forward([N,3,H,W] in
    [0, 1]) -> [N, L, D]``, L = ``conditioner.num_tokens`` (1 when it has none); text:
    ``forward(list of N strings) -> [N, L, D]``. Checks finite outputs of that shape (D =
    ``embed_dim`` when the conditioner has one), different inputs give different embeddings,
    the same input the same embedding, ``unconditional(N)`` has the same shape, and no
    parameter requires grad.
    """
    kind = kind or getattr(conditioner, "kind", None)
    what = f"conditioner {_name(type(conditioner))}"
    if kind not in ("image", "text"):
        _fail(what, f"kind must be 'image' or 'text', got {kind!r} (set a class attribute "
                    "kind or pass kind=)")
    trainable = [n for n, p in conditioner.named_parameters() if p.requires_grad]
    if trainable:
        _fail(what, f"parameters that require grad: {', '.join(trainable[:8])}; a conditioner "
                    "is frozen (requires_grad_(False))")
    n = 2
    if kind == "image":
        gen = torch.Generator().manual_seed(0)
        sample = torch.rand(n, 3, 32, 32, generator=gen)
        sample[1] = 1.0 - sample[1]
        sample = sample.to(next(conditioner.parameters(), torch.zeros(())).device)
    else:
        sample = ["a red chair", "a blue lamp on a wooden table"]
    with torch.no_grad():
        emb = conditioner(sample)
        emb2 = conditioner(sample)
        uncond = conditioner.unconditional(n)
    if not isinstance(emb, Tensor) or emb.dim() != 3 or emb.shape[0] != n:
        shape = tuple(emb.shape) if isinstance(emb, Tensor) else type(emb).__name__
        _fail(what, f"embedding of {n} inputs has shape {shape}, expected [{n}, L, D]")
    tokens = int(getattr(conditioner, "num_tokens", 1))
    if kind == "image" and emb.shape[1] != tokens:
        _fail(what, f"image embedding has shape {tuple(emb.shape)}, expected [{n}, {tokens}, D]"
                    + ("" if tokens > 1 else " (set num_tokens when it has more than one)"))
    dim = getattr(conditioner, "embed_dim", None)
    if dim is not None and emb.shape[2] != dim:
        _fail(what, f"embedding width {emb.shape[2]} differs from embed_dim {dim}")
    if not torch.isfinite(emb).all():
        _fail(what, "embedding has non-finite values")
    if not torch.equal(emb, emb2):
        _fail(what, "not deterministic: the same input gave two different embeddings "
                    "(dropout left on? call eval() in __init__ and keep train() from undoing it)")
    if torch.equal(emb[0], emb[1]):
        _fail(what, "two different inputs gave the same embedding")
    if not isinstance(uncond, Tensor) or tuple(uncond.shape) != tuple(emb.shape):
        shape = tuple(uncond.shape) if isinstance(uncond, Tensor) else type(uncond).__name__
        _fail(what, f"unconditional({n}) has shape {shape}, expected {tuple(emb.shape)}")
    if not torch.isfinite(uncond).all():
        _fail(what, "unconditional embedding has non-finite values")


# -- background -----------------------------------------------------------------------------

def check_background(cls: type, cfg: Any = None) -> nn.Module:
    """Check a Background class; returns the instance.

    ``forward(unit dirs [B,H,W,3]) -> [B,H,W,3]`` finite, in [0, 1], in train and eval mode;
    ``param_groups()`` disjoint, covering every trainable parameter, with the names of
    ``param_group_names``, and each of its parameters gets a gradient from the colours; the
    Config survives component_to_dict -> validate.
    """
    what = f"background {_name(cls)}"
    cfg = _config(cls, cfg)
    _config_round_trip(cls, cfg)
    torch.manual_seed(0)
    bg = _build(cls, cfg, None)
    gen = torch.Generator().manual_seed(0)
    dirs = torch.nn.functional.normalize(torch.randn(2, 4, 5, 3, generator=gen), dim=-1)
    groups = _check_groups(what, bg, bg.param_groups(), getattr(cls, "param_group_names", ()))
    for mode in (True, False):
        bg.train(mode)
        out = bg(dirs)
        _check_image(f"{what} ({'train' if mode else 'eval'} mode)", "rgb", out,
                     tuple(dirs.shape), 0.0, 1.0)
        if mode and groups:
            target = torch.rand(out.shape, generator=gen)
            (out - target).pow(2).mean().backward()
            _check_reached(what, bg, groups)
            bg.zero_grad(set_to_none=True)
    return bg


# -- a short run through the trainer --------------------------------------------------------

class _Tee(io.TextIOBase):
    def __init__(self, *streams):
        self.streams = streams

    def write(self, s):
        for st in self.streams:
            st.write(s)
        return len(s)

    def flush(self):
        for st in self.streams:
            st.flush()


def run_recipe_steps(recipe: str, *, steps: int = 2, out, overrides: Sequence[str] = (),
                     image=None, prompt: Optional[str] = None) -> Path:
    """Run ``python -m engine.run`` in-process on ``recipe`` (a name or a YAML path) with every
    stage shortened to ``steps`` steps, the progress bar, progress renders and export off and
    only stage-end checkpoints; ``overrides`` (``key=value`` items) are applied last. Asserts
    exit code 0 and one metrics.jsonl line per step; returns the run folder (``out``, or the
    fresh folder next to it when ``out`` already has files)."""
    from engine import config
    from engine.run import main

    stages = list(config.compose(recipe, config.parse_overrides(list(overrides))).stages)
    argv = [f"recipe={recipe}", f"out={out}"]
    if image is not None:
        argv.append(f"image={image}")
    if prompt is not None:
        argv.append(f"prompt={prompt}")
    argv += ["output.progress=false", "output.render_every=0", "output.checkpoint_every=0",
             "output.keep_checkpoints=1", "output.render_views=1", "output.render_size=8",
             "export=null"]
    argv += [f"stages.{s}.steps={steps}" for s in stages]
    argv += list(overrides)
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(_Tee(sys.stdout, stdout)), \
            contextlib.redirect_stderr(_Tee(sys.stderr, stderr)):
        code = main(argv)
    if code != 0:
        _fail(f"recipe {recipe}", f"python -m engine.run {' '.join(argv)} exited with {code}: "
                                  f"{stderr.getvalue().strip()[-2000:]}")
    run_dir = Path(out)
    for line in stdout.getvalue().splitlines():
        if line.startswith("output: "):
            run_dir = Path(line[len("output: "):].strip())
    metrics = run_dir / "metrics.jsonl"
    if not metrics.is_file():
        _fail(f"recipe {recipe}", f"the run wrote no {metrics}")
    records = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    expected = steps * len(stages)
    if len(records) != expected:
        _fail(f"recipe {recipe}", f"metrics.jsonl has {len(records)} lines, expected {expected} "
                                  f"({len(stages)} stages x {steps} steps)")
    seen = [(rec.get("stage"), rec.get("step")) for rec in records]
    wanted = [(s, i) for s in stages for i in range(steps)]
    if seen != wanted:
        _fail(f"recipe {recipe}", f"metrics.jsonl records (stage, step) {seen}, expected "
                                  f"{wanted}")
    for rec in records:
        if not math.isfinite(rec.get("loss", 0.0)):
            _fail(f"recipe {recipe}", f"non-finite total loss logged: {rec}")
        bad = [k for k, v in rec.items() if k.startswith("loss/") and isinstance(v, float)
               and not math.isfinite(v)]
        if bad:
            _fail(f"recipe {recipe}", f"non-finite losses logged: {', '.join(bad)} in {rec}")
    return run_dir
