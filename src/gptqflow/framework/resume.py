"""Resume points: continue an interrupted run from its last completed block of decoder layers.

Quantizing a large model takes hours; losing the work at layer 70 of 80 to a crash,
an out-of-memory kill or a preempted machine is what users fear most. With
``runtime.checkpoint_every=K`` the runner writes a *resume point* to
``<output_dir>/resume/`` after every K decoder layers (and after the last one), and
``runtime.resume=true`` (same ``output_dir``) continues from the newest complete one.
The directory is deleted once the run has finished (checkpoint saved).

A point after ``b`` layers consists of:

* ``layers-<a>-<b>.pt`` (rank 0): for every layer of ``[a, b)``, what each layer stage
  declared it changed there (``Stage.save_layer``, by stage id): the codes, scales and
  zero points of the quantized modules, a smoothing stage's norm scales, ... Points are
  incremental: each one adds the layers since the previous one. What a stage installs
  in the model is the same on every rank, so rank 0 alone writes it; on resume every
  rank hands each layer's pieces back to the same stages (``Stage.restore_layer``), in
  layer order, so the weights are bit-identical.
* ``hidden-<b>-rank<r>.pt`` (every rank, for its own samples): the inputs of layer
  ``b`` (the outputs of the quantized layer ``b-1``), the token count so far and the
  RNG state. Later layers read nothing else from earlier ones, so no earlier layer is
  recomputed. Not written after the last layer (nothing reads it). The rank's solve
  fallbacks (``scheme.on_failure: rtn``) go into the manifest.
* ``manifest.json`` (rank 0, written last, once every rank has written its files):
  the recipe as validated (minus the settings that cannot change the result), its
  hash, the world size, the layers done, the files with their sizes, the per-layer
  reports and the results of whole-model stages before the loop that can be reused
  (``Stage.save_result``: the baseline perplexity, so it is not evaluated again).

A point exists only once its manifest names it: files of a point whose manifest was
never written (a crash while writing it) are ignored and removed by the next write.
Every file is written to a temporary name, fsynced, renamed into place, and the
directory fsynced, so a manifest never names a file that is not complete on disk.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import shutil
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from gptqflow.errors import GptqflowError
from gptqflow.fileio import write_atomic
from gptqflow.framework.distributed import DistContext
from gptqflow.framework.schema import Recipe
from gptqflow.framework.stage import Stage
from gptqflow.framework.state import LayerRun, PipelineState
from gptqflow.modeling.spill import SpilledChunks

log = logging.getLogger("gptqflow")

RESUME_DIR = "resume"
MANIFEST = "manifest.json"
FORMAT = 2
# Auto (checkpoint_every: null): at most ~8 points per run, none for models this small.
AUTO_MIN_LAYERS = 5
AUTO_POINTS = 8
# Settings that cannot change the checkpoint: a resumed run may change them.
# (The world size is compared on its own, with its own message.)
_NEUTRAL_TOP = ("output_dir", "overwrite")
_NEUTRAL_RUNTIME = (
    "resume",
    "checkpoint_every",
    "progress",
    "timeout_s",
    "nproc_per_node",
    "max_forward_tokens",  # the same result in any chunking
    "max_hidden_bytes",  # hidden states in memory or in files: the same values
)


#: Hands a finished layer's saved pieces (by stage id) back to its stages.
RestoreLayer = Callable[[PipelineState, int, dict[str, Any]], None]


class ResumeError(GptqflowError):
    """A resume point that cannot be used (other recipe, other world size, damaged)."""


def checkpoint_interval(setting: int | None, n_layers: int) -> int:
    """Layers between resume points: the user's K, or auto (``null``); 0 = never.

    Auto writes none for models of fewer than ``AUTO_MIN_LAYERS`` layers (redoing
    them costs less than writing the activations) and otherwise at most
    ``AUTO_POINTS`` points, so a crash loses at most an eighth of the layers while
    writing activations stays a small share of the run.
    """
    if setting is not None:
        return setting
    if n_layers < AUTO_MIN_LAYERS:
        return 0
    return math.ceil(n_layers / AUTO_POINTS)


def comparable_recipe(recipe: Recipe) -> dict[str, Any]:
    """The recipe as validated (defaults filled in) minus what cannot change the result."""
    data = recipe.model_dump(mode="json")
    for key in _NEUTRAL_TOP:
        data.pop(key, None)
    for key in _NEUTRAL_RUNTIME:
        data["runtime"].pop(key, None)
    return data


def recipe_hash(data: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()


def _flatten(obj: Any, prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": [1]}}`` -> ``{"a.b[0]": 1}``: key paths a user can override.

    A stage entry (a dict with its ``id``) is named by its key, as in the recipe:
    ``stages.solve.dampening``, not its position in the list.
    """
    if isinstance(obj, dict):
        out: dict[str, Any] = {}
        for k, v in obj.items():
            out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    if isinstance(obj, list):
        out = {}
        for i, v in enumerate(obj):
            if isinstance(v, dict) and isinstance(v.get("id"), str):
                fields = {k: x for k, x in v.items() if k != "id"}
                out.update(_flatten(fields, f"{prefix}.{v['id']}"))
            else:
                out.update(_flatten(v, f"{prefix}[{i}]"))
        return out
    return {prefix: obj}


