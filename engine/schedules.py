"""Scalar schedules for any weight, rate or size, written in YAML.

Accepted forms (``step`` is the step within the current stage):

* ``0.5``: a constant.
* ``[start_step, start_value, end_value, end_step]``: constant ``start_value`` up to
  ``start_step``, linear to ``end_value`` at ``end_step``, constant after (threestudio's form).
* ``[[step, value], [step, value], ...]``: piecewise linear through the points, constant
  outside them.
* ``{points: [[step, value], ...], mode: step}``: piecewise constant, each value holding from
  its step until the next point (e.g. a resolution of 64 until step 5000 then 256). ``mode``
  is ``linear`` (default) or ``step``.
"""

from __future__ import annotations

import bisect
import math
from dataclasses import dataclass
from typing import Any, List, Tuple

from omegaconf import DictConfig, ListConfig, OmegaConf

from engine.errors import ConfigError

MODES = ("linear", "step")


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


@dataclass(frozen=True)
class Schedule:
    """A piecewise function of the step. Build it with :meth:`parse`."""

    points: Tuple[Tuple[float, float], ...]
    mode: str = "linear"

    @staticmethod
    def parse(value: Any, key: str = "schedule") -> "Schedule":
        """Parse any accepted YAML form; ``key`` names the setting in error messages."""
        if isinstance(value, Schedule):
            return value
        if isinstance(value, (DictConfig, ListConfig)):
            value = OmegaConf.to_container(value, resolve=True)
        if _is_number(value):
            if not math.isfinite(value):
                raise ConfigError(f"{key}: must be a finite number, got {value}")
            return Schedule(((0.0, float(value)),))
        if isinstance(value, dict):
            unknown = set(value) - {"points", "mode"}
            if unknown or "points" not in value:
                raise ConfigError(
                    f"{key}: a schedule mapping has keys 'points' and optional 'mode', got "
                    f"{sorted(value)}"
                )
            mode = value.get("mode", "linear")
            if mode not in MODES:
                raise ConfigError(f"{key}.mode: '{mode}' is not one of {', '.join(MODES)}")
            return Schedule(_parse_points(value["points"], key), mode)
        if isinstance(value, (list, tuple)):
            if len(value) == 4 and all(_is_number(v) for v in value):
                if not all(math.isfinite(v) for v in value):
                    raise ConfigError(f"{key}: must be finite numbers, got {list(value)}")
                s0, v0, v1, s1 = value
                if s1 < s0:
                    raise ConfigError(
                        f"{key}: [start_step, start_value, end_value, end_step] needs "
                        f"end_step >= start_step, got {list(value)}"
                    )
                return Schedule(((float(s0), float(v0)), (float(s1), float(v1))))
            return Schedule(_parse_points(value, key))
        raise ConfigError(
            f"{key}: expected a number, [start_step, start, end, end_step], or a list of "
            f"[step, value] points, got {value!r}"
        )

    def __call__(self, step: float) -> float:
        steps = [p[0] for p in self.points]
        i = bisect.bisect_right(steps, step)
        if i == 0:
            return self.points[0][1]
        if i == len(self.points) or self.mode == "step":
            return self.points[i - 1][1]
        (s0, v0), (s1, v1) = self.points[i - 1], self.points[i]
        if s1 == s0:
            return v1
        # the fraction first, as threestudio's C(): the released t-range to the last step
        return v0 + (v1 - v0) * ((step - s0) / (s1 - s0))

    def values(self) -> List[float]:
        return [v for _, v in self.points]

    def check(self, key: str, *, minimum: float | None = None, integer: bool = False,
              exclusive: bool = False) -> "Schedule":
        """Raise a ConfigError naming ``key`` when a point's value is out of range."""
        for v in self.values():
            if not math.isfinite(v):
                raise ConfigError(f"{key}: every value must be a finite number, got {v}")
            if minimum is not None and (v <= minimum if exclusive else v < minimum):
                op = ">" if exclusive else ">="
                raise ConfigError(f"{key}: every value must be {op} {minimum}, got {v:g}")
            if integer and v != int(v):
                raise ConfigError(f"{key}: values must be whole numbers, got {v:g}")
        return self


def _parse_points(points: Any, key: str) -> Tuple[Tuple[float, float], ...]:
    if not isinstance(points, (list, tuple)) or not points:
        raise ConfigError(f"{key}: expected a non-empty list of [step, value] points")
    out: List[Tuple[float, float]] = []
    for p in points:
        if not (isinstance(p, (list, tuple)) and len(p) == 2 and all(_is_number(v) for v in p)):
            raise ConfigError(f"{key}: each point must be [step, value], got {p!r}")
        if not all(math.isfinite(v) for v in p):
            raise ConfigError(f"{key}: steps and values must be finite numbers, got {list(p)}")
        out.append((float(p[0]), float(p[1])))
    steps = [p[0] for p in out]
    if any(b < a for a, b in zip(steps, steps[1:])):
        raise ConfigError(f"{key}: point steps must not decrease, got {steps}")
    return tuple(out)


def is_schedule_like(value: Any) -> bool:
    """True for anything :meth:`Schedule.parse` may accept (used by config validation)."""
    return _is_number(value) or isinstance(value, (list, tuple, dict, ListConfig, DictConfig))


def parse_all(mapping: Any, key: str) -> dict:
    """Parse a mapping of name -> schedule (e.g. loss weights)."""
    if isinstance(mapping, DictConfig):
        mapping = OmegaConf.to_container(mapping, resolve=True)
    return {name: Schedule.parse(v, f"{key}.{name}") for name, v in (mapping or {}).items()}

