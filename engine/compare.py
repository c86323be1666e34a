"""``python -m engine.compare``: runs side by side, one table and one chart.

    python -m engine.compare RUN RUN ... [out=FOLDER] [metric=NAME ...] [smooth=0]

Each RUN is a folder ``python -m engine.run`` wrote. From its config.yaml and metrics.jsonl
(and its evaluation scores, when there are any: a JSON file in the run folder or its export/
folder that ``python -m engine.evaluate PRED REF json=RUN/NAME.json`` wrote, or the run's row
in the results.json of the toy benchmark that made it) one table is printed: run, recipe,
stages, steps (done/planned when unfinished), training time, the final value of each metric
and the evaluation scores. OUT (default outputs/compare) gets compare.md and compare.csv
(that table) and losses.png (each metric's curves, every run in each panel, against the global
step). Nothing is trained or loaded; reading runs still in progress is fine.

metric=NAME (repeat for several) picks metrics.jsonl keys for the table and the chart; the
default is loss (the weighted total) and every loss/NAME any run logged. smooth=S in [0, 1)
smooths the plotted curves exponentially, as TensorBoard's slider does (the table's values are
never smoothed). Mistakes (no runs, a folder that is not a run, an empty or damaged
metrics.jsonl, a metric no run logged) are one line on stderr, exit code 2.
"""

from __future__ import annotations

import csv
import io
import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

USAGE = "usage: " + __doc__.split("\n\n", 2)[1].strip() + "\n\n" + __doc__.split("\n\n", 2)[2]

#: the evaluation scores shown, in this order (engine.evaluate's and the benchmark's names)
EVAL_KEYS = ("chamfer", "volume_iou", "f_score", "psnr", "ssim")
#: evaluation JSON files larger than this are not score files
MAX_EVAL_BYTES = 1 << 20
#: categorical colours of the chart's curves (one per run, repeating)
PALETTE = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189),
           (140, 86, 75), (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207)]


@dataclass
class Run:
    path: Path
    given: str                   # as typed on the command line
    recipe: str
    stages: List[str]
    planned: int                 # steps of every stage together
    records: List[dict]
    evaluation: Dict[str, float] = field(default_factory=dict)
    label: str = ""

    @property
    def steps(self) -> int:
        """Steps done: the last record's global step + 1."""
        return max(int(r["global_step"]) for r in self.records) + 1

    @property
    def train_seconds(self) -> float:
        """Training time: each record's ``time`` counts from the start of its stage (or of
        the resume), so the time is the sum of the last ``time`` of each such stretch."""
        total, last = 0.0, None
        for r in self.records:
            t = r.get("time")
            if not isinstance(t, (int, float)) or isinstance(t, bool):
                continue
            key = r.get("stage_index", 0)
            if last is not None and (key != last[0] or t < last[1]):
                total += last[1]
            last = (key, float(t))
        return total + (last[1] if last else 0.0)

    def keys(self) -> List[str]:
        seen: Dict[str, None] = {}
        for r in self.records:
            for k, v in r.items():
                if isinstance(v, (int, float)) and not isinstance(v, bool):
                    seen[k] = None
        return list(seen)

    def final(self, metric: str) -> Optional[float]:
        """The metric's last finite value (a skipped step logs null: the one before it)."""
        for r in reversed(self.records):
            v = r.get(metric)
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
                return float(v)
        return None

    def series(self, metric: str) -> List[Tuple[int, float]]:
        out = []
        for r in self.records:
            v = r.get(metric)
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
                out.append((int(r["global_step"]), float(v)))
        return out

    def stage_starts(self) -> List[int]:
        """Global steps where the second and later stages begin (as far as they ran)."""
        starts, prev = [], None
        for r in self.records:
            si = r.get("stage_index", 0)
            if prev is not None and si != prev:
                starts.append(int(r["global_step"]))
            prev = si
        return starts


# -- reading runs ---------------------------------------------------------------------------

