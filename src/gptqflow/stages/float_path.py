"""``float-path``: the float model's inputs next to the quantized ones, for GPTAQ.

GPTAQ (``solve: {method: gptaq}``, :mod:`gptqflow.gptq.gptaq`) solves every group
against the float model's inputs ``X̃`` as well as the quantized-path inputs ``X``
the layer loop hands it. This stage keeps the float model's hidden states on this
rank across layers (a run slot; at the first layer they are the loop's own inputs)
and, in ``before_layer``, while the layer is still float, runs it over them: that
records every target module's float input and gives the next layer's float hidden
states. In ``on_group`` it accumulates ``D = Σ 2·(x̃ - x)ᵀx`` over this rank's
samples and reduces it across ranks like the Hessian.

Requires: ``layer.inputs``, ``group.inputs``. Provides: ``group.reduced_cross``
(float64 ``D / tokens``, the same on every rank).
Collectives: one asynchronous all-reduce of the sum and one of the token count per
group. Cost: one more forward pass of each layer, and the float inputs of the
layer's groups held while it runs.

Sums are taken sample by sample (float32 product, float64 sum, one division at the
end), and the float forward computes every Linear sample by sample, as the layer
loop does, so 1 and N ranks produce the same statistic.

``sample_stride: k`` keeps the float path for every k-th calibration sample only (by
its index in the whole calibration set, so every world size picks the same samples):
the extra forward and ``D``'s products cost k times less, and ``D`` is the mean over
those samples' tokens, while the Hessian still sees every token. It needs samples of
one length (the text route, or ``dataset.packing``), whose indices are known.

The float hidden states are not kept in resume points (they exist on each rank only),
so a run with this stage cannot continue from one: it says so and stops.

```yaml
stages:
  float-path: {after: calibrate}   # inside the layer loop, before solve
  solve: {method: gptaq}
```
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from pydantic import Field
from torch import nn

from gptqflow.errors import GptqflowError
from gptqflow.framework.distributed import DistContext
from gptqflow.framework.registry import register_stage
from gptqflow.framework.schema import Problem, Recipe
from gptqflow.framework.stage import Stage, StageConfig
from gptqflow.framework.state import GroupRun, LayerRun, Slot
from gptqflow.gptq.gptaq import CrossSum
from gptqflow.modeling.forward import Chunks, per_sample_linears

#: This rank's float-path hidden states entering the next layer: ``[n, seq, hidden]``, or
#: :class:`Chunks` when the layer loop carries its samples that way.
FLOAT_HIDDEN: Slot[torch.Tensor | Chunks] = Slot("float_hidden")
#: The float-path input of every target module of the layer, by full module name: one
#: tensor per chunk of samples, in sample order.
FLOAT_INPUTS: Slot[dict[str, list[torch.Tensor]]] = Slot("layer.float_inputs")
#: ``Σ 2·(x̃ - x)ᵀx / tokens`` over all ranks (float64, [cols, cols]).
REDUCED_CROSS: Slot[torch.Tensor] = Slot("group.reduced_cross")


class FloatPathStage(Stage):
    config: FloatPathConfig

    def before_layer(self, layer: LayerRun, ctx: DistContext) -> None:
        state = layer.state
        experts = [n for n, t in layer.targets.items() if t.kind == "expert"]
        if experts:
            raise GptqflowError(
                f"stages.{self.config.id}: GPTAQ pairs each target's float and quantized inputs "
                "sample for sample, but an MoE expert gets the tokens its router picks, which "
                f"differ between the two paths (e.g. {experts[0]}); use method=gptq for MoE models"
            )
        if FLOAT_HIDDEN in state.slots:
            hidden = state.slots[FLOAT_HIDDEN]
        elif layer.index == 0:
            assert layer.inputs is not None, "contracts: float-path requires layer.inputs"
            hidden = layer.inputs  # nothing is quantized yet: both paths start here
        else:
            raise GptqflowError(
                f"stages.{self.config.id}: the run starts at layer {layer.index} (resumed), but "
                "the float model's hidden states are not kept in resume points; rerun from the "
                "start (runtime.resume=false, or a new output_dir)"
            )
        if layer.index == 0 and FLOAT_HIDDEN not in state.slots:
            hidden = self._subset(hidden, state.sample_range)
        chunks = hidden if isinstance(hidden, Chunks) else Chunks([hidden], [layer.kwargs])
        chunks = chunks.split(state.recipe.runtime.max_forward_tokens)
        inputs: dict[str, list[torch.Tensor]] = {name: [] for name in layer.targets}
        outputs = []
        for part, kwargs in zip(chunks.parts, chunks.kwargs):
            if part.shape[0] == 0:  # no sample of this rank is followed (sample_stride)
                outputs.append(part)
                continue
            seen: dict[str, torch.Tensor] = {}
            handles = [
                target.module.register_forward_pre_hook(_recorder(name, seen))
                for name, target in layer.targets.items()
            ]
            try:
                with per_sample_linears(layer.module), torch.inference_mode():
                    out = layer.module(part.to(ctx.device), **kwargs)
            finally:
                for h in handles:
                    h.remove()
            for name, x in seen.items():
                inputs[name].append(x)
            outputs.append(out[0] if isinstance(out, tuple) else out)
        layer.slots[FLOAT_INPUTS] = inputs
        state.slots[FLOAT_HIDDEN] = (
            Chunks(outputs, chunks.kwargs) if isinstance(hidden, Chunks) else torch.cat(outputs)
        )

    def _positions(self, sample_range: range) -> list[int]:
        """This rank's samples (positions in its slice) whose global index is a multiple
        of ``sample_stride``."""
        k = self.config.sample_stride
        return [p for p, i in enumerate(sample_range) if i % k == 0]

    def _subset(self, hidden: torch.Tensor | Chunks, sample_range: range) -> torch.Tensor | Chunks:
        """Layer 0's hidden states of the samples the float path follows."""
        if self.config.sample_stride == 1:
            return hidden
        if not isinstance(hidden, torch.Tensor) or len(sample_range) != hidden.shape[0]:
            raise GptqflowError(
                f"stages.{self.config.id}.sample_stride={self.config.sample_stride} picks "
                "samples by their index in the calibration set, which needs samples of one "
                "length held in memory (the text route or dataset.packing=true, without "
                "runtime.max_hidden_bytes spilling); set sample_stride=1"
            )
        return hidden[self._positions(sample_range)]

    def on_group(self, group: GroupRun, ctx: DistContext) -> None:
        quant = _samples(group.input_chunks)
        if self.config.sample_stride > 1:
            quant = [quant[p] for p in self._positions(group.layer.state.sample_range)]
        floats = _samples(group.layer.slots[FLOAT_INPUTS][group.names[0]])
        assert len(quant) == len(floats), "both paths hold the rank's samples, in order"
        # A rank none of whose samples is followed adds zeros (and takes part in the sums).
        cross = CrossSum.zeros(group.cols, device=group.weights[0].device)
        for x_float, x in zip(floats, quant):
            cross.add(x_float, x)
        count = torch.tensor([cross.count], dtype=torch.float64, device=cross.sum.device)
        total, h1 = ctx.all_reduce_sum(cross.sum)
        tokens, h2 = ctx.all_reduce_sum(count)
        h1.wait()
        h2.wait()
        summed = CrossSum(total.to(cross.sum.device), int(tokens.item()))
        group.slots[REDUCED_CROSS] = summed.finalize()

    def after_layer(self, layer: LayerRun, ctx: DistContext) -> None:
        layer.slots[FLOAT_INPUTS] = {}  # free the layer's float inputs before the next one


