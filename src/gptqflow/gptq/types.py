"""Value types shared by the quantizer, the solver and the checkpoint writer."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

ActOrder = Literal["none", "static", "group"]
Observer = Literal["minmax", "mse", "hessian"]


@dataclass(frozen=True)
class QuantArgs:
    """How one weight matrix is quantized.

    Integer codes follow the compressed-tensors convention: signed codes in
    ``[-2**(bits-1), 2**(bits-1) - 1]``, ``w ≈ (q - zero_point) * scale``;
    symmetric schemes have ``zero_point == 0``.
    """

    bits: int = 4
    group_size: int = 128  # -1 = one scale per output channel
    symmetric: bool = True
    actorder: ActOrder = "none"
    block_size: int = 128  # lazy-batch width of the GPTQ column sweep
    dampening: float = 0.01  # fraction of the mean Hessian diagonal added to it
    max_damp_retries: int = 6  # each retry multiplies the dampening by 10
    # How a group's range is chosen: min-max; mse: the shrunken range with the least
    # Σ|w - q|^p; hessian: the one with the least Σ h_j (w_j - q_j)², h = column importance.
    observer: Observer = "minmax"
    mse_grid: int = 20  # mse: candidate ranges, shrinking the min-max range down to mse_maxshrink
    mse_maxshrink: float = 0.8
    mse_norm: float = 2.0  # mse: error norm |w - q|^p (the GPTQ reference uses 2.4; 2 is cheaper)

    @property
    def qmin(self) -> int:
        return -(2 ** (self.bits - 1))

    @property
    def qmax(self) -> int:
        return 2 ** (self.bits - 1) - 1


@dataclass
class QuantResult:
    """The quantized form of one weight matrix (or a slice of its rows).

    ``qweight``: int8 codes, shape (rows, cols), in original column order.
    ``scale``: (rows, n_groups) in the weight's dtype; ``n_groups = 1`` per channel.
    ``zero_point``: (rows, n_groups) int8 (all zeros when symmetric).
    ``g_idx``: (cols,) int32 group of each input column, only when actorder
    "group" changed group membership; otherwise ``None`` (group = col // group_size).
    ``dequant``: ``(qweight - zero_point[g]) * scale[g]`` in the weight's dtype (empty in
    the records ``state.quantized`` keeps: the installed weight is the module's own).
    ``loss``: GPTQ objective ``tr((W-Q) H (W-Q)^T)`` with the (undamped) Hessian
    given to the solver (float, for reporting).
    ``damp``: the dampening fraction that made the Cholesky succeed.
    """

    qweight: torch.Tensor
    scale: torch.Tensor
    zero_point: torch.Tensor
    g_idx: torch.Tensor | None
    dequant: torch.Tensor
    loss: float
    damp: float
