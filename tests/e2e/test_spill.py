"""Hidden states beyond ``runtime.max_hidden_bytes`` go to files: the same checkpoint bytes.

The tiny 3-layer Llama with 4 x 32 calibration tokens carries 4·32·128·4 = 64 KiB of
hidden states per rank (hidden size 128): a 10KB budget spills them. Checked: the checkpoint is
byte-identical to an in-memory run's, report.json says the states were spilled, the
loop really read its inputs from the file (not from memory), the files are gone after
the run, a run that crashes after a resume point resumes from the spilled states to
the same bytes, and a size the setting cannot parse is refused with the allowed
spellings.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from tests.e2e.test_resume import WEIGHTS, _Crash, crash_after_point, run

from gptqflow.framework.compose import compose_recipe
from gptqflow.framework.layerloop import SPILL_DIR
from gptqflow.framework.resume import MANIFEST, RESUME_DIR
from gptqflow.framework.schema import RecipeError, validate_recipe
from gptqflow.modeling import spill as spill_module

SPILL = "runtime.max_hidden_bytes=10KB"
STATES = 4 * 32 * 128 * 4  # samples x tokens x hidden x float32


@pytest.fixture(scope="module")
def in_memory(tiny_llama3_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("memory")
    report = run(tiny_llama3_dir, out)
    assert report["ranks"][0]["hidden_states"] == {"bytes": STATES, "spilled": False}
    return out


def test_spilled_hidden_states_give_the_same_checkpoint(
    tiny_llama3_dir: Path, in_memory: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    reads: list[int] = []
    original = spill_module._Parts.__getitem__

    def counting(self: Any, i: Any) -> Any:
        reads.append(1)
        return original(self, i)

    monkeypatch.setattr(spill_module._Parts, "__getitem__", counting)
    out = tmp_path / "spilled"
    report = run(tiny_llama3_dir, out, SPILL)
    assert (out / WEIGHTS).read_bytes() == (in_memory / WEIGHTS).read_bytes()
    info = report["ranks"][0]["hidden_states"]
    assert info["spilled"] is True and info["bytes"] == STATES
    # 10 KB holds 19 tokens of 512 bytes: one 32-token sample per chunk (at least one).
    assert info["chunk_tokens"] == 10_000 // 512
    # Layers 1 and 2 read their inputs (4 chunks) once per group and once for the outputs;
    # layer 0 reads the captured inputs the same way.
    assert len(reads) >= 3 * 4 * 2
    assert not (out / SPILL_DIR).exists(), "the spill files are removed after the run"


def test_a_spilled_run_resumes_to_the_same_bytes(
    tiny_llama3_dir: Path, in_memory: Path, tmp_path: Path
) -> None:
    out = tmp_path / "crashed"
    with crash_after_point(1), pytest.raises(_Crash):
        run(tiny_llama3_dir, out, SPILL)
    m = json.loads((out / RESUME_DIR / MANIFEST).read_text())
    entry = m["ranks"][0]["hidden"]
    assert entry["spill"]["bytes"] == STATES, "the spilled states were copied whole"
    assert (out / RESUME_DIR / entry["spill"]["file"]).is_file()
    run(tiny_llama3_dir, out, SPILL, "runtime.resume=true")
    assert (out / WEIGHTS).read_bytes() == (in_memory / WEIGHTS).read_bytes()


@pytest.mark.slow
def test_resume_may_turn_spilling_off(
    tiny_llama3_dir: Path, in_memory: Path, tmp_path: Path
) -> None:
    """A point written with spilled states resumes in memory (the setting is neutral)."""
    out = tmp_path / "crashed"
    with crash_after_point(1), pytest.raises(_Crash):
        run(tiny_llama3_dir, out, SPILL)
    report = run(tiny_llama3_dir, out, "runtime.resume=true")
    assert report["resumed_after_layers"] == 1
    assert (out / WEIGHTS).read_bytes() == (in_memory / WEIGHTS).read_bytes()


def test_an_unreadable_budget_is_refused(tiny_llama3_dir: Path, tmp_path: Path) -> None:
    resolved = compose_recipe(
        "gptq_w4a16",
        [
            f"model.path={tiny_llama3_dir}",
            f"output_dir={tmp_path}",
            "runtime.max_hidden_bytes=lots",
        ],
    )
    with pytest.raises(RecipeError) as info:
        validate_recipe(resolved)
    text = str(info.value)
    assert "runtime.max_hidden_bytes" in text and "500MB, 2GB or 1GiB" in text


@pytest.mark.slow
def test_gptaq_reads_spilled_inputs_for_its_float_path(
    tiny_llama3_dir: Path, tmp_path: Path
) -> None:
    """float-path runs the first layer over the loop's (spilled) inputs: same bytes.

    Every sample is followed (``sample_stride=1``): a stride needs the samples in memory,
    and a spilled run with one is refused in pre-flight.
    """
    a, b = tmp_path / "memory", tmp_path / "spilled"
    gptaq = ("method=gptaq", "stages.float-path.sample_stride=1", "runtime.checkpoint_every=0")
    run(tiny_llama3_dir, a, *gptaq)
    run(tiny_llama3_dir, b, *gptaq, SPILL)
    assert (a / WEIGHTS).read_bytes() == (b / WEIGHTS).read_bytes()
