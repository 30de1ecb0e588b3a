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

Only the upper triangle is accumulated and held (in strips of :data:`STRIP` rows):
``xᵀx`` is symmetric, so the lower half would cost a third more matmul flops, float64
additions and bytes for nothing (35-40% of the accumulation time at 576-1536 columns).
:meth:`HessianSum.finalize` mirrors it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

__all__ = ["STRIP", "HessianSum", "hessian_update", "packed_numel"]

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

    Only the upper strips of ``Σ 2·xᵀx`` are held (rows ``a:b`` of each strip of
    :data:`STRIP` rows, from column ``a`` on), one after another in ``data``, a float64
    vector with one more slot at the end for the token count: about ``n²/2 + 64·n``
    values instead of ``n²``. That vector is also what ranks all-reduce
    (:meth:`packed`), so the reduction needs no second copy of the sum, and a
    ``cols × cols`` float64 matrix (the largest allocation of a wide layer) never
    exists. Partial sums from different ranks or shards are combined with
    :meth:`merge` (or by summing :meth:`packed` vectors elsewhere) before one
    :meth:`finalize`.
    """

    cols: int
    data: torch.Tensor
    count: int = 0
    # Scratch for one strip's float32 product, reused: allocating (and page-faulting)
    # a fresh buffer per sample cost more than the add itself.
    _scratch: torch.Tensor | None = field(default=None, repr=False, compare=False)

    @classmethod
    def zeros(cls, cols: int, device: torch.device | str | None = None) -> HessianSum:
        """An empty accumulator for a layer with ``cols`` input features."""
        return cls(
            cols=cols, data=torch.zeros(packed_numel(cols), dtype=torch.float64, device=device)
        )

    @property
    def device(self) -> torch.device:
        return self.data.device

    @property
    def packed_numel(self) -> int:
        """Length of :meth:`packed`: the strips' values and the count."""
        return int(self.data.numel())

    def _strip(self, a: int, b: int, offset: int) -> torch.Tensor:
        """Strip ``a:b`` (rows ``a:b``, columns ``a:``) as a ``[b-a, cols-a]`` view of ``data``."""
        return self.data[offset : offset + (b - a) * (self.cols - a)].view(b - a, self.cols - a)

    def _strips(self) -> list[tuple[int, int, torch.Tensor]]:
        out, offset = [], 0
        for a, b in _strips(self.cols):
            out.append((a, b, self._strip(a, b, offset)))
            offset += (b - a) * (self.cols - a)
        return out

    def add(self, x: torch.Tensor) -> None:
        """Accumulate one chunk of inputs ``x[..., cols]``."""
        if x.shape[-1] != self.cols:
            raise ValueError(
                f"input has {x.shape[-1]} features but the Hessian is {self.cols}x{self.cols}"
            )
        n = self.cols
        tokens = x.detach().to(self.device).reshape(-1, n).to(torch.float32)
        if self._scratch is None:
            self._scratch = torch.empty(min(STRIP, n) * n, dtype=torch.float32, device=self.device)
        for a, b, strip in self._strips():
            product = self._scratch[: (b - a) * (n - a)].view(b - a, n - a)
            torch.mm(tokens[:, a:b].T, tokens[:, a:], out=product)
            # One fused pass: the float32 product is widened exactly and doubled
            # exactly, so every chunk adds its float32 product to the float64 sum.
            strip.add_(product, alpha=2.0)
        self.count += tokens.shape[0]

    def drop_scratch(self) -> None:
        """Free the per-chunk product buffer once no more chunks come (a strip, float32)."""
        self._scratch = None

    def merge(self, other: HessianSum) -> None:
        """Add another partial sum (e.g. from another rank) into this one."""
        if other.cols != self.cols:
            raise ValueError(
                f"cannot merge Hessian sums of shapes {(other.cols, other.cols)} "
                f"and {(self.cols, self.cols)}"
            )
        self.data[:-1] += other.data[:-1].to(device=self.device, dtype=torch.float64)
        self.count += other.count

    def packed(self) -> torch.Tensor:
        """The accumulated strips and the token count, as one float64 vector: ``data`` itself.

        What ranks send each other to sum their Hessians. An all-reduce may work on it
        in place; :meth:`load_packed` then only reads the count back.
        """
        self.data[-1] = float(self.count)
        return self.data

    def load_packed(self, packed: torch.Tensor) -> None:
        """Make this the sum :meth:`packed` describes (e.g. the all-reduced one), in place."""
        if packed.numel() != self.data.numel():
            raise ValueError(
                f"a packed Hessian of {packed.numel()} values, expected {self.data.numel()}"
            )
        if packed.data_ptr() != self.data.data_ptr() or packed.device != self.device:
            self.data.copy_(packed)
        self.count = int(self.data[-1].item())

    def symmetric(self) -> torch.Tensor:
        """The whole float64 sum ``Σ 2·xᵀx``: the accumulated upper part, mirrored."""
        n = self.cols
        full = torch.zeros(n, n, dtype=torch.float64, device=self.device)
        for a, b, strip in self._strips():
            full[a:b, a:] = strip
            # Below the strip: its transpose. Inside a diagonal block only its upper
            # triangle counts.
            full[b:, a:b] = strip[:, b - a :].T
            block = full[a:b, a:b]
            block.copy_(torch.triu(block) + torch.triu(block, diagonal=1).T)
        return full

    def finalize(self) -> torch.Tensor:
        """The mean Hessian ``sum / count`` as float32 (the only division), symmetric.

        Built strip by strip straight into the float32 result: each value is divided in
        float64 and rounded once, exactly as dividing the mirrored float64 matrix would,
        without a float64 matrix.
        """
        if self.count <= 0:
            raise ValueError("no tokens were accumulated into this Hessian (count == 0)")
        n = self.cols
        out = torch.empty(n, n, dtype=torch.float32, device=self.device)
        for a, b, strip in self._strips():
            out[a:b, a:] = strip / self.count
            out[b:, a:b] = out[a:b, b:].T
            block = out[a:b, a:b]
            block.copy_(torch.triu(block) + torch.triu(block, diagonal=1).T)
        return out


def packed_numel(cols: int) -> int:
    """Values of a packed Hessian sum (:meth:`HessianSum.packed`): its strips and the count."""
    return sum((b - a) * (cols - a) for a, b in _strips(cols)) + 1


def _strips(cols: int) -> list[tuple[int, int]]:
    return [(a, min(a + STRIP, cols)) for a in range(0, cols, STRIP)]
