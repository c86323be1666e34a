"""Triplane radiance field: three axis-aligned feature planes + a small MLP decoder, volume
rendered exactly as the hash-grid NeRF is (the first part of issue 27, Compress3D).

Field: features of the xy, xz and yz planes ([3, C, R, R], bilinear, ``align_corners=True``,
see :mod:`representations.lib.triplane_field`) read at the point's three projections and
combined (``combine: sum`` by default), then two decoders with the NeRF's conventions:
density ``softplus(density_mlp(f) + blob(x))`` with the Magic3D blob ``blob_density * (1 -
|x| / blob_radius)``, albedo ``sigmoid(color_mlp(f))``. So the NeRF's
``isosurface_threshold``, the export (``surface``, ``albedo``), DMTet's ``create_from``
(``density`` + ``color_field``) and the silhouette level match work unchanged.

Rendering: rays clipped to the bounding sphere, ``samples_per_ray`` stratified bins, samples
in empty cells of an occupancy grid (:class:`representations.lib.occupancy.OccupancyGrid`,
refreshed by ``before_step`` every ``occupancy.update_every`` steps, first at step 0) dropped
before the field is evaluated, shaded per sample (albedo / diffuse / textureless, the NeRF's
schedule) and composited with :mod:`representations.lib.volume`. Normals are minus the
normalised gradient of the pre-activation density, by autograd (``grid_sample`` has a double
backward) or central differences; they are computed in eval renders and in training renders
that shade or when ``orientation_normals`` is true (the NeRF's rule).

Parameter groups: ``planes`` (the feature planes) and ``decoder`` (both MLPs).
Regularisers: ``orientation`` and ``opacity_sparsity`` as the NeRF's, ``plane_tv`` (total
variation of the planes).

``create_from``: a triplane continues a triplane of the same sizes (weights copied); from any
other stage with ``density(points)`` and ``albedo(points)`` (NeRF, voxel grid) it distils the
field: ``distill.steps`` Adam steps fitting ``log1p(density)`` and, weighted by the source's
per-step opacity, the albedo at points drawn uniformly in the cube and jittered in the
source's occupied cells.

``init: compress3d`` starts the planes and decoders from Compress3D's feed-forward result for
the run's picture instead of noise: the ``compress3d:`` block names the model folder, and the
decoded latent's field is distilled as above (:mod:`representations.lib.compress3d_init`).
"""

from __future__ import annotations

import dataclasses
import sys
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from engine.cameras import Cameras
from engine.errors import ConfigError
from engine.plugin import Background, Representation, StepInfo
from engine.registry import register
from representations.lib import volume
from representations.lib.compress3d_init import Compress3DInit
from representations.lib.compress3d_init import as_init as as_compress3d_init
from representations.lib.isosurface import isosurface, sample_grid
from representations.lib.occupancy import OccupancyConfig, OccupancyGrid, jittered_cell_points
from representations.lib.shading import (ShadingConfig, choose_shading, random_light_positions,
                                         shade)
from representations.lib.triplane_field import (COMBINES, Decoder, TriplaneColorField, combine,
                                                feature_dim, sample_planes, total_variation)

NORMAL_MODES = ("autograd", "finite_difference")
INITS = ("random", "compress3d")


@dataclass
class DistillConfig:
    """``create_from`` a non-triplane stage: fit this field to the previous one's."""
    steps: int = 300                  # Adam steps
    points: int = 4096                # points per step (half uniform, half in occupied cells)
    lr: float = 0.01                  # planes; the decoders use lr / 10
    grid: int = 32                    # cells per side of the source's occupancy estimate
    color_weight: float = 1.0         # weight of the opacity-weighted albedo loss
    seed: int = 0

    def __post_init__(self):
        if self.steps < 0:
            raise ConfigError(f"distill.steps: must be >= 0, got {self.steps}")
        if self.points < 2:
            raise ConfigError(f"distill.points: must be >= 2, got {self.points}")
        if not self.lr > 0:
            raise ConfigError(f"distill.lr: must be > 0, got {self.lr}")
        if self.grid < 2:
            raise ConfigError(f"distill.grid: must be >= 2, got {self.grid}")
        if self.color_weight < 0:
            raise ConfigError(f"distill.color_weight: must be >= 0, got {self.color_weight}")


