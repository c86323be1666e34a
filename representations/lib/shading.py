"""Shading of renders: albedo only, soft diffuse from a point light, or textureless (white).

The schedule follows DreamFusion / threestudio as used by MVDream and Isotropic3D: albedo only
for the first ``ambient_only_steps`` steps, then diffuse shading from a random point light
near the camera, a fraction ``textureless_prob`` of the renders with a white albedo so that
geometry alone must explain the image.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional

import torch
from torch import Tensor

from engine.cameras import Cameras
from engine.errors import ConfigError

MODES = ("albedo", "diffuse", "textureless")


@dataclass
class ShadingConfig:
    ambient_only_steps: int = 5000     # albedo only before this step
    textureless_prob: float = 0.5      # after it, chance a render is white-albedo shaded
    ambient: float = 0.1               # ambient light strength in diffuse mode
    diffuse: float = 0.9
    # light distance, relative to the camera's distance from the origin
    light_distance_range: List[float] = field(default_factory=lambda: [0.8, 1.5])
    # std of the Gaussian jitter of the light direction around the camera direction
    light_position_perturb: float = 1.0

    def __post_init__(self):
        if self.ambient_only_steps < 0:
            raise ConfigError(f"ambient_only_steps: must be >= 0, got {self.ambient_only_steps}")
        if not 0.0 <= self.textureless_prob <= 1.0:
            raise ConfigError(f"textureless_prob: must be in [0, 1], got {self.textureless_prob}")
        if self.ambient < 0 or self.diffuse < 0:
            raise ConfigError(f"ambient/diffuse: must be >= 0, got {self.ambient}, {self.diffuse}")
        r = self.light_distance_range
        if len(r) != 2 or not 0 < r[0] <= r[1]:
            raise ConfigError(f"light_distance_range: expected [min, max] with 0 < min <= max, "
                              f"got {list(r)}")
        if self.light_position_perturb < 0:
            raise ConfigError("light_position_perturb: must be >= 0, got "
                              f"{self.light_position_perturb}")


def _rand(shape, generator: Optional[torch.Generator]) -> Tensor:
    return torch.rand(shape, generator=generator)


def choose_shading(cfg: ShadingConfig, step: int, training: bool,
                   generator: Optional[torch.Generator] = None) -> str:
    """The shading mode of one render: ``albedo`` in eval and before ``ambient_only_steps``,
    afterwards ``textureless`` with probability ``textureless_prob``, else ``diffuse``.
    ``generator`` None uses the global torch RNG (seeded per step by the trainer)."""
    if not training or step < cfg.ambient_only_steps:
        return "albedo"
    if cfg.textureless_prob > 0 and float(_rand((), generator)) < cfg.textureless_prob:
        return "textureless"
    return "diffuse"


def random_light_positions(cameras: Cameras, cfg: ShadingConfig,
                           generator: Optional[torch.Generator] = None) -> Tensor:
    """One point light per camera [B, 3] near the camera (threestudio style): direction =
    normalize(camera position + N(0, perturb^2) noise), distance = U(light_distance_range) x
    the camera's distance to the origin. Not differentiable (random)."""
    pos = cameras.position.detach()
    b = pos.shape[0]
    noise = torch.randn(b, 3, generator=generator).to(pos) * cfg.light_position_perturb
    direction = pos + noise
    direction = direction / direction.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    lo, hi = cfg.light_distance_range
    scale = lo + (hi - lo) * _rand(b, generator).to(pos)
    return direction * (scale * pos.norm(dim=-1))[:, None]


def shade(albedo: Tensor, normal: Tensor, light_dir: Tensor, mode: str, ambient: float = 0.1,
          diffuse: float = 0.9) -> Tensor:
    """Lambertian shading.

    Args:
        albedo [..., 3]; normal [..., 3] and light_dir [..., 3] unit vectors (light_dir points
        from the surface towards the light); mode ``albedo`` | ``diffuse`` | ``textureless``.
    Returns:
        rgb [..., 3]: ``albedo``; ``albedo * (ambient + diffuse * max(0, n.l))``; or the same
        with a white albedo. Differentiable with respect to albedo, normal and light_dir.
    """
    if mode == "albedo":
        return albedo
    if mode not in MODES:
        raise ValueError(f"shading mode '{mode}' is not one of {MODES}")
    lambert = (normal * light_dir).sum(dim=-1, keepdim=True).clamp_min(0.0)
    light = ambient + diffuse * lambert
    if mode == "textureless":
        return light.expand(*albedo.shape[:-1], 3)
    return albedo * light
