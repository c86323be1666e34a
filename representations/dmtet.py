"""DMTet: a deformable tetrahedral grid carrying a signed distance field, rendered as the
triangle mesh marching tetrahedra extracts from it (Magic3D-style second stage).

Parameters: an SDF value per grid vertex (``sdf < 0`` inside), a per-vertex deformation
bounded by ``deform_scale * cell * tanh(.)``, and a colour field (``ColorField``: hash grid +
MLP, albedo at world points), usually copied from the NeRF stage by :meth:`DMTet.create_from`.

Each render: deform the grid -> :func:`marching_tets` -> :func:`render_mesh` (rasterise,
antialias) -> shading. Gradients reach the SDF and the deformation through the positions of
the extracted vertices (interpolation, silhouette antialiasing, normals) and the colour field
through the albedo. The regularisers (normal consistency, uniform Laplacian) act on the mesh
of the last render.

``init_shape: point_cloud`` starts the SDF from a coloured cloud (the ``point_cloud:`` block,
:mod:`representations.lib.point_init`): the signed distance of the solid the cloud bounds, in
world units as the sphere's, at every grid vertex, and the colour field fitted to the cloud's
colours.
"""

from __future__ import annotations

import copy
import sys
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn.functional as Fn
from torch import Tensor, nn

from engine.cameras import Cameras
from engine.errors import ConfigError
from engine.plugin import Background, Representation, StepInfo
from engine.registry import register
from representations.lib import marching_tets as mt
from representations.lib import rasterizer
from representations.lib.encodings import HashGridConfig
from representations.lib.level_match import silhouette_level
from representations.lib.mesh_render import render_mesh
from representations.lib.point_init import (PointCloudInit, cloud_sdf_grid, lookup_grid,
                                            preflight, start_field_from_cloud)
from representations.lib.fields import ColorField
from representations.lib.shading import (ShadingConfig, choose_shading, random_light_positions,
                                     shade)
from representations.lib.tets import cut_cell_tets, tet_grid

INIT_SHAPES = ("sphere", "none", "point_cloud")
INIT_LEVELS = ("fixed", "silhouette")


# ---------------------------------------------------------------------------------------
# mesh regularisers (pure functions)
# ---------------------------------------------------------------------------------------

def face_normals(vertices: Tensor, faces: Tensor) -> Tensor:
    """Unit face normals [F, 3] (right-hand rule on the face order); differentiable w.r.t.
    ``vertices`` [V, 3]."""
    p = vertices[faces]
    return Fn.normalize(torch.cross(p[:, 1] - p[:, 0], p[:, 2] - p[:, 0], dim=-1), dim=-1,
                        eps=1e-12)


def adjacent_face_pairs(faces: Tensor) -> Tensor:
    """Pairs of faces sharing an edge, [P, 2] long (one pair per manifold edge; boundary
    edges give none). Not differentiable."""
    n_faces = faces.shape[0]
    edges = faces[:, [0, 1, 1, 2, 2, 0]].reshape(-1, 2)
    lo, hi = edges.min(dim=1).values, edges.max(dim=1).values
    key = lo * (int(faces.max()) + 1 if n_faces else 1) + hi
    order = torch.argsort(key)
    key, face_of = key[order], torch.arange(3 * n_faces, device=faces.device)[order] // 3
    same = key[1:] == key[:-1]
    return torch.stack([face_of[:-1][same], face_of[1:][same]], dim=1)


def normal_consistency(vertices: Tensor, faces: Tensor) -> Tensor:
    """Mean (1 - cos) between the normals of faces sharing an edge; a scalar,
    differentiable w.r.t. ``vertices``. 0 for a mesh without shared edges."""
    pairs = adjacent_face_pairs(faces)
    if pairs.shape[0] == 0:
        return vertices.sum() * 0.0
    n = face_normals(vertices, faces)
    return (1.0 - (n[pairs[:, 0]] * n[pairs[:, 1]]).sum(-1)).mean()


def laplacian_loss(vertices: Tensor, faces: Tensor) -> Tensor:
    """Uniform Laplacian smoothing loss: mean over vertices of ||mean(neighbours) - v||^2;
    a scalar, differentiable w.r.t. ``vertices`` [V, 3]. Vertices of no face count as 0."""
    if faces.shape[0] == 0:
        return vertices.sum() * 0.0
    edges = faces[:, [0, 1, 1, 2, 2, 0]].reshape(-1, 2)
    edges = torch.unique(torch.sort(edges, dim=1).values, dim=0)
    src = torch.cat([edges[:, 0], edges[:, 1]])
    dst = torch.cat([edges[:, 1], edges[:, 0]])
    n_verts = vertices.shape[0]
    total = vertices.new_zeros(n_verts, 3).index_add(0, src, vertices[dst])
    degree = vertices.new_zeros(n_verts).index_add(0, src, vertices.new_ones(src.shape[0]))
    used = degree > 0
    delta = total[used] / degree[used, None] - vertices[used]
    return delta.pow(2).sum(-1).mean()


