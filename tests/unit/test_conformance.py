"""The stage conformance suite (gptqflow.testing) on every built-in stage, and that it can fail.

Plugin stages go through the same checks in tests/plugins/test_plugin_stage.py.
"""

from __future__ import annotations

from typing import Literal

import pytest
from pydantic import ConfigDict, Field

from gptqflow.framework.registry import StageSpec, registered
from gptqflow.framework.stage import Stage, StageConfig
from gptqflow.testing import stage_problems


@pytest.mark.parametrize("name", sorted(registered()))
def test_built_in_stage_conforms(name: str) -> None:
    assert stage_problems(registered()[name]) == []


class _Lax(StageConfig):
    """A config that breaks the contract on purpose."""

    model_config = ConfigDict(extra="allow", frozen=True)
    stage: Literal["lax"] = "lax"
    REQUIRES = ("group.hessian",)
    size: int = Field(3)


def test_a_broken_stage_fails_the_suite() -> None:
    problems = stage_problems(StageSpec("lax", _Lax, Stage, "tests"))
    text = "\n".join(problems)
    assert "forbid unknown keys" in text
    assert "field 'size' has no description" in text
    assert "numeric field 'size' declares no unit" in text
    assert "no ```yaml example" in text
    assert "an unknown key is accepted" in text
    assert "implements no layer hook" in text
