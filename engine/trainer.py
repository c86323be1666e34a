"""The stage loop: sample cameras -> render -> losses -> step.

A recipe is a list of stages. Each stage builds its representation (fresh, or created from an
earlier stage's), background, guidance and camera sampler from the registry, an optimiser
with one parameter group per name the representation gives, and runs ``steps`` steps.

Reproducibility: every step seeds torch from (seed, stage, step), so a resumed run draws the
same cameras and noise as an uninterrupted one and reaches the same result.
"""

from __future__ import annotations

import math
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import torch
from omegaconf import DictConfig

from engine import checkpoint as ckpt
from engine.cameras import orbit
from engine.config import RunConfig, StageConfig, build, check_lr_groups
from engine.errors import ConfigError, RunAborted
from engine.outputs import MetricsLog, save_grid
from engine.plugin import Representation, RunInputs, StepInfo
from engine.seeding import step_generator, step_seed


@dataclass
class StageParts:
    representation: Representation
    background: torch.nn.Module
    guidance: torch.nn.Module
    sampler: Any
    optimizer: torch.optim.Optimizer
    group_names: List[str]


class Interrupted(Exception):
    """Ctrl-C was pressed; a checkpoint has been written."""

    exit_code = 130

    def __init__(self, message: str, checkpoint: Path):
        super().__init__(message)
        self.checkpoint = checkpoint


class StopFlag:
    """First Ctrl-C asks the loop to stop after the current step; a second one is immediate."""

    def __init__(self):
        self.requested = False
        self._previous = None

    def __enter__(self):
        def handler(signum, frame):
            if self.requested:
                raise KeyboardInterrupt
            self.requested = True
        try:
            self._previous = signal.signal(signal.SIGINT, handler)
        except ValueError:  # not the main thread: leave signals alone
            self._previous = None
        return self

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)


