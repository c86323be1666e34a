"""Every function that takes a batch of points, rays or samples accepts an empty one.

The real-size isotropic3d recipe crashed at its first progress render: 256 px previews are
rendered in chunks of 4,096 rays, a chunk whose rays all miss the bounding sphere (the top rows
of a view) has no samples, and the hash grid failed on zero points. Each case below feeds a
zero-length batch and checks the output is empty with the documented trailing shape, and, for
renders, that the rays that miss come out as background.
"""

import pytest
import torch

from engine.cameras import Cameras, look_at, orbit
from representations.lib import volume
from representations.backgrounds import SolidBackground
from representations.dmtet import DMTet
from representations.lib.encodings import (HashGridConfig, HashGridEncoding, hash_grid_encode,
                                       hash_grid_encode_with_jacobian, layout_tensors)
from representations.lib.level_match import ray_opacity_and_peak
from representations.lib.marching_tets import marching_tets
from representations.nerf import NeRF, NeRFConfig, OccupancyConfig
from representations.lib.occupancy import OccupancyGrid, cell_index
from representations.lib.shading import shade
from representations.lib.tets import tet_grid
from representations.voxel_grid import VoxelGrid

TINY_GRID = dict(n_levels=4, n_features=2, log2_table_size=12, base_resolution=4,
                 per_level_scale=2.0, backend="torch")
EMPTY = torch.zeros(0, 3)


def tiny_nerf(**kw) -> NeRF:
    torch.manual_seed(0)
    return NeRF(NeRFConfig(hash_grid=HashGridConfig(**TINY_GRID), mlp_hidden=16,
                           samples_per_ray=16, occupancy=OccupancyConfig(resolution=8),
                           composite_backend="torch", **kw))


def test_the_reported_crash_real_size_nerf_field_on_zero_points():
    # the exact reproduction from the issue: the recipe's hash grid (16 levels, 2^19 table)
    out = NeRF().eval().field(torch.zeros(0, 3), True)
    assert out["density"].shape == (0,)
    assert out["albedo"].shape == (0, 3) and out["normal"].shape == (0, 3)


@pytest.mark.parametrize("with_jacobian", [False, True])
def test_hash_grid_functions_on_zero_points(with_jacobian):
    enc = HashGridEncoding(HashGridConfig(**TINY_GRID))
    consts = layout_tensors(enc.layout)
    if with_jacobian:
        e, jac = hash_grid_encode_with_jacobian(EMPTY, enc.table, *consts)
        assert e.shape == (0, 8) and jac.shape == (0, 8, 3)
        e2, jac2 = enc.forward_with_jacobian(EMPTY)
        assert e2.shape == (0, 8) and jac2.shape == (0, 8, 3)
    else:
        assert hash_grid_encode(EMPTY, enc.table, *consts).shape == (0, 8)
        assert enc(EMPTY).shape == (0, 8)
        assert enc.reference(EMPTY).shape == (0, 8)


def test_empty_points_still_give_a_gradient_graph():
    # a training step whose samples are all skipped must still backpropagate (to zeros)
    enc = HashGridEncoding(HashGridConfig(**TINY_GRID))
    out = enc(EMPTY)
    out.sum().backward()
    assert enc.table.grad is not None and float(enc.table.grad.abs().sum()) == 0.0


@pytest.mark.parametrize("normal_mode", ["analytic", "finite_difference"])
@pytest.mark.parametrize("need_normals", [False, True])
def test_nerf_field_on_zero_points(normal_mode, need_normals):
    rep = tiny_nerf(normal_mode=normal_mode)
    out = rep.field(EMPTY, need_normals)
    assert out["density"].shape == (0,) and out["albedo"].shape == (0, 3)
    assert ("normal" in out) == need_normals
    if need_normals:
        assert out["normal"].shape == (0, 3)
    assert rep.density(EMPTY).shape == (0,) and rep.albedo(EMPTY).shape == (0, 3)


def _camera_looking_away(n=1) -> Cameras:
    # outside the unit sphere, looking straight away from it: every ray misses
    eye = torch.tensor([[3.0, 0.0, 0.0]]).repeat(n, 1)
    c2w = look_at(eye, eye * 2.0)
    zeros = torch.zeros(n)
    return Cameras(c2w=c2w, fovy=torch.full((n,), 0.5), elevation=zeros, azimuth=zeros,
                   distance=torch.full((n,), 3.0))


