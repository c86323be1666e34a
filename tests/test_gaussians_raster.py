"""The pure-torch Gaussian rasteriser: against a brute-force reference, finite differences,
projection conventions, and the gsplat backend where it can run."""

import math

import pytest
import torch

from engine.cameras import Cameras, orbit
from representations.lib import gaussian_raster as gr


def _gaussians(n, seed=0, dtype=torch.float64, opacity=(0.2, 0.6), scale=(0.05, 0.15)):
    g = torch.Generator().manual_seed(seed)
    means = (torch.rand(n, 3, generator=g, dtype=dtype) - 0.5) * 0.8
    log_scales = torch.log(scale[0] + (scale[1] - scale[0])
                           * torch.rand(n, 3, generator=g, dtype=dtype))
    quats = torch.randn(n, 4, generator=g, dtype=dtype)
    opac = opacity[0] + (opacity[1] - opacity[0]) * torch.rand(n, generator=g, dtype=dtype)
    colors = torch.rand(n, 3, generator=g, dtype=dtype)
    return means, log_scales, quats, opac, colors


def _cams(n=2, dtype=torch.float64):
    cams = orbit(n, elevation_deg=20.0, distance=2.5, fovy_deg=40.0)
    cams.c2w = cams.c2w.to(dtype)
    cams.fovy = cams.fovy.to(dtype)
    return cams


def reference_render(means, log_scales, quats, opac, colors, cams, h, w):
    """Every Gaussian at every pixel, depth-sorted per view, composited front to back with
    the same thresholds (1/255, 0.99, T < 1e-4): slow and obviously right."""
    cov = gr.covariance_3d(log_scales, quats)
    proj = gr.project(means, cov, cams, h, w)
    B, N = proj.depths.shape
    out = torch.zeros(B, h, w, 3, dtype=means.dtype)
    alpha_img = torch.zeros(B, h, w, 1, dtype=means.dtype)
    depth_img = torch.zeros(B, h, w, 1, dtype=means.dtype)
    for b in range(B):
        order = torch.argsort(proj.depths[b])
        for row in range(h):
            for col in range(w):
                T = torch.ones((), dtype=means.dtype)
                c = torch.zeros(3, dtype=means.dtype)
                dep = torch.zeros((), dtype=means.dtype)
                for i in order.tolist():
                    if not proj.valid[b, i]:
                        continue
                    d = torch.stack([col + 0.5 - proj.means2d[b, i, 0],
                                     row + 0.5 - proj.means2d[b, i, 1]])
                    a_, b_, c_ = proj.conics[b, i]
                    q = a_ * d[0] ** 2 + 2 * b_ * d[0] * d[1] + c_ * d[1] ** 2
                    alpha = torch.clamp(opac[i] * torch.exp(-0.5 * q), max=gr.ALPHA_MAX)
                    if alpha < gr.ALPHA_MIN:
                        continue
                    if T < gr.T_MIN:
                        break
                    c = c + alpha * T * colors[i]
                    dep = dep + alpha * T * proj.depths[b, i]
                    T = T * (1 - alpha)
                out[b, row, col] = c
                alpha_img[b, row, col, 0] = 1 - T
                depth_img[b, row, col, 0] = dep
    return out, alpha_img, depth_img


@pytest.mark.parametrize("chunks", [1, 3])
def test_matches_brute_force_reference(chunks, monkeypatch):
    params = _gaussians(12, seed=1, opacity=(0.5, 0.99))
    cams = _cams(2)
    h, w = 10, 12
    real = gr.find_pairs
    monkeypatch.setattr(gr, "find_pairs", lambda *a, **k: real(*a, **{**k, "chunks": chunks}))
    out = gr.rasterize_gaussians(*params, cams, h, w, backend="torch")
    ref_rgb, ref_alpha, ref_depth = reference_render(*params, cams, h, w)
    assert out["alpha"].max() > 0.5            # the scene is not empty
    torch.testing.assert_close(out["features"], ref_rgb, atol=1e-9, rtol=1e-7)
    torch.testing.assert_close(out["alpha"], ref_alpha, atol=1e-9, rtol=1e-7)
    torch.testing.assert_close(out["depth"], ref_depth, atol=1e-9, rtol=1e-7)


