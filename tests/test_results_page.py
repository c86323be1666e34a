"""RUN/results.html (engine/results_page.py): built from a hand-made run folder with known
metrics, it links only the folder's own files, fetches nothing, embeds the GLB, and its
loss curves plot the logged values; a tiny run writes it at its end."""

from __future__ import annotations

import base64
import contextlib
import io
import json
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
import trimesh
from PIL import Image

from engine import results_page
from engine.export import textured_mesh, write_mesh
from engine.results_page import (MAX_POINTS, PAGE_NAME, PARSE_GLB_JS, build_page, curve_svg,
                                 final_values, thin, write_results_page)

#: two stages: "coarse" steps 0-5 (global 0-5), "fine" steps 0-3 (global 6-9); the loss has
#: its highest value (2.5) at global step 0 and lowest (0.125) at global step 9; loss/rgb is
#: logged on even global steps only, loss/nan is never finite
LOSS = [2.5, 2.0, 1.5, 1.25, 1.0, 0.75, 0.5, 0.375, 0.25, 0.125]


def _records():
    recs = []
    for g, loss in enumerate(LOSS):
        stage, step = ("coarse", g) if g < 6 else ("fine", g - 6)
        rec = {"stage": stage, "stage_index": int(g >= 6), "step": step, "global_step": g,
               "time": 0.1 * g, "loss": loss, "loss/nan": float("nan"), "lr/x": 0.01}
        if g % 2 == 0:
            rec["loss/rgb"] = loss / 2
        recs.append(rec)
    return recs


class _Page(HTMLParser):
    """Every src / href, the <svg> elements' attributes and polylines, scripts' text."""

    def __init__(self):
        super().__init__()
        self.links, self.svgs, self.scripts, self._script = [], [], [], None

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        for name in ("src", "href", "poster", "data"):
            if attrs.get(name) is not None:
                self.links.append((tag, attrs[name]))
        if tag == "svg":
            self.svgs.append({"attrs": attrs, "polyline": None, "texts": []})
        if tag == "polyline":
            self.svgs[-1]["polyline"] = [tuple(map(float, p.split(",")))
                                         for p in attrs["points"].split()]
        if tag == "script":
            self._script = {"attrs": attrs, "text": ""}

    def handle_data(self, data):
        if self._script is not None:
            self._script["text"] += data

    def handle_endtag(self, tag):
        if tag == "script" and self._script is not None:
            self.scripts.append(self._script)
            self._script = None


def _parse(text: str) -> _Page:
    page = _Page()
    page.feed(text)
    page.close()
    return page


def _glb(path: Path) -> None:
    box = trimesh.creation.box(extents=[0.4, 0.6, 0.8])
    v, f = np.asarray(box.vertices), np.asarray(box.faces)
    uvs = (v[:, :2] - v[:, :2].min(0)) / np.ptp(v[:, :2], axis=0)
    tex = np.zeros((8, 8, 3), np.uint8)
    tex[:4] = (200, 30, 30)
    write_mesh(textured_mesh(v, f, uvs, tex), path, ["glb"])


@pytest.fixture
def run_dir(tmp_path):
    run = tmp_path / "toy-run"
    (run / "export").mkdir(parents=True)
    (run / "renders").mkdir()
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in _records())
                                       + '{"stage": "fine", "glob')      # cut short by a kill
    (run / "config.yaml").write_text(
        "recipe: toy-recipe\ndescription: a <test> recipe\n"
        "inputs: {image: /pics/red.png, prompt: null}\nsystem: {device: cpu, seed: 3}\n"
        "stages:\n  coarse: {steps: 6, representation: {type: nerf}}\n"
        "  fine: {steps: 4, representation: {type: dmtet}}\n")
    Image.new("RGBA", (8, 8), (255, 0, 0, 255)).save(run / "input.png")
    Image.new("RGB", (16, 8), (0, 0, 255)).save(run / "renders" / "fine-final.png")
    frames = np.full((3, 8, 8, 3), 128, np.uint8)
    Image.fromarray(frames[0]).save(run / "export" / "turntable.gif", save_all=True,
                                    append_images=[Image.fromarray(f) for f in frames[1:]])
    _glb(run / "export")
    return run


