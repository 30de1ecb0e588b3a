"""The work plan: row slices per rank, the column-count baseline, and layer predictions."""

from __future__ import annotations

import dataclasses
import itertools
import json
from pathlib import Path

import pytest

from gptqflow.errors import GptqflowError
from gptqflow.gptq.cost import CostModel, hessian_bytes
from gptqflow.gptq.plan import (
    GroupShape,
    RowSlice,
    balance_by_columns,
    layer_prediction,
    plan_digest,
    plan_group,
    plan_solve,
    rank_seconds,
    split_rows,
)
from gptqflow.planning import layer_groups, parse_world_sizes, plan_report

CONFIGS = Path(__file__).resolve().parents[2] / "configs"

# Llama-3-8B: hidden 4096, intermediate 14336, 32 heads of 128, 8 kv heads.
LLAMA3_8B = [
    GroupShape(("q_proj", "k_proj", "v_proj"), (4096, 1024, 1024), 4096),
    GroupShape(("o_proj",), (4096,), 4096),
    GroupShape(("gate_proj", "up_proj"), (14336, 14336), 4096),
    GroupShape(("down_proj",), (4096,), 14336),
]


def synthetic(**overrides: float) -> CostModel:
    """CPU-like constants (close to the bundled fit), so tests do not depend on the fit."""
    base: dict[str, float] = dict(
        factor_overhead_s=1e-3,
        factor_s_per_col2=1e-9,
        factor_s_per_col3=1.0e-11,
        sweep_overhead_s=5e-3,
        sweep_s_per_col=3.4e-5,
        sweep_s_per_row_col=4e-8,
        sweep_s_per_row_col2=1.3e-11,
        latency_s=5e-4,
        bytes_per_s=5e8,
    )
    base.update(overrides)
    return CostModel(**base)  # type: ignore[arg-type]


def no_factor() -> CostModel:
    """The regime the issue's speedup target assumes: factorising is (nearly) free."""
    return synthetic(factor_overhead_s=0.0, factor_s_per_col2=0.0, factor_s_per_col3=0.0)


def assert_exact_cover(plan: list[RowSlice], rows: list[int]) -> None:
    """Every row once; each rank's slices are one contiguous run of the concatenation."""
    offsets = [sum(rows[:m]) for m in range(len(rows))]
    seen = [0] * sum(rows)
    runs: dict[int, list[tuple[int, int]]] = {}
    for s in plan:
        assert 0 <= s.start < s.stop <= rows[s.module]
        a, b = offsets[s.module] + s.start, offsets[s.module] + s.stop
        for i in range(a, b):
            seen[i] += 1
        runs.setdefault(s.rank, []).append((a, b))
    assert seen == [1] * sum(rows)
    ranks = sorted(runs)
    assert ranks == list(range(len(ranks))), "ranks 0..k-1 take part"
    previous_end = 0
    for r in ranks:
        spans = sorted(runs[r])
        assert spans[0][0] == previous_end, "rank order follows row order"
        for (_, b), (a, _) in itertools.pairwise(spans):
            assert a == b, f"rank {r} has a gap"
        previous_end = spans[-1][1]


# ---------------------------------------------------------------------- split_rows (unchanged)
def test_split_rows_keeps_its_semantics() -> None:
    plan = split_rows([4, 2, 2], 2)
    assert plan == [RowSlice(0, 0, 0, 4), RowSlice(1, 1, 0, 2), RowSlice(1, 2, 0, 2)]
    assert_exact_cover(split_rows([10, 3], 4, min_rows=4), [10, 3])
    assert {s.rank for s in split_rows([10, 3], 4, min_rows=4)} == {0, 1, 2}


# ---------------------------------------------------------------------- plan_group
@pytest.mark.parametrize("world_size", [1, 2, 3, 4, 7, 8, 64, 512])
@pytest.mark.parametrize(
    ("rows", "cols"),
    [
        ((4096, 1024, 1024), 4096),
        ((14336, 14336), 4096),
        ((4096,), 14336),
        ((5, 0, 40), 64),
        ((576, 192, 192), 576),
        ((1,), 8),
    ],
)
def test_every_row_assigned_exactly_once(rows: tuple[int, ...], cols: int, world_size: int) -> None:
    plan = plan_group(rows, cols, world_size, synthetic())
    assert_exact_cover(plan, list(rows))
    assert max(s.rank for s in plan) < world_size


