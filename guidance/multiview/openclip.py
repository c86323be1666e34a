"""OpenCLIP I/O for the multi-view models' conditioners (library; no plugins here).

Building, stripping, saving and loading OpenCLIP models, the CLIP picture preprocessing and
the text tower's penultimate tokens. The registered conditioner plugins that wrap them
(``openclip-image``, ``openclip-text``) are in :mod:`guidance.conditioners`.

Weights come from an OpenCLIP architecture name + pretrained tag (Hugging Face cache), an
``hf-hub:org/repo`` id, or a local folder in OpenCLIP's own format (``open_clip_config.json``
with ``model_cfg`` + ``open_clip_model.safetensors``). A conditioner keeps only its tower:
the image conditioner stores ``visual.*`` only, the text conditioner everything but
``visual.*`` (as the released checkpoints do), so its saved folder loads through
:func:`load_openclip_folder`; a folder holding a complete model (e.g. from
:func:`save_openclip_folder` on a full CLIP) also loads with
``open_clip.create_model("local-dir:" + path)``.

Tiny models for tests: :func:`tiny_openclip_config` (vision input 32 px, patch 8; the
preprocessing resizes to the tower's own ``image_size`` so tiny models stay cheap).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from engine.errors import UserError

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
CONFIG_FILE = "open_clip_config.json"
WEIGHTS_FILE = "open_clip_model.safetensors"
DEFAULT_KEY = "stages.<stage>.guidance.model"
LOCAL_PREFIX = "local-dir:"
HUB_PREFIX = "hf-hub:"

#: which state-dict keys a tower keeps (OpenCLIP naming)
TOWERS = ("image", "text")
#: the image conditioner's context layouts, and the folder-config key that records one
IMAGE_TOKENS = ("pooled", "patches")
TOKENS_KEY = "engine_image_tokens"


def tiny_openclip_config() -> dict:
    """A small OpenCLIP ``model_cfg``: embed 32; vision width 32, 2 layers, patch 8 on 32 px
    (16 tokens); text width 32, 2 layers, 2 heads, context 77, the real 49408-token vocabulary
    (so the stock tokenizer applies)."""
    return {
        "embed_dim": 32,
        "vision_cfg": {"image_size": 32, "layers": 2, "width": 32, "head_width": 16,
                       "patch_size": 8},
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2,
                     "layers": 2},
    }


# -- pure functions ----------------------------------------------------------------------

def clip_preprocess(rgb: Tensor, size: int) -> Tensor:
    """[N, 3, H, W] in [0, 1] -> [N, 3, size, size] normalised with the CLIP mean/std.

    Bicubic, antialiased resize (PIL-like); no cropping (the input is square). The caller
    composites on white first. Differentiable with respect to ``rgb``.
    """
    x = rgb
    if x.shape[-2:] != (size, size):
        x = F.interpolate(x, size=(size, size), mode="bicubic", align_corners=False,
                          antialias=True)
    mean = torch.tensor(CLIP_MEAN, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return (x - mean) / std


def clip_image_size(clip: nn.Module) -> int:
    """The side of the square pictures an OpenCLIP image tower takes (an int or a pair)."""
    size = clip.visual.image_size
    return int(size[0] if isinstance(size, (tuple, list)) else size)


def causal_mask(length: int, device=None, dtype=torch.float32) -> Tensor:
    """[L, L] additive mask: 0 on and below the diagonal, -inf above (OpenCLIP's)."""
    return torch.full((length, length), float("-inf"), device=device, dtype=dtype).triu_(1)


def text_penultimate(clip: nn.Module, tokens: Tensor) -> Tensor:
    """OpenCLIP text tokens [N, L] -> [N, L, D]: embeddings, all blocks but the last, ln_final.

    Differentiable with respect to the text tower's weights.
    """
    dtype = clip.token_embedding.weight.dtype
    x = clip.token_embedding(tokens).to(dtype) + clip.positional_embedding.to(dtype)
    mask = causal_mask(x.shape[1], x.device, dtype)
    transformer = clip.transformer
    batch_first = getattr(transformer, "batch_first", True)
    if not batch_first:
        x = x.transpose(0, 1)
    for block in transformer.resblocks[:-1]:
        x = block(x, attn_mask=mask)
    if not batch_first:
        x = x.transpose(0, 1)
    return clip.ln_final(x)


# -- building, stripping, saving and loading OpenCLIP models ------------------------------

def _clip_class(model_cfg: dict):
    import open_clip

    if model_cfg.get("custom_text") or "hf_model_name" in model_cfg.get("text_cfg", {}) \
            or "timm_model_name" in model_cfg.get("vision_cfg", {}):
        raise UserError("only OpenCLIP models with the built-in ViT and text transformer are "
                        "supported as conditioners (no timm / Hugging Face towers)")
    return open_clip.model.CLIP


def strip_towers(clip: nn.Module, keep: str) -> nn.Module:
    """Drop what a ``keep`` ("image" | "text") conditioner never uses, in place.

    image: only ``visual`` stays. text: everything but ``visual``, ``text_projection`` and
    ``logit_scale`` (the penultimate tokens need neither).
    """
    if keep not in TOWERS:
        raise ValueError(f"keep must be one of {TOWERS}, got {keep!r}")
    drop = (("transformer", "token_embedding", "ln_final", "positional_embedding",
             "text_projection", "logit_scale", "logit_bias") if keep == "image"
            else ("visual", "text_projection", "logit_scale", "logit_bias"))
    for name in drop:
        if hasattr(clip, name):
            setattr(clip, name, None)
    if keep == "image" and hasattr(clip, "attn_mask"):
        clip.attn_mask = None
    return clip


def build_openclip(model_cfg: dict, keep: Optional[str] = None, seed: Optional[int] = None,
                   meta: bool = False) -> nn.Module:
    """An OpenCLIP CLIP from ``model_cfg`` with random (or, ``meta=True``, no) weights,
    stripped to ``keep`` when given."""
    cls = _clip_class(model_cfg)
    cfg = {k: v for k, v in model_cfg.items() if k != "custom_text"}
    if meta:
        with torch.device("meta"):
            clip = cls(**cfg)
    else:
        if seed is not None:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                clip = cls(**cfg)
        else:
            clip = cls(**cfg)
    if keep is not None:
        strip_towers(clip, keep)
    return clip


def load_into_clip(model_cfg: dict, state_dict: Dict[str, Tensor], keep: str
                   ) -> Tuple[nn.Module, List[str], List[str]]:
    """Build a stripped CLIP without allocating and take ``state_dict``'s tensors.

    Returns (clip, missing, unused): ``missing`` are keys the tower needs and did not get
    (those stay on the meta device: the caller must refuse the model), ``unused`` are keys
    of parts the tower drops or does not have. Raises UserError on a shape mismatch.
    """
    clip = build_openclip(model_cfg, keep=keep, meta=True)
    try:
        result = clip.load_state_dict(state_dict, strict=False, assign=True)
    except RuntimeError as exc:
        raise UserError("OpenCLIP weights do not fit the architecture "
                        f"({_first_line(exc)})") from None
    if keep == "text":
        L = clip.positional_embedding.shape[0]
        clip.attn_mask = causal_mask(L, clip.positional_embedding.device)
    return clip, list(result.missing_keys), list(result.unexpected_keys)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return " ".join(t.strip() for t in text[:3])[:300] if text else type(exc).__name__


def save_openclip_folder(clip: nn.Module, model_cfg: dict, folder, keep: Optional[str] = None,
                         image_size: Optional[int] = None, extra: Optional[dict] = None) -> Path:
    """Write ``open_clip_config.json`` (model_cfg + preprocess_cfg + ``extra``'s keys, which
    OpenCLIP ignores) and ``open_clip_model.safetensors`` (the module's state dict,
    contiguous) into ``folder``."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    size = image_size or model_cfg.get("vision_cfg", {}).get("image_size", 224)
    config = {
        "model_cfg": model_cfg,
        "preprocess_cfg": {"mean": list(CLIP_MEAN), "std": list(CLIP_STD), "size": size,
                           "interpolation": "bicubic", "resize_mode": "squash"},
    }
    if keep is not None:
        config["engine_tower"] = keep
    config.update(extra or {})
    state = {k: v.detach().contiguous() for k, v in clip.state_dict().items()}
    save_file(state, str(folder / WEIGHTS_FILE))
    (folder / CONFIG_FILE).write_text(json.dumps(config, indent=2))
    return folder


def read_folder_config(folder: Path, key: str = DEFAULT_KEY) -> dict:
    """``open_clip_config.json`` of an OpenCLIP folder (it must hold ``model_cfg``); a missing
    or unreadable file is a one-line UserError naming ``key``."""
    folder = Path(folder)
    path = folder / CONFIG_FILE
    if not path.is_file():
        raise UserError(f"{folder} is not an OpenCLIP folder ({CONFIG_FILE} missing); "
                        f"point {key} at a converted model folder")
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise UserError(f"{path} is unreadable ({_first_line(exc)}); convert the model again")
    if "model_cfg" not in config:
        raise UserError(f"{path} has no model_cfg; it is not an OpenCLIP folder config")
    return config


def saved_image_tokens(folder, key: str = DEFAULT_KEY) -> str:
    """The image-context layout an OpenCLIP folder records (pooled when it records none)."""
    folder = Path(folder)
    tokens = read_folder_config(folder, key).get(TOKENS_KEY, "pooled")
    if tokens not in IMAGE_TOKENS:
        raise UserError(f"{folder / CONFIG_FILE}: {TOKENS_KEY} must be one of "
                        f"{', '.join(IMAGE_TOKENS)}, got {tokens!r}; save the model again")
    return tokens


def folder_weights(folder: Path) -> Optional[Path]:
    """The weights file of an OpenCLIP folder (OpenCLIP's and Hugging Face's names), or None."""
    folder = Path(folder)
    for name in (WEIGHTS_FILE, "open_clip_pytorch_model.safetensors",
                 "open_clip_pytorch_model.bin", "model.safetensors", "pytorch_model.bin"):
        if (folder / name).is_file():
            return folder / name
    return None


def read_weights(path) -> Dict[str, Tensor]:
    """A safetensors or (weights_only) torch file -> state dict, ``module.`` and
    ``state_dict`` wrappers removed. Raises UserError when unreadable."""
    path = str(path)
    try:
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file

            sd = load_file(path)
        else:
            sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # corrupt files raise many types
        raise UserError(f"cannot read weights {path} ({_first_line(exc)})") from None
    if isinstance(sd, dict) and isinstance(sd.get("state_dict"), dict):
        sd = sd["state_dict"]
    if not isinstance(sd, dict):
        raise UserError(f"{path} does not hold a state dict")
    if sd and all(k.startswith("module.") for k in sd):
        sd = {k[len("module."):]: v for k, v in sd.items()}
    return sd


def load_openclip_folder(folder, keep: str, key: str = DEFAULT_KEY
                         ) -> Tuple[nn.Module, dict]:
    """Load an OpenCLIP-format folder stripped to ``keep``; returns (clip, model_cfg)."""
    folder = Path(folder)
    config = read_folder_config(folder, key)
    weights = folder_weights(folder)
    if weights is None:
        raise UserError(f"{folder} has no OpenCLIP weights ({WEIGHTS_FILE}); "
                        f"convert the model again or point {key} elsewhere")
    return _load_checked(config["model_cfg"], read_weights(weights), keep, str(folder))


def _load_checked(model_cfg: dict, state_dict: Dict[str, Tensor], keep: str, where: str
                  ) -> Tuple[nn.Module, dict]:
    clip, missing, _unused = load_into_clip(model_cfg, state_dict, keep)
    if missing:
        shown = ", ".join(missing[:4]) + (" ..." if len(missing) > 4 else "")
        raise UserError(f"OpenCLIP weights in {where} lack {len(missing)} {keep}-tower "
                        f"tensors ({shown}); the file holds the other tower or is incomplete")
    return clip, model_cfg


def _offline_hint() -> str:
    try:
        from huggingface_hub import constants

        return "offline" if constants.HF_HUB_OFFLINE else "reachable here"
    except ImportError:
        return "installed (huggingface_hub missing)"


def resolve_openclip(model: str, pretrained: Optional[str], keep: str, key: str = DEFAULT_KEY
                     ) -> Tuple[nn.Module, dict]:
    """Find and load OpenCLIP weights stripped to ``keep``; returns (clip, model_cfg).

    ``model``: ``local-dir:PATH`` or a folder path (OpenCLIP format), ``hf-hub:org/repo``,
    or an architecture name (``ViT-H-14``) with ``pretrained`` a tag (``laion2b_s32b_b79k``)
    or a weights file. Missing weights raise a one-line UserError naming what to download
    and ``key``.
    """
    import open_clip

    if model.startswith(LOCAL_PREFIX) or Path(model).is_dir():
        folder = Path(model[len(LOCAL_PREFIX):] if model.startswith(LOCAL_PREFIX) else model)
        if not folder.is_dir():
            raise UserError(f"OpenCLIP folder {folder} does not exist; point {key} at a "
                            "converted model folder")
        return load_openclip_folder(folder, keep, key)
    if model.startswith(HUB_PREFIX):
        repo = model[len(HUB_PREFIX):]
        try:
            from open_clip.pretrained import download_pretrained_from_hf

            cfg_path = download_pretrained_from_hf(repo, filename=CONFIG_FILE)
            weights = download_pretrained_from_hf(repo)
        except Exception as exc:
            raise UserError(
                f"OpenCLIP model {model} is not available (Hugging Face Hub {_offline_hint()}: "
                f"{_first_line(exc)}); download it on a machine with network or point {key} at "
                "a converted folder") from None
        config = json.loads(Path(cfg_path).read_text())
        model_cfg = config.get("model_cfg", config)
        return _load_checked(model_cfg, read_weights(weights), keep, model)
    model_cfg = open_clip.get_model_config(model)
    if model_cfg is None:
        from engine.errors import did_you_mean

        raise UserError(f"unknown OpenCLIP architecture '{model}'"
                        f"{did_you_mean(model, open_clip.list_models())}; set {key}")
    if not pretrained:
        raise UserError(f"OpenCLIP {model} needs a pretrained tag or weights file")
    if os.path.isfile(pretrained):
        return _load_checked(model_cfg, read_weights(pretrained), keep, pretrained)
    tag_cfg = open_clip.get_pretrained_cfg(model, pretrained)
    if not tag_cfg:
        from engine.errors import did_you_mean

        tags = open_clip.list_pretrained_tags_by_model(model)
        raise UserError(f"unknown OpenCLIP tag '{pretrained}' for {model}"
                        f"{did_you_mean(pretrained, tags)}; known: {', '.join(tags) or 'none'}")
    why = "no download source"
    try:
        weights = open_clip.pretrained.download_pretrained(tag_cfg)
    except Exception as exc:
        weights, why = None, _first_line(exc)
    if not weights:
        raise UserError(
            f"OpenCLIP weights {model}/{pretrained} are not available offline ({why}); "
            "download them on a machine with network (Hugging Face cache) or point "
            f"{key} at a converted folder") from None
    return _load_checked(model_cfg, read_weights(weights), keep, f"{model}/{pretrained}")
