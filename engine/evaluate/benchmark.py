"""The held-out toy benchmark: ``python -m engine.evaluate bench=toy recipe=NAME ...``.

    python -m engine.evaluate bench=toy recipe=NAME [recipe=NAME ...] [out=DIR] [objects=N]
        [seed=S] [data=DIR] [initial_from=RECIPE] [samples=10000]
        [key=value overrides for every run]

Every recipe runs in-process (engine.run.main) on the canonical front view (r0.png) of the
first N held-out objects of a fixed toy-world dataset (engine/datasets/toy_world.py;
generated into DIR/data unless data= names one). Each row is scored by

* mesh metrics of the exported mesh against the object's mesh.obj (engine.evaluate.metrics), and
* PSNR / SSIM of the object's group views (never the input) rendered from the final
  representation, against the dataset images composited on white, at the dataset's size.

The recipe name ``initial`` is the "initial shape, no optimisation" baseline: the first stage's
representation of ``initial_from`` (default fit-image), built fresh and exported.

When every row has run, shape checks per recipe (:func:`shape_checks`, on Chamfer distance):
the swap test (chance 0.5) - do the meshes lie closer to their own objects' truths than to
each other's? - and the right kind - is the truth a mesh lies unusually near of its object's
kind? Unlike the mean Chamfer, neither rewards a blob that is equally near everything.

DIR gets results.json, results.md, chart.png and contact_sheet.png, rewritten after every
row. Exit code: 0 all rows ran, 1 some failed (tables still written), 2 user error.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import shutil
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

from guidance.training.toy_models import DATA_SIZE, DEFAULTS as TOY_MODELS_DEFAULTS

INITIAL = "initial"
# run settings every row sets itself (engine.config's full keys, after its short keys)
ROW_KEYS = ("inputs.image", "output.dir", "resume")
# the held-out split of the dataset the shipped toy models were trained on (python -m
# guidance.training.toy_models defaults), unseen by them. Object i is the same whatever the count, and
# the held-out objects are drawn among the first heldout_pool (0: all), so a world of
# heldout_pool objects has the same held-out split for less making; a world of another size
# without the pool would draw other objects and leak training ones.
DATA_COUNT = TOY_MODELS_DEFAULTS["heldout_pool"] or TOY_MODELS_DEFAULTS["count"]
DATA_HELDOUT = TOY_MODELS_DEFAULTS["heldout"]
METRICS = ("chamfer", "volume_iou", "f_score", "psnr", "ssim", "seconds")
# runs inside the benchmark: no per-run bars (the benchmark has its own) and no turntable
RUN_DEFAULTS = ("output.progress=false",)


# -- arguments ----------------------------------------------------------------------------

def command():
    """The benchmark's keys; every other key=value item is an override sent to every run."""
    from engine.cli import Command, Key

    _, lines, rest = __doc__.split("\n\n", 2)
    usage = f"usage: {lines.strip()}\n\n{rest}"
    return Command("python -m engine.evaluate bench=toy", usage, [
        Key("bench", str, required=True, choices=("toy",), help="the benchmark: toy"),
        Key("recipe", str, repeat=True, required=True,
            help="a recipe to run (repeat for a table; initial: the untrained shape)"),
        Key("out", str, "outputs/bench-toy", help="folder for the tables and runs"),
        Key("objects", int, 4, help=f"held-out objects, 1 to {DATA_HELDOUT}"),
        Key("seed", int, 0, help="the toy world's seed"),
        Key("data", str, help="an existing toy dataset (default: made in OUT/data)"),
        Key("initial_from", str, "fit-image", help="the recipe whose shape recipe=initial is"),
        Key("samples", int, 10000, help="surface points per mesh (>= 100)"),
    ], passthrough=True)


