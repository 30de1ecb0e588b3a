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
  part pays one factorisation plus one sweep of all its rows (the solve stacks a
  rank's slices of a group, from one module or several, into a single sweep, so the
  per-column overhead is paid once per rank, not per slice); the cuts
  minimise the largest predicted rank time, and the smallest number of ranks whose
  time is within ``tolerance`` of the best is used, so tiny groups stay on few ranks.
  :func:`plan_solve` runs it for a local and for a shared factorisation and keeps
  the faster.

A *wave* is many independent groups ready at once (one MoE block's experts, each with
its own Hessian). :func:`plan_wave` places whole groups on ranks, longest predicted
solve first onto the least loaded rank, so each expert's Hessian is factorised once
and the ranks work side by side; it cuts each group's rows over the ranks instead
(one group after another, as above) when that is predicted faster, e.g. a wave of
fewer groups than ranks.

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
    "buckets",
    "layer_prediction",
    "owner_buckets",
    "pack_groups",
    "plan_digest",
    "plan_group",
    "plan_solve",
    "plan_wave",
    "rank_seconds",
    "single_owners",
    "split_rows",
    "split_waves",
    "wave_steps",
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
    :func:`solve_rows` call on the rank's slices stacked together.
    """
    out = [0.0] * world_size
    if shared_factor:
        out = [cost.shared_factor_seconds(cols, world_size)] * world_size
    else:
        for r in sorted({s.rank for s in slices}):
            out[r] = cost.factor_seconds(cols)
    rows = [0] * world_size
    for s in slices:
        rows[s.rank] += s.rows
    return [t + cost.sweep_seconds(n, cols) for t, n in zip(out, rows)]


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

    Returns ``None`` when more than ``max_ranks`` ranks would be needed. A rank's rows,
    from one module or several, are one stacked sweep, so its capacity is the row
    count :meth:`CostModel.rows_within` gives for the budget less the factorisation.
    For contiguous cuts this greedy fill uses the fewest ranks any plan can use within
    the budget, because a rank's cost never decreases when its range is extended.
    Cuts inside a module fall on multiples of ``align`` rows (module ends are always cuts).
    ``factor``: the seconds every rank with rows pays before its sweep.
    """
    capacity = cost.rows_within(budget - factor, cols)
    out: list[RowSlice] = []
    rank, m, pos = 0, 0, 0
    while m < len(rows):
        if pos >= rows[m]:
            m, pos = m + 1, 0
            continue
        if rank == max_ranks or capacity <= 0:
            return None
        left = capacity
        took = False
        while m < len(rows) and left > 0:
            if pos >= rows[m]:
                m, pos = m + 1, 0
                continue
            remaining = rows[m] - pos
            take = remaining if left >= remaining else (pos + left) // align * align - pos
            if take <= 0:
                break
            out.append(RowSlice(rank, m, pos, pos + take))
            left -= take
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


# ---------------------------------------------------------------------- waves
def group_seconds(rows: Sequence[int], cols: int, cost: CostModel, *, solves: bool = True) -> float:
    """One rank solving a whole group: a factorisation and its modules' sweeps.

    Costed like any plan (:func:`rank_seconds` of the one-rank plan), so a packed wave
    and a cut one are compared on the same terms. ``solves=False``: the group is
    rounded to nearest (too few tokens, or ``rtn``), which costs an elementwise pass,
    counted as the sweep's per-row-column term.
    """
    if not solves:
        return cost.sweep_s_per_row_col * sum(rows) * cols
    return rank_seconds(split_rows(list(rows), 1), cols, cost, 1)[0]


def buckets(sizes: Sequence[int], cap: int) -> list[list[int]]:
    """Consecutive indices whose sizes add up to at most ``cap`` (a larger item alone).

    How a wave's Hessians are joined into all-reduces (``hessian-reduce``'s
    ``bucket_size``); a pure function of the sizes, so every rank cuts the same buckets.
    """
    out: list[list[int]] = []
    used = cap
    for i, n in enumerate(sizes):
        if used + n > cap or not out:
            out.append([])
            used = 0
        out[-1].append(i)
        used += n
    return out


