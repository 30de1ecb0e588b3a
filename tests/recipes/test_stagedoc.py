"""Every recipe key is described (with its unit), and docs/stages.md is the generated reference."""

from __future__ import annotations

import re
import typing
from pathlib import Path
from typing import Literal

import pytest
from pydantic import BaseModel, Field

from gptqflow.cli import main
from gptqflow.framework import stagedoc
from gptqflow.framework.compose import DEFAULT_RECIPE, compose_recipe, project_root
from gptqflow.framework.registry import registered
from gptqflow.framework.schema import GROUPS, Recipe
from gptqflow.framework.stagedoc import (
    REGENERATE,
    contract,
    field_docs,
    render_markdown,
    render_text,
    stages_in_order,
    type_name,
)

STAGES_MD = project_root() / "docs" / "stages.md"


def _is_quantity(annotation: object) -> bool:
    """int / float / a Literal of numbers, possibly optional: a value that can have a unit."""
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if typing.get_origin(annotation) is Literal:
        return all(isinstance(a, (int, float)) and not isinstance(a, bool) for a in args)
    if args and typing.get_origin(annotation) is not list:
        return all(_is_quantity(a) for a in args)
    return annotation in (int, float)


def undocumented(model: type[BaseModel]) -> list[str]:
    """Fields without a one-line description, and numbers that do not declare a unit."""
    out = []
    for name, info in model.model_fields.items():
        nested = isinstance(info.annotation, type) and issubclass(info.annotation, BaseModel)
        if name == "stage" or nested:
            continue  # the discriminator; nested groups are checked on their own
        desc = info.description or ""
        if not desc.strip() or "\n" in desc:
            out.append(f"{model.__name__}.{name}: needs a one-line description")
        extra = info.json_schema_extra
        if _is_quantity(info.annotation) and not (isinstance(extra, dict) and "unit" in extra):
            out.append(
                f"{model.__name__}.{name}: a number needs json_schema_extra={{'unit': ...}} "
                "(None for a plain number such as a seed)"
            )
    return out


def _models() -> list[type[BaseModel]]:
    return [spec.config_cls for spec in registered().values()] + [*GROUPS.values(), Recipe]


@pytest.mark.parametrize("model", _models(), ids=lambda m: m.__name__)
def test_every_field_has_a_description_and_every_number_a_unit(model: type[BaseModel]) -> None:
    assert undocumented(model) == []


def test_the_check_catches_a_missing_description_or_unit() -> None:
    class Bad(BaseModel):
        a: int = 1
        b: float | None = Field(None, description="two\nlines", json_schema_extra={"unit": "s"})
        c: Literal[2, 4] = Field(2, description="bits")
        d: bool = Field(True, description="a flag, no unit")
        e: int = Field(0, description="seed", json_schema_extra={"unit": None})

    assert undocumented(Bad) == [
        "Bad.a: needs a one-line description",
        "Bad.a: a number needs json_schema_extra={'unit': ...} (None for a plain number such as a seed)",
        "Bad.b: needs a one-line description",
        "Bad.c: a number needs json_schema_extra={'unit': ...} (None for a plain number such as a seed)",
    ]


def test_committed_stages_md_is_the_generated_reference() -> None:
    assert STAGES_MD.read_text() == render_markdown(), (
        f"docs/stages.md is out of date; regenerate with: {REGENERATE}"
    )


def test_reference_lists_every_stage_and_key_with_default_and_unit() -> None:
    md = render_markdown()
    text = render_text()
    for spec in registered().values():
        assert f"### `{spec.name}`" in md
        assert text.count(f"\n{spec.name}  (runs ") + text.startswith(f"{spec.name}  (") == 1
        for f in field_docs(spec.config_cls):
            assert f"| `{f.name}` |" in md, (spec.name, f.name)
    assert "| `dataset.seq_len` | int | `512` | tokens | Tokens per calibration sequence (" in md
    assert "| `dataset.path` | str \\| null | `null` |  |" in md
    assert "| `scheme.group_size` | -1 \\| 32 \\| 64 \\| 128 \\| 256 | `128` | columns |" in md
    assert '    targets: list of str = ["re:.*"]  Weights inside the decoder layers' in text
    assert "    timeout_s: float = 600.0 [seconds]  " in text
    assert "    dampening: float = 0.01 [fraction of mean diagonal]  " in text
    assert '| `subdir` | str | `"checkpoint"` |' in md
    assert "\n    id: " not in text and "| `id` |" not in md  # the key itself, not a setting


def test_reference_shows_what_each_stage_requires_and_provides() -> None:
    md = render_markdown()
    text = render_text()
    for spec in registered().values():
        c = contract(spec)
        assert c.requires == tuple(sorted(spec.config_cls(stage=spec.name).requires()))
        assert c.provides == tuple(sorted(spec.config_cls(stage=spec.name).provides()))
        requires = ", ".join(f"`{n}`" for n in c.requires) or "nothing"
        provides = ", ".join(f"`{n}`" for n in c.provides) or "nothing"
        section = md.split(f"### `{spec.name}`", 1)[1].split("\n### ", 1)[0]
        assert f"Requires: {requires}. Provides: {provides}." in section, spec.name
        assert f"Requires: {requires}. Provides: {provides}.".replace("`", "") in text
    assert "Requires: `group.hessian`. Provides: `group.reduced_hessian`." in md
    assert "Requires: nothing. Provides: `model`, `tokenizer`." in md
    # solve's requirement depends on its method: the reference says so.
    solve = md.split("### `solve`", 1)[1].split("\n### ", 1)[0]
    assert "Requires: `group.reduced_hessian`." in solve and "settings change" in solve


def test_stages_follow_the_default_recipe_then_the_others_by_name() -> None:
    raw = compose_recipe(DEFAULT_RECIPE, ["model.path=/m", "output_dir=/o"])["stages"]
    pipeline: list[str] = []
    for key, entry in raw.items():
        name = (entry or {}).get("stage", key)
        if entry is not None and name not in pipeline:
            pipeline.append(name)
    names = [s.name for s in stages_in_order()]
    assert names[: len(pipeline)] == pipeline
    assert names[len(pipeline) :] == sorted(set(registered()) - set(pipeline))
    assert names[:3] == ["load", "partition", "evaluate"]


def test_stage_order_without_recipes_is_by_name(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("GPTQFLOW_RECIPES", str(tmp_path / "nowhere"))
    assert [s.name for s in stages_in_order()] == sorted(registered())


def test_the_reference_generator_names_no_stage() -> None:
    """Stages are plugins: the generator knows them only through the registry."""
    source = Path(stagedoc.__file__).read_text()
    for name in registered():
        assert f'"{name}"' not in source and f"'{name}'" not in source, name


def test_markdown_escapes_what_would_break_a_table() -> None:
    md = render_markdown()
    rows = [line for line in md.splitlines() if line.startswith("| `")]
    # Five cells: exactly six unescaped pipes per row, whatever the types and descriptions hold.
    assert rows and all(len(re.findall(r"(?<!\\)\|", line)) == 6 for line in rows), rows
    assert "re:&lt;regex&gt;" in md  # not swallowed as an HTML tag


def test_type_names() -> None:
    assert type_name(int | None) == "int | null"
    assert type_name(Literal["a", "b"]) == '"a" | "b"'
    assert type_name(list[str]) == "list of str"


def test_stages_command_formats(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["stages", "--format", "markdown"]) == 0
    assert capsys.readouterr().out == render_markdown()
    assert main(["stages"]) == 0
    assert capsys.readouterr().out == render_text()
