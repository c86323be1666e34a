"""Export: mesh clean-up, texture baking, GLB / OBJ files that re-load with their texture,
turntable videos, config validation."""

import imageio.v2 as imageio_v2
import imageio.v3 as iio
import numpy as np
import pytest
import torch
import trimesh
from torch import nn

from engine.config import validate
from engine.errors import ConfigError
from engine.export import (ExportConfig, TurntableConfig, bake_texture, dilate,
                           export_representation, render_turntable)
from engine.plugin import Representation
from representations.backgrounds import SolidBackground
from representations.lib.mesh import CleanupOptions, clean_mesh, normalize_vertices
from representations.lib.mesh_render import render_mesh


def smooth_colour(points):
    return (0.5 + 0.5 * points / 0.6).clamp(0, 1)


def red_blue(points):
    red = torch.tensor([1.0, 0.0, 0.0]).to(points)
    blue = torch.tensor([0.0, 0.0, 1.0]).to(points)
    return torch.where(points[:, :1] > 0, red, blue)


class StubRep(Representation):
    """An icosphere of radius 0.6 with an analytic colour field, plus a tiny floater."""

    def __init__(self, colour=smooth_colour, floater=True):
        super().__init__()
        self.colour = colour
        self.floater = floater
        self.scale = nn.Parameter(torch.ones(()))

    def surface(self, resolution):
        s = trimesh.creation.icosphere(subdivisions=3, radius=0.6)
        v, f = s.vertices, s.faces
        if self.floater:
            bit = trimesh.creation.icosphere(subdivisions=1, radius=0.02)
            v = np.concatenate([v, bit.vertices + [0.9, 0.0, 0.0]])
            f = np.concatenate([f, bit.faces + len(s.vertices)])
        return torch.tensor(v, dtype=torch.float32) * self.scale, torch.tensor(f)

    def albedo(self, points):
        return self.colour(points)

    def render(self, cameras, height, width, *, background, step):
        v, f = self.surface(0)
        return render_mesh(v, f, cameras, height, width, background=background,
                           color_fn=self.albedo)

    def param_groups(self):
        return {"mesh": [self.scale]}


def _bilinear(image, uv):
    """Sample an [H, W, 3] image at OBJ-convention uvs (v = 0 at the bottom row)."""
    h, w = image.shape[:2]
    x = np.clip(uv[:, 0] * w - 0.5, 0, w - 1)
    y = np.clip((1.0 - uv[:, 1]) * h - 0.5, 0, h - 1)
    x0, y0 = np.floor(x).astype(int), np.floor(y).astype(int)
    x1, y1 = np.minimum(x0 + 1, w - 1), np.minimum(y0 + 1, h - 1)
    fx, fy = (x - x0)[:, None], (y - y0)[:, None]
    top = image[y0, x0] * (1 - fx) + image[y0, x1] * fx
    bottom = image[y1, x0] * (1 - fx) + image[y1, x1] * fx
    return top * (1 - fy) + bottom * fy


def _texture_of(mesh):
    mat = mesh.visual.material
    img = getattr(mat, "baseColorTexture", None) or getattr(mat, "image", None)
    assert img is not None
    return np.asarray(img.convert("RGB"), dtype=np.float64) / 255.0


def _reload(path):
    mesh = trimesh.load(path, force="mesh")
    assert isinstance(mesh.visual, trimesh.visual.TextureVisuals)
    assert mesh.visual.uv is not None and len(mesh.visual.uv) == len(mesh.vertices)
    return mesh


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    out = tmp_path_factory.mktemp("export")
    cfg = ExportConfig(texture_size=256, mesh_resolution=16)
    paths = export_representation(StubRep(), out, cfg, device="cpu")
    return paths


