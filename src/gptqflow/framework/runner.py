"""The runner: executes a validated recipe's stages over one pipeline state, on one rank.

Whole-model stages run once, in order. The per-layer stages (calibrate ->
hessian-reduce -> solve -> broadcast) form one loop: calibrate drives the layers
and, inside each layer, hands every group of modules that share an input to the
other three in turn. The runner times every stage (wall seconds and peak RSS),
gathers every rank's numbers into rank 0's ``report.json``, and writes
``recipe.yaml`` before any heavy work so a failed run can still be reproduced.
"""

from __future__ import annotations

import gc
import json
import logging
import math
import os
import resource
import sys
import time
import traceback
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import yaml

from gptqflow.framework.affinity import apply_cpu_affinity
from gptqflow.framework.distributed import DistContext
from gptqflow.framework.errors import GptqflowError
from gptqflow.framework.logs import configure_logging
from gptqflow.framework.progress import LayerProgress, calibration_tokens, progress_enabled
from gptqflow.framework.registry import Stage, build_stage
from gptqflow.framework.resume import ResumePoints
from gptqflow.framework.schema import LAYER_LOOP, Recipe
from gptqflow.framework.state import GroupStep, PipelineState

log = logging.getLogger("gptqflow")


# ---------------------------------------------------------------------- measuring
def _read_hwm() -> int | None:
    """Peak resident set size since the last reset, in bytes (Linux ``VmHWM``)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _reset_hwm() -> None:
    """Reset the kernel's peak-RSS mark so the next reading covers one stage only."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def peak_rss() -> int:
    hwm = _read_hwm()
    if hwm is not None:
        return hwm
    scale = 1 if sys.platform == "darwin" else 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


class StageClock:
    """Accumulates wall seconds and peak RSS per stage id."""

    def __init__(self) -> None:
        self.stats: dict[str, dict[str, float | int]] = {}

    def add(self, key: str, seconds: float, rss: int) -> None:
        s = self.stats.setdefault(key, {"seconds": 0.0, "peak_rss_bytes": 0})
        s["seconds"] = float(s["seconds"]) + seconds
        s["peak_rss_bytes"] = max(int(s["peak_rss_bytes"]), rss)

    @contextmanager
    def measure(self, key: str) -> Iterator[None]:
        _reset_hwm()
        start = time.perf_counter()
        try:
            yield
        finally:
            self.add(key, time.perf_counter() - start, peak_rss())


def _imbalance(seconds: list[float]) -> float:
    """max / mean over the ranks (1.0 when nobody spent any time)."""
    mean = sum(seconds) / len(seconds)
    return (max(seconds) / mean) if mean > 0 else 1.0


@contextmanager
def frozen_heap() -> Iterator[None]:
    """Keep Python's cyclic garbage collector off the objects that live through the loop.

    A loaded model, transformers, Hydra and torch hold ~400k Python objects; a full
    collection walks all of them (0.1-0.3 s on this project's CPU), and the layer loop
    allocates enough small objects (tensor views, per-column temporaries) to trigger
    one every so often, at a different moment on each rank. On a 0.2 s layer solve
    that single stall is a 1.5x load imbalance, and the other ranks wait for it at the
    next collective. ``gc.freeze`` moves everything alive now into a permanent
    generation that collections skip; garbage made inside the loop is still
    collected. One collection first, so no garbage is frozen; unfrozen afterwards.
    """
    gc.collect()
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


