"""The converted Point-E folder and the single entry for loading one.

A converted model is a folder of two files::

    model.safetensors   the PointTransformer state dict (our names, [Q|K|V] attention rows)
    config.json         {"format", "version", "name", "config": PointModelConfig fields,
                         "source": the checkpoint it came from}

``config.json`` is written last (each file atomically), so an interrupted save is never
mistaken for a model. ``load_point_model(path_or_name)`` accepts

* a converted folder -> the model, frozen, in eval mode;
* ``random:NAME`` (a preset, e.g. ``random:base40M`` or ``random:tiny-grid``): the released
  architecture with random weights from a fixed seed (sizes without the weights);
* anything else (a release name such as ``base40M``, a hub id, a missing folder, a raw
  ``.pt``) -> a one-line UserError: the weights are not downloadable here, they must be
  converted locally, and the line says from which URL and with which command.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional, Tuple

import torch

from engine.atomic import atomic_write, atomic_write_text
from engine.errors import ConfigError, UserError
from guidance.pointcloud.transformer import (PRESETS, PointModelConfig, PointTransformer,
                                             preset)

FORMAT_NAME = "distill-engine-point-model"
FORMAT_VERSION = 1
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
RANDOM_PREFIX = "random:"
RELEASE_URL = "https://openaipublic.azureedge.net/main/point-e/"
#: release name -> checkpoint file at RELEASE_URL (point_e/models/download.py)
RELEASE_FILES = {
    "base40M-imagevec": "base_40m_imagevec.pt",
    "base40M-uncond": "base_40m_uncond.pt",
    "base40M": "base_40m.pt",
    "base300M": "base_300m.pt",
    "base1B": "base_1b.pt",
    "upsample": "upsample_40m.pt",
}
CONVERT = "python -m guidance.pointcloud.convert"


def how_to_convert(name: Optional[str] = None, src: Optional[str] = None) -> str:
    """The instruction for getting a converted folder (one sentence, no line breaks)."""
    if name in RELEASE_FILES:
        file = RELEASE_FILES[name]
        get = f"download {RELEASE_URL}{file} on a machine with network"
        return f"{get}, then run {CONVERT} {src or file} OUT model={name} and use OUT"
    model = name if name in PRESETS else "NAME"
    return (f"download the release checkpoint (e.g. {RELEASE_URL}base_40m.pt) on a machine "
            f"with network, then run {CONVERT} {src or 'CHECKPOINT.pt'} OUT model={model} "
            f"(NAME: {', '.join(RELEASE_FILES)}) and use OUT")


def _guess_release_name(path: Path) -> Optional[str]:
    for name, file in RELEASE_FILES.items():
        if path.name == file:
            return name
    return None


def save_point_model(model: PointTransformer, folder, name: Optional[str] = None,
                     extra: Optional[dict] = None) -> Path:
    """Write ``folder``/model.safetensors then config.json (each atomically; an old
    config.json is removed first, so the folder is a model only once both are new)."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    index = folder / CONFIG_FILE
    if index.exists():
        index.unlink()
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    atomic_write(folder / WEIGHTS_FILE,
                 lambda tmp: save_file(state, str(tmp), metadata={"format": FORMAT_NAME}))
    data = {"format": FORMAT_NAME, "version": FORMAT_VERSION, "name": name,
            "config": model.config.to_dict(), **(extra or {})}
    atomic_write_text(index, json.dumps(data, indent=2))
    return folder


def read_point_config(folder) -> Tuple[dict, PointModelConfig]:
    """(config.json's content, the model config) of a converted folder; UserError when the
    folder is not one."""
    folder = Path(folder)
    path = folder / CONFIG_FILE
    if not path.is_file():
        raise UserError(f"{folder} is not a converted Point-E folder ({CONFIG_FILE} missing); "
                        + how_to_convert())
    try:
        data = json.loads(path.read_text())
        if not isinstance(data, dict) or data.get("format") != FORMAT_NAME:
            raise ValueError(f"not a {FORMAT_NAME} config")
        if int(data.get("version", 0)) > FORMAT_VERSION:
            raise UserError(f"{path} has format version {data.get('version')}; this engine "
                            f"reads up to {FORMAT_VERSION}: update the engine")
        config = PointModelConfig.from_dict(data["config"])
    except UserError:
        raise
    except (OSError, ValueError, KeyError, TypeError, ConfigError) as exc:
        first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else repr(exc)
        raise UserError(f"{path} is not a valid converted Point-E config ({first}); convert "
                        "the checkpoint again") from None
    return data, config


def _load_folder(folder: Path) -> PointTransformer:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    _, config = read_point_config(folder)
    weights = folder / WEIGHTS_FILE
    if not weights.is_file():
        raise UserError(f"{folder} lacks {WEIGHTS_FILE}; convert the checkpoint again")
    try:
        state = load_file(str(weights))
    except (SafetensorError, OSError, ValueError) as exc:
        raise UserError(f"{weights} is unreadable ({str(exc).splitlines()[0][:200]}); convert "
                        "the checkpoint again") from None
    with torch.device("meta"):
        model = PointTransformer(config)
    try:
        model.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as exc:
        lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
        raise UserError(f"{weights} does not match its config ({(lines[1:] or lines)[0][:200]})"
                        "; convert the checkpoint again") from None
    return model


def random_point_model(name: str, seed: int = 0) -> PointTransformer:
    """A preset's architecture with random weights from ``seed`` (the output projection too,
    unlike the released zero initialisation, so the model predicts something)."""
    config = preset(name)
    state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        model = PointTransformer(config)
        torch.nn.init.normal_(model.point_out.weight, std=0.02)
    finally:
        torch.random.set_rng_state(state)
    return model


def load_point_model(path_or_name, device=None, dtype: Optional[torch.dtype] = None,
                     trainable: bool = False) -> PointTransformer:
    """A converted folder (or ``random:NAME``) -> PointTransformer in eval mode, frozen
    unless ``trainable``. Anything else is a one-line UserError saying how to convert."""
    name = str(path_or_name)
    if name.startswith(RANDOM_PREFIX):
        arch = name[len(RANDOM_PREFIX):]
        if arch not in PRESETS:
            raise UserError(f"'{name}' is not a random Point-E model; use random:NAME with NAME "
                            f"one of {', '.join(PRESETS)}")
        model = random_point_model(arch)
    else:
        path = Path(name).expanduser()
        if path.is_dir():
            model = _load_folder(path)
        elif path.is_file():
            guess = _guess_release_name(path)
            raise UserError(f"{path} is a file, not a converted Point-E folder; convert it "
                            f"first: {CONVERT} {path} OUT model={guess or 'NAME'}, then use OUT"
                            + ("" if guess else f" (NAME: {', '.join(RELEASE_FILES)})"))
        else:
            what = ("a Point-E release name" if name in RELEASE_FILES else
                    "not a local folder (Point-E weights are not on the Hugging Face Hub; "
                    "nothing is downloaded)" if "/" in name and not os.path.isabs(name)
                    else "no such folder")
            raise UserError(f"Point-E model '{name}' is not available ({what}); the weights "
                            "must be converted locally: " + how_to_convert(name))
    kwargs = {k: v for k, v in (("device", device), ("dtype", dtype)) if v is not None}
    if kwargs:
        model = model.to(**kwargs)
    model.eval()
    if not trainable:
        model.requires_grad_(False)
    return model


__all__ = ["load_point_model", "save_point_model", "read_point_config", "random_point_model",
           "how_to_convert", "RELEASE_FILES", "RELEASE_URL", "FORMAT_NAME", "CONFIG_FILE",
           "WEIGHTS_FILE"]
