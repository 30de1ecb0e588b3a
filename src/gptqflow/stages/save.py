"""``save``: rank 0 writes a compressed-tensors checkpoint; the other ranks wait.

Requires: ``quantized`` (the integers, scales, zero points and g_idx of every module,
their weights installed in ``state.model``). Reads the ``scheme`` group (written into
the config; ``scheme.ignore`` listed as unquantized) and the top-level ``overwrite``.
Provides: ``checkpoint``: ``<output_dir>/<subdir>``, loadable by transformers and vLLM.
Collectives: one barrier, so no rank exits before the checkpoint is complete.
The checkpoint is written to a temporary directory and renamed at the end: an
interrupted run never leaves a directory that looks complete.

```yaml
stages:
  save:
    subdir: checkpoint
```
"""

from __future__ import annotations

import errno
from pathlib import Path
from typing import Literal

from pydantic import Field

from gptqflow.errors import GptqflowError
from gptqflow.framework.distributed import DistContext
from gptqflow.framework.registry import register_stage
from gptqflow.framework.schema import Problem, Recipe
from gptqflow.framework.stage import Stage, StageConfig
from gptqflow.framework.state import PipelineState
from gptqflow.modeling.checkpoint import write_compressed_checkpoint


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
    config: SaveConfig

    def run(self, state: PipelineState, ctx: DistContext) -> None:
        out = state.output_dir / self.config.subdir
        scheme = self.recipe.scheme
        if ctx.is_main:
            try:
                write_compressed_checkpoint(
                    state.model,
                    state.quantized,
                    scheme.quant_args(),
                    out,
                    tokenizer=state.tokenizer,
                    ignore=scheme.ignore,
                    overwrite=self.recipe.overwrite,
                )
            except OSError as exc:  # the writer has already removed its temporary directory
                raise GptqflowError(_write_failed(out, exc)) from exc
        ctx.barrier("save")
        state.checkpoint_dir = out


@register_stage("save", SaveStage)
class SaveConfig(StageConfig):
    """Write the quantized model as a compressed-tensors checkpoint (rank 0 only)."""

    stage: Literal["save"] = "save"
    REQUIRES = ("quantized",)
    PROVIDES = ("checkpoint",)
    subdir: str = Field("checkpoint", description="Checkpoint directory, relative to output_dir.")

    def preflight(self, recipe: Recipe) -> list[Problem]:
        target = Path(recipe.output_dir) / self.subdir
        if target.exists() and any(target.iterdir()) and not recipe.overwrite:
            return [
                Problem(
                    f"stages.{self.id}",
                    f"{target} already holds a checkpoint; pass overwrite=true to replace it "
                    "or choose another output_dir",
                )
            ]
        return []
