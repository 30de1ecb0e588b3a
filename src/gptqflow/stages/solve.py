"""``solve``: GPTQ (or round-to-nearest) on this rank's row slices of the current group.

Consumes: ``step.plan``, ``step.shared_factor``, ``step.full_hessian``, the group's
float weights. Produces: ``step.results`` (this rank's slices as QuantResults) and
``state.quant_args``. Collectives: none for a local factorisation; for a shared one
(``step.shared_factor``), one asynchronous broadcast per factor panel, in which
every rank takes part (:class:`RankExchange`). The solver itself is a pure function
of (weight, Hessian, quant args): how panels travel is handed to it.

Numerics are checked where a problem first shows, so it is reported with its layer
and module and never reaches a checkpoint: a Hessian with NaN/Inf (non-finite
activations entering the group) and non-finite float weights stop the run on every
rank (the Hessian is the reduced one, the weights are the same everywhere, so all
ranks decide alike); so does a non-finite solve result. A Hessian that stays
non positive-definite after the dampening retries stops the run too, unless
``on_failure: rtn``: then the group's modules are rounded to nearest, logged, and
listed under ``fallbacks`` in report.json. That decision depends only on the
reduced Hessian, so every rank makes the same one.

The Hessian's factor is computed once per group (on each rank with rows, or by all
ranks together) and shared by all of the rank's slices (q, k and v reuse one
factorisation).

```yaml
- stage: solve
  method: gptq
  bits: ${scheme.bits}
  group_size: ${scheme.group_size}
  symmetric: ${scheme.symmetric}
  actorder: ${scheme.actorder}
  on_failure: ${scheme.on_failure}   # error | rtn
```
"""

from __future__ import annotations

import logging
import time
from typing import Literal

import torch
from pydantic import Field

from gptqflow.framework.distributed import DistContext, Handle
from gptqflow.framework.errors import GptqflowError
from gptqflow.framework.registry import Stage, StageConfig, register_stage
from gptqflow.framework.state import GroupStep, PipelineState
from gptqflow.gptq.cholesky import LOCAL, PanelExchange
from gptqflow.gptq.numerics import count_nonfinite
from gptqflow.gptq.plan import RowSlice
from gptqflow.gptq.quantizer import quantization_loss, rtn_quantize
from gptqflow.gptq.solver import CholeskyError, prepare_factor, solve_rows
from gptqflow.gptq.types import QuantArgs, QuantResult

log = logging.getLogger("gptqflow")


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
        start, cpu = time.perf_counter(), time.process_time()
        check_finite_inputs(step)
        gptq = self.config.method == "gptq"
        exchange: PanelExchange = RankExchange(ctx) if step.shared_factor else LOCAL
        factor = None
        fallback: str | None = None
        # A rank without rows still takes part in a shared factorisation.
        if gptq and (mine or step.shared_factor):
            assert step.full_hessian is not None
            try:
                factor = prepare_factor(step.full_hessian, args, exchange=exchange)
            except CholeskyError as exc:
                fallback = self._cholesky_failed(step, exc, ctx)
        if mine:
            assert step.full_hessian is not None
            h = step.full_hessian
            # All of this rank's slices share the Hessian, so they are stacked into one
            # sweep: rows are independent given the factor (a slice of a solve is
            # bit-identical to solving it alone), and the per-column cost is paid once.
            w = torch.cat([step.modules[s.module].weight.data[s.start : s.stop] for s in mine])
            if factor is None:
                res = rtn_quantize(w, args)
            else:
                res = solve_rows(w, factor, args)
            check_finite_result(step, mine, res)
            if fallback is not None:
                state.fallbacks += [
                    {"layer": step.layer_index, "module": step.names[m], "reason": fallback}
                    for m in sorted({s.module for s in mine})
                ]
            offset = 0
            for s in mine:
                part = _rows(res, offset, offset + s.rows)
                if self.config.report_loss:
                    part.loss = quantization_loss(w[offset : offset + s.rows], part.dequant, h)
                step.results[(s.module, s.start)] = part
                offset += s.rows
        step.solve_seconds[ctx.rank] = time.perf_counter() - start
        step.solve_cpu_seconds[ctx.rank] = time.process_time() - cpu

    def _cholesky_failed(self, step: GroupStep, exc: CholeskyError, ctx: DistContext) -> str:
        """Raise (``on_failure: error``) or return the reason for a round-to-nearest fallback."""
        where = f"layer {step.layer_index}, {', '.join(step.names)}"
        if self.config.on_failure == "error":
            raise GptqflowError(
                f"{where}: the Hessian is not positive definite: {exc}. Calibrate on more "
                "tokens (dataset.num_samples, dataset.seq_len), raise solve.max_damp_retries, "
                "or set scheme.on_failure=rtn to round these modules to nearest instead"
            ) from exc
        reason = f"Hessian not positive definite: {exc}"
        if ctx.rank == min(s.rank for s in step.plan):  # one warning per group, not per rank
            log.warning("%s: round-to-nearest instead of GPTQ (%s)", where, reason)
        return reason


