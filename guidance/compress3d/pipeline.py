"""Compress3D from a picture: CLIP image embedding -> shape embedding -> triplane latent ->
decoded occupancy and colour -> mesh, in seconds (the paper's inference path).

A Compress3D model folder (what ``python -m guidance.training recipe=toy-compress3d`` writes;
the toy one is ``models/toy/compress3d``)::

    config.json, model.safetensors    the prior and latent diffusion
                                      (:class:`~guidance.compress3d.latent_diffusion.Compress3DDiffusion`),
                                      plus "input" (how pictures are loaded) and "sampler"
                                      (steps, guidance_scale) defaults
    autoencoder/                      the triplane autoencoder whose latents it draws
    conditioner/                      the OpenCLIP image tower whose embedding it reads

:class:`Compress3D` loads it; :meth:`Compress3D.generate` is the whole path for one picture,
and :class:`DecodedField` exposes a latent as a radiance field (``density``, ``albedo``) that
the ``triplane`` representation distils (``init: compress3d``).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
import torch.nn as nn
from torch import Tensor

from engine.errors import UserError

AUTOENCODER_DIR = "autoencoder"
CONDITIONER_DIR = "conditioner"
#: how a multi-view-conditioned model's views are drawn (its config.json "views" overrides):
#: the toy views recipe's group (isotropic3d-toy-views: 4 views 90 degrees apart at elevation
#: 0, the first at the picture's camera; the best of 4 seeds by likeness to the picture)
VIEWS_DEFAULTS = {"model": "models/toy/stage2", "views": 4, "candidates": 4, "steps": 30,
                  "guidance_scale": 1.0, "elevation": 0.0, "fovy": 40.0}


@dataclass
class Generated:
    """One picture's result: the latent [3, c, r, r], the normalised shape embedding drawn by
    the prior (None for a model without shape conditioning), the mesh (a trimesh with vertex
    colours, or None when the decoded field is empty), seconds per part and, for a
    multi-view-conditioned model, the drawn views [K, S, S, 3]."""

    latent: Tensor
    shape: Optional[Tensor]
    mesh: object
    seconds: dict
    views: Optional[Tensor] = None


class DecodedField(nn.Module):
    """A decoded latent as a field in the engine's world (the autoencoder's cube):
    ``density(points [N, 3]) -> [N]`` = ``2 level sigmoid(sharpness * logit)``, so the
    occupancy's zero level sits at density ``level`` (a representation's isosurface
    threshold) and the inside is opaque; ``albedo(points) -> [N, 3]`` the decoded colour."""

    def __init__(self, autoencoder, latent: Tensor, level: float = 10.0, sharpness: float = 4.0):
        super().__init__()
        self.autoencoder = autoencoder
        with torch.no_grad():
            self.register_buffer("planes", autoencoder.decode(latent[None].to(
                next(autoencoder.parameters()).device)))
        self.level, self.sharpness = float(level), float(sharpness)

    def _query(self, points: Tensor):
        logit, rgb = self.autoencoder.query(self.planes, points.reshape(1, -1, 3))
        return logit[0], rgb[0]

    def density(self, points: Tensor) -> Tensor:
        return 2.0 * self.level * torch.sigmoid(self.sharpness * self._query(points)[0])

    def albedo(self, points: Tensor) -> Tensor:
        return self._query(points)[1]


class Compress3D:
    """A loaded Compress3D model folder (see the module doc)."""

    def __init__(self, diffusion, autoencoder, encoder, record: dict, folder: Path):
        self.diffusion, self.autoencoder, self.encoder = diffusion, autoencoder, encoder
        self.record, self.folder = record, folder
        inp = record.get("input") or {}
        self.image_size = int(inp.get("image_size", 64))
        self.object_fraction = float(inp.get("object_fraction", 0.7))
        sampler = record.get("sampler") or {}
        self.steps = int(sampler.get("steps", 25))
        self.guidance_scale = float(sampler.get("guidance_scale", 3.0))

    @classmethod
    def load(cls, folder, device=None, key: str = "model") -> "Compress3D":
        from engine.resources import toy_model_path
        from guidance.compress3d.autoencoder import TriplaneAutoencoder
        from guidance.compress3d.latent_diffusion import Compress3DDiffusion
        from guidance.pointcloud.picture import PointImageEncoder

        folder = Path(folder)
        if not folder.is_dir() and toy_model_path(folder).is_dir():
            folder = toy_model_path(folder)        # models/toy/compress3d from anywhere
        record = Compress3DDiffusion.read_record(folder, key)
        for sub in (AUTOENCODER_DIR, CONDITIONER_DIR):
            if not (folder / record.get(sub, sub)).is_dir():
                raise UserError(f"{key}: {folder} has no {sub}/ folder; a Compress3D model "
                                "folder carries its autoencoder and image tower (train it "
                                "with python -m guidance.training recipe=toy-compress3d)")
        diffusion = Compress3DDiffusion.from_pretrained(folder, key)
        autoencoder = TriplaneAutoencoder.from_pretrained(folder / record.get(AUTOENCODER_DIR,
                                                                              AUTOENCODER_DIR),
                                                          f"{key} (its autoencoder)")
        encoder = PointImageEncoder.load(folder / record.get(CONDITIONER_DIR, CONDITIONER_DIR),
                                         f"{key} (its conditioner)")
        if encoder.embed_dim != diffusion.config.cond_dim or \
                list(autoencoder.config.latent_shape) != list(diffusion.config.latent_shape):
            raise UserError(f"{key}: {folder}'s parts do not fit together (embedding "
                            f"{encoder.embed_dim} vs {diffusion.config.cond_dim}, latent "
                            f"{list(autoencoder.config.latent_shape)} vs "
                            f"{diffusion.config.latent_shape})")
        device = torch.device(device or "cpu")
        return cls(diffusion.to(device), autoencoder.to(device), encoder.to(device), record,
                   folder)

    @property
    def device(self) -> torch.device:
        return self.diffusion.latent_mean.device

    def picture(self, path, log=None):
        """The input picture loaded as the engine loads it, at the model's size and framing."""
        from engine.images import load_reference_image

        return load_reference_image(path, self.image_size, self.object_fraction, log=log)

    @property
    def views(self) -> int:
        """Pictures per condition: 1, or K for a model conditioned on a group of K views."""
        return int(self.diffusion.config.cond_tokens)

    def draw_views(self, image, seed: int = 0, views_model: Optional[str] = None) -> Tensor:
        """The group of K views a multi-view model draws for the picture file ``image``, as
        ``sampled-views`` draws it (:func:`guidance.multiview.sample.draw_best_group`; the
        settings: :data:`VIEWS_DEFAULTS` updated by the folder's "views"): [K, S, S, 3] on
        white, the first at the picture's camera."""
        from engine.cameras import Cameras
        from guidance.multiview.prior import MultiViewPrior
        from guidance.multiview.sample import draw_best_group

        v = {**VIEWS_DEFAULTS, **(self.record.get("views") or {})}
        prior = MultiViewPrior.load(views_model or v["model"], device=self.device, dtype=None)
        picture = self.picture(image)
        cond, uncond = prior.contexts(picture, None, who="the Compress3D views")
        az = torch.arange(self.views, dtype=torch.float32) * 360.0 / self.views
        cams = Cameras.from_spherical(float(v["elevation"]), az, 1.0, float(v["fovy"]),
                                      views_per_object=self.views)
        rgb, _, _, _ = draw_best_group(prior, cond, uncond, prior.camera_vectors(cams, "mvdream"),
                                       int(v["candidates"]), int(seed), int(v["steps"]),
                                       float(v["guidance_scale"]), 0, picture)
        return rgb.float().cpu()

    def condition_pictures(self, image, seed: int = 0, views_model: Optional[str] = None
                           ) -> Tensor:
        """What the model is conditioned on for the picture file ``image``: the picture
        [1, 3, S, S], or (a multi-view-conditioned model) its drawn views [1, K, 3, S, S]."""
        if self.views == 1:
            return self.picture(image).rgb.permute(2, 0, 1)[None]
        return self.draw_views(image, seed, views_model).permute(0, 3, 1, 2)[None]

    @torch.no_grad()
    def latent(self, rgb: Tensor, seed: int = 0, steps: Optional[int] = None,
               guidance_scale: Optional[float] = None):
        """Picture(s) [N, 3, H, W] (or groups of K views [N, K, 3, H, W]) in [0, 1] on white
        -> (latents [N, 3, c, r, r], normalised shape embeddings [N, S] or None), seeded."""
        e = self.encoder.embedding(rgb.reshape(-1, *rgb.shape[-3:]).to(self.device))
        if rgb.dim() == 5:
            e = e.reshape(rgb.shape[0], rgb.shape[1], -1)
        g = torch.Generator().manual_seed(int(seed))
        return self.diffusion.sample(e, steps or self.steps,
                                     self.guidance_scale if guidance_scale is None
                                     else guidance_scale, generator=g)

    def generate(self, image, seed: int = 0, steps: Optional[int] = None,
                 guidance_scale: Optional[float] = None, resolution: int = 64,
                 views_model: Optional[str] = None) -> Generated:
        """A picture file -> :class:`Generated` (mesh by marching cubes at ``resolution``)."""
        from guidance.compress3d.autoencoder import decode_mesh

        t0 = time.perf_counter()
        rgb = self.condition_pictures(image, seed, views_model)
        t1 = time.perf_counter()
        latents, shapes = self.latent(rgb, seed, steps, guidance_scale)
        t2 = time.perf_counter()
        mesh = decode_mesh(self.autoencoder, latents[0].cpu(), resolution)
        t3 = time.perf_counter()
        return Generated(latents[0].cpu(), None if shapes is None else shapes[0].cpu(), mesh,
                         {"picture": t1 - t0, "sample": t2 - t1, "decode": t3 - t2},
                         rgb[0].permute(0, 2, 3, 1) if rgb.dim() == 5 else None)

    def field(self, latent: Tensor, level: float = 10.0, sharpness: float = 4.0) -> DecodedField:
        return DecodedField(self.autoencoder, latent, level, sharpness)


def describe(model: Compress3D) -> str:
    c = model.diffusion.config
    views = f", conditioned on {c.cond_tokens} drawn views" if c.cond_tokens > 1 else ""
    return (f"Compress3D {model.folder} (latent {c.latent_shape}, "
            f"{'with' if c.shape_condition else 'without'} the shape embedding{views})")


__all__ = ["Compress3D", "DecodedField", "Generated", "describe", "VIEWS_DEFAULTS"]
