"""``norm-scale``: multiply the weights of every norm in each decoder layer by a factor.

A complete per-layer stage plugin, small on purpose: it is the walkthrough of
docs/plugins.md and the plugin the tests install. It stands in for what smoothing
methods (SmoothQuant, AWQ) do before a layer is quantized: change weights outside the
quantized modules. So it must keep those weights in resume points, or a resumed run
would lose them.

Requires: ``layer.inputs`` (it reports their root-mean-square per layer).
Provides: ``layer.input_rms`` (in the layer's report.json entry).
Collectives: none: every rank scales the same weights by the same factor.

```yaml
stages:
  norm-scale: {factor: 1.05}   # before the stages that quantize each layer
```
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from pydantic import Field

from gptqflow.framework.distributed import DistContext
from gptqflow.framework.registry import register_stage
from gptqflow.framework.stage import Stage, StageConfig
from gptqflow.framework.state import LayerRun


def norm_weights(layer: LayerRun) -> dict[str, torch.Tensor]:
    """The 1-D weights of the layer's norm modules (RMSNorm, LayerNorm ...), by full name."""
    return {
        f"{layer.name}.{name}.weight": module.weight
        for name, module in layer.module.named_modules()
        if "norm" in type(module).__name__.lower()
        and isinstance(getattr(module, "weight", None), torch.Tensor)
        and module.weight.dim() == 1
    }


class NormScaleStage(Stage):
    config: NormScaleConfig

    def before_layer(self, layer: LayerRun, ctx: DistContext) -> None:
        assert layer.inputs is not None
        x = layer.inputs.double()
        layer.report["input_rms"] = float(x.pow(2).mean().sqrt())
        for weight in norm_weights(layer).values():
            weight.data.mul_(self.config.factor)

    def save_layer(self, layer: LayerRun) -> dict[str, Any]:
        # The scaled weights of this finished layer: a resumed run puts them back.
        return {name: w.detach().cpu().clone() for name, w in norm_weights(layer).items()}

    def restore_layer(self, layer: LayerRun, saved: dict[str, Any], ctx: DistContext) -> None:
        for name, weight in norm_weights(layer).items():
            weight.data.copy_(saved[name])


@register_stage("norm-scale", NormScaleStage)
class NormScaleConfig(StageConfig):
    """Multiply every norm weight of each decoder layer by ``factor`` before the layer runs."""

    stage: Literal["norm-scale"] = "norm-scale"
    REQUIRES = ("layer.inputs",)
    PROVIDES = ("layer.input_rms",)
    factor: float = Field(
        1.05,
        gt=0,
        description="Factor applied to every norm weight.",
        json_schema_extra={"unit": None},
    )
