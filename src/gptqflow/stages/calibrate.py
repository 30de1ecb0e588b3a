"""``calibrate``: the Hessian of every group of target modules, from this rank's inputs.

Requires: ``group.inputs`` (the layer loop's forward hands each group the tensor its
modules read, for this rank's calibration samples). Provides: ``group.hessian``, this
rank's float64 sum of ``2·xᵀx`` and its token count.
Collectives: none (``hessian-reduce`` sums the ranks' Hessians).

Sums are taken sample by sample (``2·xᵀx`` in float32 per sample, added into a float64
sum, divided by the token count only at the end, after the reduction). Each sample's
arithmetic is therefore the same whatever the batch and rank count, and the float64
sum of float32 terms is exact in practice, so one rank and N ranks produce the same
Hessians.

```yaml
stages:
  calibrate: {}
```
"""

from __future__ import annotations

from typing import Literal

from gptqflow.framework.distributed import DistContext
from gptqflow.framework.registry import register_stage
from gptqflow.framework.stage import Stage, StageConfig
from gptqflow.framework.state import GroupRun
from gptqflow.gptq.hessian import HessianSum


class CalibrateStage(Stage):
    config: CalibrateConfig

    def on_group(self, group: GroupRun, ctx: DistContext) -> None:
        chunks = group.input_chunks
        hs = HessianSum.zeros(chunks[0].shape[-1], device=chunks[0].device)
        for x in chunks:  # one chunk, or one per sample length (rows of a dataset)
            for i in range(x.shape[0]):
                hs.add(x[i])
        hs.drop_scratch()  # the per-sample product buffer is done with
        group.hessian = hs


@register_stage("calibrate", CalibrateStage)
class CalibrateConfig(StageConfig):
    """Per-group Hessian sums over this rank's calibration samples (no collective)."""

    stage: Literal["calibrate"] = "calibrate"
    REQUIRES = ("group.inputs",)
    PROVIDES = ("group.hessian",)
