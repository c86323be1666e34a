"""init: point_cloud (representations.lib.point_init) puts each representation's geometry
where a hand-built, asymmetric cloud is, in the engine's frame (z up; a camera at azimuth 0
sits on +x and sees +y on its right), and bad clouds stop a run in one line."""

import numpy as np
import pytest
import torch
import trimesh

from engine.config import build, validate_component
from engine.datasets.point_clouds import sample_surface, write_ply
from engine.errors import InputError, UserError

#: a red box low at +x and a green column high at +y: nothing at -x, -y or above the box
RED_BOX = dict(extents=[0.4, 0.3, 0.3], centre=[0.35, 0.0, -0.2])
GREEN_COLUMN = dict(extents=[0.2, 0.2, 0.4], centre=[0.0, 0.3, 0.25])
INSIDE = [RED_BOX["centre"], GREEN_COLUMN["centre"]]
OUTSIDE = [[-0.35, 0.0, -0.2], [0.0, -0.3, 0.25], [0.35, 0.0, 0.2], [0.0, 0.0, 0.0],
           [0.0, 0.3, -0.25], [0.7, 0.6, 0.6]]
SMALL_GRID = {"n_levels": 4, "log2_table_size": 12, "base_resolution": 8,
              "per_level_scale": 1.5}


def part(extents, centre, rgb):
    box = trimesh.creation.box(extents=extents)
    box.apply_translation(centre)
    box.visual.vertex_colors = np.tile([*rgb, 255], (len(box.vertices), 1)).astype(np.uint8)
    return box


@pytest.fixture(scope="module")
def cloud_file(tmp_path_factory):
    red = sample_surface(part(**RED_BOX, rgb=(255, 0, 0)), 500, seed=0)
    green = sample_surface(part(**GREEN_COLUMN, rgb=(0, 255, 0)), 300, seed=1)
    path = tmp_path_factory.mktemp("cloud") / "asymmetric.ply"
    write_ply(path, np.concatenate([red, green]))
    return path


def make(spec):
    return build("representation", validate_component("representation", spec, "test"))


def test_cloud_sdf_inside_and_outside(cloud_file):
    from engine.datasets.point_clouds import read_cloud
    from representations.lib.point_init import cloud_sdf_grid, lookup_grid

    sdf = cloud_sdf_grid(read_cloud(cloud_file), 1.0, 64, 2)
    values = lookup_grid(sdf[..., None], torch.tensor(INSIDE + OUTSIDE), 1.0)[:, 0]
    assert (values[:2] < -0.05).all(), values
    assert (values[2:] > 0.05).all(), values


def test_nerf_density_and_colours_start_at_the_cloud(cloud_file):
    rep = make({"type": "nerf", "init": "point_cloud", "hash_grid": SMALL_GRID,
                "mlp_hidden": 16, "samples_per_ray": 32, "occupancy": {"resolution": 16},
                "point_cloud": {"source": str(cloud_file), "color_steps": 40}})
    with torch.no_grad():
        inside = rep.density(torch.tensor(INSIDE))
        outside = rep.density(torch.tensor(OUTSIDE))
        assert (inside > 20).all() and (outside < 1).all(), (inside, outside)
        # colours near each part's surface are its colour
        red = rep.albedo(torch.tensor([[0.55, 0.0, -0.2], [0.35, 0.15, -0.2]]))
        green = rep.albedo(torch.tensor([[0.0, 0.4, 0.25], [0.0, 0.3, 0.45]]))
    assert (red[:, 0] > red[:, 1] + 0.3).all(), red
    assert (green[:, 1] > green[:, 0] + 0.3).all(), green
    # the analytic normals come from the cloud's SDF: on the box's +x face they point at +x
    normal = rep.field(torch.tensor([[0.55, 0.0, -0.2]]), True)["normal"]
    assert normal[0, 0] > 0.8
    # the buffer travels in checkpoints
    assert "cloud_sdf" in rep.state_dict()


def test_nerf_render_from_the_front_sees_the_cloud_where_the_engine_puts_it(cloud_file):
    """A camera at azimuth 0 (on +x, looking at the origin, z up) sees the +y column on the
    right and high, the +x box low in the middle, nothing top-left."""
    from engine.cameras import Cameras
    from engine.plugin import StepInfo

    rep = make({"type": "nerf", "init": "point_cloud", "hash_grid": SMALL_GRID,
                "mlp_hidden": 16, "samples_per_ray": 48, "occupancy": {"resolution": 16},
                "point_cloud": {"source": str(cloud_file), "color_steps": 0}})
    rep.eval()
    cams = Cameras.from_spherical([0.0], [0.0], [2.5], [40.0])
    white = build("background", validate_component("background", {"type": "solid",
                                                                   "color": [1, 1, 1]}, "bg"))
    with torch.no_grad():
        out = rep.render(cams, 32, 32, background=white, step=StepInfo("t", 0, 0, 1, 0))
    a = out["opacity"][0, ..., 0]                        # row 0 at the top
    assert a[8:14, 19:22].mean() > 0.8                   # the column: +y (right), high
    assert a[8:14, 9:12].mean() < 0.02                   # its mirror image: nothing
    assert a[18:23, 13:19].mean() > 0.8                  # the box: in front, low
    assert a[18:23, 0:8].mean() < 0.02 and a[:6].max() < 0.05


