"""The command line as a user meets it: ``python -m gptqflow ...`` in a directory of their own.

``run_cli`` runs one command in a subprocess (the exit status, stdout and stderr a user
sees) in a fresh, empty working directory, so a test can also check that a refused
command left no directory behind. ``workspace`` is a checkout-like directory for
commands that run a recipe: ``GPTQFLOW_CACHE`` holds the tiny test Llama under the
SmolLM2 name (so the smollm2_* recipes, and ``gptqflow run`` alone, quantize it),
``GPTQFLOW_RECIPES`` a copy of ``recipes/`` whose dataset option reads short text files.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import yaml

from helpers import FALLBACK_TEXT

REPO = Path(__file__).resolve().parents[2]
SHARED_DATA = REPO.parent / "shared" / "data"
TEXT_BYTES = 120_000  # of each WikiText split: ~40k tiny-tokenizer tokens
# The workspace's dataset option (the shipped one: 64 x 512 and 40960 eval tokens).
SMALL_DATASET = {"num_samples": 8, "seq_len": 32, "eval_tokens": 256, "seed": 0}


@dataclass(frozen=True)
class Result:
    code: int
    out: str
    err: str

    @property
    def text(self) -> str:
        return self.out + self.err


@dataclass(frozen=True)
class Workspace:
    root: Path  # the checkout: recipes/, and where commands run
    cache: Path  # GPTQFLOW_CACHE
    data: Path  # the short WikiText splits
    env: dict[str, str]


def base_env(**extra: str) -> dict[str, str]:
    """The user's environment, one torch thread per process (the machine is shared)."""
    env = dict(os.environ)
    for key in ("PYTEST_CURRENT_TEST", "TQDM_DISABLE", "HF_HUB_DISABLE_PROGRESS_BARS"):
        env.pop(key, None)
    for key in ("GPTQFLOW_RECIPES", "GPTQFLOW_CACHE"):
        env.pop(key, None)
    return {**env, "OMP_NUM_THREADS": "1", **extra}


def run_cli(
    *args: str, cwd: Path, env: dict[str, str] | None = None, timeout: float = 600
) -> Result:
    """``python -m gptqflow ARGS`` in ``cwd``, as a user would run it."""
    proc = subprocess.run(
        [sys.executable, "-m", "gptqflow", *args],
        cwd=cwd,
        env=env if env is not None else base_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    return Result(proc.returncode, proc.stdout, proc.stderr)


def run_shell(command: str, cwd: Path, env: dict[str, str], timeout: float = 600) -> Result:
    """A command line exactly as written (``gptqflow`` on PATH)."""
    proc = subprocess.run(
        ["bash", "-e", "-o", "pipefail", "-c", command],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    return Result(proc.returncode, proc.stdout, proc.stderr)


def assert_one_error(result: Result, code: int, *fragments: str) -> str:
    """A refusal: ``code``, one ``gptqflow: error:`` message holding every fragment, no
    traceback and none of Hydra's own text."""
    err = result.err
    assert result.code == code, result.text
    assert err.startswith("gptqflow: error: "), err
    assert err.count("gptqflow: error:") == 1, err
    for fragment in fragments:
        assert fragment in err, f"{fragment!r} not in:\n{err}"
    for hydra_text in ("Traceback", "Config search path", "HYDRA_FULL_ERROR", "append", " +"):
        assert hydra_text not in err, f"{hydra_text!r} in:\n{err}"
    return err


def make_workspace(root: Path, tiny_model: Path) -> Workspace:
    """A checkout (``recipes/``), ``shared/data`` with short texts, a cache with the tiny model."""
    work, data, cache = root / "gptqflow", root / "shared" / "data", root / "cache"
    work.mkdir(parents=True)
    data.mkdir(parents=True)
    shutil.copytree(REPO / "recipes", work / "recipes")
    shutil.copytree(tiny_model, cache / "models" / "SmolLM2-135M-Instruct")
    for split in ("valid", "test"):
        source = SHARED_DATA / f"wikitext2-{split}.txt"
        text = (
            source.read_bytes()[:TEXT_BYTES].decode("utf-8", errors="ignore")
            if source.is_file()
            else FALLBACK_TEXT * 4
        )
        (data / f"wikitext2-{split}.txt").write_text(text)
    option = work / "recipes" / "dataset" / "wikitext2.yaml"
    dataset = yaml.safe_load(option.read_text())
    dataset.update(
        SMALL_DATASET,
        calibration_file=str(data / "wikitext2-valid.txt"),
        eval_file=str(data / "wikitext2-test.txt"),
    )
    option.write_text(yaml.safe_dump(dataset, sort_keys=False))
    env = base_env(
        GPTQFLOW_RECIPES=str(work / "recipes"),
        GPTQFLOW_CACHE=str(cache),
        PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
    )
    return Workspace(work, cache, data, env)
