"""JSON Schema of recipe files, generated from the pydantic models the runner validates with.

Recipe files are inputs to Hydra, not finished recipes: they carry a ``defaults:``
list, values may be interpolations (``${scheme.bits}``), and a file may set only
part of a group (``scheme: {group_size: 64}``). The editor schema therefore keeps
every key, type, enum, range and description of the real models, but makes fields
optional and also accepts an interpolation string wherever a value goes. Unknown
keys stay errors, so a typo is underlined in the editor.
"""

from __future__ import annotations

import copy
import json
from typing import Any

from pydantic import BaseModel, create_model

from gptqflow.framework.schema import (
    DatasetGroup,
    ModelGroup,
    Recipe,
    RuntimeGroup,
    SchemeGroup,
    stage_union,
)

INTERPOLATION = {
    "type": "string",
    "pattern": r"^.*\$\{.+\}.*$",
    "description": "an interpolation, e.g. ${scheme.bits}",
}
GROUPS: dict[str, type[BaseModel]] = {
    "model": ModelGroup,
    "dataset": DatasetGroup,
    "scheme": SchemeGroup,
    "runtime": RuntimeGroup,
}


def _relax(node: Any, *, keep_required: frozenset[str] = frozenset({"stage"})) -> Any:
    """Allow interpolations for every leaf value and drop ``required`` (except ``stage``)."""
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


def recipe_schema() -> dict[str, Any]:
    """The schema of a recipe file (top-level recipes and fully resolved ``recipe.yaml``)."""
    stages: Any = list[stage_union()]  # type: ignore[misc]
    model = create_model("RecipeFile", __base__=Recipe, stages=(stages, ...))
    schema = _relax(model.model_json_schema())
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
