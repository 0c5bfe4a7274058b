"""A file's extent map: which region dpage holds each of the file's dpages.

Kept as a sorted map from the file dpage where a mapped run starts to the
region dpage it starts at and its length.  Gaps between runs are holes and read
as zeros.  Adjacent runs that are contiguous in both the file and the region
are merged, so a file allocated in one piece is one entry however large it is.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import NamedTuple

from ..alloc.runs import Extent, OverlapError, RunMap
from .changes import Changes


class Piece(NamedTuple):
    """A run of file dpages mapped to region dpage *region* onward; a hole if *region* is None."""

    file_dpage: int
    region: int | None
    length: int


class FileExtents:
    """Mapping of file dpages to region dpages, with holes: a :class:`RunMap` from file
    dpages to region dpages.

    With *changes*, every change is reported there under the owning inode *ino*
    (for the journal); without, nothing is recorded.
    """

    def __init__(self, ino: int = 0, changes: Changes | None = None) -> None:
        self._map = RunMap()
        self.ino = ino
        self.changes = changes

    def __len__(self) -> int:
        """Number of mapped runs (extents)."""
        return len(self._map)

    def end_dpage(self) -> int:
        """First file dpage after the last mapped run (0 when nothing is mapped)."""
        return self._map.last_end()

    @property
    def mapped(self) -> int:
        """File dpages that are mapped."""
        return self._map.dpages

    def runs(self) -> list[tuple[int, int, int]]:
        """All mapped runs as ``(file_dpage, region_dpage, count)``, in file order."""
        return [(m.start, m.to, m.length) for m in self._map.runs() if m.to is not None]

    def pieces(self, first: int, end: int) -> Iterator[Piece]:
        """Yield mapped runs and holes that exactly cover file dpages ``[first, end)``."""
        return (Piece(m.start, m.to, m.length) for m in self._map.pieces(first, end))

    def holes(self, first: int, end: int) -> list[tuple[int, int]]:
        """The holes in ``[first, end)`` as ``(file_dpage, count)``."""
        return [(m.start, m.length) for m in self._map.pieces(first, end) if m.to is None]

    def region_after(self, file_dpage: int) -> int | None:
        """The region dpage that would continue the run just before *file_dpage*, if any.

        Used as the allocation goal so that a growing file stays contiguous.
        """
        run = self._map.run_at(file_dpage - 1) if file_dpage > 0 else None
        if run is None or run.to is None or run.start + run.length != file_dpage:
            return None
        return run.to + run.length

    def insert(self, file_dpage: int, extents: list[Extent]) -> None:
        """Map *extents*, one after another, at *file_dpage* onward; the range must be a hole."""
        for ext in extents:
            try:
                self._map.insert(file_dpage, ext.length, ext.start)
            except OverlapError:
                raise ValueError(f"file dpages [{file_dpage}, {file_dpage + ext.length}) "
                                 "are already mapped") from None
            if self.changes is not None:
                self.changes.mapped(self.ino, file_dpage, ext.start, ext.length)
            file_dpage += ext.length

    def punch(self, first: int, count: int) -> list[Extent]:
        """Unmap file dpages ``[first, first+count)``; return the region extents released."""
        released = self._release(first, count)
        if released and self.changes is not None:
            self.changes.unmapped(self.ino, first, count)
        return released

    def truncate(self, dpages: int) -> list[Extent]:
        """Unmap every file dpage at or past *dpages*; return the region extents released."""
        released = self._release(dpages, self.end_dpage() - dpages)
        if released and self.changes is not None:
            self.changes.truncated(self.ino, dpages)
        return released

    def _release(self, first: int, count: int) -> list[Extent]:
        return [Extent(m.to, m.length) for m in self._map.cut(first, count) if m.to is not None]
