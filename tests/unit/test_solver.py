"""GPTQ solver: agreement with a plain reference, beating RTN, and its contracts."""

from __future__ import annotations

import functools
import math
from collections.abc import Iterator

import pytest
import torch

from gptqflow.gptq.quantizer import column_groups, rtn_quantize
from gptqflow.gptq.solver import (
    CholeskyError,
    HessianFactor,
    gptq_solve,
    prepare_factor,
    solve_rows,
)
from gptqflow.gptq.types import ActOrder, QuantArgs, QuantResult

ROWS, COLS, TOKENS = 64, 256, 1024


@pytest.fixture(autouse=True)
def _single_thread() -> Iterator[None]:
    """Run on one thread: these matrices are tiny, so OpenMP start-up dominates, and
    on an oversubscribed 2-core machine each parallel region can stall for
    milliseconds.  ``test_row_slices_with_two_threads`` covers the 2-thread case.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@functools.cache
def _problem(seed: int, rows: int = ROWS, cols: int = COLS) -> tuple[torch.Tensor, torch.Tensor]:
    """Random weights and the Hessian of CORRELATED inputs ``X = Z @ A``.

    The random mixing matrix ``A`` gives H strong off-diagonal structure: that
    structure is what GPTQ exploits and RTN ignores.
    """
    gen = torch.Generator().manual_seed(seed)
    mixing = torch.randn(cols, cols, generator=gen) / math.sqrt(cols)
    x = torch.randn(TOKENS, cols, generator=gen) @ mixing
    hessian = (2 * x.T @ x / TOKENS).contiguous()
    weight = torch.randn(rows, cols, generator=gen) * 0.05
    return weight, hessian


# ----------------------------------------------------------------------------
# An independent reference: unblocked, float64, optimal-brain-surgeon updates on
# the explicit inverse Hessian (no Cholesky, no lazy batches), column by column.
# ----------------------------------------------------------------------------


def _ref_qparams(w: torch.Tensor, bits: int, symmetric: bool) -> tuple[torch.Tensor, torch.Tensor]:
    qmin, qmax = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    lo = torch.clamp(w.min(dim=1).values, max=0)
    hi = torch.clamp(w.max(dim=1).values, min=0)
    if symmetric:
        scale = torch.maximum(lo.abs(), hi) / ((qmax - qmin) / 2)
        zp = torch.zeros_like(scale)
    else:
        scale = (hi - lo) / (qmax - qmin)
    scale = torch.where(scale == 0, torch.ones_like(scale), scale)
    if not symmetric:
        zp = torch.clamp(torch.round(qmin - lo / scale), qmin, qmax)
    return scale, zp


def reference_gptq(
    weight: torch.Tensor, hessian: torch.Tensor, args: QuantArgs
) -> tuple[torch.Tensor, torch.Tensor]:
    """Float64 ``(codes, dequant)`` of a plain GPTQ / OBQ sweep, original column order."""
    w = weight.double().clone()
    h = hessian.double().clone()
    rows, cols = w.shape
    qmin, qmax = args.qmin, args.qmax
    dead = torch.diagonal(h) == 0
    h[dead, :] = 0
    h[:, dead] = 0
    h[dead, dead] = 1
    w[:, dead] = 0
    size = cols if args.group_size == -1 else args.group_size
    if args.actorder == "none":
        order = list(range(cols))
    else:
        order = torch.sort(torch.diagonal(h), descending=True, stable=True).indices.tolist()
    h += torch.eye(cols, dtype=torch.float64) * args.dampening * torch.diagonal(h).mean()
    hinv = torch.linalg.inv(h)

    fixed = size == cols or args.actorder == "static"
    if fixed:  # qparams of the original (consecutive) groups, before any update
        params = [
            _ref_qparams(w[:, g * size : (g + 1) * size], args.bits, args.symmetric)
            for g in range(cols // size)
        ]
    codes = torch.zeros(rows, cols, dtype=torch.float64)
    dequant = torch.zeros(rows, cols, dtype=torch.float64)
    for pos, col in enumerate(order):
        if fixed:
            scale, zp = params[col // size]
        elif pos % size == 0:  # qparams from the current, error-updated weights
            scale, zp = _ref_qparams(w[:, order[pos : pos + size]], args.bits, args.symmetric)
        q = torch.clamp(torch.round(w[:, col] / scale + zp), qmin, qmax)
        codes[:, col] = q
        dequant[:, col] = (q - zp) * scale
        rest = order[pos + 1 :]
        err = (w[:, col] - dequant[:, col]) / hinv[col, col]
        w[:, rest] -= err[:, None] * hinv[col, rest][None, :]
        hinv -= torch.outer(hinv[:, col], hinv[col, :]) / hinv[col, col]
    return codes, dequant


def _loss(weight: torch.Tensor, dequant: torch.Tensor, hessian: torch.Tensor) -> float:
    diff = weight.double() - dequant.double()
    return float(((diff @ hessian.double()) * diff).sum())


# ----------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------


def _assert_identical(a: QuantResult, b: QuantResult) -> None:
    assert torch.equal(a.qweight, b.qweight)
    assert torch.equal(a.scale, b.scale)
    assert torch.equal(a.zero_point, b.zero_point)
    assert torch.equal(a.dequant, b.dequant)
    assert (a.g_idx is None) == (b.g_idx is None)
    if a.g_idx is not None and b.g_idx is not None:
        assert torch.equal(a.g_idx, b.g_idx)


def _check_result_contract(result: QuantResult, weight: torch.Tensor, args: QuantArgs) -> None:
    """Codes in range, dequant exactly reproducible from the returned tensors."""
    rows, cols = weight.shape
    assert result.qweight.dtype == torch.int8 and result.qweight.shape == (rows, cols)
    assert result.zero_point.dtype == torch.int8
    assert result.scale.dtype == weight.dtype and result.dequant.dtype == weight.dtype
    assert int(result.qweight.min()) >= args.qmin and int(result.qweight.max()) <= args.qmax
    if args.symmetric:
        assert not result.zero_point.any()
    if args.actorder == "group" and args.group_size != -1:
        assert result.g_idx is not None and result.g_idx.dtype == torch.int32
        assert result.g_idx.shape == (cols,)
        counts = torch.bincount(result.g_idx.long())
        assert bool((counts == args.group_size).all())
    else:
        assert result.g_idx is None
    groups = column_groups(cols, args.group_size, result.g_idx)
    scale, zp = result.scale[:, groups], result.zero_point[:, groups]
    assert bool((scale > 0).all())
    assert torch.equal(
        result.dequant, (result.qweight.to(scale.dtype) - zp.to(scale.dtype)) * scale
    )


CONFIGS = [
    QuantArgs(bits=4, group_size=128, symmetric=True, actorder="none"),
    QuantArgs(bits=4, group_size=32, symmetric=False, actorder="group"),
    QuantArgs(bits=3, group_size=-1, symmetric=True, actorder="static"),
    QuantArgs(bits=8, group_size=64, symmetric=False, actorder="static"),
    QuantArgs(bits=2, group_size=32, symmetric=False, actorder="none", block_size=48),
    QuantArgs(bits=4, group_size=64, symmetric=True, actorder="group", block_size=40),
]


# ----------------------------------------------------------------------------
# Accuracy
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("args", CONFIGS, ids=repr)
def test_matches_unblocked_float64_reference(args: QuantArgs) -> None:
    weight, hessian = _problem(seed=1)
    result = gptq_solve(weight, hessian, args)
    ref_codes, ref_dequant = reference_gptq(weight, hessian, args)

    agree = (result.qweight.double() == ref_codes).double().mean().item()
    assert agree >= 0.99, f"codes agree on only {agree:.2%}"
    assert result.loss == pytest.approx(_loss(weight, ref_dequant, hessian), rel=1e-2)
    assert result.loss == pytest.approx(_loss(weight, result.dequant, hessian), rel=1e-5)
    # The float64 path (same code, for references) agrees with the reference too.
    wide = gptq_solve(weight, hessian, args, dtype=torch.float64)
    assert (wide.qweight.double() == ref_codes).double().mean().item() >= 0.99
    assert wide.scale.dtype == weight.dtype


WIDE = 600  # three factor panels (256, 256, 88 columns): blocks and groups cross panel edges


@pytest.mark.parametrize(
    "args",
    [
        QuantArgs(bits=4, group_size=40, symmetric=False, actorder="group", block_size=100),
        QuantArgs(bits=4, group_size=120, symmetric=True, actorder="static", block_size=96),
        QuantArgs(bits=3, group_size=-1, symmetric=True, actorder="none"),
    ],
    ids=repr,
)
def test_matches_the_reference_across_factor_panels(args: QuantArgs) -> None:
    """The sweep reads the factor panel by panel; lazy-batch blocks and dynamic groups
    that straddle two panels (block 100 or 96, groups of 40 vs panels of 256) must read
    exactly the factor a dense one would give."""
    weight, hessian = _problem(seed=11, rows=32, cols=WIDE)
    result = gptq_solve(weight, hessian, args)
    ref_codes, ref_dequant = reference_gptq(weight, hessian, args)
    agree = (result.qweight.double() == ref_codes).double().mean().item()
    assert agree >= 0.99, f"codes agree on only {agree:.2%}"
    assert result.loss == pytest.approx(_loss(weight, ref_dequant, hessian), rel=1e-2)
    # The panels assemble into the upper factor of the dampened, permuted Hessian.
    factor = prepare_factor(hessian, args, dtype=torch.float64)
    r = factor.upper()
    order = factor.perm if factor.perm is not None else torch.arange(WIDE)
    h = hessian.double()[order][:, order]
    h.diagonal().add_(factor.damp * h.diagonal().mean())
    torch.testing.assert_close(r @ r.T, h, rtol=1e-9, atol=1e-9)
    assert torch.equal(r, r.triu())


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("actorder", ["none", "static", "group"])
@pytest.mark.parametrize("group_size", [-1, 32, 128])
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_gptq_beats_rtn_on_correlated_inputs(
    bits: int, group_size: int, actorder: ActOrder, symmetric: bool
) -> None:
    args = QuantArgs(bits=bits, group_size=group_size, symmetric=symmetric, actorder=actorder)
    for seed in (0, 1, 2):
        weight, hessian = _problem(seed)
        gptq = gptq_solve(weight, hessian, args)
        rtn = rtn_quantize(weight, args, hessian)
        assert gptq.loss < rtn.loss, f"seed {seed}: GPTQ {gptq.loss:.4g} >= RTN {rtn.loss:.4g}"
        _check_result_contract(gptq, weight, args)


def test_eight_bit_is_near_lossless() -> None:
    weight, hessian = _problem(seed=3)
    result = gptq_solve(weight, hessian, QuantArgs(bits=8, group_size=128, actorder="group"))
    # Relative output error ||X (W - Q)^T|| / ||X W^T||, via the Hessian (H = 2 XᵀX / n).
    relative = math.sqrt(result.loss / _loss(weight, torch.zeros_like(weight), hessian))
    assert relative < 1e-2


@pytest.mark.parametrize("args", CONFIGS, ids=repr)
def test_result_contract(args: QuantArgs) -> None:
    weight, hessian = _problem(seed=4)
    result = gptq_solve(weight, hessian, args)
    _check_result_contract(result, weight, args)
    assert result.damp == args.dampening


def test_bfloat16_weights_keep_their_dtype() -> None:
    weight, hessian = _problem(seed=5)
    args = QuantArgs(bits=4, group_size=64, symmetric=False, actorder="group")
    result = gptq_solve(weight.to(torch.bfloat16), hessian, args)
    _check_result_contract(result, weight.to(torch.bfloat16), args)
    fp32 = gptq_solve(weight.to(torch.bfloat16).float(), hessian, args)
    assert result.loss == pytest.approx(fp32.loss, rel=0.05)


# ----------------------------------------------------------------------------
# Contracts the distributed pipeline relies on
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("args", CONFIGS, ids=repr)
def test_row_slices_equal_rows_of_the_full_solve(args: QuantArgs) -> None:
    """Rows of one module can be split over ranks: slices reproduce the full solve."""
    weight, hessian = _problem(seed=6)
    factor = prepare_factor(hessian, args)
    full = solve_rows(weight, factor, args)
    for lo, hi in [(0, 1), (5, 6), (2, 9), (3, 20), (17, 64), (0, 32), (32, 64)]:
        part = solve_rows(weight[lo:hi], factor, args)
        expected = QuantResult(
            qweight=full.qweight[lo:hi],
            scale=full.scale[lo:hi],
            zero_point=full.zero_point[lo:hi],
            g_idx=full.g_idx,
            dequant=full.dequant[lo:hi],
            loss=math.nan,
            damp=full.damp,
        )
        _assert_identical(part, expected)


def test_row_slices_with_two_threads() -> None:
    """Multi-threaded BLAS changes neither slices nor the full solve."""
    torch.set_num_threads(2)
    args = QuantArgs(bits=4, group_size=32, symmetric=False, actorder="group", block_size=48)
    weight, hessian = _problem(seed=6, rows=96)
    factor = prepare_factor(hessian, args)
    full = solve_rows(weight, factor, args)
    for lo, hi in [(0, 1), (3, 20), (40, 96)]:
        part = solve_rows(weight[lo:hi], factor, args)
        assert torch.equal(part.qweight, full.qweight[lo:hi])
        assert torch.equal(part.scale, full.scale[lo:hi])
        assert torch.equal(part.dequant, full.dequant[lo:hi])
    _assert_identical(full, solve_rows(weight, factor, args))
    # The thread count of the run does not change the result either (factor included).
    torch.set_num_threads(1)
    _assert_identical(full, solve_rows(weight, prepare_factor(hessian, args), args))


@pytest.mark.parametrize("args", CONFIGS[:2], ids=repr)
def test_deterministic_and_pure(args: QuantArgs) -> None:
    weight, hessian = _problem(seed=7)
    weight_before, hessian_before = weight.clone(), hessian.clone()
    first = gptq_solve(weight, hessian, args)
    second = gptq_solve(weight, hessian, args)
    _assert_identical(first, second)
    assert first.loss == second.loss
    assert torch.equal(weight, weight_before) and torch.equal(hessian, hessian_before)


def test_loss_is_nan_without_hessian() -> None:
    weight, hessian = _problem(seed=0)
    args = QuantArgs()
    assert math.isnan(solve_rows(weight, prepare_factor(hessian, args), args).loss)


def test_solution_does_not_depend_on_block_size() -> None:
    """Groups crossing block boundaries see fully updated weights (lazy updates applied)."""
    weight, hessian = _problem(seed=8)
    results = [
        gptq_solve(weight, hessian, QuantArgs(group_size=32, block_size=bs, symmetric=False))
        for bs in (16, 48, 128, 256)
    ]
    for other in results[1:]:
        agree = (other.qweight == results[0].qweight).double().mean().item()
        assert agree > 0.99
        assert other.loss == pytest.approx(results[0].loss, rel=1e-2)


# ----------------------------------------------------------------------------
# Degenerate Hessians
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("actorder", ["none", "static", "group"])
def test_dead_columns_are_zeroed(actorder: ActOrder) -> None:
    weight, hessian = _problem(seed=9)
    dead = torch.tensor([0, 7, 100, 255])
    hessian = hessian.clone()
    hessian[dead, :] = 0
    hessian[:, dead] = 0
    args = QuantArgs(bits=4, group_size=32, symmetric=False, actorder=actorder)
    result = gptq_solve(weight, hessian, args)
    assert not result.dequant[:, dead].any()
    assert math.isfinite(result.loss)
    _check_result_contract(result, weight, args)


def _indefinite_hessian(cols: int = 64, seed: int = 0) -> torch.Tensor:
    """Symmetric with one negative eigenvalue of 3% of the mean diagonal.

    1% dampening cannot make it positive definite, 10% can.
    """
    gen = torch.Generator().manual_seed(seed)
    basis, _ = torch.linalg.qr(torch.randn(cols, cols, generator=gen, dtype=torch.float64))
    eigenvalues = torch.rand(cols, generator=gen, dtype=torch.float64) + 1
    eigenvalues[0] = -0.03 * eigenvalues.mean()
    return ((basis * eigenvalues) @ basis.T).float()


def test_dampening_is_raised_until_cholesky_succeeds() -> None:
    hessian = _indefinite_hessian()
    weight = torch.randn(8, 64)
    args = QuantArgs(bits=4, group_size=32, dampening=0.01)
    result = gptq_solve(weight, hessian, args)
    assert result.damp == pytest.approx(0.1)
    assert prepare_factor(hessian, args).damp == result.damp


def test_rank_deficient_hessian_succeeds() -> None:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(16, 64, generator=gen)  # fewer tokens than features: rank 16
    result = gptq_solve(
        torch.randn(8, 64, generator=gen), 2 * x.T @ x / 16, QuantArgs(group_size=32)
    )
    assert result.damp >= 0.01 and math.isfinite(result.loss)


def test_indefinite_hessian_raises_naming_the_dampening_tried() -> None:
    hessian = -_indefinite_hessian()  # mostly negative: no dampening of its diagonal helps
    args = QuantArgs(dampening=0.01, max_damp_retries=2)
    with pytest.raises(CholeskyError, match=r"\[0\.01, 0\.1, 1\.0\]") as info:
        prepare_factor(hessian, args)
    assert info.value.dampening_tried == (0.01, 0.1, 1.0)
    assert isinstance(info.value, ValueError)


@pytest.mark.parametrize("where", [(3, 5), (5, 3), (7, 7)])
def test_nan_anywhere_in_the_hessian_is_refused_before_factorising(where: tuple[int, int]) -> None:
    """Either triangle: the factorisation reads only one, so the check must not rely on it."""
    hessian = _problem(seed=2)[1]
    hessian[where] = math.nan
    with pytest.raises(CholeskyError, match="NaN/inf") as info:
        prepare_factor(hessian, QuantArgs())
    assert info.value.dampening_tried == ()


# ----------------------------------------------------------------------------
# Input validation
# ----------------------------------------------------------------------------


def test_group_size_must_divide_columns() -> None:
    weight, hessian = _problem(seed=0)
    with pytest.raises(ValueError, match="does not divide"):
        gptq_solve(weight[:, :200], hessian[:200, :200], QuantArgs(group_size=128))


def test_factor_must_match_the_args_and_shape() -> None:
    weight, hessian = _problem(seed=0)
    factor = prepare_factor(hessian, QuantArgs(actorder="none"))
    assert isinstance(factor, HessianFactor) and factor.perm is None
    with pytest.raises(ValueError, match="actorder"):
        solve_rows(weight, factor, QuantArgs(actorder="group"))
    with pytest.raises(ValueError, match="columns"):
        solve_rows(weight[:, :128], factor, QuantArgs())
