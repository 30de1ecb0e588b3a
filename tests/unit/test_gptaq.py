"""GPTAQ (asymmetric calibration) against float64 references.

* The asymmetric target followed by GPTQ's sweep is the greedy column-by-column
  minimiser of ``‖W X̃ - Q X‖²`` (checked against an unblocked reference that, at
  every column, solves the least-squares problem of the remaining columns directly);
* its objective is below GPTQ's on correlated inputs whose paths differ, and equal
  to GPTQ's result when the paths agree (``D = 0``) or ``alpha = 0``;
* the cross-term accumulator is exact and independent of how tokens are split.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import pytest
import torch

from gptqflow.gptq.gptaq import CrossSum, asymmetric_target
from gptqflow.gptq.hessian import HessianSum
from gptqflow.gptq.quantizer import compute_qparams
from gptqflow.gptq.solver import gptq_solve, prepare_factor, solve_rows
from gptqflow.gptq.types import QuantArgs

ROWS, COLS, TOKENS = 24, 48, 600


@pytest.fixture(autouse=True)
def _single_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _paths(seed: int, drift: float = 0.3) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Weights, quantized-path inputs X and float-path inputs X̃ (tokens x cols), float64.

    Inputs are correlated (a random mixing matrix); the float path differs from the
    quantized one by a perturbation correlated with X (as accumulated quantization
    error is) plus independent noise.
    """
    gen = torch.Generator().manual_seed(seed)
    mixing = torch.randn(COLS, COLS, generator=gen, dtype=torch.float64) / math.sqrt(COLS)
    x = torch.randn(TOKENS, COLS, generator=gen, dtype=torch.float64) @ mixing
    skew = torch.randn(COLS, COLS, generator=gen, dtype=torch.float64) / math.sqrt(COLS)
    noise = torch.randn(TOKENS, COLS, generator=gen, dtype=torch.float64)
    x_float = x + drift * (x @ skew + 0.3 * noise @ mixing)
    w = torch.randn(ROWS, COLS, generator=gen, dtype=torch.float64) * 0.05
    return w, x, x_float