@dataclass
class TriplaneConfig:
    radius: float = 1.0               # bounding sphere; the planes span [-radius, radius]^2
    resolution: int = 64              # texels per side of each plane
    channels: int = 16                # features per texel
    combine: str = "sum"              # sum | concat | product (lib/triplane_field.py)
    init_std: float = 0.1             # planes start as N(0, init_std^2)
    decoder_hidden: int = 32
    decoder_layers: int = 1           # hidden layers of each decoder (density, colour)
    blob_density: float = 10.0
    blob_radius: float = 0.5
    samples_per_ray: int = 64
    occupancy: OccupancyConfig = field(default_factory=OccupancyConfig)
    shading: ShadingConfig = field(default_factory=ShadingConfig)
    normal_mode: str = "autograd"     # autograd | finite_difference
    finite_difference_eps: float = 0.01
    orientation_normals: bool = True  # normals in every training render (as the NeRF)
    composite_backend: str = "auto"   # auto | torch | nerfacc
    isosurface_threshold: float = 25.0
    eval_chunk_rays: int = 4096
    distill: DistillConfig = field(default_factory=DistillConfig)
    # random (planes ~ N(0, init_std^2)) | compress3d (distilled to Compress3D's feed-forward
    # triplane for the picture: the compress3d block, representations/lib/compress3d_init.py)
    init: str = "random"
    compress3d: Optional[Compress3DInit] = None

    def __post_init__(self):
        if self.init not in INITS:
            raise ConfigError(f"init: '{self.init}' is not one of {', '.join(INITS)}")
        if self.init == "compress3d" or self.compress3d is not None:
            self.compress3d = as_compress3d_init(self.compress3d)
        if isinstance(self.occupancy, dict):
            self.occupancy = OccupancyConfig(**self.occupancy)
        if isinstance(self.distill, dict):
            self.distill = DistillConfig(**self.distill)
        if not self.radius > 0:
            raise ConfigError(f"radius: must be > 0, got {self.radius}")
        if self.resolution < 2:
            raise ConfigError(f"resolution: must be >= 2 texels per side, got {self.resolution}")
        if self.channels < 1:
            raise ConfigError(f"channels: must be >= 1, got {self.channels}")
        if self.combine not in COMBINES:
            raise ConfigError(f"combine: '{self.combine}' is not one of {', '.join(COMBINES)}")
        if self.init_std < 0:
            raise ConfigError(f"init_std: must be >= 0, got {self.init_std}")
        if self.decoder_hidden < 1 or self.decoder_layers < 1:
            raise ConfigError(f"decoder_hidden/decoder_layers: must be >= 1, got "
                              f"{self.decoder_hidden}, {self.decoder_layers}")
        if not self.blob_radius > 0:
            raise ConfigError(f"blob_radius: must be > 0, got {self.blob_radius}")
        if self.samples_per_ray < 1:
            raise ConfigError(f"samples_per_ray: must be >= 1, got {self.samples_per_ray}")
        if self.normal_mode not in NORMAL_MODES:
            raise ConfigError(f"normal_mode: '{self.normal_mode}' is not one of "
                              f"{', '.join(NORMAL_MODES)}")
        if not self.finite_difference_eps > 0:
            raise ConfigError(f"finite_difference_eps: must be > 0, got "
                              f"{self.finite_difference_eps}")
        if self.composite_backend not in volume.BACKENDS:
            raise ConfigError(f"composite_backend: '{self.composite_backend}' is not one of "
                              f"{', '.join(volume.BACKENDS)}")
        if self.eval_chunk_rays < 1:
            raise ConfigError(f"eval_chunk_rays: must be >= 1, got {self.eval_chunk_rays}")


def _step_number(step: Union[StepInfo, int, None]) -> int:
    if step is None:
        return 0
    return int(step.step) if isinstance(step, StepInfo) else int(step)


def _normalize(v: Tensor) -> Tensor:
    return v / v.norm(dim=-1, keepdim=True).clamp_min(1e-12)