# ---------------------------------------------------------------------- the runner
class Runner:
    """Runs one recipe on one rank. Build it, then call :meth:`run`."""

    def __init__(self, recipe: Recipe, resolved: dict[str, Any], ctx: DistContext) -> None:
        self.recipe = recipe
        self.resolved = resolved
        self.ctx = ctx
        self.ids = recipe.stage_ids()
        self.stages = [build_stage(c) for c in recipe.stages]
        self.clock = StageClock()
        self.output_dir = Path(recipe.output_dir)
        self.resume = ResumePoints(self.output_dir, recipe, ctx)
        self.state: PipelineState | None = None  # kept after run() for inspection and tests
        self.cpu_cores: list[int] | None = None  # runtime.cpu_affinity's binding, if any

    # -------------------------------------------------------------- entry point
    def run(self) -> dict[str, Any]:
        """Execute every stage; write recipe.yaml and report.json (rank 0); return the report."""
        ctx = self.ctx
        ctx.check_same(
            "the resolved recipe", json.dumps(self.resolved, sort_keys=True, default=str)
        )
        configure_logging(ctx.rank, self.output_dir)
        if ctx.is_main:
            try:
                self.output_dir.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise GptqflowError(
                    f"output_dir={str(self.output_dir)!r}: cannot create it: "
                    f"{exc.strerror or exc}; choose another output_dir"
                ) from exc
            _write_atomic(self.output_dir / "recipe.yaml", _recipe_yaml(self.resolved))
        rt = self.recipe.runtime
        cores = self.cpu_cores = apply_cpu_affinity(
            rt.cpu_affinity, ctx.device.type, ctx.local_rank, ctx.local_world_size, rt.num_threads
        )
        if cores is not None:
            log.info("cpu_affinity: local rank %d bound to cores %s", ctx.local_rank, cores)
        if rt.num_threads:
            torch.set_num_threads(rt.num_threads)
        elif cores is not None and torch.get_num_threads() > len(cores):
            torch.set_num_threads(len(cores))  # no more threads than the cores it may use
        torch.manual_seed(self.recipe.seed)
        state = self.state = PipelineState(recipe=self.recipe, output_dir=self.output_dir)
        state.extra["progress"] = progress_enabled(rt.progress, ctx.is_main)
        start = time.perf_counter()
        error: BaseException | None = None
        try:
            self.resume.open()  # refuses a resume point of another recipe before any work
            self._run_stages(state)
            self.resume.finish()  # the run is complete: its resume points are not needed
        except BaseException as exc:
            error = exc
            raise
        finally:
            report = self._report(state, time.perf_counter() - start, error)
            if ctx.is_main:
                try:
                    _write_atomic(
                        self.output_dir / "report.json", json.dumps(report, indent=2) + "\n"
                    )
                except GptqflowError:
                    if error is None:
                        raise
                    log.error("report.json not written (disk full?); the run failed: %s", error)
        if ctx.is_main:
            print(format_summary(report), flush=True)
        return report

    def _run_stages(self, state: PipelineState) -> None:
        i = 0
        while i < len(self.stages):
            if self.recipe.stages[i].stage == "calibrate":
                n = len(LAYER_LOOP)
                self._run_layer_loop(state, self.stages[i : i + n], self.ids[i : i + n])
                i += n
                continue
            if self.resume.replaces(self.recipe.stages[i].stage, state):
                log.info("stage %s: result restored from the resume point", self.ids[i])
                i += 1
                continue
            log.info("stage %s", self.ids[i])
            with self.clock.measure(self.ids[i]):
                self.stages[i].run(state, self.ctx)
            i += 1

    def _run_layer_loop(self, state: PipelineState, stages: list[Stage], ids: list[str]) -> None:
        """calibrate drives the layers; every group goes through the other loop stages."""
        with frozen_heap():
            self._layer_loop(state, stages, ids)

    def _layer_loop(self, state: PipelineState, stages: list[Stage], ids: list[str]) -> None:
        calibrate, rest = stages[0], list(zip(ids[1:], stages[1:]))
        with self.clock.measure(ids[0]):
            calibrate.run(state, self.ctx)  # captures the first layer's inputs
        n_layers = calibrate.layer_count(state)  # type: ignore[attr-defined]
        first = self.resume.restore(state, n_layers)  # 0 unless resuming
        _reset_hwm()
        # Per-layer totals of the current layer: seconds inside the group stages,
        # this rank's solve seconds, and the summed GPTQ loss.
        in_groups = solve_s = solve_cpu = loss = 0.0
        groups = 0
        shared: list[str] = []  # groups whose factorisation every rank shared

        def on_group(step: GroupStep) -> None:
            nonlocal in_groups, solve_s, solve_cpu, loss, groups
            groups += 1
            t0 = time.perf_counter()
            for sid, stage in rest:
                t = time.perf_counter()
                stage.run_step(state, step, self.ctx)
                self.clock.add(sid, time.perf_counter() - t, 0)
            in_groups += time.perf_counter() - t0
            solve_s += step.solve_seconds.get(self.ctx.rank, 0.0)
            solve_cpu += step.solve_cpu_seconds.get(self.ctx.rank, 0.0)
            loss += sum(state.quantized[n].loss for n in step.names)
            if step.shared_factor:
                shared.append("+".join(n.rsplit(".", 1)[-1] for n in step.names))

        tokens = calibration_tokens(self.recipe)
        bar = LayerProgress(range(first, n_layers), n_layers, state.extra["progress"], tokens)
        for index in bar:
            in_groups = solve_s = solve_cpu = loss = 0.0
            groups = 0
            shared.clear()
            t = time.perf_counter()
            calibrate.run_layer(state, self.ctx, index, on_group)  # type: ignore[attr-defined]
            layer_s = time.perf_counter() - t
            self.clock.add(ids[0], layer_s - in_groups, 0)
            self._finish_layer(
                state,
                index,
                layer_s,
                (solve_s, solve_cpu),
                loss if groups else math.nan,
                list(shared),
            )
            bar.layer_done(layer_s)
            self.resume.after_layer(state, index + 1, n_layers)
        if self.resume.write_seconds:
            self.clock.add("resume-point", self.resume.write_seconds, 0)
        rss = peak_rss()
        for sid in ids:
            self.clock.add(sid, 0.0, rss)

    def _finish_layer(
        self,
        state: PipelineState,
        index: int,
        seconds: float,
        solve_s: tuple[float, float],
        loss: float,
        shared: list[str],
    ) -> None:
        """Gather every rank's solve time for the layer: the load imbalance goes in the report.

        ``imbalance`` is max / mean of the ranks' wall seconds in ``solve``: what the
        slowest rank makes the others wait. ``busy_imbalance`` is the same ratio of
        the CPU seconds their processes spent there: the work the plan gave each rank,
        without the time a rank lost to other processes on its core (with one thread
        per rank the two differ only by such stalls; with more threads CPU seconds
        count every thread).
        """
        pairs = self.ctx.gather_objects(solve_s)
        solve, cpu = [p[0] for p in pairs], [p[1] for p in pairs]
        entry = {
            "index": index,
            "seconds": seconds,
            "solve_seconds": solve,
            "imbalance": _imbalance(solve),
            "solve_cpu_seconds": cpu,
            "busy_imbalance": _imbalance(cpu),
            # GPTQ objective summed over the layer's modules; None unless solve.report_loss.
            "loss": None if math.isnan(loss) else loss,
            # Groups whose factorisation every rank shared (see gptqflow.gptq.plan).
            "shared_factor": shared,
        }
        state.layer_reports.append(entry)
        log.info(
            "layer %d done (%d/%d) in %.2fs (imbalance %.3f)",
            index,
            index + 1,
            len(state.layers),
            seconds,
            entry["imbalance"],
        )

    # -------------------------------------------------------------- report
    def _report(
        self, state: PipelineState, seconds: float, error: BaseException | None
    ) -> dict[str, Any]:
        # The kernel's peak mark is reset before every stage, so the run's peak is the
        # largest stage peak (the current mark alone covers only the last stage).
        peak = max([peak_rss(), *(int(s["peak_rss_bytes"]) for s in self.clock.stats.values())])
        mine: dict[str, Any] = {
            "rank": self.ctx.rank,
            "stages": self.clock.stats,
            "peak_rss_bytes": peak,
            "fallbacks": state.fallbacks,
            "cpu_cores": self.cpu_cores,
        }
        # Calibration tokens of this rank (its samples x seq_len) once a layer used them.
        mine["tokens_calibrated"] = (
            int(state.samples.numel())
            if state.samples is not None and state.extra.get("tokens_calibrated")
            else 0
        )
        try:
            ranks = self.ctx.gather_objects(mine) if error is None else [mine]
        except Exception:  # a peer is gone: report what this rank knows
            ranks = [mine]
        r = self.recipe
        report: dict[str, Any] = {
            "status": "ok" if error is None else "failed",
            "error": None if error is None else _error_text(error),
            "world_size": self.ctx.world_size,
            "scheme": r.scheme.name,
            "bits": r.scheme.bits,
            "group_size": r.scheme.group_size,
            "symmetric": r.scheme.symmetric,
            "actorder": r.scheme.actorder,
            "num_samples": r.dataset.num_samples,
            "seq_len": r.dataset.seq_len,
            "tokens_calibrated": sum(int(x.get("tokens_calibrated", 0)) for x in ranks),
            "model": r.model.path,
            "seconds": seconds,
            "stages": self.clock.stats,
            "perplexity": dict(state.perplexity),
            "checkpoint": None if state.checkpoint_dir is None else str(state.checkpoint_dir),
            "layers": state.layer_reports,
            # Layers already done in the resume point this run continued from (None: not resumed).
            "resumed_after_layers": self.resume.resumed_after,
            # Modules rounded to nearest instead of GPTQ (solve on_failure: rtn), from every rank.
            "fallbacks": merge_fallbacks(x["fallbacks"] for x in ranks),
            "ranks": ranks,
            "bytes_communicated": self.ctx.bytes_sent,
            "torch_threads": torch.get_num_threads(),
        }
        return report