def _stats(x: torch.Tensor, x_float: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    n = x.shape[0]
    return 2 * x.T @ x / n, 2 * (x_float - x).T @ x / n


def _objective(w: torch.Tensor, q: torch.Tensor, x: torch.Tensor, x_float: torch.Tensor) -> float:
    return float(((x_float @ w.T - x @ q.to(torch.float64).T) ** 2).sum())


ARGS = QuantArgs(bits=3, group_size=-1, symmetric=True, actorder="none", dampening=1e-8)


def _gptaq(w: torch.Tensor, h: torch.Tensor, d: torch.Tensor, alpha: float, args: QuantArgs):  # type: ignore[no-untyped-def]
    factor = prepare_factor(h, args, dtype=torch.float64)
    return solve_rows(asymmetric_target(w, d, factor, alpha), factor, args, dtype=torch.float64)


def test_target_is_the_least_squares_solution() -> None:
    """alpha = 1: W* = argmin ‖W X̃ - W* X‖² (checked with lstsq)."""
    w, x, x_float = _paths(0)
    h, d = _stats(x, x_float)
    factor = prepare_factor(h, QuantArgs(dampening=1e-12), dtype=torch.float64)
    target = asymmetric_target(w, d, factor, 1.0)
    ref = torch.linalg.lstsq(x, x_float @ w.T).solution.T
    assert torch.allclose(target, ref, rtol=1e-8, atol=1e-9)
    # Activation order permutes the factor; the target is the same matrix.
    perm = prepare_factor(h, QuantArgs(dampening=1e-12, actorder="static"), dtype=torch.float64)
    assert torch.allclose(asymmetric_target(w, d, perm, 1.0), target, rtol=1e-8, atol=1e-9)


def _greedy_reference(
    w: torch.Tensor, x: torch.Tensor, x_float: torch.Tensor, scale: torch.Tensor, args: QuantArgs
) -> torch.Tensor:
    """Codes of the unblocked greedy: column j is rounded from the least-squares optimum of
    columns j.. given the already rounded columns < j (float64, explicit lstsq each step)."""
    y = x_float @ w.T  # the float model's output [tokens, rows]
    q = torch.zeros_like(w)
    codes = torch.zeros_like(w)
    for j in range(w.shape[1]):
        rest = y - x[:, :j] @ q[:, :j].T
        best = torch.linalg.lstsq(x[:, j:], rest).solution.T  # [rows, cols - j]
        c = torch.clamp(torch.round(best[:, 0] / scale[:, 0]), args.qmin, args.qmax)
        codes[:, j] = c
        q[:, j] = c * scale[:, 0]
    return codes


def test_sweep_on_the_target_is_the_greedy_asymmetric_solution() -> None:
    w, x, x_float = _paths(1)
    h, d = _stats(x, x_float)
    res = _gptaq(w, h, d, 1.0, ARGS)
    # The grid the solver used (per channel, from the target): the reference rounds on it.
    target = asymmetric_target(w, d, prepare_factor(h, ARGS, dtype=torch.float64), 1.0)
    scale, _ = compute_qparams(target, ARGS)
    assert torch.equal(res.scale, scale.to(res.scale.dtype))
    ref = _greedy_reference(w, x, x_float, scale, ARGS)
    assert torch.equal(res.qweight.to(torch.float64), ref)


@pytest.mark.parametrize("seed", [2, 3, 4])
@pytest.mark.parametrize("bits", [3, 4])
def test_gptaq_objective_below_gptq(seed: int, bits: int) -> None:
    w, x, x_float = _paths(seed)
    h, d = _stats(x, x_float)
    args = QuantArgs(bits=bits, group_size=16, symmetric=True, actorder="static")
    gptq = gptq_solve(w, h, args, dtype=torch.float64)
    full = _gptaq(w, h, d, 1.0, args)
    part = _gptaq(w, h, d, 0.25, args)
    f_gptq = _objective(w, gptq.dequant, x, x_float)
    f_full = _objective(w, full.dequant, x, x_float)
    f_part = _objective(w, part.dequant, x, x_float)
    assert f_full < f_part < f_gptq
    assert f_full < 0.8 * f_gptq


def test_same_paths_or_alpha_zero_is_gptq() -> None:
    """No asymmetry (X̃ = X) or alpha = 0: bit for bit GPTQ's result."""
    w, x, x_float = _paths(5)
    h, d = _stats(x, x_float)
    args = QuantArgs(bits=4, group_size=16, actorder="group")
    gptq = gptq_solve(w, h, args, dtype=torch.float64)
    for res in (_gptaq(w, h, torch.zeros_like(d), 1.0, args), _gptaq(w, h, d, 0.0, args)):
        assert torch.equal(res.qweight, gptq.qweight)
        assert torch.equal(res.scale, gptq.scale)


def test_dead_columns_stay_zero() -> None:
    w, x, x_float = _paths(6)
    x[:, 3] = 0  # never activated on the quantized path, alive on the float path
    h, d = _stats(x, x_float)
    res = _gptaq(w, h, d, 1.0, QuantArgs(bits=4, group_size=16))
    assert torch.isfinite(res.dequant).all()
    assert bool((res.dequant[:, 3] == 0).all())


def test_cross_sum_is_exact_and_split_independent() -> None:
    _, x, x_float = _paths(7)
    xq, xf = x.float().reshape(6, -1, COLS), x_float.float().reshape(6, -1, COLS)
    whole = CrossSum.zeros(COLS)
    for i in range(6):
        whole.add(xf[i], xq[i])
    a, b = CrossSum.zeros(COLS), CrossSum.zeros(COLS)
    for i in (0, 2, 4):
        a.add(xf[i], xq[i])
    for i in (5, 3, 1):
        b.add(xf[i], xq[i])
    assert torch.equal(whole.sum, a.sum + b.sum) and whole.count == a.count + b.count == TOKENS
    ref = 2 * (xf - xq).double().reshape(-1, COLS).T @ xq.double().reshape(-1, COLS) / TOKENS
    assert torch.allclose(whole.finalize(), ref, rtol=1e-5, atol=1e-5)  # float32 products
    # Same paths: the Hessian's accumulator and this one see the same tokens, D = 0.
    same = CrossSum.zeros(COLS)
    same.add(xq[0], xq[0])
    hs = HessianSum.zeros(COLS)
    hs.add(xq[0])
    assert same.count == hs.count and not bool(same.sum.any())
    with pytest.raises(ValueError, match="differ in shape"):
        same.add(xq[0][:, :5], xq[0])
