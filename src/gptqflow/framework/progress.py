"""Progress where a person waits: the layer loop, evaluation windows, other libraries' bars.

A bar is only worth drawing for a person watching a terminal: on other ranks, when
stderr (where tqdm draws) is redirected to a file or a pipe, or with
``runtime.progress=false`` nothing is drawn. The layer loop's per-layer log lines
(which go to ``run.log`` too) then carry the same numbers; longer waits made of many
small steps (the evaluation windows) log a line every ``LOG_EVERY_S`` seconds instead
(:class:`WorkProgress`), so a run writing to a file or a pipe never goes quiet for minutes.

Other libraries draw bars of their own (transformers' "Loading weights",
compressed-tensors' "Decompressing model"): :func:`library_bars` turns those off
unless asked for (``--verbose``); ours are drawn with ``disable=False`` so they stay.
"""

from __future__ import annotations

import importlib
import logging
import os
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TextIO

#: Seconds between two progress log lines when no bar is drawn.
LOG_EVERY_S = 10.0

log = logging.getLogger("gptqflow")


def progress_enabled(requested: bool, is_main: bool, stream: TextIO | None = None) -> bool:
    """Draw progress bars? Only if asked for, on rank 0, and ``stream`` is a terminal.

    ``stream`` defaults to ``sys.stderr`` (looked up at call time, so a redirection
    in force then counts). A closed or replaced stream without ``isatty`` counts as
    not a terminal.
    """
    if not (requested and is_main):
        return False
    stream = sys.stderr if stream is None else stream
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError, OSError):  # no isatty, or a closed file
        return False


def format_tokens(n: float) -> str:
    """``8192`` -> ``8.2k``; ``1_250_000`` -> ``1.25M``: short enough for a bar's postfix."""
    for limit, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(n) >= limit:
            value = n / limit
            return f"{value:.3g}{suffix}"
    return f"{n:.0f}"


def _prints(logger: logging.Logger) -> bool:
    """Whether ``logger`` has its own handler writing to the console (stdout or stderr)."""
    return any(
        isinstance(h, logging.StreamHandler)
        and not isinstance(h, logging.FileHandler)
        and h.stream in (sys.stdout, sys.stderr)
        for h in logger.handlers
    )


class LayerProgress:
    """Iterate over layer indices; on rank 0 at a terminal, draw ``layers k/N`` with per-layer stats.

    ``indices`` may start after 0 (a resumed run): the bar then starts at that many
    layers done out of ``total``. ``tokens`` is the number of calibration tokens every
    layer runs on (all ranks together); with it, each layer's postfix shows its
    throughput next to its seconds.
    """

    def __init__(
        self,
        indices: range,
        total: int,
        enabled: bool,
        tokens: int = 0,
        file: TextIO | None = None,
    ) -> None:
        self.indices = indices
        self.total = total
        self.tokens = tokens
        self.bar: Any = None
        if enabled:
            from tqdm.auto import tqdm

            desc = f"layers ({format_tokens(tokens)} tokens)" if tokens else "layers"
            self.bar = tqdm(
                total=total,
                initial=indices.start,
                desc=desc,
                unit="layer",
                file=file,
                disable=False,  # drawn even where other libraries' bars are off
            )

    def __iter__(self) -> Iterator[int]:
        if self.bar is None:
            yield from self.indices
            return
        from tqdm.contrib.logging import logging_redirect_tqdm

        # Console log lines go through tqdm.write while the bar is up, so a layer's log
        # line prints above the bar instead of being glued to its end.
        loggers = [lg for lg in (logging.getLogger(), logging.getLogger("gptqflow")) if _prints(lg)]
        with logging_redirect_tqdm(loggers=loggers, tqdm_class=type(self.bar)):
            try:
                yield from self.indices
            finally:
                self.bar.close()

    def postfix(self, seconds: float) -> dict[str, str]:
        """What the bar shows after a layer that took ``seconds``."""
        out = {"layer": f"{seconds:.2f}s"}
        if self.tokens and seconds > 0:
            out["tok/s"] = format_tokens(self.tokens / seconds)
        return out

    def layer_done(self, seconds: float) -> None:
        """Advance the bar by one layer that took ``seconds`` (no-op when not drawing)."""
        if self.bar is not None:
            self.bar.set_postfix(self.postfix(seconds), refresh=False)
            self.bar.update(1)


