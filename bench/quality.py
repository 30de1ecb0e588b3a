"""Quality and speed of GPTQ, GPTAQ and round-to-nearest on SmolLM2-135M (float32), with a flop floor.

Why: the benchmark reports perplexity of the float model, RTN, GPTQ and GPTAQ
(``method=gptaq``), each with and without Hessian-aware group ranges
(``scheme.observer=hessian``), at W4A16 and W3A16 (group 64), the wall seconds of
every stage, the end-to-end
quantization time and peak RSS, and compares the time with the floating-point work
the quantization cannot avoid. The runs go through the project's own recipes and
Python API (``gptqflow.compose`` + ``gptqflow.run``), so the numbers are the ones a
user gets.

Each quantization runs in its own child process: peak RSS (the kernel's
high-water mark) then belongs to that run alone, and a run never inherits another's
allocator state or thread settings. The float baseline is evaluated once, by the
evaluate stage placed before the layer loop in ``smollm2_w4a16`` (id ``baseline``)
during the GPTQ W4 run; the other runs remove it from their composed recipe.
"Quantization seconds" is the runner's load -> save wall time minus the evaluate
stages. Stages are told apart by their kind in the resolved recipe (``stage:``), not
by their ids, which are whatever the recipe names them.

With ``--ood-file TEXT`` the float model and every W4 checkpoint are also evaluated
(``gptqflow eval``) on the first ``--eval-tokens`` tokens of another text, calibrated
on WikiText-2 as before: how each method holds up out of domain.

Run (full size is slow on a 2-core CPU: 14 quantizations and their perplexity runs):
    python bench/quality.py --threads 2 --json bench-quality.json
    python bench/quality.py --runs gptq-w4,gptaq-w4,rtn-w4 --ood-file FILE   # a subset
    python bench/quality.py --quick --threads 1          # smoke run, a few minutes
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from flops import MatmulRate, count_flops, layer_shape, measure_matmul_rate
from runinfo import (
    LOOP_KEY,
    code_state,
    cpu_model,
    ids_of_kind,
    layer_stage_ids,
    stage_kinds,
)

GROUP_SIZE = 64
# Stage kinds whose time the flop floor's calibration part covers (with the loop's own
# forward passes, LOOP_KEY), and the kind its solve part covers.
CALIBRATION_KINDS = ("calibrate", "hessian-reduce")
SOLVE_KINDS = ("solve",)


@dataclass(frozen=True)
class Method:
    """One quantization run: which recipe, which overrides, whether it measures the baseline."""

    slug: str
    method: str
    bits: int
    recipe: str
    overrides: tuple[str, ...]
    baseline: bool = False


# RTN uses plain min-max ranges (the classic round-to-nearest baseline) or, with
# calibration for the Hessian (method=gptq's stages, solve method rtn), the
# Hessian-aware ones; GPTQ and GPTAQ the scheme's mse observer or the Hessian-aware one.
_RTN = ("model=smollm2", f"scheme.group_size={GROUP_SIZE}")
_HESSIAN = ("scheme.observer=hessian",)
# Spelled out, so the rows do not change meaning with the method group's default.
_GPTAQ = ("method=gptaq", "stages.float-path.sample_stride=4")
_GPTAQ_S1 = ("method=gptaq", "stages.float-path.sample_stride=1")


def _methods() -> tuple[Method, ...]:
    out = []
    for bits in (4, 3):
        scheme = () if bits == 4 else (f"scheme=w{bits}a16",)
        w = f"w{bits}"
        out += [
            Method(f"gptq-{w}", "GPTQ", bits, "smollm2_w4a16", scheme, baseline=bits == 4),
            Method(
                f"rtn-{w}", "RTN", bits, "rtn_w4a16", (*_RTN, *scheme, "scheme.observer=minmax")
            ),
            Method(
                f"rtn-h-{w}",
                "RTN",
                bits,
                "smollm2_w4a16",
                (*scheme, *_HESSIAN, "stages.solve.method=rtn"),
            ),
            Method(f"gptq-h-{w}", "GPTQ", bits, "smollm2_w4a16", (*scheme, *_HESSIAN)),
            # method=gptaq as shipped: the float path on every 4th calibration sample.
            Method(f"gptaq-{w}", "GPTAQ", bits, "smollm2_w4a16", (*scheme, *_GPTAQ)),
            Method(f"gptaq-h-{w}", "GPTAQ", bits, "smollm2_w4a16", (*scheme, *_GPTAQ, *_HESSIAN)),
            # Exact GPTAQ: the float path on every sample (stages.float-path.sample_stride=1).
            Method(f"gptaq-s1-{w}", "GPTAQ-s1", bits, "smollm2_w4a16", (*scheme, *_GPTAQ_S1)),
            Method(
                f"gptaq-s1-h-{w}",
                "GPTAQ-s1",
                bits,
                "smollm2_w4a16",
                (*scheme, *_GPTAQ_S1, *_HESSIAN),
            ),
        ]
    return tuple(out)


# Run order: GPTQ W4 first, since it is the one run that keeps the baseline evaluate.
METHODS = _methods()
TABLE_ORDER = tuple(
    m.slug for bits in (4, 3) for m in METHODS if m.bits == bits
)  # per width: GPTQ, RTN, RTN+h, GPTQ+h, GPTAQ, GPTAQ+h, GPTAQ-s1, GPTAQ-s1+h


# ---------------------------------------------------------------------- child process
def skip_baseline(stages: dict[str, Any]) -> None:
    """Remove every evaluate stage before the first layer stage (set its entry to null).

    Done on the composed recipe, by stage kind, so that it does not depend on what the
    recipe calls its baseline evaluate or where it puts it.
    """
    from gptqflow.framework.registry import registered  # the child runs gptqflow anyway

    specs = registered()
    for sid, kind in stage_kinds(stages).items():
        if specs[kind].per_layer:
            return
        if kind == "evaluate":
            stages[sid] = None


def read_hwm_bytes() -> int:
    """This process's peak RSS (``VmHWM``; the runner resets it per stage, so a lower bound)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def worker(spec_file: Path) -> None:
    """Compose and run one recipe in this (child) process; write what the parent needs."""
    import gptqflow

    spec = json.loads(spec_file.read_text())
    resolved = gptqflow.compose(spec["recipe"], spec["overrides"])
    if spec["skip_baseline"]:
        skip_baseline(resolved["stages"])
    kinds = stage_kinds(resolved["stages"])
    solve = resolved["stages"][ids_of_kind(kinds, "solve")[0]]
    start = time.perf_counter()
    report = gptqflow.run(resolved)
    wall = time.perf_counter() - start
    result = {
        "api_wall_s": wall,
        "vm_hwm_bytes": read_hwm_bytes(),
        "stage_kinds": kinds,
        "layer_stages": [LOOP_KEY, *layer_stage_ids(report)],
        "block_size": solve.get("block_size", 128),
        "scheme": resolved["scheme"],
        "code": code_state(),
        "report": report,
    }
    Path(spec["result"]).write_text(json.dumps(result, indent=2) + "\n")


