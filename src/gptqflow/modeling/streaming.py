"""A compressed-tensors checkpoint written while the layer loop runs, with nothing held back.

:func:`gptqflow.modeling.checkpoint.write_compressed_checkpoint` needs the whole
quantized model in memory. :class:`StreamingCheckpoint` plans the files instead: before
the first layer it knows every tensor the checkpoint will hold (name, dtype, shape: the
dense tensors from the model, the packed codes, scales and zero points from the scheme)
and so every shard's safetensors header and every tensor's offset. It creates the
shards at their full size, and each finished decoder layer's tensors are written at
their offsets at once; nothing of a written layer stays in memory, whatever the shard
size. The tensors outside the layers, the config, the generation config and the
tokenizer follow at :meth:`StreamingCheckpoint.finish`, which renames the directory into
place: until then only a hidden ``.NAME.partial`` directory exists.

The layout is the one ``safetensors`` itself writes (tensors ordered by dtype, then
name; the same header), so a model that fits in one shard gets a ``model.safetensors``
byte-identical to the in-memory writer's; larger ones get transformers' names
(``model-00001-of-0000N.safetensors``, ``model.safetensors.index.json``), a shard being
a run of whole decoder layers. A resumed run writes every layer again: the same bytes.

:meth:`StreamingCheckpoint.read_layer` reads a finished layer back from the written
checkpoint, dequantized with the same function the broadcast uses, so streamed
evaluation of the quantized model sees exactly the weights the loop installed.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import struct
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from compressed_tensors.compressors import unpack_from_int32
from compressed_tensors.config import CompressionFormat
from safetensors import safe_open

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
    _publish,
    _save_config,
    _tied_targets,
    build_quantization_config,
)
from gptqflow.modeling.layout import CheckpointLayout, assemble_experts
from gptqflow.modeling.targets import Target

log = logging.getLogger("gptqflow")


# safetensors' on-disk names and the order its writer lays dtypes out in (largest first).
_ST_DTYPES: dict[torch.dtype, str] = {
    torch.int64: "I64",
    torch.float64: "F64",
    torch.float32: "F32",
    torch.int32: "I32",
    torch.bfloat16: "BF16",
    torch.float16: "F16",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}
_ST_ORDER = {dtype: i for i, dtype in enumerate(_ST_DTYPES)}


@dataclass(frozen=True)
class _Spec:
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        n = self.dtype.itemsize
        for d in self.shape:
            n *= d
        return n


@dataclass
class _Shard:
    """One safetensors file: its tensors' offsets, fixed before any data is written."""

    file: str
    specs: dict[str, _Spec]
    offsets: dict[str, int] = field(default_factory=dict)
    data_start: int = 0
    size: int = 0

    def layout(self, metadata: Mapping[str, str]) -> bytes:
        """The header safetensors writes: dtype order, then name; padded to 8 bytes."""
        keys = sorted(self.specs, key=lambda k: (_ST_ORDER[self.specs[k].dtype], k))
        header: dict[str, Any] = {"__metadata__": dict(metadata)}
        offset = 0
        for k in keys:
            spec = self.specs[k]
            header[k] = {
                "dtype": _ST_DTYPES[spec.dtype],
                "shape": list(spec.shape),
                "data_offsets": [offset, offset + spec.nbytes],
            }
            self.offsets[k] = offset
            offset += spec.nbytes
        text = json.dumps(header, separators=(",", ":")).encode()
        text += b" " * (-len(text) % 8)
        self.data_start = 8 + len(text)
        self.size = self.data_start + offset
        return struct.pack("<Q", len(text)) + text


