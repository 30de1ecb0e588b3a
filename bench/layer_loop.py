"""The layer loop's time, GPTQ against round-to-nearest, on SmolLM2-135M.

Runs the two shipped SmolLM2 recipes ``--repeats`` times each, alternating (GPTQ, RTN,
GPTQ, RTN, ...) so that a machine getting busier or quieter during the benchmark
affects both alike, and prints for each the median over the repeats of

* **loop s**: the layer loop, from report.json ``stages``: the loop's own time
  (``layer-loop``: input capture, forward passes) plus every layer stage's (the stage
  ids the report's per-layer entries time, not ids assumed from the recipe);
* **Σ layer s**: the sum of the per-layer ``seconds`` of report.json ``layers`` (the same
  loop without the capture of layer 0's inputs before the first layer);
* **total s**: the runner's wall seconds, load to save;

and the RTN / GPTQ ratio of each median. Also the machine (CPU model, cores, torch
threads) and the median seconds of every stage.

GPTQ:  ``gptqflow run --config-name smollm2_w4a16``
RTN:   ``gptqflow run --config-name rtn_w4a16 model=smollm2 scheme.group_size=64
       scheme.observer=minmax``

Each run is a fresh ``gptqflow run`` process (no allocator state, thread setting or
imported module carries over from one run to the next). Perplexity is off
(``dataset.eval_tokens=0``) unless ``--evaluate``. The model must be prepared once:
``gptqflow prepare-model``.

    python bench/layer_loop.py --repeats 3
    python bench/layer_loop.py --repeats 1 --threads 2 --json layer-loop.json
    python bench/layer_loop.py --repeats 3 dataset.num_samples=32   # overrides for both
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from runinfo import LOOP_KEY, code_state, cpu_model, loop_seconds, read_run, visible_cores


@dataclass(frozen=True)
class Method:
    """One quantization: its recipe and the overrides that make it."""

    name: str
    recipe: str
    overrides: tuple[str, ...]


METHODS = (
    Method("GPTQ", "smollm2_w4a16", ()),
    Method(
        "RTN",
        "rtn_w4a16",
        ("model=smollm2", "scheme.group_size=64", "scheme.observer=minmax"),
    ),
)


@dataclass
class Measured:
    """One run's numbers (wall seconds, rank 0)."""

    method: str
    repeat: int
    loop_s: float
    layers_s: float
    total_s: float
    stages: dict[str, float]
    torch_threads: int
    perplexity: float | None
    load_average: float | None


@dataclass
class Summary:
    """Medians over the repeats of one method."""

    method: str
    runs: list[Measured] = field(default_factory=list)

    def median(self, what: str) -> float:
        return statistics.median(float(getattr(r, what)) for r in self.runs)

    def stage_median(self, sid: str) -> float | None:
        got = [r.stages[sid] for r in self.runs if sid in r.stages]
        return statistics.median(got) if got else None


def run_once(m: Method, run_dir: Path, common: list[str], env: dict[str, str]) -> None:
    """One ``gptqflow run`` of ``m`` into ``run_dir``, in a fresh process."""
    cmd = [
        sys.executable,
        "-m",
        "gptqflow",
        "run",
        "--config-name",
        m.recipe,
        *m.overrides,
        *common,
        f"output_dir={run_dir}",
    ]
    log_file = run_dir.with_suffix(".log")
    with log_file.open("w") as log:
        # subprocess.run kills the child if this process is interrupted.
        proc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    if proc.returncode != 0:
        tail = "\n".join(log_file.read_text().splitlines()[-30:])
        raise SystemExit(
            f"{m.name} failed (exit {proc.returncode}): {' '.join(cmd[2:])}\n"
            f"log {log_file}:\n{tail}"
        )


def measure(m: Method, repeat: int, run_dir: Path) -> Measured:
    report, _ = read_run(run_dir)
    return Measured(
        method=m.name,
        repeat=repeat,
        loop_s=loop_seconds(report),
        layers_s=sum(float(layer["seconds"]) for layer in report["layers"]),
        total_s=float(report["seconds"]),
        stages={k: float(v["seconds"]) for k, v in report["stages"].items()},
        torch_threads=int(report["torch_threads"]),
        perplexity=report["perplexity"].get("quantized"),
        load_average=load_average(),
    )


def load_average() -> float | None:
    try:
        return os.getloadavg()[0]
    except OSError:
        return None


def _raise_on_sigterm(signum: int, _frame: object) -> None:
    """SIGTERM -> SystemExit, so the running child is killed and the directory removed."""
    raise SystemExit(128 + signum)


def stage_table(summaries: list[Summary]) -> str:
    """Median seconds of every stage id any run reported, in report order."""
    ids: list[str] = []
    for s in summaries:
        for r in s.runs:
            ids += [k for k in r.stages if k not in ids]
    head = "| stage | " + " | ".join(f"{s.method} s" for s in summaries) + " |"
    lines = [head, "| --- |" + " ---: |" * len(summaries)]
    for sid in ids:
        cells = [s.stage_median(sid) for s in summaries]
        lines.append(
            f"| {sid} | " + " | ".join("—" if c is None else f"{c:.2f}" for c in cells) + " |"
        )
    return "\n".join(lines)


