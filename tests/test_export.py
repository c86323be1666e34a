"""Export: mesh clean-up, texture baking, GLB / OBJ files that re-load with their texture,
turntable videos, config validation."""

import imageio.v2 as imageio_v2
import imageio.v3 as iio
import numpy as np
import pytest
import torch
import trimesh
from torch import nn

from engine.cameras import orbit
from engine.config import validate
from engine.errors import ConfigError
from engine.export import (ENGINE_TO_Y_UP, ExportConfig, TurntableConfig, bake_texture, dilate,
                           export_representation, file_to_engine, render_turntable)
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


def _reload(path, engine_frame=True):
    """The file as trimesh reads it; with ``engine_frame``, turned back to the engine's z up."""
    mesh = trimesh.load(path, force="mesh")
    assert isinstance(mesh.visual, trimesh.visual.TextureVisuals)
    assert mesh.visual.uv is not None and len(mesh.visual.uv) == len(mesh.vertices)
    if engine_frame:
        turn = np.eye(4)
        turn[:3, :3] = file_to_engine(path)
        mesh.apply_transform(turn)
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


def test_the_normal_pass_writes_camera_space_normals_of_a_sphere(tmp_path):
    """turntable.normals: turntable-normals.gif / .mp4 beside the colour ones, the same
    frames, but shaded by the camera-space normal: a sphere's centre faces the viewer
    (blue), its right edge points right (red), its top points up (green)."""
    size, frames = 64, 4
    cfg = ExportConfig(turntable=TurntableConfig(frames=frames, size=size, fps=4,
                                                 normals=True))
    rep = StubRep(colour=red_blue, floater=False)
    paths = render_turntable(rep, tmp_path, cfg, SolidBackground(), device="cpu")
    assert set(paths) == {"gif", "mp4", "normals-gif", "normals-mp4"}
    assert paths["normals-gif"] == str(tmp_path / "turntable-normals.gif")
    colour = iio.imread(paths["gif"], index=None)[..., :3].astype(int)
    normals = iio.imread(paths["normals-gif"], index=None)[..., :3].astype(int)
    assert normals.shape == colour.shape == (frames, size, size, 3)
    reader = imageio_v2.get_reader(paths["normals-mp4"])
    assert reader.count_frames() == frames
    reader.close()
    # a different picture: the colour pass is red/blue albedo, this one normals
    assert np.abs(normals - colour).mean() > 30
    # the decoded colours are the sphere's normals (ray-sphere intersections, radius 0.6)
    # in camera space, within the icosphere's facets and the GIF palette
    cams = orbit(frames, 15.0, 2.5, 40.0)
    origins, dirs = cams.rays(size, size)
    b = (origins * dirs).sum(-1)
    disc = b ** 2 - ((origins ** 2).sum(-1) - 0.6 ** 2)
    inside = disc > 0.6 ** 2 * 0.2 ** 2           # off the rim: antialiasing mixes in white
    t = -b - disc.clamp_min(0).sqrt()
    world = (origins + t[..., None] * dirs) / 0.6
    expected = torch.einsum("bji,bhwj->bhwi", cams.c2w[:, :3, :3], world)
    decoded = torch.nn.functional.normalize(torch.tensor(normals / 255.0 * 2 - 1).float(),
                                            dim=-1)
    cos = (decoded * expected).sum(-1)[inside]
    assert inside.sum() > frames * 400
    assert cos.min() > np.cos(np.radians(12)) and cos.mean() > np.cos(np.radians(4))
    # and the way a person reads it: the centre faces the viewer (blue), the right edge
    # points right (red), the top up (green); white where there is no object
    c, r = size // 2, 16
    for f in range(frames):
        assert normals[f, c, c, 2] > 240
        assert normals[f, c, c + r, 0] > 190 and normals[f, c, c - r, 0] < 65
        assert normals[f, c - r, c, 1] > 190 and normals[f, c + r, c, 1] < 65
        assert normals[f, 0, 0].min() > 250
    # the pictures of the colour pass are those of the turntable without normals
    plain = render_turntable(rep, tmp_path / "plain", ExportConfig(
        turntable=TurntableConfig(frames=frames, size=size, fps=4)), SolidBackground(),
        device="cpu")
    assert set(plain) == {"gif", "mp4"}
    assert np.array_equal(iio.imread(plain["gif"], index=None)[..., :3].astype(int), colour)