def parse_args(argv: Sequence[str]) -> dict:
    """``key=value`` items -> settings dict; benchmark keys apart from run overrides.

    Raises ConfigError (exit 2) for malformed items, bad numbers and unknown recipes."""
    from engine import config
    from engine.errors import ConfigError, did_you_mean

    cmd = command()
    parsed = cmd.parse(argv)
    args = {**parsed.as_dict(), "overrides": list(parsed.rest)}
    args["recipes"] = args.pop("recipe")
    # malformed items fail here
    for item, (key, _) in zip(args["overrides"], config.parse_overrides(args["overrides"])):
        if key in ROW_KEYS:
            raise ConfigError(f"'{item}': the benchmark sets {key} for every row; drop it")
    if not 1 <= args["objects"] <= DATA_HELDOUT:
        raise ConfigError(f"objects: must be in [1, {DATA_HELDOUT}], got {args['objects']}")
    if args["samples"] < 100:
        raise ConfigError(f"samples: must be >= 100 surface points, got {args['samples']}")
    if len(set(args["recipes"])) != len(args["recipes"]):
        raise ConfigError("a recipe is listed twice")
    known = config.available_recipes()
    for name in args["recipes"] + [args["initial_from"]]:
        if name != INITIAL and name not in known and Path(name).suffix not in (".yaml", ".yml"):
            raise ConfigError(f"no recipe named '{name}'{did_you_mean(name, [*known, INITIAL])}"
                              f"; known: {', '.join(sorted([*known, INITIAL]))}")
    # every recipe must accept the overrides (an unknown key is a user error, not a row error)
    for name in args["recipes"]:
        try:
            config.load(args["initial_from"] if name == INITIAL else name,
                        list(RUN_DEFAULTS) + args["overrides"] + ["image=front.png"])
        except ConfigError as exc:
            raise ConfigError(f"{exc}{cmd.misspelt(args['overrides'])}") from None
    return args


def bench_objects(data: Path, count: int, seed: int, generate_missing: bool) -> List[Path]:
    """The first ``count`` held-out objects of the toy dataset at ``data`` (made if absent)."""
    from engine.errors import InputError
    from engine.datasets.toy_world import generate

    index = data / "dataset.json"
    if not index.is_file():
        if not generate_missing:
            raise InputError(f"data={data} is not a toy dataset (no dataset.json)")
        generate(data, count=DATA_COUNT, heldout=DATA_HELDOUT, seed=seed, size=DATA_SIZE)
    record = json.loads(index.read_text())
    heldout = (record.get("splits") or {}).get("heldout") or []
    if len(heldout) < count:
        raise InputError(f"data={data} has {len(heldout)} held-out objects, {count} wanted")
    return [data / oid for oid in heldout[:count]]


# -- one row ------------------------------------------------------------------------------

def _run_recipe(recipe: str, image: Path, run_dir: Path, overrides: List[str]) -> Path:
    """engine.run.main in-process; returns the exported mesh path. Raises RuntimeError."""
    from engine.run import main as run_main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = run_main([f"recipe={recipe}", f"image={image}", f"out={run_dir}",
                         *RUN_DEFAULTS, *overrides])
    if code != 0:
        lines = [ln for ln in err.getvalue().splitlines() if ln.strip()]
        raise RuntimeError(f"run exited {code}: {lines[-1] if lines else '(no message)'}")
    found = {ln.split(": ", 1)[0]: ln.split(": ", 1)[1] for ln in out.getvalue().splitlines()
             if ": " in ln}
    mesh = found.get("glb") or found.get("obj")
    if not mesh:
        raise RuntimeError("the run exported no mesh (export: is off or has no glb/obj)")
    return Path(mesh)


def _rebuild(run_dir: Path):
    """The final representation of a finished run (through create_from chains)."""
    from engine.trainer import load_finished_representation

    return load_finished_representation(run_dir)


def _initial(ref_recipe: str, run_dir: Path, overrides: List[str], image: Path):
    """The first stage's representation of ``ref_recipe``, untrained, exported; (rep, mesh)."""
    import torch

    from engine import config
    from engine.checkpoint import atomic_write_text
    from engine.config import build
    from engine.export import export_representation
    from engine.seeding import step_seed

    cfg, resolved = config.load(ref_recipe, [*RUN_DEFAULTS, *overrides, f"image={image}"])
    first = list(cfg.stages)[0]
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(run_dir / "config.yaml", config.to_yaml(resolved))
    torch.manual_seed(step_seed(cfg.system.seed, 0, -1))   # the weights a run would start from
    rep = build("representation", cfg.components[first]["representation"],
                device=torch.device("cpu"))
    if cfg.export is None:
        raise RuntimeError(f"recipe {ref_recipe} has no export settings")
    paths = export_representation(rep, run_dir / "export", cfg.export, torch.device("cpu"))
    mesh = paths.get("glb") or paths.get("obj")
    if not mesh:
        raise RuntimeError("export wrote no glb/obj")
    return rep, Path(mesh)