# ---------------------------------------------------------------------- parent
@dataclass
class Row:
    """One line of the table (seconds are wall seconds; RSS in MiB)."""

    slug: str
    method: str
    bits: int | None
    group: int | None
    actorder: str | None
    observer: str | None
    perplexity: float
    quant_s: float | None
    stages: dict[str, float]  # stage id -> seconds, every stage but the evaluations
    stage_kinds: dict[str, str]  # stage id -> kind (LOOP_KEY: the loop's own time)
    layer_stages: list[str]  # LOOP_KEY and the ids of the layer stages, in order
    eval_s: float
    peak_rss_mib: float | None
    quant_peak_rss_mib: float | None


def run_child(m: Method, common: list[str], out: Path, threads: int) -> dict[str, Any]:
    """Run ``m`` in a child process with ``threads`` OpenMP threads; return its result."""
    run_dir = out / m.slug
    spec = {
        "recipe": m.recipe,
        "overrides": [*m.overrides, *common, f"output_dir={run_dir}"],
        "skip_baseline": not m.baseline,
        "result": str(out / f"{m.slug}.result.json"),
    }
    spec_file = out / f"{m.slug}.spec.json"
    spec_file.write_text(json.dumps(spec, indent=2))
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    log_file = out / f"{m.slug}.log"
    with log_file.open("w") as log:
        proc = subprocess.Popen(
            [sys.executable, __file__, "--worker", str(spec_file)],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
        )
        try:
            proc.wait()
        except BaseException:  # Ctrl-C or SIGTERM (see main): never leave the child running
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
            raise
    if proc.returncode != 0:
        tail = "\n".join(log_file.read_text().splitlines()[-30:])
        raise SystemExit(f"{m.slug} failed (exit {proc.returncode}); log {log_file}:\n{tail}")
    return json.loads(Path(spec["result"]).read_text())