def test_plan_is_deterministic_and_does_not_keep_its_input() -> None:
    rows = [4096, 1024, 1024]
    a = plan_group(rows, 4096, 8, synthetic())
    b = plan_group(tuple(rows), 4096, 8, synthetic())
    rows.append(7)  # mutating the caller's list afterwards changes nothing
    assert a == b
    assert (
        plan_digest(a)
        == plan_digest(b)
        == plan_digest(plan_group((4096, 1024, 1024), 4096, 8, synthetic()))
    )
    assert plan_digest(a) != plan_digest(plan_group((4096, 1024, 1024), 4096, 7, synthetic()))


def test_alignment_puts_cuts_on_multiples() -> None:
    plan = plan_group((1000, 300), 512, 5, synthetic(), align=64)
    assert_exact_cover(plan, [1000, 300])
    for s in plan:
        assert s.start % 64 == 0
        assert s.stop % 64 == 0 or s.stop == (1000, 300)[s.module]


def test_matches_brute_force_optimum_on_small_groups() -> None:
    """The slowest rank's predicted time equals the best over every contiguous cut."""
    cost = synthetic(min_sweep_rows=1, sweep_s_per_col=2e-3, factor_s_per_col3=1e-8)
    rows, cols = [5, 7], 64
    total = sum(rows)

    def pieces(a: int, b: int) -> list[RowSlice]:
        out, off = [], 0
        for m, n in enumerate(rows):
            lo, hi = max(a, off), min(b, off + n)
            if lo < hi:
                out.append(RowSlice(0, m, lo - off, hi - off))
            off += n
        return out

    for world_size in (1, 2, 3, 4):
        best = float("inf")
        for k in range(1, world_size + 1):
            for cuts in itertools.combinations(range(1, total), k - 1):
                bounds = [0, *cuts, total]
                t = max(
                    rank_seconds(pieces(a, b), cols, cost, 1)[0]
                    for a, b in itertools.pairwise(bounds)
                )
                best = min(best, t)
        plan = plan_group(rows, cols, world_size, cost)
        got = max(rank_seconds(plan, cols, cost, world_size))
        assert got == pytest.approx(best, rel=1e-6)


def test_never_slower_than_the_even_split() -> None:
    for g in LLAMA3_8B:
        for w in (2, 3, 4, 8, 64):
            cost = synthetic()
            ours = max(rank_seconds(plan_group(g.rows, g.cols, w, cost), g.cols, cost, w))
            even = max(rank_seconds(split_rows(list(g.rows), w), g.cols, cost, w))
            assert ours <= even * (1 + 1e-6)


def test_a_ranks_slices_cost_one_sweep() -> None:
    """The solve stacks a rank's slices of a group into one sweep, and the plan knows it.

    q/k/v at 2 ranks: one rank takes q's first rows, the other the rest of q plus k and
    v. Charging that rank a sweep's per-column overhead per slice gave it fewer rows,
    so the first rank solved more and waited less: a steady imbalance in every layer.
    """
    cost = synthetic(sweep_s_per_col=1e-3)
    plan = plan_group([576, 192, 192], 576, 2, cost)
    assert [sum(s.rows for s in plan if s.rank == r) for r in (0, 1)] == [480, 480]
    three = [RowSlice(0, 0, 0, 96), RowSlice(0, 1, 0, 192), RowSlice(0, 2, 0, 192)]
    assert rank_seconds(three, 576, cost, 1) == pytest.approx(
        [cost.factor_seconds(576) + cost.sweep_seconds(480, 576)]
    )


def test_tiny_groups_use_fewer_ranks() -> None:
    cost = synthetic()
    # The solver pads slices to 16 rows: 16 rows on 8 ranks is no faster than on 1.
    assert {s.rank for s in plan_group([16], 576, 8, cost)} == {0}
    # 40 rows: at most three 16-row slices are worth having.
    assert len({s.rank for s in plan_group([40], 576, 8, cost)}) <= 3
    # With a tolerance, ranks that shave off less than it are not used.
    strict = plan_group([4096], 14336, 8, cost)
    relaxed = plan_group([4096], 14336, 8, cost, tolerance=0.05)
    assert len({s.rank for s in relaxed}) < len({s.rank for s in strict}) == 8


def test_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="world_size"):
        plan_group([4], 8, 0, synthetic())
    with pytest.raises(ValueError, match="shape"):
        plan_group([-1], 8, 2, synthetic())
    assert plan_group([0, 0], 8, 2, synthetic()) == []


