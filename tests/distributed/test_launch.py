"""Starting ranks: `gptqflow run runtime.nproc_per_node=2` and the user's own torchrun."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SMALL = [
    "dataset.num_samples=4",
    "dataset.seq_len=32",
    "dataset.eval_tokens=256",
    "runtime.progress=false",
]


def _run(args: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def test_run_starts_ranks_itself(tiny_llama_dir: Path, tmp_path: Path) -> None:
    out1, out2 = tmp_path / "one", tmp_path / "two"
    base = [
        sys.executable,
        "-m",
        "gptqflow",
        "run",
        f"model.path={tiny_llama_dir}",
        *SMALL,
        "runtime.num_threads=1",
    ]
    r1 = _run([*base, f"output_dir={out1}"], tmp_path)
    assert r1.returncode == 0, r1.stderr[-2000:]
    r2 = _run([*base, f"output_dir={out2}", "runtime.nproc_per_node=2"], tmp_path)
    assert r2.returncode == 0, r2.stderr[-2000:]
    report = json.loads((out2 / "report.json").read_text())
    assert report["world_size"] == 2 and len(report["ranks"]) == 2
    assert report["bytes_communicated"] > 0
    # runtime.cpu_affinity=auto: on a machine with a core per rank, disjoint cores.
    cores = [r["cpu_cores"] for r in report["ranks"]]
    if hasattr(os, "sched_getaffinity") and len(os.sched_getaffinity(0)) >= 2:
        assert all(cores) and not set(cores[0]) & set(cores[1]), cores
    assert json.loads((out1 / "report.json").read_text())["ranks"][0]["cpu_cores"] is None
    assert (out1 / "checkpoint" / "model.safetensors").read_bytes() == (
        out2 / "checkpoint" / "model.safetensors"
    ).read_bytes()
    # Workers never run Hydra: one .hydra directory, written by the driver.
    assert [p.name for p in out2.rglob(".hydra")] == [".hydra"]


@pytest.mark.slow  # the launcher path is covered by test_run_starts_ranks_itself
def test_users_own_torchrun(tiny_llama_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "torchrun"
    r = _run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc-per-node=2",
            "-m",
            "gptqflow",
            "run",
            f"model.path={tiny_llama_dir}",
            f"output_dir={out}",
            *SMALL,
        ],
        tmp_path,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    report = json.loads((out / "report.json").read_text())
    assert report["world_size"] == 2
    assert (out / "checkpoint" / "config.json").is_file()
    assert not list(tmp_path.rglob(".hydra")), (
        "ranks under torchrun must not create Hydra directories"
    )


@pytest.mark.slow
def test_two_torchrun_agents_as_two_nodes(tiny_llama_dir: Path, tmp_path: Path) -> None:
    """``torchrun --nnodes=2`` as documented, both agents on this host sharing output_dir:
    the ranks pass the shared-directory check and write the 1-rank checkpoint's bytes."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out, single = tmp_path / "nodes", tmp_path / "single"
    recipe = ["--config-name", "gptq_w4a16", f"model.path={tiny_llama_dir}", *SMALL]
    agents = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "torch.distributed.run",
                "--nnodes=2",
                f"--node-rank={node}",
                "--nproc-per-node=1",
                "--master-addr=127.0.0.1",
                f"--master-port={port}",
                "-m",
                "gptqflow",
                "run",
                *recipe,
                f"output_dir={out}",
            ],
            cwd=tmp_path,
            env={**os.environ, "OMP_NUM_THREADS": "1"},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for node in (0, 1)
    ]
    results = [a.communicate(timeout=300) for a in agents]
    assert [a.returncode for a in agents] == [0, 0], [err[-2000:] for _, err in results]
    assert json.loads((out / "report.json").read_text())["world_size"] == 2
    r = _run([sys.executable, "-m", "gptqflow", "run", *recipe, f"output_dir={single}"], tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    weights = "checkpoint/model.safetensors"
    assert (out / weights).read_bytes() == (single / weights).read_bytes()
    assert not list(out.glob(".gptqflow-shared-*")), "the probe file is removed"