def _raise_on_sigterm(signum: int, _frame: object) -> None:
    """SIGTERM -> SystemExit, so the ``finally`` blocks stop the child and clean up."""
    raise SystemExit(128 + signum)


def load_average() -> float | None:
    """1-minute load average: a shared machine shows up here, so it is recorded with the run."""
    try:
        return os.getloadavg()[0]
    except OSError:
        return None


def mib(n: float) -> float:
    return n / 2**20


def make_row(m: Method, res: dict[str, Any]) -> Row:
    """Table row of a quantized model from its child's result."""
    report, kinds = res["report"], res["stage_kinds"]
    st = report["stages"]
    evals = [k for k in ids_of_kind(kinds, "evaluate") if k in st]
    eval_s = sum(st[k]["seconds"] for k in evals)
    peaks = [int(v["peak_rss_bytes"]) for v in st.values()]
    peaks += [int(r["peak_rss_bytes"]) for r in report.get("ranks", [])]
    peaks.append(int(res["vm_hwm_bytes"]))
    quant_peaks = [int(v["peak_rss_bytes"]) for k, v in st.items() if k not in evals]
    # The last evaluation is the quantized model's (a removed baseline has no entry).
    eval_s_quantized = sum(st[k]["seconds"] for k in evals[-1:])
    return Row(
        slug=m.slug,
        method=m.method,
        bits=m.bits,
        group=int(report["group_size"]),
        actorder=str(res["scheme"].get("actorder", "none")),
        observer=str(res["scheme"].get("observer", "minmax")),
        perplexity=float(report["perplexity"]["quantized"]),
        quant_s=float(report["seconds"]) - eval_s,
        stages={k: float(v["seconds"]) for k, v in st.items() if k not in evals},
        stage_kinds={LOOP_KEY: LOOP_KEY, **kinds},
        layer_stages=list(res["layer_stages"]),
        eval_s=eval_s_quantized,
        peak_rss_mib=mib(max(peaks)),
        quant_peak_rss_mib=mib(max(quant_peaks)) if quant_peaks else None,
    )


def baseline_row(res: dict[str, Any]) -> Row:
    """The float row, from the GPTQ W4 run's baseline evaluate (the first evaluate stage)."""
    report, kinds = res["report"], res["stage_kinds"]
    first_eval = ids_of_kind(kinds, "evaluate")[0]
    return Row(
        slug="float",
        method="float32",
        bits=None,
        group=None,
        actorder=None,
        observer=None,
        perplexity=float(report["perplexity"]["baseline"]),
        quant_s=None,
        stages={},
        stage_kinds={},
        layer_stages=[],
        eval_s=float(report["stages"][first_eval]["seconds"]),
        peak_rss_mib=None,
        quant_peak_rss_mib=None,
    )


def fmt(x: float | None, spec: str = ".1f") -> str:
    return "—" if x is None else format(x, spec)


def loop_columns(rows: list[Row]) -> list[str]:
    """The layer loop's columns: LOOP_KEY, then every row's layer stage ids, in loop order.

    The row with the most layer stages (GPTQ's) sets the order; ids only other rows have
    follow.
    """
    cols: list[str] = []
    for r in sorted(rows, key=lambda r: -len(r.layer_stages)):
        cols += [k for k in r.layer_stages if k not in cols]
    return cols


