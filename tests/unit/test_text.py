"""Reading, tokenizing and windowing calibration / evaluation text."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
import torch

from gptqflow.errors import GptqflowError
from gptqflow.modeling.text import (
    calibration_samples,
    calibration_windows,
    load_tokenizer,
    read_text,
    seeded_sample,
    tokenize_text,
    windows_to_tensor,
)

# ---------------------------------------------------------------- read_text


def test_read_text_plain(tmp_path: Path) -> None:
    p = tmp_path / "a.txt"
    p.write_text(" = Title = \r\nbody é\n", encoding="utf-8", newline="")
    assert read_text(p) == " = Title = \r\nbody é\n"  # line endings kept


def test_read_text_strips_bom(tmp_path: Path) -> None:
    p = tmp_path / "bom.txt"
    p.write_bytes(b"\xef\xbb\xbf hello\n")
    assert read_text(p) == " hello\n"


@pytest.mark.parametrize(
    ("content", "fragment"),
    [
        (None, "does not exist"),
        (b"", "is empty"),
        (b"\xef\xbb\xbf", "is empty"),
        (b" \n\t\n", "no text"),
        (b"abc\x00def", "binary file (NUL byte at byte offset 3)"),
        (b"\xef\xbb\xbfab\x00", "byte offset 5"),  # offsets count from the file start
        (b"hello \xff world", "not valid UTF-8 (byte 0xff at byte offset 6"),
        (b"\xef\xbb\xbfok \xc3(", "byte offset 6"),
    ],
)
def test_read_text_errors(tmp_path: Path, content: bytes | None, fragment: str) -> None:
    p = tmp_path / "t.txt"
    if content is not None:
        p.write_bytes(content)
    with pytest.raises(GptqflowError) as exc:
        read_text(p)
    assert fragment in str(exc.value)
    assert str(p) in str(exc.value)


def test_read_text_directory(tmp_path: Path) -> None:
    with pytest.raises(GptqflowError, match="is a directory"):
        read_text(tmp_path)


def test_read_text_shared_data_starts_after_bom(shared_data_dir: Path) -> None:
    text = read_text(shared_data_dir / "wikitext2-valid.txt")
    assert not text.startswith("\ufeff")
    assert "<unk>" in text


# ---------------------------------------------------------------- tokenizer


def test_load_tokenizer_missing_dir(tmp_path: Path) -> None:
    with pytest.raises(GptqflowError, match="does not exist"):
        load_tokenizer(tmp_path / "nope")


def test_load_tokenizer_dir_without_tokenizer(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(GptqflowError, match="has no tokenizer") as exc:
        load_tokenizer(tmp_path)
    assert str(tmp_path) in str(exc.value)


def test_load_tokenizer_corrupt(tmp_path: Path) -> None:
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(GptqflowError, match="could not be loaded"):
        load_tokenizer(tmp_path)


def test_tokenize_text_no_special_tokens(tiny_tokenizer_dir: Path) -> None:
    tok = load_tokenizer(tiny_tokenizer_dir)
    text = " = Robert Boulter = \n Robert Boulter is an English film actor .\n"
    ids = tokenize_text(tok, text)
    assert ids.dtype == torch.long and ids.dim() == 2 and ids.shape[0] == 1
    assert ids[0].tolist() == tok(text, add_special_tokens=False).input_ids
    assert tok.bos_token_id not in ids[0].tolist()
    assert tok.decode(ids[0]) == text  # byte-level: lossless round trip


def test_tokenize_text_slow_tokenizer_path() -> None:
    class SlowTokenizer:  # no backend_tokenizer: falls back to .encode
        def encode(self, text: str, add_special_tokens: bool) -> list[int]:
            assert add_special_tokens is False
            return [ord(c) for c in text]

    assert tokenize_text(SlowTokenizer(), "ab").tolist() == [[97, 98]]


# ---------------------------------------------------------------- windows


def test_windows_deterministic_sorted_disjoint() -> None:
    starts = calibration_windows(n_tokens=100_000, num_samples=64, seq_len=512, seed=1234)
    assert starts == calibration_windows(100_000, 64, 512, 1234)
    assert starts == sorted(starts) and len(set(starts)) == 64
    assert all(s % 512 == 0 and s + 512 <= 100_000 for s in starts)
    assert all(b - a >= 512 for a, b in itertools.pairwise(starts))  # no overlap
    assert starts != calibration_windows(100_000, 64, 512, 1235)


def test_windows_frozen_for_seed() -> None:
    """The selection for a seed is part of reproducibility: changing it changes results."""
    assert calibration_windows(10_000, 4, 100, seed=0) == [2800, 4300, 7600, 8400]


def test_windows_use_every_slot_when_needed() -> None:
    assert calibration_windows(n_tokens=1030, num_samples=4, seq_len=256, seed=7) == [
        0,
        256,
        512,
        768,
    ]


def test_too_few_tokens_message_has_counts() -> None:
    with pytest.raises(GptqflowError) as exc:
        calibration_windows(n_tokens=1000, num_samples=4, seq_len=300, seed=0)
    msg = str(exc.value)
    assert "1000 tokens" in msg and "4 samples of 300 tokens" in msg and "1200" in msg


@pytest.mark.parametrize(("num_samples", "seq_len"), [(0, 10), (3, 0), (-1, 5)])
def test_windows_reject_bad_sizes(num_samples: int, seq_len: int) -> None:
    with pytest.raises(GptqflowError, match="num_samples > 0 and seq_len > 0"):
        calibration_windows(1000, num_samples, seq_len, seed=0)


@pytest.mark.parametrize(("population", "k"), [(1, 1), (5, 5), (10, 3), (10_000_000, 50)])
def testseeded_sample_distinct_in_range(population: int, k: int) -> None:
    for seed in range(5):
        got = seeded_sample(population, k, seed)
        assert len(set(got)) == k and all(0 <= x < population for x in got)


def testseeded_sample_covers_population() -> None:
    seen = {x for seed in range(200) for x in seeded_sample(20, 2, seed)}
    assert seen == set(range(20))


def test_calibration_samples_match_windows() -> None:
    stream = torch.arange(5000).unsqueeze(0)
    samples = calibration_samples(stream, num_samples=8, seq_len=100, seed=3)
    starts = calibration_windows(5000, 8, 100, 3)
    assert samples.shape == (8, 100) and samples.dtype == torch.long
    assert samples[:, 0].tolist() == starts
    assert torch.equal(samples[:, 1:] - samples[:, :-1], torch.ones(8, 99, dtype=torch.long))


def test_rank_slices_rebuild_the_full_set() -> None:
    """A rank can materialise only its own samples; the union equals the full set."""
    stream = torch.arange(20_000)
    starts = calibration_windows(20_000, 10, 128, seed=5)
    full = windows_to_tensor(stream, starts, 128)
    world = 3
    parts = [windows_to_tensor(stream, starts[r::world], 128) for r in range(world)]
    rebuilt = torch.empty_like(full)
    for r, part in enumerate(parts):
        rebuilt[r::world] = part
    assert torch.equal(rebuilt, full)
    assert windows_to_tensor(stream, [], 128).shape == (0, 128)


def test_calibration_from_shared_data(shared_data_dir: Path, tiny_tokenizer_dir: Path) -> None:
    tok = load_tokenizer(tiny_tokenizer_dir)
    ids = tokenize_text(tok, read_text(shared_data_dir / "wikitext2-valid.txt"))
    samples = calibration_samples(ids, num_samples=128, seq_len=512, seed=0)
    assert samples.shape == (128, 512)
    assert int(samples.max()) < len(tok)
