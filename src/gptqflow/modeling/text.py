"""Reading calibration / evaluation text and turning it into token windows.

Calibration and evaluation both work on one long token stream cut into fixed-length
windows. The window choice is a pure function of ``(n_tokens, num_samples, seq_len,
seed)`` so that every rank can compute the same plan and materialise only its own
slice of samples, without exchanging tensors.
"""

from __future__ import annotations

import os
import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from gptqflow.errors import GptqflowError

_UTF8_BOM = b"\xef\xbb\xbf"

# Files whose presence means "this directory has a tokenizer". Checked before calling
# transformers because its own error for a missing tokenizer is long and misleading.
_TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "vocab.json",
    "spiece.model",
)


def read_text(path: str | os.PathLike[str]) -> str:
    """Read a UTF-8 text file, with an actionable error for each way it can be wrong.

    A leading UTF-8 byte-order mark is dropped: it is an encoding artefact, not text,
    and would otherwise become a token (the shared WikiText files start with one).
    Line endings are kept as they are.
    """
    p = Path(path)
    if (problem := dataset_file_problem(p)) is not None:
        raise GptqflowError(problem)
    raw = _read_bytes(p)
    body = raw[len(_UTF8_BOM) :] if raw.startswith(_UTF8_BOM) else raw
    bom_len = len(raw) - len(body)
    nul = body.find(b"\x00")
    if nul >= 0:
        raise GptqflowError(
            f"{p}: looks like a binary file (NUL byte at byte offset {nul + bom_len}); "
            "give a plain UTF-8 text file (UTF-16 text also has NUL bytes: re-encode it "
            "as UTF-8)."
        )
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as e:
        raise GptqflowError(
            f"{p}: not valid UTF-8 (byte {body[e.start]:#04x} at byte offset "
            f"{e.start + bom_len}: {e.reason}); re-encode the file as UTF-8, e.g. "
            f"`iconv -f <encoding> -t UTF-8 {p}`."
        ) from None
    if not text.strip():
        raise GptqflowError(f"{p}: contains no text (only whitespace); give a non-empty text file.")
    return text


#: Data files and directories the plain-text route refuses: ``datasets`` reads them.
DATASET_SUFFIXES = (".json", ".jsonl", ".parquet", ".arrow")


def dataset_file_problem(p: Path) -> str | None:
    """Why ``p`` is a dataset rather than plain text (a data file or a directory), or None.

    Read as text, a chat JSONL would calibrate the model on JSON syntax, and a
    ``save_to_disk`` directory or a parquet file cannot be read at all.
    """
    if p.is_dir():
        what = "a directory"
    elif p.suffix.lower() in DATASET_SUFFIXES:
        what = f"a {p.suffix.lower()} data file"
    else:
        return None
    return (
        f"{p}: is {what}, not a plain-text file; the text route (dataset.calibration_file) "
        f"reads plain text only: for a dataset use `dataset=local dataset.path={p}`"
    )


def _read_bytes(p: Path) -> bytes:
    """Read a file's bytes, turning OS errors into messages that say what to fix."""
    if not p.exists():
        raise GptqflowError(
            f"{p}: text file does not exist; check the path (relative paths "
            f"are resolved from {Path.cwd()})."
        )
    if p.is_dir():
        raise GptqflowError(f"{p}: is a directory, not a text file; give the path of a .txt file.")
    try:
        raw = p.read_bytes()
    except OSError as e:
        raise GptqflowError(f"{p}: cannot be read ({e.strerror}); check its permissions.") from None
    if not raw or raw == _UTF8_BOM:
        raise GptqflowError(f"{p}: is empty; give a non-empty text file.")
    return raw


def load_tokenizer(model_dir: str | os.PathLike[str]) -> Any:
    """Load the tokenizer saved next to a model, strictly offline.

    ``local_files_only`` makes a typo in the path fail here instead of turning into
    a download attempt from the Hugging Face Hub.
    """
    from transformers import AutoTokenizer

    d = Path(model_dir)
    if not d.is_dir():
        raise GptqflowError(f"{d}: model directory does not exist; check the model path.")
    if not any((d / name).is_file() for name in _TOKENIZER_FILES):
        raise GptqflowError(
            f"{d}: has no tokenizer (none of {', '.join(_TOKENIZER_FILES)}); save one there "
            "with `tokenizer.save_pretrained(dir)` or point the model path at a full "
            "Hugging Face model directory."
        )
    try:
        return AutoTokenizer.from_pretrained(str(d), local_files_only=True)
    except Exception as e:  # transformers raises many unrelated types here
        raise GptqflowError(
            f"{d}: the tokenizer could not be loaded ({type(e).__name__}: {e}); check that "
            "the tokenizer files are complete and were written by a compatible transformers."
        ) from e