def merge_fallbacks(per_rank: Iterable[list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """Every rank's fallbacks, once per module (a module split over ranks is listed by each)."""
    merged = {(f["layer"], f["module"]): f for fallbacks in per_rank for f in fallbacks}
    return [merged[k] for k in sorted(merged)]


def format_summary(report: dict[str, Any]) -> str:
    """The few lines a user reads at the end of a run."""
    ppl = report["perplexity"]
    fmt = lambda v: "-" if v is None else f"{v:.4f}"  # noqa: E731
    stages = ", ".join(f"{k} {v['seconds']:.1f}s" for k, v in report["stages"].items())
    peak = max((r["peak_rss_bytes"] for r in report["ranks"]), default=0) / 2**30
    lines = [
        f"gptqflow: {report['scheme']} on {report['world_size']} rank(s) in {report['seconds']:.1f}s",
        f"  checkpoint:  {report['checkpoint'] or '(not saved)'}",
        f"  perplexity:  baseline {fmt(ppl['baseline'])} -> quantized {fmt(ppl['quantized'])}",
        f"  stages:      {stages}",
        f"  calibrated:  {report.get('tokens_calibrated', 0):,} tokens (all ranks)",
        f"  peak memory: {peak:.2f} GiB (largest rank)",
    ]
    if report.get("fallbacks"):
        lines.append(
            f"  fallbacks:   {len(report['fallbacks'])} module(s) rounded to nearest instead of "
            "GPTQ (report.json: fallbacks)"
        )
    return "\n".join(lines)


def _error_text(error: BaseException) -> str:
    if isinstance(error, GptqflowError):
        return str(error)
    return "".join(traceback.format_exception_only(type(error), error)).strip()


def _recipe_yaml(resolved: dict[str, Any]) -> str:
    header = "# The fully resolved recipe of this run. Reproduce with:\n#   gptqflow run --config-dir <this dir> --config-name recipe\n"
    return header + yaml.safe_dump(resolved, sort_keys=False)


def _write_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` via a temporary file and a rename (never half-written)."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise GptqflowError(
            f"cannot write {path}: {exc.strerror or exc}; free some space or choose another "
            "output_dir"
        ) from exc
