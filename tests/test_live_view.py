"""The live view (engine/live_view.py): viser's camera in the engine's frame, the config keys,
a run watched by a viser client, its cost cap, and the one-line errors."""

from __future__ import annotations

import math
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from conftest import tiny_fit_args
from engine import checkpoint, config
from engine import live_view as lv
from engine.cameras import Cameras
from engine.run import main

H = math.sqrt(0.5)


# -- the frame conversion, by hand -----------------------------------------------------------

def test_camera_behind_the_object_on_minus_y():
    """Camera at (0, -3, 0) looking at the origin, z up. In viser's OpenCV axes its right is
    world +x, its down world -z, its forward world +y: R has columns (1,0,0), (0,0,-1),
    (0,1,0), a -90 degree turn about x, so wxyz = (cos -45, sin -45, 0, 0). The engine's
    c2w has columns right (1,0,0), up (0,0,1), backward (0,-1,0) and the position."""
    cams = lv.viser_to_cameras((H, -H, 0.0, 0.0), (0.0, -3.0, 0.0), math.radians(40.0))
    expected = torch.tensor([[1.0, 0.0, 0.0, 0.0],
                             [0.0, 0.0, -1.0, -3.0],
                             [0.0, 1.0, 0.0, 0.0],
                             [0.0, 0.0, 0.0, 1.0]])
    assert torch.allclose(cams.c2w[0], expected, atol=1e-6)
    assert cams.elevation.item() == pytest.approx(0.0, abs=1e-6)
    assert cams.azimuth.item() == pytest.approx(270.0)        # from +x towards +y: -90
    assert cams.distance.item() == pytest.approx(3.0)
    assert cams.fovy.item() == pytest.approx(math.radians(40.0))
    # the engine's rays: the centre looks at the origin (+y), the right edge bends to +x,
    # the top row to +z
    _, dirs = cams.rays(4, 4)
    centre = dirs[0, 1:3, 1:3].mean(dim=(0, 1))
    assert torch.allclose(centre / centre.norm(), torch.tensor([0.0, 1.0, 0.0]), atol=1e-6)
    assert dirs[0, 2, 3, 0] > 0 and dirs[0, 2, 0, 0] < 0       # right column: +x
    assert dirs[0, 0, 2, 2] > 0 and dirs[0, 3, 2, 2] < 0       # top row: +z


def test_camera_on_plus_x_is_the_engines_azimuth_zero():
    """Camera at (2, 0, 0): forward -x, down -z, right = forward x up = +y. R's rows are
    (0,0,-1), (1,0,0), (0,-1,0); trace 0, so w = 1/2 and (x, y, z) = (R21 - R12, R02 - R20,
    R10 - R01) / (4w) = (-1/2, -1/2, 1/2)."""
    wxyz = (0.5, -0.5, -0.5, 0.5)
    assert np.allclose(lv.quaternion_to_matrix(wxyz),
                       [[0, 0, -1], [1, 0, 0], [0, -1, 0]], atol=1e-12)
    cams = lv.viser_to_cameras(wxyz, (2.0, 0.0, 0.0), math.radians(30.0))
    expected = torch.tensor([[0.0, 0.0, 1.0, 2.0],      # right (0,1,0), up (0,0,1),
                             [1.0, 0.0, 0.0, 0.0],      # backward (1,0,0), position (2,0,0)
                             [0.0, 1.0, 0.0, 0.0],
                             [0.0, 0.0, 0.0, 1.0]])
    assert torch.allclose(cams.c2w[0], expected, atol=1e-6)
    ours = Cameras.from_spherical(0.0, 0.0, 2.0, 30.0)       # the engine's own camera there
    assert torch.allclose(cams.c2w, ours.c2w, atol=1e-6)
    assert cams.azimuth.item() == pytest.approx(0.0)
    # and back: the orientation a browser would report for that view
    assert np.allclose(lv.look_at_wxyz((2.0, 0.0, 0.0)), wxyz, atol=1e-12)


