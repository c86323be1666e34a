"""The web app in a real browser: headless Chromium (Debian's chromium + chromium-driver)
driven by Selenium uploads a toy picture, picks the toy recipe, starts a run and waits for
the 3D viewer to show the GLB. A screenshot is kept in the test's tmp folder (and in
$APP_SCREENSHOT_DIR when set).

Selenium uses the system chromedriver (/usr/bin/chromedriver, or $CHROMEDRIVER) through an
explicit Service path, so Selenium Manager never runs and nothing is downloaded; SE_OFFLINE
is set as well. Skipped, with the reason, without gradio, selenium, chromium or chromedriver:

    apt-get install -y chromium chromium-driver && pip install -e ".[app]"
    python -m pytest -m browser tests/test_app_browser.py
"""

from __future__ import annotations

import io
import os
import shutil
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MUG = ROOT / "examples" / "toy" / "red-mug.png"
RECIPE = "isotropic3d-toy"
#: the toy recipe in a few minutes on a busy 2-core CPU: a few steps a stage, small export
OVERRIDES = ["stages.nerf.steps=5", "stages.dmtet.steps=5",
             "stages.nerf.representation.hash_grid.compile=false", "export.mesh_resolution=32",
             "export.texture_size=64", "export.turntable.frames=8", "export.turntable.size=64"]
TIMEOUT = 480          # seconds for the whole run; measured ~3 min on a loaded 2-core CPU
VIEWER_WAIT = 240      # seconds for the 3D viewer to draw the GLB once the run is done
CHROME_FLAGS = ["--headless=new", "--no-sandbox", "--disable-dev-shm-usage",
                "--window-size=1400,1700", "--enable-unsafe-swiftshader",
                "--use-angle=swiftshader", "--disable-gpu-sandbox", "--no-first-run",
                "--disable-background-networking", "--disable-component-update",
                "--disable-sync", "--metrics-recording-only", "--disable-default-apps"]

pytestmark = [pytest.mark.browser, pytest.mark.slow,
              pytest.mark.filterwarnings("ignore:.*no_silent_downcasting"),
              pytest.mark.filterwarnings("ignore:The copy keyword")]


def _binary(env: str, *names: str):
    given = os.environ.get(env)
    if given:
        return given if Path(given).is_file() else None
    for name in names:
        found = shutil.which(name) or (f"/usr/bin/{name}" if Path(f"/usr/bin/{name}").is_file()
                                       else None)
        if found:
            return found
    return None


def chrome_driver(extra_flags=(), logging_prefs=None):
    """Headless Chromium through Selenium with the system browser and driver (``CHROME_FLAGS``
    plus ``extra_flags``; ``logging_prefs``: Chrome's goog:loggingPrefs), or a pytest skip
    saying what is missing. The caller quits it."""
    pytest.importorskip("selenium", reason="selenium is not installed (pip install -e '.[app]')")
    chromium = _binary("CHROMIUM", "chromium", "chromium-browser")
    driver_path = _binary("CHROMEDRIVER", "chromedriver")
    if chromium is None:
        pytest.skip("no chromium browser (apt-get install -y chromium chromium-driver)")
    if driver_path is None:
        pytest.skip("no chromedriver (apt-get install -y chromium-driver)")
    os.environ.setdefault("SE_OFFLINE", "true")       # Selenium Manager: never the network
    os.environ.setdefault("SE_AVOID_STATS", "true")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in [*CHROME_FLAGS, *extra_flags]:
        options.add_argument(flag)
    if logging_prefs:
        options.set_capability("goog:loggingPrefs", logging_prefs)
    driver = webdriver.Chrome(service=Service(executable_path=driver_path), options=options)
    driver.set_page_load_timeout(60)
    return driver


@pytest.fixture(scope="module")
def browser():
    pytest.importorskip("gradio", reason="gradio is not installed (pip install -e '.[app]')")
    driver = chrome_driver()
    try:
        yield driver
    finally:
        driver.quit()


@pytest.fixture(scope="module")
def app_url(tmp_path_factory):
    pytest.importorskip("gradio", reason="gradio is not installed (pip install -e '.[app]')")
    from engine.app import launch
    from engine.app_runs import RunManager

    manager = RunManager(tmp_path_factory.mktemp("browser-outputs"), cwd=ROOT,
                         work=tmp_path_factory.mktemp("browser-work"))
    demo, url = launch(manager, port=0, block=False, quiet=True)
    try:
        yield url, manager
    finally:
        demo.close()
        manager.shutdown(timeout=30)


def _value(driver, elem_id: str) -> str:
    from selenium.webdriver.common.by import By

    box = driver.find_element(By.CSS_SELECTOR, f"#{elem_id} textarea, #{elem_id} input")
    return box.get_attribute("value") or ""


def _drawn_fraction(png: bytes) -> float:
    """The fraction of a screenshot's pixels that differ from its most common colour (the
    viewer's background): 0 for an empty canvas."""
    import numpy as np
    from PIL import Image

    pixels = np.asarray(Image.open(io.BytesIO(png)).convert("RGB")).reshape(-1, 3)
    colours, counts = np.unique(pixels, axis=0, return_counts=True)
    background = colours[counts.argmax()]
    return float((np.abs(pixels.astype(int) - background).sum(axis=1) > 30).mean())


