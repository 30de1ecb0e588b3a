"""GPTQ with lazy block updates (Frantar et al. 2022, arXiv:2210.17323), in nearest-plane form.

The solve is split in two so that rows of one large module can be spread over
ranks: :func:`prepare_factor` turns the Hessian into a triangular factor once, and
:func:`solve_rows` runs the column sweep for any set of rows.  Rows are independent
given the factor, so solving a slice of rows gives exactly the same rows as
solving the whole matrix.

Which factor.  The paper's sweep needs the upper Cholesky factor ``U`` of ``H⁻¹``
(``H⁻¹ = UᵀU``): one Cholesky, an inverse and a second Cholesky, about four times
the flops of a single Cholesky (4.6x the time on this project's CPU).  The same
sweep can be written with ``R``, the upper triangular factor with ``H = R Rᵀ``
(a Cholesky of ``H`` with rows and columns reversed): GPTQ then reads as Babai's
nearest-plane algorithm (Chen et al. 2025, arXiv:2507.18553).  With ``U = R⁻¹``
the paper's updates telescope into

    w_j(at its turn) = w_j + Σ_{i<j} (R_ij / R_jj) · (w_i - q_i)

where ``w`` are the *original* weights and ``q`` the dequantized ones: the
feedback of column ``i`` into column ``j`` is ``R_ij / R_jj``, applied to column
``i``'s residual.  So one Cholesky suffices, and it is the blocked one of
:mod:`gptqflow.gptq.cholesky`, which several ranks can share.  The sweep is
left-looking: a block of columns first receives the feedback of all earlier
residuals as one matmul with a long inner dimension (``[b, i1] @ [i1, rows]``),
then its columns are quantized one by one with rank-1 feedback inside the block.

Notation: the sweep visits columns in *sweep order* (activation order when
``actorder != "none"``); everything returned is in the original column order.
The sweep works on the transposed weight (``[cols, rows]``) so that the column
being quantized is one contiguous vector.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from gptqflow.gptq.cholesky import (
    LOCAL,
    PanelExchange,
    PanelSource,
    factor_panels,
    single_threaded,
)
from gptqflow.gptq.quantizer import (
    column_groups,
    compute_qparams,
    dequantize,
    effective_group_size,
    quantization_loss,
    round_to_grid,
)
from gptqflow.gptq.types import QuantArgs, QuantResult

__all__ = ["CholeskyError", "HessianFactor", "gptq_solve", "prepare_factor", "solve_rows"]

# BLAS picks different kernels (with different rounding) for very small matrices,
# e.g. a single row turns a GEMM into a GEMV.  Padding a row slice with zero rows
# up to this size keeps every matmul on the same kernels as the full solve, which
# is what makes slices bit-identical to the rows of the full solve.
_MIN_SWEEP_ROWS = 16


class CholeskyError(ValueError):
    """The dampened Hessian stayed non positive-definite for every dampening tried."""

    def __init__(self, message: str, dampening_tried: tuple[float, ...]) -> None:
        super().__init__(message)
        self.dampening_tried = dampening_tried


@dataclass
class HessianFactor:
    """What the column sweep needs from the Hessian; shared by every row slice.

    ``feedback``: ``R / diag(R)`` column-wise, where ``R`` is the upper triangular
    factor of the dampened Hessian in sweep order (``H = R Rᵀ``): entry ``[i, j]``
    is how much of column ``i``'s residual column ``j`` receives (float32 unless
    prepared in float64 for references).  ``diag``: the diagonal of ``R``, which
    dynamic groups need to see their columns as GPTQ's updates leave them.
    ``perm``: sweep order of the original columns (``None`` when actorder is none).
    ``dead``: original columns whose Hessian diagonal is 0 (never activated);
    their weights are zeroed.  ``damp``: the dampening fraction actually used.
    """

    feedback: torch.Tensor
    diag: torch.Tensor
    perm: torch.Tensor | None
    dead: torch.Tensor
    damp: float


def prepare_factor(
    hessian: torch.Tensor,
    args: QuantArgs,
    *,
    dtype: torch.dtype = torch.float32,
    exchange: PanelExchange = LOCAL,
) -> HessianFactor:
    """Dampen, (optionally) permute and factor the Hessian. Never mutates ``hessian``.

    The Hessian must be symmetric (:meth:`HessianSum.finalize` mirrors its sum
    exactly); either triangle may be read.  Dead columns (diagonal 0) are decoupled
    (row and column zeroed, diagonal set to 1) so that no error is ever
    propagated into or out of them; their weights are zeroed by the sweep.
    Activation order sorts the diagonal, descending.  Dampening
    ``damp * mean(diag)`` is added to the diagonal; if the Cholesky
    factorisation fails (the Hessian is only semi-definite, e.g. fewer tokens
    than features), it is retried with ten times the dampening, up to
    ``args.max_damp_retries`` times.

    ``exchange`` spreads the factorisation over ranks (see
    :mod:`gptqflow.gptq.cholesky`); every rank taking part must call this with the
    same Hessian and gets the same, bit-identical factor.  The default factorises
    here alone, with exactly the same arithmetic.
    """
    if hessian.ndim != 2 or hessian.shape[0] != hessian.shape[1]:
        raise ValueError(f"hessian must be square [cols, cols], got shape {tuple(hessian.shape)}")
    h = hessian.detach().to(dtype=dtype)
    if not bool(torch.isfinite(h).all()):
        raise CholeskyError(
            "the Hessian has NaN/inf entries: no dampening can make it positive definite", ()
        )
    # The input is never mutated: only dead columns need a modified copy.
    dead = h.diagonal() == 0
    if bool(dead.any()):
        h = h.clone()
        h[dead, :] = 0
        h[:, dead] = 0
        h.diagonal()[dead] = 1
    perm = None
    if args.actorder != "none":
        # Stable sort: ties (e.g. dead columns, all with diagonal 1) keep their
        # original order, so the permutation is deterministic.
        perm = torch.sort(h.diagonal(), descending=True, stable=True).indices
    n = h.shape[0]
    order = perm if perm is not None else torch.arange(n, device=h.device)
    mean_diag = h.diagonal()[order].mean()
    # H = R Rᵀ with R upper is the Cholesky of H with rows and columns reversed.
    source = _reversed_panels(h, order.flip(0))
    tried: list[float] = []
    for attempt in range(args.max_damp_retries + 1):
        fraction = args.dampening * 10.0**attempt
        tried.append(fraction)
        panels = factor_panels(source, exchange, shift=fraction * mean_diag)
        if panels is not None:
            feedback, diag = _feedback(panels, n)
            return HessianFactor(feedback, diag, perm=perm, dead=dead, damp=fraction)
    raise CholeskyError(
        f"Cholesky of the dampened Hessian failed for every dampening fraction tried "
        f"{tried} (times the mean diagonal {float(mean_diag):.4g})",
        tuple(tried),
    )


def _reversed_panels(h: torch.Tensor, rev: torch.Tensor) -> PanelSource:
    """Panels of ``h[rev][:, rev]`` for a symmetric ``h``, built on demand.

    Permuting and reversing happen in one gather per panel, of whole rows of ``h``
    (``h[cols][:, rows]ᵀ``, equal to ``h[rows][:, cols]`` by symmetry: gathering
    rows is ten times faster than gathering columns), and only for the panels this
    rank factorises: a rank sharing the factorisation with ``k - 1`` others
    touches about ``1/k`` of the Hessian.
    """

    def panel(s: int, e: int) -> torch.Tensor:
        rows, cols = rev[s:], rev[s:e]
        return h.index_select(0, cols).index_select(1, rows).T.contiguous()

    return PanelSource(h.shape[0], panel, h.dtype, h.device)


def _feedback(panels: list[torch.Tensor], n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(R / diag(R) column-wise, diag(R))`` from the panels of ``L``, where ``R = reverse(L)``.

    ``L`` is the lower factor of the reversed matrix; reversing its rows and columns
    gives the upper ``R``.  Built panel by panel, straight into the result, so the
    factor is copied once (not assembled, reversed and scaled as three copies).
    """
    out = panels[0].new_empty(n, n)
    diags = []
    start = 0
    for p in panels:
        end = start + p.shape[1]
        d = p[: p.shape[1]].diagonal()
        diags.append(d)
        # L[start:, start:end] reversed is R[:n-start, n-end:n-start]; below it R is 0.
        out[: n - start, n - end : n - start] = p.flip(0, 1) / d.flip(0)[None, :]
        out[n - start :, n - end : n - start] = 0
        start = end
    return out, torch.cat(diags).flip(0)


