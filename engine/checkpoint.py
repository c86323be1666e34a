"""Checkpoints: one safetensors file per save, written atomically, no pickle anywhere.

A checkpoint holds the trainable state of a stage (representation, background, optimiser),
never a frozen model. Tensors are stored under prefixed names (``representation.*``,
``background.*``, ``optimizer.state.<i>.<key>``); everything else (stage, step, optimiser
hyper-parameters) is JSON in the file's metadata, beside a SHA-256 of the tensors that
:func:`load` checks, so a flipped bit is caught rather than trained on. :func:`load` also
refuses metadata :func:`save` would not write (a crafted file is one line, not a traceback),
and :func:`newest_intact` lets ``resume=RUN`` skip damaged checkpoints.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_bytes
from safetensors.torch import save as save_bytes
from torch import Tensor

# atomic_write and atomic_write_text stay importable from here (their home before engine.atomic)
from engine.atomic import atomic_write, atomic_write_bytes, atomic_write_text  # noqa: F401
from engine.errors import UserError

META_KEY = "engine"


class NonFiniteState(ValueError):
    """:func:`save` was asked to write NaN/inf tensors (it writes nothing)."""

NAME_RE = re.compile(r"^(\d+)-(.+)-(\d+)\.safetensors$")


def checkpoint_name(stage_index: int, stage: str, step: int) -> str:
    """Names sort in training order: ``01-nerf-0000500.safetensors``."""
    return f"{stage_index:02d}-{stage}-{step:07d}.safetensors"


def _flatten_optimizer(state: Dict[str, Any]) -> Tuple[Dict[str, Tensor], Dict[str, Any]]:
    tensors: Dict[str, Tensor] = {}
    scalars: Dict[str, Dict[str, Any]] = {}
    for idx, values in state["state"].items():
        for key, value in values.items():
            if isinstance(value, Tensor):
                tensors[f"optimizer.state.{idx}.{key}"] = value
            else:
                scalars.setdefault(str(idx), {})[key] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def _unflatten_optimizer(tensors: Dict[str, Tensor], meta: Dict[str, Any]) -> Dict[str, Any]:
    state: Dict[int, Dict[str, Any]] = {}
    for name, value in tensors.items():
        if name.startswith("optimizer.state."):
            idx, key = name[len("optimizer.state."):].split(".", 1)
            state.setdefault(int(idx), {})[key] = value
    for idx, values in meta.get("scalars", {}).items():
        state.setdefault(int(idx), {}).update(values)
    return {"state": state, "param_groups": meta["param_groups"]}


CHECKSUM_KEY = "sha256"


def tensors_checksum(tensors: Dict[str, Tensor]) -> str:
    """SHA-256 over every tensor's name, dtype, shape and bytes, in name order: a flipped
    bit anywhere in the data changes it."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().to("cpu").contiguous()
        h.update(f"{name}|{t.dtype}|{list(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()


def save(path: Path, *, modules: Dict[str, torch.nn.Module],
         optimizer: Optional[torch.optim.Optimizer], info: Dict[str, Any]) -> Path:
    """Write ``modules``' state dicts, the optimiser state and ``info`` (JSON) to ``path``,
    with a checksum of the tensors in the metadata (verified by :func:`load`)."""
    tensors: Dict[str, Tensor] = {}
    for prefix, module in modules.items():
        for key, value in module.state_dict().items():
            tensors[f"{prefix}.{key}"] = value
    meta: Dict[str, Any] = {"info": info}
    if optimizer is not None:
        opt_tensors, meta["optimizer"] = _flatten_optimizer(optimizer.state_dict())
        tensors.update(opt_tensors)
    # safetensors wants contiguous, unshared CPU tensors
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}
    bad = nonfinite_tensors(tensors)
    if bad:   # never write a state that cannot be resumed from
        raise NonFiniteState(f"not saving {path.name}: non-finite values in "
                             f"{', '.join(bad[:4])}{' ...' if len(bad) > 4 else ''}")
    # serialised in memory, then written by engine.atomic: a full disk is an OSError there
    # (one line, nothing left under the final name), not an opaque serialiser error
    data = save_bytes(tensors, metadata={META_KEY: json.dumps(meta),
                                         CHECKSUM_KEY: tensors_checksum(tensors)})
    atomic_write_bytes(path, data)
    return path


class CheckpointDamaged(UserError):
    """A checkpoint file that cannot be trusted: unreadable, cut short, a checksum that does
    not match its tensors, or metadata that is not what :func:`save` writes."""


