"""Recipe validation and lint: every error class names the file and the key path."""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from gptqflow.cli import main
from gptqflow.framework.compose import compose_recipe, recipes_dir
from gptqflow.framework.lint import lint_paths
from gptqflow.framework.schema import RecipeError, validate_recipe

RECIPES = recipes_dir()


@pytest.fixture(scope="module")
def good() -> dict[str, Any]:
    return compose_recipe("gptq_w4a16", ["model.path=/nonexistent/model", "output_dir=/tmp/x"])


def _stage(recipe: dict[str, Any], key: str) -> dict[str, Any]:
    entry: dict[str, Any] = recipe["stages"][key]
    return entry


def _at(recipe: dict[str, Any], where: str) -> dict[str, Any]:
    """The mapping at a dotted key path (``stages.solve``, ``scheme``)."""
    node: Any = recipe
    for part in where.split("."):
        node = node[part]
    assert isinstance(node, dict), where
    return node


def _problems(recipe: dict[str, Any]) -> list[str]:
    with pytest.raises(RecipeError) as info:
        validate_recipe(recipe, file="r.yaml")
    return [str(p) for p in info.value.problems]


def test_shipped_recipes_lint_clean() -> None:
    problems, n = lint_paths([RECIPES])
    assert problems == []
    assert n >= 10  # top-level recipes and every config-group option


def test_every_scheme_option_composes_and_validates() -> None:
    for option in sorted((RECIPES / "scheme").glob("*.yaml")):
        r = compose_recipe(
            "gptq_w4a16", [f"scheme={option.stem}", "model.path=/m", "output_dir=/o"]
        )
        validate_recipe(r)


def test_good_recipe_validates(good: dict[str, Any]) -> None:
    recipe = validate_recipe(good)
    assert [s.id for s in recipe.stages] == list(good["stages"])  # the keys, in order
    assert recipe.stages[0].stage == "load"
    by_id = {s.id: s.stage for s in recipe.stages}
    assert by_id["baseline"] == by_id["quantized"] == "evaluate"  # `stage:` names it
    assert by_id["solve"] == "solve"  # `stage:` defaults to the key


def test_rtn_recipe_removes_stages_with_null() -> None:
    raw = compose_recipe("rtn_w4a16", ["model.path=/m", "output_dir=/o"])
    recipe = validate_recipe(raw)
    ids = [s.id for s in recipe.stages]
    assert not {"partition", "calibrate", "hessian-reduce"} & set(ids)
    assert ids == [k for k, v in raw["stages"].items() if v is not None]
    solve = next(s for s in recipe.stages if s.id == "solve")
    assert solve.method == "rtn" and solve.dampening == 0.01  # merged with the parent's entry


@pytest.mark.parametrize(
    ("where", "key", "value", "expect"),
    [
        ("stages.solve", "dampening", 1.5, "stages.solve.dampening"),
        ("stages.solve", "dampening", 0.0, "stages.solve.dampening"),
        ("stages.solve", "method", "awq", "stages.solve.method"),
        ("stages.solve", "block_size", 0, "stages.solve.block_size"),
        ("stages.solve", "bitz", 4, "stages.solve.bitz"),
        ("stages.solve", "bits", 4, "stages.solve.bits"),  # a scheme key, not the stage's
        ("stages.save", "subdir", 5, "stages.save.subdir"),
        ("stages.baseline", "eval_file", "x.txt", "stages.baseline.eval_file"),  # dataset's
        ("scheme", "bits", 5, "scheme.bits"),
        ("scheme", "group_size", 100, "scheme.group_size"),
        ("scheme", "targets", "q_proj", "scheme.targets"),
        ("dataset", "num_samples", 0, "dataset.num_samples"),
    ],
)
def test_bad_values_name_file_and_key(
    good: dict[str, Any], where: str, key: str, value: Any, expect: str
) -> None:
    bad = copy.deepcopy(good)
    _at(bad, where)[key] = value
    problems = _problems(bad)
    assert any(p.startswith(f"r.yaml: {expect}:") for p in problems), problems
    assert any(repr(value) in p for p in problems), problems


def test_unknown_stage_lists_registered(good: dict[str, Any]) -> None:
    bad = copy.deepcopy(good)
    _stage(bad, "solve")["stage"] = "solv"
    (p,) = _problems(bad)
    assert "stages.solve:" in p and "'solv'" in p and "solve" in p and "hessian-reduce" in p
    bad = copy.deepcopy(good)
    bad["stages"]["rtn-pass"] = {}  # a key that names no stage needs `stage:`
    (p,) = _problems(bad)
    assert p.startswith("r.yaml: stages.rtn-pass: unknown stage 'rtn-pass'"), p