def _samples(chunks: list[torch.Tensor]) -> list[torch.Tensor]:
    """The samples of a list of ``[n_c, len_c, cols]`` chunks, one ``[len, cols]`` each, in order."""
    return [x[i] for x in chunks for i in range(x.shape[0])]


def _recorder(name: str, inputs: dict[str, torch.Tensor]) -> Any:
    def hook(_mod: nn.Module, args: tuple[Any, ...]) -> None:
        inputs.setdefault(name, args[0])

    return hook


@register_stage("float-path", FloatPathStage)
class FloatPathConfig(StageConfig):
    """The float model's inputs to each group next to the quantized ones (for GPTAQ)."""

    stage: Literal["float-path"] = "float-path"
    REQUIRES = ("layer.inputs", "group.inputs")
    PROVIDES = (REDUCED_CROSS.name,)
    sample_stride: int = Field(
        1,
        ge=1,
        description="Follow the float model for every k-th calibration sample only (by index "
        "in the whole calibration set, the same at every world size): the extra forward "
        "and the cross term cost k times less; D is averaged over those samples' tokens. "
        "1 = every sample. Needs samples of one length (text route or dataset.packing).",
        json_schema_extra={"unit": "samples"},
    )

    def preflight(self, recipe: Recipe) -> list[Problem]:
        """A stride picks samples by index: rows of a dataset kept at their own lengths have
        no fixed place in the layer loop's batches, so it is refused for them up front."""
        data = recipe.dataset
        if self.sample_stride == 1 or data.path is None or data.packing:
            return []
        return [
            Problem(
                f"stages.{self.id}.sample_stride",
                f"{self.sample_stride} picks calibration samples by index, which needs samples "
                "of one length; dataset.path rows keep their own lengths here: set "
                f"dataset.packing=true, or stages.{self.id}.sample_stride=1 (every sample)",
            )
        ]
