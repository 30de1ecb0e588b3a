"""A whole-model stage inside the layer loop splits it: the message says so, not "no stage provides"."""

from __future__ import annotations

import pytest

from gptqflow import compose
from gptqflow.framework.schema import RecipeError, validate_recipe


def test_whole_model_stage_between_layer_stages_is_named() -> None:
    raw = compose(
        "gptq_w4a16",
        ["model.path=/nowhere", "+stages.ppl={stage: evaluate, after: hessian-reduce}"],
    )
    with pytest.raises(RecipeError) as info:
        validate_recipe(raw)
    (problem,) = info.value.problems
    assert problem.path == "stages.solve"
    assert "'group.reduced_hessian'" in problem.message
    assert "the whole-model stage 'ppl' ends that loop" in problem.message
