"""``calibrate``: layer by layer, accumulate the Hessian of every group of targeted Linears.

Consumes: ``state.model``, ``state.layers``, ``state.samples`` (this rank's slice).
Produces: one :class:`~gptqflow.framework.state.GroupStep` per group of Linears that
read the same input (q/k/v; gate/up; o; down), handed to the rest of the per-layer
loop (hessian-reduce -> solve -> broadcast) the moment its Hessian is complete.
Collectives: none itself.

Sequential, in two senses:
* across layers: the inputs of layer i+1 are the outputs of the already-quantized
  layer i;
* inside a layer: each group is quantized before the rest of the layer runs, so
  o_proj sees the outputs of the quantized q/k/v, down_proj the outputs of the
  quantized gate/up. One forward pass per layer does both the Hessian capture and
  the propagation (the usual two-pass scheme costs a second forward per layer).

The forward runs over this rank's whole slice at once, but every Linear computes
sample by sample and Hessians are summed per sample (``2·xᵀx`` in float32 per
sample, added into a float64 sum, divided by the token count only at the end).
Each sample's arithmetic is therefore the same whatever the batch and rank count,
and the float64 sum of float32 terms is exact in practice, so one rank and N ranks
produce the same Hessians.

```yaml
- stage: calibrate
  targets: ["re:.*"]      # Linear modules inside decoder layers, by name pattern
  ignore: [lm_head]
```
"""

from __future__ import annotations

import types
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager, suppress
from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from gptqflow.framework.distributed import DistContext
from gptqflow.framework.errors import GptqflowError
from gptqflow.framework.registry import Stage, StageConfig, register_stage
from gptqflow.framework.state import GroupStep, PipelineState
from gptqflow.gptq.hessian import HessianSum
from gptqflow.gptq.numerics import count_nonfinite
from gptqflow.modeling.structure import decoder_layers, target_linears


class _StopForward(Exception):
    """Raised by a hook to end a forward pass once the wanted inputs are captured."""


def _to(obj: Any, device: torch.device) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, tuple):
        return tuple(_to(o, device) for o in obj)
    if isinstance(obj, list):
        return [_to(o, device) for o in obj]
    if isinstance(obj, dict):
        return {k: _to(v, device) for k, v in obj.items()}
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
    layer: nn.Module, x: torch.Tensor, kwargs: Mapping[str, Any], linears: Mapping[str, nn.Linear]
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


class CalibrateStage(Stage):
    """Drives the per-layer loop: the runner calls :meth:`run_layer` for every layer."""

    config: CalibrateConfig

    def run(self, state: PipelineState, ctx: DistContext) -> None:
        """Capture the first layer's inputs for this rank's samples (before the loop)."""
        assert state.samples is not None and state.model is not None
        prefix, layers = decoder_layers(state.model)
        state.extra["layer_prefix"] = prefix
        hidden, kwargs = capture_layer_inputs(state.model, layers[0], state.samples)
        state.extra["hidden"] = hidden.to(ctx.device)
        state.extra["layer_kwargs"] = _to(kwargs, ctx.device)
        state.extra["tokens_calibrated"] = 0

    def _groups(
        self,
        layer: nn.Module,
        prefix: str,
        hidden: torch.Tensor,
        kwargs: Mapping[str, Any],
        linears: Mapping[str, nn.Linear],
    ) -> list[list[str]]:
        """The layer's groups, traced once per kind of layer (class + targeted names).

        Layers of one class with the same targeted modules share their data flow, so
        the one-sample tracing forward runs for the first such layer only.
        """
        if not linears:
            return []
        rel = tuple(n[len(prefix) + 1 :] for n in linears)
        key = (type(layer), rel)
        cache: dict[Any, list[list[str]]] = self.__dict__.setdefault("_group_cache", {})
        if key not in cache:
            traced = trace_groups(layer, hidden[:1], kwargs, linears)
            cache[key] = [[n[len(prefix) + 1 :] for n in g] for g in traced]
        return [[f"{prefix}.{n}" for n in g] for g in cache[key]]

    def layer_count(self, state: PipelineState) -> int:
        return len(state.layers)

    def run_layer(
        self,
        state: PipelineState,
        ctx: DistContext,
        index: int,
        on_group: Callable[[GroupStep], None],
    ) -> None:
        """Quantize layer ``index`` group by group and advance the hidden states through it."""
        layer = state.layers[index]
        hidden: torch.Tensor = state.extra["hidden"]
        kwargs: dict[str, Any] = state.extra["layer_kwargs"]
        prefix = f"{state.extra['layer_prefix']}.{index}"
        linears = target_linears(layer, prefix, self.config.targets, self.config.ignore)
        layer.to(ctx.device)
        try:
            groups = self._groups(layer, prefix, hidden, kwargs, linears)
            with (
                per_sample_linears(layer),
                self._group_hooks(index, groups, linears, on_group),
                torch.inference_mode(),
            ):
                out = layer(hidden, **kwargs)
        finally:
            layer.to("cpu")
        hidden_out = out[0] if isinstance(out, tuple) else out
        # Inputs are checked through the group Hessians (solve); this catches NaN/Inf that
        # first appear after the layer's last Linear (e.g. the final residual add).
        if bad := count_nonfinite(hidden_out):
            raise GptqflowError(
                f"layer {index} ({prefix}): its outputs have {bad} NaN/Inf values (rank "
                f"{ctx.rank}'s calibration samples); check the model's weights and dtype"
            )
        state.extra["hidden"] = hidden_out
        state.extra["tokens_calibrated"] += hidden.shape[0] * hidden.shape[1]

    @contextmanager
    def _group_hooks(
        self,
        index: int,
        groups: Sequence[list[str]],
        linears: Mapping[str, nn.Linear],
        on_group: Callable[[GroupStep], None],
    ) -> Iterator[None]:
        """Pre-hooks that, at the first call into a group, build its Hessian and quantize it.

        The rest of the loop runs inside the hook, so the group's own forward (and
        everything after it) already uses the quantized weights.
        """
        done: set[int] = set()
        group_of: dict[nn.Module, int] = {linears[n]: gi for gi, g in enumerate(groups) for n in g}

        def hook(mod: nn.Module, args: tuple[Any, ...]) -> None:
            gi = group_of[mod]
            if gi in done:
                return
            done.add(gi)
            x = args[0]
            hs = HessianSum.zeros(x.shape[-1], device=x.device)
            for i in range(x.shape[0]):
                hs.add(x[i])
            names = groups[gi]
            on_group(GroupStep(index, gi, list(names), [linears[n] for n in names], hs))

        handles = [m.register_forward_pre_hook(hook) for m in group_of]
        try:
            yield
        finally:
            for h in handles:
                h.remove()


@register_stage("calibrate", CalibrateStage)
class CalibrateConfig(StageConfig):
    """Per-layer Hessian capture over this rank's calibration samples (drives the layer loop)."""

    phase = "layer"
    stage: Literal["calibrate"] = "calibrate"
    targets: list[str] = Field(
        default_factory=lambda: ["re:.*"],
        description="Linear modules inside the decoder layers to quantize: names, suffixes or re:<regex>.",
    )
    ignore: list[str] = Field(
        default_factory=lambda: ["lm_head"],
        description="Modules kept in full precision (same syntax).",
    )