@dataclass(frozen=True)
class _Grid:
    """How quantization groups map onto the sweep.

    ``sweep_groups[j]``: group of the j-th swept column.  Either the qparams are
    ``fixed`` up front (per channel, static actorder), or ``dynamic_size`` > 0 and
    group ``j // dynamic_size`` gets its qparams when the sweep reaches column j.
    """

    sweep_groups: list[int]
    n_groups: int
    fixed: tuple[torch.Tensor, torch.Tensor] | None  # scale, zp: [rows, n_groups]
    dynamic_size: int
    g_idx: torch.Tensor | None


def _plan_grid(
    work: torch.Tensor, factor: HessianFactor, args: QuantArgs, group: int, storage: torch.dtype
) -> _Grid:
    """Decide, from ``args``, which groups exist and when their qparams are computed."""
    rows, cols = work.shape
    n_groups = cols // group
    original = column_groups(cols, group, device=work.device)
    perm = factor.perm
    if n_groups == 1 or args.actorder == "static":
        # Per channel, or static groups: qparams from the original weights, up front.
        grouped = work.reshape(rows * n_groups, group)
        scale, zp = compute_qparams(grouped, args, scale_dtype=storage)
        fixed = (scale.reshape(rows, n_groups), zp.reshape(rows, n_groups))
        sweep = original if perm is None else original[perm]
        return _Grid(sweep.tolist(), n_groups, fixed, 0, None)
    g_idx = None
    if perm is not None:  # actorder "group": groups are runs of the permuted order
        g_idx = torch.empty(cols, dtype=torch.int32, device=work.device)
        g_idx[perm] = original.to(torch.int32)
    return _Grid(original.tolist(), n_groups, None, group, g_idx)


