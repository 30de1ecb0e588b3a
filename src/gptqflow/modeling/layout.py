"""The checkpoint layout of an architecture: in-memory tensor names -> the names on disk.

transformers renames some tensors while loading and fuses others (its conversion
mapping: Mixtral's ``block_sparse_moe.experts.K.w1/w3`` become ``mlp.experts.gate_up_proj
[E, 2I, H]``, gpt_neox's ``embed_out`` becomes ``lm_head``), and ``save_pretrained``
reverts it. The checkpoint gptqflow writes uses the names ``save_pretrained`` writes, so
a serving engine that expects the original layout reads it.

:meth:`CheckpointLayout.of` asks transformers itself (``revert_weight_conversion``, the
function ``save_pretrained`` calls) where every tensor goes, on a probe: every tensor
replaced by a tiny one of distinct values (a fused expert parameter ``[E, k, .]`` by
``[E, k, 1]``), so one call on a few hundred numbers maps every name and every expert
slice, for any architecture whose conversion is renames and expert splits. A
conversion that does anything else (reshapes, transposes, merges of dense tensors) is
refused with the tensor's name.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch
from torch import nn

from gptqflow.errors import GptqflowError
from gptqflow.modeling.targets import (
    ExpertTarget,
    Target,
    is_fused_experts,
    unsupported_experts,
)

__all__ = ["CheckpointLayout", "Piece", "assemble_experts"]


@dataclass(frozen=True)
class Piece:
    """One checkpoint tensor cut from a fused parameter: expert ``expert``, ``half`` of its rows
    (0: the first half, 1: the second, None: all)."""

    expert: int
    half: int | None
    name: str


@dataclass
class CheckpointLayout:
    """Where each in-memory tensor goes in the checkpoint (names as ``save_pretrained`` writes)."""

    dense: dict[str, str]  # in-memory tensor name -> checkpoint tensor name
    pieces: dict[str, list[Piece]]  # fused parameter -> its per-expert checkpoint tensors

    @classmethod
    def identity(cls, names: Iterable[str]) -> CheckpointLayout:
        return cls({n: n for n in names}, {})

    @classmethod
    def of(cls, model: nn.Module) -> CheckpointLayout:
        """The layout of ``model`` (may sit on the meta device: only shapes are read)."""
        from transformers.core_model_loading import revert_weight_conversion

        fused = _fused_params(model)
        probe: dict[str, torch.Tensor] = {}
        origin: dict[int, tuple[str, int, int | None]] = {}
        value = 0
        for name in model.state_dict(keep_vars=True):
            if name in fused:
                experts, halves = fused[name]
                k = 2 if halves else 1
                probe[name] = torch.arange(value, value + experts * k, dtype=torch.float64).reshape(
                    experts, k, 1
                )
                for e in range(experts):
                    for h in range(k):
                        origin[value + e * k + h] = (name, e, h if halves else None)
                value += experts * k
            else:
                probe[name] = torch.tensor([float(value)], dtype=torch.float64)
                origin[value] = (name, -1, None)
                value += 1
        try:
            reverted = revert_weight_conversion(model, dict(probe))  # type: ignore[arg-type]
        except Exception as exc:  # transformers' own error, for a layout we cannot follow
            raise GptqflowError(
                f"{type(model).__name__}: cannot map its tensors to the checkpoint layout "
                f"(transformers' weight conversion failed on the probe: {exc})"
            ) from exc
        dense: dict[str, str] = {}
        pieces: dict[str, list[Piece]] = {}
        for out_name, t in reverted.items():
            t = t[0] if isinstance(t, list) else t
            if t.numel() != 1:
                raise GptqflowError(
                    f"{type(model).__name__}: the checkpoint tensor {out_name} is not a rename "
                    "or one expert's slice of an in-memory tensor; this conversion is not supported"
                )
            src, expert, half = origin[int(t.item())]
            if expert < 0:
                dense[src] = out_name
            else:
                pieces.setdefault(src, []).append(Piece(expert, half, out_name))
        missing = sorted(set(probe) - set(dense) - set(pieces))
        if missing:
            raise GptqflowError(
                f"{type(model).__name__}: no checkpoint name for {missing[:3]} (transformers' "
                "conversion dropped them)"
            )
        for src, ps in pieces.items():
            experts, halves = fused[src]
            if len(ps) != experts * (2 if halves else 1):
                raise GptqflowError(
                    f"{type(model).__name__}: {src} maps to {len(ps)} checkpoint tensors, "
                    f"expected one per expert{' and half' if halves else ''}"
                )
            ps.sort(key=lambda p: (p.expert, -1 if p.half is None else p.half))
        return cls(dense, pieces)

    # ------------------------------------------------------------------ names
    def tensor_name(self, name: str) -> str:
        """The checkpoint name of an in-memory tensor that is not fused."""
        return self.dense.get(name, name)

    def module_name(self, target: Target) -> str:
        """The checkpoint module name of a target (its tensors are ``<name>.weight_*``)."""
        if isinstance(target, ExpertTarget):
            half = None if target.rows is None else (0 if target.rows[0] == 0 else 1)
            for p in self.pieces.get(target.source, []):
                if p.expert == target.index and p.half == half:
                    return p.name.removesuffix(".weight")
            raise GptqflowError(f"no checkpoint name for {target.name} ({target.source})")
        return self.tensor_name(target.source).removesuffix(".weight")

    def split(self, name: str, tensor: torch.Tensor) -> dict[str, torch.Tensor]:
        """An in-memory tensor as the checkpoint's tensors (one, or one per expert slice)."""
        if name not in self.pieces:
            return {self.tensor_name(name): tensor}
        out = {}
        for p in self.pieces[name]:
            t = tensor[p.expert]
            if p.half is not None:
                rows = t.shape[0] // 2
                t = t[p.half * rows : (p.half + 1) * rows]
            out[p.name] = t
        return out

    def split_shapes(self, name: str, shape: tuple[int, ...]) -> dict[str, tuple[int, ...]]:
        """:meth:`split` for shapes only."""
        if name not in self.pieces:
            return {self.tensor_name(name): shape}
        rows = shape[1] // 2
        return {
            p.name: (shape[1] if p.half is None else rows, *shape[2:]) for p in self.pieces[name]
        }

    def ignore_names(self, ignore: Iterable[str]) -> list[str]:
        """``ignore`` plus the checkpoint names of plain entries that the layout renames
        (gpt_neox's ``lm_head`` is ``embed_out`` on disk), so the list matches both."""
        out = list(ignore)
        for entry in list(out):
            if entry.startswith("re:"):
                continue
            for mem, disk in self.dense.items():
                mod, disk_mod = mem.removesuffix(".weight"), disk.removesuffix(".weight")
                named = mod == entry or mod.endswith("." + entry)
                if named and disk_mod != mod and disk_mod not in out:
                    out.append(disk_mod)
        return out


def assemble_experts(pieces: list[Piece], tensors: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """The fused ``[E, rows, cols]`` parameter :meth:`CheckpointLayout.split` cut into
    ``pieces`` (checkpoint name -> tensor in ``tensors``): the inverse of the split."""
    experts: dict[int, list[torch.Tensor]] = {}
    for p in sorted(pieces, key=lambda p: (p.expert, -1 if p.half is None else p.half)):
        experts.setdefault(p.expert, []).append(tensors[p.name])
    return torch.stack(
        [torch.cat(parts) if len(parts) > 1 else parts[0] for parts in experts.values()]
    )


def _fused_params(model: nn.Module) -> dict[str, tuple[int, bool]]:
    """Fused expert parameters with a target kind: name -> (experts, has gate/up halves)."""
    out: dict[str, tuple[int, bool]] = {}
    for mname, mod in model.named_modules():
        if is_fused_experts(mod) and unsupported_experts(mod) is None:
            for pname, p in mod.named_parameters(recurse=False):
                out[f"{mname}.{pname}" if mname else pname] = (
                    int(p.shape[0]),
                    pname == "gate_up_proj",
                )
    return out
