"""Binding each rank of a CPU run to cores of its own (``runtime.cpu_affinity``).

Why: with one rank per core the Linux scheduler still moves a rank between cores
whenever something else wakes up (the launcher, gloo's I/O threads, the kernel),
and a rank that moves starts on cold caches. On a 2-core machine with 2 ranks
that shows as stalls of tens of milliseconds, which is a 10-20% load imbalance on
a 0.2 s layer solve and a wait for every other rank at the next collective.
Binding is what HPC launchers do by default; torchrun does not for CPU ranks.

Results never depend on it: only where the threads run changes.
"""

from __future__ import annotations

import logging
import os

log = logging.getLogger("gptqflow")

__all__ = ["apply_cpu_affinity", "cores_for_rank"]


def cores_for_rank(
    available: list[int], local_rank: int, local_world_size: int, threads: int | None
) -> list[int] | None:
    """The cores local rank ``local_rank`` binds to, or ``None`` to leave it unbound.

    Pure: ``available`` (sorted core ids this process may use) is cut into
    ``local_world_size`` consecutive runs of ``threads`` cores (default: an equal
    share). No binding for a single rank (nothing to keep apart), or when the
    ranks' threads do not fit the cores (binding would pile them onto fewer cores).
    """
    if local_world_size <= 1 or not 0 <= local_rank < local_world_size:
        return None
    per_rank = threads if threads is not None else len(available) // local_world_size
    if per_rank < 1 or per_rank * local_world_size > len(available):
        return None
    start = local_rank * per_rank
    return available[start : start + per_rank]


def apply_cpu_affinity(
    mode: str, device_type: str, local_rank: int, local_world_size: int, threads: int | None
) -> list[int] | None:
    """Bind this process as ``runtime.cpu_affinity`` says; return the cores bound to, if any."""
    if mode != "auto" or device_type != "cpu" or not hasattr(os, "sched_setaffinity"):
        return None
    available = sorted(os.sched_getaffinity(0))
    cores = cores_for_rank(available, local_rank, local_world_size, threads)
    if cores is None:
        if local_world_size > 1:
            log.info(
                "cpu_affinity: %d ranks x %s threads do not fit %d cores; ranks left unbound",
                local_world_size,
                threads if threads is not None else "default",
                len(available),
            )
        return None
    try:
        os.sched_setaffinity(0, cores)
    except OSError as exc:  # e.g. a cpuset that changed under us: run unbound, say so
        log.warning("cpu_affinity: could not bind to cores %s (%s); ranks left unbound", cores, exc)
        return None
    return cores
