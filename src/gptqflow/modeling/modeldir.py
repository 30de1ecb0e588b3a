"""Checking a model directory before trusting it: config, architecture, weight files.

A model directory comes from outside (a download, a colleague, a half-finished
copy), so it is checked before transformers touches it, for three reasons:

* transformers' own errors for a broken directory are long, name internal files
  and often suggest a hub download, which ``local_files_only`` forbids anyway;
* pickle weights (``*.bin``, ``*.pt``) run arbitrary code when unpickled, so they
  are refused unless the user opts in with ``model.allow_pickle=true``; where
  safetensors exist they are always preferred;
* a truncated or corrupt safetensors file is found from its header alone (a few
  KB read, no weights), in a second, instead of after the other ranks have loaded.

The checks read ``config.json`` and the safetensors headers only, so pre-flight
can run them on every rank before any weights are loaded.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gptqflow.errors import GptqflowError
from gptqflow.modeling.structure import read_model_config

SAFETENSORS_INDEX = "model.safetensors.index.json"
# Weight files that are Python pickles (torch.save): loading one can execute code.
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")
# A safetensors header larger than this is not a header but garbage (the format's own
# reader refuses headers over 100 MB).
_MAX_HEADER_BYTES = 100_000_000


@dataclass(frozen=True)
class WeightFiles:
    """The weight files the load will read, and whether they are safetensors."""

    files: tuple[Path, ...]
    safetensors: bool


def supported_model_types() -> list[str]:
    """``model_type`` values transformers can build as a causal LM, sorted."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)


def check_architecture(model_dir: Path, config: dict[str, Any], *, trust_remote_code: bool) -> None:
    """Refuse a ``config.json`` whose ``model_type`` transformers cannot build as a causal LM.

    A directory that ships its own modeling code (``auto_map``) is accepted only with
    ``trust_remote_code``: that code runs with the user's rights.
    """
    key = f"{model_dir / 'config.json'}: model_type"
    model_type = config.get("model_type")
    auto_map = config.get("auto_map")
    remote = auto_map.get("AutoModelForCausalLM") if isinstance(auto_map, dict) else None
    supported = supported_model_types()
    if isinstance(model_type, str) and model_type in supported:
        return
    if remote and trust_remote_code:
        return  # the directory's own code defines the architecture
    if remote:
        raise GptqflowError(
            f"{key}={model_type!r}: the architecture is defined by Python code shipped in the "
            f"model directory (auto_map: {remote!r}), which is not "
            "run by default; set model.trust_remote_code=true only if you trust that code"
        )
    what = (
        " is missing"
        if model_type is None
        else f"={model_type!r} is not an architecture transformers can load as a causal LM"
    )
    raise GptqflowError(
        f"{key}{what}; supported model_type values ({len(supported)}): {', '.join(supported)}"
    )


def weight_files(
    model_dir: Path, *, allow_pickle: bool, opt_in: str = "model.allow_pickle=true"
) -> WeightFiles:
    """The weight files of ``model_dir``: safetensors if any, else pickle files if allowed.

    Every safetensors file is checked for truncation or corruption from its header;
    a sharded model's index must name only files that exist. ``opt_in`` is how the
    user allows pickle files where this is called (a recipe key, a CLI flag).
    """
    index = model_dir / SAFETENSORS_INDEX
    if index.is_file():
        files = _index_shards(index)
    else:
        files = sorted(model_dir.glob("*.safetensors"))
    if files:
        for f in files:
            check_safetensors(f)
        return WeightFiles(tuple(files), safetensors=True)
    pickles = sorted(p for p in model_dir.iterdir() if p.suffix in PICKLE_SUFFIXES and p.is_file())
    if not pickles:
        raise GptqflowError(
            f"model.path={str(model_dir)!r}: no weights (no *.safetensors, no "
            f"{SAFETENSORS_INDEX}); point model.path at a complete model directory"
        )
    names = ", ".join(p.name for p in pickles)
    if not allow_pickle:
        raise GptqflowError(
            f"model.path={str(model_dir)!r}: the weights are only in pickle format ({names}); "
            "unpickling can run arbitrary code, so they are not loaded by default. Convert "
            "them to safetensors (load the model once with transformers and save_pretrained "
            f"it), or set {opt_in} if you trust these files"
        )
    return WeightFiles(tuple(pickles), safetensors=False)


def _index_shards(index: Path) -> list[Path]:
    """The shard files named by a ``model.safetensors.index.json`` (each must exist)."""
    try:
        data = json.loads(index.read_text())
        shards = sorted(set(data["weight_map"].values()))
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise GptqflowError(
            f"{index}: not a valid safetensors index (expected a JSON object with a "
            f"'weight_map' of tensor name -> file): {exc}"
        ) from None
    files = [index.parent / str(s) for s in shards]
    missing = [f.name for f in files if not f.is_file()]
    if missing:
        raise GptqflowError(
            f"{index}: names {len(missing)} shard file(s) that do not exist ({', '.join(missing)}); "
            "the model directory is incomplete: copy or download it again"
        )
    return files


def check_safetensors(path: Path) -> None:
    """Raise if ``path`` is not a complete safetensors file (reads the header only).

    The format is an 8-byte little-endian header length, a JSON header giving every
    tensor's byte range, then the data; a complete file ends exactly where the last
    range ends, so truncation shows as a size mismatch without reading any tensor.
    """
    size = path.stat().st_size
    advice = "the file is damaged or was not copied completely: copy or download it again"
    try:
        with path.open("rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise _Corrupt(f"only {size} bytes, too short for a header")
            (n,) = struct.unpack("<Q", head)
            if n > _MAX_HEADER_BYTES or 8 + n > size:
                raise _Corrupt(f"header length {n} does not fit in the file's {size} bytes")
            header = json.loads(f.read(n))
    except _Corrupt as exc:
        raise GptqflowError(f"{path}: not a valid safetensors file ({exc}); {advice}") from None
    except (OSError, ValueError) as exc:
        raise GptqflowError(f"{path}: not a valid safetensors file ({exc}); {advice}") from None
    if not isinstance(header, dict):
        raise GptqflowError(f"{path}: not a valid safetensors file (header is not a JSON object)")
    try:
        end = max(
            (int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"),
            default=0,
        )
    except (KeyError, TypeError, ValueError, IndexError):
        raise GptqflowError(
            f"{path}: not a valid safetensors file (a tensor entry has no data_offsets); {advice}"
        ) from None
    expected = 8 + n + end
    if size != expected:
        state = "truncated" if size < expected else "longer than its header says"
        raise GptqflowError(
            f"{path}: {state}: the header describes {expected} bytes but the file has {size}; "
            f"{advice}"
        )


class _Corrupt(Exception):
    """Internal: a header that cannot be a safetensors header."""


def check_model_dir(
    model_dir: Path,
    *,
    allow_pickle: bool = False,
    trust_remote_code: bool = False,
    opt_in: str = "model.allow_pickle=true",
) -> WeightFiles:
    """All checks of a model directory; return the weight files the load will use."""
    config = read_model_config(model_dir)
    check_architecture(model_dir, config, trust_remote_code=trust_remote_code)
    return weight_files(model_dir, allow_pickle=allow_pickle, opt_in=opt_in)
