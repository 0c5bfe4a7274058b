"""The pools of a region taken together: placement order and all-or-nothing allocation."""

from __future__ import annotations

import bisect
import logging
from collections.abc import Iterable, Sequence

from . import numa
from .errors import NoSpaceError
from .pool import Extent, Pool, PoolStats

log = logging.getLogger(__name__)


class PoolSet:
    """Every pool of the region; allocations try the caller's node first, then the nearest."""

    def __init__(self, pools: Sequence[Pool], dpage_size: int,
                 max_alloc_try_dpages: int = 0) -> None:
        if not pools:
            raise ValueError("a pool set needs at least one pool")
        self.pools = list(pools)
        self.dpage_size = dpage_size
        # 0 = no cap.  With a cap, one allocation is served in steps of at most
        # this many dpages, each continuing where the last ended when it can.
        self.max_alloc_try_dpages = max_alloc_try_dpages
        self._starts = [p.first_dpage for p in self.pools]

    @property
    def total_dpages(self) -> int:
        """Dpages in all pools."""
        return sum(p.size for p in self.pools)

    @property
    def free_dpages(self) -> int:
        """Free dpages in all pools."""
        return sum(p.avail for p in self.pools)

    def pool_of(self, dpage: int) -> Pool:
        """The pool holding region dpage *dpage*."""
        pos = bisect.bisect_right(self._starts, dpage) - 1
        if pos < 0 or dpage not in self.pools[pos]:
            raise ValueError(f"dpage {dpage} is in no pool")
        return self.pools[pos]

    def order_for(self, node: int) -> list[Pool]:
        """Pools in the order an allocation from *node* tries them: nearest first."""
        return sorted(self.pools, key=lambda p: (numa.node_distance(node, p.node), p.index))

    def alloc(self, count: int, node: int = 0, goal: int | None = None) -> list[Extent]:
        """Take *count* dpages for a caller on *node*, all or nothing.

        *goal* (a region dpage) is where the allocation should start if free,
        so that a file keeps growing contiguously.
        """
        order = self.order_for(node)
        if goal is not None:
            goal_pool = next((p for p in order if goal in p), None)
            if goal_pool is not None and goal_pool.node == order[0].node:
                order.remove(goal_pool)
                order.insert(0, goal_pool)
        avail = sum(p.avail for p in order)
        if count > avail:
            raise NoSpaceError(f"{count} dpages wanted, {avail} free")
        step_cap = self.max_alloc_try_dpages or count
        taken: list[Extent] = []
        try:
            remaining = count
            for pool in order:
                while remaining and pool.avail:
                    step = min(remaining, step_cap, pool.avail)
                    got = pool.alloc(step, goal)
                    taken.extend(got)
                    goal = got[-1].end
                    remaining -= step
                if not remaining:
                    break
        except BaseException:
            self.free(taken)
            raise
        return _merge(taken)

    def free(self, extents: Iterable[Extent]) -> None:
        """Give *extents* back to their pools; an extent may span adjacent pools."""
        for ext in extents:
            start, end = ext.start, ext.end
            while start < end:
                pool = self.pool_of(start)
                stop = min(end, pool.end_dpage)
                pool.free(start, stop - start)
                start = stop

    def statistics(self) -> tuple[PoolStats, ...]:
        """A frozen snapshot of every pool's counters, in pool order."""
        return tuple(p.statistics() for p in self.pools)


def _merge(extents: list[Extent]) -> list[Extent]:
    """Join extents that continue one another (steps of one allocation)."""
    out: list[Extent] = []
    for ext in extents:
        if out and out[-1].end == ext.start:
            out[-1] = Extent(out[-1].start, out[-1].length + ext.length)
        else:
            out.append(ext)
    return out
