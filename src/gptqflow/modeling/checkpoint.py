"""Write and read back compressed-tensors checkpoints.

The output is the standard ``compressed-tensors`` layout that vLLM serves and
``transformers`` (through the compressed-tensors quantizer) loads:

* ``config.json`` with a ``quantization_config`` (``quant_method:
  "compressed-tensors"``, one config group targeting ``Linear``, the ``ignore``
  list, ``quantization_status: "compressed"``), serialized by the library itself
  (:meth:`ModelCompressor.update_config`), so its layout is the one
  llm-compressor writes;
* ``model.safetensors`` (or shards plus ``model.safetensors.index.json``) with, per
  quantized module, ``weight_packed`` (int32), ``weight_scale`` (the model's float
  dtype, because that is the dtype compressed-tensors allocates for scales at load
  time and vLLM expects the activation dtype), ``weight_shape`` (int64),
  ``weight_zero_point`` (asymmetric only) and ``weight_g_idx`` (actorder "group"
  only); every other parameter and persistent buffer unchanged;
* ``generation_config.json`` and tokenizer files when available.

Codes are packed with :func:`compressed_tensors.compressors.pack_to_int32` straight
from :attr:`QuantResult.qweight`. We deliberately do *not* call the compressor's
``compress()``: it re-quantizes ``round(weight / scale) + zp`` from the float
weights, and with bf16 weights ``(q * s) / s`` can round to a neighbouring code
(the error grows with ``|q|``), so the file would not hold what GPTQ chose. After
packing we unpack with the library and check the round trip, so a change in the
library's bit layout fails loudly here instead of producing a silently wrong model.

Format choice: the library's own :func:`infer_module_format` picks
``pack-quantized`` for every weight-only integer scheme of 1..8 bits, including
W8A16. That is also the only weight-only format vLLM accepts
(``CompressedTensorsWNA16`` requires ``pack-quantized``; ``int-quantized`` is an
activation-quantization format there and W8A16 in it raises). ``int-quantized``
(plain int8 ``weight``) can be forced with ``format=``; transformers loads it,
vLLM does not.

Not covered by :func:`write_compressed_checkpoint` (the one-shot writer): checkpoints
over a few GB in one file (pass ``max_shard_bytes``), sharded/offloaded models
(everything is materialized on CPU), targets other than ``nn.Linear`` and models whose
transformers class renames weights on load (``_weight_conversions``): tensors are
written under ``model.state_dict()`` names. The streaming writer the ``save`` stage uses
(:mod:`gptqflow.modeling.streaming`) handles every target kind and writes the
architecture's own layout (:mod:`gptqflow.modeling.layout`).

The writer knows nothing of ranks: the stage that calls it runs it on the main
rank only.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import shutil
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import compressed_tensors
import torch
from compressed_tensors.compressors import ModelCompressor, pack_to_int32, unpack_from_int32
from compressed_tensors.compressors.format import infer_module_format
from compressed_tensors.config import CompressionFormat
from compressed_tensors.quantization import (
    QuantizationArgs,
    QuantizationConfig,
    QuantizationScheme,
    QuantizationStatus,
    QuantizationStrategy,
)
from compressed_tensors.utils import match_named_modules
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from gptqflow.errors import GptqflowError
from gptqflow.gptq.numerics import all_finite
from gptqflow.gptq.types import QuantArgs, QuantResult

__all__ = [
    "CONFIG_NAME",
    "INDEX_NAME",
    "WEIGHTS_NAME",
    "build_quantization_config",
    "read_quantized_codes",
    "write_compressed_checkpoint",
]

log = logging.getLogger(__name__)

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
GROUP_NAME = "group_0"
TARGETS = ("Linear",)
# Our grids come from per-group min/max (then GPTQ picks the codes). The field is
# informational for re-calibrating tools; loaders ignore it.
SUPPORTED_FORMATS = (CompressionFormat.pack_quantized, CompressionFormat.int_quantized)
# safetensors metadata: fixed, so two writes of the same model are byte-identical.
SAFETENSORS_METADATA = {"format": "pt"}


# --------------------------------------------------------------------------- config


def build_quantization_config(
    args: QuantArgs,
    ignore: Sequence[str] = ("lm_head",),
    format: str | None = None,
) -> QuantizationConfig:
    """The library's config object for ``args``: one group, ``Linear`` targets.

    Built through compressed-tensors' pydantic models so that anything they reject
    fails here, at write time, not when a server loads the checkpoint. Usable
    before any model is loaded, to validate a recipe. actorder "static" is written
    under its canonical name "weight" (it changes only the GPTQ column order, not
    the format); actorder "group" is represented with ``actorder=None`` because compressed-tensors >= 0.20
    removed it from its models; :func:`write_compressed_checkpoint` writes the
    ``"group"`` value into the JSON itself (see ``_actorder_group_json``).
    """
    weights = QuantizationArgs(
        num_bits=args.bits,
        type="int",
        symmetric=args.symmetric,
        strategy=_strategy(args),
        group_size=args.group_size if args.group_size > 0 else None,
        actorder="weight" if args.actorder == "static" else None,
        dynamic=False,
        observer=args.observer,
    )
    scheme = QuantizationScheme(targets=list(TARGETS), weights=weights)
    scheme.format = _resolve_format(scheme, format)
    return QuantizationConfig(
        config_groups={GROUP_NAME: scheme},
        format=scheme.format.value,
        quantization_status=QuantizationStatus.COMPRESSED,
        ignore=list(ignore),
    )


def _strategy(args: QuantArgs) -> QuantizationStrategy:
    if args.group_size > 0:
        return QuantizationStrategy.GROUP
    if args.group_size == -1:
        if args.actorder == "group":
            raise GptqflowError(
                "actorder 'group' needs group quantization (group_size > 0); "
                "with group_size -1 use actorder 'static' or 'none'"
            )
        return QuantizationStrategy.CHANNEL
    raise GptqflowError(f"group_size must be > 0 or -1 (per channel), got {args.group_size}")


def _resolve_format(scheme: QuantizationScheme, requested: str | None) -> CompressionFormat:
    """The library's inferred format unless the caller forces a supported one."""
    names = [f.value for f in SUPPORTED_FORMATS]
    if requested is None:
        fmt = infer_module_format(torch.nn.Linear, scheme)
    elif requested in names:
        fmt = CompressionFormat(requested)
    else:
        raise GptqflowError(f"checkpoint format {requested!r} is not supported; use one of {names}")
    if fmt not in SUPPORTED_FORMATS:
        raise GptqflowError(
            f"compressed-tensors chose format {fmt.value!r}; expected one of {names}"
        )
    bits = scheme.weights.num_bits if scheme.weights is not None else 0
    if not 1 <= bits <= 8:
        raise GptqflowError(f"compressed-tensors integer checkpoints hold 1..8 bits, got {bits}")
    return fmt


