"""The run folder: where it goes, the metrics log, progress images.

Layout of one run::

    outputs/RECIPE/NAME-YYYYmmdd-HHMMSS/
      config.yaml       the fully resolved config (re-runnable, used by resume=)
      metrics.jsonl     one JSON line per step: losses, weights, learning rates, time
      checkpoints/      NN-STAGE-STEP.safetensors
      renders/          progress images STAGE-STEP.png and final.png
      (exported meshes and videos of later stages)
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path
from typing import Any, Dict, Optional

import numpy as np
import torch
from PIL import Image

from engine.checkpoint import atomic_write_text


def slug(text: str, limit: int = 40) -> str:
    s = re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")
    return s[:limit].strip("-") or "run"


def _unique(path: Path) -> Path:
    if not path.exists():
        return path
    i = 1
    while Path(f"{path}-{i}").exists():
        i += 1
    return Path(f"{path}-{i}")


def choose_run_dir(root: str, recipe: str, name: Optional[str], exact: Optional[str],
                   image: Optional[str], prompt: Optional[str]) -> Path:
    """A new folder for this run; an existing folder is never reused (a suffix is added)."""
    if exact:
        path = Path(exact)
        if path.exists() and (not path.is_dir() or any(path.iterdir())):
            path = _unique(path)
        return path
    if name is None:
        name = Path(image).stem if image else (prompt if prompt else recipe)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return _unique(Path(root) / slug(recipe) / f"{slug(name)}-{stamp}")


class MetricsLog:
    """Append-only JSON-lines log, flushed every line so a crash loses nothing written."""

    def __init__(self, path: Path):
        self.path = path
        self._file = open(path, "a", buffering=1)

    def write(self, record: Dict[str, Any]) -> None:
        self._file.write(json.dumps(record) + "\n")

    def close(self) -> None:
        self._file.close()

    @staticmethod
    def truncate_after(path: Path, stage_index: int, step: int) -> None:
        """Drop records after (stage_index, step): those steps are about to be redone."""
        if not path.exists():
            return
        kept = []
        for line in path.read_text().splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut by a crash
            if (rec.get("stage_index", 0), rec.get("step", 0)) <= (stage_index, step):
                kept.append(line)
        atomic_write_text(path, "".join(k + "\n" for k in kept))


def to_uint8(image: torch.Tensor) -> np.ndarray:
    """[H, W, C] float in [0, 1] (C = 1 or 3) -> uint8 [H, W, 3]."""
    image = image.detach().float().clamp(0, 1).cpu()
    if image.shape[-1] == 1:
        image = image.expand(*image.shape[:-1], 3)
    return (image.numpy() * 255.0 + 0.5).astype(np.uint8)


def save_grid(path: Path, rows: list) -> None:
    """Save rows of [B, H, W, C] image batches as one PNG (each row: the B views side by side)."""
    strips = [np.concatenate([to_uint8(img) for img in row], axis=1) for row in rows]
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.concatenate(strips, axis=0)).save(path)