def test_the_normal_pass_is_skipped_with_a_warning_without_normals(tmp_path, capsys):
    class NoNormals(StubRep):
        def render(self, cameras, height, width, *, background, step):
            out = super().render(cameras, height, width, background=background, step=step)
            return {"rgb": out["rgb"], "opacity": out["opacity"]}

    cfg = ExportConfig(turntable=TurntableConfig(frames=2, size=16, formats=["gif"],
                                                 normals=True))
    paths = render_turntable(NoNormals(floater=False), tmp_path, cfg, SolidBackground(),
                             device="cpu")
    assert set(paths) == {"gif"}
    assert not (tmp_path / "turntable-normals.gif").exists()
    err = capsys.readouterr().err
    assert err.startswith("warning: export.turntable.normals: NoNormals.render() returns no")


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




# -- the files' frames: GLB and OBJ +Y up, normals, evaluation unchanged ---------------------

class MeshRep(StubRep):
    """A fixed triangle mesh (engine frame) with the smooth colour field."""

    def __init__(self, mesh):
        super().__init__(floater=False)
        self.mesh = mesh

    def surface(self, resolution):
        return (torch.tensor(self.mesh.vertices, dtype=torch.float32),
                torch.tensor(np.ascontiguousarray(self.mesh.faces)))


def tall_box():
    """A box 0.2 deep (x, towards the picture's camera), 0.3 wide (y), 1.0 tall (z), with a
    bump on its front face so no rotation maps it onto itself."""
    box = trimesh.creation.box(extents=(0.2, 0.3, 1.0))
    bump = trimesh.creation.box(extents=(0.1, 0.1, 0.1))
    bump.apply_translation((0.14, 0.0, 0.3))
    return trimesh.util.concatenate([box, bump])


def _glb_json(path) -> dict:
    import json
    import struct

    data = open(path, "rb").read()
    length, kind = struct.unpack_from("<I4s", data, 12)
    assert kind == b"JSON"
    return json.loads(data[20:20 + length])


def _as_written(path):
    """The one mesh of a file with the normals it stores (force="mesh" would drop them), in
    the file's own frame, as a viewer reads it."""
    loaded = trimesh.load(path, process=False)
    if isinstance(loaded, trimesh.Scene):
        assert len(loaded.geometry) == 1
        node = loaded.graph.nodes_geometry[0]
        assert np.allclose(loaded.graph[node][0], np.eye(4))    # no node transform
        loaded = next(iter(loaded.geometry.values()))
    assert "vertex_normals" in loaded._cache                      # read from the file
    return loaded


def _assert_box_outward(mesh, half):
    """Faces wound outwards (positive signed volume); at the main box's corners (``half``:
    its half extents in the file's frame) the normal points out of the corner, along all
    three axes: normals welded across the atlas's seams and outward."""
    n = np.asarray(mesh.vertex_normals)
    assert np.allclose(np.linalg.norm(n, axis=1), 1.0, atol=1e-4)
    corner = np.all(np.isclose(np.abs(mesh.vertices), half, atol=1e-5), axis=1)
    assert corner.sum() >= 8
    assert np.array_equal(np.sign(n[corner]), np.sign(mesh.vertices[corner]))
    assert mesh.volume > 0


@pytest.fixture(scope="module")
def box_files(tmp_path_factory):
    out = tmp_path_factory.mktemp("box")
    cfg = ExportConfig(texture_size=64, decimate_faces=0, remove_floaters=False,
                       turntable=TurntableConfig(enabled=False))
    paths = export_representation(MeshRep(tall_box()), out / "y", cfg, device="cpu")
    cfg.y_up = False
    z_paths = export_representation(MeshRep(tall_box()), out / "z", cfg, device="cpu")
    source = out / "source.obj"
    tall_box().export(source)                    # the engine's own frame, as examples/toy/*.obj
    return paths, z_paths["obj"], source


