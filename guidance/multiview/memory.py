"""Memory a multi-view prior needs on a device, estimated before anything is loaded.

The architecture comes from a converted folder's own files (``engine_model.json``, the VAE's
``config.json``, the conditioner's weights header), or, for a hub id or a raw checkpoint that
is not converted yet, from the released models' architecture (SD 2.1-base UNet, KL-f8 VAE,
OpenCLIP ViT-H-14: Isotropic3D and MVDream 2.1 alike). The models are then built on fake
tensors (:func:`engine.memory.fake_tensors`: no data, no memory) and one score-distillation
step is run on them under :func:`engine.memory.measure`:

    renders [B, 3, S, S] (fp32, require grad) -> resize to the model's size -> cast to the
    model's dtype -> VAE encode (graph kept) -> UNet forward on [2B, ...] (CFG, no grad) ->
    loss -> backward through the encoder.

so the activations are those of the real step: the VAE encoder's saved activations and its
backward, and the UNet's transient peak. Example::

    arch = prior_architecture("pkunliu/Isotropic3D")
    use = estimate_sds_step(arch, batch=8, render_size=64, dtype=torch.float16)
    use["weights"], use["activations"]          # bytes
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Optional

import torch
import torch.nn.functional as F

from engine.memory import bytes_of, fake_tensors, measure
from guidance.multiview.unet import MultiViewUNetConfig, build_unet

#: context tokens per conditioning (an image model's single CLIP embedding; CLIP's 77 text
#: tokens); a ``tokens: patches`` image conditioner has 1 + its patches
CONTEXT_TOKENS = {"image": 1, "text": 77}


@dataclass
class PriorArchitecture:
    """What the memory of a prior depends on."""

    unet: MultiViewUNetConfig
    vae_config: Optional[dict]          # AutoencoderKL kwargs; None: a pixel-space model
    image_size: int                     # what renders are resized to
    latent_scale: float
    conditioning: str                   # image | text
    context_tokens: int
    conditioner_params: int             # the image/text encoder, loaded only to embed
    source: str                         # where this was read from, for the printout


def _released(conditioning: str, source: str) -> PriorArchitecture:
    from guidance.multiview.model import LATENT_SCALE, SD_VAE_CONFIG
    from guidance.multiview.openclip import build_openclip

    import open_clip

    clip = build_openclip(open_clip.get_model_config("ViT-H-14"),
                          keep=conditioning, meta=True)
    return PriorArchitecture(MultiViewUNetConfig.sd21_base(), dict(SD_VAE_CONFIG), 256,
                             LATENT_SCALE, conditioning, CONTEXT_TOKENS[conditioning],
                             sum(p.numel() for p in clip.parameters()), source)


def _safetensors_params(folder: Path) -> int:
    from safetensors import safe_open

    total = 0
    for path in sorted(folder.glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as f:
            for key in f.keys():
                n = 1
                for d in f.get_slice(key).get_shape():
                    n *= d
                total += n
    return total


def _from_folder(folder: Path) -> PriorArchitecture:
    from engine.errors import UserError

    try:
        index = json.loads((folder / "engine_model.json").read_text())
        info, comps = index["info"], index.get("components", {})
        unet = MultiViewUNetConfig(**info["unet"])
        vae_config = None
        if comps.get("vae"):
            raw = json.loads((folder / comps["vae"] / "config.json").read_text())
            vae_config = {k: v for k, v in raw.items() if not k.startswith("_")}
    except (OSError, KeyError, TypeError, ValueError) as exc:
        raise UserError(f"{folder}: cannot read the model's architecture ({exc}); is it a "
                        "folder written by python -m guidance.multiview.convert?") from None
    spec = comps.get("conditioner")
    path = spec.get("path") if isinstance(spec, dict) else spec
    cond_params = _safetensors_params(folder / path) if path else 0
    conditioning = info.get("conditioning", "image")
    tokens = CONTEXT_TOKENS[conditioning]
    if conditioning == "image" and isinstance(spec, dict) and spec.get("tokens") == "patches":
        tokens = 257
    return PriorArchitecture(unet, vae_config, int(info["image_size"]),
                             float(info.get("latent_scale", 0.18215)), conditioning, tokens,
                             cond_params, f"converted folder {folder}")


def _local_folder(model: str) -> Optional[Path]:
    """A converted folder for ``model`` that is already on this machine: the folder itself,
    a shipped toy model, or the conversion cached next to a raw checkpoint."""
    from engine.resources import toy_model_path
    from guidance.multiview.pretrained import cache_folder_for

    path = Path(str(model)).expanduser()
    if not path.is_absolute() and not path.exists() and toy_model_path(path).exists():
        path = toy_model_path(path)
    if path.is_dir():
        return path
    if path.is_file():
        cached = cache_folder_for(path)
        return cached if (cached / "engine_model.json").is_file() else None
    return None


def prior_architecture(model: str, conditioning: str = "auto") -> PriorArchitecture:
    """The architecture behind a guidance's ``model`` setting, without loading weights:
    a converted folder's own configuration, else the released architecture (image
    conditioning for Isotropic3D and for unknown checkpoints, text for MVDream)."""
    from guidance.multiview.pretrained import KNOWN_HUB_MODELS
    from guidance.multiview.random_models import RANDOM_MODELS, check_random, is_random

    if is_random(model):
        kind = RANDOM_MODELS[check_random(model)][0]
        kind = conditioning if conditioning in CONTEXT_TOKENS else kind
        return _released(kind, f"{model}: the released architecture with random weights")
    folder = _local_folder(model)
    if folder is not None:
        arch = _from_folder(folder)
        if conditioning in CONTEXT_TOKENS and conditioning != arch.conditioning:
            arch.conditioning, arch.context_tokens = conditioning, CONTEXT_TOKENS[conditioning]
        return arch
    hint = KNOWN_HUB_MODELS.get(str(model).split(":")[0], (None, None))[1]
    kind = conditioning if conditioning in CONTEXT_TOKENS else (
        "text" if hint == "mvdream" else "image")
    return _released(kind, f"{model}: the released architecture (SD 2.1-base UNet, KL-f8 "
                           "VAE, OpenCLIP ViT-H-14)")


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype):
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def estimate_sds_step(arch: PriorArchitecture, batch: int, render_size: int,
                      dtype: torch.dtype, num_views: int = 4) -> Dict[str, int]:
    """Bytes of the frozen models and of one SDS step's activations on renders
    [batch, 3, render_size, render_size].

    Returns:
        {"weights": UNet + VAE in ``dtype``, "activations": the step's peak on top of the
        weights (VAE encode with its backward, UNet forward on 2 x batch), "conditioner":
        the image/text encoder's weights in ``dtype`` (held while the input is embedded)}.
    """
    elem = torch.empty((), dtype=dtype).element_size()
    with fake_tensors(), _default_dtype(dtype):
        # built in ``dtype`` (fake tensors cannot be converted with .to() afterwards)
        unet = build_unet(arch.unet).requires_grad_(False)
        vae = None
        if arch.vae_config is not None:
            from diffusers import AutoencoderKL

            vae = AutoencoderKL(**arch.vae_config).requires_grad_(False)
        weights = bytes_of(unet) + (bytes_of(vae) if vae is not None else 0)
        factor = 2 ** (len(vae.config.block_out_channels) - 1) if vae is not None else 1
        side = arch.image_size // factor
        ctx = torch.zeros(2 * batch, arch.context_tokens, arch.unet.cross_attention_dim,
                          dtype=dtype)
        cams = torch.zeros(2 * batch, arch.unet.camera_dim, dtype=dtype)
        t = torch.full((2 * batch,), 500, dtype=torch.long)
        views = num_views if batch % num_views == 0 else 1

        def step():
            renders = torch.rand(batch, 3, render_size, render_size, dtype=torch.float32,
                                 requires_grad=True)
            x = F.interpolate(renders, size=(arch.image_size,) * 2, mode="bilinear",
                              align_corners=False).to(dtype) * 2 - 1
            if vae is not None:
                x = vae.encode(x).latent_dist.sample() * arch.latent_scale
            x0 = x.float()
            with torch.no_grad():
                x_t = torch.cat([x0, x0]).to(dtype)
                eps = unet(x_t, t, encoder_hidden_states=ctx, class_labels=cams,
                           cross_attention_kwargs={"num_views": views}).sample
                target = x0 - eps.float().chunk(2)[1]
            loss = ((x0 - target) ** 2).sum()
            loss.backward()
            assert side == x0.shape[-1]
            return renders.grad

        use = measure(step)
    return {"weights": weights, "activations": use.peak,
            "conditioner": arch.conditioner_params * elem}


def estimate_dtype(precision: str, device_type: str) -> torch.dtype:
    """The dtype ``precision`` resolves to on a ``device_type`` device, without needing one:
    ``auto`` is fp32 on CPU and a 2-byte type on CUDA (bf16 or fp16, the same size);
    ``fast`` is ``auto`` except on a CPU, where it is taken as fp32 (the larger, when this
    machine is not the one that will run it)."""
    from guidance.multiview.prior import PRECISIONS

    if PRECISIONS[precision] is not None:
        return PRECISIONS[precision]
    return torch.float32 if device_type == "cpu" else torch.float16


def guidance_estimate(model: str, conditioning: str, precision: str, batch: int,
                      render_size: int, device_type: str, keep_conditioner: bool = False,
                      num_views: int = 4) -> Dict[str, object]:
    """What a prior-based guidance's ``estimate_memory`` returns (bytes, and a note naming
    where the architecture was read)."""
    arch = prior_architecture(model, conditioning)
    dtype = estimate_dtype(precision, device_type)
    use: Dict[str, object] = dict(estimate_sds_step(arch, batch, render_size, dtype, num_views))
    if keep_conditioner:
        use["weights"] = use["weights"] + use["conditioner"]
    use["note"] = f"guidance model: {arch.source}, {str(dtype).replace('torch.', '')}"
    return use


__all__ = ["PriorArchitecture", "estimate_dtype", "guidance_estimate", "prior_architecture", "estimate_sds_step", "CONTEXT_TOKENS"]