# ---------------------------------------------------------------------- layer predictions
@pytest.mark.parametrize(
    "cost",
    [synthetic(), CostModel.default(), no_factor()],
    ids=["synthetic", "bundled", "no-factor"],
)
def test_imbalance_at_8_ranks_on_llama3_8b(cost: CostModel) -> None:
    pred = layer_prediction(LLAMA3_8B, 8, cost, "cost")
    assert pred.imbalance <= 1.05
    assert len(pred.rank_seconds) == 8


def test_speedup_target_holds_when_factorising_is_cheap() -> None:
    """Issue 3's targets (>= 3.6x at 4 ranks) hold for the sweep alone."""
    pred = layer_prediction(LLAMA3_8B, 4, no_factor(), "cost")
    assert pred.speedup >= 3.6


@pytest.mark.parametrize(
    ("cost", "target"),
    [(synthetic(), 3.4), (CostModel.default(), 3.6)],
    ids=["synthetic", "bundled"],
)
def test_speedup_with_a_shared_factorisation(cost: CostModel, target: float) -> None:
    """With CPU factorisation costs, 4 ranks need down_proj's factorisation shared.

    Issue 3 asks for 3.6x at 4 ranks on Llama-3-8B shapes; the bundled fit predicts
    3.75x (docs/planning.md).
    """
    pred = layer_prediction(LLAMA3_8B, 4, cost, "cost")
    assert pred.speedup >= target
    down = pred.groups[-1]
    assert down.names == ("down_proj",) and down.shared_factor
    # If messages were too slow to share, every rank would factorise alone and pay
    # down_proj's whole 14336³ factorisation: Amdahl caps the speedup far below.
    slow = dataclasses.replace(cost, bytes_per_s=1e3)
    capped = layer_prediction(LLAMA3_8B, 4, slow, "cost")
    assert not any(g.shared_factor for g in capped.groups)
    factor = sum(g.factor_seconds for g in capped.groups)
    assert capped.speedup <= capped.single_rank_seconds / factor < 3.6


def test_plan_solve_shares_only_where_it_pays() -> None:
    cost = CostModel.default()
    wide = plan_solve([4096], 14336, 4, cost)
    assert wide.shared_factor
    assert_exact_cover(list(wide.slices), [4096])
    times = rank_seconds(list(wide.slices), 14336, cost, 4, shared_factor=True)
    assert max(times) == pytest.approx(wide.seconds)
    # Every rank pays the same shared factorisation, whether or not it has rows.
    assert min(times) >= cost.shared_factor_seconds(14336, 4)
    # Tiny groups: a few messages per panel cost more than factorising alone.
    assert not plan_solve([16], 64, 4, cost).shared_factor
    # One rank: nothing to share.
    assert not plan_solve([4096], 14336, 1, cost).shared_factor
    # The plan is the faster of the two: never slower than a local factorisation.
    for rows, cols, w in [([4096], 14336, 2), ([6144], 4096, 3), ([576], 576, 2)]:
        local = plan_group(rows, cols, w, cost)
        assert plan_solve(rows, cols, w, cost).seconds <= max(rank_seconds(local, cols, cost, w))


def test_shared_factor_seconds() -> None:
    cost = synthetic()
    assert cost.shared_factor_seconds(4096, 1) == cost.factor_seconds(4096)
    two, four = cost.shared_factor_seconds(14336, 2), cost.shared_factor_seconds(14336, 4)
    assert four < two < cost.factor_seconds(14336)
    # The cols³ flops split; the messages do not shrink with more ranks.
    assert four > cost.factor_s_per_col3 * 14336**3 / 4


def test_shared_factorisation_splits_the_gather_but_not_the_check() -> None:
    """Each rank gathers only its own panels; every rank checks the whole Hessian."""
    cost = dataclasses.replace(
        synthetic(),
        factor_s_per_col3=0.0,
        latency_s=0.0,
        bytes_per_s=1e30,
        shared_s_per_panel=0.0,
        check_s_per_col2=2e-9,
    )
    c = 8192
    alone = cost.factor_seconds(c) - cost.factor_overhead_s
    assert alone == pytest.approx((2e-9 + cost.factor_s_per_col2) * c * c)
    for k in (2, 4, 8):
        shared = cost.shared_factor_seconds(c, k) - cost.factor_overhead_s
        assert shared == pytest.approx((2e-9 + cost.factor_s_per_col2 / k) * c * c)


