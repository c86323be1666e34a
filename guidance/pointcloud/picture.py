"""From a picture to a coloured cloud: the CLIP condition a point model reads, the model's
folder settings, and :func:`PointCloudModel.cloud` (picture -> cloud in the engine's world).

The converted folder (:mod:`guidance.pointcloud.pretrained`) may say in ``config.json`` how
its pictures are prepared and what its clouds mean (every key optional)::

    "conditioner": "conditioner"      an OpenCLIP folder (relative to the model folder, or
                                      absolute), or {"model": ARCH, "pretrained": TAG};
                                      default: a "conditioner/" subfolder when there is one,
                                      else OpenAI's ViT-L/14 ("ViT-L-14", "openai"), the
                                      encoder the released models were trained with
    "input": {"image_size": 256, "object_fraction": 0.85}
                                      the picture is loaded by engine.images (mask, re-centre,
                                      scale, white background) at this size and fraction
    "world_scale": 1.6                engine world units per cloud unit
    "sampler": {"steps": 64, "guidance_scale": 3.0, "points": null}
                                      defaults of the Karras/Heun sampler (points: the
                                      model's own count when null)
    "upsampler": "PATH"               a second (upsample-kind) folder, relative or absolute

The toy model (``models/toy/pointe``) carries its own image tower in ``conditioner/`` and its
settings; a converted release folder carries none of them and gets the defaults above.

Conditions (Point-E's): image-vec models read the CLIP image embedding, L2-normalised
([B, D]); image-grid and upsample models the vision transformer's last-layer tokens before
``ln_post``, without the class token, channels first ([B, width, tokens]).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Union

import torch
import torch.nn as nn
from torch import Tensor

from engine.errors import UserError
from guidance.multiview.openclip import (clip_image_size, clip_preprocess, load_openclip_folder,
                                         resolve_openclip, strip_towers)
from guidance.pointcloud.diffusion import sample_cloud
from guidance.pointcloud.pretrained import load_point_model, read_point_config
from guidance.pointcloud.transformer import PointTransformer

#: the encoder of the released models: OpenAI's CLIP ViT-L/14, through OpenCLIP
RELEASE_CLIP = ("ViT-L-14", "openai")
CONDITIONER_DIR = "conditioner"
MODEL_PREFIX = "model:"


class PointImageEncoder(nn.Module):
    """A frozen OpenCLIP image tower giving Point-E's conditions of a picture."""

    def __init__(self, clip: nn.Module, model_cfg: dict):
        super().__init__()
        self.clip = strip_towers(clip, "image")
        self.model_cfg = model_cfg
        self.requires_grad_(False)
        self.eval()

    @classmethod
    def load(cls, spec, key: str = "the point model's conditioner") -> "PointImageEncoder":
        """``spec``: an OpenCLIP folder (Path or str) or (arch, pretrained tag)."""
        if isinstance(spec, (tuple, list)):
            clip, model_cfg = resolve_openclip(str(spec[0]), str(spec[1]), "image", key)
        else:
            clip, model_cfg = load_openclip_folder(Path(spec), "image", key)
        return cls(clip, model_cfg)

    def train(self, mode: bool = True):
        return super().train(False)

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @property
    def embed_dim(self) -> int:
        return int(self.model_cfg["embed_dim"])

    @property
    def image_size(self) -> int:
        return clip_image_size(self.clip)

    def _input(self, rgb: Tensor) -> Tensor:
        if rgb.dim() != 4 or rgb.shape[1] != 3:
            raise ValueError(f"pictures must be [N, 3, H, W], got {tuple(rgb.shape)}")
        dtype = next(self.parameters()).dtype
        return clip_preprocess(rgb.to(self.device, torch.float32), self.image_size).to(dtype)

    @torch.no_grad()
    def embedding(self, rgb: Tensor) -> Tensor:
        """[N, 3, H, W] in [0, 1] on white -> the unit-norm image embedding [N, D] (float32)."""
        e = self.clip.visual(self._input(rgb)).float()
        return e / e.norm(dim=-1, keepdim=True).clamp_min(1e-12)

    @torch.no_grad()
    def grid(self, rgb: Tensor) -> Tensor:
        """[N, 3, H, W] -> the last transformer layer's patch tokens before ``ln_post``, no
        class token, channels first: [N, width, tokens] (float32)."""
        visual = self.clip.visual
        seen = {}
        handle = visual.transformer.register_forward_hook(
            lambda module, args, out: seen.__setitem__("x", out))
        try:
            visual(self._input(rgb))
        finally:
            handle.remove()
        x = seen["x"]
        if x.shape[0] != rgb.shape[0]:          # an OpenCLIP that keeps [L, N, D]
            x = x.transpose(0, 1)
        return x[:, 1:].transpose(1, 2).float().contiguous()

    def condition(self, rgb: Tensor, kinds=("image-vec",)) -> dict:
        """The conditions the given model kinds read: {"embedding": ..., "grid": ...}."""
        out = {}
        if "image-vec" in kinds:
            out["embedding"] = self.embedding(rgb)
        if any(k in ("image-grid", "upsample") for k in kinds):
            out["grid"] = self.grid(rgb)
        return out


