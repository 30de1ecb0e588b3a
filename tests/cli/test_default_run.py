"""``gptqflow run`` with no arguments, as a new user runs it, on the tiny model (slow).

The workspace's cache holds the tiny Llama under the SmolLM2 name, so the default recipe
(smollm2_quick) runs end to end in seconds: it must finish, say where its results are,
log the baseline perplexity when it is measured, and print no other library's progress
bars (a bar in a log file is noise); ``gptqflow eval`` of its checkpoint likewise, unless
``--verbose`` asks for them.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from clitools import Workspace, run_cli

BAR = re.compile(r"\d+/\d+ \[\d\d:\d\d")  # tqdm's "14/14 [00:00<00:00, ...]"


@pytest.mark.slow  # a run and three evaluations in subprocesses: ~40 s on a busy machine
def test_no_arguments_runs_the_quick_recipe_and_says_where(workspace: Workspace) -> None:
    result = run_cli("run", cwd=workspace.root, env=workspace.env)
    assert result.code == 0, result.text
    (line,) = [ln for ln in result.out.splitlines() if ln.startswith("gptqflow: results in ")]
    run_dir = Path(line.removeprefix("gptqflow: results in ").split(":", 1)[0])
    assert run_dir.parent.parent == workspace.root / "outputs"  # outputs/<date>/<time>
    report = json.loads((run_dir / "report.json").read_text())
    assert report["status"] == "ok" and report["group_size"] == 64
    assert (report["num_samples"], report["seq_len"]) == (32, 256)  # the quick recipe's
    assert (run_dir / "checkpoint" / "config.json").is_file()
    assert f"gptqflow report {run_dir}" in line
    baseline = re.search(r"perplexity \(baseline\): (\d+\.\d+)", result.text)
    assert baseline and float(baseline.group(1)) == pytest.approx(
        report["perplexity"]["baseline"], abs=1e-4
    )
    assert "perplexity (baseline): 32 windows of 256 tokens" in result.text  # Hydra logs to stdout
    assert not BAR.search(result.text), result.text  # no "Loading weights" bar

    data = str(workspace.data / "wikitext2-test.txt")
    args = ["eval", str(run_dir / "checkpoint"), "--data", data, "--max-tokens", "512"]
    quiet = run_cli(*args, "--seq-len", "64", cwd=workspace.root, env=workspace.env)
    assert quiet.code == 0 and quiet.out.startswith("perplexity: "), quiet.text
    assert not BAR.search(quiet.err), quiet.err  # compressed-tensors' bars are off
    verbose = run_cli(*args, "--seq-len", "64", "--verbose", cwd=workspace.root, env=workspace.env)
    assert verbose.code == 0 and verbose.out == quiet.out, verbose.text
    assert "Decompressing model" in verbose.err and BAR.search(verbose.err)
