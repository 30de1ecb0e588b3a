"""Hessian accumulation: exact float64 sums make the result order-independent."""

from __future__ import annotations

import pytest
import torch

from gptqflow.gptq.hessian import STRIP, HessianSum, hessian_update


def _chunks(n_chunks: int = 8, cols: int = 48, seed: int = 0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    # Varied magnitudes and token counts, as real calibration batches have.
    return [torch.randn(2, 5 + 3 * i, cols, generator=gen) * (0.1 + i) for i in range(n_chunks)]


def _accumulate(chunks: list[torch.Tensor]) -> HessianSum:
    acc = HessianSum.zeros(chunks[0].shape[-1])
    for chunk in chunks:
        acc.add(chunk)
    return acc


def test_update_is_twice_xtx_in_float32() -> None:
    x = torch.randn(3, 7, 16)
    flat = x.reshape(-1, 16)
    update = hessian_update(x)
    assert update.dtype == torch.float32 and update.shape == (16, 16)
    torch.testing.assert_close(update, 2 * flat.T @ flat)


def test_half_precision_inputs_use_a_float32_matmul() -> None:
    x = torch.randn(64, 32).to(torch.bfloat16)
    assert torch.equal(hessian_update(x), hessian_update(x.float()))


def test_finalize_divides_by_token_count() -> None:
    chunks = _chunks()
    acc = _accumulate(chunks)
    tokens = sum(c.shape[0] * c.shape[1] for c in chunks)
    assert acc.count == tokens
    flat = torch.cat([c.reshape(-1, c.shape[-1]) for c in chunks]).double()
    expected = (2 * flat.T @ flat / tokens).float()
    hessian = acc.finalize()
    assert hessian.dtype == torch.float32
    torch.testing.assert_close(hessian, expected, rtol=1e-5, atol=1e-6)


def test_chunk_order_and_rank_split_do_not_change_the_result() -> None:
    """1 rank and N ranks (any chunk order, any merge order) give the same Hessian."""
    chunks = _chunks()
    reference = _accumulate(chunks).finalize()

    reversed_order = _accumulate(chunks[::-1]).finalize()
    shuffled = _accumulate([chunks[i] for i in (3, 0, 7, 5, 1, 6, 2, 4)]).finalize()

    rank_sums = [_accumulate(chunks[r::3]) for r in range(3)]  # 3 "ranks", strided shards
    merged = rank_sums[2]
    merged.merge(rank_sums[0])
    merged.merge(rank_sums[1])

    for other in (reversed_order, shuffled, merged.finalize()):
        assert torch.equal(other, reference)


def test_errors() -> None:
    acc = HessianSum.zeros(8)
    with pytest.raises(ValueError, match="count == 0"):
        acc.finalize()
    with pytest.raises(ValueError, match="features"):
        acc.add(torch.randn(4, 9))
    with pytest.raises(ValueError, match="merge"):
        acc.merge(HessianSum.zeros(9))


def test_add_equals_the_float64_sum_of_chunk_updates_bit_for_bit() -> None:
    """The fused, buffer-reusing add is the plain definition: Σ float64(2·xᵀx in float32)."""
    gen = torch.Generator().manual_seed(3)
    chunks = [torch.randn(37, 24, generator=gen) * (i + 1) for i in range(5)]
    acc = HessianSum.zeros(24)
    for c in chunks:
        acc.add(c)
    expected = torch.zeros(24, 24, dtype=torch.float64)
    for c in chunks:
        expected += hessian_update(c).to(torch.float64)
    assert torch.equal(torch.triu(acc.symmetric()), torch.triu(expected))
    assert acc.count == 5 * 37


def test_only_the_upper_strips_are_accumulated_and_finalize_mirrors_them() -> None:
    """Wider than one strip: the lower part is never computed, the result is still the sum."""
    from gptqflow.gptq.hessian import STRIP

    cols = 2 * STRIP + 44
    gen = torch.Generator().manual_seed(4)
    chunks = [torch.randn(50, cols, generator=gen) for _ in range(3)]
    acc = HessianSum.zeros(cols)
    for c in chunks:
        acc.add(c)
    # Strip k holds rows [k*STRIP, (k+1)*STRIP) from its diagonal block to the right,
    # and nothing else is stored: about half the matrix, plus the count.
    widths = [cols, cols - STRIP, cols - 2 * STRIP]
    assert acc.data.numel() == sum(min(STRIP, w) * w for w in widths) + 1
    full = acc.symmetric()
    assert torch.equal(full, full.T)
    expected = sum(hessian_update(c).double() for c in chunks)
    torch.testing.assert_close(full, expected, rtol=1e-6, atol=1e-4)
    torch.testing.assert_close(acc.finalize(), (expected / 150).float(), rtol=1e-6, atol=1e-6)
    # The accumulated upper part is exactly what a single add of everything would give
    # strip by strip, so it is bit-identical however chunks are split over ranks.
    halves = [HessianSum.zeros(cols), HessianSum.zeros(cols)]
    for i, c in enumerate(chunks):
        halves[i % 2].add(c)
    halves[0].merge(halves[1])
    assert torch.equal(halves[0].finalize(), acc.finalize())


def test_packed_is_the_sum_itself_so_a_reduction_copies_nothing() -> None:
    """hessian-reduce all-reduces the accumulator's own storage, in place."""
    acc = _accumulate(_chunks(3, 300))
    before = acc.finalize()
    packed = acc.packed()
    assert packed.data_ptr() == acc.data.data_ptr() and packed[-1] == acc.count
    packed.mul_(2)  # what an all-reduce over two equal ranks leaves in the buffer
    acc.load_packed(packed)
    assert acc.count == 2 * sum(c.shape[0] * c.shape[1] for c in _chunks(3, 300))
    assert torch.equal(acc.finalize(), before)  # twice the sum over twice the tokens
    with pytest.raises(ValueError, match="values"):
        acc.load_packed(packed[:-1])


@pytest.mark.parametrize("cols", [5, 128, 300])
def test_packed_sums_add_up_to_the_whole_sum(cols: int) -> None:
    """What ranks send (the strips and the count) sums to what one rank accumulates."""
    chunks = _chunks(8, cols, seed=cols)  # samples: each rank adds whole ones
    one = _accumulate(chunks)
    a, b = _accumulate(chunks[:3]), _accumulate(chunks[3:])
    packed = a.packed() + b.packed()  # what the all-reduce computes
    assert packed.numel() < cols * cols // 2 + STRIP * cols + 2
    got = HessianSum.zeros(cols)
    got.load_packed(packed)
    assert got.count == one.count
    assert torch.equal(got.finalize(), one.finalize())


@pytest.mark.parametrize("cols", [7, 2 * STRIP, 2 * STRIP + 44])
def test_finalize_rounds_the_mirrored_float64_mean_once(cols: int) -> None:
    """Strip by strip into float32 is the same bits as dividing the whole float64 matrix."""
    acc = _accumulate(_chunks(6, cols, seed=cols))
    assert torch.equal(acc.finalize(), (acc.symmetric() / acc.count).to(torch.float32))
