"""``save``: rank 0 writes a compressed-tensors checkpoint; the other ranks wait.

Consumes: ``state.model`` (quantized weights installed), ``state.quantized`` (the
integers, scales, zero points and g_idx of every module), ``state.quant_args``.
Produces: ``<output_dir>/<subdir>`` loadable by transformers and vLLM.
Collectives: one barrier, so no rank exits before the checkpoint is complete.
The checkpoint is written to a temporary directory and renamed at the end: an
interrupted run never leaves a directory that looks complete.

```yaml
- stage: save
  subdir: checkpoint
  overwrite: ${overwrite}
```
"""

from __future__ import annotations

import errno
from pathlib import Path
from typing import Literal

from pydantic import Field

from gptqflow.framework.distributed import DistContext
from gptqflow.framework.errors import GptqflowError
from gptqflow.framework.registry import Stage, StageConfig, register_stage
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
        if ctx.is_main:
            assert state.quant_args is not None
            try:
                write_compressed_checkpoint(
                    state.model,
                    state.quantized,
                    state.quant_args,
                    out,
                    tokenizer=state.tokenizer,
                    ignore=self.config.ignore,
                    overwrite=self.config.overwrite,
                )
            except OSError as exc:  # the writer has already removed its temporary directory
                raise GptqflowError(_write_failed(out, exc)) from exc
        ctx.barrier("save")
        state.checkpoint_dir = out


@register_stage("save", SaveStage)
class SaveConfig(StageConfig):
    """Write the quantized model as a compressed-tensors checkpoint (rank 0 only)."""

    stage: Literal["save"] = "save"
    subdir: str = Field("checkpoint", description="Checkpoint directory, relative to output_dir.")
    overwrite: bool = Field(False, description="Replace an existing checkpoint there.")
    ignore: list[str] = Field(
        default_factory=lambda: ["lm_head"],
        description="Modules listed as unquantized in the config.",
    )
