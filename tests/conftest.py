"""Shared fixtures: a small input picture and the overrides that make fit-image tiny."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image


def pytest_configure(config):
    """Under pytest-xdist (README's test command runs ``-n auto``), split the cores among the
    workers: torch in each worker, and every process a test starts (through the inherited
    OMP_NUM_THREADS), gets cores / workers threads, so two workers on two cores do not fight
    over four threads (torch's small ops slow down many times when threads are descheduled)."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers <= 1:
        return
    per_worker = str(max(1, (os.cpu_count() or 1) // workers))
    for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[name] = per_worker
    import torch

    torch.set_num_threads(int(per_worker))


@pytest.fixture
def rgba_image(tmp_path: Path) -> Path:
    """64x64 RGBA: a red 20x30 (w x h) block, transparent elsewhere, off-centre."""
    a = np.zeros((64, 64, 4), np.uint8)
    a[10:40, 5:25] = [220, 40, 30, 255]
    path = tmp_path / "block.png"
    Image.fromarray(a).save(path)
    return path


def tiny_fit_args(image: Path, out: Path, steps: int = 12, extra=()) -> list:
    """CLI items for a fit-image run that takes about a second."""
    return [
        "recipe=fit-image", f"image={image}", f"out={out}",
        f"stages.fit.steps={steps}", "stages.fit.resolution=16",
        "stages.fit.representation.resolution=8", "stages.fit.representation.samples_per_ray=16",
        "inputs.image_size=32", "output.progress=false", "output.render_size=16",
        "output.render_views=2", "output.render_every=0", "output.checkpoint_every=4",
        "output.keep_checkpoints=100", "export=null", *extra,
    ]


@pytest.fixture(autouse=True)
def _keep_torch_threads():
    """A run in-process applies its recipe's ``system.threads`` (isotropic3d-toy-gs sets 1) to
    the whole process; restore the count so one test cannot slow every later one down."""
    import torch

    threads = torch.get_num_threads()
    yield
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
