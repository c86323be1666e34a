"""Experiment logs beside metrics.jsonl: TensorBoard event files and Weights & Biases.

The trainer hands every metrics.jsonl record and every progress render to one
:class:`ExperimentLog`; what it does with them is decided here:

* ``output.tensorboard: true`` (the default): event files in ``RUN/tensorboard/``, written
  with ``torch.utils.tensorboard.SummaryWriter``. Every number of a record is a scalar tagged
  ``STAGE/KEY`` (``fit/loss``, ``fit/loss/rgb``, ``fit/weight/rgb``, ``fit/lr/density``,
  ``fit/time``, ``fit/skipped``, ...) at the record's ``global_step`` (continuous across
  stages); progress renders are images tagged ``STAGE/render`` at the global step of the last
  step they show. ``tensorboard --logdir RUN/tensorboard`` (or ``--logdir outputs`` for every
  run) shows them.
* ``output.wandb: true``: the same scalars and images to Weights & Biases (project
  ``output.wandb_project``), the run's W&B id kept in ``RUN/wandb-id.txt`` so a resume
  continues the same W&B run. Needs ``pip install wandb`` (checked when the config loads).

Cost on the hot path: one protobuf event per step (all of a step's scalars in one), queued to
SummaryWriter's writer thread, which appends each event to the file as it comes and flushes on
a timer (``FLUSH_SECS``); the log is also flushed at every checkpoint and when training ends.
A crash loses at most the events still queued; a record cut short at the end of a file is
skipped by TensorBoard's reader.

Resume: a resumed run opens a new event file with ``purge_step`` set to the global step it
resumes from, so TensorBoard drops the earlier file's events from that step on (the steps a
resume from an earlier checkpoint redoes are shown once, with their new values, as
metrics.jsonl keeps them).

A full disk (any OSError) while writing event files does not stop the run: one warning line,
TensorBoard logging is off for the rest of the run, metrics.jsonl keeps every value.
"""

from __future__ import annotations

import math
import os
import re
import secrets
import sys
import threading
import time
from pathlib import Path
from typing import Any, Dict, Optional

from engine.errors import ConfigError, UserError

#: the event files' folder inside a run folder
TENSORBOARD_DIR = "tensorboard"
#: the run's Weights & Biases id, so a resume continues the same W&B run
WANDB_ID_FILE = "wandb-id.txt"
#: seconds between flushes of the event file by SummaryWriter's writer thread
FLUSH_SECS = 10
#: events queued before a write blocks (the writer thread empties it as events come)
MAX_QUEUE = 1000
#: record keys that are the step itself, not a scalar
STEP_KEYS = ("stage_index", "step", "global_step")

_EVENT_NAME = re.compile(r"^events\.out\.tfevents\.(\d+)\.")


def scalars_of(record: Dict[str, Any]) -> Dict[str, float]:
    """A metrics.jsonl record's numbers as ``{"STAGE/KEY": value}`` (booleans as 0/1; text,
    None and non-finite values are left out, as metrics.jsonl writes those as null)."""
    stage = str(record.get("stage", "run"))
    out = {}
    for key, value in record.items():
        if key in STEP_KEYS or value is None or isinstance(value, str):
            continue
        if isinstance(value, bool):
            value = float(value)
        if isinstance(value, (int, float)) and math.isfinite(value):
            out[f"{stage}/{key}"] = float(value)
    return out


def wandb_missing(prefix: str = "output.") -> ConfigError:
    return ConfigError(f"{prefix}wandb: true needs the wandb package, which is not installed: "
                       "pip install wandb (or set output.wandb=false)")


def wandb_installed() -> bool:
    """Whether wandb can be imported, without importing it (that takes seconds)."""
    import importlib.util

    if "wandb" in sys.modules:
        return sys.modules["wandb"] is not None
    try:
        return importlib.util.find_spec("wandb") is not None
    except (ImportError, ValueError):
        return False


