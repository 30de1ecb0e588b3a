"""Resume points: continue an interrupted run from its last completed block of decoder layers.

Quantizing a large model takes hours; losing the work at layer 70 of 80 to a crash,
an out-of-memory kill or a preempted machine is what users fear most. With
``runtime.checkpoint_every=K`` the runner writes a *resume point* to
``<output_dir>/resume/`` after every K decoder layers (and after the last one), and
``runtime.resume=true`` (same ``output_dir``) continues from the newest complete one.
The directory is deleted once the run has finished (checkpoint saved).

A point after ``b`` layers consists of:

* ``quantized-<a>-<b>.pt`` (rank 0): codes, scales, zero points, g_idx, loss and damp
  of every module of layers ``[a, b)``. Points are incremental: each one adds the
  layers since the previous one. After a broadcast every rank holds every module, so
  rank 0 alone writes them; on resume every rank reinstalls the dequantized weights
  from the codes with the function broadcast uses, so the weights are bit-identical.
* ``hidden-<b>-rank<r>.pt`` (every rank, for its own samples): the inputs of layer
  ``b`` (the outputs of the quantized layer ``b-1``), the token count so far and the
  RNG state. Later layers read nothing else from earlier ones, so no earlier layer is
  recomputed. Not written after the last layer (nothing reads it). The rank's solve
  fallbacks (``scheme.on_failure: rtn``) go into the manifest.
* ``manifest.json`` (rank 0, written last, once every rank has written its files):
  the recipe as validated (minus the settings that cannot change the result), its
  hash, the world size, the layers done, the files with their sizes, the per-layer
  reports and the baseline perplexity (so the baseline evaluation is not repeated).

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
import os
import shutil
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from gptqflow.framework.distributed import DistContext
from gptqflow.framework.errors import GptqflowError
from gptqflow.framework.schema import Recipe
from gptqflow.framework.state import PipelineState
from gptqflow.gptq.quantizer import column_groups, dequantize
from gptqflow.gptq.types import QuantArgs, QuantResult

log = logging.getLogger("gptqflow")

RESUME_DIR = "resume"
MANIFEST = "manifest.json"
FORMAT = 1
# Auto (checkpoint_every: null): at most ~8 points per run, none for models this small.
AUTO_MIN_LAYERS = 5
AUTO_POINTS = 8
# Settings that cannot change the checkpoint: a resumed run may change them.
# (The world size is compared on its own, with its own message.)
_NEUTRAL_TOP = ("output_dir", "overwrite")
_NEUTRAL_RUNTIME = ("resume", "checkpoint_every", "progress", "timeout_s", "nproc_per_node")


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
    for stage in data["stages"]:
        if stage.get("stage") == "save":
            stage.pop("overwrite", None)
    return data


def recipe_hash(data: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()


def _flatten(obj: Any, prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": [1]}}`` -> ``{"a.b[0]": 1}``: key paths a user can override."""
    if isinstance(obj, dict):
        out: dict[str, Any] = {}
        for k, v in obj.items():
            out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    if isinstance(obj, list):
        out = {}
        for i, v in enumerate(obj):
            out.update(_flatten(v, f"{prefix}[{i}]"))
        return out
    return {prefix: obj}


def recipe_differences(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """``key: saved -> current`` for every key path whose value differs."""
    a, b = _flatten(saved), _flatten(current)
    missing = object()
    out = []
    for key in sorted(set(a) | set(b)):
        va, vb = a.get(key, missing), b.get(key, missing)
        if va != vb:
            show = lambda v: "(absent)" if v is missing else json.dumps(v)  # noqa: E731
            out.append(f"{key}: {show(va)} in the resume point, {show(vb)} now")
    return out


# ---------------------------------------------------------------------- files
def _fsync_dir(directory: Path) -> None:
    """Make a rename durable: without it a power loss can forget the new name."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _write_atomic(path: Path, write: Any) -> int:
    """Call ``write(file)`` on a temporary file, fsync, rename to ``path``; return its size."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise ResumeError(
            f"cannot write the resume point file {path}: {exc}; free space there, or turn "
            "resume points off with runtime.checkpoint_every=0"
        ) from exc
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)
    return path.stat().st_size


def _save_tensors(path: Path, obj: Any) -> int:
    return _write_atomic(path, lambda f: torch.save(obj, f))


def _load_tensors(path: Path, size: int) -> Any:
    """Load a file the manifest names, after checking it is the size the manifest says."""
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
    return torch.load(path, map_location="cpu", weights_only=True)


