"""Convert a released MVDream ``.pt`` / Isotropic3D ``.ckpt`` into a converted model folder.

    python -m guidance.multiview.convert SRC OUT [config=MODEL.yaml]
        [unet=auto|sd21-base|CONFIG.json] [clip=auto|ViT-H-14|CONFIG.json]
        [convention=auto|mvdream|isotropic3d-release] [dtype=keep|fp32|fp16|bf16]
        [allow_missing=true]

The UNet's architecture, first match wins: ``unet=sd21-base`` (MVDream's sd-v2.1-base size)
or ``unet=FILE.json`` (MultiViewUNetConfig fields) as given; else ``config=MODEL.yaml``, the
release's own LDM config (``model.params.unet_config.params``; e.g. MVDream's
``sd-v1.yaml`` / ``sd-v2-base.yaml``, Isotropic3D's ``mvd_infer.yaml``), which also gives the
VAE's sizes, the conditioner, the noise schedule and the prediction type; else (the default
``unet=auto``) the sizes are inferred from the tensors: everything but the number of attention
heads, assumed 64 channels a head with linear projections (SD 2.x) and 8 heads a level with
1x1-convolution projections (SD 1.x); the summary says what was assumed. A config value this
UNet cannot express is a one-line error naming the key. (Keys are given as ``key=value``;
there is no ``--config``.)

The checkpoint is a plain state dict in the original LDM naming, read with
``torch.load(weights_only=True)`` (a pickle holding anything but tensors and containers is
refused). Keys are split by prefix:

* ``model.diffusion_model.*``  -> the UNet: ``camera_embed.`` becomes ``label_emb.0.`` and
  diffusers' own ``convert_ldm_unet_checkpoint`` (class_embed_type="projection") renames the
  rest;
* ``first_stage_model.*``      -> the VAE via ``convert_ldm_vae_checkpoint`` (its sizes from
  the config's ``first_stage_config``, else read from the tensors' shapes);
* ``cond_stage_model.model.*`` -> an OpenCLIP state dict: ``visual.*`` present means image
  conditioning (Isotropic3D), otherwise text conditioning (MVDream); ``clip=auto`` takes the
  architecture from the config's ``cond_stage_config`` (default ViT-H-14);
* ``cond_stage_model.transformer.*`` (MVDream sd-v1.5's FrozenCLIPEmbedder, a Hugging Face
  CLIP ViT-L/14 text model) -> NOT converted (no such conditioner here): listed as such; the
  UNet and VAE are converted and the model has no conditioner (prompts must be embedded
  elsewhere);
* root schedule buffers (betas, alphas_cumprod, ...) are compared with the scaled-linear
  schedule (the config's betas when given); ``model_ema.*`` is reported as ignored.

Nothing is dropped silently: keys that match no prefix, keys a converter did not consume, and
keys a module did not take are listed; missing keys fail the conversion (a one-line error,
exit code 2, nothing written) unless ``allow_missing=true`` (they then keep their random
initialisation).
"""

from __future__ import annotations

import json
import math
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.nn as nn
from torch import Tensor

from engine.errors import UserError
from guidance.multiview.unet import MultiViewUNetConfig

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
CLIP_PREFIX = "cond_stage_model.model."
HF_CLIP_PREFIX = "cond_stage_model.transformer."
HF_CLIP_REASON = ("text encoder (FrozenCLIPEmbedder, Hugging Face CLIP ViT-L/14): no "
                  "conditioner here reads it (transformers is not a dependency); the model is "
                  "written without one")