def _wait_for_a_later_event_name(folder: Path) -> None:
    """Event files are read in the order of their names, which begin with the second they
    were made in. A writer opened in the same second as an earlier one of this folder (a
    resume right after a short run) waits for the next second, so its file (and its purge)
    comes after the earlier one."""
    stamps = [int(m.group(1)) for p in folder.glob("events.out.tfevents.*")
              if (m := _EVENT_NAME.match(p.name))]
    if stamps:
        wait = max(stamps) + 1 - time.time()
        if wait > 0:
            time.sleep(min(wait + 0.01, 1.1))


def _quiet_writer_thread_errors() -> None:
    """SummaryWriter's writer thread keeps an OSError (a full disk) for the next call of the
    main thread, where :class:`ExperimentLog` turns it into one warning line, and then
    re-raises it in the thread, which Python would print as a traceback: this hook leaves out
    exactly those (OSErrors of TensorBoard's event writer threads) and passes every other
    thread error to the hook that was there before."""
    previous = threading.excepthook
    if getattr(previous, "_engine_quiet_tensorboard", False):
        return

    def hook(args):
        thread = args.thread
        if isinstance(args.exc_value, OSError) and thread is not None and \
                type(thread).__module__.startswith("tensorboard.summary.writer"):
            return
        previous(args)

    hook._engine_quiet_tensorboard = True
    threading.excepthook = hook