def test_the_engine_frame_maps_to_gltf_by_a_rotation_with_the_picture_in_front():
    from engine.cameras import orbit

    assert np.allclose(ENGINE_TO_Y_UP @ ENGINE_TO_Y_UP.T, np.eye(3))
    assert np.linalg.det(ENGINE_TO_Y_UP) == pytest.approx(1.0)        # no mirror
    # the input picture's camera (azimuth 0, elevation 0): its right, up and backward axes
    # become glTF's +X, +Y, +Z, where a viewer's default camera sits
    c2w = orbit(1, elevation_deg=0.0).c2w[0, :3, :3].double().numpy()
    assert np.allclose(ENGINE_TO_Y_UP @ c2w, np.eye(3), atol=1e-6)


def test_glb_stands_upright_with_outward_normals(box_files):
    glb = box_files[0]["glb"]
    mesh = _as_written(glb)
    ext = mesh.bounding_box.extents
    assert int(np.argmax(ext)) == 1 and ext[1] == pytest.approx(1.0, abs=1e-4)   # tall along +Y
    assert ext[2] == pytest.approx(0.2 + 0.09, abs=1e-4)      # the picture's depth along Z
    # the bump (the side the picture shows) faces the viewer's default camera at +Z
    assert mesh.vertices[:, 2].max() == pytest.approx(0.19, abs=1e-4)
    assert mesh.vertices[:, 2].min() == pytest.approx(-0.1, abs=1e-4)
    doc = _glb_json(glb)
    assert all("NORMAL" in p["attributes"] for m in doc["meshes"] for p in m["primitives"])
    assert doc["asset"]["extras"]["distill_engine"]["up"] == "+Y"
    _assert_box_outward(mesh, (0.15, 0.5, 0.1))


def test_obj_is_y_up_by_default_and_z_up_on_request(box_files):
    paths, z_obj, _ = box_files
    y_mesh, z_mesh = _as_written(paths["obj"]), _as_written(z_obj)
    assert int(np.argmax(y_mesh.bounding_box.extents)) == 1
    assert int(np.argmax(z_mesh.bounding_box.extents)) == 2
    assert open(paths["obj"]).readline().startswith("# up +Y")
    assert open(z_obj).readline().startswith("# up +Z")
    _assert_box_outward(y_mesh, (0.15, 0.5, 0.1))
    _assert_box_outward(z_mesh, (0.1, 0.15, 0.5))
    assert np.allclose(file_to_engine(paths["obj"]), ENGINE_TO_Y_UP.T)
    assert np.allclose(file_to_engine(z_obj), np.eye(3))


def test_evaluating_an_export_against_its_source_scores_zero(box_files):
    from engine.evaluate.metrics import compare_files, compare_meshes, load_mesh

    paths, z_obj, source = box_files
    for pred in (paths["glb"], paths["obj"], z_obj):
        assert np.allclose(load_mesh(pred).bounds, load_mesh(str(source)).bounds, atol=1e-5)
        s = compare_files(pred, str(source), samples=2000, icp=False)
        assert s.chamfer < 1e-3 and s.volume_iou > 0.97, (pred, s)
    # the check has teeth: the GLB read without undoing its frame scores far off
    raw = compare_meshes(trimesh.load(paths["glb"], force="mesh"), load_mesh(str(source)),
                         samples=2000, icp=False)
    assert raw.chamfer > 0.02


def test_inward_wound_surfaces_are_exported_outward(tmp_path):
    box = tall_box()
    inward = trimesh.Trimesh(box.vertices, box.faces[:, ::-1], process=False)
    assert inward.volume < 0
    cfg = ExportConfig(texture_size=64, decimate_faces=0, formats=["glb"],
                       turntable=TurntableConfig(enabled=False))
    paths = export_representation(MeshRep(inward), tmp_path, cfg, device="cpu")
    _assert_box_outward(_as_written(paths["glb"]), (0.15, 0.5, 0.1))


def test_sphere_normals_are_smooth_and_outward(exported):
    mesh = _as_written(exported["glb"])
    v = np.asarray(mesh.vertices)
    cos = np.einsum("ij,ij->i", np.asarray(mesh.vertex_normals), v / np.linalg.norm(v, axis=1,
                                                                                    keepdims=True))
    assert cos.min() > 0.98, cos.min()        # no creases along the atlas's seams