class Trainer:
    def __init__(self, cfg: RunConfig, resolved: DictConfig, run_dir: Path, inputs: RunInputs,
                 device: torch.device):
        self.cfg = cfg
        self.resolved = resolved
        self.run_dir = run_dir
        self.inputs = inputs
        self.device = device
        self.ckpt_dir = run_dir / "checkpoints"
        self.render_dir = run_dir / "renders"
        self._guidance_cache: Tuple[Any, Optional[torch.nn.Module]] = (None, None)
        self.finished: Dict[str, Representation] = {}
        self.finished_backgrounds: Dict[str, torch.nn.Module] = {}
        self.last_parts: Optional[StageParts] = None
        self.stop = StopFlag()

    # -- building -----------------------------------------------------------------------
    def _components(self, name: str) -> Dict[str, Tuple[type, Any]]:
        return self.cfg.components[name]

    def _guidance(self, sname: str) -> torch.nn.Module:
        # Frozen models are expensive to load: consecutive stages with the same guidance
        # settings share one instance.
        spec = self.resolved.stages[sname].guidance
        key, module = self._guidance_cache
        if module is None or key != spec:
            module = build("guidance", self._components(sname)["guidance"], device=self.device,
                           inputs=self.inputs).to(self.device)
            self._guidance_cache = (spec, module)
        return module

    def _representation(self, sname: str) -> Representation:
        stage = self.cfg.stages[sname]
        cls, rcfg = self._components(sname)["representation"]
        if stage.init_from is not None:
            rep = cls.create_from(self._finished(stage.init_from), rcfg, device=self.device)
        else:
            rep = build("representation", (cls, rcfg), device=self.device)
        return rep.to(self.device)

    def _finished(self, sname: str) -> Representation:
        """The representation at the end of an earlier stage: kept in memory, or rebuilt
        from its end-of-stage checkpoint when the run was resumed after that stage."""
        if sname not in self.finished:
            si = list(self.cfg.stages).index(sname)
            path = self.ckpt_dir / ckpt.checkpoint_name(si, sname, self.cfg.stages[sname].steps)
            rep = self._representation(sname)
            background = build("background", self._components(sname)["background"],
                               device=self.device).to(self.device)
            ckpt.restore(*ckpt.load(path), modules={"representation": rep,
                                                    "background": background}, optimizer=None)
            self.finished[sname] = rep
            self.finished_backgrounds[sname] = background
        return self.finished[sname]

    def _parts(self, sname: str) -> StageParts:
        stage = self.cfg.stages[sname]
        comps = self._components(sname)
        rep = self._representation(sname)
        background = build("background", comps["background"], device=self.device).to(self.device)
        guidance = self._guidance(sname)
        sampler = build("cameras", comps["cameras"], device=self.device)
        groups = dict(rep.param_groups())
        for gname, params in background.param_groups().items():
            if gname in groups:
                raise ConfigError(f"parameter group '{gname}' is given by both the "
                                  "representation and the background")
            groups[gname] = params
        lr = stage.optimizer.lr_schedules
        check_lr_groups(sname, lr, list(groups))
        names = list(groups)
        param_groups = [{"params": groups[g], "lr": lr.get(g, lr.get("default"))(0), "name": g}
                        for g in names]
        opt_cls = torch.optim.AdamW if stage.optimizer.type == "adamw" else torch.optim.Adam
        optimizer = opt_cls(param_groups, betas=tuple(stage.optimizer.betas),
                            eps=stage.optimizer.eps, weight_decay=stage.optimizer.weight_decay)
        return StageParts(rep, background, guidance, sampler, optimizer, names)

    # -- one step -----------------------------------------------------------------------
    def _losses(self, parts: StageParts, stage: StageConfig, info: StepInfo,
                generator: torch.Generator) -> Tuple[torch.Tensor, Dict[str, float], Dict]:
        cams = parts.sampler.sample(info.step, generator).to(self.device)
        size = int(stage.resolution_schedule(info.step))
        parts.representation.before_step(info)
        parts.guidance.before_step(info)
        outputs = parts.representation.render(cams, size, size, background=parts.background,
                                              step=info)
        losses = dict(parts.guidance(outputs, cams, info))
        for name, value in parts.representation.regularizers(outputs, info).items():
            if name in losses:
                raise ConfigError(f"loss '{name}' is produced by both the guidance and the "
                                  "representation; rename one")
            losses[name] = value
        total = None
        weights = {}
        for name, schedule in stage.loss_weights.items():
            w = schedule(info.step)
            weights[name] = w
            if w == 0.0 or name not in losses:
                continue
            term = w * losses[name]
            total = term if total is None else total + term
        logged = {f"loss/{k}": float(v.detach()) for k, v in losses.items()}
        logged.update({f"weight/{k}": w for k, w in weights.items()})
        return total, logged, outputs

    def _apply_lr(self, parts: StageParts, stage: StageConfig, step: int) -> Dict[str, float]:
        lr = stage.optimizer.lr_schedules
        out = {}
        for group in parts.optimizer.param_groups:
            group["lr"] = lr.get(group["name"], lr.get("default"))(step)
            out[f"lr/{group['name']}"] = group["lr"]
        return out

    # -- saving -------------------------------------------------------------------------
    def save_checkpoint(self, parts: StageParts, sname: str, si: int, steps_done: int,
                        stage_end: bool) -> Path:
        path = self.ckpt_dir / ckpt.checkpoint_name(si, sname, steps_done)
        ckpt.save(path, modules={"representation": parts.representation,
                                 "background": parts.background},
                  optimizer=parts.optimizer,
                  info={"stage": sname, "stage_index": si, "step": steps_done,
                        "stage_end": stage_end, "time": time.time()})
        self._prune()
        return path

    def _prune(self) -> None:
        """Keep stage-end checkpoints and the newest ``keep_checkpoints`` periodic ones."""
        def stage_end(path: Path) -> bool:
            _, sname, step = ckpt.NAME_RE.match(path.name).groups()
            stage = self.cfg.stages.get(sname)
            return stage is not None and int(step) == stage.steps

        ckpt.prune(self.ckpt_dir, self.cfg.output.keep_checkpoints, keep_also=stage_end)

    @torch.no_grad()
    def render_progress(self, parts: StageParts, name: str) -> Path:
        rep, bg = parts.representation, parts.background
        was_training = rep.training
        rep.eval(), bg.eval()
        o = self.cfg.output
        cams = orbit(o.render_views, elevation_deg=15.0, distance=_preview_distance(parts),
                     fovy_deg=40.0, device=self.device)
        info = StepInfo("preview", 0, 0, 1, 0)
        out = rep.render(cams, o.render_size, o.render_size, background=bg, step=info)
        rows = [out["rgb"]]
        if "normal" in out:
            rows.append(out["normal"] * 0.5 + 0.5)
        rows.append(out["opacity"])
        path = self.render_dir / f"{name}.png"
        save_grid(path, rows)
        rep.train(was_training), bg.train(was_training)
        return path

    # -- the loop -----------------------------------------------------------------------
    def run(self, resume: Optional[Path] = None) -> Path:
        """Run every stage (from ``resume``, a checkpoint, when given); return the run folder."""
        stage_names = list(self.cfg.stages)
        start_stage, start_step, resume_state = 0, 0, None
        if resume is not None:
            tensors, meta = ckpt.load(resume)
            info = meta["info"]
            if info["stage"] not in self.cfg.stages:
                raise ConfigError(f"checkpoint {resume} is from stage '{info['stage']}', which "
                                  "this config does not have")
            start_stage, start_step = stage_names.index(info["stage"]), info["step"]
            if start_step >= self.cfg.stages[info["stage"]].steps:
                start_stage, start_step = start_stage + 1, 0   # that stage had finished
            else:
                resume_state = (tensors, meta)
            MetricsLog.truncate_after(self.run_dir / "metrics.jsonl", start_stage, start_step - 1)
        log = MetricsLog(self.run_dir / "metrics.jsonl")
        global_step = sum(self.cfg.stages[s].steps for s in stage_names[:start_stage])
        try:
            with self.stop:
                for si in range(start_stage, len(stage_names)):
                    sname = stage_names[si]
                    self.finished[sname] = self._run_stage(
                        si, sname, log, global_step, start_step if si == start_stage else 0,
                        resume_state if si == start_stage else None)
                    global_step += self.cfg.stages[sname].steps
        finally:
            log.close()
        if self.last_parts is None:   # resumed after the last stage had finished
            last = stage_names[-1]
            self.last_parts = self._parts_for_finished(last)
        return self.run_dir

    def _parts_for_finished(self, sname: str) -> StageParts:
        rep = self._finished(sname)
        return StageParts(rep, self.finished_backgrounds[sname], None, None, None, [])

    def _run_stage(self, si: int, sname: str, log: MetricsLog, global_step: int,
                   start_step: int, resume_state) -> Representation:
        stage = self.cfg.stages[sname]
        torch.manual_seed(step_seed(self.cfg.system.seed, si, -1))  # initial weights
        parts = self._parts(sname)
        if resume_state is not None:
            ckpt.restore(*resume_state, modules={"representation": parts.representation,
                                                 "background": parts.background},
                         optimizer=parts.optimizer)
        parts.representation.train(), parts.background.train()
        out = self.cfg.output
        bar = _progress(stage.steps, start_step, f"{sname} ({si + 1}/{len(self.cfg.stages)})",
                        out.progress)
        nan_streak = 0
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        t0 = time.time()
        for step in range(start_step, stage.steps):
            info = StepInfo(sname, si, step, stage.steps, global_step + step)
            generator = step_generator(self.cfg.system.seed, si, step)
            lrs = self._apply_lr(parts, stage, step)
            parts.optimizer.zero_grad(set_to_none=True)
            total, logged, _ = self._losses(parts, stage, info, generator)
            finite = total is not None and bool(torch.isfinite(total))
            if finite:
                total.backward()
                finite = all(p.grad is None or bool(torch.isfinite(p.grad).all())
                             for g in parts.optimizer.param_groups for p in g["params"])
            if total is not None and finite:
                parts.optimizer.step()
                nan_streak = 0
            elif total is not None:
                nan_streak += 1
                parts.optimizer.zero_grad(set_to_none=True)
                if nan_streak >= self.cfg.system.max_nan_steps:
                    path = self.save_checkpoint(parts, sname, si, step, stage_end=False)
                    raise RunAborted(
                        f"stage {sname}: the loss or its gradient was NaN/inf for {nan_streak} "
                        f"steps in a row (up to step {step}); stopped. Checkpoint of the last "
                        f"good state: {path}. Lower the learning rates or check the inputs.")
            record = {"stage": sname, "stage_index": si, "step": step,
                      "global_step": global_step + step, "time": round(time.time() - t0, 4),
                      "loss": float(total.detach()) if total is not None else None,
                      "skipped": not finite, **lrs, **logged}
            if self.device.type == "cuda":
                # the peak since the stage began (GiB): what --estimate predicts
                record["cuda_peak_gib"] = round(torch.cuda.max_memory_allocated(self.device)
                                                / 2**30, 3)
            log.write(record)
            bar.update(1)
            postfix = {"loss": f"{record['loss']:.4g}" if finite else "skip"}
            postfix.update({k[5:]: f"{v:.3g}" for k, v in logged.items()
                            if k.startswith("loss/") and weights_nonzero(stage, k[5:], step)})
            bar.set_postfix(postfix)
            done = step + 1
            if done < stage.steps:
                if out.checkpoint_every and done % out.checkpoint_every == 0:
                    self.save_checkpoint(parts, sname, si, done, stage_end=False)
                if out.render_every and done % out.render_every == 0:
                    self.render_progress(parts, f"{sname}-{done:06d}")
            if self.stop.requested:
                path = self.save_checkpoint(parts, sname, si, done, stage_end=done == stage.steps)
                bar.close()
                raise Interrupted(f"interrupted in stage {sname} after step {done}", path)
        bar.close()
        self.save_checkpoint(parts, sname, si, stage.steps, stage_end=True)
        self.render_progress(parts, f"{sname}-final")
        self.last_parts = parts
        return parts.representation


def weights_nonzero(stage: StageConfig, name: str, step: int) -> bool:
    schedule = stage.loss_weights.get(name)
    return schedule is not None and schedule(step) != 0.0


def _preview_distance(parts: StageParts) -> float:
    radius = float(getattr(parts.representation, "radius", 1.0))
    return radius / math.sin(math.radians(20.0)) * 0.9


def _progress(total: int, initial: int, desc: str, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, desc=desc, disable=not enabled,
                dynamic_ncols=True, leave=True)


def load_finished_representation(run_dir: Path, stage: Optional[str] = None,
                                 device: str = "cpu") -> Representation:
    """The representation at the end of a finished stage (default: the last) of a run folder,
    rebuilt the way the run built it (through ``create_from`` chains) from its end-of-stage
    checkpoint. For evaluation and export of finished runs."""
    from engine import config

    cfg, resolved = config.load(None, [], base=config.read_yaml(Path(run_dir) / "config.yaml"))
    trainer = Trainer(cfg, resolved, Path(run_dir), RunInputs(), torch.device(device))
    rep = trainer._finished(stage or list(cfg.stages)[-1])
    return rep.eval()