def white_background():
    from engine.config import build, validate_component

    return build("background", validate_component(
        "background", {"type": "solid", "color": [1.0, 1.0, 1.0]}, "bench.background"))


def render_views(rep, views, indices: List[int], size: int):
    """Renders of ``rep`` at ``views.cameras[indices]`` on white: [K, S, S, 3] in [0, 1]."""
    import torch

    from engine.plugin import StepInfo

    bg = white_background()
    rep.eval()
    out = []
    with torch.no_grad():
        for i in indices:
            cam = views.cameras[torch.tensor([i])]
            r = rep.render(cam, size, size, background=bg, step=StepInfo("eval", 0, 0, 1, 0))
            out.append(r["rgb"][0].float().cpu().clamp(0.0, 1.0))
    return torch.stack(out)


def score_row(rep, mesh: Path, obj: Path, views_dir: Path, samples: int = 10000
              ) -> Dict[str, float]:
    """Mesh metrics + mean PSNR/SSIM over the object's group views; saves the renders."""
    from PIL import Image

    from engine.evaluate.metrics import compare_files, psnr, ssim
    from guidance.dataset_views import load_object_views

    views = load_object_views(obj)
    size = views.rgb.shape[1]
    group = [i for i in range(len(views.cameras)) if not bool(views.is_reference[i])]
    renders = render_views(rep, views, group, size)
    p = [psnr(renders[k], views.rgb[i]) for k, i in enumerate(group)]
    s = [ssim(renders[k], views.rgb[i]) for k, i in enumerate(group)]
    views_dir.mkdir(parents=True, exist_ok=True)
    for k in range(min(2, len(group))):   # the first group's first two views, for the sheet
        Image.fromarray((renders[k].numpy() * 255 + 0.5).astype("uint8")).save(
            views_dir / f"view{k}.png")
    m = compare_files(str(mesh), str(obj / "mesh.obj"), samples=samples)
    return {"chamfer": m.chamfer, "volume_iou": m.volume_iou, "f_score": m.f_score,
            "yaw": m.yaw, "psnr": sum(min(x, 99.0) for x in p) / len(p),
            "ssim": sum(s) / len(s)}


def run_row(recipe: str, obj: Path, out: Path, args: dict) -> dict:
    """One (recipe, object) row: run, time and score it; failures become ``error``."""
    # a recipe given as a YAML path gets a folder named after the file
    run_dir = out / "runs" / Path(recipe).stem / obj.name
    row = {"recipe": recipe, "object": obj.name, "run": str(run_dir), "ok": False}
    if run_dir.exists():   # a fresh run each time (engine.run refuses an existing folder)
        shutil.rmtree(run_dir)
    t0 = time.time()
    try:
        if recipe == INITIAL:
            rep, mesh = _initial(args["initial_from"], run_dir, args["overrides"],
                                 obj / "r0.png")
        else:
            mesh = _run_recipe(recipe, obj / "r0.png", run_dir, args["overrides"])
        row["seconds"] = round(time.time() - t0, 2)
        if recipe != INITIAL:
            rep = _rebuild(run_dir)
        row["mesh"] = str(mesh)
        row.update(score_row(rep, mesh, obj, run_dir / "bench", args["samples"]))
        row["ok"] = True
    except Exception as exc:   # a broken row must not stop the table
        row.setdefault("seconds", round(time.time() - t0, 2))
        row["error"] = " ".join(f"{type(exc).__name__}: {exc}".split())[:400]
    return row