@register("representation", "triplane")
class Triplane(Representation):
    """Three feature planes + MLP decoders (density with the NeRF's blob, sigmoid albedo),
    volume rendered with occupancy skipping and optional diffuse shading."""

    Config = TriplaneConfig
    param_group_names = ("planes", "decoder")
    loss_names = ("orientation", "opacity_sparsity", "plane_tv")

    def __init__(self, cfg: TriplaneConfig = None, device=None, inputs=None):
        super().__init__()
        self.cfg = cfg = cfg or TriplaneConfig()
        r, c = cfg.resolution, cfg.channels
        self.planes = nn.Parameter(torch.randn(3, c, r, r, device=device) * cfg.init_std)
        d = feature_dim(c, cfg.combine)
        self.density_mlp = Decoder(d, cfg.decoder_hidden, 1, cfg.decoder_layers).to(device)
        self.color_mlp = Decoder(d, cfg.decoder_hidden, 3, cfg.decoder_layers).to(device)
        oc = cfg.occupancy
        self.occupancy = OccupancyGrid(oc.resolution, cfg.radius, oc.threshold, oc.decay,
                                       oc.dilate, device=device)
        if cfg.init == "compress3d":
            from representations.lib.compress3d_init import start_from_compress3d

            start_from_compress3d(self, cfg.compress3d, distill, device, inputs)

    @classmethod
    def preflight(cls, cfg, key: str) -> None:
        """Before the run writes anything: an ``init: compress3d`` start's model folder is a
        Compress3D model and the run has a picture (one line otherwise)."""
        if cfg.init == "compress3d":
            from representations.lib.compress3d_init import preflight

            preflight(cfg.compress3d, key)

    # -- fields ---------------------------------------------------------------------------
    @property
    def color_field(self) -> TriplaneColorField:
        """The albedo branch as a self-contained module (planes + colour decoder, shared with
        this triplane): what DMTet's ``create_from`` deep-copies."""
        return TriplaneColorField(self.planes, self.color_mlp, self.cfg.radius, self.cfg.combine)

    def features(self, points: Tensor) -> Tensor:
        """Combined plane features [N, D] at world points [N, 3]."""
        return combine(sample_planes(self.planes, points, self.cfg.radius), self.cfg.combine)

    def blob(self, points: Tensor) -> Tensor:
        return self.cfg.blob_density * (1.0 - points.norm(dim=-1) / self.cfg.blob_radius)

    def _pre_density(self, points: Tensor, feats: Tensor = None) -> Tensor:
        if feats is None:
            feats = self.features(points)
        return self.density_mlp(feats)[:, 0] + self.blob(points)

    def density(self, points: Tensor) -> Tensor:
        """sigma [N] >= 0 at world points [N, 3]. Differentiable w.r.t. parameters and points."""
        return F.softplus(self._pre_density(points))

    def albedo(self, points: Tensor) -> Tensor:
        """Albedo [N, 3] in [0, 1] at world points [N, 3]."""
        return torch.sigmoid(self.color_mlp(self.features(points)))

    def field(self, points: Tensor, need_normals: bool) -> Dict[str, Tensor]:
        """Density [N], albedo [N, 3] and, with ``need_normals``, unit outward normals [N, 3]
        (differentiable w.r.t. the parameters, normals included)."""
        if need_normals and self.cfg.normal_mode == "autograd":
            with torch.enable_grad():
                pts = points.detach().requires_grad_(True)
                feats = self.features(pts)
                pre = self._pre_density(pts, feats)
                (grad,) = torch.autograd.grad(pre.sum(), pts, create_graph=True)
            normal = -_normalize(grad)
        else:
            feats = self.features(points)
            pre = self._pre_density(points, feats)
            normal = self._fd_normals(points) if need_normals else None
        out = {"density": F.softplus(pre), "albedo": torch.sigmoid(self.color_mlp(feats))}
        if normal is not None:
            out["normal"] = normal
        return out

    def _fd_normals(self, points: Tensor) -> Tensor:
        eps = self.cfg.finite_difference_eps
        offsets = torch.eye(3, dtype=points.dtype, device=points.device) * eps
        shifted = torch.cat([points[:, None] + offsets, points[:, None] - offsets], dim=1)
        pre = self._pre_density(shifted.reshape(-1, 3)).reshape(-1, 2, 3)
        return -_normalize(pre[:, 0] - pre[:, 1])

    # -- rendering ------------------------------------------------------------------------
    def render(self, cameras: Cameras, height: int, width: int, *, background: Background,
               step: Union[StepInfo, int, None] = None) -> Dict[str, Tensor]:
        """rgb [B, H, W, 3] (shaded, over ``background``), albedo, opacity, depth [B, H, W, 1],
        normal [B, H, W, 3] (zeros when not computed) and, in training renders with normals,
        ``orientation`` [B, H, W, 1]. The shading mode used is left in ``last_shading``."""
        cfg = self.cfg
        b = len(cameras)
        origins, dirs = cameras.rays(height, width)
        mode = choose_shading(cfg.shading, _step_number(step), self.training)
        need_normals = (not self.training) or mode != "albedo" or cfg.orientation_normals
        light = random_light_positions(cameras, cfg.shading) if mode != "albedo" else None
        o, d = origins.reshape(-1, 3), dirs.reshape(-1, 3)
        cam = torch.arange(b, device=o.device).repeat_interleave(height * width)
        chunk = o.shape[0] if self.training else cfg.eval_chunk_rays
        parts = [self._render_rays(o[i:i + chunk], d[i:i + chunk], cam[i:i + chunk], light,
                                   mode, need_normals) for i in range(0, o.shape[0], chunk)]
        out = {k: torch.cat([p[k] for p in parts]) for k in parts[0]}
        out = {k: v.reshape(b, height, width, -1) for k, v in out.items()}
        out["rgb"] = out.pop("rgb_fg") + (1.0 - out["opacity"]) * background(dirs)
        self.last_shading = mode
        if "normal" not in out:
            out["normal"] = torch.zeros_like(out["rgb"])
        if not self.training:
            out.pop("orientation", None)
        return out

    def sample_mask(self, points: Tensor, hit: Tensor) -> Tensor:
        """Which samples [R, S] are evaluated: inside the sphere and in an occupied cell."""
        mask = hit[:, None].expand(points.shape[:2])
        if self.cfg.occupancy.enabled:
            mask = mask & self.occupancy.lookup(points)
        return mask

    def _render_rays(self, o: Tensor, d: Tensor, cam: Tensor, light, mode: str,
                     need_normals: bool) -> Dict[str, Tensor]:
        cfg = self.cfg
        near, far, hit = volume.ray_sphere_bounds(o, d, cfg.radius)
        t0, t1 = volume.stratified_samples(near, far, cfg.samples_per_ray, perturb=self.training)
        n_rays, n_samples = o.shape[0], cfg.samples_per_ray
        mid = 0.5 * (t0 + t1)
        pts = o[:, None, :] + d[:, None, :] * mid[..., None]
        flat = self.sample_mask(pts, hit).reshape(-1).nonzero().squeeze(1)
        p = pts.reshape(-1, 3).index_select(0, flat)
        f = self.field(p, need_normals)
        color = f["albedo"]
        if mode != "albedo":
            ray = flat // n_samples
            to_light = _normalize(light.index_select(0, cam.index_select(0, ray)) - p)
            color = shade(f["albedo"], f["normal"], to_light, mode, cfg.shading.ambient,
                          cfg.shading.diffuse)

        def dense(values: Tensor) -> Tensor:
            full = values.new_zeros((n_rays * n_samples,) + values.shape[1:])
            return full.index_copy(0, flat, values).reshape(n_rays, n_samples, *values.shape[1:])

        weights = volume.weights_from_density(dense(f["density"]), t0, t1, cfg.composite_backend)
        out = {"rgb_fg": volume.composite(weights, dense(color)),
               "opacity": weights.sum(dim=1, keepdim=True),
               "depth": volume.composite(weights, mid[..., None])}
        out["albedo"] = out["rgb_fg"] if mode == "albedo" else volume.composite(
            weights, dense(f["albedo"]))
        if need_normals:
            normal = dense(f["normal"])
            out["normal"] = volume.composite(weights, normal)
            if self.training:
                facing = (normal * d[:, None, :]).sum(-1).clamp_min(0.0)
                out["orientation"] = (weights.detach() * facing ** 2).sum(dim=1, keepdim=True)
        return out

    # -- training hooks -------------------------------------------------------------------
    def param_groups(self) -> Dict[str, List[nn.Parameter]]:
        return {"planes": [self.planes],
                "decoder": list(self.density_mlp.parameters()) + list(self.color_mlp.parameters())}

    def regularizers(self, outputs: Dict[str, Tensor], step) -> Dict[str, Tensor]:
        """``orientation`` and ``opacity_sparsity`` exactly as the NeRF's; ``plane_tv``: mean
        squared difference of neighbouring texels of the planes."""
        opacity = outputs["opacity"]
        orient = outputs.get("orientation")
        return {"orientation": orient.mean() if orient is not None else opacity.new_zeros(()),
                "opacity_sparsity": (opacity ** 2 + 0.01).sqrt().mean(),
                "plane_tv": total_variation(self.planes)}

    def before_step(self, step) -> None:
        """Refresh the occupancy grid every ``occupancy.update_every`` steps (first at 0)."""
        oc = self.cfg.occupancy
        if oc.enabled and _step_number(step) % oc.update_every == 0:
            self.update_occupancy()

    @torch.no_grad()
    def update_occupancy(self) -> None:
        step_size = 2.0 * self.cfg.radius / self.cfg.samples_per_ray
        self.occupancy.update(self.density, step_size)

    # -- export ---------------------------------------------------------------------------
    @torch.no_grad()
    def density_grid(self, resolution: int, chunk: int = 65536) -> Tensor:
        """Density [R, R, R] on the nodes of a regular grid over [-radius, radius]^3."""
        return sample_grid(self.density, resolution, self.cfg.radius, self.planes.device, chunk)

    def surface(self, resolution: int = 128) -> Tuple[Tensor, Tensor]:
        """Marching cubes of the density at ``isosurface_threshold``."""
        try:
            verts, faces = isosurface(self.density_grid(resolution),
                                      self.cfg.isosurface_threshold, self.cfg.radius)
        except ValueError as exc:
            raise RuntimeError(f"{exc}; set isosurface_threshold inside that range") from None
        return verts.to(self.planes.device), faces.to(self.planes.device)

    # -- chaining -------------------------------------------------------------------------
    @classmethod
    def create_from(cls, previous: Representation, cfg: TriplaneConfig = None,
                    device=None) -> "Triplane":
        """A triplane from an earlier stage: a triplane of the same sizes is continued (its
        weights and occupancy grid copied, this stage's other settings); any other stage with
        ``density`` and ``albedo`` is distilled (see the module doc and ``distill``)."""
        cfg = dataclasses.replace(cfg or TriplaneConfig(), init="random")
        if isinstance(previous, Triplane):
            rep = cls(cfg, device=device)
            try:
                rep.load_state_dict(previous.state_dict())
            except RuntimeError as exc:
                detail = str(exc).splitlines()[-1].strip()[:160] if str(exc) else ""
                raise ConfigError("init_from: a triplane continues a triplane of the same "
                                  "resolution, channels, combine, decoder sizes and occupancy "
                                  f"resolution; the two stages' sizes differ ({detail})") from None
            return rep
        if not callable(getattr(previous, "density", None)) or \
                not callable(getattr(previous, "albedo", None)):
            return super().create_from(previous, cfg, device)
        if device is None:
            device = next((p.device for p in previous.parameters()), torch.device("cpu"))
        rep = cls(cfg, device=device)
        losses = distill(rep, previous, cfg.distill)
        if losses:
            print(f"triplane: distilled the previous stage's field in {len(losses)} steps, loss "
                  f"{losses[0]:.4g} -> {losses[-1]:.4g}", file=sys.stderr)
        if cfg.occupancy.enabled:
            rep.update_occupancy()
        return rep