def _not_a_run(path: Path, missing: str) -> Exception:
    from engine.errors import InputError

    inside = sorted(p.parent.name for p in path.glob("*/config.yaml"))
    hint = (f"; it holds {len(inside)} run folder{'s' if len(inside) > 1 else ''} "
            f"({', '.join(inside[:3])}{', ...' if len(inside) > 3 else ''}): give those, "
            f"e.g. {path}/*") if inside else \
        "; give folders that python -m engine.run wrote (outputs/RECIPE/NAME-TIME)"
    return InputError(f"{path} is not a run folder (it has no {missing}){hint}")


def read_config(path: Path) -> dict:
    import yaml

    from engine.errors import InputError
    from engine.recipe_files import load_yaml, read_text

    try:
        data = load_yaml(read_text(path, "run config"), f"run config {path}")
    except (yaml.YAMLError, RecursionError):
        raise InputError(f"{path} is not valid YAML: the run's config is damaged; leave "
                         "the run out of the comparison") from None
    stages = data.get("stages") if isinstance(data, dict) else None
    if not isinstance(stages, dict) or not stages or \
            not all(isinstance(s, dict) for s in stages.values()):
        raise InputError(f"{path} is not a run's config.yaml (no stages); give folders that "
                         "python -m engine.run wrote")
    return data


def read_metrics(path: Path) -> List[dict]:
    """metrics.jsonl's records. A last line cut short (a kill mid-write) is skipped, as a
    resume drops it; any other line that is not a record is a one-line error."""
    from engine.errors import InputError

    run = path.parent
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise InputError(f"{path} is not text: the metrics log is damaged; leave {run} out "
                         "of the comparison") from None
    except OSError as exc:
        raise InputError(f"{path} cannot be read: {exc.strerror or exc}") from None
    lines = [(n, line) for n, line in enumerate(text.splitlines(), 1) if line.strip()]
    records = []
    for i, (n, line) in enumerate(lines):
        problem = None
        try:
            rec = json.loads(line)
        except (json.JSONDecodeError, RecursionError) as exc:
            rec, problem = None, f"not JSON: {getattr(exc, 'msg', exc)}"
        if problem is None and not (isinstance(rec, dict)
                                    and isinstance(rec.get("global_step"), int)
                                    and not isinstance(rec.get("global_step"), bool)
                                    and isinstance(rec.get("stage"), str)):
            problem = "not a step record (no stage / global_step)"
        if problem is not None:
            if i == len(lines) - 1 and not text.endswith("\n"):
                continue    # cut short by a kill: a resume drops it too
            raise InputError(f"{path} line {n} is {problem}; the metrics log is damaged: "
                             f"remove that line, or leave {run} out of the comparison")
        records.append(rec)
    if not records:
        raise InputError(f"{path} holds no step records (the run stopped before its first "
                         f"step): resume it (python -m engine.run resume={run}) or leave it "
                         "out of the comparison")
    return records


def _scores(data) -> Dict[str, float]:
    if not isinstance(data, dict):
        return {}
    return {k: float(data[k]) for k in EVAL_KEYS
            if isinstance(data.get(k), (int, float)) and not isinstance(data.get(k), bool)
            and math.isfinite(data[k])}


def read_evaluation(run: Path) -> Dict[str, float]:
    """The run's evaluation scores: its toy-benchmark row (OUT/runs/RECIPE/OBJECT beside
    OUT/results.json), then overridden by the newest JSON score file in the run folder or its
    export/ folder (``python -m engine.evaluate ... json=RUN/NAME.json``)."""
    found: Dict[str, float] = {}
    bench = run.resolve().parents[2] / "results.json" if len(run.resolve().parents) > 2 else None
    if bench is not None and bench.is_file() and run.resolve().parent.parent.name == "runs":
        try:
            rows = json.loads(bench.read_text()).get("rows", [])
        except (OSError, ValueError, AttributeError):
            rows = []
        for row in rows if isinstance(rows, list) else []:
            if isinstance(row, dict) and row.get("ok") and isinstance(row.get("run"), str) \
                    and Path(row["run"]).parts[-2:] == run.resolve().parts[-2:]:
                found.update(_scores(row))
    files = [p for folder in (run, run / "export") if folder.is_dir()
             for p in folder.glob("*.json") if p.is_file()]
    for p in sorted(files, key=lambda p: p.stat().st_mtime):
        if p.stat().st_size > MAX_EVAL_BYTES:
            continue
        try:
            scores = _scores(json.loads(p.read_text()))
        except (OSError, ValueError, UnicodeDecodeError, RecursionError):
            continue
        found.update(scores)
    return found


