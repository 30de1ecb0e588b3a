"""The typed pipeline state that stages read and write (configs never hold tensors)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from gptqflow.framework.schema import Recipe
from gptqflow.gptq.hessian import HessianSum
from gptqflow.gptq.plan import RowSlice
from gptqflow.gptq.types import QuantArgs, QuantResult


@dataclass
class GroupStep:
    """One unit of the per-layer loop: the Linear modules of a layer that read the same input.

    They share one Hessian (computed once), so they are solved together: the
    calibrate stage fills ``hessian``; hessian-reduce makes the summed Hessian
    available where the plan needs it; solve fills ``results`` for this rank's row
    slices; broadcast assembles every module on every rank and installs it.
    """

    layer_index: int
    group_index: int
    names: list[str]
    modules: list[nn.Linear]
    hessian: HessianSum
    plan: list[RowSlice] = field(default_factory=list)
    # Every rank takes part in the factorisation (see gptqflow.gptq.plan), not only
    # the ranks with rows.
    shared_factor: bool = False
    full_hessian: torch.Tensor | None = None  # float32, divided by the token count
    results: dict[tuple[int, int], QuantResult] = field(
        default_factory=dict
    )  # (module, start) -> slice
    solve_seconds: dict[int, float] = field(
        default_factory=dict
    )  # rank -> seconds (this rank's entry)
    solve_cpu_seconds: dict[int, float] = field(
        default_factory=dict
    )  # rank -> CPU seconds of this rank's process during its solve

    @property
    def cols(self) -> int:
        return self.modules[0].in_features

    @property
    def rows(self) -> list[int]:
        return [m.out_features for m in self.modules]


@dataclass
class PipelineState:
    """Everything stages hand to each other, on one rank."""

    recipe: Recipe
    output_dir: Path
    model: Any = None  # transformers PreTrainedModel
    tokenizer: Any = None
    model_dir: Path | None = None
    layers: Any = None  # the model's decoder layers (nn.ModuleList)
    samples: torch.Tensor | None = None  # this rank's calibration token ids [n_local, seq_len]
    sample_range: range = range(0)
    quant_args: QuantArgs | None = None
    quantized: dict[str, QuantResult] = field(default_factory=dict)
    perplexity: dict[str, float | None] = field(
        default_factory=lambda: {"baseline": None, "quantized": None}
    )
    layer_reports: list[dict[str, Any]] = field(default_factory=list)
    # Modules this rank rounded to nearest because GPTQ failed ({"layer", "module", "reason"}).
    fallbacks: list[dict[str, Any]] = field(default_factory=list)
    checkpoint_dir: Path | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def is_quantized(self) -> bool:
        return bool(self.quantized)
