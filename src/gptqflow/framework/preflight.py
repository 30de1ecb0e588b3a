"""Checks that need the file system (not just the recipe), run before anything heavy.

Lint runs the same checks where the files exist ("when known"); the runner runs
them on every rank before loading any weights, so a bad group size or an existing
checkpoint fails in a second, not after an hour of calibration.
"""

from __future__ import annotations

import os
from pathlib import Path

from gptqflow.errors import GptqflowError
from gptqflow.framework.schema import Problem, Recipe, RecipeError
from gptqflow.modeling.modeldir import check_architecture, check_model_dir
from gptqflow.modeling.structure import group_size_problems, read_model_config, target_shapes
from gptqflow.modeling.text import dataset_file_problem, read_text


def model_problems(recipe: Recipe, *, require_model: bool) -> list[Problem]:
    """A model dir that is not usable, and group sizes that do not divide its input widths.

    With ``require_model`` (a run) the directory must exist and its weight files are
    checked from their headers (truncation, pickle-only weights); lint checks only
    what ``config.json`` tells, and only when the directory exists.
    """
    m, scheme = recipe.model, recipe.scheme
    path = Path(m.path)
    if not (path / "config.json").is_file() and not require_model:
        return []
    try:
        if require_model:
            check_model_dir(
                path, allow_pickle=m.allow_pickle, trust_remote_code=m.trust_remote_code
            )
        else:
            check_architecture(path, read_model_config(path), trust_remote_code=m.trust_remote_code)
        shapes = target_shapes(path, scheme.targets, scheme.ignore, m.trust_remote_code)
    except GptqflowError as exc:
        return [Problem("model.path", str(exc))]
    except Exception as exc:  # transformers cannot build it: unsupported architecture etc.
        return [Problem("model.path", f"cannot build the model from {path}/config.json: {exc}")]
    if not shapes:
        return [
            Problem(
                "scheme.targets",
                "no weight in the decoder layers matches (Linear, Conv1D or expert)",
            )
        ]
    return [
        Problem("scheme.group_size", msg) for msg in group_size_problems(shapes, scheme.group_size)
    ]


def file_problems(recipe: Recipe) -> list[Problem]:
    """What each stage finds wrong on disk (input files, an existing checkpoint), and an
    output directory that cannot be written."""
    out: list[Problem] = []
    for cfg in recipe.stages:
        out += cfg.preflight(recipe)
    problem = output_dir_problem(Path(recipe.output_dir))
    if problem is not None:
        out.append(Problem("output_dir", problem))
    return out


def text_file_problem(key: str, path: str) -> Problem | None:
    """``key``'s file missing, a dataset (data file, directory), or not usable UTF-8 text."""
    if (dataset := dataset_file_problem(Path(path))) is not None:
        return Problem(key, dataset)
    if not Path(path).is_file():
        return Problem(key, f"file {path!r} does not exist")
    problem = _text_problem(path)
    return None if problem is None else Problem(key, problem)


def _text_problem(path: str) -> str | None:
    """Why ``path`` is not usable text (empty, binary, not UTF-8), or None.

    Decoding costs milliseconds per MB; doing it here fails a bad file before the
    model is loaded instead of after.
    """
    try:
        read_text(path)
    except GptqflowError as exc:
        return str(exc)
    return None


def output_dir_problem(out: Path) -> str | None:
    """Why the run directory ``out`` cannot be created or written, or None.

    The nearest existing ancestor decides: it must be a directory this process may
    write into (creating ``out`` below it), checked before any heavy work so an
    hour of calibration never ends in "permission denied".
    """
    probe = out
    while not probe.exists():
        if probe.parent == probe:
            break
        probe = probe.parent
    if not probe.is_dir():
        return (
            f"{str(out)!r} cannot be created: {str(probe)!r} is a file, not a directory; "
            "choose another output_dir"
        )
    if not os.access(probe, os.W_OK | os.X_OK):
        what = (
            "is not writable"
            if probe == out
            else f"cannot be created: {str(probe)!r} is not writable"
        )
        return (
            f"{str(out)!r} {what} by this user (permission denied); choose another "
            "output_dir or fix the directory's permissions"
        )
    return None


def preflight(recipe: Recipe) -> None:
    """Raise RecipeError listing every problem found outside the recipe itself."""
    problems = model_problems(recipe, require_model=True) + file_problems(recipe)
    if problems:
        raise RecipeError(problems)
