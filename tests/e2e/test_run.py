"""End to end on a tiny seeded Llama: run, checkpoint, reload, report, sweeps, clear errors."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM

from gptqflow.cli import main
from gptqflow.framework.compose import compose_recipe
from gptqflow.framework.distributed import DistContext
from gptqflow.framework.runner import Runner
from gptqflow.framework.schema import validate_recipe

SMALL = ["dataset.num_samples=6", "dataset.seq_len=64", "dataset.eval_tokens=512"]


def _overrides(model: Path, out: Path, *extra: str) -> list[str]:
    return [f"model.path={model}", f"output_dir={out}", *SMALL, "runtime.progress=false", *extra]


@pytest.fixture(scope="module")
def tiny_run(tiny_llama_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Runner]:
    out = tmp_path_factory.mktemp("run")
    resolved = compose_recipe("gptq_w4a16", _overrides(tiny_llama_dir, out))
    runner = Runner(validate_recipe(resolved), resolved, DistContext())
    runner.run()
    return out, runner


def test_run_writes_checkpoint_report_and_recipe(tiny_run: tuple[Path, Runner]) -> None:
    out, _ = tiny_run
    report = json.loads((out / "report.json").read_text())
    assert report["status"] == "ok" and report["world_size"] == 1
    assert report["scheme"] == "w4a16" and report["num_samples"] == 6 and report["seq_len"] == 64
    for name in (
        "load",
        "partition",
        "baseline",
        "layer-loop",
        "calibrate",
        "hessian-reduce",
        "solve",
        "broadcast",
        "quantized",
        "save",
    ):
        assert report["stages"][name]["seconds"] >= 0
        assert report["stages"][name]["peak_rss_bytes"] > 0
    assert "evaluate" not in report["stages"]  # keyed by stage id, not by stage name
    ppl = report["perplexity"]
    assert 1 < ppl["baseline"] < 1e4 and 1 < ppl["quantized"] < 1e4
    assert [layer["index"] for layer in report["layers"]] == [0, 1]
    recipe = yaml.safe_load((out / "recipe.yaml").read_text())
    assert recipe["scheme"]["bits"] == 4 and next(iter(recipe["stages"])) == "load"
    assert recipe["stages"]["quantized"]["stage"] == "evaluate"
    config = json.loads((out / "checkpoint" / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "compressed-tensors"


def test_checkpoint_reloads_with_same_logits(tiny_run: tuple[Path, Runner]) -> None:
    out, runner = tiny_run
    assert runner.state is not None
    in_memory = runner.state.model
    store = runner.state.weights
    assert store is not None, "the model was streamed (model.weights=stream, the default)"
    for i in range(len(store.layers)):  # read back from the checkpoint the run wrote
        store.materialize(i)
    with store.outside():
        _same_logits_as_checkpoint(in_memory, out, runner)


def _same_logits_as_checkpoint(in_memory: Any, out: Path, runner: Runner) -> None:
    assert runner.state is not None
    loaded = AutoModelForCausalLM.from_pretrained(out / "checkpoint", dtype=torch.float32)
    ids = torch.randint(
        0, in_memory.config.vocab_size, (2, 32), generator=torch.Generator().manual_seed(1)
    )
    with torch.inference_mode():
        a = in_memory(input_ids=ids).logits
        b = loaded(input_ids=ids).logits
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    # The quantized weights are not the float weights: the run really quantized.
    original = AutoModelForCausalLM.from_pretrained(runner.state.model_dir, dtype=torch.float32)
    with torch.inference_mode():
        c = original(input_ids=ids).logits
    assert (a - c).abs().max() > 1e-3


def test_eval_command_matches_report(
    tiny_run: tuple[Path, Runner], capsys: pytest.CaptureFixture[str]
) -> None:
    out, runner = tiny_run
    data = runner.recipe.dataset.eval_file
    assert (
        main(
            [
                "eval",
                str(out / "checkpoint"),
                "--data",
                data,
                "--max-tokens",
                "512",
                "--seq-len",
                "64",
            ]
        )
        == 0
    )
    printed = float(capsys.readouterr().out.strip().split()[-1])
    reported = json.loads((out / "report.json").read_text())["perplexity"]["quantized"]
    assert printed == pytest.approx(reported, rel=1e-4)


def test_cli_run_and_existing_checkpoint_refused(
    tiny_llama_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "cli"
    assert main(["run", *_overrides(tiny_llama_dir, out, "dataset.eval_tokens=0")]) == 0
    assert (out / "checkpoint" / "model.safetensors").is_file()
    assert (out / ".hydra").is_dir() and (out / "run.log").is_file()
    before = (out / "checkpoint" / "model.safetensors").stat().st_mtime_ns
    capsys.readouterr()
    with pytest.raises(SystemExit) as info:
        main(["run", *_overrides(tiny_llama_dir, out, "dataset.eval_tokens=0")])
    assert info.value.code == 1
    err = capsys.readouterr().err
    assert (
        "already holds a checkpoint" in err and "overwrite=true" in err and "Traceback" not in err
    )
    assert (out / "checkpoint" / "model.safetensors").stat().st_mtime_ns == before


def test_multirun_sweep_gives_one_dir_per_run(tiny_llama_dir: Path, tmp_path: Path) -> None:
    sweep = tmp_path / "sweep"
    code = main(
        [
            "run",
            "-m",
            "scheme=w4a16,w3a16",
            *_overrides(tiny_llama_dir, sweep, "dataset.eval_tokens=0"),
        ]
    )
    assert code == 0
    reports = {p.parent.name: json.loads(p.read_text()) for p in sweep.glob("*/report.json")}
    assert sorted(reports) == ["0", "1"]
    assert {r["scheme"] for r in reports.values()} == {"w4a16", "w3a16"}
    assert {r["bits"] for r in reports.values()} == {4, 3}


@pytest.mark.parametrize(
    ("override", "fragment"),
    [
        ("model.path=/nonexistent/model", "directory does not exist"),
        ("dataset.num_samples=100000", "tokens"),
        ("scheme.group_size=256", "does not divide the input width"),
    ],
)
def test_bad_inputs_give_one_clear_message(
    tiny_llama_dir: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    override: str,
    fragment: str,
) -> None:
    out = tmp_path / "bad"
    with pytest.raises(SystemExit) as info:
        main(["run", *_overrides(tiny_llama_dir, out, "dataset.eval_tokens=0"), override])
    assert info.value.code == 1
    err = capsys.readouterr().err
    assert fragment in err and "Traceback" not in err
    assert not (out / "checkpoint").exists()


def test_python_api_runs_a_recipe(tiny_llama_dir: Path, tmp_path: Path) -> None:
    import gptqflow

    report: dict[str, Any] = gptqflow.run(
        "gptq_w4a16",
        _overrides(tiny_llama_dir, tmp_path / "api", "dataset.eval_tokens=0", "scheme=w8a16"),
    )
    assert report["status"] == "ok" and report["bits"] == 8 and report["group_size"] == -1
    assert (tmp_path / "api" / "checkpoint" / "config.json").is_file()


def test_rank_peak_memory_covers_every_stage(tiny_run: tuple[Path, Runner]) -> None:
    out, _ = tiny_run
    report = json.loads((out / "report.json").read_text())
    (rank,) = report["ranks"]
    assert rank["peak_rss_bytes"] >= max(s["peak_rss_bytes"] for s in report["stages"].values())


def test_rtn_recipe_runs_without_calibration(tiny_llama_dir: Path, tmp_path: Path) -> None:
    """rtn_w4a16 removes partition/calibrate/hessian-reduce: no calibration file is read
    (not even checked), no forward runs, and every module holds its round-to-nearest codes."""
    from safetensors.torch import load_file

    from gptqflow.framework.api import execute
    from gptqflow.gptq.quantizer import rtn_quantize
    from gptqflow.modeling.checkpoint import read_quantized_codes

    out = tmp_path / "rtn"
    resolved = compose_recipe(
        "rtn_w4a16",
        _overrides(
            tiny_llama_dir,
            out,
            "dataset.eval_tokens=0",
            f"dataset.calibration_file={tmp_path / 'absent.txt'}",
        ),
    )
    recipe = validate_recipe(resolved)
    assert [c.id for c in recipe.stages] == [
        "load",
        "baseline",
        "solve",
        "broadcast",
        "save",
        "quantized",
    ]
    report = execute(resolved)
    assert report["status"] == "ok" and report["tokens_calibrated"] == 0
    assert not {"partition", "calibrate", "hessian-reduce"} & set(report["stages"])
    assert {"layer-loop", "solve", "broadcast", "save"} <= set(report["stages"])
    assert [layer["index"] for layer in report["layers"]] == [0, 1]
    codes = read_quantized_codes(out / "checkpoint")
    weights = load_file(str(tiny_llama_dir / "model.safetensors"))
    args = recipe.scheme.quant_args()
    assert len(codes) == 14  # 7 Linears in each of the 2 layers
    for name, got in codes.items():
        assert torch.equal(got["qweight"], rtn_quantize(weights[f"{name}.weight"], args).qweight)
