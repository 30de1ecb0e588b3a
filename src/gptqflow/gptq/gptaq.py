"""GPTAQ ("GPTQv2", Li et al., ICML 2025): asymmetric calibration, as a target for GPTQ.

GPTQ solves every layer against its own (quantized-path) inputs ``X``:
``min_Q ‖(W - Q) X‖²``. The model's error then accumulates: the quantized layer sees
inputs that earlier quantized layers already changed, and matches the float layer's
response *to those* inputs. GPTAQ matches the float model's output instead:

    min_Q ‖W X̃ - Q X‖²,      X̃ = the float-path input to the same module.

With ``ΔX = X̃ - X``, ``H = 2 X Xᵀ`` and ``D = 2 ΔX Xᵀ`` (the statistic next to the
Hessian, a sum over tokens that reduces across ranks the same way), the continuous
minimiser is ``W* = W X̃ Xᵀ (X Xᵀ)⁻¹ = W (I + D H⁻¹)``, and by orthogonality

    ‖W X̃ - Q X‖² = ‖(W* - Q) X‖² + ‖W X̃ - W* X‖²,

where the last term does not depend on ``Q``. So the asymmetric objective is GPTQ's
objective with the target ``W*`` in place of ``W``, the same Hessian and the same
factor: running GPTQ's sweep on ``W*`` quantizes column by column, each time moving
the not yet quantized columns to the best values given the quantized ones, for the
asymmetric objective. (The paper applies the asymmetric part as a correction inside
the column loop; folded into the target it minimises the same objective with the same
greedy order, in one matmul, and leaves the sweep, its row slicing across ranks and its
bit-exactness untouched.)

``alpha`` scales the asymmetric part: ``W_α = W + α · W D H⁻¹`` (0 = GPTQ, 1 = the
exact least-squares target). The paper shrinks its correction the same way (0.25 by
default): ``D`` is estimated from the same calibration tokens as ``H``, and the full
correction fits them more closely than the float model generalises.

``H⁻¹`` is the inverse of the *dampened* Hessian, the one the sweep factorises, so the
target and the sweep agree on the problem they solve. Pure functions of tensors.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from gptqflow.gptq.solver import HessianFactor

__all__ = ["CrossSum", "asymmetric_target"]


@dataclass
class CrossSum:
    """Running float64 sum of ``2·Δxᵀx`` (``Δx = x̃ - x``) over tokens, and their count.

    Like :class:`~gptqflow.gptq.hessian.HessianSum`: each chunk's product in float32,
    widened exactly into a float64 sum, divided once at the end, so the sum does not
    depend on how the tokens were split between ranks. ``sum[a, b] = Σ 2 Δx_a x_b``
    (not symmetric).
    """

    sum: torch.Tensor
    count: int = 0

    @classmethod
    def zeros(cls, cols: int, device: torch.device | str | None = None) -> CrossSum:
        return cls(sum=torch.zeros(cols, cols, dtype=torch.float64, device=device), count=0)

    def add(self, x_float: torch.Tensor, x_quant: torch.Tensor) -> None:
        """Accumulate one chunk: float-path inputs ``x_float`` and quantized-path ``x_quant``."""
        if x_float.shape != x_quant.shape:
            raise ValueError(
                f"float-path input {tuple(x_float.shape)} and quantized-path input "
                f"{tuple(x_quant.shape)} differ in shape"
            )
        cols = int(self.sum.shape[0])
        x = x_quant.detach().to(self.sum.device).reshape(-1, cols).to(torch.float32)
        dx = x_float.detach().to(self.sum.device).reshape(-1, cols).to(torch.float32) - x
        self.sum.add_(dx.T @ x, alpha=2.0)
        self.count += int(x.shape[0])

    def finalize(self) -> torch.Tensor:
        """The mean ``sum / count`` (float64: the target's matmuls read it once)."""
        if self.count <= 0:
            raise ValueError("no tokens were accumulated into this sum (count == 0)")
        return self.sum / self.count


def asymmetric_target(
    weight: torch.Tensor, cross: torch.Tensor, factor: HessianFactor, alpha: float
) -> torch.Tensor:
    """``W + alpha · W D H_d⁻¹``, returned in ``weight``'s dtype.

    ``H_d`` is the dampened Hessian the sweep factorised: ``factor`` holds ``R`` with
    ``H_d = R Rᵀ`` in sweep order, so ``Y H_d⁻¹`` is two triangular solves of
    ``Y = W D`` (no second factorisation, no ``cols × cols`` inverse), in the factor's
    dtype (float32 in runs, float64 for references). Dead columns are decoupled in
    ``H_d`` exactly as the sweep decouples them; their inputs are zero on the quantized
    path, so ``D``'s columns there are zero too.

    Each row's result depends only on that row, but it is computed for a whole module
    at once: every rank that holds the module's weight computes the same product of the
    same shapes and gets the same target, bit for bit, whatever rows it then solves.
    """
    cols = factor.cols
    if weight.ndim != 2 or weight.shape[1] != cols or cross.shape != (cols, cols):
        raise ValueError(
            f"weight {tuple(weight.shape)} and cross {tuple(cross.shape)} do not match a "
            f"factor of {cols} columns"
        )
    dtype = factor.diag.dtype
    r = factor.upper()
    perm = factor.perm
    d = cross.to(dtype)
    w = weight.detach().to(dtype)
    if perm is not None:
        d = d.index_select(0, perm).index_select(1, perm)
        w = w.index_select(1, perm)
    y = w @ d
    z = torch.linalg.solve_triangular(r.T, y, upper=False, left=False)  # z Rᵀ = y
    v = torch.linalg.solve_triangular(r, z, upper=True, left=False)  # v R = z
    target = w + alpha * v
    if perm is not None:
        target = target.index_select(1, torch.argsort(perm))
    return target.to(weight.dtype)