def table(rows: list[Row], base: float) -> str:
    """The Markdown results table."""
    cols = loop_columns(rows)
    head = (
        "| method | bits | group | actorder | observer | perplexity | Δ vs float | quant s | "
        + " | ".join(f"{k} s" for k in cols)
        + " | other stages s | eval s | peak RSS MiB |"
    )
    lines = [head, "|" + " --- |" * head.count(" | ") + " --- |"]
    for r in rows:
        delta = (
            "—"
            if r.bits is None
            else f"{r.perplexity - base:+.2f} ({r.perplexity / base - 1:+.1%})"
        )
        other = sum(v for k, v in r.stages.items() if k not in cols) if r.stages else None
        loop = [r.stages.get(k) if r.stages else None for k in cols]
        lines.append(
            f"| {r.method} | {fmt(r.bits, 'd')} | {fmt(r.group, 'd')} | {r.actorder or '—'} "
            f"| {r.observer or '—'} | {r.perplexity:.2f} | {delta} "
            f"| {fmt(r.quant_s)} | {' | '.join(fmt(v, '.2f') for v in loop)} | {fmt(other, '.2f')} "
            f"| {r.eval_s:.1f} | {fmt(r.peak_rss_mib, '.0f')} |"
        )
    return "\n".join(lines)


def floor_block(
    model_dir: str, num_samples: int, seq_len: int, block: int, rate: MatmulRate, rows: list[Row]
) -> tuple[str, dict[str, Any]]:
    """The flop-floor section (Markdown) and its numbers for the JSON."""
    shape = layer_shape(model_dir)
    count = count_flops(shape, num_samples, seq_len, block=block)
    g = rate.gflops
    lines = [
        f"Floor for GPTQ on {num_samples} × {seq_len} calibration tokens, {shape.layers} layers "
        f"(hidden {shape.hidden}, intermediate {shape.intermediate}, {shape.heads}/{shape.kv_heads} "
        f"heads × {shape.head_dim}), block size {block}:",
        "",
        "| component | GFLOP | seconds at the measured rate |",
        "| --- | ---: | ---: |",
    ]
    for k, v in count.parts.items():
        lines.append(f"| {k} | {v / 1e9:.1f} | {v / 1e9 / g:.2f} |")
    lines.append(f"| **total** | **{count.total / 1e9:.1f}** | **{count.total / 1e9 / g:.2f}** |")
    lines += [
        "",
        f"Measured float32 `torch.mm` rate, {rate.threads} thread(s) (median of "
        f"{len(next(iter(rate.per_shape.values())))} timings per shape):",
        "",
        "| shape | GFLOP/s |",
        "| --- | ---: |",
    ]
    lines += [f"| {k} | {rate.shape_median(k):.1f} |" for k in rate.per_shape]
    lines.append(f"| **median over shapes** | **{g:.1f}** |")
    floor_s = count.total / 1e9 / g
    cal_floor, solve_floor = count.calibration() / 1e9 / g, count.solve() / 1e9 / g
    lines += [
        "",
        f"Total {count.total / 1e9:.1f} GFLOP / {g:.1f} GFLOP/s = **floor {floor_s:.1f} s** "
        f"(calibration {cal_floor:.1f} s, solve {solve_floor:.1f} s).",
        "",
    ]
    ratios: dict[str, Any] = {}
    for r in rows:
        if r.method != "GPTQ" or r.quant_s is None:
            continue
        kinds = r.stage_kinds
        cal = sum(v for k, v in r.stages.items() if kinds.get(k) in (LOOP_KEY, *CALIBRATION_KINDS))
        sol = sum(v for k, v in r.stages.items() if kinds.get(k) in SOLVE_KINDS)
        ratios[r.slug] = {
            "quant_s": r.quant_s,
            "ratio": r.quant_s / floor_s,
            "calibrate_ratio": cal / cal_floor,
            "solve_ratio": sol / solve_floor,
        }
        lines.append(
            f"- GPTQ W{r.bits}: quantization {r.quant_s:.1f} s = **{r.quant_s / floor_s:.2f} × floor**; "
            f"forward passes+calibrate+hessian-reduce {cal:.1f} s = {cal / cal_floor:.2f} × its floor, "
            f"solve {sol:.1f} s = {sol / solve_floor:.2f} × its floor."
        )
    data = {
        "gflop": {k: v / 1e9 for k, v in count.parts.items()},
        "total_gflop": count.total / 1e9,
        "rate_gflops": g,
        "rate_per_shape": {k: rate.shape_median(k) for k in rate.per_shape},
        "rate_samples": rate.per_shape,
        "floor_s": floor_s,
        "calibration_floor_s": cal_floor,
        "solve_floor_s": solve_floor,
        "ratios": ratios,
    }
    return "\n".join(lines), data


