"""``python -m engine.run recipe=NAME --estimate``: peak memory of a run, per stage and phase,
before anything is downloaded or trained.

A *phase* is a stretch of a stage with one render size and one batch (the resolution and
camera-group schedules' breakpoints): isotropic3d's NeRF stage has two (8 renders at 64 px,
then 4 at 256 px), its DMTet stage two (4 at 256, then 4 at 512). For each phase:

* **guidance**: the frozen models' weights in the precision they would run in on the target
  device, and one guidance step's activations, from the guidance class's
  ``estimate_memory(cfg, batch, size, device_type)`` (multiview-sds builds the real-size
  models on fake tensors and runs a step on them: :mod:`guidance.multiview.memory`);
* **representation**: measured for real on this CPU at two small render sizes, in the state
  a run is in by then (the first step's hook done: the NeRF's occupancy grid filled), and
  extrapolated linearly in the rays ``R``. It is the parameters and the optimiser's state,
  plus the largest of three transient peaks measured apart (peaks are maxima, not sums):
  ``before_step``, the optimiser's update, and the render + backward, ``m(R) = k + c R``.
  A representation whose training renders run in checkpointed chunks of ``cfg.train_chunk``
  rays (the NeRF) keeps per-ray outputs for all rays and one chunk's graph at a time:
  ``m(R) = k + a R + b C``; the small sizes are measured in one piece (``a + b``) and in
  small chunks (``a``) to tell the two apart.

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
    extrapolated to ``phase.size`` linearly in rays (chunk-aware, see the module doc)."""
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
    views = len(cams)

    # before_step (an occupancy refresh, a densification) is measured apart: its transient
    # peak does not grow with the rays, and inside the step's peak it would hide the
    # small renders' growth (a peak is a maximum, not a sum)
    rep.train()
    # the state a run has reached by the phase: what the first step's hook set up (e.g. the
    # occupancy grid filled, so empty space is skipped as it is in training), then the
    # phase's own hook
    rep.before_step(StepInfo(sname, 0, 0, stage.steps, 0))
    before = measure(lambda: rep.before_step(info)).peak
    optimizer = torch.optim.Adam(params, lr=1e-6)

    def forward_backward(size: int) -> None:
        optimizer.zero_grad(set_to_none=True)
        out = rep.render(cams, size, size, background=background, step=info)
        loss = out["rgb"].float().mean()
        for value in rep.regularizers(out, info).values():
            loss = loss + value
        loss.backward()

    # Peaks are maxima, not sums: the render + backward (which grows with the rays), the
    # optimiser's update (its transient beside the gradients) and before_step (an occupancy
    # refresh) are measured apart, each on top of what a running step keeps alive (the
    # optimiser's state), so the small renders' growth is not hidden by a constant peak.
    forward_backward(sizes[0])
    optimizer.step()                            # the state a running step lives beside
    state = sum(t.numel() * t.element_size() for st in optimizer.state.values()
                for t in st.values() if torch.is_tensor(t))
    grads = sum(p.grad.numel() * p.grad.element_size() for p in params if p.grad is not None)
    update = grads + measure(optimizer.step).peak

    def peak(size: int) -> int:
        return measure(lambda: forward_backward(size)).peak

    (s1, s2) = sizes
    r1, r2, r = (views * s * s for s in (s1, s2, phase.size))
    rep_cfg = getattr(rep, "cfg", None)
    chunk = int(getattr(rep_cfg, "train_chunk", 0) or 0)
    saved = chunk
    try:
        if chunk > 0:
            rep_cfg.train_chunk = 0
        m1, m2 = peak(s1), peak(s2)            # one piece: k + (a + b) R
        if 0 < chunk < r:
            # chunks of c0 rays at both sizes: k' + a R + b c0 (k' holds what chunking costs
            # once, e.g. a second table gradient being summed into the first)
            c0 = max(r1 // 4, 1)
            rep_cfg.train_chunk = c0
            m3, m4 = peak(s1), peak(s2)
    finally:
        if chunk > 0:
            rep_cfg.train_chunk = saved
    optimizer.zero_grad(set_to_none=True)
    if 0 < chunk < r:
        a = max(m4 - m3, 0) / (r2 - r1)
        b = max(max(m2 - m1, 0) / (r2 - r1) - a, 0.0)
        render = int(m3 + a * (r - r1) + b * (chunk - c0))
    else:
        # one piece at the target size: m(R) = k + c R through the two measurements
        render = int(m1 + max(m2 - m1, 0) / (r2 - r1) * (r - r1))
    return fixed + state + max(before, update, render)


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