def test_early_termination_behind_an_opaque_wall():
    # a flat, nearly opaque wall in front of a red blob: nothing of the blob shows through
    means = torch.tensor([[0.5, 0.0, 0.0]] * 4 + [[-0.3, 0.0, 0.0]], dtype=torch.float64)
    log_scales = torch.log(torch.tensor([[0.01, 1.0, 1.0]] * 4 + [[0.2, 0.2, 0.2]],
                                        dtype=torch.float64))
    quats = torch.tensor([[1.0, 0, 0, 0]] * 5, dtype=torch.float64)
    opac = torch.tensor([0.99] * 4 + [0.99], dtype=torch.float64)
    colors = torch.tensor([[0.0, 0, 1]] * 4 + [[1.0, 0, 0]], dtype=torch.float64)
    cams = Cameras.from_spherical(0.0, 0.0, 2.5, 40.0)
    cams.c2w, cams.fovy = cams.c2w.double(), cams.fovy.double()
    out = gr.rasterize_gaussians(means, log_scales, quats, opac, colors, cams, 8, 8,
                                 backend="torch")
    centre = out["features"][0, 3:5, 3:5]
    assert centre[..., 0].max() == 0.0           # the blob's pairs were cut, not just dimmed
    assert centre[..., 2].min() > 0.99


def test_projection_follows_engine_conventions():
    # a point up and to the camera's right lands in the top-right quadrant (row 0 at top)
    cams = Cameras.from_spherical(0.0, 0.0, 2.5, 40.0)      # on +x looking at the origin
    means = torch.tensor([[0.0, 0.3, 0.3]])                  # +y is the camera's right
    cov = gr.covariance_3d(torch.full((1, 3), math.log(0.01)), torch.tensor([[1.0, 0, 0, 0]]))
    proj = gr.project(means, cov, cams, 64, 64)
    u, v = proj.means2d[0, 0].tolist()
    f = cams.focal(64)[0].item()
    assert abs(u - (32 + f * 0.3 / 2.5)) < 1e-4 and abs(v - (32 - f * 0.3 / 2.5)) < 1e-4
    assert abs(proj.depths[0, 0].item() - 2.5) < 1e-5
    # the pixel a ray of cameras.rays() goes through sees the point
    origins, dirs = cams.rays(64, 64)
    row, col = int(v), int(u)
    to_point = means[0] - origins[0, row, col]
    cos = (to_point / to_point.norm()) @ dirs[0, row, col]
    assert cos > 0.9999


def test_covariance_is_rotation_and_scale():
    ls = torch.log(torch.tensor([[0.1, 0.2, 0.3]]))
    q = torch.tensor([[math.cos(math.pi / 4), 0.0, 0.0, math.sin(math.pi / 4)]])  # 90 deg z
    cov = gr.covariance_3d(ls, q)[0]
    torch.testing.assert_close(cov, torch.diag(torch.tensor([0.04, 0.01, 0.09])),
                               atol=1e-6, rtol=0)
    axis = gr.shortest_axis(ls, q)[0]
    torch.testing.assert_close(axis.abs(), torch.tensor([0.0, 1.0, 0.0]), atol=1e-6, rtol=0)


def check_gradients_against_finite_differences(backend: str) -> None:
    """gradcheck of a weighted sum of the features, alpha and depth of 4 Gaussians in 2 views
    (9 px, float64) with respect to every Gaussian parameter, through ``backend``."""
    means, log_scales, quats, opac, colors = _gaussians(4, seed=3, opacity=(0.3, 0.6))
    cams = _cams(2)
    wts = torch.rand(2, 9, 9, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)

    def f(means, log_scales, quats, opac, colors):
        out = gr.rasterize_gaussians(means, log_scales, quats, opac, colors, cams, 9, 9,
                                     backend=backend)
        return (out["features"] * wts).sum() + out["alpha"].sum() + 0.1 * out["depth"].sum()

    inputs = tuple(t.clone().requires_grad_() for t in
                   (means, log_scales, quats, opac, colors))
    assert f(*inputs).item() > 0
    assert torch.autograd.gradcheck(f, inputs, eps=1e-6, atol=1e-5, rtol=1e-4)


