"""Seconds and peak resident memory per stage: what report.json's ``stages`` holds.

On a CUDA device the clock also records each stage's peak device memory
(``peak_device_bytes``, from the caching allocator) and synchronises the device
before reading the time, so a stage's seconds include its queued kernels.
"""

from __future__ import annotations

import resource
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager

import torch


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
    """Accumulates wall seconds and peak RSS (and peak device memory on CUDA) per stage id."""

    def __init__(self, device: torch.device | None = None) -> None:
        self.stats: dict[str, dict[str, float | int]] = {}
        self.cuda = device if device is not None and device.type == "cuda" else None

    def add(self, key: str, seconds: float, rss: int, device_bytes: int | None = None) -> None:
        s = self.stats.setdefault(key, {"seconds": 0.0, "peak_rss_bytes": 0})
        s["seconds"] = float(s["seconds"]) + seconds
        s["peak_rss_bytes"] = max(int(s["peak_rss_bytes"]), rss)
        if device_bytes is not None:
            s["peak_device_bytes"] = max(int(s.get("peak_device_bytes", 0)), device_bytes)

    def sync(self) -> None:
        """Wait for the device's queued work, so the time read next includes it."""
        if self.cuda is not None:
            torch.cuda.synchronize(self.cuda)

    def reset_device_peak(self) -> None:
        if self.cuda is not None:
            torch.cuda.reset_peak_memory_stats(self.cuda)

    def device_peak(self) -> int | None:
        """Peak device bytes since the last reset (None off CUDA)."""
        return None if self.cuda is None else int(torch.cuda.max_memory_allocated(self.cuda))

    @contextmanager
    def measure(self, key: str) -> Iterator[None]:
        reset_hwm()
        self.sync()
        self.reset_device_peak()
        start = time.perf_counter()
        try:
            yield
        finally:
            self.sync()
            self.add(key, time.perf_counter() - start, peak_rss(), self.device_peak())
