"""Checks that need the file system (not just the recipe), run before anything heavy.

Lint runs the same checks where the files exist ("when known"); the runner runs
them on every rank before loading any weights, so a bad group size or an existing
checkpoint fails in a second, not after an hour of calibration.
"""

from __future__ import annotations

import os
from pathlib import Path

from gptqflow.framework.errors import GptqflowError
from gptqflow.framework.registry import StageConfig
from gptqflow.framework.schema import Problem, Recipe, RecipeError
from gptqflow.modeling.modeldir import check_architecture, check_model_dir
from gptqflow.modeling.structure import group_size_problems, linear_shapes, read_model_config
from gptqflow.modeling.text import read_text


def _first(recipe: Recipe, name: str) -> tuple[int, StageConfig] | None:
    for i, s in enumerate(recipe.stages):
        if s.stage == name:
            return i, s
    return None


def model_problems(recipe: Recipe, *, require_model: bool) -> list[Problem]:
    """A model dir that is not usable, and group sizes that do not divide its input widths.

    With ``require_model`` (a run) the directory must exist and its weight files are
    checked from their headers (truncation, pickle-only weights); lint checks only
    what ``config.json`` tells, and only when the directory exists.
    """
    load, solve, cal = _first(recipe, "load"), _first(recipe, "solve"), _first(recipe, "calibrate")
    if load is None:
        return []
    path = Path(getattr(load[1], "path"))  # noqa: B009
    trust = bool(getattr(load[1], "trust_remote_code", False))
    where = f"stages[{load[0]}](load).path"
    if not (path / "config.json").is_file() and not require_model:
        return []
    try:
        if require_model:
            check_model_dir(
                path,
                allow_pickle=bool(getattr(load[1], "allow_pickle", False)),
                trust_remote_code=trust,
            )
        else:
            check_architecture(path, read_model_config(path), trust_remote_code=trust)
    except GptqflowError as exc:
        return [Problem(where, str(exc))]
    if solve is None or cal is None:
        return []
    try:
        targets = getattr(cal[1], "targets")  # noqa: B009
        ignore = getattr(cal[1], "ignore")  # noqa: B009
        shapes = linear_shapes(
            path,
            targets,
            ignore,
            trust,
        )
    except GptqflowError as exc:
        return [Problem(f"stages[{load[0]}](load).path", str(exc))]
    except Exception as exc:  # transformers cannot build it: unsupported architecture etc.
        return [
            Problem(
                f"stages[{load[0]}](load).path",
                f"cannot build the model from {path}/config.json: {exc}",
            )
        ]
    if not shapes:
        return [
            Problem(
                f"stages[{cal[0]}](calibrate).targets",
                "no Linear module in the decoder layers matches",
            )
        ]
    return [
        Problem(f"stages[{solve[0]}](solve).group_size", msg + " (override: scheme.group_size=...)")
        for msg in group_size_problems(shapes, getattr(solve[1], "group_size"))  # noqa: B009
    ]


def file_problems(recipe: Recipe) -> list[Problem]:
    """Input files that are missing or not UTF-8 text, an output directory that cannot be
    written, and a checkpoint that would be overwritten."""
    out: list[Problem] = []
    checked: dict[str, str | None] = {}  # a text file read once even if two stages use it
    for i, s in enumerate(recipe.stages):
        for key in ("calibration_file", "eval_file"):
            value = getattr(s, key, None)
            skipped = s.stage == "evaluate" and getattr(s, "max_tokens", 1) == 0
            if value is None or skipped:
                continue
            if not Path(value).is_file():
                out.append(
                    Problem(f"stages[{i}]({s.stage}).{key}", f"file {value!r} does not exist")
                )
                continue
            if value not in checked:
                checked[value] = _text_problem(value)
            if checked[value] is not None:
                out.append(Problem(f"stages[{i}]({s.stage}).{key}", str(checked[value])))
        if s.stage == "save":
            target = Path(recipe.output_dir) / getattr(s, "subdir")  # noqa: B009
            if target.exists() and any(target.iterdir()) and not getattr(s, "overwrite"):  # noqa: B009
                out.append(
                    Problem(
                        f"stages[{i}](save)",
                        f"{target} already holds a checkpoint; pass overwrite=true to replace it "
                        "or choose another output_dir",
                    )
                )
    problem = output_dir_problem(Path(recipe.output_dir))
    if problem is not None:
        out.append(Problem("output_dir", problem))
    if recipe.dataset.num_samples < recipe.runtime.nproc_per_node:
        out.append(
            Problem(
                "dataset.num_samples",
                f"{recipe.dataset.num_samples} < runtime.nproc_per_node={recipe.runtime.nproc_per_node}: "
                "every rank needs at least one calibration sample",
            )
        )
    return out


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
