"""Starting a triplane from Compress3D's feed-forward result (``init: compress3d``).

The ``compress3d:`` block (:class:`Compress3DInit`) names a Compress3D model folder
(:mod:`guidance.compress3d.pipeline`; the toy one is ``models/toy/compress3d``) and the
picture (recipes write ``image: ${inputs.image}``; without it the run's input picture is
used). At the start of the stage the model draws the picture's triplane latent (seeded), the
autoencoder decodes it, and the representation is distilled to the decoded field
(:func:`representations.triplane.distill`): density ``2 level sigmoid(sharpness * logit)``
with ``level`` the representation's ``isosurface_threshold`` (so the occupancy's zero level is
where the export cuts) and the decoded colour as albedo.

The draw and the distilled weights are remembered for the process, keyed by the settings: a
stage rebuilt for an export, an evaluation or a resume does not sample again (its weights
are then overwritten by the checkpoint anyway).
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from engine.errors import ConfigError


@dataclass
class Compress3DInit:
    """The ``compress3d:`` block of a triplane with ``init: compress3d``."""

    model: str = "models/toy/compress3d"   # a Compress3D model folder
    image: Optional[str] = None            # the picture (recipes: ${inputs.image})
    seed: int = 0
    steps: int = 0                         # DDIM steps (0: the model's)
    guidance_scale: float = -1.0           # (-1: the model's)
    sharpness: float = 4.0                 # density 2 level sigmoid(sharpness * logit)

    def __post_init__(self):
        if not self.model:
            raise ConfigError("compress3d.model: init: compress3d needs a Compress3D model "
                              "folder (e.g. models/toy/compress3d)")
        if self.steps < 0:
            raise ConfigError(f"compress3d.steps: must be >= 0 (0: the model's), got "
                              f"{self.steps}")
        if self.guidance_scale < 0 and self.guidance_scale != -1.0:
            raise ConfigError("compress3d.guidance_scale: must be >= 0 (-1: the model's)")
        if not self.sharpness > 0:
            raise ConfigError(f"compress3d.sharpness: must be > 0, got {self.sharpness}")


def as_init(value) -> Compress3DInit:
    if isinstance(value, Compress3DInit):
        return value
    if value is None:
        return Compress3DInit()
    if isinstance(value, dict):
        return Compress3DInit(**value)
    raise ConfigError(f"compress3d: expected a mapping, got {type(value).__name__}")


_CACHE: dict = {}


def start_from_compress3d(rep, init: Compress3DInit, distill, device=None, inputs=None,
                          log=None) -> None:
    """Distil ``rep`` (a :class:`representations.triplane.Triplane`) to the field Compress3D
    draws for the picture with ``distill(rep, field, rep.cfg.distill)`` (the triplane's own
    distillation, passed in: a library does not import a plugin); see the module doc."""
    from guidance.compress3d.pipeline import Compress3D, describe

    log = log or (lambda s: print(s, file=sys.stderr))
    image = init.image or getattr(getattr(inputs, "image", None), "path", None)
    if not image:
        raise ConfigError("compress3d.image: init: compress3d draws the triplane from the run's "
                          "picture; give image=PATH (recipes set compress3d.image: "
                          "${inputs.image})")
    key = (init.model, str(image), init.seed, init.steps, init.guidance_scale, init.sharpness,
           repr(rep.cfg), str(device))
    if key not in _CACHE:
        _CACHE.clear()
        t0 = time.perf_counter()
        model = Compress3D.load(init.model, key="compress3d.model")
        rgb = model.condition_pictures(image, init.seed)   # the picture, or its drawn views
        latents, _ = model.latent(rgb, init.seed, init.steps or None,
                                  None if init.guidance_scale < 0 else init.guidance_scale)
        field = model.field(latents[0], rep.cfg.isosurface_threshold, init.sharpness)
        field.to(rep.planes.device)
        sampled = time.perf_counter()
        losses = distill(rep, field, rep.cfg.distill)
        log(f"triplane: {describe(model)} drew the picture's latent in {sampled - t0:.1f} s; "
            f"distilled in {len(losses)} steps ({time.perf_counter() - sampled:.1f} s)"
            + (f", loss {losses[0]:.4g} -> {losses[-1]:.4g}" if losses else ""))
        _CACHE[key] = {k: v.detach().clone() for k, v in rep.state_dict().items()}
    else:
        rep.load_state_dict(_CACHE[key])
    if rep.cfg.occupancy.enabled:
        rep.update_occupancy()


def preflight(init: Compress3DInit, key: str) -> None:
    """Before anything of a run is written: the model folder is a Compress3D model and a
    picture is given; one line naming ``key`` otherwise."""
    from engine.resources import toy_model_path
    from guidance.compress3d.latent_diffusion import Compress3DDiffusion

    if not init.image:
        raise ConfigError(f"{key}.compress3d.image: init: compress3d draws the triplane from "
                          "the run's picture; give image=PATH (recipes set compress3d.image: "
                          "${inputs.image})")
    folder = Path(init.model)
    if not folder.is_dir():
        folder = toy_model_path(folder)
    Compress3DDiffusion.read_record(folder, f"{key}.compress3d.model")