def comparison(rows: list[Row]) -> str:
    """Every run against GPTQ at its width (the mse observer): perplexity and quantization time."""
    by = {r.slug: r for r in rows}
    base = by["float"].perplexity
    lines = []
    for bits in (4, 3):
        g = by.get(f"gptq-w{bits}")
        if g is None:
            continue
        for r in rows:
            if r.bits != bits or r is g:
                continue
            time = (
                f"{fmt(r.quant_s)} s / {fmt(g.quant_s)} s = {r.quant_s / g.quant_s:.2f}×"
                if r.quant_s is not None and g.quant_s
                else "—"
            )
            lines.append(
                f"- W{bits} {r.slug}: perplexity {r.perplexity:.2f} vs GPTQ {g.perplexity:.2f} "
                f"({r.perplexity / g.perplexity - 1:+.1%}; {r.perplexity / base:.3f}× float); "
                f"quantization time vs GPTQ {time}"
            )
    return "\n".join(lines)


def evaluate_dir(model_dir: Path, data: Path, seq_len: int, tokens: int, threads: int) -> float:
    """Perplexity of a model or checkpoint directory on ``data`` (``gptqflow eval``, a child)."""
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    cmd = [sys.executable, "-m", "gptqflow", "eval", str(model_dir), "--data", str(data)]
    cmd += ["--seq-len", str(seq_len), "--max-tokens", str(tokens)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    found = re.search(r"perplexity: ([0-9.]+)", proc.stdout)
    if proc.returncode != 0 or found is None:
        raise SystemExit(f"{' '.join(cmd)} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    return float(found.group(1))


def ood_table(
    results: dict[str, dict[str, Any]], out: Path, data: Path, a: argparse.Namespace
) -> tuple[str, dict[str, float]]:
    """Float and every W4 checkpoint on an out-of-domain text (Markdown, and the numbers)."""
    model_dir = Path(results["gptq-w4"]["report"]["model"])
    ppl = {"float": evaluate_dir(model_dir, data, a.seq_len, a.eval_tokens, a.threads)}
    for slug in results:
        if slug.endswith("-w4"):
            ppl[slug] = evaluate_dir(
                out / slug / "checkpoint", data, a.seq_len, a.eval_tokens, a.threads
            )
    lines = ["| run | perplexity | vs GPTQ W4 |", "| --- | ---: | ---: |"]
    for slug, value in ppl.items():
        lines.append(f"| {slug} | {value:.2f} | {value / ppl['gptq-w4'] - 1:+.1%} |")
    return "\n".join(lines), ppl


def default_threads() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Perplexity, stage seconds and peak RSS of float / RTN / GPTQ (W4, W3, group "
        f"{GROUP_SIZE}) on SmolLM2-135M, plus the flop floor of the quantization.",
    )
    p.add_argument(
        "--threads", type=int, default=default_threads(), help="torch threads (default: all cores)"
    )
    p.add_argument(
        "--num-samples",
        type=int,
        default=None,
        help="calibration sequences (default 64; 8 with --quick)",
    )
    p.add_argument(
        "--seq-len",
        type=int,
        default=None,
        help="tokens per calibration sequence and eval window (default 512; 128 with --quick)",
    )
    p.add_argument(
        "--eval-tokens",
        type=int,
        default=None,
        help="perplexity tokens (default 40960; 2048 with --quick)",
    )
    p.add_argument(
        "--out",
        type=Path,
        default=None,
        help="directory for the run directories (default: a temporary directory, removed at the end)",
    )
    p.add_argument("--json", type=Path, default=None, help="write every number to this JSON file")
    p.add_argument("--quick", action="store_true", help="tiny sizes for a smoke run")
    p.add_argument(
        "--matmul-reps",
        type=int,
        default=None,
        help="timings per matmul shape, before and after the runs (default 7; 3 with --quick)",
    )
    p.add_argument(
        "--runs",
        default=",".join(m.slug for m in METHODS),
        help="comma-separated runs to make, in this order (gptq-w4 is always made, first: it "
        "measures the float model); default: all of " + ", ".join(m.slug for m in METHODS),
    )
    p.add_argument(
        "--ood-file",
        type=Path,
        default=None,
        help="also evaluate the float model and every W4 checkpoint on this text",
    )
    p.add_argument(
        "--reuse",
        action="store_true",
        help="with --out: take the runs already finished there (their result files) instead "
        "of making them again, e.g. after an interrupted benchmark; same settings assumed",
    )
    p.add_argument("--worker", type=Path, default=None, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    q = a.quick
    a.num_samples = a.num_samples or (8 if q else 64)
    a.seq_len = a.seq_len or (128 if q else 512)
    a.eval_tokens = a.eval_tokens if a.eval_tokens is not None else (2048 if q else 40960)
    a.matmul_reps = a.matmul_reps or (3 if q else 7)
    known = {m.slug for m in METHODS}
    asked = {r.strip() for r in a.runs.split(",") if r.strip()}
    if asked - known:
        p.error(f"--runs: unknown {sorted(asked - known)}; runs: {', '.join(sorted(known))}")
    # In the order given (the float model is measured by gptq-w4, which runs first).
    order = [r.strip() for r in a.runs.split(",") if r.strip()]
    a.runs = ["gptq-w4"] + [r for r in dict.fromkeys(order) if r != "gptq-w4"]
    if a.reuse and a.out is None:
        p.error("--reuse needs --out (the directory of the earlier runs)")
    if a.ood_file is not None and not a.ood_file.is_file():
        p.error(f"--ood-file {a.ood_file}: no such file")
    if a.threads < 1 or a.num_samples < 1 or a.seq_len < 2 or a.eval_tokens < a.seq_len:
        p.error(
            "need --threads >= 1, --num-samples >= 1, --seq-len >= 2, --eval-tokens >= --seq-len"
        )
    return a


def main(argv: list[str] | None = None) -> None:
    a = parse_args(argv)
    if a.worker is not None:
        worker(a.worker)
        return
    own_tmp = a.out is None
    out = Path(tempfile.mkdtemp(prefix="gptqflow-quality-")) if own_tmp else a.out
    out.mkdir(parents=True, exist_ok=True)
    common = [
        f"dataset.num_samples={a.num_samples}",
        f"dataset.seq_len={a.seq_len}",
        f"dataset.eval_tokens={a.eval_tokens}",
        f"runtime.num_threads={a.threads}",
        "runtime.progress=false",
        "overwrite=true",
    ]
    log = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
    signal.signal(signal.SIGTERM, _raise_on_sigterm)
    log(f"run directories: {out}; {a.threads} thread(s)")
    loads = {"start": load_average()}
    rate = measure_matmul_rate(a.threads, reps=a.matmul_reps)
    before_gflops = rate.gflops
    log(f"matmul rate before the runs: {before_gflops:.1f} GFLOP/s")
    results: dict[str, dict[str, Any]] = {}
    by_slug = {m.slug: m for m in METHODS}
    chosen = [by_slug[s] for s in a.runs]
    ood_md, ood = "", {}
    try:
        for i, m in enumerate(chosen, 1):
            t = time.perf_counter()
            kept = out / f"{m.slug}.result.json"
            if a.reuse and kept.is_file():  # a run finished earlier in this --out directory
                results[m.slug] = json.loads(kept.read_text())
                log(f"[{i}/{len(chosen)}] {m.slug}: reused {kept}")
                continue
            results[m.slug] = res = run_child(m, common, out, a.threads)
            loads[m.slug] = load_average()
            r = res["report"]
            log(
                f"[{i}/{len(chosen)}] {m.slug}: ppl {r['perplexity']['quantized']:.3f} "
                f"in {time.perf_counter() - t:.1f} s (load average {loads[m.slug]})"
            )
        if a.ood_file is not None:
            ood_md, ood = ood_table(results, out, a.ood_file, a)
            log(f"out of domain ({a.ood_file}): {ood}")
        after = measure_matmul_rate(a.threads, reps=a.matmul_reps)
        log(f"matmul rate after the runs: {after.gflops:.1f} GFLOP/s")
        rate.merge(after)
    finally:
        if own_tmp:
            shutil.rmtree(out, ignore_errors=True)

    base = baseline_row(results["gptq-w4"])
    rows = [base] + [make_row(by_slug[s], results[s]) for s in TABLE_ORDER if s in results]
    gptq = results["gptq-w4"]
    floor_md, floor_data = floor_block(
        gptq["report"]["model"], a.num_samples, a.seq_len, int(gptq["block_size"]), rate, rows
    )
    floor_data["rate_before_gflops"], floor_data["rate_after_gflops"] = before_gflops, after.gflops
    floor_md += (
        f"\n\nMatmul rate before the runs {before_gflops:.1f} GFLOP/s, after {after.gflops:.1f} "
        f"GFLOP/s (a large gap means the machine was busy); 1-minute load average after each run: "
        + ", ".join(f"{k} {fmt(v, '.2f')}" for k, v in loads.items())
        + "."
    )
    header = (
        f"SmolLM2-135M-Instruct, float32, group {GROUP_SIZE}; calibration {a.num_samples} × "
        f"{a.seq_len} tokens (wikitext2-valid), perplexity on the first {a.eval_tokens} tokens of "
        f"wikitext2-test in windows of {a.seq_len}; {a.threads} torch thread(s); "
        f"torch {torch.__version__}, {cpu_model()} ({platform.machine()}), "
        f"{default_threads()} cores visible."
    )
    print(f"## Quality and speed\n\n{header}\n\n{table(rows, base.perplexity)}\n")
    print(
        "quant s = load → save wall seconds without the evaluate stages; "
        f"{LOOP_KEY} s = the layer loop's own time (input capture, forward passes), the next "
        "columns its stages' time; other stages s = the rest but the evaluations; eval s = one "
        "perplexity run; peak RSS = the child process's high-water mark over the whole run.\n"
    )
    codes = {k: res.get("code", "unknown") for k, res in results.items()}
    code_line = f"Code: {', '.join(sorted(set(codes.values())))}."
    if len(set(codes.values())) > 1:
        code_line = (
            "**WARNING: the code changed between runs; the rows are not comparable** ("
            + ", ".join(f"{k}: {v}" for k, v in codes.items())
            + ")."
        )
    print(code_line + "\n")
    print(f"## Floating-point floor\n\n{floor_md}\n")
    print(comparison(rows))
    if ood:
        print(
            f"\n## Out of domain\n\nPerplexity on the first {a.eval_tokens} tokens of "
            f"{a.ood_file.name} (windows of {a.seq_len}), calibrated on wikitext2-valid:\n\n{ood_md}"
        )
    if a.json is not None:
        doc = {
            "settings": {
                "threads": a.threads,
                "num_samples": a.num_samples,
                "seq_len": a.seq_len,
                "eval_tokens": a.eval_tokens,
                "group_size": GROUP_SIZE,
                "torch": torch.__version__,
                "cores_visible": default_threads(),
                "cpu": cpu_model(),
                "python": platform.python_version(),
                "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                "load_average": loads,
                "code": codes,
            },
            "rows": [asdict(r) for r in rows],
            "floor": floor_data,
            "out_of_domain": {"file": str(a.ood_file), "perplexity": ood} if ood else None,
            "runs": results,
        }
        a.json.write_text(json.dumps(doc, indent=2) + "\n")


if __name__ == "__main__":
    main()
