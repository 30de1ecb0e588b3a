"""The reference of every recipe key, generated from the pydantic models (``gptqflow stages``).

The stage registry and the config-group models are the only source: the text output,
the Markdown output and the committed ``docs/stages.md`` (checked by a test) are all
rendered here, so a new field, default or description shows up everywhere at once.
A field's unit lives next to it, in ``json_schema_extra={"unit": ...}`` (``None``
for a plain number such as a seed).
"""

from __future__ import annotations

import json
import re
import sys
import types
import typing
from dataclasses import dataclass
from typing import Any, Literal

from omegaconf import OmegaConf
from pydantic import BaseModel, ValidationError
from pydantic.fields import FieldInfo

from gptqflow.framework.compose import DEFAULT_RECIPE, recipes_dir
from gptqflow.framework.registry import StageSpec, registered
from gptqflow.framework.schema import GROUPS, Recipe, stage_entries
from gptqflow.framework.stage import StageConfig

REGENERATE = "gptqflow stages --format markdown > docs/stages.md"
# Not keys of a stage's own: ``stage`` names the section (and defaults to the entry's key),
# ``id`` is the entry's key itself, filled in by validation.
_HIDDEN = ("stage", "id")
_YAML_EXAMPLE = re.compile(r"```yaml\n(.*?)```", re.S)


@dataclass(frozen=True)
class FieldDoc:
    """One key of a stage or config group, as documented."""

    name: str
    type: str
    default: str  # "required" or the YAML spelling of the default
    unit: str | None
    description: str


