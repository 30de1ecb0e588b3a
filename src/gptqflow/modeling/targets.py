"""What can be quantized: one explicit abstraction, found by type in each decoder layer.

A :class:`Target` is one 2-D weight the pipeline quantizes. Every kind knows

* ``weight``: its weight as a 2-D ``out x in`` view that shares storage with the model's
  parameter (so installing a result is ``weight.copy_(...)``, as for a Linear);
* ``module``: the module whose call reads the target's input (where the layer loop's
  pre-hooks see it; two targets may share one, e.g. the gate and up halves of a fused
  ``gate_up_proj``);
* ``source``: the full name of the parameter it lives in (a fused 3-D parameter holds
  many targets), so the checkpoint writer knows which in-memory tensors it replaces;
* ``wave``: a key shared by targets that are independent of each other and whose inputs
  are computed at the same point of the forward (the experts of one fused parameter:
  no expert reads another's output), or None. The layer loop hands the groups of one
  wave to the stages together (``Stage.on_groups``), so the solve can place whole
  experts on different ranks and the collectives can carry many experts at once.

The kinds, discovered by type (never by architecture name):

========================  ==========================================================
``linear``                an ``nn.Linear`` (its ``forward`` not overridden)
``conv1d``                transformers' ``Conv1D`` (GPT-2): ``weight`` is ``[in, out]``,
                          its view here is the transpose
``expert``                one expert's 2-D slice of a fused 3-D parameter of a
                          transformers experts module (``gate_up_proj [E, 2I, H]``,
                          ``down_proj [E, H, I]``): the gate half, the up half, or
                          ``down_proj``; named ``<experts>.<e>.gate_proj`` /
                          ``up_proj`` / ``down_proj``
========================  ==========================================================

Routers (modules whose class name contains ``Router``, and Linears named ``gate``,
``router`` or ``shared_expert_gate``) are never targets: they are tiny, decide which
expert runs, and a quantization error there changes the routing. They are listed as
excluded, with the reason, in ``report.json``. A decoder layer with a parameter of
three or more dimensions that no kind covers (an experts layout with no target kind,
e.g. a transposed one) is refused before any weight is read, naming the parameter.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from gptqflow.errors import GptqflowError

#: Linears with these leaf names route tokens to experts; they are never quantized.
ROUTER_NAMES = ("gate", "router", "shared_expert_gate")

#: The reasons a targetable weight is left in full precision (report.json ``coverage``).
REASON_IGNORED = "scheme.ignore"
REASON_NOT_TARGETED = "not matched by scheme.targets"
REASON_ROUTER = "router (routers and gates are never quantized)"


class Target:
    """One 2-D weight to quantize (see the module docstring for the kinds)."""

    kind: ClassVar[str]
    #: compressed-tensors has a packed format for it that loaders read back; otherwise the
    #: checkpoint holds its quantized (dequantized) values in the model's own dtype.
    packable: ClassVar[bool] = True
    name: str
    module: nn.Module
    source: str

    @property
    def weight(self) -> torch.Tensor:
        """The weight as ``out x in``, sharing storage with the model's parameter."""
        raise NotImplementedError

    @property
    def shape(self) -> tuple[int, int]:
        rows, cols = self.weight.shape
        return int(rows), int(cols)

    @property
    def numel(self) -> int:
        rows, cols = self.shape
        return rows * cols

    @property
    def wave(self) -> str | None:
        """Key of the targets solved together with this one as independent groups, or None."""
        return None

    def install(self, value: torch.Tensor) -> None:
        """Write ``value`` (``out x in``) into the model's parameter."""
        with torch.no_grad():
            self.weight.copy_(value.to(self.weight.dtype))

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r}, {self.shape})"


class LinearTarget(Target):
    kind = "linear"

    def __init__(self, name: str, module: nn.Linear) -> None:
        self.name, self.module, self.source = name, module, f"{name}.weight"

    @property
    def weight(self) -> torch.Tensor:
        w = self.module.weight
        assert isinstance(w, torch.Tensor)
        return w


