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


def _stage(recipe: dict[str, Any], name: str) -> dict[str, Any]:
    return next(s for s in recipe["stages"] if s["stage"] == name)


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
    assert next(s.stage for s in recipe.stages) == "load"
    assert recipe.stage_ids().count("evaluate") == 1 and "evaluate#2" in recipe.stage_ids()


@pytest.mark.parametrize(
    ("stage", "key", "value", "expect"),
    [
        ("solve", "bits", 5, "stages[5](solve).bits"),
        ("solve", "group_size", 100, "stages[5](solve).group_size"),
        ("solve", "dampening", 1.5, "stages[5](solve).dampening"),
        ("solve", "dampening", 0.0, "stages[5](solve).dampening"),
        ("partition", "num_samples", 0, "stages[1](partition).num_samples"),
        ("solve", "bitz", 4, "stages[5](solve).bitz"),
        ("calibrate", "targets", "q_proj", "stages[3](calibrate).targets"),
    ],
)
def test_bad_values_name_file_and_key(
    good: dict[str, Any], stage: str, key: str, value: Any, expect: str
) -> None:
    bad = copy.deepcopy(good)
    _stage(bad, stage)[key] = value
    problems = _problems(bad)
    assert any(p.startswith(f"r.yaml: {expect}:") for p in problems), problems
    assert any(repr(value) in p for p in problems), problems


def test_unknown_stage_lists_registered(good: dict[str, Any]) -> None:
    bad = copy.deepcopy(good)
    bad["stages"][5]["stage"] = "solv"
    (p,) = _problems(bad)
    assert "stages[5]" in p and "'solv'" in p and "solve" in p and "hessian-reduce" in p


def test_all_problems_are_listed_not_just_the_first(good: dict[str, Any]) -> None:
    bad = copy.deepcopy(good)
    _stage(bad, "solve")["bits"] = 7
    _stage(bad, "partition")["num_samples"] = -1
    bad["dataset"]["seq_len"] = 1
    assert len(_problems(bad)) == 3


@pytest.mark.parametrize(
    ("order", "fragment"),
    [
        (
            ["load", "partition", "solve", "calibrate", "hessian-reduce", "broadcast", "save"],
            "'solve' cannot run after 'calibrate'",
        ),
        (
            ["load", "partition", "save", "calibrate", "hessian-reduce", "solve", "broadcast"],
            "'save' cannot run after 'solve'",
        ),
        (["load", "partition", "broadcast"], "'broadcast' cannot run without 'solve'"),
        (
            [
                "load",
                "partition",
                "calibrate",
                "hessian-reduce",
                "solve",
                "broadcast",
                "save",
                "save",
            ],
            "'save' appears 2 times",
        ),
        (["partition", "load"], "must start with 'load'"),
        (
            ["load", "partition", "calibrate", "hessian-reduce", "solve", "save"],
            "'save' cannot run without 'broadcast'",
        ),
        (
            ["load", "partition", "calibrate", "evaluate", "hessian-reduce", "solve", "broadcast"],
            "per-layer stages must appear together",
        ),
    ],
)
def test_impossible_orders(good: dict[str, Any], order: list[str], fragment: str) -> None:
    by_name = {s["stage"]: s for s in good["stages"]}
    bad = copy.deepcopy(good)
    bad["stages"] = [copy.deepcopy(by_name[n]) for n in order]
    problems = _problems(bad)
    assert any(fragment in p for p in problems), problems


def test_group_values_checked_with_their_key(good: dict[str, Any]) -> None:
    bad = copy.deepcopy(good)
    bad["scheme"]["bits"] = 6
    assert any(p.startswith("r.yaml: scheme.bits:") for p in _problems(bad))


def _write(tmp: Path, name: str, data: Any) -> Path:
    p = tmp / name
    p.write_text(yaml.safe_dump(data))
    return p


def test_lint_cli_exit_codes_and_messages(
    tmp_path: Path, good: dict[str, Any], capsys: pytest.CaptureFixture[str]
) -> None:
    ok = _write(tmp_path, "ok.yaml", good)
    assert main(["lint", str(ok)]) == 0
    assert "ok: 1 recipe file(s)" in capsys.readouterr().out
    bad = copy.deepcopy(good)
    _stage(bad, "solve")["bits"] = 5
    _stage(bad, "solve")["typo_key"] = 1
    path = _write(tmp_path, "bad.yaml", bad)
    assert main(["lint", str(path)]) == 1
    out = capsys.readouterr().out
    # file:line:col of the key (positions are tested exactly in test_lint_positions.py)
    assert re.search(
        rf"^{re.escape(str(path))}:\d+:\d+: stages\[5\]\(solve\)\.bits: value 5 is not allowed; "
        r"allowed: 2, 3, 4 or 8$",
        out,
        re.M,
    ), out
    assert re.search(
        rf"^{re.escape(str(path))}:\d+:\d+: stages\[5\]\(solve\)\.typo_key: unknown key", out, re.M
    ), out
    assert main(["lint", "--format", "json", str(path)]) == 1
    data = json.loads(capsys.readouterr().out)
    assert {p["path"] for p in data["problems"]} == {
        "stages[5](solve).bits",
        "stages[5](solve).typo_key",
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
    assert [str(x) for x in problems] == [  # safe_dump sorts keys: bits is on line 2
        f"{p}:2:1: scheme.bits: value 5 is not allowed; allowed: 2, 3, 4 or 8"
    ]


def test_lint_checks_group_size_against_model_widths(
    tmp_path: Path, good: dict[str, Any], tiny_llama_dir: Path
) -> None:
    r = copy.deepcopy(good)
    r["model"]["path"] = _stage(r, "load")["path"] = str(tiny_llama_dir)
    _stage(r, "solve")["group_size"] = 256  # tiny llama: widths 128 and 256
    problems, _ = lint_paths([_write(tmp_path, "r.yaml", r)])
    (p,) = problems
    assert "stages[5](solve).group_size" in str(p) and "[128]" in str(p) and "128" in p.message


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
    _stage(bad_recipe, "solve")["bits"] = 5
    bad = _write(tmp_path, "bad.yaml", bad_recipe)
    entry = shlex.split(hook["entry"])
    if shutil.which(entry[0]) is None:  # venv not activated: same program, by module
        entry = [sys.executable, "-m", "gptqflow", *entry[1:]]
    r_ok = subprocess.run([*entry, str(ok)], capture_output=True, text=True)
    r_bad = subprocess.run([*entry, str(ok), str(bad)], capture_output=True, text=True)
    assert r_ok.returncode == 0, r_ok.stdout + r_ok.stderr
    assert r_bad.returncode == 1 and re.search(
        r"bad\.yaml:\d+:\d+: stages\[5\]\(solve\)\.bits", r_bad.stdout
    ), r_bad.stdout


def test_did_you_mean_for_misspelt_keys_and_stage_names(good: dict[str, Any]) -> None:
    bad = copy.deepcopy(good)
    _stage(bad, "solve")["bitz"] = 3
    bad["scheme"]["group_sise"] = 64
    bad["stages"][3]["stage"] = "calibrat"
    problems = _problems(bad)
    assert any(
        "stages[5](solve).bitz: unknown key (value 3) (did you mean 'bits'?)" in p for p in problems
    )
    assert any("scheme.group_sise" in p and "did you mean 'group_size'?" in p for p in problems)
    assert any(
        "stages[3]: unknown stage 'calibrat' (did you mean 'calibrate'?)" in p for p in problems
    )