def recipe_differences(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """``key: saved -> current`` for every key path whose value differs."""
    a, b = _flatten(saved), _flatten(current)
    missing = object()
    out = []
    order = [[s.get("id") for s in r.get("stages", [])] for r in (saved, current)]
    if order[0] != order[1] and set(order[0]) == set(order[1]):
        out.append(f"stages (order): {order[0]} in the resume point, {order[1]} now")
    for key in sorted(set(a) | set(b)):
        va, vb = a.get(key, missing), b.get(key, missing)
        if va != vb:
            show = lambda v: "(absent)" if v is missing else json.dumps(v)  # noqa: E731
            out.append(f"{key}: {show(va)} in the resume point, {show(vb)} now")
    return out


# ---------------------------------------------------------------------- files
def _write(path: Path, content: str | bytes | Any) -> int:
    """:func:`~gptqflow.fileio.write_atomic`, with a failure put in words."""
    try:
        return write_atomic(path, content)
    except OSError as exc:
        raise ResumeError(
            f"cannot write the resume point file {path}: {exc}; free space there, or turn "
            "resume points off with runtime.checkpoint_every=0"
        ) from exc


def _save_tensors(path: Path, obj: Any) -> int:
    return _write(path, lambda f: torch.save(obj, f))


def _check_size(path: Path, size: int) -> None:
    """A file the manifest names must be the size the manifest says."""
    try:
        got = path.stat().st_size
    except OSError:
        got = -1
    if got != size:
        found = "is missing" if got < 0 else f"has {got} bytes"
        raise ResumeError(
            f"the resume point in {path.parent} is damaged: {path.name} {found}, its manifest "
            f"says {size} bytes; delete {path.parent} (or pass overwrite=true) to start over"
        )


def _load_tensors(path: Path, size: int) -> Any:
    """Load a file the manifest names, after checking its size."""
    _check_size(path, size)
    return torch.load(path, map_location="cpu", weights_only=True)


# ---------------------------------------------------------------------- the points
class ResumePoints:
    """Writes resume points during the layer loop and restores the newest one.

    The runner calls :meth:`open` before any stage (validates, or refuses, a point
    found in ``output_dir``), :meth:`restores` for each whole-model stage before the
    layer loop (and :meth:`record_result` after those that ran), the loop calls
    :meth:`restore` once it has captured the first layer's inputs and
    :meth:`after_layer` after every layer, and :meth:`finish` follows a successful run.
    With ``checkpoint_every=0`` and ``resume=false`` each of these is a cheap no-op.
    """

    def __init__(self, output_dir: Path, recipe: Recipe, ctx: DistContext) -> None:
        self.dir = Path(output_dir) / RESUME_DIR
        self.recipe = recipe
        self.ctx = ctx
        self.current = comparable_recipe(recipe)
        self.hash = recipe_hash(self.current)
        self.manifest: dict[str, Any] | None = None  # the newest complete point
        self.every = 0
        self.done = 0  # layers covered by the newest point
        self.resumed_after: int | None = None  # layers done in the point this run resumed
        self.layer_files: list[dict[str, Any]] = []  # rank 0: the files of finished layers
        # rank 0: finished layers since the last point -> {stage id: what it saved}
        self.pending: dict[int, dict[str, Any]] = {}
        self.results: dict[str, Any] = {}  # whole-model stages' reusable results
        self.loop_started = False
        self.write_seconds = 0.0

    # -------------------------------------------------------------- start
    def _read_manifest(self) -> dict[str, Any] | None:
        path = self.dir / MANIFEST
        if not path.is_file():
            return None
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise ResumeError(
                f"cannot read {path}: {exc}; delete {self.dir} (or pass overwrite=true) to start over"
            ) from exc
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise ResumeError(
                f"{path} is not a gptqflow resume manifest of format {FORMAT}; delete {self.dir} "
                "(or pass overwrite=true) to start over"
            )
        return data

    def _validate(self, m: dict[str, Any]) -> None:
        """Refuse a point written by another recipe or world size, saying what differs."""
        if m["world_size"] != self.ctx.world_size:
            raise ResumeError(
                f"cannot resume from {self.dir}: it was written by {m['world_size']} rank(s) "
                f"and this run has {self.ctx.world_size}; every rank's calibration samples "
                f"are saved per rank, so resume with runtime.nproc_per_node={m['world_size']} "
                f"(or {m['world_size']} torchrun ranks), or pass overwrite=true to start over"
            )
        if m["recipe_hash"] != self.hash:
            diff = recipe_differences(m["recipe"], self.current) or ["(recipe hash only)"]
            lines = "\n".join(f"  - {d}" for d in diff)
            raise ResumeError(
                f"cannot resume from {self.dir}: the recipe differs from the one that wrote it "
                f"({len(diff)} difference(s)):\n{lines}\nrun with the same recipe and overrides, "
                "or pass overwrite=true to start over"
            )

    def open(self) -> None:
        """Find the newest point in ``output_dir``; validate it, or clear it for a fresh start.

        Every rank reads the manifest (the directory is shared, as is the checkpoint's),
        so every rank reaches the same decision and raises the same error. Rank 0
        removes stale files only after a barrier, when no rank reads them any more.
        """
        rt = self.recipe.runtime
        found = self._read_manifest() if self.dir.exists() else None
        if found is not None and rt.resume:
            self._validate(found)
            self.manifest = found
            self.done = self.resumed_after = int(found["layers_done"])
            self.layer_files = list(found["layers"])
            log.info(
                "resuming from %s: %d of %d layers done",
                self.dir,
                self.done,
                found["num_layers"],
            )
        elif found is not None and not self.recipe.overwrite:
            raise ResumeError(
                f"{self.dir} holds a resume point of an interrupted run ({found['layers_done']} of "
                f"{found['num_layers']} layers done); pass runtime.resume=true to continue it, "
                "or overwrite=true to start over"
            )
        elif rt.resume:
            log.warning("runtime.resume=true but %s holds no resume point: starting over", self.dir)
        self.ctx.barrier("resume: open")
        if self.manifest is None and self.ctx.is_main and self.dir.exists():
            shutil.rmtree(self.dir)

    def record_result(self, sid: str, stage: Stage, state: PipelineState) -> None:
        """Keep a whole-model stage's reusable result (before the loop) for the next point."""
        if not self.loop_started and (saved := stage.save_result(state)) is not None:
            self.results[sid] = saved

    def restores(self, sid: str, stage: Stage, state: PipelineState) -> bool:
        """Whether a whole-model stage before the layer loop is replaced by its saved result.

        Only stages that return a result from ``save_result`` (e.g. the baseline
        evaluation) can be; the others (loading the model, the samples) run again.
        """
        if self.manifest is None or self.loop_started or sid not in self.manifest["results"]:
            return False
        saved = self.manifest["results"][sid]
        stage.restore_result(state, saved)
        self.results[sid] = saved
        return True

    # -------------------------------------------------------------- restore
    def restore(
        self, state: PipelineState, n_layers: int, restore_layer: RestoreLayer
    ) -> tuple[int, torch.Tensor | None]:
        """Reapply the point's finished layers; return the next layer and this rank's inputs.

        ``restore_layer(state, index, saved)`` hands each finished layer's saved pieces
        (by stage id) back to the stages that wrote them, in layer order.
        """
        self.loop_started = True
        self.every = checkpoint_interval(self.recipe.runtime.checkpoint_every, n_layers)
        m = self.manifest
        if m is None:
            return 0, None
        data = state.calibration_info.get("fingerprint")
        if m.get("data_fingerprint") != data:
            raise ResumeError(
                f"cannot resume from {self.dir}: the calibration data differs from the data that "
                f"wrote it (fingerprint {str(m.get('data_fingerprint'))[:12]}, now "
                f"{str(data)[:12]}: other rows or tokens under the same settings); restore that "
                "data, or pass overwrite=true to start over"
            )
        if m["num_layers"] != n_layers:
            raise ResumeError(
                f"cannot resume from {self.dir}: it covers a model of {m['num_layers']} layers, "
                f"this one has {n_layers}; pass overwrite=true to start over"
            )
        for entry in m["layers"]:
            saved = _load_tensors(self.dir / entry["file"], entry["bytes"])
            for index in sorted(saved):
                restore_layer(state, index, saved[index])
        mine_entry = m["ranks"][self.ctx.rank]
        state.fallbacks[:] = mine_entry["fallbacks"]
        state.layer_reports[:] = m["layer_reports"]
        hidden = None
        if self.done < n_layers and mine_entry["hidden"] is not None:
            entry = mine_entry["hidden"]
            mine = _load_tensors(self.dir / entry["file"], entry["bytes"])
            hidden = mine["hidden"]
            if "spill" in entry:  # the hidden states are in a file beside it
                _check_size(self.dir / entry["spill"]["file"], entry["spill"]["bytes"])
                hidden = SpilledChunks.from_description(self.dir, hidden)
            state.tokens_calibrated = int(mine["tokens"])
            torch.set_rng_state(mine["rng"])
        return self.done, hidden

    # -------------------------------------------------------------- write
    def after_layer(
        self,
        state: PipelineState,
        layer: LayerRun,
        stages: Sequence[tuple[str, Stage]],
        n_layers: int,
    ) -> None:
        """Keep what the stages changed in ``layer``; write a point every K layers and at the end."""
        if not self.every:
            return
        start = time.perf_counter()
        saved = {sid: got for sid, stage in stages if (got := stage.save_layer(layer)) is not None}
        if self.ctx.is_main:
            self.pending[layer.index] = saved
        done = layer.index + 1
        if done % self.every and done != n_layers:
            self.write_seconds += time.perf_counter() - start
            return
        ctx = self.ctx
        self.dir.mkdir(parents=True, exist_ok=True)
        files = list(self.layer_files)
        if ctx.is_main and self.pending:
            name = f"layers-{self.done:05d}-{done:05d}.pt"
            files.append({"file": name, "bytes": _save_tensors(self.dir / name, self.pending)})
        mine: dict[str, Any] = {"hidden": None, "fallbacks": state.fallbacks}
        if done < n_layers and layer.outputs is not None:
            name = f"hidden-{done:05d}-rank{ctx.rank:05d}.pt"
            outputs = layer.outputs
            spill = None
            if isinstance(outputs, SpilledChunks):  # copied file to file, never into memory
                spill = self._copy_spill(outputs, self.dir / name.replace(".pt", ".bin"))
            payload = {
                "hidden": outputs.cpu() if spill is None else spill,
                "tokens": state.tokens_calibrated,
                "rng": torch.get_rng_state(),
            }
            mine["hidden"] = {"file": name, "bytes": _save_tensors(self.dir / name, payload)}
            if spill is not None:
                mine["hidden"]["spill"] = {"file": spill["file"], "bytes": spill["bytes"]}
        ranks = ctx.gather_objects(mine)  # also the barrier: every rank's file is on disk
        if ctx.is_main:
            manifest = {
                "format": FORMAT,
                "recipe_hash": self.hash,
                "recipe": self.current,
                "world_size": ctx.world_size,
                # The calibration samples' fingerprint: resuming on other data is refused.
                "data_fingerprint": state.calibration_info.get("fingerprint"),
                "layers_done": done,
                "num_layers": n_layers,
                "layers": files,
                "ranks": ranks,  # per rank: its inputs file and its solve fallbacks
                "results": self.results,  # whole-model stages' reusable results, by stage id
                "layer_reports": state.layer_reports,
                "written_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            }
            text = json.dumps(manifest, indent=1) + "\n"
            _write(self.dir / MANIFEST, text)
            self._remove_unlisted(manifest)
            log.info("resume point: %d of %d layers in %s", done, n_layers, self.dir)
        self.layer_files = files
        self.pending = {}
        self.done = done
        self.write_seconds += time.perf_counter() - start

    @staticmethod
    def _copy_spill(outputs: SpilledChunks, path: Path) -> dict[str, Any]:
        try:
            return outputs.copy_to(path)
        except OSError as exc:
            path.unlink(missing_ok=True)
            raise ResumeError(
                f"cannot write the resume point file {path}: {exc}; free space there, or turn "
                "resume points off with runtime.checkpoint_every=0"
            ) from exc

    def _remove_unlisted(self, manifest: dict[str, Any]) -> None:
        """Drop the previous point's inputs and the files of any point never completed."""
        hidden = [r["hidden"] for r in manifest["ranks"] if r["hidden"] is not None]
        spilled = [h["spill"] for h in hidden if "spill" in h]
        keep = {MANIFEST} | {e["file"] for e in manifest["layers"] + hidden + spilled}
        for path in self.dir.iterdir():
            if path.name not in keep:
                path.unlink(missing_ok=True)

    def finish(self) -> None:
        """After a successful run: the points are no longer needed (rank 0 deletes them)."""
        if self.ctx.is_main and self.dir.exists():
            shutil.rmtree(self.dir, ignore_errors=True)
