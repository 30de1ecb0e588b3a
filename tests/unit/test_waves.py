"""Waves: independent groups (an MoE block's experts) planned, reduced and sent together."""

from __future__ import annotations

import itertools
import random
from pathlib import Path

import pytest

from gptqflow.framework.layerloop import waves
from gptqflow.gptq.cost import CostModel, hessian_bytes
from gptqflow.gptq.plan import (
    buckets,
    group_seconds,
    layer_prediction,
    pack_groups,
    plan_solve,
    plan_wave,
)
from gptqflow.planning import BUCKET_BYTES, layer_groups

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


class _T:
    """A stand-in target: only ``wave`` matters to :func:`waves`."""

    def __init__(self, wave: str | None) -> None:
        self.wave = wave


def test_waves_gather_a_waves_groups_at_its_first_place() -> None:
    targets = {
        "q": _T(None),
        "k": _T(None),
        "o": _T(None),
        **{f"e{e}.gate": _T("gu") for e in range(3)},
        **{f"e{e}.up": _T("gu") for e in range(3)},
        **{f"e{e}.down": _T("dn") for e in range(3)},
        "shared": _T(None),
    }
    groups = [["q", "k"], ["o"]]
    for e in range(3):
        groups += [[f"e{e}.gate", f"e{e}.up"], [f"e{e}.down"]]
    groups.append(["shared"])
    got = waves(groups, targets)  # type: ignore[arg-type]
    assert got == [
        [["q", "k"]],
        [["o"]],
        [["e0.gate", "e0.up"], ["e1.gate", "e1.up"], ["e2.gate", "e2.up"]],
        [["e0.down"], ["e1.down"], ["e2.down"]],
        [["shared"]],
    ]
    # A group mixing waves (or a wave and a plain target) is no wave member.
    mixed = waves([["q", "e0.gate"], ["e1.gate"]], targets)  # type: ignore[arg-type]
    assert mixed == [[["q", "e0.gate"]], [["e1.gate"]]]


def test_buckets_cut_consecutive_items_under_the_cap() -> None:
    assert buckets([5, 5, 5], 10) == [[0, 1], [2]]
    assert buckets([20, 1, 1], 10) == [[0], [1, 2]], "a large item goes alone"
    assert buckets([1, 1, 1], 0) == [[0], [1], [2]]
    assert buckets([], 10) == []
    sizes = [random.Random(s).randint(1, 50) for s in range(40)]
    got = buckets(sizes, 64)
    assert [i for b in got for i in b] == list(range(40))
    assert all(sum(sizes[i] for i in b) <= 64 for b in got)
    # No two neighbours could have been merged: the cut is greedy.
    assert all(sum(sizes[i] for i in a) + sizes[b[0]] > 64 for a, b in itertools.pairwise(got))


def _makespan(seconds: list[float], owner: list[int], ranks: int) -> float:
    load = [0.0] * ranks
    for t, r in zip(seconds, owner):
        load[r] += t
    return max(load)


def test_pack_groups_is_within_lpt_bound_of_the_optimum() -> None:
    rng = random.Random(0)
    for _ in range(30):
        n, ranks = rng.randint(1, 7), rng.randint(1, 3)
        seconds = [rng.uniform(0.1, 5.0) for _ in range(n)]
        owner = pack_groups(seconds, ranks)
        assert len(owner) == n and all(0 <= r < ranks for r in owner)
        best = min(
            _makespan(seconds, list(assign), ranks)
            for assign in itertools.product(range(ranks), repeat=n)
        )
        got = _makespan(seconds, owner, ranks)
        assert got <= best * (4 / 3) + 1e-12  # Graham's bound for longest-first
        assert owner == pack_groups(list(seconds), ranks), "deterministic"


def test_equal_experts_spread_evenly_and_whole() -> None:
    cost = CostModel.default()
    groups = [((768, 768), 2048)] * 16
    plans, seconds = plan_wave(groups, 4, cost)
    owners = [{s.rank for s in p.slices} for p in plans]
    assert all(len(o) == 1 for o in owners), "every expert on one rank: one factorisation"
    per_rank = [sum(1 for o in owners if r in o) for r in range(4)]
    assert per_rank == [4, 4, 4, 4]
    for p in plans:
        assert [(s.module, s.start, s.stop) for s in p.slices] == [(0, 0, 768), (1, 0, 768)]
    one = group_seconds((768, 768), 2048, cost)
    assert seconds == pytest.approx(4 * one)
    # Cutting every expert's rows over the 4 ranks would pay each factorisation 4 times.
    cut = sum(plan_solve((768, 768), 2048, 4, cost).seconds for _ in range(16))
    assert seconds < cut


