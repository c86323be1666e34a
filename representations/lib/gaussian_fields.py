"""Gaussians as fields and files: initial scales from neighbour spacing, the opacity field on
a grid (for marching cubes) with its colour, and the standard 3DGS ``.ply`` layout.

The opacity field of N Gaussians at a point x is

    D(x) = sum_i o_i exp(-(x - mu_i)^T Sigma_i^{-1} (x - mu_i) / 2),

what the rasteriser integrates along a ray, up to the projection. It is splatted onto grid
vertices Gaussian by Gaussian, each only inside its own box of ``cutoff`` standard
deviations (where the term is above o/e^{cutoff^2/2}), blockwise so memory stays bounded.
The colour field is the D-weighted mean colour ``sum_i w_i c_i / sum_i w_i``.

Nothing here is differentiable: it runs once, for initialisation or export.
"""

from __future__ import annotations

from pathlib import Path
from typing import Tuple

import numpy as np
import torch
from torch import Tensor

from engine.atomic import atomic_write_bytes
from engine.errors import ConfigError

SH_C0 = 0.28209479177387814          # the degree-0 spherical harmonic, 1 / (2 sqrt(pi))


@torch.no_grad()
def neighbour_spacing(points: Tensor, k: int = 3, chunk: int = 1024) -> Tensor:
    """Root mean squared distance [N] from each point [N, 3] to its ``k`` nearest others
    (3DGS's initial scale); brute force in chunks (N^2 / chunk memory)."""
    n = points.shape[0]
    if n <= 1:
        return torch.full((n,), 0.05, device=points.device)
    k = min(k, n - 1)
    out = []
    for i in range(0, n, chunk):
        d2 = torch.cdist(points[i:i + chunk], points).pow(2)
        near = d2.topk(k + 1, dim=1, largest=False).values[:, 1:]          # drop self
        out.append(near.mean(1).clamp_min(1e-10).sqrt())
    return torch.cat(out)


