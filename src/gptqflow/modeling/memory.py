"""Peak host memory of one rank, predicted from a model config and the calibration size.

With streamed weights (``model.weights=stream``) a rank never holds the model: its
peak is the largest of three moments, each a sum of tensors whose sizes follow from
the config alone:

* **capture** (before the first layer): the rank's hidden states (the embedding is
  read through a mapping and only the rows of the calibration tokens are touched);
* **layer** (the largest decoder layer): its weights, its input and output hidden
  states, and the largest group's working set: its inputs (every token of the rank),
  its Hessian (the float64 sum of the upper strips, half a float64 matrix, next to the
  float32 mean it is divided into: ``hessian-reduce`` frees the sum afterwards, and
  the solve's float32 mean plus its triangular factor are less) and four float32
  copies of the group's weights (see ``_WEIGHT_COPIES``); for a wave (an MoE block's
  experts, handled together) every expert's Hessian and all routed tokens at once;
* **finish** (rank 0, after the last layer): the largest tensor outside the layers
  (``save`` reads, writes and drops them one at a time).

plus what the process holds before any of it (Python, torch, transformers, the
collectives: ``base_bytes``, measured once per machine). Activations inside one sample's
forward are small next to these and are left out; so is the allocator's slack, which
is why ``base_bytes`` is a measured, not a computed, number.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from torch import nn

from gptqflow.gptq.cost import hessian_bytes
from gptqflow.gptq.plan import GroupShape, wave_steps
from gptqflow.modeling.structure import decoder_layers

#: Resident bytes of a rank before it reads any weight (Python, torch, transformers,
#: gloo), measured on the 2-core x86_64 benchmark machine: the smallest stage peak of
#: a streamed run's report.json after the layer loop (bench/memory.py).
DEFAULT_BASE_BYTES = 470 * 2**20

# Float32 rows x cols copies of a group's weights the solve holds at its peak: the
# stacked rows of the rank's slices, the sweep's working copy, its float codes, and the
# dequantized result (gptq/solver.py frees each as soon as the next exists).
_WEIGHT_COPIES = 4


@dataclass(frozen=True)
class MemoryPrediction:
    """Bytes of one rank at each moment; ``peak`` is the largest plus ``base``."""

    base: int
    capture: int
    layer: int
    finish: int

    @property
    def peak(self) -> int:
        return self.base + max(self.capture, self.layer, self.finish)

    def to_dict(self) -> dict[str, int]:
        return {
            "base_bytes": self.base,
            "capture_bytes": self.capture,
            "layer_bytes": self.layer,
            "finish_bytes": self.finish,
            "peak_bytes": self.peak,
        }


def _bytes(tensors: Any) -> int:
    return sum(int(t.numel()) * t.element_size() for t in tensors)


def predict_rank_memory(
    model: nn.Module,
    groups: Sequence[GroupShape],
    tokens_per_rank: int,
    *,
    main_rank: bool = True,
    base_bytes: int = DEFAULT_BASE_BYTES,
) -> MemoryPrediction:
    """Peak host bytes of one rank quantizing ``model`` (built on the meta device).

    ``groups``: the groups of the largest layer (one Hessian per group; a wave's groups,
    an MoE block's experts, are all held at once). ``tokens_per_rank``: the rank's
    calibration tokens (its share of ``num_samples`` x ``seq_len``).
    """
    prefix, layers = decoder_layers(model)
    hidden = int(getattr(model.config, "hidden_size", 0))
    act = 4  # hidden states and group inputs are float32 or the model dtype; float32 bounds it
    outside = [p for n, p in model.named_parameters() if not n.startswith(f"{prefix}.")]
    states = tokens_per_rank * hidden * act
    layer_weights = max(_bytes(layer.parameters()) for layer in layers)
    # A token reaches num_experts_per_tok experts: a wave's inputs hold it that many times.
    top_k = int(getattr(model.config, "num_experts_per_tok", None) or 1)
    group_peak = 0
    for step in wave_steps(groups):
        tokens = tokens_per_rank * (top_k if len(step) > 1 else 1)
        group_peak = max(
            group_peak,
            tokens * step[0].cols * act  # the inputs (a wave's: every routed token)
            # per group: the float64 sum of the upper strips (+ token count), the float32 mean
            + sum(hessian_bytes(g.cols) + g.cols * g.cols * 4 for g in step)
            # the solve's copies, one group at a time
            + max(_WEIGHT_COPIES * sum(g.rows) * g.cols * act for g in step),
        )
    return MemoryPrediction(
        base=base_bytes,
        capture=states,
        layer=layer_weights + 2 * states + group_peak,
        finish=max((_bytes([p]) for p in outside), default=0) if main_rank else 0,
    )
