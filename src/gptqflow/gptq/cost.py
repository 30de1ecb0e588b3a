"""How long the parts of a distributed GPTQ solve take: an explicit, fitted cost model.

The planner (:mod:`gptqflow.gptq.plan`) needs to compare ways of cutting a group's
rows over ranks, so it needs predicted seconds, not just flop counts: a GPTQ solve
has a flop-bound part (the factorisation and the lazy-batch matmuls), a
bandwidth-bound part (rank-1 updates inside a block, rounding, qparams) and a
Python / kernel-launch part (a few small ops per swept column, paid once per sweep:
the solve stacks a rank's slices of a group into one). Each part is a term with its
own fitted constant:

* factorisation of a ``cols × cols`` Hessian (:func:`~gptqflow.gptq.solver.prepare_factor`):
  ``factor_overhead_s + (check_s_per_col2 + factor_s_per_col2)·cols² + factor_s_per_col3·cols³``
  (``check``: the finiteness check every rank makes of the whole Hessian; the other
  ``cols²`` term: gathering the panels in sweep order, in the factor's dtype);
* column sweep of ``rows`` rows (:func:`~gptqflow.gptq.solver.solve_rows`), with
  ``r = max(rows, min_sweep_rows)`` because the solver pads small slices:
  ``sweep_overhead_s + sweep_s_per_col·cols + sweep_s_per_row_col·r·cols
  + sweep_s_per_row_col2·r·cols²``;
* a factorisation shared by ``k`` ranks: the gather and the ``cols³`` terms over ``k``
  (each rank builds and factorises only its own panels), plus one broadcast per
  panel and ``shared_s_per_panel`` (fitted on two ranks);
* a collective moving ``n`` bytes: ``latency_s`` per message step plus ``n / bytes_per_s``
  (ring all-reduce moves ``2(k-1)/k·n`` per rank), plus ``reduce_s_per_byte`` for the
  ``(k-1)/k·n`` bytes each rank sums in a reduction.

The constants depend on the machine, so they live in a JSON file written by
``bench/fit_cost.py``; ``cost_cpu.json`` next to this module is the fit on the
development machine (one CPU thread per rank). :func:`fit_nonnegative` is the
least-squares fit that script uses; it is a pure function so a test can check
that it recovers known constants.

Nothing here reads user files or talks to other ranks; :meth:`CostModel.default`
reads the bundled package resource only.
"""

from __future__ import annotations

import itertools
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from importlib import resources
from typing import Any

import torch

from gptqflow.gptq.cholesky import FACTOR_BLOCK
from gptqflow.gptq.hessian import packed_numel

__all__ = [
    "CostModel",
    "fit_nonnegative",
    "hessian_bytes",
    "qparam_bytes",
]

# The solver pads a slice with zero rows up to this many (solver._MIN_SWEEP_ROWS), so a
# slice of 3 rows costs as much as one of 16.
DEFAULT_MIN_SWEEP_ROWS = 16
_DEFAULT_RESOURCE = "cost_cpu.json"


