"""Property test: random mutations of the shipped recipes never crash validation or lint.

Every mutated recipe must come out either valid or as a list of problems, each with a
key path and a message; any other exception (a KeyError deep in the validator, an
OmegaConf error escaping lint, ...) is a bug that would reach the user as a traceback.

Mutations are the mistakes people make when editing YAML by hand: a key dropped, an
unknown (or misspelt) key added, a value of the wrong type (including NaN, huge
numbers, interpolations and nested containers), a stage name or stage id misspelt,
stages reordered, duplicated under a second id, removed or set to null, an ``after:``
pointing anywhere, a config-group option misnamed. Each is applied
to (1) the composed, resolved recipe given to ``validate_recipe`` (what ``gptqflow
run`` validates), (2) the same written out as a standalone recipe file for
``gptqflow lint``, and (3) the raw shipped files, top-level recipes with their
``defaults`` lists (composed by lint through Hydra) and config-group options.

Derandomized with a fixed number of examples: CI always runs the same cases.
"""

from __future__ import annotations

import copy
import math
import shutil
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gptqflow.framework.compose import compose_recipe, recipes_dir
from gptqflow.framework.lint import lint_file
from gptqflow.framework.registry import registered
from gptqflow.framework.schema import Problem, Recipe, RecipeError, validate_recipe

RECIPES = recipes_dir()
TOP_LEVEL = sorted(p.stem for p in RECIPES.glob("*.yaml"))
RAW_FILES = sorted(p.relative_to(RECIPES) for p in RECIPES.rglob("*.yaml"))

FUZZ = settings(
    max_examples=150,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

Json = Any
Path_ = tuple[Any, ...]

# Values of every YAML type, including the awkward ones.
SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12),
    st.sampled_from(["???", "${model.path}", "${nope}", "re:.*", "gptq", "-1", "1e3", "yes"]),
)
VALUES = st.recursive(
    SCALARS,
    lambda inner: st.one_of(
        st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=8), inner, max_size=3)
    ),
    max_leaves=6,
)


def _paths(node: Json, prefix: Path_ = ()) -> list[Path_]:
    """Every path into a tree of dicts and lists (the root is ``()``)."""
    out = [prefix]
    if isinstance(node, dict):
        for k, v in node.items():
            out += _paths(v, (*prefix, k))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            out += _paths(v, (*prefix, i))
    return out


def _get(node: Json, path: Path_) -> Json:
    for p in path:
        node = node[p]
    return node


def _misspell(data: st.DataObject, word: str) -> str:
    """Delete, replace or insert one character, or swap two neighbours."""
    if not word:
        return data.draw(st.text(min_size=1, max_size=6))
    i = data.draw(st.integers(0, len(word) - 1))
    kind = data.draw(st.sampled_from(["delete", "replace", "insert", "swap"]))
    c = data.draw(st.characters(min_codepoint=32, max_codepoint=0x24F))
    if kind == "delete":
        return word[:i] + word[i + 1 :]
    if kind == "replace":
        return word[:i] + c + word[i + 1 :]
    if kind == "insert":
        return word[:i] + c + word[i:]
    j = min(i + 1, len(word) - 1)
    chars = list(word)
    chars[i], chars[j] = chars[j], chars[i]
    return "".join(chars)


STAGE_OPS = ["misspell_stage", "misspell_id", "reorder", "duplicate", "remove_stage", "null"]


def _mutate_stages(data: st.DataObject, tree: dict[str, Any], op: str) -> None:
    """One edit of the ``stages`` mapping (stage id -> settings, in pipeline order)."""
    stages: dict[Any, Any] = tree["stages"]
    key = data.draw(st.sampled_from(list(stages)))
    items = list(stages.items())
    if op == "misspell_stage" and isinstance(stages[key], dict):
        name = stages[key].get("stage", key)
        stages[key]["stage"] = _misspell(data, name if isinstance(name, str) else "")
    elif op == "misspell_id":  # the key, keeping its place
        new = _misspell(data, str(key))
        tree["stages"] = {new if k == key else k: v for k, v in items if k != new or k == key}
    elif op == "reorder":
        tree["stages"] = dict(data.draw(st.permutations(items)))
    elif op == "duplicate":  # the same settings under a second id, anywhere
        at = data.draw(st.integers(0, len(items)))
        new_key = data.draw(st.sampled_from([f"{key}2", f"{key}-again", "extra"]))
        items = [(k, v) for k, v in items if k != new_key]
        items.insert(min(at, len(items)), (new_key, copy.deepcopy(stages[key])))
        tree["stages"] = dict(items)
    elif op == "remove_stage":
        del stages[key]
    else:  # null: removed the way a derived recipe removes it
        stages[key] = None


def mutate(data: st.DataObject, tree: Json) -> Json:
    """1 to 4 random edits of a deep copy of ``tree`` (a dict at the root, kept a dict)."""
    tree = copy.deepcopy(tree)
    for _ in range(data.draw(st.integers(1, 4))):
        stages = tree.get("stages") if isinstance(tree, dict) else None
        ops = ["drop", "add", "retype", "rename_key"]
        if isinstance(stages, dict) and stages:
            ops += STAGE_OPS
        op = data.draw(st.sampled_from(ops))
        if op in STAGE_OPS:
            _mutate_stages(data, tree, op)
            continue
        containers = [p for p in _paths(tree) if isinstance(_get(tree, p), (dict, list))]
        path = data.draw(st.sampled_from(containers))
        node = _get(tree, path)
        keys = list(node) if isinstance(node, dict) else list(range(len(node)))
        if op == "add" and isinstance(node, dict):
            known = [str(k) for k in keys] or ["x"]
            key = data.draw(
                st.one_of(
                    st.text(max_size=10),
                    st.sampled_from(known).map(lambda k: k + "_"),
                    st.just("after"),  # placement, read before validation
                )
            )
            node[key] = data.draw(st.one_of(VALUES, st.sampled_from(known)))
        elif op == "add":
            node.append(data.draw(VALUES))
        elif not keys:
            continue
        elif op == "drop":
            del node[data.draw(st.sampled_from(keys))]
        elif op == "retype":
            node[data.draw(st.sampled_from(keys))] = data.draw(VALUES)
        elif op == "rename_key" and isinstance(node, dict):
            key = data.draw(st.sampled_from(keys))
            node[_misspell(data, str(key))] = node.pop(key)
    return tree


