"""A run's results.html in a real browser, offline: a short fit-image-quick run of the toy mug
writes its folder, and headless Chromium (Debian's chromium + chromium-driver, driven by
Selenium) opens ``file://RUN/results.html`` with every host name resolving to nothing, so
nothing can come from the internet. The input picture is decoded, the turntable video plays,
the page's WebGL viewer draws the GLB (its canvas is not blank, the mug's red texture shows),
the loss curve is drawn, every request the page made was to the folder's own files (or to
data the page itself holds) and the console has no errors. A screenshot is kept in the test's
tmp folder (and in $APP_SCREENSHOT_DIR when set).

Uses tests/test_app_browser.py's browser settings (the system chromedriver through an explicit
path, so Selenium Manager never runs; SwiftShader for WebGL). Skipped, with the reason,
without selenium, chromium or chromedriver (gradio is not needed):

    python -m pytest -m browser tests/test_results_page_browser.py      # about 30 s
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
from pathlib import Path
from urllib.parse import urlparse

import pytest

from test_app_browser import _drawn_fraction, chrome_driver

ROOT = Path(__file__).resolve().parents[1]
MUG = ROOT / "examples" / "toy" / "red-mug.png"
#: fit-image-quick in a few seconds: few steps, a small export with both turntable formats
RUN = ["recipe=fit-image-quick", f"image={MUG}", "stages.fit.steps=25",
       "inputs.image_size=64", "output.render_size=32", "output.render_views=2",
       "output.render_every=0", "output.checkpoint_every=0", "output.tensorboard=false",
       "output.progress=false", "export.mesh_resolution=32", "export.texture_size=64",
       "export.turntable.frames=6", "export.turntable.size=64"]
#: every host name resolves to nothing: a page that fetched anything online would show it
#: (and a proxy that is not there, for anything that skips the resolver)
OFFLINE_FLAGS = ["--host-resolver-rules=MAP * ~NOTFOUND", "--proxy-server=127.0.0.1:9"]
LOAD_WAIT = 120        # seconds for the page's media and viewer (SwiftShader on a busy CPU)

pytestmark = [pytest.mark.browser, pytest.mark.slow]


@pytest.fixture(scope="module")
def offline_browser():
    # the console (errors) and the network log (every URL the page asks for)
    driver = chrome_driver(OFFLINE_FLAGS, {"browser": "ALL", "performance": "ALL"})
    try:
        yield driver
    finally:
        driver.quit()


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    from engine import run

    out = tmp_path_factory.mktemp("results-browser") / "mug"
    log = io.StringIO()
    with contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
        code = run.main([*RUN, f"out={out}"])
    assert code == 0, log.getvalue()[-2000:]
    for name in ("results.html", "input.png", "export/mesh.glb", "export/turntable.mp4",
                 "export/turntable.gif"):
        assert (out / name).is_file(), name
    return out


def _requested_urls(driver) -> list:
    """Every URL the page asked for since the last call (Chrome's network log)."""
    urls = []
    for entry in driver.get_log("performance"):
        message = json.loads(entry["message"])["message"]
        if message.get("method") == "Network.requestWillBeSent":
            urls.append(message["params"]["request"]["url"])
    return urls


def _viewer_crop(driver) -> tuple:
    """(screenshot PNG bytes, the viewer canvas's part of it as PNG bytes), the canvas
    scrolled into view first."""
    from PIL import Image
    from selenium.webdriver.common.by import By

    canvas = driver.find_element(By.ID, "viewer")
    driver.execute_script("arguments[0].scrollIntoView({block: 'center'})", canvas)
    x, y, w, h, scale = driver.execute_script(
        "const b = arguments[0].getBoundingClientRect();"
        "return [b.left, b.top, b.width, b.height, window.devicePixelRatio];", canvas)
    png = driver.get_screenshot_as_png()
    page = Image.open(io.BytesIO(png))
    box = [int(v * scale) for v in (x + 2, y + 2, x + w - 2, y + h - 2)]   # inside the border
    box = (max(0, box[0]), max(0, box[1]), min(page.width, box[2]), min(page.height, box[3]))
    crop = io.BytesIO()
    page.crop(box).save(crop, format="PNG")
    return png, crop.getvalue()


def test_the_network_is_blocked(offline_browser):
    """The browser of these tests cannot reach any host (else 'offline' would prove
    nothing): loading a web address fails with a network error."""
    from selenium.common.exceptions import WebDriverException

    driver = offline_browser
    with pytest.raises(WebDriverException, match="net::ERR_"):
        driver.get("https://example.com/")
    driver.get_log("browser")          # the failed load's lines are not the page's
    _requested_urls(driver)


def test_the_results_page_opens_offline(offline_browser, run_dir, tmp_path):
    import numpy as np
    from PIL import Image
    from selenium.webdriver.support.ui import WebDriverWait

    driver = offline_browser
    page_url = (run_dir / "results.html").resolve().as_uri()
    driver.get_log("browser")
    _requested_urls(driver)
    driver.get(page_url)

    # the input picture and the turntable (the MP4, playing: frames decoded, time moving)
    state = WebDriverWait(driver, LOAD_WAIT, poll_frequency=0.5).until(lambda d: d.execute_script(
        "const i = document.querySelector('img.input'),"
        "      v = document.querySelector('video.turntable');"
        "if (!i || !i.complete || !v || v.readyState < 2) return null;"
        "return {input: i.naturalWidth, video: v.videoWidth, src: v.currentSrc,"
        "        time: v.currentTime, error: v.error && v.error.code, paused: v.paused};"))
    assert state["input"] > 0, state
    assert state["video"] > 0 and state["error"] is None, state
    assert state["src"].endswith("export/turntable.mp4"), state
    WebDriverWait(driver, 30, poll_frequency=0.25).until(lambda d: d.execute_script(
        "return document.querySelector('video.turntable').currentTime") != state["time"])

    # every picture of the page decoded (input, final renders)
    broken = driver.execute_script(
        "return Array.from(document.images).filter(i => !i.complete || !i.naturalWidth)"
        ".map(i => i.getAttribute('src'))")
    assert broken == [], broken

    # the loss curve: an inline SVG whose polyline has one point per step, laid out
    curve = driver.execute_script(
        "const s = document.querySelector('svg.curve[data-key=loss]');"
        "if (!s) return null; const p = s.querySelector('polyline'), b = p.getBBox(),"
        "      r = s.getBoundingClientRect();"
        "return {points: p.points.numberOfItems, w: b.width, h: b.height,"
        "        shown: r.width * r.height};")
    assert curve is not None, "no loss curve on the page"
    steps = len((run_dir / "metrics.jsonl").read_text().splitlines())
    assert curve["points"] == steps, curve
    assert curve["w"] > 100 and curve["h"] > 10 and curve["shown"] > 0, curve

    # the 3D viewer: WebGL works here (no fallback note), the canvas draws the mesh, and its
    # texture: the mug is red (the red-mug picture's colour), not the untextured grey
    note = driver.execute_script("return document.getElementById('viewer-note').textContent")
    assert note.startswith("drag to turn"), note

    def drawn(d):
        png, crop = _viewer_crop(d)
        pixels = np.asarray(Image.open(io.BytesIO(crop)).convert("RGB")).reshape(-1, 3)
        red = ((pixels[:, 0].astype(int) - pixels[:, 1] > 60)
               & (pixels[:, 0].astype(int) - pixels[:, 2] > 60)).mean()
        return (png, crop, red) if _drawn_fraction(crop) > 0.02 and red > 0.01 else None

    shot = tmp_path / "results-page-browser-test.png"
    try:
        png, crop, red = WebDriverWait(driver, LOAD_WAIT, poll_frequency=1).until(drawn)
    except Exception:
        driver.save_screenshot(str(shot))
        raise AssertionError(f"the viewer did not draw the textured GLB; the page: {shot}")
    shot.write_bytes(png)
    if os.environ.get("APP_SCREENSHOT_DIR"):
        keep = Path(os.environ["APP_SCREENSHOT_DIR"])
        keep.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(shot, keep / shot.name)
    print(f"screenshot: {shot} (viewer: {_drawn_fraction(crop):.0%} drawn, {red:.0%} red)")

    # dragging turns the model: the canvas changes
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By

    ActionChains(driver).click_and_hold(driver.find_element(By.ID, "viewer")) \
        .move_by_offset(120, 0).release().perform()
    _, turned = _viewer_crop(driver)
    assert turned != crop

    # offline: the page asked for its own folder's files and its own data, nothing else
    urls = _requested_urls(driver)
    assert page_url in urls
    schemes = {urlparse(u).scheme for u in urls}
    assert schemes <= {"file", "data", "blob"}, sorted(u for u in urls
                                                       if not u.startswith(("file:", "data:",
                                                                            "blob:")))
    folder = run_dir.resolve().as_uri() + "/"
    assert all(u.startswith(folder) for u in urls if u.startswith("file:")), urls
    asked = {u[len(folder):] for u in urls if u.startswith(folder)}
    assert {"results.html", "input.png", "export/turntable.mp4"} <= asked, asked

    # and the console holds no error (a failed load, a script error, a WebGL error)
    severe = [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]
    assert severe == [], severe
