"""``scheme.on_failure=rtn`` on 2 gloo ranks: the same modules fall back as on 1 rank,
report.json lists each once (whichever rank solved it), and the checkpoints hold the
same integers."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from gptqflow.modeling.checkpoint import read_quantized_codes
from helpers import run_at_world_size


def _indefinite_mlp_hessians() -> None:
    """Make every layer's reduced gate/up Hessian indefinite (see tests/e2e/test_hostile.py)."""
    from gptqflow.stages.solve import SolveStage

    original = SolveStage.on_group

    def on_group(self: Any, group: Any, ctx: Any) -> None:
        if group.names[0].endswith("mlp.gate_proj"):
            group.reduced_hessian = group.reduced_hessian.clone()
            group.reduced_hessian[0, 0] = -1e9
        original(self, group, ctx)

    SolveStage.on_group = on_group  # type: ignore[method-assign]


def _run(world_size: int, model: Path, out: Path) -> dict[str, Any]:
    return run_at_world_size(
        world_size,
        [
            f"model.path={model}",
            f"output_dir={out}",
            "dataset.num_samples=4",
            "dataset.seq_len=32",
            "dataset.eval_tokens=0",
            "runtime.progress=false",
            "scheme.on_failure=rtn",
        ],
        setup=_indefinite_mlp_hessians,
    )


@pytest.mark.slow
def test_fallback_is_the_same_on_one_and_two_ranks(tiny_llama_dir: Path, tmp_path: Path) -> None:
    one = _run(1, tiny_llama_dir, tmp_path / "ws1")
    two = _run(2, tiny_llama_dir, tmp_path / "ws2")
    expected = [(i, f"model.layers.{i}.mlp.{m}") for i in (0, 1) for m in ("gate_proj", "up_proj")]
    for report in (one, two):
        assert report["status"] == "ok"
        assert [(f["layer"], f["module"]) for f in report["fallbacks"]] == expected
    # Every module was solved (GPTQ or RTN) by some rank and recorded by that rank.
    by_rank = [{f["module"] for f in r["fallbacks"]} for r in two["ranks"]]
    assert set().union(*by_rank) == {m for _, m in expected}
    a = read_quantized_codes(tmp_path / "ws1" / "checkpoint")
    b = read_quantized_codes(tmp_path / "ws2" / "checkpoint")
    assert a.keys() == b.keys()
    for name in a:
        for key in a[name]:
            assert torch.equal(a[name][key], b[name][key]), (name, key)
