"""The distributed context: the only module (with the launcher) that touches torch.distributed.

The runner builds one :class:`DistContext` and hands it to every stage. Stages speak
in verbs (``shard``, ``all_reduce_sum``, ``broadcast_from``, ``barrier``,
``gather_objects``) and never ask "am I distributed?": at world size 1 the same verbs
run and simply have nobody to talk to. This keeps every rank-dependent decision in
one file that can be read, reviewed and tested on its own.
"""

from __future__ import annotations

import datetime
import hashlib
import os
import secrets
import socket
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.distributed as dist

from gptqflow.errors import GptqflowError


class Handle(Protocol):
    """An in-flight collective; ``wait()`` blocks until its tensors are usable."""

    def wait(self) -> Any: ...


class _Done:
    """A completed no-op collective (world size 1, or a rank with nothing to send)."""

    def wait(self) -> None:
        return None


class PeerLostError(GptqflowError):
    """A collective failed because another rank was killed, exited or stopped answering."""


# How long a rank that saw a collective fail waits for the other survivors to say so,
# to tell the lost rank(s) from the ones that are merely slower to notice.
PEER_REPORT_WAIT_S = 5.0


def is_peer_loss(exc: BaseException) -> bool:
    """Whether a collective's exception means another rank died or stopped answering."""
    if isinstance(exc, getattr(dist, "DistError", ())):
        return True
    text = str(exc).lower()
    return isinstance(exc, RuntimeError) and any(
        k in text
        for k in ("connection closed by peer", "connection reset", "timed out", "timeout", "gloo")
    )


def _default_store() -> Any:
    """The process group's rendezvous store, or None (torch has no public accessor)."""
    getter = getattr(dist.distributed_c10d, "_get_default_store", None)
    try:
        return getter() if getter is not None else None
    except Exception:
        return None


class _Guarded:
    """A collective's handle whose ``wait`` turns a lost peer into a PeerLostError."""

    def __init__(self, work: Any, ctx: DistContext, what: str) -> None:
        self.work, self.ctx, self.what = work, ctx, what

    def wait(self) -> Any:
        with self.ctx.guard(self.what):
            return self.work.wait()


def shard_range(n: int, rank: int, world_size: int) -> range:
    """The contiguous slice of ``n`` items that ``rank`` owns.

    Pure function of (n, rank, world_size): every item is assigned exactly once and
    slice sizes differ by at most one (the first ``n % world_size`` ranks get one
    more). Contiguous slices keep the global order, so concatenating the ranks'
    slices in rank order gives back ``range(n)``.
    """
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"invalid rank {rank} for world size {world_size}")
    base, extra = divmod(n, world_size)
    start = rank * base + min(rank, extra)
    return range(start, start + base + (1 if rank < extra else 0))


def pick_backend(requested: str, device: torch.device) -> str:
    """``auto`` means nccl on CUDA devices and gloo everywhere else."""
    if requested != "auto":
        return requested
    return "nccl" if device.type == "cuda" else "gloo"


