"""Fit the solve cost model (gptqflow.gptq.cost.CostModel) to timings on this machine.

Measures, with one torch thread (one thread per rank is how the ranks run):
* ``prepare_factor`` of cols × cols Hessians,
* ``solve_rows`` (W4, group 128 (64 where 128 does not divide), float32) on row slices of several sizes,
* a gloo all-reduce and broadcast between two spawned ranks, and factorisations the two
  share (wall time; unless ``--no-comm``),
takes the median of ``--reps`` runs of each shape (process CPU time by default, so
that other processes on a shared machine do not inflate the constants), fits the constants by
non-negative least squares in relative error, prints the fit quality and writes
the JSON that ``CostModel.from_json`` reads.

Run (about 1-2 minutes on a quiet 2-core machine, more on a busy one):
    python bench/fit_cost.py                       # writes src/gptqflow/gptq/cost_cpu.json
    python bench/fit_cost.py --out my_cost.json --reps 5
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import platform
import socket
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.multiprocessing as mp

from gptqflow.framework.distributed import DistContext
from gptqflow.gptq.cholesky import FACTOR_BLOCK, PanelSource, factor_panels
from gptqflow.gptq.cost import (
    DEFAULT_MIN_SWEEP_ROWS,
    CostModel,
    comm_features,
    factor_features,
    fit_nonnegative,
    relative_errors,
    sweep_features,
)
from gptqflow.gptq.numerics import all_finite
from gptqflow.gptq.solver import prepare_factor, solve_rows
from gptqflow.gptq.types import QuantArgs

DEFAULT_OUT = Path(__file__).resolve().parents[1] / "src/gptqflow/gptq/cost_cpu.json"
COLS = (576, 1536, 2048, 4096, 8192)
# Row counts per width. Real slices have 1k-30k rows (Llama-3-8B's gate+up group has
# 28672), and past a few thousand rows a block's working set leaves the cache, so the
# grid reaches 8192 rows where that is cheap; the widest Hessian anchors the cols³ term
# (down_proj has 14336 columns) and is swept at two row counts only, to stay short.
ROWS = {
    576: (16, 512, 2048, 8192),
    1536: (16, 512, 2048, 8192),
    2048: (16, 512, 2048, 8192),
    4096: (16, 512, 2048, 4096),
    8192: (16, 2048),
}
# float64 elements per message: a token count and a small buffer pin the latency, then
# Hessians of 576, 1536, 2048 and 4096 columns the bandwidth.
COMM_NUMEL = (1, 8192, 576**2, 1536**2, 2048**2, 4096**2)
# Widths whose factorisation two ranks share (wall time, the slower rank).
SHARED_COLS = (1536, 2048, 4096, 8192)


@dataclass
class Clock:
    """Which clock the compute timings use, and how much wall time they lost to others.

    ``cpu`` (the default) is this process's CPU time. With one torch thread the work
    runs on one core, so CPU time equals the wall time the rank would take on a quiet
    core, while wall time also counts the time other processes on a shared machine
    hold the core. ``wall`` is for a machine the bench has to itself.
    """

    kind: str = "cpu"
    cpu_total: float = 0.0
    wall_total: float = 0.0

    def time(self, fn: Callable[[], object]) -> float:
        c, w = time.process_time(), time.perf_counter()
        fn()
        cpu, wall = time.process_time() - c, time.perf_counter() - w
        self.cpu_total += cpu
        self.wall_total += wall
        return cpu if self.kind == "cpu" else wall

    def median(self, fn: Callable[[], object], reps: int) -> float:
        """Median time of ``reps`` calls.

        A first call that takes under 0.2 s is a warm-up (allocator, kernel selection)
        and such short shapes get three times as many runs (they are cheap, and noise
        matters most to them). A longer first call counts as one of the runs.
        """
        first = self.time(fn)
        times = [] if first < 0.2 else [first]
        for _ in range(reps * 3 if first < 0.2 else reps - 1):
            times.append(self.time(fn))
        return statistics.median(times)


def spd_hessian(cols: int, gen: torch.Generator) -> torch.Tensor:
    """A well-conditioned SPD matrix; factorisation time does not depend on the values."""
    b = torch.randn(cols, 32, generator=gen)
    h = b @ b.T / 32
    h.diagonal().add_(1.0)
    return h


@dataclass
class ComputeTimes:
    """Medians of the compute timings, per shape."""

    factor: list[tuple[int, float]]  # (cols, prepare_factor s)
    sweep: list[tuple[int, int, float]]  # (rows, cols, solve_rows s)
    cholesky: list[tuple[int, float]]  # (cols, the blocked factorisation of ready panels s)
    check: list[tuple[int, float]]  # (cols, the finiteness check of the Hessian s)


def measure_compute(reps: int, clock: Clock) -> ComputeTimes:
    """Time prepare_factor, its parts and solve_rows over the grid of shapes."""
    gen = torch.Generator().manual_seed(0)
    out = ComputeTimes([], [], [], [])
    for cols in COLS:
        # SmolLM2's 576 is not a multiple of 128; the group size barely changes the cost.
        args = QuantArgs(bits=4, group_size=128 if cols % 128 == 0 else 64)
        h = spd_hessian(cols, gen)
        f = clock.median(partial(prepare_factor, h, args), reps)
        # The part that sharing splits by flops: the factorisation of panels already
        # gathered (copying them out of h is a small part of it at these widths).
        c = clock.median(partial(factor_panels, PanelSource.of(h)), reps)
        k = clock.median(partial(all_finite, h), reps)
        out.factor.append((cols, f))
        out.cholesky.append((cols, c))
        out.check.append((cols, k))
        factor = prepare_factor(h, args)
        line = [f"cols {cols:5d}: factor {f:7.3f}s (factorisation {c:6.3f}s, check {k:6.4f}s)"]
        for rows in ROWS[cols]:
            w = torch.randn(rows, cols, generator=gen)
            s = clock.median(partial(solve_rows, w, factor, args), reps)
            out.sweep.append((rows, cols, s))
            line.append(f"sweep[{rows}] {s:6.3f}s")
        print("  ".join(line), flush=True)
    return out


def join_gloo(rank: int, world_size: int, port: int) -> DistContext:
    """Join a gloo group of ranks spawned on this machine, one torch thread each."""
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_RANK=str(rank),
    )
    torch.set_num_threads(1)
    return DistContext.from_environment(backend="gloo", device="cpu")


def _comm_rank(rank: int, port: int, reps: int, out: str) -> None:
    """One of two gloo ranks timing an all-reduce and a broadcast of Hessian-sized tensors."""
    ctx = join_gloo(rank, 2, port)
    results = []
    try:
        for numel in COMM_NUMEL:
            x = torch.ones(numel, dtype=torch.float64)
            inner = 20 if numel < 10**5 else 1  # latency-bound messages: average a burst
            for kind in ("allreduce", "broadcast"):
                times = []
                for _ in range(reps):
                    bufs = [x.clone() for _ in range(inner)]
                    ctx.barrier()
                    t = time.perf_counter()
                    for b in bufs:
                        if kind == "allreduce":
                            _, h = ctx.all_reduce_sum(b)
                            h.wait()
                        else:
                            _, hs = ctx.broadcast_from(0, [b])
                            for h in hs:
                                h.wait()
                    mine = (time.perf_counter() - t) / inner
                    # A collective ends when its last rank is done (a broadcast's root
                    # finishes sending before the other rank has received).
                    times.append(max(ctx.gather_objects(mine)))
                results.append((kind, x.numel() * 8, statistics.median(times)))
    finally:
        ctx.close()
    if rank == 0:
        Path(out).write_text(json.dumps(results))


def _shared_rank(rank: int, port: int, reps: int, out: str) -> None:
    """One of two gloo ranks timing factorisations shared by both (as the solve stage does)."""
    from gptqflow.stages.solve import RankExchange

    ctx = join_gloo(rank, 2, port)
    results = []
    try:
        gen = torch.Generator().manual_seed(1)
        for cols in SHARED_COLS:
            h = spd_hessian(cols, gen)
            args = QuantArgs(bits=4, group_size=128 if cols % 128 == 0 else 64)
            times = []
            for _ in range(reps):
                ctx.barrier()
                t = time.perf_counter()
                prepare_factor(h, args, exchange=RankExchange(ctx))
                times.append(max(ctx.gather_objects(time.perf_counter() - t)))
            results.append((cols, statistics.median(times)))
    finally:
        ctx.close()
    if rank == 0:
        Path(out).write_text(json.dumps(results))


def _spawn_two(fn: Callable[..., None], reps: int) -> list[Any]:
    """Run ``fn(rank, port, reps, out)`` on two spawned gloo ranks; return rank 0's JSON."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = int(s.getsockname()[1])
    with tempfile.TemporaryDirectory() as tmp:
        out = str(Path(tmp) / "out.json")
        mp.start_processes(fn, args=(port, reps, out), nprocs=2, join=True, start_method="spawn")
        return list(json.loads(Path(out).read_text()))


