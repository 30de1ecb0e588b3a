"""Whole runs on ``dataset=local`` and ``calibration=``: the same data gives the same checkpoint,
resume points carry variable-length activations and refuse other data."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import yaml

import gptqflow
from gptqflow.errors import GptqflowError
from gptqflow.framework.compose import compose_recipe
from gptqflow.framework.distributed import DistContext
from gptqflow.framework.resume import ResumeError, ResumePoints
from gptqflow.framework.runner import Runner
from gptqflow.framework.schema import RecipeError, validate_recipe
from gptqflow.framework.state import LayerRun
from helpers import chat_rows, render_chat_by_hand

WEIGHTS = "checkpoint/model.safetensors"
SMALL = [
    "dataset.num_samples=5",
    "dataset.seq_len=256",
    "dataset.eval_tokens=512",
    "runtime.progress=false",
]


def overrides(model: Path, out: Path, *extra: str) -> list[str]:
    return [f"model.path={model}", f"output_dir={out}", *SMALL, *extra]


def run(model: Path, out: Path, *extra: str) -> dict[str, Any]:
    resolved = compose_recipe("gptq_w4a16", overrides(model, out, *extra))
    return Runner(validate_recipe(resolved), resolved, DistContext()).run()


@pytest.fixture(scope="module")
def rows(chat_source_text: str) -> list[dict[str, Any]]:
    return chat_rows(chat_source_text, 12)


@pytest.fixture(scope="module")
def chat_jsonl(rows: list[dict[str, Any]], tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("data") / "chat.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def from_file(
    tiny_chat_llama_dir: Path, chat_jsonl: Path, tmp_path_factory: pytest.TempPathFactory
) -> tuple[Path, dict[str, Any]]:
    out = tmp_path_factory.mktemp("from-file")
    return out, run(tiny_chat_llama_dir, out, "dataset=local", f"dataset.path={chat_jsonl}")


def test_report_records_the_data(from_file: tuple[Path, dict[str, Any]], chat_jsonl: Path) -> None:
    _, report = from_file
    info = report["calibration"]
    assert info["source"] == {"kind": "file", "path": str(chat_jsonl.resolve())}
    assert info["column"] == "messages" and info["split"] == "train"
    assert info["samples"] == 5 and len(info["fingerprint"]) == 64
    assert info["ranks"] == [{"samples": 5, "tokens": info["tokens"]}]
    assert report["tokens_calibrated"] == info["tokens"] < 5 * 256


def test_python_conversations_give_the_same_checkpoint(
    from_file: tuple[Path, dict[str, Any]],
    rows: list[dict[str, Any]],
    tiny_chat_llama_dir: Path,
    tmp_path: Path,
) -> None:
    ref_dir, ref = from_file
    report = gptqflow.run(
        "gptq_w4a16",
        overrides(tiny_chat_llama_dir, tmp_path),
        calibration=[r["messages"] for r in rows],
    )
    assert (tmp_path / WEIGHTS).read_bytes() == (ref_dir / WEIGHTS).read_bytes()
    assert report["calibration"]["fingerprint"] == ref["calibration"]["fingerprint"]
    assert report["calibration"]["source"]["type"] == "list of conversations"
    written = yaml.safe_load((tmp_path / "recipe.yaml").read_text())
    assert written["dataset"]["path"] == "<calibration>"
    assert written["dataset"]["calibration_file"] is None


def test_text_route_refuses_a_chat_jsonl(
    chat_jsonl: Path, tiny_chat_llama_dir: Path, tmp_path: Path
) -> None:
    with pytest.raises(GptqflowError, match=r"chat.jsonl: is a .jsonl data file.*dataset=local"):
        run(tiny_chat_llama_dir, tmp_path, f"dataset.calibration_file={chat_jsonl}")


def test_recipe_with_both_sources_is_refused(
    chat_jsonl: Path, tiny_chat_llama_dir: Path, tmp_path: Path
) -> None:
    with pytest.raises(RecipeError, match="set one calibration source"):
        run(tiny_chat_llama_dir, tmp_path, f"+dataset.path={chat_jsonl}")


def test_recorded_python_source_needs_the_data(tiny_chat_llama_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(GptqflowError, match="pass that data again"):
        run(tiny_chat_llama_dir, tmp_path, "dataset=local", "dataset.path='<calibration>'")


# ---------------------------------------------------------------------- resume
class _Crash(BaseException):
    """Stands for the process dying."""


@contextmanager
def crash_after_point(layers_done: int) -> Iterator[None]:
    original = ResumePoints.after_layer

    def after_layer(
        self: ResumePoints, state: Any, layer: LayerRun, stages: Any, n_layers: int
    ) -> None:
        original(self, state, layer, stages, n_layers)
        if layer.index + 1 == layers_done:
            raise _Crash

    ResumePoints.after_layer = after_layer  # type: ignore[method-assign]
    try:
        yield
    finally:
        ResumePoints.after_layer = original  # type: ignore[method-assign]


def test_resume_with_rows_is_identical_and_refuses_other_data(
    tiny_llama3_dir: Path, rows: list[dict[str, Any]], tmp_path: Path
) -> None:
    """Pre-rendered ``text`` rows (the 3-layer model has no chat template), several lengths."""
    data = tmp_path / "text.jsonl"
    texts = [render_chat_by_hand(r["messages"]) for r in rows]
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    args = ("dataset=local", f"dataset.path={data}", "runtime.checkpoint_every=1")
    run(tiny_llama3_dir, tmp_path / "ref", *args)
    with crash_after_point(1), pytest.raises(_Crash):
        run(tiny_llama3_dir, tmp_path / "crashed", *args)
    changed = tmp_path / "changed"
    shutil.copytree(tmp_path / "crashed", changed)
    run(tiny_llama3_dir, tmp_path / "crashed", *args, "runtime.resume=true")
    ref = (tmp_path / "ref" / WEIGHTS).read_bytes()
    assert (tmp_path / "crashed" / WEIGHTS).read_bytes() == ref
    # Same path, other contents: the fingerprint differs and the point is refused.
    data.write_text("".join(json.dumps({"text": t + " more"}) + "\n" for t in texts))
    with pytest.raises(ResumeError, match="the calibration data differs"):
        run(tiny_llama3_dir, changed, *args, "runtime.resume=true")


def test_text_route_micro_batches_give_the_same_checkpoint(
    tiny_llama_dir: Path, tmp_path: Path
) -> None:
    """One sample per forward (the chunked path) writes the bytes of the single forward."""
    run(tiny_llama_dir, tmp_path / "one", "dataset.num_samples=4", "dataset.seq_len=64")
    run(
        tiny_llama_dir,
        tmp_path / "cap",
        "dataset.num_samples=4",
        "dataset.seq_len=64",
        "runtime.max_forward_tokens=64",
    )
    assert (tmp_path / "cap" / WEIGHTS).read_bytes() == (tmp_path / "one" / WEIGHTS).read_bytes()
