"""Recipe composition with Hydra: where recipes live, resolvers, command-line checks, compose.

Hydra composes (defaults lists, config groups, overrides, interpolation); pydantic
validates (:mod:`gptqflow.framework.schema`). This module does the first half, and
checks a command line before Hydra sees it, so that every mistake in one comes out in
one form (``gptqflow: error: ...``, naming the override, what is allowed and the
nearest match) instead of Hydra's text (its search path, advice to add ``+``):

* an unknown recipe name (``--config-name``) or config-group option (``scheme=w5a16``),
  an override that does not parse, an unknown key (``dataset.num_sample=32``): a
  :class:`UsageError` (exit status 2);
* a key the schema allows but the composed recipe does not spell out (a stage setting
  left at its default, ``scheme.targets``) is set like any other: the override is
  passed on as ``++key=value``, so no ``+`` is needed;
* a value the recipe leaves unset (``model.path: ???``): what to pass, and the recipes
  that need none.
"""

from __future__ import annotations

import difflib
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from gptqflow.errors import GptqflowError, UsageError

#: The recipe everything else derives from (the stage order of ``gptqflow stages``).
DEFAULT_RECIPE = "gptq_w4a16"
#: What ``gptqflow run`` runs without ``--config-name``: SmolLM2-135M, minutes on a CPU.
RUN_RECIPE = "smollm2_quick"


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


# ------------------------------------------------------------------ recipes on disk
def search_dirs(config_dir: str | os.PathLike[str] | None = None) -> list[Path]:
    """Where recipes are looked up, first match wins: ``config_dir`` (if any), then the built-in ones.

    The same order as ``gptqflow run --config-dir DIR``, so a recipe of your own can
    derive from a shipped one (``defaults: [smollm2_w4a16, _self_]``).
    """
    dirs: list[Path] = []
    if config_dir is not None:
        path = Path(config_dir)
        if not path.is_dir():
            raise UsageError(f"--config-dir {path}: no such directory")
        dirs.append(path)
    builtin = recipes_dir()
    if all(d.resolve() != builtin.resolve() for d in dirs):
        dirs.append(builtin)
    return dirs


def recipe_names(dirs: Sequence[Path]) -> list[str]:
    """The recipes (top-level ``*.yaml``) of ``dirs``, sorted."""
    return sorted({p.stem for d in dirs for p in d.glob("*.yaml")})


def recipe_summary(path: Path) -> str:
    """A recipe's one-line purpose: the first line of its header comment (after the schema line)."""
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        text = line.strip()
        if not text.startswith("#"):
            break
        text = text.lstrip("#").strip()
        if text and not text.startswith("yaml-language-server:"):
            return text
    return ""


def group_options(dirs: Sequence[Path]) -> dict[str, list[str]]:
    """Config group -> its options (``recipes/<group>/<option>.yaml``), over ``dirs``."""
    out: dict[str, set[str]] = {}
    for d in dirs:
        for sub in d.iterdir():
            options = {p.stem for p in sub.glob("*.yaml")} if sub.is_dir() else set()
            if options:
                out.setdefault(sub.name, set()).update(options)
    return {group: sorted(options) for group, options in sorted(out.items())}


def did_you_mean(word: object, candidates: Iterable[str]) -> str:
    """`` (did you mean 'x'?)`` when one or a few candidates are clearly the closest, else ''.

    ``w5a16`` is as close to ``w2a16`` as to ``w8a16``: naming one of four equal
    matches would be a guess, so none is named (the options are listed anyway).
    """
    scored = sorted(
        ((difflib.SequenceMatcher(None, str(word), c).ratio(), c) for c in set(candidates)),
        key=lambda sc: (-sc[0], sc[1]),
    )
    if not scored or scored[0][0] < 0.6:
        return ""
    best = [c for s, c in scored if s == scored[0][0]]
    if len(best) > 2:
        return ""
    return f" (did you mean {' or '.join(repr(c) for c in best)}?)"


def check_recipe_name(name: str, dirs: Sequence[Path]) -> None:
    """Refuse a ``--config-name`` that no directory holds, listing the recipes there."""
    if any((d / f"{name}.yaml").is_file() for d in dirs):
        return
    names = recipe_names(dirs)
    where = " or ".join(str(d) for d in dirs)
    raise UsageError(
        f"--config-name {name}: no recipe {name!r} in {where}; recipes: "
        f"{', '.join(names) or '(none)'}{did_you_mean(name, names)}"
    )


