"""The checkpoint written as layers finish: shards, the in-memory writer's bytes, resume.

The tiny 3-layer Llama, streamed (the default ``model.weights=stream``): each layer's
tensors are read from the files when it is processed and dropped once the save stage
has written it; the quantized perplexity is measured on layers read back from the
checkpoint.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file
from test_resume import _Crash, crash_after_point
from transformers import AutoModelForCausalLM

from gptqflow.framework.compose import compose_recipe
from gptqflow.framework.distributed import DistContext
from gptqflow.framework.runner import Runner
from gptqflow.framework.schema import validate_recipe
from gptqflow.gptq.types import QuantResult
from gptqflow.modeling.checkpoint import read_quantized_codes, write_compressed_checkpoint

SMALL = [
    "dataset.num_samples=4",
    "dataset.seq_len=32",
    "dataset.eval_tokens=256",
    "runtime.progress=false",
]
SHARD = "stages.save.max_shard_size=60KB"  # about one tiny layer per shard


def _run(model: Path, out: Path, *extra: str) -> Runner:
    resolved = compose_recipe(
        "gptq_w4a16", [f"model.path={model}", f"output_dir={out}", *SMALL, *extra]
    )
    runner = Runner(validate_recipe(resolved), resolved, DistContext())
    runner.run()
    return runner


def _files(checkpoint: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(checkpoint.iterdir()) if p.is_file()}


@pytest.fixture(scope="module")
def single(tiny_llama3_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Runner:
    return _run(tiny_llama3_dir, tmp_path_factory.mktemp("single"))


@pytest.fixture(scope="module")
def sharded(tiny_llama3_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Runner:
    return _run(tiny_llama3_dir, tmp_path_factory.mktemp("sharded"), SHARD)


def _report(runner: Runner) -> dict[str, Any]:
    return dict(json.loads((Path(runner.recipe.output_dir) / "report.json").read_text()))


def test_small_shards_are_named_and_indexed_as_transformers_does(sharded: Runner) -> None:
    ckpt = Path(sharded.recipe.output_dir) / "checkpoint"
    shards = sorted(p.name for p in ckpt.glob("*.safetensors"))
    n = len(shards)
    assert n >= 3, shards
    assert shards == [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
    index = json.loads((ckpt / "model.safetensors.index.json").read_text())
    assert sorted(set(index["weight_map"].values())) == shards
    assert index["metadata"]["total_size"] == sum(
        t.numel() * t.element_size() for name in shards for t in load_file(ckpt / name).values()
    )
    assert not list(ckpt.parent.glob(".checkpoint*")), "no partial directory left"


def test_sharded_and_single_checkpoints_hold_the_same_model(
    single: Runner, sharded: Runner
) -> None:
    a = Path(single.recipe.output_dir) / "checkpoint"
    b = Path(sharded.recipe.output_dir) / "checkpoint"
    codes_a, codes_b = read_quantized_codes(a), read_quantized_codes(b)
    assert codes_a.keys() == codes_b.keys() and codes_a
    for name in codes_a:
        for key in codes_a[name]:
            assert torch.equal(codes_a[name][key], codes_b[name][key]), (name, key)
    assert _report(single)["perplexity"] == _report(sharded)["perplexity"]
    ids = torch.randint(0, 100, (1, 16), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        la = AutoModelForCausalLM.from_pretrained(a).eval()(input_ids=ids).logits
        lb = AutoModelForCausalLM.from_pretrained(b).eval()(input_ids=ids).logits
    assert torch.equal(la, lb)


def test_streamed_run_reads_each_layer_and_reports_it(single: Runner) -> None:
    report = _report(single)
    assert report["weights"] == {"mode": "stream"}
    assert report["ranks"][0]["weights_read_bytes"] > 0
    state = single.state
    assert state is not None and state.weights is not None
    assert all(p.is_meta for p in state.weights.layers.parameters()), "every layer released"
    assert not state.quantized, "written codes leave memory"


def test_one_shard_is_the_in_memory_writers_bytes(
    tiny_llama3_dir: Path, single: Runner, tmp_path: Path
) -> None:
    """The whole model in memory (model.weights=eager), written by the one-shot writer
    from the codes in the streamed checkpoint: the same bytes."""
    eager = _run(tiny_llama3_dir, tmp_path / "eager", "model.weights=eager")
    assert _report(eager)["weights"] == {"mode": "eager"}
    streamed = Path(single.recipe.output_dir) / "checkpoint"
    codes = read_quantized_codes(streamed)
    results = {
        name: QuantResult(
            qweight=c["qweight"],
            scale=c["scale"],
            zero_point=c["zero_point"],
            g_idx=c.get("g_idx"),
            dequant=torch.empty(0),
            loss=0.0,
            damp=0.0,
        )
        for name, c in codes.items()
    }
    assert eager.state is not None
    out = write_compressed_checkpoint(
        eager.state.model,
        results,
        eager.recipe.scheme.quant_args(),
        tmp_path / "one-shot",
        tokenizer=eager.state.tokenizer,
        ignore=eager.recipe.scheme.ignore,
    )
    assert _files(out)["model.safetensors"] == _files(streamed)["model.safetensors"]
    assert _files(Path(eager.recipe.output_dir) / "checkpoint") == _files(streamed)


def test_resumed_sharded_run_writes_the_same_bytes(
    tiny_llama3_dir: Path, sharded: Runner, tmp_path: Path
) -> None:
    with crash_after_point(2), pytest.raises(_Crash):
        _run(tiny_llama3_dir, tmp_path, SHARD, "runtime.checkpoint_every=1")
    assert (tmp_path / ".checkpoint.partial").is_dir(), "shards in progress, hidden"
    assert not (tmp_path / "checkpoint").exists(), "nothing that looks complete"
    _run(tiny_llama3_dir, tmp_path, SHARD, "runtime.checkpoint_every=1", "runtime.resume=true")
    assert _files(tmp_path / "checkpoint") == _files(Path(sharded.recipe.output_dir) / "checkpoint")


def test_crash_in_the_evaluation_after_the_checkpoint_resumes(
    tiny_llama3_dir: Path, single: Runner, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The checkpoint is published before the quantized evaluation; a run that dies there
    resumes (runtime.resume=true), writes the same checkpoint again and measures it."""
    from gptqflow.stages.evaluate import EvaluateStage

    original = EvaluateStage.run

    def crash(self: EvaluateStage, state: Any, ctx: Any) -> None:
        if state.is_quantized:
            raise _Crash
        original(self, state, ctx)

    monkeypatch.setattr(EvaluateStage, "run", crash)
    with pytest.raises(_Crash):
        _run(tiny_llama3_dir, tmp_path, "runtime.checkpoint_every=1")
    assert (tmp_path / "checkpoint" / "model.safetensors").is_file()
    monkeypatch.setattr(EvaluateStage, "run", original)
    resumed = _run(tiny_llama3_dir, tmp_path, "runtime.checkpoint_every=1", "runtime.resume=true")
    reference = Path(single.recipe.output_dir) / "checkpoint"
    assert _files(tmp_path / "checkpoint") == _files(reference)
    assert _report(resumed)["perplexity"] == _report(single)["perplexity"]


def test_a_stage_may_read_its_layer_when_a_resume_point_asks(
    tiny_llama3_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``save_layer`` runs before the loop drops a streamed layer's tensors.

    A plugin that keeps what it changed in the weights (the example norm-scale stage
    keeps its norm weights) reads them there; dropped first, they were meta tensors and
    the resume point failed ("Cannot copy out of meta tensor").
    """
    from gptqflow.stages.broadcast import BroadcastStage

    original = BroadcastStage.save_layer
    seen: list[float] = []

    def save_layer(self: Any, layer: Any) -> Any:
        norm = next(p for n, p in layer.module.named_parameters() if "norm" in n)
        seen.append(float(norm.detach().cpu().sum()))  # fails on a meta tensor
        return original(self, layer)

    monkeypatch.setattr(BroadcastStage, "save_layer", save_layer)
    _run(tiny_llama3_dir, tmp_path / "run", "runtime.checkpoint_every=1")
    assert len(seen) == 3 and all(v == v for v in seen)
