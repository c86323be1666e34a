"""Convert a released MVDream ``.pt`` / Isotropic3D ``.ckpt`` into a converted model folder.

    python -m guidance.multiview.convert SRC OUT [unet=sd21-base|CONFIG.json]
        [convention=auto|mvdream|isotropic3d-release] [clip=ViT-H-14|CONFIG.json]
        [dtype=keep|fp32|fp16|bf16] [allow_missing=true]

The checkpoint is a plain state dict in the original LDM naming, read with
``torch.load(weights_only=True)`` (a pickle holding anything but tensors and containers is
refused). Keys are split by prefix:

* ``model.diffusion_model.*``  -> the UNet: ``camera_embed.`` becomes ``label_emb.0.`` and
  diffusers' own ``convert_ldm_unet_checkpoint`` (class_embed_type="projection") renames the
  rest;
* ``first_stage_model.*``      -> the VAE via ``convert_ldm_vae_checkpoint`` (its sizes are
  read from the tensors' shapes);
* ``cond_stage_model.model.*`` -> an OpenCLIP state dict: ``visual.*`` present means image
  conditioning (Isotropic3D), otherwise text conditioning (MVDream);
* root schedule buffers (betas, alphas_cumprod, ...) are compared with the scaled-linear
  schedule; ``model_ema.*`` is reported as ignored.

Nothing is dropped silently: keys that match no prefix, keys a converter did not consume, and
keys a module did not take are listed; missing keys fail the conversion (a one-line error,
exit code 2, nothing written) unless ``allow_missing=true`` (they then keep their random
initialisation).
"""

from __future__ import annotations

import json
import math
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
    converted: Dict[str, int] = field(default_factory=dict)      # component -> tensors loaded
    unknown: List[str] = field(default_factory=list)             # matched no prefix / unused
    missing: Dict[str, List[str]] = field(default_factory=dict)  # component -> its names
    unexpected: Dict[str, List[str]] = field(default_factory=dict)
    ignored: Dict[str, List[str]] = field(default_factory=dict)  # reason -> keys
    schedule: List[str] = field(default_factory=list)            # mismatch messages

    def has_missing(self) -> bool:
        return any(self.missing.values())

    def ok(self, allow_missing: bool = False) -> bool:
        return allow_missing or not self.has_missing()

    def summary(self) -> str:
        lines = [f"checkpoint: {self.total} tensors; space {self.space}; conditioning "
                 f"{self.conditioning or 'none'}; camera convention {self.convention}"]
        for comp, n in self.converted.items():
            lines.append(f"  {comp}: {n} tensors loaded")
        for title, groups in (("MISSING", self.missing), ("unexpected", self.unexpected),
                              ("ignored", self.ignored)):
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
    """Group keys by component; prefixes are removed. Groups: unet, vae, clip, schedule,
    ema, unknown (full keys)."""
    groups: Dict[str, Dict[str, Tensor]] = {g: {} for g in
                                            ("unet", "vae", "clip", "schedule", "ema", "unknown")}
    for key, value in sd.items():
        for group, prefix in (("unet", UNET_PREFIX), ("vae", VAE_PREFIX), ("clip", CLIP_PREFIX),
                              ("ema", EMA_PREFIX)):
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
        converted = convert_ldm_unet_checkpoint(renamed, config)
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

    converted = convert_ldm_vae_checkpoint({VAE_PREFIX + k: v for k, v in vae_sd.items()},
                                           vae_config)
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


def check_schedule(buffers: Dict[str, Tensor], rtol: float = 1e-4) -> List[str]:
    """Messages for schedule buffers that differ from the scaled-linear schedule."""
    expected = expected_schedule()
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
        raise UserError(f"{what} tensors do not fit the configured architecture "
                        f"({_one_line(exc)}); check unet= / clip=") from None
    missing, unexpected = list(result.missing_keys), list(result.unexpected_keys)
    if missing and allow_missing:
        module = factory()
        module.load_state_dict(state, strict=False)
    return module, missing, unexpected


def _unet_config(spec) -> MultiViewUNetConfig:
    if isinstance(spec, MultiViewUNetConfig):
        return spec
    if spec in (None, "sd21-base"):
        return MultiViewUNetConfig.sd21_base()
    path = Path(spec)
    if not path.is_file():
        raise UserError(f"unet: '{spec}' is neither sd21-base nor a JSON file of "
                        "MultiViewUNetConfig fields")
    return MultiViewUNetConfig(**json.loads(path.read_text()))


def _clip_config(spec) -> dict:
    if isinstance(spec, dict):
        return spec
    spec = spec or "ViT-H-14"
    path = Path(spec)
    if path.is_file():
        data = json.loads(path.read_text())
        return data.get("model_cfg", data)
    import open_clip

    cfg = open_clip.get_model_config(spec)
    if cfg is None:
        raise UserError(f"clip: unknown OpenCLIP architecture '{spec}'")
    return cfg