def tokenize_text(tokenizer: Any, text: str) -> torch.Tensor:
    """Tokenize a whole text as one stream: LongTensor of shape ``[1, n]``.

    No special tokens (no BOS): calibration and perplexity windows are cut from the
    middle of the stream, so a BOS at position 0 of the stream would be seen by one
    window only. Fast tokenizers are called through their Rust backend directly,
    which avoids transformers' "sequence longer than model_max_length" warning and
    tokenizes the 1.3 MB WikiText test split in well under a second.
    """
    return torch.tensor(encode(tokenizer, text), dtype=torch.long).unsqueeze(0)


def encode(tokenizer: Any, text: str) -> list[int]:
    """Token ids of ``text`` without special tokens (see :func:`tokenize_text`)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        return list(backend.encode(text, add_special_tokens=False).ids)
    return list(tokenizer.encode(text, add_special_tokens=False))


def calibration_windows(n_tokens: int, num_samples: int, seq_len: int, seed: int) -> list[int]:
    """Start offsets of ``num_samples`` non-overlapping windows of ``seq_len`` tokens.

    The stream is divided into ``n_tokens // seq_len`` aligned slots; a seeded sample
    of distinct slots is taken and returned **sorted** (text order), so no token is
    used twice and the result does not depend on how samples are later split across
    ranks. The choice uses only ``random.Random(seed).random()``, the one generator
    output Python guarantees to be stable across versions, so the same seed selects
    the same text everywhere. When every slot is needed, all are used in order.
    """
    if num_samples <= 0 or seq_len <= 0:
        raise GptqflowError(
            f"calibration needs num_samples > 0 and seq_len > 0 (got num_samples={num_samples}, "
            f"seq_len={seq_len}); fix the dataset settings of the recipe."
        )
    n_slots = n_tokens // seq_len
    if n_slots < num_samples:
        raise GptqflowError(
            f"the calibration text has {n_tokens} tokens, but {num_samples} samples of "
            f"{seq_len} tokens need {num_samples * seq_len}; use fewer samples, a shorter "
            "seq_len, or a longer text."
        )
    slots = seeded_sample(n_slots, num_samples, seed)
    return [slot * seq_len for slot in sorted(slots)]


def seeded_sample(population: int, k: int, seed: int) -> list[int]:
    """``k`` distinct integers from ``range(population)``: a partial Fisher-Yates shuffle.

    Written out (instead of ``random.sample``) because only ``random()`` is promised to
    give the same sequence for a seed across Python versions. The pool is a dict of
    swapped-out entries, so memory is O(k) even for a huge population.
    """
    rng = random.Random(seed)
    swapped: dict[int, int] = {}
    chosen: list[int] = []
    for i in range(k):
        j = i + int(rng.random() * (population - i))
        chosen.append(swapped.get(j, j))
        swapped[j] = swapped.get(i, i)
    return chosen


def windows_to_tensor(token_ids: torch.Tensor, starts: Sequence[int], seq_len: int) -> torch.Tensor:
    """Stack the windows ``token_ids[start : start + seq_len]``: LongTensor ``[len(starts), seq_len]``.

    Takes any subset of :func:`calibration_windows`' offsets, so a rank can build only
    the samples it owns. ``token_ids`` may be ``[n]`` or ``[1, n]``.
    """
    stream = _as_stream(token_ids)
    for s in starts:
        assert s >= 0 and s + seq_len <= stream.numel(), (s, seq_len, stream.numel())
    if not starts:
        return torch.empty((0, seq_len), dtype=torch.long)
    return torch.stack([stream[s : s + seq_len] for s in starts]).to(torch.long)


def calibration_samples(
    token_ids: torch.Tensor, num_samples: int, seq_len: int, seed: int
) -> torch.Tensor:
    """All calibration samples at once: LongTensor ``[num_samples, seq_len]`` (see
    :func:`calibration_windows` for how windows are chosen)."""
    stream = _as_stream(token_ids)
    starts = calibration_windows(stream.numel(), num_samples, seq_len, seed)
    return windows_to_tensor(stream, starts, seq_len)


def _as_stream(token_ids: torch.Tensor) -> torch.Tensor:
    """View a ``[n]`` or ``[1, n]`` token tensor as ``[n]``."""
    if token_ids.dim() == 2:
        assert token_ids.shape[0] == 1, (
            f"expected one token stream, got shape {tuple(token_ids.shape)}"
        )
        return token_ids[0]
    assert token_ids.dim() == 1, (
        f"expected [n] or [1, n] token ids, got shape {tuple(token_ids.shape)}"
    )
    return token_ids
