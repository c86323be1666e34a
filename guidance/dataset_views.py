"""Fitting to posed views of one object from a multi-view dataset (docs/dataset.md).

Two plugins that work together on the same object folder:

* cameras ``dataset-views``: each step draws ``views_per_step`` of the object's training views
  (its camera groups; the free reference views are held out for evaluation unless
  ``holdout: none``) and tags the cameras with their view index;
* guidance ``dataset-l2``: plain L2 between each render and the view it was drawn for (colour
  composited on white, and the mask).

With no diffusion prior this is multi-view reconstruction: the check that a representation
can reproduce a known object, and a building block for recipes that add priors.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from engine.cameras import Cameras
from engine.errors import ConfigError, InputError
from engine.plugin import Guidance, RunInputs, StepInfo
from engine.registry import register
from guidance.multiview.targets import ViewTargets

HOLDOUT = ("references", "none")


@dataclass
class ObjectViews:
    """Every view of one object: rgb [N, S, S, 3] on white, mask [N, S, S, 1], cameras [N]."""

    rgb: Tensor
    mask: Tensor
    cameras: Cameras
    is_reference: Tensor          # [N] bool
    mesh: Optional[Path]

    def train_indices(self, holdout: str) -> List[int]:
        return [i for i in range(len(self.cameras))
                if holdout == "none" or not bool(self.is_reference[i])]

    def heldout_indices(self) -> List[int]:
        return [i for i in range(len(self.cameras)) if bool(self.is_reference[i])]


def load_object_views(folder, size: Optional[int] = None) -> ObjectViews:
    """Read an object folder of the multi-view dataset format (groups, then references)."""
    from engine.datasets.mvdataset import load_view

    folder = Path(folder)
    path = folder / "object.json"
    if not path.is_file():
        raise InputError(f"{folder} is not a dataset object (no object.json); see "
                         "docs/dataset.md or make one with python -m engine.datasets.toy_world")
    try:
        record = json.loads(path.read_text())
        cams = [v for g in record.get("groups", []) for v in g["views"]]
        refs = list(record.get("references", []))
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise InputError(f"{path} is not a valid object record ({exc})")
    seen, entries = set(), []
    for cam, is_ref in [(c, False) for c in cams] + [(c, True) for c in refs]:
        if cam["file"] not in seen:
            seen.add(cam["file"])
            entries.append((cam, is_ref))
    if not entries:
        raise InputError(f"{path} lists no views")
    rgbs, masks = [], []
    for cam, _ in entries:
        image = folder / cam["file"]
        if not image.is_file():
            raise InputError(f"view {image} is missing")
        rgb, mask = load_view(image, size or _png_size(image))
        rgbs.append(rgb.permute(1, 2, 0))
        masks.append(mask.permute(1, 2, 0))
    c2w = torch.tensor([cam["c2w"] for cam, _ in entries], dtype=torch.float32)
    field = lambda k: torch.tensor([float(cam[k]) for cam, _ in entries])  # noqa: E731
    cameras = Cameras(c2w, torch.deg2rad(field("fovy")), field("elevation"), field("azimuth"),
                      field("distance"), views_per_object=1,
                      index=torch.arange(len(entries)))
    mesh = folder / record["mesh"] if record.get("mesh") else None
    return ObjectViews(torch.stack(rgbs), torch.stack(masks), cameras,
                       torch.tensor([r for _, r in entries]), mesh)


def _png_size(path: Path) -> int:
    from PIL import Image

    with Image.open(path) as img:
        return img.size[0]


def _check(cfg) -> None:
    if cfg.holdout not in HOLDOUT:
        raise ConfigError(f"holdout: '{cfg.holdout}' is not one of {', '.join(HOLDOUT)}")
    if not cfg.path:
        raise ConfigError("path: set the dataset object folder (e.g. "
                          "stages.fit.cameras.path=data/toy/obj_00000)")


@register("cameras", "dataset-views")
class DatasetViewSampler:
    """Random training views of one dataset object (their recorded cameras)."""

    @dataclass
    class Config:
        path: str = ""                 # the object's folder
        views_per_step: int = 4
        holdout: str = "references"    # references (kept for evaluation) | none

        def __post_init__(self):
            _check(self)
            if self.views_per_step < 1:
                raise ConfigError(f"views_per_step: must be >= 1, got {self.views_per_step}")

    def __init__(self, cfg: "DatasetViewSampler.Config", device=None):
        self.cfg = cfg
        self.device = device
        views = load_object_views(cfg.path, size=8)   # cameras only; images are the guidance's
        self.cameras = views.cameras
        self.train = torch.tensor(views.train_indices(cfg.holdout))
        if len(self.train) == 0:
            raise InputError(f"{cfg.path} has no training views (all are held out)")

    def sample(self, step: int, generator: torch.Generator) -> Cameras:
        k = min(self.cfg.views_per_step, len(self.train))
        pick = self.train[torch.randperm(len(self.train), generator=generator)[:k]]
        return self.cameras[pick]


@register("guidance", "dataset-l2")
class DatasetViewsL2(ViewTargets, Guidance):
    """L2 colour and mask losses between renders and the dataset views they were drawn for."""

    loss_names = ("rgb", "mask")

    @dataclass
    class Config:
        path: str = ""
        holdout: str = "references"

        def __post_init__(self):
            _check(self)

    def __init__(self, cfg: "DatasetViewsL2.Config", device=None, inputs: RunInputs = None):
        super().__init__()
        views = load_object_views(cfg.path)
        self.register_buffer("rgb", views.rgb.to(device), persistent=False)
        self.register_buffer("mask", views.mask.to(device), persistent=False)
        self._resized: Dict[int, tuple] = {}

    def forward(self, outputs: Dict[str, Tensor], cameras: Cameras,
                step: StepInfo) -> Dict[str, Tensor]:
        if cameras.index is None:
            raise ConfigError("guidance dataset-l2 needs cameras from the dataset-views sampler "
                              "(set the stage's cameras: {type: dataset-views, path: ...})")
        rgb, mask = self.targets(outputs["rgb"].shape[1])
        idx = cameras.index.to(rgb.device)
        return {"rgb": F.mse_loss(outputs["rgb"], rgb[idx]),
                "mask": F.mse_loss(outputs["opacity"], mask[idx])}
