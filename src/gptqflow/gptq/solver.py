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
:mod:`gptqflow.gptq.cholesky`, which computes ``R`` directly (no reversed copy)
and which several ranks can share; the sweep reads its panels in place.  The sweep is
left-looking: a block of columns first receives the feedback of all earlier
residuals as one matmul with a long inner dimension (``[b, i1] @ [i1, rows]``),
then its columns are quantized one by one with rank-1 feedback inside the block.

Hessian-aware ranges (``observer="hessian"``).  In this form the sweep's loss is
``Σ_j R_jj² (w_j(at its turn) - q_j)²``: ``R_jj²`` is what an error in column ``j``
costs once every later column has compensated for it as well as it can (the Schur
complement of the later columns in ``H``). So that is the importance a group's range
search weighs each column's error with (for static groups, from the original
weights up front; for dynamic ones, from the columns as the sweep leaves them).

Notation: the sweep visits columns in *sweep order* (activation order when
``actorder != "none"``); everything returned is in the original column order.
The sweep works on the transposed weight (``[cols, rows]``) so that the column
being quantized is one contiguous vector.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from gptqflow.gptq.cholesky import (
    FACTOR_BLOCK,
    LOCAL,
    PanelExchange,
    PanelSource,
    assemble,
    factor_panels,
    panel_bounds,
    single_threaded,
)
from gptqflow.gptq.numerics import all_finite
from gptqflow.gptq.quantizer import (
    column_groups,
    compute_qparams,
    dequantize_groups,
    effective_group_size,
    grouped_importance,
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

    ``panels``: the upper triangular factor ``R`` of the dampened Hessian in sweep
    order (``H = R Rᵀ``), as the column panels the factorisation produced: panel
    ``k`` is ``R[:e, s:e]`` for the ``(s, e)`` of :func:`panel_bounds` (``block``
    columns each). Entry ``R[i, j] / R[j, j]`` is how much of column ``i``'s residual
    column ``j`` receives. The sweep reads the panels where they are: assembling
    (and reversing, and scaling) a dense ``cols × cols`` copy would cost every rank
    a pass over the whole factor that sharing the factorisation does not split.
    ``diag``: the diagonal of ``R``. ``perm``: sweep order of the original columns
    (``None`` when actorder is none). ``dead``: original columns whose Hessian
    diagonal is 0 (never activated); their weights are zeroed. ``damp``: the
    dampening fraction actually used.
    """

    panels: list[torch.Tensor]
    diag: torch.Tensor
    perm: torch.Tensor | None
    dead: torch.Tensor
    damp: float
    block: int = FACTOR_BLOCK

    @property
    def cols(self) -> int:
        return int(self.diag.shape[0])

    def to(self, dtype: torch.dtype) -> HessianFactor:
        """The same factor with panels and diagonal in ``dtype`` (itself if already there)."""
        if self.diag.dtype == dtype:
            return self
        return HessianFactor(
            [p.to(dtype) for p in self.panels],
            self.diag.to(dtype),
            self.perm,
            self.dead,
            self.damp,
            self.block,
        )

    def pieces(self, start: int, stop: int) -> list[tuple[int, int, torch.Tensor]]:
        """Columns ``start:stop`` of ``R`` as ``(a, b, R[:e, a:b])`` views, one per panel."""
        out = []
        for k in range(start // self.block, (stop - 1) // self.block + 1):
            s = k * self.block
            a, b = max(start, s), min(stop, s + self.panels[k].shape[1])
            out.append((a, b, self.panels[k][:, a - s : b - s]))
        return out

    def square(self, start: int, stop: int) -> torch.Tensor:
        """``R[start:stop, start:stop]`` as a new dense tensor (small blocks only)."""
        out = self.diag.new_zeros(stop - start, stop - start)
        for a, b, view in self.pieces(start, stop):
            end = min(view.shape[0], stop)  # rows at or past a panel's end are zero
            out[: end - start, a - start : b - start] = view[start:end]
        return out

    def upper(self) -> torch.Tensor:
        """``R`` as one dense ``cols × cols`` matrix (for tests and benchmarks)."""
        return assemble(self.panels, self.block)


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
    here alone, with exactly the same arithmetic.  Apart from the finiteness check
    and the diagonal, a rank reads (and converts to ``dtype``) only the panels it
    factorises.
    """
    if hessian.ndim != 2 or hessian.shape[0] != hessian.shape[1]:
        raise ValueError(f"hessian must be square [cols, cols], got shape {tuple(hessian.shape)}")
    h = hessian.detach()
    if not all_finite(h):
        raise CholeskyError(
            "the Hessian has NaN/inf entries: no dampening can make it positive definite", ()
        )
    diag = h.diagonal().to(dtype)
    dead = diag == 0
    diag = torch.where(dead, torch.ones_like(diag), diag)
    perm = None
    if args.actorder != "none":
        # Stable sort: ties (e.g. dead columns, all with diagonal 1) keep their
        # original order, so the permutation is deterministic.
        perm = torch.sort(diag, descending=True, stable=True).indices
    order = perm if perm is not None else torch.arange(h.shape[0], device=h.device)
    mean_diag = diag[order].mean()
    source = _sweep_order_panels(h, order, dead if bool(dead.any()) else None, dtype)
    tried: list[float] = []
    for attempt in range(args.max_damp_retries + 1):
        fraction = args.dampening * 10.0**attempt
        tried.append(fraction)
        panels = factor_panels(source, exchange, shift=fraction * mean_diag)
        if panels is not None:
            bounds = panel_bounds(source.n, FACTOR_BLOCK)
            r_diag = torch.cat([p[s:e].diagonal() for (s, e), p in zip(bounds, panels)])
            return HessianFactor(panels, r_diag, perm=perm, dead=dead, damp=fraction)
    raise CholeskyError(
        f"Cholesky of the dampened Hessian failed for every dampening fraction tried "
        f"{tried} (times the mean diagonal {float(mean_diag):.4g})",
        tuple(tried),
    )


def _sweep_order_panels(
    h: torch.Tensor, order: torch.Tensor, dead: torch.Tensor | None, dtype: torch.dtype
) -> PanelSource:
    """Panels ``H'[:e, s:e]`` of ``H' = h[order][:, order]`` in ``dtype``, built on demand.

    One gather per panel, of whole rows of ``h`` (``h[cols][:, rows]ᵀ``, equal to
    ``h[rows][:, cols]`` by symmetry: gathering rows is ten times faster than
    gathering columns), converted to ``dtype`` on the way, and only for the panels
    this rank factorises: a rank sharing the factorisation with ``k - 1`` others
    touches about ``1/k`` of the Hessian. Dead columns (``dead``, original order)
    get their row and column zeroed and diagonal 1.
    """
    dead_s = dead[order] if dead is not None else None

    def panel(s: int, e: int) -> torch.Tensor:
        rows = h.index_select(0, order[s:e]).to(dtype).index_select(1, order[:e])
        p = torch.empty(e, e - s, dtype=dtype, device=h.device)
        p.copy_(rows.T)
        if dead_s is not None:
            p[dead_s[:e]] = 0
            p[:, dead_s[s:e]] = 0
            cols = torch.nonzero(dead_s[s:e]).flatten()
            p[s + cols, cols] = 1
        return p

    return PanelSource(h.shape[0], panel, dtype, h.device)


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
        importance = None
        if args.observer == "hessian":
            original_diag = factor.diag if perm is None else factor.diag[torch.argsort(perm)]
            importance = grouped_importance(original_diag.square(), rows, group)
        scale, zp = compute_qparams(grouped, args, scale_dtype=storage, importance=importance)
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
    del work  # each rows x cols float copy goes as soon as the next exists (a 2-3x peak)
    codes_t, scale_t, zp_t = _sweep(sweep_t, factor.to(dtype), grid, args, weight.dtype)
    del sweep_t  # the residuals

    if factor.perm is not None:
        codes_t = codes_t[torch.argsort(factor.perm)]
    codes = codes_t[:, :rows].T.to(torch.int8).contiguous()
    del codes_t
    scale = scale_t[:, :rows].T.to(weight.dtype).contiguous()
    zp = zp_t[:, :rows].T.to(torch.int8).contiguous()
    groups = column_groups(cols, group, grid.g_idx, device=weight.device)
    dequant = dequantize_groups(codes, scale, zp, groups)
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
    if factor.cols != cols:
        raise ValueError(f"factor is for {factor.cols} columns but the weight has {cols}")
    if (factor.perm is None) != (args.actorder == "none"):
        raise ValueError(
            f"factor was prepared for a different actorder than {args.actorder!r}; "
            "call prepare_factor with the same QuantArgs"
        )


def _sweep(
    w_t: torch.Tensor,
    factor: HessianFactor,
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
            corr = _received(factor, w_t, i1, i1, i2)
        # The block's own feedback, scaled: entry [i, j] is R_ij / R_jj.
        local = factor.square(i1, i2) / factor.diag[None, i1:i2]
        # The per-column work is many small, memory-bound ops: threads add a
        # barrier per op and stall badly when cores are shared, so it runs on one
        # thread; the block's matmul above uses all of them.
        with single_threaded(w_t.device):
            _sweep_block(w_t, corr, local, factor, grid, args, storage, i1, codes, scale_t, zp_t)
    return codes, scale_t, zp_t


def _received(
    factor: HessianFactor, w_t: torch.Tensor, upto: int, start: int, stop: int
) -> torch.Tensor:
    """``Σ_{i<upto} (R_ij / R_jj) · w_t[i]`` for the swept columns ``j`` in ``start:stop``.

    The feedback of the residuals ``w_t[:upto]`` (every row of ``R`` used lies above
    the columns, so inside the panels): one matmul with a long inner dimension per
    panel the columns fall in (one for the default block sizes, which divide the
    panel width).
    """
    parts = [view[:upto].T @ w_t[:upto] for _, _, view in factor.pieces(start, stop)]
    sums = parts[0] if len(parts) == 1 else torch.cat(parts)
    return sums / factor.diag[start:stop, None]


def _sweep_block(
    w_t: torch.Tensor,
    corr: torch.Tensor,
    local: torch.Tensor,
    factor: HessianFactor,
    grid: _Grid,
    args: QuantArgs,
    storage: torch.dtype,
    i1: int,
    codes: torch.Tensor,
    scale_t: torch.Tensor,
    zp_t: torch.Tensor,
) -> None:
    """Quantize swept columns ``i1:i1+len(corr)`` one by one.

    ``corr`` holds the block's feedback so far (updated here; a column's row is
    scratch once the column is done), ``local`` the block's scaled factor.  Writes
    ``codes`` (and ``scale_t``/``zp_t`` for groups starting here) and replaces each
    column of ``w_t`` by its residual.

    Every column costs a fixed number of small ops, paid again by every rank that
    sweeps rows of the group (row splitting does not shrink it), so the loop uses
    in-place ops on views taken once per block: ten kernels per column, no
    allocations. The arithmetic is the plain sequence ``w = w₀ + corr``,
    ``q = clamp(round(w / s + z))``, ``r = w₀ - (q - z)·s``, ``corr' += f · r``,
    with no fused kernels: each element is rounded the same way whatever the
    number of rows.
    """
    cols = w_t.shape[0]
    bs = corr.shape[0]
    size = grid.dynamic_size
    asym = not args.symmetric
    originals = w_t[i1 : i1 + bs].unbind(0)  # become the residuals
    currents = corr.unbind(0)
    code_rows = codes[i1 : i1 + bs].unbind(0)
    scales, zps = scale_t.unbind(0), zp_t.unbind(0)
    scratch = torch.empty_like(corr)
    for k in range(bs):
        j = i1 + k
        if size and j % size == 0:
            end = min(j + size, cols)
            current = _current_columns(w_t, corr, factor, i1, j, end)
            importance = factor.diag[j:end].square() if args.observer == "hessian" else None
            scale, zp = compute_qparams(current.T, args, scale_dtype=storage, importance=importance)
            scale_t[j // size] = scale[:, 0]
            zp_t[j // size] = zp[:, 0]
        g = grid.sweep_groups[j]
        s, z = scales[g], zps[g]
        w = currents[k].add_(originals[k])
        q = round_to_grid(w, s, z if asym else None, args.qmin, args.qmax, out=code_rows[k])
        dq = torch.sub(q, z, out=w) if asym else torch.mul(q, s, out=w)
        if asym:
            dq.mul_(s)
        residual = originals[k].sub_(dq)
        if k + 1 < bs:
            update = torch.mul(local[k, k + 1 :, None], residual, out=scratch[: bs - k - 1])
            corr[k + 1 :].add_(update)


def _current_columns(
    w_t: torch.Tensor,
    corr: torch.Tensor,
    factor: HessianFactor,
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
        partial = torch.cat([partial, _received(factor, w_t, j, block_end, end)])
    d = factor.diag[j:end]
    r_gg = factor.square(j, end)
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