# ------------------------------------------------------------------ overrides
def checked_overrides(name: str, dirs: Sequence[Path], overrides: Sequence[str]) -> list[str]:
    """The overrides as Hydra should get them, or a :class:`UsageError` for the first bad one.

    Checks every override against what exists: config-group options on disk, keys in
    the composed recipe and in the schema (config groups, stage settings). A key the
    schema allows but the recipe does not spell out is passed on as ``++key=value``
    (set it, adding it if needed). ``hydra.*`` overrides are Hydra's own and left alone.
    """
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import OverrideParseException

    parser = OverridesParser.create()
    parsed = []
    for text in overrides:
        try:
            parsed.append(parser.parse_overrides([text])[0])
        except OverrideParseException as exc:
            raise UsageError(_unparsable(text, exc, recipe_names(dirs))) from None
    groups = group_options(dirs)
    keys, group_args = [], []
    for o in parsed:
        head = o.key_or_group.split(".")[0].split("/")[0]
        if head == "hydra" or o.package is not None:
            continue  # Hydra's own settings, or a group placed elsewhere (@pkg): Hydra's
        if o.key_or_group in groups:
            if not o.is_delete():
                _check_options(o, groups[o.key_or_group], dirs)
                group_args.append(_first_choice(o))
            else:
                group_args.append(str(o.input_line))
        else:
            keys.append(o)
    if not keys:
        return list(overrides)
    cfg = compose_config(name, dirs, group_args)
    rewritten = {id(o): _checked_key(o, cfg, name) for o in keys}
    out = []
    for text, o in zip(overrides, parsed):
        out.append(rewritten.get(id(o)) or text)
    return out


def _unparsable(text: str, exc: Exception, names: list[str]) -> str:
    if "=" not in text:
        if text in names:
            return (
                f"{text!r} is not an override (key=value); to run the recipe {text!r} pass "
                f"--config-name {text}"
            )
        return (
            f"{text!r} is not an override: overrides are key=value (e.g. scheme=w3a16, "
            "dataset.num_samples=32); see gptqflow run --help"
        )
    detail = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    why = detail[1] if len(detail) > 1 and not detail[1].startswith("See ") else detail[0]
    return (
        f"{text}: cannot parse this override ({why}); quote a value with spaces, brackets or "
        "braces for the shell, e.g. 'scheme.targets=[q_proj,k_proj]'"
    )


def _choices(o: Any) -> list[str] | None:
    """The option names an override of a config group asks for (None: not plain names)."""
    try:
        values = list(o.sweep_string_iterator()) if o.is_sweep_override() else [o.value()]
    except Exception:  # a range or interval sweep, a glob: Hydra decides
        return None
    return values if all(isinstance(v, str) for v in values) else None


def _first_choice(o: Any) -> str:
    values = _choices(o)
    if o.is_sweep_override() and values:
        return f"{o.get_key_element()}={values[0]}"
    return str(o.input_line)


def _check_options(o: Any, options: list[str], dirs: Sequence[Path]) -> None:
    group = o.key_or_group
    for value in _choices(o) or []:
        if value not in options and value != "null":
            where = " or ".join(str(d / group) for d in dirs if (d / group).is_dir())
            raise UsageError(
                f"{o.input_line}: no option {value!r} in config group {group!r} ({where}); "
                f"{group} options: {', '.join(options)}{did_you_mean(value, options)}"
            )


def _keys(node: DictConfig) -> list[str]:
    """Every key of ``node``, those left ``???`` too (``key in node`` is False for those)."""
    return [str(k) for k in node]


def _node(cfg: Any, parts: Sequence[str]) -> Any:
    """The config node at ``parts`` (None when absent), without resolving its values."""
    node = cfg
    for part in parts:
        if not isinstance(node, DictConfig) or part not in _keys(node):
            return None
        try:
            node = node[part]
        except Exception:  # an interpolation that only resolves at run time
            return None
    return node


def _present(cfg: Any, parts: Sequence[str]) -> bool:
    parent = _node(cfg, parts[:-1])
    return isinstance(parent, DictConfig) and parts[-1] in _keys(parent)