@dataclass
class PointModelSettings:
    """What a point-model folder says about its pictures and clouds (see the module doc)."""

    image_size: int = 256
    object_fraction: float = 0.85
    world_scale: float = 1.6
    steps: int = 64
    guidance_scale: float = 3.0
    points: Optional[int] = None
    conditioner: object = None            # a folder Path or (arch, tag)
    upsampler: Optional[Path] = None
    extra: dict = field(default_factory=dict)

    @classmethod
    def read(cls, folder: Path) -> "PointModelSettings":
        data, _ = read_point_config(folder)
        try:
            inp = dict(data.get("input") or {})
            sampler = dict(data.get("sampler") or {})
            s = cls(image_size=int(inp.get("image_size", 256)),
                    object_fraction=float(inp.get("object_fraction", 0.85)),
                    world_scale=float(data.get("world_scale", 1.6)),
                    steps=int(sampler.get("steps", 64)),
                    guidance_scale=float(sampler.get("guidance_scale", 3.0)),
                    points=None if sampler.get("points") is None else int(sampler["points"]),
                    extra=data)
            cond = data.get("conditioner")
            if isinstance(cond, dict):
                s.conditioner = (str(cond["model"]), str(cond.get("pretrained", "")))
            elif isinstance(cond, str):
                s.conditioner = _relative(folder, cond)
            elif (folder / CONDITIONER_DIR).is_dir():
                s.conditioner = folder / CONDITIONER_DIR
            else:
                s.conditioner = RELEASE_CLIP
            if data.get("upsampler"):
                s.upsampler = _relative(folder, str(data["upsampler"]))
        except (TypeError, ValueError, KeyError) as exc:
            raise UserError(f"{folder}/config.json has malformed settings "
                            f"({type(exc).__name__}: {exc}); convert or train it again") from None
        if not (16 <= s.image_size <= 4096 and 0 < s.object_fraction <= 1 and s.world_scale > 0
                and s.steps >= 1):
            raise UserError(f"{folder}/config.json has impossible settings (input "
                            f"{s.image_size} px at {s.object_fraction}, world_scale "
                            f"{s.world_scale}, steps {s.steps})")
        return s


def _relative(folder: Path, path: str) -> Path:
    p = Path(path).expanduser()
    return p if p.is_absolute() else folder / p


def model_folder(spec: str) -> Path:
    """``model:PATH`` or ``PATH`` -> the folder (a relative ``models/toy/...`` is the shipped
    toy model, from any directory)."""
    from engine.resources import toy_model_path

    name = spec[len(MODEL_PREFIX):] if spec.startswith(MODEL_PREFIX) else spec
    path = Path(name).expanduser()
    if not path.is_absolute() and not path.exists():
        path = toy_model_path(path)
    return path