@pytest.mark.parametrize("training", [False, True])
def test_nerf_render_where_every_ray_misses_is_background(training):
    rep = tiny_nerf()
    rep.train(training)
    bg = SolidBackground(SolidBackground.Config(color=[0.2, 0.4, 0.6]))
    out = rep.render(_camera_looking_away(), 8, 8, background=bg, step=0)
    assert out["rgb"].shape == (1, 8, 8, 3)
    assert torch.allclose(out["rgb"], torch.tensor([0.2, 0.4, 0.6]).expand(1, 8, 8, 3))
    assert float(out["opacity"].detach().abs().max()) == 0.0


def test_nerf_eval_render_with_an_empty_chunk_matches_one_chunk():
    # small chunks make whole chunks of rays miss the sphere (as 4,096-ray chunks do at 256 px)
    rep = tiny_nerf(radius=0.6, eval_chunk_rays=8)
    rep.eval()
    bg = SolidBackground(SolidBackground.Config(color=[1.0, 1.0, 1.0]))
    cams = orbit(1, elevation_deg=0.0, distance=2.5, fovy_deg=60.0)
    chunked = rep.render(cams, 16, 16, background=bg, step=0)
    rep.cfg.eval_chunk_rays = 4096
    whole = rep.render(cams, 16, 16, background=bg, step=0)
    # the top row misses a sphere of radius 0.6 seen at 60 degrees from 2.5
    assert float(chunked["opacity"][0, 0].max()) == 0.0
    assert float(chunked["opacity"].max()) > 0.0
    for key in ("rgb", "opacity", "depth", "normal"):
        assert torch.allclose(chunked[key], whole[key], atol=1e-5), key


def test_volume_functions_on_zero_rays():
    near, far, hit = volume.ray_sphere_bounds(EMPTY, EMPTY, 1.0)
    assert near.shape == far.shape == hit.shape == (0,)
    t0, t1 = volume.stratified_samples(near, far, 8, perturb=True)
    assert t0.shape == t1.shape == (0, 8)
    sig = torch.zeros(0, 8, requires_grad=True)
    for backend in ("torch", "auto"):
        w = volume.weights_from_density(sig, t0, t1, backend)
        assert w.shape == (0, 8)
    out = volume.render_rays(sig, torch.zeros(0, 8, 3), t0, t1, background=torch.zeros(0, 3),
                             normals=torch.zeros(0, 8, 3), backend="torch")
    assert out["rgb"].shape == (0, 3) and out["opacity"].shape == (0, 1)
    assert out["normal"].shape == (0, 3)
    out["rgb"].sum().backward()
    assert sig.grad.shape == (0, 8)


def test_occupancy_and_shading_on_zero_points():
    grid = OccupancyGrid(8)
    assert cell_index(EMPTY, 8, 1.0).shape == (0,)
    assert grid.lookup(EMPTY).shape == (0,) and grid.lookup(torch.zeros(0, 4, 3)).shape == (0, 4)
    for mode in ("albedo", "diffuse", "textureless"):
        assert shade(EMPTY, EMPTY, EMPTY, mode).shape == (0, 3)


def test_backgrounds_and_voxel_grid_on_zero_points():
    assert SolidBackground()(EMPTY).shape == (0, 3)
    rep = VoxelGrid(VoxelGrid.Config(resolution=8))
    assert rep.density(EMPTY).shape == (0,) and rep.albedo(EMPTY).shape == (0, 3)


def test_level_match_on_zero_rays():
    opacity, peak = ray_opacity_and_peak(lambda p: torch.ones(p.shape[0]), EMPTY, EMPTY, 1.0, 8)
    assert opacity.shape == (0,) and peak.shape == (0,)


def test_marching_tets_and_mesh_render_with_nothing_to_draw():
    verts, tets = tet_grid(2)
    v, f = marching_tets(verts, tets, torch.ones(verts.shape[0]), backend="torch")
    assert v.shape == (0, 3) and f.shape == (0, 3)
    v, f = marching_tets(verts, tets[:0], torch.zeros(0), backend="torch")
    assert v.shape == (0, 3) and f.shape == (0, 3)


def test_dmtet_colour_field_on_zero_points():
    rep = DMTet(DMTet.Config(resolution=4))
    assert rep.albedo(EMPTY).shape == (0, 3)