def single_owners(plans: Sequence[tuple[Sequence[RowSlice], bool]]) -> list[int] | None:
    """The one rank that solves each group, or None unless every group has exactly one.

    ``plans``: each group's slices and whether its factorisation is shared. A packed
    wave (:func:`plan_wave`) has one owner per group, which alone needs the group's
    Hessian: ``hessian-reduce`` then reduces it to that rank instead of to all.
    """
    owners = []
    for slices, shared in plans:
        ranks = {s.rank for s in slices}
        if shared or len(ranks) != 1:
            return None
        owners.append(ranks.pop())
    return owners


def owner_buckets(
    sizes: Sequence[int], owners: Sequence[int], cap: int
) -> list[tuple[int, list[int]]]:
    """Each owner's groups (indices, in order) in :func:`buckets` of up to ``cap`` bytes.

    Owners in rank order: one reduction per bucket, to its owner. A pure function of
    its arguments, so every rank cuts the same buckets.
    """
    out: list[tuple[int, list[int]]] = []
    for owner in sorted(set(owners)):
        mine = [i for i, o in enumerate(owners) if o == owner]
        out += [(owner, [mine[j] for j in b]) for b in buckets([sizes[i] for i in mine], cap)]
    return out


def pack_groups(seconds: Sequence[float], world_size: int) -> list[int]:
    """The owner rank of each whole group: longest first onto the least loaded rank.

    Ties keep the groups' order and go to the lowest rank, so the result is a pure
    function of its arguments (every rank computes the same owners).
    """
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    load = [0.0] * world_size
    owner = [0] * len(seconds)
    for i in sorted(range(len(seconds)), key=lambda i: -seconds[i]):
        r = load.index(min(load))
        owner[i] = r
        load[r] += seconds[i]
    return owner


def plan_wave(
    groups: Sequence[tuple[Sequence[int], int]],
    world_size: int,
    cost: CostModel,
    *,
    solves: Sequence[bool] | None = None,
    tolerance: float = 0.0,
) -> tuple[list[SolvePlan], float]:
    """Plans for a wave of independent groups (``(rows, cols)`` each) and its predicted seconds.

    Packed: every group whole on the rank :func:`pack_groups` gives it; the wave takes
    the most loaded rank's time. Cut: :func:`plan_solve` for each group, one after
    another; the wave takes the sum of their times. The faster wins (packed on a tie).
    ``solves[i]`` is False for a group that will be rounded to nearest.
    """
    solving = list(solves) if solves is not None else [True] * len(groups)
    seconds = [
        group_seconds(rows, cols, cost, solves=ok) for (rows, cols), ok in zip(groups, solving)
    ]
    owner = pack_groups(seconds, world_size)
    load = [0.0] * world_size
    for r, t in zip(owner, seconds):
        load[r] += t
    packed = [
        SolvePlan(tuple(RowSlice(r, m, 0, n) for m, n in enumerate(rows) if n > 0), False, t)
        for (rows, _cols), r, t in zip(groups, owner, seconds)
    ]
    packed_s = max(load) if load else 0.0
    cut = [
        plan_solve(rows, cols, world_size, cost, tolerance=tolerance)
        if ok
        else SolvePlan(tuple(split_rows(list(rows), 1)), False, t)
        for (rows, cols), ok, t in zip(groups, solving, seconds)
    ]
    cut_s = sum(p.seconds for p in cut)
    return (packed, packed_s) if packed_s <= cut_s else (cut, cut_s)


# ---------------------------------------------------------------------- column-count baseline
def balance_by_columns(cols: Sequence[int], world_size: int) -> list[int]:
    """llm-compressor's balancer: the owner rank of each whole module, by column count only.

    Modules are taken largest first (stable, so ties keep their order) and each goes
    to the rank with the fewest columns so far (the lowest rank on ties). Rows, the
    cols² growth of the sweep and the cols³ factorisation are ignored, which is why
    one wide module (``down_proj``) ends up dominating a rank.
    """
    return pack_groups([float(c) for c in cols], world_size)  # exact: integer column counts


# ---------------------------------------------------------------------- predictions
@dataclass(frozen=True)
class GroupShape:
    """The Linear modules of one layer that read the same input (and share a Hessian).

    ``wave``: consecutive groups with the same key form a wave (``Target.wave``: one
    MoE block's experts), planned together by :func:`plan_wave`.
    """

    names: tuple[str, ...]
    rows: tuple[int, ...]
    cols: int
    wave: str | None = None


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
    rank_set: tuple[int, ...] = ()  # the ranks that solve rows of it
    wave: str | None = None


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


