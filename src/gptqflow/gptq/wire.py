"""Tensors on the wire: several tensors as one byte buffer, and 4-bit codes two to a byte.

Ranks exchange the solved integers of many row slices after every group. One
collective per tensor costs a round trip each (five per slice); one buffer per sending
rank costs one. The receivers know every shape and dtype from the plan, so the buffer
carries the bytes alone. Codes of at most 4 bits (``[-8, 7]``) travel as nibbles: half
the bytes of int8. Packing and unpacking are exact, so every rank still installs the
same integers.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Field:
    """One tensor of a buffer: its shape and dtype."""

    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n * torch.empty(0, dtype=self.dtype).element_size()


def pack(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """The tensors' bytes, one after the other, as a uint8 vector."""
    return torch.cat([t.detach().contiguous().reshape(-1).view(torch.uint8) for t in tensors])


def unpack(buffer: torch.Tensor, fields: Sequence[Field]) -> list[torch.Tensor]:
    """The tensors :func:`pack` put in ``buffer``, given their shapes and dtypes."""
    out = []
    offset = 0
    for f in fields:
        raw = buffer[offset : offset + f.nbytes].clone()  # aligned for the dtype view
        out.append(raw.view(f.dtype).reshape(f.shape))
        offset += f.nbytes
    if offset != buffer.numel():
        raise ValueError(f"a buffer of {buffer.numel()} bytes holds {offset} bytes of fields")
    return out


def nibbles(codes: torch.Tensor) -> torch.Tensor:
    """int8 codes in ``[-8, 7]``, ``[rows, cols]``, two per byte: ``[rows, ceil(cols / 2)]``."""
    u = (codes.to(torch.int16) + 8).to(torch.uint8)
    if u.shape[-1] % 2:
        u = torch.nn.functional.pad(u, (0, 1))
    return u[..., 0::2] | (u[..., 1::2] << 4)


def from_nibbles(packed: torch.Tensor, cols: int) -> torch.Tensor:
    """The int8 codes :func:`nibbles` packed (``cols`` of them per row)."""
    lo = (packed & 0x0F).to(torch.int8) - 8
    hi = (packed >> 4).to(torch.int8) - 8
    return torch.stack([lo, hi], dim=-1).reshape(*packed.shape[:-1], -1)[..., :cols].contiguous()


def nibble_field(rows: int, cols: int) -> Field:
    return Field((rows, (cols + 1) // 2), torch.uint8)
