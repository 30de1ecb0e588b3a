"""runtime.cpu_affinity: which cores each local rank binds to (a pure function), and that binding happens."""

from __future__ import annotations

import os

import pytest

from gptqflow.framework.affinity import apply_cpu_affinity, cores_for_rank


def test_ranks_get_consecutive_disjoint_cores() -> None:
    cores = list(range(16))
    got = [cores_for_rank(cores, r, 4, None) for r in range(4)]
    assert got == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11], [12, 13, 14, 15]]
    assert [cores_for_rank(cores, r, 2, 3) for r in range(2)] == [[0, 1, 2], [3, 4, 5]]
    # The cores this process may use need not start at 0 or be contiguous.
    assert [cores_for_rank([2, 3, 6, 7], r, 2, None) for r in range(2)] == [[2, 3], [6, 7]]


@pytest.mark.parametrize(
    ("available", "rank", "world", "threads"),
    [
        ([0, 1], 0, 1, None),  # one rank: nothing to keep apart
        ([0, 1], 0, 3, None),  # more ranks than cores
        ([0, 1, 2, 3], 1, 2, 3),  # 2 ranks x 3 threads do not fit 4 cores
        ([0, 1], 2, 2, None),  # not a local rank of this machine
    ],
)
def test_no_binding_where_it_cannot_help(
    available: list[int], rank: int, world: int, threads: int | None
) -> None:
    assert cores_for_rank(available, rank, world, threads) is None


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="Linux only")
def test_apply_binds_this_process_and_none_leaves_it_alone() -> None:
    before = os.sched_getaffinity(0)
    try:
        assert apply_cpu_affinity("none", "cpu", 0, 2, None) is None
        assert apply_cpu_affinity("auto", "cuda", 0, 2, None) is None
        assert os.sched_getaffinity(0) == before
        if len(before) >= 2:
            cores = apply_cpu_affinity("auto", "cpu", 1, 2, 1)
            assert cores == [sorted(before)[1]]
            assert os.sched_getaffinity(0) == {sorted(before)[1]}
    finally:
        os.sched_setaffinity(0, before)


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="Linux only")
def test_a_refused_binding_leaves_the_rank_unbound(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(pid: int, cores: object) -> None:
        raise OSError(22, "Invalid argument")

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1})
    monkeypatch.setattr(os, "sched_setaffinity", refuse)
    assert apply_cpu_affinity("auto", "cpu", 0, 2, None) is None
