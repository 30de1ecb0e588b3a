"""Progress of the layer loop on rank 0: layers done / total, seconds per layer, tokens.

A bar is only worth drawing for a person watching a terminal: on other ranks, when
stderr (where tqdm draws) is redirected to a file or a pipe, or with
``runtime.progress=false`` nothing is drawn, and the per-layer log lines (which go to
``run.log`` too) carry the same numbers.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterator
from typing import Any, TextIO


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
            self.bar = tqdm(total=total, initial=indices.start, desc=desc, unit="layer", file=file)

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
