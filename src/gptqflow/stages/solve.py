"""``solve``: plan who solves which rows, then GPTQ, GPTAQ or round-to-nearest this rank's slices.

Reads the ``scheme`` group (bits, group size, symmetry, act-order, observer,
``on_failure``). Requires: ``group.reduced_hessian`` (for ``method: gptq`` or
``gptaq``, ``report_loss``, or ``scheme.observer: hessian``); for ``method: gptaq``
also ``group.reduced_cross`` (the ``float-path`` stage); the group's float weights.

``gptaq`` (:mod:`gptqflow.gptq.gptaq`) solves against the float model's inputs: every
rank with rows of a module computes the module's whole asymmetric target
``W (I + alpha · D H⁻¹)`` (the same on every rank, bit for bit), then runs GPTQ's
sweep on its rows of it, with the same factor and plan as GPTQ. Provides: ``group.plan`` (row slices per
rank and whether the ranks share the factorisation: see :mod:`gptqflow.gptq.plan`) and
``group.results`` (this rank's slices). Collectives: none for a local factorisation;
for a shared one, one asynchronous broadcast per factor panel, in which every rank
takes part (:class:`RankExchange`). The plan is a pure function of the group's shapes
and the world size, so every rank computes the same plan without talking (a wave of
independent groups, an MoE block's experts, is planned together: whole experts placed
on ranks by predicted cost, see :func:`~gptqflow.gptq.plan.plan_wave`); the solver
itself is a pure function of (weight, Hessian, quant args): how panels travel is
handed to it.

Numerics are checked where a problem first shows, so it is reported with its layer
and module and never reaches a checkpoint: a Hessian with NaN/Inf (non-finite
activations entering the group) and non-finite float weights stop the run on every
rank (the Hessian is the reduced one, the weights are the same everywhere, so all
ranks decide alike); so does a non-finite solve result. A Hessian that stays
non positive-definite after the dampening retries stops the run too, unless
``on_failure: rtn``: then the group's modules are rounded to nearest, logged, and
listed under ``fallbacks`` in report.json. That decision depends only on the
reduced Hessian, so every rank makes the same one.

The Hessian's factor is computed once per group (on each rank with rows, or by all
ranks together) and shared by all of the rank's slices (q, k and v reuse one
factorisation).

```yaml
stages:
  solve:
    method: gptq        # gptaq: against the float model's inputs (needs float-path);
                        # rtn: round to nearest (needs no Hessian, no calibration)
    dampening: 0.01
    block_size: 128
```
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Literal

import torch
from pydantic import Field

from gptqflow.errors import GptqflowError
from gptqflow.framework.distributed import DistContext, Handle
from gptqflow.framework.registry import register_stage
from gptqflow.framework.schema import Problem, Recipe
from gptqflow.framework.stage import Stage, StageConfig
from gptqflow.framework.state import GroupRun, LayerRun
from gptqflow.gptq.cholesky import LOCAL, PanelExchange
from gptqflow.gptq.cost import CostModel
from gptqflow.gptq.gptaq import asymmetric_target
from gptqflow.gptq.numerics import count_nonfinite
from gptqflow.gptq.plan import RowSlice, plan_solve, plan_wave, split_rows
from gptqflow.gptq.quantizer import quantization_loss, rtn_quantize
from gptqflow.gptq.solver import CholeskyError, HessianFactor, prepare_factor, solve_rows
from gptqflow.gptq.types import QuantResult
from gptqflow.modeling.targets import ExpertTarget
from gptqflow.stages.float_path import REDUCED_CROSS

log = logging.getLogger("gptqflow")


class SolveStage(Stage):
    config: SolveConfig
    BALANCED_WORK = True  # the plan divides this work between the ranks

    def __init__(self, config: SolveConfig, recipe: Recipe) -> None:
        super().__init__(config, recipe)
        c = config
        self.args = recipe.scheme.quant_args(
            block_size=c.block_size, dampening=c.dampening, max_damp_retries=c.max_damp_retries
        )
        self._cost: CostModel | None = None

    def cost_model(self, ctx: DistContext) -> CostModel:
        """The cost model, loaded once; ranks check they hold the same constants."""
        if self._cost is None:
            path = self.config.cost_model
            try:
                cost = (
                    CostModel.default()
                    if path is None
                    else CostModel.from_json(Path(path).read_text())
                )
            except (OSError, ValueError) as exc:
                raise GptqflowError(
                    f"stages.{self.config.id}.cost_model={path!r}: cannot read it: {exc}"
                ) from exc
            ctx.check_same("the cost model", json.dumps(cost.to_dict(), sort_keys=True))
            self._cost = cost
        return self._cost

    def before_layer(self, layer: LayerRun, ctx: DistContext) -> None:
        layer.report["shared_factor"] = []  # groups whose factorisation every rank shared

    def plan(self, group: GroupRun, ctx: DistContext) -> None:
        """Who solves which rows: the cost planner for GPTQ, equal rows otherwise."""
        if self.config.method in SOLVERS and self.config.planner == "cost":
            solve = plan_solve(group.rows, group.cols, ctx.world_size, self.cost_model(ctx))
            group.plan, group.shared_factor = list(solve.slices), solve.shared_factor
        else:
            group.plan = split_rows(
                group.rows, ctx.world_size, min_rows=self.config.min_rows_per_rank
            )
        _note_shared_factor(group)

    def plan_groups(self, groups: Sequence[GroupRun], ctx: DistContext) -> None:
        """A wave's placement, made before ``hessian-reduce`` runs so that it can send each
        expert's Hessian to its owner only. The token counts that decide the min_tokens
        rule come from the groups' inputs, summed over ranks: the counts the Hessians
        will have (set as ``group.tokens`` already)."""
        if len(groups) > 1:
            if all(g.inputs is not None for g in groups):  # else: rtn without calibration
                local = [sum(x.numel() // x.shape[-1] for x in g.input_chunks) for g in groups]
                for group, n in zip(groups, ctx.sum_values(local)):
                    group.tokens = int(n)  # so hessian-reduce need not count them again
            self.plan_wave(groups, ctx)

    def plan_wave(self, groups: Sequence[GroupRun], ctx: DistContext) -> None:
        """A wave of independent groups (an MoE block's experts): whole groups onto ranks.

        :func:`~gptqflow.gptq.plan.plan_wave` packs them by predicted seconds (a group
        the min_tokens rule rounds to nearest costs almost nothing), or cuts each over
        the ranks when that is faster; the ``even`` planner cuts every group. The
        layer's report.json entry gets one ``waves`` item: groups per rank.
        """
        if self.config.method in SOLVERS and self.config.planner == "even":
            for group in groups:
                self.plan(group, ctx)
            return
        solves = [
            self.config.method in SOLVERS
            and (g.tokens is None or g.tokens >= self.config.min_tokens)
            for g in groups
        ]
        plans, _ = plan_wave(
            [(g.rows, g.cols) for g in groups], ctx.world_size, self.cost_model(ctx), solves=solves
        )
        per_rank = [0] * ctx.world_size
        for group, plan in zip(groups, plans):
            group.plan, group.shared_factor = list(plan.slices), plan.shared_factor
            for r in {s.rank for s in plan.slices}:
                per_rank[r] += 1
            _note_shared_factor(group)
        groups[0].layer.report.setdefault("waves", []).append(
            {"groups": len(groups), "groups_per_rank": per_rank}
        )

    def on_group(self, group: GroupRun, ctx: DistContext) -> None:
        self.plan(group, ctx)
        self._solve(group, ctx)

    def on_groups(self, groups: Sequence[GroupRun], ctx: DistContext) -> None:
        if len(groups) == 1:
            self.on_group(groups[0], ctx)
            return
        if not all(g.plan for g in groups):  # not yet planned in plan_groups
            self.plan_wave(groups, ctx)
        for group in groups:
            self._solve(group, ctx)

    def _solve(self, group: GroupRun, ctx: DistContext) -> None:
        """This rank's slices of the group's plan: GPTQ, GPTAQ or round-to-nearest."""
        args = self.args
        state = group.layer.state
        mine = [s for s in group.plan if s.rank == ctx.rank]
        check_finite_inputs(group)
        gptq = self.config.method in SOLVERS
        exchange: PanelExchange = RankExchange(ctx) if group.shared_factor else LOCAL
        factor = None
        fallback = self._too_few_tokens(group, ctx)
        # A rank without rows still takes part in a shared factorisation.
        if gptq and fallback is None and (mine or group.shared_factor):
            assert group.reduced_hessian is not None
            try:
                factor = prepare_factor(group.reduced_hessian, args, exchange=exchange)
            except CholeskyError as exc:
                fallback = self._cholesky_failed(group, exc, ctx)
        if not mine:
            return
        # All of this rank's slices share the Hessian, so they are stacked into one
        # sweep: rows are independent given the factor (a slice of a solve is
        # bit-identical to solving it alone), and the per-column cost is paid once.
        w = torch.cat([group.weights[s.module].data[s.start : s.stop] for s in mine])
        if factor is None:
            hessian = group.reduced_hessian if args.observer == "hessian" else None
            if args.observer == "hessian" and hessian is None:  # no token: no weights for it
                res = rtn_quantize(w, replace(args, observer="minmax"))
            else:
                res = rtn_quantize(w, args, hessian)
        else:
            res = solve_rows(self._target(group, mine, w, factor), factor, args)
        check_finite_result(group, mine, res)
        if fallback is not None:
            state.fallbacks += [
                {"layer": group.layer.index, "module": group.names[m], "reason": fallback}
                for m in sorted({s.module for s in mine})
            ]
        offset = 0
        for s in mine:
            part = _rows(res, offset, offset + s.rows)
            if self.config.report_loss and group.reduced_hessian is not None:
                part.loss = quantization_loss(
                    w[offset : offset + s.rows],
                    res.dequant[offset : offset + s.rows],
                    group.reduced_hessian,
                )
            group.results[(s.module, s.start)] = part
            offset += s.rows

    def _target(
        self, group: GroupRun, mine: list[RowSlice], w: torch.Tensor, factor: HessianFactor
    ) -> torch.Tensor:
        """The rows the sweep quantizes: the float weights (gptq) or GPTAQ's target.

        GPTAQ's target is computed for each whole module (its rows depend only on
        themselves, and every rank computes the same product), then sliced, so a
        rank's rows do not depend on how many it holds.
        """
        if self.config.method != "gptaq":
            return w
        cross, alpha = group.slots[REDUCED_CROSS], self.config.alpha
        targets = {
            m: asymmetric_target(group.weights[m].data, cross, factor, alpha)
            for m in sorted({s.module for s in mine})
        }
        return torch.cat([targets[s.module][s.start : s.stop] for s in mine])

    def _too_few_tokens(self, group: GroupRun, ctx: DistContext) -> str | None:
        """The min_tokens rule: a group that saw too few tokens is rounded to nearest.

        Only an MoE expert can see fewer tokens than the calibration set holds (the
        router sends it some tokens, or none). Its token count (all ranks) goes into the
        layer's ``expert_tokens`` in report.json; the decision depends on that count
        only, so every rank makes the same one.
        """
        tokens = group.tokens
        if tokens is None:  # no statistics (rtn without calibration)
            return None
        experts = [t for t in group.modules if isinstance(t, ExpertTarget)]
        if experts:
            counts = group.layer.report.setdefault("expert_tokens", {})
            first = experts[0]
            counts[first.name.removeprefix(group.layer.name + ".").rsplit(".", 1)[0]] = tokens
        if self.config.method not in SOLVERS or tokens >= self.config.min_tokens:
            return None
        reason = (
            f"saw {tokens} calibration token(s), fewer than stages.{self.config.id}.min_tokens="
            f"{self.config.min_tokens}: round-to-nearest"
        )
        if ctx.rank == min(s.rank for s in group.plan):
            log.warning("layer %d, %s: %s", group.layer.index, ", ".join(group.names), reason)
        return reason

    def _cholesky_failed(self, group: GroupRun, exc: CholeskyError, ctx: DistContext) -> str:
        """Raise (``on_failure: error``) or return the reason for a round-to-nearest fallback."""
        where = f"layer {group.layer.index}, {', '.join(group.names)}"
        if self.recipe.scheme.on_failure == "error":
            raise GptqflowError(
                f"{where}: the Hessian is not positive definite: {exc}. Calibrate on more "
                "tokens (dataset.num_samples, dataset.seq_len), raise "
                f"stages.{self.config.id}.max_damp_retries, or set scheme.on_failure=rtn to "
                "round these modules to nearest instead"
            ) from exc
        reason = f"Hessian not positive definite: {exc}"
        if ctx.rank == min(s.rank for s in group.plan):  # one warning per group, not per rank
            log.warning("%s: round-to-nearest instead of GPTQ (%s)", where, reason)
        return reason


def _note_shared_factor(group: GroupRun) -> None:
    """List a group whose factorisation every rank shares in the layer's report entry."""
    if group.shared_factor:
        group.layer.report["shared_factor"].append(
            "+".join(n.rsplit(".", 1)[-1] for n in group.names)
        )


