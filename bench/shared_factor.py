"""Shared vs local factorisation on this machine: measured wall seconds against the cost model.

For each Hessian width, times ``prepare_factor`` alone on one rank and shared by
``--ranks`` gloo ranks (one thread each, panels broadcast as in the solve stage),
checks that both factors are bit-identical, and prints medians, the speedup and the
cost model's predictions (``CostModel.factor_seconds`` / ``shared_factor_seconds``)
with the measured/predicted ratio. Wall time: run it on a quiet machine.

    python bench/shared_factor.py                    # 2 ranks, widths 2048 4096 8192
    python bench/shared_factor.py --cols 4096 --reps 5
"""

from __future__ import annotations

import argparse
import json
import socket
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.multiprocessing as mp

from gptqflow.gptq.cost import CostModel
from gptqflow.gptq.solver import prepare_factor
from gptqflow.gptq.types import QuantArgs

ARGS = QuantArgs(bits=4, group_size=128)


def hessian(cols: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(cols)
    b = torch.randn(cols, 64, generator=g)
    h = b @ b.T / 64
    h.diagonal().add_(1.0)
    return h


def _rank(rank: int, world: int, port: int, cols: list[int], reps: int, out: str) -> None:
    from fit_cost import join_gloo
    from gptqflow.stages.solve import RankExchange

    ctx = join_gloo(rank, world, port)
    results = {}
    try:
        for c in cols:
            h = hessian(c)
            times = []
            for _ in range(reps):
                ctx.barrier()
                t = time.perf_counter()
                factor = prepare_factor(h, ARGS, exchange=RankExchange(ctx))
                times.append(max(ctx.gather_objects(time.perf_counter() - t)))
            results[c] = (statistics.median(times), factor.upper().sum().item())
            if rank == 0:
                torch.save(factor.upper(), Path(out).with_suffix(f".{c}.pt"))
    finally:
        ctx.close()
    if rank == 0:
        Path(out).write_text(json.dumps(results))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cols", type=int, nargs="+", default=[2048, 4096, 8192])
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--reps", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    cost = CostModel.default()
    local = {}
    for c in args.cols:
        h = hessian(c)
        times = []
        for _ in range(args.reps):
            t = time.perf_counter()
            prepare_factor(h, ARGS)
            times.append(time.perf_counter() - t)
        local[c] = statistics.median(times)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = int(s.getsockname()[1])
    with tempfile.TemporaryDirectory() as tmp:
        out = str(Path(tmp) / "shared.json")
        mp.start_processes(
            _rank,
            args=(args.ranks, port, args.cols, args.reps, out),
            nprocs=args.ranks,
            join=True,
            start_method="spawn",
        )
        shared = {int(k): v[0] for k, v in json.loads(Path(out).read_text()).items()}
        identical = {
            c: torch.equal(
                torch.load(Path(out).with_suffix(f".{c}.pt")),
                prepare_factor(hessian(c), ARGS).upper(),
            )
            for c in args.cols
        }
    print(
        f"medians of {args.reps}; {args.ranks} gloo ranks x 1 thread; cost model: {cost.fitted_on}"
    )
    print("   cols  local s  pred  meas/pred   shared s  pred  meas/pred  speedup  bit-identical")
    for c in args.cols:
        pl, ps = cost.factor_seconds(c), cost.shared_factor_seconds(c, args.ranks)
        print(
            f"  {c:5d}  {local[c]:7.3f}  {pl:6.3f}  {local[c] / pl:7.2f}"
            f"  {shared[c]:9.3f}  {ps:6.3f}  {shared[c] / ps:7.2f}"
            f"  {local[c] / shared[c]:6.2f}x  {identical[c]}"
        )


if __name__ == "__main__":
    main()
