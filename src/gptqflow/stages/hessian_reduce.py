"""``hessian-reduce``: plan who solves which rows, and sum the Hessian where it is needed.

Consumes: ``step.hessian`` (this rank's float64 sum and token count).
Produces: ``step.plan`` (row slices per rank, from the cost model: see
:mod:`gptqflow.gptq.plan`), ``step.shared_factor`` (whether every rank takes part
in the group's factorisation) and ``step.full_hessian`` (float32, the global sum
divided by the global token count) on every rank.
Collectives: one asynchronous all-reduce of the sum and one of the token count,
both issued before either is waited on. At world size 1 they are no-ops.

The plan is a pure function of the group's shapes and the world size, so every
rank computes the same plan without talking (see :mod:`gptqflow.gptq.plan`).

```yaml
- stage: hessian-reduce
```
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

import torch
from pydantic import Field

from gptqflow.framework.distributed import DistContext
from gptqflow.framework.errors import GptqflowError
from gptqflow.framework.registry import Stage, StageConfig, register_stage
from gptqflow.framework.state import GroupStep, PipelineState
from gptqflow.gptq.cost import CostModel
from gptqflow.gptq.hessian import HessianSum
from gptqflow.gptq.plan import plan_solve, split_rows


class HessianReduceStage(Stage):
    config: HessianReduceConfig

    def __init__(self, config: HessianReduceConfig) -> None:
        super().__init__(config)
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
                    f"hessian-reduce.cost_model={path!r}: cannot read it: {exc}"
                ) from exc
            ctx.check_same("the cost model", json.dumps(cost.to_dict(), sort_keys=True))
            self._cost = cost
        return self._cost

    def run_step(self, state: PipelineState, step: GroupStep, ctx: DistContext) -> None:
        if self.config.planner == "cost":
            solve = plan_solve(step.rows, step.cols, ctx.world_size, self.cost_model(ctx))
            step.plan, step.shared_factor = list(solve.slices), solve.shared_factor
        else:
            step.plan = split_rows(
                step.rows, ctx.world_size, min_rows=self.config.min_rows_per_rank
            )
        count = torch.tensor(
            [step.hessian.count], dtype=torch.float64, device=step.hessian.sum.device
        )
        total, h1 = ctx.all_reduce_sum(step.hessian.sum)
        tokens, h2 = ctx.all_reduce_sum(count)
        h1.wait()
        h2.wait()
        summed = HessianSum(total.to(step.hessian.sum.device), int(tokens.item()))
        step.full_hessian = summed.finalize()
        step.hessian = summed


@register_stage("hessian-reduce", HessianReduceStage)
class HessianReduceConfig(StageConfig):
    """Plan which rank solves which rows; sum per-rank Hessian sums and token counts."""

    phase = "layer"
    stage: Literal["hessian-reduce"] = "hessian-reduce"
    planner: Literal["cost", "even"] = Field(
        "cost",
        description="cost: pick a local or shared factorisation and cut rows so the slowest "
        "rank's predicted seconds (factorisation + sweep) are minimal; even: equal rows per "
        "rank, each factorising alone.",
    )
    cost_model: str | None = Field(
        None, description="Cost-model JSON from bench/fit_cost.py; null = the bundled CPU fit."
    )
    min_rows_per_rank: int = Field(
        64,
        ge=1,
        description="planner=even: a group is split over at most rows/min_rows_per_rank ranks.",
        json_schema_extra={"unit": "rows"},
    )
