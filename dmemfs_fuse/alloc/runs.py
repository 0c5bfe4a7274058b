"""Runs of dpages: the one place where runs are joined, split and looked up.

Everything that keeps dpages as runs is built on :class:`RunMap` or
:class:`RunSet`: a pool's free runs, the dirty dpages, a file's extent map and
the allocation that recovery rebuilds.  A run is kept in a SortedDict under its
first dpage, so finding, adding and taking cost O(log runs + runs touched) and
nothing is per dpage.  Runs that continue one another are joined when they are
stored, so the structure always holds the fewest runs for its contents (a file
allocated in one piece is one entry however large it is).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from numbers import Integral
from typing import NamedTuple

from sortedcontainers import SortedDict


class Extent(NamedTuple):
    """A run of contiguous dpages, in region dpage numbers."""

    start: int
    length: int

    @property
    def end(self) -> int:
        """First dpage after the run."""
        return self.start + self.length


class OverlapError(ValueError):
    """A run to insert overlaps one already held (nothing was changed)."""


class Mapped(NamedTuple):
    """Dpages ``[start, start+length)`` mapped to ``[to, to+length)``; a hole if *to* is None."""

    start: int
    to: int | None
    length: int


def coalesce(extents: Iterable[Extent]) -> list[Extent]:
    """*extents* in their order, each joined to the one before it when it continues it."""
    out: list[Extent] = []
    for ext in extents:
        if out and out[-1].end == ext.start:
            out[-1] = Extent(out[-1].start, out[-1].length + ext.length)
        elif ext.length:
            out.append(ext)
    return out


class RunMap:
    """Runs of dpages, each mapped to a run of the same length: ``start -> (length, to)``.

    Two runs are joined when they touch and so do their targets.  ``dpages``
    is the number of dpages mapped.  Every change of the map goes through
    :meth:`_put` and :meth:`_drop`, so a subclass can keep an index beside it.
    """

    def __init__(self) -> None:
        self._runs: SortedDict = SortedDict()
        self.dpages = 0

    def __bool__(self) -> bool:
        return bool(self._runs)

    def __len__(self) -> int:
        """Number of runs."""
        return len(self._runs)

    def runs(self) -> Iterator[Mapped]:
        """Every run, in order."""
        return (Mapped(s, to, n) for s, (n, to) in self._runs.items())

    def run_at(self, dpage: int) -> Mapped | None:
        """The run holding *dpage*, or None."""
        pos = self._runs.bisect_right(dpage) - 1
        if pos < 0:
            return None
        start, (length, to) = self._runs.peekitem(pos)
        return Mapped(start, to, length) if dpage < start + length else None

    def overlaps(self, start: int, count: int) -> bool:
        """Whether any dpage of ``[start, start+count)`` is mapped."""
        if count <= 0 or not self._runs:
            return False
        pos = self._runs.bisect_left(start + count) - 1
        if pos < 0:
            return False
        key, (length, _) = self._runs.peekitem(pos)
        return bool(key + length > start)

    def insert(self, start: int, count: int, to: int) -> None:
        """Map ``[start, start+count)`` to *to* onward; OverlapError, with nothing changed, if
        any of it is mapped."""
        if count <= 0:
            raise ValueError(f"run of {count} dpages")
        if self.overlaps(start, count):
            raise OverlapError(f"dpages [{start}, {start + count}) overlap a run already held")
        pos = self._runs.bisect_left(start) - 1
        if pos >= 0:
            left, (left_len, left_to) = self._runs.peekitem(pos)
            if left + left_len == start and left_to + left_len == to:
                self._drop(left)
                start, to, count = left, left_to, count + left_len
        right = self._runs.get(start + count)
        if right is not None and right[1] == to + count:
            self._drop(start + count)
            count += right[0]
        self._put(start, count, to)

    def cut(self, start: int, count: int) -> list[Mapped]:
        """Unmap ``[start, start+count)``; return the parts that were mapped, in order."""
        if count <= 0 or not self._runs:
            return []
        end = start + count
        keys = list(self._runs.irange(minimum=start, maximum=end - 1))
        pos = self._runs.bisect_left(start) - 1
        if pos >= 0:  # a run that starts before the range may reach into it
            keys.insert(0, self._runs.peekitem(pos)[0])
        out: list[Mapped] = []
        for key in keys:
            length, to = self._runs[key]
            run_end = key + length
            if run_end <= start:
                continue
            self._drop(key)
            if key < start:
                self._put(key, start - key, to)
            if run_end > end:
                self._put(end, run_end - end, to + (end - key))
            lo, hi = max(key, start), min(run_end, end)
            out.append(Mapped(lo, to + (lo - key), hi - lo))
        return out

    def pieces(self, first: int, end: int) -> Iterator[Mapped]:
        """Mapped runs and holes (``to`` None) that exactly cover ``[first, end)``."""
        pos = max(self._runs.bisect_right(first) - 1, 0)
        cursor = first
        keys = self._runs.keys()
        values = self._runs.values()
        while cursor < end and pos < len(keys):
            key = keys[pos]
            length, to = values[pos]
            run_end = key + length
            pos += 1
            if run_end <= cursor:
                continue
            if key >= end:
                break
            if key > cursor:
                yield Mapped(cursor, None, key - cursor)
                cursor = key
            stop = min(run_end, end)
            yield Mapped(cursor, to + (cursor - key), stop - cursor)
            cursor = stop
        if cursor < end:
            yield Mapped(cursor, None, end - cursor)

    def last_end(self) -> int:
        """First dpage after the last run (0 when empty)."""
        if not self._runs:
            return 0
        key, (length, _) = self._runs.peekitem(-1)
        return int(key + length)

    def clear(self) -> None:
        """Unmap everything."""
        for key in list(self._runs):
            self._drop(key)

    def _put(self, start: int, length: int, to: int) -> None:
        self._runs[start] = (length, to)
        self.dpages += length

    def _drop(self, start: int) -> tuple[int, int]:
        length, to = self._runs.pop(start)
        self.dpages -= length
        return length, to


class RunSet(RunMap):
    """A set of dpages kept as maximal runs: a :class:`RunMap` where each run maps to itself."""

    def __init__(self, runs: Iterable[Extent] = ()) -> None:
        super().__init__()
        for run in runs:
            self.add(run.start, run.length)

    def __iter__(self) -> Iterator[Extent]:
        return (Extent(s, n) for s, (n, _) in self._runs.items())

    def __contains__(self, dpage: object) -> bool:
        # Any integer (a numpy one too): a dpage number taken for "not in the set" only
        # because of its type could be handed out as free.
        return isinstance(dpage, Integral) and self.run_at(int(dpage)) is not None

    def add(self, start: int, count: int) -> Extent:
        """Put ``[start, start+count)`` in the set (some may be there already); return the run
        that now holds it (empty if *count* is not positive: nothing is added)."""
        if count <= 0:
            return Extent(start, 0)
        # What was there already goes; the parts of runs reaching past either end touch
        # the range then, and insert joins them.
        self.cut(start, count)
        self.insert(start, count, start)
        run = self.run_at(start)
        assert run is not None
        return Extent(run.start, run.length)

    def take(self, start: int, count: int) -> list[Extent]:
        """Remove ``[start, start+count)`` from the set; return the parts that were in it."""
        return [Extent(m.start, m.length) for m in self.cut(start, count)]

    def first(self) -> Extent | None:
        """The lowest run, or None when the set is empty."""
        if not self._runs:
            return None
        start, (length, _) = self._runs.peekitem(0)
        return Extent(start, length)

    def gaps(self, lo: int, hi: int) -> list[Extent]:
        """The dpages of ``[lo, hi)`` that are not in the set, as runs."""
        return [Extent(p.start, p.length) for p in self.pieces(lo, hi) if p.to is None]
