"""``model: random:isotropic3d`` / ``random:mvdream``: the released architectures with random
weights, built in memory.

For what needs the real sizes but not the real weights: the real-size recipe tests, the GPU
check (benchmarks/gpu_check.sh), a user's dry run of a recipe's speed and memory on their
GPU before downloading 5 GB. Nothing a random model guides toward means anything::

    python -m engine.run recipe=isotropic3d image=cat.png \\
        stages.nerf.guidance.model=random:isotropic3d stages.dmtet.guidance.model=random:isotropic3d

The weights are drawn from a fixed seed (the same model every time), in fp32 on the CPU,
then moved and cast as any loaded model is.
"""

from __future__ import annotations

import contextlib
from typing import Optional

import torch

from engine.errors import UserError

PREFIX = "random:"
#: name -> (conditioning, camera convention of the released code)
RANDOM_MODELS = {
    "isotropic3d": ("image", "isotropic3d-release"),
    "mvdream": ("text", "mvdream"),
}


def is_random(name: str) -> bool:
    """Whether a ``model`` setting names a random model."""
    return str(name).startswith(PREFIX)


def check_random(name: str, key: str = "model") -> str:
    """The architecture a ``random:NAME`` setting names; a one-line UserError otherwise."""
    arch = str(name)[len(PREFIX):]
    if arch not in RANDOM_MODELS:
        raise UserError(f"{key}: '{name}' is not a random model; use "
                        + " or ".join(PREFIX + n for n in RANDOM_MODELS))
    return arch


_INIT_FUNCTIONS = ("uniform_", "normal_", "trunc_normal_", "constant_", "ones_", "zeros_",
                   "eye_", "dirac_", "xavier_uniform_", "xavier_normal_", "kaiming_uniform_",
                   "kaiming_normal_", "orthogonal_", "sparse_")


@contextlib.contextmanager
def _skip_init():
    """Modules built inside get uninitialised parameters (torch.nn.init does nothing):
    drawing 1.5 billion weights with each layer's own initialiser takes a minute on two
    cores; :func:`_fill` then draws them all at once."""
    saved = {name: getattr(torch.nn.init, name) for name in _INIT_FUNCTIONS
             if hasattr(torch.nn.init, name)}
    try:
        for name in saved:
            setattr(torch.nn.init, name, lambda tensor, *a, **k: tensor)
        yield
    finally:
        for name, fn in saved.items():
            setattr(torch.nn.init, name, fn)


@torch.no_grad()
def _fill(module: torch.nn.Module, generator: torch.Generator) -> None:
    """Weights of scale 1/sqrt(fan in) (activations keep their size through the layers, as
    with a trained model: half precision neither overflows nor underflows), zero biases,
    unit norms. The values are slices of one pool of 2^20 normal draws at random offsets:
    copying is a hundred times faster than drawing 1.5 billion numbers."""
    pool = torch.randn(2 ** 20 + 1, generator=generator)
    for name, p in module.named_parameters():
        leaf = name.rsplit(".", 1)[-1]
        owner = module.get_submodule(name.rsplit(".", 1)[0]) if "." in name else module
        if isinstance(owner, (torch.nn.GroupNorm, torch.nn.LayerNorm)):
            p.fill_(1.0 if leaf == "weight" else 0.0)
            continue
        if leaf == "bias":
            p.zero_()
            continue
        scale = p[0].numel() ** -0.5 if p.dim() >= 2 else 0.02
        flat = p.view(-1)
        start = int(torch.randint(0, 2 ** 20, (1,), generator=generator))
        done = 0
        while done < flat.numel():
            n = min(flat.numel() - done, pool.numel() - start)
            flat[done:done + n] = pool[start:start + n] * scale
            done, start = done + n, 0


def random_release_model(name: str, device=None, dtype: Optional[torch.dtype] = None,
                         seed: int = 0, load_conditioner: bool = True):
    """The released architecture ``random:NAME`` with random weights: SD 2.1-base multi-view
    UNet, KL-f8 VAE, OpenCLIP ViT-H-14 image tower (isotropic3d) or text tower (mvdream)."""
    import open_clip

    from engine.registry import get
    from guidance.multiview.model import MultiViewDiffusionModel
    from guidance.multiview.openclip import build_openclip
    from guidance.multiview.unet import MultiViewUNetConfig

    conditioning, convention = RANDOM_MODELS[check_random(name)]
    conditioner = None
    generator = torch.Generator().manual_seed(seed)
    with _skip_init():
        if load_conditioner:
            clip_cfg = open_clip.get_model_config("ViT-H-14")
            clip = build_openclip(clip_cfg, keep=conditioning)
            _fill(clip, generator)
            conditioner = get("conditioner", "openclip-" + conditioning).from_clip(clip,
                                                                                   clip_cfg)
        model = MultiViewDiffusionModel.build_random(
            MultiViewUNetConfig.sd21_base(), "latent", conditioner=conditioner,
            conditioning=conditioning, camera_convention=convention)
    _fill(model.unet, generator)
    _fill(model.vae, generator)
    kwargs = {k: v for k, v in (("device", device), ("dtype", dtype)) if v is not None}
    return model.to(**kwargs) if kwargs else model


__all__ = ["PREFIX", "RANDOM_MODELS", "is_random", "check_random", "random_release_model"]
