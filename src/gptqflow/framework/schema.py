"""The recipe schema: config groups, the stage list as one discriminated union, order rules.

This is the one validation boundary. Hydra composes and resolves a recipe; then
:func:`validate_recipe` turns the plain dict into a frozen :class:`Recipe` or raises
:class:`RecipeError` listing every problem with its key path, the bad value and what
is allowed. After that only typed, frozen objects flow.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError

from gptqflow.framework.errors import GptqflowError
from gptqflow.framework.registry import StageConfig, registered

Bits = Literal[2, 3, 4, 8]
GroupSize = Literal[-1, 32, 64, 128, 256]
ActOrderName = Literal["none", "static", "group"]
DType = Literal["auto", "float32", "bfloat16", "float16"]


class _Group(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelGroup(_Group):
    """``model.*``: which local transformers model to quantize."""

    path: str = Field(description="Local transformers model directory (never a hub id).")
    dtype: DType = Field("float32", description="Weights dtype while quantizing.")
    trust_remote_code: bool = Field(False, description="Allow the model dir's own Python code.")
    allow_pickle: bool = Field(
        False,
        description="Load pickle weights (*.bin, *.pt) when the dir has no safetensors "
        "(unpickling can run code).",
    )


class DatasetGroup(_Group):
    """``dataset.*``: calibration and evaluation text and sizes."""

    calibration_file: str = Field(description="Plain-text calibration file.")
    eval_file: str = Field(description="Plain-text evaluation file (perplexity).")
    num_samples: int = Field(
        128, ge=1, description="Calibration sequences.", json_schema_extra={"unit": "sequences"}
    )
    seq_len: int = Field(
        512,
        ge=8,
        description="Tokens per calibration sequence / eval window.",
        json_schema_extra={"unit": "tokens"},
    )
    eval_tokens: int = Field(
        40960,
        ge=0,
        description="Eval tokens (first T of the file); 0 skips evaluation.",
        json_schema_extra={"unit": "tokens"},
    )
    seed: int = Field(
        0,
        description="Seed of the calibration window selection.",
        json_schema_extra={"unit": None},
    )


class SchemeGroup(_Group):
    """``scheme.*``: the weight quantization scheme."""

    name: str = Field(description="Scheme name written to the report (e.g. w4a16).")
    bits: Bits = Field(4, description="Bits per weight.", json_schema_extra={"unit": "bits"})
    group_size: GroupSize = Field(
        128,
        description="Input columns per scale; -1 = one per output channel.",
        json_schema_extra={"unit": "columns"},
    )
    symmetric: bool = Field(True, description="Symmetric grid (zero point 0) or asymmetric.")
    actorder: ActOrderName = Field(
        "static", description="Activation order: none | static | group (g_idx)."
    )
    observer: Literal["minmax", "mse"] = Field(
        "mse", description="Group range: min-max, or the range with the least error (mse)."
    )
    on_failure: Literal["error", "rtn"] = Field(
        "error",
        description="A Hessian that stays non positive-definite after the dampening retries: "
        "error, or round-to-nearest for that module (recorded in report.json).",
    )


class RuntimeGroup(_Group):
    """``runtime.*``: how and where the pipeline runs."""

    nproc_per_node: int = Field(
        1,
        ge=1,
        description="Ranks on this machine (1 = one process).",
        json_schema_extra={"unit": "ranks"},
    )
    backend: Literal["auto", "gloo", "nccl"] = Field(
        "auto", description="auto: nccl on CUDA, gloo on CPU."
    )
    device: Literal["auto", "cpu", "cuda"] = Field(
        "auto", description="Execution device for each layer."
    )
    num_threads: int | None = Field(
        None,
        ge=1,
        description="torch threads per rank (null: torch default).",
        json_schema_extra={"unit": "threads"},
    )
    cpu_affinity: Literal["auto", "none"] = Field(
        "auto",
        description="auto: on the CPU, with several ranks on this machine that fit the cores "
        "this process may use, bind each local rank to cores of its own (rank r: cores "
        "r*T..r*T+T-1 of them, T = num_threads, or cores / ranks); none: leave placement to "
        "the OS (a machine shared with other jobs).",
    )
    progress: bool = Field(
        True,
        description="Layer progress bar on rank 0 when stderr is a terminal (layers done, "
        "seconds per layer, tokens per second).",
    )
    timeout_s: float = Field(
        600.0,
        gt=0,
        description="Timeout of every collective.",
        json_schema_extra={"unit": "seconds"},
    )
    checkpoint_every: int | None = Field(
        None,
        ge=0,
        description="Write a resume point to output_dir/resume/ after every K decoder layers; "
        "0 = never; null = auto (every ceil(layers/8) layers when the model has more than 4).",
        json_schema_extra={"unit": "layers"},
    )
    resume: bool = Field(
        False,
        description="Continue an interrupted run from its last resume point in output_dir "
        "(same recipe and world size).",
    )


class Recipe(_Group):
    """A fully composed recipe: config groups, run settings and the stage list."""

    output_dir: str = Field(description="Run directory: checkpoint, recipe.yaml, report.json.")
    overwrite: bool = Field(False, description="Replace an existing checkpoint in output_dir.")
    seed: int = Field(0, description="Global seed.", json_schema_extra={"unit": None})
    model: ModelGroup
    dataset: DatasetGroup
    scheme: SchemeGroup
    runtime: RuntimeGroup = RuntimeGroup()
    stages: list[Any] = Field(description="The pipeline, in order.")

    def stage_ids(self) -> list[str]:
        """Report keys: the stage's ``id`` or its name (``name#2``, ``name#3`` when repeated)."""
        seen: dict[str, int] = {}
        out = []
        for s in self.stages:
            base = s.id or s.stage
            seen[base] = seen.get(base, 0) + 1
            out.append(base if seen[base] == 1 else f"{base}#{seen[base]}")
        return out


