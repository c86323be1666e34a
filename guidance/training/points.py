"""The point-cloud trainer (mode ``points``): a Point-E model (image-vec: the CLIP image
embedding; or image-grid: its patch grid) learns coloured clouds of a toy world's objects
from a picture of them.

    python -m guidance.training recipe=toy-pointe [data.root=data/toy] [out=DIR] [key=value ...]

Pairs. Every object of ``data.split`` gives ``points.pool`` points on its true mesh
(``mesh.obj``; colours from its vertex colours, :func:`engine.datasets.point_clouds.sample_surface`),
seeded by the object's index. Every view of it (``points.views: all``: the 4-view groups and
the references; ``front``: the canonical front view only) is a picture, loaded as the engine
loads its input (:func:`engine.images.load_reference_image` at ``points.image_size`` with the
object ``points.object_fraction`` of the frame, on white) and embedded once by the frozen
OpenCLIP image tower of ``model.conditioner`` (L2-normalised, as Point-E's). The cloud of a
pair is in the frame of its picture: the object turned by minus the view's azimuth about z,
so the camera that took it sits at azimuth 0, where the engine puts the input's camera; in
Point-E's units (engine units / ``points.world_scale``; rgb 0..255 as the release's loss
expects). Each step draws ``points.cloud_points`` of the pool's points afresh for each pair.

Training is the release's loss (eps MSE + the variational bound on the learned variance,
:meth:`guidance.pointcloud.diffusion.PointDiffusion.training_losses`) with the condition
zeroed ``cfg_dropout`` of the time (the model's own dropout), through the shared loop
(:mod:`guidance.training.loop`: seeded, resumable, accelerate, weight average). The saved
model (``out/model``) is a point-model folder (:mod:`guidance.pointcloud.pretrained`) with the
image tower in ``conditioner/`` and the picture and sampler settings in ``config.json``
(:mod:`guidance.pointcloud.picture`), which ``python -m guidance.pointcloud.sample`` and the
representations' point-cloud initialisation read.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import torch
from torch import Tensor

from engine.errors import ConfigError, InputError, UserError
from engine.seeding import derive_seed, step_seed
from guidance.training.config import FinetuneConfig
from guidance.training.data import toy_world_ids
from guidance.training.loop import STAGE_INDEX, ItemTrainer

#: model sizes for init random when model.point leaves them out (a toy-sized image-vec model)
DEFAULT_POINT_MODEL = dict(width=128, layers=4, heads=2, points=512)
#: the kinds this mode trains (conditioned on a picture, no coarse cloud)
KINDS = ("image-vec", "image-grid")


def timestep_weights(diffusion, t: Tensor, weighting: str = "uniform",
                     gamma: float = 5.0) -> Tensor:
    """Per-row weights [B] of the eps MSE at timesteps ``t``: ``uniform`` 1 (the release's);
    ``min-snr`` min(SNR, gamma) / SNR (Hang et al.: the easy nearly clean steps count less);
    ``x0`` clamp(1 / SNR, 1, gamma): the eps MSE turned into the x0 MSE where noise dominates
    (SNR < 1), up to ``gamma``. The condition decides what a cloud becomes at high noise,
    where the eps MSE barely sees it (an x0 error costs SNR times less there): ``x0`` makes
    those steps count."""
    if weighting == "uniform":
        return torch.ones(t.shape[0])
    ab = diffusion.alphas_cumprod[t.long().cpu()].float()
    snr = ab / (1 - ab).clamp_min(1e-12)
    if weighting == "min-snr":
        return snr.clamp(max=gamma) / snr.clamp_min(1e-12)
    if weighting == "x0":
        return (1.0 / snr.clamp_min(1e-12)).clamp(1.0, gamma)
    raise ConfigError(f"loss_weighting: '{weighting}' is not uniform, min-snr or x0")


def object_views(folder: Path, views: str) -> List[Tuple[str, float]]:
    """(picture file, azimuth in degrees) of an object's views: every view, or the front."""
    record = json.loads((folder / "object.json").read_text())
    found = [(v["file"], float(v["azimuth"])) for g in record.get("groups", [])
             for v in g["views"]] + [(v["file"], float(v["azimuth"]))
                                     for v in record.get("references", [])]
    if views == "front":
        front = record.get("front_view", "r0.png")
        found = [f for f in found if f[0] == front]
    return found


class ToyPointPairs(torch.utils.data.Dataset):
    """(picture embedding, cloud) pairs of a toy-world dataset (see the module doc). Item i:
    {"cloud": [K, 6] (Point-E raw units: xyz, rgb 0..255), "embedding": [D]}; K points drawn
    with torch's RNG (seeded per item by the loader)."""

    def __init__(self, root, split: Optional[str], encoder, pool: int = 4096,
                 cloud_points: int = 512, views: str = "all", image_size: int = 64,
                 object_fraction: float = 0.7, world_scale: float = 1.6, seed: int = 0,
                 log=None, kind: str = "image-vec"):
        import trimesh

        from engine.datasets.point_clouds import sample_surface, to_pointe
        from engine.images import load_reference_image

        root = Path(root)
        self.cloud_points = cloud_points
        self.root = root
        self.ids = toy_world_ids(root, split)
        pools, pairs, pictures = [], [], []
        for i, oid in enumerate(self.ids):
            folder = root / oid
            try:
                mesh = trimesh.load(str(folder / "mesh.obj"), process=False, force="mesh")
            except Exception as exc:
                raise InputError(f"{folder}/mesh.obj cannot be read ({exc})") from None
            cloud = sample_surface(mesh, pool, seed=derive_seed(seed, "cloud", i))
            pools.append(torch.from_numpy(to_pointe(cloud, world_scale)))
            for file, azimuth in object_views(folder, views):
                picture = load_reference_image(folder / file, image_size, object_fraction,
                                               log=None)
                pictures.append(picture.rgb)
                pairs.append((i, azimuth))
            if log and (i + 1) % 50 == 0:
                log(f"points data: {i + 1}/{len(self.ids)} objects")
        self.pools = torch.stack(pools)                                     # [O, P, 6]
        self.object_index = torch.tensor([p[0] for p in pairs])
        self.azimuth = torch.tensor([p[1] for p in pairs], dtype=torch.float32)
        with torch.no_grad():
            rgb = torch.stack(pictures).permute(0, 3, 1, 2)
            self.embeddings = torch.cat([encoder.embedding(chunk).cpu()
                                         for chunk in rgb.split(256)])
            # image-grid models read the patch grid [D, tokens] instead
            self.grids = (torch.cat([encoder.grid(chunk).cpu() for chunk in rgb.split(256)])
                          if kind == "image-grid" else None)
        self.pictures = rgb                                                # for sample grids

    def __len__(self) -> int:
        return len(self.object_index)

    def cloud(self, i: int, generator: Optional[torch.Generator] = None) -> Tensor:
        """The cloud of pair ``i`` in its picture's frame, [K, 6] raw units (rgb 0..255)."""
        from engine.datasets.point_clouds import rotate_z

        pool = self.pools[int(self.object_index[i])]
        pick = torch.randperm(pool.shape[0], generator=generator)[:self.cloud_points]
        out = rotate_z(pool[pick], -float(self.azimuth[i]))
        out[:, 3:] = out[:, 3:] * 255.0
        return out

    def condition(self, i) -> Tensor:
        """The condition of pair(s) ``i``: the embedding [D], or the grid [D, tokens]."""
        return self.embeddings[i] if self.grids is None else self.grids[i]

    def __getitem__(self, i: int) -> Dict[str, Tensor]:
        return {"cloud": self.cloud(i), "condition": self.condition(i)}


def build_point_model(cfg: FinetuneConfig, clip_dim: int, grid: Tuple[int, int] = (0, 0)):
    """The trainable PointTransformer: random (``model.point`` sizes and kind, image-vec or
    image-grid; seeded) or a saved point-model folder (``model.init``) to go on training.
    ``clip_dim``: the conditioner's embedding size; ``grid``: its (width, patch tokens)."""
    from engine.config import validate
    from guidance.pointcloud.pretrained import load_point_model
    from guidance.pointcloud.transformer import PointModelConfig, PointTransformer

    m = cfg.model
    if m.init == "random":
        sizes = {"kind": "image-vec", **DEFAULT_POINT_MODEL, **dict(m.point)}
        for key in ("clip_dim", "grid_dim", "grid_tokens", "cond_drop_prob"):
            if key in sizes:
                raise ConfigError(f"model.point.{key}: set by the run (the conditioner's "
                                  "sizes; cfg_dropout)")
        if sizes["kind"] not in KINDS:
            raise ConfigError(f"model.point.kind: '{sizes['kind']}' is not one of "
                              f"{', '.join(KINDS)}")
        config = validate(PointModelConfig, {**sizes, "clip_dim": clip_dim, "grid_dim": grid[0],
                                             "grid_tokens": grid[1],
                                             "cond_drop_prob": cfg.cfg_dropout}, "model.point.")
        state = torch.random.get_rng_state()
        try:
            torch.manual_seed(step_seed(cfg.seed, STAGE_INDEX, -1))
            model = PointTransformer(config)
        finally:
            torch.random.set_rng_state(state)
    else:
        if m.point:
            raise ConfigError("model.point: a loaded model keeps its sizes; remove model.point "
                              "or use model.init: random")
        model = load_point_model(m.init, trainable=True)
        c = model.config
        if c.kind not in KINDS or (c.kind == "image-vec" and c.clip_dim != clip_dim) or \
                (c.kind == "image-grid" and (c.grid_dim, c.grid_tokens) != tuple(grid)):
            raise UserError(f"model.init: {m.init} is a {c.kind} model that does not read this "
                            f"conditioner ({clip_dim}-d embedding, {grid[0]} x {grid[1]} grid); "
                            f"this mode trains {' or '.join(KINDS)} models")
    model.requires_grad_(True)
    model.train()
    return model


class PointTrainer(ItemTrainer):
    """Trains a Point-E image-vec model on toy-world (picture, cloud) pairs."""

    with_reference = False

    def build(self) -> Tuple[torch.nn.Module, Optional[int]]:
        from guidance.pointcloud.diffusion import PointDiffusion
        from guidance.pointcloud.picture import CONDITIONER_DIR, PointImageEncoder

        m = self.cfg.model
        if m.conditioner is not None:
            # an OpenCLIP folder, or an architecture name with a pretrained tag
            from engine.resources import toy_model_path

            folder = Path(m.conditioner.model)
            if not folder.is_dir():        # models/toy/clip: the shipped one, from anywhere
                folder = toy_model_path(folder)
            spec = (folder if folder.is_dir() or not m.conditioner.pretrained
                    else (m.conditioner.model, m.conditioner.pretrained))
            self.encoder = PointImageEncoder.load(spec, "model.conditioner.model")
        else:
            self.encoder = PointImageEncoder.load(Path(m.init) / CONDITIONER_DIR, "model.init")
        self.encoder.to(self.device)
        with torch.no_grad():
            size = self.encoder.image_size
            grid = tuple(self.encoder.grid(torch.ones(1, 3, size, size)).shape[1:])
        model = build_point_model(self.cfg, self.encoder.embed_dim, grid)
        self.diffusion = PointDiffusion.for_model(model)
        self.point_model = model       # the module itself (checkpoints are read before prepare)
        return model, None

    def load_data(self, image_size):
        p = self.cfg.points
        return ToyPointPairs(self.cfg.data.root, self.cfg.data.split, self.encoder, p.pool,
                             p.cloud_points or self.trainable.config.points, p.views,
                             p.image_size, p.object_fraction, p.world_scale, self.cfg.seed,
                             log=lambda s: print(s, file=sys.stderr, flush=True),
                             kind=self.trainable.config.kind)

    def compute_loss(self, batch: dict, generator: torch.Generator) -> Tuple[Tensor, dict]:
        """The release's loss (eps MSE + vb), the MSE of each row weighted by
        :func:`timestep_weights` (``loss_weighting``; uniform: the release's)."""
        d = self.diffusion
        cloud = batch["cloud"].to(self.device)
        t = torch.randint(0, d.num_timesteps, (cloud.shape[0],), generator=generator)
        losses = d.training_losses(self.net, cloud, t=t.to(self.device),
                                   cond=batch["condition"].to(self.device), generator=generator)
        w = timestep_weights(d, t, self.cfg.loss_weighting, self.cfg.min_snr_gamma)
        loss = (w.to(losses["mse"]) * losses["mse"] + losses["vb"]).mean()
        return loss, {"mse": float(losses["mse"].detach().mean()),
                      "vb": float(losses["vb"].detach().mean())}

    def checkpoint_modules(self) -> Dict[str, torch.nn.Module]:
        return {"model": self.point_model}

    def write_model(self, module: torch.nn.Module, folder: Path, step: int) -> None:
        from guidance.multiview.openclip import save_openclip_folder
        from guidance.pointcloud.picture import CONDITIONER_DIR
        from guidance.pointcloud.pretrained import save_point_model

        p = self.cfg.points
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        if (folder / "config.json").exists():      # not a model until config.json is new
            (folder / "config.json").unlink()
        save_openclip_folder(self.encoder.clip, self.encoder.model_cfg,
                             folder / CONDITIONER_DIR, keep="image")
        save_point_model(module, folder, name=f"{self.cfg.recipe or 'points'}", extra={
            "conditioner": CONDITIONER_DIR,
            "input": {"image_size": p.image_size, "object_fraction": p.object_fraction},
            "world_scale": p.world_scale,
            "sampler": {"steps": p.sample_steps, "guidance_scale": p.guidance_scale,
                        "points": module.config.points},
            "source": {"trained": self.cfg.recipe, "step": step, "data": self.cfg.data.root,
                       "split": self.cfg.data.split, "seed": self.cfg.seed}})

    @torch.no_grad()
    def sample_grid(self, step: int) -> Optional[Path]:
        """Sampled clouds of the first ``sample_objects`` pairs next to their truths, as a
        picture (samples/step-N.png) and the mean Chamfer distance in the log."""
        from engine.datasets.point_clouds import chamfer
        from guidance.pointcloud.diffusion import sample_cloud
        from guidance.pointcloud.preview import preview_rows

        n = min(self.cfg.sample_objects, len(self.dataset))
        if n == 0 or not self.accelerator.is_main_process:
            return None
        net = self.average.module if self.average is not None else \
            self.accelerator.unwrap_model(self.net)
        was = net.training
        net.eval()
        try:
            g = torch.Generator(device=self.device).manual_seed(derive_seed(self.cfg.seed,
                                                                            "samples", step))
            cond = self.dataset.condition(slice(0, n)).to(self.device)
            clouds = sample_cloud(net, None, cond, steps=self.cfg.points.sample_steps,
                                  guidance_scale=self.cfg.points.guidance_scale,
                                  generator=g).cpu()
        finally:
            net.train(was)
        truths = [self.dataset.cloud(i, torch.Generator().manual_seed(0)) for i in range(n)]
        truths = [torch.cat([t[:, :3], t[:, 3:] / 255.0], 1) for t in truths]
        d = [chamfer(c.numpy(), t.numpy()) for c, t in zip(clouds, truths)]
        print(f"[points] step {step}: samples' Chamfer to their truths "
              f"{sum(d) / len(d):.4f} (model units)", flush=True)
        path = self.out / "samples" / f"step-{step:06d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        preview_rows([(self.dataset.pictures[i].permute(1, 2, 0), [clouds[i], truths[i]])
                      for i in range(n)], path, scale=self.cfg.points.world_scale)
        return path
