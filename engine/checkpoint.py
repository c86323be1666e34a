"""Checkpoints: one safetensors file per save, written atomically, no pickle anywhere.

A checkpoint holds the trainable state of a stage (representation, background, optimiser),
never a frozen model. Tensors are stored under prefixed names (``representation.*``,
``background.*``, ``optimizer.state.<i>.<key>``); everything else (stage, step, optimiser
hyper-parameters) is JSON in the file's metadata.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor

from engine.errors import UserError

META_KEY = "engine"


class NonFiniteState(ValueError):
    """:func:`save` was asked to write NaN/inf tensors (it writes nothing)."""

NAME_RE = re.compile(r"^(\d+)-(.+)-(\d+)\.safetensors$")


def checkpoint_name(stage_index: int, stage: str, step: int) -> str:
    """Names sort in training order: ``01-nerf-0000500.safetensors``."""
    return f"{stage_index:02d}-{stage}-{step:07d}.safetensors"


def atomic_write(path: Path, write) -> None:
    """Call ``write(tmp_path)`` then rename onto ``path``: readers never see half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(Path(tmp))
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda p: p.write_text(text))


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


def save(path: Path, *, modules: Dict[str, torch.nn.Module],
         optimizer: Optional[torch.optim.Optimizer], info: Dict[str, Any]) -> Path:
    """Write ``modules``' state dicts, the optimiser state and ``info`` (JSON) to ``path``."""
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
    atomic_write(path, lambda p: save_file(tensors, str(p),
                                           metadata={META_KEY: json.dumps(meta)}))
    return path


def load(path: Path) -> Tuple[Dict[str, Tensor], Dict[str, Any]]:
    """Read a checkpoint: (tensors, metadata). A damaged file is a clear user error."""
    path = Path(path)
    try:
        tensors = load_file(str(path))
        from safetensors import safe_open
        with safe_open(str(path), framework="pt") as f:
            meta = json.loads((f.metadata() or {})[META_KEY])
    except FileNotFoundError:
        raise UserError(f"checkpoint not found: {path}")
    except (SafetensorError, KeyError, json.JSONDecodeError, OSError) as exc:
        raise UserError(f"checkpoint {path} is damaged or not an engine checkpoint ({exc}); "
                        "resume from an earlier one in the same checkpoints/ folder")
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
        try:
            optimizer.load_state_dict(_unflatten_optimizer(tensors, meta["optimizer"]))
        except (ValueError, KeyError, RuntimeError) as exc:
            raise CheckpointMismatch("optimizer", str(exc).splitlines()[0]) from None


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
    return path, found[-1]
