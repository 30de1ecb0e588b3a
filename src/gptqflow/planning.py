"""``gptqflow plan``: predict how a model's GPTQ solve spreads over ranks, without hardware.

Ownership planning is a pure function of module shapes, the cost model and the world
size (:mod:`gptqflow.gptq.plan`), so a model that does not fit this machine can still be
planned at 512 ranks: its transformers config is built on the meta device (shapes only,
no weights), the targets of each decoder layer (modeling/targets.py) are grouped by the input they
read, and every group is planned at each world size with our cost-based planner and
with the column-count balancer that llm-compressor uses.

``plan_report(config, world_sizes, cost_model)`` returns a :class:`PlanReport` with
the printable table (``.text``) and the same numbers as a JSON-ready dict (``.data``).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from gptqflow.errors import GptqflowError
from gptqflow.fileio import parse_size
from gptqflow.gptq.cost import CostModel
from gptqflow.gptq.plan import (
    GroupPrediction,
    GroupShape,
    LayerPrediction,
    Planner,
    layer_prediction,
    split_waves,
)
from gptqflow.modeling.memory import DEFAULT_BASE_BYTES, MemoryPrediction, predict_rank_memory
from gptqflow.modeling.structure import decoder_layers
from gptqflow.modeling.targets import ExpertTarget, all_targets
from gptqflow.stages.hessian_reduce import HessianReduceConfig

__all__ = [
    "DEFAULT_WORLD_SIZES",
    "PlanReport",
    "layer_groups",
    "load_cost_model",
    "parse_world_sizes",
    "plan_report",
]

DEFAULT_WORLD_SIZES = (2, 4, 8, 64, 512)

# Linear modules (by attribute name) that read the same input tensor and so share one
# Hessian. The pipeline finds groups by tracing a forward (stages/calibrate.py); without
# weights we cannot run one, so the Llama-family layout is written down here. A
# Linear not listed forms a group of its own, which is always a valid (if pessimistic)
# plan.
SHARED_INPUT = (
    ("q_proj", "k_proj", "v_proj"),
    ("gate_proj", "up_proj"),
)

_PLANNERS: tuple[Planner, ...] = ("cost", "columns")

#: The Hessians of a wave travel in all-reduces of up to this many bytes: the default of
#: the ``hessian-reduce`` stage's ``bucket_size``.
BUCKET_BYTES = parse_size(HessianReduceConfig.model_fields["bucket_size"].default)
_PLANNER_NAMES = {"cost": "ours", "columns": "columns", "even": "even"}


@dataclass(frozen=True)
class PlanReport:
    """A printable plan table (``text``) and the same numbers for JSON (``data``)."""

    text: str
    data: dict[str, Any]

    def __str__(self) -> str:
        return self.text


# ---------------------------------------------------------------------- inputs
def parse_world_sizes(text: str) -> tuple[int, ...]:
    """``"2,4,8"`` -> ``(2, 4, 8)``; a user error names the bad item."""
    out = []
    for item in text.split(","):
        item = item.strip()
        if not item:
            continue
        if not item.isdigit() or int(item) < 1:
            raise GptqflowError(
                f"--world-sizes: {item!r} is not a positive integer; give e.g. 2,4,8"
            )
        out.append(int(item))
    if not out:
        raise GptqflowError("--world-sizes: no world size given; give e.g. 2,4,8")
    return tuple(out)


def load_cost_model(source: CostModel | str | Path | None = None) -> CostModel:
    """The bundled CPU fit (``None``), a cost model, or one read from a JSON file."""
    if source is None:
        return CostModel.default()
    if isinstance(source, CostModel):
        return source
    path = Path(source)
    try:
        return CostModel.from_json(path.read_text())
    except OSError as exc:
        raise GptqflowError(
            f"cannot read cost model {path}: {exc.strerror}; write one with bench/fit_cost.py"
        ) from exc
    except (ValueError, TypeError) as exc:
        raise GptqflowError(
            f"{path} is not a valid cost model ({exc}); write one with bench/fit_cost.py"
        ) from exc


def _load_config(source: str | Path | Mapping[str, Any]) -> tuple[Any, str]:
    """A transformers config from a JSON file, a model directory, or a dict; plus a label."""
    from transformers import AutoConfig

    if isinstance(source, Mapping):
        data = dict(source)
        if "model_type" not in data:
            raise GptqflowError("config dict has no 'model_type'; e.g. 'llama'")
        return AutoConfig.for_model(**data), str(data.get("_name_or_path") or data["model_type"])
    path = Path(source)
    if not path.exists():
        raise GptqflowError(f"config {path} does not exist; give a config.json or a model dir")
    try:
        config = AutoConfig.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError, KeyError, json.JSONDecodeError) as exc:
        raise GptqflowError(f"cannot read a transformers config from {path}: {exc}") from exc
    # A model directory's config.json is named after its directory.
    label = path.parent.name if path.is_file() and path.name == "config.json" else path.stem
    return config, label if path.is_file() else path.name


def _group_linears(layer: nn.Module) -> list[GroupShape]:
    """The layer's targets (every kind, modeling/targets.py), in module order, grouped by the
    input they share: the halves of one expert's fused gate/up read one input, as do the
    Linears of a ``SHARED_INPUT`` row under one parent."""
    role = {name: i for i, names in enumerate(SHARED_INPUT) for name in names}
    groups: list[tuple[list[str], list[int], int, object, str | None]] = []
    found, _routers = all_targets(layer, "layer")
    for t in found:
        name = t.name.removeprefix("layer.")
        rows, cols = t.shape
        parent, _, leaf = name.rpartition(".")
        if isinstance(t, ExpertTarget):
            key: object = ("expert", id(t.module))
        else:
            key = (parent, role[leaf]) if leaf in role else None
        last = groups[-1] if groups else None
        if key is not None and last is not None and last[3] == key and last[2] == cols:
            last[0].append(name)
            last[1].append(rows)
        else:
            groups.append(([name], [rows], cols, key, t.wave))
    shapes = [GroupShape(tuple(n), tuple(r), c, w) for n, r, c, _, w in groups]
    # The layer loop takes a wave's groups together, at its first group's place.
    first: dict[str, int] = {}
    place = []
    for i, g in enumerate(shapes):
        place.append(first.setdefault(g.wave, i) if g.wave is not None else i)
    return [g for _, _, g in sorted(zip(place, range(len(shapes)), shapes))]


def _meta_model(config: str | Path | Mapping[str, Any]) -> tuple[str, nn.Module]:
    from transformers import AutoModelForCausalLM

    cfg, label = _load_config(config)
    with torch.device("meta"):
        return label, AutoModelForCausalLM.from_config(cfg)


def layer_groups(
    config: str | Path | Mapping[str, Any],
) -> tuple[str, list[tuple[list[GroupShape], int]]]:
    """The model's label and its distinct decoder-layer shapes, each with its layer count.

    The model is built on the meta device from the config, so the shapes are exactly
    what transformers builds (head_dim, kv heads, biases), and nothing is allocated.
    """
    label, model = _meta_model(config)
    _, layers = decoder_layers(model)
    kinds: dict[tuple[GroupShape, ...], int] = {}
    for layer in layers:
        key = tuple(_group_linears(layer))
        kinds[key] = kinds.get(key, 0) + 1
    if not any(kinds):
        raise GptqflowError(f"{label}: the decoder layers have no weights to quantize")
    return label, [(list(k), n) for k, n in kinds.items()]


# ---------------------------------------------------------------------- the report
def plan_report(
    config: str | Path | Mapping[str, Any],
    world_sizes: Sequence[int] = DEFAULT_WORLD_SIZES,
    cost_model: CostModel | str | Path | None = None,
    *,
    group_size: int = 128,
    scale_bytes: int = 2,
    num_samples: int = 64,
    seq_len: int = 512,
    max_wave_groups: int | None = None,
) -> PlanReport:
    """Predict the solve of every layer kind at each world size, for both planners.

    ``config``: a transformers config.json, a model directory or a config dict.
    ``cost_model``: a :class:`CostModel`, a JSON file from ``bench/fit_cost.py``, or
    ``None`` for the bundled CPU fit. ``group_size`` and ``scale_bytes`` (bf16 = 2)
    only change the qparam bytes. ``max_wave_groups``: ``runtime.max_wave_groups`` (an
    MoE block's experts in parts of at most this many). Raises :class:`GptqflowError`
    for bad inputs.
    """
    if not world_sizes or any(int(w) < 1 for w in world_sizes):
        raise GptqflowError(f"world sizes must be positive integers, got {list(world_sizes)}")
    cost = load_cost_model(cost_model)
    label, whole = layer_groups(config)
    kinds = [(split_waves(groups, max_wave_groups), n) for groups, n in whole]
    data: dict[str, Any] = {
        "model": label,
        "num_layers": sum(n for _, n in kinds),
        "group_size": group_size,
        "cost_model": cost.to_dict(),
        "layer_kinds": [],
    }
    lines = [f"== {label}: {data['num_layers']} decoder layers; cost model: {cost.fitted_on}"]
    for groups, count in kinds:
        kind, text = _layer_kind(groups, count, world_sizes, cost, group_size, scale_bytes)
        data["layer_kinds"].append(kind)
        lines += text
    memory, text = _memory(config, kinds, world_sizes, num_samples, seq_len)
    data["memory"] = memory
    lines += text
    return PlanReport("\n".join(lines), data)


def _memory(
    config: str | Path | Mapping[str, Any],
    kinds: list[tuple[list[GroupShape], int]],
    world_sizes: Sequence[int],
    num_samples: int,
    seq_len: int,
) -> tuple[list[dict[str, Any]], list[str]]:
    """Predicted peak host memory per rank (streamed weights) at each world size."""
    _, model = _meta_model(config)

    def predict(tokens: int, main: bool) -> MemoryPrediction:  # the layer kind that peaks
        return max(
            (predict_rank_memory(model, groups, tokens, main_rank=main) for groups, _ in kinds),
            key=lambda m: m.peak,
        )

    gib = 2**30
    lines = [
        f"memory per rank (model.weights=stream, calibration {num_samples} x {seq_len} tokens, "
        f"float32; base {DEFAULT_BASE_BYTES / gib:.2f} GiB of process):",
        "  ranks  tokens/rank  rank 0 GiB  other ranks GiB  all ranks GiB  (capture / layer / finish GiB, rank 0)",
    ]
    out = []
    for w in world_sizes:
        tokens = -(-num_samples // int(w)) * seq_len
        main, other = predict(tokens, True), predict(tokens, False)
        total = main.peak + (int(w) - 1) * other.peak
        lines.append(
            f"  {w:5d}  {tokens:11d}  {main.peak / gib:10.2f}  {other.peak / gib:15.2f}"
            f"  {total / gib:13.2f}  ({main.capture / gib:.2f} / {main.layer / gib:.2f} / "
            f"{main.finish / gib:.2f})"
        )
        out.append(
            {
                "world_size": int(w),
                "tokens_per_rank": tokens,
                "rank0": main.to_dict(),
                "other_rank": other.to_dict(),
                "total_bytes": total,
            }
        )
    lines.append("")
    return out, lines


def _layer_kind(
    groups: list[GroupShape],
    count: int,
    world_sizes: Sequence[int],
    cost: CostModel,
    group_size: int,
    scale_bytes: int,
) -> tuple[dict[str, Any], list[str]]:
    preds: dict[tuple[Planner, int], LayerPrediction] = {}
    settings = {"group_size": group_size, "scale_bytes": scale_bytes, "bucket_bytes": BUCKET_BYTES}
    for w in world_sizes:
        for p in _PLANNERS:
            preds[(p, int(w))] = layer_prediction(groups, int(w), cost, p, **settings)  # type: ignore[arg-type]
    one = layer_prediction(groups, 1, cost, "cost", **settings)  # type: ignore[arg-type]
    factor = sum(g.factor_seconds for g in one.groups)
    rows = _rows(list(one.groups))
    shapes = ", ".join(f"{name} {nr}x{nc}" for name, (_, nr, nc) in rows)
    lines = [
        f"layer kind x{count}: {shapes}",
        f"  1 rank: {one.seconds:.2f} s/layer solve (factorisations {factor:.2f} s = "
        f"{factor / one.seconds:.0%}); model {one.seconds * count / 3600:.2f} h",
        "",
        "  planner  ranks  s/layer  mean busy  imbalance  speedup  +comm s  speedup+comm"
        "  Hessian MB  qparam MB",
    ]
    for w in world_sizes:
        for p in _PLANNERS:
            r = preds[(p, int(w))]
            lines.append(
                f"  {_PLANNER_NAMES[p]:7s}  {w:5d}  {r.seconds:7.2f}  {r.mean_seconds:9.2f}"
                f"  {r.imbalance:9.3f}  {r.speedup:6.2f}x  {r.comm_seconds:7.2f}"
                f"  {r.speedup_with_comm:11.2f}x  {r.hessian_bytes / 1e6:10.0f}"
                f"  {r.qparam_bytes / 1e6:9.1f}"
            )
    lines += [
        "",
        "  per group (ours): ranks used / slowest rank s (* = factorisation shared by all ranks;",
        "  a wave, e.g. 128 experts x N: whole groups packed onto ranks, its busiest rank's s)",
    ]
    header = "  group                         rows   cols  1 rank s  factor s"
    lines.append(header + "".join(f"  {'W=' + str(w):>13s}" for w in world_sizes))
    for name, (idx, nrows, ncols) in rows:
        at_one = [one.groups[i] for i in idx]
        cells = "".join(
            _group_cell([preds[("cost", int(w))].groups[i] for i in idx]) for w in world_sizes
        )
        lines.append(
            f"  {name:28s} {nrows:6d} {ncols:6d}  {sum(g.single_rank_seconds for g in at_one):8.2f}"
            f"  {sum(g.factor_seconds for g in at_one):8.2f}{cells}"
        )
    lines.append("")
    kind = {
        "count": count,
        "groups": [
            {"names": list(g.names), "rows": list(g.rows), "cols": g.cols, "wave": g.wave}
            for g in groups
        ],
        "single_rank_seconds": one.seconds,
        "factor_seconds": factor,
        "predictions": [_prediction_dict(r) for r in preds.values()],
    }
    return kind, lines


def _rows(groups: list[GroupPrediction]) -> list[tuple[str, tuple[list[int], int, int]]]:
    """One printed row per group, or per wave (its groups' indices, rows and cols of one)."""
    out: list[tuple[str, tuple[list[int], int, int]]] = []
    for i, g in enumerate(groups):
        name = "+".join(_leaf(n) for n in g.names)
        if g.wave is not None and i and groups[i - 1].wave == g.wave:
            out[-1][1][0].append(i)
            continue
        out.append((name, ([i], g.rows, g.cols)))
    return [
        (f"{name} x{len(idx)}" if len(idx) > 1 else name, (idx, r, c)) for name, (idx, r, c) in out
    ]


def _group_cell(gs: list[GroupPrediction]) -> str:
    """Ranks used and the busiest rank's seconds of a group or a wave of groups."""
    if len(gs) == 1:
        g = gs[0]
        mark = "*" if g.shared_factor else " "
        return f"  {g.ranks:3d}{mark} /{g.seconds:7.2f}"
    load: dict[int, float] = {}
    for g in gs:
        for r in g.rank_set:
            load[r] = load.get(r, 0.0) + g.seconds
    return f"  {len(load):3d}  /{max(load.values(), default=0.0):7.2f}"


def _leaf(name: str) -> str:
    return name.rpartition(".")[2]


def _prediction_dict(r: LayerPrediction) -> dict[str, Any]:
    return {
        "planner": r.planner,
        "world_size": r.world_size,
        "seconds": r.seconds,
        "mean_seconds": r.mean_seconds,
        "max_rank_seconds": max(r.rank_seconds),
        "min_rank_seconds": min(r.rank_seconds),
        "imbalance": r.imbalance,
        "speedup": r.speedup,
        "comm_seconds": r.comm_seconds,
        "speedup_with_comm": r.speedup_with_comm,
        "hessian_bytes": r.hessian_bytes,
        "qparam_bytes": r.qparam_bytes,
        "groups": [
            {
                "names": list(g.names),
                "ranks": g.ranks,
                "seconds": g.seconds,
                "shared_factor": g.shared_factor,
            }
            for g in r.groups
        ],
    }