# --------------------------------------------------------------------------- write


def write_compressed_checkpoint(
    model: PreTrainedModel,
    quantized: Mapping[str, QuantResult],
    args: QuantArgs,
    out_dir: Path,
    *,
    tokenizer: PreTrainedTokenizerBase | None = None,
    ignore: Sequence[str] = ("lm_head",),
    overwrite: bool = False,
    format: str | None = None,
    max_shard_bytes: int | None = None,
) -> Path:
    """Write ``model`` as a compressed-tensors checkpoint in ``out_dir``; return it.

    ``model`` (a ``transformers.PreTrainedModel``) holds float weights, with the
    dequantized weights already installed in the quantized modules; only its
    non-quantized tensors, config and generation config are read from it. The
    quantized modules' tensors come from ``quantized`` (module name ->
    :class:`QuantResult`), so the file holds exactly GPTQ's codes.

    Every ``Linear`` that compressed-tensors would match (targets ``Linear`` minus
    ``ignore``, with the library's matcher) must be in ``quantized`` and nothing in
    ``quantized`` may be ignored: at load time a matched module without packed
    weights would fail (or load garbage), so the mismatch is refused here.

    The write is atomic: everything goes into ``.{name}.tmp-<pid>`` next to
    ``out_dir`` and is renamed into place at the end; on failure the temporary
    directory is removed and an existing ``out_dir`` is left as it was. It is
    deterministic: the same inputs give byte-identical files.

    ``format``: ``None`` lets compressed-tensors choose (``pack-quantized``);
    ``"int-quantized"`` stores 8-bit codes unpacked (loads in transformers, not in
    vLLM for weight-only schemes). ``max_shard_bytes``: split the tensors into
    shards of at most this size plus an index json; ``None`` writes one
    ``model.safetensors`` (fine up to a few GB). Scales are cast to the module's
    weight dtype; the quantizer already rounds them to it before choosing codes.

    Loading caveats with compressed-tensors 0.20 (formats are right, loaders lag):
    asymmetric ``pack-quantized`` checkpoints load in transformers only with
    ``CompressedTensorsConfig(dequantize=True)``, and actorder "group" checkpoints
    not at all (vLLM reads both).
    """
    out_dir = Path(out_dir)
    _check_destination(out_dir, overwrite)
    qconfig = build_quantization_config(args, ignore, format)
    fmt = CompressionFormat(qconfig.format)
    _check_coverage(model, quantized, ignore)

    tensors = _dense_tensors(model, skip_modules=quantized.keys())
    for name in sorted(quantized):
        weight = model.get_parameter(f"{name}.weight")
        tensors.update(_module_tensors(name, quantized[name], args, fmt, weight))
    _check_finite(tensors)

    tmp = out_dir.parent / f".{out_dir.name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)  # left over from a killed run of a process with our pid
    tmp.mkdir(parents=True)
    try:
        _save_tensors(tensors, tmp, max_shard_bytes)
        _save_config(model, qconfig, tmp, actorder_group=args.actorder == "group")
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        _match_file_modes(tmp, reference=tmp / CONFIG_NAME)
        _publish(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("wrote %d quantized modules (%s) to %s", len(quantized), fmt.value, out_dir)
    return out_dir


def _check_destination(out_dir: Path, overwrite: bool) -> None:
    if out_dir.exists() and not out_dir.is_dir():
        raise GptqflowError(f"checkpoint path {out_dir} exists and is not a directory")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not overwrite:
        raise GptqflowError(
            f"checkpoint directory {out_dir} exists and is not empty; "
            "pass overwrite=true to replace it, or choose another output directory"
        )


def _check_finite(tensors: Mapping[str, torch.Tensor]) -> None:
    """Refuse to write NaN/Inf: a checkpoint that loads but generates garbage is worse than none.

    The solve stage stops at the layer where non-finite values appear; this is the
    last guard for tensors it never sees (embeddings, norms, an unquantized lm_head).
    """
    bad = [k for k, t in tensors.items() if t.is_floating_point() and not all_finite(t)]
    if bad:
        raise GptqflowError(
            f"refusing to write a checkpoint with NaN/Inf values in {len(bad)} tensor(s) "
            f"(e.g. {bad[:3]}); the model was already broken before quantization or a "
            "stage produced them: check the input model's weights and dtype"
        )


def _check_coverage(
    model: PreTrainedModel, quantized: Mapping[str, QuantResult], ignore: Sequence[str]
) -> None:
    """The modules the loader will treat as quantized must be exactly ``quantized``."""
    expected = {name for name, _ in match_named_modules(model, TARGETS, ignore)}
    given = set(quantized)
    missing = sorted(expected - given)
    extra = sorted(given - expected)
    if missing:
        raise GptqflowError(
            f"{len(missing)} Linear modules are neither quantized nor ignored "
            f"(e.g. {missing[:3]}); quantize them or add them to the checkpoint's ignore list"
        )
    if extra:
        raise GptqflowError(
            f"{len(extra)} quantized modules are not Linear targets or are ignored "
            f"(e.g. {extra[:3]}); remove them from the ignore list {list(ignore)}"
        )


def _dense_tensors(model: PreTrainedModel, skip_modules: Iterable[str]) -> dict[str, torch.Tensor]:
    """Every parameter/persistent buffer except quantized weights and tied copies."""
    state = model.state_dict()
    skipped = {f"{name}.weight" for name in skip_modules}
    for target in _tied_targets(model, state, skipped):
        del state[target]
    for key in skipped:
        del state[key]
    return {k: v.detach().to("cpu").contiguous() for k, v in state.items()}


def _tied_targets(
    model: PreTrainedModel, state: Mapping[str, torch.Tensor], quantized: set[str]
) -> list[str]:
    """Names that the config ties to another tensor (e.g. ``lm_head.weight``).

    transformers re-ties them at load, so writing them would only duplicate data
    (SmolLM2-135M's embedding is a fifth of the model). We refuse to drop a target
    whose values differ from its source: then the config is lying, and dropping
    it would silently change the model. A tied weight cannot be quantized: the
    other user of the tensor (the embedding) would need it dense.
    """
    tied: Mapping[str, str] = model.get_expanded_tied_weights_keys(all_submodels=True)
    targets = []
    for target, source in sorted(tied.items()):
        if target in quantized or source in quantized:
            raise GptqflowError(
                f"{target} is tied to {source} and cannot be quantized; add it to the "
                "ignore list or untie the weights (tie_word_embeddings=false)"
            )
        if target not in state:
            continue
        if source in state and not _same_values(state[target], state[source]):
            raise GptqflowError(
                f"config ties {target} to {source} but their values differ; "
                "set tie_word_embeddings=false in the model config or re-tie the weights"
            )
        targets.append(target)
    return targets


def _same_values(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.data_ptr() == b.data_ptr() or (a.shape == b.shape and torch.equal(a, b))


def _module_tensors(
    name: str,
    result: QuantResult,
    args: QuantArgs,
    fmt: CompressionFormat,
    weight: torch.Tensor,
) -> dict[str, torch.Tensor]:
    """The serialized tensors of one quantized Linear, under compressed-tensors' names."""
    rows, cols = weight.shape
    n_groups = _check_result(name, result, args, rows, cols)
    codes = result.qweight.detach().to("cpu", torch.int8).contiguous()
    zero_point = result.zero_point.detach().to("cpu", torch.int8).contiguous()
    out: dict[str, torch.Tensor] = {
        "weight_scale": result.scale.detach().to("cpu", weight.dtype).contiguous(),
    }
    if fmt == CompressionFormat.pack_quantized:
        packed = pack_to_int32(codes, args.bits)
        _check_round_trip(name, unpack_from_int32(packed, args.bits, codes.shape), codes)
        out["weight_packed"] = packed
        out["weight_shape"] = torch.tensor([rows, cols], dtype=torch.int64)
        if not args.symmetric:
            # the library packs zero points along the output dim (packed_dim=0)
            out["weight_zero_point"] = pack_to_int32(zero_point, args.bits, packed_dim=0)
    else:
        out["weight"] = codes
        if not args.symmetric:
            out["weight_zero_point"] = zero_point
    if args.actorder == "group":
        out["weight_g_idx"] = _g_idx(result, cols, args.group_size, n_groups)
    return {f"{name}.{key}": value for key, value in out.items()}


def _check_result(name: str, result: QuantResult, args: QuantArgs, rows: int, cols: int) -> int:
    """Validate one QuantResult against the module and ``args``; return n_groups."""
    if args.group_size > 0 and cols % args.group_size:
        raise GptqflowError(
            f"{name}: in_features {cols} is not a multiple of group_size {args.group_size}, "
            "which compressed-tensors requires; choose a group size that divides it"
        )
    n_groups = cols // args.group_size if args.group_size > 0 else 1
    q, scale, zp = result.qweight, result.scale, result.zero_point
    if tuple(q.shape) != (rows, cols) or q.dtype != torch.int8:
        raise ValueError(
            f"{name}: qweight must be int8 {(rows, cols)}, got {q.dtype} {tuple(q.shape)}"
        )
    if tuple(scale.shape) != (rows, n_groups) or not scale.is_floating_point():
        raise ValueError(
            f"{name}: scale must be float {(rows, n_groups)}, got {tuple(scale.shape)}"
        )
    if tuple(zp.shape) != (rows, n_groups) or zp.is_floating_point():
        raise ValueError(
            f"{name}: zero_point must be int {(rows, n_groups)}, got {tuple(zp.shape)}"
        )
    if int(q.min()) < args.qmin or int(q.max()) > args.qmax:
        raise ValueError(f"{name}: codes outside [{args.qmin}, {args.qmax}] for {args.bits} bits")
    if args.symmetric and bool(zp.any()):
        raise ValueError(f"{name}: symmetric quantization needs zero_point == 0")
    if int(zp.min()) < args.qmin or int(zp.max()) > args.qmax:
        # compressed-tensors packs zero points with the codes' bit width
        raise ValueError(f"{name}: zero_point outside [{args.qmin}, {args.qmax}]")
    if result.g_idx is not None and args.actorder != "group":
        raise ValueError(f"{name}: g_idx given but actorder is {args.actorder!r}")
    return n_groups


def _g_idx(result: QuantResult, cols: int, group_size: int, n_groups: int) -> torch.Tensor:
    """int32 group of every input column, the layout vLLM's ``weight_g_idx`` expects.

    A QuantResult under actorder "group" may omit g_idx when the order left groups
    contiguous; the config still says "group", so loaders expect the tensor.
    """
    if result.g_idx is None:
        return torch.arange(cols, dtype=torch.int32) // group_size
    g_idx = result.g_idx.detach().to("cpu", torch.int32).contiguous()
    if tuple(g_idx.shape) != (cols,) or int(g_idx.min()) < 0 or int(g_idx.max()) >= n_groups:
        raise ValueError(f"g_idx must be ({cols},) with values in [0, {n_groups})")
    return g_idx


def _check_round_trip(name: str, unpacked: torch.Tensor, codes: torch.Tensor) -> None:
    if not torch.equal(unpacked, codes):
        raise RuntimeError(
            f"{name}: compressed-tensors {compressed_tensors.__version__} does not unpack "
            "what it packed; refusing to write a checkpoint with wrong codes"
        )


def _save_tensors(
    tensors: Mapping[str, torch.Tensor], directory: Path, max_shard_bytes: int | None
) -> None:
    """One ``model.safetensors``, or size-capped shards with an index json."""
    keys = sorted(tensors)
    shards = _plan_shards(keys, tensors, max_shard_bytes)
    if len(shards) == 1:
        save_file(
            {k: tensors[k] for k in keys},
            str(directory / WEIGHTS_NAME),
            metadata=SAFETENSORS_METADATA,
        )
        return
    weight_map: dict[str, str] = {}
    for i, shard in enumerate(shards, start=1):
        file = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(
            {k: tensors[k] for k in shard}, str(directory / file), metadata=SAFETENSORS_METADATA
        )
        weight_map.update(dict.fromkeys(shard, file))
    total = sum(_nbytes(t) for t in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    _write_json(directory / INDEX_NAME, index)


def _plan_shards(
    keys: Sequence[str], tensors: Mapping[str, torch.Tensor], max_shard_bytes: int | None
) -> list[list[str]]:
    """Greedy split of the sorted keys; a tensor larger than the cap gets its own shard."""
    if max_shard_bytes is None:
        return [list(keys)]
    if max_shard_bytes <= 0:
        raise GptqflowError(f"max_shard_bytes must be positive, got {max_shard_bytes}")
    shards: list[list[str]] = [[]]
    size = 0
    for key in keys:
        n = _nbytes(tensors[key])
        if shards[-1] and size + n > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(key)
        size += n
    return shards


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _save_config(
    model: PreTrainedModel, qconfig: QuantizationConfig, directory: Path, *, actorder_group: bool
) -> None:
    """``config.json``: the model's config plus the library-serialized quantization_config.

    ``dtype`` is pinned to the model's dtype (the scales' dtype) and
    ``architectures`` to the model class, which vLLM needs to pick the model.
    """
    config = copy.deepcopy(model.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = model.dtype
    config.architectures = [type(model).__name__]
    config.save_pretrained(directory)
    ModelCompressor(quantization_config=qconfig).update_config(str(directory))
    if actorder_group:
        _actorder_group_json(directory / CONFIG_NAME)


def _actorder_group_json(config_path: Path) -> None:
    """Write ``"actorder": "group"`` into the weights args of every config group.

    compressed-tensors >= 0.20 rejects actorder "group" (g_idx) in its models, so
    transformers with that library cannot load such a checkpoint; vLLM's
    ``CompressedTensorsWNA16`` (with the compressed-tensors it pins) still reads
    ``actorder: "group"`` and ``weight_g_idx``. We write the field as the library
    versions that support it did, and warn.
    """
    data = json.loads(config_path.read_text())
    for group in data["quantization_config"]["config_groups"].values():
        group["weights"]["actorder"] = "group"
    config_path.write_text(json.dumps(data, indent=2, sort_keys=True))
    if not _library_accepts_actorder_group():
        log.warning(
            "actorder 'group' checkpoint: compressed-tensors %s (and transformers through it) "
            "cannot load it; vLLM with an older compressed-tensors can",
            compressed_tensors.__version__,
        )


def _library_accepts_actorder_group() -> bool:
    try:
        QuantizationArgs(num_bits=4, group_size=128, actorder="group")
    except ValueError:
        return False
    return True


def _write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def _match_file_modes(directory: Path, reference: Path) -> None:
    """Give every file the mode of ``reference`` (created with the process umask).

    safetensors creates its files 0600, which would keep a server running as
    another user (a shared vLLM deployment) from reading the checkpoint.
    """
    mode = reference.stat().st_mode & 0o777
    for path in directory.iterdir():
        if path.is_file():
            path.chmod(mode)


def _publish(tmp: Path, out_dir: Path) -> None:
    """Move the finished ``tmp`` to ``out_dir``, replacing an old one only now.

    ``rename`` cannot replace a non-empty directory, so the old one is first moved
    aside, and moved back if the final rename fails.
    """
    if not out_dir.exists():
        os.replace(tmp, out_dir)
        return
    old = out_dir.parent / f".{out_dir.name}.old-{os.getpid()}"
    if old.exists():
        shutil.rmtree(old)
    os.replace(out_dir, old)
    try:
        os.replace(tmp, out_dir)
    except BaseException:
        os.replace(old, out_dir)
        raise
    shutil.rmtree(old, ignore_errors=True)


# --------------------------------------------------------------------------- read


def read_quantized_codes(checkpoint_dir: Path | str) -> dict[str, dict[str, torch.Tensor]]:
    """Per quantized module: ``qweight`` (int8 codes), ``scale``, ``zero_point`` (int8),
    and ``g_idx`` (int32, only for actorder "group"), as stored in the checkpoint.

    Unpacked with the library's :func:`unpack_from_int32`, so this is what any
    compressed-tensors loader sees. ``zero_point`` is all zeros for symmetric
    schemes (the checkpoint omits it), matching :class:`QuantResult`. Used by tests
    and to compare checkpoints written by 1 and N ranks.
    """
    checkpoint_dir = Path(checkpoint_dir)
    weights = _read_weights_args(checkpoint_dir)
    bits = int(weights["num_bits"])
    packed_format = weights["format"] == CompressionFormat.pack_quantized.value
    tensors = _read_tensors(checkpoint_dir)
    modules = sorted(
        k.removesuffix(".weight_scale") for k in tensors if k.endswith(".weight_scale")
    )
    return {name: _module_codes(name, tensors, bits, packed_format) for name in modules}


def _read_weights_args(checkpoint_dir: Path) -> dict[str, Any]:
    """The single config group's weights args (plus its format) from config.json.

    Read as plain JSON, not through the library's models, so checkpoints with
    actorder "group" (rejected by compressed-tensors >= 0.20) can be read too.
    """
    config = json.loads((checkpoint_dir / CONFIG_NAME).read_text())
    qconfig = config.get("quantization_config")
    if not qconfig or qconfig.get("quant_method") != "compressed-tensors":
        raise GptqflowError(f"{checkpoint_dir} is not a compressed-tensors checkpoint")
    groups = list(qconfig["config_groups"].values())
    if len(groups) != 1 or not groups[0].get("weights"):
        raise GptqflowError(
            f"{checkpoint_dir}: expected one config group with weight quantization, got {len(groups)}"
        )
    return {**groups[0]["weights"], "format": groups[0].get("format") or qconfig["format"]}


def _read_tensors(checkpoint_dir: Path) -> dict[str, torch.Tensor]:
    """The quantized modules' tensors (those with a ``weight_scale``), from all files."""
    index = checkpoint_dir / INDEX_NAME
    if index.exists():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    else:
        files = [WEIGHTS_NAME]
    keys: dict[str, str] = {}
    for file in files:
        with safe_open(str(checkpoint_dir / file), framework="pt") as f:
            keys.update(dict.fromkeys(f.keys(), file))
    modules = {k.removesuffix(".weight_scale") for k in keys if k.endswith(".weight_scale")}
    tensors: dict[str, torch.Tensor] = {}
    for file in files:
        with safe_open(str(checkpoint_dir / file), framework="pt") as f:
            for key in sorted(k for k, v in keys.items() if v == file):
                module, _, param = key.rpartition(".")
                if module in modules and param in _QUANT_PARAMS:
                    tensors[key] = f.get_tensor(key)
    return tensors


# Tensors of a quantized module ("weight" holds the int8 codes in int-quantized).
_QUANT_PARAMS = frozenset(
    {"weight", "weight_packed", "weight_scale", "weight_zero_point", "weight_shape", "weight_g_idx"}
)


def _module_codes(
    name: str, tensors: Mapping[str, torch.Tensor], bits: int, packed_format: bool
) -> dict[str, torch.Tensor]:
    scale = tensors[f"{name}.weight_scale"]
    zp = tensors.get(f"{name}.weight_zero_point")
    if packed_format:
        shape = torch.Size(tensors[f"{name}.weight_shape"].tolist())
        codes = unpack_from_int32(tensors[f"{name}.weight_packed"], bits, shape)
        if zp is not None:
            zp = unpack_from_int32(zp, bits, torch.Size((shape[0], scale.shape[-1])), packed_dim=0)
    else:
        codes = tensors[f"{name}.weight"]
    if zp is None:  # symmetric: the checkpoint omits the zeros
        zp = torch.zeros(scale.shape, dtype=torch.int8)
    out = {"qweight": codes, "scale": scale, "zero_point": zp.to(torch.int8)}
    if f"{name}.weight_g_idx" in tensors:
        out["g_idx"] = tensors[f"{name}.weight_g_idx"]
    return out
