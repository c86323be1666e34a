"""Export a trained representation: textured mesh (GLB, OBJ + MTL + PNG) and a turntable
video (MP4, GIF).

Works with any :class:`engine.plugin.Representation` that implements ``surface()`` and
``albedo()`` (mesh) and ``render()`` (turntable); nothing here knows a representation by name.

Pipeline: surface mesh -> clean-up (pymeshlab: floaters, close vertices, degenerate faces,
optional decimation) -> UV atlas (xatlas) -> albedo texture baked by rasterising the mesh in
UV space (each texel centre -> the 3D point of the surface it covers -> ``rep.albedo``) and
dilated into the gutters between charts so seams do not show under bilinear filtering and
mip-mapping -> files written with trimesh.

Exported vertices are in the engine's world frame (z up) unless ``y_up`` is set, which
rotates them to glTF's y-up convention.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np
import torch
import torch.nn.functional as Fn
from torch import Tensor

from engine.cameras import orbit
from engine.errors import ConfigError, RunAborted
from engine.plugin import StepInfo

MESH_FORMATS = ("glb", "obj")
VIDEO_FORMATS = ("mp4", "gif")


@dataclass
class TurntableConfig:
    enabled: bool = True
    frames: int = 60
    size: int = 256                  # square frames; even (the MP4 codec needs it)
    elevation: float = 15.0          # degrees
    distance: float = 2.5
    fovy: float = 40.0               # degrees
    fps: int = 24
    formats: List[str] = field(default_factory=lambda: ["mp4", "gif"])

    def __post_init__(self):
        if self.frames < 1:
            raise ConfigError(f"frames: must be >= 1, got {self.frames}")
        if self.size < 16 or self.size % 2:
            raise ConfigError(f"size: must be an even number >= 16, got {self.size}")
        if not -89.0 <= self.elevation <= 89.0:
            raise ConfigError(f"elevation: must be in [-89, 89] degrees, got {self.elevation}")
        if self.distance <= 0:
            raise ConfigError(f"distance: must be > 0, got {self.distance}")
        if not 0 < self.fovy < 180:
            raise ConfigError(f"fovy: must be in (0, 180) degrees, got {self.fovy}")
        if self.fps < 1:
            raise ConfigError(f"fps: must be >= 1, got {self.fps}")
        _check_formats(self.formats, VIDEO_FORMATS)


@dataclass
class ExportConfig:
    formats: List[str] = field(default_factory=lambda: ["glb", "obj"])
    mesh_resolution: int = 128       # grid size handed to rep.surface()
    texture_size: int = 1024         # texels per side of the albedo texture
    texture_padding: int = 4         # texels of dilation around every UV chart
    # target face count for decimation (0: off). On by default: marching-tets/cubes meshes
    # are oversampled and xatlas is superlinear (115k faces: ~140 s here, 20k: ~4 s)
    decimate_faces: int = 20000
    remove_floaters: bool = True     # drop disconnected components smaller than ...
    floater_diameter: float = 0.1    # ... this fraction of the mesh's bounding-box diagonal
    y_up: bool = False               # rotate z-up world to y-up (glTF) in the files
    turntable: TurntableConfig = field(default_factory=TurntableConfig)

    def __post_init__(self):
        _check_formats(self.formats, MESH_FORMATS)
        if self.mesh_resolution < 8:
            raise ConfigError(f"mesh_resolution: must be >= 8, got {self.mesh_resolution}")
        if not 16 <= self.texture_size <= 8192:
            raise ConfigError(f"texture_size: must be in [16, 8192], got {self.texture_size}")
        if self.texture_padding < 0:
            raise ConfigError(f"texture_padding: must be >= 0, got {self.texture_padding}")
        if self.decimate_faces < 0 or 0 < self.decimate_faces < 4:
            raise ConfigError("decimate_faces: must be 0 (off) or >= 4, got "
                              f"{self.decimate_faces}")
        if not 0.0 <= self.floater_diameter < 1.0:
            raise ConfigError(f"floater_diameter: must be in [0, 1), got {self.floater_diameter}")
        if isinstance(self.turntable, dict):
            self.turntable = TurntableConfig(**self.turntable)


def _check_formats(formats: List[str], allowed) -> None:
    from engine.errors import did_you_mean

    for f in formats:
        if f not in allowed:
            raise ConfigError(f"formats: '{f}' is not one of {', '.join(allowed)}"
                              f"{did_you_mean(f, allowed)}")


# ---------------------------------------------------------------------------------------
# texture baking (pure functions)
# ---------------------------------------------------------------------------------------

def rasterize_uv(uvs: Tensor, faces: Tensor, size: int):
    """Rasterise a mesh in UV space: texel (row, col) centre <-> surface point.

    Args:
        uvs: [V, 2] in [0, 1] (v = 0 at the bottom row); faces: [F, 3] long.
    Returns:
        :class:`representations.lib.rasterizer.Fragments` of one [size, size] view; row 0 of the
        image is v = 1 (the top of the texture image).
    """
    from representations.lib.rasterizer import rasterize

    ndc = uvs * 2.0 - 1.0
    clip = torch.cat([ndc, torch.zeros_like(ndc[:, :1]), torch.ones_like(ndc[:, :1])], dim=-1)
    return rasterize(clip[None], faces, size, size, backend="auto")


def dilate(image: Tensor, filled: Tensor, iterations: int) -> Tensor:
    """Grow the filled texels into empty ones, one ring per iteration (mean of the filled
    3x3 neighbours); texels still empty afterwards get the mean of the originally filled
    ones (so mip-maps of the gutters stay near the object's colours).

    Args:
        image: [H, W, C]; filled: [H, W] bool. Returns [H, W, C]. Not meant for gradients.
    """
    img = image.permute(2, 0, 1)[None] * filled[None, None].to(image.dtype)
    mask = filled[None, None].to(image.dtype)
    kernel = torch.ones(1, 1, 3, 3, dtype=image.dtype, device=image.device)
    C = image.shape[-1]
    for _ in range(iterations):
        s = Fn.conv2d(img, kernel.expand(C, 1, 3, 3), padding=1, groups=C)
        n = Fn.conv2d(mask, kernel, padding=1)
        grow = (n > 0) & (mask == 0)
        img = torch.where(grow, s / n.clamp_min(1), img)
        mask = torch.where(grow, torch.ones_like(mask), mask)
    out = img[0].permute(1, 2, 0)
    done = mask[0, 0] > 0
    if not bool(done.all()) and bool(filled.any()):
        out = torch.where(done[..., None], out, image[filled].mean(0))
    return out


@torch.no_grad()
def bake_texture(albedo_fn, vertices: Tensor, faces_uv: Tensor, uvs: Tensor, size: int,
                 padding: int, chunk: int = 65536) -> Tensor:
    """Albedo texture of a UV-mapped mesh.

    Args:
        albedo_fn: world points [N, 3] -> colours [N, 3] in [0, 1].
        vertices: [V, 3] world positions of the atlas vertices; faces_uv: [F, 3];
        uvs: [V, 2]. size: texels per side; padding: dilation rings.
    Returns:
        [size, size, 3] float in [0, 1], row 0 at the top (v = 1). Not differentiable.
    """
    from representations.lib.rasterizer import interpolate

    frags = rasterize_uv(uvs.to(vertices.dtype), faces_uv, size)
    points = interpolate(vertices, frags, faces_uv)[0]          # [size, size, 3]
    filled = frags.face_id[0] >= 0
    pts = points[filled]
    cols = [albedo_fn(pts[i:i + chunk]).float() for i in range(0, pts.shape[0], chunk)]
    image = torch.zeros(size, size, 3, device=vertices.device)
    if cols:
        image[filled] = torch.cat(cols).clamp(0.0, 1.0).to(image.device)
    return dilate(image, filled, padding)


# ---------------------------------------------------------------------------------------
# export
# ---------------------------------------------------------------------------------------

_Z_UP_TO_Y_UP = np.array([[1.0, 0.0, 0.0], [0.0, 0.0, 1.0], [0.0, -1.0, 0.0]])


def textured_mesh(vertices: np.ndarray, faces: np.ndarray, uvs: np.ndarray,
                  texture: np.ndarray, y_up: bool = False):
    """A trimesh.Trimesh carrying ``texture`` [H, W, 3] uint8 through ``uvs`` [V, 2]."""
    import trimesh
    from PIL import Image

    v = vertices @ _Z_UP_TO_Y_UP.T if y_up else vertices
    material = trimesh.visual.material.PBRMaterial(
        baseColorTexture=Image.fromarray(texture), metallicFactor=0.0, roughnessFactor=1.0,
        name="albedo")
    visual = trimesh.visual.TextureVisuals(uv=uvs, material=material)
    return trimesh.Trimesh(vertices=v, faces=faces, visual=visual, process=False)


def export_representation(rep, out_dir, cfg: ExportConfig,
                          device: Optional[torch.device] = None) -> Dict[str, str]:
    """Extract, clean, unwrap, texture and write the representation's surface.

    Args:
        rep: a Representation with ``surface(resolution)`` and ``albedo(points)``.
        out_dir: folder to write into (created). cfg: :class:`ExportConfig`.
    Returns:
        {"glb": path, "obj": path, "mtl": path, "texture": path} for the formats written.
    Raises:
        ValueError when the representation yields no surface.
    """
    from representations.lib.mesh import CleanupOptions, clean_mesh, uv_atlas

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    device = torch.device(device) if device is not None else _rep_device(rep)
    was_training = rep.training
    rep.eval()
    try:
        with torch.no_grad():
            verts, faces = rep.surface(cfg.mesh_resolution)
        verts = verts.detach().float().cpu().numpy()
        faces = faces.detach().long().cpu().numpy()
        verts, faces = clean_mesh(verts, faces, CleanupOptions(
            remove_floaters=cfg.remove_floaters, floater_diameter=cfg.floater_diameter,
            decimate_faces=cfg.decimate_faces))
        if faces.shape[0] == 0:
            # the trained stages are checkpointed already: say so, and which knob to turn
            raise RunAborted(f"{type(rep).__name__}.surface() gave no triangles to export: the "
                             "object is empty at the representation's surface threshold; lower "
                             "it (isosurface_threshold / init_threshold) or train longer, then "
                             "re-export with python -m engine.run resume=RUN_DIR")
        vmap, faces_uv, uvs = uv_atlas(verts, faces, cfg.texture_size,
                                       padding=max(1, cfg.texture_padding // 2))
        atlas_verts = verts[vmap]

        def albedo_fn(points):
            return rep.albedo(points.to(device))

        texture = bake_texture(albedo_fn, torch.from_numpy(atlas_verts).to(device),
                               torch.from_numpy(faces_uv).to(device),
                               torch.from_numpy(uvs).to(device), cfg.texture_size,
                               cfg.texture_padding)
    finally:
        rep.train(was_training)
    tex8 = (texture.cpu().numpy() * 255.0 + 0.5).astype(np.uint8)
    mesh = textured_mesh(atlas_verts, faces_uv, uvs, tex8, y_up=cfg.y_up)
    return write_mesh(mesh, out, cfg.formats)


def write_mesh(mesh, out: Path, formats: List[str], stem: str = "mesh") -> Dict[str, str]:
    """Write a textured trimesh as GLB and/or OBJ + MTL + PNG; returns the paths."""
    import trimesh
    from PIL import Image

    written: Dict[str, str] = {}
    if "glb" in formats:
        path = out / f"{stem}.glb"
        path.write_bytes(trimesh.exchange.gltf.export_glb(mesh))
        written["glb"] = str(path)
    if "obj" in formats:
        tex_name = f"{stem}_albedo.png"
        mtl_name = f"{stem}.mtl"
        obj_text, _ = trimesh.exchange.obj.export_obj(
            mesh, include_normals=True, include_texture=True, return_texture=True,
            mtl_name=mtl_name)
        (out / f"{stem}.obj").write_text(obj_text)
        used = re.search(r"^usemtl (\S+)", obj_text, flags=re.M)
        # our own MTL: full-white Kd (trimesh's default grey would darken the texture in
        # viewers that multiply) and a stable texture file name
        (out / mtl_name).write_text(
            f"newmtl {used.group(1) if used else 'albedo'}\n"
            "Ka 1.000 1.000 1.000\nKd 1.000 1.000 1.000\nKs 0.000 0.000 0.000\n"
            f"Ns 1.0\nillum 1\nd 1.0\nmap_Kd {tex_name}\n")
        Image.fromarray(_texture_image(mesh)).save(out / tex_name)
        written.update(obj=str(out / f"{stem}.obj"), mtl=str(out / mtl_name),
                       texture=str(out / tex_name))
    return written


def _texture_image(mesh) -> np.ndarray:
    material = mesh.visual.material
    image = getattr(material, "baseColorTexture", None) or getattr(material, "image", None)
    return np.asarray(image.convert("RGB"))


def _rep_device(rep) -> torch.device:
    for t in list(rep.parameters()) + list(rep.buffers()):
        return t.device
    return torch.device("cpu")


# ---------------------------------------------------------------------------------------
# turntable
# ---------------------------------------------------------------------------------------

def render_turntable(rep, out_dir, cfg: ExportConfig, background,
                     device: Optional[torch.device] = None, batch: int = 4,
                     stem: str = "turntable") -> Dict[str, str]:
    """Render an orbit of ``cfg.turntable.frames`` views and write MP4 / GIF.

    The representation is rendered in eval mode under ``torch.no_grad()``; ``background``
    is a Background module. Returns {"mp4": path, "gif": path} for the formats written
    (empty when the turntable is disabled).
    """
    import imageio.v2 as imageio_v2
    import imageio.v3 as iio

    tt = cfg.turntable
    if not tt.enabled:
        return {}
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    device = torch.device(device) if device is not None else _rep_device(rep)
    cams = orbit(tt.frames, tt.elevation, tt.distance, tt.fovy, device=device)
    step = StepInfo(stage="export", stage_index=0, step=0, stage_steps=1, global_step=0)
    modes = rep.training, background.training
    rep.eval()
    background.eval()
    frames = []
    try:
        with torch.no_grad():
            for i in range(0, tt.frames, batch):
                idx = list(range(i, min(i + batch, tt.frames)))
                rgb = rep.render(cams[idx], tt.size, tt.size, background=background,
                                 step=step)["rgb"]
                frames.append((rgb.clamp(0, 1) * 255.0 + 0.5).to(torch.uint8).cpu())
    finally:
        rep.train(modes[0])
        background.train(modes[1])
    video = torch.cat(frames).numpy()
    written: Dict[str, str] = {}
    if "gif" in tt.formats:
        path = out / f"{stem}.gif"
        iio.imwrite(path, video, duration=1000.0 / tt.fps, loop=0)
        written["gif"] = str(path)
    if "mp4" in tt.formats:
        path = out / f"{stem}.mp4"
        imageio_v2.mimwrite(path, list(video), fps=tt.fps, codec="libx264", quality=8,
                            macro_block_size=2, pixelformat="yuv420p")
        written["mp4"] = str(path)
    return written
