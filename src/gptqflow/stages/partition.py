"""``partition``: calibration text -> this rank's slice of ``num_samples`` token windows.

Reads the ``dataset`` group (``calibration_file``, ``num_samples``, ``seq_len``, ``seed``).
Requires: ``tokenizer``. Provides: ``samples`` (``[n_local, seq_len]`` token ids, and
``state.sample_range``, the global indices of this rank's samples).
Collectives: none. The window choice is a pure function of (token count,
num_samples, seq_len, seed) and the slice a pure function of (num_samples, rank,
world_size), so every rank agrees without talking, and concatenating the ranks'
slices in rank order gives exactly the one-rank sample list.

```yaml
stages:
  partition: {}
```
"""

from __future__ import annotations

from typing import Literal

from gptqflow.errors import GptqflowError
from gptqflow.framework.distributed import DistContext
from gptqflow.framework.preflight import text_file_problem
from gptqflow.framework.registry import register_stage
from gptqflow.framework.schema import Problem, Recipe
from gptqflow.framework.stage import Stage, StageConfig
from gptqflow.framework.state import PipelineState
from gptqflow.modeling.text import calibration_windows, read_text, tokenize_text, windows_to_tensor


class PartitionStage(Stage):
    config: PartitionConfig

    def run(self, state: PipelineState, ctx: DistContext) -> None:
        cfg = self.recipe.dataset
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
    """Tokenize the ``dataset`` group's calibration text and take this rank's slice of the samples."""

    stage: Literal["partition"] = "partition"
    REQUIRES = ("tokenizer",)
    PROVIDES = ("samples",)

    def preflight(self, recipe: Recipe) -> list[Problem]:
        data, ranks = recipe.dataset, recipe.runtime.nproc_per_node
        out = [
            p for p in [text_file_problem("dataset.calibration_file", data.calibration_file)] if p
        ]
        if data.num_samples < ranks:
            out.append(
                Problem(
                    "dataset.num_samples",
                    f"{data.num_samples} < runtime.nproc_per_node={ranks}: every rank needs at "
                    "least one calibration sample",
                )
            )
        return out
