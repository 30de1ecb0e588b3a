"""Where a key sits in a YAML file (line, column), so lint can point an editor at it.

``yaml.safe_load`` throws positions away; :func:`key_positions` walks PyYAML's
composed node tree instead, whose nodes keep ``start_mark``. Paths are spelt the way
problems name keys: ``model.path``, ``stages.solve.dampening``, ``stages.solve`` (the
stage's entry), ``scheme.targets[1]`` (a list item).

A composed recipe has no single file: Hydra merges a defaults list (parent recipes,
config-group options, ``_self_``) in order and the last file that sets a key wins.
:class:`SourceMap` replays that order to find the file that set a key, follows a
value that is a plain interpolation (``path: ${model.path}``) to where the value
really came from, and knows that a value which is not a mapping (a list, or ``null``
removing a stage) replaces everything an earlier file had below that key, so an
earlier file's keys there are not blamed.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import yaml

_PLAIN_INTERPOLATION = re.compile(r"^\$\{([A-Za-z_][\w.]*)\}$")
_MAX_HOPS = 8  # interpolation chains longer than this are not followed (cycles)


@dataclass(frozen=True)
class Position:
    """A node of a YAML file: 1-based line and column (as editors count), and its kind."""

    line: int
    column: int
    kind: str  # "scalar", "mapping" or "sequence": the node's value
    value: str | None = None  # the scalar's text, for following interpolations


@dataclass(frozen=True)
class Location:
    file: str
    line: int
    column: int


def _mark(node: yaml.Node) -> tuple[int, int]:
    return node.start_mark.line + 1, node.start_mark.column + 1


def _kind(node: yaml.Node) -> str:
    if isinstance(node, yaml.MappingNode):
        return "mapping"
    if isinstance(node, yaml.SequenceNode):
        return "sequence"
    return "scalar"


def _walk(node: yaml.Node, path: str, anchor: yaml.Node, out: dict[str, Position]) -> None:
    """Record ``path`` at ``anchor``'s position (a key, or a list entry), then its children."""
    line, col = _mark(anchor)
    value = str(node.value) if isinstance(node, yaml.ScalarNode) else None
    if path:
        out[path] = Position(line, col, _kind(node), value)
    if isinstance(node, yaml.MappingNode):
        for key, child in node.value:
            if isinstance(key, yaml.ScalarNode):
                _walk(child, f"{path}.{key.value}" if path else str(key.value), key, out)
    elif isinstance(node, yaml.SequenceNode):
        for i, child in enumerate(node.value):
            _walk(child, f"{path}[{i}]", child, out)


def key_positions(text: str) -> dict[str, Position]:
    """Every key path of a YAML document -> where its key (or list entry) starts.

    Empty for an empty document; raises ``yaml.YAMLError`` for text that is not YAML.
    """
    root = yaml.compose(text, Loader=yaml.SafeLoader)
    out: dict[str, Position] = {}
    if root is not None:
        _walk(root, "", root, out)
    return out


def parents(path: str) -> list[str]:
    """``a.b[2].c`` -> ``["a.b[2]", "a.b", "a"]``: every enclosing key path, nearest first."""
    out: list[str] = []
    while True:
        cut = max(path.rfind("."), path.rfind("["))
        if cut <= 0:
            return out
        path = path[:cut]
        out.append(path)


@dataclass(frozen=True)
class Source:
    """One file of a composition: its keys land under ``package`` (``scheme``, or "" for root)."""

    file: str
    package: str
    positions: dict[str, Position]

    def local(self, path: str) -> str | None:
        """``path`` of the composed recipe as a key path of this file (None: not its package)."""
        if not self.package:
            return path
        if path == self.package:
            return None
        for sep in (".", "["):
            if path.startswith(self.package + sep):
                return path[len(self.package) + (1 if sep == "." else 0) :]
        return None


class SourceMap:
    """The files of a composition in merge order, answering "which file set this key?"."""

    def __init__(self, sources: list[Source]) -> None:
        self.sources = sources

    @classmethod
    def single(cls, file: str | Path, text: str, package: str = "") -> SourceMap:
        return cls([Source(str(file), package, key_positions(text))])

    def locate(self, problem_path: str, *, missing: bool = False) -> Location | None:
        """Where the key of a problem was set; ``missing``: where it should have been.

        A key that is missing points at its nearest enclosing key in the file that
        set that (the mapping the key belongs in). None when no file has the key.
        """
        return self._locate(problem_path, missing, _MAX_HOPS)

    def _locate(self, path: str, missing: bool, hops: int) -> Location | None:
        for src in reversed(self.sources):
            local = src.local(path)
            if local is None:
                continue
            pos = src.positions.get(local)
            if pos is not None:
                return self._follow(src, pos, missing, hops)
            present = [p for p in parents(local) if p in src.positions]
            if not present:
                continue
            if missing:  # the key belongs in the nearest mapping this file sets
                pos = src.positions[present[0]]
                return Location(src.file, pos.line, pos.column)
            if any(src.positions[p].kind != "mapping" for p in present):
                return None  # a list or a null here replaced what earlier files set below it
        return None

    def _follow(self, src: Source, pos: Position, missing: bool, hops: int) -> Location:
        """Through ``key: ${other.key}`` to the file that set ``other.key``, where known."""
        match = _PLAIN_INTERPOLATION.match(pos.value or "")
        if match and hops > 0:
            target = self._locate(match.group(1), missing, hops - 1)
            if target is not None:
                return target
        return Location(src.file, pos.line, pos.column)
