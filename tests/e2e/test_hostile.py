"""Hostile and broken inputs to ``gptqflow run``: one clear message, exit 1, no checkpoint.

Every case runs the real command line (in-process ``main(["run", ...])``) on a copy
of the tiny Llama, broken in one way, and checks three things: the exit code is 1,
stderr has one message naming the file / key / value and what is allowed (and no
traceback), and nothing under ``output_dir`` looks like a checkpoint, not even a
temporary one.
"""

from __future__ import annotations

import errno
import json
import os
import pickle
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from gptqflow.cli import main
from gptqflow.framework.compose import compose_recipe
from gptqflow.modeling.checkpoint import read_quantized_codes
from gptqflow.modeling.modeldir import supported_model_types
from gptqflow.modeling.streaming import StreamingCheckpoint

SMALL = [
    "dataset.num_samples=2",
    "dataset.seq_len=32",
    "dataset.eval_tokens=0",
    "runtime.progress=false",
]
WEIGHTS = "model.safetensors"


def _run(model: Path | str, out: Path, *extra: str) -> int:
    """``gptqflow run`` in this process; its exit code (0 or the SystemExit code)."""
    try:
        return main(["run", f"model.path={model}", f"output_dir={out}", *SMALL, *extra])
    except SystemExit as exc:
        return int(exc.code or 0)


def _refused(code: int, capsys: pytest.CaptureFixture[str], out: Path, *fragments: str) -> str:
    """Assert a refusal: exit 1, every fragment in one message, no traceback, no checkpoint."""
    err = capsys.readouterr().err
    assert code == 1, err
    assert "Traceback" not in err, err
    for fragment in fragments:
        assert fragment in err, f"{fragment!r} not in:\n{err}"
    assert not (out / "checkpoint").exists()
    if out.is_dir():
        assert not [p.name for p in out.iterdir() if ".tmp-" in p.name or ".old-" in p.name]
    return err


@pytest.fixture
def model(tiny_llama_dir: Path, tmp_path: Path) -> Path:
    """A private copy of the tiny Llama, to break."""
    return Path(shutil.copytree(tiny_llama_dir, tmp_path / "model"))


def _edit_config(model: Path, **changes: Any) -> None:
    cfg = json.loads((model / "config.json").read_text())
    cfg.update(changes)
    (model / "config.json").write_text(json.dumps(cfg))


def _edit_weight(model: Path, name: str, index: tuple[int, ...], value: float) -> None:
    tensors = load_file(str(model / WEIGHTS))
    tensors[name][index] = value
    save_file(tensors, str(model / WEIGHTS), metadata={"format": "pt"})


# ----------------------------------------------------------------------- model dir


def test_model_dir_without_config_json(
    model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (model / "config.json").unlink()
    out = tmp_path / "out"
    _refused(_run(model, out), capsys, out, f"model.path={str(model)!r}", "no config.json")


@pytest.mark.parametrize("model_type", ["t5", "frobnicator"])
def test_unsupported_architecture_lists_the_supported_ones(
    model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], model_type: str
) -> None:
    _edit_config(model, model_type=model_type)
    out = tmp_path / "out"
    err = _refused(
        _run(model, out),
        capsys,
        out,
        f"config.json: model_type={model_type!r} is not an architecture",
        "supported model_type values",
    )
    supported = supported_model_types()
    assert "llama" in supported and "t5" not in supported
    assert ", ".join(supported) in err