class StreamingCheckpoint:
    """The writer of one compressed-tensors checkpoint, fed layer by layer (rank 0 writes)."""

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
        self.format = format
        self.qconfig = build_quantization_config(args, ignore, format)
        self.fmt = CompressionFormat(self.qconfig.format)
        # In-memory names -> the checkpoint layout (set by ``plan``), and each quantized
        # target's kind and checkpoint module name.
        self.layout: CheckpointLayout | None = None
        self.kinds: dict[str, str] = {}
        self.unpacked: set[str] = set()  # quantized targets written as dense values
        self.module_names: dict[str, str] = {}
        self.writer = writer  # rank 0 writes; the others only read the result
        self.tmp = self.out_dir.parent / f".{self.out_dir.name}.partial"
        self.shards: list[_Shard] = []
        self.where: dict[str, _Shard] = {}
        self.written: set[str] = set()
        self.quantized: set[str] = set()
        self.total_bytes = 0
        self._spec_cache: dict[tuple[tuple[int, ...], torch.dtype], dict[str, _Spec]] = {}
        self.finished = False
        if writer:
            _check_destination(self.out_dir, overwrite)

    # -------------------------------------------------------------- the plan
    def plan(
        self,
        model: Any,
        targets: Sequence[Mapping[str, Target]],
        extra_ignore: Sequence[str] = (),
    ) -> None:
        """Every tensor of the checkpoint, its shard and offset; the shards created.

        ``targets``: per decoder layer, the weights that will be quantized (by full
        name). Shapes come from the modules (which may sit on the meta device).
        Tensor names follow the architecture's checkpoint layout
        (:class:`~gptqflow.modeling.layout.CheckpointLayout`). ``extra_ignore``: Linears
        left out by rule, not by the scheme (routers); the config's ignore list names them.
        """
        from gptqflow.modeling.structure import decoder_layers

        layout = self.layout = CheckpointLayout.of(model)
        self.ignore = layout.ignore_names([*self.ignore, *extra_ignore])
        self.qconfig = build_quantization_config(self.args, self.ignore, self.format)
        unpacked = []
        for layer_targets in targets:
            for name, t in layer_targets.items():
                self.kinds[name] = t.kind
                self.module_names[name] = layout.module_name(t)
                if not t.packable:
                    self.unpacked.add(name)
                    unpacked.append(name)
        if unpacked and self.writer:
            log.warning(
                "%d quantized %s weights are written with their quantized values in the model's "
                "dtype, not packed: compressed-tensors has no format for them (e.g. %s)",
                len(unpacked),
                sorted({self.kinds[n] for n in unpacked}),
                unpacked[0],
            )
        if not self.writer:
            return
        prefix, layers = decoder_layers(model)
        groups: list[dict[str, _Spec]] = []
        for i, layer in enumerate(layers):
            names = targets[i]
            packed = {t.source for t in names.values() if t.packable}
            specs = {
                disk: _Spec(v.dtype, shape)
                for k, v in layer.state_dict().items()
                if (full := f"{prefix}.{i}.{k}") not in packed
                for disk, shape in layout.split_shapes(full, tuple(v.shape)).items()
            }
            for name, target in names.items():
                if target.packable:
                    specs.update(self._module_specs(self.module_names[name], target))
            groups.append(specs)
        groups.append(
            {
                layout.tensor_name(k): _Spec(v.dtype, tuple(v.shape))
                for k, v in self._outside_layers(model, move=False).items()
            }
        )
        unsupported = {s.dtype for g in groups for s in g.values()} - set(_ST_DTYPES)
        if unsupported:
            raise GptqflowError(f"cannot write tensors of dtype {sorted(map(str, unsupported))}")
        self._split(groups)

    def _module_specs(self, name: str, target: Target) -> dict[str, _Spec]:
        """The serialized tensors of one quantized target (computed once per shape)."""
        weight = target.weight
        key = (tuple(weight.shape), weight.dtype)
        if key not in self._spec_cache:
            self._spec_cache[key] = self._specs_of(
                int(weight.shape[0]), int(weight.shape[1]), weight.dtype
            )
        return {f"{name}.{k}": v for k, v in self._spec_cache[key].items()}

    def _specs_of(self, rows: int, cols: int, dtype: torch.dtype) -> dict[str, _Spec]:
        """What the serializer makes of a zero result of this shape, by tensor suffix."""
        weight = torch.empty(rows, cols, dtype=dtype, device="meta")
        gs = self.args.group_size if self.args.group_size > 0 else cols
        ng = max(cols // gs, 1)
        zero = QuantResult(
            qweight=torch.zeros(rows, cols, dtype=torch.int8),
            scale=torch.ones(rows, ng, dtype=dtype),
            zero_point=torch.zeros(rows, ng, dtype=torch.int8),
            g_idx=None,
            dequant=torch.empty(0),
            loss=0.0,
            damp=0.0,
        )
        out = _module_tensors("m", zero, self.args, self.fmt, weight)
        return {k.removeprefix("m."): _Spec(v.dtype, tuple(v.shape)) for k, v in out.items()}

    def _split(self, groups: list[dict[str, _Spec]]) -> None:
        """Shards: runs of whole layers (then the rest) up to ``max_shard_bytes`` each."""
        total = sum(s.nbytes for g in groups for s in g.values())
        if total <= self.max_shard_bytes:
            plan = [{k: v for g in groups for k, v in g.items()}]
        else:
            plan = [{}]
            size = 0
            for g in groups:
                n = sum(s.nbytes for s in g.values())
                if plan[-1] and size + n > self.max_shard_bytes:
                    plan.append({})
                    size = 0
                plan[-1].update(g)
                size += n
        count = len(plan)
        for i, specs in enumerate(plan, start=1):
            name = WEIGHTS_NAME if count == 1 else f"model-{i:05d}-of-{count:05d}.safetensors"
            shard = _Shard(name, specs)
            self.shards.append(shard)
            for key in specs:
                self.where[key] = shard
        self.total_bytes = total
        if self.tmp.exists():  # a killed run's partial files: everything is written again
            shutil.rmtree(self.tmp)
        self.tmp.mkdir(parents=True)
        for shard in self.shards:
            with open(self.tmp / shard.file, "wb") as f:
                f.write(shard.layout(SAFETENSORS_METADATA))
                f.truncate(shard.size)

    # -------------------------------------------------------------- layers
    def add_layer(
        self,
        prefix: str,
        dense: Mapping[str, torch.Tensor],
        quantized: Mapping[str, QuantResult],
        weights: Mapping[str, torch.Tensor],
    ) -> None:
        """One finished decoder layer, written at its planned offsets.

        ``dense``: the layer's other parameters and persistent buffers by full
        (in-memory) name; ``quantized``: target name -> codes; ``weights``: target name
        -> the installed weight (its shape and dtype set the serialized scales' dtype).
        Written under the checkpoint layout's names.
        """
        self.quantized.update(quantized)
        if not self.writer:
            return
        layout = self.layout
        assert layout is not None, "plan() ran first"
        tensors = {
            disk: t.detach().to("cpu").contiguous()
            for k, v in dense.items()
            for disk, t in layout.split(k, v).items()
        }
        for name in sorted(set(quantized) - self.unpacked):
            tensors.update(
                _module_tensors(
                    self.module_names[name], quantized[name], self.args, self.fmt, weights[name]
                )
            )
        _check_finite(tensors)
        self._write(tensors)
        log.debug("checkpoint: %s written", prefix)

    def _write(self, tensors: Mapping[str, torch.Tensor]) -> None:
        by_shard: dict[str, list[str]] = {}
        for key, value in tensors.items():
            shard = self.where.get(key)
            if shard is None or shard.specs[key] != _Spec(value.dtype, tuple(value.shape)):
                planned = None if shard is None else shard.specs[key]
                raise GptqflowError(
                    f"checkpoint tensor {key} ({value.dtype}, {tuple(value.shape)}) does not "
                    f"match the planned layout ({planned}); a stage changed a tensor's shape "
                    "or dtype"
                )
            by_shard.setdefault(shard.file, []).append(key)
        for file, keys in by_shard.items():
            shard = self.where[keys[0]]
            with open(self.tmp / file, "r+b") as f:
                for key in sorted(keys, key=lambda k: shard.offsets[k]):
                    f.seek(shard.data_start + shard.offsets[key])
                    f.write(_raw_view(tensors[key]))
        self.written.update(tensors)

    # -------------------------------------------------------------- the end
    def finish(
        self,
        model: Any,
        tokenizer: Any = None,
        fetch: Callable[[str], torch.Tensor] | None = None,
    ) -> Path:
        """The rest of the model, config and tokenizer; the directory renamed into place.

        ``fetch(name)`` gives a tensor outside the layers when the model does not hold
        it (streamed weights): each is read, written and dropped in turn, so the
        embeddings and the head are never in memory together.
        """
        if not self.writer:
            self.finished = True
            return self.out_dir
        try:
            self._check_coverage(model)
            assert self.layout is not None, "plan() ran first"
            for name, value in self._outside_layers(model, move=False).items():
                tensor = fetch(name) if value.is_meta and fetch is not None else value
                one = {self.layout.tensor_name(name): tensor.detach().to("cpu").contiguous()}
                _check_finite(one)
                self._write(one)
                del tensor, one
            unwritten = sorted(set(self.where) - self.written)
            if unwritten:
                raise GptqflowError(
                    f"{len(unwritten)} planned checkpoint tensors were never written "
                    f"(e.g. {unwritten[:3]}): the layer loop did not finish every layer"
                )
            for shard in self.shards:
                with open(self.tmp / shard.file, "r+b") as f:
                    os.fsync(f.fileno())
            if len(self.shards) > 1:
                weight_map = {k: s.file for k, s in self.where.items()}
                index = {"metadata": {"total_size": self.total_bytes}, "weight_map": weight_map}
                (self.tmp / INDEX_NAME).write_text(
                    json.dumps(index, indent=2, sort_keys=True) + "\n"
                )
            _save_config(
                model, self.qconfig, self.tmp, actorder_group=self.args.actorder == "group"
            )
            if getattr(model, "generation_config", None) is not None:
                model.generation_config.save_pretrained(self.tmp)
            if tokenizer is not None:
                tokenizer.save_pretrained(self.tmp)
            _match_file_modes(self.tmp, reference=self.tmp / CONFIG_NAME)
            _check_destination(self.out_dir, self.overwrite)
            _publish(self.tmp, self.out_dir)
        except BaseException:
            shutil.rmtree(self.tmp, ignore_errors=True)
            raise
        self.finished = True
        log.info(
            "wrote %d quantized modules (%s) to %s in %d file(s)",
            len(self.quantized),
            self.fmt.value,
            self.out_dir,
            len(self.shards),
        )
        return self.out_dir

    def abort(self) -> None:
        """Remove the partial directory (a failed run leaves nothing that looks written)."""
        if self.writer and not self.finished:
            shutil.rmtree(self.tmp, ignore_errors=True)

    def _outside_layers(self, model: Any, move: bool = True) -> dict[str, torch.Tensor]:
        """Every tensor outside the decoder layers, minus tied copies (``move``: on the CPU;
        else as they are, possibly on the meta device, for their shapes)."""
        from gptqflow.modeling.structure import decoder_layers

        prefix, _ = decoder_layers(model)
        state = {k: v for k, v in model.state_dict().items() if not k.startswith(f"{prefix}.")}
        for target in _tied_targets(model, state, set()):
            del state[target]
        if not move:
            return state
        return {k: v.detach().to("cpu").contiguous() for k, v in state.items()}

    def _check_coverage(self, model: Any) -> None:
        """Every Linear the loader will treat as quantized was written quantized, and no other;
        every planned target of another kind (Conv1D, expert slice) was written quantized."""
        from compressed_tensors.utils import match_named_modules

        expected = {name for name, _ in match_named_modules(model, TARGETS, self.ignore)}
        linear = {n for n in self.quantized if self.kinds.get(n, "linear") == "linear"}
        missing = sorted(expected - linear)
        extra = sorted(linear - expected)
        unwritten = sorted(n for n in self.kinds if n not in self.quantized)
        if unwritten:
            raise GptqflowError(
                f"{len(unwritten)} planned targets were not quantized (e.g. {unwritten[:3]})"
            )
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
            if full.endswith(".weight") and module in self.quantized - self.unpacked:
                out[name] = self._dequantized(files, self.module_names.get(module, module), dtype)
            elif self.layout is not None and full in self.layout.pieces:
                out[name] = self._fused(files, full, dtype)
            else:
                out[name] = _read(
                    files, full if self.layout is None else self.layout.tensor_name(full)
                )
        return out

    def _fused(self, files: dict[str, Path], full: str, dtype: torch.dtype) -> torch.Tensor:
        """A fused expert parameter assembled from its experts' written tensors."""
        assert self.layout is not None
        in_memory = {disk: mem for mem, disk in self.module_names.items()}
        parts: dict[str, torch.Tensor] = {}
        for piece in self.layout.pieces[full]:
            module = piece.name.removesuffix(".weight")
            if in_memory.get(module) in self.quantized - self.unpacked:
                parts[piece.name] = self._dequantized(files, module, dtype)
            else:
                parts[piece.name] = _read(files, piece.name)
        return assemble_experts(self.layout.pieces[full], parts)

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


def _raw_view(t: torch.Tensor) -> memoryview:
    """A tensor's little-endian bytes as safetensors stores them, without copying them."""
    flat = t.detach().to("cpu").contiguous().reshape(-1)
    return flat.view(torch.uint8).numpy().data if flat.numel() else memoryview(b"")
