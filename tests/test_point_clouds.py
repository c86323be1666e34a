"""Coloured clouds (engine.datasets.point_clouds): sampling a known mesh, Point-E's units, the
.ply writer and reader, and the reader's one-line refusals."""

import numpy as np
import pytest
import trimesh

from engine.datasets import point_clouds as pc
from engine.errors import InputError


def two_colour_box():
    """A 0.8 x 0.4 x 0.6 box centred at (0.2, 0, 0): its top face (z = 0.3) red, the rest blue."""
    box = trimesh.creation.box(extents=[0.8, 0.4, 0.6])
    box.apply_translation([0.2, 0.0, 0.0])
    top = box.triangles_center[:, 2] > 0.29
    colours = np.tile([0, 0, 255, 255], (len(box.faces), 1)).astype(np.uint8)
    colours[top] = [255, 0, 0, 255]
    box.visual.face_colors = colours
    return box, top


def test_samples_lie_on_the_surface_with_the_surface_colour():
    box, _ = two_colour_box()
    cloud = pc.sample_surface(box, 2000, seed=3)
    assert cloud.shape == (2000, 6) and cloud.dtype == np.float32
    xyz = cloud[:, :3] - [0.2, 0.0, 0.0]
    half = np.array([0.4, 0.2, 0.3])
    # on the surface: inside the box and on at least one face plane
    assert np.all(np.abs(xyz) <= half + 1e-5)
    assert np.all(np.min(np.abs(np.abs(xyz) - half), axis=1) < 1e-5)
    on_top = np.abs(xyz[:, 2] - 0.3) < 1e-5
    assert np.allclose(cloud[on_top, 3:], [1, 0, 0])
    assert np.allclose(cloud[~on_top, 3:], [0, 0, 1])
    # uniform by area: the top (0.32 of 2.08 m^2) gets its share
    assert abs(on_top.mean() - 0.32 / 2.08) < 0.03
    # seeded
    assert np.array_equal(cloud, pc.sample_surface(box, 2000, seed=3))
    assert not np.array_equal(cloud, pc.sample_surface(box, 2000, seed=4))


def test_vertex_colours_are_interpolated_and_grey_without_colours():
    tri = trimesh.Trimesh([[0, 0, 0], [1, 0, 0], [0, 1, 0]], [[0, 1, 2]], process=False)
    tri.visual.vertex_colors = [[255, 0, 0, 255], [0, 255, 0, 255], [0, 0, 255, 255]]
    cloud = pc.sample_surface(tri, 500, seed=0)
    # barycentric: each colour is the weight of its vertex, so they sum to 1 and follow xyz
    assert np.allclose(cloud[:, 3:].sum(1), 1.0, atol=1e-5)
    assert np.allclose(cloud[:, 4], cloud[:, 0], atol=1e-5)     # green weight = x
    assert np.allclose(cloud[:, 5], cloud[:, 1], atol=1e-5)     # blue weight = y
    plain = trimesh.creation.icosphere(subdivisions=1)
    plain.visual = trimesh.visual.ColorVisuals()
    grey = pc.sample_surface(plain, 50)
    assert np.allclose(grey[:, 3:], 0.5)


def test_toy_mesh_cloud_in_pointe_units():
    """A toy object's farthest point is 0.8 from its centre: 0.5 in Point-E's units."""
    mesh = trimesh.load("examples/toy/red-mug.obj", process=False, force="mesh")
    cloud = pc.sample_surface(mesh, 4096, seed=0)
    inner = pc.to_pointe(cloud)
    assert np.linalg.norm(inner[:, :3], axis=1).max() <= 0.5 + 1e-4
    assert np.linalg.norm(inner[:, :3], axis=1).max() > 0.45
    assert np.allclose(pc.from_pointe(inner)[:, :3], cloud[:, :3], atol=1e-6)
    assert np.allclose(inner[:, 3:], cloud[:, 3:])
    # the mug's body is red (the mesh's vertex colour): most of the cloud is exactly that
    red = np.abs(cloud[:, 3:] - [0.851, 0.129, 0.122]).max(1) < 0.005
    assert red.mean() > 0.7


