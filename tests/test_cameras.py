import math
import re

import pytest
import torch

from engine.cameras import Cameras, FixedViewSampler, RandomMultiViewSampler, ndc_to_pixel, orbit


def test_azimuth_zero_is_on_plus_x_with_opengl_axes():
    cam = Cameras.from_spherical(0.0, 0.0, 2.0, 40.0)
    c2w = cam.c2w[0]
    assert torch.allclose(c2w[:3, 3], torch.tensor([2.0, 0.0, 0.0]), atol=1e-6)
    assert torch.allclose(c2w[:3, 0], torch.tensor([0.0, 1.0, 0.0]), atol=1e-6)   # right = +y
    assert torch.allclose(c2w[:3, 1], torch.tensor([0.0, 0.0, 1.0]), atol=1e-6)   # up = +z
    assert torch.allclose(c2w[:3, 2], torch.tensor([1.0, 0.0, 0.0]), atol=1e-6)   # back = +x


def test_azimuth_90_and_elevation():
    cam = Cameras.from_spherical(30.0, 90.0, 2.0, 40.0)
    expected = torch.tensor([0.0, 2 * math.cos(math.radians(30)), 2 * math.sin(math.radians(30))])
    assert torch.allclose(cam.position[0], expected, atol=1e-6)
    assert torch.allclose(cam.c2w[0, :3, :3] @ cam.c2w[0, :3, :3].T, torch.eye(3), atol=1e-6)


def test_rays_and_projection_agree():
    cam = Cameras.from_spherical([10.0, 40.0], [20.0, 200.0], [2.0, 3.0], [30.0, 50.0])
    h, w = 6, 8
    origins, dirs = cam.rays(h, w)
    # the centre of the image looks at the origin
    assert torch.allclose(cam.c2w[:, :3, 2], -torch.nn.functional.normalize(-cam.position, dim=-1))
    # a point along the ray of pixel (row 1, col 6) projects back onto that pixel's centre
    p = origins[:, 1, 6] + 1.7 * dirs[:, 1, 6]
    clip = torch.einsum("bij,bj->bi", cam.world_to_clip(h, w), torch.cat([p, torch.ones(2, 1)], -1))
    pix = ndc_to_pixel(clip[:, :2] / clip[:, 3:], h, w)
    assert torch.allclose(pix, torch.tensor([[6.5, 1.5], [6.5, 1.5]]), atol=1e-4)


def test_top_left_ray_points_up_and_left():
    cam = Cameras.from_spherical(0.0, 0.0, 2.0, 40.0)
    _, dirs = cam.rays(4, 4)
    d = dirs[0, 0, 0]
    assert d[0] < 0 and d[1] < 0 and d[2] > 0   # forward (-x), left (-y), up (+z)


def test_random_multiview_groups():
    cfg = RandomMultiViewSampler.Config(groups={"points": [[0, 2], [10, 1]], "mode": "step"},
                                        views=4)
    sampler = RandomMultiViewSampler(cfg)
    g = torch.Generator().manual_seed(0)
    cams = sampler.sample(0, g)
    assert len(cams) == 8 and cams.views_per_object == 4
    for obj in range(2):
        sl = slice(4 * obj, 4 * obj + 4)
        assert torch.allclose(cams.elevation[sl], cams.elevation[sl][0].expand(4))
        assert torch.allclose(cams.fovy[sl], cams.fovy[sl][0].expand(4))
        assert torch.allclose(cams.distance[sl], cams.distance[sl][0].expand(4))
        gaps = (cams.azimuth[sl].roll(-1) - cams.azimuth[sl]) % 360.0
        assert torch.allclose(gaps, torch.full((4,), 90.0), atol=1e-3)
    assert (cams.elevation >= 0).all() and (cams.elevation <= 30).all()
    # relative distance: d * tan(fovy / 2) stays in the configured [0.8, 1.0]
    scaled = cams.distance * torch.tan(cams.fovy / 2)
    assert (scaled >= 0.8 - 1e-5).all() and (scaled <= 1.0 + 1e-5).all()
    assert len(sampler.sample(10, g)) == 4


def test_fixed_sampler_and_orbit():
    s = FixedViewSampler(FixedViewSampler.Config())
    cams = s.sample(0, torch.Generator())
    assert torch.allclose(cams.position[0], torch.tensor([2.5, 0.0, 0.0]), atol=1e-6)
    o = orbit(4, elevation_deg=0.0, distance=2.0)
    assert torch.allclose(o.position[1], torch.tensor([0.0, 2.0, 0.0]), atol=1e-6)


@pytest.mark.parametrize("distance, fovy, words", [
    (0.0, 40.0, "views.distance: must be > 0, got 0.0"),
    (2.5, 180.0, "views.fovy: must be in (0, 180) degrees, got 180.0"),
])
def test_bad_framing_is_named_with_its_key(distance, fovy, words):
    from engine.cameras import check_framing
    from engine.errors import ConfigError

    with pytest.raises(ConfigError, match=re.escape(words)):
        check_framing(distance, fovy, "views.")
    check_framing(2.5, 40.0)                 # a good one passes
