"""Every code block of docs/*.md marked as runnable is run here, so the docs cannot rot.

Markers, an HTML comment on the line just before the opening fence:

* ``<!-- test -->`` before a ```python block: the doc's marked python blocks run in order in
  one fresh interpreter (they share a namespace, like a notebook), in a temporary folder that
  holds ``picture.png`` (a 48x48 RGBA picture of a green block), with the repository on
  ``sys.path``.
* ``<!-- test -->`` before a ```yaml block: a recipe, written to ``recipe.yaml`` in the doc's
  temporary folder and loaded and validated with ``engine.config.load`` (every plugin's
  settings included).
* ``<!-- test: run -->`` before a ```yaml block: as above, then run 2 steps of each stage
  (engine.testing.run_recipe_steps) on ``picture.png``.
* ``<!-- test: file NAME -->`` before any block: written to NAME in the doc's temporary folder
  (a fragment or parent recipe that later blocks include or extend).
* ``<!-- test: excerpt PATH -->`` before any block: every non-blank line of the block appears,
  in order, in the repository file PATH (so quoted files stay true).

Blocks that use the example plugin package (``example-l1``, ``example-fit``,
``engine_plugin_example``) are skipped when it is not installed.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import List

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
DOCS = ["writing-a-guidance-plugin.md", "writing-a-representation.md", "composing-recipes.md",
        "pointe.md"]
MARKER = re.compile(r"^<!--\s*test(?::\s*(\w+)\s*(\S*))?\s*-->\s*$")
FENCE = re.compile(r"^```(\w*)\s*$")
PLUGIN_WORDS = ("example-l1", "example-fit", "engine_plugin_example")

try:
    metadata.version("engine-plugin-example")
    PLUGIN_INSTALLED = True
except metadata.PackageNotFoundError:
    PLUGIN_INSTALLED = False


@dataclass
class Block:
    doc: str
    line: int          # 1-based line of the opening fence
    lang: str
    mode: str          # "" | run | file | excerpt
    arg: str
    text: str

    @property
    def where(self) -> str:
        return f"docs/{self.doc}:{self.line}"

    @property
    def needs_plugin(self) -> bool:
        return any(w in self.text for w in PLUGIN_WORDS)


def blocks_of(doc: str) -> List[Block]:
    lines = (ROOT / "docs" / doc).read_text().splitlines()
    found, i = [], 0
    while i < len(lines):
        m = MARKER.match(lines[i].strip())
        if m and i + 1 < len(lines) and FENCE.match(lines[i + 1]):
            lang = FENCE.match(lines[i + 1]).group(1)
            end = i + 2
            while end < len(lines) and not lines[end].startswith("```"):
                end += 1
            found.append(Block(doc, i + 2, lang, m.group(1) or "", m.group(2) or "",
                               "\n".join(lines[i + 2:end]) + "\n"))
            i = end
        elif m:
            raise AssertionError(f"docs/{doc}:{i + 1}: a test marker must be followed "
                                 "directly by a ``` fence")
        i += 1
    return found


def _picture(folder: Path) -> Path:
    a = np.zeros((48, 48, 4), np.uint8)
    a[12:36, 16:32] = [40, 200, 60, 255]
    path = folder / "picture.png"
    Image.fromarray(a).save(path)
    return path


def _skip_if_plugin_missing(blocks: List[Block]) -> None:
    users = [b.where for b in blocks if b.needs_plugin]
    if users and not PLUGIN_INSTALLED:
        pytest.skip(f"{', '.join(users)} use the example plugin package; pip install -e "
                    "examples/plugin-example")


@pytest.mark.parametrize("doc", DOCS)
def test_doc_has_runnable_blocks(doc):
    kinds = {(b.lang, b.mode) for b in blocks_of(doc)}
    assert ("python", "") in kinds, f"docs/{doc} has no runnable python block"
    for b in blocks_of(doc):
        assert b.mode in ("", "run", "file", "excerpt"), f"{b.where}: unknown marker {b.mode}"
        assert b.mode in ("file", "excerpt") or b.lang in ("python", "yaml"), \
            f"{b.where}: only python and yaml blocks can be run"


@pytest.mark.parametrize("doc", DOCS)
def test_excerpts_match_files(doc):
    for b in blocks_of(doc):
        if b.mode != "excerpt":
            continue
        target = (ROOT / b.arg).read_text().splitlines()
        pos = 0
        for want in (l for l in b.text.splitlines() if l.strip()):
            while pos < len(target) and target[pos].rstrip() != want.rstrip():
                pos += 1
            assert pos < len(target), f"{b.where}: line {want!r} is not in {b.arg} (in order)"
            pos += 1


@pytest.mark.slow                    # each doc in a fresh interpreter, end to end
@pytest.mark.parametrize("doc", DOCS)
def test_python_blocks(doc, tmp_path):
    blocks = [b for b in blocks_of(doc) if b.lang == "python" and b.mode == ""]
    _skip_if_plugin_missing(blocks)
    _picture(tmp_path)
    for b in blocks_of(doc):
        if b.mode == "file":
            (tmp_path / b.arg).write_text(b.text)
    runner = ["import os, sys", "ns = {'__name__': '__doc__'}"]
    for b in blocks:
        runner.append(f"exec(compile({b.text!r}, {b.where!r}, 'exec'), ns)")
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-c", "\n".join(runner)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, textwrap.shorten(proc.stdout, 2000) + "\n" + proc.stderr[-4000:]


@pytest.mark.parametrize("doc", [d for d in DOCS if any(
    b.lang == "yaml" and b.mode in ("", "run") for b in blocks_of(d))])
def test_yaml_blocks(doc, tmp_path):
    from engine import config

    blocks = [b for b in blocks_of(doc) if b.lang == "yaml" and b.mode in ("", "run", "file")]
    _skip_if_plugin_missing([b for b in blocks if b.mode != "file"])
    picture = _picture(tmp_path)
    for b in blocks:
        if b.mode == "file":
            (tmp_path / b.arg).write_text(b.text)
    for i, b in enumerate(blocks):
        if b.mode == "file":
            continue
        path = tmp_path / f"recipe-{i}.yaml"
        path.write_text(b.text)
        try:
            config.load(str(path), [f"image={picture}"])
        except Exception as exc:
            raise AssertionError(f"{b.where}: {type(exc).__name__}: {exc}") from None
        if b.mode == "run":
            from engine.testing import run_recipe_steps

            run_recipe_steps(str(path), steps=2, out=tmp_path / f"run-{i}", image=picture)
