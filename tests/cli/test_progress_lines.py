"""Progress where a person waits, without a terminal: a log line every ~10 s, not silence.

In-process (no subprocess can be made to wait ten seconds cheaply): the evaluation's
:class:`WorkProgress` on a fake clock, and the switches that keep other libraries' bars
quiet unless asked for.
"""

from __future__ import annotations

import io
import logging
import os

import pytest

from gptqflow.framework.progress import LOG_EVERY_S, WorkProgress, library_bars


class _Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_log_line_at_most_every_ten_seconds(caplog: pytest.LogCaptureFixture) -> None:
    clock = _Clock()
    caplog.set_level(logging.INFO, logger="gptqflow")
    with WorkProgress(
        8, "perplexity (baseline)", "window", bar=False, log_lines=True, clock=clock
    ) as p:
        for step in range(8):
            clock.now += 4.0  # one window: 4 s
            p.update()
            if step == 0:
                assert caplog.messages == []  # nothing before 10 s
    # 4 s a step: lines after 12 s and 24 s (steps 3 and 6), none for the last step
    assert caplog.messages == [
        "perplexity (baseline): 3/8 windows (38%), 12s, about 20s left",
        "perplexity (baseline): 6/8 windows (75%), 24s, about 8s left",
    ]
    assert LOG_EVERY_S == 10.0


def test_no_log_lines_off_rank_0_or_with_a_bar(caplog: pytest.LogCaptureFixture) -> None:
    clock = _Clock()
    caplog.set_level(logging.INFO, logger="gptqflow")
    with WorkProgress(3, "x", "window", bar=False, log_lines=False, clock=clock) as p:
        for _ in range(3):
            clock.now += 60.0
            p.update()
    terminal = io.StringIO()
    terminal.isatty = lambda: True  # type: ignore[method-assign]
    with WorkProgress(3, "x", "window", bar=True, log_lines=True, file=terminal, clock=clock) as p:
        for _ in range(3):
            clock.now += 60.0
            p.update()
    assert caplog.messages == []
    assert "/3 [" in terminal.getvalue()  # the bar was drawn (and cleared: leave=False)


def test_other_libraries_bars_are_off_unless_asked(monkeypatch: pytest.MonkeyPatch) -> None:
    from tqdm import tqdm

    monkeypatch.delenv("TQDM_DISABLE", raising=False)
    monkeypatch.delenv("HF_HUB_DISABLE_PROGRESS_BARS", raising=False)
    with library_bars(show=False):
        assert os.environ["TQDM_DISABLE"] == "1"  # read by tqdm in processes started here
        assert os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] == "1"
    assert "TQDM_DISABLE" not in os.environ  # put back
    with library_bars(show=True):
        assert "TQDM_DISABLE" not in os.environ
    monkeypatch.setenv("TQDM_DISABLE", "0")  # the user's own setting wins
    with library_bars(show=False):
        assert os.environ["TQDM_DISABLE"] == "0"
    out = io.StringIO()
    for _ in tqdm(range(2), file=out, disable=False):  # ours pass disable=False explicitly
        pass
    assert "2/2" in out.getvalue()


def test_transformers_bars_follow_the_switch() -> None:
    from transformers.utils import logging as tf_logging

    was = tf_logging.is_progress_bar_enabled()
    tf_logging.enable_progress_bar()
    try:
        with library_bars(show=False):
            assert not tf_logging.is_progress_bar_enabled()
        assert tf_logging.is_progress_bar_enabled()
    finally:
        (tf_logging.enable_progress_bar if was else tf_logging.disable_progress_bar)()
