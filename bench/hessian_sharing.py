"""Does sharing one Hessian between modules that read the same input save time?

In a Llama layer q/k/v read one tensor and gate/up another. gptqflow accumulates one
Hessian per distinct input (4 per layer) where a per-module scheme builds 7. This
times both on SmolLM2-135M shapes (hidden 576, intermediate 1536) over the same
activations, sample by sample as the calibrate stage does, and prints the medians.

    python bench/hessian_sharing.py [--samples 64] [--seq-len 512] [--threads 1] [--repeats 3]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from gptqflow.gptq.hessian import HessianSum

# (input width, modules reading it) for one Llama decoder layer of SmolLM2-135M.
INPUTS = {
    "attn_in": (576, ["q_proj", "k_proj", "v_proj"]),
    "o_in": (576, ["o_proj"]),
    "mlp_in": (576, ["gate_proj", "up_proj"]),
    "down_in": (1536, ["down_proj"]),
}


def accumulate(acts: torch.Tensor, copies: int) -> float:
    """Seconds to build ``copies`` Hessians from ``acts`` [samples, seq, cols]."""
    start = time.perf_counter()
    for _ in range(copies):
        h = HessianSum.zeros(acts.shape[-1])
        for i in range(acts.shape[0]):
            h.add(acts[i])
    return time.perf_counter() - start


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--samples", type=int, default=64)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(0)
    acts = {
        k: torch.randn(args.samples, args.seq_len, cols, generator=gen)
        for k, (cols, _) in INPUTS.items()
    }
    shared, separate = [], []
    for _ in range(args.repeats):
        shared.append(sum(accumulate(acts[k], 1) for k in INPUTS))
        separate.append(sum(accumulate(acts[k], len(mods)) for k, (_, mods) in INPUTS.items()))
    s, t = statistics.median(shared), statistics.median(separate)
    print(
        f"one layer, {args.samples}x{args.seq_len} tokens, {args.threads} thread(s), median of {args.repeats}:"
    )
    print(f"  shared Hessians (4 per layer):     {s:.2f} s")
    print(f"  per-module Hessians (7 per layer): {t:.2f} s")
    print(f"  sharing saves {t - s:.2f} s per layer ({100 * (t - s) / t:.0f}%), x{t / s:.2f}")


if __name__ == "__main__":
    main()
