"""Model-directory and output-directory checks, without loading any model."""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from gptqflow.errors import GptqflowError
from gptqflow.framework.preflight import output_dir_problem
from gptqflow.modeling.modeldir import (
    check_architecture,
    check_model_dir,
    check_safetensors,
    weight_files,
)


def _safetensors(path: Path) -> Path:
    save_file({"a": torch.ones(4, 4), "b": torch.zeros(3)}, str(path), metadata={"format": "pt"})
    return path


def _model_dir(tmp_path: Path, *, weights: bool = True) -> Path:
    d = tmp_path / "m"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"model_type": "llama"}))
    if weights:
        _safetensors(d / "model.safetensors")
    return d


def test_complete_safetensors_passes(tmp_path: Path) -> None:
    check_safetensors(_safetensors(tmp_path / "w.safetensors"))


@pytest.mark.parametrize(
    ("damage", "fragment"),
    [
        (lambda b: b[:-1], "truncated: the header describes"),
        (lambda b: b + b"\0", "longer than its header says"),
        (lambda b: b[:5], "too short for a header"),
        (lambda b: struct.pack("<Q", 1 << 40) + b[8:], "header length 1099511627776 does not fit"),
        (lambda b: b[:8] + b"{not json" + b[17:], "not a valid safetensors file"),
    ],
    ids=["truncated", "trailing", "tiny", "huge-header", "bad-json"],
)
def test_damaged_safetensors_are_named(tmp_path: Path, damage: object, fragment: str) -> None:
    path = _safetensors(tmp_path / "w.safetensors")
    path.write_bytes(damage(path.read_bytes()))  # type: ignore[operator]
    with pytest.raises(GptqflowError, match=str(path)) as info:
        check_safetensors(path)
    assert fragment in str(info.value)


def test_no_weights_at_all(tmp_path: Path) -> None:
    d = _model_dir(tmp_path, weights=False)
    with pytest.raises(GptqflowError, match=r"no weights \(no \*\.safetensors"):
        check_model_dir(d)


def test_safetensors_win_over_pickle(tmp_path: Path) -> None:
    d = _model_dir(tmp_path)
    (d / "pytorch_model.bin").write_bytes(b"never read")
    files = weight_files(d, allow_pickle=True)
    assert files.safetensors and [f.name for f in files.files] == ["model.safetensors"]


@pytest.mark.parametrize("name", ["pytorch_model.bin", "model.pt", "weights.pth"])
def test_pickle_only_needs_opt_in(tmp_path: Path, name: str) -> None:
    d = _model_dir(tmp_path, weights=False)
    (d / name).write_bytes(b"pickle")
    with pytest.raises(GptqflowError, match=rf"only in pickle format \({name}\)"):
        weight_files(d, allow_pickle=False)
    files = weight_files(d, allow_pickle=True)
    assert not files.safetensors and [f.name for f in files.files] == [name]


def test_index_that_is_not_json(tmp_path: Path) -> None:
    d = _model_dir(tmp_path)
    (d / "model.safetensors.index.json").write_text("[1, 2")
    with pytest.raises(GptqflowError, match="not a valid safetensors index"):
        weight_files(d, allow_pickle=False)


def test_architecture_check(tmp_path: Path) -> None:
    check_architecture(tmp_path, {"model_type": "llama"}, trust_remote_code=False)
    with pytest.raises(GptqflowError, match="model_type is missing; supported model_type values"):
        check_architecture(tmp_path, {}, trust_remote_code=False)
    remote = {"model_type": "mine", "auto_map": {"AutoModelForCausalLM": "m.M"}}
    with pytest.raises(GptqflowError, match=r"model\.trust_remote_code=true"):
        check_architecture(tmp_path, remote, trust_remote_code=False)
    check_architecture(tmp_path, remote, trust_remote_code=True)


def test_output_dir_checks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert output_dir_problem(tmp_path / "new" / "deeper") is None
    (tmp_path / "file").write_text("x")
    problem = output_dir_problem(tmp_path / "file" / "run")
    assert problem is not None and "is a file, not a directory" in problem
    # Permission bits do not stop root, so the permission answer is simulated.
    monkeypatch.setattr(os, "access", lambda *_: False)
    problem = output_dir_problem(tmp_path / "new")
    assert problem is not None
    assert f"cannot be created: {str(tmp_path)!r} is not writable" in problem
    problem = output_dir_problem(tmp_path)
    assert problem is not None and "is not writable by this user (permission denied)" in problem


def test_lint_reports_an_unsupported_architecture_at_the_model_path(tmp_path: Path) -> None:
    """Lint reads config.json (never the weights) when the model dir exists."""
    from gptqflow.framework.compose import compose_recipe
    from gptqflow.framework.preflight import model_problems
    from gptqflow.framework.schema import validate_recipe

    d = _model_dir(tmp_path, weights=False)
    (d / "config.json").write_text(json.dumps({"model_type": "t5"}))
    recipe = validate_recipe(compose_recipe("gptq_w4a16", [f"model.path={d}", "output_dir=/o"]))
    (problem,) = model_problems(recipe, require_model=False)
    assert problem.path == "model.path"
    assert "model_type='t5' is not an architecture" in problem.message
    # A run also needs weights; lint does not look at them.
    (d / "config.json").write_text(json.dumps({"model_type": "llama"}))
    assert "no weights" in model_problems(recipe, require_model=True)[0].message
