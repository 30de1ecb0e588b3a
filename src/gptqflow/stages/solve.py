"""``solve``: GPTQ (or round-to-nearest) on this rank's row slices of the current group.

Consumes: ``step.plan``, ``step.full_hessian``, the group's float weights.
Produces: ``step.results`` (this rank's slices as QuantResults) and
``state.quant_args``. Collectives: none; the solver is a pure function of
(weight, Hessian, quant args).

The inverse-Hessian factor is computed once per rank per group and shared by all of
the rank's slices (q, k and v reuse one factorisation).

```yaml
- stage: solve
  method: gptq
  bits: ${scheme.bits}
  group_size: ${scheme.group_size}
  symmetric: ${scheme.symmetric}
  actorder: ${scheme.actorder}
```
"""

from __future__ import annotations

import time
from typing import Literal

import torch
from pydantic import Field

from gptqflow.framework.distributed import DistContext
from gptqflow.framework.errors import GptqflowError
from gptqflow.framework.registry import Stage, StageConfig, register_stage
from gptqflow.framework.state import GroupStep, PipelineState
from gptqflow.gptq.quantizer import quantization_loss, rtn_quantize
from gptqflow.gptq.solver import CholeskyError, prepare_factor, solve_rows
from gptqflow.gptq.types import QuantArgs, QuantResult


class SolveStage(Stage):
    config: SolveConfig

    @property
    def args(self) -> QuantArgs:
        c = self.config
        return QuantArgs(
            bits=c.bits,
            group_size=c.group_size,
            symmetric=c.symmetric,
            actorder=c.actorder,
            block_size=c.block_size,
            dampening=c.dampening,
            max_damp_retries=c.max_damp_retries,
            observer=c.observer,
        )

    def run_step(self, state: PipelineState, step: GroupStep, ctx: DistContext) -> None:
        args = self.args
        state.quant_args = args
        mine = [s for s in step.plan if s.rank == ctx.rank]
        start = time.perf_counter()
        if mine:
            assert step.full_hessian is not None
            h = step.full_hessian
            factor = None
            if self.config.method == "gptq":
                try:
                    factor = prepare_factor(h, args)
                except CholeskyError as exc:
                    raise GptqflowError(f"{', '.join(step.names)}: {exc}") from exc
            # All of this rank's slices share the Hessian, so they are stacked into one
            # sweep: rows are independent given the factor (a slice of a solve is
            # bit-identical to solving it alone), and the per-column cost is paid once.
            w = torch.cat([step.modules[s.module].weight.data[s.start : s.stop] for s in mine])
            if factor is None:
                res = rtn_quantize(w, args)
            else:
                res = solve_rows(w, factor, args)
            offset = 0
            for s in mine:
                part = _rows(res, offset, offset + s.rows)
                if self.config.report_loss:
                    part.loss = quantization_loss(w[offset : offset + s.rows], part.dequant, h)
                step.results[(s.module, s.start)] = part
                offset += s.rows
        step.solve_seconds[ctx.rank] = time.perf_counter() - start


def _rows(res: QuantResult, start: int, stop: int) -> QuantResult:
    """Rows ``[start, stop)`` of a stacked result (g_idx and damp are shared)."""
    return QuantResult(
        qweight=res.qweight[start:stop],
        scale=res.scale[start:stop],
        zero_point=res.zero_point[start:stop],
        g_idx=res.g_idx,
        dequant=res.dequant[start:stop],
        loss=float("nan"),
        damp=res.damp,
    )


@register_stage("solve", SolveStage)
class SolveConfig(StageConfig):
    """Quantize each group's weights given its Hessian (GPTQ) or without it (RTN)."""

    phase = "layer"
    stage: Literal["solve"] = "solve"
    method: Literal["gptq", "rtn"] = Field(
        "gptq", description="gptq, or rtn (round-to-nearest baseline)."
    )
    bits: Literal[2, 3, 4, 8] = Field(
        4, description="Bits per weight.", json_schema_extra={"unit": "bits"}
    )
    group_size: Literal[-1, 32, 64, 128, 256] = Field(
        128,
        description="Input columns sharing one scale; -1 = one scale per output channel.",
        json_schema_extra={"unit": "columns"},
    )
    symmetric: bool = Field(True, description="Symmetric grid (zero point 0) or asymmetric.")
    actorder: Literal["none", "static", "group"] = Field(
        "static",
        description="Sweep columns by decreasing Hessian diagonal; group = groups follow it (g_idx).",
    )
    block_size: int = Field(
        128,
        ge=1,
        description="Columns per lazy-batch block of the sweep.",
        json_schema_extra={"unit": "columns"},
    )
    dampening: float = Field(
        0.01,
        gt=0,
        lt=1,
        description="Added to the Hessian diagonal, as a fraction of its mean.",
        json_schema_extra={"unit": "fraction of mean diagonal"},
    )
    max_damp_retries: int = Field(
        6,
        ge=0,
        description="Cholesky retries, each with 10x the dampening.",
        json_schema_extra={"unit": "retries"},
    )
    observer: Literal["minmax", "mse"] = Field(
        "mse",
        description="Range of each group: min-max, or the shrunken range with the least error (mse).",
    )
    report_loss: bool = Field(
        False,
        description="Compute tr((W-Q)H(W-Q)ᵀ) per module for report.json (costs about one more "
        "sweep's worth of matmuls).",
    )
