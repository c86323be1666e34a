"""Triplane feature fields: three axis-aligned feature planes sampled bilinearly, plus the
small decoders the ``triplane`` representation and its distillation use.

Planes are one tensor ``[3, C, R, R]``: plane 0 is xy, 1 is xz, 2 is yz. A world point
``p`` in the cube [-bound, bound]^3 is projected onto each plane (dropping z, y and x) and
the plane's features are read there with :func:`torch.nn.functional.grid_sample`
(``mode="bilinear"``, ``align_corners=True``, ``padding_mode="border"``).

``align_corners=True`` means the normalised coordinates -1 and +1 fall on the *centres* of
the first and last texels, so a plane's R x R texels are the nodes of a regular grid that
spans exactly [-bound, bound]^2 (texel spacing ``2 bound / (R - 1)``), as the voxel grid's
nodes do; a point on the cube's face reads the border texel itself, not a blend with the
zero padding. Axis convention of ``grid_sample``: the grid's last dimension is (x, y) =
(width index, height index), so plane ``[c, v, u]`` holds the feature at (u, v) =
(first, second) coordinate of the projection: (x, y) for xy, (x, z) for xz, (y, z) for yz.

Combining the three features (``combine``):
  * ``sum`` (the default, EG3D's aggregation): ``f_xy + f_xz + f_yz``, C numbers. The decoder
    input does not grow with the planes, a feature written into one plane acts the same
    wherever it is read, and a localised blob needs the decoder to threshold the sum (the
    MLP does that). Distils and trains well at the toy sizes.
  * ``concat``: ``[f_xy, f_xz, f_yz]``, 3C numbers; the decoder can tell the planes apart
    (more expressive, 3x the first layer), at the cost of more decoder parameters.
  * ``product`` (K-planes' Hadamard product): ``f_xy * f_xz * f_yz``, C numbers; localises
    on its own but its gradients vanish where any plane is near zero, so it needs a
    non-zero initialisation (``init_std`` around 1 or a constant offset).

Everything here is differentiable with respect to the planes, the decoder weights and the
points (``grid_sample`` supports double backward, which the autograd normals use).
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

PLANE_NAMES = ("xy", "xz", "yz")
PLANE_AXES = ((0, 1), (0, 2), (1, 2))
COMBINES = ("sum", "concat", "product")


def project(points: Tensor, bound: float) -> Tensor:
    """Normalised plane coordinates [3, N, 2] of world points [N, 3] (in [-1, 1] inside the
    cube of half-size ``bound``), in the order xy, xz, yz."""
    q = points / bound
    return torch.stack([q[:, list(axes)] for axes in PLANE_AXES], dim=0)


def sample_planes(planes: Tensor, points: Tensor, bound: float) -> Tensor:
    """Bilinear features of the three planes [3, C, R, R] at points [N, 3] -> [3, N, C].
    Points outside the cube read the border texels (``padding_mode="border"``)."""
    grid = project(points, bound).to(planes.dtype)[:, :, None, :]        # [3, N, 1, 2]
    feats = F.grid_sample(planes, grid, mode="bilinear", padding_mode="border",
                          align_corners=True)                             # [3, C, N, 1]
    return feats[..., 0].permute(0, 2, 1)


def combine(features: Tensor, mode: str) -> Tensor:
    """Per-plane features [3, N, C] -> decoder input [N, D] (D = C, or 3C for concat)."""
    if mode == "sum":
        return features.sum(dim=0)
    if mode == "concat":
        return features.permute(1, 0, 2).reshape(features.shape[1], -1)
    if mode == "product":
        return features[0] * features[1] * features[2]
    raise ValueError(f"combine '{mode}' is not one of {', '.join(COMBINES)}")


def feature_dim(channels: int, mode: str) -> int:
    return 3 * channels if mode == "concat" else channels


def total_variation(planes: Tensor) -> Tensor:
    """Mean squared difference between neighbouring texels of the planes [3, C, R, R] (both
    directions), a scalar; differentiable w.r.t. the planes."""
    du = (planes[..., :, 1:] - planes[..., :, :-1]).pow(2).mean()
    dv = (planes[..., 1:, :] - planes[..., :-1, :]).pow(2).mean()
    return du + dv


class Decoder(nn.Module):
    """ReLU MLP with biases: ``n_in -> hidden (x n_hidden_layers) -> n_out``."""

    def __init__(self, n_in: int, hidden: int, n_out: int, n_hidden_layers: int = 1):
        super().__init__()
        dims: Sequence[int] = [n_in] + [hidden] * n_hidden_layers + [n_out]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:]))

    def forward(self, x: Tensor) -> Tensor:
        for layer in self.layers[:-1]:
            x = F.relu(layer(x))
        return self.layers[-1](x)


class TriplaneColorField(nn.Module):
    """Albedo field ``forward(points [N, 3]) -> [N, 3]`` in [0, 1] from planes and a colour
    decoder: the shape DMTet's ``create_from`` deep-copies as its colour field. Holds the
    planes as a parameter (shared with the triplane it came from until copied)."""

    def __init__(self, planes: nn.Parameter, mlp: Decoder, bound: float, mode: str):
        super().__init__()
        self.planes = planes
        self.mlp = mlp
        self.bound, self.mode = float(bound), mode

    def forward(self, points: Tensor) -> Tensor:
        enc = combine(sample_planes(self.planes, points, self.bound), self.mode)
        return torch.sigmoid(self.mlp(enc))
