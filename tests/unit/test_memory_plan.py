"""The per-rank memory prediction of ``gptqflow plan``: each moment from the shapes."""

from __future__ import annotations

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from gptqflow.gptq.plan import GroupShape
from gptqflow.modeling.memory import predict_rank_memory
from gptqflow.planning import plan_report

CONFIG = {
    "model_type": "llama",
    "hidden_size": 64,
    "intermediate_size": 176,
    "num_hidden_layers": 3,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": 1000,
    "tie_word_embeddings": False,
}


def _model() -> LlamaForCausalLM:
    cfg = {k: v for k, v in CONFIG.items() if k != "model_type"}
    with torch.device("meta"):
        return LlamaForCausalLM(LlamaConfig(**cfg))


def test_each_moment_is_the_sum_of_its_tensors() -> None:
    h, v, tokens = 64, 1000, 300
    groups = [
        GroupShape(("q", "k", "v"), (64, 32, 32), 64),
        GroupShape(("o",), (64,), 64),
        GroupShape(("gate", "up"), (176, 176), 64),
        GroupShape(("down",), (64,), 176),
    ]
    got = predict_rank_memory(_model(), groups, tokens, base_bytes=0)
    states = tokens * h * 4
    layer = (64 * 64 * 2 + 32 * 64 * 2 + 3 * 176 * 64 + 2 * 64) * 4  # q,o + k,v + mlp + norms
    # down_proj: inputs, the float64 upper strips (176 columns: rows 0-127 from their
    # diagonal on, rows 128-175 likewise) and the token count, the float32 mean, and
    # four float32 copies of the weights.
    strips = 128 * 176 + 48 * 48
    down = tokens * 176 * 4 + (strips + 1) * 8 + 176 * 176 * 4 + 4 * 64 * 176 * 4
    assert got.capture == states
    assert got.layer == layer + 2 * states + down
    assert got.finish == v * h * 4  # the largest outside tensor: embeddings or head
    assert got.peak == max(got.capture, got.layer, got.finish)
    assert predict_rank_memory(_model(), groups, tokens, main_rank=False, base_bytes=0).finish == 0


def test_plan_prints_memory_for_each_world_size() -> None:
    report = plan_report(CONFIG, [1, 4], num_samples=8, seq_len=32)
    assert "memory per rank" in report.text
    rows = report.data["memory"]
    assert [r["world_size"] for r in rows] == [1, 4]
    assert [r["tokens_per_rank"] for r in rows] == [256, 64]
    for r in rows:
        w = r["world_size"]
        assert (
            r["total_bytes"] == r["rank0"]["peak_bytes"] + (w - 1) * r["other_rank"]["peak_bytes"]
        )
    assert rows[1]["rank0"]["layer_bytes"] < rows[0]["rank0"]["layer_bytes"], (
        "fewer tokens per rank"
    )
