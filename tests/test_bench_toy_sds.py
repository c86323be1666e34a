"""benchmarks/bench_toy_sds.py: the toy UNet's SDS call per precision (one quick repeat)."""

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

import bench_toy_sds  # noqa: E402


def test_rows_per_precision_with_the_distance_from_the_first(capsys):
    model = ROOT / "models" / "toy" / "stage2"
    assert bench_toy_sds.main([f"model={model}", "precisions=[fp32,bf16]", "repeats=1"]) == 0
    rows = [line.split("|")[1:-1] for line in capsys.readouterr().out.splitlines()
            if line.startswith("| fp32") or line.startswith("| bf16")]
    cells = {r[0].strip(): [c.strip() for c in r[1:]] for r in rows}
    assert cells["fp32"][0] == "float32" and cells["fp32"][3] == "0.00%"
    assert cells["bf16"][0] == "bfloat16"
    # bf16 is near fp32 (0.2% on the shipped model), not equal to it
    assert 0.0 < float(cells["bf16"][3].rstrip("%")) < 2.0


def test_an_unknown_precision_is_one_line(capsys):
    assert bench_toy_sds.main(["precisions=[fp8]"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "fp8" in err[0]
