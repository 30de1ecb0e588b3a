"""``hessian-reduce``: every rank's Hessian sums added up, divided once by all tokens.

Requires: ``group.hessian`` (this rank's float64 sum and token count). Provides:
``group.reduced_hessian`` (float32, the global sum divided by the global token count;
None for a group no token reached, e.g. an expert the router never chose) and
``group.tokens`` (that count) on every rank. ``group.hessian`` is released once
divided: the float64 sum is the largest tensor of a group (its upper strips,
``cols² x 4`` bytes: 3.3 GB for a 28672-column down_proj), and nothing after the
division needs it.
Collectives: one all-reduce per group of the sum's own storage, in place: the
accumulated upper strips with the token count appended (``HessianSum.packed``: the
lower triangle is never accumulated, so about half the bytes of the whole matrix,
and no copy of it is made). The groups of a wave (one MoE block's
experts: hundreds of small Hessians) travel in buckets: their packed sums joined into
one buffer of up to ``bucket_size`` bytes (a group larger than that goes alone), one
all-reduce per bucket. When a stage has already placed each group of the wave on one
rank (``solve`` in its ``plan_groups`` hook packs whole experts onto ranks), only that
rank needs the Hessian: the buckets are per owner and each is reduced to its owner
(half the bytes of an all-reduce; the other ranks get ``reduced_hessian`` None); the
token counts travel in one small all-reduce, unless the planner counted them already.
At world size 1 it is a no-op.

```yaml
stages:
  hessian-reduce:
    bucket_size: 256MB
```
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from pydantic import Field, field_validator

from gptqflow.fileio import parse_size
from gptqflow.framework.distributed import DistContext
from gptqflow.framework.registry import register_stage
from gptqflow.framework.stage import Stage, StageConfig
from gptqflow.framework.state import GroupRun
from gptqflow.gptq.hessian import HessianSum
from gptqflow.gptq.plan import buckets, owner_buckets, single_owners


class HessianReduceStage(Stage):
    config: HessianReduceConfig

    def on_group(self, group: GroupRun, ctx: DistContext) -> None:
        self.on_groups([group], ctx)

    def on_groups(self, groups: Sequence[GroupRun], ctx: DistContext) -> None:
        cap = parse_size(self.config.bucket_size)
        sizes = [_local(g).packed_numel * 8 for g in groups]  # float64 bytes
        owners = (
            single_owners([(g.plan, g.shared_factor) for g in groups])
            if ctx.distributed and len(groups) > 1
            else None
        )
        if owners is None:
            for bucket in buckets(sizes, cap):
                self._reduce([groups[i] for i in bucket], ctx, None)
            return
        # A wave planned before this stage ran (solve's plan_groups), each group on one
        # rank: only that rank needs the Hessian, so it is reduced there (half the bytes
        # of an all-reduce); every rank still learns every group's token count (the
        # planner may have counted them already).
        if any(g.tokens is None for g in groups):
            total = ctx.sum_values([_local(g).count for g in groups])
            for group, n in zip(groups, total):
                group.tokens = int(n)
        for owner, bucket in owner_buckets(sizes, owners, cap):
            self._reduce([groups[i] for i in bucket], ctx, owner)

    @staticmethod
    def _reduce(groups: list[GroupRun], ctx: DistContext, owner: int | None) -> None:
        """One collective for the packed sums of ``groups``; then each divided once.

        ``owner`` None: an all-reduce, and every rank divides. Otherwise a reduction to
        ``owner``, the only rank that divides (the others' sums are dropped); the token
        counts are already on every group.
        """
        sums = [_local(g) for g in groups]
        packed = torch.cat([h.packed() for h in sums]) if len(sums) > 1 else sums[0].packed()
        if owner is None:
            total, handle = ctx.all_reduce_sum(packed)
        else:
            total, handle = ctx.reduce_sum_to(owner, packed)
        handle.wait()
        holds = owner is None or ctx.rank == owner
        offset = 0
        for local in sums:
            n = local.packed_numel
            if holds:
                local.load_packed(total[offset : offset + n].to(local.device))  # in place
            offset += n
        del packed, total, handle  # a bucket's joined copy goes before the divisions
        for group, local in zip(groups, sums):
            if owner is None:
                group.tokens = local.count
            # A group no token reached (an expert the router never chose) has no Hessian;
            # solve's min_tokens rule rounds it to nearest.
            group.reduced_hessian = local.finalize() if holds and local.count else None
            group.hessian = None


def _local(group: GroupRun) -> HessianSum:
    assert group.hessian is not None, "contracts: hessian-reduce requires group.hessian"
    return group.hessian


@register_stage("hessian-reduce", HessianReduceStage)
class HessianReduceConfig(StageConfig):
    """Sum per-rank Hessian sums and token counts; divide once."""

    stage: Literal["hessian-reduce"] = "hessian-reduce"
    REQUIRES = ("group.hessian",)
    PROVIDES = ("group.reduced_hessian",)
    bucket_size: str = Field(
        "256MB",
        description="Most bytes of one all-reduce that carries the Hessians of a wave's groups "
        "(an MoE block's experts) together (500MB, 1GiB ...): fewer, larger messages, and at "
        "most this much extra memory for the joined buffer. A larger Hessian goes alone.",
        json_schema_extra={"unit": "bytes"},
    )

    @field_validator("bucket_size")
    @classmethod
    def _size(cls, value: str) -> str:
        parse_size(value)  # raises ValueError with the allowed spellings
        return value