class Conv1DTarget(Target):
    """transformers' ``Conv1D`` (``y = x @ W + b`` with ``W: [in, out]``)."""

    kind = "conv1d"
    packable = False  # no loader maps packed codes onto Conv1D's [in, out] weight

    def __init__(self, name: str, module: nn.Module) -> None:
        self.name, self.module, self.source = name, module, f"{name}.weight"

    @property
    def weight(self) -> torch.Tensor:
        w = self.module.weight
        assert isinstance(w, torch.Tensor)
        return w.detach().t()


class ExpertTarget(Target):
    """Rows ``[start, stop)`` of expert ``index``'s slice of a fused 3-D parameter."""

    kind = "expert"

    def __init__(
        self,
        name: str,
        proxy: ExpertProjection,
        source: str,
        index: int,
        rows: tuple[int, int] | None,
    ) -> None:
        self.name, self.module, self.source = name, proxy, source
        self.proxy, self.index, self.rows = proxy, index, rows

    @property
    def expert(self) -> int:
        return self.index

    @property
    def wave(self) -> str | None:
        """Every expert's slices of one fused parameter: the experts run side by side."""
        return self.source

    @property
    def weight(self) -> torch.Tensor:
        w = self.proxy.weight
        return w if self.rows is None else w[self.rows[0] : self.rows[1]]


class ExpertProjection(nn.Module):
    """One expert's projection of a fused experts module: the seam the layer loop hooks.

    ``forward(x, sizes)`` computes ``x @ W_e.T`` on runs of ``sizes`` rows (one per
    calibration sample), so each sample's arithmetic does not depend on which other
    samples a rank holds. It is never registered as a submodule (the model's
    parameters and state dict are unchanged); :func:`fused_experts` keeps it on the
    experts module.
    """

    def __init__(self, experts: nn.Module, param: str, index: int) -> None:
        super().__init__()
        object.__setattr__(self, "_experts", experts)  # not a submodule
        self.param, self.index = param, index

    @property
    def weight(self) -> torch.Tensor:
        p = getattr(self._experts, self.param)
        assert isinstance(p, torch.Tensor)
        return p.detach()[self.index]

    def forward(self, x: torch.Tensor, sizes: Sequence[int] | None = None) -> torch.Tensor:
        w = self.weight
        if sizes is None or len(sizes) <= 1:
            return F.linear(x, w)
        return torch.cat([F.linear(part, w) for part in x.split(list(sizes))])


@dataclass
class FusedExperts:
    """The per-expert seams of one fused experts module (``gate_up_proj``, ``down_proj``)."""

    module: nn.Module
    gate_up: list[ExpertProjection] = field(default_factory=list)
    down: list[ExpertProjection] = field(default_factory=list)

    @property
    def num_experts(self) -> int:
        return len(self.down)

    @property
    def intermediate(self) -> int:
        return int(_param(self.module, "down_proj").shape[2])


#: Attribute of an experts module that holds its :class:`FusedExperts` (built once).
_SEAM_ATTR = "_gptqflow_experts"


def is_fused_experts(module: nn.Module) -> bool:
    params = dict(module.named_parameters(recurse=False))
    return any(p.dim() >= 3 for p in params.values())


def unsupported_experts(module: nn.Module) -> str | None:
    """Why a module holding 3-D parameters has no target kind, or None if it has one.

    The kind covers transformers' standard experts layout (``use_experts_implementation``
    with the defaults): ``gate_up_proj [E, 2I, H]`` (gate rows first, then up),
    ``down_proj [E, H, I]``, no biases, called as ``experts(x, top_k_index, top_k_weights)``.
    """
    cls = type(module).__name__
    params = {n: p for n, p in module.named_parameters(recurse=False)}
    if set(params) != {"gate_up_proj", "down_proj"}:
        return f"{cls} holds fused parameters {sorted(params)}, not exactly gate_up_proj/down_proj"
    flags = {
        "is_transposed": False,
        "is_concatenated": True,
        "has_bias": False,
        "has_gate": True,
    }
    for flag, want in flags.items():
        if getattr(module, flag, None) is not want:
            return (
                f"{cls}: {flag}={getattr(module, flag, None)!r} (the expert target kind needs "
                f"the standard layout {flag}={want})"
            )
    gu, down = params["gate_up_proj"], params["down_proj"]
    if gu.dim() != 3 or down.dim() != 3 or gu.shape[0] != down.shape[0]:
        return f"{cls}: gate_up_proj {tuple(gu.shape)} / down_proj {tuple(down.shape)} are not [E, ., .]"
    _e, two_i, h = gu.shape
    if down.shape[1] != h or 2 * down.shape[2] != two_i:
        return (
            f"{cls}: gate_up_proj {tuple(gu.shape)} and down_proj {tuple(down.shape)} do not "
            "have the [E, 2I, H] / [E, H, I] layout"
        )
    if not callable(getattr(module, "act_fn", None)):
        return f"{cls}: no act_fn"
    return None


