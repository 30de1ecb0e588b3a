"""Scaling benchmark: the same recipe at world sizes 1 and 2 with one thread per rank.

One thread per rank (``OMP_NUM_THREADS=1``, ``runtime.num_threads=1``) makes the cores
the only parallelism, so the speedup measures the distributed design, not threading.
Also runs one process using every core, the fair single-process baseline.

Prints per-stage wall seconds (rank 0), the speedup of the layer loop (its own time,
``layer-loop``: input capture and forward passes, plus every layer stage), per-rank busy
time, per-layer load imbalance of the divided work (solve), bytes communicated, the
share of wall time spent in the collective stages, and how many quantized integers
agree with the one-rank run. Stages are classified by their kind in each run's
``recipe.yaml``, not by their ids.

    python bench/scaling.py                      # SmolLM2-135M, 64 x 512 calibration
    python bench/scaling.py --model /tmp/tiny --num-samples 8 --seq-len 128   # smoke run
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from gptqflow.modeling.checkpoint import read_quantized_codes
from runinfo import LOOP_KEY, ids_of_kind, loop_seconds, read_run

# Stage kinds whose time is mostly collectives, and kinds whose per-rank time is busy work.
COMM_KINDS = ("hessian-reduce", "broadcast")
BUSY_KINDS = ("calibrate", "solve")

Run = tuple[dict[str, Any], dict[str, str]]  # report.json, stage id -> kind


def run(name: str, out: Path, world: int, threads: int, args: argparse.Namespace) -> Run:
    """One `gptqflow run` in a fresh process; returns its report and stage kinds."""
    cmd = [
        sys.executable,
        "-m",
        "gptqflow",
        "run",
        "--config-name",
        args.recipe,
        f"output_dir={out}",
        f"runtime.nproc_per_node={world}",
        f"runtime.num_threads={threads}",
        f"dataset.num_samples={args.num_samples}",
        f"dataset.seq_len={args.seq_len}",
        f"dataset.eval_tokens={args.eval_tokens}",
        "runtime.progress=false",
        "overwrite=true",
        *args.overrides,
    ]
    if args.model:
        cmd.append(f"model.path={args.model}")
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    print(f"[{name}] {' '.join(cmd[3:])}", flush=True)
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"{name} failed:\n{proc.stderr[-4000:]}")
    return read_run(out)


def agreement(a: Path, b: Path) -> float:
    """Fraction of quantized integers equal in two checkpoints."""
    ca, cb = read_quantized_codes(a), read_quantized_codes(b)
    same = total = 0
    for name in ca:
        x, y = ca[name]["qweight"], cb[name]["qweight"]
        same += int((x == y).sum())
        total += x.numel()
    return same / total


def summarize(runs: dict[str, Run], dirs: dict[str, Path]) -> str:
    reports = {name: report for name, (report, _) in runs.items()}
    base, base_kinds = runs["1 rank x 1 thread"]
    lines = ["| stage | " + " | ".join(reports) + " |", "|---" * (len(reports) + 1) + "|"]
    evals = ids_of_kind(base_kinds, "evaluate")
    stages = [s for s in base["stages"] if s not in evals]
    for s in [*stages, *evals]:
        if all(s in r["stages"] for r in reports.values()):
            lines.append(
                f"| {s} | "
                + " | ".join(f"{r['stages'][s]['seconds']:.1f}" for r in reports.values())
                + " |"
            )
    lines.append(
        "| **layer loop** | "
        + " | ".join(f"{loop_seconds(r):.1f}" for r in reports.values())
        + " |"
    )
    lines.append("| total | " + " | ".join(f"{r['seconds']:.1f}" for r in reports.values()) + " |")
    out = ["\n".join(lines), ""]
    for name, (r, kinds) in runs.items():
        speed = loop_seconds(base) / loop_seconds(r)
        comm = sum(r["stages"][s]["seconds"] for s in ids_of_kind(kinds, *COMM_KINDS))
        imb = [layer["imbalance"] for layer in r["layers"]]
        cpu_imb = [layer.get("busy_imbalance", math.nan) for layer in r["layers"]]
        busy_ids = [LOOP_KEY, *ids_of_kind(kinds, *BUSY_KINDS)]
        busy = [
            {s: round(rk["stages"][s]["seconds"], 1) for s in busy_ids if s in rk["stages"]}
            for rk in r["ranks"]
        ]
        agree = agreement(dirs["1 rank x 1 thread"] / "checkpoint", dirs[name] / "checkpoint")
        ppl = r["perplexity"]["quantized"]
        ppl0 = base["perplexity"]["quantized"]
        dppl = "n/a" if ppl is None or ppl0 is None else f"{100 * (ppl - ppl0) / ppl0:+.4f}%"
        out.append(
            f"- {name}: layer-loop speedup {speed:.2f}x; collectives {comm:.1f}s = "
            f"{100 * comm / r['seconds']:.1f}% of wall; {r['bytes_communicated'] / 2**20:.0f} MiB sent by rank 0; "
            f"work imbalance (wall) max {max(imb):.3f} / median {statistics.median(imb):.3f}, "
            f"(CPU) max {max(cpu_imb):.3f} / median {statistics.median(cpu_imb):.3f}; busy per rank {busy}; "
            f"codes equal to 1 rank: {100 * agree:.4f}%; perplexity vs 1 rank: {dppl}"
        )
    return "\n".join(out)


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--recipe", default="smollm2_w4a16")
    p.add_argument("--model", help="model dir (default: the recipe's)")
    p.add_argument("--num-samples", type=int, default=64)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--eval-tokens", type=int, default=0, help="0: skip perplexity")
    p.add_argument(
        "--cores",
        type=int,
        default=os.cpu_count() or 2,
        help="threads of the single-process baseline",
    )
    p.add_argument("--out", type=Path, help="keep run directories here")
    p.add_argument("--json", type=Path, help="write the reports here")
    p.add_argument("overrides", nargs="*", help="extra recipe overrides")
    args = p.parse_args()
    root = args.out or Path(tempfile.mkdtemp(prefix="gptqflow-scaling-"))
    plan = {
        "1 rank x 1 thread": (1, 1),
        "2 ranks x 1 thread": (2, 1),
        f"1 rank x {args.cores} threads": (1, args.cores),
    }
    runs: dict[str, Run] = {}
    dirs: dict[str, Path] = {}
    for name, (world, threads) in plan.items():
        dirs[name] = root / name.replace(" ", "")
        runs[name] = run(name, dirs[name], world, threads, args)
    print()
    print(summarize(runs, dirs))
    if args.json:
        args.json.write_text(json.dumps({k: r for k, (r, _) in runs.items()}, indent=2))


if __name__ == "__main__":
    main()
