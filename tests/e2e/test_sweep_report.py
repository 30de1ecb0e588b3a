"""A tiny-model sweep where some runs fail, then ``gptqflow report`` on it.

One sweep of four jobs covers the three ways a run ends: success, a failure inside
the runner (too few calibration tokens, found by the partition stage; the runner
writes the failed report.json itself), and a failure before the runner (pre-flight:
a group size that does not divide the tiny model's width of 128).
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
from pathlib import Path
from typing import Any

import pytest

from gptqflow.cli import main

SMALL = ["dataset.seq_len=32", "dataset.eval_tokens=128", "runtime.progress=false"]


@pytest.fixture(scope="module")
def sweep(tiny_llama_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, int, str]:
    out = tmp_path_factory.mktemp("sweep") / "sweep"
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = main(
            [
                "run",
                "-m",
                "scheme.group_size=64,256",
                "dataset.num_samples=4,100000",
                f"model.path={tiny_llama_dir}",
                f"output_dir={out}",
                *SMALL,
            ]
        )
    return out, code, err.getvalue()


def _jobs(out: Path) -> dict[tuple[int, int], dict[str, Any]]:
    reports = [json.loads(p.read_text()) for p in sorted(out.glob("*/report.json"))]
    return {(r["group_size"], r["num_samples"]): r for r in reports}


def test_sweep_attempts_every_run_and_exits_nonzero_naming_the_failures(
    sweep: tuple[Path, int, str],
) -> None:
    out, code, err = sweep
    assert code == 1
    jobs = _jobs(out)
    assert sorted(jobs) == [(64, 4), (64, 100000), (256, 4), (256, 100000)]
    assert jobs[(64, 4)]["status"] == "ok"
    assert (out / "0" / "checkpoint" / "config.json").is_file()
    assert "3 of 4 run(s) of the sweep failed" in err
    for num in ("1", "2", "3"):
        assert str(out / num) in err
    assert "Traceback" not in err


def test_failed_runs_leave_report_json_with_their_error(sweep: tuple[Path, int, str]) -> None:
    jobs = _jobs(sweep[0])
    inside = jobs[(64, 100000)]  # written by the runner: the stages it ran are there
    assert inside["status"] == "failed" and "tokens" in inside["error"]
    assert "load" in inside["stages"]
    for key in ((256, 4), (256, 100000)):  # refused by pre-flight, written by the launcher
        report = jobs[key]
        assert report["status"] == "failed"
        assert "does not divide the input width" in report["error"]
        assert report["scheme"] == "w4a16" and report["bits"] == 4
        assert report["stages"] == {}


def test_report_of_the_sweep(
    sweep: tuple[Path, int, str], capsys: pytest.CaptureFixture[str]
) -> None:
    out = sweep[0]
    assert main(["report", str(out)]) == 0
    printed = capsys.readouterr().out.split()
    expected = [
        out / "report.md",
        out / "report.csv",
        out / "report-perplexity.png",
        out / "report-stages.png",
    ]
    assert printed == [str(p) for p in expected]
    for png in expected[2:]:
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with (out / "report.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [r["run"] for r in rows] == ["0", "1", "2", "3"]
    assert [r["status"] for r in rows] == ["ok", "failed", "failed", "failed"]
    ok = json.loads((out / "0" / "report.json").read_text())
    assert rows[0]["ppl quantized"] == f"{ok['perplexity']['quantized']:.4f}"
    assert rows[0]["solve s"] == f"{ok['stages']['solve']['seconds']:.2f}"
    assert rows[0]["error"] == ""
    assert "does not divide" in rows[2]["error"] and rows[2]["solve s"] == ""
    md = (out / "report.md").read_text()
    assert "4 run(s), 1 ok, 3 failed" in md and "![report-stages](report-stages.png)" in md


def test_example_sweep_recipe_lists_its_four_runs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from gptqflow.framework import launcher

    seen: list[tuple[str, int, int]] = []

    def record(resolved: dict[str, Any]) -> None:
        s = resolved["scheme"]
        seen.append((s["name"], s["group_size"], resolved["dataset"]["num_samples"]))

    monkeypatch.setattr(launcher, "run_resolved", record)
    argv = ["run", "--config-name", "smollm2_sweep", "-m", f"output_dir={tmp_path / 'sw'}"]
    assert main(argv) == 0
    assert sorted(seen) == [
        ("w3a16", 64, 32),
        ("w3a16", 64, 128),
        ("w4a16", 64, 32),
        ("w4a16", 64, 128),
    ]


@pytest.mark.slow  # two full tiny runs: ~10 s on a busy machine; the sweep above covers report
def test_example_sweep_then_report_on_the_tiny_model(tiny_llama_dir: Path, tmp_path: Path) -> None:
    """The documented two commands, with the calibration made tiny (2 runs: w4a16, w3a16)."""
    out = tmp_path / "example"
    run = ["run", "--config-name", "smollm2_sweep", "-m", f"output_dir={out}"]
    assert main([*run, f"model.path={tiny_llama_dir}", "dataset.num_samples=4", *SMALL]) == 0
    assert main(["report", str(out)]) == 0
    with (out / "report.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [(r["run"], r["status"], r["scheme"], r["bits"]) for r in rows] == [
        ("0", "ok", "w4a16", "4"),
        ("1", "ok", "w3a16", "3"),
    ]
    assert all(float(r["ppl quantized"]) > 1 for r in rows)
    assert (out / "report-perplexity.png").is_file() and (out / "report-stages.png").is_file()