def shape_checks(rows: List[dict], objects: Dict[str, Path], recipes: Sequence[str],
                 samples: int = 3000) -> Dict[str, Dict[str, Optional[float]]]:
    """Per recipe, two checks of its finished rows' meshes against the truths of the same rows,
    on C[i, j], the yaw-aligned Chamfer distance of mesh i to truth j (kinds from
    object.json). A lighter comparison than the rows' (``samples`` points, no ICP): only the
    order counts.

    * ``shape_swap``: the fraction of pairs of objects of different kinds whose meshes are
      nearer their own truths than swapped, ``C[i,i] + C[j,j] < C[i,j] + C[j,i]``
      (engine.evaluate.view_scores.swap_test_accuracy on -C; chance 0.5);
    * ``right_kind``: of how many meshes the truth they are *unusually* near (each truth's
      distances centred on their mean first; engine.evaluate.view_scores.right_kind_share on -C) is
      of their own kind (ties shared), with ``right_kind_chance``, what one blob for every
      object would score (each object's kind's share of the rows), and ``kind_rows``.

    Each finished row gets ``nearest_truth`` (that truth's object name; None for a tie). All
    None where the recipe has fewer than two finished rows of different kinds."""
    import numpy as np

    from engine.evaluate.metrics import compare_meshes, load_mesh
    from engine.evaluate.view_scores import right_kind_share, swap_test_accuracy, unusual_matches

    def kind(obj: Path) -> str:
        try:
            return json.loads((obj / "object.json").read_text()).get("kind", obj.name)
        except (OSError, ValueError):
            return obj.name

    truths: Dict[str, object] = {}
    out: Dict[str, Dict[str, Optional[float]]] = {}
    for recipe in recipes:
        ok = [r for r in rows if r["recipe"] == recipe and r["ok"]]
        kinds = [kind(objects[r["object"]]) for r in ok]
        out[recipe] = dict.fromkeys(("shape_swap", "right_kind", "right_kind_chance",
                                     "kind_rows"))
        if len(set(kinds)) < 2:
            continue
        try:   # finished rows were scored against these files: they load
            for r in ok:
                if r["object"] not in truths:
                    truths[r["object"]] = load_mesh(str(objects[r["object"]] / "mesh.obj"))
            meshes = [load_mesh(r["mesh"]) for r in ok]
            c = np.array([[compare_meshes(m, truths[r["object"]], samples=samples, icp=False,
                                          resolution=16).chamfer for r in ok] for m in meshes])
        except Exception as exc:   # the checks must not cost the table
            print(f"shape checks of {recipe} skipped: {exc}", file=sys.stderr)
            continue
        for r, best in zip(ok, unusual_matches(-c)):   # None where truths tie (one blob)
            r["nearest_truth"] = ok[int(best[0])]["object"] if len(best) == 1 else None
        out[recipe] = {
            "shape_swap": swap_test_accuracy(-c, kinds),
            "right_kind": float(right_kind_share(-c, kinds).sum()),
            "right_kind_chance": float(sum(kinds.count(k) for k in kinds) / len(kinds)),
            "kind_rows": len(kinds)}
    return out


# -- tables ---------------------------------------------------------------------------------

def means(rows: List[dict], recipes: List[str]) -> Dict[str, dict]:
    out = {}
    for r in recipes:
        ok = [row for row in rows if row["recipe"] == r and row["ok"]]
        m = {k: (sum(row[k] for row in ok) / len(ok) if ok else None) for k in METRICS}
        m["rows"] = len([row for row in rows if row["recipe"] == r])
        m["failed"] = m["rows"] - len(ok)
        out[r] = m
    return out


def _fmt(v, digits=4) -> str:
    return "—" if v is None else (f"{v:.{digits}f}" if isinstance(v, float) else str(v))


