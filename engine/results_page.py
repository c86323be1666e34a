"""``RUN/results.html``: one page per run that opens offline, from the run folder alone.

    python -m engine.results_page RUN_FOLDER      # (re)write RUN_FOLDER/results.html

``python -m engine.run`` writes it at the end of every run (``output.results_page: true``,
the default), after the export. The page shows the input picture (``input.png``) or the
prompt, the turntable (``export/turntable.mp4``, else ``.gif``) and its normal-shaded pass
when there is one, the exported GLB in a small WebGL viewer of the page's own (drag to
turn, wheel to zoom), the final render of each stage, the loss curves of ``metrics.jsonl``
as inline SVG, the last values of each stage and a summary of ``config.yaml``.

Offline by construction: nothing is fetched from a network (no CDN, no fonts, no scripts
from elsewhere); pictures and videos are relative links to the run folder's own files, and
the GLB is embedded in the page (base64) because browsers refuse to let a ``file://`` page
read other files with ``fetch``. A GLB over :data:`EMBED_LIMIT` bytes is linked instead of
embedded (the turntable still shows it). Everything here reads the folder and writes one
file; nothing depends on a representation or recipe.
"""

from __future__ import annotations

import base64
import html
import json
import math
import sys
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

PAGE_NAME = "results.html"
#: a GLB larger than this is linked, not embedded (the page would be slow to open)
EMBED_LIMIT = 48 * 2**20
#: at most this many points per loss curve (longer ones keep each bucket's min and max)
MAX_POINTS = 1000
VIDEO_FORMATS = ("mp4", "gif")

USAGE = """\
usage: python -m engine.results_page RUN_FOLDER

(Re)writes RUN_FOLDER/results.html: the input picture, the turntable, the GLB in a 3D
viewer, the loss curves, the final metrics and the config, in one page that opens offline.
python -m engine.run writes it after every run (output.results_page=false: not).
"""


# -- metrics -------------------------------------------------------------------------------

def read_records(path: Path) -> List[dict]:
    """metrics.jsonl's step records; lines that are not one (a line cut short by a kill) are
    skipped: the page shows what can be read."""
    records = []
    try:
        lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError:
        return []
    for line in lines:
        try:
            rec = json.loads(line)
        except (ValueError, RecursionError):
            continue
        if isinstance(rec, dict) and isinstance(rec.get("global_step"), int):
            records.append(rec)
    return records


