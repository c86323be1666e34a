"""Fine-tuning configuration: the typed recipe (``FinetuneConfig`` and its parts), its
validation (every mistake one line naming the key), and reading a recipe plus ``key=value``
overrides into it.

A recipe is ``recipes/finetune/NAME.yaml`` (found through :func:`engine.config.load_recipe`)
or any YAML path; the keys are the fields below, dotted on the command line
(``steps=200 model.unet.block_out_channels=[64,128,256]``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

from omegaconf import MISSING, OmegaConf

from engine.errors import ConfigError, did_you_mean

MODES = ("text", "image", "ema", "anchors", "clip", "points", "triplane-ae",
         "triplane-diffusion")
MIXED_PRECISION = ("no", "fp16", "bf16")
LR_SCHEDULES = ("constant", "cosine")
LOSS_WEIGHTINGS = ("uniform", "min-snr", "x0")   # x0: mode points only


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
        from guidance.multiview.openclip import IMAGE_TOKENS

        if self.tokens not in IMAGE_TOKENS:
            raise ConfigError(f"model.conditioner.tokens: must be one of "
                              f"{', '.join(IMAGE_TOKENS)}, got {self.tokens!r}")


@dataclass
class ModelConfig:
    init: str = "random"                 # random | PATH of a saved model (clip: OpenCLIP folder)
    space: str = "pixel"                 # init random: pixel | latent
    unet: Dict[str, Any] = field(default_factory=dict)  # multiview.unet.MultiViewUNetConfig
    vae: Optional[Dict[str, Any]] = None  # init random, latent: AutoencoderKL kwargs
    conditioner: Optional[ConditionerConfig] = None  # null: the one saved with model.init
    # init random: what the UNet predicts, epsilon (MVDream) | v_prediction (small pixel models
    # learn clean samples sooner); a loaded model keeps its own
    prediction_type: str = "epsilon"
    # init random: the noise schedule it trains on, scaled-linear (MVDream's) |
    # zero-terminal-snr (guidance.multiview.model.NOISE_SCHEDULES; needs v_prediction); a
    # loaded model keeps its own
    noise_schedule: str = "scaled-linear"
    # clip, init random: the OpenCLIP model_cfg ({}: guidance.multiview.openclip's tiny one)
    clip: Dict[str, Any] = field(default_factory=dict)
    # points, init random: the Point-E transformer's sizes (guidance.pointcloud.transformer
    # PointModelConfig fields: width, layers, heads, points; kind image-vec and clip_dim come
    # from the conditioner)
    point: Dict[str, Any] = field(default_factory=dict)
    # triplane-ae, init random: the autoencoder's sizes (guidance.compress3d.autoencoder
    # TriplaneAEConfig fields: volume, width, latent_channels, ...)
    autoencoder: Dict[str, Any] = field(default_factory=dict)
    # triplane-diffusion: the autoencoder folder whose latents are drawn (autoencoder: PATH),
    # the weight of the shape prior's loss (prior_weight, 1.0) and, init random, the two
    # denoisers' sizes (guidance.compress3d.latent_diffusion LatentDiffusionConfig fields:
    # width, layers, heads, prior_width, prior_layers, shape_condition, ...)
    latent: Dict[str, Any] = field(default_factory=dict)

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
class PointsConfig:
    """mode points: how (picture, cloud) pairs are made from a toy-world dataset
    (guidance.training.points)."""

    pool: int = 4096                     # surface samples per object (colours from the mesh)
    cloud_points: int = 0                # points per training cloud (0: the model's points),
                                         # drawn afresh from the pool at every step
    views: str = "all"                   # all: every view is a picture | front: r0 only |
                                         # groups (triplane-diffusion): a group of
                                         # data.num_views views is one condition
    image_size: int = 64                 # pictures loaded as the engine loads its input
    object_fraction: float = 0.7         # ... re-centred, the object this much of the frame
    world_scale: float = 1.6             # engine units per cloud unit (toy objects: 0.8/0.5)
    sample_steps: int = 16               # sampler defaults saved with the model
    guidance_scale: float = 3.0

    def __post_init__(self):
        if self.pool < 1 or self.cloud_points < 0:
            raise ConfigError("points.pool must be >= 1 and points.cloud_points >= 0")
        if self.views not in ("all", "front", "groups"):
            raise ConfigError(f"points.views: '{self.views}' is not all, front or groups")
        if self.image_size < 16 or not 0 < self.object_fraction <= 1:
            raise ConfigError("points.image_size must be >= 16 and points.object_fraction in "
                              "(0, 1]")
        if not self.world_scale > 0 or self.sample_steps < 1 or self.guidance_scale < 0:
            raise ConfigError("points.world_scale must be > 0, points.sample_steps >= 1 and "
                              "points.guidance_scale >= 0")


@dataclass
class ShapesConfig:
    """mode triplane-ae: what each step draws from a toy-world object's true mesh
    (guidance.training.triplane_ae)."""

    pool: int = 8192                     # surface samples per object (colours from the mesh)
    cloud_points: int = 1024             # the encoder's input cloud, drawn afresh every step
    near_points: int = 1024              # occupancy queries near the surface ...
    near_sigma: float = 0.03             # ... surface points moved by N(0, sigma^2)
    uniform_points: int = 1024           # ... and uniform in the cube
    color_points: int = 512              # surface points the colour loss reads
    grid: int = 96                       # the occupancy labels' grid over the cube
    occupancy_weight: float = 1.0
    color_weight: float = 1.0            # L1 of rgb at surface points
    kl_weight: float = 1.0e-4

    def __post_init__(self):
        for key in ("pool", "cloud_points", "grid"):
            if getattr(self, key) < 1:
                raise ConfigError(f"shapes.{key}: must be >= 1, got {getattr(self, key)}")
        for key in ("near_points", "uniform_points", "color_points"):
            if getattr(self, key) < 0:
                raise ConfigError(f"shapes.{key}: must be >= 0, got {getattr(self, key)}")
        if self.near_points + self.uniform_points < 1:
            raise ConfigError("shapes.near_points + shapes.uniform_points: at least one "
                              "occupancy query a step")
        if not self.near_sigma >= 0 or min(self.occupancy_weight, self.color_weight,
                                           self.kl_weight) < 0:
            raise ConfigError("shapes.near_sigma and the shapes.*_weight keys must be >= 0")


@dataclass
class FinetuneConfig:
    recipe: str = ""
    description: str = ""
    mode: str = MISSING                  # text | image | ema | anchors | clip | points |
                                         # triplane-ae | triplane-diffusion
    data: DataConfig = MISSING
    model: ModelConfig = field(default_factory=ModelConfig)
    # modes points and triplane-diffusion: the (picture, cloud) pairs
    points: PointsConfig = field(default_factory=PointsConfig)
    shapes: ShapesConfig = field(default_factory=ShapesConfig)   # mode triplane-ae only
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
    # mode anchors (Envision3D's interpolation at toy scale): how many clean anchor views of
    # another camera group join the attention, [min, max], drawn per step; and the share of
    # steps without any (the model then also runs as a plain V-view model)
    anchor_views: List[int] = field(default_factory=lambda: [2, 4])
    anchor_dropout: float = 0.0
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
        if self.loss_weighting == "x0" and self.mode != "points":
            raise ConfigError("loss_weighting: x0 is for mode points (the point clouds' eps "
                              "loss); use uniform or min-snr")
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
        group = getattr(self.data, "num_views", 4)   # the anchors are one group's views
        if (len(self.anchor_views) != 2 or not 1 <= self.anchor_views[0] <= self.anchor_views[1]
                or self.anchor_views[1] > group):
            raise ConfigError(f"anchor_views: expected [min, max] with 1 <= min <= max <= "
                              f"data.num_views ({group}), got {list(self.anchor_views)}")
        if not 0.0 <= self.anchor_dropout <= 1.0:
            raise ConfigError(f"anchor_dropout: must be in [0, 1], got {self.anchor_dropout}")
        if self.anchor_dropout > 0 and self.mode != "anchors":
            raise ConfigError("anchor_dropout: only mode anchors puts anchor views in the "
                              "attention; remove it or use mode: anchors")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ConfigError(f"betas: expected two values in [0, 1), got {list(self.betas)}")
        if self.mode == "points" and self.model.conditioner is None \
                and self.model.init == "random":
            raise ConfigError("model.conditioner: mode points needs the OpenCLIP image tower "
                              "whose embedding conditions the clouds (model.conditioner.model="
                              "FOLDER)")
        if self.mode == "triplane-ae" and (self.model.conditioner is not None
                                           or self.loss_weighting != "uniform"
                                           or self.foreground_weight > 0):
            raise ConfigError("mode triplane-ae reads no picture and has no diffusion loss: "
                              "remove model.conditioner, loss_weighting and foreground_weight")
        if self.points.views == "groups" and self.mode != "triplane-diffusion":
            raise ConfigError("points.views: groups (a group of views as one condition) is for "
                              "mode triplane-diffusion; use all or front")
        if self.mode == "triplane-diffusion":
            if self.loss_weighting != "uniform" or self.foreground_weight > 0:
                raise ConfigError("mode triplane-diffusion weighs its v-prediction loss "
                                  "uniformly: remove loss_weighting and foreground_weight")
            if self.model.init == "random" and (self.model.conditioner is None
                                                or not self.model.latent.get("autoencoder")):
                raise ConfigError("mode triplane-diffusion, init random: needs the image tower "
                                  "(model.conditioner.model=FOLDER) and the autoencoder "
                                  "(model.latent.autoencoder=FOLDER, e.g. "
                                  "models/toy/triplane-ae)")
        if self.mode == "clip" and self.model.conditioner is not None:
            raise ConfigError("model.conditioner: clip mode trains the OpenCLIP model itself; "
                              "set model.init (random or an OpenCLIP folder) instead")
        if self.mode == "text" and self.model.conditioner is not None \
                and self.model.conditioner.tokens != "pooled":
            raise ConfigError("model.conditioner.tokens: only image conditioning has patch "
                              "tokens; text mode uses the prompt's tokens, so leave it at pooled")


def read_recipe(name_or_path: str) -> Tuple[str, dict]:
    """recipes/finetune/NAME.yaml or a YAML path -> (name, mapping)."""
    from engine.config import load_recipe

    name, data, _ = load_recipe(name_or_path, "finetune", "fine-tuning recipe")
    return name, data


def build_config(data: dict, items: Sequence[str] = (), recipe: Optional[str] = None
                 ) -> FinetuneConfig:
    """A recipe mapping + dotted ``key=value`` items (values read as YAML, as every command
    reads them) -> validated :class:`FinetuneConfig`."""
    from omegaconf import errors as oc_errors

    from engine.cli import yaml_value
    from engine.config import validate

    merged = OmegaConf.create(dict(data))
    for item in items:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(f"'{item}' is not key=value (e.g. steps=100 or "
                              "data.root=data/toy); see --help")
        value = yaml_value(text)
        try:
            OmegaConf.update(merged, key, value, merge=True, force_add=True)
        except (oc_errors.OmegaConfBaseException, ValueError) as exc:
            raise ConfigError(f"{key}: cannot set to {value!r} ({str(exc).splitlines()[0]})")
    if recipe is not None:
        merged.recipe = recipe
    return validate(FinetuneConfig, OmegaConf.to_container(merged, resolve=True))


def config_to_dict(cfg: FinetuneConfig) -> dict:
    return OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True)