@pytest.mark.parametrize(
    ("stages", "expect"),
    [
        ([{"stage": "load"}], "stages: must be a mapping from stage id to its settings"),
        ({"load": {}, "solve": 3}, "stages.solve: must be a mapping of the stage's settings"),
        ({"load": {"id": "load"}}, "stages.load.id: the stage id is its key; remove 'id'"),
        ({"load": None}, "stages: the pipeline has no stages"),
    ],
)
def test_stages_is_a_mapping_keyed_by_id(good: dict[str, Any], stages: Any, expect: str) -> None:
    bad = copy.deepcopy(good)
    bad["stages"] = stages
    problems = _problems(bad)
    assert any(p.startswith(f"r.yaml: {expect}") for p in problems), problems


def test_all_problems_are_listed_not_just_the_first(good: dict[str, Any]) -> None:
    bad = copy.deepcopy(good)
    _stage(bad, "solve")["dampening"] = 7
    bad["dataset"]["num_samples"] = -1
    bad["dataset"]["seq_len"] = 1
    assert len(_problems(bad)) == 3


@pytest.mark.parametrize(
    ("order", "where", "fragment"),
    [
        (
            ["load", "partition", "solve", "calibrate", "hessian-reduce", "broadcast", "save"],
            "stages.solve",
            "'solve' requires 'group.reduced_hessian', which no earlier stage provides "
            "(provided by: hessian-reduce); move it after one that does",
        ),
        (
            ["load", "partition", "save", "calibrate", "hessian-reduce", "solve", "broadcast"],
            "stages.save",
            "'save' requires 'quantized', which no earlier stage provides (provided by: broadcast)",
        ),
        (
            ["load", "partition", "broadcast"],
            "stages.broadcast",
            "'broadcast' requires 'group.plan', which no earlier stage provides "
            "(provided by: solve)",
        ),
        (
            ["partition", "load", "calibrate", "hessian-reduce", "solve", "broadcast", "save"],
            "stages.partition",
            "'partition' requires 'tokenizer', which no earlier stage provides (provided by: load)",
        ),
        (
            ["load", "partition", "calibrate", "hessian-reduce", "solve", "save"],
            "stages.save",
            "'save' requires 'quantized'",
        ),
        (
            ["load", "calibrate", "hessian-reduce", "solve", "broadcast", "save"],
            "stages.calibrate",
            "'calibrate' requires 'group.inputs': the layer loop computes it from 'samples', "
            "which no earlier stage provides (provided by: partition)",
        ),
        (
            ["calibrate", "load", "partition", "hessian-reduce", "solve", "broadcast", "save"],
            "stages.calibrate",
            "'calibrate' runs in the layer loop, which needs 'model' from an earlier stage "
            "(provided by: load)",
        ),
        (  # a whole-model stage splits the layer loop: the Hessians do not survive it
            ["load", "partition", "calibrate", "baseline", "hessian-reduce", "solve", "broadcast"],
            "stages.hessian-reduce",
            "'hessian-reduce' requires 'group.hessian'",
        ),
    ],
)
def test_stages_before_their_requirements(
    good: dict[str, Any], order: list[str], where: str, fragment: str
) -> None:
    bad = copy.deepcopy(good)
    bad["stages"] = {key: copy.deepcopy(good["stages"][key]) for key in order}
    problems = _problems(bad)
    assert any(p.startswith(f"r.yaml: {where}: ") and fragment in p for p in problems), problems


def test_requirements_follow_the_settings(good: dict[str, Any]) -> None:
    """`method: rtn` needs no Hessian: the calibration stages may go; gptq still needs them."""
    rtn = copy.deepcopy(good)
    for key in ("partition", "calibrate", "hessian-reduce"):
        del rtn["stages"][key]
    _stage(rtn, "solve")["method"] = "rtn"
    validate_recipe(rtn)
    _stage(rtn, "solve")["report_loss"] = True  # the loss is measured on the Hessian
    (p,) = _problems(rtn)
    assert p.startswith("r.yaml: stages.solve: 'solve' requires 'group.reduced_hessian'"), p


def test_group_values_checked_with_their_key(good: dict[str, Any]) -> None:
    bad = copy.deepcopy(good)
    bad["scheme"]["bits"] = 6
    assert any(p.startswith("r.yaml: scheme.bits:") for p in _problems(bad))


def _write(tmp: Path, name: str, data: Any) -> Path:
    p = tmp / name
    p.write_text(yaml.safe_dump(data, sort_keys=False))  # `stages` order is the pipeline
    return p