def fit_shared_overhead(model: CostModel, shared: list[tuple[int, float]]) -> float:
    """``shared_s_per_panel``: what the model misses per panel, least squares in relative error.

    Relative, like every other fit here: the narrow Hessians (a few panels) decide
    whether sharing pays at all, and an absolute fit would let the widest one set
    the constant alone.
    """
    base = dataclasses.replace(model, shared_s_per_panel=0.0)
    panels = [math.ceil(c / FACTOR_BLOCK) for c, _ in shared]
    missed = [t - base.shared_factor_seconds(c, 2) for c, t in shared]
    times = [t for _, t in shared]
    num = sum(m * p / (t * t) for m, p, t in zip(missed, panels, times))
    den = sum(p * p / (t * t) for p, t in zip(panels, times))
    return max(num / den, 0.0)


def measure_comm(reps: int) -> list[tuple[str, int, float]]:
    """(kind, bytes, seconds) for a 2-rank gloo all-reduce and broadcast on loopback."""
    return [tuple(r) for r in _spawn_two(_comm_rank, reps)]


def fit_factor(times: ComputeTimes) -> list[float]:
    """``(overhead, per col², per col³, check per col²)`` of ``prepare_factor``, in steps.

    The ``cols³`` term is the factorisation: its constant is the blocked
    factorisation's time per ``cols³`` at the widest Hessian measured (the flop rate
    still grows with the width, so narrower ones would overstate it for
    ``down_proj``-sized Hessians). The finiteness check is timed on its own and
    fitted as a ``cols²`` constant. What ``prepare_factor`` takes beyond those two
    (gathering the panels in sweep order) is fitted as ``overhead + per col²`` on the
    remainder. One joint fit of five widths cannot tell a ``cols²`` term from part of
    a ``cols³`` one, and the split matters: a shared factorisation divides the
    gather and the cubic part between ranks, but not the check.
    """
    widest, t_widest = max(times.cholesky)
    per_col3 = t_widest / float(widest) ** 3
    (check,) = fit_nonnegative(
        [[float(c) ** 2] for c, _ in times.check], [t for _, t in times.check]
    )
    rest = [(c, t - per_col3 * float(c) ** 3 - check * float(c) ** 2) for c, t in times.factor]
    rest = [(c, r) for c, r in rest if r > 0]
    if not rest:
        return [0.0, 0.0, per_col3, check]
    feats = [[1.0, float(c) ** 2] for c, _ in rest]
    overhead, per_col2 = fit_nonnegative(feats, [r for _, r in rest])
    return [overhead, per_col2, per_col3, check]


