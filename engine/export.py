"""Export a trained representation: textured mesh (GLB, OBJ + MTL + PNG) and a turntable
video (MP4, GIF).

Works with any :class:`engine.plugin.Representation` that implements ``surface()`` and
``albedo()`` (mesh) and ``render()`` (turntable); nothing here knows a representation by name.

Pipeline: surface mesh -> clean-up (pymeshlab: floaters, close vertices, degenerate faces,
optional decimation) -> UV atlas (xatlas) -> albedo texture baked by rasterising the mesh in
UV space (each texel centre -> the 3D point of the surface it covers -> ``rep.albedo``) and
dilated into the gutters between charts so seams do not show under bilinear filtering and
mip-mapping -> files written with trimesh.

Frames of the files. The engine's world is z up, the input picture seen from +x
(``engine.cameras``). glTF defines +Y up and +Z as the front (towards a viewer's default
camera), so the GLB holds ``ENGINE_TO_Y_UP @ p``: file (X, Y, Z) = engine (y, z, x), a rotation
(det +1: handedness and triangle winding unchanged) that puts the object upright and its
pictured side towards the viewer. The OBJ uses the same y-up frame by default (what Blender's
and most tools' OBJ import expect) and says so in its first line; ``y_up: false`` writes it in
the engine's z-up frame. :func:`file_to_engine` undoes the file's frame when a file is read
back (``engine.evaluate`` does), so scores do not depend on it. The GLB carries vertex normals
(area-weighted, computed before the UV atlas splits vertices along seams, so seams stay smooth).
"""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np
import torch
import torch.nn.functional as Fn
from torch import Tensor

from engine.atomic import atomic_write, atomic_write_bytes, atomic_write_text
from engine.cameras import check_framing, orbit
from engine.errors import ConfigError, RunAborted, UserError
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
    # also a normal-shaded orbit (the same cameras) to turntable-normals.FORMAT: camera-space
    # normals as colours (right: red, up: green, towards the viewer: blue) over white. Needs
    # a representation whose render() returns "normal"; others skip it with a warning
    normals: bool = False

    def __post_init__(self):
        if self.frames < 1:
            raise ConfigError(f"frames: must be >= 1, got {self.frames}")
        if self.size < 16 or self.size % 2:
            raise ConfigError(f"size: must be an even number >= 16, got {self.size}")
        if not -89.0 <= self.elevation <= 89.0:
            raise ConfigError(f"elevation: must be in [-89, 89] degrees, got {self.elevation}")
        check_framing(self.distance, self.fovy)
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
    # the OBJ's up axis: +Y (true; Blender's and most tools' OBJ import) or the engine's +Z
    # (false). The GLB is always +Y up, as glTF defines it.
    y_up: bool = True
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


#: (module, pip package, what needs it): the libraries an export imports late, after training
EXPORT_LIBRARIES = {
    "mesh": [("pymeshlab", "pymeshlab", "the mesh clean-up"),
             ("xatlas", "xatlas", "the UV atlas")],
    "mp4": [("imageio_ffmpeg", "imageio-ffmpeg", "the MP4 turntable")],
}


def check_export_libraries(cfg: Optional[ExportConfig]) -> None:
    """Import the libraries ``cfg``'s export will need, so that a missing or broken one stops
    the run before training (one line) rather than after it. A library can be installed and
    still fail to import (pymeshlab without the system's libGL)."""
    import importlib

    if cfg is None:
        return
    needed = list(EXPORT_LIBRARIES["mesh"])         # the mesh is built for every export
    if cfg.turntable.enabled and "mp4" in cfg.turntable.formats:
        needed += EXPORT_LIBRARIES["mp4"]
    for module, package, purpose in needed:
        try:
            importlib.import_module(module)
        except ImportError as exc:
            other = (", or write GIF only: export.turntable.formats=[gif]" if module ==
                     "imageio_ffmpeg" else ", or skip the export: export=null")
            raise UserError(f"{purpose} needs {module}, which does not import ({exc}): "
                            f"pip install {package} (a missing .so file is a system library: "
                            f"install it with the system's package manager){other}") from None


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

