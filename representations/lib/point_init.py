"""Starting a representation from a coloured point cloud (``init: point_cloud``).

One settings block, ``point_cloud:``, shared by the NeRF, DMTet and Gaussians
(:class:`PointCloudInit`); :func:`load_init_cloud` turns it into a cloud [N, 6] in the engine's
world (z up; xyz, rgb in [0, 1]) from

* a file, ``source: cloud.ply`` (or ``.npy``, [N, 3] / [N, 6]), taken as given in the
  engine's world frame (what ``python -m guidance.pointcloud.sample`` writes), or
* a point model, ``source: model:FOLDER`` (``model:models/toy/pointe``), sampled at the start
  of the stage from the run's picture (``image:``; recipes write ``image: ${inputs.image}``),
  with the model's own picture preparation and sampler (``steps``, ``guidance_scale``,
  ``points``, ``seed`` override it).

``scale`` and ``yaw`` (degrees about z) then adjust the cloud. What each representation makes
of it:

* Gaussians (GaussianDreamer's noisy point growing): ``count`` Gaussians, the cloud's points
  and new points drawn uniformly within ``shell`` of random cloud points, with the colour of
  their cloud point perturbed by ``color_noise``; :func:`grow_shell`.
* NeRF and DMTet (a smooth occupancy): the cloud is voxelised on a ``resolution``^3 grid, its
  cells closed over gaps of ``close`` cells and its inside filled
  (:func:`cloud_sdf_grid`): a signed distance (negative inside) that DMTet takes as its SDF and
  the NeRF as its density bias ``density * tanh(-sdf / band)`` in place of the blob; their
  colour field is fitted to the cloud's colours for ``color_steps`` steps
  (:func:`fit_color_field`).

A file that is not a cloud (missing, unreadable, wrong shape, empty, NaN) is one
:class:`engine.errors.InputError` line, and a ``model:`` source without a picture or weights
one :class:`engine.errors.ConfigError` / UserError line, both exit code 2.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Callable, Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from engine.errors import ConfigError

MODEL_PREFIX = "model:"


@dataclass
class PointCloudInit:
    """The ``point_cloud:`` block of a representation with ``init: point_cloud``."""

    source: Optional[str] = None     # PATH.ply | PATH.npy | model:FOLDER
    image: Optional[str] = None      # the picture a model: source reads (${inputs.image})
    seed: int = 0                    # model: the sampler's seed
    steps: int = 0                   # model: sampler steps (0: the model's)
    guidance_scale: float = -1.0     # model: guidance (-1: the model's)
    points: int = 0                  # model: points (0: the model's)
    upsampler: Optional[str] = None  # model: an upsample-kind folder (default: the model's)
    scale: float = 1.0               # xyz multiplied by this
    yaw: float = 0.0                 # then turned by this many degrees about z
    # Gaussians
    shell: float = 0.01              # new points within this distance of a cloud point
    color_noise: float = 0.02        # std of the colour perturbation of the new points
    # NeRF / DMTet
    resolution: int = 64             # occupancy grid over the representation's cube
    close: int = 2                   # gaps of this many cells between points are closed
    band: float = 0.03               # NeRF: width of the density's edge (world units)
    density: float = 30.0            # NeRF: density bias deep inside (outside: minus it)
    color_steps: int = 40            # colour field fitted to the cloud's colours (0: not)
    color_lr: float = 0.02

    def __post_init__(self):
        if not self.source:
            raise ConfigError("point_cloud.source: init: point_cloud needs a cloud: a .ply / "
                              ".npy file or model:FOLDER (e.g. model:models/toy/pointe)")
        if self.steps < 0 or self.points < 0:
            raise ConfigError("point_cloud.steps/points: must be >= 0 (0: the model's)")
        if self.guidance_scale < 0 and self.guidance_scale != -1.0:
            raise ConfigError("point_cloud.guidance_scale: must be >= 0 (-1: the model's)")
        if not self.scale > 0 or self.shell < 0 or self.color_noise < 0:
            raise ConfigError("point_cloud.scale must be > 0, shell and color_noise >= 0")
        if not 8 <= self.resolution <= 256 or self.close < 0:
            raise ConfigError(f"point_cloud.resolution: must be in [8, 256] and close >= 0, "
                              f"got {self.resolution}, {self.close}")
        if not self.band > 0 or not self.density > 0:
            raise ConfigError("point_cloud.band and point_cloud.density: must be > 0")
        if self.color_steps < 0 or not self.color_lr > 0:
            raise ConfigError("point_cloud.color_steps must be >= 0 and color_lr > 0")

    @property
    def from_model(self) -> bool:
        return self.source.startswith(MODEL_PREFIX)


def as_init(value, where: str) -> PointCloudInit:
    """A representation's ``point_cloud`` value (None, a mapping already validated, or a
    :class:`PointCloudInit`) -> PointCloudInit; ConfigError naming ``where`` when missing."""
    if isinstance(value, PointCloudInit):
        return value
    if value is None:
        raise ConfigError(f"{where}: init: point_cloud needs point_cloud.source (a .ply / .npy "
                          "file or model:FOLDER)")
    if isinstance(value, dict):
        return PointCloudInit(**value)
    raise ConfigError(f"{where}: expected a mapping, got {type(value).__name__}")


_CACHE: dict = {}


def load_init_cloud(init: PointCloudInit, device=None, log: Callable[[str], None] = None
                    ) -> Tensor:
    """The cloud of ``init`` in the engine's world: [N, 6] float32 (xyz, rgb in [0, 1]),
    after ``scale`` and ``yaw``. Model samples are remembered for the process (a stage built
    again for an export or a resume reuses the same draw; it is seeded anyway)."""
    from engine.datasets.point_clouds import read_cloud, rotate_z

    log = log or (lambda s: print(s, file=sys.stderr))
    if init.from_model:
        key = (init.source, init.image, init.seed, init.steps, init.guidance_scale, init.points,
               init.upsampler, str(device))
        if key not in _CACHE:
            _CACHE.clear()
            _CACHE[key] = _sample_from_model(init, device, log)
        cloud = _CACHE[key].clone()
    else:
        cloud = torch.from_numpy(read_cloud(init.source, "point_cloud.source"))
    cloud[:, :3] = cloud[:, :3] * init.scale
    if init.yaw:
        cloud = rotate_z(cloud, init.yaw)
    return cloud.float()


def start_field_from_cloud(init: PointCloudInit, color_field: torch.nn.Module, device=None,
                           inputs=None) -> Tensor:
    """The shared part of a field's cloud start (NeRF, DMTet): a ``model:`` source with no
    picture of its own samples the run's picture (``inputs.image``); the cloud is loaded and
    the colour field fitted to its colours (seeded by ``init.seed``). Returns the cloud
    [N, 6]; the caller turns it into its own shape (a density bias, an SDF)."""
    import dataclasses

    if init.from_model and not init.image and getattr(inputs, "image", None) is not None:
        init = dataclasses.replace(init, image=inputs.image.path)
    cloud = load_init_cloud(init, device)
    generator = torch.Generator().manual_seed(int(init.seed))
    fit_color_field(color_field, cloud, init.color_steps, init.color_lr, generator=generator)
    return cloud


def _sample_from_model(init: PointCloudInit, device, log) -> Tensor:
    import time

    from guidance.pointcloud.picture import PointCloudModel, describe

    if not init.image:
        raise ConfigError("point_cloud.image: a model: source samples the cloud from the run's "
                          "picture; give image=PATH (recipes set point_cloud.image: "
                          "${inputs.image})")
    t0 = time.perf_counter()
    model = PointCloudModel.load(init.source, device=device, upsampler=init.upsampler)
    picture = model.picture(init.image, log=None)
    cloud = model.cloud(picture.rgb.to(model.base.device), seed=init.seed,
                        steps=init.steps or None,
                        guidance_scale=None if init.guidance_scale < 0 else init.guidance_scale,
                        points=init.points or None)
    log(f"point cloud: {len(cloud)} points from {describe(model)} in "
        f"{time.perf_counter() - t0:.1f} s")
    return cloud


def preflight(init: Optional[PointCloudInit], key: str) -> None:
    """Before anything of a run is written: the cloud file is a cloud, or the point model's
    folder (and its upsampler and conditioner folders) exists and the picture is given; one
    line naming ``key`` otherwise."""
    from pathlib import Path

    from engine.datasets.point_clouds import read_cloud
    from engine.errors import UserError

    if init is None:
        return
    if not init.from_model:
        read_cloud(init.source, f"{key}.point_cloud.source")
        return
    from guidance.pointcloud.picture import PointModelSettings, model_folder
    from guidance.pointcloud.pretrained import WEIGHTS_FILE

    if not init.image:
        raise ConfigError(f"{key}.point_cloud.image: a model: source samples the cloud from "
                          "the run's picture; give image=PATH (recipes set "
                          "point_cloud.image: ${inputs.image})")
    for name, spec in (("source", init.source), ("upsampler", init.upsampler)):
        if spec is None:
            continue
        folder = model_folder(spec)
        if not (folder / WEIGHTS_FILE).is_file():
            raise UserError(f"{key}.point_cloud.{name}: point model {folder} not found (no "
                            f"{WEIGHTS_FILE}); the toy one is models/toy/pointe, a released "
                            "one must be converted: python -m guidance.pointcloud.convert "
                            "CHECKPOINT.pt OUT model=NAME")
        settings = PointModelSettings.read(folder)
        cond = settings.conditioner
        if isinstance(cond, Path) and not cond.is_dir():
            raise UserError(f"{key}.point_cloud.{name}: the conditioner folder {cond} of point "
                            f"model {folder} is missing")


# -- Gaussians ---------------------------------------------------------------------------

def grow_shell(cloud: Tensor, count: int, shell: float = 0.01, color_noise: float = 0.02,
               generator: Optional[torch.Generator] = None) -> Tuple[Tensor, Tensor, Tensor]:
    """GaussianDreamer's point growing: (points [M, 3], colours [M, 3], source index [M]) with
    M = max(count, N): the N cloud points, then new points uniform in balls of radius
    ``shell`` around random cloud points, their colour the source's plus N(0, color_noise)."""
    n = cloud.shape[0]
    extra = max(count - n, 0)
    src = torch.randint(0, n, (extra,), generator=generator)
    d = torch.randn(extra, 3, generator=generator)
    d = d / d.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    r = shell * torch.rand(extra, 1, generator=generator) ** (1.0 / 3.0)
    new = cloud[src, :3] + d * r
    rgb = (cloud[src, 3:6] + color_noise * torch.randn(extra, 3, generator=generator)).clamp(0, 1)
    index = torch.cat([torch.arange(n), src])
    return (torch.cat([cloud[:, :3], new]), torch.cat([cloud[:, 3:6], rgb]), index)


