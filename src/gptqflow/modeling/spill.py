"""Hidden states kept in a file instead of memory, read back one chunk at a time.

Between two decoder layers a rank carries the hidden states of all its calibration
samples: ``tokens x hidden`` values, which for a long calibration of a wide model is
more than the layer's weights. Beyond ``runtime.max_hidden_bytes`` the layer loop
writes each chunk of a layer's outputs to a file as soon as it is computed
(:class:`SpillWriter`) and reads the chunks back one at a time for the next layer
(:class:`SpilledChunks`), so only one chunk of inputs and one of outputs are in memory
at a time. The chunks hold whole samples and the arithmetic is per sample, so the
results are the same bytes as without spilling.

Reads and writes go through ``readinto``/``write`` on plain files, not memory maps:
the bytes of a chunk belong to the process only while its tensor is alive.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, overload

import torch

from gptqflow.gptq.wire import Field
from gptqflow.modeling.forward import Chunks


@dataclass(frozen=True)
class _Entry(Field):
    """One chunk tensor of a spill file: its shape and dtype, and where its bytes start."""

    offset: int


class _Parts(Sequence[torch.Tensor]):
    """The chunk tensors of a spill file; indexing reads one from disk."""

    def __init__(self, path: Path, entries: list[_Entry]) -> None:
        self.path = path
        self.entries = entries

    def __len__(self) -> int:
        return len(self.entries)

    @overload
    def __getitem__(self, i: int) -> torch.Tensor: ...

    @overload
    def __getitem__(self, i: slice) -> list[torch.Tensor]: ...

    def __getitem__(self, i: int | slice) -> torch.Tensor | list[torch.Tensor]:
        if isinstance(i, slice):
            return [self[k] for k in range(*i.indices(len(self)))]
        e = self.entries[i]
        out = torch.empty(e.shape, dtype=e.dtype)
        with open(self.path, "rb") as f:
            f.seek(e.offset)
            view = out.view(-1).view(torch.uint8).numpy().data
            if f.readinto(view) != e.nbytes:
                raise OSError(f"{self.path} is shorter than the hidden states written to it")
        return out

    def __iter__(self) -> Iterator[torch.Tensor]:
        for i in range(len(self)):
            yield self[i]


class SpilledChunks(Chunks):
    """:class:`Chunks` whose tensors live in a file (``parts[i]`` reads chunk ``i``).

    The keyword arguments of each chunk (position embeddings, masks: a few values per
    token position, not per sample) stay in memory.
    """

    def __init__(self, path: Path, entries: list[_Entry], kwargs: list[dict[str, Any]]) -> None:
        super().__init__(_Parts(path, entries), kwargs)  # type: ignore[arg-type]
        self.path = path
        self.entries = entries

    @property
    def tokens(self) -> int:
        return sum(int(e.shape[0] * e.shape[1]) for e in self.entries)

    @property
    def num_samples(self) -> int:
        return sum(int(e.shape[0]) for e in self.entries)

    def split(self, max_tokens: int | None) -> Chunks:
        """Itself: the chunks were written at the loop's chunk size."""
        return self

    def to(self, device: torch.device | str) -> Chunks:
        """Every chunk in memory on ``device`` (what a plain :class:`Chunks` would be)."""
        return Chunks(list(self.parts), self.kwargs).to(device)

    def copy_to(self, path: Path) -> dict[str, Any]:
        """Copy the file to ``path``; a description :meth:`from_description` reopens."""
        shutil.copyfile(self.path, path)
        return {
            "file": path.name,
            "bytes": path.stat().st_size,
            "entries": [
                [e.offset, list(e.shape), str(e.dtype).removeprefix("torch.")] for e in self.entries
            ],
            "kwargs": self.kwargs,
        }

    @classmethod
    def from_description(cls, directory: Path, desc: dict[str, Any]) -> SpilledChunks:
        entries = [
            _Entry(tuple(int(d) for d in s), getattr(torch, t), int(o))
            for o, s, t in desc["entries"]
        ]
        return cls(directory / desc["file"], entries, list(desc["kwargs"]))


class SpillWriter:
    """Appends chunk tensors to a new file; :meth:`finish` gives them back as chunks."""

    def __init__(self, path: Path) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(path, "wb")  # noqa: SIM115 (kept open across appends)
        self._entries: list[_Entry] = []
        self._offset = 0

    def append(self, t: torch.Tensor) -> None:
        t = t.detach().cpu().contiguous()
        self._file.write(t.view(-1).view(torch.uint8).numpy().data)
        entry = _Entry(tuple(t.shape), t.dtype, self._offset)
        self._entries.append(entry)
        self._offset += entry.nbytes

    def finish(self, kwargs: list[dict[str, Any]]) -> SpilledChunks:
        self._file.close()
        return SpilledChunks(self.path, self._entries, kwargs)

    def abort(self) -> None:
        self._file.close()
        self.path.unlink(missing_ok=True)


class HiddenSpill:
    """Where one rank's hidden states go between layers when they exceed the budget.

    Two files alternate (a layer reads one and writes the other), under
    ``directory`` (``output_dir/spill``), named by rank so ranks sharing an output
    directory never meet. :meth:`close` removes them.
    """

    def __init__(self, directory: Path, rank: int, chunk_tokens: int) -> None:
        self.directory = directory
        self.rank = rank
        self.chunk_tokens = chunk_tokens
        self._next = 0

    def writer(self) -> SpillWriter:
        path = self.directory / f"hidden-rank{self.rank:05d}-{self._next}.bin"
        self._next ^= 1
        return SpillWriter(path)

    def spill(self, chunks: Chunks) -> SpilledChunks:
        """Write in-memory ``chunks`` (the captured first-layer inputs) to a file."""
        w = self.writer()
        try:
            for part in chunks.split(self.chunk_tokens).parts:
                w.append(part)
        except BaseException:
            w.abort()
            raise
        return w.finish(chunks.split(self.chunk_tokens).kwargs)

    def close(self) -> None:
        for k in (0, 1):
            (self.directory / f"hidden-rank{self.rank:05d}-{k}.bin").unlink(missing_ok=True)
        # Another rank's files may still be there, or the directory was never made.
        with contextlib.suppress(OSError):
            os.rmdir(self.directory)
