"""Who solves what: a pure function of module shapes, the cost model and the world size.

GPTQ treats every output row independently once the inverse-Hessian factor is
known, so the unit of work is a slice of rows of a module. A group of modules that
share one Hessian (q/k/v; gate/up) is planned as one block of ``sum(rows)`` rows:
the rows are cut into ``world_size`` contiguous slices of (nearly) equal cost,
each rank factorises the Hessian itself (the factorisation is ~cols³/3 flops, small
next to the rows·cols² sweep once rows ≥ cols, and doing it locally costs no
communication or waiting) and sweeps its slice.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class RowSlice:
    """Rows ``[start, stop)`` of module ``module`` (index within its group), solved by ``rank``."""

    rank: int
    module: int
    start: int
    stop: int

    @property
    def rows(self) -> int:
        return self.stop - self.start


def split_rows(rows: list[int], world_size: int, min_rows: int = 1) -> list[RowSlice]:
    """Cut the concatenated rows of a group into ``world_size`` near-equal contiguous slices.

    Rank ``r`` gets global rows ``[r*total//W, (r+1)*total//W)`` of the concatenation,
    broken at module boundaries. With fewer than ``min_rows * world_size`` rows the
    group goes to fewer ranks, so tiny slices do not pay a factorisation each.
    Deterministic, and every row is assigned exactly once.
    """
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    total = sum(rows)
    ranks = max(1, min(world_size, total // max(min_rows, 1)))
    bounds = [r * total // ranks for r in range(ranks + 1)]
    offsets = [0]
    for n in rows:
        offsets.append(offsets[-1] + n)
    out: list[RowSlice] = []
    for r in range(ranks):
        lo, hi = bounds[r], bounds[r + 1]
        for m, n in enumerate(rows):
            a, b = max(lo, offsets[m]), min(hi, offsets[m] + n)
            if a < b:
                out.append(RowSlice(r, m, a - offsets[m], b - offsets[m]))
    return out
