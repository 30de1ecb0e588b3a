"""Layer-loop progress: when it is drawn, and what it says."""

from __future__ import annotations

import io
import logging
import os

import pytest

from gptqflow.framework.progress import LayerProgress, format_tokens, progress_enabled


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


class _NoIsatty:
    def write(self, text: str) -> int:
        return len(text)


def test_drawn_only_when_asked_on_rank_0_at_a_terminal() -> None:
    assert progress_enabled(True, True, _Terminal())
    assert not progress_enabled(False, True, _Terminal())  # runtime.progress=false
    assert not progress_enabled(True, False, _Terminal())  # not rank 0
    assert not progress_enabled(True, True, io.StringIO())  # a file or a pipe
    closed = open(os.devnull, "w")  # noqa: SIM115
    closed.close()  # isatty() on a closed file raises ValueError
    assert not progress_enabled(True, True, closed)
    assert not progress_enabled(True, True, _NoIsatty())  # type: ignore[arg-type]


def test_default_stream_is_stderr_at_call_time(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("sys.stderr", _Terminal())
    assert progress_enabled(True, True)
    monkeypatch.setattr("sys.stderr", io.StringIO())
    assert not progress_enabled(True, True)


def test_bar_shows_layers_done_seconds_and_tokens() -> None:
    out = _Terminal()
    bar = LayerProgress(range(1, 4), 4, True, tokens=8192, file=out)
    seen = []
    for index in bar:
        seen.append(index)
        bar.layer_done(0.5)
    assert seen == [1, 2, 3]
    text = out.getvalue()
    assert "layers (8.19k tokens)" in text
    assert "4/4" in text  # a resumed run starts at 1 done of 4
    assert "layer=0.50s" in text and "tok/s=16.4k" in text
    assert bar.postfix(2.0) == {"layer": "2.00s", "tok/s": "4.1k"}


def test_disabled_bar_iterates_silently(capsys: pytest.CaptureFixture[str]) -> None:
    bar = LayerProgress(range(3), 3, False, tokens=100)
    for _ in bar:
        bar.layer_done(0.1)
    assert list(bar) == [0, 1, 2]
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err == ""


@pytest.mark.parametrize(
    ("n", "text"), [(512, "512"), (8192, "8.19k"), (1_250_000, "1.25M"), (3e9, "3G")]
)
def test_format_tokens(n: float, text: str) -> None:
    assert format_tokens(n) == text


def test_log_lines_print_above_the_bar_and_handlers_come_back(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    term = _Terminal()
    monkeypatch.setattr("sys.stderr", term)
    log = logging.getLogger("gptqflow")
    handler = logging.StreamHandler(term)
    log.addHandler(handler)
    monkeypatch.setattr(log, "level", logging.INFO)
    try:
        bar = LayerProgress(range(2), 2, True, tokens=64, file=term)
        for index in bar:
            bar.layer_done(0.25)
            log.info("layer %d logged", index)
        assert handler in log.handlers  # the console handler is back after the loop
    finally:
        log.removeHandler(handler)
    text = term.getvalue()
    assert "layer 0 logged\n" in text and "layer 1 logged\n" in text
    assert "]layer" not in text  # never glued to the end of the bar's line
