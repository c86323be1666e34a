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
import sys
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
from engine.experiment_log import ExperimentLog
from engine.live_view import LiveView
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


def _finite(tensors: List[torch.Tensor]) -> bool:
    """True when no tensor holds NaN or inf: one float64 sum per tensor (float64 cannot
    overflow on float32 data), one stacked reduction and one host sync per device."""
    by_device: Dict[torch.device, List[torch.Tensor]] = {}
    for t in tensors:
        if t.is_floating_point() and t.numel():
            by_device.setdefault(t.device, []).append(t.detach().sum(dtype=torch.float64))
    return all(bool(torch.isfinite(torch.stack(sums).sum())) for sums in by_device.values())


class StepGuard:
    """Undo an optimiser step that left a parameter or the optimiser's state non-finite.

    A finite loss and gradient can still make a bad update (a NaN learning rate; a gradient
    so large that Adam's second moment overflows to inf, after which the update is 0 and
    training silently freezes). Neither can be seen before the update is made, so before
    each step the parameters and optimiser state are copied into buffers allocated once (one
    fused copy per device; memory: one more copy of the trainable state), and after it one
    reduction checks them. A bad step is copied back: the state is exactly the one before it,
    the step counts as non-finite, and an abort saves that last good state."""

    def __init__(self, optimizer: torch.optim.Optimizer):
        self.optimizer = optimizer
        self._layout = None
        self._live: List[torch.Tensor] = []
        self._saved: List[torch.Tensor] = []
        self._stateless: List[torch.Tensor] = []

    def _collect(self):
        live, layout, stateless = [], [], []
        for group in self.optimizer.param_groups:
            for p in group["params"]:
                live.append(p)
                layout.append((id(p), tuple(p.shape)))
                state = self.optimizer.state.get(p)
                if not state:
                    stateless.append(p)
                    continue
                for key in sorted(state):
                    value = state[key]
                    if isinstance(value, torch.Tensor):
                        live.append(value)
                        layout.append((id(p), key, tuple(value.shape), value.device))
        return live, tuple(layout), stateless

    @staticmethod
    def _copy(dst: List[torch.Tensor], src: List[torch.Tensor]) -> None:
        groups: Dict[Tuple, Tuple[List, List]] = {}
        for d, t in zip(dst, src):
            g = groups.setdefault((d.device, d.dtype), ([], []))
            g[0].append(d)
            g[1].append(t)
        with torch.no_grad():
            for ds, ts in groups.values():
                torch._foreach_copy_(ds, ts)

    def save(self) -> None:
        """Remember the state before a step."""
        live, layout, stateless = self._collect()
        if layout != self._layout:   # first step, or the parameters changed: new buffers
            self._saved = [t.detach().clone() for t in live]
            self._layout = layout
        else:
            self._copy(self._saved, live)
        self._live, self._stateless = live, stateless

    def check(self) -> bool:
        """True when every parameter and optimiser state tensor is finite after the step."""
        live, _, _ = self._collect()
        return _finite(live)

    def describe(self, names: List[str]) -> str:
        """Which tensors went non-finite, in words (only called after a failed check)."""
        bad = []
        for group, name in zip(self.optimizer.param_groups, names):
            for p in group["params"]:
                if not _finite([p]):
                    bad.append(f"parameters of group '{name}'")
                state = self.optimizer.state.get(p) or {}
                bad += [f"optimiser state {key} of group '{name}'" for key, v in state.items()
                        if isinstance(v, torch.Tensor) and not _finite([v])]
        return ", ".join(dict.fromkeys(bad)) or "parameters or optimiser state"

    def undo(self) -> None:
        """Put back the state :meth:`save` remembered."""
        self._copy(self._live, self._saved)
        for p in self._stateless:        # no optimiser state before the step: none again
            self.optimizer.state.pop(p, None)


