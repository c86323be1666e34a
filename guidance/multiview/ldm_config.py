"""The architecture of an original (LDM-format) multi-view checkpoint, read two ways.

* :func:`read_ldm_config`: the release's own YAML (MVDream's ``sd-v1.yaml`` /
  ``sd-v2-base.yaml``, Isotropic3D's ``mvd_infer.yaml``, or a fine-tune's):
  ``model.params.unet_config.params`` (MVDream's ``MultiViewUNetModel`` arguments) becomes a
  :class:`MultiViewUNetConfig`; ``first_stage_config`` the VAE's AutoencoderKL kwargs;
  ``cond_stage_config`` says which text / image encoder the model reads;
  ``model.params`` the noise schedule, prediction type and latent scale.
  A value this engine's UNet cannot express is a one-line UserError naming key and value.
* :func:`infer_unet_config`: no config; the UNet's sizes are read off the state dict's key
  names and shapes. The number of attention heads is not in the tensors: it is assumed to be
  64 channels a head with linear projections (SD 2.x, MVDream sd-v2.1) and 8 heads a level
  with 1x1-convolution projections (SD 1.x, MVDream sd-v1.5); the returned note says so.

Heads follow ``MultiViewUNetModel``: with ``num_head_channels`` set, a level of width ``ch``
has ``ch // num_head_channels`` heads, otherwise ``num_heads``; the middle block uses the
coarsest level's. ``legacy`` changes nothing when the head size divides the width, which is
required here (diffusers' transformers have no other layout).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

from torch import Tensor

from engine.errors import UserError
from guidance.multiview.unet import MultiViewUNetConfig

UNET_KEY = "model.params.unet_config.params"
VAE_KEY = "model.params.first_stage_config.params"
SCHEDULE_DEFAULTS = dict(linear_start=0.00085, linear_end=0.012, timesteps=1000)
# conditioner classes of MVDream / Isotropic3D (last part of cond_stage_config.target)
OPENCLIP_TEXT, OPENCLIP_IMAGE, HF_CLIP_TEXT = ("FrozenOpenCLIPEmbedder",
                                               "FrozenOpenCLIPImageEmbedder", "FrozenCLIPEmbedder")

#: MultiViewUNetModel arguments that change nothing at inference
_IGNORED = {"use_checkpoint", "use_fp16", "use_bf16", "dropout", "num_heads_upsample",
            "use_new_attention_order", "adm_in_channels"}
#: arguments whose only supported value is the default (anything else: a UserError)
_FIXED = {"conv_resample": True, "dims": 2, "num_classes": None, "use_scale_shift_norm": False,
          "resblock_updown": False, "n_embed": None, "disable_middle_self_attn": False,
          "use_spatial_transformer": True}
_USED = {"image_size", "in_channels", "out_channels", "model_channels", "attention_resolutions",
         "num_res_blocks", "channel_mult", "num_heads", "num_head_channels", "transformer_depth",
         "context_dim", "use_linear_in_transformer", "legacy", "camera_dim",
         "disable_self_attentions", "num_attention_blocks"}
_WHY = {"conv_resample": "up/downsampling without convolutions",
        "dims": "only 2-d images", "num_classes": "class labels besides the camera",
        "use_scale_shift_norm": "FiLM-style res-block conditioning",
        "resblock_updown": "res-block up/downsampling", "n_embed": "codebook prediction",
        "disable_middle_self_attn": "a middle transformer without self-attention",
        "use_spatial_transformer": "the transformer-less AttentionBlock"}


@dataclass
class LdmConfig:
    """What the conversion takes from an LDM model YAML."""

    path: str
    unet: MultiViewUNetConfig
    vae: Optional[dict] = None            # AutoencoderKL kwargs; None: no first_stage_config
    conditioner: Optional[str] = None     # openclip-text | openclip-image | hf-clip-text
    conditioner_target: Optional[str] = None
    clip_arch: Optional[str] = None       # OpenCLIP architecture named by cond_stage_config
    latent_scale: float = 0.18215
    prediction_type: str = "epsilon"
    beta_start: float = 0.00085
    beta_end: float = 0.012


class _Reader:
    """Typed access to one mapping of the YAML; every complaint names file, key and value."""

    def __init__(self, path: Path, where: str, data: Any):
        if not isinstance(data, dict):
            raise UserError(f"config {path}: {where} is not a mapping")
        self.path, self.where, self.data = path, where, data

    def fail(self, key: str, why: str) -> UserError:
        shown = repr(self.data[key]) if key in self.data else "(absent)"
        return UserError(f"config {self.path.name}: {self.where}.{key}: {shown} {why}")

    def get(self, key: str, kind, default: Any = ...) -> Any:
        if key not in self.data or self.data[key] is None:
            if default is ...:
                raise self.fail(key, "is required")
            return default
        value = self.data[key]
        if kind is int and (isinstance(value, bool) or not isinstance(value, int)):
            raise self.fail(key, "is not a whole number")
        if kind is float and (isinstance(value, bool) or not isinstance(value, (int, float))):
            raise self.fail(key, "is not a number")
        if kind is bool and not isinstance(value, bool):
            raise self.fail(key, "is not true/false")
        if kind is list and not (isinstance(value, list) and value
                                 and all(isinstance(v, int) and not isinstance(v, bool)
                                         for v in value)):
            raise self.fail(key, "is not a list of whole numbers")
        if kind is str and not isinstance(value, str):
            raise self.fail(key, "is not a string")
        return float(value) if kind is float else value

    def one_int(self, key: str, default: Any = ...) -> Any:
        """An int, or a list of one repeated int (LDM accepts both)."""
        value = self.data.get(key)
        if isinstance(value, list) and value and len(set(map(repr, value))) == 1:
            value = value[0]
        elif isinstance(value, list):
            raise self.fail(key, "differs between levels or blocks; this UNet takes one value")
        return _Reader(self.path, self.where, {key: value}).get(key, int, default)


def _nested(data: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        if not isinstance(data, dict) or part not in data:
            return None
        data = data[part]
    return data


def read_yaml(path) -> dict:
    """A YAML file as a mapping; a one-line UserError when absent, unreadable or not YAML."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise UserError(f"config {path} not found")
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        first = " ".join(str(exc).split())[:200]
        raise UserError(f"config {path} is not readable YAML ({first})") from None
    if not isinstance(data, dict):
        raise UserError(f"config {path} is not an LDM model config (no mapping at the top)")
    return data