def type_name(annotation: Any) -> str:
    """A field's type as a recipe author reads it: ``int``, ``4 | 8``, ``list of str``, ``null``."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin is Literal:
        return " | ".join(json.dumps(a) for a in args)
    if origin in (typing.Union, types.UnionType):
        return " | ".join(type_name(a) for a in args)
    if origin is list:
        return f"list of {type_name(args[0])}" if args else "list"
    if annotation is type(None):
        return "null"
    return getattr(annotation, "__name__", str(annotation))


def field_unit(info: FieldInfo) -> str | None:
    extra = info.json_schema_extra
    unit = extra.get("unit") if isinstance(extra, dict) else None
    return str(unit) if unit is not None else None


def field_docs(model: type[BaseModel], skip: tuple[str, ...] = ()) -> list[FieldDoc]:
    """The documented fields of a stage config or config-group model, in declaration order."""
    out = []
    # The base class's ``id`` comes first in pydantic's order; list it after the stage's own.
    items = sorted(model.model_fields.items(), key=lambda kv: kv[0] == "id")
    for name, info in items:
        if name in _HIDDEN or name in skip:
            continue
        default = (
            "required"
            if info.is_required()
            else json.dumps(info.get_default(call_default_factory=True))
        )
        out.append(
            FieldDoc(
                name,
                type_name(info.annotation),
                default,
                field_unit(info),
                info.description or "",
            )
        )
    return out


def _summary(cls: type) -> str:
    """The first paragraph of a class docstring, on one line, with Markdown backticks."""
    doc = (cls.__doc__ or "").strip().split("\n\n")[0]
    return " ".join(doc.split()).replace("``", "`")


def _phase(spec: StageSpec) -> str:
    return "per layer" if spec.per_layer else "once"


@dataclass(frozen=True)
class Contract:
    """What a stage requires and provides with its default settings (sorted names)."""

    requires: tuple[str, ...]
    provides: tuple[str, ...]
    depends: bool  # the config overrides requires()/provides(): its settings change them


def contract(spec: StageSpec) -> Contract:
    """The stage's declared data flow, from its config (defaults; class declarations if a
    field has no default)."""
    cls = spec.config_cls
    depends = cls.requires is not StageConfig.requires or cls.provides is not StageConfig.provides
    try:
        cfg = cls(stage=spec.name)
    except ValidationError:
        return Contract(tuple(sorted(cls.REQUIRES)), tuple(sorted(cls.PROVIDES)), depends)
    return Contract(tuple(sorted(cfg.requires())), tuple(sorted(cfg.provides())), depends)


def _names(names: tuple[str, ...], code: str = "") -> str:
    return ", ".join(f"{code}{n}{code}" for n in names) if names else "nothing"


def _contract_line(spec: StageSpec, code: str = "") -> str:
    c = contract(spec)
    line = f"Requires: {_names(c.requires, code)}. Provides: {_names(c.provides, code)}."
    if c.depends:
        line += " (With the default settings; its settings change what it requires or provides.)"
    return line


def _default_pipeline() -> list[str]:
    """The stages of the default recipe, in pipeline order (empty when it does not compose).

    Composed without resolving anything (``model.path`` may still be ``???``); entries
    are read the way validation reads them (``null`` removed, ``after:`` placed, the
    stage named by ``stage:`` or else by the key).
    """
    from hydra import compose, initialize_config_dir

    try:
        with initialize_config_dir(config_dir=str(recipes_dir().resolve()), version_base="1.3"):
            cfg = compose(config_name=DEFAULT_RECIPE)
        raw = OmegaConf.to_container(cfg.get("stages"), resolve=False)
    except Exception:  # no recipes directory, a broken default recipe: order by name only
        return []
    entries, _ = stage_entries(raw)
    return [str(entry["stage"]) for _, entry in entries]


def stages_in_order() -> list[StageSpec]:
    """Every registered stage: those of the default recipe in its pipeline order, then the
    others by name."""
    specs = registered()
    rank: dict[str, int] = {}
    for name in _default_pipeline():
        rank.setdefault(name, len(rank))
    return [specs[n] for n in sorted(specs, key=lambda n: (rank.get(n, len(rank)), n))]


def _module_doc(spec: StageSpec) -> tuple[str, str]:
    """The stage module's paragraph on its data flow (``Requires: ...``) and its YAML
    example (either may be "")."""
    doc = sys.modules[spec.config_cls.__module__].__doc__ or ""
    paragraphs = doc.split("\n\n")[1:]
    flow = next((p for p in paragraphs if "Requires:" in p or "Provides:" in p), "")
    example = _YAML_EXAMPLE.search(doc)
    return (
        " ".join(flow.split()).replace("``", "`"),
        example.group(1).rstrip() if example else "",
    )


def _run_settings() -> list[FieldDoc]:
    return field_docs(Recipe, skip=(*GROUPS, "stages"))


def render_text() -> str:
    """Plain text for a terminal: stage by stage, then the config groups."""
    lines = [
        "stages (a recipe's stages map an id to a stage's settings; stage: defaults to the id, "
        "null removes an entry):"
    ]
    for spec in stages_in_order():
        summary = _summary(spec.config_cls).replace("`", "")
        lines.append(f"{spec.name}  (runs {_phase(spec)}): {summary}")
        lines.append(f"    {_contract_line(spec)}")
        lines += _text_fields(field_docs(spec.config_cls))
    lines.append("")
    lines.append(
        "config groups (choose an option with group=NAME, set a key with group.key=VALUE):"
    )
    for group, model in GROUPS.items():
        lines.append(f"{group}: {_summary(model).replace('`', '')}")
        lines += _text_fields(field_docs(model))
    lines.append("run settings:")
    lines += _text_fields(_run_settings())
    return "\n".join(lines) + "\n"


def _text_fields(fields: list[FieldDoc]) -> list[str]:
    out = []
    for f in fields:
        unit = f" [{f.unit}]" if f.unit else ""
        out.append(f"    {f.name}: {f.type} = {f.default}{unit}  {f.description}")
    return out


def _cell(text: str) -> str:
    """Table-cell text: a pipe would end the cell; <...> would be read as HTML, *...* as emphasis."""
    for raw, escaped in (("|", "\\|"), ("<", "&lt;"), (">", "&gt;"), ("*", "\\*")):
        text = text.replace(raw, escaped)
    return text


def _code_cell(text: str) -> str:
    """A code span in a table cell: only the pipe needs escaping (GFM unescapes it there)."""
    return text.replace("|", "\\|")


def _md_table(fields: list[FieldDoc], prefix: str = "") -> list[str]:
    out = ["| key | type | default | unit | description |", "| --- | --- | --- | --- | --- |"]
    for f in fields:
        out.append(
            f"| `{prefix}{f.name}` | {_cell(f.type)} | `{_code_cell(f.default)}` "
            f"| {f.unit or ''} | {_cell(f.description)} |"
        )
    return out


def render_markdown() -> str:
    """``docs/stages.md``: every stage and config-group key with type, default, unit, description."""
    out = [
        "# Stage and config reference",
        "",
        f"<!-- Generated by `{REGENERATE}`; do not edit by hand. -->",
        "",
        "Every key a recipe can set, generated from the pydantic models the runner validates",
        "with. How stages and groups fit together: [the recipe guide](recipes.md).",
        "",
        "## Stages",
        "",
        "A recipe's `stages` maps an id (the key report.json uses) to a stage's settings, in",
        "pipeline order: `stage:` names the registered stage and defaults to the id, so",
        "`solve: {dampening: 0.05}` runs `solve` and `baseline: {stage: evaluate}` runs",
        "`evaluate`; `null` removes an entry and `after: ID` places one behind another.",
        "The keys below are each stage's own; `gptqflow lint` checks that every stage's",
        "requirements are provided by an earlier one.",
        "",
    ]
    for spec in stages_in_order():
        flow, example = _module_doc(spec)
        out += [f"### `{spec.name}`", "", f"{_summary(spec.config_cls)} Runs {_phase(spec)}.", ""]
        out += [_contract_line(spec, "`"), ""]
        if flow:
            out += [flow, ""]
        fields = field_docs(spec.config_cls)
        out += [*_md_table(fields), ""] if fields else ["No keys of its own.", ""]
        if example:
            out += ["```yaml", example, "```", ""]
    out += [
        "## Config groups",
        "",
        "Pick an option with `group=NAME` (a file `recipes/<group>/NAME.yaml`), set one key",
        "with `group.key=VALUE`.",
        "",
    ]
    for group, model in GROUPS.items():
        out += [
            f"### `{group}`",
            "",
            _summary(model),
            "",
            *_md_table(field_docs(model), f"{group}."),
            "",
        ]
    out += ["## Run settings", "", *_md_table(_run_settings()), ""]
    return "\n".join(out)
