"""The CLIP trainer (mode ``clip``): contrastive training of an OpenCLIP model on
(render, caption).

Every view of a batch (group views and the reference) is matched against the batch's
distinct captions, InfoNCE both ways with CLIP's learned logit scale; images sharing a
caption are all positives of it. The model is saved in OpenCLIP's folder format
(open_clip_config.json + open_clip_model.safetensors), which the conditioners load.
"""

from __future__ import annotations

from pathlib import Path
from typing import Dict, Optional, Tuple

import torch
from torch import Tensor

from engine.errors import ConfigError, UserError
from engine.seeding import step_seed
from guidance.training.config import FinetuneConfig
from guidance.training.loop import STAGE_INDEX, Trainer
from guidance.training.losses import clip_loss


def build_clip(cfg: FinetuneConfig) -> Tuple[torch.nn.Module, dict]:
    """(trainable OpenCLIP CLIP with both towers, its model_cfg)."""
    from guidance.multiview.openclip import (build_openclip, folder_weights, read_folder_config,
                                             read_weights, tiny_openclip_config)

    m = cfg.model
    if m.init == "random":
        model_cfg = dict(m.clip) or tiny_openclip_config()
        try:
            clip = build_openclip(model_cfg, seed=step_seed(cfg.seed, STAGE_INDEX, -1))
        except (TypeError, ValueError, KeyError) as exc:
            raise ConfigError(f"model.clip: not a buildable OpenCLIP model_cfg ({exc})") from None
    else:
        folder = Path(m.init)
        model_cfg = read_folder_config(folder, "model.init")["model_cfg"]
        weights = folder_weights(folder)
        if weights is None:
            raise UserError(f"model.init: {folder} holds no OpenCLIP weights")
        clip = build_openclip(model_cfg, seed=0)
        try:
            clip.load_state_dict(read_weights(weights), strict=True)
        except RuntimeError as exc:
            raise UserError(f"model.init: {folder} is not a complete OpenCLIP model (both "
                            f"towers) ({str(exc).splitlines()[0]})") from None
    clip.requires_grad_(True)
    clip.train()
    return clip, model_cfg


class ClipTrainer(Trainer):
    """Trains both towers of an OpenCLIP model; ``compute_loss(batch, generator)`` is the
    whole per-step maths (the generator is unused: the loss draws nothing)."""

    def __init__(self, cfg: FinetuneConfig, out_dir: Path, resume: Optional[Path] = None):
        self.model = None            # no diffusion model in this mode
        super().__init__(cfg, out_dir, resume)

    def build(self) -> Tuple[torch.nn.Module, Optional[int]]:
        self.clip, self.clip_cfg = build_clip(self.cfg)
        return self.clip, self.cfg.data.image_size

    def checkpoint_modules(self) -> Dict[str, torch.nn.Module]:
        return {"clip": self.clip}

    def write_model(self, module: torch.nn.Module, folder: Path, step: int) -> None:
        from guidance.multiview.openclip import save_openclip_folder

        save_openclip_folder(module, self.clip_cfg, folder)

    def compute_loss(self, batch: dict, generator: torch.Generator) -> Tuple[Tensor, dict]:
        import open_clip

        from guidance.multiview.openclip import clip_preprocess

        captions = list(batch["caption"])
        empty = [i for i, c in zip(batch["id"], captions) if not c]
        if empty:
            raise UserError(f"clip mode needs a caption per object; {', '.join(empty[:3])} in "
                            f"{self.cfg.data.root} have none")
        images = batch["images"]                                   # [B, V, 3, S, S]
        parts = [images.flatten(0, 1)]
        distinct = sorted(set(captions))
        owner = torch.tensor([distinct.index(c) for c in captions])
        labels = [owner.repeat_interleave(images.shape[1])]
        if "has_reference" in batch:
            has = batch["has_reference"].cpu()
            parts.append(batch["reference"][has.to(batch["reference"].device)])
            labels.append(owner[has])
        labels = torch.cat(labels).to(self.device)
        clip = self.accelerator.unwrap_model(self.net)
        size = clip.visual.image_size
        size = int(size[0] if isinstance(size, (tuple, list)) else size)
        pixels = clip_preprocess(torch.cat(parts).to(self.device).float(), size)
        tokens = open_clip.tokenize(distinct, context_length=clip.context_length).to(self.device)
        out = self.net(pixels, tokens)
        if isinstance(out, dict):
            img, txt, scale = out["image_features"], out["text_features"], out["logit_scale"]
        else:
            img, txt, scale = out[:3]
        loss, acc = clip_loss(img, txt, scale, labels)
        return loss, {"accuracy": float(acc), "logit_scale": float(scale.detach())}
