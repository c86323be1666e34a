"""Live view of a run: a viser page that renders the representation from the camera you move.

``output.live_view=true`` starts a viser server (https://viser.studio) when training starts
and prints its address once. A browser on that address shows:

* the representation rendered from the browser's own camera (drag to turn, scroll to zoom)
  as the scene's background image, re-rendered at the refresh interval;
* the loss curves of the current stage (a uPlot chart: the total loss and every ``loss/NAME``
  the step logged) and a line with the stage, step and latest loss.

Where the work happens: every render is made on the training thread, between two steps
(after the optimiser step and the metrics line, before the next step seeds its RNG), under
``torch.no_grad`` with the representation in eval mode, exactly as the progress renders are:
the optimiser never races a render, and a run with the live view on trains to the same
weights as one without (each step reseeds torch's RNG itself). viser's own threads only
carry the pictures and the browser's camera messages. Nothing is rendered while no browser is
connected; then the per-step cost is appending the step's losses to a list.

Cost: a frame is rendered when a client is connected, at least ``output.live_view_refresh``
seconds after the last one began, and only while the frames so far (all of them, the first
included, which may hold one-off work such as compiling a kernel for the new size) took at
most ``BUDGET`` (4 %) of the time since the first one: rendering takes at most 4 % of the
watched training time plus one frame, however slow a render is on the machine. A frame is
``output.live_view_size`` pixels tall (the browser's aspect ratio), JPEG-encoded.

Frames: viser gives a camera as ``T_world_camera`` in OpenCV axes (x right, y down, z
forward: the columns of its rotation ``R = quat(wxyz)`` are those axes in world space, and
``position`` the centre); the engine's cameras (engine/cameras.py) are OpenGL axes (columns
right, up, backward). So ``c2w[:3, :3] = R @ diag(1, -1, -1)`` and ``c2w[:3, 3] = position``.
Both use a vertical field of view in radians and, here, the same world (z up: the server
sets viser's up direction to +z, the engine's world up).
"""

from __future__ import annotations

import contextlib
import io
import math
import sys
import time
from typing import Any, Dict, List, Optional, Sequence

import numpy as np

from engine.errors import ConfigError

#: the largest share of the training time frames may take (a refresh waits longer when a
#: render is slow, so this holds on any machine)
BUDGET = 0.04
#: the most points each loss curve sends to the browser (longer curves are thinned)
MAX_POINTS = 1000
#: the browser camera's first pose: the progress renders' view (elevation 15 deg, fovy 40)
START_ELEVATION_DEG = 15.0
START_FOVY_DEG = 40.0

EXTRA_HINT = 'pip install "distill-engine[live]"'


def viser_installed() -> bool:
    """Whether viser can be imported, without importing it."""
    import importlib.util

    if "viser" in sys.modules:
        return sys.modules["viser"] is not None
    try:
        return importlib.util.find_spec("viser") is not None
    except (ImportError, ValueError):
        return False


def viser_missing(prefix: str = "output.") -> ConfigError:
    return ConfigError(f"{prefix}live_view: true needs the viser package, which is not "
                       f"installed: {EXTRA_HINT} (or pip install viser; or set "
                       "output.live_view=false)")


def check_settings(output: Any) -> None:
    """The ``output.live_view*`` keys (called by OutputConfig): one ConfigError each."""
    port = output.live_view_port
    if not 0 <= port <= 65535:
        raise ConfigError(f"live_view_port: must be in [0, 65535] (0: any free port), got {port}")
    if not (output.live_view_refresh >= 0 and math.isfinite(output.live_view_refresh)):
        raise ConfigError(f"live_view_refresh: must be >= 0 seconds, got "
                          f"{output.live_view_refresh}")
    if not 16 <= output.live_view_size <= 1024:
        raise ConfigError(f"live_view_size: must be in [16, 1024] pixels, got "
                          f"{output.live_view_size}")
    if not str(output.live_view_host).strip():
        raise ConfigError("live_view_host: must be an address, e.g. 127.0.0.1 or 0.0.0.0")
    if output.live_view and not viser_installed():
        raise viser_missing(prefix="")


# -- the frame conversion -----------------------------------------------------------------

