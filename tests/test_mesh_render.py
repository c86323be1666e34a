"""Mesh rendering: a unit cube seen face-on from a known camera, vertex normals, gradients."""

import math

import pytest
import torch
import trimesh

from engine.cameras import Cameras
from representations.backgrounds import SolidBackground
from representations.lib.mesh_render import render_mesh, vertex_normals

H = W = 64
DIST = 2.5
FOVY = 60.0


def _cube(scale=1.0, dtype=torch.float64):
    box = trimesh.creation.box(extents=(1.0, 1.0, 1.0))
    return (torch.tensor(box.vertices, dtype=dtype) * scale,
            torch.tensor(box.faces, dtype=torch.long))


def _front_area(scale=1.0):
    # camera on +x looking at the origin: the visible outline is the face x = s/2
    f = 1.0 / math.tan(math.radians(FOVY) / 2)
    half_ndc = f * 0.5 * scale / (DIST - 0.5 * scale)
    return (half_ndc * H) ** 2


def _cams(azimuths=(0.0,)):
    return Cameras.from_spherical([0.0] * len(azimuths), list(azimuths), DIST, FOVY)


def test_cube_opacity_area_depth_and_colour():
    v, f = _cube()
    red = torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64).expand(v.shape[0], 3)
    out = render_mesh(v, f, _cams(), H, W, background=SolidBackground(), vertex_colors=red,
                      backend="torch")
    assert set(out) >= {"albedo", "rgb", "opacity", "depth", "normal", "position"}
    area = _front_area()                               # 767.9 pixels
    assert out["opacity"].sum().item() == pytest.approx(area, abs=2.0)
    hard = (out["depth"] > 0).sum().item()
    assert abs(hard - area) < 4 * math.sqrt(area)      # within a pixel along the perimeter
    c = H // 2
    centre = (slice(None), slice(c - 1, c + 1), slice(c - 1, c + 1))
    # the face x = 0.5 is 2.0 away from the camera
    assert torch.allclose(out["depth"][centre], torch.full((1, 2, 2, 1), 2.0, dtype=torch.float64),
                          atol=1e-9)
    assert torch.allclose(out["position"][centre][..., 0], torch.full((1, 2, 2), 0.5,
                                                                      dtype=torch.float64))
    assert torch.allclose(out["rgb"][centre], red[0].expand(1, 2, 2, 3))
    assert torch.allclose(out["rgb"][0, 0, 0], torch.ones(3, dtype=torch.float64))   # background
    assert torch.all(out["albedo"][out["depth"][..., 0] == 0] == 0)


def test_cube_normals_point_outwards_and_to_the_camera():
    v, f = _cube()
    out = render_mesh(v, f, _cams((0.0, 90.0)), H, W, background=SolidBackground(),
                      backend="torch")
    covered = out["depth"][..., 0] > 0
    n, p = out["normal"][covered], out["position"][covered]
    assert torch.allclose(n.norm(dim=-1), torch.ones(n.shape[0], dtype=torch.float64))
    assert torch.all((n * p).sum(-1) > 0)               # outward
    eye = _cams((0.0, 90.0)).position.to(torch.float64)
    for b in range(2):
        nb, pb = out["normal"][b][covered[b]], out["position"][b][covered[b]]
        assert torch.all((nb * (eye[b] - pb)).sum(-1) > 0)
    c = H // 2
    # interpolated corner normals average to the face normal at the face's centre
    assert torch.allclose(out["normal"][0, c - 1:c + 1, c - 1:c + 1].mean((0, 1)),
                          torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64), atol=0.05)
    assert torch.allclose(out["normal"][1, c - 1:c + 1, c - 1:c + 1].mean((0, 1)),
                          torch.tensor([0.0, 1.0, 0.0], dtype=torch.float64), atol=0.05)
    assert torch.all(out["normal"][~covered] == 0)


def test_silhouette_gradient_of_area_matches_analytic():
    v, f = _cube()
    scale = torch.tensor(1.0, dtype=torch.float64, requires_grad=True)
    out = render_mesh(v * scale, f, _cams(), H, W, background=SolidBackground(),
                      backend="torch")
    out["opacity"].sum().backward()
    eps = 1e-4
    analytic = (_front_area(1 + eps) - _front_area(1 - eps)) / (2 * eps)   # ~1707 px
    assert scale.grad.item() == pytest.approx(analytic, rel=0.05)


def test_color_fn_sees_only_covered_pixels_and_gets_gradients():
    v, f = _cube(dtype=torch.float32)
    lin = torch.nn.Linear(3, 3)
    seen = []

    def color_fn(points):
        seen.append(points.shape[0])
        return torch.sigmoid(lin(points))

    out = render_mesh(v, f, _cams(), H, W, background=SolidBackground(), color_fn=color_fn,
                      backend="torch")
    assert seen == [int((out["depth"] > 0).sum())]
    out["rgb"].mean().backward()
    assert lin.weight.grad is not None and lin.weight.grad.abs().sum() > 0


def test_vertex_gradients_reach_every_output():
    v, f = _cube(dtype=torch.float32)
    v = v.clone().requires_grad_(True)
    out = render_mesh(v, f, _cams(), H, W, background=SolidBackground(),
                      vertex_colors=torch.rand(8, 3), backend="torch")
    for key in ("rgb", "opacity", "depth", "normal", "position"):
        g, = torch.autograd.grad(out[key].sum(), v, retain_graph=True)
        assert g.abs().sum() > 0, key


def test_vertex_normals_area_weighted():
    # two triangles sharing the edge (0, 1); face A (area 1/2) normal +z, face B
    # (area 1) normal +y; vertices 0 and 1 get (0, 2, 1)/sqrt(5) from the areas 1/2 and 1
    v = torch.tensor([[0.0, 0, 0], [1, 0, 0], [0, 1, 0], [0, 0, -2]])
    f = torch.tensor([[0, 1, 2], [0, 1, 3]])
    n = vertex_normals(v, f)
    shared = torch.tensor([0.0, 1.0, 0.5]) / math.sqrt(1.25)
    assert torch.allclose(n[0], shared) and torch.allclose(n[1], shared)
    assert torch.allclose(n[2], torch.tensor([0.0, 0, 1]))
    assert torch.allclose(n[3], torch.tensor([0.0, 1, 0]))
    sphere = trimesh.creation.icosphere(subdivisions=2)
    vs = torch.tensor(sphere.vertices, dtype=torch.float64)
    ns = vertex_normals(vs, torch.tensor(sphere.faces))
    assert ((ns * vs).sum(-1) / vs.norm(dim=-1)).min() > 0.999


def test_empty_mesh_gives_background_and_no_colour_query():
    v = torch.zeros(0, 3, requires_grad=True)
    f = torch.zeros(0, 3, dtype=torch.long)

    def color_fn(points):
        raise AssertionError("no covered pixel, no query")

    out = render_mesh(v, f, _cams((0.0, 90.0)), 16, 16, background=SolidBackground(),
                      color_fn=color_fn, backend="torch")
    assert torch.all(out["rgb"] == 1.0) and torch.all(out["opacity"] == 0)
    assert torch.all(out["depth"] == 0) and torch.all(out["normal"] == 0)
