"""The single entry for loading a multi-view diffusion model.

``load_multiview_model(name_or_path)`` accepts

* a converted folder (``engine_model.json`` inside) -> loaded as is; a relative path that
  is not under the working directory is looked up in the project too, so the shipped toy
  models (``models/toy/stage2``) are found from anywhere;
* a raw ``.pt`` / ``.ckpt`` / ``.safetensors`` checkpoint in LDM naming -> converted once
  into ``<stem>.engine/`` next to it (or, when that folder is not writable, under
  ``~/.cache/distill-engine/converted/``), then loaded; the cache is redone when the source
  file changes size or time;
* ``random:isotropic3d`` / ``random:mvdream``: the released architecture with random weights
  (:mod:`guidance.multiview.random_models`: real sizes without the real weights);
* a Hugging Face hub id: ``pkunliu/Isotropic3D`` and ``MVDream/MVDream`` name their released
  checkpoint files; ``org/repo:FILE`` picks a file; any other ``org/repo`` must be a
  converted folder (downloaded whole).

Whatever is unavailable (offline, not downloaded, not found) raises a one-line UserError that
says what to download and which key to set. :func:`check_available` does the same checks
without loading anything heavy, so a run fails at its start.
"""

from __future__ import annotations

import os
import re
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Optional, Tuple

import torch

from engine.resources import toy_model_path
from engine.errors import UserError

DEFAULT_KEY = "stages.<stage>.guidance.model"
CHECKPOINT_SUFFIXES = (".pt", ".ckpt", ".pth", ".safetensors", ".bin")

#: hub id -> (checkpoint file, camera convention of its released code)
KNOWN_HUB_MODELS = {
    "pkunliu/Isotropic3D": ("isotropic3d.ckpt", "isotropic3d-release"),
    "MVDream/MVDream": ("sd-v2.1-base-4view.pt", "mvdream"),
}

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+(:[^/\\:][^:]*)?$")


def cache_root() -> Path:
    return Path(os.environ.get("DISTILL_ENGINE_CACHE",
                               Path.home() / ".cache" / "distill-engine")) / "converted"


def _is_hub_id(name: str) -> bool:
    return bool(_HUB_ID.match(name)) and not name.startswith((".", "/", "~"))


def _hub_parts(name: str) -> Tuple[str, Optional[str], Optional[str]]:
    """(repo, checkpoint file or None for a converted folder, convention or None)."""
    repo, _, filename = name.partition(":")
    if filename:
        return repo, filename, None
    if repo in KNOWN_HUB_MODELS:
        return (repo,) + KNOWN_HUB_MODELS[repo]
    return repo, None, None


def _not_available(what: str, download: str, key: str, why: str = "") -> UserError:
    why = f" ({why})" if why else ""
    return UserError(f"{what} is not available{why}; {download}, then set {key}=PATH "
                     "(a converted folder or the checkpoint file)")


def _hub_error(repo: str, filename: Optional[str], key: str, exc: BaseException) -> UserError:
    from huggingface_hub import constants

    mode = "offline" if constants.HF_HUB_OFFLINE else "download failed"
    first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
    target = f"{repo} {filename}" if filename else repo
    return _not_available(f"model {target} (no local path of that name; Hugging Face Hub)",
                          f"download it on a machine with network (hf download {target})",
                          key, f"{mode}: {first}")


def _cached_hub_file(repo: str, filename: str) -> Optional[str]:
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(repo, filename)
    return found if isinstance(found, str) else None


def _download_hub(name: str, key: str) -> Tuple[Path, Optional[str]]:
    """Fetch a hub id; returns (local file or folder, convention hint)."""
    repo, filename, convention = _hub_parts(name)
    try:
        import huggingface_hub as hub
    except ImportError:
        raise UserError("huggingface_hub is not installed; pip install huggingface_hub or set "
                        f"{key}=PATH") from None
    target = f"{repo} {filename}" if filename else repo
    if not (filename and _cached_hub_file(repo, filename)):
        # never silent: a released checkpoint is gigabytes (huggingface_hub shows the bar)
        print(f"downloading {target} from the Hugging Face Hub into its cache (set {key}=PATH "
              "to use a local copy; HF_HUB_OFFLINE=1 forbids downloads)", file=sys.stderr)
    try:
        if filename:
            return Path(hub.hf_hub_download(repo, filename)), convention
        return Path(hub.snapshot_download(repo)), convention
    except Exception as exc:  # offline, not found, gated, network: all the user's to fix
        raise _hub_error(repo, filename, key, exc) from None


def _source_stamp(src: Path) -> dict:
    st = src.stat()
    return {"path": str(src.resolve()), "size": st.st_size, "mtime": st.st_mtime}


def cache_folder_for(src: Path) -> Path:
    """Where a raw checkpoint's conversion lives: ``<stem>.engine`` beside it when writable."""
    src = Path(src)
    beside = src.parent / (src.stem + ".engine")
    if os.access(src.parent, os.W_OK) or beside.exists():
        return beside
    import hashlib

    digest = hashlib.sha1(str(src.resolve()).encode()).hexdigest()[:12]
    return cache_root() / f"{src.stem}-{digest}"


def _cache_is_fresh(folder: Path, src: Path) -> bool:
    from guidance.multiview.model import read_index

    try:
        index = read_index(folder)
    except UserError:
        return False
    stamp, now = index.get("source", {}), _source_stamp(src)
    return stamp.get("size") == now["size"] and abs(stamp.get("mtime", -1) - now["mtime"]) < 1e-3