# -- fields --------------------------------------------------------------------------------

def cloud_sdf_grid(points, radius: float, resolution: int = 64, close: int = 2) -> Tensor:
    """A signed distance [R, R, R] (world units, negative inside, indexed x, y, z on the
    vertices of a grid over [-radius, radius]^3) of the solid a surface cloud bounds.

    The cells holding points are grown by ``close`` cells, or the 95th percentile of the
    distances between neighbouring points when that is more (bridging the gaps of a sparse
    cloud) into a shell; a cell is inside when the shell lies on both sides of it along at
    least two of the three axes and on one side along the third (5 of the 6 axis directions:
    a mug's open top or the space under a table stays outside, one ray through a gap does not
    carve a tunnel), and so is every cell the grid's border cannot reach; the solid is then
    shrunk back by ``close`` cells from the outside and joined with the points' own cells
    grown by one (thin parts stay as thin tubes)."""
    from scipy import ndimage

    xyz = np.asarray(points, dtype=np.float64)[:, :3]
    r = resolution
    cell = 2.0 * radius / (r - 1)
    idx = np.round((xyz + radius) / cell).astype(int)
    inside = np.all((idx >= 0) & (idx < r), axis=1)
    occ = np.zeros((r, r, r), dtype=bool)
    occ[tuple(idx[inside].T)] = True
    if not occ.any():
        raise ConfigError("point_cloud: no point of the cloud lies inside the representation's "
                          f"bounds (radius {radius:g}); check point_cloud.scale")
    cross = ndimage.generate_binary_structure(3, 1)
    if close > 0 and len(xyz) > 2:   # a sparser cloud needs wider bridges
        from scipy.spatial import cKDTree

        gap = np.percentile(cKDTree(xyz).query(xyz, k=2)[0][:, 1], 95)
        close = max(close, int(round(gap / cell)))
    shell = ndimage.binary_dilation(occ, cross, iterations=close) if close > 0 else occ
    votes = np.zeros((r, r, r), dtype=np.int8)
    for axis in range(3):
        votes += np.logical_or.accumulate(shell, axis=axis)
        votes += np.flip(np.logical_or.accumulate(np.flip(shell, axis), axis=axis), axis)
    # the outside: what of the rest the grid's border reaches (enclosed voids are inside)
    labels, _ = ndimage.label(~(shell | (votes >= 5)), cross)
    border = np.unique(np.concatenate([labels[[0, -1]].ravel(), labels[:, [0, -1]].ravel(),
                                       labels[:, :, [0, -1]].ravel()]))
    outside = np.isin(labels, border[border > 0])
    if close > 0:                                     # shrink the solid from outside only
        outside = ndimage.binary_dilation(outside, cross, iterations=close)
    solid = ~outside | occ
    outside = ndimage.distance_transform_edt(~solid) * cell
    inner = ndimage.distance_transform_edt(solid) * cell
    # half a cell on either side of the boundary, so the zero level lies between cells
    sdf = np.where(solid, -(inner - 0.5 * cell), outside - 0.5 * cell)
    return torch.from_numpy(sdf.astype(np.float32))


