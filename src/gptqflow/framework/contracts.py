"""Can this pipeline run? Checked from what stages declare, before anything heavy runs.

Each stage config declares the state it requires and provides (names of
:mod:`gptqflow.framework.state` fields, or of a plugin's slots). Walking the stages in
recipe order, every requirement must be provided by an earlier stage, or by the layer
loop itself:

* a run of consecutive layer stages is one layer loop; it needs ``model`` and provides
  ``layer.inputs``, ``group.inputs`` and ``layer.outputs`` to its stages, computed
  from ``samples`` (so those three need ``samples`` earlier in the pipeline);
* ``layer.*`` and ``group.*`` state lives only inside its loop: a whole-model stage
  cannot require it, and a later loop starts without it.

Nothing here knows a stage by name: the messages name the providers found in the
registry. Problems carry the stage's key path (``stages.solve``), which lint turns into
``file:line:col``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from gptqflow.framework.registry import registered
from gptqflow.framework.stage import StageConfig

LOOP_NEEDS = "model"
LOOP_INPUTS = ("layer.inputs", "group.inputs", "layer.outputs")
INPUTS_FROM = "samples"


@dataclass(frozen=True)
class Violation:
    """One unmet requirement: the entry's key path and what is wrong, in words."""

    path: str
    message: str


def _scoped(name: str) -> bool:
    return name.startswith(("layer.", "group."))


def _providers(name: str) -> str:
    """`` (provided by: partition)``: the registered stages that declare ``name``."""
    names = sorted(s.name for s in registered().values() if name in s.config_cls.PROVIDES)
    return f" (provided by: {', '.join(names)})" if names else ""


def check_order(stages: Sequence[StageConfig]) -> list[Violation]:
    """Every requirement that no earlier stage (or layer loop) provides."""
    specs = registered()
    have: set[str] = set()
    ended: dict[str, str] = {}  # per-layer state -> the whole-model stage that ended its loop
    out: list[Violation] = []
    in_loop = False
    for cfg in stages:
        where = f"stages.{cfg.id or cfg.stage}"
        per_layer = specs[cfg.stage].per_layer
        if per_layer and not in_loop:  # a layer loop starts here
            in_loop = True
            if LOOP_NEEDS not in have:
                out.append(
                    Violation(
                        where,
                        f"'{cfg.stage}' runs in the layer loop, which needs '{LOOP_NEEDS}' "
                        f"from an earlier stage{_providers(LOOP_NEEDS)}",
                    )
                )
            if INPUTS_FROM in have:
                have.update(LOOP_INPUTS)
        elif not per_layer and in_loop:  # the loop ended: its per-layer state is gone
            in_loop = False
            ended.update({n: cfg.id or cfg.stage for n in have if _scoped(n)})
            have = {n for n in have if not _scoped(n)}
        for need in sorted(cfg.requires() - have):
            if per_layer and need in ended:
                msg = (
                    f"'{cfg.stage}' requires '{need}', which exists only inside the layer loop "
                    f"that made it; the whole-model stage '{ended[need]}' ends that loop before "
                    f"'{cfg.id or cfg.stage}': move one of them"
                )
            else:
                msg = _unmet(cfg, need, per_layer)
            out.append(Violation(where, msg))
        have.update(cfg.provides())
    return out


def _unmet(cfg: StageConfig, need: str, per_layer: bool) -> str:
    head = f"'{cfg.stage}' requires '{need}'"
    if _scoped(need) and not per_layer:
        return (
            f"{head}, which exists only inside a layer loop; '{cfg.stage}' is a whole-model stage"
        )
    if need in LOOP_INPUTS:
        return (
            f"{head}: the layer loop computes it from '{INPUTS_FROM}', which no earlier stage "
            f"provides{_providers(INPUTS_FROM)}"
        )
    return f"{head}, which no earlier stage provides{_providers(need)}; move it after one that does"
