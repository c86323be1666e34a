"""``python -m guidance.training.finetune``: train or fine-tune a multi-view diffusion model (or the CLIP
model that conditions it) on a multi-view dataset (engine.datasets.mvdataset format).

    python -m guidance.training.finetune recipe=NAME_OR_PATH [key=value ...]
    python -m guidance.training.finetune resume=RUN_FOLDER_OR_CHECKPOINT [key=value ...]
    accelerate launch --multi_gpu --num_processes N -m guidance.training.finetune recipe=NAME ...
    torchrun --nproc_per_node N -m guidance.training.finetune recipe=NAME device=cpu   # CPU processes

A name resolves to recipes/finetune/NAME.yaml. Modes (``mode:``):

* ``text``  MVDream analogue: context = frozen OpenCLIP text tokens of the caption [B, 77, D];
  the V views of an object form one joint-attention group with their camera vectors;
  epsilon MSE, one t ~ U{0..999} per object shared by its views, fresh noise per view.
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
* ``clip``  contrastive training of an OpenCLIP model on (render, caption): every view of a
  batch (group views and the reference) against the batch's distinct captions, InfoNCE both
  ways with CLIP's learned logit scale; images sharing a caption are all positives of it.
  Saved in OpenCLIP's folder format (open_clip_config.json + open_clip_model.safetensors).

Classifier-free guidance: with probability ``cfg_dropout`` an object's context is replaced by
the unconditional one (the empty prompt's tokens for text, zeros for image).

Determinism: every random draw of step s (which objects, their random group and reference,
t, noise, dropout, and the global torch RNG) is a function of (seed, s, process), so a run
resumed from a checkpoint ends with exactly the weights of an uninterrupted run (CPU,
mixed_precision=no). With several processes each one gets ``batch_size`` objects per step.

A run folder (``out``) holds config.yaml, metrics.jsonl, checkpoints/ (safetensors: trainable
weights + optimiser state, atomic), samples/ (DDIM + CFG grids: per object the reference,
the ground-truth views, the sampled views) and model/ (the final model:
MultiViewDiffusionModel.save_pretrained, or the OpenCLIP folder in clip mode).
User mistakes end with one line on stderr and exit code 2; Ctrl-C writes a checkpoint and
exits with 130; a non-finite loss aborts with exit code 3.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
import yaml
from omegaconf import MISSING, OmegaConf
from torch import Tensor

from engine.config import PROJECT_ROOT
from engine.errors import ConfigError, RunAborted, UserError, did_you_mean, run_cli

RECIPES_DIR = PROJECT_ROOT / "recipes" / "finetune"
MODES = ("text", "image", "ema", "clip")
MIXED_PRECISION = ("no", "fp16", "bf16")
LR_SCHEDULES = ("constant", "cosine")
LOSS_WEIGHTINGS = ("uniform", "min-snr")
NUM_TRAIN_TIMESTEPS = 1000

USAGE = """\
usage: python -m guidance.training.finetune recipe=NAME_OR_PATH [key=value ...]
       python -m guidance.training.finetune resume=RUN_FOLDER_OR_CHECKPOINT [key=value ...]
       accelerate launch -m guidance.training.finetune recipe=NAME [key=value ...]