class PointCloudModel:
    """A loaded point model (base, optional upsampler, image encoder, settings):
    :meth:`cloud` turns a picture into a coloured cloud in the engine's world frame."""

    def __init__(self, base: PointTransformer, encoder: PointImageEncoder,
                 settings: PointModelSettings, upsampler: Optional[PointTransformer] = None,
                 folder: Optional[Path] = None):
        self.base, self.encoder, self.settings = base, encoder, settings
        self.upsampler, self.folder = upsampler, folder
        if base.config.kind == "uncond":
            raise UserError(f"{folder}: an unconditional point model cannot follow a picture")
        if base.config.kind == "image-vec" and base.config.clip_dim != encoder.embed_dim:
            raise UserError(f"{folder}: the model reads {base.config.clip_dim}-d embeddings "
                            f"but its conditioner gives {encoder.embed_dim}-d ones")

    @classmethod
    def load(cls, spec: Union[str, Path], device=None, upsampler: Optional[str] = None
             ) -> "PointCloudModel":
        """A point-model folder (``model:PATH`` or ``PATH``) with its encoder (and an
        upsampler folder: ``upsampler``, else the one its config.json names); one-line
        UserError when the folder, its weights or its conditioner cannot be had."""
        folder = model_folder(str(spec))
        if not folder.is_dir():
            raise UserError(f"point model {folder} not found; the toy one is models/toy/pointe "
                            "(python -m guidance.training.toy_models models=[pointe] makes it), "
                            "a released one must be converted: python -m "
                            "guidance.pointcloud.convert CHECKPOINT.pt OUT model=NAME")
        settings = PointModelSettings.read(folder)
        if upsampler:
            settings.upsampler = model_folder(str(upsampler))
        base = load_point_model(folder, device=device)
        upsampler = (load_point_model(settings.upsampler, device=device)
                     if settings.upsampler is not None else None)
        key = f"the conditioner of point model {folder}"
        encoder = PointImageEncoder.load(settings.conditioner, key)
        if device is not None:
            encoder = encoder.to(device)
        return cls(base, encoder, settings, upsampler, folder)

    def picture(self, path, log=None):
        """The picture at ``path`` as this model expects it (engine.images' loading at the
        model's size and object fraction): a ReferenceImage."""
        from engine.images import load_reference_image

        return load_reference_image(path, self.settings.image_size,
                                    self.settings.object_fraction, log=log)

    def condition(self, rgb: Tensor) -> dict:
        """[H, W, 3] or [N, H, W, 3] in [0, 1] on white -> the models' conditions."""
        if rgb.dim() == 3:
            rgb = rgb[None]
        kinds = [self.base.config.kind] + ([self.upsampler.config.kind] if self.upsampler else [])
        return self.encoder.condition(rgb.permute(0, 3, 1, 2), kinds)

    def cloud(self, rgb: Tensor, seed: int = 0, steps: Optional[int] = None,
              guidance_scale: Optional[float] = None, points: Optional[int] = None,
              world: bool = True) -> Tensor:
        """One cloud for a picture [H, W, 3] (on white, in [0, 1]): [K, 6] float32 on the
        CPU, xyz in the engine's world (``world``; else the model's units), rgb in [0, 1].
        Seeded: the same picture and seed give the same cloud."""
        s = self.settings
        generator = torch.Generator(device=self.base.device).manual_seed(int(seed))
        cloud = sample_cloud(self.base, self.upsampler, self.condition(rgb),
                             base_points=points or s.points,
                             steps=steps or s.steps,
                             guidance_scale=s.guidance_scale if guidance_scale is None
                             else guidance_scale, generator=generator)[0].float().cpu()
        if world:
            cloud[:, :3] = cloud[:, :3] * s.world_scale
        return cloud


def describe(model: PointCloudModel) -> str:
    c = model.base.config
    up = f" + upsampler {model.upsampler.config.points}" if model.upsampler else ""
    return (f"{model.folder}: {c.kind}, width {c.width}, {c.layers} layers, "
            f"{model.settings.points or c.points} points{up}")


def save_settings(folder: Path, **values) -> None:
    """Merge ``values`` into a point-model folder's config.json (kept last-written)."""
    from engine.atomic import atomic_write_text

    path = Path(folder) / "config.json"
    data = json.loads(path.read_text())
    data.update(values)
    atomic_write_text(path, json.dumps(data, indent=2))


__all__ = ["PointImageEncoder", "PointModelSettings", "PointCloudModel", "model_folder",
           "describe", "save_settings", "RELEASE_CLIP", "MODEL_PREFIX", "CONDITIONER_DIR"]