def pick_device(requested: str, local_rank: int) -> torch.device:
    """``auto`` uses this rank's GPU (``cuda:LOCAL_RANK``) when there is one, else the CPU."""
    if requested == "cpu" or (requested == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise GptqflowError(f"runtime.device={requested!r} but no CUDA device is available")
    return torch.device("cuda", local_rank % torch.cuda.device_count())


@dataclass
class DistContext:
    """Rank, world size, execution device and the collective verbs stages may use.

    At world size 1 no process group is created and every verb is a local no-op
    that returns the same shapes and types as the distributed version.
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1  # ranks on this machine
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    backend: str = "none"
    timeout_s: float = 600.0
    _owns_group: bool = False
    bytes_sent: int = 0
    collectives: int = 0  # all-reduces and broadcasts issued (report.json)

    # ------------------------------------------------------------------ lifecycle
    @classmethod
    def from_environment(
        cls, *, backend: str = "auto", device: str = "auto", timeout_s: float = 600.0
    ) -> DistContext:
        """Join the process group described by torchrun's environment, if any.

        Without ``WORLD_SIZE`` (or with ``WORLD_SIZE=1``) this is a single-process
        context and nothing is initialised.
        """
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
        int(os.environ.get("RANK", "0"))
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        dev = pick_device(device, local_rank)
        if world_size == 1:
            return cls(rank=0, world_size=1, local_rank=0, device=dev)
        chosen = pick_backend(backend, dev)
        owns = False
        if not dist.is_initialized():
            if dev.type == "cuda":
                torch.cuda.set_device(dev)
            dist.init_process_group(backend=chosen, timeout=datetime.timedelta(seconds=timeout_s))
            owns = True
        return cls(
            rank=dist.get_rank(),
            world_size=dist.get_world_size(),
            local_rank=local_rank,
            local_world_size=int(os.environ.get("LOCAL_WORLD_SIZE", "1")),
            device=dev,
            backend=chosen,
            timeout_s=timeout_s,
            _owns_group=owns,
        )

    def close(self) -> None:
        """Leave the process group if this context created it."""
        if self._owns_group and dist.is_initialized():
            dist.destroy_process_group()
            self._owns_group = False

    # ------------------------------------------------------------------ queries
    @property
    def is_main(self) -> bool:
        """Rank 0: the one rank that logs, shows progress and writes files."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def shard(self, n: int) -> range:
        """This rank's contiguous slice of ``n`` items (see :func:`shard_range`)."""
        return shard_range(n, self.rank, self.world_size)

    # ------------------------------------------------------------------ collectives
    def _comm(self, t: torch.Tensor) -> torch.Tensor:
        """The tensor as the backend needs it (gloo: CPU; nccl: this rank's GPU)."""
        if self.backend == "nccl":
            return t.to(self.device)
        return t.cpu() if t.device.type != "cpu" else t

    def all_reduce_sum(
        self, tensor: torch.Tensor, *, async_op: bool = True
    ) -> tuple[torch.Tensor, Handle]:
        """Sum ``tensor`` over ranks; returns (result tensor, handle to wait on).

        The result lives on the communication device; wait on the handle before
        reading it. At world size 1 the result is the input itself.
        """
        if not self.distributed:
            return tensor, _Done()
        buf = self._comm(tensor).contiguous()
        self.bytes_sent += buf.numel() * buf.element_size()
        self.collectives += 1
        with self.guard("an all-reduce"):
            work = dist.all_reduce(buf, op=dist.ReduceOp.SUM, async_op=async_op)
        return buf, (_Guarded(work, self, "an all-reduce") if work is not None else _Done())

    def sum_values(self, values: Sequence[float]) -> list[float]:
        """A few numbers (token counts, loss sums) summed over ranks, in one small
        float64 all-reduce (exact for integers below 2**53); waits for it."""
        local = torch.tensor([float(v) for v in values], dtype=torch.float64)
        total, handle = self.all_reduce_sum(local)
        handle.wait()
        return [float(v) for v in total.tolist()]

    def reduce_sum_to(
        self, owner: int, tensor: torch.Tensor, *, async_op: bool = True
    ) -> tuple[torch.Tensor, Handle]:
        """Sum ``tensor`` over ranks into rank ``owner`` only; returns (buffer, handle).

        Half the bytes of :meth:`all_reduce_sum` for data one rank needs. Only the
        owner's buffer holds the sum once the handle is waited on; the others' buffers
        are undefined afterwards. At world size 1 the result is the input itself.
        """
        if not self.distributed:
            return tensor, _Done()
        buf = self._comm(tensor).contiguous()
        if self.rank != owner:
            self.bytes_sent += buf.numel() * buf.element_size()
        self.collectives += 1
        with self.guard(f"a reduction to rank {owner}"):
            work = dist.reduce(buf, dst=owner, op=dist.ReduceOp.SUM, async_op=async_op)
        return buf, (
            _Guarded(work, self, f"a reduction to rank {owner}") if work is not None else _Done()
        )

    def broadcast_from(
        self, owner: int, tensors: Sequence[torch.Tensor], *, async_op: bool = True
    ) -> tuple[list[torch.Tensor], list[Handle]]:
        """Send ``tensors`` from ``owner`` to every rank.

        Every rank passes tensors of the right shape and dtype (the owner its data,
        the others receive buffers, e.g. from ``torch.empty``); the returned tensors
        hold the owner's data once the handles are waited on.
        """
        if not self.distributed:
            return list(tensors), [_Done()]
        bufs = [self._comm(t).contiguous() for t in tensors]
        handles: list[Handle] = []
        for b in bufs:
            self.collectives += 1
            if self.rank == owner:
                self.bytes_sent += b.numel() * b.element_size()
            with self.guard(f"a broadcast from rank {owner}"):
                work = dist.broadcast(b, src=owner, async_op=async_op)
            handles.append(
                _Guarded(work, self, f"a broadcast from rank {owner}")
                if work is not None
                else _Done()
            )
        return bufs, handles

    def barrier(self, tag: str = "") -> None:
        """Wait for every rank (``tag`` names the point in error messages and logs)."""
        if self.distributed:
            with self.guard(f"the barrier {tag!r}" if tag else "a barrier"):
                dist.barrier()

    def gather_objects(self, obj: Any) -> list[Any]:
        """Every rank's ``obj`` in rank order, on every rank (small, picklable data only)."""
        if not self.distributed:
            return [obj]
        out: list[Any] = [None] * self.world_size
        with self.guard("an all-gather"):
            dist.all_gather_object(out, obj)
        return out

    # ------------------------------------------------------------------ faults
    @contextmanager
    def guard(self, what: str) -> Iterator[None]:
        """Turn a collective failing because of a lost rank into a PeerLostError naming it."""
        try:
            yield
        except Exception as exc:
            if isinstance(exc, PeerLostError) or not is_peer_loss(exc):
                raise
            raise self._peer_lost(exc, what) from exc

    def _peer_lost(self, exc: BaseException, what: str) -> PeerLostError:
        lost = self.unanswered_ranks()
        who = "another rank" if not lost else ", ".join(f"rank {r}" for r in lost)
        first = str(exc).splitlines()[0] if str(exc) else ""
        return PeerLostError(
            f"lost contact with {who} during {what} ({type(exc).__name__}: {first[:300]}): "
            f"it was killed, exited or did not answer within runtime.timeout_s={self.timeout_s:g}s; "
            "its own message, if it printed one, gives the cause. With resume points "
            "(runtime.checkpoint_every) runtime.resume=true continues from the last one"
        )

    def unanswered_ranks(self, wait_s: float = PEER_REPORT_WAIT_S) -> list[int]:
        """After a failed collective: the other ranks that do not report the failure too.

        A rank that was killed (or hangs) cannot say anything, while every survivor
        sees its own collective fail. So each survivor writes a key in the rendezvous
        store and waits up to ``wait_s`` for the others' keys; the ranks without one
        are the lost ones. With two ranks the other one is lost, without asking. If
        the store is unreachable its host is gone: rank 0 with plain ``env://``
        rendezvous (torchrun's agent hosts it otherwise, and it outlives the ranks).
        """
        others = [r for r in range(self.world_size) if r != self.rank]
        if len(others) <= 1:
            return others
        store = _default_store()
        if store is None:
            return []
        key = "gptqflow/peer-lost/{}".format
        try:
            store.set(key(self.rank), "1")
            deadline = time.monotonic() + wait_s
            while True:
                missing = [r for r in others if not store.check([key(r)])]
                if not missing or time.monotonic() >= deadline:
                    return missing
                time.sleep(0.05)
        except Exception:
            agent = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
            return [0] if self.rank != 0 and not agent else []

    def check_same(self, what: str, text: str) -> None:
        """Refuse to go on unless every rank holds the same ``text`` (compared by hash)."""
        digest = hashlib.sha256(text.encode()).hexdigest()
        digests = self.gather_objects(digest)
        bad = [r for r, d in enumerate(digests) if d != digests[0]]
        if bad:
            raise GptqflowError(
                f"{what} differs between ranks: rank(s) {bad} disagree with rank 0 "
                f"(hashes {sorted(set(digests))}); launch every rank with the same recipe and overrides"
            )

    def check_shared_dir(self, directory: Path) -> None:
        """Refuse to go on unless every rank sees ``directory`` as the same directory.

        Rank 0 writes a file with a random token there; every rank looks for it. A rank
        on another node whose ``output_dir`` is a local disk does not find it, and is
        named here, at start-up, instead of failing later in a collective (a resume
        point it cannot read, a checkpoint it cannot read back) with a timeout that
        names the wrong cause. One rank, or one node, has nothing to check.
        """
        if not self.distributed:
            return
        token = secrets.token_hex(8) if self.is_main else ""
        probe = directory / f".gptqflow-shared-{os.getpid()}"
        if self.is_main:
            probe.write_text(token)
        token, name = self.gather_objects((token, probe.name))[0]
        probe = directory / name
        try:
            seen = probe.read_text() == token
        except OSError:
            seen = False
        answers = self.gather_objects((seen, socket.gethostname()))
        if self.is_main:
            probe.unlink(missing_ok=True)
        blind = [(r, host) for r, (ok, host) in enumerate(answers) if not ok]
        if blind:
            who = ", ".join(f"rank {r} on {host}" for r, host in blind)
            raise GptqflowError(
                f"output_dir={str(directory)!r} is not shared between the ranks: {who} cannot "
                f"see the file rank 0 (on {answers[0][1]}) wrote there. Every rank reads and "
                "writes resume points and the checkpoint there: put output_dir on a file "
                "system all nodes mount (NFS, Lustre ...)"
            )
