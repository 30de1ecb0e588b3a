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
from gptqflow.framework.yamlpos import (
    Location,
    Position,
    Source,
    SourceMap,
    key_positions,
    parents,
)

# A fully resolved recipe, as a run writes it (recipe.yaml), with four mistakes:
# line 12 col 3 `dtyp` (typo), line 22 col 5 `dampening: 1.5`, line 25 col 32 `eval_tokens`
# (a dataset key, not the stage's), line 28 col 3 `extra: {stage: solv}`.
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
  load: {}
  partition: {}
  baseline: {stage: evaluate}
  calibrate: {}
  hessian-reduce: {}
  solve:
    method: gptq
    dampening: 1.5
    block_size: 128
  broadcast: {}
  quantized: {stage: evaluate, eval_tokens: 64}
  save:
    subdir: checkpoint
  extra: {stage: solv}
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
    assert pos["stages"] == Position(14, 1, "mapping")
    assert pos["stages.load"] == Position(15, 3, "mapping")  # the stage's key
    assert (pos["stages.solve.dampening"].line, pos["stages.solve.dampening"].column) == (22, 5)
    assert (pos["scheme.bits"].line, pos["scheme.bits"].column) == (13, 23)  # flow mapping
    eval_tokens = pos["stages.quantized.eval_tokens"]
    assert (eval_tokens.line, eval_tokens.column) == (25, 32)
    assert pos["stages.extra.stage"].value == "solv"
    listed = key_positions("scheme:\n  targets:\n    - q_proj\n    - {re: x}\n")
    assert listed["scheme.targets"].kind == "sequence"
    assert (listed["scheme.targets[1]"].line, listed["scheme.targets[1]"].column) == (4, 7)
    assert (listed["scheme.targets[1].re"].line, listed["scheme.targets[1].re"].column) == (4, 8)
    assert key_positions("") == {}
    assert parents("stages.solve.dampening") == ["stages.solve", "stages"]
    assert parents("scheme.targets[1]") == ["scheme.targets", "scheme"]


def test_resolved_recipe_problems_carry_line_and_column(tmp_path: Path) -> None:
    path = tmp_path / "recipe.yaml"
    path.write_text(RESOLVED)
    found = _by_path(_lint(path))
    typo = found["dataset.dtyp"]
    assert (typo.file, typo.line, typo.column) == (str(path), 12, 3)
    assert str(typo).startswith(f"{path}:12:3: dataset.dtyp: unknown key")
    damp = found["stages.solve.dampening"]
    assert (damp.line, damp.column) == (22, 5)
    assert str(damp) == (
        f"{path}:22:5: stages.solve.dampening: value 1.5: Input should be less than 1"
    )
    eval_tokens = found["stages.quantized.eval_tokens"]  # inside a flow mapping
    assert (eval_tokens.line, eval_tokens.column) == (25, 32)
    stage = found["stages.extra"]  # the unknown stage: its entry's key
    assert (stage.line, stage.column) == (28, 3) and "'solv'" in stage.message
    # A key that is missing points at the mapping it belongs in.
    missing = _by_path(_lint(_write(tmp_path, "m.yaml", RESOLVED.replace("  eval_file", "  #"))))
    eval_missing = missing["dataset.eval_file"]
    assert eval_missing.message == "required key is missing"
    assert (eval_missing.line, eval_missing.column) == (8, 1)  # `dataset:`


def _fixed(text: str) -> str:
    """RESOLVED without its mistakes."""
    return (
        text.replace("  dtyp: 64\n", "")
        .replace("dampening: 1.5", "dampening: 0.01")
        .replace(", eval_tokens: 64", "")
        .replace("  extra: {stage: solv}\n", "")
    )


def test_resolved_recipe_without_mistakes_is_clean(tmp_path: Path) -> None:
    assert _lint(_write(tmp_path, "ok.yaml", _fixed(RESOLVED))) == []


