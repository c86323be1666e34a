"""The triplane-autoencoder trainer (mode ``triplane-ae``): Compress3D's autoencoder
(:mod:`guidance.compress3d.autoencoder`) learns to compress coloured clouds of a toy world's
objects and decode their occupancy and colour.

    python -m guidance.training recipe=toy-triplane-ae [data.root=data/toy] [out=DIR] [key=value ...]

Data. Every object of ``data.split`` gives ``shapes.pool`` points on its true mesh with the
mesh's colours (:func:`engine.datasets.point_clouds.sample_surface`, seeded by the object's
index) and its inside/outside on a ``shapes.grid``^3 grid of cell centres over the model's
cube (:func:`engine.evaluate.metrics.occupancy`: exact ray parity for the toy world's closed
meshes). Each step, per object (torch's RNG, seeded per item by the loader):

* the input cloud: ``shapes.cloud_points`` of the pool's points;
* occupancy queries: ``shapes.near_points`` pool points moved by N(0, ``near_sigma``^2)
  (the surface is where the decoder must be sharp) and ``shapes.uniform_points`` uniform in
  the cube, each labelled by the grid cell it falls in;
* colour targets: ``shapes.color_points`` other pool points with their colours.

Loss: ``occupancy_weight`` x BCE(logit, label) + ``color_weight`` x L1(rgb, colour) at the
colour targets + ``kl_weight`` x KL(latent posterior || N(0, I)), the latent drawn from the
posterior (reparameterised) during training. Through the shared loop
(:mod:`guidance.training.loop`: seeded, resumable, accelerate, weight average); the saved
model (``out/model``) is a folder :meth:`TriplaneAutoencoder.from_pretrained` reads.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Dict, Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from engine.errors import ConfigError, InputError
from engine.seeding import derive_seed, step_seed
from guidance.training.data import toy_world_ids
from guidance.training.loop import STAGE_INDEX, ItemTrainer


def load_toy_shapes(root, split: Optional[str], pool: int, grid: int, bound: float,
                    seed: int = 0, log=None) -> Tuple[list, Tensor, Tensor]:
    """(object ids, surface pools [O, pool, 6] (world xyz, rgb in [0, 1]), occupancy grids
    [O, grid, grid, grid] bool indexed (x, y, z)) of a toy-world dataset's split."""
    import trimesh

    from engine.datasets.point_clouds import sample_surface
    from engine.evaluate.metrics import occupancy

    root = Path(root)
    ids = toy_world_ids(root, split)
    pools, grids = [], []
    for i, oid in enumerate(ids):
        path = root / oid / "mesh.obj"
        try:
            mesh = trimesh.load(str(path), process=False, force="mesh")
        except Exception as exc:
            raise InputError(f"{path} cannot be read ({exc})") from None
        pools.append(torch.from_numpy(sample_surface(mesh, pool, seed=derive_seed(seed, "ae",
                                                                                  i))))
        grids.append(torch.from_numpy(np.ascontiguousarray(occupancy(mesh, grid, bound))))
        if log and (i + 1) % 50 == 0:
            log(f"shapes data: {i + 1}/{len(ids)} objects")
    return list(ids), torch.stack(pools), torch.stack(grids)


def grid_labels(grids: Tensor, points: Tensor, bound: float) -> Tensor:
    """Inside/outside of points [Q, 3] in one object's grid [R, R, R] of cell centres over
    [-bound, bound]^3 (the cell each point falls in; outside the cube: outside) -> [Q]
    float 0/1."""
    r = grids.shape[-1]
    cell = ((points / bound + 1.0) * 0.5 * r).floor().long()
    inside_cube = ((cell >= 0) & (cell < r)).all(dim=-1)
    cell = cell.clamp(0, r - 1)
    label = grids[cell[:, 0], cell[:, 1], cell[:, 2]] & inside_cube
    return label.float()


