"""A blocked Cholesky whose column blocks can be factorised on several ranks at once.

Why not one LAPACK ``potrf`` call: the factorisation of a wide Hessian
(``down_proj`` of Llama-3-8B has 14336 columns) is the longest single step of a
layer's solve, and in a true-sequential pipeline nothing of the group can start
before it ends. Spread over ranks it shrinks with the rank count; done
redundantly on every rank it does not.

The algorithm is the textbook right-looking one on column blocks ("panels") of
``block`` columns: panel ``k`` is factorised (a ``block × block`` Cholesky and a
triangular solve for the rows below it), then every later panel ``j`` subtracts
``L[j:, k] · L[j, k]ᵀ``. Panels are owned round-robin by the ranks taking part;
the owner of panel ``k`` factorises it and shares it, every rank updates the
panels it owns. The owner of panel ``k+1`` updates and factorises that panel
first and starts sharing it before its other updates ("look-ahead"), so the
others rarely wait.

Every block operation has the same shapes and inputs whatever the number of
ranks, and each panel receives its updates in the same order, so the factor is
bit-identical on 1 or N ranks. How panels travel is injected as a
:class:`PanelExchange`: :data:`LOCAL` (one rank, nothing travels) lives here;
the multi-rank one lives with the solve stage, so this module stays free of
I/O and collectives.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Protocol

import torch

__all__ = [
    "FACTOR_BLOCK",
    "LOCAL",
    "LocalExchange",
    "PanelExchange",
    "PanelSource",
    "blocked_cholesky",
    "factor_panels",
    "single_threaded",
]

# Columns per panel. Fixed (not tuned per world size), because the block size
# decides the rounding of the factor and the factor must not depend on the rank
# count. 256 keeps the panel solves small and the updates matmul-bound.
FACTOR_BLOCK = 256


class Pending(Protocol):
    def wait(self) -> object: ...


class PanelExchange(Protocol):
    """Who factorises panel ``k``, and how a finished panel reaches the other ranks."""

    def owns(self, k: int) -> bool:
        """Whether this rank factorises and updates panel ``k``."""
        ...

    def share(self, k: int, panel: torch.Tensor) -> Pending:
        """Start sending panel ``k`` (owner) or receiving it into ``panel`` (others)."""
        ...


class _Done:
    def wait(self) -> None:
        return None


class LocalExchange:
    """One rank owns every panel; nothing travels."""

    def owns(self, k: int) -> bool:
        return True

    def share(self, k: int, panel: torch.Tensor) -> Pending:
        return _Done()


LOCAL = LocalExchange()


class PanelSource:
    """Builds column panels ``a[s:, s:e]`` (fresh, contiguous tensors) of an ``n × n`` matrix."""

    def __init__(
        self,
        n: int,
        panel: Callable[[int, int], torch.Tensor],
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        self.n, self.panel, self.dtype, self.device = n, panel, dtype, device

    @classmethod
    def of(cls, a: torch.Tensor) -> PanelSource:
        """Panels copied out of a square matrix (never mutated)."""
        if a.ndim != 2 or a.shape[1] != a.shape[0]:
            raise ValueError(f"expected a square matrix, got shape {tuple(a.shape)}")
        return cls(
            a.shape[0],
            lambda s, e: a[s:, s:e].clone(memory_format=torch.contiguous_format),
            a.dtype,
            a.device,
        )


def blocked_cholesky(
    a: torch.Tensor,
    exchange: PanelExchange = LOCAL,
    block: int = FACTOR_BLOCK,
    *,
    shift: float | torch.Tensor = 0.0,
) -> torch.Tensor | None:
    """Lower Cholesky factor ``L`` of ``a + shift·I`` (``= L Lᵀ``), or ``None``.

    Reads the lower triangle of ``a`` only and never mutates it. ``None`` when the
    matrix is not (numerically) positive definite or holds NaN/inf: a failed panel
    is shared as NaN, so every rank taking part returns ``None`` at the same panel
    and no rank is left waiting for a panel that never comes.
    """
    panels = factor_panels(PanelSource.of(a), exchange, block, shift=shift)
    if panels is None:
        return None
    n = a.shape[0]
    out = a.new_zeros(n, n)
    for start, p in zip(range(0, n, block), panels):
        out[start:, start : start + p.shape[1]] = p
    return out


def factor_panels(
    src: PanelSource,
    exchange: PanelExchange = LOCAL,
    block: int = FACTOR_BLOCK,
    *,
    shift: float | torch.Tensor = 0.0,
) -> list[torch.Tensor] | None:
    """:func:`blocked_cholesky` as its panels: panel ``j`` is ``L[j·block:, j·block:(j+1)·block]``.

    For callers that rearrange the factor anyway (the solver reverses and scales
    it), so that no full ``n × n`` copy is made just to be read once. ``src``
    builds only the panels this rank owns (a rank sharing the factorisation never
    needs the others' columns of the input; :meth:`PanelSource.of` copies them out
    of a matrix). ``shift`` is added to the diagonal as the panels are made.
    """
    n = src.n
    if block < 1:
        raise ValueError(f"block must be >= 1, got {block}")
    starts = list(range(0, n, block))
    ends = [*starts[1:], n]
    nb = len(starts)
    # Panel j holds rows starts[j]: of columns starts[j]:ends[j] (lower part only).
    panels = []
    for j, (s, e) in enumerate(zip(starts, ends)):
        if exchange.owns(j):
            p = src.panel(s, e)
            p[: e - s].diagonal().add_(shift)
        else:
            p = torch.empty(n - s, e - s, dtype=src.dtype, device=src.device)
        panels.append(p)

    def update(j: int, k: int) -> None:
        off = starts[j] - starts[k]
        src = panels[k][off:]
        # Explicit product then subtraction (no fused kernel): the same rounding
        # whichever rank does it.
        panels[j] -= src @ src[: ends[j] - starts[j]].T

    if exchange.owns(0):
        _factor_panel(panels[0])
    pending = exchange.share(0, panels[0])
    for k in range(nb):
        pending.wait()
        if not _finite_diagonal(panels[k]):
            return None
        if k + 1 < nb:
            if exchange.owns(k + 1):
                update(k + 1, k)
                _factor_panel(panels[k + 1])
            pending = exchange.share(k + 1, panels[k + 1])
        for j in range(k + 2, nb):
            if exchange.owns(j):
                update(j, k)
    return panels


def _factor_panel(panel: torch.Tensor) -> None:
    """Factorise an updated panel in place; fill it with NaN if its diagonal block fails.

    On one thread: multi-threaded LAPACK/trsm round differently with each thread
    count, and the factor must not depend on how a run was launched (torchrun
    gives each rank one thread, a single process uses all cores).  The panel is
    a small part of the work; the updates (plain matmuls, which split the output
    and not the sums between threads) keep every thread.
    """
    b = panel.shape[1]
    with single_threaded(panel.device):
        diag, info = torch.linalg.cholesky_ex(panel[:b])
        if int(info) != 0 or not bool(torch.isfinite(diag.diagonal()).all()):
            panel.fill_(math.nan)
            return
        if panel.shape[0] > b:
            # X · diagᵀ = A  ->  X = A · diag⁻ᵀ
            panel[b:] = torch.linalg.solve_triangular(diag.T, panel[b:], upper=True, left=False)
    panel[:b] = diag


@contextmanager
def single_threaded(device: torch.device) -> Iterator[None]:
    """Run CPU intra-op work on one thread inside the block (restored afterwards)."""
    previous = torch.get_num_threads()
    if device.type != "cpu" or previous == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _finite_diagonal(panel: torch.Tensor) -> bool:
    d = panel[: panel.shape[1]].diagonal()
    return bool(torch.isfinite(d).all() and (d > 0).all())
