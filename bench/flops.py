"""Floating-point floor of a GPTQ run: count the work, measure the matmul rate, divide.

Why: a wall time alone says nothing about how much faster the pipeline could be.
Counting the flops that GPTQ cannot avoid (one forward of every decoder layer over
the calibration tokens, the Hessians, the column sweep and the factorisations) and
dividing by the float32 matmul rate this machine actually reaches gives a lower
bound on the quantization time; the ratio ``measured / floor`` is how far the
pipeline is from it.

The counts follow the pipeline's own structure (see ``gptqflow.framework.layerloop``
for the one forward of each layer, ``gptqflow.stages.calibrate`` for the Hessians and
``gptqflow.gptq.solver``) for a Llama-style decoder layer read from the model's
``config.json``:

* calibration, per layer and token: ``2·in·out`` for every Linear, attention
  ``QKᵀ`` and ``PV`` at ``2·2·seq_len·heads·head_dim`` halved for the causal mask,
  and one Hessian ``2·cols²`` per group of Linears that read one input
  (q/k/v, o, gate/up, down);
* solve, per module: the exact flop count of the lazy-batch sweep (in-block
  rank-1 updates plus the trailing block matmuls, ``≈ rows·cols²``), and per group
  one factorisation of the Hessian: one Cholesky, ``cols³/3`` (the nearest-plane
  sweep needs ``H = R Rᵀ`` only; the paper's Cholesky, inverse and Cholesky of the
  inverse would be ``4·cols³/3``);
* the embedding capture before the first layer is a gather (no flops), counted 0.

Work the pipeline does on top of the floor (the one-sample ``trace_groups``
forward, once per kind of layer, the per-module ``tr((W-Q)H(W-Q)ᵀ)`` reported as
``loss``, the per-element quantizer arithmetic, float64 Hessian accumulation) is left
out: the floor is what any GPTQ implementation with the same calibration must compute.
"""

from __future__ import annotations

import json
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

__all__ = [
    "MATMUL_SHAPES",
    "FlopCount",
    "LayerShape",
    "MatmulRate",
    "count_flops",
    "layer_shape",
    "measure_matmul_rate",
]


@dataclass(frozen=True)
class LayerShape:
    """What the flop count needs from a Llama-style decoder layer."""

    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    layers: int

    def linears(self) -> dict[str, tuple[int, int]]:
        """Linear name -> (in_features, out_features), as the layer calls them."""
        q = self.heads * self.head_dim
        kv = self.kv_heads * self.head_dim
        return {
            "q_proj": (self.hidden, q),
            "k_proj": (self.hidden, kv),
            "v_proj": (self.hidden, kv),
            "o_proj": (q, self.hidden),
            "gate_proj": (self.hidden, self.intermediate),
            "up_proj": (self.hidden, self.intermediate),
            "down_proj": (self.intermediate, self.hidden),
        }

    def groups(self) -> list[list[str]]:
        """Linears that read the same input share one Hessian (the layer loop's groups)."""
        return [["q_proj", "k_proj", "v_proj"], ["o_proj"], ["gate_proj", "up_proj"], ["down_proj"]]