def convert_state_dict(sd: Dict[str, Tensor], unet=None, clip=None,
                       convention: Optional[str] = None, allow_missing: bool = False,
                       dtype: Optional[torch.dtype] = None):
    """LDM state dict -> (MultiViewDiffusionModel, ConversionReport).

    ``unet``: MultiViewUNetConfig, "sd21-base" or a JSON path. ``clip``: an OpenCLIP
    ``model_cfg`` dict, architecture name or JSON path (default ViT-H-14).
    ``convention``: camera convention stored in the model info; None = "isotropic3d-release"
    for image conditioning (the released Isotropic3D behaviour), "mvdream" otherwise.
    The model has real tensors only when the report has no missing keys or allow_missing.
    """
    from engine.registry import get
    from guidance.multiview.model import ModelInfo, MultiViewDiffusionModel
    from guidance.multiview.openclip import load_into_clip
    from guidance.multiview.unet import build_unet

    unet_cfg = _unet_config(unet)
    report = ConversionReport(total=len(sd))
    groups = split_checkpoint(sd)
    report.unknown.extend(sorted(groups["unknown"]))
    if groups["ema"]:
        report.ignored["EMA copies (model_ema.*)"] = sorted(EMA_PREFIX + k for k in groups["ema"])
    report.schedule = check_schedule(groups["schedule"])
    if "logvar" in groups["schedule"]:
        report.ignored["training-only buffer"] = ["logvar"]

    if not groups["unet"]:
        raise UserError(f"no UNet tensors ({UNET_PREFIX}*) in the checkpoint; is it an "
                        "MVDream / Isotropic3D checkpoint?")
    unet_state, unconsumed = ldm_unet_to_diffusers(groups["unet"], unet_cfg)
    report.unknown.extend(UNET_PREFIX + k for k in unconsumed)
    unet_mod, missing, unexpected = load_into(lambda: build_unet(unet_cfg), unet_state, "UNet",
                                              allow_missing)
    report.converted["unet"] = len(unet_state) - len(unexpected)
    report.missing["unet"], report.unexpected["unet"] = missing, unexpected

    vae_mod = None
    if groups["vae"]:
        from diffusers import AutoencoderKL

        vae_config = infer_vae_config(groups["vae"])
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

            vae_mod = AutoencoderKL(**dict(SD_VAE_CONFIG, latent_channels=unet_cfg.in_channels))
    report.space = "latent" if vae_mod is not None else "pixel"

    conditioner = None
    clip_sd = groups["clip"]
    if clip_sd:
        kind = "image" if any(k.startswith("visual.") for k in clip_sd) else "text"
        report.conditioning = kind
        model_cfg = _clip_config(clip)
        clip_mod, missing, unused = load_into_clip(model_cfg, clip_sd, kind)
        report.converted["conditioner"] = len(clip_sd) - len(unused)
        report.missing["conditioner"] = missing
        if unused:
            report.ignored[f"OpenCLIP parts a {kind} conditioner does not use"] = sorted(
                CLIP_PREFIX + k for k in unused)
        if not missing:
            conditioner = get("conditioner", "openclip-" + kind).from_clip(clip_mod, model_cfg)
    else:
        report.conditioning = None
    report.convention = convention or ("isotropic3d-release" if report.conditioning == "image"
                                       else "mvdream")
    if not report.ok(allow_missing):
        return None, report

    factor = 2 ** (len(vae_mod.config.block_out_channels) - 1) if vae_mod is not None else 1
    info = ModelInfo(space=report.space, image_size=unet_cfg.sample_size * factor,
                     camera_convention=report.convention,
                     conditioning=report.conditioning or "image", unet=unet_cfg.to_dict())
    model = MultiViewDiffusionModel(unet_mod, info, vae=vae_mod, conditioner=conditioner)
    if dtype is not None:
        model.to(dtype)
    return model, report


def convert_file(src, out, unet="sd21-base", clip=None, convention: Optional[str] = None,
                 allow_missing: bool = False, dtype: Optional[torch.dtype] = None,
                 extra: Optional[dict] = None, echo: bool = True) -> ConversionReport:
    """Convert ``src`` into the folder ``out``. Raises UserError (with the summary) when keys
    are missing and not allowed; prints the summary when ``echo``."""
    sd = load_checkpoint(src)
    model, report = convert_state_dict(sd, unet=unet, clip=clip, convention=convention,
                                       allow_missing=allow_missing, dtype=dtype)
    if echo:
        print(report.summary())
    if model is None:
        counts = ", ".join(f"{c} {len(k)}" for c, k in report.missing.items() if k)
        raise UserError(f"{src}: missing tensors ({counts}); nothing written (see the summary; "
                        "allow_missing=true keeps random weights for them)")
    source = {"source": {"path": str(Path(src).resolve()), "size": Path(src).stat().st_size,
                         "mtime": Path(src).stat().st_mtime}}
    model.save_pretrained(out, extra={**source, **(extra or {})})
    if echo:
        print(f"wrote {out}")
    return report


def command():
    """The command's positionals SRC OUT and keys (engine.cli)."""
    from engine.cli import Command, Key

    return Command("python -m guidance.multiview.convert", __doc__, [
        Key("unet", str, "sd21-base",
            help="UNet size: sd21-base or a JSON file of MultiViewUNetConfig fields"),
        Key("clip", str, "ViT-H-14",
            help="OpenCLIP architecture of the conditioner (name or JSON model_cfg)"),
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
                          allow_missing=args.allow_missing, dtype=DTYPES.get(args.dtype))
    if report.has_missing():
        print("warning: missing tensors kept their random initialisation", file=sys.stderr)
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    from engine.errors import run_cli

    return run_cli(run, sys.argv[1:] if argv is None else argv)


if __name__ == "__main__":
    sys.exit(main())
