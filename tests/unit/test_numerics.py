"""Numerical failures in the solve stage: detected where they appear, named, never written.

The stage is driven directly with a hand-made group (two Linears sharing a Hessian),
so each failure can be injected exactly: a NaN Hessian, NaN weights, an indefinite
Hessian (with and without the round-to-nearest fallback), a NaN solve result. Dead
input columns are checked against the GPTQ reference's rule (their weights are
zeroed and have no influence on any other column).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from gptqflow.errors import GptqflowError
from gptqflow.framework.distributed import DistContext
from gptqflow.framework.runner import format_summary, merge_fallbacks
from gptqflow.framework.schema import DatasetGroup, ModelGroup, Recipe, SchemeGroup
from gptqflow.framework.state import GroupRun, LayerRun, PipelineState
from gptqflow.gptq.hessian import HessianSum
from gptqflow.gptq.numerics import all_finite, count_nonfinite
from gptqflow.gptq.plan import split_rows
from gptqflow.gptq.quantizer import rtn_quantize
from gptqflow.gptq.solver import gptq_solve
from gptqflow.gptq.types import ActOrder, QuantArgs
from gptqflow.stages import solve as solve_stage
from gptqflow.stages.solve import SolveConfig, SolveStage

COLS = 64
NAMES = ["model.layers.3.mlp.gate_proj", "model.layers.3.mlp.up_proj"]


def _recipe(on_failure: str = "error") -> Recipe:
    """W4, group 32, static act-order: the scheme group the solve stage reads."""
    scheme = SchemeGroup(
        name="w4a16", bits=4, group_size=32, actorder="static", on_failure=on_failure
    )
    return Recipe(
        output_dir=".",
        model=ModelGroup(path="."),
        dataset=DatasetGroup(calibration_file="c.txt", eval_file="e.txt"),
        scheme=scheme,
        stages=[],
    )


def _step(seed: int = 0, on_failure: str = "error") -> GroupRun:
    """Layer 3's gate/up group: two Linears (48 and 16 rows) and their reduced Hessian."""
    gen = torch.Generator().manual_seed(seed)
    modules = []
    for rows in (48, 16):
        lin = nn.Linear(COLS, rows, bias=False)
        lin.weight.data = torch.randn(rows, COLS, generator=gen) * 0.1
        modules.append(lin)
    x = torch.randn(256, COLS, generator=gen) @ torch.randn(COLS, COLS, generator=gen)
    hs = HessianSum.zeros(COLS)
    hs.add(x)
    state = PipelineState(recipe=_recipe(on_failure), output_dir=Path("."))
    layer = LayerRun(state, 3, "model.layers.3", nn.Module(), dict(zip(NAMES, modules)))
    step = GroupRun(layer, 1, list(NAMES), modules, hessian=hs)
    layer.groups.append(step)
    step.reduced_hessian = hs.finalize()
    return step


def _run_solve(step: GroupRun, ctx: DistContext, **config: Any) -> PipelineState:
    """The solve stage's hooks on ``step``'s layer and group, as the layer loop calls them."""
    state = step.layer.state
    stage = SolveStage(SolveConfig(id="solve", **config), state.recipe)
    stage.before_layer(step.layer, ctx)
    stage.on_group(step, ctx)
    return state


def _solve(step: GroupRun, **config: Any) -> PipelineState:
    return _run_solve(step, DistContext(), **config)


def _make_indefinite(step: GroupRun) -> None:
    """A negative diagonal entry: no dampening (a multiple of the mean diagonal) fixes it."""
    assert step.reduced_hessian is not None
    step.reduced_hessian[5, 5] = -1e6


def test_healthy_group_solves_without_fallback() -> None:
    step = _step()
    state = _solve(step)
    assert state.fallbacks == [] and len(step.results) == 2


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_non_finite_hessian_names_layer_and_modules(value: float) -> None:
    step = _step(on_failure="rtn")
    assert step.reduced_hessian is not None
    step.reduced_hessian[7, 2] = value
    with pytest.raises(GptqflowError) as info:
        _solve(step)  # never "fixed" by rounding: the inputs are broken
    msg = str(info.value)
    assert msg.startswith(f"layer 3, {NAMES[0]}, {NAMES[1]}: the Hessian has 1 NaN/Inf entries")
    assert "activations entering these modules" in msg
    assert step.results == {}


def test_non_finite_weights_name_the_module() -> None:
    step = _step()
    step.modules[1].weight.data[4, 9] = math.nan
    with pytest.raises(GptqflowError, match=rf"layer 3, {NAMES[1]}: the float weights have 1 NaN"):
        _solve(step)
    assert step.results == {}


def test_indefinite_hessian_error_names_module_and_dampening_tried() -> None:
    step = _step()
    _make_indefinite(step)
    with pytest.raises(GptqflowError) as info:
        _solve(step, dampening=0.01, max_damp_retries=3)
    msg = str(info.value)
    assert msg.startswith(f"layer 3, {NAMES[0]}, {NAMES[1]}: the Hessian is not positive definite")
    assert "[0.01, 0.1, 1.0, 10.0]" in msg
    assert "scheme.on_failure=rtn" in msg
    assert step.results == {}


