"""``hessian-reduce``: every rank's Hessian sums added up, divided once by all tokens.

Requires: ``group.hessian`` (this rank's float64 sum and token count). Provides:
``group.reduced_hessian`` (float32, the global sum divided by the global token count;
None for a group no token reached, e.g. an expert the router never chose) and
``group.tokens`` (that count) on every rank. ``group.hessian`` is released once divided: the float64 sum is the
largest tensor of a group (``cols² x 8`` bytes: 6.6 GB for a 28672-column down_proj),
and nothing after the division needs it.
Collectives: one all-reduce per group of the accumulated strips of the sum with the
token count appended (``HessianSum.packed``: the lower triangle is never accumulated,
so about half the bytes of the whole matrix). At world size 1 it is a no-op.

```yaml
stages:
  hessian-reduce: {}
```
"""

from __future__ import annotations

from typing import Literal

from gptqflow.framework.distributed import DistContext
from gptqflow.framework.registry import register_stage
from gptqflow.framework.stage import Stage, StageConfig
from gptqflow.framework.state import GroupRun


class HessianReduceStage(Stage):
    config: HessianReduceConfig

    def on_group(self, group: GroupRun, ctx: DistContext) -> None:
        local = group.hessian
        assert local is not None, "contracts: hessian-reduce requires group.hessian"
        total, handle = ctx.all_reduce_sum(local.packed())
        handle.wait()
        local.load_packed(total.to(local.sum.device))  # the global sum, in place
        del total, handle  # the packed copy (half a float64 matrix) goes before the division
        group.tokens = local.count
        # A group no token reached (an expert the router never chose) has no Hessian;
        # solve's min_tokens rule rounds it to nearest.
        group.reduced_hessian = local.finalize() if local.count else None
        group.hessian = None


@register_stage("hessian-reduce", HessianReduceStage)
class HessianReduceConfig(StageConfig):
    """Sum per-rank Hessian sums and token counts; divide once."""

    stage: Literal["hessian-reduce"] = "hessian-reduce"
    REQUIRES = ("group.hessian",)
    PROVIDES = ("group.reduced_hessian",)
