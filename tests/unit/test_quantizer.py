"""Quantization grids: compressed-tensors conventions, guards and the RTN baseline."""

from __future__ import annotations

import math

import pytest
import torch
from compressed_tensors.quantization import QuantizationArgs
from compressed_tensors.quantization.lifecycle.forward import quantize as ct_quantize
from compressed_tensors.quantization.utils.helpers import calculate_qparams

from gptqflow.gptq.quantizer import (
    column_groups,
    compute_qparams,
    dequantize,
    effective_group_size,
    quantization_loss,
    quantize,
    rtn_quantize,
)
from gptqflow.gptq.types import QuantArgs


def _weights(rows: int = 16, cols: int = 64, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(rows, cols, generator=gen)


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("symmetric", [True, False])
def test_qparams_match_compressed_tensors(bits: int, symmetric: bool) -> None:
    """Our grid must be the one compressed-tensors uses to read the checkpoint back."""
    w = _weights() + (0.0 if symmetric else 0.7)  # shift so asymmetric ranges are lopsided
    args = QuantArgs(bits=bits, symmetric=symmetric, group_size=-1)
    ct_args = QuantizationArgs(num_bits=bits, symmetric=symmetric, strategy="channel")

    scale, zp = compute_qparams(w, args)
    ct_scale, ct_zp = calculate_qparams(w.amin(1, keepdim=True), w.amax(1, keepdim=True), ct_args)

    torch.testing.assert_close(scale, ct_scale, rtol=0, atol=0)
    assert torch.equal(zp.to(torch.int64), ct_zp.to(torch.int64))
    codes = quantize(w, scale, zp, args)
    ct_codes = ct_quantize(w, ct_scale, ct_zp, ct_args, dtype=torch.int8)
    assert torch.equal(codes, ct_codes)


@pytest.mark.parametrize("symmetric", [True, False])
def test_codes_in_range_and_dequant_formula(symmetric: bool) -> None:
    w = _weights() * 3
    args = QuantArgs(bits=3, symmetric=symmetric, group_size=-1)
    scale, zp = compute_qparams(w, args)
    codes = quantize(w, scale, zp, args)
    assert codes.dtype == torch.int8 and zp.dtype == torch.int8
    assert int(codes.min()) >= args.qmin and int(codes.max()) <= args.qmax
    expected = (codes.float() - zp.float()) * scale
    assert torch.equal(dequantize(codes, scale, zp), expected)
    if symmetric:
        assert not zp.any()
    # Round-to-nearest: error at most half a step inside the range.
    err = (dequantize(codes, scale, zp) - w).abs()
    assert bool((err <= scale / 2 * (1 + 1e-5)).all())


def test_zero_rows_get_a_positive_scale() -> None:
    """All-zero rows (dead outputs) must not divide by zero and must dequantize to 0."""
    w = _weights()
    w[3] = 0
    for symmetric in (True, False):
        args = QuantArgs(bits=4, symmetric=symmetric, group_size=-1)
        scale, zp = compute_qparams(w, args)
        assert bool((scale > 0).all()) and bool(torch.isfinite(scale).all())
        deq = dequantize(quantize(w, scale, zp, args), scale, zp)
        assert not deq[3].any()


def test_zero_is_exactly_representable_asymmetric() -> None:
    """Zero is inside every range, so a zero weight (dead column) stays exactly zero."""
    w = _weights().abs() + 0.5  # all positive: min-max would exclude 0 without the clamp
    w[:, 5] = 0
    args = QuantArgs(bits=4, symmetric=False, group_size=-1)
    scale, zp = compute_qparams(w, args)
    deq = dequantize(quantize(w, scale, zp, args), scale, zp)
    assert not deq[:, 5].any()


def test_round_half_to_even() -> None:
    args = QuantArgs(bits=4, symmetric=True, group_size=-1)
    scale = torch.ones(1, 1)
    zp = torch.zeros(1, 1, dtype=torch.int8)
    w = torch.tensor([[0.5, 1.5, 2.5, -0.5, 100.0, -100.0]])
    assert quantize(w, scale, zp, args).tolist() == [[0, 2, 2, 0, 7, -8]]


def test_scale_rounded_to_storage_dtype() -> None:
    """Scales are chosen in the dtype they are stored in, so dequant is exact in it."""
    w = _weights().to(torch.bfloat16)
    result = rtn_quantize(w, QuantArgs(bits=4, group_size=16, symmetric=False))
    assert result.scale.dtype == torch.bfloat16 and result.dequant.dtype == torch.bfloat16
    groups = column_groups(w.shape[1], 16)
    expected = (
        result.qweight.to(torch.bfloat16) - result.zero_point[:, groups].to(torch.bfloat16)
    ) * result.scale[:, groups]
    assert torch.equal(result.dequant, expected)


def test_group_size_must_divide_columns() -> None:
    with pytest.raises(ValueError, match="does not divide"):
        rtn_quantize(_weights(cols=48), QuantArgs(group_size=32))
    with pytest.raises(ValueError, match="bits"):
        effective_group_size(64, QuantArgs(bits=16))
    assert effective_group_size(64, QuantArgs(group_size=-1)) == 64


@pytest.mark.parametrize("group_size", [-1, 16])
def test_rtn_grouping_and_loss(group_size: int) -> None:
    w = _weights()
    args = QuantArgs(bits=4, group_size=group_size, symmetric=False)
    result = rtn_quantize(w, args)
    n_groups = 1 if group_size == -1 else w.shape[1] // group_size
    assert result.scale.shape == (w.shape[0], n_groups) == result.zero_point.shape
    assert result.g_idx is None and math.isnan(result.loss)
    # Each group is quantized on its own: same as quantizing that slice per channel.
    size = w.shape[1] if group_size == -1 else group_size
    sub = rtn_quantize(w[:, size : 2 * size] if n_groups > 1 else w, QuantArgs(4, -1, False))
    lo = size if n_groups > 1 else 0
    assert torch.equal(result.qweight[:, lo : lo + size], sub.qweight)

    hessian = torch.eye(w.shape[1]) * 2
    with_loss = rtn_quantize(w, args, hessian)
    expected = 2 * float(((w - with_loss.dequant) ** 2).sum())
    assert with_loss.loss == pytest.approx(expected, rel=1e-5)
    assert math.isnan(quantization_loss(w, with_loss.dequant, None))


def test_mse_observer_never_worse_and_lowers_the_error() -> None:
    """The mse range search includes the min-max range, so its per-row error is never
    larger; on Gaussian rows clipping the extremes lowers the total error."""
    from gptqflow.gptq.quantizer import compute_qparams, dequantize, quantize
    from gptqflow.gptq.types import QuantArgs

    gen = torch.Generator().manual_seed(0)
    w = torch.randn(64, 64, generator=gen)
    for symmetric in (True, False):
        errs = []
        for observer in ("minmax", "mse"):
            args = QuantArgs(bits=4, group_size=64, symmetric=symmetric, observer=observer)
            scale, zp = compute_qparams(w, args)
            dq = dequantize(quantize(w, scale, zp, args), scale, zp)
            errs.append(((w - dq).abs() ** args.mse_norm).sum(dim=1))
        assert bool((errs[1] <= errs[0] * (1 + 1e-6)).all())
        assert float(errs[1].sum()) < 0.98 * float(errs[0].sum())
