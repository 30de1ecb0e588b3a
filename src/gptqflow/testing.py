"""The conformance checks every stage passes, built-in or plugin: ``stage_problems(spec)``.

A plugin's own tests call it on their stage (``registered()["my-stage"]``); gptqflow's
tests call it on every registered stage. Checked, without running anything heavy:

* the config forbids unknown keys (a typo is an error, not a silently ignored key);
* every field has a description, and every numeric field declares its unit
  (``json_schema_extra={"unit": ...}``, ``None`` for plain numbers such as seeds);
* the class has a docstring, and the stage's module docstring shows a YAML example of its
  ``stages:`` entry that validates;
* a config survives a YAML round trip (dump, load, validate: equal);
* requires/provides are names (``layer.``/``group.`` prefixes for per-layer state), and a
  stage whose state is per layer or per group implements a layer hook.

Whether a stage gives the same result at world size 1 and 2 needs a pipeline around it:
run a recipe with it at ``runtime.nproc_per_node=1`` and ``2`` and compare checkpoints
(tests/plugins/test_plugin_stage.py does this for the example plugin).
"""

from __future__ import annotations

import re
import sys
from typing import Any

import yaml
from pydantic import TypeAdapter, ValidationError

from gptqflow.framework.registry import StageSpec, registered

_YAML = re.compile(r"```yaml\n(.*?)```", re.S)
_NAME = re.compile(r"^[a-z][a-z0-9_.-]*$")


def _validate(spec: StageSpec, key: str, entry: dict[str, Any]) -> Any:
    data = {"stage": key, **entry, "id": key}
    data.pop("after", None)
    return TypeAdapter(spec.config_cls).validate_python(data)


def _field_problems(spec: StageSpec) -> list[str]:
    out = []
    for name, info in spec.config_cls.model_fields.items():
        if name in ("stage", "id"):
            continue
        if not info.description:
            out.append(f"field {name!r} has no description")
        extra = info.json_schema_extra
        numeric = info.annotation in (int, float) or str(info.annotation) in ("int", "float")
        if numeric and not (isinstance(extra, dict) and "unit" in extra):
            out.append(f"numeric field {name!r} declares no unit (json_schema_extra)")
    return out


def _example_problems(spec: StageSpec) -> list[str]:
    doc = sys.modules[spec.config_cls.__module__].__doc__ or ""
    blocks = _YAML.findall(doc)
    if not blocks:
        return ["its module docstring has no ```yaml example"]
    out = []
    for block in blocks:
        stages = (yaml.safe_load(block) or {}).get("stages") or {}
        for key, entry in stages.items():
            entry = dict(entry or {})
            if entry.get("stage", key) != spec.name:
                continue
            try:
                _validate(spec, key, entry)
            except ValidationError as exc:
                out.append(f"the docstring example stages.{key} does not validate: {exc}")
            break
        else:
            out.append(f"the docstring example has no stages entry for {spec.name!r}")
    return out


def stage_problems(spec: StageSpec) -> list[str]:
    """Everything about a registered stage that breaks the stage contract (empty: conforms)."""
    cls = spec.config_cls
    out = []
    if cls.model_config.get("extra") != "forbid":
        out.append('its config does not forbid unknown keys (model_config extra="forbid")')
    if not cls.__doc__:
        out.append("its config class has no docstring")
    out += _field_problems(spec)
    out += _example_problems(spec)
    try:
        default = _validate(spec, spec.name, {})
    except ValidationError:
        default = None  # required fields: the docstring example stands in for it
    if default is not None:
        dumped = yaml.safe_dump(default.model_dump(mode="json", exclude={"id"}))
        if _validate(spec, spec.name, yaml.safe_load(dumped)) != default:
            out.append("a config does not survive a YAML round trip")
        try:
            _validate(spec, spec.name, {"no_such_key_": 1})
            out.append("an unknown key is accepted")
        except ValidationError:
            pass
        names = default.requires() | default.provides()
        out += [
            f"state name {n!r} is not a lower-case name"
            for n in sorted(names)
            if not _NAME.match(n)
        ]
        scoped = any(n.startswith(("layer.", "group.")) for n in names)
        if scoped and not spec.per_layer:
            out.append("it declares per-layer state but implements no layer hook")
    return [f"stage {spec.name!r}: {p}" for p in out]


def all_stage_problems() -> list[str]:
    """:func:`stage_problems` of every registered stage (built-in and installed plugins)."""
    return [p for spec in registered().values() for p in stage_problems(spec)]


if __name__ == "__main__":  # python -m gptqflow.testing: check every installed stage
    problems = all_stage_problems()
    print("\n".join(problems) or f"ok: {len(registered())} stage(s) conform")
    sys.exit(1 if problems else 0)