def test_export_writes_files_that_reload_with_texture(exported):
    assert set(exported) == {"glb", "obj", "mtl", "texture"}
    for key in ("glb", "obj"):
        mesh = _reload(exported[key])
        # the floater is gone, the sphere is intact and closed
        assert mesh.vertices.max(axis=0)[0] < 0.7
        assert abs(mesh.bounding_box.extents - 1.2).max() < 0.02
        tex = _texture_of(mesh)
        assert tex.shape == (256, 256, 3)
        sampled = _bilinear(tex, mesh.visual.uv)
        truth = smooth_colour(torch.tensor(mesh.vertices)).numpy()
        err = np.abs(sampled - truth)
        assert err.mean() < 0.01, (key, err.mean())
        assert err.max() < 0.06, (key, err.max())
    assert "map_Kd mesh_albedo.png" in open(exported["mtl"]).read()


def test_export_red_blue_texture(tmp_path):
    cfg = ExportConfig(texture_size=128, mesh_resolution=16, formats=["glb"])
    paths = export_representation(StubRep(red_blue, floater=False), tmp_path, cfg)
    assert set(paths) == {"glb"}
    mesh = _reload(paths["glb"])
    sampled = _bilinear(_texture_of(mesh), mesh.visual.uv)
    truth = red_blue(torch.tensor(mesh.vertices)).numpy()
    away = np.abs(mesh.vertices[:, 0]) > 0.05          # vertices on the x = 0 seam are ambiguous
    assert np.abs(sampled - truth)[away].mean() < 0.02


def test_export_decimates_to_budget(tmp_path):
    cfg = ExportConfig(texture_size=64, formats=["obj"], decimate_faces=200)
    paths = export_representation(StubRep(floater=False), tmp_path, cfg)
    mesh = trimesh.load(paths["obj"], force="mesh", process=True)
    assert mesh.faces.shape[0] <= 200


def test_bake_texture_reproduces_an_affine_field_exactly():
    # a unit square in the z = 0 plane whose uv is its own (x, y): texel centres map to
    # known points, where an affine colour field must come back exactly
    v = torch.tensor([[0.0, 0, 0], [1, 0, 0], [1, 1, 0], [0, 1, 0]], dtype=torch.float64)
    f = torch.tensor([[0, 1, 2], [0, 2, 3]])
    uv = v[:, :2].clone()
    tex = bake_texture(lambda p: torch.stack([p[:, 0], p[:, 1], 1 - p[:, 0]], -1), v, f, uv,
                       size=8, padding=0)
    centres = (torch.arange(8, dtype=torch.float64) + 0.5) / 8
    x = centres[None, :].expand(8, 8)
    y = centres.flip(0)[:, None].expand(8, 8)          # row 0 is v = 1
    expected = torch.stack([x, y, 1 - x], -1).float()
    assert torch.allclose(tex, expected, atol=1e-6)


def test_dilate_grows_rings_then_fills_with_mean():
    img = torch.zeros(5, 5, 3)
    filled = torch.zeros(5, 5, dtype=torch.bool)
    img[2, 2] = torch.tensor([1.0, 0.5, 0.25])
    filled[2, 2] = True
    out = dilate(img, filled, 1)
    assert torch.allclose(out, torch.tensor([1.0, 0.5, 0.25]).expand(5, 5, 3))
    img[0, 0] = torch.tensor([0.0, 0.0, 1.0])
    filled[0, 0] = True
    out = dilate(img, filled, 1)
    # (1, 1) touches both seeds: the mean of the two; (4, 4) is out of reach: global mean
    assert torch.allclose(out[1, 1], torch.tensor([0.5, 0.25, 0.625]))
    assert torch.allclose(out[4, 4], torch.tensor([0.5, 0.25, 0.625]))
    assert torch.allclose(out[0, 1], torch.tensor([0.0, 0.0, 1.0]))
    assert torch.allclose(out[2, 3], torch.tensor([1.0, 0.5, 0.25]))