def _finite(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def curve_keys(records: Sequence[dict]) -> List[str]:
    """``loss`` then every ``loss/NAME`` key that has a finite value somewhere."""
    keys: Dict[str, None] = {}
    for rec in records:
        for k, v in rec.items():
            if (k == "loss" or k.startswith("loss/")) and _finite(v):
                keys.setdefault(k)
    return sorted(keys, key=lambda k: (k != "loss", k))


def series(records: Sequence[dict], key: str) -> List[Tuple[int, float]]:
    """(global step, value) of every record with a finite ``key``; a step logged twice (a
    resume that redid it) keeps its last value."""
    by_step: Dict[int, float] = {}
    for rec in records:
        v = rec.get(key)
        if _finite(v):
            by_step[rec["global_step"]] = float(v)
    return sorted(by_step.items())


def thin(points: List[Tuple[int, float]], limit: int = MAX_POINTS) -> List[Tuple[int, float]]:
    """At most ``limit`` points, in step order: each of ``limit // 2`` buckets keeps its
    lowest and highest value, so the curve's extremes survive."""
    if len(points) <= limit:
        return list(points)
    buckets = max(limit // 2, 1)
    out = []
    for b in range(buckets):
        chunk = points[b * len(points) // buckets:(b + 1) * len(points) // buckets]
        if not chunk:
            continue
        lo, hi = min(chunk, key=lambda p: p[1]), max(chunk, key=lambda p: p[1])
        out.extend(sorted({lo, hi}))
    return out


def _fmt(v: float) -> str:
    return f"{v:.4g}"


def curve_svg(key: str, points: List[Tuple[int, float]],
              stage_starts: Sequence[Tuple[int, str]] = (), width: int = 640,
              height: int = 200) -> str:
    """One loss curve as an inline ``<svg>``: a polyline of ``points`` (thinned to
    :data:`MAX_POINTS`), the lowest and highest value on the y axis, the first and last step
    on the x axis, and a dashed line where each stage after the first starts. The ``<svg>``
    carries ``data-key``, ``data-min``, ``data-max`` and ``data-points`` (what it plots)."""
    pts = thin(points)
    left, right, top, bottom = 64, 12, 22, 28
    w, h = width - left - right, height - top - bottom
    x0, x1 = pts[0][0], pts[-1][0]
    lo, hi = min(v for _, v in pts), max(v for _, v in pts)
    span_x, span_y = (x1 - x0) or 1, (hi - lo) or (abs(hi) or 1.0)

    def xy(step: float, v: float) -> str:
        x = left + (step - x0) / span_x * w
        y = top + (hi - v) / span_y * h if hi != lo else top + h / 2
        return f"{x:.1f},{y:.1f}"

    e = html.escape
    parts = [f'<svg class="curve" width="{width}" height="{height}" '
             f'viewBox="0 0 {width} {height}" role="img" data-key="{e(key)}" '
             f'data-min="{lo!r}" data-max="{hi!r}" data-points="{len(pts)}">',
             f'<title>{e(key)}</title>',
             f'<rect x="{left}" y="{top}" width="{w}" height="{h}" fill="#fafafa" '
             'stroke="#ccc"/>',
             f'<text x="{left}" y="15" class="name">{e(key)}</text>']
    for step, name in stage_starts:
        if x0 < step <= x1:
            x = left + (step - x0) / span_x * w
            parts.append(f'<line x1="{x:.1f}" y1="{top}" x2="{x:.1f}" y2="{top + h}" '
                         'stroke="#999" stroke-dasharray="4 3"/>'
                         f'<text x="{x + 3:.1f}" y="{top + 11}" class="stage">{e(name)}</text>')
    parts += [f'<text x="{left - 4}" y="{top + 4}" text-anchor="end">{_fmt(hi)}</text>',
              f'<text x="{left - 4}" y="{top + h}" text-anchor="end">{_fmt(lo)}</text>',
              f'<text x="{left}" y="{height - 8}">{x0}</text>',
              f'<text x="{left + w}" y="{height - 8}" text-anchor="end">step {x1}</text>',
              '<polyline fill="none" stroke="#1f6fb2" stroke-width="1.5" points="'
              + " ".join(xy(s, v) for s, v in pts) + '"/>', "</svg>"]
    return "".join(parts)


def stage_starts(records: Sequence[dict]) -> List[Tuple[int, str]]:
    """(first global step, stage name) of each stage, in order."""
    starts: Dict[str, int] = {}
    for rec in records:
        stage = str(rec.get("stage", ""))
        starts[stage] = min(starts.get(stage, rec["global_step"]), rec["global_step"])
    return sorted(((s, n) for n, s in starts.items()))


def final_values(records: Sequence[dict]) -> List[Tuple[str, int, Dict[str, float]]]:
    """(stage, its last step, {loss key: value}) of the last record of each stage."""
    last: Dict[str, dict] = {}
    for rec in records:
        last[str(rec.get("stage", ""))] = rec
    out = []
    for _, name in stage_starts(records):
        rec = last[name]
        out.append((name, int(rec.get("step", rec["global_step"])),
                    {k: float(v) for k, v in rec.items()
                     if (k == "loss" or k.startswith(("loss/", "eval/"))) and _finite(v)}))
    return out


# -- the page ------------------------------------------------------------------------------

def _config(run_dir: Path) -> Tuple[dict, str]:
    from engine.recipe_files import load_yaml

    path = run_dir / "config.yaml"
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return {}, ""
    try:
        data = load_yaml(text, "config.yaml")
    except Exception:        # a damaged config.yaml: the page shows the text as it is
        data = {}
    return (data if isinstance(data, dict) else {}), text


def _summary_rows(cfg: dict) -> List[Tuple[str, str]]:
    rows = []
    for label, value in [("recipe", cfg.get("recipe")),
                         ("description", cfg.get("description")),
                         ("picture", (cfg.get("inputs") or {}).get("image")),
                         ("prompt", (cfg.get("inputs") or {}).get("prompt")),
                         ("device", (cfg.get("system") or {}).get("device")),
                         ("seed", (cfg.get("system") or {}).get("seed"))]:
        if value not in (None, ""):
            rows.append((label, str(value)))
    for name, stage in (cfg.get("stages") or {}).items():
        stage = stage or {}

        def kind(part: str) -> str:
            v = stage.get(part)
            return str(v.get("type", "")) if isinstance(v, dict) else ""

        what = ", ".join(f"{p} {kind(p)}" for p in ("representation", "guidance")
                         if kind(p))
        rows.append((f"stage {name}", f"{stage.get('steps', '?')} steps"
                     + (f"; {what}" if what else "")))
    return rows


def _media(run_dir: Path, stem: str) -> Optional[str]:
    """The HTML of export/STEM.mp4 (a looping video), else export/STEM.gif; None if none."""
    for fmt in VIDEO_FORMATS:
        rel = f"export/{stem}.{fmt}"
        if (run_dir / rel).is_file():
            if fmt == "mp4":
                return (f'<video src="{rel}" autoplay loop muted playsinline controls '
                        f'class="turntable"></video>')
            return f'<img src="{rel}" class="turntable" alt="{html.escape(stem)}">'
    return None


def build_page(run_dir) -> str:
    """The HTML of ``run_dir``'s results page (reads the folder; writes nothing)."""
    run_dir = Path(run_dir)
    e = html.escape
    cfg, cfg_text = _config(run_dir)
    records = read_records(run_dir / "metrics.jsonl")
    title = f"{cfg.get('recipe', 'run')}: {run_dir.name}"
    body: List[str] = [f"<h1>{e(title)}</h1>",
                       f'<p class="where">{e(str(run_dir.resolve()))}</p>']

    # the input and the turntables, side by side
    cells = []
    if (run_dir / "input.png").is_file():
        cells.append('<figure><img src="input.png" alt="input" class="input">'
                     '<figcaption>the input, as the engine sees it</figcaption></figure>')
    prompt = (cfg.get("inputs") or {}).get("prompt")
    if prompt:
        cells.append(f'<figure><blockquote class="prompt">{e(str(prompt))}</blockquote>'
                     '<figcaption>the prompt</figcaption></figure>')
    for stem, caption in [("turntable", "turntable"),
                          ("turntable-normals", "normals (camera space: right red, up "
                                                "green, towards you blue)")]:
        media = _media(run_dir, stem)
        if media:
            cells.append(f"<figure>{media}<figcaption>{e(caption)}</figcaption></figure>")
    if cells:
        body.append('<section class="row">' + "".join(cells) + "</section>")

    # the GLB in the page's own viewer
    glb = run_dir / "export" / "mesh.glb"
    if glb.is_file():
        size = glb.stat().st_size
        body.append('<h2>3D model</h2>')
        if size <= EMBED_LIMIT:
            data = base64.b64encode(glb.read_bytes()).decode("ascii")
            body.append('<canvas id="viewer" width="640" height="640"></canvas>'
                        '<p class="note" id="viewer-note">drag to turn, wheel to zoom, '
                        'double-click to reset; <a href="export/mesh.glb">export/mesh.glb</a> '
                        f'({size / 2**20:.1f} MiB)</p>'
                        f'<script type="application/octet-stream" id="glb-data">{data}'
                        '</script>')
        else:
            body.append(f'<p class="note"><a href="export/mesh.glb">export/mesh.glb</a> '
                        f'({size / 2**20:.0f} MiB) is too large to embed in this page; open '
                        'it in a glTF viewer (Blender, a browser viewer).</p>')

    # final render of each stage (the progress renders: rgb, normals, opacity rows)
    finals = [(n, f"renders/{n}-final.png") for n in (cfg.get("stages") or {})
              if (run_dir / "renders" / f"{n}-final.png").is_file()]
    if finals:
        body.append("<h2>Final renders</h2>")
        for name, rel in finals:
            body.append(f'<figure><img src="{rel}" alt="{e(name)}" class="render">'
                        f'<figcaption>stage {e(name)}</figcaption></figure>')

    # loss curves and the last values
    keys = curve_keys(records)
    if keys:
        body.append("<h2>Losses</h2>")
        starts = stage_starts(records)
        body.append('<div class="curves">' + "".join(
            curve_svg(k, series(records, k), starts) for k in keys) + "</div>")
        body.append("<h2>Final values</h2>")
        for name, step, values in final_values(records):
            rows = "".join(f"<tr><td>{e(k)}</td><td>{_fmt(v)}</td></tr>"
                           for k, v in sorted(values.items()))
            body.append(f'<table class="values"><caption>stage {e(name)}, step {step}'
                        f"</caption>{rows}</table>")
    elif not records:
        body.append('<p class="note">metrics.jsonl holds no step records.</p>')

    # the config
    rows = _summary_rows(cfg)
    if rows or cfg_text:
        body.append("<h2>Config</h2>")
        if rows:
            body.append('<table class="config">' + "".join(
                f"<tr><th>{e(k)}</th><td>{e(v)}</td></tr>" for k, v in rows) + "</table>")
        if cfg_text:
            body.append('<details><summary><a href="config.yaml">config.yaml</a> in full'
                        f"</summary><pre>{e(cfg_text)}</pre></details>")
    script = f"<script>{VIEWER_JS}</script>" if glb.is_file() and \
        glb.stat().st_size <= EMBED_LIMIT else ""
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>{e(title)}</title><style>{CSS}</style></head><body>"
            + "\n".join(body) + script + "</body></html>\n")


def write_results_page(run_dir) -> Path:
    """Write ``run_dir/results.html`` (atomically) and return its path."""
    from engine.atomic import atomic_write_text

    path = Path(run_dir) / PAGE_NAME
    atomic_write_text(path, build_page(run_dir))
    return path


CSS = """
body{font:14px/1.4 system-ui,sans-serif;margin:24px;color:#222;max-width:1400px}
h1{font-size:20px;margin:0}h2{font-size:16px;margin:24px 0 8px}
.where,.note,figcaption{color:#666;font-size:12px}
.row{display:flex;flex-wrap:wrap;gap:16px;align-items:flex-start}
figure{margin:0 16px 8px 0;display:inline-block;vertical-align:top}
.input{width:256px;image-rendering:pixelated;background:#fff;border:1px solid #ddd}
.turntable{width:min(512px,90vw);border:1px solid #ddd}
.render{width:min(1024px,95vw);image-rendering:pixelated;border:1px solid #ddd}
.prompt{font-size:18px;max-width:256px;margin:0}
#viewer{width:min(640px,95vw);height:auto;border:1px solid #ddd;background:#fff;cursor:grab}
.curves svg{margin:0 12px 12px 0}.curve text{font-size:11px;fill:#444}
.curve .name{font-weight:600;fill:#222}.curve .stage{fill:#888}
table{border-collapse:collapse;margin:0 24px 12px 0;display:inline-table;vertical-align:top}
td,th{border:1px solid #ddd;padding:2px 8px;text-align:left;font-weight:normal}
th{color:#666}caption{text-align:left;color:#666}
pre{background:#f6f6f6;padding:8px;overflow:auto;max-height:480px}
"""

#: parse a GLB (ArrayBuffer) into {meshes: [{position, normal, uv, index, image, mime,
#: color}]} (typed arrays); standalone so tests can run it in node
PARSE_GLB_JS = r"""
function parseGLB(buf) {
  const dv = new DataView(buf);
  if (buf.byteLength < 20 || dv.getUint32(0, true) !== 0x46546C67) throw new Error("not a GLB");
  let off = 12, json = null, bin = null;
  while (off + 8 <= buf.byteLength) {
    const len = dv.getUint32(off, true), type = dv.getUint32(off + 4, true);
    const chunk = buf.slice(off + 8, off + 8 + len);
    if (type === 0x4E4F534A) json = JSON.parse(new TextDecoder().decode(chunk));
    else if (type === 0x004E4942) bin = chunk;
    off += 8 + len;
  }
  const TYPES = {5126: Float32Array, 5125: Uint32Array, 5123: Uint16Array, 5121: Uint8Array};
  const SIZES = {SCALAR: 1, VEC2: 2, VEC3: 3, VEC4: 4};
  function view(i) {
    const v = json.bufferViews[i], s = v.byteOffset || 0;
    return bin.slice(s, s + v.byteLength);
  }
  function accessor(i) {
    if (i === undefined) return null;
    const a = json.accessors[i], T = TYPES[a.componentType], n = SIZES[a.type];
    const v = json.bufferViews[a.bufferView], s = (v.byteOffset || 0) + (a.byteOffset || 0);
    const stride = v.byteStride || 0, width = n * T.BYTES_PER_ELEMENT;
    if (!stride || stride === width) return new T(bin.slice(s, s + a.count * width));
    const out = new T(a.count * n);
    for (let k = 0; k < a.count; k++) {
      out.set(new T(bin.slice(s + k * stride, s + k * stride + width)), k * n);
    }
    return out;
  }
  const meshes = [];
  for (const m of json.meshes || []) {
    for (const p of m.primitives || []) {
      const at = p.attributes || {}, out = {
        position: accessor(at.POSITION), normal: accessor(at.NORMAL),
        uv: accessor(at.TEXCOORD_0), index: accessor(p.indices),
        image: null, mime: null, color: [0.8, 0.8, 0.8, 1]};
      const mat = p.material !== undefined ? json.materials[p.material] : null;
      const pbr = mat && mat.pbrMetallicRoughness;
      if (pbr && pbr.baseColorFactor) out.color = pbr.baseColorFactor;
      if (pbr && pbr.baseColorTexture) {
        const img = json.images[json.textures[pbr.baseColorTexture.index].source];
        if (img.bufferView !== undefined) {
          out.image = view(img.bufferView); out.mime = img.mimeType || "image/png";
        }
      }
      meshes.push(out);
    }
  }
  return {meshes: meshes};
}
"""

VIEWER_JS = PARSE_GLB_JS + r"""
(function () {
  const canvas = document.getElementById("viewer"), note = document.getElementById("viewer-note");
  const gl = canvas && canvas.getContext("webgl", {antialias: true});
  function fail(msg) { if (note) note.textContent = msg + " (the turntable above shows the model)"; }
  if (!gl) { fail("this browser has no WebGL"); return; }
  let model;
  try {
    const text = document.getElementById("glb-data").textContent.trim();
    const raw = atob(text), bytes = new Uint8Array(raw.length);
    for (let i = 0; i < raw.length; i++) bytes[i] = raw.charCodeAt(i);
    model = parseGLB(bytes.buffer);
  } catch (e) { fail("the GLB could not be read: " + e.message); return; }
  const uint = gl.getExtension("OES_element_index_uint");
  function shader(type, src) {
    const s = gl.createShader(type); gl.shaderSource(s, src); gl.compileShader(s); return s;
  }
  const prog = gl.createProgram();
  gl.attachShader(prog, shader(gl.VERTEX_SHADER,
    "attribute vec3 p; attribute vec3 n; attribute vec2 t; uniform mat4 mvp; uniform mat4 mv;" +
    "varying vec3 vn; varying vec2 vt; void main(){ vn = (mv * vec4(n, 0.0)).xyz; vt = t;" +
    " gl_Position = mvp * vec4(p, 1.0); }"));
  gl.attachShader(prog, shader(gl.FRAGMENT_SHADER,
    "precision mediump float; varying vec3 vn; varying vec2 vt; uniform sampler2D tex;" +
    " uniform vec4 color; uniform float textured; void main(){" +
    " vec4 c = textured > 0.5 ? texture2D(tex, vt) : color;" +
    " float l = 0.35 + 0.65 * abs(normalize(vn).z); gl_FragColor = vec4(c.rgb * l, 1.0); }"));
  gl.linkProgram(prog);
  if (!gl.getProgramParameter(prog, gl.LINK_STATUS)) { fail("WebGL shaders failed"); return; }
  gl.useProgram(prog);
  const loc = {p: gl.getAttribLocation(prog, "p"), n: gl.getAttribLocation(prog, "n"),
               t: gl.getAttribLocation(prog, "t")};
  let lo = [Infinity, Infinity, Infinity], hi = [-Infinity, -Infinity, -Infinity];
  const parts = [];
  function buffer(data, target) {
    const b = gl.createBuffer(); gl.bindBuffer(target, b); gl.bufferData(target, data, gl.STATIC_DRAW);
    return b;
  }
  for (const m of model.meshes) {
    if (!m.position) continue;
    for (let i = 0; i < m.position.length; i++) {
      lo[i % 3] = Math.min(lo[i % 3], m.position[i]); hi[i % 3] = Math.max(hi[i % 3], m.position[i]);
    }
    let index = m.index;
    if (index instanceof Uint32Array && !uint) index = new Uint16Array(index);
    const part = {p: buffer(m.position, gl.ARRAY_BUFFER),
      n: m.normal ? buffer(m.normal, gl.ARRAY_BUFFER) : null,
      t: m.uv ? buffer(m.uv, gl.ARRAY_BUFFER) : null,
      i: index ? buffer(index, gl.ELEMENT_ARRAY_BUFFER) : null,
      count: index ? index.length : m.position.length / 3,
      type: index instanceof Uint32Array ? gl.UNSIGNED_INT : index instanceof Uint8Array ?
        gl.UNSIGNED_BYTE : gl.UNSIGNED_SHORT, color: m.color, tex: null};
    parts.push(part);
    if (m.image && m.uv) {
      const img = new Image();
      img.onload = function () {
        part.tex = gl.createTexture(); gl.bindTexture(gl.TEXTURE_2D, part.tex);
        gl.texImage2D(gl.TEXTURE_2D, 0, gl.RGBA, gl.RGBA, gl.UNSIGNED_BYTE, img);
        gl.texParameteri(gl.TEXTURE_2D, gl.TEXTURE_MIN_FILTER, gl.LINEAR);
        gl.texParameteri(gl.TEXTURE_2D, gl.TEXTURE_WRAP_S, gl.CLAMP_TO_EDGE);
        gl.texParameteri(gl.TEXTURE_2D, gl.TEXTURE_WRAP_T, gl.CLAMP_TO_EDGE);
        draw();
      };
      img.src = URL.createObjectURL(new Blob([m.image], {type: m.mime}));
    }
  }
  if (!parts.length) { fail("the GLB holds no mesh"); return; }
  const centre = [0, 1, 2].map(k => (lo[k] + hi[k]) / 2);
  const radius = Math.max(1e-6, Math.hypot(hi[0] - lo[0], hi[1] - lo[1], hi[2] - lo[2]) / 2);
  const home = {az: 0, el: 0.26, dist: 3.0};
  let view = Object.assign({}, home);
  function mul(a, b) {
    const o = new Float32Array(16);
    for (let i = 0; i < 4; i++) for (let j = 0; j < 4; j++) {
      let s = 0; for (let k = 0; k < 4; k++) s += a[k * 4 + j] * b[i * 4 + k]; o[i * 4 + j] = s;
    }
    return o;
  }
  function draw() {
    const w = canvas.width, h = canvas.height;
    gl.viewport(0, 0, w, h); gl.clearColor(1, 1, 1, 1);
    gl.clear(gl.COLOR_BUFFER_BIT | gl.DEPTH_BUFFER_BIT); gl.enable(gl.DEPTH_TEST);
    const ca = Math.cos(view.az), sa = Math.sin(view.az), ce = Math.cos(view.el), se = Math.sin(view.el);
    // model-view (column-major): centre, turn about +Y (glTF up), tilt, step back
    const s = 1 / radius, c = centre;
    const turn = [ca, 0, -sa, 0, 0, 1, 0, 0, sa, 0, ca, 0, 0, 0, 0, 1];
    const tilt = [1, 0, 0, 0, 0, ce, se, 0, 0, -se, ce, 0, 0, 0, 0, 1];
    const scale = [s, 0, 0, 0, 0, s, 0, 0, 0, 0, s, 0, -c[0] * s, -c[1] * s, -c[2] * s, 1];
    const back = [1, 0, 0, 0, 0, 1, 0, 0, 0, 0, 1, 0, 0, 0, -view.dist, 1];
    const mv = mul(back, mul(tilt, mul(turn, scale)));
    const f = 1 / Math.tan(0.35), near = 0.05, far = 100;
    const proj = [f * h / w, 0, 0, 0, 0, f, 0, 0, 0, 0, (far + near) / (near - far), -1,
                  0, 0, 2 * far * near / (near - far), 0];
    gl.uniformMatrix4fv(gl.getUniformLocation(prog, "mvp"), false, mul(proj, mv));
    gl.uniformMatrix4fv(gl.getUniformLocation(prog, "mv"), false, mv);
    for (const part of parts) {
      gl.bindBuffer(gl.ARRAY_BUFFER, part.p); gl.enableVertexAttribArray(loc.p);
      gl.vertexAttribPointer(loc.p, 3, gl.FLOAT, false, 0, 0);
      if (part.n && loc.n >= 0) {
        gl.bindBuffer(gl.ARRAY_BUFFER, part.n); gl.enableVertexAttribArray(loc.n);
        gl.vertexAttribPointer(loc.n, 3, gl.FLOAT, false, 0, 0);
      } else if (loc.n >= 0) { gl.disableVertexAttribArray(loc.n); gl.vertexAttrib3f(loc.n, 0, 0, 1); }
      if (part.t && loc.t >= 0) {
        gl.bindBuffer(gl.ARRAY_BUFFER, part.t); gl.enableVertexAttribArray(loc.t);
        gl.vertexAttribPointer(loc.t, 2, gl.FLOAT, false, 0, 0);
      } else if (loc.t >= 0) { gl.disableVertexAttribArray(loc.t); }
      gl.uniform4fv(gl.getUniformLocation(prog, "color"), part.color);
      gl.uniform1f(gl.getUniformLocation(prog, "textured"), part.tex ? 1 : 0);
      if (part.tex) { gl.activeTexture(gl.TEXTURE0); gl.bindTexture(gl.TEXTURE_2D, part.tex); }
      if (part.i) { gl.bindBuffer(gl.ELEMENT_ARRAY_BUFFER, part.i);
                    gl.drawElements(gl.TRIANGLES, part.count, part.type, 0); }
      else gl.drawArrays(gl.TRIANGLES, 0, part.count);
    }
  }
  let drag = null;
  canvas.addEventListener("pointerdown", e => { drag = [e.clientX, e.clientY]; canvas.setPointerCapture(e.pointerId); });
  canvas.addEventListener("pointerup", () => { drag = null; });
  canvas.addEventListener("pointermove", e => {
    if (!drag) return;
    view.az += (e.clientX - drag[0]) * 0.01;
    view.el = Math.max(-1.5, Math.min(1.5, view.el + (e.clientY - drag[1]) * 0.01));
    drag = [e.clientX, e.clientY]; draw();
  });
  canvas.addEventListener("wheel", e => {
    e.preventDefault(); view.dist = Math.max(1.2, Math.min(20, view.dist * Math.exp(e.deltaY * 0.001))); draw();
  }, {passive: false});
  canvas.addEventListener("dblclick", () => { view = Object.assign({}, home); draw(); });
  draw();
})();
"""


def run(argv: List[str]) -> int:
    from engine.cli import Command
    from engine.errors import InputError

    if not argv:
        print(USAGE)
        return 0
    args = Command("python -m engine.results_page", USAGE, positional=["run"]).parse(argv)
    run_dir = Path(args.run).expanduser()
    if not run_dir.is_dir():
        raise InputError(f"{args.run} is not a folder (give a run folder python -m engine.run "
                         "wrote)")
    if not (run_dir / "config.yaml").is_file() and not (run_dir / "metrics.jsonl").is_file():
        raise InputError(f"{args.run} is not a run folder (no config.yaml or metrics.jsonl)")
    print(write_results_page(run_dir))
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    from engine.errors import run_cli

    return run_cli(run, sys.argv[1:] if argv is None else argv)


if __name__ == "__main__":
    sys.exit(main())
