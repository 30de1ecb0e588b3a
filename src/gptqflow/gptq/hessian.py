"""The GPTQ Hessian ``H = 2/n · Σ xᵀx`` over calibration tokens, accumulated exactly.

Each chunk of inputs contributes ``2·xᵀx``, computed as one float32 matmul.
Contributions are summed in float64 and divided by the token count only in
:meth:`HessianSum.finalize`.

Why float64: a float32 product has a 24-bit mantissa and float64 has 53, so
adding float32 values in float64 is exact as long as the partial sums span
fewer than ~29 binary orders of magnitude, which holds for any realistic
calibration set.  Exact addition is associative, so the sum does not depend on
the order chunks arrive in or on how they were split between ranks: one rank
and N ranks (summing their partial ``HessianSum`` s in any order) produce the
same Hessian, bit for bit, and the solve downstream sees the same input.
Dividing once at the end keeps that property; a running mean rounds at every
step.

Only the upper triangle is accumulated (in strips of :data:`STRIP` rows): ``xᵀx`` is
symmetric, so the lower half would cost a third more matmul flops and float64
additions for nothing (35-40% of the accumulation time at 576-1536 columns).
:meth:`HessianSum.finalize` mirrors it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

__all__ = ["STRIP", "HessianSum", "hessian_update"]

# Rows per strip of the upper triangle: narrow enough to skip most of the lower half,
# wide enough to keep each matmul efficient.
STRIP = 128


def hessian_update(x: torch.Tensor) -> torch.Tensor:
    """Contribution ``2·xᵀx`` (float32, ``[cols, cols]``) of one chunk ``x[..., cols]``.

    All leading dimensions are flattened into tokens.  The matmul runs in
    float32 even for bf16/fp16 inputs: half-precision accumulation would lose
    most of the small entries.  Scaling by 2 is exact.
    """
    tokens = x.detach().reshape(-1, x.shape[-1]).to(torch.float32)
    return (tokens.T @ tokens).mul_(2.0)


@dataclass
class HessianSum:
    """Running float64 sum of :func:`hessian_update` contributions and their token count.

    ``sum`` is the upper triangle (block-wise: whole strips of :data:`STRIP` rows
    from their diagonal block on; below is zero) of ``Σ 2·xᵀx`` (float64,
    ``[cols, cols]``); ``count`` the number of tokens that went into it.  Partial
    sums from different ranks or shards are
    combined with :meth:`merge` (or by summing ``sum``/``count`` elsewhere)
    before one :meth:`finalize`.
    """

    sum: torch.Tensor
    count: int = 0
    # Scratch for one chunk's float32 product, reused: allocating (and page-faulting)
    # a fresh cols×cols matrix per sample cost more than the add itself.
    _scratch: torch.Tensor | None = field(default=None, repr=False, compare=False)

    @classmethod
    def zeros(cls, cols: int, device: torch.device | str | None = None) -> HessianSum:
        """An empty accumulator for a layer with ``cols`` input features."""
        return cls(sum=torch.zeros(cols, cols, dtype=torch.float64, device=device), count=0)

    @property
    def cols(self) -> int:
        return int(self.sum.shape[0])

    def add(self, x: torch.Tensor) -> None:
        """Accumulate one chunk of inputs ``x[..., cols]``."""
        if x.shape[-1] != self.cols:
            raise ValueError(
                f"input has {x.shape[-1]} features but the Hessian is {self.cols}x{self.cols}"
            )
        tokens = x.detach().to(self.sum.device).reshape(-1, self.cols).to(torch.float32)
        if self._scratch is None:
            self._scratch = torch.empty(
                self.cols, self.cols, dtype=torch.float32, device=self.sum.device
            )
        n = self.cols
        for start in range(0, n, STRIP):
            stop = min(start + STRIP, n)
            strip = self._scratch[start:stop, start:]
            torch.mm(tokens[:, start:stop].T, tokens[:, start:], out=strip)
            # One fused pass: the float32 product is widened exactly and doubled
            # exactly, so every chunk adds its float32 product to the float64 sum.
            self.sum[start:stop, start:].add_(strip, alpha=2.0)
        self.count += tokens.shape[0]

    def drop_scratch(self) -> None:
        """Free the per-chunk product buffer once no more chunks come (``cols²`` float32)."""
        self._scratch = None

    def merge(self, other: HessianSum) -> None:
        """Add another partial sum (e.g. from another rank) into this one."""
        if other.sum.shape != self.sum.shape:
            raise ValueError(
                f"cannot merge Hessian sums of shapes {tuple(other.sum.shape)} "
                f"and {tuple(self.sum.shape)}"
            )
        self.sum += other.sum.to(device=self.sum.device, dtype=torch.float64)
        self.count += other.count

    @property
    def packed_numel(self) -> int:
        """Length of :meth:`packed`: the strips' values and the count."""
        return sum((b - a) * (self.cols - a) for a, b in _strips(self.cols)) + 1

    def packed(self) -> torch.Tensor:
        """The accumulated strips and the token count, as one float64 vector.

        The strips (rows ``a:b`` from column ``a`` on, see :meth:`add`) hold everything
        :meth:`finalize` reads, in about ``n²/2 + 64·n`` values instead of ``n²``: what
        ranks send each other to sum their Hessians.
        """
        parts = [self.sum[a:b, a:].reshape(-1) for a, b in _strips(self.cols)]
        count = torch.tensor([self.count], dtype=torch.float64, device=self.sum.device)
        return torch.cat([*parts, count])

    def load_packed(self, packed: torch.Tensor) -> None:
        """Make this the sum :meth:`packed` describes (e.g. the all-reduced one), in place."""
        self.sum.zero_()
        offset = 0
        for a, b in _strips(self.cols):
            block = self.sum[a:b, a:]
            block.copy_(packed[offset : offset + block.numel()].view_as(block))
            offset += block.numel()
        self.count = int(packed[offset].item())

    def symmetric(self) -> torch.Tensor:
        """The whole float64 sum ``Σ 2·xᵀx``: the accumulated upper part, mirrored."""
        n = self.cols
        full = self.sum.clone()
        for start in range(0, n, STRIP):
            stop = min(start + STRIP, n)
            # Below the strips: the transposed strip above. Inside a diagonal block
            # only its upper triangle counts.
            full[stop:, start:stop] = self.sum[start:stop, stop:].T
            block = full[start:stop, start:stop]
            block.copy_(torch.triu(block) + torch.triu(block, diagonal=1).T)
        return full

    def finalize(self) -> torch.Tensor:
        """The mean Hessian ``sum / count`` as float32 (the only division), symmetric.

        Built strip by strip straight into the float32 result: each value is divided in
        float64 and rounded once, exactly as dividing the mirrored float64 matrix would,
        without a second float64 matrix (the largest allocation of a wide layer).
        """
        if self.count <= 0:
            raise ValueError("no tokens were accumulated into this Hessian (count == 0)")
        n = self.cols
        out = torch.empty(n, n, dtype=torch.float32, device=self.sum.device)
        for start, stop in _strips(n):
            out[start:stop, start:] = self.sum[start:stop, start:] / self.count
            out[stop:, start:stop] = out[start:stop, stop:].T
            block = out[start:stop, start:stop]
            block.copy_(torch.triu(block) + torch.triu(block, diagonal=1).T)
        return out


def _strips(cols: int) -> list[tuple[int, int]]:
    return [(a, min(a + STRIP, cols)) for a in range(0, cols, STRIP)]