# ---------------------------------------------------------------------------------------
# the representation
# ---------------------------------------------------------------------------------------

@register("representation", "dmtet")
class DMTet(Representation):
    """Deformable tetrahedral grid + SDF rendered by marching tets and rasterisation."""

    @dataclass
    class Config:
        resolution: int = 128            # tet grid cells per side
        bound: float = 1.0               # the grid spans [-bound, bound]^3
        # deformation <= deform_scale * cell size per axis (tanh-bounded; 1 = one cell)
        deform_scale: float = 1.0
        # sphere | none (empty; for create_from / loading) | point_cloud (point_cloud:)
        init_shape: str = "sphere"
        init_radius: float = 0.5
        point_cloud: Optional[PointCloudInit] = None
        # create_from: sdf = level - density(grid vertex), inside where dense. The level:
        #   fixed: init_threshold; None: the previous stage's isosurface_threshold, else 10
        #   silhouette: the level whose silhouettes from 16 ring cameras best match where the
        #     previous stage renders opaque (representations.lib.level_match); init_threshold
        #     (as above) only when it renders nothing opaque
        init_level: str = "fixed"
        init_threshold: Optional[float] = None
        # ...clamped to +- init_clamp (0: no clamp) so its scale suits the geometry lr
        init_clamp: float = 1.0
        color: HashGridConfig = field(default_factory=HashGridConfig)
        color_hidden: int = 64
        color_layers: int = 1
        shading: ShadingConfig = field(default_factory=ShadingConfig)
        marching_backend: str = "auto"   # auto | torch | kaolin
        # how a quad (2 corners in, 2 out) is cut in two: angle (the diagonal whose triangles
        # have the larger smallest angle) | shorter | longer | fixed (the table's, as kaolin
        # and threestudio); representations/lib/marching_tets.py
        diagonal: str = "angle"
        raster_backend: str = "auto"     # auto | torch | nvdiffrast

        def __post_init__(self):
            if self.resolution < 1:
                raise ConfigError(f"resolution: must be >= 1, got {self.resolution}")
            if not self.bound > 0:
                raise ConfigError(f"bound: must be > 0, got {self.bound}")
            if self.deform_scale < 0:
                raise ConfigError(f"deform_scale: must be >= 0, got {self.deform_scale}")
            if self.init_shape not in INIT_SHAPES:
                raise ConfigError(f"init_shape: '{self.init_shape}' is not one of "
                                  f"{', '.join(INIT_SHAPES)}")
            if self.init_shape == "point_cloud" and self.point_cloud is None:
                raise ConfigError("point_cloud.source: init_shape: point_cloud needs a cloud: "
                                  "a .ply / .npy file or model:FOLDER")
            if isinstance(self.point_cloud, dict):
                self.point_cloud = PointCloudInit(**self.point_cloud)
            if not 0 < self.init_radius < self.bound:
                raise ConfigError(f"init_radius: must be in (0, bound={self.bound}), got "
                                  f"{self.init_radius}")
            if self.init_level not in INIT_LEVELS:
                raise ConfigError(f"init_level: '{self.init_level}' is not one of "
                                  f"{', '.join(INIT_LEVELS)}")
            if self.init_clamp < 0:
                raise ConfigError(f"init_clamp: must be >= 0, got {self.init_clamp}")
            if self.color_hidden < 1 or self.color_layers < 0:
                raise ConfigError("color_hidden must be >= 1 and color_layers >= 0, got "
                                  f"{self.color_hidden} and {self.color_layers}")
            if self.marching_backend not in mt.BACKENDS:
                raise ConfigError(f"marching_backend: '{self.marching_backend}' is not one of "
                                  f"{', '.join(mt.BACKENDS)}")
            if self.diagonal not in mt.DIAGONALS:
                raise ConfigError(f"diagonal: '{self.diagonal}' is not one of "
                                  f"{', '.join(mt.DIAGONALS)}")
            if self.raster_backend not in rasterizer.BACKENDS:
                raise ConfigError(f"raster_backend: '{self.raster_backend}' is not one of "
                                  f"{', '.join(rasterizer.BACKENDS)}")

    def __init__(self, cfg: "DMTet.Config" = None, device=None, inputs=None):
        super().__init__()
        cfg = cfg or DMTet.Config()
        self.cfg = cfg
        # set by create_from: the density level the SDF started from, and the silhouette
        # match (representations.lib.level_match.LevelMatch) when that level was chosen
        self.start_level: Optional[float] = None
        self.start_match = None
        vertices, tets = tet_grid(cfg.resolution, cfg.bound, device=device)
        # the grid is rebuilt from the config, so checkpoints hold only the parameters
        self.register_buffer("grid_vertices", vertices, persistent=False)
        self.register_buffer("tets", tets, persistent=False)
        self.cell_size = 2.0 * cfg.bound / cfg.resolution
        if cfg.init_shape == "sphere":
            sdf = vertices.norm(dim=-1) - cfg.init_radius
        else:
            sdf = torch.ones(vertices.shape[0], device=device)
        self.sdf = nn.Parameter(sdf)
        self.deformation = nn.Parameter(torch.zeros_like(vertices))
        self.color_field = ColorField(cfg.color, hidden=cfg.color_hidden,
                                      n_hidden_layers=cfg.color_layers, bound=cfg.bound).to(device)
        self._mesh: Optional[Tuple[Tensor, Tensor]] = None
        if cfg.init_shape == "point_cloud":
            self._start_from_cloud(cfg.point_cloud, device, inputs)

    def _start_from_cloud(self, init: PointCloudInit, device, inputs=None) -> None:
        """SDF = the cloud's signed distance at the grid vertices; colours fitted."""
        cloud = start_field_from_cloud(init, self.color_field, device, inputs)
        grid = cloud_sdf_grid(cloud, self.cfg.bound, init.resolution, init.close)
        with torch.no_grad():
            sdf = lookup_grid(grid[..., None].to(self.grid_vertices), self.grid_vertices,
                              self.cfg.bound)[:, 0]
            self.sdf.copy_(sdf)

    @classmethod
    def preflight(cls, cfg, key: str) -> None:
        """Before the run writes anything: the ``point_cloud`` start's file is a cloud, or
        its point model is there and the run has a picture (one line otherwise)."""
        if cfg.init_shape == "point_cloud":
            preflight(cfg.point_cloud, key)

    # -- geometry ------------------------------------------------------------------------
    def deformed_vertices(self) -> Tensor:
        """Grid vertices moved by the bounded deformation, [V, 3]; differentiable w.r.t.
        ``deformation``."""
        offset = (self.cfg.deform_scale * self.cell_size) * torch.tanh(self.deformation)
        return self.grid_vertices + offset

    def extract_mesh(self) -> Tuple[Tensor, Tensor]:
        """The current surface: vertices [M, 3] (differentiable w.r.t. ``sdf`` and
        ``deformation``) and faces [F, 3] long, counter-clockwise seen from outside."""
        # only the tets of cells the surface crosses: the same mesh, without the O(T) gather
        tets = self.tets[cut_cell_tets(self.sdf, self.cfg.resolution)]
        return mt.marching_tets(self.deformed_vertices(), tets, self.sdf,
                                backend=self.cfg.marching_backend, diagonal=self.cfg.diagonal)

    def _graph_zero(self) -> Tensor:
        """A zero connected to every geometry parameter, so an empty mesh still gives a loss
        the optimiser can step on."""
        return (self.sdf.sum() + self.deformation.sum()) * 0.0

    # -- Representation API --------------------------------------------------------------
    def render(self, cameras: Cameras, height: int, width: int, *, background: Background,
               step: StepInfo) -> Dict[str, Tensor]:
        """Render B cameras: rgb [B,H,W,3] (shaded, over the background, antialiased),
        opacity [B,H,W,1], depth [B,H,W,1], normal [B,H,W,3] (world), albedo [B,H,W,3].
        Differentiable w.r.t. sdf, deformation, the colour field and the background."""
        verts, faces = self.extract_mesh()
        self._mesh = (verts, faces)
        if faces.shape[0] == 0:
            return self._render_empty(cameras, height, width, background)

        out = render_mesh(verts, faces, cameras, height, width, background=background,
                          color_fn=self.color_field, backend=self.cfg.raster_backend)
        step_index = step.step if step is not None else 0
        mode = choose_shading(self.cfg.shading, step_index, self.training, None)
        if mode != "albedo":
            covered = out["depth"] > 0
            light = random_light_positions(cameras, self.cfg.shading, None).to(verts)
            light_dir = Fn.normalize(light[:, None, None, :] - out["position"], dim=-1)
            shaded = shade(out["albedo"], out["normal"], light_dir, mode,
                           self.cfg.shading.ambient, self.cfg.shading.diffuse)
            # render_mesh's rgb is the antialiased albedo over the background; swap the albedo
            # for the shaded colour on covered pixels and keep its silhouette blending (and
            # gradients), rather than recompositing with the soft mask, which would darken
            # the pixels just outside the silhouette
            out["rgb"] = out["rgb"] + covered * (shaded - out["albedo"])
        return out

    def _render_empty(self, cameras: Cameras, height: int, width: int,
                      background: Background) -> Dict[str, Tensor]:
        _, dirs = cameras.rays(height, width)
        dirs = dirs.to(self.grid_vertices)
        zero = self._graph_zero()
        rgb = background(dirs) + zero
        blank = torch.zeros_like(dirs[..., :1]) + zero
        return {"rgb": rgb, "opacity": blank, "depth": blank.clone(),
                "normal": torch.zeros_like(dirs) + zero, "albedo": torch.zeros_like(dirs) + zero,
                "position": torch.zeros_like(dirs) + zero}

    def param_groups(self) -> Dict[str, List[nn.Parameter]]:
        return {"geometry": [self.sdf, self.deformation],
                "color": [p for p in self.color_field.parameters() if p.requires_grad]}

    def regularizers(self, outputs: Dict[str, Tensor], step: StepInfo) -> Dict[str, Tensor]:
        """``normal_consistency`` and ``laplacian`` of the mesh of the last render (scalars,
        differentiable w.r.t. sdf and deformation; 0 with a graph for an empty mesh)."""
        verts, faces = self._mesh if self._mesh is not None else self.extract_mesh()
        if faces.shape[0] == 0:
            zero = self._graph_zero()
            return {"normal_consistency": zero, "laplacian": zero.clone()}
        return {"normal_consistency": normal_consistency(verts, faces),
                "laplacian": laplacian_loss(verts, faces)}

    def surface(self, resolution: int = 0) -> Tuple[Tensor, Tensor]:
        """The extracted mesh of the current parameters (``resolution`` is ignored: the tet
        grid fixes it). Vertices [M, 3] float, faces [F, 3] long, detached."""
        with torch.no_grad():
            verts, faces = self.extract_mesh()
        return verts.detach().float(), faces

    def albedo(self, points: Tensor) -> Tensor:
        return self.color_field(points)

    @classmethod
    def create_from(cls, previous: Representation, cfg: "DMTet.Config" = None,
                    device=None) -> "DMTet":
        """A DMTet whose SDF is ``level - previous.density(grid vertices)`` (negative where
        the previous stage is dense), clamped to +- ``init_clamp``, and whose colour field is
        a deep copy of ``previous.color_field`` (``cfg.color`` is then unused). The level is
        ``cfg.init_threshold`` or chosen from the previous stage's silhouettes (see
        ``Config.init_level``); it is kept in ``rep.start_level`` and, when chosen, the match
        in ``rep.start_match``. A previous stage without ``density`` and ``color_field`` is a
        ConfigError."""
        if not hasattr(previous, "density") or not hasattr(previous, "color_field"):
            return super().create_from(previous, cfg, device)
        cfg = cfg or cls.Config()
        rep = cls(cfg, device=device)
        points = rep.grid_vertices
        previous_cfg = getattr(previous, "cfg", None)
        threshold = cfg.init_threshold
        if threshold is None:
            threshold = float(getattr(previous_cfg, "isosurface_threshold", 10.0))
        if cfg.init_level == "silhouette":
            radius = float(getattr(previous_cfg, "radius", cfg.bound))
            rep.start_match = silhouette_level(previous.density, radius, device=points.device)
            if rep.start_match is None:
                print(f"dmtet: the previous stage renders nothing opaque; starting from its "
                      f"level {threshold:g} instead of a silhouette match", file=sys.stderr)
            else:
                threshold = rep.start_match.level
                print(f"dmtet: starting from the previous stage's density level "
                      f"{threshold:.3g}, whose silhouettes match its volume render at IoU "
                      f"{rep.start_match.iou:.2f}", file=sys.stderr)
        rep.start_level = threshold
        with torch.no_grad():
            density = torch.cat([previous.density(chunk).reshape(-1)
                                 for chunk in points.split(1 << 16)])
            sdf = threshold - density.to(points)
            if cfg.init_clamp > 0:
                sdf = sdf.clamp(-cfg.init_clamp, cfg.init_clamp)
            rep.sdf.copy_(sdf)
        rep.color_field = copy.deepcopy(previous.color_field).to(device or points.device)
        for p in rep.color_field.parameters():
            p.requires_grad_(True)
        return rep