@torch.no_grad()
def splat_to_grid(means: Tensor, cov3d: Tensor, opacities: Tensor, colors: Tensor,
                  resolution: int, radius: float, cutoff: float = 3.0,
                  block: int = 1 << 21) -> Tuple[Tensor, Tensor]:
    """The opacity field ``D`` [R, R, R] and colour field [R, R, R, 3] on the vertices of a
    resolution^3 grid spanning [-radius, radius]^3, indexed (x, y, z) like
    :func:`representations.lib.isosurface.sample_grid`.

    Args:
        means [N, 3], cov3d [N, 3, 3], opacities [N], colors [N, 3] in [0, 1].
        block: most (Gaussian, vertex) pairs evaluated at once.
    """
    dev = means.device
    R = resolution
    step = 2.0 * radius / (R - 1)
    dens = torch.zeros(R ** 3, device=dev)
    rgb = torch.zeros(R ** 3, 3, device=dev)
    if means.shape[0] == 0:
        return dens.reshape(R, R, R), rgb.reshape(R, R, R, 3)
    prec = torch.linalg.inv(cov3d.double()).float()
    half = cutoff * torch.sqrt(torch.diagonal(cov3d, dim1=1, dim2=2).clamp_min(0))  # [N, 3]
    lo = torch.ceil((means - half + radius) / step).clamp(0, R).long()
    hi = torch.floor((means + half + radius) / step).clamp(-1, R - 1).long() + 1
    size = (hi - lo).clamp_min(0)
    count = size.prod(1)
    order = torch.nonzero(count > 0)[:, 0]
    cum = torch.cumsum(count[order], 0)
    start = 0
    while start < len(order):
        # as many Gaussians as fit in one block (at least one)
        base = int(cum[start - 1]) if start else 0
        stop = int(torch.searchsorted(cum, base + block, right=True))
        stop = max(stop, start + 1)
        idx = order[start:stop]
        start = stop
        cnt = count[idx]
        g = torch.repeat_interleave(torch.arange(len(idx), device=dev), cnt)
        local = torch.arange(int(cnt.sum()), device=dev) - (torch.cumsum(cnt, 0) - cnt)[g]
        sz = size[idx][g]
        ix = lo[idx][g, 0] + local // (sz[:, 1] * sz[:, 2])
        iy = lo[idx][g, 1] + (local // sz[:, 2]) % sz[:, 1]
        iz = lo[idx][g, 2] + local % sz[:, 2]
        x = torch.stack([ix, iy, iz], -1).float() * step - radius
        d = x - means[idx][g]
        m = torch.einsum("ni,nij,nj->n", d, prec[idx][g], d)
        w = opacities[idx][g] * torch.exp(-0.5 * m)
        flat = (ix * R + iy) * R + iz
        dens.index_add_(0, flat, w)
        rgb.index_add_(0, flat, w[:, None] * colors[idx][g])
    rgb = rgb / dens[:, None].clamp_min(1e-8)
    return dens.reshape(R, R, R), rgb.reshape(R, R, R, 3)


def sample_grid_at(grid: Tensor, points: Tensor, radius: float) -> Tensor:
    """Trilinear lookup of ``grid`` [R, R, R, C] (vertices over [-radius, radius]^3, indexed
    x, y, z) at world points [P, 3] -> [P, C]; zero outside."""
    vol = grid.permute(3, 2, 1, 0)[None]                 # [1, C, z, y, x]: grid_sample's order
    coords = (points / radius).reshape(1, -1, 1, 1, 3).to(vol.dtype)
    out = torch.nn.functional.grid_sample(vol, coords, mode="bilinear", padding_mode="zeros",
                                          align_corners=True)
    return out.reshape(grid.shape[-1], -1).t()


class GridColorField(torch.nn.Module):
    """Albedo from a trainable colour grid: ``forward(points [P, 3]) -> [P, 3]`` in [0, 1],
    the sigmoid of trilinearly interpolated logits stored on the vertices of a grid over
    [-radius, radius]^3. Built from an albedo grid [R, R, R, 3] indexed (x, y, z); a colour
    field another representation (DMTet) can deep-copy and train."""

    def __init__(self, rgb: Tensor, radius: float):
        super().__init__()
        self.radius = radius
        self.logits = torch.nn.Parameter(logit(rgb.float()))                 # [R, R, R, 3]

    def forward(self, points: Tensor) -> Tensor:
        return torch.sigmoid(sample_grid_at(self.logits, points, self.radius))


# ---------------------------------------------------------------------------------------
# files
# ---------------------------------------------------------------------------------------

def load_points(path) -> Tuple[Tensor, Tensor]:
    """Points [N, 3] and colours [N, 3] in [0, 1] (grey when the file has none) from a
    ``.npy`` ([N, 3] xyz or [N, 6] xyz + rgb, rgb in [0, 1] or 0-255) or ``.ply`` (points or a
    mesh's vertices, with their colours). Raises ConfigError, one line, for anything else."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"points: no such file: {path}")
    suffix = path.suffix.lower()
    try:
        if suffix == ".npy":
            arr = np.load(path, allow_pickle=False)
        elif suffix == ".ply":
            import trimesh
            loaded = trimesh.load(path, process=False)
            xyz = np.asarray(getattr(loaded, "vertices", np.zeros((0, 3))), dtype=np.float64)
            cols = getattr(getattr(loaded, "visual", None), "vertex_colors", None)
            if cols is None:
                cols = getattr(loaded, "colors", None)
            arr = xyz if cols is None or len(cols) != len(xyz) else \
                np.concatenate([xyz, np.asarray(cols)[:, :3]], 1)
        else:
            raise ConfigError(f"points: {path} is not a point cloud (expected .ply or .npy)")
    except ConfigError:
        raise
    except Exception as exc:
        raise ConfigError(f"points: cannot read {path} as a point cloud "
                          f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})"
                          ) from None
    arr = np.asarray(arr)
    if arr.ndim != 2 or arr.shape[1] not in (3, 6) or arr.shape[0] == 0 or \
            not np.issubdtype(arr.dtype, np.number) or not np.isfinite(arr).all():
        raise ConfigError(f"points: {path} holds {arr.dtype} {list(arr.shape)}; expected a "
                          "finite [N, 3] (xyz) or [N, 6] (xyz + rgb) array with N > 0")
    xyz = torch.from_numpy(arr[:, :3].astype(np.float32))
    if arr.shape[1] == 6:
        rgb = arr[:, 3:].astype(np.float32)
        rgb = rgb / 255.0 if rgb.max() > 1.0 else rgb
        return xyz, torch.from_numpy(rgb).clamp(0.0, 1.0)
    return xyz, torch.full_like(xyz, 0.5)


PLY_FIELDS = (["x", "y", "z", "nx", "ny", "nz", "f_dc_0", "f_dc_1", "f_dc_2", "opacity"]
              + [f"scale_{i}" for i in range(3)] + [f"rot_{i}" for i in range(4)])


def write_3dgs_ply(path, means: Tensor, log_scales: Tensor, quats: Tensor,
                   logit_opacities: Tensor, rgb: Tensor, sh_rest: Tensor = None) -> Path:
    """Write Gaussians in the layout 3DGS viewers read (binary little-endian float32):
    x, y, z, nx, ny, nz (zeros), f_dc_0..2 (degree-0 SH: ``(rgb - 0.5) / SH_C0``),
    f_rest_* (higher SH, channel-major, when given [N, K, 3]), opacity (logit), scale_0..2
    (log), rot_0..3 (quaternion w, x, y, z). Coordinates are the engine's (z up)."""
    n = means.shape[0]
    cols = [means, torch.zeros_like(means), (rgb - 0.5) / SH_C0]
    names = PLY_FIELDS[:9]
    if sh_rest is not None and sh_rest.numel():
        rest = sh_rest.transpose(1, 2).reshape(n, -1)                       # channel-major
        cols.append(rest)
        names = names + [f"f_rest_{i}" for i in range(rest.shape[1])]
    cols += [logit_opacities.reshape(n, 1), log_scales, quats]
    names = names + PLY_FIELDS[9:]
    data = torch.cat([c.detach().float().cpu().reshape(n, -1) for c in cols], 1).numpy()
    header = ["ply", "format binary_little_endian 1.0",
              "comment distill-engine Gaussians, engine frame (z up)",
              f"element vertex {n}"] + [f"property float {name}" for name in names] + \
             ["end_header"]
    path = Path(path)
    # atomic like every file a run writes: a reader never sees half a file, disk full is
    # one line (engine.atomic)
    atomic_write_bytes(path, ("\n".join(header) + "\n").encode("ascii")
                       + np.ascontiguousarray(data, dtype="<f4").tobytes())
    return path


def read_3dgs_ply(path) -> dict:
    """The named float columns of a binary little-endian 3DGS ``.ply`` (for tests and
    round trips): {property name: np.ndarray [N]}."""
    raw = Path(path).read_bytes()
    end = raw.index(b"end_header\n") + len(b"end_header\n")
    lines = raw[:end].decode("ascii").splitlines()
    n = int(next(line.split()[2] for line in lines if line.startswith("element vertex")))
    names = [line.split()[2] for line in lines if line.startswith("property float")]
    data = np.frombuffer(raw[end:], dtype="<f4", count=n * len(names)).reshape(n, len(names))
    return {name: data[:, i] for i, name in enumerate(names)}


def logit(p: Tensor) -> Tensor:
    p = p.clamp(1e-6, 1 - 1e-6)
    return torch.log(p) - torch.log1p(-p)


def random_in_ball(n: int, radius: float, generator=None) -> Tensor:
    """``n`` points uniform in the ball of ``radius`` [n, 3]."""
    d = torch.randn(n, 3, generator=generator)
    d = d / d.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    r = radius * torch.rand(n, 1, generator=generator) ** (1.0 / 3.0)
    return d * r