def _page_with_mesh(driver):
    """A screenshot of the page (PNG bytes) when the 3D viewer's part of it is drawn (more
    than 1% of its pixels differ from its background), else None."""
    from PIL import Image
    from selenium.webdriver.common.by import By

    canvas = driver.find_element(By.CSS_SELECTOR, "#model canvas")
    x, y, w, h, scale = driver.execute_script(
        "const b = arguments[0].getBoundingClientRect();"
        "return [b.left, b.top, b.width, b.height, window.devicePixelRatio];", canvas)
    png = driver.get_screenshot_as_png()
    page = Image.open(io.BytesIO(png))
    box = [int(v * scale) for v in (x, y, x + w, y + h)]
    box = (max(0, box[0]), max(0, box[1]), min(page.width, box[2]), min(page.height, box[3]))
    if box[2] - box[0] < 50 or box[3] - box[1] < 50:      # the viewer is off the screen
        driver.execute_script("arguments[0].scrollIntoView()", canvas)
        return None
    crop = io.BytesIO()
    page.crop(box).save(crop, format="PNG")
    return png if _drawn_fraction(crop.getvalue()) > 0.01 else None


def test_a_toy_run_in_a_headless_browser(browser, app_url, tmp_path):
    from selenium.common.exceptions import TimeoutException
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    url, manager = app_url
    driver = browser
    driver.get(url)
    wait = WebDriverWait(driver, 60, poll_frequency=0.5)
    wait.until(ec.presence_of_element_located((By.CSS_SELECTOR, "#picture input[type=file]")))

    # the picture: the engine's own check shows what it decided, and the picture it sees
    driver.find_element(By.CSS_SELECTOR, "#picture input[type=file]").send_keys(str(MUG))
    wait.until(lambda d: _value(d, "message").startswith("image red-mug.png"))
    wait.until(ec.presence_of_element_located((By.CSS_SELECTOR, "#preview img")))

    # the recipe, typed into the dropdown's filter and chosen
    box = driver.find_element(By.CSS_SELECTOR, "#recipe input")
    box.click()
    box.send_keys(Keys.CONTROL, "a")
    box.send_keys(RECIPE)
    box.send_keys(Keys.ENTER)
    wait.until(lambda d: _value(d, "recipe").startswith(f"{RECIPE}: "))
    wait.until(lambda d: "stages: nerf" in d.find_element(By.ID, "recipe-info").text)
    driver.find_element(By.CSS_SELECTOR, "#overrides textarea").send_keys("\n".join(OVERRIDES))

    driver.find_element(By.ID, "start").click()
    wait.until(lambda d: _value(d, "message").startswith("run "))
    message = _value(driver, "message")
    assert message.endswith("started on cpu"), message
    run_id = message.split()[1]
    assert _value(driver, "run-id") == run_id

    # live progress, then the result: the viewer's canvas draws the GLB, the links are there
    seen = set()

    def ended(d):
        text = d.find_element(By.ID, "status").text
        if "running" in text and "· step " in text:
            seen.add("progress")
        return manager.get(run_id).state not in ("queued", "running", "stopping")

    WebDriverWait(driver, TIMEOUT, poll_frequency=1).until(ended)
    assert "progress" in seen        # stage and step shown while it trained
    job = manager.get(run_id)
    assert (job.state, job.returncode) == ("done", 0), (job.error, job.log_lines(10))
    links = WebDriverWait(driver, 60, poll_frequency=1).until(
        lambda d: [a.get_attribute("href") for a in d.find_elements(By.CSS_SELECTOR,
                                                                   "#downloads a")
                   if a.get_attribute("href")] or None)
    names = {href.rsplit("/", 1)[-1] for href in links}
    assert {"mesh.glb", "mesh.obj"} <= names and any(n.endswith(".zip") for n in names), names
    glb_link = driver.find_element(By.CSS_SELECTOR, "#model a[download]")
    assert glb_link.get_attribute("href").endswith("mesh.glb")
    WebDriverWait(driver, 60).until(
        ec.presence_of_element_located((By.CSS_SELECTOR, "#model canvas")))
    status = driver.find_element(By.ID, "status").text
    assert "done" in status and "stage dmtet (2/2) · step 5/5" in status, status
    assert "Traceback" not in driver.page_source

    # the viewer loads its 3D engine (tries WebGPU, falls back to WebGL: SwiftShader here),
    # then the GLB, draws it, and redraws it when the page around it settles: over a minute
    # the first time on a busy CPU. The screenshot is the first page whose viewer shows it.
    driver.execute_script("window.scrollTo(0, 0)")
    shot = tmp_path / "web-app-browser-test.png"
    try:
        page = WebDriverWait(driver, VIEWER_WAIT, poll_frequency=1).until(_page_with_mesh)
    except TimeoutException:
        driver.save_screenshot(str(shot))
        raise AssertionError(f"the 3D viewer stayed empty for {VIEWER_WAIT} s; the page: "
                             f"{shot}") from None
    shot.write_bytes(page)
    if os.environ.get("APP_SCREENSHOT_DIR"):
        keep = Path(os.environ["APP_SCREENSHOT_DIR"])
        keep.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(shot, keep / shot.name)
    print(f"screenshot: {shot}")