def sdf_with_gradient(sdf: Tensor, radius: float) -> Tensor:
    """[R, R, R] -> [R, R, R, 4]: the SDF and its spatial gradient (central differences, in
    world units), for :func:`lookup_grid` lookups of values and normals."""
    cell = 2.0 * radius / (sdf.shape[0] - 1)
    grads = torch.gradient(sdf, spacing=cell)
    return torch.stack([sdf, *grads], dim=-1)


def lookup_grid(grid: Tensor, points: Tensor, radius: float) -> Tensor:
    """Trilinear lookup of ``grid`` [R, R, R, C] (vertices over [-radius, radius]^3, indexed
    x, y, z) at world points [P, 3] -> [P, C]; the border value outside. Differentiable
    with respect to the points."""
    vol = grid.permute(3, 2, 1, 0)[None]                   # [1, C, z, y, x]
    coords = (points / radius).reshape(1, -1, 1, 1, 3).to(vol.dtype)
    out = F.grid_sample(vol, coords, mode="bilinear", padding_mode="border",
                        align_corners=True)
    return out.reshape(grid.shape[-1], -1).t()


def fit_color_field(field: torch.nn.Module, cloud: Tensor, steps: int = 150, lr: float = 0.01,
                    jitter: float = 0.02, batch: int = 512,
                    generator: Optional[torch.Generator] = None) -> float:
    """Fit a colour field (points [P, 3] -> rgb [P, 3] in [0, 1]) to the cloud's colours at
    its points moved by up to ``jitter`` (so the colour holds around the surface), Adam,
    L2; returns the last loss. The field's parameters keep requires_grad."""
    if steps <= 0:
        return float("nan")
    params = [p for p in field.parameters() if p.requires_grad]
    device = params[0].device
    cloud = cloud.to(device)
    opt = torch.optim.Adam(params, lr=lr)
    loss = torch.zeros(())
    with torch.enable_grad():
        for _ in range(steps):
            pick = torch.randint(0, cloud.shape[0], (batch,), generator=generator).to(device)
            offset = (torch.rand(batch, 3, generator=generator) * 2 - 1).to(device) * jitter
            pred = field(cloud[pick, :3] + offset)
            loss = F.mse_loss(pred, cloud[pick, 3:6])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    for p in params:
        p.grad = None
    return float(loss.detach())


__all__ = ["PointCloudInit", "as_init", "load_init_cloud", "preflight", "grow_shell", "cloud_sdf_grid",
           "sdf_with_gradient", "lookup_grid", "fit_color_field", "MODEL_PREFIX"]
