"""Files that are never half-written: write to a temporary name, fsync, rename into place."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import IO


def fsync_dir(directory: Path) -> None:
    """Make a rename durable: without it a power loss can forget the new name."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_atomic(path: Path, content: str | bytes | Callable[[IO[bytes]], object]) -> int:
    """Write ``content`` (text, bytes, or a function writing to a binary file) to ``path``.

    The data goes to ``.<name>.tmp-<pid>`` beside ``path``, is fsynced and renamed over
    ``path``, and the directory is fsynced: readers see the old file or the complete new
    one, never a prefix. On any error the temporary file is removed and the error
    (``OSError`` for a full disk or a permission problem) propagates for the caller to
    put in words. Returns the size written.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            if callable(content):
                content(f)
            else:
                f.write(content.encode() if isinstance(content, str) else content)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)
    return path.stat().st_size


def parse_size(text: str) -> int:
    """``"2GB"`` -> 2·10⁹ bytes, ``"512MiB"`` -> 512·2²⁰ (the spelling transformers accepts)."""
    units = {
        "KIB": 2**10,
        "MIB": 2**20,
        "GIB": 2**30,
        "TIB": 2**40,
        "KB": 10**3,
        "MB": 10**6,
        "GB": 10**9,
        "TB": 10**12,
        "B": 1,
    }
    t = text.strip().upper()
    for unit, factor in units.items():
        if t.endswith(unit):
            number = t[: -len(unit)].strip()
            try:
                value = float(number)
            except ValueError:
                break
            if value > 0:
                return int(value * factor)
            break
    raise ValueError(f"{text!r} is not a size such as 500MB, 2GB or 1GiB")