class WorkProgress:
    """``total`` steps of one wait (evaluation windows ...): a bar, or a log line every ``every`` s.

    ``bar``: draw a tqdm bar (rank 0 at a terminal, see :func:`progress_enabled`).
    ``log_lines``: otherwise log ``desc: k/N units (p%), Ts elapsed, about Ts left`` at
    most every ``every`` seconds (rank 0; the first after ``every`` seconds, none
    after the last step: the caller logs the result). Use as a context manager.
    """

    def __init__(
        self,
        total: int,
        desc: str,
        unit: str,
        *,
        bar: bool,
        log_lines: bool,
        every: float = LOG_EVERY_S,
        file: TextIO | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.total, self.desc, self.unit = total, desc, unit
        self.every = every
        self.log_lines = log_lines and not bar
        self.clock = clock
        self.done = 0
        self.started = self.last = clock()
        self.bar: Any = None
        if bar:
            from tqdm.auto import tqdm

            self.bar = tqdm(
                total=total, desc=desc, unit=unit, leave=False, file=file, disable=False
            )

    def __enter__(self) -> WorkProgress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def update(self, n: int = 1) -> None:
        """``n`` more steps done."""
        self.done += n
        if self.bar is not None:
            self.bar.update(n)
            return
        now = self.clock()
        if self.log_lines and self.done < self.total and now - self.last >= self.every:
            self.last = now
            log.info("%s", self.line(now - self.started))

    def line(self, elapsed: float) -> str:
        """What the log says after ``elapsed`` seconds."""
        pct = 100.0 * self.done / self.total if self.total else 100.0
        text = f"{self.desc}: {self.done}/{self.total} {self.unit}s ({pct:.0f}%), {elapsed:.0f}s"
        if 0 < self.done < self.total:
            left = elapsed * (self.total - self.done) / self.done
            text += f", about {left:.0f}s left"
        return text

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


# Environment switches of other libraries' progress bars, read when they are imported.
_QUIET_ENV = {
    "TQDM_DISABLE": "1",  # tqdm's default for disable= (compressed-tensors' bars)
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",  # huggingface_hub, and transformers' "Loading weights"
}


@contextmanager
def library_bars(show: bool) -> Iterator[None]:
    """Other libraries' progress bars off for this block (and the processes it starts), unless ``show``.

    Through their environment switches (a value the user set is kept), which a library
    reads when it is first imported, and, for transformers and huggingface_hub already
    imported, through their API. Everything is put back on exit.
    """
    if show:
        yield
        return
    set_here = [k for k in _QUIET_ENV if k not in os.environ]
    for key in set_here:
        os.environ[key] = _QUIET_ENV[key]
    restore = _disable_loaded_bars()
    try:
        yield
    finally:
        for key in set_here:
            os.environ.pop(key, None)
        for undo in restore:
            undo()


def _disable_loaded_bars() -> list[Callable[[], None]]:
    """Turn off the bars of transformers / huggingface_hub if imported; how to turn them back on."""
    undo: list[Callable[[], None]] = []
    tf_logging = sys.modules.get("transformers.utils.logging")
    if tf_logging is not None and tf_logging.is_progress_bar_enabled():
        tf_logging.disable_progress_bar()
        undo.append(tf_logging.enable_progress_bar)
    hub = sys.modules.get("huggingface_hub.utils")
    if hub is not None and not hub.are_progress_bars_disabled():
        hub.disable_progress_bars()
        undo.append(hub.enable_progress_bars)
    return undo


# Bars other libraries draw with an explicit ``disable=`` (so TQDM_DISABLE cannot reach
# them): the module, and the name it imported tqdm under. compressed-tensors draws these
# when transformers loads a quantized checkpoint (``gptqflow eval``).
_EXPLICIT_BARS = (
    ("compressed_tensors.quantization.lifecycle.apply", "tqdm"),
    ("compressed_tensors.offload.dispatch", "tqdm"),
)


@contextmanager
def quiet_explicit_bars(show: bool) -> Iterator[None]:
    """Inside this block, the bars of :data:`_EXPLICIT_BARS` are not drawn, unless ``show``.

    Their modules are imported and their ``tqdm`` swapped for one that is always
    disabled, and put back on exit; a module that is missing or moved (another
    version) is left alone, so at worst its bar shows.
    """
    if show:
        yield
        return
    swapped: list[tuple[Any, str, Any]] = []
    for name, attr in _EXPLICIT_BARS:
        try:
            module = importlib.import_module(name)
        except Exception:  # not installed, or another layout: nothing to quiet
            continue
        original = getattr(module, attr, None)
        if callable(original):
            setattr(module, attr, _disabled(original))
            swapped.append((module, attr, original))
    try:
        yield
    finally:
        for module, attr, original in swapped:
            setattr(module, attr, original)


def _disabled(bar_class: Callable[..., Any]) -> Callable[..., Any]:
    def quiet(*args: Any, **kwargs: Any) -> Any:
        kwargs["disable"] = True
        return bar_class(*args, **kwargs)

    return quiet
