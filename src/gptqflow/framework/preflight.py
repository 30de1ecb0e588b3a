"""Checks that need the file system (not just the recipe), run before anything heavy.

Lint runs the same checks where the files exist ("when known"); the runner runs
them on every rank before loading any weights, so a bad group size or an existing
checkpoint fails in a second, not after an hour of calibration.
"""

from __future__ import annotations

from pathlib import Path

from gptqflow.framework.errors import GptqflowError
from gptqflow.framework.registry import StageConfig
from gptqflow.framework.schema import Problem, Recipe, RecipeError
from gptqflow.modeling.structure import group_size_problems, linear_shapes, read_model_config


def _first(recipe: Recipe, name: str) -> tuple[int, StageConfig] | None:
    for i, s in enumerate(recipe.stages):
        if s.stage == name:
            return i, s
    return None


def model_problems(recipe: Recipe, *, require_model: bool) -> list[Problem]:
    """Group sizes that do not divide the input widths of the targeted Linears."""
    load, solve, cal = _first(recipe, "load"), _first(recipe, "solve"), _first(recipe, "calibrate")
    if load is None:
        return []
    path = Path(getattr(load[1], "path"))  # noqa: B009
    if not (path / "config.json").is_file():
        if require_model:
            try:
                read_model_config(path)
            except GptqflowError as exc:
                return [Problem(f"stages[{load[0]}](load).path", str(exc))]
        return []
    if solve is None or cal is None:
        return []
    try:
        targets = getattr(cal[1], "targets")  # noqa: B009
        ignore = getattr(cal[1], "ignore")  # noqa: B009
        shapes = linear_shapes(
            path,
            targets,
            ignore,
            getattr(load[1], "trust_remote_code", False),
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
    """Input files that are missing, and a checkpoint that would be overwritten."""
    out: list[Problem] = []
    for i, s in enumerate(recipe.stages):
        for key in ("calibration_file", "eval_file"):
            value = getattr(s, key, None)
            skipped = s.stage == "evaluate" and getattr(s, "max_tokens", 1) == 0
            if value is not None and not skipped and not Path(value).is_file():
                out.append(
                    Problem(f"stages[{i}]({s.stage}).{key}", f"file {value!r} does not exist")
                )
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
    if recipe.dataset.num_samples < recipe.runtime.nproc_per_node:
        out.append(
            Problem(
                "dataset.num_samples",
                f"{recipe.dataset.num_samples} < runtime.nproc_per_node={recipe.runtime.nproc_per_node}: "
                "every rank needs at least one calibration sample",
            )
        )
    return out


def preflight(recipe: Recipe) -> None:
    """Raise RecipeError listing every problem found outside the recipe itself."""
    problems = model_problems(recipe, require_model=True) + file_problems(recipe)
    if problems:
        raise RecipeError(problems)
