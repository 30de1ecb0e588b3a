"""Stage plugins: a config type mapped to its implementation, found through entry points.

Every stage, built-in or not, is an entry of the ``gptqflow.stages`` entry-point group
(``pyproject.toml``: ``[project.entry-points."gptqflow.stages"]``) whose value is the
stage's config class, e.g. ``solve = "gptqflow.stages.solve:SolveConfig"``. Loading the
entry imports the stage's module, whose :func:`register_stage` decorator records the
pair. So an installed package adds a stage without any edit here, and this module never
imports the stages package. A plugin that fails to import is an error naming the entry
point, never silently skipped.

The registry is the only mutable module-level state in gptqflow.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from importlib.metadata import entry_points
from typing import TYPE_CHECKING

from gptqflow.errors import GptqflowError
from gptqflow.framework.stage import Stage, StageConfig

if TYPE_CHECKING:
    from gptqflow.framework.schema import Recipe

ENTRY_POINT_GROUP = "gptqflow.stages"


@dataclass(frozen=True)
class StageSpec:
    name: str
    config_cls: type[StageConfig]
    impl_cls: type[Stage]
    source: str  # the distribution that provides it ("gptqflow" for built-ins)

    @property
    def per_layer(self) -> bool:
        return self.impl_cls.is_layer_stage()


_REGISTRY: dict[str, StageSpec] = {}
_loaded = False


def register_stage(
    name: str, impl: type[Stage]
) -> Callable[[type[StageConfig]], type[StageConfig]]:
    """Class decorator for a stage config: ``@register_stage("solve", SolveStage)``."""

    def deco(cls: type[StageConfig]) -> type[StageConfig]:
        if name in _REGISTRY and _REGISTRY[name].config_cls is not cls:
            raise GptqflowError(
                f"stage {name!r} is registered twice: by {_REGISTRY[name].config_cls.__module__} "
                f"and by {cls.__module__}; uninstall one of the packages"
            )
        _REGISTRY[name] = StageSpec(name, cls, impl, cls.__module__.split(".")[0])
        return cls

    return deco


def _load_entry_points() -> None:
    """Import every ``gptqflow.stages`` entry point once; a broken plugin is an error."""
    global _loaded
    if _loaded:
        return
    for ep in sorted(entry_points(group=ENTRY_POINT_GROUP), key=lambda e: e.name):
        where = f"entry point {ep.name} = {ep.value!r}"
        dist = getattr(ep, "dist", None)
        if dist is not None:
            where += f" (package {dist.name})"
        try:
            obj = ep.load()
        except Exception as exc:
            raise GptqflowError(
                f"cannot load the stage plugin {where}: {type(exc).__name__}: {exc}; fix or "
                "uninstall that package"
            ) from exc
        spec = _REGISTRY.get(ep.name)
        if spec is None or spec.config_cls is not obj:
            raise GptqflowError(
                f"stage plugin {where} does not name a config class registered as {ep.name!r} "
                f"with @register_stage({ep.name!r}, ...)"
            )
    if not _REGISTRY:
        raise GptqflowError(
            f"no stage is registered: Python found no {ENTRY_POINT_GROUP!r} entry points. "
            "gptqflow's own stages are entry points of its installed package: install it "
            "(pip install -e . in a checkout) rather than putting its source on PYTHONPATH, "
            "and remove any stale gptqflow.egg-info next to that source"
        )
    _loaded = True


def registered() -> dict[str, StageSpec]:
    """Every registered stage by name (built-in and plugin entry points loaded first)."""
    _load_entry_points()
    return dict(_REGISTRY)


def build_stage(config: StageConfig, recipe: Recipe) -> Stage:
    return registered()[config.stage].impl_cls(config, recipe)