EMA_PREFIX = "model_ema."
SCHEDULE_KEYS = (
    "betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod",
    "sqrt_one_minus_alphas_cumprod", "log_one_minus_alphas_cumprod",
    "sqrt_recip_alphas_cumprod", "sqrt_recipm1_alphas_cumprod", "posterior_variance",
    "posterior_log_variance_clipped", "posterior_mean_coef1", "posterior_mean_coef2",
    "logvar",
)
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass
class ConversionReport:
    """What happened to every key of the checkpoint."""

    total: int = 0
    space: str = "latent"
    conditioning: Optional[str] = None
    convention: Optional[str] = None
    architecture: List[str] = field(default_factory=list)        # where the sizes came from
    converted: Dict[str, int] = field(default_factory=dict)      # component -> tensors loaded
    unknown: List[str] = field(default_factory=list)             # matched no prefix / unused
    missing: Dict[str, List[str]] = field(default_factory=dict)  # component -> its names
    unexpected: Dict[str, List[str]] = field(default_factory=dict)
    ignored: Dict[str, List[str]] = field(default_factory=dict)  # reason -> keys
    schedule: List[str] = field(default_factory=list)            # mismatch messages
    not_converted: Dict[str, List[str]] = field(default_factory=dict)  # reason -> keys

    def has_missing(self) -> bool:
        return any(self.missing.values())

    def ok(self, allow_missing: bool = False) -> bool:
        return allow_missing or not self.has_missing()

    def summary(self) -> str:
        lines = [f"checkpoint: {self.total} tensors; space {self.space}; conditioning "
                 f"{self.conditioning or 'none'}; camera convention {self.convention}"]
        lines.extend(f"  {line}" for line in self.architecture)
        for comp, n in self.converted.items():
            lines.append(f"  {comp}: {n} tensors loaded")
        for title, groups in (("MISSING", self.missing), ("NOT CONVERTED", self.not_converted),
                              ("unexpected", self.unexpected), ("ignored", self.ignored)):
            for what, keys in groups.items():
                if keys:
                    lines.append(f"  {title} {what}: {len(keys)}: {_short(keys)}")
        if self.unknown:
            lines.append(f"  unknown (not converted): {len(self.unknown)}: "
                         f"{_short(self.unknown)}")
        for msg in self.schedule:
            lines.append(f"  schedule: {msg}")
        return "\n".join(lines)


def _short(keys: List[str], n: int = 6) -> str:
    return ", ".join(keys[:n]) + (f", ... (+{len(keys) - n})" if len(keys) > n else "")


# -- reading ---------------------------------------------------------------------------