def convert_cached(src: Path, unet="auto", clip=None, echo: bool = True) -> Path:
    """Convert ``src`` once into its cache folder (atomic rename); returns the folder. The
    UNet's sizes are inferred from the checkpoint (``unet="auto"``; convert by hand with
    ``config=`` for a model whose attention heads are not the SD convention)."""
    from guidance.multiview.convert import convert_file

    src = Path(src)
    folder = cache_folder_for(src)
    if _cache_is_fresh(folder, src):
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=folder.name + ".tmp-", dir=folder.parent))
    try:
        convert_file(src, tmp, unet=unet, clip=clip, echo=echo)
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(tmp, folder)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return folder


def _resolve(name_or_path: str, key: str, fetch: bool) -> Tuple[Path, str, Optional[str]]:
    """(local path, "folder" | "checkpoint", convention hint). ``fetch``: download hub files;
    otherwise only look in the local Hugging Face cache (and ask the hub whether it exists)."""
    name = str(name_or_path)
    path = Path(name).expanduser()
    if not path.is_absolute() and not path.exists() and toy_model_path(path).exists():
        path = toy_model_path(path)              # the shipped toy models, from any directory
    if path.is_dir():
        return path, "folder", None
    if path.is_file():
        if path.suffix not in CHECKPOINT_SUFFIXES:
            raise UserError(f"{path} is not a checkpoint ({', '.join(CHECKPOINT_SUFFIXES)}) nor "
                            f"a converted folder; set {key}=PATH")
        return path, "checkpoint", None
    if not _is_hub_id(name) or path.suffix in CHECKPOINT_SUFFIXES:
        raise UserError(f"model {name} not found (no such file or folder); set {key}=PATH to a "
                        "converted folder or checkpoint, or to a hub id like pkunliu/Isotropic3D")
    if fetch:
        local, convention = _download_hub(name, key)
        return local, ("checkpoint" if local.is_file() else "folder"), convention
    return _probe_hub(name, key)


def _probe_hub(name: str, key: str) -> Tuple[Path, str, Optional[str]]:
    """Cheap availability check of a hub id: the local cache, else a metadata request."""
    repo, filename, convention = _hub_parts(name)
    try:
        import huggingface_hub as hub
        from huggingface_hub import constants
    except ImportError:
        raise UserError("huggingface_hub is not installed; pip install huggingface_hub or set "
                        f"{key}=PATH") from None
    probe = filename or "engine_model.json"
    cached = _cached_hub_file(repo, probe)
    if cached:
        local = Path(cached) if filename else Path(cached).parent
        return local, ("checkpoint" if filename else "folder"), convention
    if constants.HF_HUB_OFFLINE:
        raise _hub_error(repo, filename, key, RuntimeError("HF_HUB_OFFLINE is set and the file "
                                                           "is not in the local cache"))
    try:
        exists = hub.file_exists(repo, probe)
    except Exception as exc:
        raise _hub_error(repo, filename, key, exc) from None
    if not exists:
        raise _hub_error(repo, filename, key, FileNotFoundError(f"{probe} is not in {repo}"))
    return Path(name), "remote", convention


def check_available(name_or_path: str, key: str = DEFAULT_KEY) -> None:
    """Raise the one-line UserError that loading would raise, without loading weights."""
    from guidance.multiview.model import read_index
    from guidance.multiview.random_models import check_random, is_random

    if is_random(name_or_path):
        check_random(name_or_path, key)
        return
    local, kind, _ = _resolve(name_or_path, key, fetch=False)
    if kind == "folder":
        read_index(local)
        for part in ("unet",):
            if not (local / part).is_dir():
                raise UserError(f"{local} lacks its {part}/ folder; convert the model again")
    elif kind == "checkpoint":
        cached = cache_folder_for(local)
        if not _cache_is_fresh(cached, local) and not os.access(local, os.R_OK):
            raise UserError(f"checkpoint {local} is not readable; set {key}=PATH")


def load_multiview_model(name_or_path: str, device=None, dtype: Optional[torch.dtype] = None,
                         convention: Optional[str] = None, key: str = DEFAULT_KEY,
                         load_conditioner: bool = True):
    """A converted folder, raw checkpoint or hub id -> frozen MultiViewDiffusionModel.

    ``convention`` overrides the camera convention stored in the model (default: the
    folder's; for a known hub checkpoint, that of its released code).
    """
    from guidance.multiview.model import MultiViewDiffusionModel
    from guidance.multiview.random_models import check_random, is_random, random_release_model

    if is_random(name_or_path):
        check_random(name_or_path, key)
        model = random_release_model(name_or_path, device=device, dtype=dtype,
                                     load_conditioner=load_conditioner)
        if convention:
            model.info.camera_convention = convention
        return model
    from engine.progress import bar

    local, kind, hint = _resolve(name_or_path, key, fetch=True)
    folder = convert_cached(local) if kind == "checkpoint" else local
    overrides = {}
    if convention or hint:
        overrides["camera_convention"] = convention or hint
    # a released model takes tens of seconds to read: say what is happening on a terminal
    with bar(1, f"loading model {folder}", unit="model") as progress:
        model = MultiViewDiffusionModel.from_pretrained(folder, device=device, dtype=dtype,
                                                        load_conditioner=load_conditioner,
                                                        **overrides)
        progress.update(1)
    return model
