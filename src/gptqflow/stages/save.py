"""``save``: rank 0 writes the compressed-tensors checkpoint as the layers finish.

A layer stage: it goes in the layer loop, after the stage that provides ``quantized``
(``broadcast``). Before the first layer rank 0 plans the files (every tensor's shard and
offset, from the model's shapes and the scheme) and creates them; after each decoder
layer it writes the layer's tensors (packed codes, scales, its norms) at their offsets
(:mod:`gptqflow.modeling.streaming`). The codes of written layers then leave every
rank's memory, and with streamed weights a layer is read back from the checkpoint when
needed (the quantized evaluation). After the last layer rank 0 writes the tensors
outside the layers, the config and the tokenizer, and renames the directory into place:
an interrupted run never leaves a directory that looks complete. Reads the ``scheme``
group (written into the config; ``scheme.ignore`` listed as unquantized) and the
top-level ``overwrite``.
Requires: ``quantized``. Provides: ``checkpoint``: ``<output_dir>/<subdir>``, loadable
by transformers and vLLM (shards named as transformers names them, with an index).
Collectives: one gather after the last layer (rank 0's success or error), so no rank
reads or exits before the checkpoint is complete.

```yaml
stages:
  save:
    subdir: checkpoint
    max_shard_size: 2GB
```
"""

from __future__ import annotations

import errno
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import Field, field_validator

from gptqflow.errors import GptqflowError
from gptqflow.fileio import parse_size
from gptqflow.framework.distributed import DistContext
from gptqflow.framework.registry import register_stage
from gptqflow.framework.schema import Problem, Recipe
from gptqflow.framework.stage import Stage, StageConfig
from gptqflow.framework.state import LayerRun, PipelineState
from gptqflow.modeling.streaming import StreamingCheckpoint
from gptqflow.modeling.structure import decoder_layers
from gptqflow.modeling.targets import REASON_ROUTER, layer_targets


def _write_failed(out: Path, exc: OSError) -> str:
    """A failed write in words: where, why (the OS's reason), and that nothing was left."""
    reason = exc.strerror or str(exc)
    hint = {
        errno.ENOSPC: "free some space or choose an output_dir on another disk",
        errno.EDQUOT: "free some space or choose an output_dir on another disk",
        errno.EACCES: "choose a writable output_dir",
        errno.EROFS: "choose a writable output_dir",
    }.get(exc.errno or 0, "check the output_dir")
    return (
        f"cannot write the checkpoint to {out}: {reason}; {hint}. Nothing was written "
        "there (a checkpoint already in place is left as it was)"
    )