def distill(rep: Triplane, source: nn.Module, dc: DistillConfig) -> List[float]:
    """Fit ``rep`` (planes + decoders) to ``source``'s field in ``dc.steps`` Adam steps; returns
    the loss per step. Loss: ``mean |log1p(sigma_rep) - log1p(sigma_src)|^2`` plus
    ``color_weight * mean(alpha_src * |albedo_rep - albedo_src|^2)``, alpha_src the source's
    opacity over one render step (colour only matters where there is something to see).
    Points: half uniform in the cube, half jittered in the cells (of a ``grid``^3 estimate)
    where the source is occupied. Seeded by ``dc.seed``; leaves ``rep`` in its former mode."""
    radius = rep.cfg.radius
    device = rep.planes.device
    step_size = 2.0 * radius / rep.cfg.samples_per_ray
    g = torch.Generator().manual_seed(int(dc.seed))
    was_training = source.training
    source.eval()

    @torch.no_grad()
    def target(points: Tensor) -> Tuple[Tensor, Tensor]:
        return (source.density(points).reshape(-1).float(),
                source.albedo(points).reshape(-1, 3).float())

    with torch.no_grad():
        centres = jittered_cell_points(dc.grid, radius, device, generator=g)
        occupied_density = target(centres)[0]
        alpha = 1.0 - torch.exp(-occupied_density * step_size)
        occupied = centres[alpha > min(0.01, float(alpha.mean()))]
    cell = 2.0 * radius / dc.grid
    opt = torch.optim.Adam([{"params": [rep.planes], "lr": dc.lr},
                            {"params": list(rep.density_mlp.parameters())
                             + list(rep.color_mlp.parameters()), "lr": dc.lr * 0.1}])
    losses: List[float] = []
    for _ in range(dc.steps):
        n_near = dc.points // 2 if len(occupied) else 0
        uniform = (torch.rand(dc.points - n_near, 3, generator=g) * 2 - 1) * radius
        pick = torch.randint(0, max(len(occupied), 1), (n_near,), generator=g)
        near = occupied[pick.to(device)].cpu() + (torch.rand(n_near, 3, generator=g) - 0.5) * cell
        pts = torch.cat([uniform, near]).to(device)
        sigma, color = target(pts)
        weight = 1.0 - torch.exp(-sigma * step_size)
        loss = (torch.log1p(rep.density(pts)) - torch.log1p(sigma)).square().mean()
        if dc.color_weight > 0:
            loss = loss + dc.color_weight * (weight[:, None]
                                             * (rep.albedo(pts) - color).square()).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    source.train(was_training)
    return losses
