"""Every architecture we support, on a tiny seeded model: run, coverage, layout, reload.

Each model is built from a transformers config (``helpers.TINY_CONFIGS``) and saved with
``save_pretrained``, so its files are in the architecture's own layout. For each: the run
succeeds; every targetable weight is quantized or listed with its reason; every 2-D
weight of the decoder layers in the original layout (routers aside) is packed in the
checkpoint, under the same name; the checkpoint holds no name the original layout does
not have; and transformers reloads it with the perplexity the run reported.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
from safetensors import safe_open

from gptqflow.cli import main
from gptqflow.framework.compose import compose_recipe
from gptqflow.framework.distributed import DistContext
from gptqflow.framework.runner import Runner
from gptqflow.framework.schema import validate_recipe
from gptqflow.modeling.targets import REASON_ROUTER
from helpers import make_tiny_model

SMALL = [
    "dataset.num_samples=4",
    "dataset.seq_len=32",
    "dataset.eval_tokens=128",
    "scheme.group_size=32",
    "runtime.progress=false",
]
FAST = ["llama", "gpt2", "gpt_neox", "qwen3_moe", "mixtral"]
SLOW = ["mistral", "qwen2", "qwen3", "phi3", "gemma3_text", "olmoe", "qwen2_moe", "deepseek_v3"]
ARCHS = [*FAST, *(pytest.param(a, marks=pytest.mark.slow) for a in SLOW)]
SUFFIXES = ("weight_packed", "weight_scale", "weight_shape", "weight_zero_point", "weight_g_idx")
# Leaf names of routers and gates: kept in full precision.
ROUTERS = re.compile(r".*\.(gate|router|shared_expert_gate)\.weight$")


def _keys(directory: Path) -> set[str]:
    keys: set[str] = set()
    for file in directory.glob("*.safetensors"):
        with safe_open(str(file), framework="pt") as f:
            keys |= set(f.keys())
    return keys


def _two_d_layer_weights(directory: Path) -> set[str]:
    out = set()
    for file in directory.glob("*.safetensors"):
        with safe_open(str(file), framework="pt") as f:
            for k in f.keys():  # noqa: SIM118 (safe_open is not a mapping)
                in_layer = re.search(r"\.(layers|h)\.\d+\.", k) and k.endswith(".weight")
                if in_layer and len(f.get_slice(k).get_shape()) == 2 and not ROUTERS.match(k):
                    out.add(k)
    return out


def run_tiny(model: Path, out: Path, *extra: str) -> dict[str, Any]:
    overrides = [f"model.path={model}", f"output_dir={out}", *SMALL, *extra]
    resolved = compose_recipe("gptq_w4a16", overrides)
    Runner(validate_recipe(resolved), resolved, DistContext()).run()
    report: dict[str, Any] = json.loads((out / "report.json").read_text())
    return report


@pytest.mark.parametrize("model_type", ARCHS)
def test_architecture_quantizes_everything_and_reloads(
    model_type: str,
    tiny_tokenizer_dir: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    model = make_tiny_model(tmp_path / "model", model_type, tiny_tokenizer_dir)
    report = run_tiny(model, tmp_path / "out")
    assert report["status"] == "ok"
    cov = report["coverage"]
    assert cov["quantized_params"] > 0.9 * cov["decoder_params"], cov
    assert {e["reason"] for e in cov["not_quantized"]} <= {REASON_ROUTER}, cov

    ckpt = tmp_path / "out" / "checkpoint"
    original, written = _two_d_layer_weights(model), _keys(ckpt)
    unpacked = [k for k in original if f"{k}_packed" not in written]
    if model_type == "gpt2":  # Conv1D: quantized values, stored unpacked (docs/models.md)
        assert unpacked and all(k in written for k in unpacked)
        assert cov["quantized_params_by_kind"] == {"conv1d": cov["quantized_params"]}
    else:
        assert not unpacked, unpacked[:5]
    every_original = _keys(model)
    for key in written:
        base = key
        for s in SUFFIXES:
            base = base.removesuffix(s) + ("weight" if base.endswith(s) else "")
        assert base in every_original, f"{key} is not in the {model_type} layout"

    capsys.readouterr()
    assert main(["eval", str(ckpt), "--data", _eval_file(report), "--max-tokens", "128",
                 "--seq-len", "32"]) == 0  # fmt: skip
    got = float(capsys.readouterr().out.strip().rsplit(" ", 1)[-1])
    assert got == pytest.approx(report["perplexity"]["quantized"], rel=1e-4)


def _eval_file(report: dict[str, Any]) -> str:
    recipe = (Path(report["checkpoint"]).parent / "recipe.yaml").read_text()
    match = re.search(r"eval_file: (\S+)", recipe)
    assert match
    return match.group(1)


def test_moe_report_counts_tokens_per_expert(tiny_tokenizer_dir: Path, tmp_path: Path) -> None:
    """Every expert of every MoE layer has its routed-token count; top-2 of 8 sums to 2 x tokens."""
    model = make_tiny_model(tmp_path / "model", "qwen3_moe", tiny_tokenizer_dir)
    report = run_tiny(model, tmp_path / "out", "stages.solve.min_tokens=40")
    tokens = report["tokens_calibrated"]
    fallbacks = {f["module"] for f in report["fallbacks"]}
    for layer in report["layers"]:
        counts = layer["expert_tokens"]
        assert sorted(counts) == [f"mlp.experts.{e}" for e in range(8)]
        assert sum(counts.values()) == 2 * tokens
        for expert, n in counts.items():
            names = {
                f"{layer_name(layer)}.{expert}.{p}" for p in ("gate_proj", "up_proj", "down_proj")
            }
            assert (names <= fallbacks) == (n < 40), (expert, n)
            assert not (names & fallbacks) or n < 40


def layer_name(layer: dict[str, Any]) -> str:
    return f"model.layers.{layer['index']}"


def test_gptaq_refuses_moe_experts(tiny_tokenizer_dir: Path, tmp_path: Path) -> None:
    """GPTAQ pairs float and quantized inputs sample for sample; routed experts cannot."""
    from gptqflow.errors import GptqflowError

    model = make_tiny_model(tmp_path / "model", "qwen3_moe", tiny_tokenizer_dir)
    with pytest.raises(GptqflowError, match="use method=gptq for MoE models"):
        run_tiny(model, tmp_path / "out", "method=gptaq")


@pytest.mark.parametrize(
    "model_type",
    ["qwen3_moe", *(pytest.param(a, marks=pytest.mark.slow) for a in ("mixtral", "gpt_neox"))],
)
def test_renamed_and_fused_layouts_stream(
    model_type: str, tiny_tokenizer_dir: Path, tmp_path: Path
) -> None:
    """Fused experts (assembled from their per-expert tensors) and renamed tensors
    (gpt_neox's embed_out) are read layer by layer, and read back from the checkpoint
    being written; the checkpoint is the one a whole-model load writes."""
    model = make_tiny_model(tmp_path / "model", model_type, tiny_tokenizer_dir)
    streamed = run_tiny(model, tmp_path / "stream")
    eager = run_tiny(model, tmp_path / "eager", "model.weights=eager")
    assert streamed["weights"]["mode"] == "stream", streamed["weights"]
    assert eager["weights"]["mode"] == "eager"
    a = (tmp_path / "stream" / "checkpoint" / "model.safetensors").read_bytes()
    assert a == (tmp_path / "eager" / "checkpoint" / "model.safetensors").read_bytes()
    assert streamed["perplexity"] == eager["perplexity"]


def test_waves_in_parts_write_the_same_bytes(tiny_tokenizer_dir: Path, tmp_path: Path) -> None:
    """runtime.max_wave_groups=3: the 8 experts of a block in parts of 3, 3 and 2."""
    model = make_tiny_model(tmp_path / "model", "qwen3_moe", tiny_tokenizer_dir)
    whole = run_tiny(model, tmp_path / "whole")
    parts = run_tiny(model, tmp_path / "parts", "runtime.max_wave_groups=3")
    for layer in parts["layers"]:
        assert [w["groups"] for w in layer["waves"]] == [3, 3, 2, 3, 3, 2]
    for layer in whole["layers"]:
        assert [w["groups"] for w in layer["waves"]] == [8, 8]
    a = (tmp_path / "whole" / "checkpoint" / "model.safetensors").read_bytes()
    assert a == (tmp_path / "parts" / "checkpoint" / "model.safetensors").read_bytes()
