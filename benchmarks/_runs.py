"""What the timing benchmarks share about a finished run folder.

Imported by the scripts in this folder (a script's own folder is on ``sys.path``)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, List, Tuple


def train_seconds(run_dir: Path) -> float:
    """Training seconds of a run: the sum over its stages of the last ``time`` that
    metrics.jsonl logged for each (imports, model loading and export left out)."""
    last = {}
    for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        last[rec["stage"]] = rec["time"]
    return sum(last.values())


def stage_steps(run_dir: Path) -> Dict[str, Tuple[List[float], float]]:
    """Per stage of a finished run, in order: each step's seconds (its record's ``time`` less
    the previous one's; the first step's from the stage's start) and the peak CUDA memory in
    GiB (0 where not logged)."""
    text = (Path(run_dir) / "metrics.jsonl").read_text()
    records = [json.loads(line) for line in text.splitlines() if line.strip()]
    stages: Dict[str, Tuple[List[float], float]] = {}
    last: Dict[str, float] = {}
    for rec in records:
        seconds, peak = stages.get(rec["stage"], ([], 0.0))
        seconds.append(rec["time"] - last.get(rec["stage"], 0.0))
        last[rec["stage"]] = rec["time"]
        stages[rec["stage"]] = (seconds, max(peak, rec.get("cuda_peak_gib", 0.0)))
    return stages