def test_rtn_fallback_rounds_every_module_of_the_group_and_records_it(
    caplog: pytest.LogCaptureFixture,
) -> None:
    step = _step(on_failure="rtn")
    _make_indefinite(step)
    with caplog.at_level("WARNING", logger="gptqflow"):
        state = _solve(step, max_damp_retries=2)
    args = QuantArgs(bits=4, group_size=32, actorder="static", observer="mse")
    for m, mod in enumerate(step.modules):
        expected = rtn_quantize(mod.weight.data, args)
        got = step.results[(m, 0)]
        assert torch.equal(got.qweight, expected.qweight)
        assert torch.equal(got.scale, expected.scale)
    assert [(f["layer"], f["module"]) for f in state.fallbacks] == [(3, n) for n in NAMES]
    assert all("[0.01, 0.1, 1.0]" in f["reason"] for f in state.fallbacks)
    assert "round-to-nearest instead of GPTQ" in caplog.text and NAMES[0] in caplog.text


def test_every_rank_makes_the_same_fallback_decision() -> None:
    """Split over two ranks, each rank decides from the same reduced Hessian: together
    they record every module once, and their slices are the rows of the 1-rank result."""
    one = _step(on_failure="rtn")
    _make_indefinite(one)
    whole = _solve(one)
    fallbacks, rows = [], {}
    for rank in (0, 1):
        step = _step(on_failure="rtn")
        _make_indefinite(step)
        # Equal rows over both ranks: the plan split_rows(rows, 2) gives.
        ctx = DistContext(rank=rank, world_size=2)
        state = _run_solve(step, ctx, planner="even", min_rows_per_rank=1)
        assert step.plan == split_rows(step.rows, 2)
        assert {s.rank for s in step.plan} == {0, 1}
        fallbacks.append(state.fallbacks)
        rows.update(step.results)
    assert merge_fallbacks(fallbacks) == merge_fallbacks([whole.fallbacks])
    for m in range(2):
        parts = sorted((start, r) for (mod, start), r in rows.items() if mod == m)
        stacked = torch.cat([r.qweight for _, r in parts])
        assert torch.equal(stacked, one.results[(m, 0)].qweight)


def test_non_finite_solve_result_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    real = solve_stage.solve_rows

    def broken(*args: Any, **kwargs: Any) -> Any:
        res = real(*args, **kwargs)
        res.dequant[50, 3] = math.nan  # row 50 of the stack = row 2 of up_proj
        return res

    monkeypatch.setattr(solve_stage, "solve_rows", broken)
    step = _step()
    with pytest.raises(
        GptqflowError, match=rf"layer 3, {NAMES[1]}: the quantized weights \(rows 0..15\)"
    ):
        _solve(step)


def test_merged_fallbacks_list_each_module_once_in_layer_order() -> None:
    a = {"layer": 2, "module": "m.2.up", "reason": "r"}
    b = {"layer": 0, "module": "m.0.gate", "reason": "r"}
    assert merge_fallbacks([[a, b], [a], []]) == [b, a]
    report = {
        "perplexity": {"baseline": None, "quantized": None},
        "stages": {},
        "ranks": [],
        "scheme": "w4a16",
        "world_size": 2,
        "seconds": 1.0,
        "checkpoint": None,
        "fallbacks": [a, b],
    }
    assert "fallbacks:   2 module(s) rounded to nearest" in format_summary(report)
    assert "fallbacks" not in format_summary({**report, "fallbacks": []})


@pytest.mark.parametrize("actorder", ["none", "static", "group"])
def test_dead_columns_have_no_influence_on_the_other_columns(actorder: ActOrder) -> None:
    """GPTQ reference rule: a column whose Hessian diagonal is 0 (an input that is always
    zero) gets weight 0, and whatever weights it held change nothing else, not even the
    scales of the group it belongs to."""
    step = _step()
    assert step.reduced_hessian is not None
    h = step.reduced_hessian.clone()
    dead = torch.tensor([3, 40])
    h[dead, :] = 0
    h[:, dead] = 0
    w = step.modules[0].weight.data
    loud = w.clone()
    loud[:, dead] = 100.0  # far outside every group's range
    args = QuantArgs(bits=4, group_size=32, actorder=actorder, observer="minmax")
    quiet_res, loud_res = gptq_solve(w, h, args), gptq_solve(loud, h, args)
    assert torch.equal(quiet_res.qweight, loud_res.qweight)
    assert torch.equal(quiet_res.scale, loud_res.scale)
    assert not loud_res.dequant[:, dead].any()
    assert torch.isfinite(loud_res.dequant).all()


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_all_finite_agrees_with_isfinite(dtype: torch.dtype, bad: float) -> None:
    """The fast check (min and max of the tensor) is exact: any NaN or ±inf anywhere fails it."""
    gen = torch.Generator().manual_seed(0)
    x = (torch.randn(37, 53, generator=gen) * 100).to(dtype)
    assert all_finite(x) and all_finite(x[:0])
    for where in [(0, 0), (18, 26), (36, 52)]:
        y = x.clone()
        y[where] = bad
        assert not all_finite(y)
        assert all_finite(y) == bool(torch.isfinite(y).all())
        assert count_nonfinite(y) == 1
    assert count_nonfinite(x) == 0
