"""``broadcast``: every rank receives every slice's integers and installs the quantized group.

Requires: ``group.plan`` and this rank's ``group.results``.
Provides: ``quantized``: the dequantized weights installed in the group's modules (so
the rest of the layer runs on them) and ``state.quantized[name]`` (codes, scales, zero
points) for every module, on every rank. Keeps the codes of every finished layer in
resume points and reinstalls them on resume.
Collectives: per row slice, asynchronous broadcasts from its owner of the packed
integers (int8 codes, scales, zero points, and the g_idx for act-order groups)
plus its loss; all are issued before any is waited on. Dense float weights are
never sent: every rank dequantizes the same integers with the same function, so
all ranks hold bit-identical weights. At world size 1 nothing is sent.

```yaml
stages:
  broadcast: {}
```
"""

from __future__ import annotations

import math
from typing import Any, Literal

import torch
from torch import nn

from gptqflow.framework.distributed import DistContext, Handle
from gptqflow.framework.registry import register_stage
from gptqflow.framework.schema import Recipe
from gptqflow.framework.stage import Stage, StageConfig
from gptqflow.framework.state import GroupRun, LayerRun
from gptqflow.gptq.quantizer import column_groups, dequantize, effective_group_size
from gptqflow.gptq.types import QuantArgs, QuantResult


class BroadcastStage(Stage):
    config: BroadcastConfig

    def __init__(self, config: BroadcastConfig, recipe: Recipe) -> None:
        super().__init__(config, recipe)
        self.args = recipe.scheme.quant_args()

    def on_group(self, group: GroupRun, ctx: DistContext) -> None:
        cols = group.cols
        ng = cols // effective_group_size(cols, self.args)
        dtype = group.weights[0].dtype
        received: dict[tuple[int, int], list[torch.Tensor]] = {}
        handles: list[Handle] = []
        for s in group.plan:
            if s.rank == ctx.rank:
                r = group.results[(s.module, s.start)]
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
        state = group.layer.state
        for m, (name, mod) in enumerate(zip(group.names, group.modules)):
            slices = sorted((s for s in group.plan if s.module == m), key=lambda s: s.start)
            got = [received[(m, s.start)] for s in slices]
            codes = {
                "qweight": torch.cat([p[0] for p in got]),
                "scale": torch.cat([p[1] for p in got]),
                "zero_point": torch.cat([p[2] for p in got]),
                "g_idx": got[0][3] if self.args.actorder == "group" else None,
                "loss": float(sum(float(p[4][0]) for p in got)),
                "damp": max(float(p[4][1]) for p in got),
            }
            state.quantized[name] = install(mod, codes, self.args)

    def after_layer(self, layer: LayerRun, ctx: DistContext) -> None:
        """The layer's summed GPTQ objective for report.json (None unless solve reports it)."""
        loss = sum(layer.state.quantized[n].loss for g in layer.groups for n in g.names)
        layer.report["loss"] = None if not layer.groups or math.isnan(loss) else loss

    def save_layer(self, layer: LayerRun) -> dict[str, Any] | None:
        """The codes of the layer's modules: what save needs, and what reinstalls the weights."""
        quantized = layer.state.quantized
        return {n: _codes(quantized[n]) for n in layer.targets if n in quantized}

    def restore_layer(self, layer: LayerRun, saved: dict[str, Any], ctx: DistContext) -> None:
        for name, codes in saved.items():
            layer.state.quantized[name] = install(layer.targets[name], codes, self.args)


def install(module: nn.Module, codes: dict[str, Any], args: QuantArgs) -> QuantResult:
    """Dequantize a module's codes into its weight, exactly as every rank does; its record.

    Every rank runs this same function on the same integers (after the broadcast, or
    from a resume point), so all ranks hold bit-identical weights.
    """
    weight = module.weight
    assert isinstance(weight, torch.Tensor), "a target module has a weight tensor"
    device = weight.device
    q, scale, zp = (codes[k].to(device) for k in ("qweight", "scale", "zero_point"))
    g_idx = None if codes["g_idx"] is None else codes["g_idx"].to(device)
    groups = column_groups(weight.shape[1], args.group_size, g_idx, device=device)
    weight.data.copy_(dequantize(q, scale[:, groups], zp[:, groups]).to(weight.dtype))
    return QuantResult(
        qweight=q.cpu(),
        scale=scale.cpu(),
        zero_point=zp.cpu(),
        g_idx=None if g_idx is None else g_idx.cpu(),
        # The weight lives in the module; a reference here would keep the layer's device
        # copy alive after the loop moved the layer back to the CPU.
        dequant=torch.empty(0, dtype=weight.dtype),
        loss=float(codes["loss"]),
        damp=float(codes["damp"]),
    )


def _codes(r: QuantResult) -> dict[str, Any]:
    return {
        "qweight": r.qweight,
        "scale": r.scale,
        "zero_point": r.zero_point,
        "g_idx": r.g_idx,
        "loss": r.loss,
        "damp": r.damp,
    }


@register_stage("broadcast", BroadcastStage)
class BroadcastConfig(StageConfig):
    """Share every solved slice's integers with all ranks and install the quantized weights."""

    stage: Literal["broadcast"] = "broadcast"
    REQUIRES = ("group.plan", "group.results")
    PROVIDES = ("quantized",)