def test_any_look_at_pose_matches_the_engines_look_at():
    for pos in [(1.0, 2.0, 0.5), (-2.0, 0.3, 1.5), (0.2, -1.0, -0.7)]:
        cams = lv.viser_to_cameras(lv.look_at_wxyz(pos), pos, 0.7)
        ours = Cameras.from_spherical(cams.elevation, cams.azimuth, cams.distance,
                                      math.degrees(0.7))
        assert torch.allclose(cams.c2w, ours.c2w, atol=1e-5), pos


# -- the keys ------------------------------------------------------------------------------

@pytest.mark.parametrize("item, message", [
    ("output.live_view_port=70000", "output.live_view_port: must be in [0, 65535]"),
    ("output.live_view_refresh=-1", "output.live_view_refresh: must be >= 0 seconds"),
    ("output.live_view_size=8", "output.live_view_size: must be in [16, 1024] pixels"),
    ("output.live_view=maybe", "output.live_view:"),
    ("output.live_veiw=true", "did you mean 'live_view'"),
])
def test_bad_live_view_keys_are_one_line_and_write_nothing(rgba_image, tmp_path, capsys, item,
                                                            message):
    out = tmp_path / "run"
    assert main(tiny_fit_args(rgba_image, out, extra=[item])) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: ") and message in err
    assert not out.exists()


def test_the_keys_default_to_off(rgba_image, tmp_path):
    cfg, _ = config.load("fit-image", [f"image={rgba_image}"])
    o = cfg.output
    assert (o.live_view, o.live_view_port, o.live_view_host, o.live_view_refresh,
            o.live_view_size) == (False, 8080, "127.0.0.1", 1.0, 128)


def test_without_viser_the_key_is_one_line_exit_2(rgba_image, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "viser", None)      # as if not installed
    out = tmp_path / "run"
    assert main(tiny_fit_args(rgba_image, out, extra=["output.live_view=true"])) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert 'pip install "distill-engine[live]"' in err and err.startswith("error: output.live_view")
    assert not out.exists()
    # off, the same missing package is no concern
    assert main(tiny_fit_args(rgba_image, out, steps=2)) == 0


def test_off_starts_no_server(rgba_image, tmp_path, capsys, monkeypatch):
    viser = pytest.importorskip("viser")
    started = []
    monkeypatch.setattr(viser, "ViserServer", lambda *a, **k: started.append(1))
    assert main(tiny_fit_args(rgba_image, tmp_path / "run", steps=3)) == 0
    assert started == [] and "live view" not in capsys.readouterr().out


# -- a run watched by a client ---------------------------------------------------------------

POSE_A = (0.4, -2.4, 0.6)       # the client's camera during the run
POSE_B = (-2.4, 0.9, 1.2)       # another view, to tell renders apart


def _render_checkpoint(run_dir: Path, ckpt_path: Path, cams: Cameras, h: int, w: int):
    """A direct render of the representation saved in ``ckpt_path``, in eval mode as the
    progress renders are made (uint8, [H, W, 3])."""
    from engine.outputs import to_uint8
    from engine.plugin import StepInfo
    from engine.run import _load_inputs
    from engine.trainer import Trainer, _restore

    cfg, resolved = config.load(None, [], base=config.read_yaml(run_dir / "config.yaml"))
    trainer = Trainer(cfg, resolved, run_dir, _load_inputs(cfg), torch.device("cpu"))
    parts = trainer._build_prepared(0)
    _restore(*checkpoint.load(ckpt_path), modules={"representation": parts.representation,
                                                   "background": parts.background},
             optimizer=None)
    parts.representation.eval(), parts.background.eval()
    with torch.no_grad():
        out = parts.representation.render(cams, h, w, background=parts.background,
                                          step=StepInfo("preview", 0, 0, 1, 0))
    return to_uint8(out["rgb"][0])