def read_ldm_config(path) -> LdmConfig:
    """The release's LDM YAML -> :class:`LdmConfig`."""
    path = Path(path)
    data = read_yaml(path)
    unet_params = _nested(data, UNET_KEY)
    if unet_params is None:
        raise UserError(f"config {path} has no {UNET_KEY}; is it the model's LDM config?")
    model = _Reader(path, "model.params", _nested(data, "model.params"))
    unet = ldm_unet_config(_Reader(path, UNET_KEY, unet_params))
    cfg = LdmConfig(path=str(path), unet=unet)

    if model.get("timesteps", int, 1000) != 1000:
        raise model.fail("timesteps", "is not supported: this engine's models use 1000 steps")
    if model.get("beta_schedule", str, "linear") != "linear":
        raise model.fail("beta_schedule", "is not supported: only LDM's 'linear' (scaled-linear "
                                          "betas) is")
    cfg.beta_start = model.get("linear_start", float, SCHEDULE_DEFAULTS["linear_start"])
    cfg.beta_end = model.get("linear_end", float, SCHEDULE_DEFAULTS["linear_end"])
    if not 0 < cfg.beta_start < cfg.beta_end < 1:
        raise model.fail("linear_end", f"with linear_start {cfg.beta_start} is not a schedule")
    parameterization = model.get("parameterization", str, "eps")
    if parameterization not in ("eps", "v"):
        raise model.fail("parameterization", "is not supported (eps or v)")
    cfg.prediction_type = "epsilon" if parameterization == "eps" else "v_prediction"
    cfg.latent_scale = model.get("scale_factor", float, 0.18215)

    first = _nested(data, "model.params.first_stage_config")
    if first is not None:
        cfg.vae = ldm_vae_config(path, first, cfg.latent_scale)
    cond = _nested(data, "model.params.cond_stage_config")
    if isinstance(cond, dict) and isinstance(cond.get("target"), str):
        _read_conditioner(path, cond, cfg)
    return cfg


