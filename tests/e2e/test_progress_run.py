"""The layer bar of a real (tiny) run: drawn at a terminal, silent otherwise; tokens counted."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest

from gptqflow.framework.api import run_recipe
from gptqflow.framework.runner import format_summary

SMALL = ["dataset.num_samples=4", "dataset.seq_len=32", "dataset.eval_tokens=0"]


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.mark.parametrize("progress", [True, False])
def test_layer_bar_and_tokens(
    tiny_llama_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, progress: bool
) -> None:
    err = _Terminal()
    monkeypatch.setattr("sys.stderr", err)
    overrides = [f"model.path={tiny_llama_dir}", f"output_dir={tmp_path}", *SMALL]
    report = run_recipe("gptq_w4a16", [*overrides, f"runtime.progress={progress}"], None)
    drawn = err.getvalue()
    if progress:
        assert "layers (128 tokens)" in drawn and "2/2" in drawn and "layer=" in drawn
    else:
        assert "layers (" not in drawn
    assert report["tokens_calibrated"] == 4 * 32
    on_disk = json.loads((tmp_path / "report.json").read_text())
    assert on_disk["tokens_calibrated"] == 128 and on_disk["ranks"][0]["tokens_calibrated"] == 128
    assert "calibrated:  128 tokens (all ranks)" in format_summary(report)