def markdown(rows: List[dict], mean: Dict[str, dict], command: str) -> str:
    swap = any(m.get("shape_swap") is not None for m in mean.values())
    head = "| recipe | object | chamfer ↓ | IoU ↑ | F-score ↑ | PSNR ↑ | SSIM ↑ | seconds |"
    sep = "|---|---|---:|---:|---:|---:|---:|---:|"
    lines = [f"`{command}`", "", head, sep]
    for r in rows:
        if r["ok"]:
            lines.append(f"| {r['recipe']} | {r['object']} | {_fmt(r['chamfer'])} | "
                         f"{_fmt(r['volume_iou'], 3)} | {_fmt(r['f_score'], 3)} | "
                         f"{_fmt(r['psnr'], 2)} | {_fmt(r['ssim'], 3)} | "
                         f"{_fmt(r['seconds'], 1)} |")
        else:
            lines.append(f"| {r['recipe']} | {r['object']} | failed: "
                         f"{r.get('error', '').replace('|', '/')[:120]} | | | | | "
                         f"{_fmt(r.get('seconds'), 1)} |")
    lines += ["", "Means per recipe (failed rows left out"
              + ("; shape swap: pairs of objects of different kinds whose meshes are nearer "
                 "their own truths than swapped, chance 0.5; right kind: meshes whose "
                 "unusually near truth is of their own kind, of the finished rows (chance)"
                 if swap else "") + "):", "",
              "| recipe | rows | failed | chamfer ↓ | IoU ↑ | F-score ↑ | PSNR ↑ | SSIM ↑ | "
              + ("shape swap ↑ | right kind ↑ | " if swap else "") + "seconds |",
              "|---|---:|---:|---:|---:|---:|---:|---:|" + ("---:|---:|" if swap else "")
              + "---:|"]
    for name, m in mean.items():
        kind = "—"
        if m.get("right_kind") is not None:
            kind = (f"{m['right_kind']:g} / {m['kind_rows']} "
                    f"({m['right_kind_chance']:.1f})")
        lines.append(f"| {name} | {m['rows']} | {m['failed']} | {_fmt(m['chamfer'])} | "
                     f"{_fmt(m['volume_iou'], 3)} | {_fmt(m['f_score'], 3)} | "
                     f"{_fmt(m['psnr'], 2)} | {_fmt(m['ssim'], 3)} | "
                     + (f"{_fmt(m.get('shape_swap'), 3)} | {kind} | " if swap else "")
                     + f"{_fmt(m['seconds'], 1)} |")
    return "\n".join(lines) + "\n"


def write_tables(out: Path, rows: List[dict], args: dict, command: str,
                 checks: Optional[Dict[str, Dict[str, Optional[float]]]] = None) -> dict:
    from engine.checkpoint import atomic_write_text

    mean = means(rows, args["recipes"])
    for name, values in (checks or {}).items():
        mean[name].update(values)
    settings = {k: args[k] for k in ("bench", "recipes", "objects", "seed", "data",
                                      "initial_from", "samples", "overrides")}
    result = {"command": command, "settings": settings, "rows": rows, "means": mean}
    atomic_write_text(out / "results.json", json.dumps(result, indent=2))
    atomic_write_text(out / "results.md", markdown(rows, mean, command))
    return result


# -- pictures ---------------------------------------------------------------------------------

def chart(mean: Dict[str, dict], path: Path) -> None:
    """Two bar panels: mean Chamfer (lower is better) and mean IoU (higher) per recipe."""
    from PIL import Image, ImageDraw

    names = list(mean)
    bar, gap, panel_h, top, left = 48, 24, 200, 28, 12
    panel_w = left + len(names) * (bar + gap) + gap
    img = Image.new("RGB", (2 * panel_w + 20, panel_h + top + 40), "white")
    d = ImageDraw.Draw(img)
    for p, (key, title, colour) in enumerate((("chamfer", "mean Chamfer (lower better)",
                                               (200, 80, 60)),
                                              ("volume_iou", "mean IoU (higher better)",
                                               (60, 120, 200)))):
        x0 = p * (panel_w + 20)
        vals = [mean[n][key] for n in names]
        finite = [v for v in vals if v is not None and math.isfinite(v)]
        vmax = max(finite) if finite and max(finite) > 0 else 1.0
        if key == "volume_iou":
            vmax = max(vmax, 1.0)
        d.text((x0 + left, 6), title, fill="black")
        base = top + panel_h
        d.line([(x0 + left, base), (x0 + panel_w, base)], fill="black")
        for i, (n, v) in enumerate(zip(names, vals)):
            bx = x0 + left + gap + i * (bar + gap)
            if v is not None and math.isfinite(v):
                h = int(round((panel_h - 16) * v / vmax))
                d.rectangle([bx, base - h, bx + bar, base], fill=colour)
                d.text((bx, base - h - 12), f"{v:.3f}", fill="black")
            else:
                d.text((bx, base - 12), "n/a", fill="black")
            d.text((bx, base + 4), n[:10], fill="black")
    img.save(path)