def read_run(given: str) -> Run:
    from engine.errors import InputError

    path = Path(given)
    if not path.exists():
        raise InputError(f"{given}: no such folder; give run folders that python -m "
                         "engine.run wrote (outputs/RECIPE/NAME-TIME)")
    if not path.is_dir():
        hint = f"; give its folder, {path.parent}" if path.name in (
            "metrics.jsonl", "config.yaml") else ""
        raise InputError(f"{given} is a file, not a run folder{hint or '; give run folders'}")
    if not (path / "config.yaml").is_file():
        raise _not_a_run(path, "config.yaml")
    if not (path / "metrics.jsonl").is_file():
        raise _not_a_run(path, "metrics.jsonl")
    cfg = read_config(path / "config.yaml")
    stages = list(cfg["stages"])
    planned = 0
    for s in cfg["stages"].values():
        steps = s.get("steps")
        planned += steps if isinstance(steps, int) and not isinstance(steps, bool) else 0
    return Run(path=path, given=given, recipe=str(cfg.get("recipe", "?")), stages=stages,
               planned=planned, records=read_metrics(path / "metrics.jsonl"),
               evaluation=read_evaluation(path))


# -- the table ----------------------------------------------------------------------------

def default_metrics(runs: Sequence[Run]) -> List[str]:
    keys: Dict[str, None] = {}
    for r in runs:
        for k in r.keys():
            keys[k] = None
    losses = sorted(k for k in keys if k.startswith("loss/"))
    return (["loss"] if "loss" in keys else []) + losses


def _fmt(v: Optional[float], digits: int = 4) -> str:
    return "-" if v is None else f"{v:.{digits}g}"


def _duration(seconds: float) -> str:
    s = int(round(seconds))
    if s < 60:
        return f"{seconds:.1f}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


def table(runs: Sequence[Run], metrics: Sequence[str]) -> Tuple[List[str], List[List[str]],
                                                               List[str], List[list]]:
    """(header, rows as text, csv header, csv rows with raw numbers)."""
    evals = [k for k in EVAL_KEYS if any(k in r.evaluation for r in runs)]
    header = ["run", "recipe", "stages", "steps", "train time", *metrics, *evals]
    csv_header = ["run", "path", "recipe", "stages", "steps", "planned_steps",
                  "train_seconds", *metrics, *evals]
    rows, raw = [], []
    for r in runs:
        steps = str(r.steps) if r.steps >= r.planned else f"{r.steps}/{r.planned}"
        finals = [r.final(m) for m in metrics]
        scores = [r.evaluation.get(k) for k in evals]
        rows.append([r.label, r.recipe, ", ".join(r.stages), steps, _duration(r.train_seconds),
                     *map(_fmt, finals), *map(_fmt, scores)])
        raw.append([r.label, str(r.path), r.recipe, " ".join(r.stages), r.steps, r.planned,
                    round(r.train_seconds, 3), *["" if v is None else v for v in finals],
                    *["" if v is None else v for v in scores]])
    return header, rows, csv_header, raw


