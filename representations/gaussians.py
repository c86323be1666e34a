"""3D Gaussian splatting (Kerbl et al. 2023) as a representation, DreamGaussian-style.

Parameters, one optimiser group each: ``xyz`` means [N, 3], ``scaling`` log scales [N, 3],
``rotation`` quaternions [N, 4] (w, x, y, z; normalised when used), ``opacity`` logits [N]
and ``color`` logits [N, 3] (colour ``sigmoid(raw)``; with ``sh_degree: 1`` three more
degree-1 spherical-harmonic coefficients per channel are added to the logits, so colour
depends on the view direction). Rendering is :mod:`representations.lib.gaussian_raster`
(pure torch, or gsplat on CUDA).

The number of Gaussians changes during training (densify and prune,
:mod:`representations.lib.gaussian_densify`): the trainer calls :meth:`after_step` after
each optimiser step, and :meth:`prepare_state` before loading a checkpoint, which resizes
the parameters to the checkpoint's counts so a run resumes after densification.

Initialisation (``init``): ``sphere`` (``count`` points uniform in a ball of ``init_radius``),
``points`` (a ``.ply`` / ``.npy`` point cloud, ``points: PATH``: one Gaussian per point),
``point_cloud`` (GaussianDreamer's point growing from a cloud file or a point model's sample
of the picture, the ``point_cloud:`` block of :mod:`representations.lib.point_init`: the
cloud's points and new ones within ``shell`` of them up to ``count`` Gaussians, colours
kept and perturbed, each Gaussian as large as its cloud point's spacing), or through
:meth:`create_from` an earlier stage with a density field (a NeRF: its density sampled).

Export: :meth:`surface` is marching cubes of the Gaussians' opacity field at the level whose
silhouette matches their rendered opacity (as DMTet's ``init_level: silhouette``);
:meth:`albedo` the opacity-weighted colour of the nearby Gaussians; :meth:`export_files`
writes the Gaussians themselves as a standard 3DGS ``gaussians.ply``.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import torch
from torch import Tensor, nn

from engine.cameras import Cameras
from engine.errors import ConfigError
from engine.plugin import Background, Representation, StepInfo
from engine.registry import register
from representations.lib import gaussian_fields as fields
from representations.lib.gaussian_densify import (DensifyConfig, accumulate_gradients,
                                                  densify_and_prune, reset_state_rows)
from representations.lib.gaussian_raster import (BACKENDS, covariance_3d,
                                                 quaternion_to_rotation, rasterize_gaussians,
                                                 ray_distance_factor, shortest_axis)
from representations.lib.isosurface import isosurface
from representations.lib.level_match import (best_silhouette_level, ray_opacity_and_peak,
                                             ring_cameras)
from representations.lib.point_init import (PointCloudInit, grow_shell, load_init_cloud,
                                            preflight)

INITS = ("sphere", "points", "point_cloud")
SH_C1 = 0.4886025119029199           # degree-1 spherical harmonics: C1 * (-y, z, -x)


@dataclass
class GaussiansConfig:
    init: str = "sphere"             # sphere | points | point_cloud (create_from ignores it)
    count: int = 5000                # Gaussians at the start (sphere, create_from)
    init_radius: float = 0.5         # the ball the sphere init fills
    points: Optional[str] = None     # .ply / .npy point cloud for init: points
    # init: point_cloud: the cloud (file or model:FOLDER), grown to count Gaussians
    point_cloud: Optional[PointCloudInit] = None
    init_opacity: float = 0.1        # DreamGaussian's
    init_scale: float = 0.0          # world units; 0: from the spacing to 3 nearest points
    sh_degree: int = 0               # 0: RGB; 1: view-dependent colour
    radius: float = 1.0              # bounding sphere (export grid, previews)
    # rasteriser: auto | torch | cpp | gsplat (auto: gsplat on CUDA, the C++ kernel on a CPU)
    backend: str = "auto"
    # normals in training renders too (a stage whose losses use them); eval renders always
    render_normals: bool = False
    densify: DensifyConfig = field(default_factory=DensifyConfig)
    # export: the opacity field's level. silhouette: the level whose silhouettes from 16
    # ring cameras best match the rendered opacity > 0.5; fixed: isosurface_threshold (also
    # the level a DMTet stage created from these Gaussians starts from, with its
    # init_level: fixed)
    surface_level_mode: str = "silhouette"
    isosurface_threshold: float = 0.5

    def __post_init__(self):
        if isinstance(self.densify, dict):
            self.densify = DensifyConfig(**self.densify)
        if self.init not in INITS:
            raise ConfigError(f"init: '{self.init}' is not one of {', '.join(INITS)}")
        if self.init == "points" and not self.points:
            raise ConfigError("points: init: points needs points: PATH (a .ply or .npy file)")
        if self.init == "point_cloud" and self.point_cloud is None:
            raise ConfigError("point_cloud.source: init: point_cloud needs a cloud: a .ply / "
                              ".npy file or model:FOLDER (e.g. model:models/toy/pointe)")
        if isinstance(self.point_cloud, dict):
            self.point_cloud = PointCloudInit(**self.point_cloud)
        if self.count < 1:
            raise ConfigError(f"count: must be >= 1, got {self.count}")
        if self.init_radius <= 0 or self.radius <= 0:
            raise ConfigError("init_radius/radius: must be > 0")
        if not 0.0 < self.init_opacity < 1.0:
            raise ConfigError(f"init_opacity: must be in (0, 1), got {self.init_opacity}")
        if self.init_scale < 0:
            raise ConfigError(f"init_scale: must be >= 0, got {self.init_scale}")
        if self.sh_degree not in (0, 1):
            raise ConfigError(f"sh_degree: must be 0 or 1, got {self.sh_degree}")
        if self.backend not in BACKENDS:
            raise ConfigError(f"backend: expected one of {', '.join(BACKENDS)}, "
                              f"got '{self.backend}'")
        if self.surface_level_mode not in ("silhouette", "fixed"):
            raise ConfigError("surface_level_mode: expected silhouette or fixed, got "
                              f"'{self.surface_level_mode}'")
        if self.isosurface_threshold <= 0:
            raise ConfigError("isosurface_threshold: must be > 0, got "
                              f"{self.isosurface_threshold}")


@register("representation", "gaussians")
class Gaussians(Representation):
    """3D Gaussians splatted by a differentiable rasteriser; densified and pruned in training."""

    Config = GaussiansConfig
    param_group_names = ("xyz", "scaling", "rotation", "opacity", "color")
    loss_names = ("opacity_sparsity",)

    def __init__(self, cfg: GaussiansConfig = None, device=None, *, points: Tensor = None,
                 colors: Tensor = None, inputs=None):
        super().__init__()
        self.cfg = cfg = cfg or GaussiansConfig()
        self.radius = cfg.radius
        spacing = None
        if points is None:
            if cfg.init == "points":
                points, colors = fields.load_points(cfg.points)
            elif cfg.init == "point_cloud":
                points, colors, spacing = self._grow_from_cloud(cfg.point_cloud, device, inputs)
            else:
                points = fields.random_in_ball(cfg.count, cfg.init_radius)
        points = points.float()
        n = points.shape[0]
        if colors is None:
            colors = 0.5 + 0.05 * torch.randn(n, 3)      # grey with a little noise
        scale = (torch.full((n,), cfg.init_scale) if cfg.init_scale > 0
                 else spacing if spacing is not None else fields.neighbour_spacing(points))
        quats = torch.zeros(n, 4)
        quats[:, 0] = 1.0
        self.xyz = nn.Parameter(points.to(device))
        # a few percent of anisotropy: an exactly round Gaussian's rotation has no gradient
        log_scale = scale.clamp_min(1e-4).log()[:, None] + 0.05 * torch.randn(n, 3)
        self.scaling = nn.Parameter(log_scale.to(device))
        self.rotation = nn.Parameter(quats.to(device))
        self.opacity = nn.Parameter(fields.logit(torch.full((n,), cfg.init_opacity)).to(device))
        self.color = nn.Parameter(fields.logit(colors.float().clamp(0.02, 0.98)).to(device))
        # degree-1 SH coefficients [N, 3 basis, 3 channels] (empty at degree 0)
        self.sh_rest = nn.Parameter(torch.zeros(n, 3 if cfg.sh_degree else 0, 3, device=device),
                                    requires_grad=bool(cfg.sh_degree))
        # view-space gradient statistics since the last densification (buffers: a resumed
        # run densifies as the uninterrupted one would)
        self.register_buffer("grad_total", torch.zeros(n, device=device))
        self.register_buffer("grad_count", torch.zeros(n, device=device))
        self._last: Optional[dict] = None          # the last train render's means2d, size
        self._grid_cache: Optional[tuple] = None
        self._color_cache: Optional[tuple] = None
        self.last_densify: Optional[dict] = None   # counts of the last densification

    @classmethod
    def preflight(cls, cfg, key: str) -> None:
        """Before the run writes anything: the ``point_cloud`` start's file is a cloud, or
        its point model is there and the run has a picture (one line otherwise)."""
        if cfg.init == "point_cloud":
            preflight(cfg.point_cloud, key)

    def _grow_from_cloud(self, init: PointCloudInit, device, inputs=None):
        """(points, colours, sizes) grown from the cloud (GaussianDreamer), ``count`` in
        all; each Gaussian as large as its cloud point's neighbour spacing."""
        import dataclasses

        if init.from_model and not init.image and getattr(inputs, "image", None) is not None:
            init = dataclasses.replace(init, image=inputs.image.path)
        cloud = load_init_cloud(init, device).cpu()
        g = torch.Generator().manual_seed(int(init.seed))
        points, colors, source = grow_shell(cloud, self.cfg.count, init.shell,
                                            init.color_noise, generator=g)
        spacing = fields.neighbour_spacing(cloud[:, :3]) if cloud.shape[0] > 1 else \
            torch.full((1,), 0.02)
        return points, colors, spacing[source]

    # -- the parameters ---------------------------------------------------------------
    @property
    def count(self) -> int:
        return self.xyz.shape[0]

    def per_gaussian(self) -> Dict[str, nn.Parameter]:
        return {"xyz": self.xyz, "scaling": self.scaling, "rotation": self.rotation,
                "opacity": self.opacity, "color": self.color, "sh_rest": self.sh_rest}

    def param_groups(self) -> Dict[str, List[nn.Parameter]]:
        color = [self.color] + ([self.sh_rest] if self.cfg.sh_degree else [])
        return {"xyz": [self.xyz], "scaling": [self.scaling], "rotation": [self.rotation],
                "opacity": [self.opacity], "color": color}

    def opacities(self) -> Tensor:
        return torch.sigmoid(self.opacity)

    def rgb(self, cameras: Optional[Cameras] = None) -> Tensor:
        """Colour [N, 3], or [B, N, 3] seen from each camera when ``sh_degree`` is 1."""
        if not self.cfg.sh_degree or cameras is None:
            return torch.sigmoid(self.color)
        d = self.xyz[None] - cameras.position[:, None].to(self.xyz)
        d = d / d.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        basis = SH_C1 * torch.stack([-d[..., 1], d[..., 2], -d[..., 0]], -1)   # [B, N, 3]
        return torch.sigmoid(self.color[None] + torch.einsum("bnk,nkc->bnc", basis,
                                                             self.sh_rest))

    # -- rendering --------------------------------------------------------------------
    def render(self, cameras: Cameras, height: int, width: int, *, background: Background,
               step: StepInfo) -> Dict[str, Tensor]:
        """rgb [B, H, W, 3] over ``background(dirs)``, opacity [B, H, W, 1], depth [B, H, W, 1]
        (distance along the ray, as the volume renderers give it) and, in eval mode or with
        ``render_normals``, normal [B, H, W, 3] (world; each Gaussian's shortest axis turned
        towards the camera, composited like colour)."""
        cams = cameras.to(self.xyz.device)
        feats = self.rgb(cams)                                              # [(B,) N, 3]
        normals = self.cfg.render_normals or not self.training
        if normals:   # composited like colour: per view, so [B, N, 6]
            if feats.dim() == 2:
                feats = feats[None].expand(len(cams), -1, -1)
            axis = shortest_axis(self.scaling, self.rotation)               # [N, 3]
            towards = cams.position[:, None] - self.xyz[None]               # [B, N, 3]
            sign = torch.where((axis[None] * towards).sum(-1, keepdim=True) < 0, -1.0, 1.0)
            feats = torch.cat([feats, axis[None] * sign], -1)
        out = rasterize_gaussians(self.xyz, self.scaling, self.rotation, self.opacities(),
                                  feats, cams, height, width, backend=self.cfg.backend)
        if self.training and torch.is_grad_enabled() and out["means2d"] is not None and \
                out["means2d"].requires_grad:
            out["means2d"].retain_grad()
            self._last = {"means2d": out["means2d"], "visible": out["visible"],
                          "size": (height, width)}
        _, dirs = cams.rays(height, width)
        alpha = out["alpha"]
        rgb = out["features"][..., :3] + (1.0 - alpha) * background(dirs)
        result = {"rgb": rgb.clamp(0.0, 1.0), "opacity": alpha.clamp(0.0, 1.0),
                  "depth": out["depth"] * ray_distance_factor(cams, height, width)}
        if normals:
            result["normal"] = out["features"][..., 3:6].clamp(-1.0, 1.0)
        return result

    def regularizers(self, outputs: Dict[str, Tensor], step: StepInfo) -> Dict[str, Tensor]:
        # pushes each pixel's opacity towards 0 or 1 (a crisp silhouette)
        o = outputs["opacity"].clamp(1e-4, 1 - 1e-4)
        return {"opacity_sparsity": (-(o * torch.log(o) + (1 - o) * torch.log(1 - o))).mean()}

    # -- densification (called by the trainer after each optimiser step) ---------------
    @torch.no_grad()
    def after_step(self, step: StepInfo, optimizer: Optional[torch.optim.Optimizer]) -> None:
        """Collect view-space gradients; densify / prune / reset opacity on the schedule."""
        d = self.cfg.densify
        s = step.step
        last, self._last = self._last, None
        if not d.enabled or s >= d.stop:
            return
        if last is not None and last["means2d"].grad is not None and \
                last["means2d"].shape[1] == self.count:
            accumulate_gradients(self.grad_total, self.grad_count, last["means2d"].grad,
                                 last["visible"], *last["size"])
        done = s + 1
        if done >= d.start and done % d.every == 0:
            rot = quaternion_to_rotation(self.rotation)
            mean_grad = self.grad_total / self.grad_count.clamp_min(1.0)
            counts = densify_and_prune(self, list(self.per_gaussian()), optimizer, mean_grad,
                                       d, self.scaling.exp(), rot, self.opacities())
            self.grad_total = torch.zeros(self.count, device=self.xyz.device)
            self.grad_count = torch.zeros(self.count, device=self.xyz.device)
            if self.count == 0:
                raise ConfigError(
                    f"densify: no Gaussians left after pruning at step {done} (min_opacity "
                    f"{d.min_opacity:g}, max_scale {d.max_scale:g}); lower densify.min_opacity "
                    "or raise densify.max_scale")
            self.last_densify = dict(counts, step=done)
        if d.opacity_reset_every and done % d.opacity_reset_every == 0:
            cap = fields.logit(torch.tensor(d.reset_opacity)).item()
            self.opacity.data.clamp_(max=cap)
            reset_state_rows(self.opacity, optimizer)

    # -- checkpoints with a changing number of Gaussians -------------------------------
    def prepare_state(self, state: Dict[str, Tensor]) -> None:
        """Resize every per-Gaussian parameter to the row count of ``state`` (a state_dict
        about to be loaded), in place (``param.data``), so an optimiser built on them stays
        valid. Only before the parameters have been rendered with gradients: autograd
        caches a leaf's shape (densification swaps in new parameters instead)."""
        for name, p in self.per_gaussian().items():
            if name in state and tuple(state[name].shape) != tuple(p.shape):
                p.data = torch.zeros(state[name].shape, dtype=p.dtype, device=p.device)
                p.grad = None
        for name in ("grad_total", "grad_count"):
            if name in state and tuple(state[name].shape) != tuple(getattr(self, name).shape):
                setattr(self, name, torch.zeros(state[name].shape, device=self.xyz.device))
        self._last = None

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        own = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
        self.prepare_state(own)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    # -- export ------------------------------------------------------------------------
    @torch.no_grad()
    def grids(self, resolution: int) -> Tuple[Tensor, Tensor]:
        """The opacity field [R, R, R] and colour field [R, R, R, 3] on the export grid
        (cached until a parameter changes)."""
        key = (resolution, tuple((p.data_ptr(), p._version) for p in self.per_gaussian().values()))
        if self._grid_cache is None or self._grid_cache[0] != key:
            cov = covariance_3d(self.scaling, self.rotation)
            grids = fields.splat_to_grid(self.xyz, cov, self.opacities(),
                                         torch.sigmoid(self.color), resolution, self.radius)
            self._grid_cache = (key, grids)
        return self._grid_cache[1]

    def density(self, points: Tensor) -> Tensor:
        """The opacity field [P] at world points [P, 3] (trilinear on a 64^3 grid)."""
        grid, _ = self.grids(64)
        return fields.sample_grid_at(grid[..., None], points, self.radius)[:, 0]

    @torch.no_grad()
    def surface_level(self, grid: Tensor, size: int = 32) -> float:
        """The opacity-field level whose silhouettes from 16 ring cameras best match where
        the Gaussians render opaque (> 0.5); the fixed ``isosurface_threshold`` when asked or
        when nothing renders opaque."""
        if self.cfg.surface_level_mode == "fixed":
            return self.cfg.isosurface_threshold
        cams = ring_cameras(self.radius, device=self.xyz.device)
        was = self.training
        self.eval()
        out = rasterize_gaussians(self.xyz, self.scaling, self.rotation, self.opacities(),
                                  torch.sigmoid(self.color), cams, size, size,
                                  backend=self.cfg.backend)
        self.train(was)
        origins, dirs = cams.rays(size, size)
        _, peak = ray_opacity_and_peak(
            lambda p: fields.sample_grid_at(grid[..., None], p, self.radius)[:, 0],
            origins.reshape(-1, 3), dirs.reshape(-1, 3), self.radius)
        match = best_silhouette_level(out["alpha"].reshape(-1), peak)
        if match is None:
            print(f"gaussians: nothing renders opaque; surface at level "
                  f"{self.cfg.isosurface_threshold:g}", file=sys.stderr)
            return self.cfg.isosurface_threshold
        return match.level

    def surface(self, resolution: int = 128) -> Tuple[Tensor, Tensor]:
        """Marching cubes of the opacity field at :meth:`surface_level`."""
        grid, _ = self.grids(resolution)
        level = self.surface_level(grid)
        try:
            verts, faces = isosurface(grid, level, self.radius)
        except ValueError as exc:
            raise RuntimeError(f"{exc}; set surface_level_mode: fixed and an isosurface_threshold "
                               "inside that range") from None
        return verts.to(self.xyz.device), faces.to(self.xyz.device)

    @torch.no_grad()
    def albedo(self, points: Tensor) -> Tensor:
        """Opacity-weighted mean colour [P, 3] of the Gaussians around ``points`` [P, 3]; the
        nearest Gaussian's colour where none reaches (the colour field is ~0 there)."""
        grid, color = self.grids(self._grid_cache[0][0] if self._grid_cache else 64)
        both = torch.cat([color * grid[..., None], grid[..., None]], -1)
        sampled = fields.sample_grid_at(both, points, self.radius)
        out = sampled[:, :3] / sampled[:, 3:].clamp_min(1e-8)
        far = sampled[:, 3] < 1e-3
        if bool(far.any()) and self.count:
            rgb = torch.sigmoid(self.color)
            near = torch.cat([torch.cdist(chunk, self.xyz).argmin(1)
                              for chunk in points[far].split(4096)])
            out[far] = rgb[near]
        return out.clamp(0.0, 1.0)

    @property
    def color_field(self) -> nn.Module:
        """A trainable colour field of these Gaussians' albedo (a 64^3 colour grid, see
        :class:`representations.lib.gaussian_fields.GridColorField`): what a DMTet stage
        created from them (``init_from``) copies and refines."""
        key = ("color_field",) + tuple((p.data_ptr(), p._version)
                                       for p in self.per_gaussian().values())
        if self._color_cache is None or self._color_cache[0] != key:
            axis = torch.linspace(-self.radius, self.radius, 64, device=self.xyz.device)
            pts = torch.stack(torch.meshgrid(axis, axis, axis, indexing="ij"), -1)
            rgb = torch.cat([self.albedo(c) for c in pts.reshape(-1, 3).split(1 << 16)])
            self._color_cache = (key, fields.GridColorField(rgb.reshape(64, 64, 64, 3),
                                                            self.radius))
        return self._color_cache[1]

    def export_files(self, out_dir) -> Dict[str, str]:
        """Write the Gaussians as a 3DGS ``gaussians.ply`` into ``out_dir``."""
        path = fields.write_3dgs_ply(Path(out_dir) / "gaussians.ply", self.xyz, self.scaling,
                                     self.rotation, self.opacity, torch.sigmoid(self.color),
                                     self.sh_rest if self.cfg.sh_degree else None)
        return {"ply": str(path)}

    # -- from an earlier stage ----------------------------------------------------------
    @classmethod
    def create_from(cls, previous: Representation, cfg: GaussiansConfig = None,
                    device=None) -> "Gaussians":
        """Gaussians placed where an earlier stage's density field is dense (a NeRF, a
        voxel grid, other Gaussians): ``count`` points drawn among 16x as many uniform
        samples in the ball, weighted by ``1 - exp(-density * 0.02)`` (the opacity of a
        short step), coloured by its ``albedo``."""
        if not callable(getattr(previous, "density", None)):
            return super().create_from(previous, cfg, device)
        cfg = cfg or GaussiansConfig()
        radius = float(getattr(previous, "radius", cfg.radius))
        dev = next((p.device for p in previous.parameters()), None)
        with torch.no_grad():
            cand = fields.random_in_ball(16 * cfg.count, radius).to(dev)
            sigma = torch.cat([previous.density(c).reshape(-1) for c in cand.split(65536)])
            weight = (1.0 - torch.exp(-sigma.float().clamp_min(0) * 0.02))
            if float(weight.sum()) <= 0:
                raise ConfigError("init_from: the previous stage's density is empty; nothing "
                                  "to place Gaussians on")
            pick = torch.multinomial(weight, cfg.count,
                                     replacement=int(weight.count_nonzero()) < cfg.count)
            points = cand[pick]
            colors = previous.albedo(points).float() if callable(
                getattr(previous, "albedo", None)) else None
        return cls(cfg, device=device, points=points.cpu(),
                   colors=None if colors is None else colors.cpu())

