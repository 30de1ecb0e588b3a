"""Decoder-layer weights read when a layer needs them, and released when it is done.

A model loaded with ``model.weights=stream`` is built on the meta device: it holds no
weights. What lies outside the decoder layers (embeddings, the final norm, ``lm_head``)
is read while a step needs it (:meth:`WeightStore.outside`: the first layer's inputs,
the logits, the checkpoint's last tensors). A layer's tensors are read from the safetensors files just before the layer is
processed (:meth:`WeightStore.materialize`) and dropped afterwards
(:meth:`WeightStore.release`), so a rank's memory holds one layer at a time, not the
model. Each read opens the file, copies the layer's tensors out and closes it: the
file mapping is released with it, so no page of a finished layer stays counted
against the process.

The files hold the tensors under the names ``save_pretrained`` writes, which are not
always the in-memory ones: transformers renames some while loading (gpt_neox's
``embed_out`` is ``lm_head``) and fuses the experts of MoE blocks (Mixtral's
``experts.K.w1``/``w3`` become ``gate_up_proj [E, 2I, H]``). The architecture's
:class:`~gptqflow.modeling.layout.CheckpointLayout` (transformers' own conversion, read
once) says where each in-memory tensor lives: a renamed tensor is read under its file
name, and a fused one is assembled from its experts' tensors.

A layer may only be released while its current values can be read again. Before
quantization the original files hold them; once a stage changed a layer (the solve
installs quantized weights), the layer stays resident until a stage writes it
somewhere and relocates it there (:meth:`WeightStore.relocate`, e.g. the streaming
checkpoint writer). The store never drops values it cannot get back.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from gptqflow.errors import GptqflowError
from gptqflow.modeling.layout import CheckpointLayout, assemble_experts

log = logging.getLogger("gptqflow")

#: Reads one layer's tensors: (layer index, names relative to the layer) -> tensors by name.
LayerReader = Callable[[int, list[str]], dict[str, torch.Tensor]]


class TensorFiles:
    """Which safetensors file holds each tensor of a model directory (from the headers only).

    With a ``layout`` the keys are in-memory names: a renamed tensor is found under its
    file name, a fused expert parameter is assembled from its per-expert tensors.
    """

    def __init__(self, files: Iterable[Path], layout: CheckpointLayout | None = None) -> None:
        self.where: dict[str, Path] = {}
        for path in files:
            with safe_open(str(path), framework="pt") as f:
                for key in f.keys():  # noqa: SIM118 (safe_open is not a Mapping)
                    self.where[key] = path
        self.layout = layout

    def _disk(self, key: str) -> list[str]:
        """The file tensors that make the in-memory tensor ``key``."""
        if self.layout is None:
            return [key]
        if key in self.layout.pieces:
            return [p.name for p in self.layout.pieces[key]]
        return [self.layout.tensor_name(key)]

    def __contains__(self, key: str) -> bool:
        return all(k in self.where for k in self._disk(key))

    def read(self, keys: Iterable[str], dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
        """The tensors ``keys`` (each file opened once); no copy unless ``dtype`` casts or
        experts are assembled into one fused tensor."""
        keys = list(keys)
        got = self._read_disk([k for key in keys for k in self._disk(key)], dtype)
        out: dict[str, torch.Tensor] = {}
        for key in keys:
            if self.layout is not None and key in self.layout.pieces:
                out[key] = assemble_experts(self.layout.pieces[key], got)
            else:
                out[key] = got[self._disk(key)[0]]
        return out

    def _read_disk(self, keys: Iterable[str], dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
        by_file: dict[Path, list[str]] = {}
        for key in keys:
            by_file.setdefault(self.where[key], []).append(key)
        out: dict[str, torch.Tensor] = {}
        for path, names in by_file.items():
            with safe_open(str(path), framework="pt") as f:
                for key in names:
                    # A private mapping of the file: its pages are read when touched, and
                    # the mapping goes when the tensor does (the layer's release).
                    t = f.get_tensor(key)
                    cast = dtype is not None and t.is_floating_point() and t.dtype != dtype
                    out[key] = t.to(dtype) if cast else t
        return out


def missing_tensors(model: nn.Module, files: TensorFiles) -> list[str]:
    """Parameters of ``model`` that the files lack (under the layout's names, if any).

    Tied parameters (``lm_head.weight`` sharing the embedding) are found through the
    first name they are registered under. A model whose files hold something else than
    its layout says is loaded eagerly instead.
    """
    missing = []
    seen: set[int] = set()
    for name, param in model.named_parameters(remove_duplicate=False):
        if id(param) in seen:
            continue
        if name not in files:
            missing.append(name)
        seen.add(id(param))
    tied = getattr(model, "get_expanded_tied_weights_keys", None)
    if tied is not None:
        targets = set(tied(all_submodels=True))
        missing = [m for m in missing if m not in targets]
    return missing


def _tie(model: nn.Module) -> None:
    """Re-point tied parameters (``lm_head.weight`` -> the embedding) after a swap."""
    tie = getattr(model, "tie_weights", None)
    if callable(tie):
        tie()


def _get_tensor(root: nn.Module, name: str) -> torch.Tensor:
    owner_name, _, leaf = name.rpartition(".")
    owner = root.get_submodule(owner_name) if owner_name else root
    value = getattr(owner, leaf)
    assert isinstance(value, torch.Tensor)
    return value


def _set_tensor(root: nn.Module, name: str, value: torch.Tensor) -> None:
    owner_name, _, leaf = name.rpartition(".")
    owner = root.get_submodule(owner_name) if owner_name else root
    if leaf in owner._parameters:
        owner._parameters[leaf] = nn.Parameter(value, requires_grad=False)
    else:
        owner._buffers[leaf] = value


class WeightStore:
    """Where each decoder layer's current weights live; reads and drops them on demand."""

    def __init__(
        self,
        files: TensorFiles,
        prefix: str,
        layers: nn.ModuleList,
        dtype: torch.dtype | None,
        model: nn.Module | None = None,
    ) -> None:
        self.files = files
        self.prefix = prefix
        self.layers = layers
        self.dtype = dtype
        self.model = model
        self._outside_users = 0
        self._readers: dict[int, LayerReader] = {}
        self._resident: set[int] = set()
        self._changed: set[int] = set()
        self.bytes_read = 0

    # -------------------------------------------------------------- reading
    def _original(self, index: int, names: list[str]) -> dict[str, torch.Tensor]:
        full = {n: f"{self.prefix}.{index}.{n}" for n in names}
        got = self.files.read(full.values(), self.dtype)
        return {n: got[k] for n, k in full.items()}

    def materialize(self, index: int) -> nn.Module:
        """Layer ``index`` with its current weights in memory (a no-op when resident)."""
        layer = self.layers[index]
        if index in self._resident:
            return layer
        names = [n for n, p in layer.named_parameters() if p.is_meta]
        if names:
            reader = self._readers.get(index, self._original)
            tensors = reader(index, names)
            absent = sorted(set(names) - set(tensors))
            if absent:
                raise GptqflowError(
                    f"{self.prefix}.{index}: no stored values for {absent[:3]}; the weight "
                    "files (or the checkpoint being written) are incomplete"
                )
            for n in names:
                _set_tensor(layer, n, tensors[n])
                self.bytes_read += tensors[n].numel() * tensors[n].element_size()
        self._resident.add(index)
        return layer

    def release(self, index: int) -> bool:
        """Drop layer ``index``'s tensors if they can be read again; whether it was dropped."""
        if index not in self._readers and index in self._changed:
            return False
        layer = self.layers[index]
        for name, param in list(layer.named_parameters()):
            if not param.is_meta:
                _set_tensor(layer, name, torch.empty_like(param, device="meta"))
        self._resident.discard(index)
        return True

    # -------------------------------------------------------------- outside the layers
    def _outside(self) -> list[str]:
        assert self.model is not None
        inside = f"{self.prefix}."
        names = [n for n, _ in self.model.named_parameters(remove_duplicate=False)]
        names += [n for n, _ in self.model.named_buffers()]
        return [n for n in names if not n.startswith(inside) and n in self.files]

    def read_outside(self, name: str) -> torch.Tensor:
        """One tensor outside the decoder layers, read from the files (not kept)."""
        return self.files.read([name], self.dtype)[name]

    @contextmanager
    def outside(self) -> Iterator[None]:
        """The tensors outside the decoder layers (embeddings, final norm, head) in memory.

        Read when a step needs them (the first layer's inputs, the logits, the
        checkpoint's last tensors) and dropped afterwards: for a model with a large
        vocabulary they are a big share of what a rank would otherwise keep.
        """
        if self.model is None:
            yield
            return
        if self._outside_users == 0:
            names = [n for n in self._outside() if _get_tensor(self.model, n).is_meta]
            for name, value in self.files.read(names, self.dtype).items():
                _set_tensor(self.model, name, value)
            _tie(self.model)
        self._outside_users += 1
        try:
            yield
        finally:
            self._outside_users -= 1
            if self._outside_users == 0:
                for name in self._outside():
                    value = _get_tensor(self.model, name)
                    if isinstance(value, nn.Parameter) and not value.is_meta:
                        _set_tensor(self.model, name, torch.empty_like(value, device="meta"))
                _tie(self.model)

    # -------------------------------------------------------------- changes
    def mark_changed(self, index: int) -> None:
        """Layer ``index`` no longer equals the original files: keep it until relocated."""
        self._changed.add(index)
        self._readers.pop(index, None)

    def relocate(self, index: int, reader: LayerReader) -> None:
        """Layer ``index``'s current values can now be read with ``reader`` (it may be dropped)."""
        self._readers[index] = reader

    def relocated(self) -> Mapping[int, LayerReader]:
        return dict(self._readers)


def build_streamed(
    model_dir: Path,
    files: Iterable[Path],
    dtype: torch.dtype | None,
    *,
    trust_remote_code: bool = False,
) -> tuple[nn.Module, WeightStore] | str:
    """The model with only its non-layer tensors read, and the store for its layers.

    Returns the reason instead when the files do not hold every parameter under its
    module name (the model's loader renames tensors): the caller loads it eagerly.
    ``dtype`` None keeps the dtype of the config (``model.dtype=auto``).
    """
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    from gptqflow.modeling.structure import decoder_layers

    config = AutoConfig.from_pretrained(
        model_dir, local_files_only=True, trust_remote_code=trust_remote_code
    )
    want = dtype if dtype is not None else getattr(config, "dtype", None) or torch.float32
    if isinstance(want, str):
        want = getattr(torch, want)
    with init_empty_weights():  # parameters on meta, buffers (rotary tables) computed
        model = AutoModelForCausalLM.from_config(
            config, dtype=want, trust_remote_code=trust_remote_code
        )
    try:
        layout = CheckpointLayout.of(model)
    except GptqflowError as exc:
        return f"the checkpoint layout of this architecture is not known ({exc})"
    tensors = TensorFiles(files, layout)
    missing = missing_tensors(model, tensors)
    if missing:
        return (
            f"the weight files do not hold {len(missing)} parameter(s) under the names "
            f"transformers saves them with (e.g. {missing[:3]})"
        )
    prefix, layers = decoder_layers(model)
    stored = [n for n, _ in model.named_buffers() if n in tensors]  # persistent buffers
    for name, value in tensors.read(stored, want).items():
        _set_tensor(model, name, value)
    _tie(model)
    model.eval()
    model.requires_grad_(False)
    return model, WeightStore(tensors, prefix, layers, want, model)