def test_dmtet_sdf_starts_at_the_cloud(cloud_file):
    rep = make({"type": "dmtet", "resolution": 32, "color": SMALL_GRID, "color_hidden": 16,
                "init_shape": "point_cloud",
                "point_cloud": {"source": str(cloud_file), "color_steps": 30}})
    v = rep.grid_vertices
    def sdf_at(p):
        return rep.sdf[torch.cdist(torch.tensor([p]), v).argmin()].item()
    assert all(sdf_at(p) < 0 for p in INSIDE)
    assert all(sdf_at(p) > 0 for p in OUTSIDE)
    verts, faces = rep.surface()
    assert len(faces) > 100
    lo, hi = verts.min(0).values, verts.max(0).values
    assert lo[0] > -0.2 and hi[0] > 0.5 and lo[1] > -0.25 and hi[1] > 0.35 and hi[2] > 0.4
    with torch.no_grad():
        assert rep.albedo(torch.tensor([[0.55, 0.0, -0.2]]))[0, 0] > 0.6


def test_gaussians_grow_a_thin_shell_with_the_cloud_colours(cloud_file):
    from engine.datasets.point_clouds import read_cloud

    rep = make({"type": "gaussians", "init": "point_cloud", "count": 2000,
                "point_cloud": {"source": str(cloud_file), "shell": 0.01,
                                "color_noise": 0.02}})
    cloud = torch.from_numpy(read_cloud(cloud_file))
    assert rep.count == 2000
    xyz = rep.xyz.detach()
    near = torch.cdist(xyz, cloud[:, :3]).min(1)
    assert near.values.max() <= 0.01 + 1e-5
    colour = torch.sigmoid(rep.color.detach())
    assert (colour - cloud[near.indices, 3:]).abs().max() < 0.15
    # the first 800 are the cloud itself, exactly
    assert torch.allclose(xyz[:800], cloud[:, :3])
    # each Gaussian is about as large as its cloud point's spacing (no holes, no blobs)
    size = rep.scaling.detach().exp().mean(1)
    assert 0.005 < float(size.median()) < 0.08
    # and nothing was placed at -x / -y
    assert (xyz[:, 0] < -0.15).sum() == 0 and (xyz[:, 1] < -0.2).sum() == 0


def test_gaussians_old_inits_unchanged(tmp_path, cloud_file):
    """init: points still puts one Gaussian on each point of a file."""
    rep = make({"type": "gaussians", "init": "points", "points": str(cloud_file)})
    assert rep.count == 800


@pytest.mark.parametrize("rep", ["nerf", "dmtet", "gaussians"])
def test_bad_cloud_file_is_refused_before_the_run_writes(tmp_path, rep, capsys):
    from engine.run import main

    bad = tmp_path / "bad.ply"
    bad.write_bytes(b"ply\nformat ascii 1.0\nelement vertex 3\nproperty float x\nend_header\n1\n")
    init_key = "init_shape" if rep == "dmtet" else "init"
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"""
stages:
  s:
    steps: 1
    representation:
      type: {rep}
      {init_key}: point_cloud
      point_cloud: {{source: {bad}}}
    guidance: {{type: reference-view}}
    losses: {{rgb: 1.0}}
""")
    out = tmp_path / "run"
    code = main([f"recipe={recipe}", "image=examples/toy/red-mug.png", f"out={out}"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(err) == 1 and "point_cloud.source" in err[0] and "bad.ply" in err[0], err
    assert not out.exists()


def test_missing_cloud_settings_are_config_errors(tmp_path):
    from representations.lib.point_init import PointCloudInit, preflight

    with pytest.raises(UserError, match="point_cloud.source"):
        validate_component("representation", {"type": "nerf", "init": "point_cloud"}, "s")
    with pytest.raises(UserError, match="point_cloud.source"):
        validate_component("representation", {"type": "gaussians", "init": "point_cloud"}, "s")
    with pytest.raises(UserError, match="point_cloud.resolution"):
        validate_component("representation", {"type": "dmtet", "init_shape": "point_cloud",
                                               "point_cloud": {"source": "a.ply",
                                                               "resolution": 4}}, "s")
    # a model source needs the run's picture, and the model
    with pytest.raises(UserError, match="point_cloud.image"):
        preflight(PointCloudInit(source="model:models/toy/pointe"), "stages.s.representation")
    with pytest.raises(UserError, match="not found"):
        preflight(PointCloudInit(source=f"model:{tmp_path}/none", image="x.png"), "k")
    with pytest.raises(InputError, match="no such file"):
        preflight(PointCloudInit(source=str(tmp_path / "none.ply")), "k")


def test_a_cloud_outside_the_bounds_is_one_line(tmp_path):
    from engine.errors import ConfigError

    far = tmp_path / "far.npy"
    np.save(far, np.full((10, 3), 5.0))
    with pytest.raises(ConfigError, match="point_cloud.scale"):
        make({"type": "nerf", "init": "point_cloud", "hash_grid": SMALL_GRID,
              "point_cloud": {"source": str(far)}})
