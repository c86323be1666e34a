"""Bounds for every setting that sizes an allocation, checked when the config is loaded.

Without them an absurd value (``inputs.image_size=10000000``, a render of 10^6 px a side, a
voxel grid of 10^5 cells a side) is accepted and dies minutes later of MemoryError or an
allocator error after asking for gigabytes to petabytes. Two checks, both one line naming
the key, the value and the limit:

* :func:`check_limits` (part of ``engine.config.resolve``, so it also covers ``--dry-run``
  and every resume): a fixed upper bound per key, far above any sensible run, so it never
  refuses a real recipe on a big machine;
* :func:`check_memory` (``engine.run`` before training; not ``--estimate``, which plans runs
  for other machines): a lower bound of the memory the largest buffers need (the
  representation's grid with its gradient and Adam state; the points of one render),
  against the memory of the device the run uses: "needs ~N GiB, this machine has M".
  Being a lower bound it refuses only what cannot fit; ``python -m engine.run --estimate``
  measures the real peak.

Keys are patterns over the resolved config (``*`` is one stage name); a key a component
does not have is skipped, so plugins without these settings are unaffected.
"""

from __future__ import annotations

import os
from typing import Any, Dict, Iterator, List, Optional, Tuple

from engine.errors import ConfigError

GIB = 2.0**30

#: (key pattern, largest value allowed, what it sizes)
LIMITS: List[Tuple[str, int, str]] = [
    ("inputs.image_size", 4096, "the reference picture's side in px"),
    ("output.render_size", 2048, "progress renders' side in px"),
    ("output.render_views", 64, "views per progress render"),
    ("system.threads", 1024, "CPU threads"),
    ("export.mesh_resolution", 1024, "the surface extraction grid's side"),
    ("export.texture_size", 8192, "the texture's side in texels"),
    ("export.turntable.size", 4096, "turntable frames' side in px"),
    ("export.turntable.frames", 3600, "turntable frames"),
    ("stages.*.resolution", 2048, "the training renders' side in px"),
    ("stages.*.cameras.views", 64, "views per camera group"),
    ("stages.*.cameras.groups", 64, "camera groups per step"),
    ("stages.*.representation.resolution", 1024, "the representation's grid side"),
    ("stages.*.representation.samples_per_ray", 4096, "samples along each ray"),
    ("stages.*.representation.occupancy.resolution", 1024, "the occupancy grid's side"),
    ("stages.*.representation.hash_grid.log2_table_size", 26, "log2 of hash table entries"),
    ("stages.*.representation.hash_grid.n_levels", 64, "hash grid levels"),
    ("stages.*.representation.hash_grid.n_features", 64, "features per hash level"),
    ("stages.*.representation.color.log2_table_size", 26, "log2 of hash table entries"),
    ("stages.*.representation.color.n_levels", 64, "hash grid levels"),
    ("stages.*.representation.count", 10_000_000, "Gaussians at the start"),
    ("stages.*.representation.densify.max_gaussians", 50_000_000, "the Gaussians' cap"),
    ("stages.*.representation.mlp_hidden", 8192, "MLP width"),
    ("stages.*.representation.color_hidden", 8192, "MLP width"),
    ("stages.*.guidance.candidates", 256, "view groups drawn"),
    ("stages.*.guidance.sample_steps", 1000, "sampler steps"),
    ("stages.*.guidance.views_per_step", 256, "views per step"),
]


def _get(data: Any, parts: List[str]) -> Any:
    for p in parts:
        if not isinstance(data, dict) or p not in data:
            return None
        data = data[p]
    return data


def _expand(data: dict, pattern: str) -> Iterator[Tuple[str, Any]]:
    """(key, value) for each stage a ``stages.*.`` pattern names (value None: absent)."""
    parts = pattern.split(".")
    if parts[:2] == ["stages", "*"]:
        for sname in (data.get("stages") or {}):
            yield f"stages.{sname}.{'.'.join(parts[2:])}", _get(data, ["stages", sname] + parts[2:])
    else:
        yield pattern, _get(data, parts)


