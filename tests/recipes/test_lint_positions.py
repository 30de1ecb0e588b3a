"""Lint problems point at the line and column of the bad key, in the file that set it."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from gptqflow.cli import main
from gptqflow.framework.compose import recipes_dir
from gptqflow.framework.lint import lint_paths
from gptqflow.framework.schema import Problem
from gptqflow.framework.yamlpos import Position, SourceMap, key_positions, parents

# A fully resolved recipe, as a run writes it (recipe.yaml), with three mistakes:
# line 12 col 3 `dtyp` (typo), line 27 col 5 `bits: 5`, line 32 col 5 `stage: solv`.
RESOLVED = """\
output_dir: /tmp/out
overwrite: false
seed: 0
model:
  path: /nonexistent/model
  dtype: float32
  trust_remote_code: false
dataset:
  calibration_file: /data/valid.txt
  eval_file: /data/test.txt
  num_samples: 8
  dtyp: 64
scheme: {name: w4a16, bits: 4, group_size: 128, symmetric: true, actorder: static}
stages:
  - stage: load
    path: /nonexistent/model
  - stage: partition
    calibration_file: /data/valid.txt
    num_samples: 8
  - stage: calibrate
  - stage: hessian-reduce
  - stage: solve
    group_size: 128
    symmetric: true
    actorder: static
    observer: mse
    bits: 5
  - stage: broadcast
  - stage: save
    subdir: checkpoint
  - {stage: evaluate, eval_file: /data/test.txt}
  - stage: solv
"""


def _lint(path: Path) -> list[Problem]:
    problems, _ = lint_paths([path])
    return problems


def _by_path(problems: list[Problem]) -> dict[str, Problem]:
    return {p.path: p for p in problems}


def test_key_positions_of_mappings_lists_and_flow_style() -> None:
    pos = key_positions(RESOLVED)
    assert pos["model"] == Position(4, 1, "mapping")
    assert pos["model.dtype"] == Position(6, 3, "scalar", "float32")
    assert pos["stages"].kind == "sequence" and (pos["stages"].line, pos["stages"].column) == (
        14,
        1,
    )
    assert (pos["stages[0]"].line, pos["stages[0]"].column) == (15, 5)  # after "- "
    assert (pos["stages[4].bits"].line, pos["stages[4].bits"].column) == (27, 5)
    assert (pos["scheme.bits"].line, pos["scheme.bits"].column) == (13, 23)  # flow mapping
    assert (pos["stages[7].eval_file"].line, pos["stages[7].eval_file"].column) == (31, 23)
    assert key_positions("") == {}
    assert parents("stages[4].bits") == ["stages[4]", "stages"]


def test_resolved_recipe_problems_carry_line_and_column(tmp_path: Path) -> None:
    path = tmp_path / "recipe.yaml"
    path.write_text(RESOLVED)
    found = _by_path(_lint(path))
    typo = found["dataset.dtyp"]
    assert (typo.file, typo.line, typo.column) == (str(path), 12, 3)
    assert str(typo).startswith(f"{path}:12:3: dataset.dtyp: unknown key")
    bits = found["stages[4](solve).bits"]
    assert (bits.line, bits.column) == (27, 5)
    assert str(bits) == (
        f"{path}:27:5: stages[4](solve).bits: value 5 is not allowed; allowed: 2, 3, 4 or 8"
    )
    stage = found["stages[8]"]  # the unknown stage: its entry
    assert (stage.line, stage.column) == (32, 5) and "'solv'" in stage.message
    # A key that is missing points at the mapping it belongs in.
    missing = _by_path(_lint(_write(tmp_path, "m.yaml", RESOLVED.replace("  eval_file", "  #"))))
    eval_missing = missing["dataset.eval_file"]
    assert eval_missing.message == "required key is missing"
    assert (eval_missing.line, eval_missing.column) == (8, 1)  # `dataset:`


def _write(directory: Path, name: str, text: str) -> Path:
    path = directory / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_group_option_file_positions(tmp_path: Path) -> None:
    path = _write(
        tmp_path / "scheme",
        "w5.yaml",
        "# a scheme with two mistakes\nname: w5\nbits: 5\ngroup_size: 128\n  # note\nsymetric: true\n",
    )
    found = _by_path(_lint(path))
    assert (found["scheme.bits"].line, found["scheme.bits"].column) == (3, 1)
    assert (found["scheme.symetric"].line, found["scheme.symetric"].column) == (6, 1)
    assert "did you mean 'symmetric'" in found["scheme.symetric"].message


def test_yaml_syntax_error_has_a_position(tmp_path: Path) -> None:
    path = _write(tmp_path, "broken.yaml", "a: 1\nb: [1, 2\nc: 3\n")
    (p,) = _lint(path)
    assert p.path == "<file>" and p.line == 3 and p.column is not None


@pytest.fixture()
def recipes_copy(tmp_path: Path) -> Path:
    """The shipped recipes in a temporary directory, to break on purpose."""
    target = tmp_path / "recipes"
    shutil.copytree(recipes_dir(), target)
    return target


def _line_col(path: Path, needle: str) -> tuple[int, int]:
    """1-based line and column of the first occurrence of ``needle`` in ``path``."""
    for i, line in enumerate(path.read_text().splitlines(), start=1):
        if needle in line:
            return i, line.index(needle) + 1
    raise AssertionError(f"{needle!r} not in {path}")


def test_composed_recipe_points_at_the_file_that_set_the_key(recipes_copy: Path) -> None:
    child = _write(
        recipes_copy,
        "child.yaml",
        "defaults:\n  - gptq_w4a16\n  - override scheme: w3a16\n  - _self_\n\n"
        "scheme:\n  group_sise: 64\n",
    )
    scheme = recipes_copy / "scheme" / "w3a16.yaml"
    scheme.write_text(scheme.read_text().replace("bits: 3", "bits: 6"))
    parent = recipes_copy / "gptq_w4a16.yaml"
    parent.write_text(parent.read_text().replace("    block_size: 128", "    blok_size: 128"))
    found = _by_path(_lint(child))
    typo = found["scheme.group_sise"]  # set by the child itself
    assert (typo.file, typo.line, typo.column) == (str(child), 7, 3)
    assert "composed into" not in typo.message
    bits = found["scheme.bits"]  # set by the scheme option the child chose
    assert (bits.file, (bits.line, bits.column)) == (str(scheme), _line_col(scheme, "bits: 6"))
    assert bits.message.endswith(f"(composed into {child})")
    # The stage field is `bits: ${scheme.bits}` in the parent: followed to the scheme file.
    solve_bits = found["stages[5](solve).bits"]
    assert (solve_bits.file, solve_bits.line) == (str(scheme), bits.line)
    blok = found["stages[5](solve).blok_size"]  # set by the parent recipe's stage list
    assert (blok.file, (blok.line, blok.column)) == (str(parent), _line_col(parent, "blok_size"))


def test_a_replaced_stage_list_is_not_blamed_on_the_parent(recipes_copy: Path) -> None:
    """Hydra replaces lists: problems in the child's `stages:` point into the child only."""
    parent = recipes_copy / "gptq_w4a16.yaml"
    parent.write_text(parent.read_text().replace("    block_size: 128", "    blok_size: 128"))
    child = _write(
        recipes_copy,
        "short.yaml",
        "defaults:\n  - gptq_w4a16\n  - _self_\n\nstages:\n  - stage: load\n"
        "    path: ${model.path}\n  - stage: partition\n    num_samples: 4\n",
    )
    found = _by_path(_lint(child))
    missing = found["stages[1](partition).calibration_file"]
    assert (missing.file, missing.line, missing.column) == (str(child), 8, 5)
    assert not any("blok_size" in p for p in found)  # the parent's list is gone
    load_path = found.get("stages[0](load).path")
    assert load_path is None  # model.path is required on the command line, not a problem


