"""``hessian-reduce``: plan who solves which rows, and sum the Hessian where it is needed.

Consumes: ``step.hessian`` (this rank's float64 sum and token count).
Produces: ``step.plan`` (row slices per rank) and ``step.full_hessian`` (float32,
the global sum divided by the global token count) on every rank the plan uses.
Collectives: one asynchronous all-reduce of the sum and one of the token count,
both issued before either is waited on. At world size 1 they are no-ops.

The plan is a pure function of the group's shapes and the world size, so every
rank computes the same plan without talking (see :mod:`gptqflow.gptq.plan`).

```yaml
- stage: hessian-reduce
```
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from gptqflow.framework.distributed import DistContext
from gptqflow.framework.registry import Stage, StageConfig, register_stage
from gptqflow.framework.state import GroupStep, PipelineState
from gptqflow.gptq.hessian import HessianSum
from gptqflow.gptq.plan import split_rows


class HessianReduceStage(Stage):
    config: HessianReduceConfig

    def run_step(self, state: PipelineState, step: GroupStep, ctx: DistContext) -> None:
        step.plan = split_rows(step.rows, ctx.world_size, min_rows=self.config.min_rows_per_rank)
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
    """Sum per-rank Hessian sums (sum of sums, sum of token counts) for the solving ranks."""

    phase = "layer"
    stage: Literal["hessian-reduce"] = "hessian-reduce"
    min_rows_per_rank: int = Field(
        64, ge=1, description="A group is split over at most rows/min_rows_per_rank ranks (rows)."
    )