def report(name: str, feats: list[list[float]], secs: list[float], theta: list[float]) -> float:
    """Print per-sample relative errors; return the median."""
    errs = relative_errors(feats, secs, theta)
    med = statistics.median(errs)
    print(f"{name}: median relative error {med:.1%}, max {max(errs):.1%} over {len(errs)} shapes")
    return med


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="JSON to write")
    parser.add_argument("--reps", type=int, default=3, help="runs per shape (median taken)")
    parser.add_argument(
        "--clock",
        choices=("cpu", "wall"),
        default="cpu",
        help="time compute by process CPU time (robust on a shared machine) or wall time",
    )
    parser.add_argument("--no-comm", action="store_true", help="skip the 2-rank gloo timing")
    parser.add_argument(
        "--bytes-per-s", type=float, default=None, help="use this bandwidth instead of measuring"
    )
    parser.add_argument("--latency-s", type=float, default=None, help="with --bytes-per-s")
    opts = parser.parse_args()
    torch.set_num_threads(1)
    start = time.perf_counter()

    clock = Clock(opts.clock)
    times = measure_compute(opts.reps, clock)
    factor_t, sweep_t = times.factor, times.sweep
    print(
        f"compute: {clock.cpu_total:.0f} s CPU in {clock.wall_total:.0f} s wall "
        f"(x{clock.wall_total / max(clock.cpu_total, 1e-9):.2f}: >1 means other processes "
        f"shared the core; fitted on {opts.clock} time)"
    )
    f_theta = fit_factor(times)
    # factor_features has one cols² regressor: the check and the gather together.
    f_feats = [factor_features(c) for c, _ in factor_t]
    f_secs = [s for _, s in factor_t]
    f_fit = [f_theta[0], f_theta[1] + f_theta[3], f_theta[2]]
    s_feats = [sweep_features(r, c, DEFAULT_MIN_SWEEP_ROWS) for r, c, _ in sweep_t]
    s_secs = [s for _, _, s in sweep_t]
    s_theta = fit_nonnegative(s_feats, s_secs)
    f_err = report("factor", f_feats, f_secs, f_fit)
    s_err = report("sweep ", s_feats, s_secs, s_theta)
    for cols, c in times.cholesky:
        f = dict(factor_t)[cols]
        print(f"  cols {cols}: the factorisation is {c / f:.0%} of prepare_factor")

    comm: list[tuple[str, int, float]] = []
    c_err: float | None = None
    reduce_cost = 0.0
    if opts.bytes_per_s is not None:
        latency, bandwidth = opts.latency_s or 0.0, opts.bytes_per_s
    elif opts.no_comm:
        latency, bandwidth = 1e-4, 1e9
        print("comm not measured: assuming 100 us latency and 1 GB/s")
    else:
        comm = measure_comm(opts.reps)
        c_feats = [comm_features(k, n) for k, n, _ in comm]
        c_secs = [s for _, _, s in comm]
        c_theta = fit_nonnegative(c_feats, c_secs)
        latency, reduce_cost = c_theta[0], c_theta[2]
        bandwidth = 1.0 / c_theta[1] if c_theta[1] > 0 else 1e12
        c_err = report("comm  ", c_feats, c_secs, c_theta)
        for k, n, s in comm:
            print(f"  {k:9s} {n / 1e6:9.3f} MB  {s:.5f}s")

    model = CostModel(
        factor_overhead_s=f_theta[0],
        factor_s_per_col2=f_theta[1],
        factor_s_per_col3=f_theta[2],
        check_s_per_col2=f_theta[3],
        sweep_overhead_s=s_theta[0],
        sweep_s_per_col=s_theta[1],
        sweep_s_per_row_col=s_theta[2],
        sweep_s_per_row_col2=s_theta[3],
        latency_s=latency,
        bytes_per_s=bandwidth,
        reduce_s_per_byte=reduce_cost,
        min_sweep_rows=DEFAULT_MIN_SWEEP_ROWS,
        fitted_on=f"{platform.machine()} {platform.processor() or platform.system()}, "
        f"torch {torch.__version__}, 1 thread, {os.cpu_count()} cores, {opts.clock} time; "
        "bench/fit_cost.py",
    )
    shared: list[tuple[int, float]] = []
    if not (opts.no_comm or opts.bytes_per_s is not None):
        shared = [(int(c), float(t)) for c, t in _spawn_two(_shared_rank, opts.reps)]
        model = dataclasses.replace(model, shared_s_per_panel=fit_shared_overhead(model, shared))
        for c, t in shared:
            pred = model.shared_factor_seconds(c, 2)
            print(
                f"  shared factor cols {c}: {t:.3f}s on 2 ranks (predicted {pred:.3f}s,"
                f" alone {model.factor_seconds(c):.3f}s)"
            )
    data = model.to_dict()
    data["fit"] = {
        "median_relative_error": {"factor": f_err, "sweep": s_err, "comm": c_err},
        "factor_seconds": factor_t,
        "sweep_seconds": sweep_t,
        "comm_seconds": comm,
        "shared_factor_seconds_2_ranks": shared,
        "factorisation_seconds": times.cholesky,
        "check_seconds": times.check,
        "reps": opts.reps,
        "clock": opts.clock,
        "wall_over_cpu": clock.wall_total / max(clock.cpu_total, 1e-9),
    }
    opts.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = opts.out.with_name(f".{opts.out.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, opts.out)
    print(json.dumps(model.to_dict(), indent=2))
    print(f"wrote {opts.out} in {time.perf_counter() - start:.0f}s")


if __name__ == "__main__":
    main()
