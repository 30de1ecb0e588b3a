"""Finding the parts of a causal LM that the pipeline works on, without loading weights."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from gptqflow.errors import GptqflowError
from gptqflow.modeling.targets import Target, layer_targets, matches

__all__ = ["decoder_layers", "matches", "meta_model", "target_shapes", "target_weights"]


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


def target_weights(
    layer: nn.Module, prefix: str, targets: Sequence[str], ignore: Sequence[str]
) -> dict[str, Target]:
    """The weights of one decoder layer to quantize (every target kind), by full name."""
    return layer_targets(layer, prefix, targets, ignore).targets


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


def target_shapes(
    model_dir: Path, targets: Sequence[str], ignore: Sequence[str], trust_remote_code: bool = False
) -> dict[str, tuple[int, int]]:
    """(out, in) of every targeted weight in the decoder layers, from ``config.json`` alone.

    Raises :class:`GptqflowError` for an architecture with weights no target kind
    covers (before any weight is read).
    """
    model = meta_model(model_dir, trust_remote_code)
    prefix, layers = decoder_layers(model)
    shapes: dict[str, tuple[int, int]] = {}
    for i, layer in enumerate(layers):
        for name, t in target_weights(layer, f"{prefix}.{i}", targets, ignore).items():
            shapes[name] = t.shape
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
