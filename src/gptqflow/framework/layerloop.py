"""The layer loop: decoder layers one at a time, each stage's hooks in recipe order.

The runner hands each run of consecutive layer stages (see
:mod:`gptqflow.framework.stage`) to one :class:`LayerLoop`. ``before_loop`` of every
stage runs once first, ``after_loop`` once at the end. For every decoder layer:

0. with streamed weights (``state.weights``), the layer's tensors are read from the
   files (see :mod:`gptqflow.modeling.weights`);
1. ``before_layer`` of every stage;
2. when a stage requires ``layer.inputs``/``group.inputs``: one forward pass of the layer
   over this rank's hidden states. Pre-hooks on the target modules stop at the first
   call into each group of modules that read the same tensor, build a
   :class:`~gptqflow.framework.state.GroupRun` around that input and run every stage's
   ``on_group`` before the group's modules compute. So the rest of the layer already
   runs on whatever the stages installed (o_proj sees the outputs of the quantized
   q/k/v), and one forward per layer does both the statistics and the propagation.
   Without such a stage no forward runs at all: every target module is its own group.
   The groups of a *wave* (targets with one ``Target.wave`` key: an MoE block's
   experts, which never read each other's outputs) are handed to the stages together
   (``on_groups``), once every member's input is known (see :func:`waves`);
3. ``after_layer`` of every stage; the outputs become the next layer's inputs;
4. with streamed weights, the layer's tensors are dropped if a stage relocated them
   (wrote them where they can be read again); otherwise the layer stays in memory
   and the loop says so.

Hidden states larger than ``runtime.max_hidden_bytes`` live in files between layers
(:mod:`gptqflow.modeling.spill`): the forward reads them a chunk at a time and writes
the outputs chunk by chunk.

Sequential across layers (the inputs of layer i+1 are the outputs of the finished layer
i) and deterministic: every Linear computes sample by sample, so a rank's results do not
depend on how many samples it holds. The loop also times each stage's hooks per layer
(wall and CPU seconds, gathered from every rank into report.json), draws the progress
bar on rank 0 and writes resume points.
"""

from __future__ import annotations

import ctypes
import gc
import logging
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from gptqflow.errors import GptqflowError
from gptqflow.fileio import parse_size
from gptqflow.framework.clock import StageClock, peak_rss
from gptqflow.framework.contracts import LOOP_INPUTS
from gptqflow.framework.distributed import DistContext
from gptqflow.framework.progress import LayerProgress
from gptqflow.framework.stage import Stage
from gptqflow.framework.state import GroupRun, LayerRun, PipelineState, Slots
from gptqflow.gptq.numerics import count_nonfinite
from gptqflow.modeling.forward import (
    Chunks,
    capture_layer_inputs,
    per_sample_linears,
    run_until,
    to_device,
    trace_groups,
)
from gptqflow.modeling.spill import HiddenSpill, SpilledChunks, SpillWriter
from gptqflow.modeling.structure import decoder_layers
from gptqflow.modeling.targets import Coverage, LayerTargets, Target, decoder_params, layer_targets

if TYPE_CHECKING:
    from gptqflow.framework.resume import ResumePoints

log = logging.getLogger("gptqflow")

#: Directory under output_dir of the hidden states that exceed runtime.max_hidden_bytes.
SPILL_DIR = "spill"

#: report.json key of the loop's own time (input capture, forward passes, moving layers).
LOOP_KEY = "layer-loop"


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


def _release_group(group: GroupRun) -> None:
    """Drop a group's tensors once every stage's ``on_group`` has run.

    Its inputs, Hessians, results and slots (GPTAQ's cross term) are the group's
    alone: what later hooks need is in ``state.quantized`` and the layer. Kept until
    the layer ended, every group's float32 Hessian would add up on a wide layer (a
    5632-column down_proj alone is 127 MB).
    """
    group.inputs = group.hessian = group.reduced_hessian = None
    group.results.clear()
    group.slots = Slots()


def _dispose(layer: LayerRun) -> None:
    """Free a finished layer's per-group tensors now, not at some later collection.

    A ``GroupRun`` and its ``LayerRun`` refer to each other, so reference counting
    alone never frees them: their inputs, Hessians and results would wait for a
    cyclic collection, which the loop's few Python allocations rarely trigger (a
    layer's Hessians are hundreds of MB on a wide model). The cycle is cut by hand;
    one collection of what the loop made (cheap: the heap before it is frozen) then
    frees whatever a plugin's own state tied into a cycle.
    """
    for group in layer.groups:
        _release_group(group)
        group.modules.clear()
    layer.groups.clear()
    layer.inputs = layer.outputs = None
    gc.collect()
    _trim_heap()