def _checked_key(o: Any, cfg: DictConfig, name: str) -> str | None:
    """The override to pass on for key ``o`` (None: as typed), or a UsageError."""
    parts = o.key_or_group.split(".")
    if o.is_delete():
        if not _present(cfg, parts):
            raise UsageError(_unknown_key(o, cfg, name, parts, deleting=True))
        return None
    if _present(cfg, parts):
        return "++" + o.input_line.lstrip("+") if o.is_add() else None
    first = next(i for i in range(len(parts)) if not _present(cfg, parts[: i + 1]))
    holder = ".".join(parts[:first])
    if first > 0 and not isinstance(_node(cfg, parts[:first]), DictConfig):
        raise UsageError(
            f"{o.input_line}: {holder} is a single value in recipe {name!r}, with no keys "
            f"below it; set it with {holder}=VALUE"
        )
    if parts[0] == "stages" and first == 1 and len(parts) > 2:
        _schema_keys(cfg, parts[:2], name, o)  # a setting of a stage the recipe has not: refused
    allowed = _schema_keys(cfg, parts[:first], name, o)
    if allowed is None:
        return None  # a place the schema does not describe (a list, a plugin's stage): Hydra
    if allowed == ["*"] or parts[first] in allowed:
        return "++" + o.input_line.lstrip("+")  # validation checks the value
    raise UsageError(_unknown_key(o, cfg, name, parts[: first + 1], allowed=allowed))


def _schema_keys(cfg: DictConfig, parent: list[str], name: str, o: Any) -> list[str] | None:
    """The keys the schema allows under ``parent`` (``["*"]``: any), None when it does not say."""
    from gptqflow.framework.schema import GROUPS, Recipe

    if not parent:
        return list(Recipe.model_fields)
    if len(parent) == 1 and parent[0] in GROUPS:
        return list(GROUPS[parent[0]].model_fields)
    if parent == ["stages"]:
        return ["*"]  # a new entry: validation checks its stage
    if len(parent) == 2 and parent[0] == "stages":
        stages = _node(cfg, ["stages"])
        entry = _node(cfg, parent)
        ids = _keys(stages) if isinstance(stages, DictConfig) else []
        ids = [k for k in ids if _node(cfg, ["stages", k]) is not None]
        if not isinstance(entry, DictConfig):
            raise UsageError(
                f"{o.input_line}: recipe {name!r} has no stage {parent[1]!r}"
                f"{did_you_mean(parent[1], ids)}; its stages: {', '.join(ids)} (a new one: "
                f"stages.ID={{stage: NAME, after: ID}})"
            )
        from gptqflow.framework.registry import registered

        spec = registered().get(str(entry.get("stage", parent[1])))
        if spec is None:
            return None  # an unknown stage: validation names it
        return [f for f in spec.config_cls.model_fields if f != "id"] + ["after"]
    return None


def _unknown_key(
    o: Any,
    cfg: DictConfig,
    name: str,
    parts: list[str],
    *,
    allowed: list[str] | None = None,
    deleting: bool = False,
) -> str:
    key, parent = parts[-1], ".".join(parts[:-1])
    if allowed is None:
        node = _node(cfg, parts[:-1])
        allowed = _keys(node) if isinstance(node, DictConfig) else []
    where = f"in {parent}" if parent else "at the top of the recipe"
    what = "nothing to remove" if deleting else "unknown key"
    listing = ", ".join(allowed) if allowed else "(none)"
    return (
        f"{o.input_line}: {what}: recipe {name!r} has no key {key!r} {where}"
        f"{did_you_mean(key, allowed)}; keys {where}: {listing}"
    )


# ------------------------------------------------------------------ composition
def compose_config(
    name: str, dirs: Sequence[Path], overrides: Sequence[str], *, with_hydra: bool = False
) -> DictConfig:
    """Hydra's compose API over ``dirs``; its errors in one line each, without its search path."""
    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException

    register_resolvers()
    extra = []
    if len(dirs) > 1:
        extra.append(
            f"hydra.searchpath=[{','.join(repr(f'file://{d.resolve()}') for d in dirs[1:])}]"
        )
    try:
        with initialize_config_dir(config_dir=str(dirs[0].resolve()), version_base="1.3"):
            return compose(
                config_name=name, overrides=[*overrides, *extra], return_hydra_config=with_hydra
            )
    except HydraException as exc:
        raise GptqflowError(f"recipe {name!r}: {hydra_message(exc)}") from None


