"""The run folder: where it goes, the metrics log, progress images.

Layout of one run::

    outputs/RECIPE/NAME-YYYYmmdd-HHMMSS/
      config.yaml       the fully resolved config (re-runnable, used by resume=)
      metrics.jsonl     one JSON line per step: losses, weights, learning rates, time
      tensorboard/      the same numbers and the progress renders as TensorBoard event files
                        (engine/experiment_log.py; output.tensorboard=false: none)
      checkpoints/      NN-STAGE-STEP.safetensors
      renders/          progress images STAGE-STEP.png and final.png
      (exported meshes and videos of later stages)
"""

from __future__ import annotations

import json
import math
import os
import re
import sys
import time
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

import numpy as np
import torch
from PIL import Image

from engine.atomic import USER_ERRNOS, WriteFailed, atomic_write, atomic_write_text
from engine.errors import UserError


def slug(text: str, limit: int = 40) -> str:
    s = re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")
    return s[:limit].strip("-") or "run"


def _candidates(path: Path):
    """``path``, then ``path-1``, ``path-2``, ...: the names a new run folder may take."""
    yield path
    i = 1
    while True:
        yield Path(f"{path}-{i}")
        i += 1


def _run_name(root: str, recipe: str, name: Optional[str], exact: Optional[str],
              image: Optional[str], prompt: Optional[str]) -> Path:
    if exact:
        return Path(exact)
    if name is None:
        name = Path(image).stem if image else (prompt if prompt else recipe)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return Path(root) / slug(recipe) / f"{slug(name)}-{stamp}"


def choose_run_dir(root: str, recipe: str, name: Optional[str], exact: Optional[str],
                   image: Optional[str], prompt: Optional[str]) -> Path:
    """The folder :func:`create_run_dir` would try first (nothing is created; another
    process may take it before this one does, so create with :func:`create_run_dir`)."""
    path = _run_name(root, recipe, name, exact, image, prompt)
    for cand in _candidates(path):
        if not cand.exists() or (exact and cand == path and cand.is_dir()
                                 and not any(cand.iterdir())):
            return cand
    raise AssertionError("unreachable")


def create_run_dir(root: str, recipe: str, name: Optional[str], exact: Optional[str],
                   image: Optional[str], prompt: Optional[str]) -> Tuple[Path, "RunLock"]:
    """Create this run's folder and lock it: (folder, held lock). Race-free: each candidate
    name (``NAME``, ``NAME-1``, ...) is claimed with an exclusive mkdir, so of several
    processes started at once each gets its own folder. ``out=`` an existing empty folder is
    used as it is (it is claimed by creating its lock file exclusively, then checked to
    still hold nothing else); any other existing path gets the next free suffix."""
    path = _run_name(root, recipe, name, exact, image, prompt)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"cannot create the run folder's parent {path.parent}: "
                        f"{exc.strerror or exc}") from None
    for cand in _candidates(path):
        try:
            cand.mkdir()
        except FileExistsError:
            if exact and cand == path and cand.is_dir():
                lock = RunLock(cand)
                if lock.try_claim_empty():
                    return cand, lock
            continue
        except OSError as exc:
            raise UserError(f"cannot create the run folder {cand}: "
                            f"{exc.strerror or exc}") from None
        lock = RunLock(cand)
        lock.acquire()
        return cand, lock
    raise AssertionError("unreachable")


LOCK_NAME = "run.lock"