@dataclass(frozen=True)
class Problem:
    """One recipe problem: where (key path), what was found, what is allowed.

    ``line``/``column`` (1-based) locate the key in ``file`` when lint could find it
    there; printed as ``file:line:col:``, the form editors and CI annotations jump to.
    """

    path: str
    message: str
    file: str | None = None
    line: int | None = None
    column: int | None = None

    def __str__(self) -> str:
        if self.file and self.line is not None:
            where = f"{self.file}:{self.line}:{self.column}: "
        else:
            where = f"{self.file}: " if self.file else ""
        return f"{where}{self.path}: {self.message}"


class RecipeError(GptqflowError):
    """A recipe failed validation; ``problems`` lists every problem found."""

    def __init__(self, problems: list[Problem]) -> None:
        self.problems = problems
        lines = "\n".join(f"  - {p}" for p in problems)
        super().__init__(f"invalid recipe ({len(problems)} problem(s)):\n{lines}")


def stage_union() -> Any:
    """The discriminated union of every registered stage config (discriminator: ``stage``)."""
    configs = tuple(spec.config_cls for spec in registered().values())
    return Annotated[Union[configs], Field(discriminator="stage")]  # noqa: UP007


def _loc_to_path(loc: Iterable[Any]) -> str:
    """('model', 'path') -> 'model.path'; (3, 'bits') -> '[3].bits'."""
    out = ""
    for p in loc:
        out += f"[{p}]" if isinstance(p, int) else ("." if out else "") + str(p)
    return out