def fused_experts(module: nn.Module) -> FusedExperts:
    """The module's per-expert seams (built on first use and kept on the module)."""
    seam = module.__dict__.get(_SEAM_ATTR)
    if seam is None:
        n = int(_param(module, "down_proj").shape[0])
        seam = FusedExperts(
            module,
            [ExpertProjection(module, "gate_up_proj", e) for e in range(n)],
            [ExpertProjection(module, "down_proj", e) for e in range(n)],
        )
        module.__dict__[_SEAM_ATTR] = seam
    assert isinstance(seam, FusedExperts)
    return seam


def _param(module: nn.Module, name: str) -> torch.Tensor:
    p = module.get_parameter(name)
    return p


def is_router(name: str, module: nn.Module) -> bool:
    """Routers and gates: a class named ``*Router*``, or a Linear leaf named as one."""
    return "Router" in type(module).__name__ or name.rpartition(".")[2] in ROUTER_NAMES


def conv1d_type() -> type[nn.Module] | None:
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # pragma: no cover - transformers is a dependency
        return None
    return Conv1D


def plain_linear(module: nn.Module) -> bool:
    """An ``nn.Linear`` whose forward is the Linear's (a subclass may return a tuple)."""
    return isinstance(module, nn.Linear) and type(module).forward is nn.Linear.forward


def matches(name: str, patterns: Sequence[str]) -> bool:
    """``re:<regex>`` patterns match by ``re.fullmatch``; others match the name or its suffix."""
    import re

    for p in patterns:
        if p.startswith("re:"):
            if re.fullmatch(p[3:], name):
                return True
        elif name == p or name.endswith("." + p):
            return True
    return False


@dataclass
class Excluded:
    """A targetable weight left in full precision, and why."""

    name: str
    params: int
    reason: str
    linear: bool = False  # an nn.Linear (compressed-tensors' loader would match it)

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "params": self.params, "reason": self.reason}


@dataclass
class LayerTargets:
    """One decoder layer's targets (to quantize) and excluded weights (with reasons)."""

    targets: dict[str, Target]
    excluded: list[Excluded]


def all_targets(layer: nn.Module, prefix: str) -> tuple[list[Target], list[Excluded]]:
    """Every weight of ``layer`` a target kind covers, in module order, and the routers.

    Raises :class:`GptqflowError` for a parameter of three or more dimensions that no
    kind covers, naming it: such a model cannot be quantized completely.
    """
    conv1d = conv1d_type()
    found: list[Target] = []
    routers: list[Excluded] = []
    for rel, mod in layer.named_modules():
        full = f"{prefix}.{rel}" if rel else prefix
        if isinstance(mod, nn.Linear) or (conv1d is not None and isinstance(mod, conv1d)):
            weight: torch.Tensor = mod.weight  # type: ignore[assignment]
            if is_router(full, mod):
                routers.append(
                    Excluded(full, int(weight.numel()), REASON_ROUTER, isinstance(mod, nn.Linear))
                )
            elif plain_linear(mod):
                found.append(LinearTarget(full, mod))  # type: ignore[arg-type]
            elif conv1d is not None and isinstance(mod, conv1d):
                found.append(Conv1DTarget(full, mod))
            else:
                raise GptqflowError(
                    f"{full} ({type(mod).__name__}) is a Linear with its own forward and no "
                    "target kind: gptqflow cannot quantize this architecture completely"
                )
        elif "Router" in type(mod).__name__:
            n = sum(int(p.numel()) for p in mod.parameters(recurse=False))
            routers.append(Excluded(full, n, REASON_ROUTER))
        elif is_fused_experts(mod):
            why = unsupported_experts(mod)
            if why is not None:
                raise GptqflowError(
                    f"{full}: fused expert weights with no target kind ({why}); "
                    "gptqflow cannot quantize this architecture (see docs/models.md)"
                )
            found += expert_targets(full, mod)
    return found, routers