# ---------------------------------------------------------------------- the points
class ResumePoints:
    """Writes resume points during the layer loop and restores the newest one.

    The runner calls :meth:`open` before any stage (validates, or refuses, a point
    found in ``output_dir``), :meth:`replaces` for each stage before the layer loop,
    :meth:`restore` once the loop has captured the first layer's inputs,
    :meth:`after_layer` after every layer, and :meth:`finish` after a successful run.
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
        self.saved: set[str] = set()  # modules already in a quantized-*.pt file
        self.quantized_files: list[dict[str, Any]] = []  # rank 0: the files holding them
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
            self.quantized_files = list(found["quantized"])
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

    def replaces(self, stage: str, state: PipelineState) -> bool:
        """Whether a stage before the layer loop is replaced by the point's saved results.

        Only the baseline ``evaluate`` is: its perplexity is in the manifest, and
        load/partition must run again to rebuild the model and the samples.
        """
        if self.manifest is None or self.loop_started or stage != "evaluate":
            return False
        state.perplexity.update(self.manifest["perplexity"])
        return True

    # -------------------------------------------------------------- restore
    def restore(self, state: PipelineState, n_layers: int) -> int:
        """Reinstall the point's quantized layers and this rank's inputs; return the next layer."""
        self.loop_started = True
        self.every = checkpoint_interval(self.recipe.runtime.checkpoint_every, n_layers)
        m = self.manifest
        if m is None:
            return 0
        if m["num_layers"] != n_layers:
            raise ResumeError(
                f"cannot resume from {self.dir}: it covers a model of {m['num_layers']} layers, "
                f"this one has {n_layers}; pass overwrite=true to start over"
            )
        args = QuantArgs(**m["quant_args"])
        state.quant_args = args
        for entry in m["quantized"]:
            saved = _load_tensors(self.dir / entry["file"], entry["bytes"])
            for name, parts in saved.items():
                state.quantized[name] = _reinstall(state.model, name, parts, args)
                self.saved.add(name)
        mine_entry = m["ranks"][self.ctx.rank]
        state.fallbacks[:] = mine_entry["fallbacks"]
        if self.done < n_layers:
            entry = mine_entry["hidden"]
            mine = _load_tensors(self.dir / entry["file"], entry["bytes"])
            state.extra["hidden"] = mine["hidden"].to(self.ctx.device)
            state.extra["tokens_calibrated"] = int(mine["tokens"])
            torch.set_rng_state(mine["rng"])
        state.layer_reports[:] = m["layer_reports"]
        return self.done

    # -------------------------------------------------------------- write
    def after_layer(self, state: PipelineState, done: int, n_layers: int) -> None:
        """Write a point when ``done`` layers are a multiple of K, and after the last layer."""
        if not self.every or (done % self.every and done != n_layers):
            return
        start = time.perf_counter()
        ctx = self.ctx
        self.dir.mkdir(parents=True, exist_ok=True)
        new = [n for n in state.quantized if n not in self.saved]
        quantized = list(self.quantized_files)
        if ctx.is_main and new:
            name = f"quantized-{self.done:05d}-{done:05d}.pt"
            size = _save_tensors(self.dir / name, {n: _parts(state.quantized[n]) for n in new})
            quantized.append({"file": name, "bytes": size})
        mine: dict[str, Any] = {"hidden": None, "fallbacks": state.fallbacks}
        if done < n_layers:
            name = f"hidden-{done:05d}-rank{ctx.rank:05d}.pt"
            payload = {
                "hidden": state.extra["hidden"].cpu(),
                "tokens": state.extra["tokens_calibrated"],
                "rng": torch.get_rng_state(),
            }
            mine["hidden"] = {"file": name, "bytes": _save_tensors(self.dir / name, payload)}
        ranks = ctx.gather_objects(mine)  # also the barrier: every rank's file is on disk
        if ctx.is_main:
            assert state.quant_args is not None
            manifest = {
                "format": FORMAT,
                "recipe_hash": self.hash,
                "recipe": self.current,
                "world_size": ctx.world_size,
                "layers_done": done,
                "num_layers": n_layers,
                "quantized": quantized,
                "ranks": ranks,  # per rank: its inputs file and its solve fallbacks
                "quant_args": asdict(state.quant_args),
                "perplexity": dict(state.perplexity),
                "layer_reports": state.layer_reports,
                "written_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            }
            text = json.dumps(manifest, indent=1) + "\n"
            _write_atomic(self.dir / MANIFEST, lambda f: f.write(text.encode()))
            self._remove_unlisted(manifest)
            log.info("resume point: %d of %d layers in %s", done, n_layers, self.dir)
        self.quantized_files = quantized
        self.saved.update(new)
        self.done = done
        self.write_seconds += time.perf_counter() - start

    def _remove_unlisted(self, manifest: dict[str, Any]) -> None:
        """Drop the previous point's inputs and the files of any point never completed."""
        hidden = [r["hidden"] for r in manifest["ranks"] if r["hidden"] is not None]
        keep = {MANIFEST} | {e["file"] for e in manifest["quantized"] + hidden}
        for path in self.dir.iterdir():
            if path.name not in keep:
                path.unlink(missing_ok=True)

    def finish(self) -> None:
        """After a successful run: the points are no longer needed (rank 0 deletes them)."""
        if self.ctx.is_main and self.dir.exists():
            shutil.rmtree(self.dir, ignore_errors=True)


def _parts(r: QuantResult) -> dict[str, Any]:
    """What save needs of a module, and what reinstalls its weights (not the dense copy)."""
    return {
        "qweight": r.qweight,
        "scale": r.scale,
        "zero_point": r.zero_point,
        "g_idx": r.g_idx,
        "loss": r.loss,
        "damp": r.damp,
    }


def _reinstall(model: Any, name: str, parts: dict[str, Any], args: QuantArgs) -> QuantResult:
    """Install a saved module's dequantized weights exactly as the broadcast stage did."""
    module = model.get_submodule(name)
    weight = module.weight
    groups = column_groups(weight.shape[1], args.group_size, parts["g_idx"])
    scale, zp = parts["scale"], parts["zero_point"]
    deq = dequantize(parts["qweight"], scale[:, groups], zp[:, groups]).to(weight.dtype)
    weight.data.copy_(deq.to(weight.device))
    return QuantResult(
        qweight=parts["qweight"],
        scale=scale,
        zero_point=zp,
        g_idx=parts["g_idx"],
        dequant=weight.data,
        loss=float(parts["loss"]),
        damp=float(parts["damp"]),
    )
