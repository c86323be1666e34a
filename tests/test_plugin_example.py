"""The example external plugin package (examples/plugin-example) as a user sees it once it is
pip-installed: listed with its origin, its recipe runs, its own contract tests pass.

CI installs it (``pip install -e examples/plugin-example``); without it these tests skip.
"""

from __future__ import annotations

import json
import re
import os
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE_DIR = ROOT / "examples" / "plugin-example"
DIST = "engine-plugin-example"

try:
    VERSION = metadata.version(DIST)
except metadata.PackageNotFoundError:
    VERSION = None

pytestmark = pytest.mark.skipif(
    VERSION is None,
    reason=f"{DIST} is not installed; pip install -e examples/plugin-example to test it")


def _run(args, timeout=120, cwd=ROOT):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)


def test_list_shows_plugin_and_recipe_with_origin():
    proc = _run(["-m", "engine.run", "--list"])
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    origin = f"[{DIST} {VERSION} ("
    recipe = [l for l in lines if l.split()[:1] == ["example-fit"]]
    guidance = [l for l in lines if l.split()[:1] == ["example-l1"]]
    assert len(recipe) == 1 and origin in recipe[0], proc.stdout
    assert len(guidance) == 1 and origin in guidance[0], proc.stdout
    assert "engine_plugin_example.guidance:ExampleL1" in guidance[0]
    # the one-line description is the class docstring's first paragraph
    assert "L1 (or Huber) colour + mask losses" in guidance[0]
    # in the guidance section, not another kind's
    section = lines[: lines.index(guidance[0])]
    headers = [l for l in section if l.endswith("plugins:")]
    assert headers[-1] == "guidance plugins:"


@pytest.mark.slow
def test_recipe_runs_two_steps(tmp_path, rgba_image):
    out = tmp_path / "run"
    proc = _run(["-m", "engine.run", "recipe=example-fit", f"image={rgba_image}", f"out={out}",
                 "stages.fit.steps=2", "stages.fit.resolution=16",
                 "stages.fit.representation.resolution=8", "output.progress=false",
                 "output.render_size=16", "output.render_views=1", "export=null"])
    assert proc.returncode == 0, proc.stderr
    assert f"output: {out}" in proc.stdout
    records = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [0, 1]
    assert {"loss/rgb_l1", "loss/mask_l1", "loss/opacity_sparsity"} <= set(records[0])
    assert records[0]["weight/mask_l1"] == 2.0          # the recipe's schedule at step 0
    saved = (out / "config.yaml").read_text()
    assert "type: example-l1" in saved and "masked_rgb: true" in saved


@pytest.mark.slow
def test_package_own_tests_pass():
    proc = _run(["-m", "pytest", "-o", "addopts=", "-q", "-rs", "-p", "no:cacheprovider",
                 str(PACKAGE_DIR / "tests")], timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    summary = proc.stdout.strip().splitlines()[-1]
    # the contract-kit tests must really run, not skip
    assert re.search(r"\b\d+ passed\b", summary) and "skipped" not in summary, proc.stdout