def _header_metadata(data: bytes) -> Dict[str, str]:
    """The ``__metadata__`` of a safetensors file's JSON header (8-byte length, then JSON)."""
    if len(data) < 8:
        raise ValueError("shorter than a safetensors header")
    n = int.from_bytes(data[:8], "little")
    if n > len(data) - 8:
        raise ValueError("its header is cut short")
    header = json.loads(data[8:8 + n])
    meta = header.get("__metadata__") if isinstance(header, dict) else None
    if not isinstance(meta, dict):
        raise ValueError("no metadata")
    return meta


def _check_meta(meta: Any, tensors: Dict[str, Tensor]) -> None:
    """Refuse metadata that save() would not have written (hand-made or damaged), so a
    crafted file is one line rather than a traceback deep in the trainer."""
    def need(ok: bool, what: str) -> None:
        if not ok:
            raise ValueError(what)

    need(isinstance(meta, dict), "its metadata is not a mapping")
    info = meta.get("info")
    need(isinstance(info, dict), "no 'info' mapping in its metadata")
    need(isinstance(info.get("stage", ""), str), "info.stage is not a name")
    for key in ("step", "stage_index"):   # the engine's; fine-tuning writes no stage
        v = info.get(key, 0)
        need(isinstance(v, int) and not isinstance(v, bool) and 0 <= v < 2**53,
             f"info.{key} is not a step number")
    need(isinstance(info.get("stage_end", True), bool), "info.stage_end is not true/false")
    opt = meta.get("optimizer")
    if opt is not None:
        need(isinstance(opt, dict) and isinstance(opt.get("param_groups"), list)
             and all(isinstance(g, dict) and isinstance(g.get("params"), list)
                     for g in opt["param_groups"]), "optimizer.param_groups is malformed")
        scalars = opt.get("scalars", {})
        need(isinstance(scalars, dict) and all(k.isdigit() and isinstance(v, dict)
                                               for k, v in scalars.items()),
             "optimizer.scalars is malformed")
    for name in tensors:
        if name.startswith("optimizer.state."):
            idx, _, key = name[len("optimizer.state."):].partition(".")
            need(idx.isdigit() and bool(key), f"tensor name '{name}' is malformed")


def load(path: Path) -> Tuple[Dict[str, Tensor], Dict[str, Any]]:
    """Read a checkpoint: (tensors, metadata). The tensors' checksum is verified (files of
    engines before checksums have none and are read as they are); a missing file, a damaged
    one or crafted metadata is a one-line UserError (:class:`CheckpointDamaged`)."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise UserError(f"checkpoint not found: {path}") from None
    except OSError as exc:
        raise CheckpointDamaged(f"checkpoint {path} cannot be read: "
                                f"{exc.strerror or exc}") from None
    try:
        raw = _header_metadata(data)
        tensors = load_bytes(data)
        meta = json.loads(raw[META_KEY])
        expected = raw.get(CHECKSUM_KEY)
        if expected is not None and tensors_checksum(tensors) != expected:
            raise ValueError("its tensors do not match their checksum")
        _check_meta(meta, tensors)
    except (SafetensorError, KeyError, ValueError, TypeError, RuntimeError) as exc:
        detail = " ".join(str(exc).split())[:160] or type(exc).__name__
        raise CheckpointDamaged(f"checkpoint {path} is damaged or not an engine checkpoint "
                                f"({detail}); resume from an earlier one in the same "
                                "checkpoints/ folder") from None
    return tensors, meta


class CheckpointMismatch(UserError):
    """A checkpoint's tensors do not fit the modules built from the config (a size or a
    parameter name differs); ``component`` is the prefix that failed (``representation``)."""

    def __init__(self, component: str, detail: str):
        super().__init__(f"{component}: {detail}")
        self.component = component
        self.detail = detail


def _mismatch(module: torch.nn.Module, sub: Dict[str, Tensor]) -> Optional[str]:
    """The first way ``sub`` does not fit ``module``'s state dict, in words (None: it fits)."""
    own = module.state_dict()
    for key, value in own.items():
        if key not in sub:
            return f"the checkpoint has no tensor '{key}'"
        if tuple(sub[key].shape) != tuple(value.shape):
            return (f"tensor '{key}' is {list(sub[key].shape)} in the checkpoint but "
                    f"{list(value.shape)} in the model the config builds")
    extra = sorted(set(sub) - set(own))
    if extra:
        return f"the checkpoint has tensors the model does not: {', '.join(extra[:3])}"
    return None


