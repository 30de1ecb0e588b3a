"""method=gptaq (float-path + solve gptaq) on 1, 2 and 3 gloo ranks: byte-identical checkpoints.

The float-path statistic is a sum over samples reduced across ranks, and every rank
computes the same asymmetric target for a module; so the world size must not show in
a single byte of the checkpoint, as for GPTQ. The Hessian-aware observer runs in the
same recipes (it reads the reduced Hessian only).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from test_world_size import run_at

from gptqflow.modeling.checkpoint import read_quantized_codes

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def runs(
    tiny_llama_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> dict[int, tuple[Path, dict[str, Any]]]:
    out = {}
    for ws in (1, 2, 3):
        d = tmp_path_factory.mktemp(f"gptaq-ws{ws}")
        out[ws] = (d, run_at(ws, tiny_llama_dir, d, "method=gptaq", "scheme.observer=hessian"))
    return out


@pytest.mark.parametrize("ws", [2, 3])
def test_gptaq_checkpoint_bytes_match_one_rank(
    runs: dict[int, tuple[Path, dict[str, Any]]], ws: int
) -> None:
    a = (runs[1][0] / "checkpoint" / "model.safetensors").read_bytes()
    b = (runs[ws][0] / "checkpoint" / "model.safetensors").read_bytes()
    assert a == b


def test_gptaq_ran_its_stages(runs: dict[int, tuple[Path, dict[str, Any]]]) -> None:
    _, report = runs[1]
    for layer in report["layers"]:
        assert "float-path" in layer["stages"]
    recipe = json.loads(json.dumps(report.get("stages", {})))
    assert "float-path" in recipe


def test_gptaq_differs_from_gptq(
    runs: dict[int, tuple[Path, dict[str, Any]]], tiny_llama_dir: Path, tmp_path: Path
) -> None:
    """The asymmetric target changes codes (else the method would not be running)."""
    run_at(1, tiny_llama_dir, tmp_path, "scheme.observer=hessian")
    gptq = read_quantized_codes(tmp_path / "checkpoint")
    gptaq = read_quantized_codes(runs[1][0] / "checkpoint")
    changed = sum(int((gptq[n]["qweight"] != gptaq[n]["qweight"]).sum()) for n in gptq)
    assert changed > 0


def test_gptaq_chunked_forward_gives_the_same_bytes(
    runs: dict[int, tuple[Path, dict[str, Any]]], tiny_llama_dir: Path, tmp_path: Path
) -> None:
    """Samples forwarded in chunks (runtime.max_forward_tokens) on both paths: same checkpoint."""
    run_at(
        2,
        tiny_llama_dir,
        tmp_path,
        "method=gptaq",
        "scheme.observer=hessian",
        "runtime.max_forward_tokens=128",
    )
    a = (runs[1][0] / "checkpoint" / "model.safetensors").read_bytes()
    assert a == (tmp_path / "checkpoint" / "model.safetensors").read_bytes()
