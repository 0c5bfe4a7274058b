"""A pool: one slice of the region, managed as a bitmap of dpages.

The bitmap (one bit per dpage, set = allocated, bitmap.py) is the record, as
in the dmemfs patchset.  Beside it a free-run index (free runs sorted by start and by
length) answers "where is a run of N free dpages" without scanning, so an
allocation costs O(extents returned x log(free runs)), not O(pool size).  The
vocabulary follows the kernel's genalloc: a pool has a size and avail; an
allocation returns extents; free takes the size.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
from sortedcontainers import SortedList

from ..errors import AllocatorError, NoSpaceError
from .bitmap import Bitmap
from .runs import Extent, OverlapError, RunSet

log = logging.getLogger(__name__)


class FreeRuns(RunSet):
    """A pool's free runs, with an index by length beside them: (length, start) pairs,
    so that a best fit is one bisection."""

    def __init__(self, start: int, size: int) -> None:
        self.by_size: SortedList = SortedList()
        super().__init__([Extent(start, size)])

    def largest(self) -> int:
        """Length of the longest run, 0 when there is none."""
        return int(self.by_size[-1][0]) if self.by_size else 0

    def _put(self, start: int, length: int, to: int) -> None:
        super()._put(start, length, to)
        self.by_size.add((length, start))

    def _drop(self, start: int) -> tuple[int, int]:
        length, to = super()._drop(start)
        self.by_size.remove((length, start))
        return length, to


@dataclass(frozen=True)
class PoolStats:
    """A consistent snapshot of one pool's counters.

    Fields:
        index: the pool's number (its order in the region).
        node: the NUMA node the pool's memory is bound to.
        dpage_size: bytes per dpage.
        first_dpage: the pool's first dpage, as a region dpage number.
        total_dpages: dpages in the pool.
        free_dpages: dpages not allocated (the original's ``free_dpages``).
        used_dpages: ``total_dpages - free_dpages``.
        largest_free_run: the longest run of free dpages; the largest
            allocation the pool can satisfy with one extent.
        free_runs: how many separate free runs there are.
        fragmentation: ``1 - largest_free_run / free_dpages`` (0 when all free
            space is one run or there is none).
        allocs: allocation calls served since start.
        frees: free calls since start.
        fallback_dpages: dpages that a ``preferred`` policy naming this pool
            had to take from other pools because this one was full.
        bad_dpages: dpages marked bad (memory errors); never handed out again.
            They count as used, whether a file still owns them or not.
    """

    index: int
    node: int
    dpage_size: int
    first_dpage: int
    total_dpages: int
    free_dpages: int
    used_dpages: int
    largest_free_run: int
    free_runs: int
    fragmentation: float
    allocs: int
    frees: int
    fallback_dpages: int
    bad_dpages: int


class Pool:
    """Dpages ``[first_dpage, first_dpage + size)`` of the region, bound to one NUMA node."""

    def __init__(self, index: int, node: int, first_dpage: int, size: int, dpage_size: int) -> None:
        if size <= 0:
            raise ValueError(f"pool {index}: size must be positive, got {size}")
        self.index = index
        self.node = node
        self.first_dpage = first_dpage
        self.size = size
        self.dpage_size = dpage_size
        self.avail = size
        self.allocs = 0
        self.frees = 0
        self.fallback_dpages = 0
        # Set = allocated (or bad).  One bit per dpage: 32 KiB per GiB at 4K dpages.
        self.bitmap = Bitmap(size)
        self._free = FreeRuns(first_dpage, size)
        # Dpages with memory errors: kept out of the free runs for good.
        self.bad: SortedList = SortedList()

    @property
    def end_dpage(self) -> int:
        """First region dpage after the pool."""
        return self.first_dpage + self.size

    def __contains__(self, dpage: int) -> bool:
        return self.first_dpage <= dpage < self.end_dpage

    def largest_free_run(self) -> int:
        """Length of the longest free run, 0 when the pool is full."""
        return self._free.largest()

    def alloc(self, count: int, goal: int | None = None) -> list[Extent]:
        """Take exactly *count* dpages and return them as extents, or raise NoSpaceError.

        If *goal* is a free dpage, the allocation starts there (so a file that
        grows stays contiguous).  Otherwise the smallest free run that holds
        all of it is used (best fit); if no run is large enough the largest
        runs are taken first, which gives the fewest extents.
        """
        if count <= 0:
            raise ValueError(f"allocation of {count} dpages")
        if count > self.avail:
            raise NoSpaceError(f"pool {self.index}: {count} dpages wanted, {self.avail} free")
        extents: list[Extent] = []
        remaining = count
        by_size = self._free.by_size
        if goal is not None and goal in self:
            run = self._free.run_at(goal)
            if run is not None:
                take = min(remaining, run.start + run.length - goal)
                extents.append(self._carve(goal, take))
                remaining -= take
        while remaining:
            pos = by_size.bisect_left((remaining, -1))
            if pos < len(by_size):
                run_start = by_size[pos][1]  # best fit
                take = remaining
            else:
                take, run_start = by_size[-1]  # largest first
            extents.append(self._carve(run_start, take))
            remaining -= take
        self.allocs += 1
        return extents

    def free(self, start: int, count: int) -> None:
        """Give back *count* dpages from *start*; all of them must be allocated."""
        if count <= 0 or start < self.first_dpage or start + count > self.end_dpage:
            raise AllocatorError(
                f"pool {self.index}: free of dpages [{start}, {start + count}) outside "
                f"[{self.first_dpage}, {self.end_dpage})"
            )
        lo = start - self.first_dpage
        if not self.bitmap.all(lo, count):
            bad = start + int(np.flatnonzero(~self.bitmap.bits(lo, count))[0])
            raise AllocatorError(f"pool {self.index}: free of dpage {bad}, which is not allocated")
        self.frees += 1
        # A bad dpage stays taken: only the good runs between bad ones go back.
        cursor = start
        for bad in list(self.bad.irange(start, start + count - 1)):
            if bad > cursor:
                self._release(cursor, bad - cursor)
            cursor = bad + 1
        if cursor < start + count:
            self._release(cursor, start + count - cursor)

    def claim(self, start: int, count: int) -> None:
        """Take exactly dpages ``[start, start+count)``, which must all be free.

        Used to rebuild the bitmap from recovered extent maps: a dpage claimed
        twice, or outside the pool, raises AllocatorError.
        """
        if count <= 0 or start < self.first_dpage or start + count > self.end_dpage:
            raise AllocatorError(f"pool {self.index}: dpages [{start}, {start + count}) are "
                                 f"outside [{self.first_dpage}, {self.end_dpage})")
        self._carve(start, count, hint=" (claimed twice?)")

    def mark_bad(self, dpage: int) -> bool:
        """Take *dpage* out of service for good; return whether it was free.

        A free dpage leaves the free runs now; an allocated one stays with
        its file, and free() will not return it to the free runs.
        """
        if dpage not in self:
            raise AllocatorError(f"pool {self.index}: dpage {dpage} is not in this pool")
        if dpage in self.bad:
            return False
        self.bad.add(dpage)
        if dpage in self._free:
            self._carve(dpage, 1)
            return True
        return False

    def _release(self, start: int, count: int) -> None:
        """Put allocated dpages ``[start, start+count)`` back in the free runs."""
        try:
            self._free.insert(start, count, start)  # first: it refuses with nothing changed
        except OverlapError:
            raise AllocatorError(f"pool {self.index}: dpages [{start}, {start + count}) are "
                                 "allocated in the bitmap but in the free runs too") from None
        self.bitmap.clear(start - self.first_dpage, count)
        self.avail += count

    def free_runs(self) -> list[Extent]:
        """All free runs in address order."""
        return list(self._free)

    def taken_runs(self) -> list[Extent]:
        """All runs of taken dpages (allocated or bad) in address order."""
        return self._free.gaps(self.first_dpage, self.end_dpage)

    def statistics(self) -> PoolStats:
        """Return a frozen snapshot of the pool's counters."""
        largest = self.largest_free_run()
        return PoolStats(
            index=self.index,
            node=self.node,
            dpage_size=self.dpage_size,
            first_dpage=self.first_dpage,
            total_dpages=self.size,
            free_dpages=self.avail,
            used_dpages=self.size - self.avail,
            largest_free_run=largest,
            free_runs=len(self._free),
            fragmentation=(1.0 - largest / self.avail) if self.avail else 0.0,
            allocs=self.allocs,
            frees=self.frees,
            fallback_dpages=self.fallback_dpages,
            bad_dpages=len(self.bad),
        )

    def check(self) -> None:
        """Verify that the free-run index, the bitmap and avail agree; raise AllocatorError if not.

        O(pool size); meant for tests and on-demand verification.
        """
        taken = self.bitmap.bits()
        free = np.concatenate(([False], ~taken, [False])).astype(np.int8)
        edges = np.flatnonzero(np.diff(free))
        starts, ends = edges[0::2], edges[1::2]
        from_bitmap = {int(s) + self.first_dpage: int(e - s)
                       for s, e in zip(starts, ends, strict=True)}
        if from_bitmap != {run.start: run.length for run in self._free}:
            raise AllocatorError(f"pool {self.index}: free-run index disagrees with the bitmap")
        if sorted((n, s) for s, n in from_bitmap.items()) != list(self._free.by_size):
            raise AllocatorError(f"pool {self.index}: size index disagrees with the bitmap")
        if self.size - self.bitmap.count() != self.avail:
            raise AllocatorError(f"pool {self.index}: avail {self.avail} disagrees with the bitmap")
        if not all(taken[d - self.first_dpage] for d in self.bad):
            raise AllocatorError(f"pool {self.index}: a bad dpage is clear in the bitmap")

    def _carve(self, start: int, count: int, hint: str = "") -> Extent:
        """Take free dpages ``[start, start+count)`` out of the free runs and set them;
        AllocatorError, with nothing changed, if they are not all free (*hint* says why
        that may be)."""
        run = self._free.run_at(start)
        if run is None or start + count > run.start + run.length:
            raise AllocatorError(f"pool {self.index}: dpages [{start}, {start + count}) are "
                                 f"not all free{hint}")
        lo = start - self.first_dpage
        # O(count / 64) word tests: cheap enough to keep on the allocation path.
        if self.bitmap.any(lo, count):
            raise AllocatorError(f"pool {self.index}: free-run index handed out allocated dpages")
        self._free.take(start, count)
        self.bitmap.set(lo, count)
        self.avail -= count
        return Extent(start, count)
