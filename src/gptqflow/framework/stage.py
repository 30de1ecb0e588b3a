"""The stage contract: a frozen config that declares its data flow, and an implementation with hooks.

A stage is two classes in one file under ``stages/`` (or in another installed package):

* a :class:`StageConfig` subclass: the pydantic model of its recipe entry
  (``extra="forbid"``, frozen). It also declares, by name, the pieces of pipeline state
  the stage **requires** (must exist before it runs) and **provides** (exist after it
  ran); the names are the fields documented in :mod:`gptqflow.framework.state`
  (``model``, ``samples``, ``group.hessian`` ...) or a plugin's own. Validation and
  ``gptqflow lint`` check the order from these declarations alone
  (:mod:`gptqflow.framework.contracts`), before anything heavy runs.
* a :class:`Stage` subclass: the implementation. It overrides the hooks it needs; all
  are no-ops by default.

  ==========================  ==========================================================
  ``run(state, ctx)``         whole-model work, once, at the stage's place in the recipe
                              (load, evaluate, save)
  ``before_layer(layer, ctx)``  per decoder layer, before its forward (e.g. smoothing)
  ``on_group(group, ctx)``    per group of modules that read one input, the moment the
                              layer's forward reaches it (statistics, reduce, solve,
                              install)
  ``on_groups(groups, ctx)``  per *wave*: groups that are independent of each other
                              and reached together (one MoE block's experts); by
                              default ``on_group`` for each, in order
  ``plan_groups(groups, ctx)``  per wave, before any stage's ``on_groups``: who does
                              what (solve's placement of experts on ranks), for the
                              stages before the planner to use
  ``after_layer(layer, ctx)``  per decoder layer, after its forward
  ==========================  ==========================================================

  A stage that overrides any of the layer hooks is a *layer stage*: consecutive
  layer stages form one layer loop (:mod:`gptqflow.framework.layerloop`), and at every
  hook point they run in recipe order.

  The loop always calls ``on_groups``; a plain group is a wave of one. A stage
  overrides ``on_groups`` when it does better with the whole wave at hand: one
  collective for many small groups, or whole groups placed on different ranks
  instead of every group's rows cut over all of them.

Resume points (:mod:`gptqflow.framework.resume`) ask stages for what they must keep:
``save_layer``/``restore_layer`` for what a layer stage changed in a finished layer
(quantized codes, a norm scale ...), ``save_result``/``restore_result`` for a whole-model
stage before the loop whose result can be reused instead of recomputed (the baseline
perplexity). A stage that keeps nothing needs neither.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, ClassVar

from pydantic import BaseModel, ConfigDict, Field

if TYPE_CHECKING:
    from gptqflow.framework.distributed import DistContext
    from gptqflow.framework.schema import Problem, Recipe
    from gptqflow.framework.state import GroupRun, LayerRun, PipelineState


class StageConfig(BaseModel):
    """Base of every stage config: frozen, unknown keys rejected, described fields.

    ``id`` is not written by users: it is the stage's key in the recipe's ``stages``
    mapping, filled in by validation (report.json and resume points use it).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    stage: str = Field(description="The registered stage this entry runs (default: its key).")
    id: str = Field("", description="The entry's key in `stages` (set by validation).")

    #: State this stage reads; each name must be provided by an earlier stage (or the loop).
    REQUIRES: ClassVar[tuple[str, ...]] = ()
    #: State this stage writes.
    PROVIDES: ClassVar[tuple[str, ...]] = ()

    def requires(self) -> frozenset[str]:
        """What must exist before this stage runs; override when it depends on a field."""
        return frozenset(self.REQUIRES)

    def provides(self) -> frozenset[str]:
        """What exists after this stage ran; override when it depends on a field."""
        return frozenset(self.PROVIDES)

    def preflight(self, recipe: Recipe) -> list[Problem]:
        """What is wrong on disk for this stage (a missing input file, a checkpoint in the
        way), found before any model is loaded; key paths name what to change."""
        return []


_LAYER_HOOKS = (
    "before_loop",
    "before_layer",
    "plan_groups",
    "on_group",
    "on_groups",
    "after_layer",
    "after_loop",
)


class Stage:
    """A stage implementation, built from its frozen config and the validated recipe."""

    #: The time this stage spends in ``on_group`` is work the ranks divide between them
    #: (the layer's ``imbalance`` in report.json is measured on it).
    BALANCED_WORK: ClassVar[bool] = False

    def __init__(self, config: Any, recipe: Recipe) -> None:
        self.config = config
        self.recipe = recipe

    @classmethod
    def is_layer_stage(cls) -> bool:
        """Whether this stage implements any per-layer hook (it then runs in a layer loop)."""
        return any(getattr(cls, h) is not getattr(Stage, h) for h in _LAYER_HOOKS)

    # -------------------------------------------------------------- hooks
    def run(self, state: PipelineState, ctx: DistContext) -> None:
        """Whole-model work, once."""

    def before_loop(self, state: PipelineState, ctx: DistContext) -> None:
        """Once, before the loop's first layer (also when a resumed run restores layers)."""

    def before_layer(self, layer: LayerRun, ctx: DistContext) -> None:
        """Before the layer's forward (its inputs, if the loop computes them, are ready)."""

    def plan_groups(self, groups: Sequence[GroupRun], ctx: DistContext) -> None:
        """Decide who does what for these groups, before any stage's :meth:`on_groups`.

        The loop calls it for every stage that overrides it, in recipe order, and only
        then the stages' ``on_groups``; the groups' inputs are ready. A stage that plans
        the work sets ``group.plan`` here, so that stages before it in the recipe can use
        the plan (``solve`` places a wave's experts on ranks; ``hessian-reduce`` then
        sends each expert's Hessian to its owner only).
        """

    def on_group(self, group: GroupRun, ctx: DistContext) -> None:
        """One group of target modules that read the same input, before they run."""

    def on_groups(self, groups: Sequence[GroupRun], ctx: DistContext) -> None:
        """A wave of independent groups (see the module docstring), before any of them runs.

        Every group's inputs are ready. The default runs :meth:`on_group` for each group
        in order, so a stage that handles one group at a time need not know waves exist.
        """
        for group in groups:
            self.on_group(group, ctx)

    def after_layer(self, layer: LayerRun, ctx: DistContext) -> None:
        """After the layer's forward (its outputs are the next layer's inputs).

        With streamed weights (``state.weights``) the loop drops a changed layer's
        tensors after this hook only if a stage relocated them
        (:meth:`gptqflow.modeling.weights.WeightStore.relocate`); otherwise the layer
        stays in memory.
        """

    def after_loop(self, state: PipelineState, ctx: DistContext) -> None:
        """Once, after the loop's last layer."""

    # -------------------------------------------------------------- resume
    def save_layer(self, layer: LayerRun) -> dict[str, Any] | None:
        """What this stage changed in the finished ``layer`` (tensors, numbers), or None.

        Called on every rank; a resume point stores rank 0's answer, so it must be the
        same on every rank (true of anything installed in the model).
        """
        return None

    def restore_layer(self, layer: LayerRun, saved: dict[str, Any], ctx: DistContext) -> None:
        """Reapply what :meth:`save_layer` returned for this layer (on resume, in layer order)."""

    def save_result(self, state: PipelineState) -> dict[str, Any] | None:
        """A whole-model stage's result (JSON-able) that a resumed run may reuse, or None."""
        return None

    def restore_result(self, state: PipelineState, saved: dict[str, Any]) -> None:
        """Put a result from :meth:`save_result` back instead of running the stage."""
