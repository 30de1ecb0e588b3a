"""Stage plugins: a pydantic config type mapped to its implementation, registered by name.

A stage is registered with :func:`register_stage` on its config class. The recipe
schema builds one discriminated union over every registered config (discriminator:
the ``stage`` field), so a recipe error names the exact stage and field. The
registry is the only mutable module-level state in gptqflow.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

from pydantic import BaseModel, ConfigDict, Field

if TYPE_CHECKING:
    from gptqflow.framework.distributed import DistContext
    from gptqflow.framework.state import GroupStep, PipelineState


class StageConfig(BaseModel):
    """Base of every stage config: frozen, unknown keys rejected, described fields."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    stage: str
    id: str | None = Field(
        None,
        description="Key of this entry in report.json; null = the stage name (name#2, name#3 "
        "when repeated).",
    )

    # The phase tells the runner where the stage runs: once for the whole model, or
    # inside the per-layer loop (once per group of modules that share an input).
    phase: ClassVar[str] = "model"


class Stage:
    """A stage implementation: built from its frozen config, run by the runner."""

    def __init__(self, config: Any) -> None:
        self.config = config

    def run(self, state: PipelineState, ctx: DistContext) -> None:
        """Run once over the whole pipeline state (``phase = "model"`` stages)."""
        raise NotImplementedError(f"{type(self).__name__} is a per-layer stage")

    def run_step(self, state: PipelineState, step: GroupStep, ctx: DistContext) -> None:
        """Run on one group of modules of the current layer (``phase = "layer"`` stages)."""
        raise NotImplementedError(f"{type(self).__name__} is a whole-model stage")


@dataclass(frozen=True)
class StageSpec:
    name: str
    config_cls: type[StageConfig]
    impl_cls: type[Stage]
    phase: str


_REGISTRY: dict[str, StageSpec] = {}


def register_stage(
    name: str, impl: type[Stage]
) -> Callable[[type[StageConfig]], type[StageConfig]]:
    """Class decorator for a stage config: ``@register_stage("solve", SolveStage)``."""

    def deco(cls: type[StageConfig]) -> type[StageConfig]:
        if name in _REGISTRY and _REGISTRY[name].config_cls is not cls:
            raise RuntimeError(f"stage {name!r} registered twice")
        _REGISTRY[name] = StageSpec(name, cls, impl, cls.phase)
        return cls

    return deco


def registered() -> dict[str, StageSpec]:
    """Every registered stage by name (imports the built-in stages first)."""
    import gptqflow.stages  # noqa: F401  (registers the built-in stages)

    return dict(_REGISTRY)


def build_stage(config: StageConfig) -> Stage:
    return registered()[config.stage].impl_cls(config)