def solve_rows(
    weight: torch.Tensor,
    factor: HessianFactor,
    args: QuantArgs,
    hessian: torch.Tensor | None = None,
    *,
    dtype: torch.dtype = torch.float32,
) -> QuantResult:
    """GPTQ column sweep for the rows of ``weight`` (``[rows, cols]``) with a prepared factor.

    A deterministic pure function: inputs are not mutated and equal inputs give
    bit-identical outputs; a slice of rows gives exactly those rows of the full
    solve.  The sweep runs in ``dtype`` (float32; float64 for references).
    ``loss`` uses the undamped ``hessian`` if given, else it is NaN.
    """
    if weight.ndim != 2:
        raise ValueError(f"weight must be 2-D [rows, cols], got shape {tuple(weight.shape)}")
    rows, cols = weight.shape
    group = effective_group_size(cols, args)
    _check_factor(factor, cols, args)
    if args.block_size <= 0:
        raise ValueError(f"block_size must be positive, got {args.block_size}")

    # Zero rows pad small slices (see _MIN_SWEEP_ROWS); they are dropped at the end.
    work = torch.zeros(max(rows, _MIN_SWEEP_ROWS), cols, dtype=dtype, device=weight.device)
    work[:rows] = weight.detach()
    work[:, factor.dead.to(work.device)] = 0
    grid = _plan_grid(work, factor, args, group, weight.dtype)

    sweep_t = work.T.contiguous() if factor.perm is None else work.T[factor.perm]
    feedback, diag = factor.feedback.to(dtype), factor.diag.to(dtype)
    codes_t, scale_t, zp_t = _sweep(sweep_t, feedback, diag, grid, args, weight.dtype)

    if factor.perm is not None:
        codes_t = codes_t[torch.argsort(factor.perm)]
    codes = codes_t[:, :rows].T.to(torch.int8).contiguous()
    scale = scale_t[:, :rows].T.to(weight.dtype).contiguous()
    zp = zp_t[:, :rows].T.to(torch.int8).contiguous()
    groups = column_groups(cols, group, grid.g_idx, device=work.device)
    dequant = dequantize(codes, scale[:, groups], zp[:, groups])
    return QuantResult(
        qweight=codes,
        scale=scale,
        zero_point=zp,
        g_idx=grid.g_idx,
        dequant=dequant,
        loss=quantization_loss(weight, dequant, hessian),
        damp=factor.damp,
    )


def _check_factor(factor: HessianFactor, cols: int, args: QuantArgs) -> None:
    """Reject a factor prepared for another matrix or another actorder."""
    if tuple(factor.feedback.shape) != (cols, cols):
        raise ValueError(
            f"factor is for {factor.feedback.shape[0]} columns but the weight has {cols}"
        )
    if (factor.perm is None) != (args.actorder == "none"):
        raise ValueError(
            f"factor was prepared for a different actorder than {args.actorder!r}; "
            "call prepare_factor with the same QuantArgs"
        )