def test_the_page_shows_the_run_and_links_only_its_own_files(run_dir):
    path = write_results_page(run_dir)
    assert path == run_dir / PAGE_NAME and path.is_file()
    text = path.read_text()
    # nothing to fetch from anywhere: no URL at all, and every link a file of the folder
    assert "http://" not in text and "https://" not in text and "//" not in \
        " ".join(v for _, v in _parse(text).links)
    page = _parse(text)
    links = {v for _, v in page.links}
    assert {"input.png", "export/turntable.gif", "export/mesh.glb", "renders/fine-final.png",
            "config.yaml"} <= links
    for tag, link in page.links:
        assert ":" not in link and not link.startswith("/"), (tag, link)
        assert (run_dir / link).is_file(), (tag, link)
    # the GLB is embedded (a file:// page cannot fetch it): the bytes of the file
    data = [s for s in page.scripts if s["attrs"].get("id") == "glb-data"]
    assert len(data) == 1
    assert base64.b64decode(data[0]["text"]) == (run_dir / "export" / "mesh.glb").read_bytes()
    assert any("parseGLB" in s["text"] for s in page.scripts)
    # the config summary, escaped; the final values of each stage
    assert "a &lt;test&gt; recipe" in text and "<test>" not in text
    assert "stage coarse" in text and "6 steps; representation nerf" in text


def test_the_loss_curves_plot_every_logged_step_with_its_extremes(run_dir):
    page = _parse(build_page(run_dir))
    svgs = {s["attrs"]["data-key"]: s for s in page.svgs}
    assert list(svgs) == ["loss", "loss/rgb"]          # loss/nan is never finite: no curve
    loss = svgs["loss"]
    points = loss["polyline"]
    assert len(points) == len(LOSS) == int(loss["attrs"]["data-points"])
    assert float(loss["attrs"]["data-max"]) == 2.5 and float(loss["attrs"]["data-min"]) == 0.125
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    assert xs == sorted(xs) and len(set(xs)) == len(xs)   # in step order, one per step
    # the top of the plot is the highest loss (step 0), the bottom the lowest (step 9),
    # and the y coordinates are the values' affine image
    assert ys.index(min(ys)) == 0 and ys.index(max(ys)) == len(LOSS) - 1
    slope = (ys[-1] - ys[0]) / (LOSS[-1] - LOSS[0])
    assert np.allclose([ys[0] + slope * (v - LOSS[0]) for v in LOSS], ys, atol=0.2)
    rgb = svgs["loss/rgb"]
    assert len(rgb["polyline"]) == 5                   # the even global steps
    assert float(rgb["attrs"]["data-max"]) == 1.25 and float(rgb["attrs"]["data-min"]) == 0.125
    # the fine stage starts at global step 6: a dashed line there, named
    text = build_page(run_dir)
    assert text.count('stroke-dasharray="4 3"') == 2 and '>fine</text>' in text


def test_final_values_are_the_last_record_of_each_stage(run_dir):
    from engine.results_page import read_records

    finals = final_values(read_records(run_dir / "metrics.jsonl"))
    assert [(name, step) for name, step, _ in finals] == [("coarse", 5), ("fine", 3)]
    assert finals[0][2] == {"loss": 0.75}               # step 5 is odd: no loss/rgb
    assert finals[1][2] == {"loss": 0.125}
    assert finals[1][2].get("loss/rgb") is None


def test_long_curves_are_thinned_and_keep_their_extremes():
    rng = np.random.default_rng(0)
    values = rng.uniform(1.0, 2.0, 5000)
    values[1234], values[4321] = 9.0, -3.0
    points = [(i, float(v)) for i, v in enumerate(values)]
    kept = thin(points)
    assert len(kept) <= MAX_POINTS and len(kept) >= MAX_POINTS // 2
    assert (1234, 9.0) in kept and (4321, -3.0) in kept
    assert [s for s, _ in kept] == sorted(s for s, _ in kept)
    svg = _parse(curve_svg("loss", points)).svgs[0]
    assert float(svg["attrs"]["data-max"]) == 9.0 and float(svg["attrs"]["data-min"]) == -3.0
    assert len(svg["polyline"]) == len(kept)
    assert thin(points[:10]) == points[:10]