Modes: text (text-to-multi-view), image (Isotropic3D stage 1), ema (stage 2, explicit
multi-view attention), clip (contrastive OpenCLIP). NAME is recipes/finetune/NAME.yaml.
Overrides are dotted keys, e.g. steps=200 data.root=data/toy model.init=runs/text/model.
Outputs: OUT/config.yaml, metrics.jsonl, checkpoints/, samples/, model/.
"""


# -- typed configuration --------------------------------------------------------------------

@dataclass
class DataConfig:
    root: str = MISSING                  # dataset folder (dataset.json inside)
    split: Optional[str] = "train"       # null: every object
    image_size: Optional[int] = None     # null: the model's input size (clip: the files')
    num_views: int = 4                   # views per joint-attention group (V)
    num_workers: int = 0

    def __post_init__(self):
        if self.image_size is not None and self.image_size < 8:
            raise ConfigError(f"image_size: must be >= 8, got {self.image_size}")
        if self.num_views < 1:
            raise ConfigError(f"num_views: must be >= 1, got {self.num_views}")
        if self.num_workers < 0:
            raise ConfigError(f"num_workers: must be >= 0, got {self.num_workers}")


@dataclass
class ConditionerConfig:
    model: str = MISSING                 # OpenCLIP folder (a clip run's model/) | arch | hf-hub:
    pretrained: str = ""                 # tag or weights file, with an architecture name
    # image modes: the context, pooled (Isotropic3D: one token [B, 1, D]) | patches (the pooled
    # token then every patch token, [B, 1 + P, D]: where the parts are); saved with the model
    tokens: str = "pooled"

    def __post_init__(self):
        from guidance.conditioners import IMAGE_TOKENS

        if self.tokens not in IMAGE_TOKENS:
            raise ConfigError(f"model.conditioner.tokens: must be one of "
                              f"{', '.join(IMAGE_TOKENS)}, got {self.tokens!r}")


@dataclass
class ModelConfig:
    init: str = "random"                 # random | PATH of a saved model (clip: OpenCLIP folder)
    space: str = "pixel"                 # init random: pixel | latent
    unet: Dict[str, Any] = field(default_factory=dict)    # guidance.multiview.unet.MultiViewUNetConfig
    vae: Optional[Dict[str, Any]] = None  # init random, latent: AutoencoderKL kwargs
    conditioner: Optional[ConditionerConfig] = None  # null: the one saved with model.init
    # init random: what the UNet predicts, epsilon (MVDream) | v_prediction (small pixel models
    # learn clean samples sooner); a loaded model keeps its own
    prediction_type: str = "epsilon"
    # init random: the noise schedule it trains on, scaled-linear (MVDream's) |
    # zero-terminal-snr (guidance.multiview.model.NOISE_SCHEDULES; needs v_prediction); a loaded model
    # keeps its own
    noise_schedule: str = "scaled-linear"
    clip: Dict[str, Any] = field(default_factory=dict)  # clip, init random: OpenCLIP model_cfg
                                                        # ({}: guidance.conditioners' tiny one)

    def __post_init__(self):
        if self.space not in ("pixel", "latent"):
            raise ConfigError(f"space: '{self.space}' is not pixel or latent"
                              f"{did_you_mean(self.space, ('pixel', 'latent'))}")
        if not self.init:
            raise ConfigError("init: 'random' or the path of a saved model")
        if self.prediction_type not in ("epsilon", "v_prediction"):
            raise ConfigError(f"prediction_type: '{self.prediction_type}' is not epsilon or "
                              "v_prediction")
        from guidance.multiview.model import check_noise_schedule

        check_noise_schedule(self.noise_schedule, self.prediction_type)


@dataclass
class FinetuneConfig:
    recipe: str = ""
    description: str = ""
    mode: str = MISSING                  # text | image | ema | clip
    data: DataConfig = MISSING
    model: ModelConfig = field(default_factory=ModelConfig)
    steps: int = 1000
    batch_size: int = 4                  # objects per step and process
    lr: float = 1e-4
    warmup: int = 0                      # linear warm-up steps, then lr_schedule
    lr_schedule: str = "constant"        # constant | cosine (half cosine to 0 at the last step)
    # exponential moving average of the weights, saved as the model and sampled from (0: off;
    # 0.999 averages ~ the last 1000 steps). Not to be confused with mode ema, which is
    # Isotropic3D's explicit multi-view attention.
    average_decay: float = 0.0
    weight_decay: float = 0.0            # AdamW; never on biases, norms and the logit scale
    betas: List[float] = field(default_factory=lambda: [0.9, 0.999])
    grad_clip: float = 1.0               # max gradient norm (0: off)
    cfg_dropout: float = 0.1             # probability of the unconditional context
    # per-timestep weight of the diffusion loss: uniform (plain MSE on the UNet's target) |
    # min-snr (Hang et al. 2023: as if the loss were on x0 weighted by min(SNR, gamma), so the
    # many nearly clean steps stop dominating and the noisy ones, where shapes are decided,
    # get more of the model's capacity)
    loss_weighting: str = "uniform"
    min_snr_gamma: float = 5.0
    # extra weight of the object's pixels in the diffusion loss (the views' alpha at the
    # model's resolution): pixel weight 1 + foreground_weight * alpha, the background's stays
    # 1. 0: off. Pale parts on the white background and thin parts cost little in a plain MSE.
    # On the toy stage 1, 4 made the views worse (blobs: a missed object pixel costs more than
    # a stray one); docs/results/toy-foreground-weight.
    foreground_weight: float = 0.0
    # mode ema: probability that a step trains without the reference in the attention, as the
    # model runs at inference (0: always with it, the plain Isotropic3D stage 2)
    reference_dropout: float = 0.0
    mixed_precision: str = "no"          # no | fp16 | bf16 (accelerate)
    seed: int = 0
    device: str = "auto"                 # auto (accelerate's choice) | cpu
    cpu_threads: Optional[int] = None    # torch threads on CPU (null: torch's default); 1 is
                                         # often fastest for tiny models on shared cores
    out: Optional[str] = None            # run folder; null: outputs/finetune/RECIPE
    checkpoint_every: int = 500          # 0: only at the end
    keep_checkpoints: int = 2            # periodic checkpoints kept (the last one always)
    sample_every: int = 0                # sample grids (0: only at the end; -1: never)
    sample_objects: int = 2
    sample_steps: int = 20               # DDIM steps
    sample_scale: float = 5.0            # CFG scale of the samples
    log_every: int = 10

    def __post_init__(self):
        if self.mode not in MODES:
            raise ConfigError(f"mode: '{self.mode}' is not one of {', '.join(MODES)}"
                              f"{did_you_mean(self.mode, MODES)}")
        if self.mixed_precision not in MIXED_PRECISION:
            raise ConfigError(f"mixed_precision: '{self.mixed_precision}' is not one of "
                              f"{', '.join(MIXED_PRECISION)}")
        if self.device not in ("auto", "cpu"):
            raise ConfigError(f"device: '{self.device}' is not auto or cpu (accelerate places "
                              "processes on devices; see accelerate launch)")
        for key in ("steps", "batch_size", "log_every", "keep_checkpoints", "sample_steps"):
            if getattr(self, key) < 1:
                raise ConfigError(f"{key}: must be >= 1, got {getattr(self, key)}")
        for key in ("warmup", "checkpoint_every", "sample_objects"):
            if getattr(self, key) < 0:
                raise ConfigError(f"{key}: must be >= 0, got {getattr(self, key)}")
        if self.cpu_threads is not None and self.cpu_threads < 1:
            raise ConfigError(f"cpu_threads: must be >= 1 or null, got {self.cpu_threads}")
        if self.sample_every < -1:
            raise ConfigError(f"sample_every: must be >= -1, got {self.sample_every}")
        if not self.lr > 0:
            raise ConfigError(f"lr: must be > 0, got {self.lr}")
        if self.lr_schedule not in LR_SCHEDULES:
            hint = did_you_mean(self.lr_schedule, LR_SCHEDULES)
            raise ConfigError(f"lr_schedule: '{self.lr_schedule}' is not one of "
                              f"{', '.join(LR_SCHEDULES)}{hint}")
        if not 0.0 <= self.average_decay < 1.0:
            raise ConfigError(f"average_decay: must be in [0, 1) (0: off), got "
                              f"{self.average_decay}")
        if self.weight_decay < 0 or self.grad_clip < 0:
            raise ConfigError("weight_decay and grad_clip: must be >= 0")
        if not 0.0 <= self.cfg_dropout <= 1.0:
            raise ConfigError(f"cfg_dropout: must be in [0, 1], got {self.cfg_dropout}")
        if self.loss_weighting not in LOSS_WEIGHTINGS:
            raise ConfigError(f"loss_weighting: '{self.loss_weighting}' is not one of "
                              f"{', '.join(LOSS_WEIGHTINGS)}"
                              f"{did_you_mean(self.loss_weighting, LOSS_WEIGHTINGS)}")
        if not self.min_snr_gamma > 0:
            raise ConfigError(f"min_snr_gamma: must be > 0, got {self.min_snr_gamma}")
        if not self.foreground_weight >= 0:
            raise ConfigError(f"foreground_weight: must be >= 0 (0: off), got "
                              f"{self.foreground_weight}")
        weighted = [key for key, on in (("loss_weighting", self.loss_weighting != "uniform"),
                                        ("foreground_weight", self.foreground_weight > 0)) if on]
        if weighted and self.mode == "clip":
            raise ConfigError(f"{weighted[0]}: mode clip has no diffusion loss to weight; "
                              "remove it")
        if not 0.0 <= self.reference_dropout <= 1.0:
            raise ConfigError(f"reference_dropout: must be in [0, 1], got "
                              f"{self.reference_dropout}")
        if self.reference_dropout > 0 and self.mode != "ema":
            raise ConfigError("reference_dropout: only mode ema puts a reference view in the "
                              "attention; remove it or use mode: ema")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ConfigError(f"betas: expected two values in [0, 1), got {list(self.betas)}")
        if self.mode == "clip" and self.model.conditioner is not None:
            raise ConfigError("model.conditioner: clip mode trains the OpenCLIP model itself; "
                              "set model.init (random or an OpenCLIP folder) instead")
        if self.mode == "text" and self.model.conditioner is not None \
                and self.model.conditioner.tokens != "pooled":
            raise ConfigError("model.conditioner.tokens: only image conditioning has patch "
                              "tokens; text mode uses the prompt's tokens, so leave it at pooled")


def read_recipe(name_or_path: str) -> Tuple[str, dict]:
    """recipes/finetune/NAME.yaml or a YAML path -> (name, mapping)."""
    from engine.config import read_yaml

    p = Path(name_or_path)
    if p.suffix in (".yaml", ".yml") or p.exists():
        if not p.is_file():
            raise ConfigError(f"recipe file not found: {p}")
        return p.stem, read_yaml(p)
    known = sorted(q.stem for q in RECIPES_DIR.glob("*.yaml")) if RECIPES_DIR.is_dir() else []
    if name_or_path not in known:
        raise ConfigError(f"no fine-tuning recipe named '{name_or_path}'"
                          f"{did_you_mean(name_or_path, known)}; known: "
                          f"{', '.join(known) or 'none'} (or give a path to a YAML file)")
    return name_or_path, read_yaml(RECIPES_DIR / f"{name_or_path}.yaml")


def parse_items(items: Sequence[str]) -> List[Tuple[str, Any]]:
    """``key=value`` -> [(key, YAML-typed value)]."""
    out = []
    for item in items:
        if "=" not in item:
            raise ConfigError(f"'{item}' is not key=value (e.g. steps=100 or "
                              "data.root=data/toy); see --help")
        key, value = item.split("=", 1)
        key = key.strip()
        if not key:
            raise ConfigError(f"'{item}' has an empty key")
        try:
            parsed = yaml.safe_load(value) if value != "" else None
        except yaml.YAMLError:
            parsed = value
        out.append((key, parsed))
    return out


def build_config(data: dict, items: Sequence[str] = (), recipe: Optional[str] = None
                 ) -> FinetuneConfig:
    """A recipe mapping + ``key=value`` items -> validated :class:`FinetuneConfig`."""
    from omegaconf import errors as oc_errors

    from engine.config import validate

    merged = OmegaConf.create(dict(data))
    for key, value in parse_items(items):
        try:
            OmegaConf.update(merged, key, value, merge=True, force_add=True)
        except (oc_errors.OmegaConfBaseException, ValueError) as exc:
            raise ConfigError(f"{key}: cannot set to {value!r} ({str(exc).splitlines()[0]})")
    if recipe is not None:
        merged.recipe = recipe
    return validate(FinetuneConfig, OmegaConf.to_container(merged, resolve=True))


def config_to_dict(cfg: FinetuneConfig) -> dict:
    return OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True)


# -- data: a step-indexed, seeded stream of objects ----------------------------------------

def mix_seed(*parts: int) -> int:
    """A 63-bit seed from integers (splitmix-style), so nearby steps get unrelated streams."""
    h = 0x9E3779B97F4A7C15
    for p in parts:
        h = (h ^ (int(p) & 0xFFFFFFFFFFFFFFFF)) * 0xBF58476D1CE4E5B9 & 0xFFFFFFFFFFFFFFFF
        h ^= h >> 31
    return h & 0x7FFFFFFFFFFFFFFF


class StepBatchSampler:
    """Batches of ``(seed, dataset index)`` for steps ``start..steps-1``, ``num_processes``
    consecutive batches per step (accelerate's shard gives batch ``s * n + p`` to process
    ``p``). Objects come in epochs, each a fresh permutation seeded by (seed, epoch)."""

    def __init__(self, size: int, batch_size: int, seed: int, start: int, steps: int,
                 num_processes: int = 1):
        self.size, self.batch_size, self.seed = size, batch_size, seed
        self.start, self.steps, self.num_processes = start, steps, num_processes
        self.drop_last = True
        self._perms: Dict[int, List[int]] = {}

    def _index(self, position: int) -> int:
        epoch, offset = divmod(position, self.size)
        if epoch not in self._perms:
            g = torch.Generator().manual_seed(mix_seed(self.seed, 17, epoch))
            self._perms = {epoch: torch.randperm(self.size, generator=g).tolist()}
        return self._perms[epoch][offset]

    def batch(self, step: int, process: int) -> List[Tuple[int, int]]:
        first = (step * self.num_processes + process) * self.batch_size
        return [(mix_seed(self.seed, 29, first + j), self._index(first + j))
                for j in range(self.batch_size)]

    def __len__(self) -> int:
        return max(self.steps - self.start, 0) * self.num_processes

    def __iter__(self):
        for step in range(self.start, self.steps):
            for p in range(self.num_processes):
                yield self.batch(step, p)


class SeededDataset(torch.utils.data.Dataset):
    """Wraps a dataset: item ``(seed, i)`` is ``dataset[i]`` with torch's RNG seeded by
    ``seed`` (the loader draws the random group and reference with it), whatever process or
    worker fetches it."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, item):
        seed, index = item
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return self.dataset[index]


