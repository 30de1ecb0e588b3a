"""The typed state stages hand to each other, on one rank (configs never hold tensors).

Three scopes, each a dataclass whose fields are the names stages declare in
``REQUIRES``/``PROVIDES`` (see :mod:`gptqflow.framework.stage`):

* :class:`PipelineState`, the whole run: ``model``, ``tokenizer``, ``samples``,
  ``quantized``, ``perplexity``, ``checkpoint`` ...;
* :class:`LayerRun`, one decoder layer inside the layer loop: ``layer.inputs``,
  ``layer.outputs``;
* :class:`GroupRun`, one group of target modules that read the same input:
  ``group.inputs``, ``group.hessian``, ``group.reduced_hessian``, ``group.plan``,
  ``group.results``.

A plugin that needs to pass something of its own declares a :class:`Slot` (a typed key)
and stores the value in the scope's ``slots``; the slot's name is what its stages
declare. No free-form dictionaries of untyped keys.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Generic, TypeVar

import torch
from torch import nn

from gptqflow.gptq.hessian import HessianSum
from gptqflow.gptq.plan import RowSlice
from gptqflow.gptq.types import QuantResult
from gptqflow.modeling.forward import Chunks
from gptqflow.modeling.targets import Target
from gptqflow.modeling.weights import WeightStore

if TYPE_CHECKING:
    from gptqflow.framework.schema import Recipe

T = TypeVar("T")

# What the built-in state provides, by scope; a contract name is one of these or a Slot's name.
MODEL_FIELDS = ("model", "tokenizer", "samples", "quantized", "perplexity", "checkpoint")
LAYER_FIELDS = ("layer.inputs", "layer.outputs")
GROUP_FIELDS = (
    "group.inputs",
    "group.hessian",
    "group.reduced_hessian",
    "group.plan",
    "group.results",
)


@dataclass(frozen=True)
class Slot(Generic[T]):
    """A typed key for a plugin's own state: ``NORMS = Slot[dict[str, Tensor]]("layer.norms")``.

    The name carries the scope as its prefix (``group.``, ``layer.``, none for the whole
    run), the same spelling stages use in ``REQUIRES``/``PROVIDES``.
    """

    name: str


class Slots:
    """The plugin slots of one scope: ``store[SLOT] = value``; ``store[SLOT]`` is typed."""

    def __init__(self) -> None:
        self._values: dict[str, Any] = {}

    def __setitem__(self, slot: Slot[T], value: T) -> None:
        self._values[slot.name] = value

    def __getitem__(self, slot: Slot[T]) -> T:
        if slot.name not in self._values:
            raise KeyError(f"{slot.name} is not set: no earlier stage provided it")
        return self._values[slot.name]  # type: ignore[no-any-return]

    def __contains__(self, slot: Slot[Any]) -> bool:
        return slot.name in self._values

    def get(self, slot: Slot[T], default: T) -> T:
        return self._values.get(slot.name, default)  # type: ignore[no-any-return]


@dataclass
class PipelineState:
    """Everything whole-model stages hand to each other, on one rank."""

    recipe: Recipe
    output_dir: Path
    model: Any = None  # transformers PreTrainedModel
    tokenizer: Any = None
    model_dir: Path | None = None
    # Streamed decoder-layer weights (None: the whole model is in memory).
    weights: WeightStore | None = None
    # How the weights were loaded, for report.json: {"mode": ..., "reason": ...}.
    weights_mode: dict[str, str] = field(default_factory=lambda: {"mode": "eager"})
    # This rank's calibration token ids: [n_local, seq_len] when every sample has one length
    # (the text route, packing), else one 1-D tensor per sample (rows of a dataset).
    samples: torch.Tensor | list[torch.Tensor] | None = None
    sample_range: range = range(0)  # global indices of the samples (equal-length routes)
    # Data handed to gptqflow.run(calibration=...): a datasets.Dataset or a list (not a config).
    calibration: Any = None
    # report.json's "calibration": source, fingerprint, samples and tokens per rank.
    calibration_info: dict[str, Any] = field(default_factory=dict)
    # Every quantized module (after the loop: all of them, on every rank), by module name.
    quantized: dict[str, QuantResult] = field(default_factory=dict)
    # Quantized modules already written out (the streaming save) and dropped from ``quantized``.
    written_quantized: int = 0
    perplexity: dict[str, float | None] = field(
        default_factory=lambda: {"baseline": None, "quantized": None}
    )
    checkpoint_dir: Path | None = None
    # report.json "coverage": decoder parameters quantized, their fraction, and every
    # targetable weight left in full precision with its reason (filled by the layer loop).
    coverage: dict[str, Any] | None = None
    # Modules this rank rounded to nearest because GPTQ failed ({"layer", "module", "reason"}).
    fallbacks: list[dict[str, Any]] = field(default_factory=list)
    # Filled by the framework: per-layer entries of report.json, and this rank's
    # calibration tokens that went through the layer loop.
    layer_reports: list[dict[str, Any]] = field(default_factory=list)
    tokens_calibrated: int = 0
    # This rank's hidden states between layers: their bytes and whether they went to a
    # file (runtime.max_hidden_bytes), for report.json.
    hidden_info: dict[str, Any] = field(default_factory=dict)
    progress: bool = False  # draw progress bars (rank 0 at a terminal)
    slots: Slots = field(default_factory=Slots)

    @property
    def is_quantized(self) -> bool:
        return bool(self.quantized) or self.written_quantized > 0


@dataclass
class LayerRun:
    """One decoder layer while the layer loop processes it."""

    state: PipelineState
    index: int
    name: str  # module name, e.g. model.layers.3
    module: nn.Module
    targets: dict[str, Target]  # the weights to quantize (modeling/targets.py), by full name
    # This rank's hidden states entering it: [n, seq, h] when its samples share one length,
    # else Chunks (equal-length batches, each with its own kwargs; rows of a dataset).
    inputs: torch.Tensor | Chunks | None = None
    kwargs: dict[str, Any] = field(default_factory=dict)  # the layer's other forward arguments
    outputs: torch.Tensor | Chunks | None = None  # after the forward: the next layer's inputs
    groups: list[GroupRun] = field(default_factory=list)  # in the order they were reached
    # Entries stages add to this layer's report.json entry (same value on every rank).
    report: dict[str, Any] = field(default_factory=dict)
    slots: Slots = field(default_factory=Slots)


@dataclass
class GroupRun:
    """Target modules of one layer that read the same input: one Hessian, solved together."""

    layer: LayerRun
    index: int
    names: list[str]
    modules: list[Target]  # the group's targets (a Linear, a Conv1D, an expert's slice)
    # This rank's input to the group: [n, seq, cols] when its samples share one length, else
    # a list with one [n_c, len_c, cols] tensor per chunk of equal-length samples (every
    # sample exactly once, the earlier groups of the layer already quantized); see
    # ``input_chunks``.
    inputs: torch.Tensor | list[torch.Tensor] | None = None
    hessian: HessianSum | None = None  # sum of 2·xᵀx (float64) and token count
    # Calibration tokens that reached the group, all ranks (set with reduced_hessian): fewer
    # than the calibration set for an MoE expert, which gets only the tokens routed to it.
    tokens: int | None = None
    reduced_hessian: torch.Tensor | None = None  # float32, all ranks' sum / all tokens
    plan: list[RowSlice] = field(default_factory=list)  # who solves which rows
    # Every rank takes part in the factorisation (see gptqflow.gptq.plan).
    shared_factor: bool = False
    results: dict[tuple[int, int], QuantResult] = field(default_factory=dict)  # (module, start)
    slots: Slots = field(default_factory=Slots)

    @property
    def input_chunks(self) -> list[torch.Tensor]:
        """``inputs`` as a list of ``[n_c, len_c, cols]`` chunks (one chunk for a tensor)."""
        assert self.inputs is not None, "contracts: the group's inputs were computed"
        return [self.inputs] if isinstance(self.inputs, torch.Tensor) else list(self.inputs)

    @property
    def weights(self) -> list[torch.Tensor]:
        """The targets' 2-D weights (out x in views of the model's parameters), in ``names`` order."""
        return [t.weight for t in self.modules]

    @property
    def cols(self) -> int:
        return int(self.weights[0].shape[1])

    @property
    def rows(self) -> list[int]:
        return [int(w.shape[0]) for w in self.weights]