def test_rotate_z_turns_x_towards_y():
    a = np.array([[1.0, 0.0, 0.5, 0.1, 0.2, 0.3]])
    b = pc.rotate_z(a, 90.0)
    assert np.allclose(b, [[0.0, 1.0, 0.5, 0.1, 0.2, 0.3]], atol=1e-12)
    import torch

    t = pc.rotate_z(torch.tensor(a), -90.0)
    assert np.allclose(t.numpy(), [[0.0, -1.0, 0.5, 0.1, 0.2, 0.3]], atol=1e-12)


def test_ply_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    cloud = np.concatenate([rng.normal(size=(300, 3)), rng.random((300, 3))], 1)
    path = pc.write_ply(tmp_path / "c.ply", cloud)
    raw = path.read_bytes()
    header = raw[:raw.index(b"end_header\n")].decode("ascii")
    assert "format binary_little_endian 1.0" in header
    for prop in ("float x", "float y", "float z", "uchar red", "uchar green", "uchar blue"):
        assert f"property {prop}" in header
    assert len(raw) - len(header) - len("end_header\n") == 300 * 15
    back = pc.read_cloud(path)
    assert back.shape == (300, 6)
    assert np.allclose(back[:, :3], cloud[:, :3], atol=1e-6)
    assert np.allclose(back[:, 3:], np.round(cloud[:, 3:] * 255) / 255, atol=1e-6)
    # trimesh reads it too, as a point cloud with colours
    loaded = trimesh.load(path)
    assert len(loaded.vertices) == 300
    # .npy in 0..255 or [0, 1], and [N, 3] (grey)
    np.save(tmp_path / "a.npy", np.concatenate([cloud[:, :3], cloud[:, 3:] * 255], 1))
    assert np.allclose(pc.read_cloud(tmp_path / "a.npy")[:, 3:], cloud[:, 3:], atol=1e-6)
    np.save(tmp_path / "b.npy", cloud[:, :3])
    assert np.allclose(pc.read_cloud(tmp_path / "b.npy")[:, 3:], 0.5)


@pytest.mark.parametrize("make, words", [
    (lambda p: None, "no such file"),
    (lambda p: p.with_suffix(".ply").write_bytes(b"\x00\x01 not a ply at all"), "not a PLY"),
    (lambda p: p.with_suffix(".txt").write_text("1 2 3"), "expected .ply or .npy"),
    (lambda p: np.save(p.with_suffix(".npy"), np.zeros((5, 4))), "[5, 4]"),
    (lambda p: np.save(p.with_suffix(".npy"), np.zeros((0, 3))), "[0, 3]"),
    (lambda p: np.save(p.with_suffix(".npy"), np.full((4, 3), np.nan)), "NaN"),
    (lambda p: np.save(p.with_suffix(".npy"), np.array(["a", "b"])), "expected a cloud"),
])
def test_bad_cloud_files_are_one_line(tmp_path, make, words):
    base = tmp_path / "cloud"
    make(base)
    found = [p for p in tmp_path.iterdir()] or [base.with_suffix(".ply")]
    with pytest.raises(InputError) as exc:
        pc.read_cloud(found[0])
    message = str(exc.value)
    assert words in message and "\n" not in message


def test_truncated_ply_is_refused(tmp_path):
    path = pc.write_ply(tmp_path / "c.ply", np.random.default_rng(0).random((100, 6)))
    path.write_bytes(path.read_bytes()[:-700])
    with pytest.raises(InputError) as exc:
        pc.read_cloud(path)
    assert "\n" not in str(exc.value)


def test_chamfer_and_yaw_search():
    box, _ = two_colour_box()
    a = pc.sample_surface(box, 1000, seed=0)
    b = pc.sample_surface(box, 1000, seed=1)
    assert pc.chamfer(a, b) < 0.03
    assert pc.chamfer(a, a) == 0.0
    turned = pc.rotate_z(b, 40.0)
    assert pc.chamfer(turned, a) > 0.05
    d, yaw = pc.best_yaw_chamfer(turned, a)
    assert d < 0.03 and yaw == pytest.approx(320.0)
    assert pc.colour_error(a, b) < 0.05