def quaternion_to_matrix(wxyz: Sequence[float]) -> np.ndarray:
    """A unit quaternion (w, x, y, z) as a 3x3 rotation matrix (normalised first)."""
    w, x, y, z = (float(v) for v in wxyz)
    n = math.sqrt(w * w + x * x + y * y + z * z)
    if n == 0.0:
        raise ValueError("zero quaternion")
    w, x, y, z = w / n, x / n, y / n, z / n
    return np.array([
        [1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y)],
        [2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x)],
        [2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y)],
    ])


#: OpenCV camera axes (x right, y down, z forward) -> OpenGL ones (x right, y up, z backward)
CV_TO_GL = np.diag([1.0, -1.0, -1.0])


def viser_to_c2w(wxyz: Sequence[float], position: Sequence[float]) -> np.ndarray:
    """viser's camera pose (T_world_camera, OpenCV axes) as the engine's camera-to-world
    matrix (OpenGL axes: columns right, up, backward, position), 4x4 float64."""
    c2w = np.eye(4)
    c2w[:3, :3] = quaternion_to_matrix(wxyz) @ CV_TO_GL
    c2w[:3, 3] = np.asarray(position, dtype=np.float64)
    return c2w


def viser_to_cameras(wxyz: Sequence[float], position: Sequence[float], fov: float,
                     device=None):
    """One engine :class:`~engine.cameras.Cameras` for a viser camera (``fov``: vertical,
    radians). Elevation, azimuth and distance are those of its position (engine
    conventions: degrees, azimuth from +x towards +y)."""
    import torch

    from engine.cameras import Cameras

    c2w = torch.as_tensor(viser_to_c2w(wxyz, position), dtype=torch.float32)[None]
    x, y, z = (float(v) for v in position)
    distance = math.sqrt(x * x + y * y + z * z)
    elevation = math.degrees(math.asin(z / distance)) if distance > 0 else 0.0
    azimuth = math.degrees(math.atan2(y, x)) % 360.0

    def one(v):
        return torch.tensor([v], dtype=torch.float32)

    cams = Cameras(c2w, one(float(fov)), one(elevation), one(azimuth), one(distance))
    return cams.to(device) if device is not None else cams


def frame_size(height: int, aspect: float) -> tuple:
    """(H, W) of a frame ``height`` pixels tall at the browser's aspect ratio (W/H), both
    even and at least 16."""
    if not (aspect > 0 and math.isfinite(aspect)):
        aspect = 1.0
    h = max(16, int(height) // 2 * 2)
    w = max(16, int(round(h * min(max(aspect, 0.25), 4.0) / 2)) * 2)
    return h, w


def _cannot_listen(host: str) -> str:
    """Why no server can listen on ``host`` (an address this machine does not have, a name
    that does not resolve), or "" when one can."""
    import socket

    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, 0, type=socket.SOCK_STREAM)[0]
        with socket.socket(family, kind, proto) as probe:
            probe.bind(address)
    except OSError as exc:
        return exc.strerror or str(exc)
    return ""


@contextlib.contextmanager
def _quiet():
    """viser prints a banner when it starts and a line when it stops: the engine prints its
    own one line instead."""
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        yield


# -- the viewer ----------------------------------------------------------------------------

