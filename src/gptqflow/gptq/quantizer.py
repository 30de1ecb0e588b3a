"""Integer quantization grids (min-max, per row) and the round-to-nearest baseline.

The grid follows the compressed-tensors convention so that what the solver
computes is exactly what a compressed-tensors checkpoint reproduces: signed
codes ``q`` in ``[qmin, qmax] = [-2**(b-1), 2**(b-1) - 1]`` and
``w ≈ (q - zero_point) * scale``.  The arithmetic (divide, add the zero point,
round half to even, clamp) mirrors ``compressed_tensors``' ``quantize`` so the
codes we pick are the codes it would pick for the same scale.

Scales are rounded to the dtype they will be stored in *before* any code is
chosen: the codes are then optimal for the scale the checkpoint actually holds,
and ``dequant == (q - zp) * scale`` holds exactly for the stored tensors.
"""

from __future__ import annotations

import math

import torch

from gptqflow.gptq.types import QuantArgs, QuantResult

__all__ = [
    "column_groups",
    "compute_qparams",
    "dequantize",
    "effective_group_size",
    "grouped_importance",
    "quantization_loss",
    "quantize",
    "round_to_grid",
    "rtn_quantize",
    "work_dtype",
]

_MIN_BITS = 2
_MAX_BITS = 8  # codes and zero points are stored as int8


def work_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype grid arithmetic runs in: float64 stays float64, all else float32.

    Half-precision arithmetic would round ``w / scale`` before it is rounded to a
    code, so low-precision weights are promoted.
    """
    return torch.float64 if dtype == torch.float64 else torch.float32


def effective_group_size(cols: int, args: QuantArgs) -> int:
    """Columns per quantization group (``cols`` when per channel), validating ``args``.

    Raises ``ValueError`` for settings the grids cannot represent, so a bad
    scheme fails before any work is done rather than deep inside a sweep.
    """
    if not _MIN_BITS <= args.bits <= _MAX_BITS:
        raise ValueError(
            f"bits={args.bits} is not supported: codes are stored as int8, "
            f"so bits must be in [{_MIN_BITS}, {_MAX_BITS}]"
        )
    if args.group_size == -1:
        return cols
    if args.group_size <= 0:
        raise ValueError(f"group_size must be -1 (per channel) or positive, got {args.group_size}")
    if cols % args.group_size != 0:
        raise ValueError(
            f"group_size={args.group_size} does not divide the number of input columns "
            f"({cols}); use a group size that divides {cols}, or -1 for per channel"
        )
    return args.group_size


def column_groups(
    cols: int,
    group_size: int,
    g_idx: torch.Tensor | None = None,
    device: torch.device | None = None,
) -> torch.Tensor:
    """Group index (int64, shape ``[cols]``) of each input column.

    ``g_idx`` wins when given (activation-ordered groups); otherwise groups are
    consecutive runs of ``group_size`` columns (``-1`` = one group).
    """
    if g_idx is not None:
        return g_idx.to(dtype=torch.long, device=device)
    size = cols if group_size == -1 else group_size
    return torch.arange(cols, device=device) // size


def _storage_round(scale: torch.Tensor, storage_dtype: torch.dtype) -> torch.Tensor:
    """Round ``scale`` to ``storage_dtype`` (keeping its dtype) and replace zeros.

    A zero scale (all-zero row, or an underflow in half precision) would divide
    by zero; any positive value quantizes such a row to exactly zero, and
    compressed-tensors uses the dtype's eps, so we do too.
    """
    if storage_dtype != scale.dtype:
        scale = scale.to(storage_dtype).to(scale.dtype)
    eps = torch.finfo(storage_dtype).eps
    return torch.where(scale == 0, torch.full_like(scale, eps), scale)


def compute_qparams(
    w: torch.Tensor,
    args: QuantArgs,
    scale_dtype: torch.dtype | None = None,
    importance: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero point for each row of ``w`` (shape ``[rows, k]``).

    Returns ``scale`` (``[rows, 1]``, in the grid's work dtype, with values
    representable in ``scale_dtype``, default ``w.dtype``) and ``zero_point``
    (``[rows, 1]`` int8).  Zero is always inside the range, so zero weights (and
    dead columns) dequantize to exactly zero.

    ``observer="minmax"``: the range is [min, max] of the row (clamped to contain 0).
    ``observer="mse"``: the range is shrunk by the factor in
    ``linspace(1, mse_maxshrink, mse_grid)`` that minimises ``Σ|w - q(w)|^mse_norm``
    for the row: clipping a few outliers buys a finer grid for all other weights,
    which lowers the error at 4 bits and below (the GPTQ reference's ``--mse``).
    ``observer="hessian"``: the same candidate ranges, scored by the activation-weighted
    error ``Σ_j importance_j (w_j - q(w_j))²``; ``importance`` (non-negative, broadcast
    against ``w``: ``[k]`` or ``[rows, k]``) is how much an error in each column costs
    the layer's output (a Hessian diagonal, see :func:`column_importance`). Required
    for, and only read by, that observer.
    """
    if args.observer == "hessian" and importance is None:
        raise ValueError("observer 'hessian' needs the columns' importance (a Hessian diagonal)")
    storage = scale_dtype if scale_dtype is not None else w.dtype
    wf = w.to(work_dtype(w.dtype))
    lo = wf.amin(dim=1, keepdim=True).clamp(max=0)
    hi = wf.amax(dim=1, keepdim=True).clamp(min=0)
    if args.observer == "minmax":
        return _range_qparams(lo, hi, args, storage)
    weights = None
    if args.observer == "hessian":
        assert importance is not None
        weights = importance.to(device=wf.device, dtype=wf.dtype)
    best_scale, best_zp = _range_qparams(lo, hi, args, storage)
    best_err = _grid_error(wf, best_scale, best_zp, args, weights)
    for i in range(1, args.mse_grid):
        shrink = 1.0 - (1.0 - args.mse_maxshrink) * i / max(args.mse_grid - 1, 1)
        scale, zp = _range_qparams(lo * shrink, hi * shrink, args, storage)
        err = _grid_error(wf, scale, zp, args, weights)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_scale = torch.where(better, scale, best_scale)
        best_zp = torch.where(better, zp, best_zp)
    return best_scale, best_zp