def _sweep(
    w_t: torch.Tensor,
    feedback: torch.Tensor,
    diag: torch.Tensor,
    grid: _Grid,
    args: QuantArgs,
    storage: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Quantize the columns of ``w_t`` (``[cols, rows]``, sweep order; overwritten).

    Lazy batches (section 3.4 of the paper), left-looking: a block of
    ``block_size`` columns first receives the feedback of every earlier column's
    residual as one matmul; inside the block each column's residual is fed to the
    rest of the block at once (rank-1 update).  On return ``w_t`` holds the
    residuals (original minus dequantized).  Returns float codes ``[cols, rows]``
    in sweep order, and scale / zero point ``[n_groups, rows]``.
    """
    cols, rows = w_t.shape
    codes = torch.empty_like(w_t)
    if grid.fixed is not None:
        scale_t = grid.fixed[0].T.contiguous().to(w_t.dtype)
        zp_t = grid.fixed[1].T.contiguous().to(w_t.dtype)
    else:
        scale_t = torch.empty(grid.n_groups, rows, dtype=w_t.dtype, device=w_t.device)
        zp_t = torch.empty_like(scale_t)
    for i1 in range(0, cols, args.block_size):
        i2 = min(i1 + args.block_size, cols)
        if i1 == 0:
            corr = torch.zeros(i2 - i1, rows, dtype=w_t.dtype, device=w_t.device)
        else:
            corr = feedback[:i1, i1:i2].T @ w_t[:i1]
        # The per-column work is many small, memory-bound ops: threads add a
        # barrier per op and stall badly when cores are shared, so it runs on one
        # thread; the block's matmul above uses all of them.
        with single_threaded(w_t.device):
            _sweep_block(w_t, corr, feedback, diag, grid, args, storage, i1, codes, scale_t, zp_t)
    return codes, scale_t, zp_t


def _sweep_block(
    w_t: torch.Tensor,
    corr: torch.Tensor,
    feedback: torch.Tensor,
    diag: torch.Tensor,
    grid: _Grid,
    args: QuantArgs,
    storage: torch.dtype,
    i1: int,
    codes: torch.Tensor,
    scale_t: torch.Tensor,
    zp_t: torch.Tensor,
) -> None:
    """Quantize swept columns ``i1:i1+len(corr)`` one by one.

    ``corr`` holds the block's feedback so far (updated here).  Writes ``codes``
    (and ``scale_t``/``zp_t`` for groups starting here) and replaces each column
    of ``w_t`` by its residual.
    """
    cols = w_t.shape[0]
    i2 = i1 + corr.shape[0]
    size = grid.dynamic_size
    for j in range(i1, i2):
        if size and j % size == 0:
            current = _current_columns(w_t, corr, feedback, diag, i1, j, min(j + size, cols))
            scale, zp = compute_qparams(current.T, args, scale_dtype=storage)
            scale_t[j // size] = scale[:, 0]
            zp_t[j // size] = zp[:, 0]
        g = grid.sweep_groups[j]
        scale_g, zp_g = scale_t[g], zp_t[g]
        w = w_t[j] + corr[j - i1]
        q = round_to_grid(w, scale_g, zp_g, args.qmin, args.qmax)
        codes[j] = q
        residual = w_t[j] - (q - zp_g) * scale_g
        w_t[j] = residual
        if j + 1 < i2:
            # Explicit multiply then add (no fused kernel): each element is
            # rounded the same way whatever the number of rows.
            corr[j + 1 - i1 :] += feedback[j, j + 1 : i2, None] * residual


def _current_columns(
    w_t: torch.Tensor,
    corr: torch.Tensor,
    feedback: torch.Tensor,
    diag: torch.Tensor,
    i1: int,
    j: int,
    end: int,
) -> torch.Tensor:
    """Swept columns ``j:end`` as GPTQ's updates leave them when the sweep reaches ``j``.

    That is the best the not yet quantized columns can do given the residuals
    of columns ``< j`` (``w_G + H_GG⁻¹ H_GF r_F``, restricted to the group), and
    it is what a dynamic group's qparams are computed from.  The nearest-plane
    feedback sums ``Σ_{i<j} R_iG r_i`` are not it for any column but ``j``
    itself; with ``H = R Rᵀ`` the best update is ``R_GG⁻ᵀ Σ_{i<j} R_iGᵀ r_i``, a
    triangular solve of the group's size.

    Columns inside the current block have their (scaled) feedback in ``corr``;
    columns past the block's end have received none yet (the sweep is
    left-looking), so it is computed here.  A group's qparams are therefore
    independent of ``block_size`` (up to rounding), unlike the reference
    implementation, which reads stale values when a group crosses a block boundary.
    """
    block_end = i1 + corr.shape[0]
    partial = corr[j - i1 : min(end, block_end) - i1]
    if end > block_end:
        partial = torch.cat([partial, feedback[:j, block_end:end].T @ w_t[:j]])
    d = diag[j:end]
    r_gg = feedback[j:end, j:end] * d[None, :]
    update = torch.linalg.solve_triangular(r_gg.T, partial * d[:, None], upper=False)
    return w_t[j:end] + update


def gptq_solve(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    args: QuantArgs,
    *,
    dtype: torch.dtype = torch.float32,
) -> QuantResult:
    """Quantize ``weight`` with GPTQ: :func:`prepare_factor` then :func:`solve_rows`."""
    factor = prepare_factor(hessian, args, dtype=dtype)
    return solve_rows(weight, factor, args, hessian, dtype=dtype)
