"""Who solves what: a pure function of module shapes, the cost model and the world size.

GPTQ treats every output row independently once the Hessian's factor is known, so
the unit of work is a slice of rows of a module. A group of modules that share one
Hessian (q/k/v; gate/up) is planned as one block of ``sum(rows)`` rows.

Every rank that solves rows needs the whole factor, and there are two ways to get it
(the plan picks the faster for each group, from the cost model):

* **local**: each rank that gets rows factorises the Hessian itself, redundantly.
  Nothing travels, and ranks without rows do nothing. Best for narrow Hessians,
  where a factorisation costs less than the messages a shared one needs.
* **shared**: every rank takes part in one blocked factorisation
  (:mod:`gptqflow.gptq.cholesky`): panels are factorised round-robin and
  broadcast as they finish, so each rank does ``1/world_size`` of the flops and
  receives the rest. Best for wide Hessians (``down_proj``), whose factorisation
  would otherwise sit, whole, on every rank's critical path.

Both give the same bit-identical factor, so the choice never changes the result.
Sending a finished factor from one owner instead was rejected: it is ``cols²``
floats, as many bytes as the shared factorisation moves, but with all the flops on
one rank.

Two planners:

* :func:`split_rows` cuts the concatenated rows into ``world_size`` contiguous slices
  of (nearly) equal *row count*, ignoring the factorisation and per-slice costs.
* :func:`plan_group` uses a :class:`~gptqflow.gptq.cost.CostModel`: each rank that takes
  part pays one factorisation plus one sweep per slice (a per-column overhead each,
  so a slice that straddles two modules costs more than the rows alone); the cuts
  minimise the largest predicted rank time, and the smallest number of ranks whose
  time is within ``tolerance`` of the best is used, so tiny groups stay on few ranks.
  :func:`plan_solve` runs it for a local and for a shared factorisation and keeps
  the faster.

For comparison, :func:`balance_by_columns` is the llm-compressor style balancer
(whole modules of a layer, packed by column count, one Hessian per module), and
:func:`layer_prediction` predicts per-rank time, imbalance, bytes and speedup of
either planner for one decoder layer.

All functions are deterministic pure functions of their arguments (plain float
arithmetic in a fixed order), so every rank computes the same plan without talking;
:func:`plan_digest` gives a hash to compare across ranks.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

from gptqflow.gptq.cost import CostModel, hessian_bytes, qparam_bytes

__all__ = [
    "GroupShape",
    "LayerPrediction",
    "Planner",
    "RowSlice",
    "SolvePlan",
    "balance_by_columns",
    "layer_prediction",
    "plan_digest",
    "plan_group",
    "plan_solve",
    "rank_seconds",
    "split_rows",
]

Planner = Literal["cost", "columns", "even"]


@dataclass(frozen=True)
class RowSlice:
    """Rows ``[start, stop)`` of module ``module`` (index within its group), solved by ``rank``."""

    rank: int
    module: int
    start: int
    stop: int

    @property
    def rows(self) -> int:
        return self.stop - self.start


def split_rows(rows: list[int], world_size: int, min_rows: int = 1) -> list[RowSlice]:
    """Cut the concatenated rows of a group into ``world_size`` near-equal contiguous slices.

    Rank ``r`` gets global rows ``[r*total//W, (r+1)*total//W)`` of the concatenation,
    broken at module boundaries. With fewer than ``min_rows * world_size`` rows the
    group goes to fewer ranks, so tiny slices do not pay a factorisation each.
    Deterministic, and every row is assigned exactly once.
    """
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    total = sum(rows)
    ranks = max(1, min(world_size, total // max(min_rows, 1)))
    bounds = [r * total // ranks for r in range(ranks + 1)]
    offsets = [0]
    for n in rows:
        offsets.append(offsets[-1] + n)
    out: list[RowSlice] = []
    for r in range(ranks):
        lo, hi = bounds[r], bounds[r + 1]
        for m, n in enumerate(rows):
            a, b = max(lo, offsets[m]), min(hi, offsets[m] + n)
            if a < b:
                out.append(RowSlice(r, m, a - offsets[m], b - offsets[m]))
    return out


# ---------------------------------------------------------------------- cost-based planner
def rank_seconds(
    slices: Sequence[RowSlice],
    cols: int,
    cost: CostModel,
    world_size: int,
    *,
    shared_factor: bool = False,
) -> list[float]:
    """Predicted solve seconds of every rank for one group's plan.

    What the solve stage does: the factorisation (local: once on every rank that has
    rows, ranks without rows idle at 0; shared: every rank takes part), then one
    :func:`solve_rows` call per slice.
    """
    out = [0.0] * world_size
    if shared_factor:
        out = [cost.shared_factor_seconds(cols, world_size)] * world_size
    else:
        for r in sorted({s.rank for s in slices}):
            out[r] = cost.factor_seconds(cols)
    for s in slices:
        out[s.rank] += cost.sweep_seconds(s.rows, cols)
    return out


@dataclass(frozen=True)
class SolvePlan:
    """One group's plan: who solves which rows, and whether the factorisation is shared.

    ``seconds``: the slowest rank's predicted solve time.
    """

    slices: tuple[RowSlice, ...]
    shared_factor: bool
    seconds: float


def plan_solve(
    rows: Sequence[int],
    cols: int,
    world_size: int,
    cost: CostModel,
    *,
    tolerance: float = 0.0,
    align: int = 1,
) -> SolvePlan:
    """The faster of a local and a shared factorisation, each with its best row cuts.

    A shared factorisation involves every rank, so only the cuts change with it:
    every rank pays the same shared factor time, and the rows are balanced on top.
    Ties go to local (no messages).
    """
    local = plan_group(rows, cols, world_size, cost, tolerance=tolerance, align=align)
    best = SolvePlan(tuple(local), False, max(rank_seconds(local, cols, cost, world_size)))
    if world_size > 1 and local:
        shared_s = cost.shared_factor_seconds(cols, world_size)
        if shared_s < cost.factor_seconds(cols):
            cuts = plan_group(
                rows, cols, world_size, cost, tolerance=tolerance, align=align, factor_s=shared_s
            )
            t = max(rank_seconds(cuts, cols, cost, world_size, shared_factor=True))
            if t < best.seconds:
                best = SolvePlan(tuple(cuts), True, t)
    return best


def _fill(
    rows: Sequence[int],
    cols: int,
    cost: CostModel,
    budget: float,
    max_ranks: int,
    align: int,
    factor: float,
) -> list[RowSlice] | None:
    """Give ranks 0, 1, ... as many rows (in order) as fit in ``budget`` seconds each.

    Returns ``None`` when more than ``max_ranks`` ranks would be needed. For
    contiguous cuts this greedy fill uses the fewest ranks any plan can use within
    the budget, because a rank's cost never decreases when its range is extended.
    Cuts inside a module fall on multiples of ``align`` rows (module ends are always cuts).
    ``factor``: the seconds every rank with rows pays before its sweeps.
    """
    out: list[RowSlice] = []
    rank, m, pos = 0, 0, 0
    while m < len(rows):
        if pos >= rows[m]:
            m, pos = m + 1, 0
            continue
        if rank == max_ranks:
            return None
        left = budget - factor
        took = False
        while m < len(rows):
            if pos >= rows[m]:
                m, pos = m + 1, 0
                continue
            remaining = rows[m] - pos
            fit = cost.rows_within(left, cols)
            take = remaining if fit >= remaining else (pos + fit) // align * align - pos
            if take <= 0:
                break
            out.append(RowSlice(rank, m, pos, pos + take))
            left -= cost.sweep_seconds(take, cols)
            pos += take
            took = True
            if pos < rows[m]:
                break  # this rank is full
        if not took:
            return None  # not even one aligned chunk fits: the budget is too small
        rank += 1
    return out


def _min_budget(
    rows: Sequence[int], cols: int, cost: CostModel, max_ranks: int, align: int, factor: float
) -> float:
    """The smallest per-rank time with which ``max_ranks`` ranks cover every row (bisection)."""
    lo = factor
    hi = lo + sum(cost.sweep_seconds(n, cols) for n in rows)  # one rank does it all
    hi *= 1 + 1e-9  # so that hi is feasible despite rounding in the fill
    for _ in range(200):
        if hi - lo <= 1e-9 * hi:
            break
        mid = (lo + hi) / 2
        if _fill(rows, cols, cost, mid, max_ranks, align, factor) is None:
            lo = mid
        else:
            hi = mid
    return hi


def plan_group(
    rows: Sequence[int],
    cols: int,
    world_size: int,
    cost: CostModel,
    *,
    tolerance: float = 0.0,
    align: int = 1,
    factor_s: float | None = None,
) -> list[RowSlice]:
    """Contiguous row slices for one group that minimise the slowest rank's predicted time.

    ``rows``: output rows of each module of the group (all read ``cols`` inputs).
    First the best achievable time ``T`` with all ``world_size`` ranks is found; then
    the fewest ranks that stay within ``(1 + tolerance)·T`` are used (a rank that
    would shave off less than ``tolerance`` of the time only adds a factorisation,
    a broadcast and a Hessian it must hold), and their cuts are balanced again.
    Ranks ``0..k-1`` take part, in row order. Every row is assigned exactly once.
    ``factor_s``: what each rank with rows pays for the factorisation (default: a
    local one, :meth:`CostModel.factor_seconds`).
    """
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    if cols < 1 or any(n < 0 for n in rows):
        raise ValueError(f"invalid group shape: rows {list(rows)}, cols {cols}")
    if tolerance < 0 or align < 1:
        raise ValueError(f"tolerance must be >= 0 and align >= 1, got {tolerance}, {align}")
    rows = list(rows)
    if sum(rows) == 0:
        return []
    factor = cost.factor_seconds(cols) if factor_s is None else factor_s
    best = _min_budget(rows, cols, cost, world_size, align, factor)
    relaxed = _fill(rows, cols, cost, best * (1 + tolerance), world_size, align, factor)
    assert relaxed is not None
    ranks = max(s.rank for s in relaxed) + 1
    budget = _min_budget(rows, cols, cost, ranks, align, factor)
    plan = _fill(rows, cols, cost, budget, ranks, align, factor)
    assert plan is not None
    _check_cover(plan, rows)
    return plan


def _check_cover(plan: Sequence[RowSlice], rows: Sequence[int]) -> None:
    """Every row of every module exactly once, slices in order: an invariant of the fill."""
    for m, n in enumerate(rows):
        mine = sorted((s.start, s.stop) for s in plan if s.module == m)
        pos = 0
        for a, b in mine:
            assert a == pos and b > a, f"module {m}: gap or overlap at row {pos}"
            pos = b
        assert pos == n, f"module {m}: rows {pos}..{n} unassigned"


def plan_digest(plan: Sequence[RowSlice]) -> str:
    """A short hash of a plan, for checking that every rank computed the same one."""
    text = ";".join(f"{s.rank},{s.module},{s.start},{s.stop}" for s in plan)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


# ---------------------------------------------------------------------- column-count baseline
def balance_by_columns(cols: Sequence[int], world_size: int) -> list[int]:
    """llm-compressor's balancer: the owner rank of each whole module, by column count only.

    Modules are taken largest first (stable, so ties keep their order) and each goes
    to the rank with the fewest columns so far (the lowest rank on ties). Rows, the
    cols² growth of the sweep and the cols³ factorisation are ignored, which is why
    one wide module (``down_proj``) ends up dominating a rank.
    """
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    order = sorted(range(len(cols)), key=lambda i: -cols[i])
    load = [0] * world_size
    owner = [0] * len(cols)
    for i in order:
        r = load.index(min(load))
        owner[i] = r
        load[r] += cols[i]
    return owner


# ---------------------------------------------------------------------- predictions
@dataclass(frozen=True)
class GroupShape:
    """The Linear modules of one layer that read the same input (and share a Hessian)."""

    names: tuple[str, ...]
    rows: tuple[int, ...]
    cols: int


@dataclass(frozen=True)
class GroupPrediction:
    """One group under the cost planner: ranks used, critical-path and factor seconds."""

    names: tuple[str, ...]
    rows: int
    cols: int
    ranks: int
    seconds: float  # slowest rank
    factor_seconds: float  # of the factorisation the plan uses (shared: each rank's share)
    single_rank_seconds: float
    shared_factor: bool = False


@dataclass(frozen=True)
class LayerPrediction:
    """Predicted solve of one decoder layer by one planner at one world size.

    ``rank_seconds``: each rank's busy solve time over the layer (what the runner's
    ``imbalance`` is computed from). ``seconds``: the layer's solve on the critical
    path (groups run one after another, so the sum over groups of the slowest rank for
    ``cost``/``even``; the slowest rank for ``columns``, which solves a whole layer at
    once). ``comm_seconds``: the Hessian reductions and qparam broadcasts, which the
    pipeline does not overlap with the solve.
    """

    planner: Planner
    world_size: int
    rank_seconds: tuple[float, ...]
    seconds: float
    single_rank_seconds: float
    hessian_bytes: int
    qparam_bytes: int
    comm_seconds: float
    groups: tuple[GroupPrediction, ...] = field(default=())

    @property
    def mean_seconds(self) -> float:
        return sum(self.rank_seconds) / len(self.rank_seconds)

    @property
    def imbalance(self) -> float:
        """Max rank time over mean rank time (1.0 = perfect)."""
        mean = self.mean_seconds
        return max(self.rank_seconds) / mean if mean > 0 else 1.0

    @property
    def speedup(self) -> float:
        """Solve speedup over the same planner at one rank."""
        return self.single_rank_seconds / self.seconds if self.seconds > 0 else 1.0

    @property
    def speedup_with_comm(self) -> float:
        """Speedup once the (non-overlapped) collectives are added to the solve."""
        total = self.seconds + self.comm_seconds
        return self.single_rank_seconds / total if total > 0 else 1.0


def layer_prediction(
    groups: Sequence[GroupShape],
    world_size: int,
    cost: CostModel,
    planner: Planner = "cost",
    *,
    group_size: int = 128,
    scale_bytes: int = 2,
    tolerance: float = 0.0,
) -> LayerPrediction:
    """Predict one layer's solve at ``world_size`` ranks with ``planner``.

    ``cost``: :func:`plan_solve` per group; ``even``: :func:`split_rows` per group
    (the previous planner); ``columns``: :func:`balance_by_columns` over all the
    layer's modules, each solved whole with its own Hessian and factorisation.
    """
    if planner == "columns":
        return _columns_prediction(groups, world_size, cost, group_size, scale_bytes)
    busy = [0.0] * world_size
    seconds = 0.0
    single = 0.0
    h_bytes = 0
    q_bytes = 0
    comm = 0.0
    out: list[GroupPrediction] = []
    for g in groups:
        shared = False
        if planner == "cost":
            solve = plan_solve(g.rows, g.cols, world_size, cost, tolerance=tolerance)
            plan, shared = list(solve.slices), solve.shared_factor
        else:
            plan = split_rows(list(g.rows), world_size)
        times = rank_seconds(plan, g.cols, cost, world_size, shared_factor=shared)
        one = rank_seconds(split_rows(list(g.rows), 1), g.cols, cost, 1)[0]
        busy = [a + b for a, b in zip(busy, times)]
        seconds += max(times)
        single += one
        hb = hessian_bytes(g.cols)
        qb = sum(qparam_bytes(s.rows, g.cols, group_size, scale_bytes) for s in plan)
        h_bytes += hb
        q_bytes += qb
        comm += cost.allreduce_seconds(hb, world_size)
        # (a shared factorisation's panel broadcasts are inside its factor time)
        comm += sum(
            cost.broadcast_seconds(
                qparam_bytes(s.rows, g.cols, group_size, scale_bytes), world_size
            )
            for s in plan
        )
        ranks = len({s.rank for s in plan})
        factor = (
            cost.shared_factor_seconds(g.cols, world_size)
            if shared
            else cost.factor_seconds(g.cols)
        )
        out.append(
            GroupPrediction(
                g.names, sum(g.rows), g.cols, ranks, max(times), factor, one, shared_factor=shared
            )
        )
    return LayerPrediction(
        planner, world_size, tuple(busy), seconds, single, h_bytes, q_bytes, comm, tuple(out)
    )


def _columns_prediction(
    groups: Sequence[GroupShape],
    world_size: int,
    cost: CostModel,
    group_size: int,
    scale_bytes: int,
) -> LayerPrediction:
    """The column-count baseline: whole modules, one Hessian and one factorisation each."""
    shapes = [(rows, g.cols) for g in groups for rows in g.rows]
    owner = balance_by_columns([c for _, c in shapes], world_size)
    busy = [0.0] * world_size
    single = 0.0
    h_bytes = q_bytes = 0
    comm = 0.0
    for (rows, cols), r in zip(shapes, owner):
        t = cost.factor_seconds(cols) + cost.sweep_seconds(rows, cols)
        busy[r] += t
        single += t
        hb = hessian_bytes(cols)
        qb = qparam_bytes(rows, cols, group_size, scale_bytes)
        h_bytes += hb
        q_bytes += qb
        comm += cost.reduce_seconds(hb, world_size) + cost.broadcast_seconds(qb, world_size)
    return LayerPrediction(
        "columns", world_size, tuple(busy), max(busy), single, h_bytes, q_bytes, comm
    )