def test_clean_mesh_floaters_merge_and_decimation():
    sphere = trimesh.creation.icosphere(subdivisions=3)
    bit = trimesh.creation.icosphere(subdivisions=1, radius=0.05)
    v = np.concatenate([sphere.vertices, bit.vertices + 3.0])
    f = np.concatenate([sphere.faces, bit.faces + len(sphere.vertices)])
    cv, cf = clean_mesh(v, f)
    assert cf.shape == sphere.faces.shape and cv.shape == sphere.vertices.shape
    # a triangle soup (every face with its own vertices) is welded back together
    soup_v = sphere.vertices[sphere.faces.reshape(-1)]
    soup_f = np.arange(soup_v.shape[0]).reshape(-1, 3)
    wv, wf = clean_mesh(soup_v, soup_f)
    assert wv.shape[0] == sphere.vertices.shape[0]
    assert trimesh.Trimesh(wv, wf).is_watertight
    # degenerate faces go
    dv, df = clean_mesh(sphere.vertices, np.concatenate([sphere.faces, [[0, 0, 1]]]))
    assert df.shape[0] == sphere.faces.shape[0]
    # decimation to a face budget keeps a closed surface of about the same volume
    sv, sf = clean_mesh(v, f, CleanupOptions(decimate_faces=300))
    m = trimesh.Trimesh(sv, sf)
    assert sf.shape[0] <= 300 and m.is_watertight
    assert m.volume == pytest.approx(sphere.volume, rel=0.05)
    # floater removal off keeps the bit
    kv, kf = clean_mesh(v, f, CleanupOptions(remove_floaters=False))
    assert kf.shape[0] == f.shape[0]


def test_normalize_vertices():
    v = np.array([[0.0, 0, 0], [2, 1, 0], [1, 4, 2]])
    n = normalize_vertices(v)
    assert np.allclose(n.max(0) - n.min(0), [0.5, 1.0, 0.5])
    assert np.allclose(n.max(0) + n.min(0), 0)


def test_turntable_writes_gif_and_mp4_with_the_frame_count(tmp_path):
    cfg = ExportConfig(turntable=TurntableConfig(frames=6, size=32, fps=6))
    rep = StubRep(floater=False)
    rep.train()
    paths = render_turntable(rep, tmp_path, cfg, SolidBackground(), device="cpu")
    assert rep.training                                   # mode restored
    assert set(paths) == {"gif", "mp4"}
    gif = iio.imread(paths["gif"], index=None)
    assert gif.shape[0] == 6 and gif.shape[1:3] == (32, 32)
    reader = imageio_v2.get_reader(paths["mp4"])
    assert reader.count_frames() == 6
    frame = reader.get_data(0)
    reader.close()
    assert frame.shape[:2] == (32, 32)
    # the object is in the middle of the frame, the white background at the corners
    assert gif[0, 0, 0, :3].min() > 240 and gif[0, 16, 16, :3].min() < 200
    off = ExportConfig(turntable=TurntableConfig(enabled=False))
    assert render_turntable(rep, tmp_path / "off", off, SolidBackground()) == {}


def test_config_validation_names_the_field():
    with pytest.raises(ConfigError, match="formats: 'fbx'"):
        ExportConfig(formats=["fbx"])
    with pytest.raises(ConfigError, match="texture_size"):
        ExportConfig(texture_size=4)
    with pytest.raises(ConfigError, match="decimate_faces"):
        ExportConfig(decimate_faces=-1)
    with pytest.raises(ConfigError, match="turntable.size"):
        validate(ExportConfig, {"turntable": {"size": 33}})
    with pytest.raises(ConfigError, match="formats: 'webm'"):
        validate(ExportConfig, {"turntable": {"formats": ["webm"]}})
    cfg = validate(ExportConfig, {"formats": ["obj"], "turntable": {"frames": 12}})
    assert cfg.formats == ["obj"] and cfg.turntable.frames == 12
    assert isinstance(ExportConfig(turntable={"frames": 3}).turntable, TurntableConfig)


def test_y_up_rotation():
    from engine.export import textured_mesh

    v = np.array([[0.0, 0, 1], [1, 0, 0], [0, 1, 0]])
    tex = np.zeros((4, 4, 3), dtype=np.uint8)
    m = textured_mesh(v, np.array([[0, 1, 2]]), np.zeros((3, 2)), tex, y_up=True)
    assert np.allclose(m.vertices, [[0, 1, 0], [1, 0, 0], [0, 0, -1]])
    assert np.allclose(textured_mesh(v, np.array([[0, 1, 2]]), np.zeros((3, 2)), tex).vertices, v)