def _check_problems(problems: list[Problem], file: str | None) -> None:
    """Every problem names where (a non-empty key path) and what (a message)."""
    assert problems, "an error without any problem listed"
    for p in problems:
        assert isinstance(p.path, str) and p.path.strip(), p
        assert isinstance(p.message, str) and p.message.strip(), p
        if file is not None:
            assert p.file == file, p


def _yaml_dump(tree: Json, path: Path) -> bool:
    """Write ``tree`` as YAML; False when YAML cannot represent it (e.g. a NaN dict key)."""
    try:
        text = yaml.safe_dump(tree, sort_keys=False, allow_unicode=True)
    except yaml.YAMLError:
        return False
    if tree and yaml.safe_load(text) is None:
        return False
    path.write_text(text, encoding="utf-8")
    return True


@pytest.fixture(scope="module")
def composed() -> dict[str, dict[str, Any]]:
    """Every shipped top-level recipe, composed and resolved."""
    return {
        name: compose_recipe(name, ["model.path=/nonexistent/model", "output_dir=/tmp/fuzz-out"])
        for name in TOP_LEVEL
    }


def test_the_shipped_recipes_are_valid_before_mutation(composed: dict[str, Any]) -> None:
    for recipe in composed.values():
        assert isinstance(validate_recipe(recipe), Recipe)


@FUZZ
@given(data=st.data())
def test_validate_recipe_never_crashes(composed: dict[str, Any], data: st.DataObject) -> None:
    recipe = mutate(data, composed[data.draw(st.sampled_from(TOP_LEVEL))])
    try:
        valid = validate_recipe(recipe, file="fuzz.yaml")
    except RecipeError as exc:
        _check_problems(exc.problems, "fuzz.yaml")
    else:
        assert isinstance(valid, Recipe)
        assert all(s.stage in registered() for s in valid.stages)


@pytest.fixture(scope="module")
def scratch(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("fuzz") / "recipe.yaml"


@settings(FUZZ, max_examples=100)
@given(data=st.data())
def test_lint_of_a_resolved_recipe_never_crashes(
    composed: dict[str, Any], scratch: Path, data: st.DataObject
) -> None:
    recipe = mutate(data, composed[data.draw(st.sampled_from(TOP_LEVEL))])
    if not _yaml_dump(recipe, scratch):
        return
    problems = lint_file(scratch)
    if problems:
        _check_problems(problems, str(scratch))


@pytest.fixture(scope="module")
def recipe_copy(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A private copy of recipes/, so mutated files compose against the real groups."""
    return Path(shutil.copytree(RECIPES, tmp_path_factory.mktemp("fuzz") / "recipes"))


@settings(FUZZ, max_examples=60)
@given(data=st.data())
def test_lint_of_mutated_shipped_files_never_crashes(
    recipe_copy: Path, data: st.DataObject
) -> None:
    """Top-level recipes (composed by lint with Hydra) and config-group options."""
    rel = data.draw(st.sampled_from(RAW_FILES))
    original = (RECIPES / rel).read_text()
    target = recipe_copy / rel
    tree = yaml.safe_load(original)
    try:
        if not _yaml_dump(mutate(data, tree), target):
            return
        problems = lint_file(target)
        if problems:
            _check_problems(problems, str(target))
    finally:
        target.write_text(original)


def test_mutations_reach_every_kind_of_problem(composed: dict[str, Any]) -> None:
    """The fuzzer is not vacuous: fixed instances of its edits are refused with key paths."""
    base = composed["gptq_w4a16"]
    cases: list[tuple[str, Any]] = []
    r = copy.deepcopy(base)
    r["stages"]["load"]["stage"] = "lod"
    cases.append(("stages.load", r))
    r = copy.deepcopy(base)
    r["stages"] = dict(reversed(list(r["stages"].items())))
    cases.append(("stages.", r))
    r = copy.deepcopy(base)
    r["stages"]["load"] = None
    cases.append(("stages.baseline", r))  # nothing provides the model any more
    r = copy.deepcopy(base)
    r["stages"]["lod"] = r["stages"].pop("load")
    cases.append(("stages.lod", r))
    r = copy.deepcopy(base)
    r["stages"]["solve"]["after"] = "nowhere"
    cases.append(("stages.solve.after", r))
    r = copy.deepcopy(base)
    r["stages"] = list(r["stages"].values())
    cases.append(("stages", r))
    r = copy.deepcopy(base)
    r["scheme"]["bits"] = math.nan
    cases.append(("scheme.bits", r))
    r = copy.deepcopy(base)
    del r["model"]
    cases.append(("model", r))
    r = copy.deepcopy(base)
    r["dataset"]["num_sampels"] = 3
    cases.append(("dataset.num_sampels", r))
    for where, recipe in cases:
        with pytest.raises(RecipeError) as info:
            validate_recipe(recipe)
        assert any(p.path.startswith(where) for p in info.value.problems), (where, info.value)