@pytest.fixture
def watched(monkeypatch):
    """Every LiveView a run opens gets a ProtocolClient (viser's websocket protocol, as a
    browser speaks it) that reports POSE_A, and renders at every step (no refresh wait, no
    budget cap), so each frame can be checked."""
    pytest.importorskip("viser")
    seen = {}
    original = lv.LiveView.open.__func__

    def open_and_connect(cls, output, stages=()):
        view = original(cls, output, stages)
        if view.on:
            client = lv.ProtocolClient(view.url)
            client.send_camera(lv.look_at_wxyz(POSE_A), POSE_A, math.radians(40.0))
            assert view.wait_for_client()
            # the server put the new browser at its start view; the browser answers with
            # where its camera is (as a browser does after a move)
            client.send_camera(lv.look_at_wxyz(POSE_A), POSE_A, math.radians(40.0))
            for _ in range(200):
                if np.allclose(view.clients()[0].camera.position, POSE_A):
                    break
                import time
                time.sleep(0.02)
            seen.update(view=view, client=client)
        return view

    monkeypatch.setattr(lv.LiveView, "open", classmethod(open_and_connect))
    monkeypatch.setattr(lv, "BUDGET", 1.0)
    yield seen
    if "client" in seen:
        seen["client"].close()


def test_a_watched_run_sends_renders_of_the_representation_from_the_clients_camera(
        rgba_image, tmp_path, capsys, watched):
    out = tmp_path / "run"
    steps = 6
    args = tiny_fit_args(rgba_image, out, steps=steps, extra=[
        "output.live_view=true", "output.live_view_port=0", "output.live_view_refresh=0",
        "output.checkpoint_every=1", "output.live_view_size=32"])
    assert main(args) == 0
    printed = capsys.readouterr().out
    view, client = watched["view"], watched["client"]
    assert [line for line in printed.splitlines() if line.startswith("live view: http://")] \
        == [f"live view: {view.url} (open it in a browser; drag to turn the camera)"]
    assert view.frames == steps and not view.on          # a frame a step; closed at the end
    assert view.last_step["step"] == steps - 1
    # the last frame is the representation after the last step (its stage-end checkpoint),
    # rendered from the client's camera: a direct render of that checkpoint matches it
    h, w = view.last_frame.shape[:2]
    assert (h, w) == (32, 42)                            # 32 px tall, the client's 640:480
    ckpt_path = out / "checkpoints" / checkpoint.checkpoint_name(0, "fit", steps)
    cam_a = lv.viser_to_cameras(lv.look_at_wxyz(POSE_A), POSE_A, math.radians(40.0))
    assert torch.allclose(view.last_camera.c2w, cam_a.c2w, atol=1e-5)
    direct_a = _render_checkpoint(out, ckpt_path, cam_a, h, w)
    direct_b = _render_checkpoint(out, ckpt_path, lv.viser_to_cameras(
        lv.look_at_wxyz(POSE_B), POSE_B, math.radians(40.0)), h, w)
    assert np.abs(view.last_frame.astype(int) - direct_a.astype(int)).max() <= 1
    assert np.abs(direct_a.astype(float) - direct_b).mean() > 5     # the views differ
    # ... and the client received it over the websocket (JPEG: close, not exact)
    # (viser may coalesce image updates that arrive while the socket is busy: every frame is
    # sent, at least the newest reaches the client)
    client.wait_for_images(steps, timeout=30.0)
    assert client.images, "the client received no frame"
    got = client.images[-1].astype(float)
    assert got.shape == (h, w, 3)
    assert np.abs(got - direct_a).mean() < 0.5 * np.abs(got - direct_b).mean()
    assert np.abs(got - direct_a).mean() < 6
    # an earlier frame shows an earlier state: the frames follow training
    first = _render_checkpoint(out, out / "checkpoints" / checkpoint.checkpoint_name(0, "fit", 1),
                               cam_a, h, w)
    if len(client.images) == steps:
        assert np.abs(client.images[0].astype(float) - first).mean() < \
            np.abs(client.images[0].astype(float) - direct_a).mean() + 1e-9
    # the loss curves and the text show the run
    assert view._curves["loss"][-1] == pytest.approx(_records(out)[-1]["loss"])
    assert view._plot is not None and view._plot.data[0].tolist() == list(range(steps))
    assert f"step {steps}/{steps}" in view._text.content


def _records(run_dir):
    import json

    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_watching_does_not_change_the_training(rgba_image, tmp_path, watched):
    steps = 5
    assert main(tiny_fit_args(rgba_image, tmp_path / "plain", steps=steps)) == 0
    assert main(tiny_fit_args(rgba_image, tmp_path / "watched", steps=steps, extra=[
        "output.live_view=true", "output.live_view_port=0", "output.live_view_refresh=0",
        "output.live_view_size=24"])) == 0
    assert watched["view"].frames == steps
    name = checkpoint.checkpoint_name(0, "fit", steps)
    plain = load_file(str(tmp_path / "plain" / "checkpoints" / name))
    seen = load_file(str(tmp_path / "watched" / "checkpoints" / name))
    assert plain.keys() == seen.keys()
    assert all(torch.equal(plain[k], seen[k]) for k in plain)