def load_checkpoint(path) -> Dict[str, Tensor]:
    """A ``.pt`` / ``.ckpt`` / ``.safetensors`` -> flat {key: tensor}. Pickles are read with
    ``weights_only=True`` (and memory-mapped when possible); a top-level ``state_dict`` is
    unwrapped. Raises a one-line UserError for a missing, unreadable or unsafe file."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint {path} not found")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except Exception as exc:
            raise UserError(f"cannot read {path} ({_one_line(exc)})") from None
    try:
        try:
            data = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as exc:
            if "mmap" not in str(exc):
                raise
            data = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:
        text = str(exc)
        if "weights_only" in text or "Unsupported global" in text or "WeightsUnpickler" in text:
            raise UserError(
                f"{path} holds Python objects besides tensors; refusing to unpickle it "
                "(torch.load weights_only=True). Re-save its state dict alone as "
                ".safetensors or .pt on a trusted machine") from None
        raise UserError(f"cannot read checkpoint {path} ({_one_line(exc)})") from None
    if isinstance(data, dict) and isinstance(data.get("state_dict"), dict):
        data = data["state_dict"]
    if not isinstance(data, dict):
        raise UserError(f"{path} does not hold a state dict (got {type(data).__name__})")
    flat = {k: v for k, v in data.items() if isinstance(v, Tensor)}
    others = sorted(set(data) - set(flat))
    if others:
        print(f"note: {path.name}: non-tensor entries ignored: {_short(others)}",
              file=sys.stderr)
    return flat


def _one_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0][:300] if lines else type(exc).__name__


def split_checkpoint(sd: Dict[str, Tensor]) -> Dict[str, Dict[str, Tensor]]:
    """Group keys by component; prefixes are removed. Groups: unet, vae, clip, clip_hf,
    schedule, ema, unknown (full keys)."""
    groups: Dict[str, Dict[str, Tensor]] = {g: {} for g in ("unet", "vae", "clip", "clip_hf",
                                                            "schedule", "ema", "unknown")}
    for key, value in sd.items():
        for group, prefix in (("unet", UNET_PREFIX), ("vae", VAE_PREFIX), ("clip", CLIP_PREFIX),
                              ("clip_hf", HF_CLIP_PREFIX), ("ema", EMA_PREFIX)):
            if key.startswith(prefix):
                groups[group][key[len(prefix):]] = value
                break
        else:
            groups["schedule" if key in SCHEDULE_KEYS else "unknown"][key] = value
    return groups


# -- key mapping -----------------------------------------------------------------------

def _consumed_ids(converted: Dict[str, Tensor]) -> set:
    ids = set()
    for v in converted.values():
        ids.add(id(v))
        if getattr(v, "_base", None) is not None:  # diffusers slices conv attention weights
            ids.add(id(v._base))
    return ids


def ldm_unet_to_diffusers(unet_sd: Dict[str, Tensor], unet_cfg: MultiViewUNetConfig
                          ) -> Tuple[Dict[str, Tensor], List[str]]:
    """LDM UNet keys (no prefix) -> diffusers keys; also the LDM keys nobody consumed."""
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    renamed = {}
    for key, value in unet_sd.items():
        if key.startswith("camera_embed."):
            key = "label_emb.0." + key[len("camera_embed."):]
        renamed[UNET_PREFIX + key] = value
    config = unet_cfg.diffusers_kwargs()
    try:
        converted = convert_ldm_unet_checkpoint(renamed, config)
    except KeyError:
        # no camera embedding in the checkpoint: convert the rest, the load reports it missing
        config = {k: v for k, v in config.items() if k != "class_embed_type"}
        try:
            converted = convert_ldm_unet_checkpoint(renamed, config)
        except (KeyError, IndexError) as exc:
            raise UserError(f"UNet tensors do not fit the configured architecture (no {exc}); "
                            "check unet= / config=") from None
    converted = {k: v for k, v in converted.items() if v is not None}
    used = _consumed_ids(converted)
    unconsumed = [k for k, v in unet_sd.items() if id(v) not in used]
    return converted, unconsumed


def infer_vae_config(vae_sd: Dict[str, Tensor]) -> dict:
    """AutoencoderKL kwargs read off LDM VAE tensor shapes (SD's KL-f8 gives SD_VAE_CONFIG)."""
    try:
        ch, in_ch = vae_sd["encoder.conv_in.weight"].shape[:2]
        levels = sorted({int(k.split(".")[2]) for k in vae_sd if k.startswith("encoder.down.")})
        widths = [int(vae_sd[f"encoder.down.{i}.block.0.conv1.weight"].shape[0]) for i in levels]
        blocks = len({k.split(".")[4] for k in vae_sd if k.startswith("encoder.down.0.block.")})
        z = int(vae_sd["decoder.conv_in.weight"].shape[1])
        out_ch = int(vae_sd["decoder.conv_out.weight"].shape[0])
    except (KeyError, IndexError, ValueError) as exc:
        raise UserError(f"the VAE tensors are not an LDM AutoencoderKL (no {exc})") from None
    from guidance.multiview.model import LATENT_SCALE

    return dict(in_channels=int(in_ch), out_channels=out_ch, latent_channels=z,
                down_block_types=["DownEncoderBlock2D"] * len(levels),
                up_block_types=["UpDecoderBlock2D"] * len(levels),
                block_out_channels=widths, layers_per_block=blocks, norm_num_groups=32,
                sample_size=256, scaling_factor=LATENT_SCALE)


def ldm_vae_to_diffusers(vae_sd: Dict[str, Tensor], vae_config: dict
                         ) -> Tuple[Dict[str, Tensor], List[str]]:
    """LDM VAE keys (no prefix) -> diffusers keys; also the keys nobody consumed."""
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    try:
        converted = convert_ldm_vae_checkpoint({VAE_PREFIX + k: v for k, v in vae_sd.items()},
                                               vae_config)
    except (KeyError, IndexError) as exc:
        raise UserError(f"VAE tensors do not fit the configured architecture (no {exc}); "
                        "check config=") from None
    converted = {k: v for k, v in converted.items() if v is not None}
    used = _consumed_ids(converted)
    return converted, [k for k, v in vae_sd.items() if id(v) not in used]


def expected_schedule(n: int = 1000, start: float = 0.00085, end: float = 0.012
                      ) -> Dict[str, Tensor]:
    """LDM's schedule buffers for scaled-linear betas, in float64."""
    betas = torch.linspace(math.sqrt(start), math.sqrt(end), n, dtype=torch.float64) ** 2
    alphas = 1 - betas
    ac = torch.cumprod(alphas, 0)
    prev = torch.cat([torch.ones(1, dtype=torch.float64), ac[:-1]])
    post_var = betas * (1 - prev) / (1 - ac)
    return {
        "betas": betas, "alphas_cumprod": ac, "alphas_cumprod_prev": prev,
        "sqrt_alphas_cumprod": ac.sqrt(), "sqrt_one_minus_alphas_cumprod": (1 - ac).sqrt(),
        "log_one_minus_alphas_cumprod": (1 - ac).log(),
        "sqrt_recip_alphas_cumprod": (1 / ac).sqrt(),
        "sqrt_recipm1_alphas_cumprod": (1 / ac - 1).sqrt(),
        "posterior_variance": post_var,
        "posterior_log_variance_clipped": post_var.clamp_min(1e-20).log(),
        "posterior_mean_coef1": betas * prev.sqrt() / (1 - ac),
        "posterior_mean_coef2": (1 - prev) * alphas.sqrt() / (1 - ac),
    }


def check_schedule(buffers: Dict[str, Tensor], rtol: float = 1e-4, start: float = 0.00085,
                   end: float = 0.012) -> List[str]:
    """Messages for schedule buffers that differ from the scaled-linear schedule (betas
    ``start``..``end``, MVDream's by default)."""
    expected = expected_schedule(start=start, end=end)
    messages = []
    for key, value in sorted(buffers.items()):
        if key not in expected:
            continue  # logvar: a training-time constant, not part of the noise schedule
        ref = expected[key]
        got = value.detach().to("cpu", torch.float64)
        if got.shape != ref.shape:
            messages.append(f"{key} has shape {tuple(got.shape)}, expected {tuple(ref.shape)}")
            continue
        scale = ref.abs().clamp_min(1e-6)
        err = ((got - ref).abs() / scale).max().item()
        if err > rtol:
            messages.append(f"{key} differs from the scaled-linear schedule "
                            f"(max relative error {err:.2e}); the model expects another "
                            "schedule, results will be off")
    return messages


# -- loading into modules --------------------------------------------------------------

def load_into(factory: Callable[[], nn.Module], state: Dict[str, Tensor], what: str,
              allow_missing: bool = False) -> Tuple[nn.Module, List[str], List[str]]:
    """Build ``factory()`` on the meta device and take ``state``'s tensors (no copy).

    Returns (module, missing, unexpected). With missing keys and ``allow_missing`` the module
    is rebuilt with real random weights so the missing ones keep their initialisation.
    A shape mismatch is a UserError.
    """
    with torch.device("meta"):
        module = factory()
    try:
        result = module.load_state_dict(state, strict=False, assign=True)
    except RuntimeError as exc:
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
        detail = (lines[1] if len(lines) > 1 else _one_line(exc))[:300]
        raise UserError(f"{what} tensors do not fit the configured architecture "
                        f"({detail}); check unet= / clip= / config=") from None
    missing, unexpected = list(result.missing_keys), list(result.unexpected_keys)
    if missing and allow_missing:
        module = factory()
        module.load_state_dict(state, strict=False)
    return module, missing, unexpected


def _unet_config(spec) -> MultiViewUNetConfig:
    if isinstance(spec, MultiViewUNetConfig):
        return spec
    if spec == "sd21-base":
        return MultiViewUNetConfig.sd21_base()
    path = Path(spec)
    if not path.is_file():
        raise UserError(f"unet: '{spec}' is neither auto, sd21-base nor a JSON file of "
                        "MultiViewUNetConfig fields")
    try:
        return MultiViewUNetConfig(**json.loads(path.read_text()))
    except (ValueError, TypeError) as exc:
        raise UserError(f"unet: {path} is not a JSON file of MultiViewUNetConfig fields "
                        f"({_one_line(exc)})") from None


def resolve_unet(spec, ldm, unet_sd: Dict[str, Tensor]) -> Tuple[MultiViewUNetConfig, str]:
    """(config, one line saying where it came from): an explicit ``unet`` (preset, JSON or
    MultiViewUNetConfig) wins over the LDM config, which wins over inference from the
    tensors (``spec`` None or "auto")."""
    from guidance.multiview.ldm_config import infer_unet_config

    if spec not in (None, "auto"):
        where = ("given" if isinstance(spec, MultiViewUNetConfig)
                 else "sd21-base preset" if spec == "sd21-base" else f"from {spec}")
        ignored = f"; the unet_config of {ldm.path} is not used" if ldm is not None else ""
        return _unet_config(spec), f"unet sizes: {where} (unet=){ignored}"
    if ldm is not None:
        return ldm.unet, f"unet sizes: from {ldm.path} (model.params.unet_config.params)"
    return infer_unet_config(unet_sd)


def _ldm_config(config):
    if config is None:
        return None
    from guidance.multiview.ldm_config import LdmConfig, read_ldm_config

    return config if isinstance(config, LdmConfig) else read_ldm_config(config)


def _clip_config(spec, ldm=None) -> dict:
    if isinstance(spec, dict):
        return spec
    if spec in (None, "auto"):
        spec = (ldm.clip_arch if ldm is not None else None) or "ViT-H-14"
    path = Path(spec)
    if path.is_file():
        try:
            data = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise UserError(f"clip: {path} is not a JSON file of an OpenCLIP model config "
                            f"({_one_line(exc)})") from None
        if not isinstance(data, dict):
            raise UserError(f"clip: {path} is not a JSON mapping (an OpenCLIP model config)")
        return data.get("model_cfg", data)
    import open_clip

    cfg = open_clip.get_model_config(spec)
    if cfg is None:
        raise UserError(f"clip: unknown OpenCLIP architecture '{spec}'")
    return cfg


def convert_state_dict(sd: Dict[str, Tensor], unet=None, clip=None,
                       convention: Optional[str] = None, allow_missing: bool = False,
                       dtype: Optional[torch.dtype] = None, config=None):
    """LDM state dict -> (MultiViewDiffusionModel, ConversionReport).

    ``unet``: MultiViewUNetConfig, "sd21-base", a JSON path, or None / "auto" (from
    ``config``, else inferred from the tensors). ``config``: the release's LDM YAML (path or
    :class:`~guidance.multiview.ldm_config.LdmConfig`): UNet and VAE sizes, conditioner,
    schedule, prediction type. ``clip``: an OpenCLIP ``model_cfg`` dict, architecture name
    or JSON path (None / "auto": the config's, else ViT-H-14).
    ``convention``: camera convention stored in the model info; None = "isotropic3d-release"
    for image conditioning (the released Isotropic3D behaviour), "mvdream" otherwise.
    The model has real tensors only when the report has no missing keys or allow_missing.
    """
    from engine.registry import get
    from guidance.multiview.ldm_config import schedule_differs
    from guidance.multiview.model import SCHEDULER_KWARGS, ModelInfo, MultiViewDiffusionModel
    from guidance.multiview.openclip import load_into_clip
    from guidance.multiview.unet import build_unet

    ldm = _ldm_config(config)
    report = ConversionReport(total=len(sd))
    groups = split_checkpoint(sd)
    if not groups["unet"]:
        raise UserError(f"no UNet tensors ({UNET_PREFIX}*) in the checkpoint; is it an "
                        "MVDream / Isotropic3D checkpoint?")
    unet_cfg, where = resolve_unet(unet, ldm, groups["unet"])
    report.architecture.append(where)
    report.unknown.extend(sorted(groups["unknown"]))
    if groups["ema"]:
        report.ignored["EMA copies (model_ema.*)"] = sorted(EMA_PREFIX + k for k in groups["ema"])
    betas = dict(start=ldm.beta_start, end=ldm.beta_end) if ldm is not None else {}
    report.schedule = check_schedule(groups["schedule"], **betas)
    if schedule_differs(ldm):
        report.architecture.append(f"schedule: scaled-linear betas {ldm.beta_start}.."
                                   f"{ldm.beta_end} (from {ldm.path})")
    if "logvar" in groups["schedule"]:
        report.ignored["training-only buffer"] = ["logvar"]

    unet_state, unconsumed = ldm_unet_to_diffusers(groups["unet"], unet_cfg)
    report.unknown.extend(UNET_PREFIX + k for k in unconsumed)
    unet_mod, missing, unexpected = load_into(lambda: build_unet(unet_cfg), unet_state, "UNet",
                                              allow_missing)
    report.converted["unet"] = len(unet_state) - len(unexpected)
    report.missing["unet"], report.unexpected["unet"] = missing, unexpected

    vae_mod = None
    ldm_vae = ldm.vae if ldm is not None else None
    if groups["vae"]:
        from diffusers import AutoencoderKL

        vae_config = ldm_vae or infer_vae_config(groups["vae"])
        report.architecture.append(f"vae sizes: from {ldm.path} (first_stage_config)"
                                   if ldm_vae else "vae sizes: read from the tensors")
        vae_state, unconsumed = ldm_vae_to_diffusers(groups["vae"], vae_config)
        report.unknown.extend(VAE_PREFIX + k for k in unconsumed)
        vae_mod, missing, unexpected = load_into(lambda: AutoencoderKL(**vae_config),
                                                 vae_state, "VAE", allow_missing)
        report.converted["vae"] = len(vae_state) - len(unexpected)
        report.missing["vae"], report.unexpected["vae"] = missing, unexpected
    elif unet_cfg.in_channels != 3:
        # a latent UNet without its autoencoder: incomplete, never silently pixel space
        report.missing["vae"] = [f"{VAE_PREFIX}* (the whole autoencoder)"]
        if allow_missing:
            from diffusers import AutoencoderKL

            from guidance.multiview.model import SD_VAE_CONFIG

            vae_mod = AutoencoderKL(**(ldm_vae or dict(SD_VAE_CONFIG,
                                                       latent_channels=unet_cfg.in_channels)))
    report.space = "latent" if vae_mod is not None else "pixel"

    conditioner = None
    clip_sd = groups["clip"]
    if clip_sd:
        kind = "image" if any(k.startswith("visual.") for k in clip_sd) else "text"
        _check_conditioner(ldm, "openclip-" + kind)
        report.conditioning = kind
        model_cfg = _clip_config(clip, ldm)
        clip_mod, missing, unused = load_into_clip(model_cfg, clip_sd, kind)
        report.converted["conditioner"] = len(clip_sd) - len(unused)
        report.missing["conditioner"] = missing
        if unused:
            report.ignored[f"OpenCLIP parts a {kind} conditioner does not use"] = sorted(
                CLIP_PREFIX + k for k in unused)
        if not missing:
            conditioner = get("conditioner", "openclip-" + kind).from_clip(clip_mod, model_cfg)
    if groups["clip_hf"]:
        _check_conditioner(ldm, "hf-clip-text")
        report.conditioning = report.conditioning or "text"
        report.not_converted[HF_CLIP_REASON] = sorted(HF_CLIP_PREFIX + k
                                                      for k in groups["clip_hf"])
    report.convention = convention or ("isotropic3d-release" if report.conditioning == "image"
                                       else "mvdream")
    if not report.ok(allow_missing):
        return None, report

    factor = 2 ** (len(vae_mod.config.block_out_channels) - 1) if vae_mod is not None else 1
    extra_info = {}
    if ldm is not None:
        extra_info["prediction_type"] = ldm.prediction_type
        if vae_mod is not None:
            extra_info["latent_scale"] = float(vae_mod.config.scaling_factor)
    info = ModelInfo(space=report.space, image_size=unet_cfg.sample_size * factor,
                     camera_convention=report.convention,
                     conditioning=report.conditioning or "image", unet=unet_cfg.to_dict(),
                     **extra_info)
    scheduler = (dict(SCHEDULER_KWARGS, beta_start=ldm.beta_start, beta_end=ldm.beta_end)
                 if schedule_differs(ldm) else None)
    model = MultiViewDiffusionModel(unet_mod, info, vae=vae_mod, conditioner=conditioner,
                                    scheduler_config=scheduler)
    if dtype is not None:
        model.to(dtype)
    return model, report


def _check_conditioner(ldm, found: str) -> None:
    """A one-line UserError when the config names another conditioner than the tensors."""
    if ldm is not None and ldm.conditioner_target and ldm.conditioner != found:
        raise UserError(f"config {Path(ldm.path).name}: cond_stage_config.target "
                        f"{ldm.conditioner_target} does not match the checkpoint's "
                        f"cond_stage_model tensors (a {found} encoder)")


def convert_file(src, out, unet="auto", clip=None, convention: Optional[str] = None,
                 allow_missing: bool = False, dtype: Optional[torch.dtype] = None,
                 extra: Optional[dict] = None, echo: bool = True,
                 config=None) -> ConversionReport:
    """Convert ``src`` into the folder ``out``. Raises UserError (with the summary) when keys
    are missing and not allowed; prints the summary when ``echo``."""
    ldm = _ldm_config(config)          # a bad config fails before the checkpoint is read
    _check_out(Path(out))              # and so does an output folder that cannot be written
    from engine.progress import bar

    # a released checkpoint takes minutes to read, map and write: a bar on a terminal
    progress = bar(3, f"converting {Path(src).name}: reading", unit="part")
    try:
        sd = load_checkpoint(src)
        progress.update(1)
        progress.set_description(f"converting {Path(src).name}: building the model")
        model, report = convert_state_dict(sd, unet=unet, clip=clip, convention=convention,
                                           allow_missing=allow_missing, dtype=dtype,
                                           config=ldm)
        progress.update(1)
        if echo:
            progress.write(report.summary(), file=sys.stdout)
        if model is None:
            counts = ", ".join(f"{c} {len(k)}" for c, k in report.missing.items() if k)
            raise UserError(f"{src}: missing tensors ({counts}); nothing written (see the "
                            "summary; allow_missing=true keeps random weights for them)")
        source = {"source": {"path": str(Path(src).resolve()),
                             "size": Path(src).stat().st_size,
                             "mtime": Path(src).stat().st_mtime}}
        if report.not_converted:
            source["not_converted"] = {why: len(keys)
                                       for why, keys in report.not_converted.items()}
        progress.set_description(f"converting {Path(src).name}: writing {out}")
        try:
            model.save_pretrained(out, extra={**source, **(extra or {})})
        except OSError as exc:      # disk full, permissions: the index is written last, so
            raise UserError(f"cannot write {out}: {exc.strerror or exc}; the folder is not a "
                            "usable model (no index); fix that and convert again") from None
        progress.update(1)
    finally:
        progress.close()
    if echo:
        print(f"wrote {out}")
    return report


def _check_out(out: Path) -> None:
    """OUT must be a folder this process can create or write in (checked without creating
    anything, so a conversion that fails later leaves no empty folder behind)."""
    if out.exists() and not out.is_dir():
        raise UserError(f"{out} exists and is not a folder; give a new or existing folder "
                        "as OUT")
    base = out
    while not base.exists() and base.parent != base:
        base = base.parent
    if not base.is_dir():
        raise UserError(f"cannot create the output folder {out}: {base} is not a folder")
    if not os.access(base, os.W_OK | os.X_OK):
        raise UserError(f"cannot write the output folder {out}: {base} is not writable")


def command():
    """The command's positionals SRC OUT and keys (engine.cli)."""
    from engine.cli import Command, Key

    return Command("python -m guidance.multiview.convert", __doc__, [
        Key("config", str, None,
            help="the release's LDM model config (YAML: model.params.unet_config ...)"),
        Key("unet", str, "auto",
            help="UNet size: auto (from config=, else inferred from the tensors), sd21-base "
                 "or a JSON file of MultiViewUNetConfig fields"),
        Key("clip", str, "auto",
            help="OpenCLIP architecture of the conditioner (auto: the config's, else "
                 "ViT-H-14; a name or JSON model_cfg)"),
        Key("convention", str, "auto", choices=("auto", "mvdream", "isotropic3d-release"),
            help="camera convention stored in the model (auto: isotropic3d-release for "
                 "image-conditioned checkpoints, mvdream for text)"),
        Key("dtype", str, "keep", choices=("keep",) + tuple(DTYPES)),
        Key("allow_missing", bool, False,
            help="write the model even if tensors are missing (random weights)"),
    ], positional=["src", "out"])


def run(argv: List[str]) -> int:
    from engine.cli import Command

    if not argv or Command.wants_help(argv):
        print(__doc__.strip())
        return 0
    args = command().parse(argv)
    report = convert_file(args.src, args.out, unet=args.unet, clip=args.clip,
                          convention=None if args.convention == "auto" else args.convention,
                          allow_missing=args.allow_missing, dtype=DTYPES.get(args.dtype),
                          config=args.config)
    if report.has_missing():
        print("warning: missing tensors kept their random initialisation", file=sys.stderr)
    if report.not_converted:
        print("warning: not converted: " + "; ".join(report.not_converted), file=sys.stderr)
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    from engine.errors import run_cli

    return run_cli(run, sys.argv[1:] if argv is None else argv)


if __name__ == "__main__":
    sys.exit(main())
