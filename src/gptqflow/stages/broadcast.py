"""``broadcast``: every rank receives every slice's integers and installs the quantized group.

Consumes: ``step.plan`` and this rank's ``step.results``.
Produces: the dequantized weights installed in the group's Linear modules (so the
rest of the layer runs on them) and ``state.quantized[name]`` for every module.
Collectives: per row slice, asynchronous broadcasts from its owner of the packed
integers (int8 codes, scales, zero points, and the g_idx for act-order groups)
plus its loss; all are issued before any is waited on. Dense float weights are
never sent: every rank dequantizes the same integers with the same function, so
all ranks hold bit-identical weights. At world size 1 nothing is sent.

```yaml
- stage: broadcast
```
"""

from __future__ import annotations

from typing import Literal

import torch

from gptqflow.framework.distributed import DistContext, Handle
from gptqflow.framework.registry import Stage, StageConfig, register_stage
from gptqflow.framework.state import GroupStep, PipelineState
from gptqflow.gptq.quantizer import column_groups, dequantize, effective_group_size
from gptqflow.gptq.types import QuantResult


class BroadcastStage(Stage):
    config: BroadcastConfig

    def run_step(self, state: PipelineState, step: GroupStep, ctx: DistContext) -> None:
        args = state.quant_args
        assert args is not None, "solve must run before broadcast"
        cols = step.cols
        ng = cols // effective_group_size(cols, args)
        dtype = step.modules[0].weight.dtype
        device = step.modules[0].weight.device
        received: dict[tuple[int, int], list[torch.Tensor]] = {}
        handles: list[Handle] = []
        for s in step.plan:
            if s.rank == ctx.rank:
                r = step.results[(s.module, s.start)]
                g = r.g_idx if r.g_idx is not None else torch.zeros(cols, dtype=torch.int32)
                stats = torch.tensor([r.loss, r.damp], dtype=torch.float64)
                parts = [r.qweight, r.scale.to(dtype), r.zero_point, g.to(torch.int32), stats]
            else:
                parts = [
                    torch.empty(s.rows, cols, dtype=torch.int8),
                    torch.empty(s.rows, ng, dtype=dtype),
                    torch.empty(s.rows, ng, dtype=torch.int8),
                    torch.empty(cols, dtype=torch.int32),
                    torch.empty(2, dtype=torch.float64),
                ]
            bufs, hs = ctx.broadcast_from(s.rank, parts)
            received[(s.module, s.start)] = bufs
            handles += hs
        for h in handles:
            h.wait()
        for m, (name, mod) in enumerate(zip(step.names, step.modules)):
            slices = sorted((s for s in step.plan if s.module == m), key=lambda s: s.start)
            got = [[t.to(device) for t in received[(m, s.start)]] for s in slices]
            q = torch.cat([p[0] for p in got])
            scale = torch.cat([p[1] for p in got])
            zp = torch.cat([p[2] for p in got])
            g_idx = got[0][3] if args.actorder == "group" else None
            groups = column_groups(cols, args.group_size, g_idx, device=device)
            deq = dequantize(q, scale[:, groups], zp[:, groups]).to(dtype)
            mod.weight.data.copy_(deq)
            loss = float(sum(float(p[4][0]) for p in got))
            damp = max(float(p[4][1]) for p in got)
            state.quantized[name] = QuantResult(
                qweight=q.cpu(),
                scale=scale.cpu(),
                zero_point=zp.cpu(),
                g_idx=None if g_idx is None else g_idx.cpu(),
                dequant=mod.weight.data,
                loss=loss,
                damp=damp,
            )


@register_stage("broadcast", BroadcastStage)
class BroadcastConfig(StageConfig):
    """Share every solved slice's integers with all ranks and install the quantized weights."""

    phase = "layer"
    stage: Literal["broadcast"] = "broadcast"
