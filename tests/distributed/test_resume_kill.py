"""SIGKILL ranks after layer 1 of a 3-layer model, resume, and get an uninterrupted run's bytes.

The ranks are spawned processes (gloo on loopback, like torchrun's workers). The kill
is deterministic without any hook in the library: the child process wraps
``ResumePoints.after_layer`` (or the calibrate stage's group hook, for "mid-calibration") and
sends itself SIGKILL at the chosen point, so the run dies at exactly that place every
time. A killed rank gets no chance to clean up; the others must notice on their own.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from gptqflow.framework.compose import compose_recipe
from helpers import free_port, run_until, set_rank_env

WEIGHTS = "checkpoint/model.safetensors"


def _die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def _hang() -> None:
    """Stop without dying: the sockets stay open, so only the collective timeout can tell."""
    os.kill(os.getpid(), signal.SIGSTOP)


def _rank(rank: int, world: int, port: int, resolved: dict[str, Any], kill: str | None) -> None:
    """One rank. ``kill``: None, "after-point-1", "mid-layer-1" (this rank dies there) or
    "hang-mid-layer-1" (it stops there)."""
    os.environ["OMP_NUM_THREADS"] = "1"
    if world > 1:
        set_rank_env(rank, world, port)
    import torch

    torch.set_num_threads(1)
    from gptqflow.framework.api import execute
    from gptqflow.framework.launcher import run_rank
    from gptqflow.framework.resume import ResumePoints
    from gptqflow.stages.calibrate import CalibrateStage

    if kill == "after-point-1":
        after_layer = ResumePoints.after_layer

        def die_after(self: Any, state: Any, layer: Any, stages: Any, n_layers: int) -> None:
            after_layer(self, state, layer, stages, n_layers)
            if layer.index + 1 == 1:  # the resume point after layer 0 is on disk
                _die()

        ResumePoints.after_layer = die_after  # type: ignore[method-assign]
    elif kill in ("mid-layer-1", "hang-mid-layer-1"):
        on_group = CalibrateStage.on_group
        fault = _die if kill == "mid-layer-1" else _hang

        def die_inside(self: Any, group: Any, ctx: Any) -> None:
            on_group(self, group, ctx)
            if group.layer.index == 1:
                # layer 1's first group: its Hessian is built, its all-reduce never happens
                fault()

        CalibrateStage.on_group = die_inside  # type: ignore[method-assign]
    raise SystemExit(run_rank(lambda: execute(resolved)))


def recipe(model: Path, out: Path, world: int, *extra: str) -> dict[str, Any]:
    return compose_recipe(
        "gptq_w4a16",
        [
            f"model.path={model}",
            f"output_dir={out}",
            "dataset.num_samples=4",
            "dataset.seq_len=32",
            "dataset.eval_tokens=256",
            "runtime.progress=false",
            "runtime.num_threads=1",
            "runtime.checkpoint_every=1",
            "runtime.timeout_s=30",
            f"runtime.nproc_per_node={world}",
            *extra,
        ],
    )


def launch(
    resolved: dict[str, Any], world: int, kills: dict[int, str], deadline_s: float = 120
) -> tuple[list[int | None], float]:
    """Start ``world`` ranks; return their exit codes (None: still running at the deadline)."""
    ctx = mp.get_context("spawn")
    port = free_port()
    procs = [
        ctx.Process(target=_rank, args=(r, world, port, resolved, kills.get(r)))
        for r in range(world)
    ]
    return run_until(procs, deadline_s)


@pytest.fixture(scope="module")
def reference(tiny_llama3_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An uninterrupted one-rank run (N ranks give the same bytes: tests/distributed/test_world_size.py)."""
    out = tmp_path_factory.mktemp("reference")
    codes, _ = launch(recipe(tiny_llama3_dir, out, 1), 1, {})
    assert codes == [0]
    return out


def _killed_then_resumed(
    model: Path, out: Path, world: int, kills: dict[int, str], layers_done: int
) -> dict[str, Any]:
    codes, elapsed = launch(recipe(model, out, world), world, kills)
    for r in range(world):
        want = -signal.SIGKILL if r in kills else 1
        assert codes[r] == want, f"exit codes {codes} after {elapsed:.0f}s (None: a hang)"
    m = json.loads((out / "resume" / "manifest.json").read_text())
    assert (m["layers_done"], m["world_size"]) == (layers_done, world)
    assert not (out / "checkpoint").exists()
    codes, elapsed = launch(recipe(model, out, world, "runtime.resume=true"), world, {})
    assert codes == [0] * world, f"resume: exit codes {codes} after {elapsed:.0f}s"
    assert not (out / "resume").exists()
    return dict(json.loads((out / "report.json").read_text()))


def test_sigkill_one_rank_run_after_layer_1(
    tiny_llama3_dir: Path, reference: Path, tmp_path: Path
) -> None:
    report = _killed_then_resumed(tiny_llama3_dir, tmp_path, 1, {0: "after-point-1"}, 1)
    assert (tmp_path / WEIGHTS).read_bytes() == (reference / WEIGHTS).read_bytes()
    assert [layer["index"] for layer in report["layers"]] == [0, 1, 2]


