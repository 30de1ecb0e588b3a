"""The Python API behind :func:`gptqflow.run`: compose, validate, pre-flight, run."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from gptqflow.errors import GptqflowError
from gptqflow.framework.compose import compose_recipe, register_resolvers, to_plain
from gptqflow.framework.distributed import DistContext
from gptqflow.framework.preflight import preflight
from gptqflow.framework.runner import Runner
from gptqflow.framework.schema import Recipe, validate_recipe
from gptqflow.modeling.calibdata import PYTHON_SOURCE

log = logging.getLogger("gptqflow")


def resolve_config(config: Any, overrides: list[str], config_dir: str | None) -> dict[str, Any]:
    """A recipe name, a YAML path, a dict or a DictConfig -> a resolved plain dict."""
    if isinstance(config, str) and not config.endswith((".yaml", ".yml")):
        return compose_recipe(config, overrides, config_dir)
    if isinstance(config, (str, Path)):
        path = Path(config)
        return compose_recipe(path.stem, overrides, str(path.parent))
    register_resolvers()
    cfg = config if isinstance(config, DictConfig) else OmegaConf.create(config)
    if overrides:
        cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist(overrides))
    return to_plain(cfg)  # type: ignore[arg-type]


def execute(
    resolved: dict[str, Any],
    ctx: DistContext | None = None,
    *,
    source: str | None = None,
    calibration: Any = None,
) -> dict[str, Any]:
    """Validate and run a resolved recipe in this process; return the report.

    ``calibration`` (data, see :func:`gptqflow.run`) replaces the recipe's calibration
    source: ``dataset.path`` is recorded as ``<calibration>`` in recipe.yaml.
    """
    if calibration is not None:
        resolved = with_calibration_argument(resolved)
    recipe: Recipe = validate_recipe(resolved, file=source)
    preflight(recipe)
    own = ctx is None
    if ctx is None:
        rt = recipe.runtime
        ctx = DistContext.from_environment(
            backend=rt.backend, device=rt.device, timeout_s=rt.timeout_s
        )
    try:
        return Runner(recipe, resolved, ctx, calibration=calibration).run()
    finally:
        if own:
            ctx.close()


def with_calibration_argument(resolved: dict[str, Any]) -> dict[str, Any]:
    """The recipe with its calibration source replaced by the ``calibration=`` argument.

    ``dataset.path`` becomes ``<calibration>`` and ``dataset.calibration_file`` null, so
    the written recipe.yaml says where the data came from and preflight checks no file.
    """
    data = dict(resolved.get("dataset") or {})
    replaced = data.get("calibration_file") or data.get("path")
    if replaced is not None and replaced != PYTHON_SOURCE:
        log.info("calibration= replaces the recipe's calibration source %s", replaced)
    data.update(calibration_file=None, path=PYTHON_SOURCE)
    return {**resolved, "dataset": data}


def run_recipe(
    config: Any, overrides: list[str], config_dir: str | None, *, calibration: Any = None
) -> dict[str, Any]:
    """Compose (if needed), validate and run a recipe in this process."""
    resolved = resolve_config(config, overrides, config_dir)
    if int(resolved.get("runtime", {}).get("nproc_per_node", 1)) > 1:
        raise GptqflowError(
            "gptqflow.run() runs in this process (one rank); for runtime.nproc_per_node > 1 "
            "use the `gptqflow run` command, which starts the ranks"
        )
    return execute(resolved, calibration=calibration)