# -- the functional core -----------------------------------------------------------------

def lr_at(step: int, lr: float, warmup: int, schedule: str = "constant",
          steps: int = 0) -> float:
    """The learning rate of optimiser step ``step`` (0-based): linear warm-up over ``warmup``
    steps (step 0 gets lr / warmup), then ``constant`` or ``cosine`` (half a cosine from lr
    after the warm-up down to 0 at step ``steps``)."""
    if warmup > 0 and step < warmup:
        return lr * (step + 1) / warmup
    if schedule == "cosine" and steps > warmup:
        progress = min(1.0, (step - warmup) / (steps - warmup))
        return lr * 0.5 * (1.0 + math.cos(math.pi * progress))
    return lr


class WeightAverage:
    """Exponential moving average of a module's floating-point parameters and buffers.

    The average starts as a copy of the module; ``update`` after each optimiser step moves it
    towards the live weights by ``1 - d`` with ``d = min(decay, (1 + n) / (10 + n))`` (n: the
    updates so far, ``updates``), so the first steps are not held back by the initial
    weights. The average is itself a module (``.module``, same keys as the live one), so it is
    checkpointed and saved like it; ``updates`` travels in the checkpoint's info.
    """

    def __init__(self, module: torch.nn.Module, decay: float):
        self.decay = decay
        self.updates = 0
        self.module = copy.deepcopy(module).eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, module: torch.nn.Module) -> None:
        d = min(self.decay, (1.0 + self.updates) / (10.0 + self.updates))
        live = module.state_dict()
        for name, avg in self.module.state_dict().items():
            src = live[name].detach()
            if avg.dtype.is_floating_point:
                avg.lerp_(src.to(avg), 1.0 - d)
            else:
                avg.copy_(src)
        self.updates += 1