def test_column_balancer_reproduces_the_known_limit() -> None:
    """llm-compressor packs whole modules by columns: down_proj caps 2 ranks below 2x."""
    cols = [g.cols for g in LLAMA3_8B for _ in g.rows]
    for w, expected in ((2, 1.9), (4, 2.71)):
        owner = balance_by_columns(cols, w)
        load = [sum(c for c, o in zip(cols, owner) if o == r) for r in range(w)]
        assert sum(cols) / max(load) == pytest.approx(expected, abs=0.01)
    for cost in (synthetic(), no_factor()):
        pred = layer_prediction(LLAMA3_8B, 2, cost, "columns")
        assert pred.speedup < 2.0
        assert layer_prediction(LLAMA3_8B, 4, cost, "columns").speedup < 2.8
    # With cheap factorisation, splitting rows beats packing whole modules.
    assert (
        layer_prediction(LLAMA3_8B, 4, no_factor(), "cost").speedup
        > layer_prediction(LLAMA3_8B, 4, no_factor(), "columns").speedup
    )


def test_balance_by_columns_is_largest_first_least_loaded() -> None:
    assert balance_by_columns([1, 5, 3, 3], 2) == [0, 0, 1, 1]
    assert balance_by_columns([4, 4, 4], 4) == [0, 1, 2]


def test_bytes_per_planner() -> None:
    ours = layer_prediction(LLAMA3_8B, 4, synthetic(), "cost")
    base = layer_prediction(LLAMA3_8B, 4, synthetic(), "columns")
    # One Hessian per group vs one per module (q, k, v and gate, up each get their own).
    assert ours.hessian_bytes == 3 * hessian_bytes(4096) + hessian_bytes(14336)
    assert base.hessian_bytes == 6 * hessian_bytes(4096) + hessian_bytes(14336)
    weights = sum(sum(g.rows) * g.cols for g in LLAMA3_8B)
    assert weights / 2 < ours.qparam_bytes < 0.55 * weights  # 4-bit codes: ~half a byte each
    one = layer_prediction(LLAMA3_8B, 1, synthetic(), "cost")
    assert one.comm_seconds == 0.0 and one.speedup == 1.0


# ---------------------------------------------------------------------- planning (configs)
def test_configs_give_the_published_shapes() -> None:
    expected = {
        "llama3-8b.json": (32, 4096, 14336, 1024),
        "llama3-70b.json": (80, 8192, 28672, 1024),
        "llama3.1-405b.json": (126, 16384, 53248, 1024),
    }
    for name, (layers, hidden, inter, kv) in expected.items():
        _, kinds = layer_groups(CONFIGS / name)
        assert len(kinds) == 1 and kinds[0][1] == layers
        groups = kinds[0][0]
        assert [(g.rows, g.cols) for g in groups] == [
            ((hidden, kv, kv), hidden),
            ((hidden,), hidden),
            ((inter, inter), hidden),
            ((hidden,), inter),
        ]
    _, kinds = layer_groups(CONFIGS / "llama3-8b.json")
    assert [(g.rows, g.cols) for g in kinds[0][0]] == [(g.rows, g.cols) for g in LLAMA3_8B]


def test_plan_report_text_and_json() -> None:
    report = plan_report(CONFIGS / "llama3-8b.json", (2, 4), synthetic())
    assert "llama3-8b" in report.text and "columns" in report.text and "ours" in report.text
    data = json.loads(json.dumps(report.data))
    preds = data["layer_kinds"][0]["predictions"]
    assert {(p["planner"], p["world_size"]) for p in preds} == {
        ("cost", 2),
        ("columns", 2),
        ("cost", 4),
        ("columns", 4),
    }
    assert data["num_layers"] == 32


def test_plan_report_accepts_a_dict_and_refuses_bad_input(tmp_path: Path) -> None:
    small = {
        "model_type": "llama",
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "vocab_size": 100,
    }
    report = plan_report(small, (2,), synthetic())
    assert report.data["num_layers"] == 2
    with pytest.raises(GptqflowError, match="does not exist"):
        plan_report(tmp_path / "missing.json", (2,))
    bad = tmp_path / "cost.json"
    bad.write_text(json.dumps(dataclasses.asdict(synthetic()) | {"oops": 1}))
    with pytest.raises(GptqflowError, match="not a valid cost model"):
        plan_report(small, (2,), bad)
    with pytest.raises(GptqflowError, match="positive"):
        plan_report(small, (0,), synthetic())


def test_parse_world_sizes() -> None:
    assert parse_world_sizes("2, 4,8") == (2, 4, 8)
    for bad in ("", "2,x", "0", "-1"):
        with pytest.raises(GptqflowError, match="world-sizes"):
            parse_world_sizes(bad)
