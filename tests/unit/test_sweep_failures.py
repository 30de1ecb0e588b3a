"""How a Hydra multirun sweep treats failing jobs (no model: the run itself is replaced)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from gptqflow.cli import main
from gptqflow.errors import GptqflowError
from gptqflow.framework import launcher


def _sweep(tmp_path: Path, *extra: str) -> list[str]:
    return [
        "run",
        "-m",
        f"model.path={tmp_path / 'model'}",
        f"output_dir={tmp_path / 'sw'}",
        *extra,
    ]


def test_a_bug_in_one_job_does_not_stop_the_sweep(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    ran: list[int] = []

    def fake_run(resolved: dict[str, Any]) -> None:
        ran.append(resolved["scheme"]["bits"])
        if resolved["scheme"]["bits"] == 3:
            raise RuntimeError("boom in the solver")

    monkeypatch.setattr(launcher, "run_resolved", fake_run)
    code = main(_sweep(tmp_path, "scheme=w3a16,w4a16,w8a16"))
    assert code == 1 and ran == [3, 4, 8]  # the jobs after the failing one still ran
    err = capsys.readouterr().err
    assert "1 of 3 run(s) of the sweep failed" in err
    (line,) = [ln for ln in err.splitlines() if str(tmp_path / "sw" / "0") in ln]
    assert "scheme=w3a16" in line and line.endswith("RuntimeError: boom in the solver")
    report = json.loads((tmp_path / "sw" / "0" / "report.json").read_text())
    assert report["status"] == "failed" and report["error"] == "RuntimeError: boom in the solver"
    assert report["scheme"] == "w3a16" and report["bits"] == 3
    assert not (tmp_path / "sw" / "1" / "report.json").exists()  # fake runs write nothing


def test_an_older_successful_report_is_kept_when_the_job_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Pre-flight refusing to overwrite a finished run touches nothing of that run."""
    old_ok = {"status": "ok", "scheme": "w4a16"}
    old_failed = {"status": "failed", "error": "an earlier failure"}
    for job, old in (("0", old_ok), ("1", old_failed)):
        (tmp_path / "sw" / job).mkdir(parents=True)
        (tmp_path / "sw" / job / "report.json").write_text(json.dumps(old))

    def refuse(_resolved: dict[str, Any]) -> None:
        raise GptqflowError("already holds a checkpoint; pass overwrite=true")

    monkeypatch.setattr(launcher, "run_resolved", refuse)
    assert main(_sweep(tmp_path, "scheme=w4a16,w3a16")) == 1
    assert json.loads((tmp_path / "sw" / "0" / "report.json").read_text()) == old_ok
    replaced = json.loads((tmp_path / "sw" / "1" / "report.json").read_text())
    assert replaced["status"] == "failed" and "already holds" in replaced["error"]
