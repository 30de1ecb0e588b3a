"""Running decoder layers piece by piece: the first layer's inputs, per-sample Linears, groups.

The layer loop (:mod:`gptqflow.framework.layerloop`) uses these to run a model one
decoder layer at a time over a rank's calibration samples with results that do not
depend on how many samples the rank holds, and to find which target modules read the
same input (they share one Hessian) without hard-coding any architecture.
"""

from __future__ import annotations

import types
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from typing import Any, overload

import torch
import torch.nn.functional as F
from torch import nn

from gptqflow.errors import GptqflowError


class _StopForward(Exception):
    """Raised by a hook to end a forward pass once the wanted inputs are captured."""


def to_device(obj: Any, device: torch.device | str) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, tuple):
        return tuple(to_device(o, device) for o in obj)
    if isinstance(obj, list):
        return [to_device(o, device) for o in obj]
    if isinstance(obj, dict):
        return {k: to_device(v, device) for k, v in obj.items()}
    return obj


@dataclass
class Chunks:
    """A rank's hidden states as batches of equal-length samples, each with its own kwargs.

    The layer loop carries its activations this way when the samples have different
    lengths (rows of a dataset): ``parts[c]`` is ``[n_c, len_c, hidden]`` and
    ``kwargs[c]`` the decoder layer's keyword arguments for that length (position
    embeddings, mask). Chunks hold whole samples, so a sample's arithmetic is the same
    however the samples are chunked. ``to``/``cpu`` mirror the tensor methods the loop
    and its resume points call on a plain ``[n, seq, hidden]`` tensor.
    """

    parts: list[torch.Tensor]
    kwargs: list[dict[str, Any]]

    def to(self, device: torch.device | str) -> Chunks:
        return Chunks(
            [p.to(device) for p in self.parts], [to_device(k, device) for k in self.kwargs]
        )

    def cpu(self) -> Chunks:
        return self.to("cpu")

    @property
    def tokens(self) -> int:
        return sum(int(p.shape[0] * p.shape[1]) for p in self.parts)

    @property
    def num_samples(self) -> int:
        return sum(int(p.shape[0]) for p in self.parts)

    def split(self, max_tokens: int | None) -> Chunks:
        """The same samples in chunks of at most ``max_tokens`` tokens (at least one sample each)."""
        if max_tokens is None:
            return self
        parts: list[torch.Tensor] = []
        kwargs: list[dict[str, Any]] = []
        for part, kw in zip(self.parts, self.kwargs):
            step = max(1, max_tokens // int(part.shape[1]))
            for start in range(0, int(part.shape[0]), step):
                parts.append(part[start : start + step])
                kwargs.append(kw)
        return Chunks(parts, kwargs)


# Resume points store a rank's hidden states with torch.save and read them back with
# weights_only=True, which accepts only allow-listed classes.
torch.serialization.add_safe_globals([Chunks])


def _layer_kwargs(kw: Mapping[str, Any]) -> dict[str, Any]:
    skip = ("hidden_states", "past_key_values", "past_key_value", "use_cache")
    return {k: v for k, v in kw.items() if k not in skip}


@overload
def capture_layer_inputs(
    model: nn.Module, first_layer: nn.Module, samples: torch.Tensor
) -> tuple[torch.Tensor, dict[str, Any]]: ...


@overload
def capture_layer_inputs(
    model: nn.Module, first_layer: nn.Module, samples: torch.Tensor | Sequence[torch.Tensor]
) -> tuple[torch.Tensor | Chunks, dict[str, Any]]: ...


def capture_layer_inputs(
    model: nn.Module, first_layer: nn.Module, samples: torch.Tensor | Sequence[torch.Tensor]
) -> tuple[torch.Tensor | Chunks, dict[str, Any]]:
    """Hidden states entering the first decoder layer, one sample at a time, plus its kwargs.

    The model runs on the CPU up to the first layer (embeddings and rotary tables
    only) and a pre-hook stops it there. When ``samples`` is one ``[n, seq]`` tensor,
    every sample has the same length and no padding, so the layer's keyword arguments
    (position embeddings, causal mask) are the same for all samples and are kept once:
    ``([n, seq, hidden], kwargs)``. A list of 1-D samples of different lengths gives
    :class:`Chunks`, one per distinct length (ascending; samples in list order inside),
    each with its own kwargs, and an empty kwargs dict.
    """
    hidden: list[torch.Tensor] = []
    kwargs: list[dict[str, Any]] = []

    def grab(_mod: nn.Module, args: tuple[Any, ...], kw: dict[str, Any]) -> None:
        x = args[0] if args else kw["hidden_states"]
        hidden.append(x.detach())
        kwargs.append(_layer_kwargs(kw))
        raise _StopForward

    rows = (
        [samples[i : i + 1] for i in range(samples.shape[0])]
        if isinstance(samples, torch.Tensor)
        else [s.reshape(1, -1) for s in samples]
    )
    handle = first_layer.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        with torch.inference_mode():
            for ids in rows:
                with suppress(_StopForward):
                    model(input_ids=ids, use_cache=False)
    finally:
        handle.remove()
    if isinstance(samples, torch.Tensor):
        return torch.cat(hidden, dim=0), kwargs[0]
    by_length: dict[int, list[int]] = {}
    for i, x in enumerate(hidden):
        by_length.setdefault(int(x.shape[1]), []).append(i)
    lengths = sorted(by_length)
    parts = [torch.cat([hidden[i] for i in by_length[n]], dim=0) for n in lengths]
    return Chunks(parts, [kwargs[by_length[n][0]] for n in lengths]), {}


def run_until(
    layer: nn.Module, module: nn.Module, x: torch.Tensor, kwargs: Mapping[str, Any]
) -> torch.Tensor:
    """The input of ``module``'s first call in ``layer``'s forward over ``x``; stops there."""
    got: list[torch.Tensor] = []

    def grab(_mod: nn.Module, args: tuple[Any, ...]) -> None:
        got.append(args[0])
        raise _StopForward

    handle = module.register_forward_pre_hook(grab)
    try:
        with suppress(_StopForward):
            layer(x, **kwargs)
    finally:
        handle.remove()
    assert got, "the module is called in the layer's forward (trace_groups checked it)"
    return got[0]


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
