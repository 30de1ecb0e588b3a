"""The Hessian-aware range search (``observer="hessian"``) against brute force, and the
default path's bits.

* On small groups, the range the observer picks is the one an independent float64
  loop over the same candidate ranges finds (least ``Σ h_j (w_j - q_j)²``), and its
  weighted error is never above min-max's or the plain-MSE choice's;
* RTN and GPTQ use it through the same grids (RTN: the Hessian diagonal; GPTQ: the
  factor's ``R_jj²``), and refuse to run it without a Hessian;
* the default observers' results are pinned (a digest of codes and scales), so a
  change to the default GPTQ path cannot pass unnoticed.
"""

from __future__ import annotations

import hashlib
import math

import pytest
import torch

from gptqflow.gptq.quantizer import compute_qparams, grouped_importance, rtn_quantize
from gptqflow.gptq.solver import gptq_solve, prepare_factor
from gptqflow.gptq.types import QuantArgs


def _weighted_error(
    w: torch.Tensor, scale: float, zp: float, imp: torch.Tensor, args: QuantArgs
) -> float:
    q = torch.clamp(torch.round(w / scale + zp), args.qmin, args.qmax)
    return float((imp * ((q - zp) * scale - w) ** 2).sum())


def _brute_force(w: torch.Tensor, imp: torch.Tensor, args: QuantArgs) -> tuple[float, float]:
    """Scale and zero point of one row: every candidate range tried in float64, in a loop."""
    lo, hi = min(float(w.min()), 0.0), max(float(w.max()), 0.0)
    span = args.qmax - args.qmin
    best: tuple[float, float, float] | None = None
    for i in range(args.mse_grid):
        shrink = 1.0 - (1.0 - args.mse_maxshrink) * i / max(args.mse_grid - 1, 1)
        a, b = lo * shrink, hi * shrink
        if args.symmetric:
            scale, zp = max(-a, b) / (span / 2), 0.0
        else:
            scale = (b - a) / span
            zp = min(max(round(args.qmin - a / scale), args.qmin), args.qmax)
        scale = scale if scale != 0 else torch.finfo(torch.float64).eps
        err = _weighted_error(w, scale, zp, imp, args)
        if best is None or err < best[0]:
            best = (err, scale, zp)
    assert best is not None
    return best[1], best[2]


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("bits", [2, 3, 4])
def test_hessian_observer_matches_brute_force(symmetric: bool, bits: int) -> None:
    gen = torch.Generator().manual_seed(bits * 2 + symmetric)
    rows, k = 40, 8
    w = torch.randn(rows, k, generator=gen, dtype=torch.float64)
    w[::5, 0] *= 6  # outliers: where shrinking the range pays
    imp = torch.rand(rows, k, generator=gen, dtype=torch.float64) ** 3  # skewed importance
    args = QuantArgs(bits=bits, symmetric=symmetric, observer="hessian")
    scale, zp = compute_qparams(w, args, importance=imp)
    for r in range(rows):
        ref_scale, ref_zp = _brute_force(w[r], imp[r], args)
        got = _weighted_error(w[r], float(scale[r]), float(zp[r]), imp[r], args)
        ref = _weighted_error(w[r], ref_scale, ref_zp, imp[r], args)
        assert math.isclose(got, ref, rel_tol=1e-12, abs_tol=1e-15), r
        # No worse, in the error it minimises, than min-max or the plain-MSE choice.
        for other in ("minmax", "mse"):
            s, z = compute_qparams(
                w[r : r + 1], QuantArgs(bits=bits, symmetric=symmetric, observer=other)
            )  # type: ignore[arg-type]
            assert got <= _weighted_error(w[r], float(s), float(z), imp[r], args) + 1e-15


def test_equal_importance_is_the_mse_choice() -> None:
    gen = torch.Generator().manual_seed(3)
    w = torch.randn(64, 16, generator=gen)
    hess = compute_qparams(w, QuantArgs(bits=3, observer="hessian"), importance=torch.ones(16))
    mse = compute_qparams(w, QuantArgs(bits=3, observer="mse"))
    assert torch.equal(hess[0], mse[0]) and torch.equal(hess[1], mse[1])


def _problem(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(512, 64, generator=gen) @ torch.randn(64, 64, generator=gen) / 8
    x[:, :8] *= 4  # a few strong input channels
    return torch.randn(32, 64, generator=gen) * 0.05, (2 * x.T @ x / 512).contiguous()


def test_rtn_and_gptq_use_the_hessian_observer() -> None:
    w, h = _problem()
    args = QuantArgs(bits=3, group_size=16, observer="hessian")
    rtn = rtn_quantize(w, args, h)
    # RTN's groups weigh each column by the Hessian diagonal.
    imp = grouped_importance(h.diagonal(), 32, 16)
    ref = compute_qparams(w.reshape(-1, 16), args, importance=imp)[0].reshape(32, 4)
    assert torch.equal(rtn.scale, ref)
    # It lowers the output error (tr((W-Q)H(W-Q)ᵀ)) of round-to-nearest vs plain MSE.
    mse = rtn_quantize(w, QuantArgs(bits=3, group_size=16, observer="mse"), h)
    assert rtn.loss < mse.loss
    # GPTQ's static groups weigh each column by R_jj² of the factor.
    for actorder in ("static", "group", "none"):
        a = QuantArgs(bits=3, group_size=16, observer="hessian", actorder=actorder)  # type: ignore[arg-type]
        res = gptq_solve(w, h, a)
        assert torch.isfinite(res.dequant).all()
    factor = prepare_factor(h, QuantArgs(actorder="static"))
    assert factor.perm is not None
    with pytest.raises(ValueError, match="needs the Hessian"):
        rtn_quantize(w, args)
    with pytest.raises(ValueError, match="importance"):
        compute_qparams(w, args)


def _default_path_digest() -> str:
    """Codes, scales and zero points of GPTQ and RTN under the default observers."""
    g = torch.Generator().manual_seed(1234)
    x = torch.randn(512, 96, generator=g) @ torch.randn(96, 96, generator=g)
    h = (2 * x.T @ x / 512).float()
    w = torch.randn(40, 96, generator=g)
    out = hashlib.sha256()
    for bits, sym, act, obs, gs in [
        (4, True, "static", "mse", 32),
        (3, False, "group", "mse", 32),
        (4, True, "none", "minmax", 32),
        (4, True, "static", "mse", -1),
    ]:
        a = QuantArgs(bits=bits, group_size=gs, symmetric=sym, actorder=act, observer=obs)  # type: ignore[arg-type]
        for r in (gptq_solve(w, h, a), rtn_quantize(w, a)):
            for t in (r.qweight, r.scale, r.zero_point):
                out.update(t.numpy().tobytes())
    return out.hexdigest()


def test_default_gptq_path_is_unchanged() -> None:
    """The bits of the default observers' GPTQ and RTN, as before the hessian observer.

    Pinned on this project's CPU build of torch (the digest was taken from the code
    before the observer existed). If torch or the machine's BLAS changes, regenerate it
    on purpose: ``python -c "import test_hessian_observer as t; print(t._default_path_digest())"``
    from ``tests/unit``, on a commit whose results are known to be right.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        digest = _default_path_digest()
    finally:
        torch.set_num_threads(threads)
    assert digest == "0d17dee500d535c4f9c5f3d29127d5012802d3677fa933b2c69f7ef41153b5e6"
