"""gptqflow: recipe-driven, DDP-aware GPTQ quantization.

The public Python API is :func:`run` (compose + validate + execute a recipe) and
:func:`compose` (compose a recipe with Hydra overrides without running it).
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

__all__ = ["__version__", "compose", "run"]


def compose(
    config_name: str = "gptq_w4a16",
    overrides: list[str] | None = None,
    config_dir: str | None = None,
) -> dict[str, Any]:
    """Compose a recipe with Hydra and return it as a plain, resolved dict."""
    from gptqflow.framework.compose import compose_recipe

    return compose_recipe(config_name, overrides or [], config_dir)


def run(
    config: Any = "gptq_w4a16",
    overrides: list[str] | None = None,
    config_dir: str | None = None,
    *,
    calibration: Any = None,
) -> dict[str, Any]:
    """Run a recipe in this process (world size 1) and return its report.

    ``config`` is a recipe name (composed from ``recipes/``), a path to a YAML file,
    or an already composed dict / DictConfig. ``calibration`` replaces the recipe's
    calibration source with data: a ``datasets.Dataset`` (a ``messages`` or ``text``
    column), a list of strings, or a list of conversations (lists of ``{"role",
    "content"}`` turns); the ``dataset`` group's other keys (num_samples, seq_len, seed,
    packing, the column names) apply as they do to ``dataset.path``.
    """
    from gptqflow.framework.api import run_recipe

    return run_recipe(config, overrides or [], config_dir, calibration=calibration)