def _range_qparams(
    lo: torch.Tensor, hi: torch.Tensor, args: QuantArgs, storage: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale / zero point mapping [lo, hi] (per row, lo <= 0 <= hi) onto the code range.

    Symmetric: ``zp = 0``, ``scale = max(|lo|, hi) / ((qmax - qmin) / 2)`` (as
    compressed-tensors computes it).  Asymmetric: ``scale = (hi - lo) /
    (qmax - qmin)``, ``zp = round(qmin - lo / scale)`` clamped to the code range.
    """
    span = float(args.qmax - args.qmin)
    if args.symmetric:
        scale = _storage_round(torch.maximum(-lo, hi) / (span / 2), storage)
        return scale, torch.zeros(scale.shape, dtype=torch.int8, device=lo.device)
    scale = _storage_round((hi - lo) / span, storage)
    zp = torch.round(args.qmin - lo / scale).clamp_(args.qmin, args.qmax)
    return scale, zp.to(torch.int8)


def _grid_error(
    w: torch.Tensor,
    scale: torch.Tensor,
    zp: torch.Tensor,
    args: QuantArgs,
    weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-row ``Σ |w - dequant(quant(w))|^mse_norm`` ([rows, 1]).

    With ``weights`` (the hessian observer): ``Σ weights · (w - dequant(quant(w)))²``.
    """
    zpf = zp.to(w.dtype)
    d = (
        torch.div(w, scale)
        .add_(zpf)
        .round_()
        .clamp_(args.qmin, args.qmax)
        .sub_(zpf)
        .mul_(scale)
        .sub_(w)
    )
    if weights is not None:
        return d.square_().mul_(weights).sum(dim=1, keepdim=True)
    d = d.square_() if args.mse_norm == 2.0 else d.abs_().pow_(args.mse_norm)
    return d.sum(dim=1, keepdim=True)


def round_to_grid(
    w: torch.Tensor,
    scale: torch.Tensor,
    zp: torch.Tensor | None,
    qmin: int,
    qmax: int,
    *,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Float codes ``clamp(round(w / scale + zp))``: the one place codes are chosen.

    Shared by :func:`quantize` and the GPTQ sweep so both pick identical codes.
    ``zp=None`` means a zero point of 0 (symmetric grids: adding 0 changes no code).
    ``out`` (the broadcast shape) receives the codes without a new allocation: the
    sweep calls this once per column, where each allocation is a noticeable cost.
    """
    q = torch.div(w, scale, out=out) if out is not None else torch.div(w, scale)
    if zp is not None:
        q.add_(zp)
    return q.round_().clamp_(qmin, qmax)


def quantize(
    w: torch.Tensor, scale: torch.Tensor, zp: torch.Tensor, args: QuantArgs
) -> torch.Tensor:
    """int8 codes of ``w`` on the grid (``scale``/``zp`` broadcast against ``w``).

    Rounds half to even (``torch.round``) and clamps to ``[qmin, qmax]``.
    """
    dt = work_dtype(w.dtype)
    codes = round_to_grid(w.to(dt), scale.to(dt), zp.to(dt), args.qmin, args.qmax)
    return codes.to(torch.int8)


def dequantize(codes: torch.Tensor, scale: torch.Tensor, zp: torch.Tensor) -> torch.Tensor:
    """``(codes - zp) * scale`` in ``scale``'s dtype (``scale``/``zp`` broadcast).

    Computed in float32 (float64 for float64 scales) and cast once: for codes of
    at most 8 bits the float32 product of a half-precision scale is exact, so
    this equals compressed-tensors' computation in the scale's own dtype.
    """
    dt = work_dtype(scale.dtype)
    return ((codes.to(dt) - zp.to(dt)) * scale.to(dt)).to(scale.dtype)


#: Rows per band of :func:`dequantize_groups` (elementwise: any band gives the same bits).
_DEQUANT_ROWS = 512


def dequantize_groups(
    codes: torch.Tensor,
    scale: torch.Tensor,
    zp: torch.Tensor,
    groups: torch.Tensor,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """:func:`dequantize` of ``[rows, cols]`` codes with per-group ``[rows, n_groups]``
    scales and zero points (``groups``: each column's group), a band of rows at a time.

    Expanding the scales and zero points to every column of a wide module, then the
    float temporaries of the product, would each be a ``rows x cols`` matrix; in bands
    they are a few MB. ``out`` (e.g. a module's weight) receives the result in its own
    dtype; by default a new tensor in the scale's dtype.
    """
    if out is None:
        out = torch.empty(codes.shape, dtype=scale.dtype, device=codes.device)
    for r0 in range(0, codes.shape[0], _DEQUANT_ROWS):
        r1 = r0 + _DEQUANT_ROWS
        band = dequantize(codes[r0:r1], scale[r0:r1][:, groups], zp[r0:r1][:, groups])
        out[r0:r1].copy_(band.to(out.dtype))
    return out


def grouped_importance(importance: torch.Tensor, rows: int, group: int) -> torch.Tensor:
    """Column importance ``[cols]`` laid out like a weight's groups ``[rows * n_groups, group]``.

    The row order of ``weight.reshape(rows * n_groups, group)``: every weight row's
    groups in turn, so group ``g`` of every row reads ``importance[g*group:(g+1)*group]``.
    """
    return importance.reshape(-1, group).repeat(rows, 1)


#: Rows per band of :func:`quantization_loss`.
_LOSS_ROWS = 1024


def quantization_loss(
    weight: torch.Tensor, dequant: torch.Tensor, hessian: torch.Tensor | None
) -> float:
    """GPTQ objective ``tr((W - Q) H (W - Q)^T)``, or NaN without a Hessian.

    Used only for reporting and comparisons, so a float32 matmul with a float64
    final sum is accurate enough (float64 throughout for float64 inputs).
    """
    if hessian is None:
        return math.nan
    dt = work_dtype(weight.dtype) if hessian.dtype != torch.float64 else torch.float64
    h = hessian.to(dt)
    total = 0.0
    # A band of rows at a time: the difference and its product with H are two more
    # rows x cols matrices, as large as the weights of a wide module.
    for r0 in range(0, weight.shape[0], _LOSS_ROWS):
        diff = weight[r0 : r0 + _LOSS_ROWS].to(dt) - dequant[r0 : r0 + _LOSS_ROWS].to(dt)
        total += float(((diff @ h) * diff).sum(dtype=torch.float64))
    return total


def rtn_quantize(
    weight: torch.Tensor, args: QuantArgs, hessian: torch.Tensor | None = None
) -> QuantResult:
    """Round-to-nearest baseline with the same grids and grouping as GPTQ.

    Groups are consecutive runs of ``group_size`` input columns (``-1`` = per
    channel); ``actorder`` is irrelevant without error feedback, so ``g_idx`` is
    always ``None``.  ``loss`` is reported only when a Hessian is given; the
    ``hessian`` observer needs it (each group's range is weighted by its diagonal).
    """
    if weight.ndim != 2:
        raise ValueError(f"weight must be 2-D [rows, cols], got shape {tuple(weight.shape)}")
    rows, cols = weight.shape
    group = effective_group_size(cols, args)
    n_groups = cols // group
    grouped = weight.detach().to(work_dtype(weight.dtype)).reshape(rows * n_groups, group)
    importance = None
    if args.observer == "hessian":
        if hessian is None:
            raise ValueError("observer 'hessian' needs the Hessian (its diagonal weighs the error)")
        importance = grouped_importance(hessian.diagonal(), rows, group)
    scale, zp = compute_qparams(grouped, args, scale_dtype=weight.dtype, importance=importance)
    codes = quantize(grouped, scale, zp, args).reshape(rows, cols)
    scale = scale.reshape(rows, n_groups).to(weight.dtype)
    zp = zp.reshape(rows, n_groups)
    groups = column_groups(cols, group, device=weight.device)
    dequant = dequantize(codes, scale[:, groups], zp[:, groups])
    return QuantResult(
        qweight=codes,
        scale=scale,
        zero_point=zp,
        g_idx=None,
        dequant=dequant,
        loss=quantization_loss(weight, dequant, hessian),
        damp=0.0,
    )
