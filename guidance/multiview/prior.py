"""One object for everything a guidance asks of a multi-view diffusion model: the prior.

:class:`MultiViewPrior` owns the frozen model (UNet, VAE for latent models, conditioner),
the conditioning (a picture or a prompt -> context, the unconditional context), the camera
convention (engine cameras -> the model's 16-vectors) and the noise schedule maths
(:mod:`guidance.multiview.noise` on the model's own ``alphas_cumprod``). Score distillation
(``multiview-sds``), the views drawn once (``sampled-views``) and the sampling command are
built on it; so is a new SDS variant (docs/writing-a-guidance-plugin.md)::

    prior = MultiViewPrior.load("models/toy/stage2", device="cpu")
    cond, uncond = prior.contexts(image=reference_picture)        # or prompt="..."
    x0 = prior.encode(renders)                                    # [N, 3, H, W] in [0, 1]
    x_t = prior.add_noise(x0, noise, t)
    eps_uncond, eps_cond = prior.predict_eps_pair(x_t, t, cond, uncond,
                                                  prior.camera_vectors(cameras), views)

The picture is conditioned exactly as the released Isotropic3D code does: composited on
white, resized to 256 px (bicubic, antialiased), then by the conditioner to its own input
size (224 for ViT-H-14; bicubic, antialiased) and CLIP-normalised.
"""

from __future__ import annotations

from typing import Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from engine.cameras import Cameras
from engine.errors import ConfigError
from guidance.multiview import noise
from guidance.multiview.cameras import CONVENTIONS, camera_vectors

#: the precisions a prior runs its frozen model in (``auto`` is resolved per device by
#: :func:`resolve_precision`)
PRECISIONS = {"auto": None, "fast": None, "fp32": torch.float32, "fp16": torch.float16,
              "bf16": torch.bfloat16}
#: the released code's first resize of the picture, before the conditioner's own
CONDITION_SIZE = 256
CONDITIONINGS = ("image", "text")


def _choice(key: str, value: str, options) -> None:
    if value not in options:
        raise ConfigError(f"{key}: '{value}' is not one of {', '.join(options)}")


def resolve_precision(name: str, device=None) -> torch.dtype:
    """The dtype of a frozen model for ``precision: name`` on ``device``.

    ``auto``: on CUDA, bf16 where the GPU supports it (Ampere and newer) and fp16 elsewhere
    (half the weights' memory, the tensor cores' speed; the released models were trained in
    fp16 mixed precision); on CPU fp32 (half precision is slow or unsupported there).
    ``fast``: as ``auto``, but bf16 also on a CPU whose oneDNN computes bf16 in vector
    instructions (AVX-512 and newer; the toy UNet's SDS call, one thread: 1.39x faster, an
    output 0.21% off fp32's, benchmarks/bench_toy_sds.py), fp32 on other CPUs. Explicit
    names are taken as they are.

    Example::

        resolve_precision("auto", "cpu")     # torch.float32
        resolve_precision("fast", "cpu")     # torch.bfloat16 on an AVX-512 CPU, else float32
        resolve_precision("fp16", "cpu")     # torch.float16
    """
    _choice("precision", name, tuple(PRECISIONS))
    if PRECISIONS[name] is not None:
        return PRECISIONS[name]
    device = torch.device(device) if device is not None else torch.device("cpu")
    if device.type != "cuda":
        return torch.bfloat16 if name == "fast" and cpu_computes_bf16() else torch.float32
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def cpu_computes_bf16() -> bool:
    """Whether this CPU runs bf16 convolutions and matrix products in vector instructions
    (oneDNN's own test; without it bf16 is emulated and slower than fp32)."""
    try:
        return bool(torch.backends.mkldnn.is_available()
                    and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):     # a torch without the probe
        return False


def picture_batch(image) -> Tensor:
    """A picture as [N, 3, H, W] on white: a ReferenceImage (its ``rgb``, already on white),
    or a tensor [H, W, C] / [N, C, H, W] with C = 3 (on white) or 4 (straight RGBA,
    composited here: rgb * a + (1 - a))."""
    x = getattr(image, "rgb", image)
    if not isinstance(x, Tensor) or x.dim() not in (3, 4):
        raise ValueError("a picture is a ReferenceImage or a tensor [H, W, C] / [N, C, H, W]")
    if x.dim() == 3:
        x = x.permute(2, 0, 1)[None]
    if x.shape[1] == 4:
        x = x[:, :3] * x[:, 3:] + (1.0 - x[:, 3:])
    if x.shape[1] != 3:
        raise ValueError(f"a picture has 3 or 4 channels, not {x.shape[1]}")
    return x