def ldm_unet_config(p: _Reader) -> MultiViewUNetConfig:
    """``MultiViewUNetModel`` arguments -> MultiViewUNetConfig (UserError if unsupported)."""
    unknown = sorted(set(p.data) - _USED - _IGNORED - set(_FIXED))
    if unknown:
        raise p.fail(unknown[0], "is not an argument of MVDream's MultiViewUNetModel")
    for key, default in _FIXED.items():
        if key in p.data and p.data[key] != default:
            raise p.fail(key, f"is not supported ({_WHY[key]})")
    if "use_spatial_transformer" not in p.data:
        why = _WHY["use_spatial_transformer"]
        raise p.fail("use_spatial_transformer", f"is not supported ({why}; the default is false)")
    mc = p.get("model_channels", int)
    mults = p.get("channel_mult", list, [1, 2, 4, 8])
    widths = [mc * m for m in mults]
    nrb = p.one_int("num_res_blocks")
    depth = p.get("transformer_depth", int, 1)
    context = p.one_int("context_dim")
    camera = p.get("camera_dim", int, None)
    if camera is None:
        raise p.fail("camera_dim", "is not supported: a UNet without camera embedding is not a "
                                   "multi-view model (MVDream's has camera_dim: 16)")
    resolutions = p.get("attention_resolutions", list)
    levels = [2 ** i in resolutions for i in range(len(mults))]
    if not any(levels):
        rates = [2 ** i for i in range(len(mults))]
        raise p.fail("attention_resolutions", f"matches none of the {len(mults)} levels "
                                              f"(downsample rates {rates})")
    disabled = p.data.get("disable_self_attentions")
    if disabled is not None and (not isinstance(disabled, list) or any(disabled)):
        raise p.fail("disable_self_attentions", "is not supported (transformers without "
                                                "self-attention)")
    blocks = p.data.get("num_attention_blocks")
    if blocks is not None and not (isinstance(blocks, list) and len(blocks) == len(mults)
                                   and all(isinstance(b, int) for b in blocks)):
        raise p.fail("num_attention_blocks", "is not a list of whole numbers, one per level")
    if blocks is not None and any(b < nrb for b, a in zip(blocks, levels) if a):
        raise p.fail("num_attention_blocks", f"is not supported (fewer transformers than the "
                                             f"{nrb} res blocks of a level)")
    heads = _heads(p, widths, levels)
    try:
        cfg = MultiViewUNetConfig(
            sample_size=p.get("image_size", int, 32), in_channels=p.get("in_channels", int),
            out_channels=p.get("out_channels", int), block_out_channels=widths,
            layers_per_block=nrb, attention_head_dim=heads, cross_attention_dim=context,
            camera_dim=camera, norm_num_groups=32, attention_levels=levels,
            use_linear_projection=p.get("use_linear_in_transformer", bool, False),
            transformer_layers_per_block=depth)
    except UserError as exc:
        raise UserError(f"config {p.path.name}: {UNET_KEY}: {exc}") from None
    return _default_levels(cfg)