def _did_you_mean(word: object, candidates: Iterable[str]) -> str:
    """`` (did you mean 'bits'?)`` for a near miss, else an empty string."""
    close = difflib.get_close_matches(str(word), list(candidates), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _describe_error(err: Mapping[str, Any], fields: Iterable[str] = ()) -> str:
    """One problem in words; ``fields`` are the keys allowed where an unknown key was found."""
    kind = err.get("type", "")
    given = err.get("input")
    ctx = err.get("ctx") or {}
    if kind == "extra_forbidden":
        key = err["loc"][-1] if err.get("loc") else ""
        hint = _did_you_mean(key, fields) or "; remove it or fix its spelling"
        return f"unknown key (value {given!r}){hint}"
    if kind == "missing":
        return "required key is missing"
    if kind == "union_tag_invalid":
        allowed = ", ".join(sorted(registered()))
        tag = ctx.get("tag")
        return (
            f"unknown stage {tag!r}{_did_you_mean(tag, registered())}; registered stages: {allowed}"
        )
    if kind == "union_tag_not_found":
        return "stage entry has no 'stage:' key naming its stage"
    if kind in ("literal_error", "enum"):
        return f"value {given!r} is not allowed; allowed: {ctx.get('expected')}"
    return f"value {given!r}: {err.get('msg')}"


def _fields_at(loc: tuple[Any, ...], model: type[BaseModel] | None) -> list[str]:
    """The keys allowed in the mapping that holds ``loc[-1]`` (for "did you mean")."""
    if loc and isinstance(loc[0], str) and loc[0] in registered():
        return list(registered()[loc[0]].config_cls.model_fields)
    if model is None:
        return []
    node: Any = model
    for part in loc[:-1]:
        field = node.model_fields.get(part) if isinstance(part, str) else None
        ann = getattr(field, "annotation", None)
        if not (isinstance(ann, type) and issubclass(ann, BaseModel)):
            return []
        node = ann
    return list(node.model_fields)


def problems_from_validation(
    exc: ValidationError, prefix: str = "", model: type[BaseModel] | None = None
) -> list[Problem]:
    """Pydantic errors as Problems; a stage entry's tag is folded into its path."""
    out = []
    for err in exc.errors():
        loc = tuple(err["loc"])
        pre = prefix
        if pre.startswith("stages[") and loc and isinstance(loc[0], str) and loc[0] in registered():
            pre, loc = f"{pre}({loc[0]})", loc[1:]
        path = _loc_to_path(loc)
        full = f"{pre}.{path}" if pre and path else (pre or path or "<root>")
        out.append(Problem(full, _describe_error(err, _fields_at(err["loc"], model))))
    return out


_ORDER_NEEDS = {
    # stage: stages that must appear before it
    "partition": ("load",),
    "calibrate": ("load", "partition"),
    "hessian-reduce": ("calibrate",),
    "solve": ("calibrate", "hessian-reduce"),
    "broadcast": ("solve",),
    "save": ("solve", "broadcast"),
    "evaluate": ("load",),
}
LAYER_LOOP = ("calibrate", "hessian-reduce", "solve", "broadcast")


def order_problems(names: list[str]) -> list[Problem]:
    """Pipelines that cannot run: missing prerequisites, duplicates, a broken layer loop."""
    probs: list[Problem] = []
    for i, name in enumerate(names):
        for need in _ORDER_NEEDS.get(name, ()):
            if need not in names[:i]:
                where = "after" if need in names[i:] else "without"
                probs.append(
                    Problem(
                        f"stages[{i}]({name})",
                        f"'{name}' cannot run {where} '{need}': '{need}' must come before it",
                    )
                )
    for unique in ("load", "partition", "save", *LAYER_LOOP):
        idx = [i for i, n in enumerate(names) if n == unique]
        if len(idx) > 1:
            probs.append(
                Problem(
                    f"stages[{idx[1]}]({unique})",
                    f"'{unique}' appears {len(idx)} times (at {idx}); it may appear once",
                )
            )
    if names and names[0] != "load":
        probs.append(Problem("stages[0]", f"the pipeline must start with 'load', not {names[0]!r}"))
    loop = [i for i, n in enumerate(names) if n in LAYER_LOOP]
    if loop and not probs:
        got = [names[i] for i in loop]
        if got != list(LAYER_LOOP[: len(got)]) or loop != list(range(loop[0], loop[0] + len(loop))):
            probs.append(
                Problem(
                    f"stages[{loop[0]}]",
                    f"the per-layer stages must appear together in the order {list(LAYER_LOOP)}; got {got}",
                )
            )
        elif got != list(LAYER_LOOP):
            missing = [n for n in LAYER_LOOP if n not in got]
            probs.append(
                Problem(
                    f"stages[{loop[-1]}]({got[-1]})",
                    f"the per-layer loop is incomplete: missing {missing}",
                )
            )
    return probs


def validate_recipe(raw: Mapping[str, Any], *, file: str | None = None) -> Recipe:
    """Validate a composed, resolved recipe dict; raise RecipeError listing every problem."""
    raw = dict(raw)
    problems: list[Problem] = []
    try:
        recipe = Recipe.model_validate(raw)
    except ValidationError as exc:
        problems += [
            p
            for p in problems_from_validation(exc, model=Recipe)
            if not p.path.startswith("stages[")
        ]
        recipe = None
    stages_raw = raw.get("stages")
    parsed: list[StageConfig] = []
    if isinstance(stages_raw, list):
        adapter: TypeAdapter[Any] = TypeAdapter(stage_union())
        for i, entry in enumerate(stages_raw):
            try:
                parsed.append(adapter.validate_python(entry))
            except ValidationError as exc:
                problems += problems_from_validation(exc, prefix=f"stages[{i}]")
        names = [e.get("stage") if isinstance(e, dict) else None for e in stages_raw]
        if all(isinstance(n, str) and n in registered() for n in names):
            problems += order_problems([str(n) for n in names])
    elif stages_raw is not None:
        problems.append(
            Problem("stages", f"must be a list of stage entries, got {type(stages_raw).__name__}")
        )
    if problems or recipe is None:
        raise RecipeError([Problem(p.path, p.message, file) for p in problems])
    return recipe.model_copy(update={"stages": parsed})