def _tile(path: Optional[Path], size: int):
    from PIL import Image

    if path is not None and Path(path).is_file():
        with Image.open(path) as im:
            im = im.convert("RGBA")
            flat = Image.new("RGBA", im.size, (255, 255, 255, 255))
            flat.alpha_composite(im)
            return flat.convert("RGB").resize((size, size))
    return Image.new("RGB", (size, size), (200, 200, 200))


def contact_sheet(rows: List[dict], objects: Dict[str, Path], path: Path, size: int = 96) -> None:
    """Per row: label | input r0 | 2 renders (first group) | the 2 true views."""
    from PIL import Image, ImageDraw

    label_w, header = 150, 16
    cols = ["input", "result v0", "result v1", "truth v0", "truth v1"]
    img = Image.new("RGB", (label_w + len(cols) * size, header + max(1, len(rows)) * size),
                    "white")
    d = ImageDraw.Draw(img)
    for c, name in enumerate(cols):
        d.text((label_w + c * size + 4, 2), name, fill="black")
    for r, row in enumerate(rows):
        obj = objects[row["object"]]
        bench = Path(row["run"]) / "bench"
        tiles = [obj / "r0.png", bench / "view0.png", bench / "view1.png",
                 obj / "g0_v0.png", obj / "g0_v1.png"]
        y = header + r * size
        for c, t in enumerate(tiles):
            img.paste(_tile(t if row["ok"] or c in (0, 3, 4) else None, size),
                      (label_w + c * size, y))
        d.text((4, y + 4), row["recipe"][:22], fill="black")
        d.text((4, y + 18), row["object"], fill="black")
        if row["ok"]:
            d.text((4, y + 32), f"CD {row['chamfer']:.3f} IoU {row['volume_iou']:.2f}",
                   fill="black")
        else:
            d.text((4, y + 32), "failed", fill=(200, 0, 0))
    img.save(path)


# -- entry point ---------------------------------------------------------------------------

def run(argv: List[str]) -> int:
    from tqdm import tqdm

    args = parse_args(argv)
    out = Path(args["out"])
    out.mkdir(parents=True, exist_ok=True)
    data = Path(args["data"]) if args["data"] else out / "data"
    objs = bench_objects(data, args["objects"], args["seed"], generate_missing=not args["data"])
    by_name = {o.name: o for o in objs}
    command = "python -m engine.evaluate " + " ".join(argv)
    rows: List[dict] = []
    todo: List[Tuple[str, Path]] = [(r, o) for r in args["recipes"] for o in objs]
    bar = tqdm(total=len(todo), desc="benchmark", unit="run", file=sys.stderr)
    for recipe, obj in todo:
        bar.set_postfix_str(f"{recipe} {obj.name}")
        row = run_row(recipe, obj, out, args)
        rows.append(row)
        if not row["ok"]:
            bar.write(f"{recipe} {obj.name} failed: {row['error']}", file=sys.stderr)
        result = write_tables(out, rows, args, command)
        chart(result["means"], out / "chart.png")
        contact_sheet(rows, by_name, out / "contact_sheet.png")
        bar.update(1)
    bar.close()
    write_tables(out, rows, args, command, shape_checks(rows, by_name, args["recipes"]))
    print((out / "results.md").read_text(), end="")
    print(f"results: {out / 'results.json'}")
    return 0 if all(r["ok"] for r in rows) else 1


def main(argv: Optional[List[str]] = None) -> int:
    from engine.errors import run_cli

    return run_cli(run, sys.argv[1:] if argv is None else argv)   # --help: SystemExit(0)