# file (X, Y, Z) = engine (y, z, x): engine up (+z) -> +Y, the picture's viewpoint (+x) -> +Z
# (glTF's front), the picture's right (+y) -> +X. A cyclic permutation: a proper rotation.
ENGINE_TO_Y_UP = np.array([[0.0, 1.0, 0.0], [0.0, 0.0, 1.0], [1.0, 0.0, 0.0]])
# the OBJ's first line names its frame; file_to_engine reads it back
OBJ_Y_UP_LINE = "# up +Y (distill-engine: file X, Y, Z = engine y, z, x)"
OBJ_Z_UP_LINE = "# up +Z (distill-engine: the engine's frame)"
GLTF_EXTRAS_KEY = "distill_engine"


def file_to_engine(path) -> np.ndarray:
    """The rotation [3, 3] taking a mesh file's coordinates to the engine's z-up frame.

    glTF (.glb / .gltf) is +Y up by definition: any GLB, ours or another tool's, is turned by
    ``ENGINE_TO_Y_UP.T``. An OBJ whose first line is :data:`OBJ_Y_UP_LINE` (this module's
    default OBJ) likewise; any other OBJ or format is taken as z up (the engine's frame: the
    toy world's and ``examples/toy``'s reference meshes) and left as it is.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix in (".glb", ".gltf"):
        return ENGINE_TO_Y_UP.T.copy()
    if suffix == ".obj":
        try:
            with open(path, "r", encoding="utf-8", errors="replace") as f:
                head = f.readline().rstrip("\r\n")
        except OSError:
            head = ""
        if head == OBJ_Y_UP_LINE:
            return ENGINE_TO_Y_UP.T.copy()
    return np.eye(3)


def textured_mesh(vertices: np.ndarray, faces: np.ndarray, uvs: np.ndarray,
                  texture: np.ndarray, normals: Optional[np.ndarray] = None):
    """A trimesh.Trimesh carrying ``texture`` [H, W, 3] uint8 through ``uvs`` [V, 2], in the
    engine's frame, with vertex ``normals`` [V, 3] (default: trimesh's, from the faces)."""
    import trimesh
    from PIL import Image

    material = trimesh.visual.material.PBRMaterial(
        baseColorTexture=Image.fromarray(texture), metallicFactor=0.0, roughnessFactor=1.0,
        name="albedo")
    visual = trimesh.visual.TextureVisuals(uv=uvs, material=material)
    mesh = trimesh.Trimesh(vertices=vertices, faces=faces, visual=visual, process=False)
    if normals is None:
        normals = mesh.vertex_normals
    return trimesh.Trimesh(vertices=vertices, faces=faces, vertex_normals=normals,
                           visual=visual, process=False)


def rotated(mesh, rotation: np.ndarray):
    """A copy of a textured trimesh with vertices and normals turned by ``rotation`` [3, 3]
    (a proper rotation: the faces' winding keeps its meaning)."""
    import trimesh

    return trimesh.Trimesh(vertices=np.asarray(mesh.vertices) @ rotation.T,
                           faces=np.asarray(mesh.faces),
                           vertex_normals=np.asarray(mesh.vertex_normals) @ rotation.T,
                           visual=mesh.visual, process=False)


def outward(vertices: np.ndarray, faces: np.ndarray):
    """(faces, vertex normals [V, 3]) of a surface with its triangles wound outwards
    (counter-clockwise seen from outside, as glTF and OBJ expect): reversed when the signed
    volume is negative. The normals are trimesh's area-weighted ones."""
    import trimesh

    mesh = trimesh.Trimesh(vertices=vertices, faces=faces, process=False)
    if mesh.volume < 0:
        mesh = trimesh.Trimesh(vertices=vertices, faces=faces[:, ::-1].copy(), process=False)
    return np.asarray(mesh.faces), np.asarray(mesh.vertex_normals, dtype=np.float64)


def export_representation(rep, out_dir, cfg: ExportConfig,
                          device: Optional[torch.device] = None) -> Dict[str, str]:
    """Extract, clean, unwrap, texture and write the representation's surface.

    Args:
        rep: a Representation with ``surface(resolution)`` and ``albedo(points)``.
        out_dir: folder to write into (created). cfg: :class:`ExportConfig`.
    Returns:
        {"glb": path, "obj": path, "mtl": path, "texture": path} for the formats written,
        plus what the representation's optional ``export_files(out_dir)`` wrote (e.g.
        {"ply": path}).
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
        faces, normals = outward(verts, faces)
        vmap, faces_uv, uvs = uv_atlas(verts, faces, cfg.texture_size,
                                       padding=max(1, cfg.texture_padding // 2))
        atlas_verts = verts[vmap]
        # normals of the welded surface, so the atlas's seams do not show as creases
        normals = normals[vmap]

        def albedo_fn(points):
            return rep.albedo(points.to(device))

        texture = bake_texture(albedo_fn, torch.from_numpy(atlas_verts).to(device),
                               torch.from_numpy(faces_uv).to(device),
                               torch.from_numpy(uvs).to(device), cfg.texture_size,
                               cfg.texture_padding)
    finally:
        rep.train(was_training)
    tex8 = (texture.cpu().numpy() * 255.0 + 0.5).astype(np.uint8)
    mesh = textured_mesh(atlas_verts, faces_uv, uvs, tex8, normals=normals)
    written = write_mesh(mesh, out, cfg.formats, obj_y_up=cfg.y_up)
    # a representation's own files beside the mesh (Gaussians: a 3DGS .ply)
    export_files = getattr(rep, "export_files", None)
    if export_files is not None:
        written.update(export_files(out))
    return written


def _gltf_tree(tree: dict) -> None:
    """Finish trimesh's glTF tree: the asset's extras say which frame the file holds (glTF's
    +Y up) and how it maps to the engine's (for people and tools reading it;
    :func:`file_to_engine` needs no note), and every vertex / index buffer view gets the
    ``target`` the Khronos validator hints at."""
    asset = tree.setdefault("asset", {})
    asset["generator"] = "distill-engine (trimesh)"
    asset.setdefault("extras", {})[GLTF_EXTRAS_KEY] = {
        "up": "+Y", "front": "+Z", "engine_to_file": ENGINE_TO_Y_UP.tolist()}
    accessors, views = tree.get("accessors", []), tree.get("bufferViews", [])

    def target(accessor: int, kind: int) -> None:
        view = accessors[accessor].get("bufferView")
        if view is not None and "byteStride" not in views[view]:
            views[view].setdefault("target", kind)

    for mesh in tree.get("meshes", []):
        for prim in mesh.get("primitives", []):
            for accessor in prim.get("attributes", {}).values():
                target(accessor, 34962)                 # ARRAY_BUFFER
            if "indices" in prim:
                target(prim["indices"], 34963)          # ELEMENT_ARRAY_BUFFER


def write_mesh(mesh, out: Path, formats: List[str], stem: str = "mesh",
               obj_y_up: bool = True) -> Dict[str, str]:
    """Write a textured trimesh in the engine's frame as GLB (+Y up, with normals) and/or
    OBJ + MTL + PNG (+Y up unless ``obj_y_up`` is false); returns the paths."""
    import trimesh
    from PIL import Image

    y_up = rotated(mesh, ENGINE_TO_Y_UP)
    written: Dict[str, str] = {}
    if "glb" in formats:
        path = out / f"{stem}.glb"
        atomic_write_bytes(path, trimesh.exchange.gltf.export_glb(
            y_up, include_normals=True, tree_postprocessor=_gltf_tree))
        written["glb"] = str(path)
    if "obj" in formats:
        tex_name = f"{stem}_albedo.png"
        mtl_name = f"{stem}.mtl"
        obj_text, _ = trimesh.exchange.obj.export_obj(
            y_up if obj_y_up else mesh, include_normals=True, include_texture=True,
            return_texture=True, mtl_name=mtl_name)
        frame = OBJ_Y_UP_LINE if obj_y_up else OBJ_Z_UP_LINE
        # the texture and material first, the OBJ that names them last: a reader never
        # finds an OBJ whose texture is missing (each file is written atomically)
        texture = Image.fromarray(_texture_image(mesh))
        atomic_write(out / tex_name, lambda tmp: texture.save(tmp, format="PNG"))
        used = re.search(r"^usemtl (\S+)", obj_text, flags=re.M)
        # our own MTL: full-white Kd (trimesh's default grey would darken the texture in
        # viewers that multiply) and a stable texture file name
        atomic_write_text(out / mtl_name,
                          f"newmtl {used.group(1) if used else 'albedo'}\n"
                          "Ka 1.000 1.000 1.000\nKd 1.000 1.000 1.000\nKs 0.000 0.000 0.000\n"
                          f"Ns 1.0\nillum 1\nd 1.0\nmap_Kd {tex_name}\n")
        atomic_write_text(out / f"{stem}.obj", f"{frame}\n{obj_text}")
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

#: the normal-shaded turntable's file stem suffix: turntable-normals.mp4 / .gif
NORMALS_SUFFIX = "-normals"


def shade_normals(normal: Tensor, opacity: Tensor, c2w: Tensor) -> Tensor:
    """Camera-space normals as colours over white: [B, H, W, 3] in [0, 1].

    Args:
        normal: [B, H, W, 3] world-space normals (a volume's composited ones may be shorter
            than 1; they are normalised); opacity: [B, H, W, 1]; c2w: [B, 4, 4] OpenGL axes.
    Returns:
        ``opacity * (n_cam * 0.5 + 0.5) + (1 - opacity)``, n_cam = (right, up, towards the
        camera) components: a surface facing the viewer is (0.5, 0.5, 1), one facing the
        frame's right (1, 0.5, 0.5), one facing up (0.5, 1, 0.5).
    """
    rot = c2w[:, :3, :3].to(normal.dtype)                  # columns: right, up, back
    cam = torch.einsum("bji,bhwj->bhwi", rot, normal)      # R^T n
    cam = Fn.normalize(cam, dim=-1, eps=1e-8)
    a = opacity.clamp(0.0, 1.0).to(normal.dtype)
    return a * (cam * 0.5 + 0.5) + (1.0 - a)


def _write_video(video: np.ndarray, out: Path, stem: str, tt: TurntableConfig,
                 prefix: str = "") -> Dict[str, str]:
    import imageio.v2 as imageio_v2
    import imageio.v3 as iio

    written: Dict[str, str] = {}
    if "gif" in tt.formats:
        path = out / f"{stem}.gif"
        atomic_write(path, lambda tmp: iio.imwrite(tmp, video, duration=1000.0 / tt.fps,
                                                   loop=0))
        written[f"{prefix}gif"] = str(path)
    if "mp4" in tt.formats:
        path = out / f"{stem}.mp4"
        atomic_write(path, lambda tmp: imageio_v2.mimwrite(
            tmp, list(video), fps=tt.fps, codec="libx264", quality=8, macro_block_size=2,
            pixelformat="yuv420p"))
        written[f"{prefix}mp4"] = str(path)
    return written


def _to_uint8(images: Tensor) -> Tensor:
    return (images.clamp(0, 1) * 255.0 + 0.5).to(torch.uint8).cpu()


def render_turntable(rep, out_dir, cfg: ExportConfig, background,
                     device: Optional[torch.device] = None, batch: int = 4,
                     stem: str = "turntable") -> Dict[str, str]:
    """Render an orbit of ``cfg.turntable.frames`` views and write MP4 / GIF.

    The representation is rendered in eval mode under ``torch.no_grad()``; ``background``
    is a Background module. Returns {"mp4": path, "gif": path} for the formats written
    (empty when the turntable is disabled); with ``turntable.normals`` also
    {"normals-mp4": ..., "normals-gif": ...} (``STEM-normals.FORMAT``, see
    :func:`shade_normals`), unless the representation renders no ``normal`` (a warning on
    stderr then, and no normals files).
    """
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
    frames, normal_frames = [], []
    want_normals = tt.normals
    try:
        with torch.no_grad():
            for i in range(0, tt.frames, batch):
                idx = list(range(i, min(i + batch, tt.frames)))
                result = rep.render(cams[idx], tt.size, tt.size, background=background,
                                    step=step)
                frames.append(_to_uint8(result["rgb"]))
                if want_normals and "normal" not in result:
                    print(f"warning: export.turntable.normals: {type(rep).__name__}.render() "
                          "returns no normals; the normal-shaded turntable is not written",
                          file=sys.stderr)
                    want_normals = False
                if want_normals:
                    normal_frames.append(_to_uint8(shade_normals(
                        result["normal"].float(), result["opacity"].float(),
                        cams[idx].c2w.float())))
    finally:
        rep.train(modes[0])
        background.train(modes[1])
    written = _write_video(torch.cat(frames).numpy(), out, stem, tt)
    if want_normals:
        written.update(_write_video(torch.cat(normal_frames).numpy(), out,
                                    stem + NORMALS_SUFFIX, tt, prefix="normals-"))
    return written
