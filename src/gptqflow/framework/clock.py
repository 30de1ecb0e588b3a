"""Seconds and peak resident memory per stage: what report.json's ``stages`` holds."""

from __future__ import annotations

import resource
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager


def _read_hwm() -> int | None:
    """Peak resident set size since the last reset, in bytes (Linux ``VmHWM``)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def reset_hwm() -> None:
    """Reset the kernel's peak-RSS mark so the next reading covers one stage only."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def peak_rss() -> int:
    hwm = _read_hwm()
    if hwm is not None:
        return hwm
    scale = 1 if sys.platform == "darwin" else 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


class StageClock:
    """Accumulates wall seconds and peak RSS per stage id."""

    def __init__(self) -> None:
        self.stats: dict[str, dict[str, float | int]] = {}

    def add(self, key: str, seconds: float, rss: int) -> None:
        s = self.stats.setdefault(key, {"seconds": 0.0, "peak_rss_bytes": 0})
        s["seconds"] = float(s["seconds"]) + seconds
        s["peak_rss_bytes"] = max(int(s["peak_rss_bytes"]), rss)

    @contextmanager
    def measure(self, key: str) -> Iterator[None]:
        reset_hwm()
        start = time.perf_counter()
        try:
            yield
        finally:
            self.add(key, time.perf_counter() - start, peak_rss())