def test_a_folder_without_export_or_metrics_still_gets_a_page(tmp_path):
    run = tmp_path / "bare"
    run.mkdir()
    (run / "config.yaml").write_text("recipe: r\ninputs: {prompt: a red mug}\nstages: {}\n")
    page = _parse(write_results_page(run).read_text())
    assert page.svgs == [] and page.links == [("a", "config.yaml")]
    text = (run / PAGE_NAME).read_text()
    assert "a red mug" in text and "metrics.jsonl holds no step records" in text


@pytest.mark.skipif(shutil.which("node") is None, reason="node is not installed")
def test_the_pages_glb_reader_reads_the_engines_glb(run_dir, tmp_path):
    """The viewer's GLB parser (the page's own JavaScript) run in node on an exported GLB:
    the vertex, index and texture data trimesh reads from the same file."""
    glb = run_dir / "export" / "mesh.glb"
    script = tmp_path / "read.js"
    script.write_text(PARSE_GLB_JS + """
const buf = require("fs").readFileSync(process.argv[2]);
const m = parseGLB(buf.buffer.slice(buf.byteOffset, buf.byteOffset + buf.length)).meshes[0];
console.log(JSON.stringify({position: Array.from(m.position), index: Array.from(m.index),
  uv: m.uv.length, normal: m.normal.length, image: m.image.byteLength, mime: m.mime}));
""")
    out = subprocess.run(["node", str(script), str(glb)], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout)
    mesh = trimesh.load(glb, force="mesh", process=False)
    assert np.allclose(np.reshape(got["position"], (-1, 3)), mesh.vertices, atol=1e-6)
    assert np.array_equal(np.reshape(got["index"], (-1, 3)), mesh.faces)
    assert got["uv"] == 2 * len(mesh.vertices) and got["normal"] == 3 * len(mesh.vertices)
    assert got["mime"] == "image/png" and got["image"] > 0


#: a stand-in for the page's DOM and WebGL in node: records the draws and the matrices
FAKE_BROWSER = r"""
const fs = require("fs");
const page = fs.readFileSync(process.argv[2], "utf8");
const data = page.match(/<script type="application\/octet-stream" id="glb-data">([^<]*)<\/script>/)[1];
const calls = {draws: [], mvp: null, listeners: {}, note: null};
const gl = new Proxy({}, {get(target, name) {
  if (name === "drawElements") return (mode, count, type, off) => calls.draws.push({count, type});
  if (name === "uniformMatrix4fv") return (loc, t, m) => { if (loc === "mvp") calls.mvp = Array.from(m); };
  if (name === "getUniformLocation") return (prog, n) => n;
  if (name === "getAttribLocation") return (prog, n) => ({p: 0, n: 1, t: 2})[n];
  if (name === "getProgramParameter") return () => true;
  if (name === "getExtension") return () => ({});
  if (name === "UNSIGNED_INT") return 5125;
  if (name === "UNSIGNED_SHORT") return 5123;
  if (typeof name === "string" && name === name.toUpperCase()) return 1;
  return () => ({});
}});
const canvas = {width: 640, height: 640, getContext: () => gl, setPointerCapture() {},
  addEventListener: (n, f) => { calls.listeners[n] = f; }};
global.document = {getElementById: id => id === "viewer" ? canvas : id === "glb-data" ?
  {textContent: data} : {set textContent(v) { calls.note = v; }}};
global.Image = function () {};
eval(process.argv[3]);
calls.listeners.pointerdown({clientX: 0, clientY: 0, pointerId: 1});
calls.listeners.pointermove({clientX: 50, clientY: 0});
console.log(JSON.stringify(calls));
"""