def layer_shape(model_dir: str | Path) -> LayerShape:
    """Read the decoder-layer shape from ``config.json`` (never the weights)."""
    cfg = json.loads((Path(model_dir) / "config.json").read_text())
    heads = int(cfg["num_attention_heads"])
    hidden = int(cfg["hidden_size"])
    return LayerShape(
        hidden=hidden,
        intermediate=int(cfg["intermediate_size"]),
        heads=heads,
        kv_heads=int(cfg.get("num_key_value_heads") or heads),
        head_dim=int(cfg.get("head_dim") or hidden // heads),
        layers=int(cfg["num_hidden_layers"]),
    )


def sweep_flops(rows: int, cols: int, block: int) -> int:
    """Exact multiply-add flops of the lazy-batch column sweep of a ``rows × cols`` weight.

    Inside a block, column j's error updates the block's later columns (a
    multiply and a subtract per element); after the block, its errors update
    every later column at once (a ``(cols-i2) × b`` by ``b × rows`` matmul).
    """
    total = 0
    for i1 in range(0, cols, block):
        i2 = min(i1 + block, cols)
        total += sum(2 * rows * (i2 - j - 1) for j in range(i1, i2))
        total += 2 * (i2 - i1) * (cols - i2) * rows
    return total


def factor_flops(cols: int) -> float:
    """One Cholesky (n³/3): the solver's only factorisation (``gptq/cholesky.py``)."""
    return cols**3 / 3.0


@dataclass
class FlopCount:
    """Flops by component, for the whole model (all layers)."""

    parts: dict[str, float] = field(default_factory=dict)

    @property
    def total(self) -> float:
        return sum(self.parts.values())

    def calibration(self) -> float:
        return sum(v for k, v in self.parts.items() if k.startswith("calibrate"))

    def solve(self) -> float:
        return sum(v for k, v in self.parts.items() if k.startswith("solve"))


def count_flops(
    shape: LayerShape, num_samples: int, seq_len: int, *, block: int = 128
) -> FlopCount:
    """Floor flops of GPTQ's calibration and solve for the whole model.

    (Round-to-nearest needs no forward, Hessian or sweep: its floor is ~0 flops.)
    """
    tokens = num_samples * seq_len
    lin = shape.linears()
    per_layer: dict[str, float] = {
        "calibrate: Linear matmuls": sum(2.0 * tokens * i * o for i, o in lin.values()),
        # QKᵀ and PV, each 2·tokens·seq_len·(heads·head_dim); causal: half is needed.
        "calibrate: attention (causal half)": 2.0
        * 2.0
        * tokens
        * seq_len
        * shape.heads
        * shape.head_dim
        / 2.0,
        "calibrate: Hessians 2·xᵀx": sum(2.0 * tokens * lin[g[0]][0] ** 2 for g in shape.groups()),
    }
    per_layer["solve: column sweeps"] = float(
        sum(sweep_flops(o, i, block) for i, o in lin.values())
    )
    per_layer["solve: factorisations"] = sum(factor_flops(lin[g[0]][0]) for g in shape.groups())
    parts = {k: v * shape.layers for k, v in per_layer.items()}
    parts["calibrate: embedding capture"] = 0.0
    return FlopCount(parts)


# ---------------------------------------------------------------------- matmul rate
# (label, m, k, n, transposed-left): the shapes the pipeline's matmuls have at
# seq_len 512 on SmolLM2 (576 hidden, 1536 intermediate).
MATMUL_SHAPES: list[tuple[str, int, int, int, bool]] = [
    ("x[512x576] @ W[576x1536] (gate/up)", 512, 576, 1536, False),
    ("x[512x1536] @ W[1536x576] (down)", 512, 1536, 576, False),
    ("xᵀx, x[512x1536] (Hessian)", 1536, 512, 1536, True),
    ("xᵀx, x[512x576] (Hessian)", 576, 512, 576, True),
    ("Hinvᵀ[1408x128] @ E[128x576] (sweep)", 1408, 128, 576, False),
]


@dataclass
class MatmulRate:
    """Measured float32 matmul rates (GFLOP/s) per shape and their median."""

    threads: int
    per_shape: dict[str, list[float]] = field(default_factory=dict)

    def merge(self, other: MatmulRate) -> None:
        for k, v in other.per_shape.items():
            self.per_shape.setdefault(k, []).extend(v)

    def shape_median(self, label: str) -> float:
        return statistics.median(self.per_shape[label])

    @property
    def gflops(self) -> float:
        """Median over shapes of each shape's median rate: one number for the floor."""
        return statistics.median(self.shape_median(k) for k in self.per_shape)


def measure_matmul_rate(threads: int, reps: int = 7, min_seconds: float = 0.05) -> MatmulRate:
    """Time ``torch.mm`` on the pipeline's shapes with ``threads`` torch threads.

    Each timing repeats the product until it has run ``min_seconds`` (short products
    are dominated by timer and dispatch noise otherwise); ``reps`` timings per shape
    are kept and the medians used, because the machine may be shared.
    """
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    gen = torch.Generator().manual_seed(0)
    rate = MatmulRate(threads=threads)
    try:
        for label, m, k, n, transposed in MATMUL_SHAPES:
            a = torch.randn(k, m, generator=gen) if transposed else torch.randn(m, k, generator=gen)
            b = a if transposed else torch.randn(k, n, generator=gen)
            left = a.T if transposed else a
            flops = 2.0 * m * k * n
            torch.mm(left, b)  # warm-up: allocator, kernel selection
            t = time.perf_counter()
            torch.mm(left, b)
            inner = max(1, int(min_seconds / max(time.perf_counter() - t, 1e-6)))
            samples = []
            for _ in range(reps):
                t = time.perf_counter()
                for _ in range(inner):
                    torch.mm(left, b)
                samples.append(flops * inner / (time.perf_counter() - t) / 1e9)
            rate.per_shape[label] = samples
    finally:
        torch.set_num_threads(previous)
    return rate
