"""Calibration data through ``datasets``: each source kind, the chat template, the rank split, refusals."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from gptqflow.errors import GptqflowError
from gptqflow.modeling.calibdata import (
    RowSettings,
    balance_by_tokens,
    calibration_set,
    fingerprint,
    from_python,
    open_source,
    source_problem,
)
from gptqflow.modeling.text import encode, load_tokenizer, read_text
from helpers import chat_rows, render_chat_by_hand

datasets = pytest.importorskip("datasets")

N_ROWS = 24


def settings(**kw: Any) -> RowSettings:
    base: dict[str, Any] = dict(
        split="train",
        text_column="text",
        messages_column="messages",
        num_samples=8,
        seq_len=96,
        seed=0,
        packing=False,
    )
    return RowSettings(**{**base, **kw})


def even(n: int, ws: int) -> list[range]:
    from gptqflow.framework.distributed import shard_range

    return [shard_range(n, r, ws) for r in range(ws)]


@pytest.fixture(scope="module")
def tok(tiny_chat_llama_dir: Path) -> Any:
    return load_tokenizer(tiny_chat_llama_dir)


@pytest.fixture(scope="module")
def rows(chat_source_text: str) -> list[dict[str, Any]]:
    return chat_rows(chat_source_text, N_ROWS)


@pytest.fixture(scope="module")
def sources(rows: list[dict[str, Any]], tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """The same conversations as JSONL, JSON, parquet, arrow, save_to_disk and a DatasetDict."""
    d = tmp_path_factory.mktemp("sources")
    jsonl = d / "chat.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in rows))
    ds = datasets.Dataset.from_list(rows)
    ds.to_json(str(d / "chat.json"))
    ds.to_parquet(str(d / "chat.parquet"))
    ds.save_to_disk(str(d / "saved"))
    datasets.DatasetDict({"train": ds, "validation": ds.select(range(4))}).save_to_disk(
        str(d / "dict")
    )
    arrow = next((d / "saved").glob("*.arrow"))
    return {
        "jsonl": str(jsonl),
        "json": str(d / "chat.json"),
        "parquet": str(d / "chat.parquet"),
        "arrow": str(arrow),
        "saved": str(d / "saved"),
        "dict": str(d / "dict"),
    }


def one_rank(source: str, tok: Any, **kw: Any) -> Any:
    ds, where = open_source(source, kw.pop("split", "train"))
    return calibration_set(
        ds, tok, settings(**kw), 0, even(kw.get("num_samples", 8), 1), source=where
    )


@pytest.mark.parametrize("kind", ["jsonl", "json", "parquet", "arrow", "saved", "dict"])
def test_every_source_kind_gives_the_same_samples(
    kind: str, sources: dict[str, str], tok: Any
) -> None:
    ref = one_rank(sources["jsonl"], tok)
    got = one_rank(sources[kind], tok)
    assert got.info["fingerprint"] == ref.info["fingerprint"]
    assert [s.tolist() for s in got.samples] == [s.tolist() for s in ref.samples]
    assert got.info["column"] == "messages" and got.info["rows"] == N_ROWS


def test_rows_are_samples_of_their_own_length(sources: dict[str, str], tok: Any) -> None:
    got = one_rank(sources["jsonl"], tok, seq_len=4096)
    lengths = [int(s.numel()) for s in got.samples]
    assert len(set(lengths)) > 1, "the conversations have different lengths"
    assert got.info["tokens"] == sum(lengths) == got.info["ranks"][0]["tokens"]
    short = one_rank(sources["jsonl"], tok, seq_len=40)
    assert [int(s.numel()) for s in short.samples] == [min(n, 40) for n in lengths]


def test_chat_template_matches_a_hand_rendering(
    rows: list[dict[str, Any]], sources: dict[str, str], tok: Any
) -> None:
    got = one_rank(sources["jsonl"], tok, num_samples=N_ROWS, seq_len=4096)
    by_hand = [encode(tok, render_chat_by_hand(r["messages"])) for r in rows]
    assert [s.tolist() for s in got.samples] == by_hand


def test_pre_rendered_text_gives_the_same_tokens(
    rows: list[dict[str, Any]], sources: dict[str, str], tok: Any, tmp_path: Path
) -> None:
    text = tmp_path / "text.parquet"
    rendered = [render_chat_by_hand(r["messages"]) for r in rows]
    datasets.Dataset.from_dict({"text": rendered, "id": list(range(N_ROWS))}).to_parquet(str(text))
    got = one_rank(str(text), tok)
    assert got.info["column"] == "text"
    assert got.info["fingerprint"] == one_rank(sources["jsonl"], tok).info["fingerprint"]


def test_split_of_a_dataset_dict(sources: dict[str, str], tok: Any) -> None:
    got = one_rank(sources["dict"], tok, split="validation", num_samples=4)
    assert got.info["rows"] == 4
    with pytest.raises(GptqflowError, match=r"dataset.split='test'.*splits: train, validation"):
        one_rank(sources["dict"], tok, split="test")
    with pytest.raises(GptqflowError, match=r"single file .* has one split, 'train'"):
        one_rank(sources["jsonl"], tok, split="validation")


def test_seed_chooses_other_rows(sources: dict[str, str], tok: Any) -> None:
    a = one_rank(sources["jsonl"], tok).info["fingerprint"]
    assert one_rank(sources["jsonl"], tok, seed=1).info["fingerprint"] != a
    assert one_rank(sources["jsonl"], tok).info["fingerprint"] == a


@pytest.mark.parametrize("ws", [2, 3, 5])
def test_rank_slices_partition_the_one_rank_samples(
    ws: int, sources: dict[str, str], tok: Any
) -> None:
    ds, where = open_source(sources["parquet"], "train")
    cfg = settings(num_samples=12, seq_len=4096)
    ref = calibration_set(ds, tok, cfg, 0, even(12, 1), source=where)
    parts = [calibration_set(ds, tok, cfg, r, even(12, ws), source=where) for r in range(ws)]
    got = sorted(tuple(s.tolist()) for p in parts for s in p.samples)
    assert got == sorted(tuple(s.tolist()) for s in ref.samples)
    info = parts[0].info
    assert all(p.info == info for p in parts), "every rank computes the same split"
    assert [r["samples"] for r in info["ranks"]] == [len(p.samples) for p in parts]
    assert [r["tokens"] for r in info["ranks"]] == [
        sum(s.numel() for s in p.samples) for p in parts
    ]
    assert info["fingerprint"] == ref.info["fingerprint"]


def test_balance_by_tokens_is_balanced_and_covers_every_sample() -> None:
    lengths = [90, 10, 50, 50, 40, 30, 20, 10, 5]
    owned = balance_by_tokens(lengths, 3)
    assert sorted(i for o in owned for i in o) == list(range(len(lengths)))
    loads = [sum(lengths[i] for i in o) for o in owned]
    assert max(loads) - min(loads) <= max(lengths) and min(len(o) for o in owned) >= 1
    # Versus an even split by count, the token loads are closer.
    count_split = [[0, 1, 2], [3, 4, 5], [6, 7, 8]]
    by_count = [sum(lengths[i] for i in o) for o in count_split]
    assert max(loads) < max(by_count)
    assert balance_by_tokens(lengths, 3) == owned, "a pure function"


def test_packing_cuts_equal_windows(sources: dict[str, str], tok: Any) -> None:
    got = one_rank(sources["saved"], tok, packing=True, seq_len=32)
    assert isinstance(got.samples, torch.Tensor) and tuple(got.samples.shape) == (8, 32)
    assert got.info["tokens"] == 8 * 32 and got.info["packing"] is True


def test_python_objects(rows: list[dict[str, Any]], sources: dict[str, str], tok: Any) -> None:
    ref = one_rank(sources["jsonl"], tok).info["fingerprint"]
    cfg, shards = settings(), even(8, 1)
    for obj in (
        [r["messages"] for r in rows],
        [render_chat_by_hand(r["messages"]) for r in rows],
        datasets.Dataset.from_list(rows),
    ):
        ds, where = from_python(obj)
        assert where["kind"] == "python"
        assert calibration_set(ds, tok, cfg, 0, shards, source=where).info["fingerprint"] == ref
    for bad in ([], "text", [1, 2], [[{"role": "user"}]]):
        with pytest.raises(GptqflowError, match="calibration="):
            from_python(bad)


# ---------------------------------------------------------------------- refusals
def test_empty_split_is_refused(tmp_path: Path, tok: Any) -> None:
    empty = tmp_path / "empty.parquet"
    datasets.Dataset.from_dict({"text": []}).to_parquet(str(empty))
    with pytest.raises(GptqflowError, match=r"empty.parquet, split 'train'\) has no rows"):
        one_rank(str(empty), tok)
    ds, where = from_python(datasets.Dataset.from_dict({"text": []}))
    with pytest.raises(GptqflowError, match=r"\(datasets.Dataset, split 'train'\) has no rows"):
        calibration_set(ds, tok, settings(), 0, even(8, 1), source=where)


def test_missing_column_names_the_columns(tmp_path: Path, tok: Any) -> None:
    f = tmp_path / "q.jsonl"
    f.write_text('{"question": "a", "answer": "b"}\n' * 10)
    with pytest.raises(
        GptqflowError, match=r"neither a messages column.*columns: question, answer"
    ):
        one_rank(str(f), tok)


@pytest.mark.parametrize(
    ("row", "match"),
    [
        ({"text": 5}, r"row \d+, column 'text': text must be a string"),
        ({"messages": "hello"}, r"row \d+, column 'messages': a conversation must be a non-empty"),
        ({"messages": [{"role": "user"}]}, r"row \d+, column 'messages', turn 0: each turn"),
        ({"messages": [{"role": "user", "content": 3}]}, r"turn 0: each turn needs"),
    ],
)
def test_malformed_rows_name_row_and_column(
    row: dict[str, Any], match: str, tmp_path: Path, tok: Any
) -> None:
    good = (
        {"text": "fine text"}
        if "text" in row
        else {"messages": [{"role": "user", "content": "hi"}]}
    )
    # Arrow cannot hold most of these mixed columns: rows as Python objects, checked one by one.
    ds = _ListDataset([good] * 9 + [row])
    with pytest.raises(GptqflowError, match=match):
        calibration_set(ds, tok, settings(num_samples=10), 0, even(10, 1), source={"kind": "test"})


class _ListDataset:
    """The part of ``datasets.Dataset`` that :func:`calibration_set` uses, over plain rows."""

    def __init__(self, rows: list[dict[str, Any]]) -> None:
        self.rows = rows
        self.column_names = list(rows[0])

    def __len__(self) -> int:
        return len(self.rows)

    def select(self, idx: list[int]) -> dict[str, list[Any]]:
        return {c: [self.rows[i][c] for i in idx] for c in self.column_names}


def test_malformed_messages_in_a_jsonl_file(tmp_path: Path, tok: Any) -> None:
    f = tmp_path / "bad.jsonl"
    good = {"messages": [{"role": "user", "content": "hi"}]}
    bad = {"messages": [{"role": "user", "content": None}]}
    f.write_text("".join(json.dumps(r) + "\n" for r in [good] * 5 + [bad] + [good] * 4))
    with pytest.raises(GptqflowError, match=r"row 5, column 'messages', turn 0"):
        one_rank(str(f), tok, num_samples=10)


def test_tokenizer_without_chat_template_is_refused(
    sources: dict[str, str], tiny_llama_dir: Path
) -> None:
    plain = load_tokenizer(tiny_llama_dir)
    with pytest.raises(GptqflowError, match="has no chat template"):
        one_rank(sources["jsonl"], plain)


def test_more_samples_than_rows_is_refused(sources: dict[str, str], tok: Any) -> None:
    with pytest.raises(GptqflowError, match=r"num_samples=99.*has 24 rows.*packing=true"):
        one_rank(sources["jsonl"], tok, num_samples=99)


def test_not_a_source(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("hello")
    assert "for plain text use dataset.calibration_file" in str(
        source_problem(str(tmp_path / "notes.txt"))
    )
    assert "no such file" in str(source_problem(str(tmp_path / "x" / "y" / "z.jsonl")))
    with pytest.raises(GptqflowError, match="local Hugging Face cache"):
        open_source("nobody/no-such-dataset-gptqflow", "train")


@pytest.mark.parametrize("name", ["chat.jsonl", "chat.json", "chat.parquet", "data.arrow", "dir"])
def test_text_route_refuses_datasets(name: str, tmp_path: Path) -> None:
    from gptqflow.framework.preflight import text_file_problem

    p = tmp_path / name
    if name == "dir":
        p.mkdir()
    else:
        p.write_text('{"messages": [{"role": "user", "content": "hi"}]}\n')
    for message in (str(text_file_problem("dataset.calibration_file", str(p))), _read_error(p)):
        assert str(p) in message and "use `dataset=local dataset.path=" in message


def _read_error(p: Path) -> str:
    with pytest.raises(GptqflowError) as err:
        read_text(p)
    return str(err.value)


def test_fingerprint_depends_on_tokens_and_boundaries() -> None:
    assert fingerprint([[1, 2], [3]]) != fingerprint([[1], [2, 3]])
    assert fingerprint([[1, 2], [3]]) == fingerprint([torch.tensor([1, 2]), torch.tensor([3])])


def test_dataset_name_resolves_from_the_local_hub_cache(
    rows: list[dict[str, Any]], tmp_path: Path
) -> None:
    """A repository in ``$HF_HOME/hub`` (as ``snapshot_download`` leaves it), read offline.

    In a child process: ``HF_HOME`` is read when ``huggingface_hub`` is imported.
    """
    import os
    import subprocess
    import sys

    sha = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hf" / "hub" / "datasets--someone--chat"
    (repo / "snapshots" / sha / "data").mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(sha)
    (repo / "snapshots" / sha / "data" / "train.jsonl").write_text(
        "".join(json.dumps(r) + "\n" for r in rows)
    )
    code = (
        "from gptqflow.modeling.calibdata import open_source\n"
        "ds, src = open_source('someone/chat', 'train')\n"
        "print(len(ds), src['kind'], ds.column_names)\n"
        "try:\n"
        "    open_source('someone/absent', 'train')\n"
        "except Exception as e:\n"
        "    print(type(e).__name__, 'never downloads' in str(e))\n"
    )
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf")}
    env.pop("HF_DATASETS_CACHE", None)
    done = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split("\n")[:2] == [
        f"{N_ROWS} hf-cache ['messages']",
        "GptqflowError True",
    ]