def test_remote_code_is_not_run_unless_trusted(
    model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # A directory that brings its own architecture (and code that would leave a mark).
    _edit_config(
        model,
        model_type="evil_llm",
        auto_map={"AutoConfig": "evil.EvilConfig", "AutoModelForCausalLM": "evil.EvilLM"},
    )
    mark = tmp_path / "code-ran"
    (model / "evil.py").write_text(f"open({str(mark)!r}, 'w').close()\n")
    out = tmp_path / "out"
    _refused(_run(model, out), capsys, out, "model.trust_remote_code=true", "'evil.EvilLM'")
    assert not mark.exists()


def test_truncated_safetensors(
    model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    size = (model / WEIGHTS).stat().st_size
    os.truncate(model / WEIGHTS, size - 1000)
    out = tmp_path / "out"
    _refused(
        _run(model, out),
        capsys,
        out,
        f"{model / WEIGHTS}: truncated: the header describes {size} bytes but the file has "
        f"{size - 1000}",
    )


def test_corrupt_safetensors(
    model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (model / WEIGHTS).write_bytes(b"\x17" * 4096)
    out = tmp_path / "out"
    _refused(_run(model, out), capsys, out, f"{model / WEIGHTS}: not a valid safetensors file")


def test_index_naming_a_missing_shard(
    model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    keys = list(load_file(str(model / WEIGHTS)))
    index = {"metadata": {}, "weight_map": {k: "model-00002-of-00002.safetensors" for k in keys}}
    (model / "model.safetensors.index.json").write_text(json.dumps(index))
    out = tmp_path / "out"
    _refused(_run(model, out), capsys, out, "model-00002-of-00002.safetensors", "do not exist")


def _to_pickle(model: Path) -> None:
    """Replace the safetensors weights by a pytorch_model.bin (a torch.save pickle)."""
    torch.save(load_file(str(model / WEIGHTS)), model / "pytorch_model.bin")
    (model / WEIGHTS).unlink()


def test_pickle_weights_are_refused_unless_allowed(
    model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _to_pickle(model)
    out = tmp_path / "out"
    _refused(
        _run(model, out),
        capsys,
        out,
        "only in pickle format (pytorch_model.bin)",
        "model.allow_pickle=true",
    )
    capsys.readouterr()
    assert _run(model, tmp_path / "allowed", "model.allow_pickle=true") == 0
    assert (tmp_path / "allowed" / "checkpoint" / WEIGHTS).is_file()


class _Marker:
    """Unpickling this creates a file: proof that a pickle was loaded."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self) -> tuple[Any, ...]:
        return (open, (self.path, "w"))


def test_pickle_is_never_read_when_safetensors_exist(
    model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    mark = tmp_path / "unpickled"
    with (model / "pytorch_model.bin").open("wb") as f:
        pickle.dump(_Marker(str(mark)), f)
    assert _run(model, tmp_path / "out", "model.allow_pickle=true") == 0
    assert not mark.exists()


def test_recipes_default_to_no_remote_code_and_no_pickle(tiny_llama_dir: Path) -> None:
    for name in ("gptq_w4a16", "rtn_w4a16"):
        resolved = compose_recipe(name, [f"model.path={tiny_llama_dir}"])
        assert next(iter(resolved["stages"])) == "load"  # the model group's one reader
        model = resolved["model"]
        assert model["trust_remote_code"] is False and model["allow_pickle"] is False
    model = compose_recipe(
        "gptq_w4a16",
        [f"model.path={tiny_llama_dir}", "model.trust_remote_code=true", "model.allow_pickle=true"],
    )["model"]
    assert model["trust_remote_code"] is True and model["allow_pickle"] is True


# ----------------------------------------------------------------------- data


@pytest.mark.parametrize(
    ("content", "fragments"),
    [
        (None, ["dataset.calibration_file", "does not exist"]),
        (b"", ["is empty"]),
        (b" \n\t\n", ["contains no text"]),
        (b"GGUF\x00\x01\x02\x03" * 64, ["looks like a binary file (NUL byte at byte offset 4)"]),
        ("caf\u00e9 cr\u00e8me ".encode("latin-1") * 50, ["not valid UTF-8 (byte 0xe9"]),
    ],
    ids=["missing", "empty", "whitespace", "binary", "latin1"],
)
def test_bad_calibration_text(
    tiny_llama_dir: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    content: bytes | None,
    fragments: list[str],
) -> None:
    data = tmp_path / "calib.txt"
    if content is not None:
        data.write_bytes(content)
    out = tmp_path / "out"
    code = _run(tiny_llama_dir, out, f"dataset.calibration_file={data}")
    _refused(code, capsys, out, str(data), *fragments)


def test_too_few_tokens_says_how_many_and_what_was_asked(
    tiny_llama_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = tmp_path / "short.txt"
    data.write_text("The tower is 324 metres tall. " * 20)
    out = tmp_path / "out"
    code = _run(tiny_llama_dir, out, f"dataset.calibration_file={data}", "dataset.num_samples=64")
    err = _refused(
        code,
        capsys,
        out,
        f"dataset.calibration_file={str(data)!r}",
        "64 samples of 32 tokens need 2048",
        "dataset.num_samples=64, dataset.seq_len=32",
    )
    n_tokens = int(err.split("the calibration text has ")[1].split()[0])
    assert 0 < n_tokens < 2048


# ----------------------------------------------------------------------- output


def test_output_dir_below_a_file(
    tiny_llama_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    out = blocker / "run"
    _refused(_run(tiny_llama_dir, out), capsys, out, f"{str(blocker)!r} is a file")
    assert blocker.read_text() == "not a directory"


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write into any directory")
def test_unwritable_output_dir(
    tiny_llama_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    out = locked / "run"
    try:
        _refused(_run(tiny_llama_dir, out), capsys, out, "is not writable", "permission denied")
    finally:
        locked.chmod(0o700)


def test_full_disk_leaves_no_checkpoint(
    tiny_llama_dir: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def disk_full(*_: Any, **__: Any) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    # The disk fills while the first layer's tensors are written into the shards.
    monkeypatch.setattr(StreamingCheckpoint, "_write", disk_full)
    out = tmp_path / "out"
    _refused(
        _run(tiny_llama_dir, out),
        capsys,
        out,
        f"cannot write the checkpoint to {out / 'checkpoint'}: No space left on device",
        "Nothing was written",
    )
    report = json.loads((out / "report.json").read_text())
    assert report["status"] == "failed" and "No space left" in report["error"]


# ----------------------------------------------------------------------- numerics


@pytest.mark.parametrize(
    ("tensor", "index", "value", "fragments"),
    [
        (
            "model.layers.1.input_layernorm.weight",
            (5,),
            float("nan"),
            [
                "layer 1, model.layers.1.self_attn.q_proj, model.layers.1.self_attn.k_proj",
                "Hessian",
            ],
        ),
        (
            "model.embed_tokens.weight",
            (slice(None), 3),
            float("inf"),
            ["layer 0, model.layers.0.self_attn.q_proj", "the activations entering"],
        ),
        (
            "model.layers.1.mlp.down_proj.weight",
            (2, 7),
            float("nan"),
            ["layer 1, model.layers.1.mlp.down_proj: the float weights have 1 NaN/Inf values"],
        ),
        (
            "lm_head.weight",
            (0, 0),
            float("inf"),
            ["refusing to write a checkpoint with NaN/Inf", "lm_head.weight"],
        ),
    ],
    ids=["layernorm-nan", "embedding-inf", "weight-nan", "lm_head-inf"],
)
def test_non_finite_values_are_named_and_never_written(
    model: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    tensor: str,
    index: tuple[Any, ...],
    value: float,
    fragments: list[str],
) -> None:
    _edit_weight(model, tensor, index, value)
    out = tmp_path / "out"
    _refused(_run(model, out), capsys, out, *fragments)


def test_indefinite_hessian_fails_naming_module_and_dampening(
    tiny_llama_dir: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    _indefinite_mlp_hessians(monkeypatch)
    out = tmp_path / "out"
    _refused(
        _run(tiny_llama_dir, out),
        capsys,
        out,
        "layer 0, model.layers.0.mlp.gate_proj, model.layers.0.mlp.up_proj: the Hessian is not "
        "positive definite",
        "[0.01, 0.1, 1.0, 10.0, 100.0, 1000.0, 10000.0]",
        "scheme.on_failure=rtn",
    )


def test_rtn_fallback_is_recorded_and_written(
    tiny_llama_dir: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from gptqflow.gptq.quantizer import rtn_quantize
    from gptqflow.gptq.types import QuantArgs

    _indefinite_mlp_hessians(monkeypatch)
    out = tmp_path / "out"
    assert _run(tiny_llama_dir, out, "scheme.on_failure=rtn") == 0
    printed = capsys.readouterr()
    assert "4 module(s) rounded to nearest" in printed.out
    assert "round-to-nearest instead of GPTQ" in printed.out + printed.err
    report = json.loads((out / "report.json").read_text())
    modules = [(f["layer"], f["module"]) for f in report["fallbacks"]]
    assert modules == [
        (i, f"model.layers.{i}.mlp.{m}") for i in (0, 1) for m in ("gate_proj", "up_proj")
    ]
    assert all("not positive definite" in f["reason"] for f in report["fallbacks"])
    # The fallback modules hold exactly the round-to-nearest codes of their float weights
    # (their inputs do not matter to RTN); the others were solved with GPTQ.
    codes = read_quantized_codes(out / "checkpoint")
    weights = load_file(str(tiny_llama_dir / WEIGHTS))
    scheme = yaml.safe_load((out / "recipe.yaml").read_text())["scheme"]  # the run's scheme
    args = QuantArgs(
        bits=scheme["bits"],
        group_size=scheme["group_size"],
        symmetric=scheme["symmetric"],
        actorder=scheme["actorder"],
        observer=scheme["observer"],
    )
    for _, name in modules:
        expected = rtn_quantize(weights[f"{name}.weight"], args)
        assert torch.equal(codes[name]["qweight"], expected.qweight)
    q = "model.layers.0.self_attn.q_proj"
    assert not torch.equal(codes[q]["qweight"], rtn_quantize(weights[f"{q}.weight"], args).qweight)


def _indefinite_mlp_hessians(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make the reduced gate/up Hessian of every layer indefinite (a diagonal entry of
    -1e9, which no dampening can outweigh), as a calibration gone wrong would."""
    from gptqflow.stages import solve

    original = solve.SolveStage.on_group

    def on_group(self: Any, group: Any, ctx: Any) -> None:
        if group.names[0].endswith("mlp.gate_proj"):
            assert group.reduced_hessian is not None
            group.reduced_hessian = group.reduced_hessian.clone()
            group.reduced_hessian[0, 0] = -1e9
        original(self, group, ctx)

    monkeypatch.setattr(solve.SolveStage, "on_group", on_group)


def test_eval_command_checks_the_model_dir_too(
    model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = tmp_path / "eval.txt"
    data.write_text("The tower is 324 metres tall, about the same height as a building. " * 30)
    _to_pickle(model)
    argv = ["eval", str(model), "--data", str(data), "--max-tokens", "64", "--seq-len", "32"]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert "only in pickle format (pytorch_model.bin)" in err and "--allow-pickle" in err
    assert main([*argv, "--allow-pickle"]) == 0
    assert "perplexity:" in capsys.readouterr().out
    torch.save({}, model / "pytorch_model.bin")  # now safetensors, damaged, next to it
    (model / WEIGHTS).write_bytes(b"\x01" * 7)
    assert main(argv) == 1
    assert f"{model / WEIGHTS}: not a valid safetensors file" in capsys.readouterr().err


def test_non_finite_layer_outputs_are_named(model: Path, tmp_path: Path) -> None:
    """NaN that no Hessian sees (an unquantized down_proj of the last layer) is caught at
    the layer's output."""
    from gptqflow.errors import GptqflowError
    from gptqflow.framework.api import execute

    _edit_weight(model, "model.layers.1.mlp.down_proj.weight", (0, 0), float("nan"))
    out = tmp_path / "out"
    resolved = compose_recipe("gptq_w4a16", [f"model.path={model}", f"output_dir={out}", *SMALL])
    resolved["scheme"]["ignore"] = ["lm_head", "model.layers.1.mlp.down_proj"]
    with pytest.raises(
        GptqflowError, match=r"layer 1 \(model\.layers\.1\): its outputs have \d+ NaN"
    ):
        execute(resolved)
    assert not (out / "checkpoint").exists()


def test_weights_missing_a_tensor_are_refused(
    model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """transformers would fill the missing tensor with random values and carry on."""
    tensors = load_file(str(model / WEIGHTS))
    del tensors["model.layers.1.mlp.down_proj.weight"]
    save_file(tensors, str(model / WEIGHTS), metadata={"format": "pt"})
    out = tmp_path / "out"
    _refused(
        _run(model, out),
        capsys,
        out,
        "the weight files lack 1 tensor(s)",
        "['model.layers.1.mlp.down_proj.weight']",
    )