class SaveStage(Stage):
    """Writes each decoder layer as it finishes, the rest of the model after the last."""

    config: SaveConfig
    writer: StreamingCheckpoint | None = None

    def before_loop(self, state: PipelineState, ctx: DistContext) -> None:
        out = state.output_dir / self.config.subdir
        scheme = self.recipe.scheme
        try:
            self.writer = StreamingCheckpoint(
                out,
                scheme.quant_args(),
                ignore=scheme.ignore,
                max_shard_bytes=parse_size(self.config.max_shard_size),
                overwrite=self.recipe.overwrite or self.recipe.runtime.resume,
                writer=ctx.is_main,
            )
            prefix, layers = decoder_layers(state.model)
            found = [
                layer_targets(layer, f"{prefix}.{i}", scheme.targets, scheme.ignore)
                for i, layer in enumerate(layers)
            ]
            # Routers are Linears in some models: the config's ignore list must name them.
            routers = [
                e.name for f in found for e in f.excluded if e.reason == REASON_ROUTER and e.linear
            ]
            self.writer.plan(state.model, [f.targets for f in found], extra_ignore=routers)
        except OSError as exc:
            raise GptqflowError(_write_failed(out, exc)) from exc
        self._written: list[str] = []

    def after_layer(self, layer: LayerRun, ctx: DistContext) -> None:
        """Queue the layer's tensors; the codes of layers written before are dropped."""
        writer = self.writer
        assert writer is not None, "before_loop opened the writer"
        state = layer.state
        self._drop_written(state)
        names = [n for n in layer.targets if n in state.quantized]
        # written as codes, not as floats (a target with no packed format keeps its values)
        packed = {layer.targets[n].source for n in names if layer.targets[n].packable}
        dense = {
            full: v
            for k, v in layer.module.state_dict().items()
            if (full := f"{layer.name}.{k}") not in packed
        }
        try:
            writer.add_layer(
                layer.name,
                dense,
                {n: state.quantized[n] for n in names},
                {n: layer.targets[n].weight for n in names},
            )
        except OSError as exc:
            writer.abort()
            raise GptqflowError(_write_failed(writer.out_dir, exc)) from exc
        self._written += names
        if state.weights is not None:
            dtype = state.weights.dtype or torch.float32
            prefix = layer.name
            state.weights.relocate(layer.index, lambda _i, n: writer.read_layer(prefix, n, dtype))

    def save_layer(self, layer: LayerRun) -> dict[str, Any] | None:
        """Nothing of its own: on resume the restored codes are written again, byte for byte."""
        return {}

    def restore_layer(self, layer: LayerRun, saved: dict[str, Any], ctx: DistContext) -> None:
        self.after_layer(layer, ctx)

    def after_loop(self, state: PipelineState, ctx: DistContext) -> None:
        writer = self.writer
        assert writer is not None, "before_loop opened the writer"
        self._drop_written(state)
        error: BaseException | None = None
        try:
            store = state.weights
            writer.finish(
                state.model,
                tokenizer=state.tokenizer,
                fetch=None if store is None else store.read_outside,
            )
        except OSError as exc:  # the writer has already removed its temporary directory
            error = GptqflowError(_write_failed(writer.out_dir, exc))
        except BaseException as exc:
            error = exc
        # Every rank waits for rank 0's verdict: the others read the checkpoint next.
        failed = ctx.gather_objects(None if error is None else str(error))
        if error is not None:
            raise error
        if any(f is not None for f in failed):
            raise GptqflowError(f"rank 0 could not write the checkpoint: {failed[0]}")
        writer.finished = True
        state.checkpoint_dir = writer.out_dir

    def _drop_written(self, state: PipelineState) -> None:
        """Codes already in the checkpoint leave memory (after their resume point was written)."""
        for name in self._written:
            state.quantized.pop(name, None)
        state.written_quantized += len(self._written)
        self._written = []


@register_stage("save", SaveStage)
class SaveConfig(StageConfig):
    """Write the quantized model as a compressed-tensors checkpoint (rank 0 only)."""

    stage: Literal["save"] = "save"
    REQUIRES = ("quantized",)
    PROVIDES = ("checkpoint",)
    subdir: str = Field("checkpoint", description="Checkpoint directory, relative to output_dir.")
    max_shard_size: str = Field(
        "2GB",
        description="Largest safetensors shard (500MB, 2GB, 1GiB ...): a shard is a run of "
        "whole decoder layers; a model that fits in one is written as one model.safetensors.",
    )

    @field_validator("max_shard_size")
    @classmethod
    def _size(cls, value: str) -> str:
        parse_size(value)  # raises ValueError with the allowed spellings
        return value

    def preflight(self, recipe: Recipe) -> list[Problem]:
        target = Path(recipe.output_dir) / self.subdir
        # A resumed run may have published its checkpoint before it died (in the
        # evaluation after the loop): it writes the same one again.
        replace = recipe.overwrite or recipe.runtime.resume
        if target.exists() and any(target.iterdir()) and not replace:
            return [
                Problem(
                    f"stages.{self.id}",
                    f"{target} already holds a checkpoint; pass overwrite=true to replace it "
                    "or choose another output_dir",
                )
            ]
        return []
