"""Multi-resolution hash-grid encoding (Instant-NGP), pure torch with a tinycudann backend.

Layout and arithmetic follow tinycudann's ``HashGrid`` exactly, so one parameter tensor serves
both backends:

* level ``l`` has scale ``s_l = base * per_level_scale**l - 1`` and ``ceil(s_l) + 1`` grid
  points per side; a point ``x`` in [0, 1]^3 sits at ``x * s_l + 0.5`` in grid units;
* a level whose dense grid (rounded up to a multiple of 8 entries) fits in ``2**log2`` entries
  is indexed densely (``i + j r + k r^2``) in a table of exactly that size; finer levels hash
  ``(i * 1) ^ (j * 2654435761) ^ (k * 805459861)`` (uint32 arithmetic) into ``2**log2``
  entries;
* the tables of all levels are stacked in one ``[total_entries, n_features]`` tensor (the
  same memory order as tinycudann's flat parameter vector); outputs are level-major
  ``[l0f0, l0f1, l1f0, ...]``.

Three torch paths, held equal by tests:

* ``recompute`` (the default): :mod:`representations.lib.hashgrid_autograd`, an autograd
  Function that keeps only the points for backward and recomputes corners level by level
  there (memory proportional to the points; what a 256 px NeRF step needs);
* the vectorised path (``recompute: false``): all levels and the 8 cell corners in one batch
  of tensor ops, every per-corner tensor kept by autograd;
* the vectorised path under ``torch.compile`` (``compile: true``, which takes precedence over
  ``recompute``): the CPU hot path of the small toy grids.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import List, Optional, Tuple

import torch
from torch import Tensor, nn

from engine.errors import ConfigError
from representations.lib.hashgrid_autograd import Level, hash_grid_encode_lean

PRIMES = (1, 2654435761, 805459861)
BACKENDS = ("auto", "torch", "tcnn")

# corner k of a cell: bit d of k says whether the corner is at floor + 1 along axis d
_CORNER_BITS = [[(k >> d) & 1 for d in range(3)] for k in range(8)]


@dataclass
class HashGridConfig:
    n_levels: int = 16
    n_features: int = 2
    log2_table_size: int = 19
    base_resolution: int = 16
    per_level_scale: float = 1.4473
    backend: str = "auto"        # auto | torch | tcnn
    # torch path: save only the points and recompute the corners in backward (memory
    # proportional to the samples, not samples x levels x corners); false: plain autograd
    # through the vectorised ops (every per-corner tensor kept until backward). Not used
    # when ``compile`` is true (the compiled vectorised path, the toy recipes' hot path)
    recompute: bool = True
    # run the torch path under torch.compile (CPU: ~5x faster after a one-off compile of
    # tens of seconds; sample counts are marked dynamic so steps do not recompile)
    compile: bool = False
    # OpenMP threads of the compiled CPU kernels (-1: torch.get_num_threads()). One is the
    # default because the backward's scatter-add contends across threads: measured 8x slower
    # with 2 threads than with 1 on the shared 2-core machine (see benchmarks/bench_nerf.py)
    compile_threads: int = 1

    def __post_init__(self):
        if self.n_levels < 1:
            raise ConfigError(f"n_levels: must be >= 1, got {self.n_levels}")
        if self.n_features < 1:
            raise ConfigError(f"n_features: must be >= 1, got {self.n_features}")
        if not 4 <= self.log2_table_size <= 30:
            raise ConfigError(f"log2_table_size: must be in [4, 30], got {self.log2_table_size}")
        if self.base_resolution < 2:
            raise ConfigError(f"base_resolution: must be >= 2, got {self.base_resolution}")
        if self.per_level_scale < 1.0:
            raise ConfigError(f"per_level_scale: must be >= 1, got {self.per_level_scale}")
        if self.compile_threads == 0 or self.compile_threads < -1:
            raise ConfigError(f"compile_threads: must be >= 1 or -1, got {self.compile_threads}")
        if self.backend not in BACKENDS:
            raise ConfigError(f"backend: '{self.backend}' is not one of {', '.join(BACKENDS)}")


@dataclass(frozen=True)
class GridLayout:
    """Per-level constants of a hash grid (plain Python numbers)."""

    scales: Tuple[float, ...]       # s_l
    resolutions: Tuple[int, ...]    # grid points per side
    sizes: Tuple[int, ...]          # table entries of the level
    offsets: Tuple[int, ...]        # first entry of the level in the stacked table
    dense: Tuple[bool, ...]         # dense indexing (else hashed)
    n_features: int

    @property
    def n_levels(self) -> int:
        return len(self.scales)

    @property
    def n_entries(self) -> int:
        return self.offsets[-1] + self.sizes[-1]


def grid_layout(cfg: HashGridConfig) -> GridLayout:
    """The level scales, resolutions and table sizes of ``cfg`` (tinycudann's rules)."""
    scales, res, sizes, offsets, dense = [], [], [], [], []
    log2_pls = math.log2(cfg.per_level_scale)
    offset = 0
    for level in range(cfg.n_levels):
        # float32 as tinycudann computes it, so both backends agree on ceil()
        scale = float(torch.tensor(2.0 ** (level * log2_pls), dtype=torch.float32)
                      * cfg.base_resolution - 1.0)
        r = int(math.ceil(scale)) + 1
        n_dense = -(-r ** 3 // 8) * 8
        size = min(n_dense, 1 << cfg.log2_table_size)
        scales.append(scale)
        res.append(r)
        sizes.append(size)
        offsets.append(offset)
        dense.append(r ** 3 <= size)
        offset += size
    return GridLayout(tuple(scales), tuple(res), tuple(sizes), tuple(offsets), tuple(dense),
                      cfg.n_features)


def layout_levels(layout: GridLayout) -> Tuple[Level, ...]:
    """Per-level constants for :func:`hashgrid_autograd.hash_grid_encode_lean`."""
    return tuple(Level(s, (1, r, r * r) if d else PRIMES, size, off, d)
                 for s, r, size, off, d in zip(layout.scales, layout.resolutions, layout.sizes,
                                               layout.offsets, layout.dense))


def layout_tensors(layout: GridLayout, device=None) -> Tuple[Tensor, Tensor, Tensor, Tensor,
                                                               Tensor]:
    """Per-level constants as tensors: scales [L] float32, multipliers [L, 3] int64 (dense
    strides or hash primes), sizes [L] int64, offsets [L] int64, dense [L] bool."""
    scales = torch.tensor(layout.scales, dtype=torch.float32, device=device)
    mult = torch.tensor([[1, r, r * r] if d else list(PRIMES)
                         for r, d in zip(layout.resolutions, layout.dense)],
                        dtype=torch.int64, device=device)
    sizes = torch.tensor(layout.sizes, dtype=torch.int64, device=device)
    offsets = torch.tensor(layout.offsets, dtype=torch.int64, device=device)
    dense = torch.tensor(layout.dense, dtype=torch.bool, device=device)
    return scales, mult, sizes, offsets, dense


def hash_grid_encode(x: Tensor, table: Tensor, scales: Tensor, mult: Tensor, sizes: Tensor,
                     offsets: Tensor, dense: Tensor) -> Tensor:
    """Vectorised hash-grid lookup with trilinear interpolation.

    Args:
        x: [N, 3] points in [0, 1] (normalised; values outside are clamped).
        table: [T, F] stacked level tables. The rest: :func:`layout_tensors`.
    Returns:
        [N, L * F], level-major. Differentiable with respect to ``table`` and ``x`` (piecewise
        linear in ``x``; zero gradient where ``x`` was clamped).
    """
    feats, weights, _ = _corners(x, table, scales, mult, sizes, offsets, dense, need_grad=False)
    out = (weights.unsqueeze(-1) * feats).sum(dim=2)                    # [N, L, F]
    # explicit sizes, never -1: an empty batch (N = 0) makes -1 ambiguous
    return out.reshape(x.shape[0], scales.shape[0] * table.shape[1])


def hash_grid_encode_with_jacobian(x: Tensor, table: Tensor, scales: Tensor, mult: Tensor,
                                   sizes: Tensor, offsets: Tensor,
                                   dense: Tensor) -> Tuple[Tensor, Tensor]:
    """The encoding and its spatial Jacobian in closed form (no double backward needed).

    Args: as :func:`hash_grid_encode`.
    Returns:
        enc [N, L * F] and jac [N, L * F, 3] = d enc / d x (x in normalised [0, 1] units).
        Both differentiable with respect to ``table`` (``jac`` is what analytic normals
        need; its gradient reaches the table through a first-order graph, so this also works
        under torch.compile).
    """
    feats, weights, dweights = _corners(x, table, scales, mult, sizes, offsets, dense,
                                        need_grad=True)
    n, d = x.shape[0], scales.shape[0] * table.shape[1]
    enc = (weights.unsqueeze(-1) * feats).sum(dim=2).reshape(n, d)
    # dweights [N, L, 8, 3] (per grid unit) -> per normalised unit via the level scale
    # an elementwise product + sum rather than einsum: einsum becomes a batched matmul of
    # tiny 8x3 matrices, which is several times slower on CPU (eager and compiled)
    jac = (dweights[:, :, :, None, :] * feats[..., None]).sum(dim=2) \
        * scales[None, :, None, None].to(x.dtype)
    return enc, jac.reshape(n, d, 3)


def clamp_unit(x: Tensor) -> Tensor:
    """``x`` clamped to [0, 1] with zero gradient outside the open interval (0, 1), on its
    bounds too. ``Tensor.clamp``'s backward at the bounds differs between torch releases
    (seen on 2.11 against 2.14), and the recompute path's backward must match it exactly."""
    inside = (x > 0.0) & (x < 1.0)
    return torch.where(inside, x, x.detach().clamp(0.0, 1.0))


def _corners(x: Tensor, table: Tensor, scales: Tensor, mult: Tensor, sizes: Tensor,
             offsets: Tensor, dense: Tensor, need_grad: bool):
    """Gathered corner features [N, L, 8, F], trilinear weights [N, L, 8] and, with
    ``need_grad``, d weights / d grid position [N, L, 8, 3].

    Per-axis terms are built on [N, L, 3, 2] (lower/upper neighbour) and combined into the 8
    corners by broadcasting, corner k = b0 + 2 b1 + 4 b2, which is 8x less integer work than
    indexing every corner on every axis.
    """
    n, n_levels = x.shape[0], scales.shape[0]
    x = clamp_unit(x)
    pos = x[:, None, :] * scales[None, :, None].to(x.dtype) + 0.5          # [N, L, 3]
    lo = torch.floor(pos)
    frac = pos - lo                     # d frac / d pos = 1; floor carries no gradient
    step = torch.arange(2, device=x.device, dtype=torch.int64)
    coord = lo.detach().to(torch.int64)[..., None] + step                  # [N, L, 3, 2]
    term = coord * mult[None, :, :, None]
    a0 = term[:, :, 0, None, None, :]                                       # varies with b0
    a1 = term[:, :, 1, None, :, None]
    a2 = term[:, :, 2, :, None, None]
    summed = (a0 + a1 + a2).reshape(n, n_levels, 8)
    hashed = (a0 ^ a1 ^ a2).reshape(n, n_levels, 8)
    # hashed sizes are powers of two, so remainder == the low bits of the uint32 hash
    idx = torch.remainder(torch.where(dense[None, :, None], summed, hashed),
                          sizes[None, :, None]) + offsets[None, :, None]
    feats = table.index_select(0, idx.reshape(-1)).reshape(n, n_levels, 8, table.shape[1])
    t = torch.stack([1.0 - frac, frac], dim=-1)                             # [N, L, 3, 2]
    t0 = t[:, :, 0, None, None, :]
    t1 = t[:, :, 1, None, :, None]
    t2 = t[:, :, 2, :, None, None]
    weights = (t0 * t1 * t2).reshape(n, n_levels, 8)
    dweights = None
    if need_grad:
        sign = torch.tensor([-1.0, 1.0], dtype=x.dtype, device=x.device)
        s0, s1, s2 = sign[None, None, :], sign[None, :, None], sign[:, None, None]
        dweights = torch.stack([(s0 * t1 * t2).reshape(n, n_levels, 8),
                                (t0 * s1 * t2).reshape(n, n_levels, 8),
                                (t0 * t1 * s2).reshape(n, n_levels, 8)], dim=-1)
    return feats, weights, dweights


def hash_grid_reference(x: Tensor, table: Tensor, layout: GridLayout) -> Tensor:
    """Naive hash-grid encoding: a Python loop over levels and corners (tests, benchmark).

    Args:
        x: [N, 3] in [0, 1]; table: [T, F]; layout: :func:`grid_layout`.
    Returns:
        [N, L * F]. Differentiable with respect to ``table`` and ``x``.
    """
    x = clamp_unit(x)
    outs: List[Tensor] = []
    for level in range(layout.n_levels):
        r, size, off = layout.resolutions[level], layout.sizes[level], layout.offsets[level]
        pos = x * layout.scales[level] + 0.5
        lo = torch.floor(pos)
        frac = pos - lo
        lo = lo.detach().long()
        acc = torch.zeros(x.shape[0], layout.n_features, dtype=table.dtype, device=x.device)
        for bits in _CORNER_BITS:
            c = [lo[:, d] + bits[d] for d in range(3)]
            if layout.dense[level]:
                idx = (c[0] + c[1] * r + c[2] * r * r) % size
            else:
                h = (c[0] * PRIMES[0]) ^ (c[1] * PRIMES[1]) ^ (c[2] * PRIMES[2])
                idx = (h & 0xFFFFFFFF) % size
            w = torch.ones_like(frac[:, 0])
            for d in range(3):
                w = w * (frac[:, d] if bits[d] else 1.0 - frac[:, d])
            acc = acc + w[:, None] * table[idx + off]
        outs.append(acc)
    return torch.cat(outs, dim=1)


def resolve_backend(backend: str, device: torch.device) -> str:
    """``auto`` -> ``tcnn`` when tinycudann imports and ``device`` is CUDA, else ``torch``."""
    if backend not in BACKENDS:
        raise ValueError(f"hash-grid backend '{backend}' is not one of {BACKENDS}")
    if backend == "auto":
        return "tcnn" if torch.device(device).type == "cuda" and _tcnn_available() else "torch"
    return backend


_TCNN: Optional[bool] = None


def _tcnn_available() -> bool:
    global _TCNN
    if _TCNN is None:
        try:
            import tinycudann  # noqa: F401
            _TCNN = True
        except Exception:
            _TCNN = False
    return _TCNN


_COMPILED = {}


def _compiled(fn, threads: int = 1):
    """``fn`` under torch.compile with dynamic sample counts (built once per process and
    thread setting)."""
    key = (fn, threads)
    if key not in _COMPILED:
        options = {"cpp.threads": threads} if threads > 0 else None
        _COMPILED[key] = torch.compile(fn, dynamic=True, options=options)
    return _COMPILED[key]


class HashGridEncoding(nn.Module):
    """``forward(points [N, 3] in [-bound, bound]) -> [N, n_levels * n_features]``.

    The table is initialised uniform(-1e-4, 1e-4) as in Instant-NGP. Differentiable with
    respect to the table and the points.
    """

    def __init__(self, cfg: HashGridConfig = None, bound: float = 1.0):
        super().__init__()
        self.cfg = cfg = cfg or HashGridConfig()
        self.bound = float(bound)
        self.layout = grid_layout(cfg)
        self.levels = layout_levels(self.layout)
        self.output_dim = cfg.n_levels * cfg.n_features
        self.table = nn.Parameter(
            torch.empty(self.layout.n_entries, cfg.n_features).uniform_(-1e-4, 1e-4))
        for name, t in zip(("scales", "mult", "sizes", "offsets", "dense"),
                           layout_tensors(self.layout)):
            self.register_buffer(f"_{name}", t, persistent=False)
        self._tcnn = None

    def __getstate__(self):
        # the tinycudann module is a cache of native state: rebuilt on demand after a copy
        state = super().__getstate__() if hasattr(super(), "__getstate__") else self.__dict__
        return {**state, "_tcnn": None}

    @property
    def uses_tcnn(self) -> bool:
        return resolve_backend(self.cfg.backend, self.table.device) == "tcnn"

    def normalize(self, points: Tensor) -> Tensor:
        """World points -> [0, 1]^3 grid coordinates (d/dpoints = 1 / (2 bound))."""
        return (points + self.bound) / (2.0 * self.bound)

    def _consts(self):
        return self._scales, self._mult, self._sizes, self._offsets, self._dense

    def _use_compiled(self, n: int) -> bool:
        # size 0/1 would specialise the dynamic graph; such tiny batches run eagerly
        return self.cfg.compile and n >= 2

    def forward(self, points: Tensor) -> Tensor:
        x = self.normalize(points)
        if resolve_backend(self.cfg.backend, points.device) == "tcnn":
            return self._tcnn_forward(x)
        if self._use_compiled(x.shape[0]):
            return _compiled(hash_grid_encode, self.cfg.compile_threads)(
                x, self.table, *self._consts())
        if self.cfg.recompute:
            return hash_grid_encode_lean(x, self.table, self.levels)
        return hash_grid_encode(x, self.table, *self._consts())

    def forward_with_jacobian(self, points: Tensor) -> Tuple[Tensor, Tensor]:
        """enc [N, D] and d enc / d points [N, D, 3] (world units), torch path only.
        Differentiable with respect to the table (first-order graph) and the points."""
        x = self.normalize(points)
        if self._use_compiled(x.shape[0]):
            enc, jac = _compiled(hash_grid_encode_with_jacobian, self.cfg.compile_threads)(
                x, self.table, *self._consts())
        elif self.cfg.recompute:
            enc, jac = hash_grid_encode_lean(x, self.table, self.levels, with_jacobian=True)
        else:
            enc, jac = hash_grid_encode_with_jacobian(x, self.table, *self._consts())
        return enc, jac / (2.0 * self.bound)

    def reference(self, points: Tensor) -> Tensor:
        """The naive per-level loop on this module's table (tests, benchmark)."""
        return hash_grid_reference(self.normalize(points), self.table, self.layout)

    # -- tinycudann -----------------------------------------------------------------------
    def _tcnn_forward(self, x: Tensor) -> Tensor:
        """tinycudann's kernels on this module's own table (same memory layout)."""
        import tinycudann as tcnn
        from tinycudann.modules import _C, _module_function

        if self._tcnn is None:
            c = self.cfg
            enc = tcnn.Encoding(3, {
                "otype": "HashGrid", "n_levels": c.n_levels, "n_features_per_level": c.n_features,
                "log2_hashmap_size": c.log2_table_size, "base_resolution": c.base_resolution,
                "per_level_scale": c.per_level_scale, "interpolation": "Linear"},
                dtype=torch.float32)
            if enc.params.numel() != self.table.numel():
                raise RuntimeError(f"tinycudann hash grid has {enc.params.numel()} parameters, "
                                   f"the torch layout {self.table.numel()}")
            # held outside the module tree: only self.table is a parameter
            object.__setattr__(self, "_tcnn", enc)
        enc = self._tcnn
        n = x.shape[0]
        gran = int(_C.batch_size_granularity())
        padded = -(-n // gran) * gran
        xp = nn.functional.pad(x.float(), [0, 0, 0, padded - n]) if padded != n else x.float()
        out = _module_function.apply(enc.native_tcnn_module, xp.contiguous(),
                                     self.table.reshape(-1).contiguous(), enc.loss_scale)
        return out[:n, :self.output_dim].to(x.dtype)
