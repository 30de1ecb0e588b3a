"""``broadcast``: every rank receives every slice's integers and installs the quantized group.

Requires: ``group.plan`` and this rank's ``group.results``.
Provides: ``quantized``: the dequantized weights installed in the group's modules (so
the rest of the layer runs on them) and ``state.quantized[name]`` (codes, scales, zero
points) for every module, on every rank. Keeps the codes of every finished layer in
resume points and reinstalls them on resume.
Collectives: per group, or per wave of groups (an MoE block's experts), one
asynchronous broadcast from each rank that owns slices of them: one byte buffer
(``gptq/wire.py``) with all its slices' integers (codes two to a byte for 4-bit
schemes, int8 otherwise; scales, zero points, loss and damping, and the g_idx for
act-order groups); all are issued before any is waited on. Dense
float weights are never sent: every rank dequantizes the same integers with the same
function, so all ranks hold bit-identical weights. At world size 1 nothing is sent.

```yaml
stages:
  broadcast: {}
```
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Literal

import torch

from gptqflow.framework.distributed import DistContext, Handle
from gptqflow.framework.registry import register_stage
from gptqflow.framework.schema import Recipe
from gptqflow.framework.stage import Stage, StageConfig
from gptqflow.framework.state import GroupRun, LayerRun
from gptqflow.gptq import wire
from gptqflow.gptq.quantizer import column_groups, dequantize_groups, effective_group_size
from gptqflow.gptq.types import QuantArgs, QuantResult
from gptqflow.modeling.targets import Target


class BroadcastStage(Stage):
    config: BroadcastConfig

    def __init__(self, config: BroadcastConfig, recipe: Recipe) -> None:
        super().__init__(config, recipe)
        self.args = recipe.scheme.quant_args()

    def on_group(self, group: GroupRun, ctx: DistContext) -> None:
        self.on_groups([group], ctx)

    def on_groups(self, groups: Sequence[GroupRun], ctx: DistContext) -> None:
        """One buffer per owner rank with every slice it solved in these groups; install all."""
        by_owner: dict[int, list[tuple[GroupRun, Any]]] = {}
        for group in groups:
            for s in group.plan:
                by_owner.setdefault(s.rank, []).append((group, s))
        # What each slice sends, per owner: the buffer's layout on every rank.
        layouts = {o: [self._fields(g, s.rows) for g, s in items] for o, items in by_owner.items()}
        sent: dict[int, torch.Tensor] = {}
        handles: list[Handle] = []
        for owner, items in sorted(by_owner.items()):
            fields = [f for per_slice in layouts[owner] for f in per_slice]
            if owner == ctx.rank:
                buf = wire.pack([t for g, s in items for t in self._parts(g, s)])
            else:
                buf = torch.empty(sum(f.nbytes for f in fields), dtype=torch.uint8)
            (arrived,), hs = ctx.broadcast_from(owner, [buf])
            sent[owner] = arrived
            handles += hs
        for h in handles:
            h.wait()
        received: dict[tuple[int, int, int], list[torch.Tensor]] = {}
        for owner, items in by_owner.items():
            fields = [f for per_slice in layouts[owner] for f in per_slice]
            parts = wire.unpack(sent[owner].cpu(), fields)
            at = 0
            for (g, s), per_slice in zip(items, layouts[owner]):
                n = len(per_slice)
                mine = parts[at : at + n]
                at += n
                if self._packs_codes:
                    mine[0] = wire.from_nibbles(mine[0], g.cols)
                received[(g.index, s.module, s.start)] = mine
        for group in groups:
            self._install(group, received)

    def _install(
        self, group: GroupRun, received: dict[tuple[int, int, int], list[torch.Tensor]]
    ) -> None:
        state = group.layer.state
        for m, (name, mod) in enumerate(zip(group.names, group.modules)):
            slices = sorted((s for s in group.plan if s.module == m), key=lambda s: s.start)
            got = [received[(group.index, m, s.start)] for s in slices]
            codes = {
                "qweight": torch.cat([p[0] for p in got]),
                "scale": torch.cat([p[1] for p in got]),
                "zero_point": torch.cat([p[2] for p in got]),
                "g_idx": got[0][4] if self.args.actorder == "group" else None,
                "loss": float(sum(float(p[3][0]) for p in got)),
                "damp": max(float(p[3][1]) for p in got),
            }
            state.quantized[name] = install(mod, codes, self.args)

    @property
    def _packs_codes(self) -> bool:
        return self.args.bits <= 4

    def _fields(self, group: GroupRun, rows: int) -> list[wire.Field]:
        """What one slice sends: codes, scales, zero points, loss and damping, g_idx."""
        cols = group.cols
        ng = cols // effective_group_size(cols, self.args)
        dtype = group.weights[0].dtype
        fields = [
            wire.nibble_field(rows, cols)
            if self._packs_codes
            else wire.Field((rows, cols), torch.int8),
            wire.Field((rows, ng), dtype),
            wire.Field((rows, ng), torch.int8),
            wire.Field((2,), torch.float64),
        ]
        if self.args.actorder == "group":  # the column order of act-order groups
            fields.append(wire.Field((cols,), torch.int32))
        return fields

    def _parts(self, group: GroupRun, s: Any) -> list[torch.Tensor]:
        r = group.results[(s.module, s.start)]
        dtype = group.weights[0].dtype
        q = r.qweight.cpu()
        parts = [
            wire.nibbles(q) if self._packs_codes else q,
            r.scale.cpu().to(dtype),
            r.zero_point.cpu(),
            torch.tensor([r.loss, r.damp], dtype=torch.float64),
        ]
        if self.args.actorder == "group":
            assert r.g_idx is not None, "act-order groups come with their column order"
            parts.append(r.g_idx.cpu().to(torch.int32))
        return parts

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


def install(module: Target, codes: dict[str, Any], args: QuantArgs) -> QuantResult:
    """Dequantize a target's codes into its weight, exactly as every rank does; its record.

    Every rank runs this same function on the same integers (after the broadcast, or
    from a resume point), so all ranks hold bit-identical weights.
    """
    weight = module.weight  # the 2-D view of the model's parameter (modeling/targets.py)
    device = weight.device
    q, scale, zp = (codes[k].to(device) for k in ("qweight", "scale", "zero_point"))
    g_idx = None if codes["g_idx"] is None else codes["g_idx"].to(device)
    groups = column_groups(weight.shape[1], args.group_size, g_idx, device=device)
    dequantize_groups(q, scale, zp, groups, out=weight.data)
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
