"""JSON Schema of recipe files, generated from the pydantic models the runner validates with.

Recipe files are inputs to Hydra, not finished recipes: they carry a ``defaults:``
list, values may be interpolations (``${scheme.bits}``), and a file may set only
part of a group (``scheme: {group_size: 64}``) or of a stage (``solve: {method: rtn}``).
The editor schema therefore keeps every key, type, enum, range and description of the
real models, but makes fields optional and also accepts an interpolation string
wherever a value goes. Unknown keys stay errors, so a typo is underlined in the editor.

``stages`` is a mapping from a stage id to the stage's settings or ``null`` (which
removes the entry). ``stage:`` defaults to the key: under the key of a registered stage
(``solve:``) an entry may omit it; under any other key (``baseline:``) it must name one.
``after: ID`` places an entry behind another.
"""

from __future__ import annotations

import copy
import json
from typing import Any

from pydantic import create_model

from gptqflow.framework.schema import GROUPS, Recipe, stage_union
from gptqflow.framework.stage import StageConfig

INTERPOLATION = {
    "type": "string",
    "pattern": r"^.*\$\{.+\}.*$",
    "description": "an interpolation, e.g. ${scheme.bits}",
}


AFTER = {
    "type": "string",
    "description": "Run this entry right behind the entry with this id (a derived recipe's "
    "new entries otherwise come after its parent's).",
}


def _relax(node: Any, *, keep_required: frozenset[str] = frozenset({"stage"})) -> Any:
    """Allow interpolations for every leaf value and drop ``required``; ``stage`` (a
    stage's name, never an interpolation) stays as it is."""
    if isinstance(node, list):
        return [_relax(n, keep_required=keep_required) for n in node]
    if not isinstance(node, dict):
        return node
    out = {k: _relax(v, keep_required=keep_required) for k, v in node.items()}
    if "required" in out:
        kept = [r for r in out["required"] if r in keep_required]
        if kept:
            out["required"] = kept
        else:
            del out["required"]
    props = out.get("properties")
    if isinstance(props, dict):
        out["properties"] = {
            name: (
                spec if name in keep_required else {"anyOf": [spec, INTERPOLATION], **_doc(spec)}
            )
            for name, spec in props.items()
        }
    return out


def _doc(spec: dict[str, Any]) -> dict[str, Any]:
    return {k: spec[k] for k in ("title", "description", "default") if k in spec}


def _stage_entries(generated: dict[str, Any], defs: dict[str, Any]) -> dict[str, Any]:
    """``stages``: each registered stage's key may omit ``stage:``, any other key names one.

    ``generated`` is pydantic's schema of ``dict[str, <stage union> | None]``; its
    discriminator mapping (stage name -> ``$defs`` reference) is the registry's view.
    Each stage's definition loses ``id`` (the key itself, never written), no longer
    requires ``stage`` and takes ``after:`` (placement, read before validation).
    """
    union = next(a for a in generated["additionalProperties"]["anyOf"] if "discriminator" in a)
    refs: dict[str, str] = union["discriminator"]["mapping"]
    stage_doc = StageConfig.model_fields["stage"].description
    for ref in refs.values():
        definition = defs[ref.rsplit("/", 1)[1]]
        definition["properties"].pop("id", None)
        definition["properties"]["stage"]["description"] = stage_doc
        definition["properties"]["after"] = AFTER
        required = [r for r in definition.get("required", []) if r != "stage"]
        if required:
            definition["required"] = required
        else:
            definition.pop("required", None)
    null = {"type": "null", "description": "removes the entry"}

    def named(ref: str) -> dict[str, Any]:
        return {"$ref": ref, "required": ["stage"]}

    return {
        "type": "object",
        "title": "Stages",
        "description": Recipe.model_fields["stages"].description,
        "properties": {
            name: {
                "anyOf": [
                    {"$ref": ref},
                    *(named(other) for n, other in refs.items() if n != name),
                    null,
                ]
            }
            for name, ref in refs.items()
        },
        "additionalProperties": {"anyOf": [*(named(ref) for ref in refs.values()), null]},
    }


def recipe_schema() -> dict[str, Any]:
    """The schema of a recipe file (top-level recipes and fully resolved ``recipe.yaml``)."""
    entry: Any = stage_union() | None
    stages: Any = dict[str, entry]  # type: ignore[valid-type]
    model = create_model("RecipeFile", __base__=Recipe, stages=(stages, ...))
    generated = model.model_json_schema()
    schema = _relax(generated)
    schema["properties"]["stages"] = _stage_entries(
        generated["properties"]["stages"], schema["$defs"]
    )
    schema["properties"]["defaults"] = {
        "type": "array",
        "description": "Hydra defaults list: config-group options and parent recipes.",
    }
    schema["properties"]["hydra"] = {"type": "object", "description": "Hydra's own settings."}
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = "gptqflow recipe"
    return schema


def group_schema(group: str) -> dict[str, Any]:
    """The schema of one config-group option file (e.g. ``recipes/scheme/w4a16.yaml``)."""
    schema = _relax(copy.deepcopy(GROUPS[group].model_json_schema()))
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = f"gptqflow {group} option"
    schema.setdefault("properties", {})["defaults"] = {"type": "array"}
    return schema


def dump(schema: dict[str, Any]) -> str:
    return json.dumps(schema, indent=2, sort_keys=True) + "\n"