class ToyShapes(torch.utils.data.Dataset):
    """Objects of a toy world as (cloud, occupancy queries, colour targets); see the module
    doc. Item i: {"cloud": [N, 6], "queries": [Q, 3], "labels": [Q], "color_points": [S, 3],
    "colors": [S, 3]}."""

    def __init__(self, root, split, shapes, bound: float, seed: int = 0, log=None):
        self.shapes, self.bound = shapes, float(bound)
        self.ids, self.pools, self.grids = load_toy_shapes(root, split, shapes.pool,
                                                           shapes.grid, bound, seed, log)

    def __len__(self) -> int:
        return len(self.ids)

    def item(self, i: int, generator: Optional[torch.Generator] = None) -> Dict[str, Tensor]:
        s, pool = self.shapes, self.pools[i]
        n = pool.shape[0]

        def pick(k):
            return pool[torch.randint(0, n, (k,), generator=generator)]

        cloud = pool[torch.randperm(n, generator=generator)[:s.cloud_points]]
        near = pick(s.near_points)[:, :3]
        near = near + torch.randn(near.shape, generator=generator) * s.near_sigma
        uniform = (torch.rand(s.uniform_points, 3, generator=generator) * 2 - 1) * self.bound
        queries = torch.cat([near, uniform]).clamp(-self.bound, self.bound)
        targets = pick(s.color_points)
        return {"cloud": cloud, "queries": queries,
                "labels": grid_labels(self.grids[i], queries, self.bound),
                "color_points": targets[:, :3], "colors": targets[:, 3:]}

    def __getitem__(self, i: int) -> Dict[str, Tensor]:
        return self.item(i)


def build_autoencoder(cfg):
    """The trainable autoencoder: random (``model.autoencoder`` sizes; seeded) or a saved
    folder (``model.init``) to go on training."""
    from engine.config import validate
    from guidance.compress3d.autoencoder import TriplaneAEConfig, TriplaneAutoencoder

    m = cfg.model
    if m.init == "random":
        config = validate(TriplaneAEConfig, dict(m.autoencoder), "model.autoencoder.")
        state = torch.random.get_rng_state()
        try:
            torch.manual_seed(step_seed(cfg.seed, STAGE_INDEX, -1))
            model = TriplaneAutoencoder(config)
        finally:
            torch.random.set_rng_state(state)
    else:
        model = TriplaneAutoencoder.from_pretrained(m.init, "model.init")
        # a recipe's sizes may stay when they are the loaded model's (a loaded model keeps its
        # own: any other size is a mistake, not a resize)
        have = dict(model.config.__dict__)
        wrong = [f"{k}={v} (the model's: {have[k]})" for k, v in dict(m.autoencoder).items()
                 if k not in have or have[k] != v]
        if wrong:
            raise ConfigError(f"model.autoencoder: a loaded model keeps its sizes; "
                              f"{', '.join(wrong)}; remove them or use model.init: random")
    model.requires_grad_(True)
    model.train()
    return model


class TriplaneAETrainer(ItemTrainer):
    """Trains the triplane autoencoder on a toy world's clouds (module doc)."""

    with_reference = False

    def build(self) -> Tuple[torch.nn.Module, Optional[int]]:
        model = build_autoencoder(self.cfg)
        self.autoencoder = model      # the module itself (checkpoints are read before prepare)
        return model, None

    def load_data(self, image_size):
        return ToyShapes(self.cfg.data.root, self.cfg.data.split, self.cfg.shapes,
                         self.autoencoder.config.bound, self.cfg.seed,
                         log=lambda s: print(s, file=sys.stderr, flush=True))

    def compute_loss(self, batch: dict, generator: torch.Generator) -> Tuple[Tensor, dict]:
        s, dev = self.cfg.shapes, self.device
        cloud = batch["cloud"].to(dev)
        queries = torch.cat([batch["queries"], batch["color_points"]], dim=1).to(dev)
        q = batch["queries"].shape[1]
        logit, rgb, posterior = self.net(cloud, queries, generator=generator)
        occupancy = F.binary_cross_entropy_with_logits(logit[:, :q], batch["labels"].to(dev))
        color = (rgb[:, q:] - batch["colors"].to(dev)).abs().mean() if s.color_points else \
            logit.new_zeros(())
        kl = posterior.kl().mean()
        loss = s.occupancy_weight * occupancy + s.color_weight * color + s.kl_weight * kl
        accuracy = ((logit[:, :q] > 0).float() == batch["labels"].to(dev)).float().mean()
        return loss, {"occupancy": float(occupancy.detach()), "color": float(color.detach()),
                      "kl": float(kl.detach()), "accuracy": float(accuracy)}

    def checkpoint_modules(self) -> Dict[str, torch.nn.Module]:
        return {"model": self.autoencoder}

    def write_model(self, module: torch.nn.Module, folder: Path, step: int) -> None:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        if (folder / "config.json").exists():      # not a model until config.json is new
            (folder / "config.json").unlink()
        module.save_pretrained(folder, extra={"source": {
            "trained": self.cfg.recipe, "step": step, "data": self.cfg.data.root,
            "split": self.cfg.data.split, "seed": self.cfg.seed}})