def _changed_keys(saved: Optional[dict], resolved: DictConfig, prefix: str) -> List[str]:
    """``key (old -> new)`` for the settings under ``prefix`` that differ from the run's
    saved config.yaml (what an override on resume changed)."""
    from omegaconf import OmegaConf

    from engine.recipes import flatten

    if saved is None:
        return []
    old_node = OmegaConf.select(OmegaConf.create(saved), prefix)
    new_node = OmegaConf.select(resolved, prefix)
    old = flatten(OmegaConf.to_container(old_node), prefix + ".") if old_node is not None else {}
    new = flatten(OmegaConf.to_container(new_node), prefix + ".") if new_node is not None else {}
    return [f"{k}={new.get(k)!r} (the run used {old.get(k)!r})"
            for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]


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
        self._plan: Optional[Tuple[int, int, Any]] = None   # from prepare_resume
        self._prepared: Optional[Tuple[int, StageParts]] = None
        self.explog = ExperimentLog()      # TensorBoard / W&B while run() trains; else off
        self.live = LiveView()             # output.live_view: a viser page while run() trains

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
            _restore(*ckpt.load(path), modules={"representation": rep,
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
        try:
            ckpt.save(path, modules={"representation": parts.representation,
                                     "background": parts.background},
                      optimizer=parts.optimizer,
                      info={"stage": sname, "stage_index": si, "step": steps_done,
                            "stage_end": stage_end, "time": time.time()})
        except ckpt.NonFiniteState as exc:
            earlier = ckpt.list_checkpoints(self.ckpt_dir)
            raise RunAborted(f"stage {sname} step {steps_done}: {exc}; the state is not "
                             "finite, nothing was saved. Last good checkpoint: "
                             f"{earlier[-1] if earlier else 'none'}") from None
        self._prune()
        self.explog.flush()    # the experiment logs hold at least what a resume starts from
        return path

    def _prune(self) -> None:
        """Keep stage-end checkpoints and the newest ``keep_checkpoints`` periodic ones."""
        def stage_end(path: Path) -> bool:
            _, sname, step = ckpt.NAME_RE.match(path.name).groups()
            stage = self.cfg.stages.get(sname)
            return stage is not None and int(step) == stage.steps

        ckpt.prune(self.ckpt_dir, self.cfg.output.keep_checkpoints, keep_also=stage_end)

    @torch.no_grad()
    def render_progress(self, parts: StageParts, name: str,
                        log_as: Optional[Tuple[str, int]] = None) -> Path:
        """Render the orbit preview to renders/NAME.png; ``log_as`` (stage, global step):
        also to the experiment logs."""
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
        pixels = save_grid(path, rows)
        if log_as is not None:
            self.explog.image(log_as[0], pixels, log_as[1])
        rep.train(was_training), bg.train(was_training)
        return path

    # -- the loop -----------------------------------------------------------------------
    def prepare_resume(self, resume: Path, saved: Optional[dict] = None) -> None:
        """Check everything a resume needs before anything is written: the checkpoint reads,
        its stage exists, the stages' steps can be honoured (a stage not finished at the
        checkpoint may be extended or shortened, not below the checkpoint's step; stages
        finished before it must keep their steps), and the modules the config builds take
        the checkpoint's tensors strictly (so a size changed by an override is one line).
        Raises a UserError naming the key; writes nothing."""
        tensors, meta = ckpt.load(resume)
        try:
            info = meta["info"]
            cstage, cstep = str(info["stage"]), int(info["step"])
        except (KeyError, TypeError, ValueError):
            raise ConfigError(f"checkpoint {resume} is damaged or not an engine checkpoint "
                              "(no stage/step in its metadata)") from None
        stage_names = list(self.cfg.stages)
        if cstage not in self.cfg.stages:
            raise ConfigError(f"checkpoint {resume} is from stage '{cstage}', which "
                              "this config does not have")
        si = stage_names.index(cstage)
        saved_stages = (saved or {}).get("stages") or {}
        for earlier in stage_names[:si]:
            old = (saved_stages.get(earlier) or {}).get("steps")
            new = self.cfg.stages[earlier].steps
            if old is not None and old != new:
                raise ConfigError(f"stages.{earlier}.steps={new}: stage '{earlier}' had "
                                  f"finished with {old} steps before checkpoint {resume.name}; "
                                  f"its steps cannot change now (drop the override)")
        steps = self.cfg.stages[cstage].steps
        if cstep > steps:
            raise ConfigError(f"stages.{cstage}.steps={steps} is below the checkpoint's step "
                              f"{cstep} ({resume.name}); resume with stages.{cstage}.steps >= "
                              f"{cstep}, or from an earlier checkpoint file")
        finished = cstep == steps and bool(info.get("stage_end", True))
        try:
            if finished:   # that stage had finished: the next one starts from scratch
                self._finished_from(cstage, resume, tensors, meta)
                self._plan = (si + 1, 0, None)
                if si + 1 < len(stage_names):
                    self._build_prepared(si + 1)   # its init_from chain must load too
            else:
                parts = self._build_prepared(si)
                _restore(tensors, meta, modules={"representation": parts.representation,
                                                 "background": parts.background},
                         optimizer=parts.optimizer)
                self._plan = (si, cstep, None)
        except ckpt.CheckpointMismatch as exc:
            sname = cstage
            changed = _changed_keys(saved, self.resolved, f"stages.{sname}.{exc.component}") \
                if exc.component != "optimizer" else []
            what = changed[0] if changed else f"stages.{sname}.{exc.component}"
            raise ConfigError(f"{what} does not fit checkpoint {resume.name}: {exc.detail}; "
                              "resume with the settings the run was trained with") from None

    def _build_prepared(self, si: int) -> StageParts:
        """Build stage ``si``'s parts as :meth:`_run_stage` would (same seeding), kept for it."""
        sname = list(self.cfg.stages)[si]
        torch.manual_seed(step_seed(self.cfg.system.seed, si, -1))  # initial weights
        parts = self._parts(sname)
        self._prepared = (si, parts)
        return parts

    def _finished_from(self, sname: str, path: Path, tensors, meta) -> None:
        rep = self._representation(sname)
        background = build("background", self._components(sname)["background"],
                           device=self.device).to(self.device)
        _restore(tensors, meta, modules={"representation": rep, "background": background},
                 optimizer=None)
        self.finished[sname] = rep
        self.finished_backgrounds[sname] = background

    def run(self, resume: Optional[Path] = None) -> Path:
        """Run every stage (from ``resume``, a checkpoint, when given); return the run folder.
        With ``resume``, :meth:`prepare_resume` is done first when it was not already."""
        stage_names = list(self.cfg.stages)
        start_stage, start_step = 0, 0
        if resume is not None:
            if self._plan is None:
                self.prepare_resume(resume)
            start_stage, start_step, _ = self._plan
            # resumed from an earlier checkpoint file: the steps after it are redone, so the
            # checkpoints after it (like their metrics records) belong to an abandoned run
            for later in ckpt.list_checkpoints(self.ckpt_dir):
                if later.name > Path(resume).name and \
                        Path(resume).resolve().parent == self.ckpt_dir.resolve():
                    later.unlink(missing_ok=True)
            MetricsLog.truncate_after(self.run_dir / "metrics.jsonl", start_stage, start_step - 1)
        log = MetricsLog(self.run_dir / "metrics.jsonl")
        global_step = sum(self.cfg.stages[s].steps for s in stage_names[:start_stage])
        explog = live = None
        try:
            from omegaconf import OmegaConf

            if start_stage < len(stage_names):    # (not when only the export is redone)
                explog = self.explog = ExperimentLog.open(
                    self.run_dir, self.cfg.output, config=OmegaConf.to_container(self.resolved),
                    start_step=global_step + start_step, resumed=resume is not None)
                live = self.live = LiveView.open(self.cfg.output, stage_names)
            with self.stop:
                for si in range(start_stage, len(stage_names)):
                    sname = stage_names[si]
                    self.finished[sname] = self._run_stage(
                        si, sname, log, global_step, start_step if si == start_stage else 0)
                    global_step += self.cfg.stages[sname].steps
        finally:
            log.close()
            if explog is not None:
                explog.close()
            if live is not None:
                live.close()
        if self.last_parts is None:   # resumed after the last stage had finished
            last = stage_names[-1]
            self.last_parts = self._parts_for_finished(last)
        self._redo_final_renders(stage_names[:start_stage])
        return self.run_dir

    def _redo_final_renders(self, finished: List[str]) -> None:
        """A kill between a stage's last checkpoint and its final render leaves no render;
        a resume past that stage renders it from the checkpoint, so every STAGE-final.png
        the run reports exists."""
        for sname in finished:
            if not (self.render_dir / f"{sname}-final.png").is_file():
                self.render_progress(self._parts_for_finished(sname), f"{sname}-final")

    def _parts_for_finished(self, sname: str) -> StageParts:
        rep = self._finished(sname)
        return StageParts(rep, self.finished_backgrounds[sname], None, None, None, [])

    def _run_stage(self, si: int, sname: str, log: MetricsLog, global_step: int,
                   start_step: int) -> Representation:
        stage = self.cfg.stages[sname]
        if self._prepared is not None and self._prepared[0] == si:
            parts = self._prepared[1]     # built (and restored) by prepare_resume
            self._prepared = None
        else:
            torch.manual_seed(step_seed(self.cfg.system.seed, si, -1))  # initial weights
            parts = self._parts(sname)
        parts.representation.train(), parts.background.train()
        out = self.cfg.output
        bar = _progress(stage.steps, start_step, f"{sname} ({si + 1}/{len(self.cfg.stages)})",
                        out.progress)
        guard = StepGuard(parts.optimizer)
        params = [p for g in parts.optimizer.param_groups for p in g["params"]]
        # representations that densify (Gaussians) edit parameters and optimiser state here
        after_step = getattr(parts.representation, "after_step", None)
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
            problem = None if finite else "the loss"
            if finite:
                total.backward()
                if after_step is not None:   # densification may have swapped parameters
                    params = [p for g in parts.optimizer.param_groups for p in g["params"]]
                finite = _finite([p.grad for p in params if p.grad is not None])
                problem = None if finite else "the gradient"
            if total is not None and finite:
                guard.save()
                parts.optimizer.step()
                finite = guard.check()
                if not finite:   # the update itself went bad: undo it
                    problem = f"the update ({guard.describe(parts.group_names)})"
                    guard.undo()
            if total is not None and finite:
                nan_streak = 0
                if after_step is not None:
                    after_step(info, parts.optimizer)
            elif total is not None:
                nan_streak += 1
                parts.optimizer.zero_grad(set_to_none=True)
                if nan_streak == 1:
                    bar.write(f"warning: stage {sname} step {step}: {problem} was NaN/inf; "
                              "step skipped", file=sys.stderr)
            record = {"stage": sname, "stage_index": si, "step": step,
                      "global_step": global_step + step, "time": round(time.time() - t0, 4),
                      "loss": float(total.detach()) if total is not None else None,
                      "skipped": not finite, **lrs, **logged}
            if problem is not None and total is not None:
                record["nonfinite"] = problem
            if self.device.type == "cuda":
                # the peak since the stage began (GiB): what --estimate predicts
                record["cuda_peak_gib"] = round(torch.cuda.max_memory_allocated(self.device)
                                                / 2**30, 3)
            log.write(record)
            self.explog.record(record)
            self.live.after_step(parts, info, record)    # between steps, when a browser looks
            if total is not None and not finite and nan_streak >= self.cfg.system.max_nan_steps:
                bar.close()
                path = self.save_checkpoint(parts, sname, si, step, stage_end=False)
                raise RunAborted(
                    f"stage {sname}: {problem} was NaN/inf for {nan_streak} steps in a row (up "
                    f"to step {step}); stopped. Checkpoint of the last good state: {path}. "
                    "Lower the learning rates or loss weights, or check the inputs.")
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
                    self.render_progress(parts, f"{sname}-{done:06d}",
                                         log_as=(sname, global_step + step))
            if self.stop.requested:
                path = self.save_checkpoint(parts, sname, si, done, stage_end=done == stage.steps)
                bar.close()
                raise Interrupted(f"interrupted in stage {sname} after step {done}", path)
        bar.close()
        self.save_checkpoint(parts, sname, si, stage.steps, stage_end=True)
        self.render_progress(parts, f"{sname}-final",
                             log_as=(sname, global_step + stage.steps - 1))
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


def _restore(tensors, meta, *, modules, optimizer) -> None:
    """:func:`engine.checkpoint.restore`, after each module that can change size in training
    (``prepare_state``, e.g. Gaussians after densification) took the checkpoint's sizes."""
    for prefix, module in modules.items():
        prepare = getattr(module, "prepare_state", None)
        if prepare is not None:
            prepare({k[len(prefix) + 1:]: v for k, v in tensors.items()
                     if k.startswith(prefix + ".")})
    ckpt.restore(tensors, meta, modules=modules, optimizer=optimizer)