def _load_trim() -> Callable[[], object] | None:
    """glibc's ``malloc_trim(0)``, where the C library has it (Linux with glibc)."""
    try:
        trim = ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None
    trim.argtypes = [ctypes.c_size_t]
    return lambda: trim(0)


_TRIM = _load_trim()


def _trim_heap() -> None:
    """Give the freed memory of a finished layer back to the OS.

    Tensors of a few MB (a group's inputs, Hessian strips, collective buffers) are
    served from malloc's arenas, not mapped one by one, and freed arena memory stays in
    the process: with gloo's threads allocating in arenas of their own, a 2-rank run's
    peak RSS grew by ~18 MB per layer (24 layers: 1.59 GiB against 1.38 GiB at 12),
    while one rank stayed flat. ``malloc_trim`` returns the free pages of every arena
    (a few milliseconds per layer).
    """
    if _TRIM is not None:
        _TRIM()


def waves(groups: list[list[str]], targets: dict[str, Target]) -> list[list[list[str]]]:
    """Groups in call order, the groups of one wave gathered at its first group's place.

    A group belongs to a wave when all its targets share one ``Target.wave`` key (the
    experts of one fused parameter). The members of a wave are independent of each
    other, and no group in between them reads their outputs before the wave's last
    member has run (they are called one after another inside one experts module), so
    handling the whole wave where its first member was reached keeps every data
    dependency of the forward.
    """
    out: list[list[list[str]]] = []
    at: dict[str, int] = {}
    for names in groups:
        keys = {targets[n].wave for n in names}
        key = keys.pop() if len(keys) == 1 else None
        if key is None:
            out.append([names])
        elif key in at:
            out[at[key]].append(names)
        else:
            at[key] = len(out)
            out.append([names])
    return out


def _imbalance(seconds: list[float]) -> float:
    """max / mean over the ranks (1.0 when nobody spent any time)."""
    mean = sum(seconds) / len(seconds)
    return (max(seconds) / mean) if mean > 0 else 1.0


class _Timer:
    """Wall and CPU seconds of each stage's hooks during one layer."""

    def __init__(self, sync: Callable[[], None]) -> None:
        self.seconds: dict[str, list[float]] = {}
        self.sync = sync  # waits for queued device work (CUDA), so times include it

    @contextmanager
    def time(self, sid: str) -> Iterator[None]:
        self.sync()
        wall, cpu = time.perf_counter(), time.process_time()
        try:
            yield
        finally:
            self.sync()
            got = self.seconds.setdefault(sid, [0.0, 0.0])
            got[0] += time.perf_counter() - wall
            got[1] += time.process_time() - cpu

    def total(self) -> float:
        return sum(w for w, _ in self.seconds.values())


