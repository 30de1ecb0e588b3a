"""``partition``: calibration data -> this rank's slice of ``num_samples`` token samples.

Reads the ``dataset`` group. Two routes:

* **text** (``dataset.calibration_file``): the file is tokenized as one stream and cut
  into ``seq_len`` windows; ``samples`` is ``[n_local, seq_len]``.
* **datasets** (``dataset.path``, or the ``calibration=`` argument of
  :func:`gptqflow.run`): a file, ``save_to_disk`` directory or cached dataset read
  offline (:mod:`gptqflow.modeling.calibdata`); ``messages`` rows rendered with the
  tokenizer's chat template. Without ``dataset.packing`` one row is one sample of its
  own length: ``samples`` is a list of 1-D token tensors, split over the ranks by token
  count; with packing, ``[n_local, seq_len]`` windows as in the text route.

Requires: ``tokenizer``. Provides: ``samples`` (and ``state.calibration_info``, the
``calibration`` entry of report.json: source, fingerprint, samples and tokens per rank).
Collectives: none. The choice and the split are pure functions of the data, the
settings and the world size, so every rank agrees without talking, and the union of the
ranks' slices is exactly the one-rank sample set.

```yaml
stages:
  partition: {}
```
"""

from __future__ import annotations

import logging
from typing import Literal

from gptqflow.errors import GptqflowError
from gptqflow.framework.distributed import DistContext, shard_range
from gptqflow.framework.preflight import text_file_problem
from gptqflow.framework.registry import register_stage
from gptqflow.framework.schema import DatasetGroup, Problem, Recipe
from gptqflow.framework.stage import Stage, StageConfig
from gptqflow.framework.state import PipelineState
from gptqflow.modeling.calibdata import (
    PYTHON_SOURCE,
    RowSettings,
    calibration_set,
    from_python,
    open_source,
    source_problem,
    text_info,
)
from gptqflow.modeling.text import calibration_windows, read_text, tokenize_text, windows_to_tensor

log = logging.getLogger("gptqflow")


class PartitionStage(Stage):
    config: PartitionConfig

    def run(self, state: PipelineState, ctx: DistContext) -> None:
        cfg = self.recipe.dataset
        if cfg.num_samples < ctx.world_size:
            raise GptqflowError(
                f"dataset.num_samples={cfg.num_samples} is smaller than the world size "
                f"{ctx.world_size}: every rank needs at least one calibration sample"
            )
        if state.calibration is not None or cfg.path is not None:
            self._from_datasets(state, ctx, cfg)
        else:
            self._from_text(state, ctx, cfg)
        info = state.calibration_info
        mine = info["ranks"][ctx.rank]
        if ctx.is_main:
            per_rank = ", ".join(f"{r['samples']}/{r['tokens']}" for r in info["ranks"])
            log.info(
                "calibration: %d samples, %d tokens (samples/tokens per rank: %s); fingerprint %s",
                info["samples"],
                info["tokens"],
                per_rank,
                info["fingerprint"][:12],
            )
        assert state.samples is not None and mine["samples"] == len(state.samples), (
            "the split and this rank's tensors agree"
        )

    def _from_text(self, state: PipelineState, ctx: DistContext, cfg: DatasetGroup) -> None:
        assert cfg.calibration_file is not None, "preflight: a calibration source is set"
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
        shards = [
            list(shard_range(cfg.num_samples, r, ctx.world_size)) for r in range(ctx.world_size)
        ]
        every = windows_to_tensor(ids, starts, cfg.seq_len)
        state.calibration_info = text_info(cfg.calibration_file, every, shards)

    def _from_datasets(self, state: PipelineState, ctx: DistContext, cfg: DatasetGroup) -> None:
        if state.calibration is not None:
            dataset, source = from_python(state.calibration)
        elif cfg.path == PYTHON_SOURCE:
            raise GptqflowError(
                f"dataset.path={PYTHON_SOURCE!r}: this recipe was written by a run that got its "
                "data from gptqflow.run(calibration=...); pass that data again, or set "
                "dataset.path to a file, directory or cached dataset"
            )
        else:
            assert cfg.path is not None
            dataset, source = open_source(cfg.path, cfg.split)
        settings = RowSettings(
            split=cfg.split,
            text_column=cfg.text_column,
            messages_column=cfg.messages_column,
            num_samples=cfg.num_samples,
            seq_len=cfg.seq_len,
            seed=cfg.seed,
            packing=cfg.packing,
        )
        shards = [shard_range(cfg.num_samples, r, ctx.world_size) for r in range(ctx.world_size)]
        got = calibration_set(
            dataset,
            state.tokenizer,
            settings,
            ctx.rank,
            shards,
            source=source,
            model_dir=str(state.model_dir or self.recipe.model.path),
        )
        state.samples = got.samples
        state.calibration_info = got.info
        if cfg.packing:
            state.sample_range = ctx.shard(cfg.num_samples)


@register_stage("partition", PartitionStage)
class PartitionConfig(StageConfig):
    """Read the ``dataset`` group's calibration data and take this rank's slice of the samples."""

    stage: Literal["partition"] = "partition"
    REQUIRES = ("tokenizer",)
    PROVIDES = ("samples",)

    def preflight(self, recipe: Recipe) -> list[Problem]:
        data, ranks = recipe.dataset, recipe.runtime.nproc_per_node
        out: list[Problem] = []
        if data.path is not None:
            if (problem := source_problem(data.path)) is not None:
                out.append(Problem("dataset.path", problem))
        elif data.calibration_file is not None:
            if (
                p := text_file_problem("dataset.calibration_file", data.calibration_file)
            ) is not None:
                out.append(p)
        else:
            out.append(
                Problem(
                    "dataset",
                    "no calibration data: set dataset.calibration_file (plain text) or "
                    "dataset.path (`dataset=local`: a file, save_to_disk directory or cached "
                    "dataset), or pass calibration= to gptqflow.run",
                )
            )
        if data.num_samples < ranks:
            out.append(
                Problem(
                    "dataset.num_samples",
                    f"{data.num_samples} < runtime.nproc_per_node={ranks}: every rank needs at "
                    "least one calibration sample",
                )
            )
        return out