@dataclass(frozen=True)
class CostModel:
    """Predicted seconds for the factorisation, the sweep and the collectives of a solve.

    All constants are non-negative seconds (per unit named in the field); ``bytes_per_s``
    is the bandwidth of one rank's link. ``fitted_on`` says where the numbers come from,
    because a plan made with another machine's constants is still valid (every row is
    assigned) but no longer balanced.
    """

    factor_overhead_s: float
    factor_s_per_col2: float
    factor_s_per_col3: float
    sweep_overhead_s: float
    sweep_s_per_col: float
    sweep_s_per_row_col: float
    sweep_s_per_row_col2: float
    latency_s: float
    bytes_per_s: float
    reduce_s_per_byte: float = 0.0
    shared_s_per_panel: float = 0.0
    check_s_per_col2: float = 0.0
    min_sweep_rows: int = DEFAULT_MIN_SWEEP_ROWS
    fitted_on: str = ""

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, float) and not (math.isfinite(value) and value >= 0):
                raise ValueError(f"cost model field {f.name} must be finite and >= 0, got {value}")
        if self.bytes_per_s <= 0:
            raise ValueError(f"cost model bytes_per_s must be > 0, got {self.bytes_per_s}")
        if self.min_sweep_rows < 1:
            raise ValueError(f"cost model min_sweep_rows must be >= 1, got {self.min_sweep_rows}")

    # ------------------------------------------------------------------ compute
    def factor_seconds(self, cols: int) -> float:
        """One :func:`prepare_factor` of a ``cols × cols`` Hessian (paid once per rank per group)."""
        c = float(cols)
        return (
            self.factor_overhead_s
            + (self.check_s_per_col2 + self.factor_s_per_col2) * c * c
            + self.factor_s_per_col3 * c**3
        )

    def shared_factor_seconds(self, cols: int, ranks: int) -> float:
        """A factorisation shared by ``ranks`` ranks (:mod:`gptqflow.gptq.cholesky`), per rank.

        The ``cols³`` flops are split evenly (panels are owned round-robin), and so is
        the ``factor_s_per_col2`` pass (a rank gathers only the panels it owns; the
        sweep reads the panels as they arrive, so no rank assembles the whole factor);
        the finiteness check of the whole Hessian (``check_s_per_col2``) is paid by
        every rank; and every panel is broadcast once:
        ``ceil(cols / FACTOR_BLOCK)`` messages, float32 lower panels in all. The
        broadcasts overlap the updates in the pipeline, but are counted in full so
        the planner only shares where it clearly pays. ``shared_s_per_panel`` is what
        a measured shared factorisation costs beyond that, per panel (waits for the
        panel's owner, Python per step). At one rank this is :meth:`factor_seconds`.
        """
        if ranks <= 1:
            return self.factor_seconds(cols)
        c = float(cols)
        panels = math.ceil(cols / FACTOR_BLOCK)
        panel_bytes = 4 * cols * (cols + FACTOR_BLOCK) // 2
        return (
            self.factor_overhead_s
            + self.check_s_per_col2 * c * c
            + (self.factor_s_per_col2 * c * c + self.factor_s_per_col3 * c**3) / ranks
            + panels * (math.ceil(math.log2(ranks)) * self.latency_s + self.shared_s_per_panel)
            + panel_bytes / self.bytes_per_s
        )

    def sweep_seconds(self, rows: int, cols: int) -> float:
        """One :func:`solve_rows` call on ``rows`` rows (0 rows: no call, no cost)."""
        if rows <= 0:
            return 0.0
        return self.sweep_fixed_seconds(cols) + self.sweep_row_seconds(cols) * max(
            rows, self.min_sweep_rows
        )

    def sweep_fixed_seconds(self, cols: int) -> float:
        """The part of a sweep that does not depend on the row count (once per rank and group)."""
        return self.sweep_overhead_s + self.sweep_s_per_col * cols

    def sweep_row_seconds(self, cols: int) -> float:
        """The cost of one more row in a sweep (above ``min_sweep_rows``)."""
        c = float(cols)
        return self.sweep_s_per_row_col * c + self.sweep_s_per_row_col2 * c * c

    def rows_within(self, seconds: float, cols: int) -> int:
        """The most rows one sweep can take in ``seconds`` (0 if not even a padded slice fits).

        The inverse of :meth:`sweep_seconds`, in closed form, so the planner can fill a
        rank up to a time budget without searching over row counts.
        """
        budget = seconds - self.sweep_fixed_seconds(cols)
        per_row = self.sweep_row_seconds(cols)
        if per_row <= 0:
            return 1 << 62 if budget >= 0 else 0
        # A hair of slack so that rows_within(sweep_seconds(n)) == n despite rounding.
        rows = math.floor(budget / per_row * (1 + 1e-12))
        return rows if rows >= self.min_sweep_rows else 0

    # ------------------------------------------------------------------ communication
    def allreduce_seconds(self, nbytes: int, ranks: int) -> float:
        """Ring all-reduce of ``nbytes`` over ``ranks`` ranks (0 at one rank)."""
        if ranks <= 1 or nbytes <= 0:
            return 0.0
        share = (ranks - 1) / ranks
        return (
            2 * (ranks - 1) * self.latency_s
            + 2 * share * nbytes / self.bytes_per_s
            + share * nbytes * self.reduce_s_per_byte
        )

    def reduce_seconds(self, nbytes: int, ranks: int) -> float:
        """Reduce of ``nbytes`` to one owner rank (reduce-scatter + gather)."""
        if ranks <= 1 or nbytes <= 0:
            return 0.0
        share = (ranks - 1) / ranks
        return (
            (ranks - 1) * self.latency_s
            + share * nbytes / self.bytes_per_s
            + share * nbytes * self.reduce_s_per_byte
        )

    def broadcast_seconds(self, nbytes: int, ranks: int) -> float:
        """Pipelined broadcast of ``nbytes`` from one rank to ``ranks - 1`` others."""
        if ranks <= 1 or nbytes <= 0:
            return 0.0
        return math.ceil(math.log2(ranks)) * self.latency_s + nbytes / self.bytes_per_s

    # ------------------------------------------------------------------ (de)serialisation
    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> CostModel:
        """Build from a mapping (e.g. a parsed JSON), refusing unknown or missing keys."""
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - names - {"fit"})
        if unknown:
            raise ValueError(f"unknown cost model keys {unknown}; allowed: {sorted(names)}")
        return cls(**{k: v for k, v in data.items() if k in names})

    @classmethod
    def from_json(cls, text: str) -> CostModel:
        return cls.from_dict(json.loads(text))

    @classmethod
    def default(cls) -> CostModel:
        """The constants fitted on the development machine (bundled ``cost_cpu.json``)."""
        text = resources.files("gptqflow.gptq").joinpath(_DEFAULT_RESOURCE).read_text()
        return cls.from_json(text)


