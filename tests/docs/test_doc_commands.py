"""Docs that cannot rot: every shell command in README.md and docs/*.md is run by a test.

Each fenced shell block (```` ```bash ````, ``sh``, ``shell``) is preceded by a marker,
an HTML comment that GitHub does not render:

* ``<!-- test: run -->``: the test runs the block; ``<!-- test: run, exit=1 -->`` when
  the block is meant to fail (a lint that finds problems);
* ``<!-- test: skip: REASON -->``: not run, for the reason given (it installs packages,
  needs two machines, is a benchmark of many minutes ...).

A shell block without a marker, a marker without a block, a skip without a reason and
a fenced block without a language are errors (fast test), so a new doc cannot skip the
decision. ``console`` blocks are refused: commands go in ``bash``, their output in ``text``.

The blocks of one document run in order, in one workspace laid out like a user's
checkout (``gptqflow/`` next to ``shared/data/``), each block starting in the checkout
root with ``bash -e -o pipefail``. The doc text stays what a user types; only the
environment is small: ``GPTQFLOW_CACHE`` holds the tiny test Llama under the SmolLM2
name (so ``gptqflow prepare-model`` finds it prepared and ``--config-name smollm2_w4a16``
quantizes it), ``GPTQFLOW_RECIPES`` is a copy of ``recipes/`` whose ``dataset/wikitext2``
option reads short text files with few, short samples, and ``shared/data`` holds those
files. Running quantizations, even tiny ones, takes longer than the default suite allows
on a busy machine, so the runs are ``slow`` tests (``python -m pytest -m slow``).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from helpers import FALLBACK_TEXT

REPO = Path(__file__).resolve().parents[2]
SHELL_LANGUAGES = ("bash", "sh", "shell")
REFUSED_LANGUAGES = {"console": "put commands in ```bash and their output in ```text"}
MARKER = re.compile(r"^\s*<!--\s*test:\s*(?P<body>.*?)\s*-->\s*$")
FENCE = re.compile(r"^(?P<indent>\s*)(?P<fence>`{3,}|~{3,})(?P<info>.*)$")
# The small dataset option the doc workspace uses (the shipped one: 64 x 512, 40960 eval tokens).
DOC_DATASET = {"num_samples": 8, "seq_len": 32, "eval_tokens": 256, "seed": 0}
TEXT_BYTES = (
    120_000  # of each shared WikiText split: ~40k tiny-tokenizer tokens, enough for 128 x 32
)


@dataclass(frozen=True)
class Block:
    """A fenced code block of a Markdown file and the test marker right above it."""

    file: str
    line: int  # 1-based line of the opening fence
    language: str
    body: str
    marker: str | None  # the marker's text after "test:", None when there is none

    @property
    def where(self) -> str:
        return f"{self.file}:{self.line}"


@dataclass(frozen=True)
class Plan:
    """What the marker asks for: run (expecting ``exit``), or skip (with ``reason``)."""

    run: bool
    exit: int = 0
    reason: str = ""


def fenced_blocks(text: str, file: str) -> tuple[list[Block], list[str]]:
    """Every fenced block with the marker on the last non-blank line above it; and stray markers."""
    lines = text.splitlines()
    blocks: list[Block] = []
    stray: list[str] = []
    pending: tuple[int, str] | None = None  # a marker not yet attached to a block
    i = 0
    while i < len(lines):
        line = lines[i]
        marker = MARKER.match(line)
        fence = FENCE.match(line)
        if marker:
            if pending:
                stray.append(f"{file}:{pending[0]}: test marker not followed by a fenced block")
            pending = (i + 1, marker.group("body"))
        elif fence:
            indent, ticks = len(fence.group("indent")), fence.group("fence")
            close = re.compile(rf"^\s*{re.escape(ticks[0])}{{{len(ticks)},}}\s*$")
            j = i + 1
            while j < len(lines) and not close.match(lines[j]):
                j += 1
            body = "\n".join(
                raw[indent:] if raw[:indent].isspace() else raw for raw in lines[i + 1 : j]
            )
            language = (
                fence.group("info").strip().split(" ")[0] if fence.group("info").strip() else ""
            )
            blocks.append(
                Block(file, i + 1, language, body + "\n", pending[1] if pending else None)
            )
            pending = None
            i = j
        elif line.strip() and pending:
            stray.append(f"{file}:{pending[0]}: test marker not followed by a fenced block")
            pending = None
        i += 1
    if pending:
        stray.append(f"{file}:{pending[0]}: test marker not followed by a fenced block")
    return blocks, stray


def parse_marker(text: str) -> Plan:
    """``run``, ``run, exit=N`` or ``skip: REASON``; raises ValueError naming what is allowed."""
    if text.startswith("skip"):
        reason = text[len("skip") :].lstrip(":").strip()
        if len(reason.split()) < 2:
            raise ValueError(f"'test: {text}': say why it is not run (test: skip: REASON)")
        return Plan(run=False, reason=reason)
    head, *options = [part.strip() for part in text.split(",")]
    if head != "run":
        raise ValueError(f"'test: {text}': expected 'run', 'run, exit=N' or 'skip: REASON'")
    expect = 0
    for option in options:
        match = re.fullmatch(r"exit=(\d+)", option)
        if not match:
            raise ValueError(f"'test: {text}': unknown option {option!r}; allowed: exit=N")
        expect = int(match.group(1))
    return Plan(run=True, exit=expect)


def marker_problems(blocks: list[Block]) -> list[str]:
    """Why the blocks' markers are not acceptable (empty when all are)."""
    out = []
    for b in blocks:
        if not b.language:
            out.append(
                f"{b.where}: fenced block without a language; use ```bash, ```text, ```yaml ..."
            )
        elif b.language in REFUSED_LANGUAGES:
            out.append(f"{b.where}: ```{b.language} block: {REFUSED_LANGUAGES[b.language]}")
        elif b.language in SHELL_LANGUAGES and b.marker is None:
            out.append(
                f"{b.where}: shell block without a test marker; put <!-- test: run --> or "
                "<!-- test: skip: REASON --> on the line above it"
            )
        elif b.marker is not None and b.language not in SHELL_LANGUAGES:
            out.append(f"{b.where}: test marker on a ```{b.language} block; only shell blocks run")
        elif b.marker is not None:
            try:
                parse_marker(b.marker)
            except ValueError as exc:
                out.append(f"{b.where}: {exc}")
    return out


