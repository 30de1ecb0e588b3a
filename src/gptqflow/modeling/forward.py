"""Running decoder layers piece by piece: the first layer's inputs, per-sample Linears, groups.

The layer loop (:mod:`gptqflow.framework.layerloop`) uses these to run a model one
decoder layer at a time over a rank's calibration samples with results that do not
depend on how many samples the rank holds, and to find which target modules read the
same input (they share one Hessian) without hard-coding any architecture.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from typing import Any, overload

import torch
import torch.nn.functional as F
from torch import nn

from gptqflow.errors import GptqflowError
from gptqflow.modeling.targets import (
    FusedExperts,
    Target,
    conv1d_type,
    fused_experts,
    is_fused_experts,
    plain_linear,
    unsupported_experts,
)


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
    layer: nn.Module, modules: Sequence[nn.Module], x: torch.Tensor, kwargs: Mapping[str, Any]
) -> list[torch.Tensor]:
    """The input of each of ``modules``' first call in ``layer``'s forward over ``x``.

    The forward stops as soon as every module has been called once, so the modules
    of a wave (one MoE block's experts) are reached in one partial forward.
    """
    got: dict[nn.Module, torch.Tensor] = {}

    def grab(mod: nn.Module, args: tuple[Any, ...]) -> None:
        got.setdefault(mod, args[0])
        if len(got) == len(wanted):
            raise _StopForward

    wanted = set(modules)
    handles = [m.register_forward_pre_hook(grab) for m in wanted]
    try:
        with suppress(_StopForward):
            layer(x, **kwargs)
    finally:
        for h in handles:
            h.remove()
    assert len(got) == len(wanted), "the modules are called in the layer's forward (traced)"
    return [got[m] for m in modules]


def _split_samples(x: torch.Tensor, shape: Mapping[str, int]) -> list[torch.Tensor] | None:
    """``x`` cut into one piece per calibration sample, or None when it is one already.

    A ``[n, seq, ...]`` tensor is cut along its first dimension; a 2-D ``[n * seq, ...]``
    tensor (tokens flattened by an MoE block) into runs of ``seq`` rows, ``seq`` being
    the length the decoder layer was called with.
    """
    if x.dim() >= 3:
        return None if x.shape[0] == 1 else list(x.split(1))
    n, seq = shape.get("n", 1), shape.get("seq", 0)
    if x.dim() == 2 and n > 1 and seq > 0 and x.shape[0] == n * seq:
        return list(x.split(seq))
    return None


def _cat_outputs(outs: list[Any]) -> Any:
    """Per-sample outputs joined along the first dimension (tensors, or tuples of them)."""
    if isinstance(outs[0], torch.Tensor):
        return torch.cat(outs)
    return type(outs[0])(torch.cat(parts) for parts in zip(*outs))


def _per_sample_linear(
    module: nn.Linear, shape: Mapping[str, int], x: torch.Tensor
) -> torch.Tensor:
    """``F.linear`` one sample at a time: results independent of how many samples a rank holds."""
    parts = _split_samples(x, shape)
    if parts is None:
        return F.linear(x, module.weight, module.bias)
    return torch.cat([F.linear(p, module.weight, module.bias) for p in parts])


def _per_sample_call(
    forward: Callable[..., Any], shape: Mapping[str, int], x: torch.Tensor, *args: Any
) -> Any:
    """A module's own forward one sample at a time (Conv1D, routers)."""
    parts = _split_samples(x, shape)
    if parts is None:
        return forward(x, *args)
    return _cat_outputs([forward(p, *args) for p in parts])


def _experts_forward(
    seam: FusedExperts,
    shape: Mapping[str, int],
    hidden_states: torch.Tensor,
    top_k_index: torch.Tensor,
    top_k_weights: torch.Tensor,
) -> torch.Tensor:
    """transformers' fused experts forward, through one :class:`ExpertProjection` per expert.

    The same arithmetic as the standard experts forward (``act(gate) * up``, ``down``,
    times the routing weight, added per token), with three differences that make it the
    seam the layer loop needs: every expert is called, also one that no token chose (so
    each expert's group forms, with zero tokens); each expert's rows are the tokens routed
    to it in token order; and every matmul and activation runs per calibration sample, so
    a rank's results do not depend on the other samples it holds.
    """
    act: Callable[[torch.Tensor], torch.Tensor] = seam.module.act_fn  # type: ignore[assignment]
    final = torch.zeros_like(hidden_states)
    seq = shape.get("seq", 0)
    tokens = hidden_states.shape[0]
    per_sample = seq > 0 and tokens % seq == 0 and tokens > seq
    n = tokens // seq if per_sample else 1
    for e in range(seam.num_experts):
        token_idx, top_k_pos = torch.where(top_k_index == e)  # tokens ascending
        x = hidden_states[token_idx]
        sizes = torch.bincount(token_idx // seq, minlength=n).tolist() if per_sample else None
        gate, up = seam.gate_up[e](x, sizes).chunk(2, dim=-1)
        if sizes is None:
            h = act(gate) * up
        else:
            h = torch.cat([act(g) * u for g, u in zip(gate.split(sizes), up.split(sizes))])
        out = seam.down[e](h, sizes)
        out = out * top_k_weights[token_idx, top_k_pos, None]
        final.index_add_(0, token_idx, out.to(final.dtype))
    return final


@contextmanager
def per_sample_linears(layer: nn.Module) -> Iterator[None]:
    """While open, ``layer`` computes every matmul one calibration sample at a time.

    Plain Linears, Conv1Ds and routers compute sample by sample (an MoE block's
    flattened ``[n * seq, h]`` tokens are cut back into samples using the length the
    layer was called with); fused experts run through their per-expert seams
    (:func:`_experts_forward`), which the layer loop hooks like Linears.
    """
    shape: dict[str, int] = {}

    def note(_mod: nn.Module, args: tuple[Any, ...], kw: dict[str, Any]) -> None:
        x = args[0] if args else kw["hidden_states"]
        shape["n"], shape["seq"] = int(x.shape[0]), int(x.shape[1]) if x.dim() >= 3 else 0

    conv1d = conv1d_type()
    patched: list[nn.Module] = []
    for m in layer.modules():
        if plain_linear(m):
            m.forward = functools.partial(_per_sample_linear, m, shape)  # type: ignore[method-assign,arg-type]
        elif (conv1d is not None and isinstance(m, conv1d)) or "Router" in type(m).__name__:
            m.forward = functools.partial(_per_sample_call, m.forward, shape)  # type: ignore[method-assign]
        elif is_fused_experts(m) and unsupported_experts(m) is None:
            m.forward = functools.partial(_experts_forward, fused_experts(m), shape)  # type: ignore[method-assign]
        else:
            continue
        patched.append(m)
    handle = layer.register_forward_pre_hook(note, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()
        for m in patched:
            del m.forward


def trace_groups(
    layer: nn.Module, x: torch.Tensor, kwargs: Mapping[str, Any], targets: Mapping[str, Target]
) -> list[list[str]]:
    """Group the targets by the tensor they read, in the order the forward calls them.

    Targets called on the same input tensor object (q/k/v on the normed hidden
    states, gate/up on the normed residual, the gate and up halves of one expert's
    fused projection) share one Hessian. Found by running the layer once on one
    sample with pre-hooks on the targets' modules (under :func:`per_sample_linears`,
    so fused experts call their per-expert seams), so no architecture is hard-coded.
    """
    by_module: dict[nn.Module, list[str]] = {}
    for name, t in targets.items():
        by_module.setdefault(t.module, []).append(name)
    seen: dict[int, list[str]] = {}
    order: list[int] = []
    keep: list[torch.Tensor] = []  # keep inputs alive so their ids cannot be reused

    def note(mod: nn.Module, args: tuple[Any, ...]) -> None:
        key = id(args[0])
        keep.append(args[0])
        if key not in seen:
            seen[key] = []
            order.append(key)
        seen[key].extend(n for n in by_module[mod] if n not in seen[key])

    handles = [m.register_forward_pre_hook(note) for m in by_module]
    try:
        with per_sample_linears(layer), torch.inference_mode():
            layer(x, **kwargs)
    finally:
        for h in handles:
            h.remove()
    groups = [seen[k] for k in order]
    missing = set(targets) - {n for g in groups for n in g}
    if missing:
        raise GptqflowError(
            f"targeted modules never called in the layer forward: {sorted(missing)}"
        )
    return groups
