"""GPTAQ's float path on every k-th sample (``stages.float-path.sample_stride``).

The samples are picked by their index in the whole calibration set, so 1 and 2 ranks
(whose slices hold the picked samples at different positions) write the same bytes; and
the statistic really changes with the stride (the setting is not ignored).
"""

from __future__ import annotations

from pathlib import Path

import pytest
from test_world_size import run_at

STRIDE = ("method=gptaq", "stages.float-path.sample_stride=2")


def test_stride_gives_the_same_bytes_at_1_and_2_ranks(tiny_llama_dir: Path, tmp_path: Path) -> None:
    one, two = tmp_path / "one", tmp_path / "two"
    run_at(1, tiny_llama_dir, one, *STRIDE)
    report = run_at(2, tiny_llama_dir, two, *STRIDE)
    assert report["stages"]["float-path"]["seconds"] > 0
    a = (one / "checkpoint" / "model.safetensors").read_bytes()
    assert a == (two / "checkpoint" / "model.safetensors").read_bytes()


@pytest.mark.slow
def test_stride_changes_the_statistic(tiny_llama_dir: Path, tmp_path: Path) -> None:
    run_at(1, tiny_llama_dir, tmp_path / "two", *STRIDE)
    run_at(1, tiny_llama_dir, tmp_path / "one", "method=gptaq", "stages.float-path.sample_stride=1")
    a = (tmp_path / "two" / "checkpoint" / "model.safetensors").read_bytes()
    assert a != (tmp_path / "one" / "checkpoint" / "model.safetensors").read_bytes()