class LiveView:
    """``LiveView()`` is off (every call does nothing); :meth:`open` starts the viewer that
    the run's ``output`` settings ask for."""

    def __init__(self):
        self.server = None
        self.url: Optional[str] = None
        self.refresh = 1.0
        self.size = 128
        self.frames = 0                 # frames rendered
        self.render_seconds = 0.0       # time spent rendering and sending them
        self.last_frame: Optional[np.ndarray] = None   # [H, W, 3] uint8, as sent
        self.last_camera = None         # the Cameras it was rendered from
        self.last_step: Optional[Dict[str, Any]] = None   # the record of the step it shows
        self._next = 0.0                # perf_counter time of the next frame
        self._since: Optional[float] = None   # perf_counter time of the first frame
        self._stages: List[str] = []
        self._stage: Optional[str] = None
        self._steps: List[float] = []
        self._curves: Dict[str, List[float]] = {}
        self._plot = None
        self._plot_keys: tuple = ()
        self._text = None
        self._latest: Optional[Dict[str, Any]] = None

    @property
    def on(self) -> bool:
        return self.server is not None

    @classmethod
    def open(cls, output: Any, stages: Sequence[str] = ()) -> "LiveView":
        """The viewer of ``output`` (the run's OutputConfig): off unless ``live_view``."""
        view = cls()
        if not getattr(output, "live_view", False):
            return view
        try:
            import viser
        except ImportError:
            raise viser_missing() from None
        view.refresh = float(output.live_view_refresh)
        view.size = int(output.live_view_size)
        view._stages = list(stages)
        host = str(output.live_view_host)
        problem = _cannot_listen(host)
        if problem:   # (viser would wait for ever for a port on an address it cannot use)
            print(f"warning: live view not started: cannot listen on {host} ({problem}); the "
                  "run trains without it", file=sys.stderr)
            return view
        try:
            with _quiet():
                server = viser.ViserServer(host=host, port=int(output.live_view_port),
                                           label="distill-engine", verbose=False)
        except Exception as exc:    # an address this machine does not have, ...: train on
            print(f"warning: live view not started: cannot serve on {host}:"
                  f"{output.live_view_port} ({' '.join(str(exc).split())[:160]}); the run "
                  "trains without it", file=sys.stderr)
            return view
        view.server = server
        server.scene.set_up_direction("+z")
        view._text = server.gui.add_markdown("waiting for the first step")
        server.on_client_connect(view._on_connect)
        shown = "127.0.0.1" if host in ("0.0.0.0", "::", "") else host
        view.url = f"http://{shown}:{server.get_port()}"
        print(f"live view: {view.url} (open it in a browser; drag to turn the camera)",
              flush=True)
        return view

    def _on_connect(self, client) -> None:
        """A new browser: start it at the progress renders' view, and render soon."""
        d = 2.6
        el = math.radians(START_ELEVATION_DEG)
        try:
            client.camera.up_direction = (0.0, 0.0, 1.0)
            client.camera.position = (d * math.cos(el), 0.0, d * math.sin(el))
            client.camera.look_at = (0.0, 0.0, 0.0)
            client.camera.fov = math.radians(START_FOVY_DEG)
        except Exception:   # a client that went away meanwhile
            pass
        self._next = 0.0

    def clients(self) -> list:
        if self.server is None:
            return []
        return list(self.server.get_clients().values())

    def wait_for_client(self, timeout: float = 10.0) -> bool:
        """Block until a browser (or any viser client) is connected (tests, benchmarks)."""
        end = time.time() + timeout
        while time.time() < end:
            if self.clients():
                return True
            time.sleep(0.02)
        return False

    # -- what the trainer calls ------------------------------------------------------------
    def after_step(self, parts: Any, info: Any, record: Dict[str, Any]) -> None:
        """After each step's metrics line: keep its losses; at the refresh, when a browser is
        connected, render each browser's view and update the curves and the text."""
        if self.server is None:
            return
        self._keep(record, info)
        now = time.perf_counter()
        if now < self._next:
            return
        clients = self.clients()
        if not clients:
            return
        if self._since is None:
            self._since = now
        elif self.render_seconds > BUDGET * (now - self._since):
            return              # over the budget: wait until training has earned the frame
        start = time.perf_counter()
        try:
            for client in clients:
                self._render_for(client, parts, record)
            self._update_gui(info)
        except Exception as exc:   # the viewer must never end a training run
            print(f"warning: live view stopped: {' '.join(str(exc).split())[:200]}",
                  file=sys.stderr)
            self.close()
            return
        self.render_seconds += time.perf_counter() - start
        self._next = start + self.refresh

    def _keep(self, record: Dict[str, Any], info: Any) -> None:
        stage = record.get("stage")
        if stage != self._stage:
            self._stage, self._steps, self._curves = stage, [], {}
        self._latest = record
        if record.get("loss") is None:     # a skipped step: no point on the curves
            return
        self._steps.append(float(record.get("step", len(self._steps))))
        values = {"loss": record["loss"]}
        values.update({k: v for k, v in record.items() if k.startswith("loss/")})
        n = len(self._steps)
        for key, value in values.items():
            curve = self._curves.setdefault(key, [math.nan] * (n - 1))
            curve.append(float(value) if isinstance(value, (int, float)) and value is not None
                         and math.isfinite(value) else math.nan)
        for curve in self._curves.values():   # a loss this step did not log
            if len(curve) < n:
                curve.append(math.nan)

    def _render_for(self, client, parts: Any, record: Dict[str, Any]) -> None:
        import torch

        from engine.outputs import to_uint8
        from engine.plugin import StepInfo

        cam = client.camera
        try:
            wxyz, position, fov, aspect = cam.wxyz, cam.position, cam.fov, cam.aspect
        except (AssertionError, ZeroDivisionError):   # no camera message yet
            return
        rep, bg = parts.representation, parts.background
        device = next((p.device for p in rep.parameters()), None)
        cams = viser_to_cameras(wxyz, position, fov, device=device)
        h, w = frame_size(self.size, aspect)
        was_training = rep.training
        rep.eval(), bg.eval()
        try:
            with torch.no_grad():
                out = rep.render(cams, h, w, background=bg, step=StepInfo("preview", 0, 0, 1, 0))
                pixels = to_uint8(out["rgb"][0])
        finally:
            rep.train(was_training), bg.train(was_training)
        client.scene.set_background_image(pixels, format="jpeg", jpeg_quality=85)
        self.frames += 1
        self.last_frame, self.last_camera, self.last_step = pixels, cams.to("cpu"), dict(record)

    def _update_gui(self, info: Any) -> None:
        import viser.uplot as uplot

        rec = self._latest or {}
        si = int(rec.get("stage_index", 0))
        stages = len(self._stages) or si + 1
        total = getattr(info, "stage_steps", None)
        loss = rec.get("loss")
        text = (f"**{rec.get('stage', '?')}** ({si + 1}/{stages}) · step "
                f"{int(rec.get('step', 0)) + 1}/{total if total else '?'} · loss "
                f"{'skipped' if loss is None else f'{loss:.4g}'}")
        self._text.content = text
        if len(self._steps) < 2:
            return
        keys = tuple(self._curves)
        stride = max(1, math.ceil(len(self._steps) / MAX_POINTS))
        data = (np.asarray(self._steps[::stride], dtype=np.float64),
                *(np.asarray(self._curves[k][::stride], dtype=np.float64) for k in keys))
        if self._plot is None or keys != self._plot_keys or \
                self._plot.title != f"losses: {self._stage}":
            if self._plot is not None:
                self._plot.remove()
            colours = ["#222222", "#d62728", "#1f77b4", "#2ca02c", "#ff7f0e", "#9467bd",
                       "#8c564b", "#e377c2", "#17becf", "#bcbd22"]
            series = (uplot.Series(label="step"),
                      *(uplot.Series(label=k, stroke=colours[i % len(colours)], width=1.5)
                        for i, k in enumerate(keys)))
            self._plot = self.server.gui.add_uplot(data=data, series=series,
                                                   title=f"losses: {self._stage}",
                                                   aspect=1.4)
            self._plot_keys = keys
        else:
            self._plot.data = data

    def close(self) -> None:
        """Stop the server (a closed view ignores later calls)."""
        server, self.server = self.server, None
        if server is not None:
            if self.frames:
                print(f"live view: {self.frames} frames sent, {self.render_seconds:.1f} s "
                      "spent rendering them", flush=True)
            with _quiet():
                try:
                    server.stop()
                except Exception:
                    pass


