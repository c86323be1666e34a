"""The frozen multi-view diffusion model: UNet, optional VAE, conditioner, noise schedule.

The weights and their folder format: ``encode`` / ``decode`` between renders and the model's
space (SD KL-f8 latents scaled by 0.18215, or pixels in [-1, 1]), ``add_noise`` /
``predict_x0`` on the model's DDPM schedule (MVDream's scaled-linear betas 0.00085..0.012,
1000 steps, unless the model was trained on another, see :data:`NOISE_SCHEDULES`; the maths
is :mod:`guidance.multiview.noise`), ``predict_noise`` (the multi-view UNet) and the context
embeddings. Guidance plugins use it through :class:`guidance.multiview.prior.MultiViewPrior`,
which adds the picture preprocessing and the camera convention.

On disk it is a diffusers-style folder::

    engine_model.json          format name + version, ModelInfo, which components exist
    unet/                      diffusers UNet2DConditionModel (config.json + safetensors)
    vae/                       diffusers AutoencoderKL (latent models only)
    scheduler/scheduler_config.json
    conditioner/               OpenCLIP format (open_clip_config.json + safetensors)

``engine_model.json`` is written last, so an interrupted save is not mistaken for a model.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import torch
import torch.nn as nn
from torch import Tensor

from engine.atomic import atomic_write_text
from engine.errors import ConfigError, UserError, did_you_mean
from guidance.multiview.cameras import CONVENTIONS
from guidance.multiview.noise import (NUM_TRAIN_TIMESTEPS, add_noise, eps_from_v, predict_x0,
                                      v_target)
from guidance.multiview.unet import MultiViewUNetConfig, build_unet, unet_forward

FORMAT_NAME = "distill-engine-multiview-model"
FORMAT_VERSION = 1
INDEX_FILE = "engine_model.json"
LATENT_SCALE = 0.18215
SPACES = ("latent", "pixel")
CONDITIONINGS = ("image", "text")
#: what the UNet outputs: MVDream / Isotropic3D predict epsilon; v (Salimans & Ho 2022) suits
#: small pixel-space models trained from scratch: at high noise it is nearly -x0, so samples
#: from pure noise come out clean where an undertrained epsilon model leaves them grainy
PREDICTION_TYPES = ("epsilon", "v_prediction")

#: the scaled-linear DDPM schedule of Stable Diffusion / MVDream
SCHEDULER_KWARGS = dict(num_train_timesteps=NUM_TRAIN_TIMESTEPS, beta_start=0.00085,
                        beta_end=0.012, beta_schedule="scaled_linear",
                        prediction_type="epsilon", clip_sample=False)

#: named noise schedules a model can be trained on (``model.noise_schedule`` of a fine-tuning
#: recipe, stored in the model's scheduler_config.json): changes to SCHEDULER_KWARGS.
#: ``zero-terminal-snr`` rescales MVDream's betas so the last step is pure noise (Lin et al.
#: 2024, "Common diffusion noise schedules and sample steps are flawed"). On the scaled-linear
#: schedule x_999 keeps sqrt(alpha_bar) = 0.068 of the image; on a small pixel-space model with
#: a white background that is enough for the silhouette to show through the noise, so the model
#: learns to read the shape off x_T, and at sampling, where x_T is pure noise, it reads a shape
#: off the noise instead. Needs v prediction (at t = 999 epsilon is x_t itself) and samplers
#: that start at t = 999 ("trailing" spacing).
NOISE_SCHEDULES = {
    "scaled-linear": {},
    "zero-terminal-snr": dict(rescale_betas_zero_snr=True, timestep_spacing="trailing"),
}


def check_noise_schedule(noise_schedule: str, prediction_type: str) -> None:
    """ConfigError unless ``noise_schedule`` names one of :data:`NOISE_SCHEDULES` that a model
    predicting ``prediction_type`` can be trained on."""
    if noise_schedule not in NOISE_SCHEDULES:
        raise ConfigError(f"noise_schedule: '{noise_schedule}' is not one of "
                          f"{', '.join(NOISE_SCHEDULES)}"
                          f"{did_you_mean(noise_schedule, NOISE_SCHEDULES)}")
    if noise_schedule != "scaled-linear" and prediction_type != "v_prediction":
        raise ConfigError(f"noise_schedule: {noise_schedule} needs prediction_type: "
                          "v_prediction (its last step is pure noise, where epsilon is x_t "
                          "itself and says nothing about the image)")


def scheduler_config_for(noise_schedule: str) -> dict:
    """DDPMScheduler kwargs of a named schedule (:data:`NOISE_SCHEDULES`)."""
    return dict(SCHEDULER_KWARGS, **NOISE_SCHEDULES[noise_schedule])


#: the smallest alpha_bar kept: a zero-terminal-SNR schedule's last step has exactly 0, which
#: turns x0 = (x_t - sqrt(1 - a) eps) / sqrt(a) into a division by zero (diffusers' samplers
#: clamp the same way)
MIN_ALPHA_CUMPROD = 2.0 ** -24

#: Stable Diffusion's KL-f8 autoencoder (diffusers AutoencoderKL kwargs)
SD_VAE_CONFIG = dict(in_channels=3, out_channels=3, latent_channels=4,
                     down_block_types=["DownEncoderBlock2D"] * 4,
                     up_block_types=["UpDecoderBlock2D"] * 4,
                     block_out_channels=[128, 256, 512, 512], layers_per_block=2,
                     norm_num_groups=32, sample_size=256, scaling_factor=LATENT_SCALE)


@dataclass
class ModelInfo:
    """What the rest of the engine needs to know about a model."""

    space: str = "latent"                       # latent | pixel
    image_size: int = 256                       # render size fed to the model
    latent_scale: float = LATENT_SCALE
    num_views: int = 4
    camera_convention: str = "mvdream"          # mvdream | isotropic3d-release
    conditioning: str = "image"                 # image | text
    prediction_type: str = "epsilon"
    unet: Dict[str, Any] = field(default_factory=dict)   # MultiViewUNetConfig fields

    def __post_init__(self):
        for name, value, options in (("space", self.space, SPACES),
                                     ("camera_convention", self.camera_convention, CONVENTIONS),
                                     ("conditioning", self.conditioning, CONDITIONINGS),
                                     ("prediction_type", self.prediction_type, PREDICTION_TYPES)):
            if value not in options:
                raise ConfigError(f"{name}: '{value}' is not one of {', '.join(options)}")

    def to_dict(self) -> dict:
        return asdict(self)

    @staticmethod
    def from_dict(data: dict) -> "ModelInfo":
        known = {f.name for f in fields(ModelInfo)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"model info: unknown keys {', '.join(unknown)}")
        return ModelInfo(**data)


def scaled_linear_scheduler():
    """diffusers DDPMScheduler with MVDream's schedule."""
    from diffusers import DDPMScheduler

    return DDPMScheduler(**SCHEDULER_KWARGS)


