"""Target kinds found by type, their 2-D views, the per-expert seam, the checkpoint layout."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from gptqflow.errors import GptqflowError
from gptqflow.modeling.forward import per_sample_linears, trace_groups
from gptqflow.modeling.layout import CheckpointLayout
from gptqflow.modeling.structure import decoder_layers
from gptqflow.modeling.targets import (
    REASON_IGNORED,
    REASON_ROUTER,
    Conv1DTarget,
    ExpertTarget,
    LinearTarget,
    layer_targets,
)
from helpers import TINY_CONFIGS


def _model(model_type: str, meta: bool = False, **extra: Any) -> Any:
    config = AutoConfig.for_model(model_type, vocab_size=128, **TINY_CONFIGS[model_type], **extra)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        if meta:
            with torch.device("meta"):
                return AutoModelForCausalLM.from_config(config)
        model = AutoModelForCausalLM.from_config(config).float().eval()
    for p in model.parameters():  # some routers start at zero: give them a spread
        if p.dim() >= 2 and float(p.detach().abs().max()) == 0.0:
            torch.nn.init.normal_(p, std=0.02)
    return model


def _first_layer(model: Any) -> tuple[str, torch.nn.Module]:
    prefix, layers = decoder_layers(model)
    return f"{prefix}.0", layers[0]


def test_kinds_are_found_by_type() -> None:
    name, layer = _first_layer(_model("llama", meta=True))
    found = layer_targets(layer, name, ["re:.*"], [])
    assert {type(t) for t in found.targets.values()} == {LinearTarget}
    assert len(found.targets) == 7 and not found.excluded

    name, layer = _first_layer(_model("gpt2", meta=True))
    found = layer_targets(layer, name, ["re:.*"], ["c_proj"])
    assert {type(t) for t in found.targets.values()} == {Conv1DTarget}
    assert sorted(n.rsplit(".", 2)[-2] + "." + n.rsplit(".", 1)[-1] for n in found.targets) == [
        "attn.c_attn",
        "mlp.c_fc",
    ]
    assert {e.reason for e in found.excluded} == {REASON_IGNORED}
    c_attn = found.targets[f"{name}.attn.c_attn"]
    assert c_attn.shape == (3 * 64, 64)  # out x in, while Conv1D stores [in, out]


def test_experts_are_slices_and_routers_are_left_out() -> None:
    name, layer = _first_layer(_model("qwen2_moe", meta=True))
    found = layer_targets(layer, name, ["re:.*"], [])
    experts = [t for t in found.targets.values() if isinstance(t, ExpertTarget)]
    assert len(experts) == 8 * 3
    gate, up, down = (
        found.targets[f"{name}.mlp.experts.3.{p}"] for p in ("gate_proj", "up_proj", "down_proj")
    )
    assert gate.shape == up.shape == (64, 64) and down.shape == (64, 64)
    assert gate.module is up.module is not down.module  # gate and up read one input
    routers = {e.name.rsplit(".", 1)[-1] for e in found.excluded if e.reason == REASON_ROUTER}
    assert routers == {"gate", "shared_expert_gate"}
    assert f"{name}.mlp.shared_expert.gate_proj" in found.targets  # the shared expert is a Linear


def test_views_write_through_to_the_parameters() -> None:
    model = _model("qwen3_moe")
    name, layer = _first_layer(model)
    found = layer_targets(layer, name, ["re:.*"], [])
    up = found.targets[f"{name}.mlp.experts.5.up_proj"]
    value = torch.full(up.shape, 0.5)
    up.install(value)
    fused = layer.mlp.experts.gate_up_proj
    assert torch.equal(fused[5, 64:], value) and not torch.equal(fused[5, :64], value)
    assert not torch.equal(fused[4, 64:], value)

    gpt2 = _model("gpt2")
    name, layer = _first_layer(gpt2)
    c_fc = layer_targets(layer, name, ["re:.*"], []).targets[f"{name}.mlp.c_fc"]
    new = torch.randn(c_fc.shape)
    c_fc.install(new)
    assert torch.equal(layer.mlp.c_fc.weight, new.t())


def test_seam_computes_the_same_as_transformers_and_each_sample_alone() -> None:
    """The per-expert seam: the transformers forward's results (to rounding), and a sample's
    output in a batch equals its output alone, bit for bit (what makes ranks agree)."""
    model = _model("qwen3_moe")
    _, layer = _first_layer(model)
    x = torch.randn(3, 16, 64)
    pos = torch.arange(16)[None]
    kwargs = {"position_embeddings": model.model.rotary_emb(x, pos), "attention_mask": None}
    with torch.inference_mode():
        ref = layer(x, **kwargs)
        with per_sample_linears(layer):
            batch = layer(x, **kwargs)
            alone = layer(x[1:2], **kwargs)
    ref = ref[0] if isinstance(ref, tuple) else ref
    batch = batch[0] if isinstance(batch, tuple) else batch
    alone = alone[0] if isinstance(alone, tuple) else alone
    torch.testing.assert_close(batch, ref, rtol=1e-5, atol=1e-6)
    assert torch.equal(batch[1:2], alone)


def test_groups_put_gate_and_up_of_an_expert_together() -> None:
    model = _model("mixtral")
    name, layer = _first_layer(model)
    found = layer_targets(layer, name, ["re:.*"], [])
    x = torch.randn(1, 16, 64)
    kwargs = {"position_embeddings": model.model.rotary_emb(x, torch.arange(16)[None])}
    groups = trace_groups(layer, x, kwargs, found.targets)
    short = [[n.removeprefix(name + ".") for n in g] for g in groups]
    assert ["mlp.experts.0.gate_proj", "mlp.experts.0.up_proj"] in short
    assert ["mlp.experts.7.down_proj"] in short
    # every expert forms its groups, also one the router sent no token
    assert sum(len(g) for g in short) == len(found.targets)


def test_unsupported_experts_are_refused_naming_the_module() -> None:
    model = _model("llama", meta=True)  # a dense model to graft a transposed experts layout on
    _, layer = _first_layer(model)
    experts = torch.nn.Module()
    experts.gate_up_proj = torch.nn.Parameter(torch.empty(4, 64, 128, device="meta"))
    experts.down_proj = torch.nn.Parameter(torch.empty(4, 64, 64, device="meta"))
    layer.mlp.experts = experts
    with pytest.raises(
        GptqflowError, match=r"mlp\.experts: fused expert weights with no target kind"
    ):
        layer_targets(layer, "model.layers.0", ["re:.*"], [])


def test_llama4_is_refused_before_any_weight_is_read() -> None:
    config = AutoConfig.for_model(
        "llama4_text",
        vocab_size=128,
        hidden_size=64,
        intermediate_size=64,
        intermediate_size_mlp=128,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        num_local_experts=4,
    )
    with torch.device("meta"):  # shapes only: nothing is allocated or read
        model = AutoModelForCausalLM.from_config(config)
    name, layer = _first_layer(model)
    with pytest.raises(GptqflowError, match=r"Llama4TextExperts.*is_transposed"):
        layer_targets(layer, name, ["re:.*"], [])


def test_layout_follows_save_pretrained() -> None:
    mixtral = CheckpointLayout.of(_model("mixtral", meta=True))
    name, layer = "model.layers.1", decoder_layers(_model("mixtral", meta=True))[1][1]
    found = layer_targets(layer, name, ["re:.*"], [])
    names = {mixtral.module_name(t) for t in found.targets.values()}
    assert "model.layers.1.block_sparse_moe.experts.2.w1" in names
    assert "model.layers.1.block_sparse_moe.experts.2.w3" in names
    assert "model.layers.1.block_sparse_moe.experts.2.w2" in names
    assert mixtral.tensor_name("model.layers.1.mlp.gate.weight") == (
        "model.layers.1.block_sparse_moe.gate.weight"
    )
    neox = CheckpointLayout.of(_model("gpt_neox", meta=True))
    assert neox.tensor_name("lm_head.weight") == "embed_out.weight"
    assert neox.ignore_names(["lm_head"]) == ["lm_head", "embed_out"]