def doc_files() -> list[Path]:
    return [REPO / "README.md", *sorted((REPO / "docs").rglob("*.md"))]


def _blocks(path: Path) -> tuple[list[Block], list[str]]:
    return fenced_blocks(path.read_text(), str(path.relative_to(REPO)))


def _wants_run(block: Block) -> bool:
    """A ``test: run`` block (a malformed marker is reported by the fast test, not here)."""
    try:
        return block.marker is not None and parse_marker(block.marker).run
    except ValueError:
        return False


def _runnable(path: Path) -> list[Block]:
    blocks, _ = _blocks(path)
    return [b for b in blocks if b.language in SHELL_LANGUAGES and _wants_run(b)]


# --- fast: the markers ------------------------------------------------------------------


@pytest.mark.parametrize("path", doc_files(), ids=lambda p: str(p.relative_to(REPO)))
def test_every_shell_block_says_whether_it_is_tested(path: Path) -> None:
    blocks, stray = _blocks(path)
    assert stray + marker_problems(blocks) == []


def test_the_marker_check_catches_unmarked_and_unexplained_blocks() -> None:
    doc = (
        "<!-- test: run -->\n```bash\ngptqflow lint recipes/\n```\n\n"
        "```bash\ngptqflow run\n```\n"
        "<!-- test: skip -->\n```sh\npip install x\n```\n"
        "```\nno language\n```\n"
        "<!-- test: run, exit=one -->\n```bash\nfalse\n```\n"
        "<!-- test: run -->\nsome prose\n\n"
        "```console\n$ gptqflow stages\n```\n"
        "  <!-- test: skip: needs two machines -->\n  ```bash\n  torchrun --nnodes=2\n  ```\n"
    )
    blocks, stray = fenced_blocks(doc, "d.md")
    assert [b.line for b in blocks] == [2, 6, 10, 13, 17, 23, 27]
    assert (
        blocks[6].body == "torchrun --nnodes=2\n" and blocks[6].marker == "skip: needs two machines"
    )
    assert stray == ["d.md:20: test marker not followed by a fenced block"]
    problems = marker_problems(blocks)
    assert len(problems) == 5, problems
    assert problems[0].startswith("d.md:6: shell block without a test marker")
    assert problems[1].startswith("d.md:10: 'test: skip': say why")
    assert problems[2].startswith("d.md:13: fenced block without a language")
    assert problems[3].startswith("d.md:17: 'test: run, exit=one': unknown option 'exit=one'")
    assert problems[4].startswith("d.md:23: ```console block")
    assert parse_marker("run, exit=1") == Plan(run=True, exit=1)
    assert parse_marker("skip: installs packages") == Plan(run=False, reason="installs packages")


