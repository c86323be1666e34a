"""Compress3D's triplane autoencoder of coloured point clouds (our implementation from the
paper; no code or weights of it are public).

Encoder, for a cloud ``[B, N, 6]`` (xyz in the cube [-bound, bound]^3, rgb in [0, 1]):

1. a per-point MLP lifts every point to ``width`` features;
2. the features are scattered (averaged) into a ``volume``^3 grid (each point into its cell);
   cells no point falls in stay zero, and a count channel says which are empty;
3. a per-cell linear map, then 3D convolutions mix neighbouring cells (``conv3d_layers``
   residual blocks of two 3x3x3 convolutions);
4. the volume is projected to three planes by averaging along z, y and x (xy, xz, yz: the
   order of :mod:`representations.lib.triplane_field`), ``[B, 3, width, V, V]``;
5. a strided 2D convolution (weights shared by the three planes) halves them to the latent
   resolution ``V / 2``, giving the latent's query tokens;
6. the 3D cross-attention: every latent token (3 V^2 / 4 of them, each knowing its plane and
   position by a learnt embedding) attends to all ``V^3`` volume tokens (the cells with their
   positions), so a texel of the xy plane can gather what lies at any height above it -
   what plain axis-averaging blurs away;
7. a 1x1 convolution to the latent's mean and log-variance, ``latent_channels`` each
   (a diagonal Gaussian: the KL term keeps the latent smooth for the latent diffusion).

Decoder: the latent planes ``[B, 3, c, V/2, V/2]`` -> 2D convolutions, upsampled twice by
``upsample`` (nearest + conv) to ``width`` channels at ``V/2 * upsample`` texels -> the
planes are read at query points (bilinear, :func:`~representations.lib.triplane_field.sample_planes`,
summed) -> an MLP to an occupancy logit and rgb. Inside means logit > 0.

The shape embedding (the paper's stage 2 target): the mean of the latent's mean over its
texels per channel and plane, ``[B, 3 c]``, a global code :meth:`shape_embedding` gives.

Shapes are documented per method; everything is differentiable w.r.t. the cloud's colours
and the weights (the scatter is not w.r.t. positions: a cell index is discrete).

Example::

    ae = TriplaneAutoencoder(TriplaneAEConfig(volume=16, width=32, latent_channels=4))
    post = ae.encode(cloud)                  # cloud [B, N, 6] -> posterior
    planes = ae.decode(post.mode())          # [B, 3, 32, 16, 16]
    occ_logit, rgb = ae.query(planes, pts)   # pts [B, Q, 3] -> [B, Q], [B, Q, 3]
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from engine.errors import ConfigError
from guidance.compress3d.folders import build_and_load, read_model_record, save_model_folder
from representations.lib.triplane_field import PLANE_AXES, sample_planes

KIND = "compress3d-triplane-autoencoder"


@dataclass
class TriplaneAEConfig:
    bound: float = 1.0              # the cube the clouds and queries live in (engine units)
    volume: int = 16                # V: the encoder's 3D grid, V^3 cells
    width: int = 32                 # feature channels of points, volume and decoded planes
    conv3d_layers: int = 1          # residual blocks of two 3x3x3 convolutions
    latent_channels: int = 4        # c: the latent is [3, c, V/2, V/2]
    heads: int = 2                  # of the 3D cross-attention
    upsample: int = 2               # decoded planes have V/2 * upsample texels a side
    decoder_hidden: int = 64

    def __post_init__(self):
        if self.volume < 4 or self.volume % 2:
            raise ConfigError("volume must be an even number >= 4")
        if self.width < 1 or self.latent_channels < 1 or self.heads < 1 or \
                self.width % self.heads:
            raise ConfigError("width, latent_channels and heads must be >= 1, and width a "
                              "multiple of heads")
        if self.upsample not in (1, 2, 4) or self.bound <= 0 or self.conv3d_layers < 0:
            raise ConfigError("upsample must be 1, 2 or 4, bound > 0, conv3d_layers >= 0")

    @property
    def latent_resolution(self) -> int:
        return self.volume // 2

    @property
    def latent_shape(self) -> Tuple[int, int, int, int]:
        r = self.latent_resolution
        return (3, self.latent_channels, r, r)


class DiagonalGaussian:
    """The latent posterior: mean and log-variance ``[B, 3, c, r, r]`` (clamped)."""

    def __init__(self, mean: Tensor, logvar: Tensor):
        self.mean, self.logvar = mean, logvar.clamp(-20.0, 10.0)

    def sample(self, generator: torch.Generator = None) -> Tensor:
        noise = torch.randn(self.mean.shape, generator=generator, device=self.mean.device,
                            dtype=self.mean.dtype)
        return self.mean + torch.exp(0.5 * self.logvar) * noise

    def mode(self) -> Tensor:
        return self.mean

    def kl(self) -> Tensor:
        """KL(q || N(0, I)) per sample, averaged over the latent's numbers: [B]."""
        kl = 0.5 * (self.mean.pow(2) + self.logvar.exp() - 1.0 - self.logvar)
        return kl.flatten(1).mean(1)


