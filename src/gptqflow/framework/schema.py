"""The recipe schema: config groups, the ``stages`` mapping (one discriminated union), contracts.

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

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    TypeAdapter,
    ValidationError,
    field_validator,
    model_validator,
)

from gptqflow.errors import GptqflowError
from gptqflow.fileio import parse_size
from gptqflow.framework.contracts import check_order
from gptqflow.framework.registry import registered
from gptqflow.framework.stage import StageConfig
from gptqflow.gptq.types import QuantArgs

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
    weights: Literal["stream", "eager"] = Field(
        "stream",
        description="stream: build the model on the meta device and read each decoder "
        "layer's tensors from the safetensors files only while it is processed (memory: "
        "one layer plus embeddings); eager: read the whole model at load. A model whose "
        "files cannot be streamed (pickle weights, tensors renamed at load) is loaded "
        "eagerly, and the log and report.json say why.",
    )


class DatasetGroup(_Group):
    """``dataset.*``: calibration data (a plain-text file or a ``datasets`` source), eval text, sizes."""

    calibration_file: str | None = Field(
        None,
        description="Plain-text calibration file, tokenized as one stream and cut into seq_len "
        "windows (the text route); null when dataset.path is set.",
    )
    path: str | None = Field(
        None,
        description="Calibration data read with Hugging Face datasets, offline: a .json/.jsonl/"
        ".csv/.parquet/.arrow file, a save_to_disk directory or the name of a dataset in the "
        "local Hugging Face cache (never downloaded); null for the text route.",
    )
    split: str = Field("train", description="Split of dataset.path (a single file: train).")
    text_column: str = Field(
        "text", description="Column of dataset.path with text rows (used when no messages column)."
    )
    messages_column: str = Field(
        "messages",
        description="Column of dataset.path with conversations (lists of {role, content} turns), "
        "rendered with the tokenizer's chat template; preferred over the text column.",
    )
    packing: bool = Field(
        False,
        description="dataset.path: false = one row is one sample of its own length (at most "
        "seq_len tokens); true = rows joined with EOS and cut into seq_len windows.",
    )
    eval_file: str = Field(description="Plain-text evaluation file (perplexity).")
    num_samples: int = Field(
        64, ge=1, description="Calibration sequences.", json_schema_extra={"unit": "sequences"}
    )
    seq_len: int = Field(
        512,
        ge=8,
        description="Tokens per calibration sequence (rows of dataset.path without packing: the "
        "maximum, longer rows are truncated) / eval window.",
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
        description="Seed of the calibration window (text, packing) or row selection.",
        json_schema_extra={"unit": None},
    )

    @model_validator(mode="after")
    def _one_source(self) -> DatasetGroup:
        if self.calibration_file is not None and self.path is not None:
            raise ValueError(
                "set one calibration source: dataset.calibration_file (plain text) or "
                "dataset.path (a datasets source), not both; `dataset=local` selects the second"
            )
        return self


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
    observer: Literal["minmax", "mse", "hessian"] = Field(
        "mse",
        description="Group range: min-max, the range with the least weight error (mse), or "
        "the one with the least activation-weighted error (hessian: needs the group's "
        "Hessian, so calibration, with every solve method).",
    )
    on_failure: Literal["error", "rtn"] = Field(
        "error",
        description="A Hessian that stays non positive-definite after the dampening retries: "
        "error, or round-to-nearest for that module (recorded in report.json).",
    )
    targets: list[str] = Field(
        default_factory=lambda: ["re:.*"],
        description="Weights inside the decoder layers to quantize (Linears, Conv1Ds, MoE "
        "experts' gate_proj/up_proj/down_proj; docs/models.md): names, suffixes or re:<regex>.",
    )
    ignore: list[str] = Field(
        default_factory=lambda: ["lm_head"],
        description="Modules kept in full precision (same syntax); listed as such in the "
        "checkpoint's config.",
    )

    def quant_args(self, **solver: Any) -> QuantArgs:
        """The scheme as the quantizer takes it; ``solver`` adds a solve method's own knobs."""
        return QuantArgs(
            bits=self.bits,
            group_size=self.group_size,
            symmetric=self.symmetric,
            actorder=self.actorder,
            observer=self.observer,
            **solver,
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
    max_forward_tokens: int | None = Field(
        None,
        ge=1,
        description="Most tokens one decoder-layer forward takes (whole samples, at least one): "
        "a rank's samples are run in chunks of at most this many tokens, with the same result; "
        "null = all of a rank's samples of one length at once.",
        json_schema_extra={"unit": "tokens"},
    )
    max_hidden_bytes: str | None = Field(
        None,
        description="Most bytes of hidden states a rank keeps in memory between decoder layers "
        "(500MB, 2GB, 1GiB ...); beyond it they go to files under output_dir/spill and each "
        "layer runs over them a chunk at a time (max_forward_tokens, or what the budget "
        "holds), with the same result; null = always in memory.",
    )
    max_wave_groups: int | None = Field(
        None,
        ge=1,
        description="Most groups of a wave (an MoE block's experts) handled together: a larger "
        "wave runs as consecutive parts of at most this many experts. Each rank holds the "
        "Hessians of one part at a time (less memory), at the cost of more, smaller "
        "collectives and a less even spread over ranks; the result is the same. "
        "null = the whole wave at once.",
        json_schema_extra={"unit": "groups"},
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

    @field_validator("max_hidden_bytes")
    @classmethod
    def _size(cls, value: str | None) -> str | None:
        if value is not None:
            parse_size(value)  # raises ValueError with the allowed spellings
        return value


#: The config groups by name: ``recipes/<name>/`` holds a group's options (files), and
#: ``<name>.<key>`` sets one of its keys in a recipe or on the command line.
GROUPS: dict[str, type[BaseModel]] = {
    "model": ModelGroup,
    "dataset": DatasetGroup,
    "scheme": SchemeGroup,
    "runtime": RuntimeGroup,
}


class Recipe(_Group):
    """A fully composed recipe: config groups, run settings and the stage list."""

    output_dir: str = Field(description="Run directory: checkpoint, recipe.yaml, report.json.")
    overwrite: bool = Field(False, description="Replace an existing checkpoint in output_dir.")
    seed: int = Field(0, description="Global seed.", json_schema_extra={"unit": None})
    model: ModelGroup
    dataset: DatasetGroup
    scheme: SchemeGroup
    runtime: RuntimeGroup = RuntimeGroup()
    stages: list[Any] = Field(
        description="The pipeline, in order: a mapping from stage id to its settings "
        "(validated into the stage configs, each with its id)."
    )


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
        if pre.startswith("stages.") and loc and isinstance(loc[0], str) and loc[0] in registered():
            loc = loc[1:]  # the discriminator's tag: the key already names the entry
        path = _loc_to_path(loc)
        full = f"{pre}.{path}" if pre and path else (pre or path or "<root>")
        out.append(Problem(full, _describe_error(err, _fields_at(err["loc"], model))))
    return out


def stage_entries(stages_raw: Any) -> tuple[list[tuple[str, Any]], list[Problem]]:
    """``stages:`` as (key, entry) pairs in order; entries set to null are left out.

    ``stages`` is a mapping from a stage id (the key report.json uses) to the stage's
    fields, so a derived recipe or an override changes one stage by its key
    (``stages.solve.dampening=0.05``) and Hydra merges it; ``null`` (or ``~stages.KEY``
    on the command line) removes an entry; ``after: ID`` places an entry behind another.
    ``stage:`` defaults to the key.
    """
    if not isinstance(stages_raw, Mapping):
        kind = type(stages_raw).__name__
        return [], [
            Problem(
                "stages",
                f"must be a mapping from stage id to its settings ('<id>: {{}}' for none), got {kind}",
            )
        ]
    entries: list[tuple[str, Any]] = []
    problems: list[Problem] = []
    for key, entry in stages_raw.items():
        if entry is None:
            continue
        if not isinstance(entry, Mapping):
            problems.append(
                Problem(
                    f"stages.{key}",
                    f"must be a mapping of the stage's settings ({{}} for none) or null to "
                    f"remove it, got {entry!r}",
                )
            )
            continue
        if "id" in entry:
            problems.append(Problem(f"stages.{key}.id", "the stage id is its key; remove 'id'"))
            continue
        entries.append((str(key), {"stage": str(key), **entry, "id": str(key)}))
    return _place_after(entries, problems)


def _place_after(
    entries: list[tuple[str, Any]], problems: list[Problem]
) -> tuple[list[tuple[str, Any]], list[Problem]]:
    """Move each entry with ``after: ID`` right behind entry ``ID``.

    Hydra keeps a merged mapping in the base recipe's order and appends new keys, so a
    derived recipe (or ``+stages.KEY...`` on the command line) places a new stage with
    ``after:``; several entries after one stage keep their own order.
    """
    order = [key for key, _ in entries]
    moved: list[tuple[str, Any]] = []
    for key, entry in entries:
        if (target := entry.pop("after", None)) is not None:
            moved.append((key, target))
    placed: dict[str, set[str]] = {}  # target -> entries already placed behind it
    for key, target in moved:
        if target not in order or target == key:
            others = ", ".join(k for k in order if k != key)
            problems.append(
                Problem(f"stages.{key}.after", f"no stage {target!r} to follow; stages: {others}")
            )
            continue
        order.remove(key)
        at = order.index(target) + 1
        while at < len(order) and order[at] in placed.get(target, ()):
            at += 1
        order.insert(at, key)
        placed.setdefault(target, set()).add(key)
    by_key = dict(entries)
    return [(k, by_key[k]) for k in order], problems


def validate_recipe(raw: Mapping[str, Any], *, file: str | None = None) -> Recipe:
    """Validate a composed, resolved recipe dict; raise RecipeError listing every problem."""
    raw = dict(raw)
    problems: list[Problem] = []
    stages_raw = raw.pop("stages", None)
    try:
        recipe = Recipe.model_validate({**raw, "stages": []})
    except ValidationError as exc:
        problems += problems_from_validation(exc, model=Recipe)
        recipe = None
    if stages_raw is None:
        problems.append(Problem("stages", "required key is missing"))
        stages_raw = {}
    entries, bad = stage_entries(stages_raw)
    problems += bad
    parsed: list[StageConfig] = []
    adapter: TypeAdapter[Any] = TypeAdapter(stage_union())
    for key, entry in entries:
        try:
            parsed.append(adapter.validate_python(entry))
        except ValidationError as exc:
            problems += problems_from_validation(exc, prefix=f"stages.{key}")
    if not problems and not parsed:
        problems.append(Problem("stages", "the pipeline has no stages"))
    if not problems:
        problems += [Problem(v.path, v.message) for v in check_order(parsed)]
    if problems or recipe is None:
        raise RecipeError([Problem(p.path, p.message, file) for p in problems])
    return recipe.model_copy(update={"stages": parsed})