# -- a minimal viser client (tests and the benchmark) --------------------------------------

class ProtocolClient:
    """A viser client without a browser: it connects to the server's websocket with viser's
    own protocol, reports a camera as a browser does (``ViewerCameraMessage``), and decodes
    the background images the server sends back (what a browser would show). For the tests
    and ``benchmarks/bench_live_view.py``; a person uses a browser."""

    def __init__(self, url: str, timeout: float = 10.0):
        import threading

        import viser
        from websockets.sync.client import connect

        ws_url = url.replace("http://", "ws://", 1)
        end = time.time() + timeout
        while True:
            try:
                self.ws = connect(ws_url, subprotocols=[f"viser-v{viser.__version__}"],
                                  max_size=None, open_timeout=timeout)
                break
            except OSError:
                if time.time() > end:
                    raise
                time.sleep(0.05)
        self.images: List[np.ndarray] = []    # every background image received, decoded
        self.received = 0                      # websocket messages received
        self._lock = threading.Lock()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def send_camera(self, wxyz: Sequence[float], position: Sequence[float], fov: float,
                    height: int = 480, width: int = 640,
                    look_at: Sequence[float] = (0.0, 0.0, 0.0)) -> None:
        import msgspec

        self.ws.send(msgspec.msgpack.encode({
            "type": "ViewerCameraMessage", "wxyz": [float(v) for v in wxyz],
            "position": [float(v) for v in position], "fov": float(fov), "near": 0.01,
            "far": 1000.0, "image_height": int(height), "image_width": int(width),
            "look_at": [float(v) for v in look_at], "up_direction": [0.0, 0.0, 1.0]}))

    def _read(self) -> None:
        import msgspec
        import zstandard
        from PIL import Image

        try:
            while True:
                raw = self.ws.recv()
                if not isinstance(raw, bytes) or len(raw) < 16:
                    continue
                size = int.from_bytes(raw[:8], "little")
                compressed = int.from_bytes(raw[8:16], "little")
                inner = zstandard.ZstdDecompressor().decompress(raw[16:16 + compressed],
                                                                max_output_size=size)
                for message in msgspec.msgpack.decode(inner).get("messages", ()):
                    if message.get("type") == "BackgroundImageMessage" and \
                            message.get("rgb_data"):
                        picture = Image.open(io.BytesIO(message["rgb_data"])).convert("RGB")
                        with self._lock:
                            self.images.append(np.asarray(picture))
                with self._lock:
                    self.received += 1
        except Exception:     # closed
            return

    def wait_for_images(self, count: int, timeout: float = 10.0) -> bool:
        end = time.time() + timeout
        while time.time() < end:
            with self._lock:
                if len(self.images) >= count:
                    return True
            time.sleep(0.02)
        return False

    def close(self) -> None:
        try:
            self.ws.close()
        except Exception:
            pass
        self._reader.join(timeout=2.0)