def scatter_to_volume(points: Tensor, features: Tensor, volume: int, bound: float) -> Tensor:
    """Average point features into the cells of a ``volume``^3 grid over [-bound, bound]^3.

    points [B, N, 3], features [B, N, C] -> [B, C + 1, V, V, V] indexed (x, y, z); the last
    channel is the fraction of the cloud's points in the cell (0: empty). Points outside the
    cube go to the border cells."""
    b, n, c = features.shape
    v = volume
    cell = ((points / bound + 1.0) * 0.5 * v).floor().long().clamp(0, v - 1)   # [B, N, 3]
    index = (cell[..., 0] * v + cell[..., 1]) * v + cell[..., 2]              # [B, N]
    sums = features.new_zeros(b, v ** 3, c)
    sums.scatter_add_(1, index[..., None].expand(-1, -1, c), features)
    counts = features.new_zeros(b, v ** 3)
    counts.scatter_add_(1, index, torch.ones_like(index, dtype=features.dtype))
    mean = sums / counts.clamp_min(1.0)[..., None]
    grid = torch.cat([mean, (counts / n)[..., None]], dim=-1)                  # [B, V^3, C+1]
    return grid.transpose(1, 2).reshape(b, c + 1, v, v, v)


def volume_to_planes(vol: Tensor) -> Tensor:
    """[B, C, V, V, V] (x, y, z) -> the three axis averages [B, 3, C, V, V]: xy (over z), xz
    (over y), yz (over x); plane [c, i, j] has i along the plane's first axis."""
    return torch.stack([vol.mean(dim=4), vol.mean(dim=3), vol.mean(dim=2)], dim=1)


def _planes_for_sampling(planes: Tensor) -> Tensor:
    """Our planes index [first axis, second axis]; grid_sample's [row = second, col = first]:
    transpose the last two dims."""
    return planes.transpose(-1, -2)