def drop_context(context: Tensor, uncond: Tensor, drop: Tensor) -> Tensor:
    """context [B, L, D]; uncond [1, L, D]; drop [B] bool -> [B, L, D] with the dropped
    objects' context replaced by ``uncond``. Differentiable with respect to both."""
    return torch.where(drop.view(-1, 1, 1).to(context.device), uncond.to(context).expand_as(context),
                       context)


def camera_vectors_from_c2w(c2w: Tensor) -> Tensor:
    """[N, 4, 4] engine c2w -> [N, 16] MVDream camera vectors (guidance.multiview.cameras,
    convention ``mvdream``). Differentiable with respect to ``c2w``."""
    from engine.cameras import Cameras
    from guidance.multiview.cameras import camera_vectors

    zeros = torch.zeros(c2w.shape[0], device=c2w.device, dtype=c2w.dtype)
    return camera_vectors(Cameras(c2w, zeros, zeros, zeros, zeros), "mvdream")


@dataclass
class DiffusionBatch:
    """One training batch for the UNet, view-contiguous: B objects x G views each."""

    x_t: Tensor          # [B*G, C, h, w] noisy views (then the clean reference, ema)
    t: Tensor            # [B*G] long (the reference's: 0)
    context: Tensor      # [B*G, L, D]
    camera: Tensor       # [B*G, 16]
    noise: Tensor        # [B*V, C, h, w] the noise added to the V noisy views
    target: Tensor       # [B*V, C, h, w] what the UNet should output there (noise, or v)
    dropped: Tensor      # [B] bool: which objects got the unconditional context
    num_views: int       # V
    group: int           # G = V (text, image) or V + 1 (ema)