@pytest.mark.slow
@pytest.mark.parametrize(
    "kills",
    [{0: "after-point-1", 1: "after-point-1"}, {1: "after-point-1"}, {0: "after-point-1"}],
    ids=["all-ranks", "rank1", "rank0"],
)
def test_sigkill_two_ranks_after_layer_1(
    tiny_llama3_dir: Path,
    reference: Path,
    tmp_path: Path,
    kills: dict[int, str],
    capfd: pytest.CaptureFixture[str],
) -> None:
    _killed_then_resumed(tiny_llama3_dir, tmp_path, 2, kills, 1)
    assert (tmp_path / WEIGHTS).read_bytes() == (reference / WEIGHTS).read_bytes()
    err = capfd.readouterr().err
    for lost in kills if len(kills) == 1 else ():
        assert f"lost contact with rank {lost}" in err, err[-3000:]


@pytest.mark.slow
def test_rank_killed_mid_calibration(
    tiny_llama3_dir: Path, reference: Path, tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    """Rank 1 dies inside layer 1's forward: rank 0 exits naming it; resume from layer 1."""
    _killed_then_resumed(tiny_llama3_dir, tmp_path, 2, {1: "mid-layer-1"}, 1)
    assert (tmp_path / WEIGHTS).read_bytes() == (reference / WEIGHTS).read_bytes()
    err = capfd.readouterr().err
    assert "gptqflow: error on rank 0: lost contact with rank 1" in err, err[-3000:]
    shutil.rmtree(tmp_path / "checkpoint")


@pytest.mark.slow
def test_hung_rank_ends_the_run_within_the_collective_timeout(
    tiny_llama3_dir: Path, tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    """Rank 1 stops (SIGSTOP) inside layer 1: rank 0 gives up after runtime.timeout_s."""
    resolved = recipe(tiny_llama3_dir, tmp_path, 2, "runtime.timeout_s=5")
    ctx = mp.get_context("spawn")
    port = free_port()
    procs = [
        ctx.Process(target=_rank, args=(r, 2, port, resolved, "hang-mid-layer-1" if r else None))
        for r in range(2)
    ]
    for p in procs:
        p.start()
    try:
        procs[0].join(timeout=120)
        assert procs[0].exitcode == 1, f"rank 0: exit code {procs[0].exitcode} (None: a hang)"
        assert procs[1].is_alive(), "rank 1 is stopped, not dead"
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join()
    err = capfd.readouterr().err
    assert "gptqflow: error on rank 0: lost contact with rank 1 during an all-reduce" in err, err[
        -3000:
    ]
    assert "runtime.timeout_s=5s" in err
    assert json.loads((tmp_path / "resume" / "manifest.json").read_text())["layers_done"] == 1


def _cli(model: Path, out: Path, *extra: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "gptqflow",
        "run",
        f"model.path={model}",
        f"output_dir={out}",
        "dataset.num_samples=16",
        "dataset.seq_len=128",
        "dataset.eval_tokens=0",
        "runtime.progress=false",
        "runtime.num_threads=1",
        "runtime.checkpoint_every=1",
        "runtime.nproc_per_node=2",
        *extra,
    ]


@pytest.mark.slow
def test_killing_the_whole_cli_run_from_outside(tiny_llama3_dir: Path, tmp_path: Path) -> None:
    """`gptqflow run runtime.nproc_per_node=2` (driver, torchrun agent, 2 workers) is killed
    with SIGKILL by a watcher as soon as the resume point of layer 1 appears; the same
    command with runtime.resume=true then writes the bytes of an uninterrupted run."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    ref = subprocess.run(
        _cli(tiny_llama3_dir, tmp_path / "ref"), env=env, capture_output=True, text=True
    )
    assert ref.returncode == 0, ref.stderr[-2000:]
    out = tmp_path / "run"
    manifest = out / "resume" / "manifest.json"
    proc = subprocess.Popen(
        _cli(tiny_llama3_dir, out),
        env=env,
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        while proc.poll() is None and not manifest.exists():
            time.sleep(0.002)
        os.killpg(proc.pid, signal.SIGKILL)  # the driver's session: agent and workers too
    finally:
        proc.wait()
    done = json.loads(manifest.read_text())["layers_done"]
    assert 1 <= done < 3, f"the run got to {done} layers before the kill landed"
    time.sleep(2)  # workers that outlived their launcher would go on writing (they used to)
    assert json.loads(manifest.read_text())["layers_done"] == done
    assert proc.returncode == -signal.SIGKILL and not (out / "checkpoint").exists()
    again = subprocess.run(
        _cli(tiny_llama3_dir, out, "runtime.resume=true"), env=env, capture_output=True, text=True
    )
    assert again.returncode == 0, again.stderr[-2000:]
    assert (out / WEIGHTS).read_bytes() == (tmp_path / "ref" / WEIGHTS).read_bytes()
    assert not (out / "resume").exists()


@pytest.mark.slow
def test_three_ranks_name_the_one_they_lost(
    tiny_llama3_dir: Path, reference: Path, tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    """With more than two ranks the survivors find the lost one through the rendezvous store."""
    _killed_then_resumed(tiny_llama3_dir, tmp_path, 3, {2: "mid-layer-1"}, 1)
    assert (tmp_path / WEIGHTS).read_bytes() == (reference / WEIGHTS).read_bytes()
    err = capfd.readouterr().err
    for survivor in (0, 1):
        assert f"error on rank {survivor}: lost contact with rank 2 during" in err, err[-3000:]