class LayerLoop:
    """Runs a sequence of layer stages over every decoder layer of the model."""

    def __init__(
        self,
        stages: Sequence[tuple[str, Stage]],
        ctx: DistContext,
        clock: StageClock,
        resume: ResumePoints,
    ) -> None:
        self.stages = list(stages)
        self.ctx = ctx
        self.clock = clock
        self.resume = resume
        self.needs_inputs = any(
            n in LOOP_INPUTS for _, s in self.stages for n in s.config.requires()
        )
        self._group_cache: dict[Any, list[list[str]]] = {}
        # What each layer's targets are, and how much was quantized (report.json "coverage").
        self.quantizes = any("quantized" in s.config.provides() for _, s in self.stages)
        self.coverage = Coverage()
        self._found: dict[int, LayerTargets] = {}
        self.n_layers = 0
        self._kept = 0  # changed layers that could not be released (streamed weights)
        self.spill: HiddenSpill | None = None  # hidden states in files (runtime.max_hidden_bytes)

    # -------------------------------------------------------------- the loop
    def run(self, state: PipelineState) -> None:
        try:
            with frozen_heap():
                self._run(state)
        finally:
            if self.spill is not None:
                self.spill.close()

    def _restored_hidden(
        self, restored: torch.Tensor | Chunks, kwargs: dict[str, Any]
    ) -> torch.Tensor | Chunks:
        """A resume point's hidden states, in memory or in files as this run's budget says."""
        if self.spill is None:
            return restored.to(self.ctx.device)  # a spilled point is read into memory
        if isinstance(restored, SpilledChunks):
            return restored  # read from the resume point's file, chunk by chunk
        chunks = restored if isinstance(restored, Chunks) else Chunks([restored], [kwargs])
        return self.spill.spill(chunks)

    def _maybe_spill(
        self, state: PipelineState, hidden: torch.Tensor | Chunks, kwargs: dict[str, Any]
    ) -> torch.Tensor | Chunks:
        """Move the rank's hidden states to a file when they exceed ``runtime.max_hidden_bytes``.

        Spilled, every layer runs in chunks (``runtime.max_forward_tokens``, or as many
        tokens as the budget holds) read from the file one at a time, and writes its
        outputs chunk by chunk to the other file: one chunk in, one chunk out in memory.
        """
        runtime = state.recipe.runtime
        chunks = hidden if isinstance(hidden, Chunks) else Chunks([hidden], [kwargs])
        nbytes = sum(int(p.numel()) * p.element_size() for p in chunks.parts)
        state.hidden_info = {"bytes": nbytes, "spilled": False}
        if runtime.max_hidden_bytes is None or nbytes <= parse_size(runtime.max_hidden_bytes):
            return hidden
        budget = parse_size(runtime.max_hidden_bytes)
        per_token = max(1, nbytes // max(1, chunks.tokens))
        chunk_tokens = runtime.max_forward_tokens or max(1, budget // per_token)
        self.spill = HiddenSpill(state.output_dir / SPILL_DIR, self.ctx.rank, chunk_tokens)
        spilled = self.spill.spill(chunks)
        state.hidden_info.update(
            spilled=True, chunk_tokens=chunk_tokens, file_dir=str(self.spill.directory)
        )
        log.info(
            "hidden states of rank %d (%.1f MiB) exceed runtime.max_hidden_bytes=%s: kept in "
            "%s and run in chunks of at most %d tokens",
            self.ctx.rank,
            nbytes / 2**20,
            runtime.max_hidden_bytes,
            self.spill.directory,
            chunk_tokens,
        )
        return spilled

    def _run(self, state: PipelineState) -> None:
        ctx, recipe = self.ctx, state.recipe
        prefix, layers = decoder_layers(state.model)
        n_layers = self.n_layers = len(layers)
        hidden: torch.Tensor | Chunks | None = None
        kwargs: dict[str, Any] = {}
        self.clock.reset_device_peak()
        with self.clock.measure(LOOP_KEY):
            if self.needs_inputs:
                assert state.samples is not None, "contracts: the loop's inputs need samples"
                with state.weights.outside() if state.weights else nullcontext():
                    x, kw = capture_layer_inputs(state.model, layers[0], state.samples)
                hidden, kwargs = x.to(ctx.device), to_device(kw, ctx.device)
                hidden = self._maybe_spill(state, hidden, kwargs)
            for _sid, stage in self.stages:
                stage.before_loop(state, ctx)
            first, restored = self.resume.restore(state, n_layers, self._restore_layer(prefix))
        if restored is not None:
            hidden = self._restored_hidden(restored, kwargs)
        tokens = recipe.dataset.num_samples * recipe.dataset.seq_len if self.needs_inputs else 0
        bar = LayerProgress(range(first, n_layers), n_layers, state.progress, tokens)
        for index in bar:
            layer = LayerRun(
                state,
                index,
                f"{prefix}.{index}",
                layers[index],
                self._targets(layers[index], f"{prefix}.{index}", recipe, index),
                inputs=hidden,
                kwargs=kwargs,
            )
            timer = _Timer(self.clock.sync)
            start = time.perf_counter()
            self._process(layer, timer)
            self._account(layer)
            seconds = time.perf_counter() - start
            self.clock.add(LOOP_KEY, seconds - timer.total(), 0)
            for sid, (wall, _) in timer.seconds.items():
                self.clock.add(sid, wall, 0)
            self._report(layer, seconds, timer)
            bar.layer_done(seconds)
            hidden = layer.outputs
            # Resume points ask the stages for what they changed (save_layer), which may
            # read the layer's tensors: they are dropped only afterwards.
            self.resume.after_layer(state, layer, self.stages, n_layers)
            self._release(state, index)
            _dispose(layer)
        # The layers' peak, read before an after_loop measurement resets the kernel's mark.
        rss, device = peak_rss(), self.clock.device_peak()
        for sid, stage in self.stages:
            if type(stage).after_loop is not Stage.after_loop:  # timed only where there is work
                with self.clock.measure(sid):
                    stage.after_loop(state, ctx)
        if self.quantizes:
            state.coverage = self.coverage.summary()
        if self._kept:
            log.warning(
                "%d changed decoder layer(s) stay in memory: no stage of the loop wrote them "
                "out (the streaming save does); memory grows with depth",
                self._kept,
            )
        if self.resume.write_seconds:
            self.clock.add("resume-point", self.resume.write_seconds, 0)
        for sid in (LOOP_KEY, *(sid for sid, _ in self.stages)):
            self.clock.add(sid, 0.0, rss, device)

    def _targets(self, module: nn.Module, name: str, recipe: Any, index: int) -> dict[str, Target]:
        """The layer's targets (modeling/targets.py); what is left out is kept for the report."""
        scheme = recipe.scheme
        found = self._found[index] = layer_targets(module, name, scheme.targets, scheme.ignore)
        return found.targets

    def _account(self, layer: LayerRun) -> None:
        """Count the layer's quantized weights; a target left unquantized without a reason is
        an error (a stage that quantizes must quantize every target, or fall back and say so)."""
        found = self._found.pop(layer.index)
        if not self.quantizes:
            return
        quantized = layer.state.quantized
        left = [n for n in layer.targets if n not in quantized]
        if left:
            raise GptqflowError(
                f"layer {layer.index} ({layer.name}): {len(left)} targeted weight(s) were not "
                f"quantized and no stage said why (e.g. {left[:3]})"
            )
        self.coverage.add_layer(found, decoder_params(layer.module), list(layer.targets))

    def _process(self, layer: LayerRun, timer: _Timer) -> None:
        """One layer: before_layer hooks, the forward with group hooks, after_layer hooks."""
        ctx = self.ctx
        store = layer.state.weights
        if store is not None:
            store.materialize(layer.index)
            store.mark_changed(layer.index)
        layer.module.to(ctx.device)
        try:
            for sid, stage in self.stages:
                with timer.time(sid):
                    stage.before_layer(layer, ctx)
            if self.needs_inputs:
                self._forward(layer, timer)
            else:  # every target is its own group; the experts of a fused parameter, a wave
                for wave in self._waves(layer, [[n] for n in layer.targets]):
                    self._wave(layer, wave, [None] * len(wave), timer)
            for sid, stage in self.stages:
                with timer.time(sid):
                    stage.after_layer(layer, ctx)
        finally:
            layer.module.to("cpu")

    def _release(self, state: PipelineState, index: int) -> None:
        """Drop a finished layer's streamed tensors when they can be read again."""
        if state.weights is not None and not state.weights.release(index):
            self._kept += 1

    def _wave(
        self,
        layer: LayerRun,
        wave: list[list[str]],
        inputs: Sequence[torch.Tensor | list[torch.Tensor] | None],
        timer: _Timer,
    ) -> None:
        """Every stage's ``on_groups`` over one wave of groups (a plain group: a wave of one)."""
        runs = []
        for names, x in zip(wave, inputs):
            targets = [layer.targets[n] for n in names]
            group = GroupRun(layer, len(layer.groups), names, targets, inputs=x)
            layer.groups.append(group)
            runs.append(group)
        for sid, stage in self.stages:
            if type(stage).plan_groups is not Stage.plan_groups:
                with timer.time(sid):
                    stage.plan_groups(runs, self.ctx)
        for sid, stage in self.stages:
            with timer.time(sid):
                stage.on_groups(runs, self.ctx)
        for group in runs:
            _release_group(group)
        _trim_heap()  # the groups' temporaries (solve copies, Hessian buffers) go back now

    def _forward(self, layer: LayerRun, timer: _Timer) -> None:
        """The layer's forward over this rank's samples; each group's hooks at its first call.

        Samples of one length (a ``[n, seq, h]`` tensor) take one forward; samples of
        several lengths (:class:`Chunks`), or more tokens than ``runtime.max_forward_tokens``,
        take :meth:`_forward_chunks` over chunks of at most that many tokens.
        """
        assert layer.inputs is not None
        cap = layer.state.recipe.runtime.max_forward_tokens
        if isinstance(layer.inputs, SpilledChunks):
            assert self.spill is not None, "spilled inputs come from the loop's spill"
            self._forward_chunks(layer, layer.inputs, timer, self.spill.writer())
            return
        if isinstance(layer.inputs, Chunks):
            self._forward_chunks(layer, layer.inputs.split(cap), timer)
            return
        steps = self._waves(layer)
        too_many = cap is not None and layer.inputs.shape[0] * layer.inputs.shape[1] > cap
        if too_many or any(len(w) > 1 for w in steps):
            # A wave needs every member's input before any member runs: partial forwards.
            whole = Chunks([layer.inputs], [layer.kwargs])
            self._forward_chunks(layer, whole.split(cap), timer)
            assert isinstance(layer.outputs, Chunks)
            layer.outputs = torch.cat(layer.outputs.parts)  # one length: a tensor again
            return
        groups = [g for (g,) in steps]
        group_of = {layer.targets[n].module: gi for gi, g in enumerate(groups) for n in g}
        done: set[int] = set()

        def hook(mod: nn.Module, args: tuple[Any, ...]) -> None:
            gi = group_of[mod]
            if gi not in done:
                done.add(gi)
                self._wave(layer, [groups[gi]], [args[0]], timer)

        handles = [m.register_forward_pre_hook(hook) for m in group_of]
        try:
            with per_sample_linears(layer.module), torch.inference_mode():
                out = layer.module(layer.inputs, **layer.kwargs)
        finally:
            for h in handles:
                h.remove()
        hidden = out[0] if isinstance(out, tuple) else out
        self._check_outputs(layer, hidden)
        layer.outputs = hidden
        # Every layer sees the same samples: the rank's calibration tokens, not a sum over layers.
        layer.state.tokens_calibrated = int(layer.inputs.shape[0] * layer.inputs.shape[1])

    def _forward_chunks(
        self, layer: LayerRun, chunks: Chunks, timer: _Timer, sink: SpillWriter | None = None
    ) -> None:
        """The forward over chunks of equal-length samples, each with its own kwargs.

        A group's statistics must cover every chunk before its ``on_group`` hooks run
        (the solve needs the whole Hessian), and the groups after it must see its
        quantized outputs. So for each group (or wave of groups) in call order, every
        chunk runs forward until each of its groups' first module has been called, and
        stops there; the inputs collected from all chunks become ``group.inputs`` (a
        list, one tensor per chunk) and the hooks run; a last full forward of every
        chunk gives the layer's outputs. A layer of G groups and waves costs up to G+1
        partial forwards instead of one; each sample's arithmetic is the same as in one
        forward (Linears compute sample by sample), so the result does not depend on
        how samples are chunked.

        With a ``sink`` (spilled hidden states) each output chunk goes to its file as
        soon as it is computed, and the layer's outputs are that file's chunks.
        """
        device = self.ctx.device
        steps = self._waves(layer)  # traced outside: tracing patches the layer's Linears too
        with per_sample_linears(layer.module), torch.inference_mode():
            for wave in steps:
                firsts = [layer.targets[names[0]].module for names in wave]
                per_chunk = [
                    run_until(layer.module, firsts, x.to(device), kw)
                    for x, kw in zip(chunks.parts, chunks.kwargs)
                ]
                inputs = [[got[i] for got in per_chunk] for i in range(len(wave))]
                del per_chunk
                self._wave(layer, wave, inputs, timer)
            parts = []
            try:
                for x, kw in zip(chunks.parts, chunks.kwargs):
                    out = layer.module(x.to(device), **kw)
                    hidden = out[0] if isinstance(out, tuple) else out
                    self._check_outputs(layer, hidden)
                    if sink is None:
                        parts.append(hidden)
                    else:
                        sink.append(hidden)
            except BaseException:
                if sink is not None:
                    sink.abort()
                raise
        layer.outputs = Chunks(parts, chunks.kwargs) if sink is None else sink.finish(chunks.kwargs)
        layer.state.tokens_calibrated = chunks.tokens

    def _check_outputs(self, layer: LayerRun, hidden: torch.Tensor) -> None:
        # Inputs are checked through the group Hessians; this catches NaN/Inf that first
        # appear after the layer's last target module (e.g. the final residual add).
        if bad := count_nonfinite(hidden):
            raise GptqflowError(
                f"layer {layer.index} ({layer.name}): its outputs have {bad} NaN/Inf values "
                f"(rank {self.ctx.rank}'s calibration samples); check the model's weights and dtype"
            )

    def _groups(self, layer: LayerRun) -> list[list[str]]:
        """The layer's groups, traced once per kind of layer (class + targeted names).

        Layers of one class with the same targeted modules share their data flow, so
        the one-sample tracing forward runs for the first such layer only.
        """
        if not layer.targets:
            return []
        cut = len(layer.name) + 1
        key = (type(layer.module), tuple(n[cut:] for n in layer.targets))
        if key not in self._group_cache:
            assert layer.inputs is not None
            if isinstance(layer.inputs, Chunks):
                x, kwargs = layer.inputs.parts[0][:1].to(self.ctx.device), layer.inputs.kwargs[0]
            else:
                x, kwargs = layer.inputs[:1], layer.kwargs
            traced = trace_groups(layer.module, x, kwargs, layer.targets)
            self._group_cache[key] = [[n[cut:] for n in g] for g in traced]
        return [[f"{layer.name}.{n}" for n in g] for g in self._group_cache[key]]

    def _waves(
        self, layer: LayerRun, groups: list[list[str]] | None = None
    ) -> list[list[list[str]]]:
        """The layer's groups (traced, unless given) in call order, a wave's groups together
        (see :func:`waves`), a wave cut into parts of at most ``runtime.max_wave_groups``."""
        cap = layer.state.recipe.runtime.max_wave_groups
        found = waves(self._groups(layer) if groups is None else groups, layer.targets)
        if cap is None:
            return found
        return [w[i : i + cap] for w in found for i in range(0, len(w), cap)]

    def _restore_layer(self, prefix: str) -> Any:
        """Rebuilds a finished layer from a resume point: each stage reapplies its part."""

        def restore(state: PipelineState, index: int, saved: dict[str, Any]) -> None:
            if state.weights is not None:
                state.weights.materialize(index)
                state.weights.mark_changed(index)
            module = decoder_layers(state.model)[1][index]
            name = f"{prefix}.{index}"
            targets = self._targets(module, name, state.recipe, index)
            layer = LayerRun(state, index, name, module, targets)
            for sid, stage in self.stages:
                if sid in saved:
                    stage.restore_layer(layer, saved[sid], self.ctx)
            self._account(layer)
            self._release(state, index)

        return restore

    # -------------------------------------------------------------- report
    def _report(self, layer: LayerRun, seconds: float, timer: _Timer) -> None:
        """Every rank's seconds per stage for this layer, and the load imbalance of the work.

        ``imbalance`` is max / mean of the ranks' wall seconds in the stages whose group
        work the ranks divide (``Stage.BALANCED_WORK``): what the slowest rank makes the
        others wait. ``busy_imbalance`` is the same ratio of CPU seconds: the work the
        plan gave each rank, without the time a rank lost to other processes on its core.
        """
        ranks = self.ctx.gather_objects(timer.seconds)
        balanced = [sid for sid, s in self.stages if s.BALANCED_WORK]
        work = [sum(r.get(sid, [0.0, 0.0])[0] for sid in balanced) for r in ranks]
        work_cpu = [sum(r.get(sid, [0.0, 0.0])[1] for sid in balanced) for r in ranks]
        entry: dict[str, Any] = {
            "index": layer.index,
            "seconds": seconds,
            "work_seconds": work,
            "imbalance": _imbalance(work),
            "work_cpu_seconds": work_cpu,
            "busy_imbalance": _imbalance(work_cpu),
            "stages": {
                sid: {
                    "seconds": [r.get(sid, [0.0, 0.0])[0] for r in ranks],
                    "cpu_seconds": [r.get(sid, [0.0, 0.0])[1] for r in ranks],
                }
                for sid, _ in self.stages
            },
            **layer.report,
        }
        layer.state.layer_reports.append(entry)
        log.info(
            "layer %d done (%d/%d) in %.2fs (imbalance %.3f)",
            layer.index,
            layer.index + 1,
            self.n_layers,
            seconds,
            entry["imbalance"],
        )
