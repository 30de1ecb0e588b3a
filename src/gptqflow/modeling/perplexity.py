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
from contextlib import AbstractContextManager, nullcontext
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


#: Reads decoder layer ``i`` into memory (streamed weights) and returns it.
LayerGetter = Callable[[int], torch.nn.Module]


def layerwise_nll(
    model: Any,
    windows: torch.Tensor,
    device: torch.device | str,
    materialize: LayerGetter | None = None,
    release: Callable[[int], Any] | None = None,
    step: Callable[[], None] | None = None,
    outside: Callable[[], AbstractContextManager[Any]] = nullcontext,
) -> tuple[float, int]:
    """Summed NLL (float64) and predicted tokens of ``windows``, one decoder layer at a time.

    The same numbers as :func:`window_nll` on each window (each window still runs on
    its own, with the same operations), but only one decoder layer is on ``device``
    at a time, and with streamed weights (``materialize``/``release``) only one is in
    memory: the hidden states of every window wait between layers instead. The final
    norm and head run through the model's own forward with the decoder layers
    replaced by the finished hidden states, so no architecture detail is copied here.
    ``step`` is called after each layer and after the head of each window;
    ``outside`` holds the tensors outside the layers in memory while they are used.
    """
    from gptqflow.modeling.forward import capture_layer_inputs, to_device
    from gptqflow.modeling.structure import decoder_layers

    _prefix, layers = decoder_layers(model)
    was_training = bool(getattr(model, "training", False))
    model.eval()
    hidden: list[torch.Tensor] = []
    kwargs: dict[str, Any] = {}
    tuple_out = False
    try:
        with torch.inference_mode():
            with outside():
                for w in windows:
                    x, kwargs = capture_layer_inputs(model, layers[0], w.reshape(1, -1))
                    hidden.append(x)
            on_device = to_device(kwargs, torch.device(device))
            for i in range(len(layers)):
                layer = materialize(i) if materialize is not None else layers[i]
                layer.to(device)
                try:
                    for j, x in enumerate(hidden):
                        out = layer(x.to(device), **on_device)
                        tuple_out = isinstance(out, tuple)
                        hidden[j] = (out[0] if tuple_out else out).to("cpu")
                finally:
                    layer.to("cpu")
                    if release is not None:
                        release(i)
                if step is not None:
                    step()
            with outside():
                return _head_nll(model, layers, windows, hidden, device, tuple_out, step)
    finally:
        if was_training:
            model.train()


def _head_nll(
    model: Any,
    layers: torch.nn.ModuleList,
    windows: torch.Tensor,
    hidden: list[torch.Tensor],
    device: torch.device | str,
    tuple_out: bool,
    step: Callable[[], None] | None,
) -> tuple[float, int]:
    """The model's forward with its decoder layers answering from ``hidden``: NLL sums."""
    current: list[torch.Tensor] = []

    def first(*_args: Any, **_kw: Any) -> Any:
        h = current[0]
        return (h,) if tuple_out else h

    def passthrough(*args: Any, **kw: Any) -> Any:
        h = args[0] if args else kw["hidden_states"]
        return (h,) if tuple_out else h

    for i, layer in enumerate(layers):
        layer.forward = first if i == 0 else passthrough
    moved = _outside_layers_to(model, device)
    total, count = 0.0, 0
    try:
        for w, h in zip(windows, hidden):
            current[:] = [h.to(device)]
            nll, n = window_nll(model, w, device)
            total += nll
            count += n
            if step is not None:
                step()
    finally:
        for layer in layers:
            del layer.forward
        if moved:
            _outside_layers_to(model, "cpu")
    return total, count


def _outside_layers_to(model: Any, device: torch.device | str) -> bool:
    """Move the materialised tensors (those outside streamed layers) to ``device``."""
    if torch.device(device).type == "cpu":
        return False
    for module in model.modules():
        for registry in (module._parameters, module._buffers):
            for key, t in registry.items():
                if t is not None and not t.is_meta:
                    moved = t.to(device)
                    registry[key] = (
                        torch.nn.Parameter(moved, requires_grad=False)
                        if isinstance(t, torch.nn.Parameter)
                        else moved
                    )
    return True
