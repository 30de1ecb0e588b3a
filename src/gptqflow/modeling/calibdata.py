"""Calibration data through Hugging Face ``datasets``: rows as samples, chat templates, rank slices.

A source is anything ``datasets`` opens without the network: a ``.json``/``.jsonl``/
``.csv``/``.parquet``/``.arrow`` file, a ``save_to_disk`` directory (or a directory of
data files), the name of a dataset repository already in the local Hugging Face cache,
or (from Python) a ``datasets.Dataset``, a list of strings or a list of conversations.

Each row is rendered to text (a ``messages`` column through the tokenizer's chat
template, a ``text`` column as it is) and tokenized without special tokens (a chat
template writes its own), so the same conversations stored as ``messages``, as
pre-rendered ``text``, as JSONL, parquet or ``save_to_disk`` give the same tokens.

Without packing one row is one sample of its own length (truncated to ``seq_len``): no
padding exists, so none enters a Hessian. The rows are chosen by ``seed`` (the same
partial Fisher-Yates as the text route, :func:`gptqflow.modeling.text.seeded_sample`)
and split over the ranks by token count (:func:`balance_by_tokens`), a pure function of
the samples' lengths, so every rank computes the same split without talking. Every rank
tokenizes the chosen rows (a fraction of a second for hundreds of rows) to know their
lengths and the data fingerprint, and keeps only its own slice as tensors; rows that
are not chosen are never read out of the arrow table. With packing the rows are joined
with EOS into one stream and cut into ``seq_len`` windows, exactly like the text route.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from gptqflow.errors import GptqflowError
from gptqflow.modeling.text import calibration_windows, encode, seeded_sample

log = logging.getLogger("gptqflow")

#: ``dataset.path`` as recorded when ``gptqflow.run(..., calibration=...)`` hands the data over.
PYTHON_SOURCE = "<calibration>"

#: The ``datasets`` packaged builder of each data file suffix.
FILE_BUILDERS = {
    ".json": "json",
    ".jsonl": "json",
    ".csv": "csv",
    ".parquet": "parquet",
    ".arrow": "arrow",
}

# owner/name or name: what a dataset repository id looks like (never a local path).
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


@dataclass(frozen=True)
class RowSettings:
    """What the ``dataset`` group says about rows (the fields :func:`calibration_set` reads)."""

    split: str
    text_column: str
    messages_column: str
    num_samples: int
    seq_len: int
    seed: int
    packing: bool


@dataclass
class CalibrationSet:
    """The calibration samples of every rank, and this rank's tensors.

    ``samples`` is this rank's slice: ``[n, seq_len]`` when every sample has the same
    length (packing, the text route), else a list of 1-D token tensors, one per row.
    ``info`` is the ``calibration`` entry of report.json (the same on every rank).
    """

    samples: torch.Tensor | list[torch.Tensor]
    info: dict[str, Any] = field(default_factory=dict)


def _datasets() -> Any:
    """Import ``datasets`` in offline mode: a source is never downloaded.

    The environment variables cover a first import; the config flag an import that
    happened before (a user who built a ``Dataset`` for ``calibration=``).
    """
    os.environ["HF_DATASETS_OFFLINE"] = "1"
    os.environ["HF_HUB_OFFLINE"] = "1"
    import datasets

    for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        if hasattr(datasets.config, name):
            setattr(datasets.config, name, True)
    datasets.disable_progress_bars()
    return datasets


# ---------------------------------------------------------------------- sources
def open_source(path: str, split: str) -> tuple[Any, dict[str, Any]]:
    """The ``datasets.Dataset`` behind ``dataset.path`` and a description of it for the report."""
    p = Path(path)
    if p.is_file():
        return _open_file(p, split), {"kind": "file", "path": str(p.resolve())}
    if p.is_dir():
        return _open_dir(p, split), {"kind": "directory", "path": str(p.resolve())}
    if _REPO_ID.match(path) and not path.startswith("."):
        return _open_cached(path, split), {"kind": "hf-cache", "name": path}
    raise GptqflowError(
        f"dataset.path={path!r}: no such file or directory (relative paths are resolved "
        f"from {Path.cwd()}), and not a dataset repository name; give a .json/.jsonl/.csv/"
        ".parquet/.arrow file, a save_to_disk directory or the name of a dataset in the "
        "local Hugging Face cache"
    )


def source_problem(path: str) -> str | None:
    """Why ``dataset.path`` cannot be a source, from the file system alone (for preflight)."""
    p = Path(path)
    if path == PYTHON_SOURCE:
        return None
    if p.is_file():
        if p.suffix.lower() not in FILE_BUILDERS:
            return (
                f"{path!r} is not a data file datasets reads (suffix {p.suffix or '(none)'!r}; "
                f"allowed: {', '.join(FILE_BUILDERS)}); for plain text use "
                "dataset.calibration_file (dataset=wikitext2-style) instead"
            )
        return None
    if p.is_dir() or _REPO_ID.match(path):
        return None
    return f"{path!r}: no such file or directory, and not a dataset repository name"


def _open_file(p: Path, split: str) -> Any:
    ds = _datasets()
    builder = FILE_BUILDERS.get(p.suffix.lower())
    if builder is None:
        raise GptqflowError(
            f"dataset.path={str(p)!r}: not a data file datasets reads (suffix "
            f"{p.suffix or '(none)'!r}; allowed: {', '.join(FILE_BUILDERS)}); for plain text "
            "use dataset.calibration_file"
        )
    if split != "train":
        raise GptqflowError(
            f"dataset.split={split!r}: a single file ({p}) has one split, 'train'; set "
            "dataset.split=train or give a save_to_disk directory with that split"
        )
    try:
        if builder == "arrow":
            return ds.Dataset.from_file(str(p))
        return ds.load_dataset(builder, data_files=str(p), split="train")
    except Exception as exc:  # pyarrow/json errors of many types
        if "corresponds to no data" in str(exc):
            raise GptqflowError(
                f"the calibration dataset ({p}, split 'train') has no rows"
            ) from None
        raise GptqflowError(
            f"dataset.path={str(p)!r}: datasets cannot read it as {builder} "
            f"({type(exc).__name__}: {_first_line(exc)})"
        ) from None


def _open_dir(p: Path, split: str) -> Any:
    ds = _datasets()
    saved = (p / "dataset_info.json").is_file() or (p / "dataset_dict.json").is_file()
    try:
        loaded = ds.load_from_disk(str(p)) if saved else ds.load_dataset(str(p))
    except Exception as exc:
        raise GptqflowError(
            f"dataset.path={str(p)!r}: a directory datasets cannot open "
            f"({type(exc).__name__}: {_first_line(exc)}); give a save_to_disk directory or a "
            "directory of .json/.jsonl/.csv/.parquet files"
        ) from None
    return _pick_split(loaded, split, str(p))


def _open_cached(name: str, split: str) -> Any:
    """A dataset repository from the local Hugging Face cache, never from the network.

    First the hub cache (``$HF_HOME/hub``, where ``snapshot_download`` keeps a repository's
    files): its newest snapshot is read as a directory of data files. Then the
    ``datasets`` cache of a repository that ``load_dataset`` prepared before.
    """
    ds = _datasets()
    from huggingface_hub import snapshot_download

    try:
        snapshot = snapshot_download(name, repo_type="dataset", local_files_only=True)
    except Exception:  # not in the hub cache: try the datasets cache
        snapshot = None
    if snapshot is not None:
        return _open_dir(Path(snapshot), split)
    try:
        loaded = ds.load_dataset(name)
    except Exception as exc:  # offline: ConnectionError, FileNotFoundError, ValueError ...
        raise GptqflowError(
            f"dataset.path={name!r}: not a local file or directory, and not found in the "
            f"local Hugging Face cache ({type(exc).__name__}: {_first_line(exc)}); gptqflow "
            "never downloads: load it once with `datasets.load_dataset` where the network is "
            "allowed, or give a local file"
        ) from None
    return _pick_split(loaded, split, name)


def _pick_split(loaded: Any, split: str, where: str) -> Any:
    ds = _datasets()
    if isinstance(loaded, ds.DatasetDict):
        if split not in loaded:
            raise GptqflowError(
                f"dataset.split={split!r}: {where} has no such split; its splits: "
                f"{', '.join(loaded)}"
            )
        return loaded[split]
    return loaded


def from_python(obj: Any) -> tuple[Any, dict[str, Any]]:
    """``calibration=`` of :func:`gptqflow.run`: a Dataset, a list of strings or of conversations."""
    ds = _datasets()
    if isinstance(obj, ds.DatasetDict):
        raise GptqflowError(
            "calibration= got a DatasetDict; pass one split, e.g. calibration=dd['train']"
        )
    if isinstance(obj, ds.Dataset):
        return obj, {"kind": "python", "type": "datasets.Dataset", "rows": len(obj)}
    if isinstance(obj, (list, tuple)) and obj:
        if all(isinstance(x, str) for x in obj):
            return ds.Dataset.from_dict({"text": list(obj)}), {
                "kind": "python",
                "type": "list of strings",
            }
        if all(isinstance(x, (list, tuple)) for x in obj):
            rows = [list(x) for x in obj]
            for i, row in enumerate(rows):
                _check_messages(row, i, "calibration=")
            return ds.Dataset.from_dict({"messages": rows}), {
                "kind": "python",
                "type": "list of conversations",
            }
    what = "an empty list" if isinstance(obj, (list, tuple)) else type(obj).__name__
    raise GptqflowError(
        f"calibration= got {what}; give a datasets.Dataset, a non-empty list of strings, or "
        "a non-empty list of conversations (each a list of {'role', 'content'} dicts)"
    )


# ---------------------------------------------------------------------- rows
def pick_column(columns: Sequence[str], text_column: str, messages_column: str) -> tuple[str, str]:
    """``("messages", name)`` or ``("text", name)``: the column rows are read from.

    A conversation column wins when both exist: chat models are calibrated on what
    their template renders.
    """
    if messages_column in columns:
        return "messages", messages_column
    if text_column in columns:
        return "text", text_column
    raise GptqflowError(
        f"the calibration dataset has neither a messages column "
        f"(dataset.messages_column={messages_column!r}) nor a text column "
        f"(dataset.text_column={text_column!r}); its columns: {', '.join(columns) or '(none)'}; "
        "set one of the two keys to the column to use"
    )


def _check_messages(value: Any, row: int, column: str) -> list[dict[str, str]]:
    if not isinstance(value, list) or not value:
        raise GptqflowError(
            f"row {row}, column {column!r}: a conversation must be a non-empty list of "
            f"{{'role', 'content'}} turns, got {_short(value)}"
        )
    for t, turn in enumerate(value):
        if (
            not isinstance(turn, dict)
            or not isinstance(turn.get("role"), str)
            or not isinstance(turn.get("content"), str)
        ):
            raise GptqflowError(
                f"row {row}, column {column!r}, turn {t}: each turn needs a string 'role' and a "
                f"string 'content', got {_short(turn)}"
            )
    return value


def render_row(tokenizer: Any, kind: str, column: str, value: Any, row: int) -> str:
    """One row as the text the model reads: a conversation through the chat template."""
    if kind == "text":
        if not isinstance(value, str):
            raise GptqflowError(
                f"row {row}, column {column!r}: text must be a string, got {_short(value)}"
            )
        return value
    turns = _check_messages(value, row, column)
    # datasets fills turns of a struct column with every key seen in any row (None when
    # absent); the template gets the two keys a turn has.
    turns = [{"role": t["role"], "content": t["content"]} for t in turns]
    return str(tokenizer.apply_chat_template(turns, tokenize=False))


def check_chat_template(tokenizer: Any, where: str) -> None:
    if not getattr(tokenizer, "chat_template", None):
        raise GptqflowError(
            f"the tokenizer of {where} has no chat template, so the dataset's conversations "
            "cannot be rendered; use a tokenizer with a chat_template (tokenizer_config.json) or a "
            "dataset with a pre-rendered text column (dataset.text_column)"
        )


def balance_by_tokens(lengths: Sequence[int], world_size: int) -> list[list[int]]:
    """Sample indices of each rank, balanced by token count (longest first, to the lightest rank).

    A pure function of the lengths: ties go to the lower index and the lower rank. Each
    rank's indices are returned in ascending order. With at least ``world_size``
    non-empty samples every rank gets one.
    """
    load = [0] * world_size
    owned: list[list[int]] = [[] for _ in range(world_size)]
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        r = min(range(world_size), key=lambda r: (load[r], r))
        owned[r].append(i)
        load[r] += lengths[i]
    return [sorted(o) for o in owned]


def fingerprint(samples: Sequence[Sequence[int]] | torch.Tensor) -> str:
    """sha256 of every sample's token ids (and lengths), in global sample order."""
    h = hashlib.sha256()
    for s in samples:
        ids = (
            s.to(torch.int64) if isinstance(s, torch.Tensor) else torch.tensor(s, dtype=torch.int64)
        )
        h.update(int(ids.numel()).to_bytes(8, "little"))
        h.update(ids.contiguous().numpy().tobytes())
    return h.hexdigest()