def make_diffusion_batch(x0: Tensor, context: Tensor, uncond: Tensor, camera: Tensor,
                         alphas_cumprod: Tensor, generator: torch.Generator,
                         cfg_dropout: float, reference: Optional[Tuple[Tensor, Tensor]] = None,
                         prediction_type: str = "epsilon") -> DiffusionBatch:
    """Noise a batch of multi-view objects.

    Args:
        x0: [B, V, C, h, w] clean views in the model's space. context: [B, L, D]; uncond:
        [1, L, D]. camera: [B, V, 16]. generator: a CPU generator; the draws, in order, are
        t [B] ~ U{0..999} (shared by an object's views), noise [B, V, C, h, w] ~ N(0, 1),
        u [B] ~ U[0, 1) (dropped where u < cfg_dropout).
        reference: (ref_x0 [B, C, h, w], ref_camera [B, 16]) for ema: appended as the last
        view of each group, clean, timestep 0, same context.
        prediction_type: epsilon (target = noise) or v_prediction (target = v).
    Returns:
        :class:`DiffusionBatch`. Differentiable with respect to x0, context and camera.
    """
    from guidance.multiview.model import add_noise, v_target

    B, V = x0.shape[:2]
    dev = x0.device
    t = torch.randint(0, NUM_TRAIN_TIMESTEPS, (B,), generator=generator).to(dev)
    noise = torch.randn(x0.shape, generator=generator, dtype=torch.float32).to(dev, x0.dtype)
    dropped = torch.rand(B, generator=generator) < cfg_dropout
    ctx = drop_context(context, uncond, dropped)
    t_views = t.repeat_interleave(V)
    x_t = add_noise(x0.flatten(0, 1), noise.flatten(0, 1), t_views, alphas_cumprod).view(x0.shape)
    target = noise.flatten(0, 1)
    if prediction_type == "v_prediction":
        target = v_target(x0.flatten(0, 1), target, t_views, alphas_cumprod).to(x0.dtype)
    t_all = t[:, None].expand(B, V)
    cam = camera
    G = V
    if reference is not None:
        ref_x0, ref_cam = reference
        x_t = torch.cat([x_t, ref_x0[:, None].to(x_t)], dim=1)
        t_all = torch.cat([t_all, torch.zeros(B, 1, dtype=t.dtype, device=dev)], dim=1)
        cam = torch.cat([camera, ref_cam[:, None].to(camera)], dim=1)
        G = V + 1
    return DiffusionBatch(
        x_t=x_t.flatten(0, 1), t=t_all.reshape(-1), camera=cam.flatten(0, 1),
        context=ctx.repeat_interleave(G, dim=0), noise=noise.flatten(0, 1), target=target,
        dropped=dropped,
        num_views=V, group=G)


def diffusion_loss(eps: Tensor, noise: Tensor, num_views: int, group: int,
                   weights: Optional[Tensor] = None,
                   pixel_weights: Optional[Tensor] = None) -> Tensor:
    """MSE over the noisy views only: eps [B*G, C, h, w] (the UNet's output, group-contiguous,
    the noisy views first), noise [B*V, C, h, w] (its target: the noise, or v) -> scalar
    (float32). Views G > V (the ema reference) are excluded. ``weights`` [B*V] (see
    :func:`snr_loss_weights`) scale each view's mean squared error; ``pixel_weights``
    [B*V, 1, h, w] (see :func:`foreground_pixel_weights`) each pixel's, before the mean. Both
    None is the plain MSE. Differentiable with respect to ``eps``."""
    B = eps.shape[0] // group
    pred = eps.view(B, group, *eps.shape[1:])[:, :num_views].float()
    target = noise.view(B, num_views, *noise.shape[1:]).float()
    if weights is None and pixel_weights is None:
        return F.mse_loss(pred, target)
    err = (pred - target) ** 2                                             # [B, V, C, h, w]
    if pixel_weights is not None:
        err = err * pixel_weights.view(B, num_views, 1, *err.shape[3:]).to(err)
    per_view = err.flatten(2).mean(dim=2)                                  # [B, V]
    if weights is None:
        return per_view.mean()
    return (per_view * weights.view(B, num_views).to(per_view)).mean()


def foreground_pixel_weights(masks: Tensor, size: Tuple[int, int], weight: float) -> Tensor:
    """Per-pixel loss weights from the views' alpha: masks [N, 1, S, S] in [0, 1] -> [N, 1, h,
    w] (float32) = 1 + weight * alpha, alpha area-averaged to ``size`` (the model's space, so
    a latent pixel weighs by the share of object it covers). The background keeps weight 1,
    as in the plain MSE, so the loss of a view grows by 1 + weight * (its object's share).
    Not differentiable (masks only)."""
    a = masks.float()
    if tuple(a.shape[-2:]) != tuple(size):
        a = F.adaptive_avg_pool2d(a, size)
    return 1.0 + weight * a.clamp(0.0, 1.0)


def snr_loss_weights(t: Tensor, alphas_cumprod: Tensor, prediction_type: str,
                     weighting: str = "min-snr", gamma: float = 5.0) -> Tensor:
    """Per-sample weights of the diffusion loss for timesteps ``t`` [N] -> [N] (float32).

    min-snr: the MSE on x0 weighted by min(SNR, gamma), SNR = alpha_bar / (1 - alpha_bar),
    expressed for the UNet's own target: an epsilon error is SNR times an x0 error, a v error
    (SNR + 1) times, so the weights are min(SNR, gamma) / SNR and min(SNR, gamma) / (SNR + 1).
    uniform: ones. Not differentiable (timesteps and schedule only).
    """
    if weighting == "uniform":
        return torch.ones(t.shape, dtype=torch.float32, device=t.device)
    a = alphas_cumprod.to(t.device, torch.float64)[t]
    snr = a / (1 - a)
    if prediction_type == "v_prediction":
        return (snr.clamp(max=gamma) / (snr + 1)).float()
    # min(SNR, gamma) / SNR written as min(1, gamma / SNR): 1 at SNR 0, not 0 / 0
    return (gamma / snr).clamp(max=1.0).float()