def report_text(summaries: list[Summary], a: argparse.Namespace, loads: list[float | None]) -> str:
    by = {s.method: s for s in summaries}
    gptq, rtn = by["GPTQ"], by["RTN"]
    threads = sorted({r.torch_threads for s in summaries for r in s.runs})
    lines = [
        f"Machine: {cpu_model()}; {visible_cores()} cores visible ({os.cpu_count()} online); "
        f"torch threads {', '.join(map(str, threads))}; 1-minute load average "
        + ", ".join("—" if v is None else f"{v:.2f}" for v in loads)
        + " (start, after each run).",
        f"Code: {code_state()}. {a.repeats} repeat(s) each, alternating GPTQ and RTN; "
        + ("perplexity evaluated." if a.evaluate else "no perplexity (dataset.eval_tokens=0).")
        + (f" Overrides for both: {' '.join(a.overrides)}." if a.overrides else ""),
        "",
        "| method | loop s | Σ layer s | total s | loop s per run |",
        "| --- | ---: | ---: | ---: | --- |",
    ]
    for s in summaries:
        per_run = ", ".join(f"{r.loop_s:.1f}" for r in s.runs)
        lines.append(
            f"| {s.method} | {s.median('loop_s'):.2f} | {s.median('layers_s'):.2f} "
            f"| {s.median('total_s'):.2f} | {per_run} |"
        )
    lines.append("")
    lines.append(
        "RTN / GPTQ (ratio of the medians): "
        + "; ".join(
            f"{label} {rtn.median(k) / gptq.median(k):.3f}"
            for label, k in (("loop", "loop_s"), ("Σ layer", "layers_s"), ("total", "total_s"))
        )
    )
    if a.evaluate:
        lines.append(
            "Perplexity (median): "
            + "; ".join(
                f"{s.method} {statistics.median(r.perplexity for r in s.runs if r.perplexity is not None):.3f}"
                for s in summaries
                if any(r.perplexity is not None for r in s.runs)
            )
        )
    lines += [
        "",
        f"loop s = report.json stages {LOOP_KEY} + every stage timed in layers[].stages; "
        "Σ layer s = sum of report.json layers[].seconds; total s = report.json seconds "
        "(load to save). Medians per stage:",
        "",
        stage_table(summaries),
    ]
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog="Positional arguments are recipe overrides applied to both methods.",
    )
    p.add_argument("--repeats", type=int, default=3, help="runs of each method (default 3)")
    p.add_argument(
        "--evaluate",
        action="store_true",
        help="measure perplexity too (default: dataset.eval_tokens=0, no evaluation)",
    )
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="runtime.num_threads and OMP_NUM_THREADS of every run (default: the recipe's)",
    )
    p.add_argument(
        "--out",
        type=Path,
        default=None,
        help="keep the run directories here (default: a temporary directory, removed)",
    )
    p.add_argument("--json", type=Path, default=None, help="write every run's numbers here")
    p.add_argument("overrides", nargs="*", help="extra recipe overrides for both methods")
    a = p.parse_args(argv)
    if a.repeats < 1 or (a.threads is not None and a.threads < 1):
        p.error("need --repeats >= 1 and --threads >= 1")
    return a


def main(argv: list[str] | None = None) -> None:
    a = parse_args(argv)
    own_tmp = a.out is None
    root = Path(tempfile.mkdtemp(prefix="gptqflow-layer-loop-")) if own_tmp else a.out
    root.mkdir(parents=True, exist_ok=True)
    common = ["overwrite=true", "runtime.progress=false"]
    if not a.evaluate:
        common.append("dataset.eval_tokens=0")
    env = dict(os.environ)
    if a.threads is not None:
        common.append(f"runtime.num_threads={a.threads}")
        env.update(OMP_NUM_THREADS=str(a.threads), MKL_NUM_THREADS=str(a.threads))
    common += a.overrides
    signal.signal(signal.SIGTERM, _raise_on_sigterm)
    summaries = [Summary(m.name) for m in METHODS]
    loads = [load_average()]
    total = a.repeats * len(METHODS)
    log = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
    log(f"run directories: {root}")
    done = False
    try:
        for i in range(a.repeats):
            for m, summary in zip(METHODS, summaries):
                run_dir = root / f"{m.name.lower()}-{i + 1}"
                t = time.perf_counter()
                run_once(m, run_dir, common, env)
                got = measure(m, i + 1, run_dir)
                summary.runs.append(got)
                loads.append(got.load_average)
                if own_tmp:  # measured: its checkpoint (~0.2 GB) is not needed
                    shutil.rmtree(run_dir / "checkpoint", ignore_errors=True)
                log(
                    f"[{len(loads) - 1}/{total}] {m.name} #{i + 1}: loop {got.loop_s:.1f} s, "
                    f"total {got.total_s:.1f} s ({time.perf_counter() - t:.0f} s with process "
                    f"start), load average {got.load_average}"
                )
        done = True
    finally:
        if own_tmp and done:
            shutil.rmtree(root, ignore_errors=True)
        elif own_tmp:  # a failed or interrupted benchmark keeps what it measured
            log(f"run directories kept: {root}")
    print(report_text(summaries, a, loads))
    if a.json is not None:
        doc = {
            "cpu": cpu_model(),
            "cores_visible": visible_cores(),
            "code": code_state(),
            "repeats": a.repeats,
            "evaluate": a.evaluate,
            "overrides": {m.name: [*m.overrides, *common] for m in METHODS},
            "load_average": loads,
            "runs": [asdict(r) for s in summaries for r in s.runs],
            "median": {
                s.method: {k: s.median(k) for k in ("loop_s", "layers_s", "total_s")}
                for s in summaries
            },
        }
        a.json.write_text(json.dumps(doc, indent=2) + "\n")


if __name__ == "__main__":
    main()