def picture_context(model: nn.Module, image, device=None, dtype=None) -> Tensor:
    """The context [N, L, D] a picture conditions ``model`` with (its ``embed_image``), with
    the release's preprocessing: on white (:func:`picture_batch`), resized to 256 px (bicubic,
    antialiased, clamped), then the conditioner's own resize and normalisation. Gradients flow
    to the conditioner's weights when grad is enabled (fine-tuning trains through it only when
    it is unfrozen)."""
    rgb = F.interpolate(picture_batch(image), size=(CONDITION_SIZE, CONDITION_SIZE),
                        mode="bicubic", align_corners=False, antialias=True).clamp(0, 1)
    if device is not None or dtype is not None:
        rgb = rgb.to(device=device, dtype=dtype)
    return model.embed_image(rgb)


class MultiViewPrior(nn.Module):
    """A frozen multi-view diffusion model with its conditioning, cameras and noise maths.

    Args:
        model: a loaded :class:`guidance.multiview.model.MultiViewDiffusionModel` (frozen
            here: no gradients, eval mode).
        camera_convention: ``auto`` (the model's) or one of
            :data:`guidance.multiview.cameras.CONVENTIONS`.
        conditioning: ``auto`` (the model's), ``image`` or ``text``.
        dtype: what renders and pictures are cast to before the model (default: the model's
            dtype; :meth:`load` casts the model to it).
    """

    def __init__(self, model: nn.Module, camera_convention: str = "auto",
                 conditioning: str = "auto", dtype: Optional[torch.dtype] = None):
        super().__init__()
        _choice("camera_convention", camera_convention, ("auto",) + CONVENTIONS)
        _choice("conditioning", conditioning, ("auto",) + CONDITIONINGS)
        self.model = model
        for p in model.parameters():
            p.requires_grad_(False)
        model.eval()
        info = model.info
        self.conditioning = info.conditioning if conditioning == "auto" else conditioning
        self.convention = (info.camera_convention if camera_convention == "auto"
                           else camera_convention)
        self.dtype = dtype or model.dtype

    @classmethod
    def load(cls, model: Union[str, nn.Module], device=None,
             dtype: Optional[torch.dtype] = torch.float32, camera_convention: str = "auto",
             conditioning: str = "auto", key: Optional[str] = None) -> "MultiViewPrior":
        """The prior of ``model``: a converted folder, raw checkpoint or hub id (loaded with
        :func:`guidance.multiview.pretrained.load_multiview_model` onto ``device`` in
        ``dtype``, None: as saved; what is missing is a one-line UserError naming ``key``),
        or a model already loaded (used as it is; ``dtype`` is still what inputs are cast
        to)."""
        if isinstance(model, (str, bytes)) or hasattr(model, "__fspath__"):
            from guidance.multiview.pretrained import DEFAULT_KEY, load_multiview_model

            model = load_multiview_model(str(model), device=device, dtype=dtype,
                                         key=key or DEFAULT_KEY)
        return cls(model, camera_convention, conditioning, dtype=dtype)

    # -- what the model is -----------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return self.model.device

    @property
    def num_views(self) -> int:
        """Views per object the model was trained on."""
        return int(self.model.info.num_views)

    @property
    def image_size(self) -> int:
        """The render size the model sees (renders are resized to it by :meth:`encode`)."""
        return int(self.model.info.image_size)

    @property
    def space(self) -> str:
        """``latent`` (a VAE between renders and the UNet) or ``pixel``."""
        return self.model.info.space

    @property
    def prediction_type(self) -> str:
        """What the UNet outputs: ``epsilon`` or ``v_prediction``."""
        return self.model.info.prediction_type

    @property
    def alphas_cumprod(self) -> Tensor:
        """The model's schedule, [num_train_timesteps] float32 on the model's device."""
        return self.model.alphas_cumprod

    # -- conditioning ------------------------------------------------------------------------
    @torch.no_grad()
    def encode_image(self, image) -> Tensor:
        """A picture (see :func:`picture_batch`) -> context [N, L, D] in the model's dtype:
        resized to 256 px (bicubic, antialiased, clamped), then the conditioner's own
        preprocessing. No gradient."""
        return picture_context(self.model, image, self.device, self.dtype)

    @torch.no_grad()
    def encode_text(self, prompts: Union[str, Sequence[str]]) -> Tensor:
        """A prompt or N prompts -> context [N, L, D]. No gradient."""
        return self.model.embed_text([prompts] if isinstance(prompts, str) else list(prompts))

    @torch.no_grad()
    def uncond_context(self, n: int = 1, negative_prompt: str = "") -> Tensor:
        """The unconditional context [n, L, D]: zeros for an image model, the
        ``negative_prompt``'s tokens for a text model."""
        if self.conditioning == "text":
            return self.encode_text([negative_prompt] * n)
        return self.model.unconditional_context(n)

    def contexts(self, image=None, prompt: Optional[str] = None, negative_prompt: str = "",
                 who: str = "this guidance") -> Tuple[Tensor, Tensor]:
        """(conditional [1, L, D], unconditional [1, L, D]) contexts for the run's input: the
        picture for an image model, the prompt for a text model. A missing input is a
        ConfigError that says ``who`` needs it."""
        if self.conditioning == "image":
            if image is None:
                raise ConfigError(f"{who} conditions on an image: add image=PATH")
            cond = self.encode_image(image)
            return cond, self.uncond_context(1).to(cond)
        if not prompt:
            raise ConfigError(f'{who} conditions on text: add prompt="..."')
        return self.encode_text([prompt]), self.uncond_context(1, negative_prompt)

    def drop_conditioner(self) -> None:
        """Free the image/text encoder (once the contexts are computed)."""
        self.model.conditioner = None

    # -- cameras -----------------------------------------------------------------------------
    def camera_vectors(self, cameras: Cameras, convention: Optional[str] = None) -> Tensor:
        """[B, 16] float32 camera conditioning on the model's device, in ``convention``
        (default: the prior's). Differentiable with respect to ``cameras.c2w`` for mvdream."""
        return camera_vectors(cameras, convention or self.convention).to(self.device)

    # -- spaces ------------------------------------------------------------------------------
    def encode(self, images: Tensor, generator: Optional[torch.Generator] = None) -> Tensor:
        """Renders [N, 3, H, W] in [0, 1] -> x0 in the model's space (resized to
        :attr:`image_size`, bilinear; VAE-encoded for a latent model). Differentiable."""
        size = self.image_size
        rgb = F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False)
        return self.model.encode(rgb.to(self.dtype), generator=generator)

    def decode(self, x0: Tensor) -> Tensor:
        """x0 -> images [N, 3, S, S] in [0, 1]."""
        return self.model.decode(x0)

    # -- noise maths on the model's schedule ----------------------------------------------
    def add_noise(self, x0: Tensor, eps: Tensor, t: Tensor) -> Tensor:
        """x_t (:func:`guidance.multiview.noise.add_noise`), in x0's dtype."""
        return noise.add_noise(x0, eps, t, self.alphas_cumprod)

    def predict_x0(self, x_t: Tensor, t: Tensor, eps: Tensor) -> Tensor:
        """x0 from x_t and epsilon (:func:`guidance.multiview.noise.predict_x0`)."""
        return noise.predict_x0(x_t, t, eps, self.alphas_cumprod)

    def eps_from_v(self, x_t: Tensor, t: Tensor, v: Tensor) -> Tensor:
        """epsilon from a v prediction (:func:`guidance.multiview.noise.eps_from_v`)."""
        return noise.eps_from_v(x_t, t, v, self.alphas_cumprod)

    def v_target(self, x0: Tensor, eps: Tensor, t: Tensor) -> Tensor:
        """The v target (:func:`guidance.multiview.noise.v_target`, float32)."""
        return noise.v_target(x0, eps, t, self.alphas_cumprod)

    # -- the UNet ----------------------------------------------------------------------------
    def predict_eps(self, x_t: Tensor, t: Tensor, context: Tensor, cameras16: Tensor,
                    num_views: int) -> Tensor:
        """Epsilon for a view-contiguous batch x_t [N, C, h, w], t [N], context [N or 1, L, D],
        cameras16 [N, 16] (a v-predicting model's output is converted). Returns x_t's dtype;
        differentiable with respect to x_t, context and cameras16."""
        context = context.expand(x_t.shape[0], -1, -1) if context.shape[0] == 1 else context
        return self.model.predict_noise(x_t, t, context.to(x_t), cameras16.to(x_t), num_views)

    def predict_eps_pair(self, x_t: Tensor, t: Tensor, cond: Tensor, uncond: Tensor,
                         cameras16: Tensor, num_views: int) -> Tuple[Tensor, Tensor]:
        """(eps_uncond, eps_cond) of one batch through the UNet (unconditional half first),
        the two halves classifier-free guidance mixes. cond / uncond [1, L, D]."""
        n = x_t.shape[0]
        context = torch.cat([uncond.expand(n, -1, -1), cond.expand(n, -1, -1)]).to(x_t)
        cams = cameras16.to(x_t)
        eps = self.model.predict_noise(torch.cat([x_t, x_t]), torch.cat([t, t]), context,
                                       torch.cat([cams, cams]), num_views)
        return eps.chunk(2)

    @torch.no_grad()
    def sample(self, cond: Tensor, uncond: Tensor, cameras16: Tensor, steps: int,
               scale: float, eta: float = 0.0, generator=None,
               clip_sample: Optional[bool] = None, progress=None, anchors=None) -> Tensor:
        """Groups of views [K * V, 3, S, S] in [0, 1] drawn by DDIM with classifier-free
        guidance (:func:`guidance.multiview.sample.sample_views`) at cameras16 [V, 16], one
        group per context of ``cond`` [K, L, D] (``generator``: one, or a list of K);
        ``anchors``: clean views joining each group, see ``sample_views``."""
        from guidance.multiview import sample as sampling

        extra = {} if anchors is None else {"anchors": anchors}
        return sampling.sample_views(self.model, cond, uncond, cameras16, cameras16.shape[0],
                                     steps, scale, eta, generator, clip_sample=clip_sample,
                                     progress=progress, **extra)


__all__ = ["MultiViewPrior", "PRECISIONS", "resolve_precision", "CONDITION_SIZE", "picture_batch"]
