"""``evaluate``: perplexity of the model as it is at this point of the pipeline.

Placed before the layer loop it measures the baseline; after it, the quantized model
(recorded as ``perplexity.baseline`` / ``perplexity.quantized`` in the report). Reads the
``dataset`` group: the first ``eval_tokens`` tokens (0 skips) of ``eval_file``, in
windows of ``seq_len``. A resumed run reuses the baseline from the resume point.
Requires: ``model``, ``tokenizer``. Provides: ``perplexity``.
Collectives: the evaluation windows are sharded over ranks and the NLL sums and
token counts all-reduced (float64), so N ranks evaluate N times faster.

```yaml
stages:
  baseline: {stage: evaluate}    # before the layer loop
  # ... the layer loop ...
  quantized: {stage: evaluate}   # after it
```
"""

from __future__ import annotations

import logging
import math
from contextlib import nullcontext
from typing import Any, Literal

import torch

from gptqflow.framework.distributed import DistContext
from gptqflow.framework.preflight import text_file_problem
from gptqflow.framework.progress import WorkProgress
from gptqflow.framework.registry import register_stage
from gptqflow.framework.schema import Problem, Recipe
from gptqflow.framework.stage import Stage, StageConfig
from gptqflow.framework.state import PipelineState, Slot
from gptqflow.modeling.perplexity import eval_windows, layerwise_nll
from gptqflow.modeling.structure import decoder_layers
from gptqflow.modeling.text import read_text, tokenize_text

log = logging.getLogger("gptqflow")


def sharded_perplexity(
    state: PipelineState,
    windows: torch.Tensor,
    ctx: DistContext,
    progress: bool = False,
    desc: str = "perplexity",
) -> float:
    """exp(mean NLL) over ``windows``, each rank evaluating its contiguous share.

    The model runs one decoder layer at a time (:func:`layerwise_nll`): only that
    layer is on the device, and with streamed weights only that layer is in memory.
    Rank 0 shows progress (one step per layer and per window's head): a bar when
    ``progress`` (at a terminal), else a log line every ~10 s.
    """
    share = ctx.shard(windows.shape[0])
    mine = windows[share.start : share.stop]
    store = state.weights
    n_layers = len(decoder_layers(state.model)[1])
    with WorkProgress(
        n_layers + len(mine), desc, "step", bar=progress, log_lines=ctx.is_main
    ) as shown:
        nll, n = (
            layerwise_nll(
                state.model,
                mine,
                ctx.device,
                materialize=None if store is None else store.materialize,
                release=None if store is None else store.release,
                step=shown.update,
                outside=nullcontext if store is None else store.outside,
            )
            if len(mine)
            else (0.0, 0)
        )
    total_nll, total_n = ctx.sum_values([nll, n])
    return math.exp(total_nll / total_n)


def leading_tokens(tokenizer: object, text: str, n_tokens: int) -> torch.Tensor:
    """The first ``n_tokens`` tokens of ``text`` (all of them when ``n_tokens`` is 0).

    Tokenizes a growing prefix instead of the whole file: the tokenizer splits text
    into words before merging, so a cut only changes the last few tokens, and a
    margin of 64 tokens is dropped. 40960 tokens of WikiText cost ~0.3 s instead of
    several seconds for the whole test split.
    """
    if n_tokens <= 0:
        return tokenize_text(tokenizer, text)
    chars = n_tokens * 8
    while True:
        ids = tokenize_text(tokenizer, text[:chars])
        if chars >= len(text) or ids.shape[-1] >= n_tokens + 64:
            return ids[:, :n_tokens]
        chars *= 2


# The eval file's leading tokens, shared by the baseline and quantized evaluations.
EVAL_TOKENS: Slot[dict[tuple[str, int], torch.Tensor]] = Slot("eval_tokens")


class EvaluateStage(Stage):
    config: EvaluateConfig

    def run(self, state: PipelineState, ctx: DistContext) -> None:
        data = self.recipe.dataset
        label = "quantized" if state.is_quantized else "baseline"
        if data.eval_tokens == 0:
            state.perplexity[label] = None
            return
        cache = state.slots.get(EVAL_TOKENS, {})
        state.slots[EVAL_TOKENS] = cache
        key = (data.eval_file, data.eval_tokens)
        if key not in cache:
            cache[key] = leading_tokens(
                state.tokenizer, read_text(data.eval_file), data.eval_tokens
            )
        windows = eval_windows(cache[key], data.seq_len, data.eval_tokens)
        log.info("perplexity (%s): %d windows of %d tokens", label, windows.shape[0], data.seq_len)
        ppl = sharded_perplexity(
            state, windows, ctx, progress=state.progress, desc=f"perplexity ({label})"
        )
        state.perplexity[label] = ppl
        log.info("perplexity (%s): %.4f", label, ppl)

    def save_result(self, state: PipelineState) -> dict[str, Any] | None:
        """The baseline (taken before any weight changed) is worth keeping for a resumed run."""
        if state.is_quantized:
            return None
        return {"baseline": state.perplexity["baseline"]}

    def restore_result(self, state: PipelineState, saved: dict[str, Any]) -> None:
        state.perplexity.update(saved)


@register_stage("evaluate", EvaluateStage)
class EvaluateConfig(StageConfig):
    """Perplexity on the first ``dataset.eval_tokens`` tokens of ``dataset.eval_file``."""

    stage: Literal["evaluate"] = "evaluate"
    REQUIRES = ("model", "tokenizer")
    PROVIDES = ("perplexity",)

    def preflight(self, recipe: Recipe) -> list[Problem]:
        data = recipe.dataset
        if data.eval_tokens == 0:
            return []
        problem = text_file_problem("dataset.eval_file", data.eval_file)
        return [] if problem is None else [problem]
