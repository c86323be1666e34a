"""``textured-mesh``: a fixed-topology triangle mesh with a UV texture, refined against views
(One-2-3-45++'s last stage; DreamGaussian's second stage).

``create_from`` an earlier stage takes its surface the way export does (``surface()`` ->
:func:`representations.lib.mesh.clean_mesh` -> :func:`engine.export.outward` -> xatlas UV
atlas) and bakes its albedo into the texture (:func:`engine.export.bake_texture`). The
parameters are

- ``offsets`` [V, 3]: per-vertex displacement, bounded: ``max_offset * tanh(offsets)``;
- ``texture`` [T, T, 3]: the albedo texture (rendered clamped to [0, 1]);
- ``vertex_color`` [V, 3] (``vertex_color: true``): a per-vertex colour added to it;

in the optimiser groups ``offsets`` and ``texture``. Renders rasterise the welded mesh
(:mod:`representations.lib.rasterizer`, the DMTet stage's renderer) and look the texture up at
the UVs interpolated on the atlas faces (face i of both is the same triangle), giving the
DMTet outputs: rgb (albedo over the background, antialiased; the views carry their own
light), opacity, depth, normal, albedo, position. Regularisers, weighted by the recipe:
``laplacian`` (uniform Laplacian of the bounded offsets: 0 for none), ``normal_consistency``
(of the deformed mesh) and ``texture_tv`` (total variation inside the UV charts).

Initial texture from the target views (``init_texture: views``): a view-fitting guidance
(``sampled-views``) puts its targets at the render's size in the render outputs as
``target_rgb`` / ``target_mask`` (same order as the cameras). At the first step that has them,
every texel seen by a view takes the views' colours weighted by the cosine of the view angle,
depth-tested (:func:`representations.lib.texture_project.backproject_views`); texels no view
sees keep the baked colour. The views and their cameras are kept in the state (``views_*``),
so a resumed run does not redo it and evaluation can score renders against them.

Export goes through :func:`engine.export.export_representation`: ``surface()`` is the
deformed mesh, ``albedo(points)`` the texture at the UV of the nearest surface point.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import numpy as np
import torch
from torch import Tensor, nn

from engine.cameras import Cameras
from engine.errors import ConfigError
from engine.plugin import Background, Representation, StepInfo
from engine.registry import register
from representations.lib import rasterizer
from representations.lib.mesh_render import vertex_normals, world_to_clip
from representations.lib.mesh_smooth import (MeshTopology, harmonic_fill, mesh_topology,
                                             normal_consistency, texture_tv, uniform_laplacian)
from representations.lib.texture_project import (backproject_views, closest_surface_points,
                                                 sample_texture)

INIT_TEXTURES = ("views", "previous")


@dataclass
class BackprojectConfig:
    depth_tol: float = 0.05          # |view depth - surface depth| counted as visible (world)
    cos_power: float = 1.0           # weight = cos(view angle) ** cos_power
    depth_scale: int = 4             # depth test on a map this many times the view's size
    min_weight: float = 0.05         # texels whose summed weight is below count as unseen
    mask_min: float = 0.5            # target pixels whose mask is below give no colour
    # unseen texels: propagate (the seen vertices' colours spread over the mesh, harmonic
    # fill) or keep (the previous stage's baked colour)
    unseen: str = "propagate"
    propagate_iterations: int = 200

    def __post_init__(self):
        if self.depth_tol <= 0 or self.cos_power < 0 or self.depth_scale < 1 \
                or self.min_weight < 0 or not 0 <= self.mask_min <= 1 \
                or self.propagate_iterations < 0:
            raise ConfigError("backproject: need depth_tol > 0, cos_power >= 0, depth_scale >= 1"
                              ", min_weight >= 0, mask_min in [0, 1], propagate_iterations >= 0;"
                              f" got {self}")
        if self.unseen not in ("propagate", "keep"):
            raise ConfigError(f"backproject.unseen: '{self.unseen}' is not one of propagate, "
                              "keep")


def _mesh_arrays(vertices: np.ndarray, faces: np.ndarray, texture_size: int, padding: int):
    """(welded vertices, welded faces, vmap, atlas faces, uvs) of an outward-wound mesh."""
    from engine.export import outward
    from representations.lib.mesh import uv_atlas

    faces, _ = outward(np.asarray(vertices, np.float64), np.asarray(faces, np.int64))
    vmap, faces_uv, uvs = uv_atlas(vertices, faces, texture_size, padding=padding)
    # face i of the atlas is face i of the welded mesh; take the welded faces through vmap
    welded = vmap[faces_uv]
    return (np.asarray(vertices, np.float32), welded.astype(np.int64), vmap, faces_uv, uvs)


@register("representation", "textured-mesh")
class TexturedMesh(Representation):
    """A UV-textured triangle mesh with bounded vertex offsets, for refinement from views."""

    param_group_names = ("texture", "offsets")
    loss_names = ("laplacian", "normal_consistency", "texture_tv")

    @dataclass
    class Config:
        texture_size: int = 128          # texels per side of the texture parameter
        texture_padding: int = 2         # texels between UV charts (xatlas)
        max_offset: float = 0.02         # |offset| per axis <= this (world units; tanh-bounded)
        vertex_color: bool = False       # also a per-vertex colour added to the texture
        # create_from: previous.surface(mesh_resolution), cleaned as export cleans it
        mesh_resolution: int = 64
        decimate_faces: int = 20000
        # Taubin smoothing passes on the previous stage's surface before unwrapping (0: keep
        # it as it is; marching-tets surfaces are bumpy, which fragments the UV atlas)
        smooth_iterations: int = 0
        remove_floaters: bool = True
        floater_diameter: float = 0.1
        # views: back-project the first targets a guidance hands over; previous: keep the
        # previous stage's baked albedo
        init_texture: str = "views"
        backproject: BackprojectConfig = field(default_factory=BackprojectConfig)
        # a stand-alone instance (no create_from) is an icosphere
        sphere_radius: float = 0.5
        sphere_subdivisions: int = 2
        raster_backend: str = "auto"     # auto | torch | nvdiffrast

        def __post_init__(self):
            if isinstance(self.backproject, dict):
                self.backproject = BackprojectConfig(**self.backproject)
            if not 8 <= self.texture_size <= 4096:
                raise ConfigError(f"texture_size: must be in [8, 4096], got {self.texture_size}")
            if self.texture_padding < 0:
                raise ConfigError(f"texture_padding: must be >= 0, got {self.texture_padding}")
            if self.max_offset < 0:
                raise ConfigError(f"max_offset: must be >= 0, got {self.max_offset}")
            if self.mesh_resolution < 8:
                raise ConfigError(f"mesh_resolution: must be >= 8, got {self.mesh_resolution}")
            if self.decimate_faces < 0:
                raise ConfigError(f"decimate_faces: must be >= 0, got {self.decimate_faces}")
            if self.smooth_iterations < 0:
                raise ConfigError(f"smooth_iterations: must be >= 0, got "
                                  f"{self.smooth_iterations}")
            if self.init_texture not in INIT_TEXTURES:
                raise ConfigError(f"init_texture: '{self.init_texture}' is not one of "
                                  f"{', '.join(INIT_TEXTURES)}")
            if not self.sphere_radius > 0 or not 0 <= self.sphere_subdivisions <= 6:
                raise ConfigError("sphere_radius must be > 0 and sphere_subdivisions in [0, 6]")
            if self.raster_backend not in rasterizer.BACKENDS:
                raise ConfigError(f"raster_backend: '{self.raster_backend}' is not one of "
                                  f"{', '.join(rasterizer.BACKENDS)}")

    def __init__(self, cfg: "TexturedMesh.Config" = None, device=None, mesh=None):
        super().__init__()
        self.cfg = cfg = cfg or TexturedMesh.Config()
        if mesh is None:
            import trimesh

            sphere = trimesh.creation.icosphere(subdivisions=cfg.sphere_subdivisions,
                                                radius=cfg.sphere_radius)
            mesh = _mesh_arrays(np.asarray(sphere.vertices), np.asarray(sphere.faces),
                                cfg.texture_size, cfg.texture_padding)
        verts, faces, vmap, faces_uv, uvs = mesh
        t = lambda a, dt: torch.as_tensor(np.ascontiguousarray(a), dtype=dt, device=device)  # noqa
        # the mesh is state (create_from's mesh is not rebuilt from the Config)
        self.register_buffer("base_vertices", t(verts, torch.float32))
        self.register_buffer("faces", t(faces, torch.long))
        self.register_buffer("vmap", t(vmap, torch.long))
        self.register_buffer("faces_uv", t(faces_uv, torch.long))
        self.register_buffer("uvs", t(uvs, torch.float32))
        n = self.base_vertices.shape[0]
        self.offsets = nn.Parameter(torch.zeros(n, 3, device=device))
        self.texture = nn.Parameter(torch.full((cfg.texture_size, cfg.texture_size, 3), 0.7,
                                               device=device))
        self.vertex_color = (nn.Parameter(torch.zeros(n, 3, device=device))
                             if cfg.vertex_color else None)
        # 1 once the texture came from the views (or init_texture: previous was kept)
        self.register_buffer("texture_ready", torch.zeros((), device=device))
        # the target views the texture was back-projected from, and their cameras
        self.register_buffer("views_rgb", torch.zeros(0, 1, 1, 3, device=device))
        self.register_buffer("views_mask", torch.zeros(0, 1, 1, 1, device=device))
        self.register_buffer("views_c2w", torch.zeros(0, 4, 4, device=device))
        self.register_buffer("views_sph", torch.zeros(0, 4, device=device))  # el, az, d, fovy
        self._topology: Optional[MeshTopology] = None
        self._used: Optional[Tensor] = None
        self._last_cameras: Optional[Cameras] = None
        self._last_vertices: Optional[Tensor] = None

    # -- state of varying size ----------------------------------------------------------
    def _take_sizes(self, state: Dict[str, Tensor], prefix: str = "") -> None:
        """Resize this module's own tensors to those in ``state`` (keys ``prefix + name``)."""
        for name, tensor in list(self._parameters.items()) + list(self._buffers.items()):
            src = state.get(prefix + name)
            if tensor is None or src is None or src.shape == tensor.shape:
                continue
            if name in self._parameters:
                tensor.data = torch.zeros(src.shape, dtype=tensor.dtype, device=tensor.device)
            else:
                self._buffers[name] = torch.zeros(src.shape, dtype=src.dtype,
                                                  device=tensor.device)
        self._topology, self._used = None, None

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        """Take the saved mesh's sizes first (another mesh than this instance's)."""
        self._take_sizes(state_dict, prefix)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict,
                                      missing_keys, unexpected_keys, error_msgs)
        self._topology, self._used = None, None

    def prepare_state(self, state: Dict[str, Tensor]) -> None:
        """Take a checkpoint's sizes (its mesh, the kept views) before it is loaded."""
        self._take_sizes(state)

    # -- geometry -------------------------------------------------------------------------
    def bounded_offsets(self) -> Tensor:
        """``max_offset * tanh(offsets)`` [V, 3]: every component within +- max_offset."""
        return self.cfg.max_offset * torch.tanh(self.offsets)

    def vertices(self) -> Tensor:
        """Deformed welded vertices [V, 3]; differentiable w.r.t. ``offsets``."""
        return self.base_vertices + self.bounded_offsets()

    def topology(self) -> MeshTopology:
        if self._topology is None:
            self._topology = mesh_topology(self.faces, self.base_vertices.shape[0])
        return self._topology

    def used_texels(self) -> Tensor:
        """[T, T] bool: texels inside a UV chart."""
        if self._used is None or self._used.shape[0] != self.texture.shape[0]:
            from engine.export import rasterize_uv

            frags = rasterize_uv(self.uvs, self.faces_uv, self.texture.shape[0])
            self._used = frags.face_id[0] >= 0
        return self._used

    # -- Representation API --------------------------------------------------------------
    def render(self, cameras: Cameras, height: int, width: int, *, background: Background,
               step: StepInfo) -> Dict[str, Tensor]:
        """rgb [B,H,W,3] (albedo over the background, antialiased), opacity [B,H,W,1],
        depth [B,H,W,1], normal [B,H,W,3] (world), albedo [B,H,W,3], position [B,H,W,3].
        Differentiable w.r.t. offsets, texture, vertex_color and the background."""
        verts = self.vertices()
        faces = self.faces
        clip = world_to_clip(verts, cameras, height, width)
        frags = rasterizer.rasterize(clip, faces, height, width, backend=self.cfg.raster_backend)
        covered = frags.face_id >= 0
        mask = covered[..., None].to(verts.dtype)
        attrs = [verts, vertex_normals(verts, faces)]
        if self.vertex_color is not None:
            attrs.append(self.vertex_color)
        interp = rasterizer.interpolate(torch.cat(attrs, dim=-1), frags, faces).split(
            [a.shape[-1] for a in attrs], dim=-1)
        position = interp[0]
        normal = torch.nn.functional.normalize(interp[1], dim=-1, eps=1e-20)
        uv = rasterizer.interpolate(self.uvs, frags, self.faces_uv)
        albedo = torch.zeros_like(position)
        if bool(covered.any()):
            cols = sample_texture(self.texture, uv[covered])
            if self.vertex_color is not None:
                cols = cols + interp[2][covered]
            albedo = albedo.index_put((covered,), cols.clamp(0.0, 1.0))
        elif self.vertex_color is not None:
            albedo = albedo + 0.0 * interp[2]
        albedo = albedo + 0.0 * self.texture.sum()     # keep the graph when nothing is covered
        _, dirs = cameras.rays(height, width)
        bg = background(dirs.to(verts)).to(albedo.dtype)
        rgb = albedo + (1.0 - mask) * bg
        aa = rasterizer.antialias(torch.cat([rgb, mask], dim=-1), frags, clip, faces)
        self._last_cameras = cameras
        return {"albedo": albedo, "rgb": aa[..., :3].clamp(0.0, 1.0),
                "opacity": aa[..., 3:].clamp(0.0, 1.0), "depth": frags.depth[..., None],
                "normal": normal, "position": position}

    def param_groups(self) -> Dict[str, List[nn.Parameter]]:
        texture = [self.texture] + ([self.vertex_color] if self.vertex_color is not None else [])
        return {"texture": texture, "offsets": [self.offsets]}

    def regularizers(self, outputs: Dict[str, Tensor], step: StepInfo) -> Dict[str, Tensor]:
        """``laplacian`` of the bounded offsets, ``normal_consistency`` of the deformed mesh,
        ``texture_tv`` of the texture in the charts. Also where the texture is first
        back-projected from the targets a guidance put in ``outputs`` (see the module doc)."""
        if (float(self.texture_ready) == 0.0 and "target_rgb" in outputs
                and self._last_cameras is not None):
            if self.cfg.init_texture == "views":
                self.texture_from_views(outputs["target_rgb"], outputs.get("target_mask"),
                                        self._last_cameras)
            self.texture_ready.fill_(1.0)
        topo = self.topology()
        return {"laplacian": uniform_laplacian(self.bounded_offsets(), topo),
                "normal_consistency": normal_consistency(self.vertices(), self.faces, topo),
                "texture_tv": texture_tv(self.texture, self.used_texels())}

    def surface(self, resolution: int = 0) -> Tuple[Tensor, Tensor]:
        """The deformed mesh: vertices [V, 3] float, faces [F, 3] long (detached)."""
        with torch.no_grad():
            return self.vertices().detach().float(), self.faces.clone()

    @torch.no_grad()
    def albedo(self, points: Tensor) -> Tensor:
        """Texture colour [N, 3] at the UV of the surface point nearest each world point."""
        verts = self.vertices().detach()
        face, bary = closest_surface_points(points.detach().cpu().double().numpy(),
                                            verts.cpu().double().numpy(),
                                            self.faces.cpu().numpy())
        face = torch.from_numpy(face).to(verts.device)
        bary = torch.from_numpy(bary).to(verts)
        uv = (bary[:, :, None] * self.uvs[self.faces_uv[face]]).sum(1)
        cols = sample_texture(self.texture.detach(), uv)
        if self.vertex_color is not None:
            cols = cols + (bary[:, :, None] * self.vertex_color[self.faces[face]]).sum(1)
        return cols.clamp(0.0, 1.0)

    # -- texture from views ---------------------------------------------------------------
    @torch.no_grad()
    def texture_from_views(self, rgb: Tensor, mask: Optional[Tensor], cameras: Cameras) -> int:
        """Back-project views rgb [K, H, W, 3] (mask [K, H, W, 1] or None) seen from
        ``cameras`` onto the texture (module doc); keeps the views and cameras in the state.
        Returns the number of texels that took a colour."""
        from engine.export import dilate, rasterize_uv

        cfg = self.cfg.backproject
        K, H, W, _ = rgb.shape
        size = self.texture.shape[0]
        verts = self.vertices()
        frags = rasterize_uv(self.uvs, self.faces_uv, size)
        filled = frags.face_id[0] >= 0
        normals = vertex_normals(verts, self.faces)
        # welded positions and normals at the atlas vertices, interpolated over the charts
        attrs = torch.cat([verts[self.vmap], normals[self.vmap]], dim=-1)
        texels = rasterizer.interpolate(attrs, frags, self.faces_uv)[0][filled]
        points = texels[:, :3]
        nrm = torch.nn.functional.normalize(texels[:, 3:], dim=-1, eps=1e-20)
        hd, wd = H * cfg.depth_scale, W * cfg.depth_scale
        depth = rasterizer.rasterize(world_to_clip(verts, cameras, hd, wd), self.faces, hd, wd,
                                     backend=self.cfg.raster_backend).depth
        colours, weight = backproject_views(
            points, nrm, rgb.to(points), cameras.world_to_clip(H, W).to(points),
            cameras.position.to(points), depth, None if mask is None else mask.to(points),
            depth_tol=cfg.depth_tol, cos_power=cfg.cos_power, mask_min=cfg.mask_min)
        take = weight > cfg.min_weight
        texture = self.texture.detach().clone()
        flat = texture[filled]
        if cfg.unseen == "propagate":
            # the same at the vertices, spread over the mesh to those no view sees
            vcol, vweight = backproject_views(
                verts, normals, rgb.to(points), cameras.world_to_clip(H, W).to(points),
                cameras.position.to(points), depth, None if mask is None else mask.to(points),
                depth_tol=cfg.depth_tol, cos_power=cfg.cos_power, mask_min=cfg.mask_min)
            vcol = harmonic_fill(vcol, vweight > cfg.min_weight, self.topology(),
                                 cfg.propagate_iterations)
            if bool((vweight > cfg.min_weight).any()):
                spread = rasterizer.interpolate(vcol[self.vmap], frags, self.faces_uv)[0]
                flat = spread[filled]
        flat[take] = colours[take]
        texture[filled] = flat
        self.texture.data.copy_(dilate(texture, filled, max(1, self.cfg.texture_padding)))
        self.views_rgb = rgb.detach().to(self.views_rgb).clone()
        self.views_mask = (mask if mask is not None else torch.ones_like(rgb[..., :1])
                           ).detach().to(self.views_mask).clone()
        self.views_c2w = cameras.c2w.detach().to(self.views_c2w).clone()
        self.views_sph = torch.stack([cameras.elevation, cameras.azimuth, cameras.distance,
                                      cameras.fovy], dim=-1).to(self.views_sph)
        n = int(take.sum())
        print(f"textured-mesh: texture back-projected from {K} views: {n} of "
              f"{int(filled.sum())} texels seen", file=sys.stderr)
        return n

    def target_views(self) -> Optional[Tuple[Tensor, Tensor, Cameras]]:
        """(rgb [K,H,W,3], mask [K,H,W,1], cameras) the texture was back-projected from, or
        None before that happened."""
        if self.views_rgb.shape[0] == 0:
            return None
        el, az, d, fovy = self.views_sph.unbind(-1)
        cams = Cameras(self.views_c2w.clone(), fovy.clone(), el.clone(), az.clone(), d.clone(),
                       views_per_object=self.views_rgb.shape[0])
        return self.views_rgb, self.views_mask, cams

    # -- from an earlier stage -------------------------------------------------------------
    @classmethod
    def create_from(cls, previous: Representation, cfg: "TexturedMesh.Config" = None,
                    device=None) -> "TexturedMesh":
        """The previous stage's surface (``surface(mesh_resolution)``, cleaned as export
        cleans it, wound outwards, UV-unwrapped by xatlas) with its albedo baked into the
        texture when it has one (else the texture stays grey). A previous stage that cannot
        give a mesh is a ConfigError."""
        from engine.export import bake_texture
        from representations.lib.mesh import CleanupOptions, clean_mesh

        cfg = cfg or cls.Config()
        try:
            with torch.no_grad():
                verts, faces = previous.surface(cfg.mesh_resolution)
        except NotImplementedError:
            return super().create_from(previous, cfg, device)
        verts, faces = clean_mesh(
            verts.detach().float().cpu().numpy(), faces.detach().long().cpu().numpy(),
            CleanupOptions(remove_floaters=cfg.remove_floaters,
                           floater_diameter=cfg.floater_diameter,
                           decimate_faces=cfg.decimate_faces))
        if faces.shape[0] == 0:
            raise ConfigError("textured-mesh: the previous stage's surface is empty; nothing to "
                              "refine (train it longer or lower its surface threshold)")
        if cfg.smooth_iterations > 0:
            import trimesh

            mesh = trimesh.Trimesh(verts, faces, process=False)
            trimesh.smoothing.filter_taubin(mesh, iterations=cfg.smooth_iterations)
            verts = np.asarray(mesh.vertices, dtype=np.float32)
        rep = cls(cfg, device=device, mesh=_mesh_arrays(verts, faces, cfg.texture_size,
                                                        cfg.texture_padding))
        rep_device = rep.base_vertices.device
        try:
            def albedo_fn(points):
                return previous.albedo(points.to(rep_device)).to(rep_device)

            texture = bake_texture(albedo_fn, rep.base_vertices[rep.vmap], rep.faces_uv,
                                   rep.uvs, cfg.texture_size, max(1, cfg.texture_padding))
            rep.texture.data.copy_(texture.to(rep.texture))
        except NotImplementedError:
            pass
        if cfg.init_texture == "previous":
            rep.texture_ready.fill_(1.0)
        return rep
