"""Finding the parts of a causal LM that the pipeline works on, without loading weights."""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from gptqflow.errors import GptqflowError


def decoder_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The model's decoder layers and their name prefix (e.g. ``model.layers``).

    Found as the ModuleList whose length is ``config.num_hidden_layers``, so any
    transformers causal LM with the usual layout works, not one architecture only.
    """
    n = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    for name, mod in model.named_modules():
        if isinstance(mod, nn.ModuleList) and len(mod) == n and n:
            return name, mod
    raise GptqflowError(
        f"could not find the decoder layers of {type(model).__name__}: no ModuleList of "
        f"num_hidden_layers={n} modules"
    )


def matches(name: str, patterns: Sequence[str]) -> bool:
    """``re:<regex>`` patterns match by ``re.fullmatch``; others match the name or its suffix."""
    for p in patterns:
        if p.startswith("re:"):
            if re.fullmatch(p[3:], name):
                return True
        elif name == p or name.endswith("." + p):
            return True
    return False


def target_linears(
    layer: nn.Module, prefix: str, targets: Sequence[str], ignore: Sequence[str]
) -> dict[str, nn.Linear]:
    """The Linear modules of one decoder layer to quantize, by full module name."""
    out = {}
    for rel, mod in layer.named_modules():
        full = f"{prefix}.{rel}" if rel else prefix
        if isinstance(mod, nn.Linear) and matches(full, targets) and not matches(full, ignore):
            out[full] = mod
    return out


def meta_model(model_dir: Path, trust_remote_code: bool = False) -> nn.Module:
    """The model built on the meta device from ``config.json`` alone (no weights read).

    Lint and pre-flight validation use it to learn module shapes, e.g. to refuse a
    group size that does not divide an input width before anything heavy runs.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(
        model_dir, local_files_only=True, trust_remote_code=trust_remote_code
    )
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)


def linear_shapes(
    model_dir: Path, targets: Sequence[str], ignore: Sequence[str], trust_remote_code: bool = False
) -> dict[str, tuple[int, int]]:
    """(out_features, in_features) of every targeted Linear in the decoder layers."""
    model = meta_model(model_dir, trust_remote_code)
    prefix, layers = decoder_layers(model)
    shapes: dict[str, tuple[int, int]] = {}
    for i, layer in enumerate(layers):
        for name, lin in target_linears(layer, f"{prefix}.{i}", targets, ignore).items():
            shapes[name] = (lin.out_features, lin.in_features)
    return shapes


def read_model_config(model_dir: Path) -> dict[str, Any]:
    """``config.json`` as a dict, with a clear error when the directory is not a model."""
    cfg = model_dir / "config.json"
    if not model_dir.is_dir():
        raise GptqflowError(f"model.path={str(model_dir)!r}: directory does not exist")
    if not cfg.is_file():
        raise GptqflowError(
            f"model.path={str(model_dir)!r}: no config.json (not a transformers model dir)"
        )
    try:
        data = json.loads(cfg.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise GptqflowError(f"{cfg}: unreadable config.json: {exc}") from exc
    if not isinstance(data, dict):
        raise GptqflowError(f"{cfg}: config.json is not a JSON object")
    return data


def group_size_problems(shapes: dict[str, tuple[int, int]], group_size: int) -> list[str]:
    """Input widths that ``group_size`` does not divide, with a suggestion that does."""
    if group_size == -1:
        return []
    widths = sorted({cols for _, cols in shapes.values()})
    bad = [w for w in widths if w % group_size]
    if not bad:
        return []
    ok = [g for g in (256, 128, 64, 32) if all(w % g == 0 for w in widths)]
    hint = f"use {' or '.join(map(str, ok))}" if ok else "use -1 (per channel)"
    return [
        f"group_size {group_size} does not divide the input width(s) {bad} of this model; {hint}"
    ]
