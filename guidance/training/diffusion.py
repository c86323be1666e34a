"""The multi-view diffusion trainer: modes ``text``, ``image`` and ``ema``.

* ``text``  MVDream analogue: context = frozen OpenCLIP text tokens of the caption [B, 77, D];
  the V views of an object form one joint-attention group with their camera vectors;
  epsilon (or v) MSE, one t ~ U{0..999} per object shared by its views, fresh noise per view.
* ``image`` Isotropic3D stage 1: context = the frozen OpenCLIP image embedding [B, 1, D] of a
  reference view of the object (composited on white by the loader), as the guidance computes
  it; no projection is added, so the UNet's cross-attention dim must equal D.
  ``model.conditioner.tokens: patches`` appends the projected patch tokens: [B, 1 + P, D].
* ``ema``   Isotropic3D stage 2 (explicit multi-view attention): as ``image``, plus the
  noise-free reference joins the joint self-attention as an extra view. Our choices: it is the
  LAST view of each group (V+1 views), its input is its clean x0 (never noised), its timestep
  is 0, its camera vector is its own, its context is the same image embedding as the other
  views (zeros when dropped); the loss is the mean over the V noisy views only. At inference
  the model is the plain V-view model: no weight is added. ``reference_dropout`` trains that
  share of the steps without the reference (as inference runs).
* ``anchors`` Envision3D's interpolation at toy scale: as ``ema``, but the clean views that
  join the attention are K anchor views of ANOTHER camera group of the object (K drawn per
  step in ``anchor_views`` [min, max], which views of the group at random per object), each
  at timestep 0 with its own camera vector; the noisy views are the item's group. The model
  learns to draw views at any cameras consistent with the anchors it is shown (the
  dense views between Envision3D's anchors). ``anchor_dropout``: share of steps with no
  anchor (a plain V-view step). No weight is added; initialise from a stage-2 model.

Classifier-free guidance: with probability ``cfg_dropout`` an object's context is replaced by
the unconditional one (the empty prompt's tokens for text, zeros for image).

The run's samples/ hold DDIM + CFG grids (per object the reference, the ground-truth views,
the sampled views); model/ is MultiViewDiffusionModel.save_pretrained's folder.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import torch
from torch import Tensor

from engine.errors import ConfigError, UserError
from engine.seeding import derive_seed, step_seed
from guidance.multiview.prior import picture_context
from guidance.training.config import ConditionerConfig, FinetuneConfig
from guidance.training.losses import (diffusion_loss, foreground_pixel_weights,
                                      make_diffusion_batch, snr_loss_weights)
from guidance.training.loop import STAGE_INDEX, Trainer


def camera_vectors_from_c2w(c2w: Tensor) -> Tensor:
    """[N, 4, 4] engine c2w -> [N, 16] MVDream camera vectors (guidance.multiview.cameras,
    convention ``mvdream``). Differentiable with respect to ``c2w``."""
    from engine.cameras import Cameras
    from guidance.multiview.cameras import camera_vectors

    zeros = torch.zeros(c2w.shape[0], device=c2w.device, dtype=c2w.dtype)
    return camera_vectors(Cameras(c2w, zeros, zeros, zeros, zeros), "mvdream")


def _load_conditioner(spec: ConditionerConfig, kind: str):
    from guidance.conditioners import conditioner_for

    cls = conditioner_for(kind)
    layout = {"tokens": spec.tokens} if kind == "image" else {}  # text: rejected by the config
    return cls(cls.Config(model=spec.model, pretrained=spec.pretrained, **layout),
               key="model.conditioner.model")


def build_diffusion_model(cfg: FinetuneConfig):
    """The trainable MultiViewDiffusionModel of a text / image / ema run (UNet trainable;
    VAE and conditioner frozen). The conditioner: ``model.conditioner`` when given, else the
    one saved with ``model.init`` when it is of the mode's kind."""
    from engine.config import validate
    from guidance.multiview.model import MultiViewDiffusionModel, read_index
    from guidance.multiview.unet import MultiViewUNetConfig

    m = cfg.model
    need = "text" if cfg.mode == "text" else "image"
    V = cfg.data.num_views
    cond = _load_conditioner(m.conditioner, need) if m.conditioner is not None else None
    if m.init == "random":
        if cond is None:
            raise ConfigError(f"model.conditioner: training from scratch (model.init: random) "
                              f"needs an OpenCLIP {need} tower: set model.conditioner.model to "
                              "an OpenCLIP folder (e.g. a clip-mode run's model/)")
        unet = dict(m.unet)
        if m.space == "pixel":
            unet.setdefault("in_channels", 3)
            unet.setdefault("out_channels", 3)
        unet.setdefault("cross_attention_dim", cond.embed_dim)
        unet_cfg = validate(MultiViewUNetConfig, unet, "model.unet.")
        _check_dims(cond, unet_cfg.cross_attention_dim, "model.unet.cross_attention_dim")
        return MultiViewDiffusionModel.build_random(
            unet_cfg, m.space, conditioner=cond, vae_config=m.vae, trainable=True,
            seed=step_seed(cfg.seed, STAGE_INDEX, -1), num_views=V, conditioning=need,
            prediction_type=m.prediction_type, noise_schedule=m.noise_schedule)
    index = read_index(Path(m.init))
    saved = (index.get("components") or {}).get("conditioner")
    saved_kind = index["info"].get("conditioning")
    use_saved = cond is None and saved is not None and saved_kind == need
    if cond is None and not use_saved:
        have = f"a {saved_kind} conditioner" if saved else "no conditioner"
        raise ConfigError(f"model.conditioner: the model in {m.init} has {have}; {cfg.mode} mode "
                          f"needs an OpenCLIP {need} tower: set model.conditioner.model to an "
                          "OpenCLIP folder (e.g. a clip-mode run's model/)")
    if cond is not None and saved is not None and saved_kind == need == "image":
        _check_same_tokens(cond.cfg.tokens, Path(m.init) / saved["path"], m.init)
    model = MultiViewDiffusionModel.from_pretrained(m.init, load_conditioner=use_saved,
                                                    conditioning=need, num_views=V)
    if cond is not None:
        model.conditioner = cond
    _check_dims(model.conditioner, model.unet.config.cross_attention_dim,
                f"the UNet of {m.init}")
    model.set_trainable(True)
    return model


