"""Distributed faults, without processes: how a lost rank is named and how the driver reports it."""

from __future__ import annotations

import signal

import pytest

from gptqflow.framework.distributed import DistContext, PeerLostError, is_peer_loss
from gptqflow.framework.launcher import failure_text

GLOO_RESET = (
    "[../third_party/gloo/gloo/transport/tcp/pair.cc:537] Read error [127.0.0.1]:2731: "
    "Connection reset by peer"
)


def test_guard_names_the_other_rank_of_two() -> None:
    ctx = DistContext(rank=1, world_size=2, timeout_s=42)
    with pytest.raises(PeerLostError) as err, ctx.guard("an all-reduce"):
        raise RuntimeError(GLOO_RESET)
    text = str(err.value)
    assert text.startswith("lost contact with rank 0 during an all-reduce (RuntimeError: ")
    assert "runtime.timeout_s=42s" in text and "runtime.resume=true" in text
    assert isinstance(err.value.__cause__, RuntimeError)


def test_guard_lets_other_errors_through() -> None:
    ctx = DistContext(rank=0, world_size=2)
    with pytest.raises(ValueError), ctx.guard("a barrier"):
        raise ValueError("a bug, not a lost peer")
    with pytest.raises(RuntimeError, match="shape mismatch"), ctx.guard("a barrier"):
        raise RuntimeError("shape mismatch")


def test_peer_loss_is_recognised() -> None:
    assert is_peer_loss(RuntimeError(GLOO_RESET))
    assert is_peer_loss(RuntimeError("Timed out waiting 30000ms for recv operation to complete"))
    assert is_peer_loss(RuntimeError("Application timeout caused pair closure"))  # gloo, too
    assert not is_peer_loss(ValueError(GLOO_RESET))
    assert DistContext(rank=0, world_size=1).unanswered_ranks() == []


def test_driver_names_the_rank_that_failed_first() -> None:
    text = failure_text({0: -signal.SIGTERM, 1: -signal.SIGKILL})
    assert text.startswith("the distributed run failed (rank 1: killed by SIGKILL); ")
    assert "the launcher then stopped rank(s) [0]" in text
    both = failure_text({0: 1, 1: 1})
    assert "(rank 0: exit code 1, rank 1: exit code 1)" in both and "stopped" not in both
    assert "(rank 0: killed by SIGTERM)" in failure_text({0: -signal.SIGTERM})