class _Residual3d(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.conv1 = nn.Conv3d(width, width, 3, padding=1)
        self.conv2 = nn.Conv3d(width, width, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.conv2(F.silu(self.conv1(F.silu(x))))


class _Residual2d(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.conv1 = nn.Conv2d(width, width, 3, padding=1)
        self.conv2 = nn.Conv2d(width, width, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.conv2(F.silu(self.conv1(F.silu(x))))


class TriplaneAutoencoder(nn.Module):
    """See the module docstring."""

    def __init__(self, config: TriplaneAEConfig = None):
        super().__init__()
        self.config = c = config or TriplaneAEConfig()
        w, v, r = c.width, c.volume, c.latent_resolution
        self.point_mlp = nn.Sequential(nn.Linear(6, w), nn.SiLU(), nn.Linear(w, w))
        self.volume_in = nn.Conv3d(w + 1, w, 1)       # per cell; the blocks mix neighbours
        self.volume_blocks = nn.Sequential(*[_Residual3d(w) for _ in range(c.conv3d_layers)])
        self.down = nn.Conv2d(w, w, 3, stride=2, padding=1)
        self.query_pos = nn.Parameter(torch.randn(3, r * r, w) * 0.02)
        self.volume_pos = nn.Parameter(torch.randn(v ** 3, w) * 0.02)
        self.norm_q, self.norm_kv = nn.LayerNorm(w), nn.LayerNorm(w)
        self.attention = nn.MultiheadAttention(w, c.heads, batch_first=True)
        self.to_moments = nn.Conv2d(w, 2 * c.latent_channels, 1)
        self.latent_in = nn.Conv2d(c.latent_channels, w, 3, padding=1)
        ups = []
        for _ in range({1: 0, 2: 1, 4: 2}[c.upsample]):
            ups += [nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(w, w, 3, padding=1),
                    _Residual2d(w)]
        self.decoder_planes = nn.Sequential(_Residual2d(w), *ups)
        self.decoder_mlp = nn.Sequential(nn.Linear(w, c.decoder_hidden), nn.SiLU(),
                                         nn.Linear(c.decoder_hidden, c.decoder_hidden),
                                         nn.SiLU(), nn.Linear(c.decoder_hidden, 4))

    # -- encoder -------------------------------------------------------------------------
    def encode(self, cloud: Tensor) -> DiagonalGaussian:
        """cloud [B, N, 6] (xyz in the cube, rgb in [0, 1]) -> the latent posterior."""
        c = self.config
        if cloud.dim() != 3 or cloud.shape[-1] != 6:
            raise ValueError(f"clouds must be [B, N, 6], got {tuple(cloud.shape)}")
        b = cloud.shape[0]
        xyz = cloud[..., :3]
        feats = self.point_mlp(torch.cat([xyz / c.bound, cloud[..., 3:] * 2 - 1], dim=-1))
        vol = scatter_to_volume(xyz, feats, c.volume, c.bound)          # [B, w + 1, V, V, V]
        vol = self.volume_blocks(self.volume_in(vol))                     # [B, w, V, V, V]
        planes = volume_to_planes(vol)                                    # [B, 3, w, V, V]
        w, v, r = c.width, c.volume, c.latent_resolution
        low = self.down(planes.reshape(b * 3, w, v, v))                   # [3B, w, r, r]
        queries = low.reshape(b, 3, w, r * r).transpose(2, 3) + self.query_pos  # [B, 3, rr, w]
        queries = queries.reshape(b, 3 * r * r, w)
        keys = vol.reshape(b, w, v ** 3).transpose(1, 2) + self.volume_pos       # [B, V^3, w]
        kv = self.norm_kv(keys)
        attended, _ = self.attention(self.norm_q(queries), kv, kv, need_weights=False)
        tokens = queries + attended                                       # [B, 3 rr, w]
        tokens = tokens.reshape(b, 3, r * r, w).transpose(2, 3).reshape(b * 3, w, r, r)
        moments = self.to_moments(tokens).reshape(b, 3, 2 * c.latent_channels, r, r)
        mean, logvar = moments.chunk(2, dim=2)
        return DiagonalGaussian(mean, logvar)

    def shape_embedding(self, latent: Tensor) -> Tensor:
        """The global shape code of latents [B, 3, c, r, r] -> [B, 3 c] (texel means)."""
        return latent.mean(dim=(-1, -2)).flatten(1)

    # -- decoder -------------------------------------------------------------------------
    def decode(self, latent: Tensor) -> Tensor:
        """latent [B, 3, c, r, r] -> feature planes [B, 3, width, R, R] (R = r * upsample)."""
        b, three, ch, r, _ = latent.shape
        x = self.decoder_planes(self.latent_in(latent.reshape(b * three, ch, r, r)))
        return x.reshape(b, 3, x.shape[1], x.shape[2], x.shape[3])

    def query(self, planes: Tensor, points: Tensor) -> Tuple[Tensor, Tensor]:
        """Decoded planes [B, 3, w, R, R] at points [B, Q, 3] -> (occupancy logit [B, Q],
        rgb [B, Q, 3] in [0, 1])."""
        out = []
        for i in range(planes.shape[0]):
            feats = sample_planes(_planes_for_sampling(planes[i]), points[i], self.config.bound)
            out.append(feats.sum(dim=0))                                  # [Q, w]
        h = self.decoder_mlp(torch.stack(out))                            # [B, Q, 4]
        return h[..., 0], torch.sigmoid(h[..., 1:])

    def forward(self, cloud: Tensor, points: Tensor, generator: torch.Generator = None,
                sample: bool = True):
        """Encode, draw (or take the mean of) the latent, decode, query: (occupancy logit,
        rgb, posterior)."""
        posterior = self.encode(cloud)
        latent = posterior.sample(generator) if sample else posterior.mode()
        logit, rgb = self.query(self.decode(latent), points)
        return logit, rgb, posterior

    # -- folders -------------------------------------------------------------------------
    def save_pretrained(self, folder, extra: dict = None) -> Path:
        return save_model_folder(self, folder, KIND, self.config, extra)

    @classmethod
    def from_pretrained(cls, folder, key: str = "model") -> "TriplaneAutoencoder":
        """Load a folder :meth:`save_pretrained` wrote; anything else is one line."""
        record = read_model_record(folder, KIND, "triplane autoencoder",
                                   "train one with python -m guidance.training "
                                   "recipe=toy-triplane-ae", key)
        return build_and_load(cls, TriplaneAEConfig, record, folder, key)


def occupancy_grid_points(resolution: int, bound: float) -> Tensor:
    """The node positions of a resolution^3 grid spanning [-bound, bound]^3, [R^3, 3],
    x slowest (so ``.reshape(R, R, R)`` of per-node values indexes (x, y, z))."""
    axis = torch.linspace(-bound, bound, resolution)
    return torch.stack(torch.meshgrid(axis, axis, axis, indexing="ij"), dim=-1).reshape(-1, 3)


@torch.no_grad()
def decode_mesh(model: TriplaneAutoencoder, latent: Tensor, resolution: int = 64,
                chunk: int = 65536):
    """One latent [3, c, r, r] -> a trimesh.Trimesh with vertex colours (marching cubes of
    the occupancy logit at 0 on a ``resolution``^3 grid over the cube), or None when the
    decoded field is empty or full."""
    import numpy as np
    import trimesh
    from skimage.measure import marching_cubes

    bound = model.config.bound
    planes = model.decode(latent[None])
    pts = occupancy_grid_points(resolution, bound)
    logits = torch.cat([model.query(planes, p[None])[0][0] for p in pts.split(chunk)])
    field = logits.reshape(resolution, resolution, resolution).numpy()
    if field.max() <= 0 or field.min() >= 0:
        return None
    spacing = 2 * bound / (resolution - 1)
    verts, faces, _, _ = marching_cubes(field, level=0.0, spacing=(spacing,) * 3)
    verts = verts - bound
    rgb = model.query(planes, torch.from_numpy(verts).float()[None])[1][0].numpy()
    colours = np.concatenate([np.clip(rgb * 255, 0, 255), np.full((len(rgb), 1), 255)], 1)
    # marching_cubes orients faces for a field rising inwards: keep its winding outward
    return trimesh.Trimesh(verts, faces[:, ::-1], vertex_colors=colours.astype(np.uint8),
                           process=False)


__all__ = ["TriplaneAEConfig", "TriplaneAutoencoder", "DiagonalGaussian", "scatter_to_volume",
           "volume_to_planes", "decode_mesh", "occupancy_grid_points", "PLANE_AXES"]