def hydra_message(exc: BaseException) -> str:
    """Hydra's error text without its config search path, ``HYDRA_FULL_ERROR`` or ``+`` advice."""
    lines: list[str] = []
    listing: list[str] = []
    for raw in str(exc).splitlines():
        line = raw.strip()
        if line.startswith("Config search path"):
            break
        if line.startswith(("Set the environment variable HYDRA_FULL_ERROR", "To append to")):
            continue
        if raw.startswith("\t") and lines:
            listing.append(line)
            continue
        if listing:
            lines[-1] += " " + ", ".join(listing)
            listing = []
        if line:
            lines.append(line)
    if listing:
        lines[-1] += " " + ", ".join(listing)
    cause = str(exc.__cause__ or "").strip().splitlines()
    if cause and cause[0] not in lines:
        lines.append(cause[0])
    return "; ".join(lines)


def missing_values(cfg: DictConfig) -> list[str]:
    """Keys left ``???`` in a composed recipe (Hydra's own ``hydra`` node aside)."""
    out: list[str] = []

    def walk(node: Any, prefix: str) -> None:
        if not isinstance(node, DictConfig):
            return
        for key in _keys(node):
            path = f"{prefix}{key}"
            if path == "hydra":
                continue
            if OmegaConf.is_missing(node, key):
                out.append(path)
            elif not OmegaConf.is_interpolation(node, key):
                walk(node[key], path + ".")

    walk(cfg, "")
    return out


def check_missing(cfg: DictConfig, name: str, dirs: Sequence[Path]) -> None:
    """Refuse a recipe with unset values, saying what to pass (and, for the model, which
    recipes need none)."""
    missing = missing_values(cfg)
    if not missing:
        return
    if missing == ["model.path"]:
        ready = _recipes_with_a_model(dirs)
        others = f"; or run a recipe that brings its own model: {', '.join(ready)}" if ready else ""
        raise GptqflowError(
            f"recipe {name!r} has no model: model.path is not set. Pass model.path=DIR (a local "
            f"transformers model directory), e.g. gptqflow run --config-name {name} "
            f"model.path=/path/to/model{others} (gptqflow run alone runs {RUN_RECIPE})"
        )
    raise GptqflowError(
        f"recipe {name!r} leaves {', '.join(missing)} unset (???); pass "
        + " ".join(f"{k}=VALUE" for k in missing)
    )


def _recipes_with_a_model(dirs: Sequence[Path]) -> list[str]:
    """The recipes whose ``model.path`` is set (they run without ``model.path=``)."""
    out = []
    for recipe in recipe_names(dirs):
        try:
            cfg = compose_config(recipe, dirs, [])
        except GptqflowError:
            continue
        model = _node(cfg, ["model"])
        has_path = isinstance(model, DictConfig) and "path" in _keys(model)
        if has_path and not OmegaConf.is_missing(model, "path"):
            out.append(recipe)
    return sorted(out, key=lambda r: (r != RUN_RECIPE, r))


def compose_recipe(
    config_name: str = DEFAULT_RECIPE,
    overrides: list[str] | None = None,
    config_dir: str | os.PathLike[str] | None = None,
) -> dict[str, Any]:
    """Compose ``config_name`` from ``config_dir`` (then the built-in recipes), resolved.

    Without an ``output_dir=`` override the run goes to ``outputs/<name>/<timestamp>``
    (Hydra's run directory is only known under ``gptqflow run``). The overrides are
    checked first (:func:`checked_overrides`), and unset values refused (:func:`check_missing`).
    """
    dirs = search_dirs(config_dir)
    check_recipe_name(config_name, dirs)
    overrides = checked_overrides(config_name, dirs, list(overrides or []))
    if not any(o.split("=", 1)[0].lstrip("+~") == "output_dir" for o in overrides):
        overrides.append(f"output_dir=outputs/{config_name}/${{now:%Y-%m-%d_%H-%M-%S}}")
    cfg = compose_config(config_name, dirs, overrides)
    check_missing(cfg, config_name, dirs)
    return to_plain(cfg)
