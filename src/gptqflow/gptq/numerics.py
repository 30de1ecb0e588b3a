"""Small numeric checks shared by the solver and the stages."""

from __future__ import annotations

import torch

__all__ = ["all_finite", "count_nonfinite"]


def all_finite(t: torch.Tensor) -> bool:
    """Whether every entry of the floating-point tensor ``t`` is finite (no NaN, no ±inf).

    Exact, and about 30x faster than ``torch.isfinite(t).all()`` on the CPU (a
    14336-column Hessian: ~60 ms instead of ~2 s on one thread): the minimum and
    maximum are finite exactly when no entry is ±inf, and ``aminmax`` propagates
    NaN.  Hessians are checked on every rank before every solve, so the slow form
    was a pass that sharing the factorisation could not split.
    """
    if t.numel() == 0:
        return True
    lo, hi = torch.aminmax(t)
    return bool(torch.isfinite(lo) & torch.isfinite(hi))


def count_nonfinite(t: torch.Tensor) -> int:
    """How many entries of ``t`` are NaN or ±inf, for error messages.

    The fast :func:`all_finite` first: the count (a slow ``isfinite`` pass) is only
    made when there is something to count.
    """
    return 0 if all_finite(t) else int((~torch.isfinite(t)).sum())