def _numbers(value: Any) -> List[float]:
    """The values a setting takes: a number, or every value of a schedule."""
    from engine.schedules import Schedule

    if isinstance(value, bool) or value is None:
        return []
    if isinstance(value, (int, float)):
        return [value]
    try:
        return Schedule.parse(value).values()
    except ConfigError:
        return []       # not a schedule: the component's own validation speaks


def check_limits(resolved: Dict[str, Any]) -> None:
    """Refuse a value above its :data:`LIMITS` bound (``resolved``: the plain mapping)."""
    for pattern, limit, what in LIMITS:
        for key, value in _expand(resolved, pattern):
            for v in _numbers(value):
                if v > limit:
                    shown = int(v) if v == int(v) else v
                    raise ConfigError(f"{key}={shown} is above the limit {limit} ({what}); "
                                      "lower it")


# -- memory --------------------------------------------------------------------------------

def machine_memory(device) -> Tuple[float, str]:
    """(bytes, words) of the memory a run on ``device`` (a torch.device) can use at most."""
    if getattr(device, "type", "cpu") == "cuda":
        import torch

        props = torch.cuda.get_device_properties(device.index or 0)
        return float(props.total_memory), f"this GPU has {props.total_memory / GIB:.0f} GiB"
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return float("inf"), "unknown"
    return float(total), f"this machine has {total / GIB:.0f} GiB"


def _grid_bytes(rep: dict) -> Optional[Tuple[float, str]]:
    """A lower bound of a dense grid representation's trainable state with its gradient and
    Adam's two moments (4 copies of 4-byte floats), or None when it has no dense grid."""
    kind, res = rep.get("type"), rep.get("resolution")
    if not isinstance(res, int):
        return None
    if kind == "voxel-grid":             # density + RGB per cell
        return 4 * 4 * 4.0 * res**3, "its grid"
    if kind == "dmtet":                  # SDF + deformation per vertex, 6 tets of 4 indices
        return 4 * 4 * 4.0 * (res + 1)**3 + 6 * 4 * 8.0 * res**3, "its tet grid"
    return None


# a dense render keeps at least each sample's position, density and colour for backward
BYTES_PER_SAMPLE = 7 * 4


def _render_bytes(stage: dict) -> Optional[float]:
    """A lower bound of one training render's memory, for representations that evaluate
    every sample of every ray at once (the voxel grid; the NeRF culls and chunks)."""
    rep = stage.get("representation") or {}
    spr = rep.get("samples_per_ray")
    if rep.get("type") != "voxel-grid" or not isinstance(spr, int):
        return None
    cams = stage.get("cameras") or {}
    views = cams.get("views", 1) if isinstance(cams.get("views", 1), int) else 1
    groups = max(_numbers(cams.get("groups", 1)) or [1])
    side = max(_numbers(stage.get("resolution")) or [0])
    return BYTES_PER_SAMPLE * spr * groups * views * side**2


def check_memory(resolved: Dict[str, Any], device) -> None:
    """Refuse a stage whose grid or renders cannot fit the device's memory, naming the key
    that sizes it and both amounts."""
    have, words = machine_memory(device)
    for sname, stage in (resolved.get("stages") or {}).items():
        rep = stage.get("representation") or {}
        grid = _grid_bytes(rep)
        if grid is not None and grid[0] > have:
            raise ConfigError(f"stages.{sname}.representation.resolution={rep['resolution']}: "
                              f"{grid[1]} needs ~{grid[0] / GIB:.0f} GiB, {words}; lower it")
        need = _render_bytes(stage)
        if need is not None and need > have:
            raise ConfigError(f"stages.{sname}.representation.samples_per_ray="
                              f"{rep['samples_per_ray']} with stages.{sname}.resolution up to "
                              f"{max(_numbers(stage.get('resolution')) or [0]):g}: one render "
                              f"needs ~{need / GIB:.0f} GiB, {words}; lower either")
