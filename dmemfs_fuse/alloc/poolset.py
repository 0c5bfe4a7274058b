"""The pools of a region taken together: placement by policy, all-or-nothing allocation."""

from __future__ import annotations

import bisect
import logging
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass

from ..errors import AllocatorError, NoSpaceError
from ..memory import numa
from ..memory.region import RegionPlan
from .policy import LOCAL, Policy
from .pool import Pool, PoolStats
from .runs import Extent, coalesce

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PoolSetStats:
    """Totals over every pool, in the original's names.

    Fields:
        dpage_size: bytes per dpage.
        total_dpages: dpages in all pools.
        free_dpages: free dpages in all pools.
        enospc: allocations refused for lack of space since start.
        bad_dpages: dpages marked bad in all pools (never handed out again).
        pools: each pool's own snapshot, in region order.
    """

    dpage_size: int
    total_dpages: int
    free_dpages: int
    enospc: int
    bad_dpages: int
    pools: tuple[PoolStats, ...]


class PoolSet:
    """Every pool of the region, and where an allocation's dpages come from."""

    def __init__(self, pools: Sequence[Pool], dpage_size: int,
                 max_alloc_try_dpages: int = 0, ids: Mapping[int, Pool] | None = None) -> None:
        if not pools:
            raise ValueError("a pool set needs at least one pool")
        self.pools = list(pools)
        self.dpage_size = dpage_size
        # 0 = no cap.  With a cap, one allocation is served in steps of at most
        # this many dpages, each continuing where the last ended when it can.
        self.max_alloc_try_dpages = max_alloc_try_dpages
        # The names policies use for pools (node numbers in the default layout).
        self.ids: dict[int, Pool] = dict(ids) if ids else {p.index: p for p in self.pools}
        self.enospc = 0
        self._starts = [p.first_dpage for p in self.pools]

    @classmethod
    def from_plan(cls, plan: RegionPlan, max_alloc_try_dpages: int = 0,
                  explicit: bool = True) -> PoolSet:
        """Carve the planned pools out of the region's dpages, in region order.

        Policies name pools by node number in the default layout (one pool per
        node) and by position when the pools were listed explicitly (*explicit*).
        """
        pools = []
        first = 0
        for index, spec in enumerate(plan.pools):
            count = spec.size // plan.dpage_size
            pools.append(Pool(index, spec.node, first, count, plan.dpage_size))
            first += count
        ids = {p.index: p for p in pools} if explicit else {p.node: p for p in pools}
        return cls(pools, plan.dpage_size, max_alloc_try_dpages, ids)

    @property
    def total_dpages(self) -> int:
        """Dpages in all pools."""
        return sum(p.size for p in self.pools)

    @property
    def free_dpages(self) -> int:
        """Free dpages in all pools."""
        return sum(p.avail for p in self.pools)

    def pool_id(self, pool: Pool) -> int:
        """The name policies use for *pool*."""
        return next(i for i, p in self.ids.items() if p is pool)

    def pool_of(self, dpage: int) -> Pool:
        """The pool holding region dpage *dpage*."""
        pos = bisect.bisect_right(self._starts, dpage) - 1
        if pos < 0 or dpage not in self.pools[pos]:
            raise ValueError(f"dpage {dpage} is in no pool")
        return self.pools[pos]

    def order_for(self, node: int, pools: Iterable[Pool] | None = None) -> list[Pool]:
        """*pools* (default all) in the order a caller on *node* tries them: nearest first."""
        return sorted(self.pools if pools is None else pools,
                      key=lambda p: (numa.node_distance(node, p.node), p.index))

    def allocate(self, count: int, *, policy: Policy = LOCAL, node: int = 0,
                 file_dpage: int = 0, goal: int | None = None) -> list[tuple[int, Extent]]:
        """Take *count* dpages for file dpages ``[file_dpage, file_dpage+count)``, all or nothing.

        Returns ``(file dpage, extent)`` pairs that cover the range.  *goal*
        (a region dpage) is where a sequential allocation should start if it
        is free, so that a file keeps growing contiguously.
        """
        if policy.mode == "interleave":
            return self._interleave(count, [self.ids[i] for i in policy.pools], file_dpage)
        fallback: list[Pool] = []
        if policy.mode == "bind":
            order = self.order_for(node, [self.ids[i] for i in policy.pools])
        elif policy.mode == "preferred":
            first = self.ids[policy.pools[0]]
            fallback = [p for p in self.order_for(first.node) if p is not first]
            order = [first, *fallback]
        else:
            order = self.order_for(node)
        extents = self._sequential(count, order, goal)
        if fallback:
            spilled = sum(e.length for e in extents if self.pool_of(e.start) in fallback)
            if spilled:
                order[0].fallback_dpages += spilled
                log.debug("preferred pool %d full: %d dpages from other pools", order[0].index,
                          spilled)
        out: list[tuple[int, Extent]] = []
        for ext in extents:
            out.append((file_dpage, ext))
            file_dpage += ext.length
        return out

    def alloc(self, count: int, node: int = 0, goal: int | None = None) -> list[Extent]:
        """Take *count* contiguous-as-possible dpages for a caller on *node* (local policy)."""
        return [ext for _, ext in self.allocate(count, node=node, goal=goal)]

    def free(self, extents: Iterable[Extent],
             freed: Callable[[int, int], object] | None = None) -> None:
        """Give *extents* back to their pools; an extent may span adjacent pools.

        *freed(start, count)* is called for each part a pool took back, right
        after it did (a pool refuses a part whole or takes it whole).
        """
        for ext in extents:
            for pool, part in self.split(ext):
                pool.free(part.start, part.length)
                if freed is not None:
                    freed(part.start, part.length)

    def claim(self, extents: Iterable[Extent]) -> None:
        """Take exactly *extents* (rebuilding from recovered extent maps); AllocatorError if any
        dpage is outside every pool or already taken."""
        for ext in extents:
            for pool, part in self.split(ext):
                pool.claim(part.start, part.length)

    def split(self, extent: Extent) -> Iterator[tuple[Pool, Extent]]:
        """*extent* cut at pool boundaries: each pool it crosses, with the part in it, in
        order; AllocatorError at a dpage outside every pool."""
        start, end = extent.start, extent.end
        while start < end:
            try:
                pool = self.pool_of(start)
            except ValueError:
                raise AllocatorError(f"dpage {start} is outside every pool") from None
            stop = min(end, pool.end_dpage)
            yield pool, Extent(start, stop - start)
            start = stop

    def mark_bad(self, dpage: int) -> bool:
        """Take region dpage *dpage* out of service for good; return whether it was free."""
        return self.pool_of(dpage).mark_bad(dpage)

    @property
    def bad_dpages(self) -> int:
        """Dpages marked bad in all pools."""
        return sum(len(p.bad) for p in self.pools)

    def bad_in(self, start: int, count: int) -> list[int]:
        """The bad dpages in region dpages ``[start, start+count)``."""
        out: list[int] = []
        for pool in self.pools:
            if pool.bad and pool.first_dpage < start + count and start < pool.end_dpage:
                out.extend(pool.bad.irange(start, start + count - 1))
        return out

    def statistics(self) -> PoolSetStats:
        """A frozen snapshot of the totals and of every pool."""
        return PoolSetStats(
            dpage_size=self.dpage_size,
            total_dpages=self.total_dpages,
            free_dpages=self.free_dpages,
            enospc=self.enospc,
            bad_dpages=self.bad_dpages,
            pools=tuple(p.statistics() for p in self.pools),
        )

    def _no_space(self, message: str) -> NoSpaceError:
        self.enospc += 1
        return NoSpaceError(message)

    def _sequential(self, count: int, order: list[Pool], goal: int | None) -> list[Extent]:
        if goal is not None:
            goal_pool = next((p for p in order if goal in p), None)
            if goal_pool is not None and goal_pool.node == order[0].node:
                order = [goal_pool, *(p for p in order if p is not goal_pool)]
        avail = sum(p.avail for p in order)
        if count > avail:
            raise self._no_space(f"{count} dpages wanted, {avail} free in pools "
                                 f"{', '.join(str(p.index) for p in order)}")
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
        return coalesce(taken)

    def _interleave(self, count: int, pools: list[Pool],
                    file_dpage: int) -> list[tuple[int, Extent]]:
        """File dpage f goes to ``pools[f % len(pools)]``, spread by offset as the kernel does.

        A listed pool that cannot take its share passes the rest to the other
        listed pools; ENOSPC only when the listed pools together are short.
        """
        avail = sum(p.avail for p in pools)
        if count > avail:
            raise self._no_space(f"interleave: {count} dpages wanted, {avail} free in pools "
                                 f"{', '.join(str(p.index) for p in pools)}")
        n = len(pools)
        wanted: list[list[int]] = [[] for _ in pools]
        for f in range(file_dpage, file_dpage + count):
            wanted[f % n].append(f)
        spill: list[int] = []
        for k, pool in enumerate(pools):
            if len(wanted[k]) > pool.avail:
                spill.extend(wanted[k][pool.avail:])
                del wanted[k][pool.avail:]
        for k, pool in enumerate(pools):
            room = pool.avail - len(wanted[k])
            if spill and room > 0:
                wanted[k].extend(spill[:room])
                del spill[:room]
        out: list[tuple[int, Extent]] = []
        taken: list[Extent] = []
        try:
            for k, pool in enumerate(pools):
                if not wanted[k]:
                    continue
                got = pool.alloc(len(wanted[k]))
                taken.extend(got)
                dpages = (d for ext in got for d in range(ext.start, ext.end))
                out.extend((f, Extent(d, 1)) for f, d in zip(wanted[k], dpages, strict=False))
        except BaseException:
            self.free(taken)
            raise
        out.sort()
        return out

