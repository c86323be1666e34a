"""Backgrounds: the colour seen where rays leave the scene (plugins of kind ``background``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List

import torch
from torch import Tensor, nn

from engine.errors import ConfigError
from engine.plugin import Background
from engine.registry import register


def _check_color(color: List[float]) -> None:
    if len(color) != 3 or not all(0.0 <= c <= 1.0 for c in color):
        raise ConfigError(f"color: expected three values in [0, 1], got {list(color)}")


@register("background", "solid")
class SolidBackground(Background):
    """One fixed colour (white by default, as Isotropic3D renders)."""

    @dataclass
    class Config:
        color: List[float] = field(default_factory=lambda: [1.0, 1.0, 1.0])

        def __post_init__(self):
            _check_color(self.color)

    def __init__(self, cfg: "SolidBackground.Config" = None, device=None):
        super().__init__()
        cfg = cfg or SolidBackground.Config()
        self.register_buffer("color", torch.tensor(cfg.color, dtype=torch.float32, device=device))

    def forward(self, dirs: Tensor) -> Tensor:
        return self.color.to(dirs).expand(*dirs.shape[:-1], 3)


@register("background", "random")
class RandomBackground(Background):
    """A random solid colour per view while training (keeps the object from absorbing the
    background), ``eval_color`` otherwise. Uses the global torch RNG, which the trainer seeds
    per step."""

    @dataclass
    class Config:
        eval_color: List[float] = field(default_factory=lambda: [1.0, 1.0, 1.0])

        def __post_init__(self):
            _check_color(self.eval_color)

    def __init__(self, cfg: "RandomBackground.Config" = None, device=None):
        super().__init__()
        cfg = cfg or RandomBackground.Config()
        self.register_buffer("eval_color", torch.tensor(cfg.eval_color, device=device))

    def forward(self, dirs: Tensor) -> Tensor:
        if not self.training:
            return self.eval_color.to(dirs).expand(*dirs.shape[:-1], 3)
        colors = torch.rand(dirs.shape[0], 3).to(dirs)
        return colors.view(-1, *([1] * (dirs.dim() - 2)), 3).expand(*dirs.shape[:-1], 3)


@register("background", "environment")
class EnvironmentBackground(Background):
    """A learned environment map: a small MLP of the view direction (threestudio's
    neural-environment-map background)."""

    param_group_names = ("background",)

    @dataclass
    class Config:
        hidden: int = 32
        frequencies: int = 4           # sin/cos frequencies of the direction encoding

        def __post_init__(self):
            if self.hidden < 1 or self.frequencies < 0:
                raise ConfigError("hidden must be >= 1 and frequencies >= 0")

    def __init__(self, cfg: "EnvironmentBackground.Config" = None, device=None):
        super().__init__()
        cfg = cfg or EnvironmentBackground.Config()
        self.frequencies = cfg.frequencies
        n_in = 3 + 6 * cfg.frequencies
        self.mlp = nn.Sequential(nn.Linear(n_in, cfg.hidden), nn.ReLU(),
                                 nn.Linear(cfg.hidden, 3)).to(device)

    def forward(self, dirs: Tensor) -> Tensor:
        feats = [dirs]
        for i in range(self.frequencies):
            feats += [torch.sin((2.0 ** i) * torch.pi * dirs), torch.cos((2.0 ** i) * torch.pi * dirs)]
        return torch.sigmoid(self.mlp(torch.cat(feats, dim=-1)))
