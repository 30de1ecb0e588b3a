"""The editor JSON Schema: generated from the code, committed, and accepting every shipped recipe."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import pytest
import yaml

from gptqflow.framework.compose import project_root, recipes_dir
from gptqflow.framework.jsonschema import GROUPS, dump, group_schema, recipe_schema

SCHEMA_DIR = project_root() / "schema"
RECIPES = recipes_dir()


def test_committed_schemas_match_the_code() -> None:
    """A change to any config model shows up in review as a change to schema/*.json."""
    assert (SCHEMA_DIR / "recipe.schema.json").read_text() == dump(recipe_schema()), (
        "regenerate with: gptqflow schema --output schema/recipe.schema.json"
    )
    for group in GROUPS:
        assert (SCHEMA_DIR / f"{group}.schema.json").read_text() == dump(group_schema(group)), (
            f"regenerate with: gptqflow schema --group {group} --output schema/{group}.schema.json"
        )


def _files() -> list[Path]:
    return sorted(RECIPES.rglob("*.yaml"))


@pytest.mark.parametrize("path", _files(), ids=lambda p: str(p.relative_to(RECIPES)))
def test_every_recipe_validates_and_points_at_its_schema(path: Path) -> None:
    group = path.parent.name
    schema_name = f"{group}.schema.json" if group in GROUPS else "recipe.schema.json"
    lines = path.read_text().splitlines()
    # Hydra reads a package header (``# @package _global_``) only at the very top.
    first = lines[1] if lines[0].startswith("# @package ") else lines[0]
    assert first.startswith("# yaml-language-server: $schema=") and first.endswith(schema_name)
    target = (path.parent / first.split("=", 1)[1]).resolve()
    assert target == (SCHEMA_DIR / schema_name).resolve()
    schema = json.loads(target.read_text())
    jsonschema.validate(yaml.safe_load(path.read_text()), schema)


def test_schema_rejects_typos_and_bad_values() -> None:
    schema = group_schema("scheme")
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({"bitz": 4}, schema)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({"bits": 5}, schema)
    jsonschema.validate({"bits": "${oc.env:BITS}"}, schema)  # interpolations are fine
    recipe = recipe_schema()
    for bad in (
        {"solve": {"method": "rtn", "typo": 1}},  # unknown key
        {"solve": {"bits": 4}},  # a scheme key, not the stage's
        {"solve": {"method": "awq"}},  # not an allowed value
        {"solve": {"id": "solve"}},  # the id is the key
        {"solve": {"stage": "solv"}},  # no such stage
        {"solv": {}},  # a key that names no stage needs `stage:`
        {"baseline": {"stage": "evaluate", "dampening": 0.1}},  # not an evaluate key
        [{"stage": "solve"}],  # a list, not a mapping
    ):
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate({"stages": bad}, recipe)
    jsonschema.validate(
        {
            "stages": {
                "load": {},
                "baseline": {"stage": "evaluate"},  # `stage:` names it
                "solve": {"method": "rtn", "dampening": "${oc.env:DAMP}"},  # defaults to key
                "partition": None,  # removed
                "rtn": {"stage": "solve", "method": "rtn", "after": "load"},  # placed
            }
        },
        recipe,
    )