# --- slow: run them ---------------------------------------------------------------------


def make_workspace(root: Path, tiny_model: Path) -> tuple[Path, dict[str, str]]:
    """A checkout-like directory to run doc commands in, and the environment to run them with."""
    work, data, cache = root / "gptqflow", root / "shared" / "data", root / "cache"
    work.mkdir(parents=True)
    data.mkdir(parents=True)
    shutil.copytree(REPO / "recipes", work / "recipes")
    for name in ("configs", "bench", "schema", "tests"):  # read-only inputs commands name
        (work / name).symlink_to(REPO / name)
    (work / "docs").mkdir()  # commands may write here; never into the real docs
    shutil.copytree(tiny_model, cache / "models" / "SmolLM2-135M-Instruct")
    shared = REPO.parent / "shared" / "data"
    for split in ("valid", "test"):
        source = shared / f"wikitext2-{split}.txt"
        text = (
            source.read_bytes()[:TEXT_BYTES].decode("utf-8", errors="ignore")
            if source.is_file()
            else FALLBACK_TEXT * 4
        )
        (data / f"wikitext2-{split}.txt").write_text(text)
    option = work / "recipes" / "dataset" / "wikitext2.yaml"
    dataset = yaml.safe_load(option.read_text())
    dataset.update(
        DOC_DATASET,
        calibration_file=str(data / "wikitext2-valid.txt"),
        eval_file=str(data / "wikitext2-test.txt"),
    )
    option.write_text(yaml.safe_dump(dataset, sort_keys=False))
    local = work / "recipes" / "dataset" / "local.yaml"  # dataset=local: the same sizes
    rows = yaml.safe_load(local.read_text())
    rows.update(DOC_DATASET, eval_file=str(data / "wikitext2-test.txt"))
    local.write_text(yaml.safe_dump(rows, sort_keys=False))
    env = {
        **os.environ,
        "GPTQFLOW_RECIPES": str(work / "recipes"),
        "GPTQFLOW_CACHE": str(cache),
        "OMP_NUM_THREADS": "1",
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
    }
    env.pop("PYTEST_CURRENT_TEST", None)
    return work, env


def run_block(block: Block, cwd: Path, env: dict[str, str], timeout: float = 600) -> str | None:
    """Run one block as a user would; None when it did what its marker says, else why not."""
    plan = parse_marker(block.marker or "")
    proc = subprocess.run(
        ["bash", "-e", "-o", "pipefail", "-c", block.body],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if proc.returncode == plan.exit:
        return None
    tail = (proc.stdout + proc.stderr)[-3000:]
    return (
        f"{block.where}: exit {proc.returncode}, expected {plan.exit}\n"
        f"--- block ---\n{block.body}--- output (tail) ---\n{tail}"
    )


def test_run_block_reports_the_failing_block(tmp_path: Path) -> None:
    ok = Block("d.md", 3, "bash", "echo hi > out.txt\n", "run")
    bad = Block("d.md", 9, "bash", "echo starting\nfalse\necho never\n", "run")
    refused = Block("d.md", 12, "bash", "exit 1\n", "run, exit=1")
    env = dict(os.environ)
    assert run_block(ok, tmp_path, env) is None and (tmp_path / "out.txt").read_text() == "hi\n"
    why = run_block(bad, tmp_path, env)
    assert why is not None and why.startswith("d.md:9: exit 1, expected 0") and "starting" in why
    assert "never" not in why.split("--- output (tail) ---")[1]  # bash -e stopped at `false`
    assert run_block(refused, tmp_path, env) is None


@pytest.mark.slow
@pytest.mark.parametrize(
    "path",
    [p for p in doc_files() if _runnable(p)],
    ids=lambda p: str(p.relative_to(REPO)),
)
def test_doc_commands_run(path: Path, tmp_path: Path, tiny_chat_llama_dir: Path) -> None:
    """Every ``test: run`` block of one document, in order, in one workspace."""
    work, env = make_workspace(tmp_path, tiny_chat_llama_dir)  # a chat template for data.md
    for block in _runnable(path):
        failure = run_block(block, work, env)
        assert failure is None, failure
