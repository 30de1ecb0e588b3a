"""Running decoder layers piece by piece: the first layer's inputs, per-sample Linears, groups.

The layer loop (:mod:`gptqflow.framework.layerloop`) uses these to run a model one
decoder layer at a time over a rank's calibration samples with results that do not
depend on how many samples the rank holds, and to find which target modules read the
same input (they share one Hessian) without hard-coding any architecture.
"""

from __future__ import annotations

import types
from collections.abc import Iterator, Mapping
from contextlib import contextmanager, suppress
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from gptqflow.errors import GptqflowError


class _StopForward(Exception):
    """Raised by a hook to end a forward pass once the wanted inputs are captured."""


def to_device(obj: Any, device: torch.device) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, tuple):
        return tuple(to_device(o, device) for o in obj)
    if isinstance(obj, list):
        return [to_device(o, device) for o in obj]
    if isinstance(obj, dict):
        return {k: to_device(v, device) for k, v in obj.items()}
    return obj


def capture_layer_inputs(
    model: nn.Module, first_layer: nn.Module, samples: torch.Tensor
) -> tuple[torch.Tensor, dict[str, Any]]:
    """Hidden states entering the first decoder layer, one sample at a time, plus its kwargs.

    The model runs on the CPU up to the first layer (embeddings and rotary tables
    only) and a pre-hook stops it there. Every sample has the same length and no
    padding, so the layer's keyword arguments (position embeddings, causal mask) are
    the same for all samples and are kept once.
    """
    hidden: list[torch.Tensor] = []
    kwargs: dict[str, Any] = {}

    def grab(_mod: nn.Module, args: tuple[Any, ...], kw: dict[str, Any]) -> None:
        x = args[0] if args else kw["hidden_states"]
        hidden.append(x.detach())
        if not kwargs:
            kwargs.update(
                {
                    k: v
                    for k, v in kw.items()
                    if k not in ("hidden_states", "past_key_values", "past_key_value", "use_cache")
                }
            )
        raise _StopForward

    handle = first_layer.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        with torch.inference_mode():
            for i in range(samples.shape[0]):
                with suppress(_StopForward):
                    model(input_ids=samples[i : i + 1], use_cache=False)
    finally:
        handle.remove()
    return torch.cat(hidden, dim=0), kwargs


def _per_sample_forward(self: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """``F.linear`` one sample at a time: results independent of how many samples a rank holds."""
    if x.dim() < 3 or x.shape[0] == 1:
        return F.linear(x, self.weight, self.bias)
    return torch.cat([F.linear(x[i : i + 1], self.weight, self.bias) for i in range(x.shape[0])])


@contextmanager
def per_sample_linears(layer: nn.Module) -> Iterator[None]:
    """Make every Linear of ``layer`` compute sample by sample while the context is open."""
    linears = [m for m in layer.modules() if isinstance(m, nn.Linear)]
    for m in linears:
        m.forward = types.MethodType(_per_sample_forward, m)  # type: ignore[method-assign]
    try:
        yield
    finally:
        for m in linears:
            del m.forward


def trace_groups(
    layer: nn.Module, x: torch.Tensor, kwargs: Mapping[str, Any], linears: Mapping[str, nn.Module]
) -> list[list[str]]:
    """Group the targeted Linears by the tensor they read, in the order the forward calls them.

    Modules called on the same input tensor object (q/k/v on the normed hidden
    states, gate/up on the normed residual) share one Hessian. Found by running the
    layer once on one sample with pre-hooks, so no architecture is hard-coded.
    """
    by_module: dict[nn.Module, str] = {m: n for n, m in linears.items()}
    seen: dict[int, list[str]] = {}
    order: list[int] = []
    keep: list[torch.Tensor] = []  # keep inputs alive so their ids cannot be reused

    def note(mod: nn.Module, args: tuple[Any, ...]) -> None:
        key = id(args[0])
        keep.append(args[0])
        if key not in seen:
            seen[key] = []
            order.append(key)
        seen[key].append(by_module[mod])

    handles = [m.register_forward_pre_hook(note) for m in linears.values()]
    try:
        with torch.inference_mode():
            layer(x, **kwargs)
    finally:
        for h in handles:
            h.remove()
    groups = [seen[k] for k in order]
    missing = set(linears) - {n for g in groups for n in g}
    if missing:
        raise GptqflowError(
            f"targeted modules never called in the layer forward: {sorted(missing)}"
        )
    return groups
