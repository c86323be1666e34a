"""Base classes every plugin kind derives from, and the values the trainer hands them.

A plugin is a class with a nested ``Config`` dataclass (its defaults are the plugin's
defaults; ``__post_init__`` raises :class:`engine.errors.ConfigError` for impossible values)
and a constructor ``__init__(cfg, device=..., **context)``. The trainer builds plugins through
:func:`engine.config.build`, which validates the user's mapping against ``Config``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import torch
from torch import Tensor, nn

from engine.cameras import Cameras


@dataclass(frozen=True)
class StepInfo:
    """Where the trainer is. Schedules are evaluated on ``step`` (the step within the stage)."""

    stage: str
    stage_index: int
    step: int
    stage_steps: int
    global_step: int


@dataclass
class ReferenceImage:
    """The input picture after loading (see :mod:`engine.images`)."""

    rgb: Tensor        # [H, W, 3] in [0, 1], background composited to white
    mask: Tensor       # [H, W, 1] in [0, 1], 1 on the object
    path: str

    def to(self, device) -> "ReferenceImage":
        return ReferenceImage(self.rgb.to(device), self.mask.to(device), self.path)

    @property
    def rgba(self) -> Tensor:
        return torch.cat([self.rgb, self.mask], dim=-1)


@dataclass
class RunInputs:
    """What the user gave the run: an image, a prompt, or both."""

    image: Optional[ReferenceImage] = None
    prompt: Optional[str] = None


class Background(nn.Module):
    """Colour seen where rays leave the scene.

    ``forward(dirs [B, H, W, 3] unit world directions) -> rgb [B, H, W, 3]``.
    """

    #: names :meth:`param_groups` can return (validated against a recipe's learning rates)
    param_group_names: Tuple[str, ...] = ()

    def param_groups(self) -> Dict[str, List[nn.Parameter]]:
        params = [p for p in self.parameters() if p.requires_grad]
        return {"background": params} if params else {}


class Representation(nn.Module):
    """A 3D representation with its differentiable renderer.

    Subclasses implement :meth:`render` and :meth:`param_groups`; the others are optional.
    The module's ``state_dict`` is what a checkpoint stores, so frozen models never belong
    to a representation.

    Optional class attributes let a recipe be checked before anything runs:
    ``param_group_names`` (the keys :meth:`param_groups` returns) and ``loss_names`` (the keys
    :meth:`regularizers` can return). ``None`` means "not declared".
    """

    param_group_names: Optional[Tuple[str, ...]] = None
    loss_names: Optional[Tuple[str, ...]] = None

    def render(self, cameras: Cameras, height: int, width: int, *, background: Background,
               step: StepInfo) -> Dict[str, Tensor]:
        """Render B cameras.

        Returns at least ``rgb`` [B, H, W, 3] (composited over ``background``, in [0, 1])
        and ``opacity`` [B, H, W, 1]; optionally ``depth`` [B, H, W, 1] and ``normal``
        [B, H, W, 3] (world space, in [-1, 1]). Differentiable with respect to the
        representation's parameters (and the background's).
        """
        raise NotImplementedError

    def param_groups(self) -> Dict[str, List[nn.Parameter]]:
        """Trainable parameters by optimiser-group name (learning rates are set per name)."""
        raise NotImplementedError

    def regularizers(self, outputs: Dict[str, Tensor], step: StepInfo) -> Dict[str, Tensor]:
        """Named regulariser losses for the last render; weighted by the stage's ``losses``."""
        return {}

    def before_step(self, step: StepInfo) -> None:
        """Called before each training step (e.g. to refresh an occupancy grid)."""

    # Optional hooks for representations whose parameters change size during training
    # (Gaussians densify and prune). The trainer calls ``after_step(step, optimizer)``, when
    # a representation defines it, after every optimiser step that was applied; it may swap
    # in new parameters of other sizes, editing the optimiser's groups and per-parameter
    # state to match (the trainer re-reads the parameters from the optimiser's groups).
    # Before a checkpoint is loaded it calls ``prepare_state(state)`` (the representation's
    # tensors in the checkpoint, by state_dict key), so the parameters can take the
    # checkpoint's sizes first.
    def prepare_state(self, state: Dict[str, Tensor]) -> None:
        """Make the parameters fit ``state``'s sizes before it is loaded (default: nothing)."""

    def surface(self, resolution: int) -> Tuple[Tensor, Tensor]:
        """The object's surface as a triangle mesh, for export.

        Returns vertices [V, 3] (world space, float) and faces [F, 3] (long, counter-clockwise
        seen from outside). ``resolution`` is the extraction grid size where one is used.
        """
        raise NotImplementedError(f"{type(self).__name__} cannot export a mesh")

    def albedo(self, points: Tensor) -> Tensor:
        """Unshaded colour [N, 3] in [0, 1] at world points [N, 3] (texture baking)."""
        raise NotImplementedError(f"{type(self).__name__} has no colour field")

    @classmethod
    def create_from(cls, previous: "Representation", cfg, device=None) -> "Representation":
        """Build this representation initialised from another stage's (e.g. DMTet from NeRF)."""
        from engine.errors import ConfigError
        raise ConfigError(
            f"representation '{getattr(cls, 'registry_name', cls.__name__)}' cannot be created "
            f"from '{getattr(previous, 'registry_name', type(previous).__name__)}'; remove "
            "init_from from the stage or choose a compatible representation"
        )


class Guidance(nn.Module):
    """A source of losses on renders (score distillation, reference-image losses, ...).

    ``forward(outputs, cameras, step) -> {name: scalar loss}``. Frozen models live here, never
    in the representation; gradients must reach the renders only.

    ``loss_names`` (class attribute) lists the losses it can return, so recipes are checked at
    load time. An optional classmethod ``preflight(cfg, key)`` runs before the first stage
    starts (``key`` is where its settings live, e.g. ``stages.nerf.guidance``): check there
    that weights exist, so a run fails at once rather than mid-way.
    """

    loss_names: Optional[Tuple[str, ...]] = None

    def forward(self, outputs: Dict[str, Tensor], cameras: Cameras,
                step: StepInfo) -> Dict[str, Tensor]:
        raise NotImplementedError

    def before_step(self, step: StepInfo) -> None:
        """Called before each training step."""