def _heads(p: _Reader, widths: List[int], levels: List[bool]) -> List[int]:
    """Heads per level as MultiViewUNetModel computes them (the middle block: the last)."""
    per_head = p.get("num_head_channels", int, -1)
    num_heads = p.get("num_heads", int, -1)
    if per_head == -1 and num_heads == -1:
        raise p.fail("num_heads", "and num_head_channels are both unset; one is required")
    out = []
    for i, ch in enumerate(widths):
        needed = levels[i] or i == len(widths) - 1     # the middle block has the last width
        if per_head != -1:
            if per_head <= 0 or (needed and ch % per_head):
                raise p.fail("num_head_channels", f"does not divide the width {ch} of level {i}")
            out.append(max(1, ch // per_head))
        else:
            if num_heads <= 0 or (needed and ch % num_heads):
                raise p.fail("num_heads", f"does not divide the width {ch} of level {i}")
            out.append(num_heads)
    return out


def _default_levels(cfg: MultiViewUNetConfig) -> MultiViewUNetConfig:
    """attention_levels None when it is the default (every level but the coarsest), so the
    SD 2.1 layout reads back as exactly :meth:`MultiViewUNetConfig.sd21_base`."""
    n = len(cfg.block_out_channels)
    if cfg.attention_levels == [True] * (n - 1) + [False]:
        return replace(cfg, attention_levels=None)
    return cfg


def ldm_vae_config(path: Path, first: Any, scale: float) -> dict:
    """``first_stage_config`` -> AutoencoderKL kwargs (the LDM KL autoencoder only)."""
    r = _Reader(path, "model.params.first_stage_config", first)
    if not str(r.data.get("target", "")).endswith("AutoencoderKL"):
        raise r.fail("target", "is not supported (only the KL autoencoder, AutoencoderKL)")
    params = _Reader(path, VAE_KEY, r.data.get("params"))
    dd = _Reader(path, VAE_KEY + ".ddconfig", params.data.get("ddconfig"))
    z = dd.get("z_channels", int)
    if params.get("embed_dim", int, z) != z:
        raise params.fail("embed_dim", f"differs from ddconfig.z_channels {z}; not supported")
    if dd.get("double_z", bool, True) is not True:
        raise dd.fail("double_z", "is not supported (a KL autoencoder has double_z: true)")
    if dd.data.get("attn_resolutions"):
        raise dd.fail("attn_resolutions", "is not supported (attention only in the middle)")
    if dd.data.get("attn_type", "vanilla") not in ("vanilla", "vanilla-xformers"):
        raise dd.fail("attn_type", "is not supported (vanilla attention only)")
    ch, mults = dd.get("ch", int), dd.get("ch_mult", list)
    widths = [ch * m for m in mults]
    if any(w % 32 for w in widths):
        raise dd.fail("ch", "times ch_mult is not a multiple of 32 (the GroupNorm groups)")
    return dict(in_channels=dd.get("in_channels", int, 3), out_channels=dd.get("out_ch", int, 3),
                latent_channels=z, down_block_types=["DownEncoderBlock2D"] * len(mults),
                up_block_types=["UpDecoderBlock2D"] * len(mults), block_out_channels=widths,
                layers_per_block=dd.get("num_res_blocks", int), norm_num_groups=32,
                sample_size=dd.get("resolution", int, 256), scaling_factor=scale)


def _read_conditioner(path: Path, cond: dict, cfg: LdmConfig) -> None:
    cfg.conditioner_target = cond["target"]
    name = cond["target"].rsplit(".", 1)[-1]
    params = _Reader(path, "model.params.cond_stage_config.params", cond.get("params") or {})
    if name in (OPENCLIP_TEXT, OPENCLIP_IMAGE):
        cfg.clip_arch = params.get("arch", str, "ViT-H-14")
        cfg.conditioner = "openclip-text" if name == OPENCLIP_TEXT else "openclip-image"
        if name == OPENCLIP_TEXT and params.get("layer", str, "last") != "penultimate":
            raise params.fail("layer", "is not supported: the OpenCLIP text conditioner here "
                                       "reads the penultimate layer (the class default is "
                                       "'last')")
    elif name == HF_CLIP_TEXT:
        cfg.conditioner = "hf-clip-text"


# -- inference from the tensors ---------------------------------------------------------

def infer_unet_config(sd: Dict[str, Tensor]) -> Tuple[MultiViewUNetConfig, str]:
    """LDM UNet state dict (keys without ``model.diffusion_model.``) -> (config, one-line
    note of what was read and what was assumed). Meta tensors are enough."""
    def shape(key: str) -> Tuple[int, ...]:
        if key not in sd:
            raise UserError(f"cannot infer the UNet architecture: model.diffusion_model.{key} "
                            "is missing; give config=MODEL.yaml or unet=FILE.json")
        return tuple(sd[key].shape)

    def fail(what: str) -> UserError:
        return UserError(f"cannot infer the UNet architecture: {what}; give config=MODEL.yaml "
                         "(the model's LDM config) or unet=FILE.json")

    mc, cin = shape("input_blocks.0.0.weight")[:2]
    cout = shape("out.2.weight")[0]
    n_in = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("input_blocks."))
    down = sorted(i for i in range(n_in) if f"input_blocks.{i}.0.op.weight" in sd)
    n_levels = len(down) + 1
    if (n_in - 1 - len(down)) % n_levels:
        raise fail(f"{n_in} input blocks with {len(down)} downsamplers are not a fixed number "
                   "of res blocks per level")
    nrb = (n_in - 1 - len(down)) // n_levels
    if nrb < 1 or down != [(lv + 1) * (nrb + 1) for lv in range(n_levels - 1)]:
        raise fail("the input blocks are not a fixed number of res blocks per level "
                   "(res-block downsampling or per-level counts are not supported)")
    widths, levels = [], []
    for lv in range(n_levels):
        first = lv * (nrb + 1) + 1
        widths.append(shape(f"input_blocks.{first}.0.in_layers.2.weight")[0])
        attn = [f"input_blocks.{first + j}.1.proj_in.weight" in sd for j in range(nrb)]
        if len(set(attn)) > 1:
            raise fail(f"level {lv} has a transformer after some res blocks only")
        levels.append(attn[0])
    if any(w % mc for w in widths):
        raise fail(f"level widths {widths} are not multiples of model_channels {mc}")
    prefixes = sorted({k.rsplit(".proj_in.weight", 1)[0] for k in sd
                       if k.endswith(".proj_in.weight")})
    if not prefixes or not any(levels):
        raise fail("no spatial transformer outside the middle block")
    linear, contexts, depths = set(), set(), set()
    for p in prefixes:
        proj = shape(f"{p}.proj_in.weight")
        linear.add(len(proj) == 2)
        if proj[0] != proj[1]:
            raise fail(f"{p} projects {proj[1]} channels to {proj[0]}; the transformer width "
                       "must equal the block's")
        contexts.add(shape(f"{p}.transformer_blocks.0.attn2.to_k.weight")[1])
        if shape(f"{p}.transformer_blocks.0.attn1.to_k.weight")[1] != proj[0]:
            raise fail(f"{p}.transformer_blocks.0.attn1 is not a self-attention")
        inner = f"{p}.transformer_blocks."
        depths.add(1 + max(int(k[len(inner):].split(".")[0]) for k in sd if k.startswith(inner)))
    for what, values in (("linear and convolutional projections", linear),
                         ("cross-attention widths", contexts), ("transformer depths", depths)):
        if len(values) > 1:
            raise fail(f"the transformers mix {what} ({sorted(values)})")
    (use_linear,), (context,), (depth,) = linear, contexts, depths
    notes = []
    if "camera_embed.0.weight" in sd:
        camera = shape("camera_embed.0.weight")[1]
    else:
        camera = 16
        notes.append("camera_dim 16 (no camera_embed tensors)")
    needed = [a or i == n_levels - 1 for i, a in enumerate(levels)]
    if use_linear:
        bad = [w for w, n in zip(widths, needed) if n and w % 64]
        if bad:
            raise fail(f"heads are not in the tensors and width {bad[0]} is not a multiple of "
                       "64 (the SD 2.x head size assumed for linear projections)")
        heads = [max(1, w // 64) for w in widths]
        notes.insert(0, f"64-channel heads (SD 2.x convention with linear projections: heads "
                        f"{heads})")
    else:
        bad = [w for w, n in zip(widths, needed) if n and w % 8]
        if bad:
            raise fail(f"heads are not in the tensors and width {bad[0]} is not a multiple of 8 "
                       "(the SD 1.x 8 heads a level assumed for convolutional projections)")
        heads = [8] * n_levels
        notes.insert(0, "8 heads per level (SD 1.x convention with 1x1-convolution "
                        "projections)")
    notes.append("sample size 32")
    cfg = _default_levels(MultiViewUNetConfig(
        sample_size=32, in_channels=cin, out_channels=cout, block_out_channels=widths,
        layers_per_block=nrb, attention_head_dim=heads, cross_attention_dim=context,
        camera_dim=camera, norm_num_groups=32, attention_levels=levels,
        use_linear_projection=use_linear, transformer_layers_per_block=depth))
    mults = [w // mc for w in widths]
    note = (f"unet sizes: inferred from the tensors: model_channels {mc}, channel_mult {mults}, "
            f"{nrb} res blocks a level, attention at levels "
            f"{[i for i, a in enumerate(levels) if a]} of {n_levels}, transformer depth {depth}, "
            f"{'linear' if use_linear else '1x1-convolution'} projections, context {context}, "
            f"camera {camera}, channels {cin}->{cout}; NOT in the tensors, assumed: "
            f"{', '.join(notes)}; give config=MODEL.yaml (the release's LDM config) to be exact")
    return cfg, note


def schedule_differs(cfg: Optional[LdmConfig]) -> bool:
    """Whether the config's betas differ from MVDream's 0.00085..0.012."""
    return cfg is not None and not (
        math.isclose(cfg.beta_start, SCHEDULE_DEFAULTS["linear_start"], rel_tol=1e-9)
        and math.isclose(cfg.beta_end, SCHEDULE_DEFAULTS["linear_end"], rel_tol=1e-9))