# -- the cost cap ------------------------------------------------------------------------------

class _Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def _fake_view(monkeypatch, clients, render_seconds, clock):
    """A LiveView whose server and representation are stand-ins: the render 'takes'
    ``render_seconds`` on the fake clock."""
    pytest.importorskip("viser")
    monkeypatch.setattr(lv.time, "perf_counter", clock)
    view = lv.LiveView()
    shown = []
    view.server = SimpleNamespace(get_clients=lambda: {i: c for i, c in enumerate(clients)},
                                  gui=SimpleNamespace(add_uplot=lambda **k: SimpleNamespace(
                                      remove=lambda: None, title=k["title"], data=k["data"])),
                                  stop=lambda: None)
    view._text = SimpleNamespace(content="")

    class Rep(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))

        def render(self, cams, h, w, background=None, step=None):
            clock.now += render_seconds
            return {"rgb": torch.zeros(1, h, w, 3)}

    parts = SimpleNamespace(representation=Rep(), background=torch.nn.Identity())
    for c in clients:
        c.scene = SimpleNamespace(set_background_image=lambda img, **k: shown.append(img))
    return view, parts, shown


def _client():
    return SimpleNamespace(camera=SimpleNamespace(wxyz=lv.look_at_wxyz(POSE_A), position=POSE_A,
                                                  fov=0.7, aspect=1.0))


def _steps(view, parts, clock, n, step_seconds):
    info = SimpleNamespace(stage_steps=n)
    for i in range(n):
        clock.now += step_seconds
        view.after_step(parts, info, {"stage": "fit", "stage_index": 0, "step": i, "loss": 1.0,
                                      "loss/rgb": 0.5})


def test_a_slow_render_is_capped_at_the_budget(monkeypatch):
    clock = _Clock()
    view, parts, shown = _fake_view(monkeypatch, [_client()], render_seconds=0.5, clock=clock)
    view.refresh = 1.0
    _steps(view, parts, clock, 200, step_seconds=1.0)
    # each 0.5 s frame must be earned by 0.5 / 0.04 = 12.5 s since the first one: about one
    # frame every 13 steps, not every step
    assert 14 <= len(shown) <= 17
    # their time is the budget's share of the time since the first one, plus one frame
    assert view.render_seconds <= lv.BUDGET * clock.now + 0.5


def test_a_fast_render_follows_the_refresh(monkeypatch):
    clock = _Clock()
    view, parts, shown = _fake_view(monkeypatch, [_client()], render_seconds=0.001, clock=clock)
    view.refresh = 2.0
    _steps(view, parts, clock, 100, step_seconds=0.5)      # 50 s of training
    assert 24 <= len(shown) <= 26                           # one frame each 2 s


def test_nothing_is_rendered_without_a_client(monkeypatch):
    clock = _Clock()
    view, parts, shown = _fake_view(monkeypatch, [], render_seconds=0.5, clock=clock)
    view.refresh = 0.0
    _steps(view, parts, clock, 50, step_seconds=1.0)
    assert shown == [] and view.frames == 0 and view.render_seconds == 0.0
    assert len(view._curves["loss/rgb"]) == 50     # the curves are kept for a later browser


def test_an_address_it_cannot_listen_on_is_a_warning_not_a_hang(capsys):
    pytest.importorskip("viser")
    output = SimpleNamespace(live_view=True, live_view_refresh=1.0, live_view_size=64,
                             live_view_host="no-such-host.invalid", live_view_port=8080)
    view = lv.LiveView.open(output)
    assert not view.on
    err = capsys.readouterr().err.strip()
    assert err.startswith("warning: live view not started: cannot listen on no-such-host.invalid")
    view.after_step(None, None, {"stage": "fit", "step": 0, "loss": 1.0})   # off: nothing
    view.close()