@pytest.mark.skipif(shutil.which("node") is None, reason="node is not installed")
def test_the_viewer_draws_the_embedded_mesh_in_view(run_dir, tmp_path):
    """The page's viewer script, run in node against a stand-in for WebGL: it decodes the
    embedded GLB, draws every triangle of it, puts the mesh's corners inside the frame and
    draws again when dragged. (Not a real browser: the pixels are not checked.)"""
    write_results_page(run_dir)
    script = tmp_path / "fake.js"
    script.write_text(FAKE_BROWSER)
    out = subprocess.run(["node", str(script), str(run_dir / PAGE_NAME),
                          results_page.VIEWER_JS], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    calls = json.loads(out.stdout)
    assert calls["note"] is None                         # no failure message
    mesh = trimesh.load(run_dir / "export" / "mesh.glb", force="mesh", process=False)
    assert len(calls["draws"]) == 2                      # the first draw, then the drag's
    assert all(d["count"] == 3 * len(mesh.faces) for d in calls["draws"])
    mvp = np.array(calls["mvp"]).reshape(4, 4).T         # column-major
    corners = np.array([[x, y, z, 1.0] for x in mesh.bounds[:, 0] for y in mesh.bounds[:, 1]
                        for z in mesh.bounds[:, 2]])
    clip = corners @ mvp.T
    assert (clip[:, 3] > 0).all()                        # in front of the camera
    ndc = clip[:, :3] / clip[:, 3:]
    assert (np.abs(ndc[:, :2]) < 1).all() and (np.abs(ndc[:, :2]) > 0.1).any()
    assert (np.abs(ndc[:, 2]) < 1).all()                 # between the near and far planes


def test_the_command_rewrites_a_page_and_refuses_a_non_run(run_dir, tmp_path):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        assert results_page.main([str(run_dir)]) == 0
    assert out.getvalue().strip() == str(run_dir / PAGE_NAME)
    (tmp_path / "empty").mkdir()
    for bad, message in [(tmp_path / "nowhere", "is not a folder"),
                         (tmp_path / "empty", "is not a run folder")]:
        err = io.StringIO()
        with contextlib.redirect_stderr(err):
            assert results_page.main([str(bad)]) == 2
        assert err.getvalue().startswith("error: ") and message in err.getvalue()
        assert len(err.getvalue().strip().splitlines()) == 1


# -- end to end --------------------------------------------------------------------------

#: tests/test_batch.py's tiny fit-image run, with a tiny turntable (and its normal pass,
#: which the voxel grid cannot render)
TINY = ["stages.fit.steps=6", "stages.fit.resolution=16",
        "stages.fit.representation.resolution=8", "stages.fit.representation.samples_per_ray=16",
        "inputs.image_size=32", "output.render_size=16", "output.render_views=2",
        "output.render_every=0", "output.checkpoint_every=0", "output.tensorboard=false",
        "output.progress=false", "system.threads=1", "export.formats=[glb]",
        "export.mesh_resolution=16", "export.texture_size=16", "export.decimate_faces=0",
        "export.turntable.frames=2", "export.turntable.size=16",
        "export.turntable.formats=[gif]", "export.turntable.normals=true"]


def _run(argv):
    from engine import run

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = run.main(list(argv))
    return code, out.getvalue(), err.getvalue()


def _picture(path: Path) -> Path:
    a = np.zeros((64, 64, 4), np.uint8)
    a[16:48, 20:44] = (220, 40, 30, 255)
    Image.fromarray(a).save(path)
    return path


def test_a_run_writes_its_results_page_after_the_export(tmp_path):
    pic = _picture(tmp_path / "red.png")
    code, out, err = _run(["recipe=fit-image", f"image={pic}", f"out={tmp_path / 'run'}",
                           *TINY])
    assert code == 0, err
    run = tmp_path / "run"
    assert f"results page: {run / PAGE_NAME}" in out
    page = _parse((run / PAGE_NAME).read_text())
    links = {v for _, v in page.links}
    assert {"input.png", "export/turntable.gif", "export/mesh.glb",
            "renders/fit-final.png"} <= links
    # fit-image's voxel grid renders no normals: the normal pass is skipped, said once
    assert "export/turntable-normals.gif" not in links
    assert err.count("warning: export.turntable.normals: VoxelGrid.render() returns no "
                     "normals") == 1
    assert all((run / link).is_file() for link in links)
    svg = {s["attrs"]["data-key"]: s for s in page.svgs}["loss"]
    assert len(svg["polyline"]) == 6                   # one point per step
    losses = [json.loads(line)["loss"] for line in
              (run / "metrics.jsonl").read_text().splitlines()]
    assert float(svg["attrs"]["data-max"]) == max(losses)
    assert float(svg["attrs"]["data-min"]) == min(losses)

    code, out, err = _run(["recipe=fit-image", f"image={pic}", f"out={tmp_path / 'off'}",
                           "output.results_page=false", "export=null", *TINY[:12]])
    assert code == 0, err
    assert not (tmp_path / "off" / PAGE_NAME).exists() and "results page" not in out
