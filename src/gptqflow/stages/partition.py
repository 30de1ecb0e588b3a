"""``partition``: calibration text -> this rank's slice of ``num_samples`` token windows.

Consumes: ``state.tokenizer``. Produces: ``state.samples`` ``[n_local, seq_len]`` and
``state.sample_range`` (global indices of this rank's samples).
Collectives: none. The window choice is a pure function of (token count,
num_samples, seq_len, seed) and the slice a pure function of (num_samples, rank,
world_size), so every rank agrees without talking, and concatenating the ranks'
slices in rank order gives exactly the one-rank sample list.

```yaml
- stage: partition
  calibration_file: ${dataset.calibration_file}
  num_samples: ${dataset.num_samples}
  seq_len: ${dataset.seq_len}
  seed: ${dataset.seed}
```
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from gptqflow.framework.distributed import DistContext
from gptqflow.framework.errors import GptqflowError
from gptqflow.framework.registry import Stage, StageConfig, register_stage
from gptqflow.framework.state import PipelineState
from gptqflow.modeling.text import calibration_windows, read_text, tokenize_text, windows_to_tensor


class PartitionStage(Stage):
    config: PartitionConfig

    def run(self, state: PipelineState, ctx: DistContext) -> None:
        cfg = self.config
        if cfg.num_samples < ctx.world_size:
            raise GptqflowError(
                f"dataset.num_samples={cfg.num_samples} is smaller than the world size "
                f"{ctx.world_size}: every rank needs at least one calibration sample"
            )
        ids = tokenize_text(state.tokenizer, read_text(cfg.calibration_file))
        try:
            starts = calibration_windows(ids.shape[-1], cfg.num_samples, cfg.seq_len, cfg.seed)
        except GptqflowError as exc:  # say which file and which keys
            raise GptqflowError(
                f"dataset.calibration_file={cfg.calibration_file!r}: {exc} "
                f"(dataset.num_samples={cfg.num_samples}, dataset.seq_len={cfg.seq_len})"
            ) from None
        mine = ctx.shard(cfg.num_samples)
        state.sample_range = mine
        state.samples = windows_to_tensor(ids, [starts[i] for i in mine], cfg.seq_len)


@register_stage("partition", PartitionStage)
class PartitionConfig(StageConfig):
    """Tokenize the calibration text and take this rank's slice of the samples."""

    stage: Literal["partition"] = "partition"
    calibration_file: str = Field(description="Plain UTF-8 text to calibrate on.")
    num_samples: int = Field(
        128,
        ge=1,
        description="Calibration sequences in total (all ranks).",
        json_schema_extra={"unit": "sequences"},
    )
    seq_len: int = Field(
        512,
        ge=8,
        description="Tokens per calibration sequence.",
        json_schema_extra={"unit": "tokens"},
    )
    seed: int = Field(
        0, description="Seed of the window selection.", json_schema_extra={"unit": None}
    )
