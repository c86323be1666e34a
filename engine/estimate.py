"""``python -m engine.run recipe=NAME --estimate``: peak memory of a run, per stage and phase,
before anything is downloaded or trained.

A *phase* is a stretch of a stage with one render size and one batch (the resolution and
camera-group schedules' breakpoints): isotropic3d's NeRF stage has two (8 renders at 64 px,
then 4 at 256 px), its DMTet stage two (4 at 256, then 4 at 512). For each phase:

* **guidance**: the frozen models' weights in the precision they would run in on the target
  device, and one guidance step's activations, from the guidance class's
  ``estimate_memory(cfg, batch, size, device_type)`` (multiview-sds builds the real-size
  models on fake tensors and runs a step on them: :mod:`guidance.multiview.memory`);
* **representation**: measured for real on this CPU (its parameters, one training step's
  tensors, the optimiser's state) at two small render sizes, and extrapolated linearly in
  pixels: ``m(S) = a + b S^2``. Activations grow with the rays; checkpointed training chunks
  grow slower than that, so at large sizes this is an upper bound.

The total of a phase is their sum (the render's saved tensors are alive while the guidance
runs), plus :data:`engine.memory.CUDA_OVERHEAD` on CUDA. What it leaves out: allocator
fragmentation (+5..15%), the progress renders and the export (chunked, small beside
training), other processes on the GPU.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import torch

from engine.memory import CUDA_OVERHEAD, GIB, bytes_of, measure

#: render sizes the representation is measured at (then extrapolated)
MEASURE_SIZES = (16, 32)


@dataclass
class Phase:
    """One stretch of a stage with a fixed render size and batch, and its memory (bytes)."""

    stage: str
    first_step: int
    last_step: int
    size: int
    batch: int
    representation: int = 0
    guidance_weights: int = 0
    guidance_activations: int = 0
    conditioner: int = 0
    guidance_note: str = ""

    @property
    def total(self) -> int:
        return self.representation + self.guidance_weights + self.guidance_activations


def _schedule_steps(obj) -> List[int]:
    """Breakpoints of every Schedule among ``obj``'s attributes (a camera config's)."""
    from engine.schedules import Schedule

    steps = []
    for value in vars(obj).values() if hasattr(obj, "__dict__") else ():
        if isinstance(value, Schedule):
            steps.extend(int(s) for s, _ in value.points)
    return steps


def stage_phases(cfg, sname: str) -> List[Phase]:
    """The phases of stage ``sname``: (first step, last step, render size, batch)."""
    from engine.config import build

    stage = cfg.stages[sname]
    comps = cfg.components[sname]
    sampler = build("cameras", comps["cameras"], device="cpu")
    steps = {0}
    steps.update(int(s) for s, _ in stage.resolution_schedule.points)
    steps.update(_schedule_steps(comps["cameras"][1]))
    steps = sorted(s for s in steps if 0 <= s < stage.steps)
    phases: List[Phase] = []
    for s in steps:
        size = int(stage.resolution_schedule(s))
        batch = len(sampler.sample(s, torch.Generator().manual_seed(0)).c2w)
        if phases and (phases[-1].size, phases[-1].batch) == (size, batch):
            continue
        if phases:
            phases[-1].last_step = s - 1
        phases.append(Phase(sname, s, stage.steps - 1, size, batch))
    return phases


def phase_overrides(cfg, steps_per_phase: int = 2) -> List[str]:
    """``key=value`` overrides that shorten every stage of a loaded config to
    ``steps_per_phase`` steps per phase, keeping every phase (render size and camera groups
    switch at the same places, in order): a real recipe's every resolution in a few steps.

    Example: isotropic3d's NeRF stage (64 px x 8 renders to step 4999, then 256 px x 4)
    becomes ``stages.nerf.steps=4``, resolution ``[[0, 64], [2, 256]]`` and camera groups
    ``[[0, 2], [2, 1]]`` (step mode)."""
    import json

    out: List[str] = []
    for sname in cfg.stages:
        phases = stage_phases(cfg, sname)
        k = steps_per_phase
        out.append(f"stages.{sname}.steps={k * len(phases)}")
        sizes = [[i * k, p.size] for i, p in enumerate(phases)]
        out.append(f"stages.{sname}.resolution=" + json.dumps({"points": sizes, "mode": "step"}))
        ccfg = cfg.components[sname]["cameras"][1]
        views = getattr(ccfg, "views", None)
        if hasattr(ccfg, "groups") and views:
            groups = [[i * k, p.batch // views] for i, p in enumerate(phases)]
            out.append(f"stages.{sname}.cameras.groups="
                       + json.dumps({"points": groups, "mode": "step"}))
    return out


def representation_bytes(cfg, sname: str, phase: Phase,
                         sizes: Tuple[int, int] = MEASURE_SIZES) -> int:
    """Bytes of the stage's representation training at ``phase``: its parameters plus one
    step's peak (render, loss, backward, Adam step), measured at ``sizes`` on this CPU and
    extrapolated to ``phase.size`` linearly in pixels."""
    from engine.config import build
    from engine.plugin import StepInfo

    comps = cfg.components[sname]
    stage = cfg.stages[sname]
    torch.manual_seed(0)
    rep = build("representation", comps["representation"], device="cpu")
    background = build("background", comps["background"], device="cpu")
    sampler = build("cameras", comps["cameras"], device="cpu")
    params = [p for p in list(rep.parameters()) + list(background.parameters())
              if p.requires_grad]
    fixed = bytes_of(rep) + bytes_of(background)
    info = StepInfo(sname, 0, phase.first_step, stage.steps, phase.first_step)
    cams = sampler.sample(phase.first_step, torch.Generator().manual_seed(0))
    peaks = []
    for size in sizes:
        def step(size=size):
            optimizer = torch.optim.Adam(params, lr=1e-6)      # its state counts too
            rep.before_step(info)
            out = rep.render(cams, size, size, background=background, step=info)
            loss = out["rgb"].float().mean()
            for value in rep.regularizers(out, info).values():
                loss = loss + value
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        rep.train()
        peaks.append(measure(step).peak)
    (s1, s2), (m1, m2) = sizes, peaks
    slope = max(m2 - m1, 0) / (s2 * s2 - s1 * s1)
    return fixed + int(m1 + slope * (phase.size ** 2 - s1 * s1))


def estimate_run(cfg, device_type: str = "cuda") -> List[Phase]:
    """Every phase of every stage of a loaded run config, with its memory on a
    ``device_type`` (cuda | cpu) device. Guidance classes without ``estimate_memory`` count
    as nothing (said in the phase's note)."""
    phases: List[Phase] = []
    for sname in cfg.stages:
        gcls, gcfg = cfg.components[sname]["guidance"]
        hook = getattr(gcls, "estimate_memory", None)
        for phase in stage_phases(cfg, sname):
            phase.representation = representation_bytes(cfg, sname, phase)
            if hook is None:
                phase.guidance_note = f"{gcls.__name__} gives no estimate"
            else:
                use = hook(gcfg, phase.batch, phase.size, device_type)
                phase.guidance_weights = use.get("weights", 0)
                phase.guidance_activations = use.get("activations", 0)
                phase.conditioner = use.get("conditioner", 0)
                phase.guidance_note = use.get("note", "")
            phases.append(phase)
    return phases


def _gib(n: int) -> str:
    return f"{n / GIB:6.2f}"


def format_estimate(phases: List[Phase], device_type: str, recipe: str = "") -> str:
    """The table ``--estimate`` prints, and the run's peak."""
    overhead = CUDA_OVERHEAD if device_type == "cuda" else 0
    lines = [f"estimated peak memory of {recipe or 'the run'} on {device_type} (GiB; "
             f"frozen models in the precision they run in there)",
             f"{'stage':<10} {'steps':<13} {'batch':>5} {'size':>5} {'repr.':>6} "
             f"{'weights':>7} {'activ.':>6} {'total':>6}"]
    peak: Optional[Phase] = None
    for p in phases:
        steps = f"{p.first_step}-{p.last_step}"
        lines.append(f"{p.stage:<10} {steps:<13} {p.batch:>5} {p.size:>5} "
                     f"{_gib(p.representation)} {_gib(p.guidance_weights):>7} "
                     f"{_gib(p.guidance_activations)} {_gib(p.total + overhead)}")
        if peak is None or p.total > peak.total:
            peak = p
    if peak is None:
        return "\n".join(lines)
    notes = sorted({p.guidance_note for p in phases if p.guidance_note})
    loading = max((p.guidance_weights + p.conditioner for p in phases), default=0) + overhead
    lines.append(f"peak: {(peak.total + overhead) / GIB:.1f} GiB in stage {peak.stage} "
                 f"(steps {peak.first_step}-{peak.last_step}, {peak.batch} x {peak.size} px)"
                 + (f", incl. {overhead / GIB:.1f} GiB CUDA context" if overhead else ""))
    if loading > peak.total + overhead:
        lines.append(f"loading holds the image/text encoder too: {loading / GIB:.1f} GiB "
                     "before the first step")
    lines.extend(f"note: {n}" for n in notes)
    lines.append("not included: allocator fragmentation (+5..15%), progress renders and "
                 "export (chunked), other processes")
    return "\n".join(lines)


def estimate_summary(cfg, device_type: str, recipe: str = "") -> Tuple[str, Dict[str, float]]:
    """(table, {stage: peak GiB}) of a loaded run config."""
    phases = estimate_run(cfg, device_type)
    overhead = CUDA_OVERHEAD if device_type == "cuda" else 0
    per_stage: Dict[str, float] = {}
    for p in phases:
        per_stage[p.stage] = max(per_stage.get(p.stage, 0.0), (p.total + overhead) / GIB)
    return format_estimate(phases, device_type, recipe), per_stage


__all__ = ["Phase", "stage_phases", "phase_overrides", "representation_bytes", "estimate_run",
           "format_estimate", "estimate_summary", "MEASURE_SIZES"]
