"""The solve cost model: loading, predictions, byte counts and the least-squares fit."""

from __future__ import annotations

import json
import random

import pytest
import torch

from gptqflow.gptq.cost import (
    CostModel,
    comm_features,
    factor_features,
    fit_nonnegative,
    hessian_bytes,
    qparam_bytes,
    relative_errors,
    sweep_features,
)
from gptqflow.gptq.hessian import HessianSum


def synthetic(**overrides: float | str) -> CostModel:
    base: dict[str, float | str] = dict(
        factor_overhead_s=1e-3,
        factor_s_per_col2=1e-8,
        factor_s_per_col3=3e-11,
        sweep_overhead_s=5e-3,
        sweep_s_per_col=3e-5,
        sweep_s_per_row_col=4e-8,
        sweep_s_per_row_col2=1.2e-11,
        latency_s=1e-4,
        bytes_per_s=1e9,
    )
    base.update(overrides)
    return CostModel(**base)  # type: ignore[arg-type]


def test_bundled_model_loads_and_predicts_positive_times() -> None:
    cost = CostModel.default()
    assert cost.fitted_on
    for cols in (576, 4096, 14336, 53248):
        assert cost.factor_seconds(cols) > 0
        assert cost.sweep_seconds(1, cols) > 0
        assert cost.sweep_seconds(4096, cols) > cost.sweep_seconds(16, cols)
        assert cost.allreduce_seconds(hessian_bytes(cols), 8) > 0
    # Wider Hessians cost more to factor, superlinearly (the cols³ term).
    assert cost.factor_seconds(8192) > 4 * cost.factor_seconds(4096)


def test_round_trip_and_unknown_keys() -> None:
    cost = synthetic(fitted_on="unit test")
    assert CostModel.from_json(json.dumps(cost.to_dict())) == cost
    data = cost.to_dict() | {"fit": {"anything": 1}}  # fit metadata is ignored
    assert CostModel.from_dict(data) == cost
    with pytest.raises(ValueError, match="unknown cost model keys"):
        CostModel.from_dict(cost.to_dict() | {"factor_s_per_col4": 1.0})
    with pytest.raises(ValueError, match=">= 0"):
        synthetic(sweep_s_per_col=-1.0)
    with pytest.raises(ValueError, match="bytes_per_s"):
        synthetic(bytes_per_s=0.0)


def test_sweep_pads_small_slices_like_the_solver() -> None:
    cost = synthetic()
    assert cost.sweep_seconds(0, 512) == 0.0
    assert cost.sweep_seconds(1, 512) == cost.sweep_seconds(cost.min_sweep_rows, 512)
    assert cost.sweep_seconds(17, 512) > cost.sweep_seconds(16, 512)


@pytest.mark.parametrize("cols", [64, 576, 4096, 14336])
def test_rows_within_inverts_sweep_seconds(cols: int) -> None:
    cost = synthetic()
    for rows in (16, 17, 100, 1000, 28672):
        t = cost.sweep_seconds(rows, cols)
        assert cost.rows_within(t, cols) == rows
        assert cost.sweep_seconds(cost.rows_within(t * 1.001, cols), cols) <= t * 1.001
    assert cost.rows_within(cost.sweep_seconds(16, cols) * 0.999, cols) == 0


def test_collectives_are_free_on_one_rank_and_grow_with_bytes() -> None:
    cost = synthetic()
    assert cost.allreduce_seconds(10**9, 1) == cost.broadcast_seconds(10**9, 1) == 0.0
    # A ring all-reduce moves 2(k-1)/k of the bytes: twice a broadcast's at large k.
    big = 10**10
    assert cost.allreduce_seconds(big, 512) == pytest.approx(2 * big / 1e9, rel=0.01)
    assert cost.broadcast_seconds(2 * big, 4) > cost.broadcast_seconds(big, 4)