class MultiViewDiffusionModel(nn.Module):
    """UNet (+ VAE) (+ conditioner) + schedule. Frozen (eval, no grad) unless built trainable.

    ``alphas_cumprod`` [1000] is a float32 buffer and stays float32 through ``.to(dtype)``.
    """

    def __init__(self, unet: nn.Module, info: ModelInfo, vae: Optional[nn.Module] = None,
                 conditioner: Optional[nn.Module] = None, scheduler_config: Optional[dict] = None,
                 trainable: bool = False):
        super().__init__()
        if (info.space == "latent") != (vae is not None):
            raise ConfigError(f"space: a {info.space} model "
                              f"{'needs' if vae is None else 'takes no'} VAE")
        self.unet = unet
        self.vae = vae
        self.conditioner = conditioner
        self.info = info
        from diffusers import DDPMScheduler

        scheduler = (DDPMScheduler.from_config(scheduler_config) if scheduler_config
                     else scaled_linear_scheduler())
        scheduler_config = dict(scheduler.config)
        self.scheduler_config = {k: v for k, v in scheduler_config.items()
                                 if not k.startswith("_")}
        self.scheduler_config["prediction_type"] = info.prediction_type
        alphas = scheduler.alphas_cumprod.detach().float().clone().clamp_(min=MIN_ALPHA_CUMPROD)
        self._alphas_cpu = alphas
        self.register_buffer("alphas_cumprod", alphas.clone(), persistent=False)
        self._check_context_dim()
        self.set_trainable(trainable)

    # -- construction ------------------------------------------------------------------
    @classmethod
    def build_random(cls, unet_cfg: MultiViewUNetConfig, space: str = "latent",
                     conditioner: Optional[nn.Module] = None, vae_config: Optional[dict] = None,
                     trainable: bool = False, seed: Optional[int] = None,
                     init_std: Optional[float] = None, noise_schedule: str = "scaled-linear",
                     **info_overrides) -> "MultiViewDiffusionModel":
        """A model with random weights (tests, training from scratch).

        ``vae_config``: AutoencoderKL kwargs for latent space (default SD KL-f8).
        ``init_std``: redraw every UNet weight from N(0, init_std) (diffusers zero-initialises
        some layers; tests want non-trivial outputs). ``noise_schedule``: a name of
        :data:`NOISE_SCHEDULES`. ``info_overrides``: ModelInfo fields.
        """
        check_noise_schedule(noise_schedule,
                             info_overrides.get("prediction_type", ModelInfo.prediction_type))
        if space not in SPACES:
            raise ConfigError(f"space: '{space}' is not one of {', '.join(SPACES)}")
        with torch.random.fork_rng(devices=[]):
            if seed is not None:
                torch.manual_seed(seed)
            unet = build_unet(unet_cfg)
            if init_std is not None:
                with torch.no_grad():
                    for p in unet.parameters():
                        p.normal_(0.0, init_std)
            vae = None
            if space == "latent":
                from diffusers import AutoencoderKL

                vae = AutoencoderKL(**(vae_config or SD_VAE_CONFIG))
        if space == "latent":
            factor = 2 ** (len(vae.config.block_out_channels) - 1)
            image_size = unet_cfg.sample_size * factor
        else:
            image_size = unet_cfg.sample_size
        info = dict(space=space, image_size=image_size, unet=unet_cfg.to_dict(),
                    latent_scale=float(vae.config.scaling_factor) if vae is not None
                    else LATENT_SCALE,
                    conditioning=getattr(conditioner, "kind", "image"))
        info.update(info_overrides)
        return cls(unet, ModelInfo(**info), vae=vae, conditioner=conditioner,
                   scheduler_config=scheduler_config_for(noise_schedule), trainable=trainable)

    def set_trainable(self, trainable: bool) -> None:
        """trainable: the UNet learns (train mode); VAE and conditioner stay frozen."""
        self.requires_grad_(False)
        self.eval()
        if trainable:
            self.unet.requires_grad_(True)
            self.unet.train()

    def _check_context_dim(self) -> None:
        info = self.info
        cross = self.unet.config.cross_attention_dim
        if self.conditioner is not None and getattr(self.conditioner, "embed_dim", cross) != cross:
            raise ConfigError(f"conditioner: embeds to {self.conditioner.embed_dim} but the UNet "
                              f"cross-attends to {cross}")
        channels = self.unet.config.in_channels
        if info.space == "latent" and self.vae.config.latent_channels != channels:
            raise ConfigError(f"vae: {self.vae.config.latent_channels} latent channels, UNet "
                              f"takes {channels}")
        if info.space == "pixel" and channels != 3:
            raise ConfigError(f"unet: a pixel-space UNet takes 3 channels, not {channels}")

    def _apply(self, fn, recurse=True):
        # keep the schedule in float32 whatever dtype the weights are cast to
        super()._apply(fn, recurse)
        self.alphas_cumprod = self._alphas_cpu.to(self.alphas_cumprod.device)
        return self

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.unet.parameters()).dtype

    # -- spaces ------------------------------------------------------------------------
    def encode(self, images: Tensor, generator: Optional[torch.Generator] = None) -> Tensor:
        """[N, 3, H, W] in [0, 1] -> x0 (latent [N, 4, H/8, W/8] or pixels [N, 3, H, W]).

        Latents are sampled from the VAE posterior and scaled by ``latent_scale``.
        Differentiable with respect to ``images``. Returns the model's dtype.
        """
        x = images.to(self.device, self.dtype) * 2.0 - 1.0
        if self.vae is None:
            return x
        dist = self.vae.encode(x).latent_dist
        return dist.sample(generator=generator) * self.info.latent_scale

    def decode(self, x0: Tensor) -> Tensor:
        """x0 -> images [N, 3, H, W] in [0, 1] (clamped). Differentiable inside (0, 1)."""
        x = x0.to(self.device, self.dtype)
        if self.vae is not None:
            x = self.vae.decode(x / self.info.latent_scale).sample
        return ((x + 1.0) / 2.0).clamp(0.0, 1.0)

    # -- schedule ----------------------------------------------------------------------
    def add_noise(self, x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
        """:func:`guidance.multiview.noise.add_noise` on this model's schedule."""
        return add_noise(x0, noise, t, self.alphas_cumprod)

    def predict_x0(self, x_t: Tensor, t: Tensor, eps: Tensor) -> Tensor:
        """:func:`guidance.multiview.noise.predict_x0` on this model's schedule."""
        return predict_x0(x_t, t, eps, self.alphas_cumprod)

    def predict_output(self, x_t: Tensor, t: Tensor, context: Tensor, camera: Tensor,
                       num_views: int) -> Tensor:
        """The UNet's own output, epsilon or v as ``info.prediction_type`` says (samplers on a
        zero-terminal-SNR schedule need v: at its last step epsilon is x_t). Shapes, dtype
        and differentiability as :meth:`predict_noise`."""
        out = unet_forward(self.unet, x_t.to(self.dtype), t.to(x_t.device),
                           context.to(self.dtype), camera.to(self.dtype), num_views)
        return out.to(x_t.dtype)

    def predict_noise(self, x_t: Tensor, t: Tensor, context: Tensor, camera: Tensor,
                      num_views: int) -> Tensor:
        """Epsilon for a view-contiguous batch, whatever the UNet predicts (a v output is
        converted), so SDS and samplers need not know the parametrisation.

        x_t [B*V, C, h, w], t [B*V], context [B*V, L, D], camera [B*V, 16], num_views V.
        Runs in the model's dtype; returns x_t's dtype. Differentiable with respect to x_t,
        context and camera (and the UNet weights when trainable).
        """
        out = self.predict_output(x_t, t, context, camera, num_views)
        if self.info.prediction_type == "v_prediction":
            out = eps_from_v(x_t, t, out, self.alphas_cumprod).to(x_t.dtype)
        return out

    # -- conditioning ------------------------------------------------------------------
    def _need_conditioner(self, kind: str) -> nn.Module:
        if self.conditioner is None:
            raise UserError(f"this model has no conditioner loaded, cannot embed {kind}")
        if getattr(self.conditioner, "kind", kind) != kind:
            raise UserError(f"this model is conditioned on {self.conditioner.kind}, not {kind}")
        return self.conditioner

    def embed_image(self, rgb: Tensor) -> Tensor:
        """[N, 3, H, W] in [0, 1], composited on white -> context [N, L, D] (L = 1, or 1 +
        the patches for a ``tokens: patches`` conditioner)."""
        return self._need_conditioner("image")(rgb)

    def embed_text(self, texts: Sequence[str]) -> Tensor:
        """N strings -> context [N, L, D]."""
        return self._need_conditioner("text")(list(texts))

    def unconditional_context(self, n: int) -> Tensor:
        """Zeros [n, L, D] for image conditioning (L: the conditioner's ``num_tokens``, 1
        without one); the empty prompt's tokens for text."""
        if self.info.conditioning == "text":
            return self.embed_text([""] * n)
        dim = self.unet.config.cross_attention_dim
        tokens = int(getattr(self.conditioner, "num_tokens", 1))
        return torch.zeros(n, tokens, dim, device=self.device, dtype=self.dtype)

    # -- folders -----------------------------------------------------------------------
    def save_pretrained(self, folder, extra: Optional[dict] = None) -> Path:
        """Write the diffusers-style folder (safetensors only). ``extra`` goes into the index
        (e.g. the source checkpoint of a conversion)."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        index_path = folder / INDEX_FILE
        if index_path.exists():
            index_path.unlink()  # the folder is not a model until it is complete again
        self.unet.save_pretrained(folder / "unet", safe_serialization=True)
        if self.vae is not None:
            self.vae.save_pretrained(folder / "vae", safe_serialization=True)
        (folder / "scheduler").mkdir(exist_ok=True)
        scheduler = dict(self.scheduler_config, _class_name="DDPMScheduler")
        (folder / "scheduler" / "scheduler_config.json").write_text(
            json.dumps(scheduler, indent=2, sort_keys=True))
        conditioner = None
        if self.conditioner is not None:
            self.conditioner.save_pretrained(folder / "conditioner")
            conditioner = {"type": getattr(self.conditioner, "registry_name", None),
                           "path": "conditioner"}
        index = {
            "format": FORMAT_NAME, "version": FORMAT_VERSION, "info": self.info.to_dict(),
            "components": {"unet": "unet", "vae": "vae" if self.vae is not None else None,
                           "scheduler": "scheduler", "conditioner": conditioner},
        }
        if extra:
            index.update(extra)
        atomic_write_text(index_path, json.dumps(index, indent=2))
        return folder

    @classmethod
    def from_pretrained(cls, folder, device=None, dtype: Optional[torch.dtype] = None,
                        load_conditioner: bool = True, **info_overrides
                        ) -> "MultiViewDiffusionModel":
        """Read a folder written by :meth:`save_pretrained`. A missing or corrupt folder
        raises a one-line UserError. ``info_overrides`` replace ModelInfo fields (e.g.
        ``camera_convention``)."""
        folder = Path(folder)
        index = read_index(folder)
        try:
            info = ModelInfo.from_dict({**index["info"], **info_overrides})
            unet_cfg = MultiViewUNetConfig(**info.unet)
        except (TypeError, KeyError, UserError) as exc:
            raise UserError(f"{folder / INDEX_FILE} is not a valid model index "
                            f"({_one_line(exc)}); convert the model again") from None
        comps = index.get("components", {})
        unet = _load_module(lambda: build_unet(unet_cfg), folder / "unet", "UNet")
        vae = None
        if comps.get("vae"):
            from diffusers import AutoencoderKL

            vae_dir = folder / comps["vae"]
            try:
                vae_config = AutoencoderKL.load_config(str(vae_dir))
            except Exception as exc:
                raise UserError(f"VAE config in {vae_dir} is unreadable ({_one_line(exc)})"
                                ) from None
            vae = _load_module(lambda: AutoencoderKL.from_config(vae_config), vae_dir, "VAE")
        conditioner = None
        spec = comps.get("conditioner")
        if spec and load_conditioner:
            from engine.registry import get

            kind = spec.get("type") or ("openclip-" + info.conditioning)
            conditioner = get("conditioner", kind).from_pretrained(folder / spec["path"])
        sched_path = folder / comps.get("scheduler", "scheduler") / "scheduler_config.json"
        scheduler_config = None
        if sched_path.is_file():
            try:
                scheduler_config = json.loads(sched_path.read_text())
            except ValueError as exc:
                raise UserError(f"{sched_path} is not valid JSON ({_one_line(exc)})") from None
        model = cls(unet, info, vae=vae, conditioner=conditioner,
                    scheduler_config=scheduler_config)
        kwargs = {k: v for k, v in (("device", device), ("dtype", dtype)) if v is not None}
        return model.to(**kwargs) if kwargs else model


def _one_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0][:300] if lines else type(exc).__name__


def read_index(folder: Path) -> dict:
    """engine_model.json of a converted folder, checked. UserError when absent or invalid."""
    folder = Path(folder)
    path = folder / INDEX_FILE
    if not folder.is_dir():
        raise UserError(f"model folder {folder} does not exist; convert a checkpoint with "
                        "python -m guidance.multiview.convert SRC OUT")
    if not path.is_file():
        raise UserError(f"{folder} is not a converted multi-view model ({INDEX_FILE} missing); "
                        "convert a checkpoint with python -m guidance.multiview.convert SRC OUT")
    try:
        index = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise UserError(f"{path} is unreadable ({_one_line(exc)}); convert the model again"
                        ) from None
    if not isinstance(index, dict) or index.get("format") != FORMAT_NAME:
        raise UserError(f"{path} is not a {FORMAT_NAME} index")
    if int(index.get("version", 0)) > FORMAT_VERSION:
        raise UserError(f"{path} has format version {index.get('version')}; this engine reads "
                        f"up to {FORMAT_VERSION}: update the engine")
    if "info" not in index:
        raise UserError(f"{path} has no model info; convert the model again")
    return index


def _weights_file(folder: Path) -> Path:
    for name in ("diffusion_pytorch_model.safetensors", "model.safetensors"):
        if (folder / name).is_file():
            return folder / name
    raise UserError(f"no safetensors weights in {folder}; the model folder is incomplete")


def _load_module(factory, folder: Path, what: str) -> nn.Module:
    """Build ``factory()`` without allocating, then take the folder's safetensors tensors.

    Strict: any missing, unexpected or mis-shaped tensor is a UserError (corrupt folder).
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = _weights_file(Path(folder))
    try:
        state = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise UserError(f"{what} weights {path} are unreadable ({_one_line(exc)})") from None
    with torch.device("meta"):
        module = factory()
    try:
        module.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as exc:
        raise UserError(f"{what} weights {path} do not match its config "
                        f"({_one_line(exc)})") from None
    leftover = [n for n, t in list(module.named_parameters()) + list(module.named_buffers())
                if t.is_meta]
    if leftover:
        raise UserError(f"{what} in {folder} lacks {', '.join(leftover[:3])}")
    return module


#: add_noise, predict_x0, v_target, eps_from_v are guidance.multiview.noise's, re-exported
__all__: List[str] = ["MultiViewDiffusionModel", "ModelInfo", "add_noise", "predict_x0",
                      "v_target", "eps_from_v", "read_index",
                      "scaled_linear_scheduler", "SD_VAE_CONFIG", "FORMAT_NAME",
                      "FORMAT_VERSION", "INDEX_FILE"]
