"""The training loop both fine-tuning trainers share (:class:`Trainer`).

One loop: steps with a learning-rate schedule (:func:`lr_at`), gradient clipping, the weight
average (:mod:`guidance.training.average`), the metrics log, checkpoints and resume, Ctrl-C,
all through accelerate (one or several processes, mixed precision). A trainer
(:mod:`guidance.training.diffusion`, :mod:`guidance.training.clip`) gives what it trains and
the maths of one step.

Determinism: every random draw of step s (the objects and their random group and reference
through :mod:`guidance.training.data`; t, noise and dropout through the step's generator; the
global torch RNG) is a function of (seed, s, process), seeded the way the engine's stage loop
seeds a step (:func:`engine.seeding.step_generator`, stage 0), so a run resumed from a
checkpoint ends with exactly the weights of an uninterrupted run (CPU, mixed_precision=no).

A run folder holds config.yaml, metrics.jsonl (one line every ``log_every`` steps),
checkpoints/ (safetensors: trainable weights, the average, optimiser state; atomic) and
model/. The first Ctrl-C stops after the current step with a checkpoint (exit 130), a second
one at once; a non-finite loss aborts (exit 3).
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import torch
from accelerate import Accelerator
from torch import Tensor

from engine import checkpoint
from engine.errors import ConfigError, RunAborted, UserError
from engine.outputs import MetricsLog
from engine.seeding import step_generator
from engine.trainer import Interrupted, StopFlag
from guidance.training.average import WeightAverage
from guidance.training.config import FinetuneConfig
from guidance.training.data import load_dataset, seeded_item_loader, step_loader

#: the stage index of a fine-tuning run in the engine's seeding scheme (one stage)
STAGE_INDEX = 0


def lr_at(step: int, lr: float, warmup: int, schedule: str = "constant",
          steps: int = 0) -> float:
    """The learning rate of optimiser step ``step`` (0-based): linear warm-up over ``warmup``
    steps (step 0 gets lr / warmup), then ``constant`` or ``cosine`` (half a cosine from lr
    after the warm-up down to 0 at step ``steps``)."""
    if warmup > 0 and step < warmup:
        return lr * (step + 1) / warmup
    if schedule == "cosine" and steps > warmup:
        progress = min(1.0, (step - warmup) / (steps - warmup))
        return lr * 0.5 * (1.0 + math.cos(math.pi * progress))
    return lr


def param_groups(module: torch.nn.Module, weight_decay: float) -> List[dict]:
    """AdamW groups: decay on matrices and kernels, none on biases, norms, scalars."""
    decay, no_decay = [], []
    for p in module.parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0}]


class Trainer:
    """One fine-tuning run: accelerator, data, the trainable module, optimiser, the weight
    average; :meth:`run` trains. A subclass gives:

    * :meth:`build`: the trainable module and the image size the data is loaded at;
    * :meth:`compute_loss` ``(batch, generator) -> (loss, logs)``: the whole per-step maths
      (tests call it directly);
    * :meth:`checkpoint_modules`: its modules by checkpoint prefix;
    * :meth:`write_model` ``(module, folder, step)``: the saved model, from the trained
      module or its average;
    * optionally :meth:`sample_grid` (progress images) and ``with_reference`` (whether the
      data loads a reference view per object).
    """

    with_reference = True

    def __init__(self, cfg: FinetuneConfig, out_dir: Path, resume: Optional[Path] = None):
        self.cfg = cfg
        self.out = Path(out_dir)
        try:
            self.accelerator = Accelerator(mixed_precision=cfg.mixed_precision,
                                           cpu=cfg.device == "cpu")
        except (ValueError, RuntimeError) as exc:
            raise ConfigError(f"mixed_precision: {str(exc).splitlines()[0]}") from None
        acc = self.accelerator
        self.device = acc.device
        if cfg.cpu_threads and self.device.type == "cpu":
            torch.set_num_threads(cfg.cpu_threads)
        self.mode = cfg.mode
        self.V = cfg.data.num_views
        self.trainable, image_size = self.build()
        with acc.main_process_first():
            self.dataset = self.load_data(image_size)
        self.start_step = 0
        self.average = None
        if cfg.average_decay > 0:
            self.average = WeightAverage(self.trainable, cfg.average_decay, self.device)
        self.optimizer = torch.optim.AdamW(param_groups(self.trainable, cfg.weight_decay),
                                           lr=lr_at(0, cfg.lr, cfg.warmup),
                                           betas=tuple(cfg.betas))
        self.resume_info: Dict[str, Any] = {}
        self.elapsed_before = 0.0          # wall seconds of the run before this process
        self._run_started: Optional[float] = None
        if resume is not None:
            self._restore(resume)
        loader = self.make_loader()
        self.net, self.optimizer, self.loader = acc.prepare(self.trainable, self.optimizer,
                                                            loader)
        scaler_state = self.resume_info.get("scaler")
        if scaler_state and acc.scaler is not None:
            acc.scaler.load_state_dict(scaler_state)
        self.stop = StopFlag()

    # -- what a trainer gives -----------------------------------------------------------
    def build(self) -> Tuple[torch.nn.Module, Optional[int]]:
        """(the trainable module, the image size to load the data at or None: the files')."""
        raise NotImplementedError

    def compute_loss(self, batch: dict, generator: torch.Generator) -> Tuple[Tensor, dict]:
        """The loss of one batch (a collated dict from the loader, on any device) and logs."""
        raise NotImplementedError

    def checkpoint_modules(self) -> Dict[str, torch.nn.Module]:
        raise NotImplementedError

    def write_model(self, module: torch.nn.Module, folder: Path, step: int) -> None:
        raise NotImplementedError

    def sample_grid(self, step: int) -> Optional[Path]:
        """Progress images of step ``step`` (none by default)."""
        return None

    def load_data(self, image_size: Optional[int]):
        """The training data (default: the multi-view dataset of ``cfg.data`` at
        ``image_size``)."""
        return load_dataset(self.cfg.data, image_size, self.with_reference)

    def make_loader(self) -> torch.utils.data.DataLoader:
        """The loader of the remaining steps (default: seeded batches of the multi-view
        dataset, :func:`guidance.training.data.step_loader`)."""
        cfg = self.cfg
        return step_loader(self.dataset, cfg.batch_size, cfg.seed, self.start_step, cfg.steps,
                           self.accelerator.num_processes, cfg.data.num_workers)

    # -- checkpoints ----------------------------------------------------------------------
    def _modules(self) -> Dict[str, torch.nn.Module]:
        modules = dict(self.checkpoint_modules())
        if self.average is not None:
            modules["average"] = self.average.module
        return modules

    def _restore(self, path: Path) -> None:
        tensors, meta = checkpoint.load(path)
        info = meta.get("info", {})
        if info.get("mode") != self.mode:
            raise UserError(f"resume={path} is a {info.get('mode')} run, not {self.mode}")
        try:
            checkpoint.restore(tensors, meta, modules=self._modules(), optimizer=self.optimizer)
        except (RuntimeError, ValueError, KeyError) as exc:
            raise UserError(f"resume={path} does not fit this model "
                            f"({str(exc).splitlines()[0][:200]})") from None
        if self.average is not None:
            self.average.updates = int(info.get("average_updates", 0))
        self.start_step = int(info["step"])
        # the wall time already spent, so the log (and toy_models' manifest) counts the whole
        # training, not only the part since the last resume
        self.elapsed_before = float(info.get("elapsed_s") or 0.0)
        self.resume_info = info

    def elapsed(self) -> float:
        """Wall seconds of training so far, the time before a resume included."""
        started = self._run_started
        return self.elapsed_before + (time.time() - started if started is not None else 0.0)

    def save_checkpoint(self, step: int) -> Optional[Path]:
        acc = self.accelerator
        acc.wait_for_everyone()
        path = None
        if acc.is_main_process:
            folder = self.out / "checkpoints"
            path = folder / checkpoint.checkpoint_name(STAGE_INDEX, self.mode, step)
            info = {"step": step, "mode": self.mode, "recipe": self.cfg.recipe,
                    "elapsed_s": round(self.elapsed(), 2),
                    "scaler": acc.scaler.state_dict() if acc.scaler is not None else None,
                    "average_updates": self.average.updates if self.average else None}
            checkpoint.save(path, modules=self._modules(), optimizer=self.optimizer, info=info)
            checkpoint.prune(folder, self.cfg.keep_checkpoints)
        acc.wait_for_everyone()
        return path

    def save_model(self, step: int) -> Path:
        """out/model, from the weight average when ``average_decay`` is on."""
        acc = self.accelerator
        acc.wait_for_everyone()
        folder = self.out / "model"
        if acc.is_main_process:
            net = (self.average.module if self.average is not None
                   else acc.unwrap_model(self.net, keep_fp32_wrapper=False))
            self.write_model(net, folder, step)
        acc.wait_for_everyone()
        return folder

    # -- the loop -------------------------------------------------------------------------
    def run(self) -> Path:
        """Train from ``start_step`` to ``steps``; return the saved model's folder."""
        cfg, acc = self.cfg, self.accelerator
        log = None
        if acc.is_main_process:
            path = self.out / "metrics.jsonl"
            MetricsLog.truncate_after(path, STAGE_INDEX, self.start_step)  # redone from here
            path.parent.mkdir(parents=True, exist_ok=True)
            log = MetricsLog(path)
        step = self.start_step
        window: List[float] = []
        self._run_started = time.time()
        params = [p for p in self.trainable.parameters() if p.requires_grad]
        try:
            with self.stop:
                for batch in self.loader:
                    generator = step_generator(cfg.seed, STAGE_INDEX, step, acc.process_index)
                    lr = lr_at(step, cfg.lr, cfg.warmup, cfg.lr_schedule, cfg.steps)
                    for group in self.optimizer.param_groups:
                        group["lr"] = lr
                    loss, logs = self.compute_loss(batch, generator)
                    if not torch.isfinite(loss.detach()):
                        raise RunAborted(f"non-finite loss at step {step}; lower lr or use "
                                         f"mixed_precision=no (last checkpoint in "
                                         f"{self.out / 'checkpoints'})")
                    acc.backward(loss)
                    grad_norm = None
                    if cfg.grad_clip > 0 and acc.sync_gradients:
                        grad_norm = acc.clip_grad_norm_(params, cfg.grad_clip)
                    self.optimizer.step()
                    self.optimizer.zero_grad(set_to_none=True)
                    if self.average is not None:
                        self.average.update(acc.unwrap_model(self.net))
                    step += 1
                    # every process's loss, and whether any was asked to stop (so all stop
                    # after the same step)
                    stop = torch.tensor(float(self.stop.requested), device=loss.device)
                    shared = acc.gather(torch.stack([loss.detach().float(), stop])[None])
                    window.append(float(shared[:, 0].mean()))
                    if step % cfg.log_every == 0 or step == cfg.steps:
                        self._log(log, step, window, lr, grad_norm, logs)
                        window = []
                    if bool(shared[:, 1].any()):
                        raise Interrupted(f"interrupted after step {step}",
                                          self.save_checkpoint(step))
                    if cfg.checkpoint_every and step % cfg.checkpoint_every == 0 \
                            and step < cfg.steps:
                        self.save_checkpoint(step)
                    if cfg.sample_every > 0 and step % cfg.sample_every == 0 \
                            and step < cfg.steps:
                        self.sample_grid(step)
        finally:
            if log is not None:
                log.close()
        if step > self.start_step or not (self.out / "checkpoints").is_dir():
            self.save_checkpoint(step)
        if cfg.sample_every >= 0:
            self.sample_grid(step)
        return self.save_model(step)

    def _log(self, log: Optional[MetricsLog], step: int, window: List[float], lr: float,
             grad_norm, logs: dict) -> None:
        if log is None:
            return
        elapsed = self.elapsed()
        record = {"step": step, "loss": sum(window) / max(len(window), 1), "lr": lr,
                  **({"grad_norm": float(grad_norm)} if grad_norm is not None else {}),
                  **logs, "elapsed_s": round(elapsed, 2)}
        log.write(record)
        print(f"[{self.mode}] step {step}/{self.cfg.steps} loss {record['loss']:.4f} "
              f"lr {lr:.2e} ({elapsed:.0f} s)", flush=True)


class ItemTrainer(Trainer):
    """A trainer whose dataset is a plain indexed one (pairs, shapes) rather than the
    multi-view dataset: seeded batches of items (:func:`guidance.training.data.seeded_item_loader`)."""

    def make_loader(self) -> torch.utils.data.DataLoader:
        cfg = self.cfg
        return seeded_item_loader(self.dataset, cfg.batch_size, cfg.seed, self.start_step,
                                  cfg.steps, self.accelerator.num_processes,
                                  cfg.data.num_workers)