def test_byte_counts_match_what_the_stages_send() -> None:
    """Independent count: build the buffers the stages send and sum their sizes."""
    rows, cols, group = 96, 512, 128
    ng = cols // group
    parts = [
        torch.empty(rows, cols // 2, dtype=torch.uint8),  # 4-bit codes, two per byte
        torch.empty(rows, ng, dtype=torch.bfloat16),  # scales
        torch.empty(rows, ng, dtype=torch.int8),  # zero points
        torch.empty(2, dtype=torch.float64),  # loss, damp
    ]
    sent = sum(t.numel() * t.element_size() for t in parts)
    assert qparam_bytes(rows, cols, group, scale_bytes=2) == sent
    g_idx = cols * 4  # int32 column order, act-order groups only
    assert qparam_bytes(rows, cols, group, act_order=True) == sent + g_idx
    assert qparam_bytes(rows, cols, group, bits=8) == sent + rows * cols // 2
    for c in (5, 512, 700):
        h = HessianSum.zeros(c)
        assert hessian_bytes(c) == h.packed().numel() * 8
        assert hessian_bytes(c) <= (c * c // 2 + 64 * c + 1) * 8  # half, plus the strips' corners
    assert qparam_bytes(rows, cols, -1) == rows * (cols // 2 + 3) + 16


def test_fit_recovers_known_constants_from_synthetic_timings() -> None:
    truth = synthetic()
    shapes = [(r, c) for c in (576, 1536, 2048, 4096, 8192) for r in (16, 128, 512, 1536)]
    feats = [sweep_features(r, c) for r, c in shapes]
    secs = [truth.sweep_seconds(r, c) for r, c in shapes]
    theta = fit_nonnegative(feats, secs)
    expected = [
        truth.sweep_overhead_s,
        truth.sweep_s_per_col,
        truth.sweep_s_per_row_col,
        truth.sweep_s_per_row_col2,
    ]
    assert theta == pytest.approx(expected, rel=1e-6)

    cols = [576, 1536, 2048, 4096, 8192]
    f_theta = fit_nonnegative(
        [factor_features(c) for c in cols], [truth.factor_seconds(c) for c in cols]
    )
    assert f_theta == pytest.approx(
        [truth.factor_overhead_s, truth.factor_s_per_col2, truth.factor_s_per_col3], rel=1e-6
    )


def test_fit_recovers_collective_constants() -> None:
    truth = synthetic(latency_s=3e-4, bytes_per_s=2e9, reduce_s_per_byte=1e-9)
    samples = [(k, n) for k in ("allreduce", "broadcast") for n in (8, 65536, 2**21, 2**25, 2**27)]
    feats = [comm_features(k, n) for k, n in samples]
    secs = [
        truth.allreduce_seconds(n, 2) if k == "allreduce" else truth.broadcast_seconds(n, 2)
        for k, n in samples
    ]
    theta = fit_nonnegative(feats, secs)
    assert theta == pytest.approx([3e-4, 1 / 2e9, 1e-9], rel=1e-6)
    with pytest.raises(ValueError, match="unknown collective"):
        comm_features("gather", 8)


def test_fit_with_noise_stays_close_and_never_goes_negative() -> None:
    truth = synthetic(sweep_overhead_s=0.0)  # a term that is truly absent
    rng = random.Random(0)
    shapes = [(r, c) for c in (576, 1536, 2048, 4096) for r in (16, 128, 512, 1536)]
    feats = [sweep_features(r, c) for r, c in shapes]
    secs = [truth.sweep_seconds(r, c) * (1 + rng.uniform(-0.03, 0.03)) for r, c in shapes]
    theta = fit_nonnegative(feats, secs)
    assert all(t >= 0 for t in theta)
    assert theta[3] == pytest.approx(truth.sweep_s_per_row_col2, rel=0.15)
    assert max(relative_errors(feats, secs, theta)) < 0.06


def test_fit_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="positive"):
        fit_nonnegative([[1.0, 2.0]], [0.0])
    with pytest.raises(ValueError, match="do not match"):
        fit_nonnegative([[1.0, 2.0]], [1.0, 2.0])
