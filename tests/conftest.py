"""Session-wide fixtures: the shared data folder, a tiny tokenizer and a tiny Llama.

The tiny model and tokenizer are built at test time (seconds, deterministic) so the
suite never downloads anything and never depends on a cache outside the repository.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from helpers import FALLBACK_TEXT, make_tiny_llama, train_tiny_tokenizer, with_chat_template

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA_DIR = REPO_ROOT.parent / "shared" / "data"
TOKENIZER_TRAIN_BYTES = 200_000


def pytest_configure(config: pytest.Config) -> None:
    """Run torch single-threaded in the test process (override: ``GPTQFLOW_TEST_THREADS``).

    The tiny test models are far too small to gain from intra-op threads, and on a
    busy 2-core machine OpenMP's spinning threads made one tiny forward pass ~300x
    slower (0.5 s instead of 2 ms). Spawned distributed workers are not affected.
    """
    torch.set_num_threads(int(os.environ.get("GPTQFLOW_TEST_THREADS", "1")))


@pytest.fixture(scope="session")
def shared_data_dir() -> Path:
    """``../shared/data`` from the repository root; skips the test when it is absent."""
    if not (SHARED_DATA_DIR / "wikitext2-valid.txt").is_file():
        pytest.skip(
            f"shared data not found at {SHARED_DATA_DIR} (wikitext2-*.txt); "
            "this test needs the project's shared data folder"
        )
    return SHARED_DATA_DIR


def _tokenizer_training_text() -> str:
    """The first ~200 KB of the calibration split, or a built-in text without shared data."""
    path = SHARED_DATA_DIR / "wikitext2-valid.txt"
    if not path.is_file():
        return FALLBACK_TEXT
    raw = path.read_bytes()[:TOKENIZER_TRAIN_BYTES]
    return raw.decode("utf-8", errors="ignore").removeprefix("\ufeff")


@pytest.fixture(scope="session")
def tiny_tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A byte-level BPE tokenizer (vocab 512) saved as a transformers tokenizer."""
    out = tmp_path_factory.mktemp("tiny_tokenizer")
    return train_tiny_tokenizer(out, _tokenizer_training_text())


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory: pytest.TempPathFactory, tiny_tokenizer_dir: Path) -> Path:
    """A seeded 2-layer Llama (hidden 128, intermediate 256) plus tokenizer, safetensors."""
    out = tmp_path_factory.mktemp("tiny_llama")
    return make_tiny_llama(out, tiny_tokenizer_dir)


@pytest.fixture(scope="session")
def tiny_llama3_dir(tmp_path_factory: pytest.TempPathFactory, tiny_tokenizer_dir: Path) -> Path:
    """The tiny Llama with 3 decoder layers: a crash after layer 1 leaves work before and after."""
    out = tmp_path_factory.mktemp("tiny_llama3")
    return make_tiny_llama(out, tiny_tokenizer_dir, num_hidden_layers=3)


@pytest.fixture(scope="session")
def tiny_chat_llama_dir(tmp_path_factory: pytest.TempPathFactory, tiny_llama_dir: Path) -> Path:
    """The tiny Llama whose tokenizer has a ChatML-style chat template."""
    return with_chat_template(tiny_llama_dir, tmp_path_factory.mktemp("tiny_chat_llama"))


@pytest.fixture(scope="session")
def chat_source_text() -> str:
    """Text to cut conversations from: the shared validation split, or the built-in text."""
    path = SHARED_DATA_DIR / "wikitext2-valid.txt"
    return path.read_text(encoding="utf-8") if path.is_file() else FALLBACK_TEXT
