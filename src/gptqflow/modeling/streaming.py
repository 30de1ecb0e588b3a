"""A compressed-tensors checkpoint written while the layer loop runs, one shard at a time.

:func:`gptqflow.modeling.checkpoint.write_compressed_checkpoint` needs the whole
quantized model in memory. :class:`StreamingCheckpoint` takes the decoder layers as
they finish instead: each layer's tensors (packed codes, scales, its norms) join a
pending shard, which is written to disk as soon as the next layer of the same size
would push it past ``max_shard_bytes``; then the memory is free again. The tensors
outside the layers, the config, the generation config and the tokenizer follow at
:meth:`StreamingCheckpoint.finish`, which names the shards the way transformers does
(``model-00001-of-0000N.safetensors`` and ``model.safetensors.index.json``) and renames
the directory into place: until then only a hidden ``.NAME.partial`` directory exists.

Shard boundaries depend only on the layers written so far, so a resumed run that
feeds the same layers again writes the same bytes. A model that fits in one shard
gets one ``model.safetensors``, byte-identical to what the in-memory writer produces.

:meth:`StreamingCheckpoint.read_layer` reads a finished layer back from the written
checkpoint, dequantized with the same function the broadcast uses, so streamed
evaluation of the quantized model sees exactly the weights the loop installed.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from compressed_tensors.compressors import unpack_from_int32
from compressed_tensors.config import CompressionFormat
from safetensors import safe_open
from safetensors.torch import save_file

from gptqflow.errors import GptqflowError
from gptqflow.gptq.quantizer import column_groups, dequantize
from gptqflow.gptq.types import QuantArgs, QuantResult
from gptqflow.modeling.checkpoint import (
    CONFIG_NAME,
    INDEX_NAME,
    SAFETENSORS_METADATA,
    TARGETS,
    WEIGHTS_NAME,
    _check_destination,
    _check_finite,
    _match_file_modes,
    _module_tensors,
    _nbytes,
    _plan_shards,
    _publish,
    _save_config,
    _save_tensors,
    _tied_targets,
    build_quantization_config,
)

log = logging.getLogger("gptqflow")


def parse_size(text: str) -> int:
    """``"2GB"`` -> 2·10⁹ bytes, ``"512MiB"`` -> 512·2²⁰ (the spelling transformers accepts)."""
    units = {
        "KIB": 2**10,
        "MIB": 2**20,
        "GIB": 2**30,
        "TIB": 2**40,
        "KB": 10**3,
        "MB": 10**6,
        "GB": 10**9,
        "TB": 10**12,
        "B": 1,
    }
    t = text.strip().upper()
    for unit, factor in units.items():
        if t.endswith(unit):
            number = t[: -len(unit)].strip()
            try:
                value = float(number)
            except ValueError:
                break
            if value > 0:
                return int(value * factor)
            break
    raise ValueError(f"{text!r} is not a size such as 500MB, 2GB or 1GiB")


class StreamingCheckpoint:
    """Rank 0's writer of one compressed-tensors checkpoint, fed layer by layer."""

    def __init__(
        self,
        out_dir: Path,
        args: QuantArgs,
        *,
        ignore: Sequence[str],
        max_shard_bytes: int,
        overwrite: bool,
        format: str | None = None,
        writer: bool = True,
    ) -> None:
        self.out_dir = Path(out_dir)
        self.args = args
        self.ignore = list(ignore)
        self.max_shard_bytes = max_shard_bytes
        self.overwrite = overwrite
        self.qconfig = build_quantization_config(args, ignore, format)
        self.fmt = CompressionFormat(self.qconfig.format)
        self.writer = writer  # rank 0 writes; the others only read the result
        self.tmp = self.out_dir.parent / f".{self.out_dir.name}.partial"
        self.pending: dict[str, torch.Tensor] = {}
        self.shards: list[list[str]] = []  # keys of every shard written so far
        self.quantized: set[str] = set()
        self.total_bytes = 0
        self.finished = False
        if writer:
            _check_destination(self.out_dir, overwrite)
            if self.tmp.exists():  # a killed run's partial shards: they are written again
                shutil.rmtree(self.tmp)
            self.tmp.mkdir(parents=True)

    # -------------------------------------------------------------- layers
    def add_layer(
        self,
        prefix: str,
        dense: Mapping[str, torch.Tensor],
        quantized: Mapping[str, QuantResult],
        weights: Mapping[str, torch.Tensor],
    ) -> None:
        """One finished decoder layer: its dense tensors and its quantized modules.

        ``dense``: the layer's other parameters and persistent buffers by full name;
        ``quantized``: module name -> codes; ``weights``: module name -> the installed
        weight (its shape and dtype set the serialized scales' dtype).
        """
        self.quantized.update(quantized)
        if not self.writer:
            return
        tensors = {k: v.detach().to("cpu").contiguous() for k, v in dense.items()}
        for name in sorted(quantized):
            tensors.update(
                _module_tensors(name, quantized[name], self.args, self.fmt, weights[name])
            )
        _check_finite(tensors)
        size = sum(_nbytes(t) for t in tensors.values())
        self.pending.update(tensors)
        pending = sum(_nbytes(t) for t in self.pending.values())
        if pending + size > self.max_shard_bytes:  # the next layer (same size) would not fit
            self._flush()
        log.debug("checkpoint: %s queued (%d bytes)", prefix, size)

    def _flush(self) -> None:
        if not self.pending:
            return
        keys = sorted(self.pending)
        path = self.tmp / f"shard-{len(self.shards) + 1:05d}.safetensors"
        save_file({k: self.pending[k] for k in keys}, str(path), metadata=SAFETENSORS_METADATA)
        self.total_bytes += sum(_nbytes(self.pending[k]) for k in keys)
        self.shards.append(keys)
        self.pending = {}

    # -------------------------------------------------------------- the end
    def finish(self, model: Any, tokenizer: Any = None) -> Path:
        """The rest of the model, config and tokenizer; the directory renamed into place."""
        if not self.writer:
            self.finished = True
            return self.out_dir
        try:
            self._check_coverage(model)
            rest = self._outside_layers(model)
            _check_finite(rest)
            if not self.shards and (
                sum(_nbytes(t) for t in (*self.pending.values(), *rest.values()))
                <= self.max_shard_bytes
            ):
                # One file: exactly what the in-memory writer produces.
                _save_tensors({**self.pending, **rest}, self.tmp, None)
                self.pending = {}
            else:
                self.pending.update(rest)
                self._flush_rest()
                self._name_shards()
            _save_config(
                model, self.qconfig, self.tmp, actorder_group=self.args.actorder == "group"
            )
            if getattr(model, "generation_config", None) is not None:
                model.generation_config.save_pretrained(self.tmp)
            if tokenizer is not None:
                tokenizer.save_pretrained(self.tmp)
            _match_file_modes(self.tmp, reference=self.tmp / CONFIG_NAME)
            if self.out_dir.exists() and not self.overwrite:
                _check_destination(self.out_dir, self.overwrite)
            _publish(self.tmp, self.out_dir)
        except BaseException:
            shutil.rmtree(self.tmp, ignore_errors=True)
            raise
        self.finished = True
        log.info(
            "wrote %d quantized modules (%s) to %s",
            len(self.quantized),
            self.fmt.value,
            self.out_dir,
        )
        return self.out_dir

    def abort(self) -> None:
        """Remove the partial directory (a failed run leaves nothing that looks written)."""
        if self.writer and not self.finished:
            shutil.rmtree(self.tmp, ignore_errors=True)

    def _flush_rest(self) -> None:
        """What is pending (the last layers and the non-layer tensors), split at the cap."""
        for keys in _plan_shards(sorted(self.pending), self.pending, self.max_shard_bytes):
            if keys:
                part = {k: self.pending[k] for k in keys}
                saved, self.pending = self.pending, part
                self._flush()
                self.pending = {k: v for k, v in saved.items() if k not in part}

    def _name_shards(self) -> None:
        n = len(self.shards)
        weight_map: dict[str, str] = {}
        for i, keys in enumerate(self.shards, start=1):
            name = f"model-{i:05d}-of-{n:05d}.safetensors"
            os.replace(self.tmp / f"shard-{i:05d}.safetensors", self.tmp / name)
            weight_map.update(dict.fromkeys(keys, name))
        index = {"metadata": {"total_size": self.total_bytes}, "weight_map": weight_map}
        (self.tmp / INDEX_NAME).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")

    def _outside_layers(self, model: Any) -> dict[str, torch.Tensor]:
        """Every materialised tensor outside the decoder layers, minus tied copies."""
        from gptqflow.modeling.structure import decoder_layers

        prefix, _ = decoder_layers(model)
        state = {
            k: v
            for k, v in model.state_dict().items()
            if not k.startswith(f"{prefix}.") and not v.is_meta
        }
        for target in _tied_targets(model, state, set()):
            del state[target]
        return {k: v.detach().to("cpu").contiguous() for k, v in state.items()}

    def _check_coverage(self, model: Any) -> None:
        """Every Linear the loader will treat as quantized was written quantized, and no other."""
        from compressed_tensors.utils import match_named_modules

        expected = {name for name, _ in match_named_modules(model, TARGETS, self.ignore)}
        missing = sorted(expected - self.quantized)
        extra = sorted(self.quantized - expected)
        if missing:
            raise GptqflowError(
                f"{len(missing)} Linear modules are neither quantized nor ignored "
                f"(e.g. {missing[:3]}); quantize them or add them to scheme.ignore"
            )
        if extra:
            raise GptqflowError(
                f"{len(extra)} quantized modules are not Linear targets or are ignored "
                f"(e.g. {extra[:3]}); remove them from scheme.ignore {self.ignore}"
            )

    # -------------------------------------------------------------- reading back
    def read_layer(
        self, prefix: str, names: list[str], dtype: torch.dtype
    ) -> dict[str, torch.Tensor]:
        """A written layer's tensors (names relative to ``prefix``), quantized ones dequantized."""
        if not self.finished:
            raise GptqflowError(
                f"{prefix} was read back before the checkpoint {self.out_dir} was finished"
            )
        files = _tensor_files(self.out_dir)
        out: dict[str, torch.Tensor] = {}
        for name in names:
            full = f"{prefix}.{name}"
            module = full.removesuffix(".weight")
            if full.endswith(".weight") and module in self.quantized:
                out[name] = self._dequantized(files, module, dtype)
            else:
                out[name] = _read(files, full)
        return out

    def _dequantized(self, files: dict[str, Path], module: str, dtype: torch.dtype) -> torch.Tensor:
        scale = _read(files, f"{module}.weight_scale")
        if self.fmt == CompressionFormat.pack_quantized:
            shape = torch.Size(_read(files, f"{module}.weight_shape").tolist())
            codes = unpack_from_int32(
                _read(files, f"{module}.weight_packed"), self.args.bits, shape
            )
        else:
            codes = _read(files, f"{module}.weight")
        zp_key = f"{module}.weight_zero_point"
        if zp_key in files:
            zp = _read(files, zp_key)
            if self.fmt == CompressionFormat.pack_quantized:
                zp = unpack_from_int32(
                    zp, self.args.bits, torch.Size((codes.shape[0], scale.shape[-1])), packed_dim=0
                )
            zp = zp.to(torch.int8)
        else:
            zp = torch.zeros(scale.shape, dtype=torch.int8)
        g_key = f"{module}.weight_g_idx"
        g_idx = _read(files, g_key) if g_key in files else None
        groups = column_groups(codes.shape[1], self.args.group_size, g_idx, device=codes.device)
        return dequantize(codes, scale[:, groups], zp[:, groups]).to(dtype)


def _tensor_files(directory: Path) -> dict[str, Path]:
    index = directory / INDEX_NAME
    if index.exists():
        weight_map = json.loads(index.read_text())["weight_map"]
        return {k: directory / v for k, v in weight_map.items()}
    with safe_open(str(directory / WEIGHTS_NAME), framework="pt") as f:
        return dict.fromkeys(f.keys(), directory / WEIGHTS_NAME)


def _read(files: dict[str, Path], key: str) -> torch.Tensor:
    with safe_open(str(files[key]), framework="pt") as f:
        return f.get_tensor(key).clone()
