"""The training data: a step-indexed, seeded stream of multi-view objects.

Batch ``s`` of process ``p`` holds the same objects, drawn the same way (their random group
and reference), whenever it is made: the order comes from seeded per-epoch permutations and
each item is loaded with torch's RNG seeded by its position in the stream
(:func:`engine.seeding.derive_seed`), whatever process or loader worker fetches it. A resumed
run therefore sees exactly the batches an uninterrupted one would.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import torch

from engine.seeding import derive_seed


class StepBatchSampler:
    """Batches of ``(seed, dataset index)`` for steps ``start..steps-1``, ``num_processes``
    consecutive batches per step (accelerate's shard gives batch ``s * n + p`` to process
    ``p``). Objects come in epochs, each a fresh permutation seeded by (seed, epoch)."""

    def __init__(self, size: int, batch_size: int, seed: int, start: int, steps: int,
                 num_processes: int = 1):
        self.size, self.batch_size, self.seed = size, batch_size, seed
        self.start, self.steps, self.num_processes = start, steps, num_processes
        self.drop_last = True
        self._perms: Dict[int, List[int]] = {}

    def _index(self, position: int) -> int:
        epoch, offset = divmod(position, self.size)
        if epoch not in self._perms:
            g = torch.Generator().manual_seed(derive_seed(self.seed, "epoch", epoch))
            self._perms = {epoch: torch.randperm(self.size, generator=g).tolist()}
        return self._perms[epoch][offset]

    def batch(self, step: int, process: int) -> List[Tuple[int, int]]:
        first = (step * self.num_processes + process) * self.batch_size
        return [(derive_seed(self.seed, "item", first + j), self._index(first + j))
                for j in range(self.batch_size)]

    def __len__(self) -> int:
        return max(self.steps - self.start, 0) * self.num_processes

    def __iter__(self):
        for step in range(self.start, self.steps):
            for p in range(self.num_processes):
                yield self.batch(step, p)


class SeededDataset(torch.utils.data.Dataset):
    """Wraps a dataset: item ``(seed, i)`` is ``dataset[i]`` with torch's RNG seeded by
    ``seed`` (the loader draws the random group and reference with it), whatever process or
    worker fetches it."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, item):
        seed, index = item
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return self.dataset[index]


def load_dataset(data, image_size: Optional[int], with_reference: bool,
                 anchor_group: bool = False):
    """The run's :class:`engine.datasets.mvdataset.MultiViewDataset` (``data``: its
    DataConfig; ``image_size`` None: the files' size; ``anchor_group``: a second group of
    views per item, mode anchors)."""
    from engine.datasets.mvdataset import MultiViewDataset

    return MultiViewDataset(data.root, split=data.split, image_size=image_size,
                            num_views=data.num_views, with_reference=with_reference,
                            anchor_group=anchor_group)


def step_loader(dataset, batch_size: int, seed: int, start: int, steps: int,
                num_processes: int, num_workers: int) -> torch.utils.data.DataLoader:
    """The loader of steps ``start..steps-1`` (collated by the dataset format's ``collate``)."""
    from engine.datasets.mvdataset import collate

    sampler = StepBatchSampler(len(dataset), batch_size, seed, start, steps, num_processes)
    return torch.utils.data.DataLoader(SeededDataset(dataset), batch_sampler=sampler,
                                       collate_fn=collate, num_workers=num_workers)


def seeded_item_loader(dataset, batch_size: int, seed: int, start: int, steps: int,
                       num_processes: int, num_workers: int) -> torch.utils.data.DataLoader:
    """The loader of steps ``start..steps-1`` for a dataset of dict items drawn with torch's
    RNG (seeded per item, :class:`SeededDataset`), collated by torch's default."""
    sampler = StepBatchSampler(len(dataset), batch_size, seed, start, steps, num_processes)
    return torch.utils.data.DataLoader(SeededDataset(dataset), batch_sampler=sampler,
                                       num_workers=num_workers)


def toy_world_ids(root, split):
    """The object ids of a toy-world dataset's ``split`` (None: all), one line when it is not
    one or the split is empty."""
    import json
    from pathlib import Path

    from engine.errors import InputError

    index = Path(root) / "dataset.json"
    if not index.is_file():
        raise InputError(f"data.root: {root} is not a toy-world dataset (no dataset.json); "
                         "make one with python -m engine.datasets.toy_world out=DIR")
    record = json.loads(index.read_text())
    ids = record["objects"] if split is None else (record.get("splits") or {}).get(split)
    if not ids:
        raise InputError(f"data.split: {root} has no objects in split {split!r}")
    return list(ids)
