"""A file's extent map: which region dpage holds each of the file's dpages.

Kept as a sorted map from the file dpage where a mapped run starts to the
region dpage it starts at and its length.  Gaps between runs are holes and read
as zeros.  Adjacent runs that are contiguous in both the file and the region
are merged, so a file allocated in one piece is one entry however large it is.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import NamedTuple

from sortedcontainers import SortedDict

from ..alloc.pool import Extent
from .changes import ChangeLog


class Piece(NamedTuple):
    """A run of file dpages mapped to region dpage *region* onward; a hole if *region* is None."""

    file_dpage: int
    region: int | None
    length: int


class FileExtents:
    """Mapping of file dpages to region dpages, with holes.

    With a *log*, every change is reported to it under the owning inode *ino*
    (for the metadata log); without one, nothing is recorded.
    """

    def __init__(self, ino: int = 0, log: ChangeLog | None = None) -> None:
        # file dpage -> (region dpage, count)
        self._runs: SortedDict = SortedDict()
        self.mapped = 0
        self.ino = ino
        self.log = log

    def __len__(self) -> int:
        """Number of mapped runs (extents)."""
        return len(self._runs)

    def runs(self) -> list[tuple[int, int, int]]:
        """All mapped runs as ``(file_dpage, region_dpage, count)``, in file order."""
        return [(f, r, n) for f, (r, n) in self._runs.items()]

    def pieces(self, first: int, end: int) -> Iterator[Piece]:
        """Yield mapped runs and holes that exactly cover file dpages ``[first, end)``."""
        pos = self._runs.bisect_right(first) - 1
        pos = max(pos, 0)
        cursor = first
        keys = self._runs.keys()
        values = self._runs.values()
        while cursor < end and pos < len(keys):
            run_file = keys[pos]
            run_region, run_count = values[pos]
            run_end = run_file + run_count
            pos += 1
            if run_end <= cursor:
                continue
            if run_file >= end:
                break
            if run_file > cursor:
                yield Piece(cursor, None, run_file - cursor)
                cursor = run_file
            stop = min(run_end, end)
            yield Piece(cursor, run_region + (cursor - run_file), stop - cursor)
            cursor = stop
        if cursor < end:
            yield Piece(cursor, None, end - cursor)

    def holes(self, first: int, end: int) -> list[tuple[int, int]]:
        """The holes in ``[first, end)`` as ``(file_dpage, count)``."""
        return [(p.file_dpage, p.length) for p in self.pieces(first, end) if p.region is None]

    def region_after(self, file_dpage: int) -> int | None:
        """The region dpage that would continue the run just before *file_dpage*, if any.

        Used as the allocation goal so that a growing file stays contiguous.
        """
        pos = self._runs.bisect_right(file_dpage - 1) - 1
        if pos < 0:
            return None
        run_file, (run_region, run_count) = self._runs.peekitem(pos)
        if run_file + run_count != file_dpage:
            return None
        return int(run_region + run_count)

    def insert(self, file_dpage: int, extents: list[Extent]) -> None:
        """Map *extents*, one after another, at *file_dpage* onward; the range must be a hole."""
        for ext in extents:
            self._insert_one(file_dpage, ext.start, ext.length)
            if self.log is not None:
                self.log.mapped(self.ino, file_dpage, ext.start, ext.length)
            file_dpage += ext.length

    def punch(self, first: int, count: int) -> list[Extent]:
        """Unmap file dpages ``[first, first+count)``; return the region extents released."""
        end = first + count
        released: list[Extent] = []
        for piece in list(self.pieces(first, end)):
            if piece.region is None:
                continue
            run_file = self._runs.bisect_right(piece.file_dpage) - 1
            key, (run_region, run_count) = self._runs.peekitem(run_file)
            del self._runs[key]
            if key < piece.file_dpage:
                self._runs[key] = (run_region, piece.file_dpage - key)
            tail = key + run_count - (piece.file_dpage + piece.length)
            if tail:
                self._runs[piece.file_dpage + piece.length] = (
                    run_region + run_count - tail, tail)
            released.append(Extent(piece.region, piece.length))
            self.mapped -= piece.length
        if released and self.log is not None:
            self.log.unmapped(self.ino, first, count)
        return released

    def truncate(self, dpages: int) -> list[Extent]:
        """Unmap every file dpage at or past *dpages*; return the region extents released."""
        released: list[Extent] = []
        pos = self._runs.bisect_right(dpages - 1) - 1 if dpages > 0 else -1
        if pos >= 0:
            run_file, (run_region, run_count) = self._runs.peekitem(pos)
            if run_file + run_count > dpages:
                keep = dpages - run_file
                self._runs[run_file] = (run_region, keep)
                released.append(Extent(run_region + keep, run_count - keep))
        for key in list(self._runs.irange(minimum=dpages)):
            run_region, run_count = self._runs.pop(key)
            released.append(Extent(run_region, run_count))
        self.mapped -= sum(e.length for e in released)
        if released and self.log is not None:
            self.log.truncated(self.ino, dpages)
        return released

    def _insert_one(self, file_dpage: int, region: int, count: int) -> None:
        pos = self._runs.bisect_right(file_dpage) - 1
        if pos >= 0:
            left_file, (left_region, left_count) = self._runs.peekitem(pos)
            if left_file + left_count > file_dpage:
                raise ValueError(f"file dpage {file_dpage} is already mapped")
            if left_file + left_count == file_dpage and left_region + left_count == region:
                file_dpage, region = left_file, left_region
                count += left_count
                del self._runs[left_file]
                self.mapped -= left_count
        right = self._runs.bisect_left(file_dpage + 1)
        if right < len(self._runs):
            right_file, (right_region, right_count) = self._runs.peekitem(right)
            if right_file < file_dpage + count:
                raise ValueError(f"file dpage {right_file} is already mapped")
            if right_file == file_dpage + count and region + count == right_region:
                count += right_count
                del self._runs[right_file]
                self.mapped -= right_count
        self._runs[file_dpage] = (region, count)
        self.mapped += count