def test_few_wide_groups_are_cut_over_the_ranks_instead() -> None:
    cost = CostModel.default()
    plans, seconds = plan_wave([((4096,), 14336)] * 2, 8, cost)
    assert any(len({s.rank for s in p.slices}) > 1 for p in plans)
    assert seconds < group_seconds((4096,), 14336, cost)


def test_rounded_groups_cost_little_and_balance_the_rest() -> None:
    cost = CostModel.default()
    groups = [((512,), 1024)] * 5
    plans, _ = plan_wave(groups, 2, cost, solves=[True, True, True, False, False])
    owner = [p.slices[0].rank for p in plans]
    solving = [owner[i] for i in range(3)]
    assert sorted(solving.count(r) for r in (0, 1)) == [1, 2]
    light = next(r for r in (0, 1) if solving.count(r) == 1)
    assert owner[3] == owner[4] == light, "both rounded groups go to the lighter rank"


@pytest.mark.parametrize("config", ["mixtral-8x7b.json", "qwen3-30b-a3b.json"])
def test_moe_configs_solve_7x_faster_at_8_ranks(config: str) -> None:
    """The shipped MoE shapes: experts packed onto ranks give >= 7x at 8 ranks (bundled fit)."""
    _, kinds = layer_groups(CONFIGS / config)
    assert len(kinds) == 1
    groups = kinds[0][0]
    experts = [g for g in groups if g.wave is not None]
    assert experts and len({g.wave for g in experts}) == 2, "a gate/up wave and a down wave"
    cost = CostModel.default()
    pred = layer_prediction(groups, 8, cost, "cost", bucket_bytes=BUCKET_BYTES)
    assert pred.speedup >= 7.0
    # Bucketed: fewer reductions than groups where an owner has several (each would
    # otherwise pay a latency); Mixtral's 8 experts at 8 ranks are one per owner.
    per_group = layer_prediction(groups, 8, cost, "cost", bucket_bytes=None)
    assert pred.comm_seconds <= per_group.comm_seconds
    if len(experts) > 2 * 8:
        assert pred.comm_seconds < per_group.comm_seconds
    assert pred.speedup >= layer_prediction(groups, 8, cost, "columns").speedup


def test_split_waves_bounds_the_memory_of_a_wave() -> None:
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    from gptqflow.gptq.plan import GroupShape, split_waves, wave_steps
    from gptqflow.modeling.memory import predict_rank_memory

    experts = [GroupShape((f"e{e}",), (64,), 32, "w") for e in range(8)]
    groups = [GroupShape(("q",), (32,), 32), *experts]
    assert [len(s) for s in wave_steps(split_waves(groups, 3))] == [1, 3, 3, 2]
    assert split_waves(groups, None) == groups
    cfg = Qwen3MoeConfig(
        hidden_size=32, intermediate_size=64, moe_intermediate_size=64, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=1, num_experts=8, num_experts_per_tok=2,
        vocab_size=100,
    )  # fmt: skip
    import torch

    with torch.device("meta"):
        model = Qwen3MoeForCausalLM(cfg)
    whole = predict_rank_memory(model, groups, 256, base_bytes=0)
    part = predict_rank_memory(model, split_waves(groups, 2), 256, base_bytes=0)
    # Six experts' statistics fewer at once: the float64 strips and the float32 mean each.
    assert whole.layer - part.layer == 6 * (hessian_bytes(32) + 32 * 32 * 4)


def test_a_packed_wave_reduces_each_hessian_to_its_owner() -> None:
    """Whole groups on one rank each: owners known, buckets per owner, and the predicted
    Hessian traffic is a reduction (half an all-reduce's bytes); a cut group has none."""
    from gptqflow.gptq.plan import RowSlice, owner_buckets, single_owners

    one = [RowSlice(1, 0, 0, 8), RowSlice(1, 1, 0, 8)]
    two = [RowSlice(0, 0, 0, 8)]
    assert single_owners([(one, False), (two, False)]) == [1, 0]
    assert single_owners([(one, True), (two, False)]) is None  # shared factor: all need it
    cut = [RowSlice(0, 0, 0, 4), RowSlice(1, 0, 4, 8)]
    assert single_owners([(cut, False), (two, False)]) is None
    assert owner_buckets([5, 5, 5, 5, 5], [1, 0, 1, 1, 0], cap=10) == [
        (0, [1, 4]),
        (1, [0, 2]),
        (1, [3]),
    ]