def restore(tensors: Dict[str, Tensor], meta: Dict[str, Any], *,
            modules: Dict[str, torch.nn.Module],
            optimizer: Optional[torch.optim.Optimizer]) -> None:
    """Load what :func:`save` wrote back into live modules and optimiser (strictly: a
    tensor that is missing, extra or of another shape raises CheckpointMismatch)."""
    for prefix, module in modules.items():
        sub = {k[len(prefix) + 1:]: v for k, v in tensors.items() if k.startswith(prefix + ".")}
        problem = _mismatch(module, sub)
        if problem is not None:
            raise CheckpointMismatch(prefix, problem)
        try:
            module.load_state_dict(sub, strict=True)
        except RuntimeError as exc:
            raise CheckpointMismatch(prefix, str(exc).splitlines()[-1].strip()) from None
    if optimizer is not None and "optimizer" in meta:
        # the live groups' hyper-parameters, before load_state_dict replaces them
        reference = [{k: v for k, v in g.items() if k != "params"}
                     for g in optimizer.param_groups]
        try:
            optimizer.load_state_dict(_unflatten_optimizer(tensors, meta["optimizer"]))
        except (ValueError, KeyError, RuntimeError, TypeError, IndexError) as exc:
            raise CheckpointMismatch("optimizer", str(exc).splitlines()[0]) from None
        _check_groups(meta["optimizer"]["param_groups"], reference)


def _check_groups(saved: List[dict], live: List[dict]) -> None:
    """The restored hyper-parameters (betas, eps, ...) must have the types the optimiser
    uses: a crafted string or NaN there would fail only inside optimizer.step()."""
    for group, ref in zip(saved, live):
        for key, value in ref.items():
            if key == "params" or key not in group:
                continue
            got = group[key]
            if isinstance(value, bool) or value is None or isinstance(value, str):
                ok = got is None or isinstance(got, type(value)) or value is None
            elif isinstance(value, (int, float)):
                ok = isinstance(got, (int, float)) and not isinstance(got, bool) \
                    and math.isfinite(got)
            elif isinstance(value, (list, tuple)):
                ok = isinstance(got, (list, tuple)) and len(got) == len(value) and all(
                    isinstance(x, (int, float)) and not isinstance(x, bool)
                    and math.isfinite(x) for x in got)
            else:
                ok = True
            if not ok:
                raise CheckpointMismatch("optimizer", f"hyper-parameter '{key}' is {got!r} "
                                                      "in the checkpoint")


def nonfinite_tensors(tensors: Dict[str, Tensor]) -> List[str]:
    """Names of the floating-point tensors holding NaN or inf (one reduction per tensor)."""
    bad = []
    for name, value in tensors.items():
        if value.is_floating_point() and value.numel() and \
                not bool(torch.isfinite(value.sum(dtype=torch.float64))):
            bad.append(name)
    return bad


def list_checkpoints(folder: Path) -> List[Path]:
    """Checkpoints in training order (stage index, then step)."""
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if NAME_RE.match(p.name))


def prune(folder: Path, keep: int, keep_also: Callable[[Path], bool] = lambda path: False
          ) -> None:
    """Delete all but the newest ``keep`` (>= 1) checkpoints of ``folder``, not counting
    those ``keep_also`` keeps anyway (the engine's stage ends)."""
    periodic = [p for p in list_checkpoints(folder) if not keep_also(p)]
    for p in periodic[:-keep]:
        p.unlink(missing_ok=True)


def find_resume_checkpoint(path: Path) -> Tuple[Path, Path]:
    """``resume=`` accepts a run folder or a checkpoint file; returns (run_dir, checkpoint)."""
    path = Path(path)
    if path.is_file():
        if not NAME_RE.match(path.name):
            raise UserError(f"resume={path} is not an engine checkpoint (expected "
                            "checkpoints/NN-STAGE-STEP.safetensors or a run folder)")
        return path.parent.parent, path
    if not path.is_dir():
        raise UserError(f"resume={path} does not exist; give a run folder or a checkpoint")
    found = list_checkpoints(path / "checkpoints")
    if not found:
        raise UserError(f"resume={path}: no checkpoint in {path / 'checkpoints'}; the run "
                        "stopped before its first checkpoint, start it again")
    return path, newest_intact(found)


def newest_intact(found: List[Path]) -> Path:
    """The newest of ``found`` (in training order) that reads and matches its checksum. When
    newer ones are damaged (a disk error, a copy cut short), one line on stderr says which
    were skipped; the resume then starts from the intact one, which drops the later files
    as any resume from an earlier checkpoint does. All damaged: the newest one's error."""
    import sys

    damaged: List[Tuple[Path, str]] = []
    for path in reversed(found):
        try:
            load(path)
        except CheckpointDamaged as exc:
            damaged.append((path, str(exc)))
            continue
        if damaged:
            names = ", ".join(p.name for p, _ in damaged)
            print(f"note: checkpoint {names} {'is' if len(damaged) == 1 else 'are'} damaged "
                  f"(checksum or format); resuming from the newest intact one, {path.name}",
                  file=sys.stderr)
        return path
    raise CheckpointDamaged(damaged[0][1])