def _read_pid(path: Path) -> Optional[int]:
    try:
        return int(path.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True   # exists, owned by someone else
    return True


class RunLock:
    """``RUN/run.lock``, holding the pid of the process training in the folder. Created
    exclusively (O_CREAT | O_EXCL); removed by :meth:`release`. A lock whose process is gone
    (kill -9, power loss) is taken over with a one-line note on stderr."""

    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / LOCK_NAME
        self.held = False

    def _create(self) -> bool:
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        except OSError as exc:    # a read-only or foreign folder: the user's to fix
            raise UserError(f"cannot write in the run folder {self.path.parent}: "
                            f"{exc.strerror or exc}; give a writable folder (out=)") from None
        with os.fdopen(fd, "w") as f:
            f.write(f"{os.getpid()}\n")
        self.held = True
        return True

    def _take_over(self, stale: Optional[int]) -> None:
        """Remove a lock whose holder is dead, unless another process replaced it meanwhile:
        the lock is moved aside atomically and put back when it is not the stale one."""
        aside = self.path.with_name(f"{LOCK_NAME}.{os.getpid()}.stale")
        try:
            os.rename(self.path, aside)
        except FileNotFoundError:
            return
        if _read_pid(aside) != stale:   # a live process took it over first: put it back
            try:
                os.link(aside, self.path)
            except FileExistsError:
                pass
        aside.unlink(missing_ok=True)

    def acquire(self) -> "RunLock":
        """Take the lock or raise a UserError naming the holder's pid."""
        for _ in range(20):
            if self._create():
                return self
            pid = _read_pid(self.path)
            if pid is not None and pid != os.getpid() and _alive(pid):
                raise UserError(f"{self.path.parent} is in use by process {pid} (lock file "
                                f"{self.path}); wait for it to finish or stop it first")
            if pid is None and self.path.exists():
                # being written this very moment, or garbage: give a writer a moment
                time.sleep(0.05)
                if _read_pid(self.path) is not None:
                    continue
            print(f"note: taking over the lock of process {pid}, which is no longer running "
                  f"({self.path})", file=sys.stderr)
            self._take_over(pid)
        raise UserError(f"could not lock {self.path.parent}: its lock file {self.path} keeps "
                        "changing; is another run starting in it?")

    def try_claim_empty(self) -> bool:
        """Claim an existing folder that is empty: True when this process now holds it."""
        if not self._create():
            return False
        if any(p.name != LOCK_NAME for p in self.path.parent.iterdir()):
            self.release()
            return False
        return True

    def release(self) -> None:
        if self.held:
            self.held = False
            if _read_pid(self.path) == os.getpid():
                self.path.unlink(missing_ok=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.release()


def _finite_or_none(value: Any) -> Any:
    """JSON has no NaN/inf: non-finite numbers are written as null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite_or_none(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite_or_none(v) for v in value]
    return value


class MetricsLog:
    """Append-only JSON-lines log, flushed every line so a crash loses nothing written."""

    def __init__(self, path: Path):
        self.path = path
        self._file = open(path, "a", buffering=1)

    def write(self, record: Dict[str, Any]) -> None:
        try:
            self._file.write(json.dumps(_finite_or_none(record), allow_nan=False) + "\n")
        except OSError as exc:   # a full disk: one line; a resume drops a line cut short
            if exc.errno in USER_ERRNOS:
                raise WriteFailed(self.path, exc) from None
            raise

    def close(self) -> None:
        try:
            self._file.close()
        except OSError:   # the flush of a line a full disk refused: already reported
            pass

    @staticmethod
    def truncate_after(path: Path, stage_index: int, step: int) -> None:
        """Drop records after (stage_index, step): those steps are about to be redone."""
        if not path.exists():
            return
        kept = []
        for line in path.read_text().splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut by a crash
            if (rec.get("stage_index", 0), rec.get("step", 0)) <= (stage_index, step):
                kept.append(line)
        atomic_write_text(path, "".join(k + "\n" for k in kept))


def to_uint8(image: torch.Tensor) -> np.ndarray:
    """[H, W, C] float in [0, 1] (C = 1 or 3) -> uint8 [H, W, 3]."""
    image = image.detach().float().clamp(0, 1).cpu()
    if image.shape[-1] == 1:
        image = image.expand(*image.shape[:-1], 3)
    return (image.numpy() * 255.0 + 0.5).astype(np.uint8)


def save_grid(path: Path, rows: list) -> np.ndarray:
    """Save rows of [B, H, W, C] image batches as one PNG (each row: the B views side by side);
    return its pixels ([H, W, 3] uint8, for the experiment logs)."""
    strips = [np.concatenate([to_uint8(img) for img in row], axis=1) for row in rows]
    pixels = np.concatenate(strips, axis=0)
    image = Image.fromarray(pixels)
    atomic_write(path, lambda tmp: image.save(tmp, format="PNG"))
    return pixels
