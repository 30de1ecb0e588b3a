"""The method/ config group and the GPTAQ stage's contracts, without running a model."""

from __future__ import annotations

from pathlib import Path

import pytest

from gptqflow import compose
from gptqflow.framework.preflight import file_problems
from gptqflow.framework.schema import RecipeError, validate_recipe


def _recipe(name: str, *overrides: str):  # type: ignore[no-untyped-def]
    return validate_recipe(compose(name, ["model.path=/nowhere", *overrides]))


def test_method_options_change_the_stages() -> None:
    gptq = _recipe("gptq_w4a16")
    assert [c.id for c in gptq.stages] == [
        c.id for c in _recipe("gptq_w4a16", "method=gptq").stages
    ]
    solve = {c.id: c for c in gptq.stages}["solve"]
    assert solve.method == "gptq"
    gptaq = {c.id: c for c in _recipe("gptq_w4a16", "method=gptaq").stages}
    assert gptaq["solve"].method == "gptaq" and gptaq["solve"].alpha == 0.25
    ids = list(gptaq)
    # Inside the layer loop, before the solve that reads its statistic.
    assert ids.index("calibrate") < ids.index("float-path") < ids.index("solve")
    rtn = {c.id for c in _recipe("gptq_w4a16", "method=rtn").stages}
    assert not rtn & {"partition", "calibrate", "hessian-reduce"}
    assert [c.id for c in _recipe("rtn_w4a16").stages] == [
        c.id for c in _recipe("gptq_w4a16", "method=rtn").stages
    ]


def test_gptaq_without_its_statistic_is_refused() -> None:
    """solve method gptaq without float-path: the contract check names the provider."""
    with pytest.raises(RecipeError) as info:
        _recipe("gptq_w4a16", "stages.solve.method=gptaq")
    (problem,) = info.value.problems
    assert problem.path == "stages.solve"
    assert "group.reduced_cross" in problem.message and "float-path" in problem.message


def test_hessian_observer_needs_a_hessian(tmp_path: Path) -> None:
    recipe = _recipe(
        "gptq_w4a16", "method=rtn", "scheme.observer=hessian", f"output_dir={tmp_path}"
    )
    problems = [p for p in file_problems(recipe) if p.path == "scheme.observer"]
    assert len(problems) == 1 and "group.reduced_hessian" in problems[0].message
    # With calibration (solve method rtn inside the GPTQ recipe) it is fine.
    ok = _recipe(
        "gptq_w4a16", "stages.solve.method=rtn", "scheme.observer=hessian", f"output_dir={tmp_path}"
    )
    assert not [p for p in file_problems(ok) if p.path == "scheme.observer"]


def test_float_path_refuses_to_start_mid_model(tmp_path: Path) -> None:
    """A resumed run would start at layer k > 0 without the float hidden states."""
    import torch

    from gptqflow.errors import GptqflowError
    from gptqflow.framework.distributed import DistContext
    from gptqflow.framework.state import LayerRun, PipelineState
    from gptqflow.stages.float_path import FloatPathConfig, FloatPathStage

    recipe = _recipe("gptq_w4a16", "method=gptaq")
    config = {c.id: c for c in recipe.stages}["float-path"]
    assert isinstance(config, FloatPathConfig)
    stage = FloatPathStage(config, recipe)
    state = PipelineState(recipe, tmp_path)
    layer = LayerRun(
        state, 3, "model.layers.3", torch.nn.Identity(), {}, inputs=torch.zeros(1, 2, 4)
    )
    with pytest.raises(GptqflowError, match="not kept in resume points"):
        stage.before_layer(layer, DistContext())