def calibration_set(
    dataset: Any,
    tokenizer: Any,
    cfg: RowSettings,
    rank: int,
    even_shards: Sequence[range],
    *,
    source: dict[str, Any],
    model_dir: str = "the model",
) -> CalibrationSet:
    """Choose, render, tokenize and split the calibration rows (see the module docstring).

    ``even_shards`` is the contiguous split of ``num_samples`` over the ranks
    (``DistContext.shard``), used for packed windows, which all have one length; its
    length is the world size.
    """
    n_rows = len(dataset)
    if n_rows == 0:
        raise GptqflowError(
            f"the calibration dataset ({_where(source)}, split {cfg.split!r}) has no rows"
        )
    kind, column = pick_column(list(dataset.column_names), cfg.text_column, cfg.messages_column)
    log.info("calibration data: %s, column %r (%s), %d rows", _where(source), column, kind, n_rows)
    if kind == "messages":
        check_chat_template(tokenizer, model_dir)
    if cfg.packing:
        return _packed(dataset, tokenizer, cfg, rank, even_shards, source, kind, column)
    if n_rows < cfg.num_samples:
        raise GptqflowError(
            f"dataset.num_samples={cfg.num_samples}: the calibration dataset ({_where(source)}) "
            f"has {n_rows} rows and one row is one sample; use fewer samples, more rows, or "
            "dataset.packing=true"
        )
    rows = sorted(seeded_sample(n_rows, cfg.num_samples, cfg.seed))
    values = dataset.select(rows)[column]
    ids: list[list[int]] = []
    for row, value in zip(rows, values):
        tokens = encode(tokenizer, render_row(tokenizer, kind, column, value, row))[: cfg.seq_len]
        if not tokens:
            raise GptqflowError(
                f"row {row}, column {column!r}: renders to no tokens; remove empty rows from "
                "the calibration dataset"
            )
        ids.append(tokens)
    lengths = [len(x) for x in ids]
    owned = balance_by_tokens(lengths, len(even_shards))
    samples = [torch.tensor(ids[i], dtype=torch.long) for i in owned[rank]]
    info = _info(source, kind, column, cfg, fingerprint(ids), owned, lengths)
    info["rows"] = n_rows
    return CalibrationSet(samples=samples, info=info)