def _check_same_tokens(tokens: str, saved_folder: Path, init: str) -> None:
    """An image model goes on learning with the context layout it learnt with."""
    from guidance.multiview.openclip import saved_image_tokens

    saved = saved_image_tokens(saved_folder, key="model.init")
    if saved != tokens:
        raise ConfigError(f"model.conditioner.tokens: the model in {init} learnt with tokens "
                          f"{saved}, this run asks for {tokens}; set model.conditioner.tokens="
                          f"{saved} (or model.conditioner: null to keep its own)")


def _check_dims(cond, cross: int, where: str) -> None:
    if cond.embed_dim != cross:
        raise ConfigError(
            f"model.conditioner: the OpenCLIP {cond.kind} embedding has {cond.embed_dim} dims "
            f"but {where} cross-attends to {cross}; the context is fed without a projection, "
            "so use a conditioner whose embedding size matches")


class DiffusionTrainer(Trainer):
    """Trains the UNet of a :class:`guidance.multiview.model.MultiViewDiffusionModel` (VAE and
    conditioner frozen); ``compute_loss(batch, generator)`` is the whole per-step maths."""

    def __init__(self, cfg: FinetuneConfig, out_dir: Path, resume: Optional[Path] = None):
        super().__init__(cfg, out_dir, resume)
        self._uncond = self.model.unconditional_context(1).detach()

    @property
    def with_reference(self) -> bool:
        return self.cfg.mode != "text"

    def load_data(self, image_size: Optional[int]):
        from guidance.training.data import load_dataset

        return load_dataset(self.cfg.data, image_size, self.with_reference,
                            anchor_group=self.mode == "anchors")

    def build(self) -> Tuple[torch.nn.Module, Optional[int]]:
        self.model = build_diffusion_model(self.cfg).to(self.device)
        image_size = self.model.info.image_size
        if self.cfg.data.image_size not in (None, image_size):
            raise ConfigError(f"data.image_size: {self.cfg.data.image_size} but the model "
                              f"takes {image_size}; leave it null")
        return self.model.unet, image_size

    def checkpoint_modules(self) -> Dict[str, torch.nn.Module]:
        return {"unet": self.model.unet}

    @contextlib.contextmanager
    def _model_with_unet(self, unet: torch.nn.Module):
        """self.model with ``unet`` in place of the trained one, for the duration."""
        live, self.model.unet = self.model.unet, unet
        try:
            yield self.model
        finally:
            self.model.unet = live

    def write_model(self, module: torch.nn.Module, folder: Path, step: int) -> None:
        with self._model_with_unet(module) as model:
            model.save_pretrained(folder, extra={"finetune": {
                "mode": self.mode, "steps": step, "recipe": self.cfg.recipe,
                "seed": self.cfg.seed, "average_decay": self.cfg.average_decay}})

    # -- the maths of one step ---------------------------------------------------------------
    def _x0(self, images: Tensor, generator: torch.Generator) -> Tensor:
        with torch.no_grad():
            if self.model.vae is None:
                return self.model.encode(images)
            g = torch.Generator(self.device).manual_seed(int(torch.randint(
                0, 2 ** 62, (1,), generator=generator)))
            return self.model.encode(images, generator=g)

    def _check_references(self, batch: dict) -> None:
        has = batch.get("has_reference")
        if has is None or not bool(has.all()):
            ids = [i for i, h in zip(batch["id"], has if has is not None else
                                     [False] * len(batch["id"])) if not h]
            raise UserError(f"{self.mode} mode needs a reference view per object; "
                            f"{', '.join(map(str, ids[:3]))} in {self.cfg.data.root} have none")

    def compute_loss(self, batch: dict, generator: torch.Generator) -> Tuple[Tensor, dict]:
        """The loss of one batch (a collated dict from the loader, on any device) and logs."""
        from guidance.multiview.unet import unet_forward   # looked up here: tests spy on it

        images = batch["images"].to(self.device)                 # [B, V, 3, S, S]
        B, V = images.shape[:2]
        camera = camera_vectors_from_c2w(batch["c2w"].to(self.device).float().flatten(0, 1))
        with torch.no_grad():
            if self.mode == "text":
                context = self.model.embed_text(batch["caption"])
            else:
                self._check_references(batch)
                # the same preprocessing as at inference (the 256 px resize included)
                context = picture_context(self.model, batch["reference"].to(self.device))
        x0 = self._x0(images.flatten(0, 1), generator)
        x0 = x0.view(B, V, *x0.shape[1:])
        reference = None
        # drawn only when on, so runs without it keep their exact random stream
        keep_reference = self.mode == "ema" and not (
            self.cfg.reference_dropout > 0
            and float(torch.rand((), generator=generator)) < self.cfg.reference_dropout)
        if keep_reference:
            ref_x0 = self._x0(batch["reference"].to(self.device), generator)
            ref_cam = camera_vectors_from_c2w(batch["reference_c2w"].to(self.device).float())
            reference = (ref_x0, ref_cam)
        anchors = 0
        if self.mode == "anchors":
            reference, anchors = self._anchors(batch, generator)
        db = make_diffusion_batch(x0, context.float(), self._uncond.float(),
                                  camera.view(B, V, 16), self.model.alphas_cumprod, generator,
                                  self.cfg.cfg_dropout, reference,
                                  self.model.info.prediction_type)
        out = unet_forward(self.net, db.x_t, db.t, db.context, db.camera, db.group)
        weights = None
        if self.cfg.loss_weighting != "uniform":
            t_noisy = db.t.view(B, db.group)[:, :db.num_views].reshape(-1)
            weights = snr_loss_weights(t_noisy, self.model.alphas_cumprod,
                                       self.model.info.prediction_type,
                                       self.cfg.loss_weighting, self.cfg.min_snr_gamma)
        pixel_weights = None
        if self.cfg.foreground_weight > 0:
            if "masks" not in batch:
                raise UserError("foreground_weight needs the views' masks (alpha); this "
                                "batch has none: load the data with engine.datasets.mvdataset")
            pixel_weights = foreground_pixel_weights(
                batch["masks"].to(self.device).flatten(0, 1), tuple(x0.shape[-2:]),
                self.cfg.foreground_weight)
        loss = diffusion_loss(out, db.target, db.num_views, db.group, weights, pixel_weights)
        logs = {"dropped": float(db.dropped.float().mean())}
        if self.mode == "ema":
            logs["with_reference"] = float(keep_reference)
        if self.mode == "anchors":
            logs["anchors"] = float(anchors)
        return loss, logs

    def _anchors(self, batch: dict, generator: torch.Generator):
        """((anchor x0 [B, K, C, h, w], anchor cameras [B, K, 16]) or None, K) of a step of
        mode anchors. Draws, in order: u ~ U[0, 1) (no anchors where u < anchor_dropout; drawn
        only when it is on), K ~ U{min..max}, then one permutation of the group per object
        (its first K views are the anchors)."""
        cfg = self.cfg
        if cfg.anchor_dropout > 0 and float(torch.rand((), generator=generator)) \
                < cfg.anchor_dropout:
            return None, 0
        lo, hi = cfg.anchor_views
        K = int(torch.randint(lo, hi + 1, (1,), generator=generator))
        images = batch["anchor_images"].to(self.device)            # [B, V, 3, S, S]
        B, V = images.shape[:2]
        pick = torch.stack([torch.randperm(V, generator=generator)[:K] for _ in range(B)])
        pick = pick.to(self.device)
        rows = torch.arange(B, device=self.device)[:, None]
        chosen = images[rows, pick]                                 # [B, K, 3, S, S]
        x0 = self._x0(chosen.flatten(0, 1), generator)
        cams = camera_vectors_from_c2w(batch["anchor_c2w"].to(self.device).float()[rows, pick]
                                       .flatten(0, 1))
        return (x0.view(B, K, *x0.shape[1:]), cams.view(B, K, 16)), K

    # -- samples -----------------------------------------------------------------------------
    @torch.no_grad()
    def sample_grid(self, step: int) -> Optional[Path]:
        """DDIM + CFG samples of the first ``sample_objects`` objects as a plain V-view model
        (no reference in the attention, whatever the mode). Rows: [reference,] ground-truth
        views, sampled views."""
        if not self.cfg.sample_objects or not self.accelerator.is_main_process:
            return None
        from engine.outputs import save_grid

        unet = self.model.unet
        was_training = unet.training
        unet.eval()
        # sample what save_model will save
        try:
            with self._model_with_unet(self.average.module if self.average else unet):
                rows = self._sample_rows()
        finally:
            unet.train(was_training)
        if not rows:
            return None
        path = self.out / "samples" / f"step-{step:07d}.png"
        save_grid(path, rows)
        return path

    @torch.no_grad()
    def _sample_rows(self) -> List[Tensor]:
        from guidance.multiview.sample import sample_views

        rows = []
        gen = torch.Generator().manual_seed(derive_seed(self.cfg.seed, "samples"))
        for i in range(min(self.cfg.sample_objects, len(self.dataset))):
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(derive_seed(self.cfg.seed, "samples", i))
                sample = self.dataset[i]
            if self.mode == "text":
                cond = self.model.embed_text([sample["caption"]])
            elif "reference" in sample:
                cond = picture_context(self.model, sample["reference"][None].to(self.device))
            else:
                continue
            cams = camera_vectors_from_c2w(sample["c2w"].to(self.device).float())
            views = sample_views(self.model, cond, self._uncond, cams, self.V,
                                 self.cfg.sample_steps, self.cfg.sample_scale, 0.0, gen)
            row = ([sample["reference"]] if self.mode != "text" else []) \
                + list(sample["images"]) + list(views.float().cpu())
            rows.append(torch.stack([r.float().cpu() for r in row]).permute(0, 2, 3, 1))
        return rows