def wave_steps(groups: Sequence[GroupShape]) -> list[list[GroupShape]]:
    """Consecutive groups with the same ``wave`` key together; every other group alone."""
    out: list[list[GroupShape]] = []
    for g in groups:
        if g.wave is not None and out and out[-1][0].wave == g.wave:
            out[-1].append(g)
        else:
            out.append([g])
    return out


def split_waves(groups: Sequence[GroupShape], cap: int | None) -> list[GroupShape]:
    """Each wave cut into parts of at most ``cap`` groups (``runtime.max_wave_groups``),
    each part a wave of its own; ``None`` keeps the waves whole."""
    if cap is None:
        return list(groups)
    out: list[GroupShape] = []
    for step in wave_steps(groups):
        for i, g in enumerate(step):
            part = None if g.wave is None else f"{g.wave}#{i // cap}"
            out.append(GroupShape(g.names, g.rows, g.cols, part))
    return out


def layer_prediction(
    groups: Sequence[GroupShape],
    world_size: int,
    cost: CostModel,
    planner: Planner = "cost",
    *,
    group_size: int = 128,
    scale_bytes: int = 2,
    tolerance: float = 0.0,
    bucket_bytes: int | None = None,
) -> LayerPrediction:
    """Predict one layer's solve at ``world_size`` ranks with ``planner``.

    ``cost``: :func:`plan_solve` per group, :func:`plan_wave` per wave (whose Hessians
    travel in buckets of up to ``bucket_bytes``, None: one per group: reductions to
    their owners when packed, all-reduces when cut; and whose codes in one broadcast
    per owner rank); ``even``: :func:`split_rows` per group
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
    for step in wave_steps(groups) if planner == "cost" else [[g] for g in groups]:
        if len(step) > 1:
            plans, wave_s = plan_wave([(g.rows, g.cols) for g in step], world_size, cost)
        else:
            g = step[0]
            if planner == "cost":
                plans = [plan_solve(g.rows, g.cols, world_size, cost, tolerance=tolerance)]
            else:
                even = split_rows(list(g.rows), world_size)
                plans = [
                    SolvePlan(tuple(even), False, max(rank_seconds(even, g.cols, cost, world_size)))
                ]
            wave_s = plans[0].seconds
        seconds += wave_s
        hessians = [hessian_bytes(g.cols) for g in step]
        cap = bucket_bytes if bucket_bytes is not None else 0
        owners = (
            single_owners([(p.slices, p.shared_factor) for p in plans]) if len(step) > 1 else None
        )
        if owners is not None and world_size > 1:  # each to its owner (hessian-reduce)
            for _, bucket in owner_buckets(hessians, owners, cap):
                comm += cost.reduce_seconds(sum(hessians[i] for i in bucket), world_size)
        else:
            for bucket in buckets(hessians, cap):
                comm += cost.allreduce_seconds(sum(hessians[i] for i in bucket), world_size)
        h_bytes += sum(hessians)
        by_owner: dict[int, int] = {}
        for g, plan in zip(step, plans):
            times = rank_seconds(
                plan.slices, g.cols, cost, world_size, shared_factor=plan.shared_factor
            )
            one = rank_seconds(split_rows(list(g.rows), 1), g.cols, cost, 1)[0]
            busy = [a + b for a, b in zip(busy, times)]
            single += one
            for s in plan.slices:
                qb = qparam_bytes(s.rows, g.cols, group_size, scale_bytes)
                q_bytes += qb
                if len(step) > 1:
                    by_owner[s.rank] = by_owner.get(s.rank, 0) + qb
                else:
                    comm += cost.broadcast_seconds(qb, world_size)
            # (a shared factorisation's panel broadcasts are inside its factor time)
            factor = (
                cost.shared_factor_seconds(g.cols, world_size)
                if plan.shared_factor
                else cost.factor_seconds(g.cols)
            )
            out.append(
                GroupPrediction(
                    g.names,
                    sum(g.rows),
                    g.cols,
                    len({s.rank for s in plan.slices}),
                    max(times),
                    factor,
                    one,
                    shared_factor=plan.shared_factor,
                    rank_set=tuple(sorted({s.rank for s in plan.slices})),
                    wave=g.wave,
                )
            )
        comm += sum(cost.broadcast_seconds(b, world_size) for b in by_owner.values())
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