def check_finite_inputs(group: GroupRun) -> None:
    """Stop at the first layer whose Hessian or float weights hold NaN/Inf.

    The reduced Hessian and the float weights are the same on every rank, so every
    rank stops here with the same message. A non-finite Hessian means non-finite
    activations entering the group (from the float model itself, or from the
    already quantized layers before it); GPTQ (or rounding) of them would only
    write NaN into the checkpoint.
    """
    where = f"layer {group.layer.index}"
    h = group.reduced_hessian
    if h is not None and (bad := count_nonfinite(h)):
        raise GptqflowError(
            f"{where}, {', '.join(group.names)}: the Hessian has {bad} NaN/Inf entries of "
            f"{h.numel()}: the activations entering these modules are not finite, or so large "
            "that their squares overflow float32 (check the model's weights and dtype, e.g. "
            "model.dtype=float32 if float16 overflows)"
        )
    for name, weight in zip(group.names, group.weights):
        if bad := count_nonfinite(weight):
            raise GptqflowError(
                f"{where}, {name}: the float weights have {bad} NaN/Inf values of "
                f"{weight.numel()}; the model checkpoint is damaged or overflowed its dtype"
            )


def check_finite_result(group: GroupRun, mine: list[RowSlice], res: QuantResult) -> None:
    """Refuse a solve result with NaN/Inf scales or weights, naming the first bad module."""
    bad_rows = ~(torch.isfinite(res.scale).all(dim=1) & torch.isfinite(res.dequant).all(dim=1))
    if not bool(bad_rows.any()):
        return
    offset = 0
    for s in mine:
        if bool(bad_rows[offset : offset + s.rows].any()):
            raise GptqflowError(
                f"layer {group.layer.index}, {group.names[s.module]}: the quantized weights "
                f"(rows {s.start}..{s.stop - 1}) have NaN/Inf values; refusing to use them"
            )
        offset += s.rows


