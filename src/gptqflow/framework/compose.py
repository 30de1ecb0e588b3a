"""Recipe composition with Hydra: where recipes live, resolvers, and the compose API.

Hydra composes (defaults lists, config groups, overrides, interpolation); pydantic
validates (:mod:`gptqflow.framework.schema`). This module only does the first half.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from gptqflow.errors import GptqflowError

DEFAULT_RECIPE = "gptq_w4a16"


def project_root() -> Path:
    """The gptqflow checkout (``src/gptqflow/framework/../../..``)."""
    return Path(__file__).resolve().parents[3]


def recipes_dir() -> Path:
    """The built-in recipes: ``$GPTQFLOW_RECIPES`` or ``<project root>/recipes``."""
    env = os.environ.get("GPTQFLOW_RECIPES")
    path = Path(env) if env else project_root() / "recipes"
    if not path.is_dir():
        raise GptqflowError(f"recipes directory {path} does not exist (set GPTQFLOW_RECIPES)")
    return path


def cache_dir() -> Path:
    """Where prepared models live: ``$GPTQFLOW_CACHE`` or ``~/.cache/gptqflow``."""
    return Path(os.environ.get("GPTQFLOW_CACHE", Path.home() / ".cache" / "gptqflow"))


def register_resolvers() -> None:
    """``${gptqflow:root}`` (project root) and ``${gptqflow:cache}`` (model cache) in recipes."""

    def _resolve(what: str) -> str:
        if what == "root":
            return str(project_root())
        if what == "cache":
            return str(cache_dir())
        raise GptqflowError(f"unknown ${{gptqflow:{what}}} interpolation; use root or cache")

    if not OmegaConf.has_resolver("gptqflow"):
        OmegaConf.register_new_resolver("gptqflow", _resolve)


def to_plain(cfg: DictConfig) -> dict[str, Any]:
    """Resolve every interpolation and return plain Python data (no OmegaConf objects)."""
    try:
        data = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
    except Exception as exc:  # omegaconf raises several types; all are user errors here
        raise GptqflowError(f"cannot resolve the recipe: {exc}") from exc
    assert isinstance(data, dict)
    return {str(k): v for k, v in data.items()}


def compose_recipe(
    config_name: str = DEFAULT_RECIPE,
    overrides: list[str] | None = None,
    config_dir: str | os.PathLike[str] | None = None,
) -> dict[str, Any]:
    """Compose ``config_name`` from ``config_dir`` (default: the built-in recipes), resolved.

    Without an ``output_dir=`` override the run goes to ``outputs/<name>/<timestamp>``
    (Hydra's run directory is only known under ``gptqflow run``).
    """
    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException

    register_resolvers()
    overrides = list(overrides or [])
    if not any(o.split("=", 1)[0].lstrip("+~") == "output_dir" for o in overrides):
        overrides.append(f"output_dir=outputs/{config_name}/${{now:%Y-%m-%d_%H-%M-%S}}")
    directory = Path(config_dir) if config_dir else recipes_dir()
    try:
        with initialize_config_dir(config_dir=str(directory.resolve()), version_base="1.3"):
            cfg = compose(config_name=config_name, overrides=overrides)
    except HydraException as exc:
        raise GptqflowError(
            f"cannot compose recipe {config_name!r} from {directory}: {exc}"
        ) from exc
    return to_plain(cfg)
