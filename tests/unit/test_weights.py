"""Streamed weights: the meta-built model equals transformers' load, layers come and go."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import AutoModelForCausalLM

from gptqflow.modeling.modeldir import weight_files
from gptqflow.modeling.perplexity import eval_windows, layerwise_nll, window_nll
from gptqflow.modeling.weights import WeightStore, build_streamed
from helpers import make_tiny_llama


def _streamed(model_dir: Path) -> tuple[Any, WeightStore]:
    built = build_streamed(model_dir, weight_files(model_dir, allow_pickle=False).files, None)
    assert not isinstance(built, str), built
    return built


def _resident(model: Any) -> int:
    return sum(p.numel() for p in model.parameters() if not p.is_meta)


@pytest.mark.parametrize("tied", [False, True])
def test_streamed_model_holds_nothing_until_asked(
    tiny_llama_dir: Path, tiny_tokenizer_dir: Path, tmp_path: Path, tied: bool
) -> None:
    model_dir = (
        make_tiny_llama(tmp_path, tiny_tokenizer_dir, tie_word_embeddings=True)
        if tied
        else tiny_llama_dir
    )
    model, store = _streamed(model_dir)
    assert _resident(model) == 0
    outside = sum(
        p.numel() for n, p in model.named_parameters() if not n.startswith("model.layers")
    )
    with store.outside():
        assert _resident(model) == outside > 0
        assert (model.lm_head.weight is model.model.embed_tokens.weight) == tied
        with store.outside():  # nested users share one read
            pass
        assert _resident(model) == outside
        eager = AutoModelForCausalLM.from_pretrained(model_dir)
        assert torch.equal(model.lm_head.weight, eager.lm_head.weight)
    assert _resident(model) == 0
    assert (model.lm_head.weight is model.model.embed_tokens.weight) == tied


def test_materialised_layers_equal_transformers_load(tiny_llama_dir: Path) -> None:
    model, store = _streamed(tiny_llama_dir)
    for i in range(len(store.layers)):
        store.materialize(i)
    eager = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    with store.outside():
        _assert_same(model, eager)


def _assert_same(model: Any, eager: Any) -> None:
    mine = dict(model.named_parameters(remove_duplicate=False))
    theirs = dict(eager.named_parameters(remove_duplicate=False))
    assert mine.keys() == theirs.keys()
    for name, value in theirs.items():
        assert mine[name].dtype == value.dtype and torch.equal(mine[name], value), name
    for name, value in eager.named_buffers():
        assert torch.equal(dict(model.named_buffers())[name], value), name


def test_release_drops_a_layer_unless_it_changed_and_was_not_relocated(
    tiny_llama_dir: Path,
) -> None:
    model, store = _streamed(tiny_llama_dir)
    before = _resident(model)
    layer = store.materialize(0)
    assert _resident(model) > before
    assert store.release(0) and _resident(model) == before
    store.materialize(1)
    store.mark_changed(1)
    assert not store.release(1), "a changed layer has nowhere to be read from: kept"
    assert not any(p.is_meta for p in store.layers[1].parameters())
    saved = {n: p.clone() * 2 for n, p in store.layers[1].named_parameters()}
    store.relocate(1, lambda _i, names: {n: saved[n] for n in names})
    assert store.release(1) and all(p.is_meta for p in store.layers[1].parameters())
    again = store.materialize(1)
    assert all(torch.equal(p, saved[n]) for n, p in again.named_parameters())
    assert layer is store.layers[0]


def test_renamed_tensors_are_reported_not_guessed(tiny_llama_dir: Path, tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    for f in tiny_llama_dir.iterdir():
        if f.suffix != ".safetensors":
            (tmp_path / f.name).write_bytes(f.read_bytes())
    tensors = load_file(tiny_llama_dir / "model.safetensors")
    key = next(k for k in tensors if "layers.0.mlp.up_proj" in k)
    tensors[key.replace("up_proj", "w3")] = tensors.pop(key)
    save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
    built = build_streamed(tmp_path, [tmp_path / "model.safetensors"], None)
    assert isinstance(built, str) and key in built and "names transformers saves" in built


@pytest.mark.parametrize("streamed", [False, True])
def test_layerwise_perplexity_is_the_full_forward_bit_for_bit(
    tiny_llama_dir: Path, streamed: bool
) -> None:
    eager = AutoModelForCausalLM.from_pretrained(tiny_llama_dir).eval()
    gen = torch.Generator().manual_seed(3)
    windows = eval_windows(
        torch.randint(0, eager.config.vocab_size, (1, 5 * 32), generator=gen), 32, 0
    )
    want = [window_nll(eager, w, "cpu") for w in windows]
    total, count = sum(n for n, _ in want), sum(c for _, c in want)
    if streamed:
        model, store = _streamed(tiny_llama_dir)
        got = layerwise_nll(
            model, windows, "cpu", store.materialize, store.release, outside=store.outside
        )
        assert _resident(model) == 0, "every tensor released again"
    else:
        got = layerwise_nll(eager, windows, "cpu")
    assert got == (total, count)


def test_planned_layout_is_the_one_safetensors_writes(tmp_path: Path) -> None:
    """The streaming writer's header and offsets, filled tensor by tensor in any order,
    give save_file's bytes: the checkpoint needs nothing of a layer after writing it."""
    from safetensors.torch import save_file

    from gptqflow.modeling.streaming import _raw_view, _Shard, _Spec

    gen = torch.Generator().manual_seed(0)
    tensors = {
        "b.weight": torch.randn(3, 5, generator=gen),
        "a.weight_packed": torch.randint(-(2**31), 2**31 - 1, (2, 3), dtype=torch.int32),
        "a.weight_shape": torch.tensor([2, 24]),
        "c.zp": torch.randint(-8, 7, (5,), dtype=torch.int8),
        "z.scale": torch.randn(7, generator=gen).to(torch.bfloat16),
        "d.scale": torch.randn(3, generator=gen).to(torch.float16),
        "e.mask": torch.tensor([True, False, True]),
        "f.double": torch.randn(2, generator=gen, dtype=torch.float64),
    }
    save_file(tensors, tmp_path / "ref.safetensors", metadata={"format": "pt"})
    shard = _Shard("x", {k: _Spec(v.dtype, tuple(v.shape)) for k, v in tensors.items()})
    data = bytearray(shard.layout({"format": "pt"}))
    data.extend(b"\0" * (shard.size - len(data)))
    for key in reversed(list(tensors)):
        start = shard.data_start + shard.offsets[key]
        raw = bytes(_raw_view(tensors[key]))
        data[start : start + len(raw)] = raw
    assert bytes(data) == (tmp_path / "ref.safetensors").read_bytes()
