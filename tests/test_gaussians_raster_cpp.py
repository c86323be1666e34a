"""The ``cpp`` backend of the Gaussian rasteriser (a C++ kernel compiled on first use): the
same images, visibility and gradients as the torch backend, early termination, empty scenes,
the ``auto`` choice and the fallback when the kernel cannot be built."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from engine.cameras import Cameras, orbit
from representations.lib import gaussian_raster as gr
from representations.lib import gaussian_raster_cpp as grc

from test_gaussians_raster import (_cams, _gaussians, check_gradients_against_finite_differences,
                                   reference_render)

ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.skipif(grc.load_extension() is None,
                                reason="the C++ kernel cannot be built here "
                                       f"({grc.build_error()})")


def _scene(n, seed, dtype, views, view_dependent=False):
    params = list(_gaussians(n, seed=seed, dtype=dtype, scale=(0.02, 0.12),
                             opacity=(0.2, 0.99)))
    if view_dependent:
        g = torch.Generator().manual_seed(seed + 100)
        params[4] = torch.rand(views, n, 5, generator=g, dtype=dtype)
    return params, _cams(views, dtype)


def _render(params, cams, h, w, backend, weights=None):
    leaves = [p.clone().requires_grad_() for p in params]
    out = gr.rasterize_gaussians(*leaves, cams, h, w, backend=backend)
    out["means2d"].retain_grad()
    if weights is None:
        g = torch.Generator().manual_seed(7)
        weights = torch.rand(out["features"].shape, generator=g, dtype=out["features"].dtype)
    loss = (out["features"] * weights).sum() + 0.7 * out["alpha"].sum() \
        + 0.2 * out["depth"].sum()
    loss.backward()
    return out, [p.grad for p in leaves], weights


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("n,views,h,w,view_dependent", [
    (300, 2, 16, 24, False), (400, 3, 32, 32, True), (200, 4, 48, 40, False),
    (250, 2, 36, 140, False)])                           # rows of more than one 64-bit word
def test_cpp_matches_torch(dtype, n, views, h, w, view_dependent):
    params, cams = _scene(n, seed=n + views, dtype=dtype, views=views,
                          view_dependent=view_dependent)
    ref, ref_grads, weights = _render(params, cams, h, w, "torch")
    out, grads, _ = _render(params, cams, h, w, "cpp", weights)
    assert ref["alpha"].max() > 0.5                      # the scene covers the views
    for key in ("features", "depth", "alpha"):
        assert out[key].shape == ref[key].shape
        torch.testing.assert_close(out[key], ref[key], atol=1e-5, rtol=1e-5)
    assert out["visible"].dtype == torch.bool
    assert torch.equal(out["visible"], ref["visible"])
    names = ("means", "log_scales", "quats", "opacities", "features")
    for name, a, b in zip(names, grads, ref_grads):
        scale = b.abs().max().item()
        torch.testing.assert_close(a, b, atol=1e-5 * max(scale, 1.0), rtol=1e-4,
                                   msg=lambda m, name=name: f"{name}: {m}")
    m2d, m2d_ref = out["means2d"].grad, ref["means2d"].grad
    assert m2d.shape == (views, n, 2) and m2d.abs().sum() > 0
    torch.testing.assert_close(m2d, m2d_ref, atol=1e-5 * m2d_ref.abs().max().item(),
                               rtol=1e-4)


def test_cpp_matches_brute_force_reference():
    params = _gaussians(12, seed=1, opacity=(0.5, 0.99))
    cams = _cams(2)
    out = gr.rasterize_gaussians(*params, cams, 10, 12, backend="cpp")
    ref_rgb, ref_alpha, ref_depth = reference_render(*params, cams, 10, 12)
    assert out["alpha"].max() > 0.5
    torch.testing.assert_close(out["features"], ref_rgb, atol=1e-9, rtol=1e-7)
    torch.testing.assert_close(out["alpha"], ref_alpha, atol=1e-9, rtol=1e-7)
    torch.testing.assert_close(out["depth"], ref_depth, atol=1e-9, rtol=1e-7)


def test_cpp_gradients_match_finite_differences():
    check_gradients_against_finite_differences("cpp")


def test_cpp_threads_give_the_same_result():
    # with several torch threads each view is split into bands of rows (at::parallel_for)
    params, cams = _scene(300, seed=11, dtype=torch.float32, views=2)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one, one_grads, weights = _render(params, cams, 32, 32, "cpp")
        torch.set_num_threads(3)
        assert grc.bands_for(2, 32) > 1
        many, many_grads, _ = _render(params, cams, 32, 32, "cpp", weights)
    finally:
        torch.set_num_threads(before)
    for key in ("features", "depth", "alpha", "visible"):
        assert torch.equal(one[key], many[key])
    for a, b in zip(one_grads, many_grads):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_cpp_early_termination_behind_an_opaque_wall():
    means = torch.tensor([[0.5, 0.0, 0.0]] * 4 + [[-0.3, 0.0, 0.0]], dtype=torch.float64)
    log_scales = torch.log(torch.tensor([[0.01, 1.0, 1.0]] * 4 + [[0.2, 0.2, 0.2]],
                                        dtype=torch.float64))
    quats = torch.tensor([[1.0, 0, 0, 0]] * 5, dtype=torch.float64)
    opac = torch.tensor([0.99] * 5, dtype=torch.float64, requires_grad=True)
    colors = torch.tensor([[0.0, 0, 1]] * 4 + [[1.0, 0, 0]], dtype=torch.float64,
                          requires_grad=True)
    cams = Cameras.from_spherical(0.0, 0.0, 2.5, 40.0)
    cams.c2w, cams.fovy = cams.c2w.double(), cams.fovy.double()
    out = gr.rasterize_gaussians(means, log_scales, quats, opac, colors, cams, 8, 8,
                                 backend="cpp")
    centre = out["features"][0, 3:5, 3:5]
    assert centre[..., 0].max() == 0.0           # the blob's pairs were cut, not just dimmed
    assert centre[..., 2].min() > 0.99
    ref = gr.rasterize_gaussians(means, log_scales, quats, opac, colors, cams, 8, 8,
                                 backend="torch")
    assert torch.equal(out["visible"], ref["visible"])
    torch.testing.assert_close(out["features"], ref["features"], atol=1e-9, rtol=1e-7)
    grads = torch.autograd.grad(out["features"][0, 3:5, 3:5].sum(), (opac, colors))
    # nothing of the blob reaches the centre, so nothing flows back to it from there
    assert grads[0][4] == 0 and grads[1][4].abs().max() == 0
    assert grads[0][:4].abs().sum() > 0


def test_cpp_behind_camera_and_empty_scene():
    cams = orbit(1, distance=2.5)
    means = cams.position.clone()                            # at the camera: culled
    params = (means, torch.zeros(1, 3), torch.tensor([[1.0, 0, 0, 0]]), torch.tensor([0.9]),
              torch.ones(1, 3))
    out = gr.rasterize_gaussians(*params, cams, 8, 8, backend="cpp")
    assert out["alpha"].abs().max() == 0 and not out["visible"].any()
    none = gr.rasterize_gaussians(torch.zeros(0, 3), torch.zeros(0, 3), torch.zeros(0, 4),
                                  torch.zeros(0), torch.zeros(0, 3), cams, 8, 8,
                                  backend="cpp")
    assert none["features"].shape == (1, 8, 8, 3) and none["alpha"].abs().max() == 0
    assert none["visible"].shape == (1, 0)
    # gradients flow (as zeros) through an empty render
    leaves = [torch.zeros(0, 3, requires_grad=True), torch.zeros(0, 3, requires_grad=True),
              torch.zeros(0, 4, requires_grad=True), torch.zeros(0, requires_grad=True),
              torch.zeros(0, 3, requires_grad=True)]
    out = gr.rasterize_gaussians(*leaves, cams, 8, 8, backend="cpp")
    (out["features"].sum() + out["alpha"].sum()).backward()
    assert leaves[0].grad.shape == (0, 3)


def _calls(monkeypatch):
    calls = []
    real_cpp, real_torch = gr._rasterize_cpp, gr._rasterize_torch
    monkeypatch.setattr(gr, "_rasterize_cpp",
                        lambda *a: calls.append("cpp") or real_cpp(*a))
    monkeypatch.setattr(gr, "_rasterize_torch",
                        lambda *a: calls.append("torch") or real_torch(*a))
    return calls


def test_auto_picks_cpp_on_cpu_and_can_be_forced_to_torch(monkeypatch):
    monkeypatch.delenv(grc.ENV_SWITCH, raising=False)
    calls = _calls(monkeypatch)
    params = _gaussians(20, seed=2, dtype=torch.float32)
    gr.rasterize_gaussians(*params, orbit(1), 8, 8)
    assert calls == ["cpp"]
    monkeypatch.setenv(grc.ENV_SWITCH, "0")
    gr.rasterize_gaussians(*params, orbit(1), 8, 8)
    assert calls == ["cpp", "torch"]
    monkeypatch.delenv(grc.ENV_SWITCH)
    grc.set_cpp_enabled(False)
    try:
        gr.rasterize_gaussians(*params, orbit(1), 8, 8)
    finally:
        grc.set_cpp_enabled(None)
    assert calls == ["cpp", "torch", "torch"]


def test_failed_build_falls_back_to_torch_with_one_warning(monkeypatch, capsys):
    from torch.utils import cpp_extension

    def broken(*args, **kwargs):
        raise RuntimeError("Error building extension 'distill_gaussian_raster': g++ failed")

    monkeypatch.delenv(grc.ENV_SWITCH, raising=False)
    monkeypatch.setattr(cpp_extension, "load", broken)
    grc.reset_extension()
    try:
        calls = _calls(monkeypatch)
        params = _gaussians(20, seed=2, dtype=torch.float32)
        capsys.readouterr()
        first = gr.rasterize_gaussians(*params, orbit(1), 8, 8)
        second = gr.rasterize_gaussians(*params, orbit(1), 8, 8, backend="auto")
        err = capsys.readouterr().err
        assert calls == ["torch", "torch"]
        assert err.count("warning:") == 1 and "torch backend" in err
        assert "Traceback" not in err and "g++ failed" in err
        assert torch.equal(first["features"], second["features"])
        with pytest.raises(RuntimeError, match="backend: 'cpp'"):
            gr.rasterize_gaussians(*params, orbit(1), 8, 8, backend="cpp")
    finally:
        monkeypatch.undo()
        grc.reset_extension()
    assert grc.load_extension() is not None                 # the real kernel loads again


@pytest.mark.skipif(os.name != "posix", reason="uses a shell script as the compiler")
def test_a_real_compiler_failure_falls_back_in_a_fresh_process(tmp_path):
    # a compiler that fails every compile, and an empty extensions folder: a real failed build
    cxx = tmp_path / "cxx"
    cxx.write_text('#!/bin/sh\nif [ "$1" = "--version" ]; then exec g++ --version; fi\n'
                   'echo "fake-compiler: no" >&2\nexit 1\n')
    cxx.chmod(0o755)
    env = dict(os.environ, CXX=str(cxx), TORCH_EXTENSIONS_DIR=str(tmp_path / "ext"),
               PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop(grc.ENV_SWITCH, None)
    code = ("import torch\n"
            "from engine.cameras import orbit\n"
            "from representations.lib import gaussian_raster as gr\n"
            "p = [torch.rand(5, 3), torch.full((5, 3), -2.0), torch.rand(5, 4),\n"
            "     torch.full((5,), 0.5), torch.rand(5, 3)]\n"
            "for _ in range(2):\n"
            "    out = gr.rasterize_gaussians(*p, orbit(1), 8, 8)\n"
            "print('rendered', tuple(out['features'].shape))\n")
    done = subprocess.run([sys.executable, "-c", code], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    assert "rendered (1, 8, 8, 3)" in done.stdout
    assert done.stderr.count("warning:") == 1 and "fake-compiler: no" in done.stderr
    assert "Traceback" not in done.stderr


def test_auto_leaves_other_dtypes_to_torch(monkeypatch):
    calls = _calls(monkeypatch)
    params = [t.to(torch.bfloat16) for t in _gaussians(20, seed=2)]
    cams = orbit(1)
    gr.rasterize_gaussians(*params, cams, 8, 8)
    assert calls == ["torch"]
    with pytest.raises(ValueError, match="float32 or float64"):
        gr.rasterize_gaussians(*params, cams, 8, 8, backend="cpp")


def test_cpp_backend_is_a_config_choice():
    from representations.gaussians import GaussiansConfig

    assert "cpp" in gr.BACKENDS
    GaussiansConfig(backend="cpp")
    with pytest.raises(Exception, match="cpp"):
        GaussiansConfig(backend="nope")
