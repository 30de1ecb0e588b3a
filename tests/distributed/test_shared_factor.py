"""A factorisation shared by every rank gives the checkpoint of a one-rank run, byte for byte.

The tiny Llama's Hessians are far too narrow for the bundled cost model to share
their factorisation, so these runs use a cost model that makes factorising
expensive and messages free: every group is then factorised by all ranks
together, panel by panel (``down_proj``'s 640 columns are three panels, owned by
ranks 0, 1, 2), and the result must not change.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from test_world_size import run_at

from gptqflow.gptq.cost import CostModel
from helpers import make_tiny_llama


@pytest.fixture(scope="module")
def wide_llama(tmp_path_factory: pytest.TempPathFactory, tiny_tokenizer_dir: Path) -> Path:
    out = tmp_path_factory.mktemp("wide_llama")
    return make_tiny_llama(out, tiny_tokenizer_dir, intermediate_size=640)


@pytest.fixture(scope="module")
def sharing_cost(tmp_path_factory: pytest.TempPathFactory) -> Path:
    data = CostModel.default().to_dict()
    data.update(factor_s_per_col3=1e-3, latency_s=0.0, bytes_per_s=1e15, fitted_on="test")
    path = tmp_path_factory.mktemp("cost") / "sharing.json"
    path.write_text(json.dumps(data))
    return path


def _run(ws: int, model: Path, out: Path, cost: Path) -> dict[str, Any]:
    return run_at(ws, model, out, f"+stages.solve.cost_model={cost}")


def test_shared_factorisation_is_bit_identical(
    wide_llama: Path, sharing_cost: Path, tmp_path: Path
) -> None:
    one = _run(1, wide_llama, tmp_path / "ws1", sharing_cost)
    three = _run(3, wide_llama, tmp_path / "ws3", sharing_cost)
    # At one rank there is nothing to share; at three every group is shared.
    assert all(layer["shared_factor"] == [] for layer in one["layers"])
    for layer in three["layers"]:
        assert layer["shared_factor"] == [
            "q_proj+k_proj+v_proj",
            "o_proj",
            "gate_proj+up_proj",
            "down_proj",
        ]
    a = (tmp_path / "ws1" / "checkpoint" / "model.safetensors").read_bytes()
    b = (tmp_path / "ws3" / "checkpoint" / "model.safetensors").read_bytes()
    assert a == b
