"""``gptqflow report`` on hand-made run directories: rows, order, columns, failures, errors."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from gptqflow.cli import main
from gptqflow.errors import GptqflowError
from gptqflow.framework.report import NO_REPORT, collect, find_runs, to_csv, write_report


def _report(**over: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "status": "ok",
        "error": None,
        "world_size": 1,
        "scheme": "w4a16",
        "bits": 4,
        "group_size": 64,
        "actorder": "static",
        "num_samples": 32,
        "seq_len": 128,
        "seconds": 12.5,
        "stages": {
            "load": {"seconds": 1.0, "peak_rss_bytes": 1},
            "solve": {"seconds": 7.25, "peak_rss_bytes": 1},
        },
        "perplexity": {"baseline": 20.0, "quantized": 22.123456},
        "ranks": [{"rank": 0, "peak_rss_bytes": 2**30}, {"rank": 1, "peak_rss_bytes": 3 * 2**29}],
    }
    base.update(over)
    return base


def _run(
    d: Path, report: dict[str, Any] | None = None, recipe: dict[str, Any] | None = None
) -> Path:
    d.mkdir(parents=True)
    if report is not None:
        (d / "report.json").write_text(json.dumps(report))
    if recipe is not None:
        (d / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    return d


def _rows(text: str) -> list[dict[str, str]]:
    return list(csv.DictReader(io.StringIO(text)))


def test_rows_in_natural_order_with_union_of_stage_columns(tmp_path: Path) -> None:
    for i in (10, 2, 1):
        _run(tmp_path / str(i), _report(bits=i))
    stages = {"load": {"seconds": 0.5}, "quantized": {"seconds": 3.0}}
    _run(tmp_path / "sub" / "0", _report(stages=stages))
    (tmp_path / "1" / "checkpoint").mkdir()  # inside a run: never searched
    (tmp_path / "1" / "checkpoint" / "report.json").write_text("{}")
    report = collect(tmp_path)
    assert [r.run for r in report.rows] == ["1", "2", "10", "sub/0"]
    assert report.stages == ["load", "solve", "quantized"]
    rows = _rows(to_csv(report))
    assert list(rows[0])[-6:] == [
        "load s",
        "solve s",
        "quantized s",
        "total s",
        "peak RSS GiB",
        "error",
    ]
    assert [r["bits"] for r in rows] == ["1", "2", "10", "4"]
    first, last = rows[0], rows[3]
    assert first["solve s"] == "7.25" and first["quantized s"] == ""
    assert last["solve s"] == "" and last["quantized s"] == "3.00"
    assert first["ppl baseline"] == "20.0000" and first["ppl quantized"] == "22.1235"
    assert first["peak RSS GiB"] == "1.500"  # the largest rank, not rank 0
    assert first["total s"] == "12.50" and first["world size"] == "1"


def test_failed_and_killed_runs_are_rows(tmp_path: Path) -> None:
    _run(tmp_path / "0", _report())
    _run(tmp_path / "1", _report(status="failed", error="solve: bad | thing\nsecond line"))
    recipe = {
        "scheme": {"name": "w3a16", "bits": 3, "group_size": 128, "actorder": "static"},
        "dataset": {"num_samples": 64, "seq_len": 256},
        "runtime": {"nproc_per_node": 2},
    }
    _run(tmp_path / "2", recipe=recipe)
    (tmp_path / "3" / ".hydra").mkdir(parents=True)  # a job that died before recipe.yaml
    (tmp_path / "3" / ".hydra" / "config.yaml").write_text(
        yaml.safe_dump({"scheme": {"name": "w2a16", "bits": 2}, "output_dir": "${x}"})
    )
    _run(tmp_path / "4", recipe=recipe)
    (tmp_path / "4" / "report.json").write_text("{not json")
    written = write_report(tmp_path)
    rows = _rows(written.csv.read_text())
    assert [r["status"] for r in rows] == ["ok", "failed", "failed", "failed", "failed"]
    assert rows[1]["error"] == "solve: bad | thing\nsecond line"
    assert rows[2]["error"] == NO_REPORT
    assert (rows[2]["scheme"], rows[2]["bits"], rows[2]["world size"]) == ("w3a16", "3", "2")
    assert rows[3]["error"] == NO_REPORT and rows[3]["scheme"] == "w2a16"
    assert rows[4]["error"].startswith("report.json unreadable") and rows[4]["bits"] == "3"
    md = written.markdown.read_text()
    assert "5 run(s), 1 ok, 4 failed" in md
    assert "| solve: bad \\| thing second line |" in md  # one table line, pipe escaped
    assert len([ln for ln in md.splitlines() if ln.startswith("|")]) == 7  # header, rule, 5 rows


def test_single_run_directory_and_output_path(tmp_path: Path) -> None:
    run = _run(tmp_path / "run", _report())
    assert find_runs(run) == [run]
    target = tmp_path / "out" / "table.md"
    target.parent.mkdir()
    written = write_report(run, target)
    assert written.csv == tmp_path / "out" / "table.csv"
    assert [p.name for p in written.plots] == ["table-perplexity.png", "table-stages.png"]
    assert [r["run"] for r in _rows(written.csv.read_text())] == ["run"]


def test_perplexity_plot_skipped_without_perplexity(tmp_path: Path) -> None:
    _run(tmp_path / "0", _report(perplexity={"baseline": None, "quantized": None}))
    written = write_report(tmp_path)
    assert [p.name for p in written.plots] == ["report-stages.png"]
    assert not (tmp_path / "report-perplexity.png").exists()


def test_no_runs_is_a_clear_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "empty" / "deeper").mkdir(parents=True)
    with pytest.raises(GptqflowError, match="no runs found"):
        collect(tmp_path / "empty")
    assert main(["report", str(tmp_path / "empty")]) == 1
    err = capsys.readouterr().err
    assert "no runs found" in err and str(tmp_path / "empty") in err and "Traceback" not in err
    assert main(["report", str(tmp_path / "missing")]) == 1
    assert "not a directory" in capsys.readouterr().err
    _run(tmp_path / "r", _report())
    assert main(["report", str(tmp_path / "r"), "--output", str(tmp_path / "x.txt")]) == 1
    assert "ending in .md" in capsys.readouterr().err
