"""What the timing benchmarks share about a finished run folder.

Imported by the scripts in this folder (a script's own folder is on ``sys.path``)."""

from __future__ import annotations

import json
from pathlib import Path


def train_seconds(run_dir: Path) -> float:
    """Training seconds of a run: the sum over its stages of the last ``time`` that
    metrics.jsonl logged for each (imports, model loading and export left out)."""
    last = {}
    for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        last[rec["stage"]] = rec["time"]
    return sum(last.values())
