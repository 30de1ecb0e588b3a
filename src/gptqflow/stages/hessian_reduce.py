"""``hessian-reduce``: every rank's Hessian sums added up, divided once by all tokens.

Requires: ``group.hessian`` (this rank's float64 sum and token count). Provides:
``group.reduced_hessian`` (float32, the global sum divided by the global token count)
on every rank, and ``group.hessian`` becomes the global sum.
Collectives: one asynchronous all-reduce of the sum and one of the token count, both
issued before either is waited on. At world size 1 they are no-ops.

```yaml
stages:
  hessian-reduce: {}
```
"""

from __future__ import annotations

from typing import Literal

import torch

from gptqflow.framework.distributed import DistContext
from gptqflow.framework.registry import register_stage
from gptqflow.framework.stage import Stage, StageConfig
from gptqflow.framework.state import GroupRun
from gptqflow.gptq.hessian import HessianSum


class HessianReduceStage(Stage):
    config: HessianReduceConfig

    def on_group(self, group: GroupRun, ctx: DistContext) -> None:
        local = group.hessian
        assert local is not None, "contracts: hessian-reduce requires group.hessian"
        count = torch.tensor([local.count], dtype=torch.float64, device=local.sum.device)
        total, h1 = ctx.all_reduce_sum(local.sum)
        tokens, h2 = ctx.all_reduce_sum(count)
        h1.wait()
        h2.wait()
        summed = HessianSum(total.to(local.sum.device), int(tokens.item()))
        group.reduced_hessian = summed.finalize()
        group.hessian = summed


@register_stage("hessian-reduce", HessianReduceStage)
class HessianReduceConfig(StageConfig):
    """Sum per-rank Hessian sums and token counts; divide once."""

    stage: Literal["hessian-reduce"] = "hessian-reduce"
    REQUIRES = ("group.hessian",)
    PROVIDES = ("group.reduced_hessian",)
