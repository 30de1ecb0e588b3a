"""The blocked upper-lower Cholesky (``a = R Rᵀ``, ``R`` upper): correct, and bit-identical
however its panels are spread over ranks.

Ranks are simulated by threads that exchange panels through queues, which is
what the solve stage's exchange does with broadcasts: the algorithm under test is
the same code, only the transport differs.
"""

from __future__ import annotations

import math
import queue
import threading

import pytest
import torch

from gptqflow.gptq.cholesky import blocked_cholesky


class _Done:
    def wait(self) -> None:
        return None


class _Recv:
    def __init__(self, q: queue.Queue[torch.Tensor], into: torch.Tensor) -> None:
        self.q, self.into = q, into

    def wait(self) -> None:
        self.into.copy_(self.q.get(timeout=60))


class ThreadExchange:
    """Panel ``k`` is owned by rank ``k % world``; the owner puts it on every other rank's queue."""

    def __init__(self, rank: int, world: int, queues: list[list[queue.Queue[torch.Tensor]]]):
        self.rank, self.world, self.queues = rank, world, queues

    def owns(self, k: int) -> bool:
        return k % self.world == self.rank

    def share(self, k: int, panel: torch.Tensor) -> _Done | _Recv:
        if self.owns(k):
            for r in range(self.world):
                if r != self.rank:
                    self.queues[r][k].put(panel.clone())
            return _Done()
        return _Recv(self.queues[self.rank][k], panel)


def _spd(n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(3 * n, n, generator=g)
    return x.T @ x / n + 1e-3 * torch.eye(n)


def _run_ranks(a: torch.Tensor, world: int, block: int) -> list[torch.Tensor | None]:
    nb = math.ceil(a.shape[0] / block)
    queues: list[list[queue.Queue[torch.Tensor]]] = [
        [queue.Queue() for _ in range(nb)] for _ in range(world)
    ]
    out: list[torch.Tensor | None] = [None] * world

    def work(rank: int) -> None:
        out[rank] = blocked_cholesky(a, ThreadExchange(rank, world, queues), block)

    threads = [threading.Thread(target=work, args=(r,)) for r in range(world)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    return out


@pytest.mark.parametrize(("n", "block"), [(1, 4), (37, 8), (64, 16), (200, 64), (100, 256)])
def test_matches_lapack(n: int, block: int) -> None:
    a = _spd(n).double()
    got = blocked_cholesky(a, block=block)
    assert got is not None
    # R is LAPACK's lower factor of the matrix with rows and columns reversed, reversed.
    want = torch.linalg.cholesky(a.flip(0, 1)).flip(0, 1)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    assert torch.equal(got, got.triu()), "the strict lower triangle is zero"
    torch.testing.assert_close(got @ got.T, a, rtol=1e-10, atol=1e-10)


def test_reads_upper_triangle_only_and_does_not_mutate() -> None:
    a = _spd(50)
    before = a.clone()
    junk = a + torch.tril(torch.full_like(a, 7.0), diagonal=-1)
    assert torch.equal(blocked_cholesky(junk, block=16), blocked_cholesky(a, block=16))
    assert torch.equal(a, before)


@pytest.mark.parametrize("world", [2, 3])
def test_spread_over_ranks_is_bit_identical(world: int) -> None:
    a = _spd(150, seed=world)
    alone = blocked_cholesky(a, block=32)
    for got in _run_ranks(a, world, block=32):
        assert got is not None and alone is not None
        assert torch.equal(got, alone)


def test_not_positive_definite_fails_on_every_rank() -> None:
    a = _spd(96)
    a[70, 70] = -5.0  # breaks definiteness in the third panel
    assert blocked_cholesky(a, block=32) is None
    assert _run_ranks(a, 2, block=32) == [None, None]


def test_nan_fails() -> None:
    a = _spd(40)
    a[5, 30] = math.nan
    assert blocked_cholesky(a, block=16) is None


def test_thread_count_does_not_change_the_factor() -> None:
    a = _spd(300, seed=3)
    previous = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = blocked_cholesky(a, block=64)
        torch.set_num_threads(2)
        two = blocked_cholesky(a, block=64)
    finally:
        torch.set_num_threads(previous)
    assert one is not None and two is not None and torch.equal(one, two)