def _packed(
    dataset: Any,
    tokenizer: Any,
    cfg: RowSettings,
    rank: int,
    even_shards: Sequence[range],
    source: dict[str, Any],
    kind: str,
    column: str,
) -> CalibrationSet:
    """Rows joined with EOS into one stream, cut into ``seq_len`` windows like the text route."""
    eos = tokenizer.eos_token_id
    if eos is None:
        raise GptqflowError(
            "dataset.packing=true joins rows with the EOS token, and the tokenizer has none; "
            "set dataset.packing=false"
        )
    stream: list[int] = []
    for row, value in enumerate(dataset[column]):
        if stream:
            stream.append(int(eos))
        stream += encode(tokenizer, render_row(tokenizer, kind, column, value, row))
    starts = calibration_windows(len(stream), cfg.num_samples, cfg.seq_len, cfg.seed)
    windows = [stream[s : s + cfg.seq_len] for s in starts]
    owned = [list(r) for r in even_shards]
    mine = torch.tensor([windows[i] for i in owned[rank]], dtype=torch.long)
    info = _info(
        source, kind, column, cfg, fingerprint(windows), owned, [cfg.seq_len] * len(starts)
    )
    info["rows"] = len(dataset)
    return CalibrationSet(samples=mine.reshape(len(owned[rank]), cfg.seq_len), info=info)


