"""The one seeding scheme of every trainer: seeds are hashes of what they are for.

A seed is the first 63 bits of the SHA-256 of its key, the parts joined by ``/``
(:func:`derive_seed`), so nearby steps get unrelated streams and a stream can be re-created
from its key alone. The engine's stage loop seeds step ``s`` of stage ``i`` with
``step_seed(seed, i, s)`` (its initial weights with step -1); fine-tuning (one stage, index 0)
does the same, and a multi-process fine-tuning run adds the process index to the key.
"""

from __future__ import annotations

import hashlib

import torch


def derive_seed(*key) -> int:
    """A 63-bit seed from a key of integers or words, e.g. ``derive_seed(seed, "epoch", 3)``."""
    digest = hashlib.sha256("/".join(str(part) for part in key).encode()).digest()
    return int.from_bytes(digest[:8], "little") & 0x7FFF_FFFF_FFFF_FFFF


def step_seed(seed: int, stage_index: int, step: int, process: int = 0) -> int:
    """The seed of step ``step`` of stage ``stage_index`` (step -1: the stage's initial
    weights). ``process`` > 0 (a multi-process run) gives each process its own stream;
    process 0 has the single-process key."""
    return derive_seed(seed, stage_index, step, *((process,) if process else ()))


def step_generator(seed: int, stage_index: int, step: int, process: int = 0
                   ) -> torch.Generator:
    """Seed torch's global RNG for a step and return a CPU generator seeded the same way:
    every draw of the step then depends on (seed, stage, step, process) only, so a resumed
    run draws what an uninterrupted one would."""
    value = step_seed(seed, stage_index, step, process)
    torch.manual_seed(value)
    return torch.Generator().manual_seed(value)