def test_gradients_match_finite_differences():
    check_gradients_against_finite_differences("torch")


def test_means2d_gradient_is_view_space_gradient():
    params = [t.float().requires_grad_() for t in _gaussians(6, seed=4)]
    out = gr.rasterize_gaussians(*params, orbit(2), 16, 16, backend="torch")
    out["means2d"].retain_grad()
    out["features"].sum().backward()
    assert out["means2d"].grad.shape == (2, 6, 2)
    assert out["means2d"].grad.abs().sum() > 0


def test_behind_camera_and_empty_scene():
    cams = orbit(1, distance=2.5)
    means = cams.position.clone()                            # at the camera: culled
    params = (means, torch.zeros(1, 3), torch.tensor([[1.0, 0, 0, 0]]), torch.tensor([0.9]),
              torch.ones(1, 3))
    out = gr.rasterize_gaussians(*params, cams, 8, 8, backend="torch")
    assert out["alpha"].abs().max() == 0
    none = gr.rasterize_gaussians(torch.zeros(0, 3), torch.zeros(0, 3), torch.zeros(0, 4),
                                  torch.zeros(0), torch.zeros(0, 3), cams, 8, 8)
    assert none["features"].shape == (1, 8, 8, 3) and none["alpha"].abs().max() == 0


def test_unknown_backend():
    with pytest.raises(ValueError, match="backend"):
        gr.rasterize_gaussians(*_gaussians(1), _cams(1), 4, 4, backend="cuda-magic")


@pytest.mark.skipif(not (torch.cuda.is_available() and gr.gsplat_available()),
                    reason="needs CUDA and gsplat")
def test_gsplat_backend_matches_torch():
    params = [t.float().cuda() for t in _gaussians(200, seed=5, scale=(0.02, 0.06))]
    cams = orbit(4, distance=2.5, device="cuda")
    ours = gr.rasterize_gaussians(*params, cams, 64, 64, backend="torch")
    theirs = gr.rasterize_gaussians(*params, cams, 64, 64, backend="gsplat")
    assert (ours["alpha"] - theirs["alpha"]).abs().mean() < 1e-3
    assert (ours["features"] - theirs["features"]).abs().mean() < 1e-3
    assert (ours["depth"] - theirs["depth"]).abs().mean() < 1e-2


def test_ewa_covariance_is_the_projection_linearised():
    # J W Sigma W^T J^T + 0.3 I, with J W the derivative of the pixel position by the world
    # position (autograd on the projection of the mean), off the optical axis
    cams = Cameras.from_spherical(20.0, 30.0, 2.5, 40.0)
    cams.c2w, cams.fovy = cams.c2w.double(), cams.fovy.double()
    mean = torch.tensor([[0.2, -0.3, 0.25]], dtype=torch.float64)
    ls = torch.log(torch.tensor([[0.05, 0.1, 0.02]], dtype=torch.float64))
    quat = torch.tensor([[0.9, 0.2, -0.3, 0.1]], dtype=torch.float64)
    cov3d = gr.covariance_3d(ls, quat)

    def pixel(x):
        return gr.project(x[None], cov3d, cams, 64, 48).means2d[0, 0]

    jac = torch.autograd.functional.jacobian(pixel, mean[0])                # [2, 3]
    expected = jac @ cov3d[0] @ jac.T + gr.DILATION * torch.eye(2, dtype=torch.float64)
    a, b, c = gr.project(mean, cov3d, cams, 64, 48).cov2d[0, 0]
    torch.testing.assert_close(torch.stack([a, b, c]),
                               torch.stack([expected[0, 0], expected[0, 1], expected[1, 1]]))