def _info(
    source: dict[str, Any],
    kind: str | None,
    column: str | None,
    cfg: RowSettings | None,
    digest: str,
    owned: Sequence[Sequence[int]],
    lengths: Sequence[int],
) -> dict[str, Any]:
    """The report.json entry: where the data came from, its fingerprint, each rank's share."""
    return {
        "source": source,
        "column": column,
        "column_kind": kind,
        "split": None if cfg is None or source.get("kind") == "python" else cfg.split,
        "packing": None if cfg is None else cfg.packing,
        "fingerprint": digest,
        "samples": len(lengths),
        "tokens": int(sum(lengths)),
        "ranks": [{"samples": len(o), "tokens": int(sum(lengths[i] for i in o))} for o in owned],
    }


def text_info(path: str, windows: torch.Tensor, owned: Sequence[Sequence[int]]) -> dict[str, Any]:
    """The report entry of the plain-text route (``dataset.calibration_file``)."""
    lengths = [len(w) for w in windows]
    return _info(
        {"kind": "text", "path": str(Path(path).resolve())},
        None,
        None,
        None,
        fingerprint(windows),
        owned,
        lengths,
    )


def _where(source: dict[str, Any]) -> str:
    return str(source.get("path") or source.get("name") or source.get("type") or "python")


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [""])[0][:300]
