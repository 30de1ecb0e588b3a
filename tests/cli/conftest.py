"""Fixtures of the command-line tests (the helpers live in ``clitools.py``)."""

from __future__ import annotations

from pathlib import Path

import pytest
from clitools import Workspace, make_workspace


@pytest.fixture
def empty_dir(tmp_path: Path) -> Path:
    """A working directory that starts empty (a refused run must leave it so)."""
    work = tmp_path / "work"
    work.mkdir()
    return work


@pytest.fixture
def workspace(tmp_path: Path, tiny_llama_dir: Path) -> Workspace:
    """A checkout-like directory with the tiny model as SmolLM2 (see ``clitools``)."""
    return make_workspace(tmp_path, tiny_llama_dir)