def test_lint_cli_exit_codes_and_messages(
    tmp_path: Path, good: dict[str, Any], capsys: pytest.CaptureFixture[str]
) -> None:
    ok = _write(tmp_path, "ok.yaml", good)
    assert main(["lint", str(ok)]) == 0
    assert "ok: 1 recipe file(s)" in capsys.readouterr().out
    bad = copy.deepcopy(good)
    _stage(bad, "solve")["method"] = "awq"
    _stage(bad, "solve")["typo_key"] = 1
    path = _write(tmp_path, "bad.yaml", bad)
    assert main(["lint", str(path)]) == 1
    out = capsys.readouterr().out
    # file:line:col of the key (positions are tested exactly in test_lint_positions.py)
    assert re.search(
        rf"^{re.escape(str(path))}:\d+:\d+: stages\.solve\.method: value 'awq' is not allowed; "
        r"allowed: 'gptq', 'gptaq' or 'rtn'$",
        out,
        re.M,
    ), out
    assert re.search(
        rf"^{re.escape(str(path))}:\d+:\d+: stages\.solve\.typo_key: unknown key", out, re.M
    ), out
    assert main(["lint", "--format", "json", str(path)]) == 1
    data = json.loads(capsys.readouterr().out)
    assert {p["path"] for p in data["problems"]} == {
        "stages.solve.method",
        "stages.solve.typo_key",
    }


def test_lint_group_option_file(tmp_path: Path) -> None:
    d = tmp_path / "scheme"
    d.mkdir()
    p = _write(
        d,
        "w5.yaml",
        {"name": "w5", "bits": 5, "group_size": 128, "symmetric": True, "actorder": "none"},
    )
    problems, _ = lint_paths([p])
    assert [str(x) for x in problems] == [  # bits is on line 2
        f"{p}:2:1: scheme.bits: value 5 is not allowed; allowed: 2, 3, 4 or 8"
    ]


def test_lint_checks_group_size_against_model_widths(
    tmp_path: Path, good: dict[str, Any], tiny_llama_dir: Path
) -> None:
    r = copy.deepcopy(good)
    r["model"]["path"] = str(tiny_llama_dir)
    r["scheme"]["group_size"] = 256  # tiny llama: widths 128 and 256
    problems, _ = lint_paths([_write(tmp_path, "r.yaml", r)])
    (p,) = problems
    assert p.path == "scheme.group_size" and "[128]" in p.message and "use 128" in p.message
    assert p.line is not None  # the group_size key of r.yaml


def test_pre_commit_hook_entry_lints_good_and_bad_files(
    tmp_path: Path, good: dict[str, Any]
) -> None:
    """Run the hook exactly as pre-commit would: its entry, with the staged files appended."""
    import shlex
    import shutil
    import subprocess
    import sys

    from gptqflow.framework.compose import project_root

    (hook,) = yaml.safe_load((project_root() / ".pre-commit-hooks.yaml").read_text())
    assert hook["id"] == "gptqflow-lint"
    ok = _write(tmp_path, "ok.yaml", good)
    bad_recipe = copy.deepcopy(good)
    _stage(bad_recipe, "solve")["method"] = "awq"
    bad = _write(tmp_path, "bad.yaml", bad_recipe)
    entry = shlex.split(hook["entry"])
    if shutil.which(entry[0]) is None:  # venv not activated: same program, by module
        entry = [sys.executable, "-m", "gptqflow", *entry[1:]]
    r_ok = subprocess.run([*entry, str(ok)], capture_output=True, text=True)
    r_bad = subprocess.run([*entry, str(ok), str(bad)], capture_output=True, text=True)
    assert r_ok.returncode == 0, r_ok.stdout + r_ok.stderr
    assert r_bad.returncode == 1 and re.search(
        r"bad\.yaml:\d+:\d+: stages\.solve\.method", r_bad.stdout
    ), r_bad.stdout


def test_did_you_mean_for_misspelt_keys_and_stage_names(good: dict[str, Any]) -> None:
    bad = copy.deepcopy(good)
    _stage(bad, "solve")["dampenig"] = 0.1
    bad["scheme"]["group_sise"] = 64
    _stage(bad, "calibrate")["stage"] = "calibrat"
    bad["stages"]["hessian-reduc"] = bad["stages"].pop("hessian-reduce")
    problems = _problems(bad)
    assert any(
        "stages.solve.dampenig: unknown key (value 0.1) (did you mean 'dampening'?)" in p
        for p in problems
    ), problems
    assert any("scheme.group_sise" in p and "did you mean 'group_size'?" in p for p in problems)
    assert any(
        "stages.calibrate: unknown stage 'calibrat' (did you mean 'calibrate'?)" in p
        for p in problems
    ), problems
    assert any(
        "stages.hessian-reduc: unknown stage 'hessian-reduc' (did you mean 'hessian-reduce'?)" in p
        for p in problems
    ), problems