def clip_loss(image_features: Tensor, text_features: Tensor, scale: Tensor, labels: Tensor
              ) -> Tuple[Tensor, Tensor]:
    """Symmetric InfoNCE (CLIP) with several images per caption.

    Args:
        image_features: [N, D], text_features: [U, D], both L2-normalised; scale: the
        exponentiated logit scale (scalar); labels: [N] long, the caption of each image.
    Returns:
        (loss, top-1 image->text accuracy). image->text: cross-entropy to the own caption;
        text->image: cross-entropy to the uniform distribution over the caption's images.
        Differentiable with respect to features and scale.
    """
    logits = scale * image_features.float() @ text_features.float().t()      # [N, U]
    i2t = F.cross_entropy(logits, labels)
    target = F.one_hot(labels, text_features.shape[0]).float().t()          # [U, N]
    target = target / target.sum(1, keepdim=True).clamp_min(1.0)
    t2i = F.cross_entropy(logits.t(), target)
    acc = (logits.argmax(1) == labels).float().mean()
    return 0.5 * (i2t + t2i), acc


def param_groups(module: torch.nn.Module, weight_decay: float) -> List[dict]:
    """AdamW groups: decay on matrices and kernels, none on biases, norms, scalars."""
    decay, no_decay = [], []
    for p in module.parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0}]


# -- building models ------------------------------------------------------------------------

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
            seed=mix_seed(cfg.seed, 3), num_views=V, conditioning=need,
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
    from guidance.conditioners import saved_image_tokens

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


def build_clip(cfg: FinetuneConfig) -> Tuple[torch.nn.Module, dict]:
    """(trainable OpenCLIP CLIP with both towers, its model_cfg)."""
    from guidance.conditioners import build_openclip, read_weights, tiny_openclip_config

    m = cfg.model
    if m.init == "random":
        model_cfg = dict(m.clip) or tiny_openclip_config()
        try:
            clip = build_openclip(model_cfg, seed=mix_seed(cfg.seed, 5))
        except (TypeError, ValueError, KeyError) as exc:
            raise ConfigError(f"model.clip: not a buildable OpenCLIP model_cfg ({exc})") from None
    else:
        from guidance.conditioners import _folder_weights, _read_folder_config

        folder = Path(m.init)
        model_cfg = _read_folder_config(folder, "model.init")["model_cfg"]
        weights = _folder_weights(folder)
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


# -- the run -------------------------------------------------------------------------------

class Interrupted(Exception):
    exit_code = 130

    def __init__(self, checkpoint: Path):
        super().__init__(f"interrupted; checkpoint {checkpoint}")
        self.checkpoint = checkpoint


