"""``gptqflow lint``: validate recipe files and config-group options without loading a model.

Every problem is collected (not just the first), each with its file, key path, the
bad value and what is allowed. Three kinds of YAML file are recognised:

* a config-group option (``<recipes>/scheme/w4a16.yaml`` ...): checked against its
  group's schema;
* a top-level recipe with a ``defaults:`` list: composed with Hydra from its own
  directory, then validated like ``gptqflow run`` would;
* a standalone, already composed recipe (e.g. a run's ``recipe.yaml``): validated.

Where the recipe's model directory exists, its ``config.json`` is read (never the
weights) to check the group size against the real input widths.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from omegaconf import OmegaConf
from pydantic import BaseModel, ValidationError

from gptqflow.framework.compose import register_resolvers, to_plain
from gptqflow.framework.errors import GptqflowError
from gptqflow.framework.preflight import model_problems
from gptqflow.framework.schema import (
    DatasetGroup,
    ModelGroup,
    Problem,
    RecipeError,
    RuntimeGroup,
    SchemeGroup,
    problems_from_validation,
    validate_recipe,
)

GROUPS: dict[str, type[BaseModel]] = {
    "model": ModelGroup,
    "dataset": DatasetGroup,
    "scheme": SchemeGroup,
    "runtime": RuntimeGroup,
}


def recipe_files(paths: list[Path]) -> list[Path]:
    out: list[Path] = []
    for p in paths:
        if p.is_dir():
            out += sorted(
                q
                for q in p.rglob("*.y*ml")
                if q.suffix in (".yaml", ".yml") and ".hydra" not in q.parts
            )
        else:
            out.append(p)
    return out


def lint_paths(paths: list[Path]) -> tuple[list[Problem], int]:
    """Every problem in every recipe file under ``paths``; and how many files were checked."""
    register_resolvers()
    files = recipe_files(paths)
    problems: list[Problem] = []
    for f in files:
        problems += lint_file(f)
    return problems, len(files)


def _load_yaml(path: Path) -> tuple[Any, list[Problem]]:
    if not path.is_file():
        return None, [Problem("<file>", "does not exist", str(path))]
    try:
        return yaml.safe_load(path.read_text()), []
    except yaml.YAMLError as exc:
        return None, [Problem("<file>", f"not valid YAML: {exc}", str(path))]


def lint_file(path: Path) -> list[Problem]:
    data, problems = _load_yaml(path)
    if problems:
        return problems
    if not isinstance(data, dict):
        return [
            Problem("<root>", f"a recipe must be a mapping, got {type(data).__name__}", str(path))
        ]
    group = path.parent.name
    if group in GROUPS and "stages" not in data:
        return _lint_group_option(path, group, data)
    if "defaults" in data:
        return _lint_composed(path)
    return _lint_resolved(path, data)


def _lint_group_option(path: Path, group: str, data: dict[str, Any]) -> list[Problem]:
    """A config-group option: its keys and values against the group schema (``???`` allowed)."""
    cfg = OmegaConf.create(data)
    plain: dict[str, Any] = {}
    for key in data:
        if OmegaConf.is_missing(cfg, key):
            continue  # a value the user must supply on the command line
        try:
            plain[key] = (
                to_plain(OmegaConf.create({key: cfg[key]}))[key]
                if OmegaConf.is_interpolation(cfg, key)
                else data[key]
            )
        except GptqflowError:
            plain[key] = data[key]
    schema = GROUPS[group]
    required_missing = {k for k in data if OmegaConf.is_missing(cfg, k)}
    try:
        schema.model_validate(plain)
    except ValidationError as exc:
        return [
            Problem(p.path, p.message, str(path))
            for p in problems_from_validation(exc, prefix=group, model=schema)
            if not (
                p.message == "required key is missing" and p.path.split(".")[-1] in required_missing
            )
        ]
    return []


def _lint_composed(path: Path) -> list[Problem]:
    from hydra import compose, initialize_config_dir

    try:
        with initialize_config_dir(config_dir=str(path.parent.resolve()), version_base="1.3"):
            cfg = compose(config_name=path.stem, overrides=["output_dir=lint-placeholder"])
        # Values the user must give on the command line (``???``) are not errors here.
        for group in GROUPS:
            node = cfg.get(group)
            for key in list(node or ()):
                if OmegaConf.is_missing(node, key):
                    node[key] = "<required>"
        resolved = to_plain(cfg)
    except GptqflowError as exc:
        return [Problem("<compose>", str(exc), str(path))]
    except Exception as exc:  # Hydra's composition errors: missing group option etc.
        return [Problem("<compose>", f"{type(exc).__name__}: {exc}", str(path))]
    return _validate(path, resolved)


def _lint_resolved(path: Path, data: dict[str, Any]) -> list[Problem]:
    try:
        resolved = to_plain(OmegaConf.create(data))
    except GptqflowError as exc:
        return [Problem("<resolve>", str(exc), str(path))]
    return _validate(path, resolved)


def _validate(path: Path, resolved: dict[str, Any]) -> list[Problem]:
    try:
        recipe = validate_recipe(resolved, file=str(path))
    except RecipeError as exc:
        return exc.problems
    return [
        Problem(p.path, p.message, str(path)) for p in model_problems(recipe, require_model=False)
    ]
