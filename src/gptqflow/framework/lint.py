"""``gptqflow lint``: validate recipe files and config-group options without loading a model.

Every problem is collected (not just the first), each with its file, key path, the
bad value and what is allowed. Three kinds of YAML file are recognised:

* a config-group option (``<recipes>/scheme/w4a16.yaml`` ...): checked against its
  group's schema; an option of a group that places its keys elsewhere
  (``# @package _global_``, e.g. ``<recipes>/method/gptaq.yaml``, which changes
  ``stages``) is checked by composing the default recipe with it (``method=gptaq``);
* a top-level recipe with a ``defaults:`` list: composed with Hydra from its own
  directory, then validated like ``gptqflow run`` would;
* a standalone, already composed recipe (e.g. a run's ``recipe.yaml``): validated.

Where the recipe's model directory exists, its ``config.json`` is read (never the
weights) to check the group size against the real input widths.

Each problem carries the line and column of its key (:mod:`~gptqflow.framework.yamlpos`):
in the file itself, or for a composed recipe in the file of its defaults list that set
the key (the message then names the recipe it was composed into).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import yaml
from omegaconf import OmegaConf
from pydantic import ValidationError

from gptqflow.errors import GptqflowError
from gptqflow.framework.compose import DEFAULT_RECIPE, register_resolvers, to_plain
from gptqflow.framework.preflight import model_problems
from gptqflow.framework.schema import (
    GROUPS,
    Problem,
    RecipeError,
    problems_from_validation,
    validate_recipe,
)
from gptqflow.framework.yamlpos import Source, SourceMap, key_positions


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
        mark = getattr(exc, "problem_mark", None)
        line, col = (mark.line + 1, mark.column + 1) if mark is not None else (None, None)
        return None, [Problem("<file>", f"not valid YAML: {exc}", str(path), line, col)]


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
        problems = _lint_group_option(path, group, data)
        sources = SourceMap.single(path, path.read_text(), package=group)
    elif "defaults" in data:
        problems = _lint_composed(path)
        sources = _composition_sources(path)
    elif (default := path.parent.parent / f"{DEFAULT_RECIPE}.yaml").is_file():
        # An option of a group without a schema of its own (``@package _global_``).
        text = path.read_text()
        package = _package_header(text)
        problems = [
            _blame_option(p, path, group, default, package)
            for p in _lint_composed(default, [f"{group}={path.stem}"])
        ]
        sources = SourceMap.single(path, text, package=group if package is None else package)
    else:
        problems = _lint_resolved(path, data)
        sources = SourceMap.single(path, path.read_text())
    return [_place(p, sources, path) for p in problems]


def _package_header(text: str) -> str | None:
    """The ``# @package`` of a config file (Hydra reads it from the leading comments)."""
    for line in text.splitlines():
        stripped = line.strip()
        if not stripped.startswith("#"):
            break
        words = stripped.lstrip("#").split()
        if len(words) == 2 and words[0] == "@package":
            return "" if words[1] == "_global_" else words[1]
    return None


def _blame_option(
    problem: Problem, option: Path, group: str, default: Path, package: str | None
) -> Problem:
    """A problem found composing ``option`` into the default recipe belongs to the option.

    The default recipe is valid on its own, so whatever composition with the option
    breaks is the option's doing; a key under the group's own name means the option
    lost the header that puts its keys at the top level.
    """
    if problem.file != str(default):
        return problem
    message = f"{problem.message} (composing {default.name} with {group}={option.stem})"
    if package is None and problem.path.split(".")[0] == group:
        message += (
            f"; options of the {group} group set top-level keys: start the file with "
            "'# @package _global_'"
        )
    return dataclasses.replace(problem, file=str(option), message=message)


def _place(problem: Problem, sources: SourceMap, linted: Path) -> Problem:
    """Attach the file, line and column that set the problem's key, when a file did."""
    loc = sources.locate(problem.path, missing=problem.message == "required key is missing")
    if loc is None:
        return problem
    message = problem.message
    if Path(loc.file).resolve() != linted.resolve():
        message += f" (composed into {linted})"
    return dataclasses.replace(
        problem, file=loc.file, line=loc.line, column=loc.column, message=message
    )


def _composition_sources(path: Path) -> SourceMap:
    """The files Hydra merges for ``path``, in merge order (empty when composition fails).

    Uses Hydra's defaults-list computation (``ConfigLoader.compute_defaults_list``,
    part of its public ``ConfigLoader`` interface), so ``override`` entries, nested
    parent recipes and ``_self_`` placement are resolved exactly as the run would.
    """
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.types import RunMode

    directory = path.parent
    try:
        with initialize_config_dir(config_dir=str(directory.resolve()), version_base="1.3"):
            loader = GlobalHydra.instance().config_loader()
            defaults = loader.compute_defaults_list(
                path.stem, ["output_dir=lint-placeholder"], RunMode.RUN
            ).defaults
        sources = []
        for d in defaults:
            file = directory / f"{d.config_path}.yaml"
            if d.config_path and file.is_file():
                sources.append(Source(str(file), d.package or "", key_positions(file.read_text())))
    except Exception:  # composition errors are reported by _lint_composed already
        return SourceMap([])
    return SourceMap(sources)


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


def _lint_composed(path: Path, overrides: list[str] | None = None) -> list[Problem]:
    from hydra import compose, initialize_config_dir

    try:
        with initialize_config_dir(config_dir=str(path.parent.resolve()), version_base="1.3"):
            cfg = compose(
                config_name=path.stem,
                overrides=["output_dir=lint-placeholder", *(overrides or [])],
            )
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