class Finetune:
    """One fine-tuning run: accelerator, data, model, optimiser; :meth:`run` trains.

    ``compute_loss(batch, generator)`` is the whole per-step maths (tests use it directly).
    """

    def __init__(self, cfg: FinetuneConfig, out_dir: Path, resume: Optional[Path] = None):
        from accelerate import Accelerator

        self.cfg = cfg
        self.out = Path(out_dir)
        try:
            self.accelerator = Accelerator(mixed_precision=cfg.mixed_precision,
                                           cpu=cfg.device == "cpu")
        except (ValueError, RuntimeError) as exc:
            raise ConfigError(f"mixed_precision: {str(exc).splitlines()[0]}") from None
        acc = self.accelerator
        self.device = acc.device
        if cfg.cpu_threads and self.device.type == "cpu":
            torch.set_num_threads(cfg.cpu_threads)
        self.mode = cfg.mode
        self.V = cfg.data.num_views
        if cfg.mode == "clip":
            self.clip, self.clip_cfg = build_clip(cfg)
            self.trainable = self.clip
            self.model = None
            image_size = cfg.data.image_size
        else:
            self.model = build_diffusion_model(cfg).to(self.device)
            self.trainable = self.model.unet
            image_size = self.model.info.image_size
            if cfg.data.image_size not in (None, image_size):
                raise ConfigError(f"data.image_size: {cfg.data.image_size} but the model takes "
                                  f"{image_size}; leave it null")
        from engine.datasets.mvdataset import MultiViewDataset

        with acc.main_process_first():
            self.dataset = MultiViewDataset(cfg.data.root, split=cfg.data.split,
                                            image_size=image_size, num_views=self.V,
                                            with_reference=cfg.mode != "text")
        self.start_step = 0
        self.average = None
        if cfg.average_decay > 0:
            self.average = WeightAverage(self.trainable, cfg.average_decay)
            self.average.module.to(self.device)
        self.optimizer = torch.optim.AdamW(param_groups(self.trainable, cfg.weight_decay),
                                           lr=lr_at(0, cfg.lr, cfg.warmup),
                                           betas=tuple(cfg.betas))
        self.resume_info: Dict[str, Any] = {}
        self.elapsed_before = 0.0          # wall seconds of the run before this process
        self._run_started: Optional[float] = None
        if resume is not None:
            self._restore(resume)
        self.sampler = StepBatchSampler(len(self.dataset), cfg.batch_size, cfg.seed,
                                        self.start_step, cfg.steps, acc.num_processes)
        from engine.datasets.mvdataset import collate

        loader = torch.utils.data.DataLoader(SeededDataset(self.dataset),
                                             batch_sampler=self.sampler, collate_fn=collate,
                                             num_workers=cfg.data.num_workers)
        self.net, self.optimizer, self.loader = acc.prepare(self.trainable, self.optimizer,
                                                            loader)
        if self.model is not None:
            self._uncond = self.model.unconditional_context(1).detach()
        scaler_state = self.resume_info.get("scaler")
        if scaler_state and acc.scaler is not None:
            acc.scaler.load_state_dict(scaler_state)

    # -- checkpoints ----------------------------------------------------------------------
    def _modules(self) -> Dict[str, torch.nn.Module]:
        modules = {"clip": self.clip} if self.mode == "clip" else {"unet": self.model.unet}
        if self.average is not None:
            modules["average"] = self.average.module
        return modules

    @contextlib.contextmanager
    def _model_with_unet(self, unet: torch.nn.Module):
        """self.model with ``unet`` in place of the trained one, for the duration."""
        live, self.model.unet = self.model.unet, unet
        try:
            yield self.model
        finally:
            self.model.unet = live

    def _restore(self, path: Path) -> None:
        from engine import checkpoint

        tensors, meta = checkpoint.load(path)
        info = meta.get("info", {})
        if info.get("mode") != self.mode:
            raise UserError(f"resume={path} is a {info.get('mode')} run, not {self.mode}")
        try:
            checkpoint.restore(tensors, meta, modules=self._modules(), optimizer=self.optimizer)
        except (RuntimeError, ValueError, KeyError) as exc:
            raise UserError(f"resume={path} does not fit this model "
                            f"({str(exc).splitlines()[0][:200]})") from None
        if self.average is not None:
            self.average.updates = int(info.get("average_updates", 0))
        self.start_step = int(info["step"])
        # the wall time already spent, so the log (and toy_models' manifest) counts the whole
        # training, not only the part since the last resume
        self.elapsed_before = float(info.get("elapsed_s") or 0.0)
        self.resume_info = info

    def elapsed(self) -> float:
        """Wall seconds of training so far, the time before a resume included."""
        started = self._run_started
        return self.elapsed_before + (time.time() - started if started is not None else 0.0)

    def save_checkpoint(self, step: int) -> Optional[Path]:
        from engine import checkpoint

        acc = self.accelerator
        acc.wait_for_everyone()
        path = None
        if acc.is_main_process:
            folder = self.out / "checkpoints"
            path = folder / checkpoint.checkpoint_name(0, self.mode, step)
            info = {"step": step, "mode": self.mode, "recipe": self.cfg.recipe,
                    "elapsed_s": round(self.elapsed(), 2),
                    "scaler": acc.scaler.state_dict() if acc.scaler is not None else None,
                    "average_updates": self.average.updates if self.average else None}
            checkpoint.save(path, modules=self._modules(), optimizer=self.optimizer, info=info)
            periodic = checkpoint.list_checkpoints(folder)
            for old in periodic[:-self.cfg.keep_checkpoints]:
                old.unlink()
        acc.wait_for_everyone()
        return path

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
        if self.mode == "clip":
            return self._clip_loss(batch, generator)
        from guidance.multiview.unet import unet_forward

        images = batch["images"].to(self.device)                 # [B, V, 3, S, S]
        B, V = images.shape[:2]
        camera = camera_vectors_from_c2w(batch["c2w"].to(self.device).float().flatten(0, 1))
        with torch.no_grad():
            if self.mode == "text":
                context = self.model.embed_text(batch["caption"])
            else:
                self._check_references(batch)
                context = self.model.embed_image(batch["reference"].to(self.device))
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
        return loss, logs

    def _clip_loss(self, batch: dict, generator: torch.Generator) -> Tuple[Tensor, dict]:
        import open_clip

        from guidance.conditioners import clip_preprocess

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

    # -- the loop ----------------------------------------------------------------------------
    def run(self) -> Path:
        cfg, acc = self.cfg, self.accelerator
        metrics = self.out / "metrics.jsonl"
        if acc.is_main_process:
            _truncate_metrics(metrics, self.start_step)
        step = self.start_step
        window: List[float] = []
        self._run_started = time.time()
        params = [p for p in self.trainable.parameters() if p.requires_grad]
        try:
            for batch in self.loader:
                rank = acc.process_index
                torch.manual_seed(mix_seed(cfg.seed, 41, step, rank))
                generator = torch.Generator().manual_seed(mix_seed(cfg.seed, 43, step, rank))
                lr = lr_at(step, cfg.lr, cfg.warmup, cfg.lr_schedule, cfg.steps)
                for group in self.optimizer.param_groups:
                    group["lr"] = lr
                loss, logs = self.compute_loss(batch, generator)
                if not torch.isfinite(loss.detach()):
                    raise RunAborted(f"non-finite loss at step {step}; lower lr or use "
                                     f"mixed_precision=no (last checkpoint in "
                                     f"{self.out / 'checkpoints'})")
                acc.backward(loss)
                grad_norm = None
                if cfg.grad_clip > 0 and acc.sync_gradients:
                    grad_norm = acc.clip_grad_norm_(params, cfg.grad_clip)
                self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
                if self.average is not None:
                    self.average.update(acc.unwrap_model(self.net))
                step += 1
                window.append(float(acc.gather(loss.detach()[None]).mean()))
                if step % cfg.log_every == 0 or step == cfg.steps:
                    self._log(metrics, step, window, lr, grad_norm, logs, self.elapsed())
                    window = []
                if cfg.checkpoint_every and step % cfg.checkpoint_every == 0 \
                        and step < cfg.steps:
                    self.save_checkpoint(step)
                if cfg.sample_every > 0 and step % cfg.sample_every == 0 and step < cfg.steps:
                    self.sample_grid(step)
        except KeyboardInterrupt:
            raise Interrupted(self.save_checkpoint(step)) from None
        if step > self.start_step or not (self.out / "checkpoints").is_dir():
            self.save_checkpoint(step)
        if cfg.sample_every >= 0:
            self.sample_grid(step)
        return self.save_model(step)

    def _log(self, path: Path, step: int, window: List[float], lr: float, grad_norm, logs,
             elapsed: float) -> None:
        if not self.accelerator.is_main_process:
            return
        record = {"step": step, "loss": sum(window) / max(len(window), 1), "lr": lr,
                  **({"grad_norm": float(grad_norm)} if grad_norm is not None else {}),
                  **logs, "elapsed_s": round(elapsed, 2)}
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a") as f:
            f.write(json.dumps(record) + "\n")
        print(f"[{self.mode}] step {step}/{self.cfg.steps} loss {record['loss']:.4f} "
              f"lr {lr:.2e} ({elapsed:.0f} s)", flush=True)

    def save_model(self, step: int) -> Path:
        """out/model: MultiViewDiffusionModel folder, or OpenCLIP folder for clip; the
        weight average when ``average_decay`` is on."""
        acc = self.accelerator
        acc.wait_for_everyone()
        folder = self.out / "model"
        if acc.is_main_process:
            net = (self.average.module if self.average is not None
                   else acc.unwrap_model(self.net, keep_fp32_wrapper=False))
            if self.mode == "clip":
                from guidance.conditioners import save_openclip_folder

                save_openclip_folder(net, self.clip_cfg, folder)
            else:
                with self._model_with_unet(net) as model:
                    model.save_pretrained(folder, extra={"finetune": {
                        "mode": self.mode, "steps": step, "recipe": self.cfg.recipe,
                        "seed": self.cfg.seed, "average_decay": self.cfg.average_decay}})
        acc.wait_for_everyone()
        return folder

    # -- samples -----------------------------------------------------------------------------
    @torch.no_grad()
    def sample_grid(self, step: int) -> Optional[Path]:
        """DDIM + CFG samples of the first ``sample_objects`` objects as a plain V-view model
        (no reference in the attention, whatever the mode). Rows: [reference,] ground-truth
        views, sampled views. Nothing in clip mode."""
        if self.mode == "clip" or not self.cfg.sample_objects \
                or not self.accelerator.is_main_process:
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
        gen = torch.Generator().manual_seed(mix_seed(self.cfg.seed, 53))
        for i in range(min(self.cfg.sample_objects, len(self.dataset))):
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(mix_seed(self.cfg.seed, 59, i))
                sample = self.dataset[i]
            if self.mode == "text":
                cond = self.model.embed_text([sample["caption"]])
            elif "reference" in sample:
                cond = self.model.embed_image(sample["reference"][None].to(self.device))
            else:
                continue
            cams = camera_vectors_from_c2w(sample["c2w"].to(self.device).float())
            views = sample_views(self.model, cond, self._uncond, cams, self.V,
                                 self.cfg.sample_steps, self.cfg.sample_scale, 0.0, gen)
            row = ([sample["reference"]] if self.mode != "text" else []) \
                + list(sample["images"]) + list(views.float().cpu())
            rows.append(torch.stack([r.float().cpu() for r in row]).permute(0, 2, 3, 1))
        return rows


