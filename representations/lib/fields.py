"""Small neural fields shared by the representations: a bias-free ReLU MLP with a closed-form
input gradient, and the albedo field (hash grid + MLP) that NeRF owns and DMTet inherits."""

from __future__ import annotations

from typing import Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from representations.lib.encodings import HashGridConfig, HashGridEncoding


class MLP(nn.Module):
    """ReLU MLP without biases (as tinycudann's fully fused MLP that threestudio uses):
    ``n_in -> hidden (x n_hidden_layers) -> n_out``."""

    def __init__(self, n_in: int, hidden: int, n_out: int, n_hidden_layers: int = 1):
        super().__init__()
        dims = [n_in] + [hidden] * n_hidden_layers + [n_out]
        self.layers = nn.ModuleList(nn.Linear(a, b, bias=False) for a, b in zip(dims[:-1], dims[1:]))

    def forward(self, x: Tensor) -> Tensor:
        for layer in self.layers[:-1]:
            x = F.relu(layer(x))
        return self.layers[-1](x)

    def forward_with_input_grad(self, x: Tensor) -> Tuple[Tensor, Tensor]:
        """For a scalar-output MLP: out [N] and d out / d x [N, n_in], in closed form.
        Both differentiable with respect to the weights and ``x`` (first-order graph)."""
        pre = []
        h = x
        for layer in self.layers[:-1]:
            z = layer(h)
            pre.append(z)
            h = F.relu(z)
        out = self.layers[-1](h)[:, 0]
        g = self.layers[-1].weight[0].expand(x.shape[0], -1)
        for layer, z in zip(reversed(self.layers[:-1]), reversed(pre)):
            g = (g * (z > 0).to(g.dtype)) @ layer.weight
        return out, g


class ColorField(nn.Module):
    """Albedo field: its own hash grid and MLP, ``forward(points [N, 3]) -> albedo [N, 3]`` in
    [0, 1] (sigmoid). Self-contained, so DMTet can deep-copy the NeRF's colour branch.
    Differentiable with respect to its parameters and the points."""

    def __init__(self, encoding: HashGridConfig = None, hidden: int = 64,
                 n_hidden_layers: int = 1, bound: float = 1.0):
        super().__init__()
        self.encoding = HashGridEncoding(encoding or HashGridConfig(), bound)
        self.mlp = MLP(self.encoding.output_dim, hidden, 3, n_hidden_layers)

    def from_encoded(self, enc: Tensor) -> Tensor:
        """Albedo [N, 3] from this field's encoding of the points [N, D]."""
        return torch.sigmoid(self.mlp(enc))

    def forward(self, points: Tensor) -> Tensor:
        return self.from_encoded(self.encoding(points))