def test_problem_without_a_file_position_stays_unplaced(recipes_copy: Path) -> None:
    """A problem no file sets (a prerequisite stage is absent) keeps its path, no position."""
    child = _write(
        recipes_copy,
        "noload.yaml",
        "defaults:\n  - gptq_w4a16\n  - _self_\n\nstages:\n  - stage: evaluate\n"
        "    eval_file: x.txt\n",
    )
    problems = _lint(child)
    order = next(p for p in problems if p.path == "stages[0](evaluate)")
    assert (order.line, order.column) == (6, 5)  # the entry that cannot run
    start = next(p for p in problems if "must start with 'load'" in p.message)
    assert start.file == str(child) and start.line == 6


def test_cli_text_and_json_carry_positions(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = _write(tmp_path / "scheme", "w5.yaml", "name: w5\n\nbits: 5\n")
    assert main(["lint", str(path)]) == 1
    out = capsys.readouterr().out
    assert f"{path}:3:1: scheme.bits: value 5 is not allowed" in out
    assert main(["lint", "--format", "json", str(path)]) == 1
    (problem,) = json.loads(capsys.readouterr().out)["problems"]
    assert problem == {
        "path": "scheme.bits",
        "message": "value 5 is not allowed; allowed: 2, 3, 4 or 8",
        "file": str(path),
        "line": 3,
        "column": 1,
    }


def test_source_map_stops_at_interpolation_cycles() -> None:
    smap = SourceMap.single("c.yaml", "a: ${b}\nb: ${a}\n")
    loc = smap.locate("a")
    assert loc is not None and loc.file == "c.yaml" and loc.line in (1, 2)
