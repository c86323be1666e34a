"""The Compress3D models' folders: ``config.json`` (a ``kind``, the model's config and any
extra record) beside ``model.safetensors``.

A folder is a model only once its config.json is written, which is last: a save cut short
leaves a folder that the loaders refuse in one line, never half a model.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Optional

import torch

from engine.errors import ConfigError, UserError

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"


def save_model_folder(module: torch.nn.Module, folder, kind: str, config,
                      extra: Optional[dict] = None) -> Path:
    """Write ``module``'s weights, then config.json ``{"kind", "config": asdict(config),
    **extra}``, into ``folder`` (created). Returns the folder."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if (folder / CONFIG_FILE).exists():      # not a model until config.json is new
        (folder / CONFIG_FILE).unlink()
    state = {k: t.detach().cpu().contiguous() for k, t in module.state_dict().items()}
    save_file(state, str(folder / WEIGHTS_FILE))
    record = {"kind": kind, "config": asdict(config), **(extra or {})}
    (folder / CONFIG_FILE).write_text(json.dumps(record, indent=2) + "\n")
    return folder


def read_model_record(folder, kind: str, what: str, hint: str, key: str = "model") -> dict:
    """config.json of a model folder of ``kind``; one line naming ``key`` when the folder is
    not one (``what``: the model's name in that line, ``hint``: where to get one)."""
    folder = Path(folder)
    cfg_path, weights = folder / CONFIG_FILE, folder / WEIGHTS_FILE
    if not cfg_path.is_file() or not weights.is_file():
        raise UserError(f"{key}: {folder} is not a {what} folder (needs {CONFIG_FILE} and "
                        f"{WEIGHTS_FILE}); {hint}")
    try:
        record = json.loads(cfg_path.read_text())
    except (OSError, ValueError) as exc:
        raise UserError(f"{key}: {cfg_path} cannot be read ({exc})") from None
    if not isinstance(record, dict) or record.get("kind") != kind:
        found = record.get("kind") if isinstance(record, dict) else None
        raise UserError(f"{key}: {folder} holds a {found!r} model, not a {what}")
    return record


def build_and_load(model_cls, config_cls, record: dict, folder, key: str = "model"):
    """``model_cls(config_cls(**record["config"]))`` with the folder's weights, in eval mode;
    a config or weights that do not fit are one line naming ``key``."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        model = model_cls(config_cls(**record["config"]))
    except (TypeError, KeyError, ConfigError) as exc:
        raise UserError(f"{key}: {Path(folder) / CONFIG_FILE} has a bad config "
                        f"({str(exc).splitlines()[0][:160]})") from None
    weights = Path(folder) / WEIGHTS_FILE
    try:
        model.load_state_dict(load_file(str(weights)))
    except (SafetensorError, RuntimeError, OSError) as exc:
        raise UserError(f"{key}: {weights} does not fit its config "
                        f"({str(exc).splitlines()[0][:160]})") from None
    return model.eval()


__all__ = ["CONFIG_FILE", "WEIGHTS_FILE", "save_model_folder", "read_model_record",
           "build_and_load"]
