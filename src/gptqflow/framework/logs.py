"""Logging: the rank in every line, INFO from rank 0 only, and a copy in ``output_dir/run.log``."""

from __future__ import annotations

import logging
from pathlib import Path

LOGGER = "gptqflow"


class _RankPrefix(logging.Filter):
    def __init__(self, rank: int) -> None:
        super().__init__()
        self.prefix = f"[rank{rank}] "

    def filter(self, record: logging.LogRecord) -> bool:
        if not str(record.msg).startswith(self.prefix):
            record.msg = self.prefix + str(record.msg)
        return True


def configure_logging(rank: int, output_dir: Path | None) -> None:
    """Set up the ``gptqflow`` logger for one rank of a run.

    Rank 0 logs at INFO, the others at WARNING only (so N ranks do not print N
    copies of the same progress). Under ``gptqflow run`` Hydra already writes the
    root logger to ``output_dir/run.log``; elsewhere (workers, the Python API) rank 0
    adds that file itself, and a console handler if nothing prints at all.
    """
    log = logging.getLogger(LOGGER)
    log.setLevel(logging.INFO if rank == 0 else logging.WARNING)
    for f in list(log.filters):
        if isinstance(f, _RankPrefix):
            log.removeFilter(f)
    log.addFilter(_RankPrefix(rank))
    root = logging.getLogger()
    fmt = logging.Formatter("[%(asctime)s][%(name)s][%(levelname)s] - %(message)s")
    if not root.handlers and not log.handlers:
        console = logging.StreamHandler()
        console.setFormatter(fmt)
        log.addHandler(console)
    if rank == 0 and output_dir is not None:
        target = (output_dir / "run.log").resolve()
        writes_there = any(
            isinstance(h, logging.FileHandler) and Path(h.baseFilename).resolve() == target
            for h in [*root.handlers, *log.handlers]
        )
        if not writes_there:
            output_dir.mkdir(parents=True, exist_ok=True)
            handler = logging.FileHandler(target)
            handler.setFormatter(fmt)
            log.addHandler(handler)
