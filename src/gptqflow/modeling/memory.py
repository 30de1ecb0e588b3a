"""Peak host memory of one rank, predicted from a model config and the calibration size.

With streamed weights (``model.weights=stream``) a rank never holds the model: its
peak is the largest of three moments, each a sum of tensors whose sizes follow from
the config alone:

* **capture** (before the first layer): the tensors outside the decoder layers
  (embeddings, final norm, head: read for this step only) and the rank's hidden
  states;
* **layer** (the largest decoder layer): its weights, its input and output hidden
  states, the largest group's inputs (every token of the rank, for the Hessian), the
  group's float64 Hessian sum with the float32 copies the solve works on, and the
  solve's working copies of the group's weights;
* **finish** (rank 0, after the last layer): the tensors outside the layers again.

plus what the process holds before any of it (Python, torch, transformers, the
collectives: ``base_bytes``, measured once per machine). Activations inside one sample's
forward are small next to these and are left out; so is the allocator's slack, which
is why ``base_bytes`` is a measured, not a computed, number.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import nn

from gptqflow.modeling.structure import decoder_layers

#: Resident bytes of a rank before it reads any weight (Python, torch, transformers,
#: gloo), measured on the 2-core x86_64 benchmark machine (report.json's ``load``
#: stage peak of a streamed run, bench/memory.py).
DEFAULT_BASE_BYTES = 600 * 2**20

# Working copies the solve makes of a group's cols x cols matrices (float32 Hessian,
# its Cholesky factor and inverse) and of its rows x cols weights (working copy,
# quantized result, error term).
_HESSIAN_COPIES = 3
_WEIGHT_COPIES = 3


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
    groups: list[list[tuple[int, int]]],
    tokens_per_rank: int,
    *,
    main_rank: bool = True,
    base_bytes: int = DEFAULT_BASE_BYTES,
) -> MemoryPrediction:
    """Peak host bytes of one rank quantizing ``model`` (built on the meta device).

    ``groups``: per group of the largest layer, the (rows, cols) of its modules (one
    Hessian per group). ``tokens_per_rank``: the rank's calibration tokens (its share
    of ``num_samples`` x ``seq_len``).
    """
    prefix, layers = decoder_layers(model)
    hidden = int(getattr(model.config, "hidden_size", 0))
    act = 4  # hidden states and group inputs are float32 or the model dtype; float32 bounds it
    outside = _bytes(
        {id(p): p for n, p in model.named_parameters() if not n.startswith(f"{prefix}.")}.values()
    )
    states = tokens_per_rank * hidden * act
    layer_weights = max(_bytes(layer.parameters()) for layer in layers)
    group_peak = 0
    for group in groups:
        cols = group[0][1]
        rows = sum(r for r, _ in group)
        w_bytes = rows * cols * act
        group_peak = max(
            group_peak,
            tokens_per_rank * cols * act  # the group's inputs
            + cols * cols * 8  # float64 Hessian sum
            + _HESSIAN_COPIES * cols * cols * 4
            + _WEIGHT_COPIES * w_bytes,
        )
    return MemoryPrediction(
        base=base_bytes,
        capture=outside + states,
        layer=layer_weights + 2 * states + group_peak,
        finish=outside if main_rank else 0,
    )