def _rows(res: QuantResult, start: int, stop: int) -> QuantResult:
    """Rows ``[start, stop)`` of a stacked result (g_idx and damp are shared).

    Without the dequantized weights: broadcast installs every rank's rows from the
    integers, and a float copy of each solved group kept until the layer ends is what
    made a wide layer's peak grow group by group.
    """
    return QuantResult(
        qweight=res.qweight[start:stop],
        scale=res.scale[start:stop],
        zero_point=res.zero_point[start:stop],
        g_idx=res.g_idx,
        dequant=torch.empty(0, dtype=res.dequant.dtype),
        loss=float("nan"),
        damp=res.damp,
    )


#: The methods that solve with the Hessian's factor (the others round to nearest).
SOLVERS = ("gptq", "gptaq")


@register_stage("solve", SolveStage)
class SolveConfig(StageConfig):
    """Quantize each group's weights with the ``scheme`` group's settings: GPTQ, GPTAQ or RTN."""

    stage: Literal["solve"] = "solve"
    PROVIDES = ("group.plan", "group.results")
    method: Literal["gptq", "gptaq", "rtn"] = Field(
        "gptq",
        description="gptq (needs the group's reduced Hessian); gptaq (GPTQ against the float "
        "model's inputs: also needs group.reduced_cross from the float-path stage); or rtn "
        "(round-to-nearest baseline: no Hessian, no calibration).",
    )
    alpha: float = Field(
        0.25,
        ge=0,
        le=1,
        description="gptaq: fraction of the asymmetric correction in the target "
        "W (I + alpha·D H⁻¹) (0 = GPTQ, 1 = the exact least-squares target); read by gptaq only.",
        json_schema_extra={"unit": "fraction"},
    )
    block_size: int = Field(
        128,
        ge=1,
        description="Columns per lazy-batch block of the sweep.",
        json_schema_extra={"unit": "columns"},
    )
    dampening: float = Field(
        0.01,
        gt=0,
        lt=1,
        description="Added to the Hessian diagonal, as a fraction of its mean.",
        json_schema_extra={"unit": "fraction of mean diagonal"},
    )
    max_damp_retries: int = Field(
        6,
        ge=0,
        description="Cholesky retries, each with 10x the dampening.",
        json_schema_extra={"unit": "retries"},
    )
    report_loss: bool = Field(
        False,
        description="Compute tr((W-Q)H(W-Q)ᵀ) per module for report.json (costs about one more "
        "sweep's worth of matmuls).",
    )
    planner: Literal["cost", "even"] = Field(
        "cost",
        description="gptq: cost = pick a local or shared factorisation and cut rows so the "
        "slowest rank's predicted seconds (factorisation + sweep) are minimal; even = equal "
        "rows per rank, each factorising alone. rtn always cuts equal rows.",
    )
    cost_model: str | None = Field(
        None, description="Cost-model JSON from bench/fit_cost.py; null = the bundled CPU fit."
    )
    min_tokens: int = Field(
        16,
        ge=1,
        description="A group whose modules saw fewer calibration tokens than this (all ranks) "
        "is rounded to nearest instead of solved, and listed under fallbacks in report.json. "
        "Only MoE experts see fewer tokens than the calibration set: the router sends each "
        "expert its share, or none.",
        json_schema_extra={"unit": "tokens"},
    )
    min_rows_per_rank: int = Field(
        64,
        ge=1,
        description="Equal-rows plan: a group is split over at most rows/min_rows_per_rank ranks.",
        json_schema_extra={"unit": "rows"},
    )

    def requires(self) -> frozenset[str]:
        hessian = self.method in SOLVERS or self.report_loss
        needs = {"group.reduced_hessian"} if hessian else set()
        if self.method == "gptaq":
            needs.add(REDUCED_CROSS.name)
        return frozenset(needs)

    def preflight(self, recipe: Recipe) -> list[Problem]:
        """The hessian observer weighs errors with the Hessian: a pipeline without one cannot."""
        if recipe.scheme.observer != "hessian" or "group.reduced_hessian" in self.requires():
            return []
        here = next((i for i, c in enumerate(recipe.stages) if c is self), len(recipe.stages))
        if any("group.reduced_hessian" in c.provides() for c in recipe.stages[:here]):
            return []
        return [
            Problem(
                "scheme.observer",
                f"'hessian' weighs each group's error with the Hessian, but method "
                f"{self.method!r} runs without one here (no earlier stage provides "
                "group.reduced_hessian); use observer mse or minmax, or calibrate "
                "(the calibrate and hessian-reduce stages before solve, e.g. method=gptq)",
            )
        ]


class RankExchange:
    """Panels of a shared factorisation, owned round-robin by all ranks and broadcast.

    Implements :class:`~gptqflow.gptq.cholesky.PanelExchange` with the
    ``DistContext`` verbs: panel ``k`` belongs to rank ``k % world_size``, which
    broadcasts it (asynchronously) as soon as it is factorised.
    """

    def __init__(self, ctx: DistContext) -> None:
        self.ctx = ctx

    def owns(self, k: int) -> bool:
        return k % self.ctx.world_size == self.ctx.rank

    def share(self, k: int, panel: torch.Tensor) -> _Arrival:
        bufs, handles = self.ctx.broadcast_from(k % self.ctx.world_size, [panel])
        return _Arrival(panel, bufs[0], handles)


class _Arrival:
    """A panel in flight; ``wait`` leaves it in the panel (copied if it travelled elsewhere)."""

    def __init__(self, panel: torch.Tensor, buf: torch.Tensor, handles: list[Handle]) -> None:
        self.panel, self.buf, self.handles = panel, buf, handles

    def wait(self) -> None:
        for h in self.handles:
            h.wait()
        if self.buf is not self.panel:
            self.panel.copy_(self.buf)