# ---------------------------------------------------------------------- bytes on the wire
def hessian_bytes(cols: int) -> int:
    """What hessian-reduce all-reduces: the accumulated strips of the float64 sum and the
    token count (:meth:`~gptqflow.gptq.hessian.HessianSum.packed`), about half of ``cols²``."""
    return packed_numel(cols) * 8


def qparam_bytes(
    rows: int,
    cols: int,
    group_size: int = 128,
    scale_bytes: int = 2,
    slices: int = 1,
    *,
    bits: int = 4,
    act_order: bool = False,
) -> int:
    """What the broadcast stage sends for ``rows`` rows cut into ``slices`` slices.

    Per row: the codes (two per byte up to 4 bits, else one), one scale (in the weight
    dtype, bf16: 2 bytes) and one int8 zero point per quantization group. Per slice:
    two float64 stats (loss, dampening) and, for act-order groups, the int32 g_idx.
    """
    n_groups = 1 if group_size == -1 else cols // group_size
    codes = (cols + 1) // 2 if bits <= 4 else cols
    per_row = codes + n_groups * (scale_bytes + 1)
    return rows * per_row + slices * (16 + (4 * cols if act_order else 0))


# ---------------------------------------------------------------------- fitting
def fit_nonnegative(features: Sequence[Sequence[float]], seconds: Sequence[float]) -> list[float]:
    """Non-negative least squares in *relative* error: ``min Σ((X·θ - t)/t)²`` with ``θ ≥ 0``.

    Relative error, because measured times span four orders of magnitude and the
    planner cares as much about a small slice as a large one. Non-negative, because a
    negative constant would predict negative time for some shape outside the grid.
    With a handful of features the exact optimum is found by trying every subset of
    active features (an unconstrained fit on each) and keeping the best one whose
    coefficients are all non-negative; deterministic, no iterative solver.
    """
    x = torch.tensor([list(map(float, row)) for row in features], dtype=torch.float64)
    t = torch.tensor([float(s) for s in seconds], dtype=torch.float64)
    if x.ndim != 2 or x.shape[0] != t.shape[0] or x.shape[0] == 0:
        raise ValueError(f"features {tuple(x.shape)} and seconds {tuple(t.shape)} do not match")
    if bool((t <= 0).any()):
        raise ValueError("every measured time must be positive")
    n = x.shape[1]
    xw = x / t[:, None]
    # Columns scaled to unit norm so that cols³ (~1e11) and 1 live on one scale.
    norm = xw.norm(dim=0).clamp_min(1e-300)
    a = xw / norm
    ones = torch.ones_like(t)
    best: tuple[float, list[float]] | None = None
    for k in range(1, n + 1):
        for subset in itertools.combinations(range(n), k):
            cols = list(subset)
            sol = torch.linalg.lstsq(a[:, cols], ones[:, None]).solution[:, 0]
            if bool((sol < 0).any()):
                continue
            theta = torch.zeros(n, dtype=torch.float64)
            theta[cols] = sol
            resid = float(((a @ theta) - ones).square().sum())
            if best is None or resid < best[0] - 1e-15:
                best = (resid, (theta / norm).tolist())
    assert best is not None  # a single column with positive entries always fits with θ > 0
    return best[1]


def relative_errors(
    features: Sequence[Sequence[float]], seconds: Sequence[float], theta: Sequence[float]
) -> list[float]:
    """``|predicted - measured| / measured`` for each sample (to report fit quality)."""
    out = []
    for row, t in zip(features, seconds):
        pred = sum(f * c for f, c in zip(row, theta))
        out.append(abs(pred - t) / t)
    return out


def factor_features(cols: int) -> list[float]:
    """The regressors of :meth:`CostModel.factor_seconds`, in field order."""
    c = float(cols)
    return [1.0, c * c, c**3]


def sweep_features(
    rows: int, cols: int, min_sweep_rows: int = DEFAULT_MIN_SWEEP_ROWS
) -> list[float]:
    """The regressors of :meth:`CostModel.sweep_seconds`, in field order."""
    c, r = float(cols), float(max(rows, min_sweep_rows))
    return [1.0, c, r * c, r * c * c]


def comm_features(kind: str, nbytes: int) -> list[float]:
    """The regressors (latency_s, 1/bytes_per_s, reduce_s_per_byte) of a 2-rank collective.

    At two ranks an all-reduce is two latency steps, ``n`` bytes on the wire and ``n/2``
    bytes summed per rank; a broadcast is one step and ``n`` bytes.
    """
    n = float(nbytes)
    if kind == "allreduce":
        return [2.0, n, n / 2]
    if kind == "broadcast":
        return [1.0, n, 0.0]
    raise ValueError(f"unknown collective {kind!r}")
