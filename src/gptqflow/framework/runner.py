"""The runner: executes a validated recipe's stages over one pipeline state, on one rank.

Whole-model stages run once, in order. Each run of consecutive layer stages (stages
with per-layer hooks, see :mod:`gptqflow.framework.stage`) is handed to one
:class:`~gptqflow.framework.layerloop.LayerLoop`, which calls their hooks for every
decoder layer. The runner knows no stage by name. It times every stage (wall seconds and peak RSS),
gathers every rank's numbers into rank 0's ``report.json``, and writes
``recipe.yaml`` before any heavy work so a failed run can still be reproduced.
"""

from __future__ import annotations

import json
import logging
import time
import traceback
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
import yaml

from gptqflow.errors import GptqflowError
from gptqflow.fileio import write_atomic
from gptqflow.framework.affinity import apply_cpu_affinity
from gptqflow.framework.clock import StageClock, peak_rss
from gptqflow.framework.distributed import DistContext
from gptqflow.framework.layerloop import LayerLoop
from gptqflow.framework.logs import configure_logging
from gptqflow.framework.progress import progress_enabled
from gptqflow.framework.registry import build_stage
from gptqflow.framework.resume import ResumePoints
from gptqflow.framework.schema import Recipe
from gptqflow.framework.state import PipelineState

log = logging.getLogger("gptqflow")


# ---------------------------------------------------------------------- the runner
class Runner:
    """Runs one recipe on one rank. Build it, then call :meth:`run`."""

    def __init__(
        self,
        recipe: Recipe,
        resolved: dict[str, Any],
        ctx: DistContext,
        *,
        calibration: Any = None,
    ) -> None:
        self.recipe = recipe
        self.calibration = calibration  # gptqflow.run(calibration=...): data, not a config
        self.resolved = resolved
        self.ctx = ctx
        self.ids = [c.id for c in recipe.stages]
        self.stages = [build_stage(c, recipe) for c in recipe.stages]
        self.clock = StageClock(ctx.device)
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
        # Before any work: a node-local output_dir would fail much later, under another name.
        ctx.check_shared_dir(self.output_dir)
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
        state.calibration = self.calibration
        state.progress = progress_enabled(rt.progress, ctx.is_main)
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
        """Whole-model stages one by one; each run of consecutive layer stages as one loop."""
        i = 0
        while i < len(self.stages):
            if self.stages[i].is_layer_stage():
                j = i
                while j < len(self.stages) and self.stages[j].is_layer_stage():
                    j += 1
                loop = list(zip(self.ids[i:j], self.stages[i:j]))
                log.info("layer loop: %s", " -> ".join(self.ids[i:j]))
                LayerLoop(loop, self.ctx, self.clock, self.resume).run(state)
                i = j
                continue
            sid, stage = self.ids[i], self.stages[i]
            if self.resume.restores(sid, stage, state):
                log.info("stage %s: result restored from the resume point", sid)
            else:
                log.info("stage %s", sid)
                with self.clock.measure(sid):
                    stage.run(state, self.ctx)
                self.resume.record_result(sid, stage, state)
            i += 1

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
            # Bytes of decoder-layer tensors this rank read from files (streamed weights).
            "weights_read_bytes": 0 if state.weights is None else state.weights.bytes_read,
        }
        # Calibration tokens of this rank (its samples x seq_len) once a layer used them.
        mine["tokens_calibrated"] = state.tokens_calibrated
        mine["hidden_states"] = state.hidden_info or None
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
            # Source, fingerprint, samples and tokens per rank (the partition stage's split).
            "calibration": state.calibration_info or None,
            "model": r.model.path,
            # How the weights were held: "stream" (layer by layer from the files) or
            # "eager" (the whole model), with the reason when streaming was not possible.
            "weights": dict(state.weights_mode),
            "seconds": seconds,
            "stages": self.clock.stats,
            "perplexity": dict(state.perplexity),
            "checkpoint": None if state.checkpoint_dir is None else str(state.checkpoint_dir),
            "layers": state.layer_reports,
            # Layers already done in the resume point this run continued from (None: not resumed).
            "resumed_after_layers": self.resume.resumed_after,
            # Modules rounded to nearest instead of GPTQ (solve on_failure: rtn), from every rank.
            "fallbacks": merge_fallbacks(x["fallbacks"] for x in ranks),
            # Decoder parameters quantized (and their fraction); targetable weights left
            # in full precision, each with its reason (modeling/targets.py).
            "coverage": state.coverage,
            "ranks": ranks,
            "bytes_communicated": self.ctx.bytes_sent,
            # All-reduces and broadcasts this rank took part in (rank 0; the same on every rank).
            "collectives": self.ctx.collectives,
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
    if cov := report.get("coverage"):
        lines.append(
            f"  quantized:   {cov['quantized_fraction']:.1%} of the decoder parameters "
            f"({len(cov['not_quantized'])} targetable weight(s) left out: report.json coverage)"
        )
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
    """Write a run file never half-written; a failure in words."""
    try:
        write_atomic(path, text)
    except OSError as exc:
        raise GptqflowError(
            f"cannot write {path}: {exc.strerror or exc}; free some space or choose another "
            "output_dir"
        ) from exc
