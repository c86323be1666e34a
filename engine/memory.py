"""Peak tensor memory of a piece of work, measured by accounting rather than by an allocator.

:func:`measure` runs a function under a dispatch mode (:class:`LiveStorages`) that sees every
tensor storage created while it runs and when each one is freed, so it measures the same on
a CPU as on a GPU, and with :func:`fake_tensors` it measures work that
no memory of this machine could hold: a real-size UNet is built and run on *fake* tensors
(shapes, dtypes and storages' sizes, no data), in seconds::

    with fake_tensors():
        unet = build_unet(MultiViewUNetConfig.sd21_base())
        x = torch.randn(8, 4, 32, 32)
        with torch.no_grad():
            use = measure(lambda: unet(x, ...))
    use.peak            # bytes: the forward's live activations at their peak
    bytes_of(unet)      # bytes: its weights

What it does not see: the CUDA context and kernels' workspaces (cuDNN, cuBLAS), the caching
allocator's rounding and fragmentation (typically +5..15%), and work done outside PyTorch's
dispatcher. :data:`CUDA_OVERHEAD` is the allowance :mod:`engine.estimate` adds for the first.
"""

from __future__ import annotations

import contextlib
import weakref
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterator

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.weak import WeakIdKeyDictionary

#: bytes a CUDA process holds before its first tensor (context, kernels, cuBLAS workspace);
#: about 0.5 GiB on recent GPUs and drivers
CUDA_OVERHEAD = 512 * 2**20

GIB = 2.0**30


@dataclass
class MemoryUse:
    """Bytes at the peak of a measured piece of work, and what they were (PyTorch's kinds:
    Parameter, Buffer, Gradient, Activation, Temp, Optstate, Other)."""

    peak: int = 0
    by_kind: Dict[str, int] = field(default_factory=dict)

    def __add__(self, other: "MemoryUse") -> "MemoryUse":
        kinds = dict(self.by_kind)
        for k, v in other.by_kind.items():
            kinds[k] = kinds.get(k, 0) + v
        return MemoryUse(self.peak + other.peak, kinds)

    def gib(self) -> float:
        return self.peak / GIB


@contextlib.contextmanager
def fake_tensors() -> Iterator[None]:
    """Inside: every tensor created is a fake tensor (no data, no memory), so models of any
    size can be built and run for their shapes and :func:`measure`-d. Data-dependent
    operations (``nonzero``, boolean masks, ``.item()``) fail inside."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode(allow_non_fake_inputs=False):
        yield


class LiveStorages(TorchDispatchMode):
    """A dispatch mode that keeps the sum of the sizes of the tensor storages created while
    it is active and still alive (a storage counted once however many views share it; freed
    when its last tensor goes), and the peak of that sum, in bytes."""

    def __init__(self):
        super().__init__()
        self.seen = WeakIdKeyDictionary()
        self.current = 0
        self.peak = 0

    def _freed(self, nbytes: int) -> None:
        self.current -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if not isinstance(t, torch.Tensor):
                continue
            storage = t.untyped_storage()
            if storage in self.seen:
                continue
            nbytes = storage.nbytes()
            self.seen[storage] = weakref.finalize(storage, self._freed, nbytes)
            self.current += nbytes
            self.peak = max(self.peak, self.current)
        return out


def measure(fn: Callable[[], object]) -> MemoryUse:
    """Run ``fn()`` and return the peak bytes of the tensors it created that were alive at
    once (activations, temporaries, gradients, optimiser state made inside ``fn``); tensors
    made before (a model's weights) are not counted: add them with :func:`bytes_of`.

    Args:
        fn: the work (a forward, a backward, an optimiser step...); its return value is
            dropped at the end, inside the measurement.
    Returns:
        :class:`MemoryUse` (bytes). Works on real and on fake tensors (:func:`fake_tensors`),
        on the thread that runs ``fn`` (a CPU backward runs there; a CUDA backward does not).
    """
    mode = LiveStorages()
    with mode:
        out = fn()
        del out
    return MemoryUse(mode.peak, {"Activation": mode.peak})


def bytes_of(module: torch.nn.Module, dtype: torch.dtype = None) -> int:
    """Bytes of a module's parameters and buffers, in ``dtype`` when given (what the module
    would hold after ``.to(dtype)``; integer buffers keep their size)."""
    total = 0
    for t in list(module.parameters()) + list(module.buffers()):
        size = t.element_size()
        if dtype is not None and t.is_floating_point():
            size = torch.empty((), dtype=dtype).element_size()
        total += t.numel() * size
    return total


__all__ = ["MemoryUse", "LiveStorages", "measure", "fake_tensors", "bytes_of", "CUDA_OVERHEAD", "GIB"]
