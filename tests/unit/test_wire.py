"""Bytes on the wire between ranks: exact round trips of packed buffers and 4-bit codes."""

from __future__ import annotations

import pytest
import torch

from gptqflow.gptq import wire


@pytest.mark.parametrize("cols", [1, 6, 7, 64])
def test_nibbles_round_trip_every_4_bit_code(cols: int) -> None:
    gen = torch.Generator().manual_seed(cols)
    codes = torch.randint(-8, 8, (5, cols), generator=gen, dtype=torch.int8)
    codes[0, 0] = -8
    codes[-1, -1] = 7
    packed = wire.nibbles(codes)
    assert packed.dtype == torch.uint8 and packed.shape == (5, (cols + 1) // 2)
    assert tuple(packed.shape) == wire.nibble_field(5, cols).shape
    assert torch.equal(wire.from_nibbles(packed, cols), codes)


def test_pack_unpack_keeps_every_dtype_and_shape() -> None:
    tensors = [
        torch.tensor([1.5, float("nan")], dtype=torch.float64),
        torch.arange(6, dtype=torch.int8).reshape(2, 3),
        torch.randn(3, 2).to(torch.bfloat16),
        torch.arange(5, dtype=torch.int32),
    ]
    buf = wire.pack(tensors)
    fields = [wire.Field(tuple(t.shape), t.dtype) for t in tensors]
    assert buf.numel() == sum(f.nbytes for f in fields)
    for got, want in zip(wire.unpack(buf, fields), tensors):
        assert got.dtype == want.dtype and torch.equal(
            got.view(torch.uint8), want.view(torch.uint8)
        )
    with pytest.raises(ValueError, match="holds"):
        wire.unpack(buf, fields[:2])
