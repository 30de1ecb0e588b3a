"""A blocked upper-lower Cholesky whose column panels several ranks can factorise at once.

What it computes: ``R``, upper triangular, with ``a = R Rᵀ`` (the Cholesky factor of
``a`` with rows and columns reversed). That is the factor GPTQ's nearest-plane sweep
reads (:mod:`gptqflow.gptq.solver`): column ``j`` of ``R``, above the diagonal, is how
much of every earlier column's residual column ``j`` receives. Computing ``R``
directly (instead of a lower Cholesky of the reversed matrix, reversed back) means
the factor never has to be flipped or re-assembled: the sweep reads the panels as
they come out of the factorisation.

Why not one LAPACK call: the factorisation of a wide Hessian (``down_proj`` of
Llama-3-8B has 14336 columns) is the longest single step of a layer's solve, and in
a true-sequential pipeline nothing of the group can start before it ends. Spread
over ranks it shrinks with the rank count; done redundantly on every rank it does
not.

The algorithm is the textbook right-looking one, mirrored (it starts at the last
column): the matrix is cut into column panels of ``block`` columns starting at
column 0; panel ``k`` (columns ``s:e``) holds rows ``0:e``. From the last panel
down, panel ``k`` is factorised (an upper-lower factorisation of its diagonal
block and a triangular solve for the rows above it), then every earlier panel
``j`` subtracts ``R[:e_j, k] · R[s_j:e_j, k]ᵀ``. Panels are owned round-robin by
the ranks taking part; the owner of panel ``k`` factorises it and shares it, every
rank updates the panels it owns. The owner of panel ``k-1`` updates and factorises
that panel first and starts sharing it before its other updates ("look-ahead"),
so the others rarely wait.

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
    "assemble",
    "blocked_cholesky",
    "factor_panels",
    "panel_bounds",
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
    """Builds column panels ``a[:e, s:e]`` (fresh, contiguous tensors) of an ``n × n`` matrix."""

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
            lambda s, e: a[:e, s:e].clone(memory_format=torch.contiguous_format),
            a.dtype,
            a.device,
        )


def panel_bounds(n: int, block: int = FACTOR_BLOCK) -> list[tuple[int, int]]:
    """``(start, end)`` columns of each panel of an ``n``-column factor, left to right."""
    if block < 1:
        raise ValueError(f"block must be >= 1, got {block}")
    return [(s, min(s + block, n)) for s in range(0, n, block)]


def blocked_cholesky(
    a: torch.Tensor,
    exchange: PanelExchange = LOCAL,
    block: int = FACTOR_BLOCK,
    *,
    shift: float | torch.Tensor = 0.0,
) -> torch.Tensor | None:
    """Upper triangular ``R`` with ``a + shift·I = R Rᵀ``, or ``None``.

    Reads the upper triangle of ``a`` only and never mutates it. ``None`` when the
    matrix is not (numerically) positive definite or holds NaN/inf: a failed panel
    is shared as NaN, so every rank taking part returns ``None`` at the same panel
    and no rank is left waiting for a panel that never comes. Assembles the panels
    into one matrix (for tests and callers that want it whole; the solver reads the
    panels of :func:`factor_panels` directly).
    """
    panels = factor_panels(PanelSource.of(a), exchange, block, shift=shift)
    return None if panels is None else assemble(panels, block)


def assemble(panels: list[torch.Tensor], block: int = FACTOR_BLOCK) -> torch.Tensor:
    """The dense ``n × n`` matrix ``R`` from the panels of :func:`factor_panels`."""
    n = sum(p.shape[1] for p in panels)
    out = panels[0].new_zeros(n, n)
    for (s, e), p in zip(panel_bounds(n, block), panels):
        out[:e, s:e] = p
    return out


def factor_panels(
    src: PanelSource,
    exchange: PanelExchange = LOCAL,
    block: int = FACTOR_BLOCK,
    *,
    shift: float | torch.Tensor = 0.0,
) -> list[torch.Tensor] | None:
    """:func:`blocked_cholesky` as its panels: panel ``j`` is ``R[:e_j, s_j:e_j]``.

    For callers that read the factor panel by panel (the solver), so that no full
    ``n × n`` copy is made. ``src`` builds only the panels this rank owns (a rank
    sharing the factorisation never needs the others' columns of the input;
    :meth:`PanelSource.of` copies them out of a matrix). ``shift`` is added to the
    diagonal as the panels are made. The strict lower triangle of each panel's
    diagonal block is zero.
    """
    bounds = panel_bounds(src.n, block)
    nb = len(bounds)
    panels = []
    for j, (s, e) in enumerate(bounds):
        if exchange.owns(j):
            p = src.panel(s, e)
            p[s:e].diagonal().add_(shift)
        else:
            p = torch.empty(e, e - s, dtype=src.dtype, device=src.device)
        panels.append(p)

    def update(j: int, k: int) -> None:
        s, e = bounds[j]
        src = panels[k][:e]
        # Explicit product then subtraction (no fused kernel): the same rounding
        # whichever rank does it.
        panels[j] -= src @ src[s:e].T

    last = nb - 1
    if exchange.owns(last):
        _factor_panel(panels[last], bounds[last][0])
    pending = exchange.share(last, panels[last])
    for k in range(last, -1, -1):
        pending.wait()
        if not _finite_diagonal(panels[k], bounds[k][0]):
            return None
        if k > 0:
            if exchange.owns(k - 1):
                update(k - 1, k)
                _factor_panel(panels[k - 1], bounds[k - 1][0])
            pending = exchange.share(k - 1, panels[k - 1])
        for j in range(k - 2, -1, -1):
            if exchange.owns(j):
                update(j, k)
    return panels


def _factor_panel(panel: torch.Tensor, s: int) -> None:
    """Factorise an updated panel (rows ``0:e``, diagonal block at rows ``s:e``) in place.

    The diagonal block ``D`` becomes upper triangular ``R_kk`` with ``D = R_kk R_kkᵀ``
    (a lower Cholesky of the block with rows and columns reversed: ``b × b``, so the
    flips cost nothing next to the rest), the rows above become ``A · R_kk⁻ᵀ``. If the
    block is not positive definite the panel is filled with NaN.

    On one thread: multi-threaded LAPACK/trsm round differently with each thread
    count, and the factor must not depend on how a run was launched (torchrun
    gives each rank one thread, a single process uses all cores).  The panel is
    a small part of the work; the updates (plain matmuls, which split the output
    and not the sums between threads) keep every thread.
    """
    with single_threaded(panel.device):
        lower, info = torch.linalg.cholesky_ex(panel[s:].flip(0, 1))
        if int(info) != 0 or not bool(torch.isfinite(lower.diagonal()).all()):
            panel.fill_(math.nan)
            return
        diag = lower.flip(0, 1)
        if s > 0:
            # X · diagᵀ = A  ->  X = A · diag⁻ᵀ  (diagᵀ is lower triangular)
            panel[:s] = torch.linalg.solve_triangular(diag.T, panel[:s], upper=False, left=False)
    panel[s:] = diag


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


def _finite_diagonal(panel: torch.Tensor, s: int) -> bool:
    d = panel[s:].diagonal()
    return bool(torch.isfinite(d).all() and (d > 0).all())