def expert_targets(name: str, module: nn.Module) -> list[Target]:
    """Per expert: the gate and up halves of ``gate_up_proj`` and ``down_proj``."""
    seam = fused_experts(module)
    inter = seam.intermediate
    out: list[Target] = []
    for e in range(seam.num_experts):
        gu, dn = seam.gate_up[e], seam.down[e]
        out.append(ExpertTarget(f"{name}.{e}.gate_proj", gu, f"{name}.gate_up_proj", e, (0, inter)))
        out.append(
            ExpertTarget(f"{name}.{e}.up_proj", gu, f"{name}.gate_up_proj", e, (inter, 2 * inter))
        )
        out.append(ExpertTarget(f"{name}.{e}.down_proj", dn, f"{name}.down_proj", e, None))
    return out


def layer_targets(
    layer: nn.Module, prefix: str, targets: Sequence[str], ignore: Sequence[str]
) -> LayerTargets:
    """The targets of one decoder layer selected by the scheme, and what is left out (why)."""
    found, excluded = all_targets(layer, prefix)
    selected: dict[str, Target] = {}
    for t in found:
        linear = t.kind == "linear"
        if matches(t.name, ignore):
            excluded.append(Excluded(t.name, t.numel, REASON_IGNORED, linear))
        elif not matches(t.name, targets):
            excluded.append(Excluded(t.name, t.numel, REASON_NOT_TARGETED, linear))
        else:
            selected[t.name] = t
    _check_whole_sources(selected, found)
    return LayerTargets(selected, excluded)


def _check_whole_sources(selected: dict[str, Target], found: list[Target]) -> None:
    """A fused parameter is quantized whole or not at all (its checkpoint tensors are one each)."""
    by_source: dict[str, list[Target]] = {}
    for t in found:
        by_source.setdefault(t.source, []).append(t)
    for source, members in by_source.items():
        chosen = [t.name for t in members if t.name in selected]
        if chosen and len(chosen) != len(members):
            left = [t.name for t in members if t.name not in selected]
            raise GptqflowError(
                f"scheme.targets/scheme.ignore select part of the fused parameter {source} "
                f"({len(chosen)} of {len(members)} slices; e.g. {left[0]} is left out); "
                "select all of its experts' projections or none"
            )


def decoder_params(layer: nn.Module) -> int:
    """Every parameter of a decoder layer (the denominator of the quantized fraction)."""
    return sum(int(p.numel()) for p in layer.parameters())


@dataclass
class Coverage:
    """How much of the decoder layers was quantized, and every targetable weight that was not.

    Filled layer by layer by the layer loop; :meth:`summary` is ``coverage`` in
    report.json. The fraction counts every parameter of the decoder layers (norms,
    biases and routers included), so it says how much of the layers' weight memory
    the quantized format holds.
    """

    decoder_params: int = 0
    quantized_params: int = 0
    by_kind: dict[str, int] = field(default_factory=dict)
    not_quantized: list[Excluded] = field(default_factory=list)

    def add_layer(self, found: LayerTargets, layer_params: int, quantized: Sequence[str]) -> None:
        self.decoder_params += layer_params
        for name in quantized:
            t = found.targets[name]
            self.quantized_params += t.numel
            self.by_kind[t.kind] = self.by_kind.get(t.kind, 0) + t.numel
        self.not_quantized += found.excluded

    def summary(self) -> dict[str, Any]:
        total = self.decoder_params
        return {
            "decoder_params": total,
            "quantized_params": self.quantized_params,
            "quantized_fraction": self.quantized_params / total if total else 0.0,
            "quantized_params_by_kind": dict(sorted(self.by_kind.items())),
            "not_quantized": [e.as_dict() for e in self.not_quantized],
        }