def test_a_stage_before_its_requirement_points_at_the_stage(tmp_path: Path) -> None:
    """The contracts: an unmet requirement is reported at the key of the stage that has it."""
    text = _fixed(RESOLVED).replace("  hessian-reduce: {}\n", "")
    text = text.replace("  broadcast:", "  hessian-reduce: {}\n  broadcast:")  # after solve
    path = _write(tmp_path, "late.yaml", text)
    (p,) = _lint(path)
    line, col = _key(path, "solve:")
    assert (p.file, p.path, p.line, p.column) == (str(path), "stages.solve", line, col)
    assert str(p) == (
        f"{path}:{line}:{col}: stages.solve: 'solve' requires 'group.reduced_hessian', which no "
        "earlier stage provides (provided by: hessian-reduce); move it after one that does"
    )


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


def _key(path: Path, key: str) -> tuple[int, int]:
    """1-based line and column of the first line of ``path`` that starts with ``key``."""
    for i, line in enumerate(path.read_text().splitlines(), start=1):
        if line.lstrip().startswith(key):
            return i, len(line) - len(line.lstrip()) + 1
    raise AssertionError(f"no line starts with {key!r} in {path}")


def test_composed_recipe_points_at_the_file_that_set_the_key(recipes_copy: Path) -> None:
    child = _write(
        recipes_copy,
        "child.yaml",
        "defaults:\n  - gptq_w4a16\n  - override scheme: w3a16\n  - _self_\n\n"
        "scheme:\n  group_sise: 64\nstages:\n  solve:\n    dampening: ${scheme.bits}\n",
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
    # The child's `dampening: ${scheme.bits}` is followed to the scheme file that set 6.
    damp = found["stages.solve.dampening"]
    assert (damp.file, damp.line) == (str(scheme), bits.line)
    # The child merges into the parent's `solve` entry: the parent's keys stay the parent's.
    blok = found["stages.solve.blok_size"]
    assert (blok.file, (blok.line, blok.column)) == (str(parent), _line_col(parent, "blok_size"))
    assert blok.message.endswith(f"(composed into {child})")


def test_derived_recipe_problems_point_at_the_file_that_set_the_key(recipes_copy: Path) -> None:
    """rtn_w4a16 picks method/rtn.yaml, which sets `solve: {method: rtn}` over the parent's
    solve entry (a ``@package _global_`` option of the method group)."""
    rtn = recipes_copy / "rtn_w4a16.yaml"
    option = recipes_copy / "method" / "rtn.yaml"
    option.write_text(option.read_text().replace("{method: rtn}", "{method: rtm}"))
    parent = recipes_copy / "gptq_w4a16.yaml"
    parent.write_text(parent.read_text().replace("dampening: 0.01", "dampening: 2"))
    found = _by_path(_lint(rtn))
    method = found["stages.solve.method"]
    assert (method.file, (method.line, method.column)) == (
        str(option),
        _line_col(option, "method: rtm"),
    )
    assert "'rtm'" in method.message and f"(composed into {rtn})" in method.message
    damp = found["stages.solve.dampening"]
    assert (damp.file, (damp.line, damp.column)) == (str(parent), _key(parent, "dampening:"))
    assert damp.message.endswith(f"(composed into {rtn})")


def test_contract_violation_of_a_derived_recipe_points_at_the_stage_key(
    recipes_copy: Path,
) -> None:
    """Removing a stage that another needs: the problem is at the needing stage's key."""
    child = _write(
        recipes_copy,
        "noreduce.yaml",
        "defaults:\n  - gptq_w4a16\n  - _self_\n\nstages:\n  hessian-reduce: null\n",
    )
    parent = recipes_copy / "gptq_w4a16.yaml"
    (p,) = _lint(child)
    assert (p.path, p.file, (p.line, p.column)) == (
        "stages.solve",
        str(parent),
        _key(parent, "solve:"),
    )
    assert "'solve' requires 'group.reduced_hessian'" in p.message
    assert "(provided by: hessian-reduce)" in p.message
    assert p.message.endswith(f"(composed into {child})")
    # A derived recipe that sets the needing stage itself: the problem is in that file.
    gptq = _write(
        recipes_copy,
        "rtn_back_to_gptq.yaml",
        "defaults:\n  - rtn_w4a16\n  - _self_\n\nstages:\n  solve: {method: gptq}\n",
    )
    (p,) = _lint(gptq)
    assert (p.path, p.file, (p.line, p.column)) == ("stages.solve", str(gptq), (6, 3))
    assert "'solve' requires 'group.reduced_hessian'" in p.message
    assert "composed into" not in p.message


def test_a_removed_stage_is_not_blamed_on_the_parent(recipes_copy: Path) -> None:
    """`null` replaces the parent's entry: problems point into the child only."""
    parent = recipes_copy / "gptq_w4a16.yaml"
    parent.write_text(parent.read_text().replace("    block_size: 128", "    blok_size: 128"))
    child = _write(
        recipes_copy,
        "rtn_only.yaml",
        "defaults:\n  - gptq_w4a16\n  - _self_\n\nstages:\n  solve: null\n"
        "  rtn:\n    stage: solve\n    method: rtn\n    dampning: 0.1\n",
    )
    found = _by_path(_lint(child))
    typo = found["stages.rtn.dampning"]
    assert (typo.file, typo.line, typo.column) == (str(child), 10, 5)
    assert "did you mean 'dampening'" in typo.message
    assert not any("blok_size" in p for p in found)  # the parent's solve entry is gone


def test_source_map_ignores_what_a_later_file_replaced() -> None:
    """A null (a removed stage) or a list replaces everything an earlier file set below it."""
    parent = Source(
        "p.yaml",
        "",
        key_positions("stages:\n  solve:\n    x: 1\nscheme:\n  targets: [a, b]\n  bits: 4\n"),
    )
    child = Source("c.yaml", "", key_positions("stages:\n  solve: null\nscheme:\n  targets: [c]\n"))
    smap = SourceMap([parent, child])
    assert smap.locate("stages.solve.x") is None
    assert smap.locate("scheme.targets[1]") is None
    assert smap.locate("scheme.targets[0]") == Location("c.yaml", 4, 13)
    assert smap.locate("scheme.bits") == Location("p.yaml", 6, 3)  # merged: the parent's
    assert smap.locate("stages.solve") == Location("c.yaml", 2, 3)


def test_problem_without_a_file_position_stays_unplaced(tmp_path: Path) -> None:
    """A problem at a key no file sets keeps its path and file, without a line."""
    text = _fixed(RESOLVED)
    start, end = text.index("dataset:"), text.index("scheme:")
    path = _write(tmp_path, "nodata.yaml", text[:start] + text[end:])
    (p,) = _lint(path)
    assert (p.path, p.message, p.file) == ("dataset", "required key is missing", str(path))
    assert p.line is None and str(p) == f"{path}: dataset: required key is missing"


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


def test_a_method_option_is_linted_as_composed_into_the_default(recipes_copy: Path) -> None:
    """An option of a schema-less group is checked by composing it into the default recipe;
    what breaks is the option's problem, at the option's own key."""
    option = recipes_copy / "method" / "gptaq.yaml"
    option.write_text(option.read_text().replace("alpha: 0.25", "alpha: -1"))
    (p,) = _lint(option)
    assert (p.path, p.file, (p.line, p.column)) == (
        "stages.solve.alpha",
        str(option),
        _key(option, "alpha:"),
    )
    # Without its `# @package _global_` header the option's keys land under `method`.
    option.write_text("stages:\n  solve: {method: gptaq}\n")
    (p,) = _lint(option)
    assert (p.path, p.file) == ("method", str(option))
    assert "(composing gptq_w4a16.yaml with method=gptaq)" in p.message
    assert "start the file with '# @package _global_'" in p.message