def look_at_wxyz(position: Sequence[float], target: Sequence[float] = (0.0, 0.0, 0.0),
                 up: Sequence[float] = (0.0, 0.0, 1.0)) -> tuple:
    """The viser orientation (wxyz, OpenCV axes) of a camera at ``position`` looking at
    ``target`` with ``up`` up: what a browser reports for that view."""
    p, t, u = (np.asarray(v, dtype=np.float64) for v in (position, target, up))
    z = t - p
    z /= np.linalg.norm(z)
    x = np.cross(z, u)         # right = forward x up
    x /= np.linalg.norm(x)
    y = np.cross(z, x)         # down = forward x right
    return matrix_to_quaternion(np.stack([x, y, z], axis=1))


def matrix_to_quaternion(r: np.ndarray) -> tuple:
    """A 3x3 rotation matrix as a unit quaternion (w, x, y, z), w >= 0."""
    m = np.asarray(r, dtype=np.float64)
    trace = m[0, 0] + m[1, 1] + m[2, 2]
    if trace > 0:
        s = 2.0 * math.sqrt(trace + 1.0)
        q = (0.25 * s, (m[2, 1] - m[1, 2]) / s, (m[0, 2] - m[2, 0]) / s, (m[1, 0] - m[0, 1]) / s)
    elif m[0, 0] > m[1, 1] and m[0, 0] > m[2, 2]:
        s = 2.0 * math.sqrt(1.0 + m[0, 0] - m[1, 1] - m[2, 2])
        q = ((m[2, 1] - m[1, 2]) / s, 0.25 * s, (m[0, 1] + m[1, 0]) / s, (m[0, 2] + m[2, 0]) / s)
    elif m[1, 1] > m[2, 2]:
        s = 2.0 * math.sqrt(1.0 + m[1, 1] - m[0, 0] - m[2, 2])
        q = ((m[0, 2] - m[2, 0]) / s, (m[0, 1] + m[1, 0]) / s, 0.25 * s, (m[1, 2] + m[2, 1]) / s)
    else:
        s = 2.0 * math.sqrt(1.0 + m[2, 2] - m[0, 0] - m[1, 1])
        q = ((m[1, 0] - m[0, 1]) / s, (m[0, 2] + m[2, 0]) / s, (m[1, 2] + m[2, 1]) / s, 0.25 * s)
    q = np.asarray(q)
    q /= np.linalg.norm(q)
    return tuple(float(v) for v in (q if q[0] >= 0 else -q))
