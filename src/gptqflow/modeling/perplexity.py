"""Perplexity of a causal LM on a token stream, in non-overlapping windows.

The protocol (fixed so numbers are comparable across runs and implementations):
take the first ``max_tokens`` tokens, cut them into ``n // seq_len`` full windows of
``seq_len`` tokens (a final partial window is dropped, so every window has the same
context length and the result does not depend on a short tail), run each window on
its own with no BOS and no carried-over context, and average the negative
log-likelihood over every predicted token (``seq_len - 1`` per window). The reference
setting is 40960 tokens / 512 = 80 windows.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from gptqflow.errors import GptqflowError


def eval_windows(token_ids: torch.Tensor, seq_len: int, max_tokens: int | None) -> torch.Tensor:
    """The evaluation windows: LongTensor ``[n_windows, seq_len]`` (see module docstring).

    Separate from :func:`perplexity` so windows can be split across ranks and their
    NLL sums added up.
    """
    stream = token_ids.reshape(-1)
    if max_tokens:
        stream = stream[:max_tokens]
    n_windows = stream.numel() // seq_len if seq_len > 1 else 0
    if n_windows == 0:
        raise GptqflowError(
            f"perplexity needs at least one window of seq_len={seq_len} (> 1) tokens, but only "
            f"{stream.numel()} tokens are available (max_tokens={max_tokens}); use a longer "
            "text, a larger max_tokens or a smaller seq_len."
        )
    return stream[: n_windows * seq_len].reshape(n_windows, seq_len).to(torch.long)


def window_nll(model: Any, window: torch.Tensor, device: torch.device | str) -> tuple[float, int]:
    """Summed NLL (float64) and number of predicted tokens for one ``[seq_len]`` window.

    Per-token losses come from float32 logits; the sum is taken in float64 so adding
    many windows (or ranks) does not lose digits.
    """
    ids = window.reshape(1, -1).to(device)
    logits = model(input_ids=ids, use_cache=False).logits[0, :-1]
    nll = F.cross_entropy(logits.float(), ids[0, 1:], reduction="none")
    return float(nll.double().sum().item()), int(nll.numel())


def perplexity(
    model: Any,
    token_ids: torch.Tensor,
    seq_len: int,
    max_tokens: int | None,
    device: torch.device | str,
    progress: bool = False,
    step: Callable[[], None] | None = None,
) -> float:
    """``exp(mean NLL)`` of ``model`` on the first ``max_tokens`` tokens (0/None = all).

    ``token_ids`` is ``[1, n]`` or ``[n]``. The model must already be on ``device``
    (only inputs are moved: moving the model is the caller's memory decision). The
    model is put in eval mode for the measurement and its training flag restored.
    ``progress`` draws a bar; ``step`` is called after every window (a caller's own
    progress report).
    """
    windows = eval_windows(token_ids, seq_len, max_tokens)
    was_training = bool(getattr(model, "training", False))
    model.eval()
    total, count = 0.0, 0
    try:
        with torch.inference_mode():
            for window in _maybe_progress(windows, progress):
                nll, n = window_nll(model, window, device)
                total += nll
                count += n
                if step is not None:
                    step()
    finally:
        if was_training:
            model.train()
    return math.exp(total / count)


def _maybe_progress(windows: torch.Tensor, progress: bool) -> Any:
    """Iterate windows, with a tqdm bar when asked (tqdm is imported only then)."""
    if not progress:
        return iter(windows)
    from tqdm.auto import tqdm

    return tqdm(windows, desc="perplexity", unit="window", disable=False)
