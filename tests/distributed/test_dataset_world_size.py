"""Variable-length calibration rows on 1, 2 and 3 gloo ranks give byte-identical checkpoints."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from helpers import chat_rows, run_at_world_size

CHECKPOINT = "checkpoint/model.safetensors"


def run_at(world_size: int, model: Path, data: Path, out: Path, *extra: str) -> dict[str, Any]:
    return run_at_world_size(
        world_size,
        [
            f"model.path={model}",
            f"output_dir={out}",
            "dataset=local",
            f"dataset.path={data}",
            "dataset.num_samples=7",
            "dataset.seq_len=512",
            "dataset.eval_tokens=1024",
            "runtime.progress=false",
            *extra,
        ],
        in_process_single=True,
    )


@pytest.fixture(scope="module")
def chat_jsonl(chat_source_text: str, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("chat") / "chat.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in chat_rows(chat_source_text, 20)))
    return path


RUNS: dict[str, tuple[int, tuple[str, ...]]] = {
    "1": (1, ()),
    "2": (2, ()),
    "3": (3, ()),
    "2-cap": (2, ("runtime.max_forward_tokens=300",)),
}


@pytest.fixture(scope="module")
def runs(
    tiny_chat_llama_dir: Path, chat_jsonl: Path, tmp_path_factory: pytest.TempPathFactory
) -> Any:
    """``runs(key)``: the run directory and report of one entry of RUNS, run on first use."""
    done: dict[str, tuple[Path, dict[str, Any]]] = {}

    def get(key: str) -> tuple[Path, dict[str, Any]]:
        if key not in done:
            ws, extra = RUNS[key]
            d = tmp_path_factory.mktemp(f"rows-ws{key}")
            done[key] = (d, run_at(ws, tiny_chat_llama_dir, chat_jsonl, d, *extra))
        return done[key]

    return get


def test_samples_have_different_lengths(runs: Any) -> None:
    info = runs("1")[1]["calibration"]
    assert info["column"] == "messages" and info["samples"] == 7
    assert info["source"]["kind"] == "file"
    # Not all truncated to seq_len: the rows keep their own lengths.
    assert info["tokens"] < 7 * 512
    assert runs("1")[1]["tokens_calibrated"] == info["tokens"]


# 3 ranks by default; 2 ranks (with and without micro-batches) in the slow suite.
@pytest.mark.parametrize(
    "key",
    [pytest.param("2", marks=pytest.mark.slow), "3", pytest.param("2-cap", marks=pytest.mark.slow)],
)
def test_checkpoint_identical_at_any_world_size(runs: Any, key: str) -> None:
    ref_dir, ref = runs("1")
    got_dir, got = runs(key)
    assert (got_dir / CHECKPOINT).read_bytes() == (ref_dir / CHECKPOINT).read_bytes()
    assert got["perplexity"] == ref["perplexity"]
    info = got["calibration"]
    assert info["fingerprint"] == ref["calibration"]["fingerprint"]
    assert info["tokens"] == ref["calibration"]["tokens"] == got["tokens_calibrated"]
    ranks = info["ranks"]
    assert len(ranks) == got["world_size"] and sum(r["samples"] for r in ranks) == 7
    assert [r["tokens"] for r in ranks] == [r["tokens_calibrated"] for r in got["ranks"]]
