"""Failures on one rank end every rank quickly, with a message naming the rank, and no checkpoint."""

from __future__ import annotations

import multiprocessing as mp
import os
from pathlib import Path
from typing import Any

import pytest

from gptqflow.framework.compose import compose_recipe
from helpers import free_port, run_until, set_rank_env


def _rank(
    rank: int, world: int, port: int, resolved: dict[str, Any], fail_rank: int | None
) -> None:
    set_rank_env(rank, world, port)
    os.environ["OMP_NUM_THREADS"] = "1"
    import torch

    torch.set_num_threads(1)
    from gptqflow.errors import GptqflowError
    from gptqflow.framework.api import execute
    from gptqflow.framework.launcher import run_rank
    from gptqflow.stages.solve import SolveStage

    if rank == fail_rank:

        def boom(self: Any, group: Any, ctx: Any) -> None:
            raise GptqflowError(f"{group.names[0]}: injected solver failure")

        SolveStage.on_group = boom  # type: ignore[method-assign]
    raise SystemExit(run_rank(lambda: execute(resolved)))


def _recipe(model: Path, out: Path, *extra: str) -> dict[str, Any]:
    return compose_recipe(
        "gptq_w4a16",
        [
            f"model.path={model}",
            f"output_dir={out}",
            "dataset.num_samples=4",
            "dataset.seq_len=32",
            "dataset.eval_tokens=0",
            "runtime.progress=false",
            "runtime.timeout_s=60",
            "runtime.nproc_per_node=2",
            *extra,
        ],
    )


def _launch(
    recipes: list[dict[str, Any]], fail_rank: int | None, deadline_s: float = 90
) -> tuple[list[int | None], float]:
    ctx = mp.get_context("spawn")
    port = free_port()
    procs = [
        ctx.Process(target=_rank, args=(r, len(recipes), port, recipes[r], fail_rank))
        for r in range(len(recipes))
    ]
    return run_until(procs, deadline_s)


def test_error_on_one_rank_ends_all_ranks(
    tiny_llama_dir: Path, tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    recipe = _recipe(tiny_llama_dir, tmp_path / "run")
    codes, elapsed = _launch([recipe, recipe], fail_rank=1)
    assert codes == [1, 1], (
        f"exit codes {codes} after {elapsed:.0f}s (None = still running: a hang)"
    )
    err = capfd.readouterr().err
    assert "error on rank 1: model.layers.0.self_attn.q_proj: injected solver failure" in err
    assert "error on rank 0" in err
    assert not (tmp_path / "run" / "checkpoint").exists()


def test_mismatched_recipes_are_refused(
    tiny_llama_dir: Path, tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    a = _recipe(tiny_llama_dir, tmp_path / "run")
    b = _recipe(tiny_llama_dir, tmp_path / "run", "scheme=w3a16")
    codes, _ = _launch([a, b], fail_rank=None)
    assert codes == [1, 1]
    err = capfd.readouterr().err
    assert "the resolved recipe differs between ranks" in err
    assert not (tmp_path / "run" / "checkpoint").exists()