def check_finite_inputs(step: GroupStep) -> None:
    """Stop at the first layer whose Hessian or float weights hold NaN/Inf.

    The reduced Hessian and the float weights are the same on every rank, so every
    rank stops here with the same message. A non-finite Hessian means non-finite
    activations entering the group (from the float model itself, or from the
    already quantized layers before it); GPTQ (or rounding) of them would only
    write NaN into the checkpoint.
    """
    where = f"layer {step.layer_index}"
    h = step.full_hessian
    if h is not None and (bad := count_nonfinite(h)):
        raise GptqflowError(
            f"{where}, {', '.join(step.names)}: the Hessian has {bad} NaN/Inf entries of "
            f"{h.numel()}: the activations entering these modules are not finite, or so large "
            "that their squares overflow float32 (check the model's weights and dtype, e.g. "
            "model.dtype=float32 if float16 overflows)"
        )
    for name, mod in zip(step.names, step.modules):
        if bad := count_nonfinite(mod.weight):
            raise GptqflowError(
                f"{where}, {name}: the float weights have {bad} NaN/Inf values of "
                f"{mod.weight.numel()}; the model checkpoint is damaged or overflowed its dtype"
            )


def check_finite_result(step: GroupStep, mine: list[RowSlice], res: QuantResult) -> None:
    """Refuse a solve result with NaN/Inf scales or weights, naming the first bad module."""
    bad_rows = ~(torch.isfinite(res.scale).all(dim=1) & torch.isfinite(res.dequant).all(dim=1))
    if not bool(bad_rows.any()):
        return
    offset = 0
    for s in mine:
        if bool(bad_rows[offset : offset + s.rows].any()):
            raise GptqflowError(
                f"layer {step.layer_index}, {step.names[s.module]}: the quantized weights "
                f"(rows {s.start}..{s.stop - 1}) have NaN/Inf values; refusing to use them"
            )
        offset += s.rows


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
    on_failure: Literal["error", "rtn"] = Field(
        "error",
        description="A Hessian still not positive definite after the dampening retries: stop "
        "(error), or round the group's modules to nearest (rtn), listed in report.json.",
    )
    report_loss: bool = Field(
        False,
        description="Compute tr((W-Q)H(W-Q)ᵀ) per module for report.json (costs about one more "
        "sweep's worth of matmuls).",
    )


class RankExchange:
    """Panels of a shared factorisation, owned round-robin by all ranks and broadcast.

    Implements :class:`~gptqflow.gptq.cholesky.PanelExchange` with the
    ``DistContext`` verbs: panel ``k`` belongs to rank ``k % world_size``, which
    broadcasts it (asynchronously) as soon as it is factorised.
    """

    def __init__(self, ctx: DistContext) -> None:
        self.ctx = ctx

    def owns(self, k: int) -> bool:
        return k % self.ctx.world_size == self.ctx.rank

    def share(self, k: int, panel: torch.Tensor) -> _Arrival:
        bufs, handles = self.ctx.broadcast_from(k % self.ctx.world_size, [panel])
        return _Arrival(panel, bufs[0], handles)


class _Arrival:
    """A panel in flight; ``wait`` leaves it in the panel (copied if it travelled elsewhere)."""

    def __init__(self, panel: torch.Tensor, buf: torch.Tensor, handles: list[Handle]) -> None:
        self.panel, self.buf, self.handles = panel, buf, handles

    def wait(self) -> None:
        for h in self.handles:
            h.wait()
        if self.buf is not self.panel:
            self.panel.copy_(self.buf)