def markdown(header: List[str], rows: List[List[str]]) -> str:
    """A markdown table with padded columns (readable as it is, in a terminal too)."""
    def esc(cell: str) -> str:
        return cell.replace("|", "\\|")

    cells = [[esc(c) for c in header]] + [[esc(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(cells[0], widths)) + " |",
             "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    lines += ["| " + " | ".join(c.ljust(w) for c, w in zip(row, widths)) + " |"
              for row in cells[1:]]
    return "\n".join(lines) + "\n"


def to_csv(header: List[str], rows: List[list]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(header)
    w.writerows(rows)
    return buf.getvalue()


# -- the chart ------------------------------------------------------------------------------

def _smooth(values: List[float], weight: float) -> List[float]:
    """TensorBoard's smoothing: an exponential moving average, debiased at the start."""
    if weight <= 0:
        return values
    out, avg, norm = [], 0.0, 0.0
    for v in values:
        avg = avg * weight + (1 - weight) * v
        norm = norm * weight + (1 - weight)
        out.append(avg / norm)
    return out


def _ticks(lo: float, hi: float, count: int = 5) -> List[float]:
    if hi <= lo:
        return [lo]
    raw = (hi - lo) / (count - 1)
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)
    first = math.ceil(lo / step) * step
    n = int(math.floor((hi - first) / step + 1e-9)) + 1
    return [first + i * step for i in range(max(n, 1))]


def chart(runs: Sequence[Run], metrics: Sequence[str], path: Path, smooth: float = 0.0) -> None:
    """One panel per metric, one curve per run (PIL only: no plotting dependency)."""
    from PIL import Image, ImageDraw, ImageFont

    from engine.atomic import atomic_write

    font = ImageFont.load_default()
    width, panel_h, left, right, top, bottom = 760, 230, 70, 20, 26, 34
    legend_h = 8 + 16 * len(runs)
    img = Image.new("RGB", (width, legend_h + panel_h * len(metrics) + 6), "white")
    d = ImageDraw.Draw(img)
    for i, r in enumerate(runs):
        colour = PALETTE[i % len(PALETTE)]
        y = 6 + 16 * i
        d.rectangle([left, y + 3, left + 18, y + 9], fill=colour)
        d.text((left + 26, y), f"{r.label}  ({r.recipe}, {r.steps} steps)", fill="black",
               font=font)
    x_max = max(max(r.steps - 1, 1) for r in runs)
    for p, metric in enumerate(metrics):
        y0 = legend_h + p * panel_h
        box = (left, y0 + top, width - right, y0 + panel_h - bottom)
        curves = []
        for i, r in enumerate(runs):
            pts = r.series(metric)
            if pts:
                steps = [s for s, _ in pts]
                curves.append((i, r, steps, _smooth([v for _, v in pts], smooth)))
        values = [v for _, _, _, vs in curves for v in vs]
        log = bool(values) and min(values) > 0 and max(values) / min(values) > 50
        title = metric + ("  (log scale)" if log else "") + \
            (f"  (smoothed {smooth:g})" if smooth > 0 else "")
        d.text((left, y0 + 6), title, fill="black", font=font)
        d.rectangle(box, outline=(90, 90, 90))
        if not values:
            d.text((left + 10, box[1] + 10), "no run logged this metric", fill=(150, 0, 0),
                   font=font)
            continue
        f = math.log10 if log else (lambda v: v)
        lo, hi = f(min(values)), f(max(values))
        if hi - lo < 1e-12:
            lo, hi = lo - 0.5, hi + 0.5
        pad = 0.04 * (hi - lo)
        lo, hi = lo - pad, hi + pad

        def sx(step: float) -> float:
            return box[0] + (box[2] - box[0]) * step / x_max

        def sy(v: float) -> float:
            return box[3] - (box[3] - box[1]) * (f(v) - lo) / (hi - lo)

        yticks = [10 ** e for e in range(math.ceil(lo), math.floor(hi) + 1)] if log else \
            [t for t in _ticks(lo, hi) if lo <= t <= hi]
        if log and len(yticks) < 2:
            yticks = [10 ** t for t in _ticks(lo, hi, 4) if lo <= t <= hi]
        for t in yticks:
            y = sy(t)
            d.line([(box[0], y), (box[2], y)], fill=(225, 225, 225))
            d.text((4, y - 6), f"{t:.3g}", fill="black", font=font)
        for t in _ticks(0, x_max):
            if t <= x_max:
                x = sx(t)
                d.line([(x, box[3]), (x, box[3] + 4)], fill="black")
                d.text((x - 10, box[3] + 6), f"{t:g}", fill="black", font=font)
        d.text((box[2] - 60, box[3] + 18), "global step", fill=(90, 90, 90), font=font)
        for i, r, steps, vals in curves:
            colour = PALETTE[i % len(PALETTE)]
            faint = tuple(int(c + (255 - c) * 0.6) for c in colour)
            for s in r.stage_starts():
                d.line([(sx(s), box[1]), (sx(s), box[3])], fill=faint)
            stride = max(1, len(steps) // (2 * (box[2] - box[0])))
            pts = [(sx(s), sy(v)) for s, v in zip(steps[::stride], vals[::stride])]
            if len(pts) == 1:
                x, y = pts[0]
                d.ellipse([x - 2, y - 2, x + 2, y + 2], fill=colour)
            else:
                d.line(pts, fill=colour, width=2)
    atomic_write(path, lambda tmp: img.save(tmp, format="PNG"))


# -- the command ----------------------------------------------------------------------------

def command():
    from engine.cli import Command, Key

    return Command("python -m engine.compare", USAGE, [
        Key("out", str, "outputs/compare", help="folder for compare.md, compare.csv, losses.png"),
        Key("metric", str, repeat=True, help="a metrics.jsonl key to tabulate and plot"),
        Key("smooth", float, 0.0, help="smoothing of the plotted curves, in [0, 1)"),
    ])


def split_argv(argv: Sequence[str], keys) -> Tuple[List[str], List[str]]:
    """(run folders, key=value items and options): an item is a key=value item when its
    name has no path separator and it is not an existing path."""
    runs, items = [], []
    for a in argv:
        name, sep, _ = a.partition("=")
        if a.startswith("-") or (sep and name.strip() in keys) or \
                (sep and "/" not in name and "\\" not in name and not Path(a).exists()):
            items.append(a)
        else:
            runs.append(a)
    return runs, items


def _labels(runs: List[Run]) -> None:
    names = [r.path.name for r in runs]
    for r in runs:
        r.label = r.path.name if names.count(r.path.name) == 1 else r.given.rstrip("/\\")


def run(argv: List[str]) -> int:
    from engine.atomic import atomic_write_text
    from engine.errors import ConfigError, did_you_mean

    cmd = command()
    given, items = split_argv(argv, cmd.keys)
    args = cmd.parse(items)           # --help: the usage, exit code 0
    if not given:
        raise ConfigError("no run folders given: python -m engine.compare RUN RUN ... "
                          "(folders python -m engine.run wrote, e.g. outputs/fit-image/*)")
    if not 0.0 <= args.smooth < 1.0:
        raise ConfigError(f"smooth: must be in [0, 1), got {args.smooth}")
    runs: List[Run] = []
    seen: Dict[Path, str] = {}
    for g in given:
        r = read_run(g)
        key = r.path.resolve()
        if key in seen:
            raise ConfigError(f"{g} is given twice (also as {seen[key]}); give each run once")
        seen[key] = g
        runs.append(r)
    _labels(runs)
    metrics = list(dict.fromkeys(args.metric)) or default_metrics(runs)
    logged = sorted({k for r in runs for k in r.keys()} - {"stage_index", "step",
                                                           "global_step"})
    for m in metrics:
        if m not in logged:
            raise ConfigError(f"metric={m}: no run logged it{did_you_mean(m, logged)}; logged: "
                              f"{', '.join(logged) or 'nothing'}")
    if not metrics:
        raise ConfigError("the runs logged no loss; name what to compare with metric=NAME "
                          f"(logged: {', '.join(logged) or 'nothing'})")
    header, rows, csv_header, raw = table(runs, metrics)
    md = markdown(header, rows)
    out = Path(args.out)
    atomic_write_text(out / "compare.md", md)
    atomic_write_text(out / "compare.csv", to_csv(csv_header, raw))
    chart(runs, metrics, out / "losses.png", args.smooth)
    print(md, end="")
    print(f"table: {out / 'compare.md'} (and compare.csv)")
    print(f"chart: {out / 'losses.png'}")
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    from engine.errors import run_cli

    return run_cli(run, sys.argv[1:] if argv is None else list(argv))


if __name__ == "__main__":
    sys.exit(main())
