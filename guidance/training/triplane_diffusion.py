"""The Compress3D diffusion trainer (mode ``triplane-diffusion``): the shape-embedding prior and
the triplane latent diffusion (:mod:`guidance.compress3d.latent_diffusion`) learn a toy world's
objects from pictures of them.

    python -m guidance.training recipe=toy-compress3d [data.root=data/toy] [out=DIR] [key=value ...]

Pairs. The (picture, cloud) pairs of mode ``points`` (:class:`guidance.training.points.ToyPointPairs`:
every view of every object of ``data.split``, its frozen CLIP image embedding, the object's
cloud turned by minus the view's azimuth so the camera sits at azimuth 0 as the engine puts
the input's), in the engine's units (the autoencoder's cube; ``points.world_scale`` is not
read). Each pair's cloud (``points.cloud_points`` points, 1024 when 0, seeded per pair) is
encoded once, at the start, by the frozen autoencoder (``model.latent.autoencoder``): the
posterior's mean is the pair's latent. The latents' per-plane, per-channel means and standard
deviations (and their shape embeddings') normalise everything the models see and are saved
with them.

Loss: ``latent`` + ``prior_weight`` x ``prior``, both the v-prediction MSE of
:meth:`Compress3DDiffusion.losses` (the latent model reading the pair's true shape
embedding), conditions dropped for ``cfg_dropout`` of the rows. Through the shared loop
(seeded, resumable, accelerate, weight average). The saved model (``out/model``) is a
Compress3D folder (:mod:`guidance.compress3d.pipeline`): the diffusion, plus copies of the
autoencoder and of the image tower, and the picture and sampler settings.

Progress (``sample_every``): the first ``sample_objects`` pairs' latents are sampled and
decoded on a 32^3 grid; the log gives their occupancy IoU against their true latents'.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import torch
from torch import Tensor

from engine.errors import ConfigError, InputError, UserError
from engine.seeding import derive_seed, step_seed
from guidance.training.loop import STAGE_INDEX, ItemTrainer

#: model.latent keys the trainer reads itself (the rest are LatentDiffusionConfig sizes)
OWN_KEYS = ("autoencoder", "prior_weight")
DEFAULT_CLOUD_POINTS = 1024


class EncodedPairs(torch.utils.data.Dataset):
    """(latent, embedding) pairs: item i {"latent": [3, c, r, r], "embedding": [D]}."""

    def __init__(self, latents: Tensor, embeddings: Tensor):
        self.latents, self.embeddings = latents, embeddings

    def __len__(self) -> int:
        return len(self.latents)

    def __getitem__(self, i: int) -> Dict[str, Tensor]:
        return {"latent": self.latents[i], "embedding": self.embeddings[i]}


@torch.no_grad()
def encode_pairs(pairs, autoencoder, seed: int, batch: int = 64, log=None) -> Tensor:
    """Every pair's cloud (engine units, rgb in [0, 1]; drawn with a generator seeded by the
    pair's index) encoded to its posterior mean: [N, 3, c, r, r]."""
    out = []
    for start in range(0, len(pairs), batch):
        clouds = []
        for i in range(start, min(start + batch, len(pairs))):
            g = torch.Generator().manual_seed(derive_seed(seed, "latent-cloud", i))
            cloud = pairs.cloud(i, g)
            clouds.append(torch.cat([cloud[:, :3], cloud[:, 3:] / 255.0], dim=1))
        out.append(autoencoder.encode(torch.stack(clouds)).mode())
        if log and (start // batch) % 10 == 9:
            log(f"latents: {start + len(clouds)}/{len(pairs)} pairs encoded")
    return torch.cat(out)


def group_rows(pairs, views: int) -> List[List[int]]:
    """The pair indices of every group of ``views`` views of ``pairs`` (ToyPointPairs of
    ``views: all``: per object its groups' views in order, then its references), each group
    in its ``views`` cyclic orders: view j first, then j + 1, ... Views of a toy-world group
    are 360 / views degrees apart with rising azimuth, so each order is again a group whose
    first view is the picture's camera (azimuth 0 after the turn), as a generated group is
    drawn; the first pair's latent is the group's. A group of another size is one line."""
    import json

    rows: List[List[int]] = []
    start = 0
    for i, oid in enumerate(pairs.ids):
        record = json.loads((Path(pairs.root) / oid / "object.json").read_text())
        offset = start
        for g, group in enumerate(record.get("groups", [])):
            if len(group["views"]) != views:
                raise InputError(f"{oid}: group {g} has {len(group['views'])} views, not "
                                 f"data.num_views={views}")
            for j in range(views):
                rows.append([offset + (j + k) % views for k in range(views)])
            offset += views
        start += int((pairs.object_index == i).sum())
    if not rows:
        raise InputError(f"points.views: groups, but {pairs.root} has no groups of views")
    return rows


def latent_options(cfg) -> Tuple[dict, dict]:
    """model.latent split into (the trainer's own keys, the diffusion's sizes)."""
    latent = dict(cfg.model.latent)
    own = {k: latent.pop(k) for k in OWN_KEYS if k in latent}
    for key in ("cond_dim", "cond_tokens", "latent_shape"):
        if key in latent:
            raise ConfigError(f"model.latent.{key}: set by the run (the conditioner's embedding, "
                              "points.views / data.num_views and the autoencoder's latent)")
    prior_weight = own.get("prior_weight", 1.0)
    if not isinstance(prior_weight, (int, float)) or prior_weight < 0:
        raise ConfigError(f"model.latent.prior_weight: must be a number >= 0, got "
                          f"{prior_weight!r}")
    return own, latent


class TriplaneDiffusionTrainer(ItemTrainer):
    """Trains Compress3D's shape prior and latent diffusion on toy-world pairs."""

    with_reference = False

    def build(self) -> Tuple[torch.nn.Module, Optional[int]]:
        from engine.config import validate
        from engine.resources import toy_model_path
        from guidance.compress3d.autoencoder import TriplaneAutoencoder
        from guidance.compress3d.latent_diffusion import (Compress3DDiffusion,
                                                          LatentDiffusionConfig)
        from guidance.compress3d.pipeline import AUTOENCODER_DIR, CONDITIONER_DIR
        from guidance.pointcloud.picture import PointImageEncoder

        m = self.cfg.model
        own, sizes = latent_options(self.cfg)
        self.prior_weight = float(own.get("prior_weight", 1.0))

        def folder_of(spec: str) -> Path:
            path = Path(spec)
            return path if path.is_dir() else toy_model_path(path)

        if m.init == "random":
            ae_folder = folder_of(own["autoencoder"])
            tower = folder_of(m.conditioner.model)
        else:
            init = folder_of(m.init)
            Compress3DDiffusion.read_record(init, "model.init")
            if sizes:
                raise ConfigError("model.latent: a loaded model keeps its sizes; remove them or "
                                  "use model.init: random")
            ae_folder = folder_of(own.get("autoencoder") or init / AUTOENCODER_DIR)
            tower = (folder_of(m.conditioner.model) if m.conditioner is not None
                     else init / CONDITIONER_DIR)
        self.autoencoder = TriplaneAutoencoder.from_pretrained(ae_folder,
                                                               "model.latent.autoencoder")
        self.autoencoder.requires_grad_(False).to(self.device)
        if tower.is_dir():
            spec = tower
        elif m.conditioner is not None and m.conditioner.pretrained:
            spec = (m.conditioner.model, m.conditioner.pretrained)   # an architecture + tag
        else:
            raise UserError(f"model.conditioner.model: {tower} is not an OpenCLIP folder (the "
                            "toy one is models/toy/clip; or an architecture name with "
                            "model.conditioner.pretrained)")
        self.encoder = PointImageEncoder.load(spec, "model.conditioner.model")
        self.encoder.to(self.device)
        self.tokens = self.cfg.data.num_views if self.cfg.points.views == "groups" else 1
        if m.init == "random":
            config = validate(LatentDiffusionConfig, {
                **sizes, "cond_dim": self.encoder.embed_dim, "cond_tokens": self.tokens,
                "latent_shape": list(self.autoencoder.config.latent_shape)}, "model.latent.")
            state = torch.random.get_rng_state()
            try:
                torch.manual_seed(step_seed(self.cfg.seed, STAGE_INDEX, -1))
                model = Compress3DDiffusion(config)
            finally:
                torch.random.set_rng_state(state)
        else:
            model = Compress3DDiffusion.from_pretrained(init, "model.init")
        c = model.config
        if c.cond_tokens != self.tokens:
            raise UserError(f"model.init: {m.init} reads {c.cond_tokens} embedding(s) per "
                            f"condition; points.views={self.cfg.points.views} with "
                            f"data.num_views={self.cfg.data.num_views} gives {self.tokens}")
        if c.cond_dim != self.encoder.embed_dim or \
                list(c.latent_shape) != list(self.autoencoder.config.latent_shape):
            raise UserError(f"model.init: {m.init} reads {c.cond_dim}-d embeddings and "
                            f"{c.latent_shape} latents; this conditioner gives "
                            f"{self.encoder.embed_dim}-d, this autoencoder "
                            f"{list(self.autoencoder.config.latent_shape)}")
        model.requires_grad_(True)
        model.train()
        self.diffusion = model
        return model, None

    def load_data(self, image_size):
        from guidance.training.points import ToyPointPairs

        p = self.cfg.points
        log = (lambda s: print(s, file=sys.stderr, flush=True))
        views = "all" if p.views == "groups" else p.views
        pairs = ToyPointPairs(self.cfg.data.root, self.cfg.data.split, self.encoder, p.pool,
                              p.cloud_points or DEFAULT_CLOUD_POINTS, views, p.image_size,
                              p.object_fraction, world_scale=1.0, seed=self.cfg.seed, log=log)
        latents = encode_pairs(pairs, self.autoencoder, self.cfg.seed, log=log).cpu()
        self.diffusion.set_statistics(latents)
        if p.views != "groups":
            return EncodedPairs(latents, pairs.embeddings)
        rows = torch.tensor(group_rows(pairs, self.tokens))              # [G, K]
        return EncodedPairs(latents[rows[:, 0]], pairs.embeddings[rows])

    def compute_loss(self, batch: dict, generator: torch.Generator) -> Tuple[Tensor, dict]:
        losses = self.net(batch["latent"].to(self.device), batch["embedding"].to(self.device),
                          generator=generator, cfg_dropout=self.cfg.cfg_dropout)
        loss = losses["latent"] + self.prior_weight * losses["prior"]
        return loss, {k: float(v.detach()) for k, v in losses.items()}

    def checkpoint_modules(self) -> Dict[str, torch.nn.Module]:
        return {"model": self.diffusion}

    def write_model(self, module: torch.nn.Module, folder: Path, step: int) -> None:
        from guidance.compress3d.pipeline import AUTOENCODER_DIR, CONDITIONER_DIR, VIEWS_DEFAULTS
        from guidance.multiview.openclip import save_openclip_folder

        p = self.cfg.points
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        if (folder / "config.json").exists():      # not a model until config.json is new
            (folder / "config.json").unlink()
        self.autoencoder.save_pretrained(folder / AUTOENCODER_DIR)
        save_openclip_folder(self.encoder.clip, self.encoder.model_cfg,
                             folder / CONDITIONER_DIR, keep="image")
        module.save_pretrained(folder, extra={
            AUTOENCODER_DIR: AUTOENCODER_DIR, CONDITIONER_DIR: CONDITIONER_DIR,
            "input": {"image_size": p.image_size, "object_fraction": p.object_fraction},
            "sampler": {"steps": p.sample_steps, "guidance_scale": p.guidance_scale},
            **({"views": dict(VIEWS_DEFAULTS, views=self.tokens)} if self.tokens > 1 else {}),
            "source": {"trained": self.cfg.recipe, "step": step, "data": self.cfg.data.root,
                       "split": self.cfg.data.split, "seed": self.cfg.seed}})

    @torch.no_grad()
    def sample_grid(self, step: int) -> Optional[Path]:
        """Occupancy IoU (32^3 grid) of sampled vs true latents of the first pairs, logged."""
        from guidance.compress3d.autoencoder import occupancy_grid_points

        n = min(self.cfg.sample_objects, len(self.dataset))
        if n == 0 or not self.accelerator.is_main_process:
            return None
        net = self.average.module if self.average is not None else \
            self.accelerator.unwrap_model(self.net)
        was = net.training
        net.eval()
        try:
            g = torch.Generator().manual_seed(derive_seed(self.cfg.seed, "samples", step))
            e = self.dataset.embeddings[:n].to(self.device)
            z, _ = net.sample(e, self.cfg.points.sample_steps, self.cfg.points.guidance_scale,
                              generator=g)
        finally:
            net.train(was)
        pts = occupancy_grid_points(32, self.autoencoder.config.bound).to(self.device)
        ious = []
        for sampled, truth in zip(z, self.dataset.latents[:n].to(self.device)):
            occ = [self.autoencoder.query(self.autoencoder.decode(x[None]), pts[None])[0][0] > 0
                   for x in (sampled, truth)]
            union = (occ[0] | occ[1]).sum().clamp_min(1)
            ious.append(float((occ[0] & occ[1]).sum() / union))
        print(f"[triplane-diffusion] step {step}: sampled latents' occupancy IoU to their "
              f"truths {sum(ious) / len(ious):.3f} ({n} pairs)", flush=True)
        return None