class ExperimentLog:
    """What the trainer logs besides metrics.jsonl. ``ExperimentLog()`` logs nothing;
    :meth:`open` starts the loggers the run's ``output`` settings ask for."""

    def __init__(self):
        self._tb = None            # SummaryWriter
        self._tb_dir: Optional[Path] = None
        self._summary = None       # tensorboard's Summary proto class
        self._wandb = None         # the W&B run
        self._wandb_module = None
        self._wandb_floor = 0      # W&B keeps steps below this from before a resume

    @property
    def tensorboard_dir(self) -> Optional[Path]:
        """The event files' folder while TensorBoard logging is on, else None."""
        return self._tb_dir if self._tb is not None else None

    @classmethod
    def open(cls, run_dir: Path, output: Any, config: Optional[dict] = None,
             start_step: int = 0, resumed: bool = False) -> "ExperimentLog":
        """The loggers of ``output`` (the run's OutputConfig) for ``run_dir``. ``start_step``:
        the global step training starts at; with ``resumed``, events from it on that an
        earlier process wrote are dropped (TensorBoard's purge_step)."""
        log = cls()
        run_dir = Path(run_dir)
        if getattr(output, "tensorboard", False):
            log._open_tensorboard(run_dir / TENSORBOARD_DIR, start_step if resumed else None,
                                  config)
        if getattr(output, "wandb", False):
            log._open_wandb(run_dir, getattr(output, "wandb_project", None) or "distill-engine",
                            config)
        return log

    # -- TensorBoard ------------------------------------------------------------------
    def _open_tensorboard(self, folder: Path, purge_step: Optional[int],
                          config: Optional[dict]) -> None:
        try:
            from tensorboard.compat.proto.summary_pb2 import Summary
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            print("note: TensorBoard logs are off: the tensorboard package is not installed "
                  "(pip install tensorboard, or set output.tensorboard=false)", file=sys.stderr)
            return
        _quiet_writer_thread_errors()
        try:
            folder.mkdir(parents=True, exist_ok=True)
            if purge_step is not None:
                _wait_for_a_later_event_name(folder)
            self._tb = SummaryWriter(str(folder), purge_step=purge_step, max_queue=MAX_QUEUE,
                                     flush_secs=FLUSH_SECS)
        except OSError as exc:
            self._tb = None
            self._tb_failed(exc, folder)
            return
        self._tb_dir = folder
        self._summary = Summary
        if config is not None and purge_step is None:
            import yaml

            text = yaml.safe_dump(config, sort_keys=False)
            self._tensorboard(lambda: self._tb.add_text(
                "config", "".join("    " + line + "\n" for line in text.splitlines()), 0))

    def _tensorboard(self, call) -> None:
        if self._tb is None:
            return
        try:
            call()
        except OSError as exc:
            self._tb_failed(exc, self._tb_dir)

    def _tb_failed(self, exc: OSError, folder: Optional[Path]) -> None:
        writer, self._tb = self._tb, None
        if writer is not None:
            try:
                writer.close()
            except OSError:     # the same error again, from the writer thread
                pass
        where = getattr(exc, "filename", None) or folder
        if isinstance(where, bytes):     # tensorboard's file layer names files in bytes
            where = os.fsdecode(where)
        print(f"warning: TensorBoard logging stopped: cannot write {where}: "
              f"{exc.strerror or exc}; metrics.jsonl still has every value", file=sys.stderr)

    # -- Weights & Biases -------------------------------------------------------------
    def _open_wandb(self, run_dir: Path, project: str, config: Optional[dict]) -> None:
        from engine.atomic import atomic_write_text

        try:
            import wandb
        except ImportError:
            raise wandb_missing() from None
        id_file = run_dir / WANDB_ID_FILE
        run_id = id_file.read_text().strip() if id_file.is_file() else ""
        if not run_id:
            run_id = secrets.token_hex(6)
            atomic_write_text(id_file, run_id + "\n")
        try:
            run = wandb.init(project=project, name=run_dir.name, id=run_id, resume="allow",
                             dir=str(run_dir), config=config)
        except Exception as exc:   # no login, no network, a refused project: the user's to fix
            first = " ".join(str(exc).split())[:200]
            raise UserError(f"output.wandb: Weights & Biases did not start ({first}); run "
                            "`wandb login`, set WANDB_MODE=offline, or set output.wandb=false"
                            ) from None
        self._wandb, self._wandb_module = run, wandb
        self._wandb_floor = int(getattr(run, "step", 0) or 0)

    def _to_wandb(self, values: Dict[str, Any], step: int) -> None:
        if self._wandb is None or step < self._wandb_floor:
            return   # W&B cannot rewrite the history of a resumed run; it keeps the first
        try:
            self._wandb.log(values, step=step)
        except Exception as exc:   # W&B must not end a training run
            self._wandb = None
            first = " ".join(str(exc).split())[:200]
            print(f"warning: Weights & Biases logging stopped: {first}", file=sys.stderr)

    # -- what the trainer calls -------------------------------------------------------
    def record(self, record: Dict[str, Any]) -> None:
        """One metrics.jsonl record: its numbers at its global step."""
        if self._tb is None and self._wandb is None:
            return
        values = scalars_of(record)
        step = int(record["global_step"])
        if self._tb is not None:
            summary = self._summary(value=[self._summary.Value(tag=k, simple_value=v)
                                           for k, v in values.items()])
            self._tensorboard(lambda: self._tb._get_file_writer().add_summary(summary, step))
        self._to_wandb(values, step)

    def image(self, stage: str, pixels, step: int) -> None:
        """A progress render ([H, W, 3] uint8) of ``stage`` at global step ``step``."""
        tag = f"{stage}/render"
        self._tensorboard(lambda: self._tb.add_image(tag, pixels, step, dataformats="HWC"))
        if self._wandb is not None:
            self._to_wandb({tag: self._wandb_module.Image(pixels)}, step)

    def flush(self) -> None:
        self._tensorboard(lambda: self._tb.flush())

    def close(self) -> None:
        """Flush and close every logger (a closed log ignores later calls)."""
        if self._tb is not None:
            self._tensorboard(lambda: self._tb.close())
            self._tb = None
        if self._wandb is not None:
            run, self._wandb = self._wandb, None
            try:
                run.finish()
            except Exception as exc:
                first = " ".join(str(exc).split())[:200]
                print(f"warning: Weights & Biases did not finish cleanly: {first}",
                      file=sys.stderr)