def _truncate_metrics(path: Path, step: int) -> None:
    """Keep the log lines up to ``step`` (a resumed run rewrites what came after)."""
    if not path.is_file():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line).get("step", 0) <= step:
                keep.append(line)
        except ValueError:
            continue
    from engine.checkpoint import atomic_write_text

    atomic_write_text(path, "".join(k + "\n" for k in keep))


# -- command line -------------------------------------------------------------------------

def prepare(argv: Sequence[str]) -> Tuple[FinetuneConfig, Path, Optional[Path]]:
    """Parse the command line: (config, run folder, checkpoint to resume or None)."""
    from engine import checkpoint
    from engine.config import read_yaml, split_command_items

    recipe, resume, rest = split_command_items(list(argv))
    if resume:
        run_dir, ckpt = checkpoint.find_resume_checkpoint(Path(resume))
        saved = read_yaml(run_dir / "config.yaml", "saved config")
        if recipe is not None and recipe not in (saved.get("recipe"), ""):
            raise ConfigError(f"resume={resume} is a run of recipe '{saved.get('recipe')}', not "
                              f"'{recipe}'; drop recipe= when resuming")
        cfg = build_config(saved, rest)
        cfg.out = str(run_dir)
        return cfg, run_dir, ckpt
    if recipe is None:
        raise ConfigError("no recipe given: add recipe=NAME (recipes/finetune/NAME.yaml) or "
                          "recipe=PATH.yaml")
    name, data = read_recipe(recipe)
    cfg = build_config(data, rest, recipe=name)
    out = Path(cfg.out) if cfg.out else PROJECT_ROOT / "outputs" / "finetune" / name
    if checkpoint.list_checkpoints(out / "checkpoints"):
        raise ConfigError(f"out: {out} already holds a run; continue it with resume={out} or "
                          "choose another out=")
    cfg.out = str(out)
    return cfg, out, None


def run(argv: Sequence[str]) -> int:
    from engine.checkpoint import atomic_write_text

    argv = list(argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0
    flags = [a for a in argv if a.startswith("-")]
    if flags:
        raise ConfigError(f"unknown option {flags[0]}; options: --help")
    cfg, out, ckpt = prepare(argv)
    job = Finetune(cfg, out, resume=ckpt)
    if job.accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out / "config.yaml",
                          yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
    try:
        folder = job.run()
    except Interrupted as exc:
        print(f"{exc}\ncontinue with: python -m guidance.training.finetune resume={out}", file=sys.stderr)
        return exc.exit_code
    if job.accelerator.is_main_process:
        print(f"model: {folder}\noutput: {out}")
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    return run_cli(run, list(sys.argv[1:] if argv is None else argv))


if __name__ == "__main__":
    sys.exit(main())
