"""Dirty dpages and the background zeroer.

A dpage is *dirty* when it may hold bytes a file left behind.  The store's
rule (store.py) is that no file ever sees another file's old bytes, so a
dirty dpage is zeroed before a file can see it.  Which dpages are dirty is
kept as merged runs (:class:`DirtyRuns`), not one flag per dpage: frees
come as extents, and after a restart on a reused region every free dpage is
dirty, which is one run.

The :class:`Zeroer` zeroes dirty runs in the background, one bounded chunk at
a time and only while no request is being served, so that most allocations
find their dpages already zero.

Who may be in the dirty set (the invariant everything here relies on):

* a free dpage, or
* a dpage allocated to a file that has neither read nor written it since
  (only when the store defers zeroing, see store.py): its contents are
  zeros as far as the file is concerned, whatever the memory holds.

Every path that reads or writes a file's bytes first takes the dpages it
touches out of the set (zeroing those it does not overwrite whole), and an
allocation that zeroes eagerly takes its dpages out too.  So zeroing any
dpage that is still in the set is harmless: no file has bytes in it.

The race with requests: the daemon serves requests and runs the zeroer on
one trio thread, and neither the store's methods nor :meth:`Zeroer.step`
await.  So a step never runs inside a store call, and the invariant holds
whenever a step starts.  A step takes its dpages out of the set and zeroes
them in one go, and no request can come in between.  A dpage larger than
the chunk (1G dpages) is zeroed over several steps.  It stays in the set
until its last part is done, and each step first checks that it is still
there: not merely in the set, but never taken out since the last step (it
may have been handed out, written and freed again, dirty anew with a file's
bytes in the part already done).  If a request took it out meanwhile, the
zeroer lets go of it and, should it be dirty again, starts it over.  Bad dpages (memory
errors) are never written: they are dropped from the set untouched.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np
import trio

from ..tasks import IdleWaiter
from .runs import Extent, RunSet

log = logging.getLogger(__name__)


# Bytes zeroed per step: what a request that arrives during a step waits for at most
# (docs/performance.md has the step's time, "Background zeroer").
DEFAULT_CHUNK_BYTES = 4 << 20


@dataclass(frozen=True)
class ZeroerStats:
    """The zeroer's backlog and counters.

    Fields:
        dirty_dpages: dpages that may still hold old bytes.
        dirty_runs: separate runs of them.
        background_zeroed_dpages: dpages the background task zeroed.
        foreground_zeroed_dpages: dpages zeroed inside requests (the task had not caught up).
    """

    dirty_dpages: int
    dirty_runs: int
    background_zeroed_dpages: int
    foreground_zeroed_dpages: int


class DirtyRuns(RunSet):
    """The dirty dpages, as a :class:`RunSet`, and one dpage whose leaving the set is noticed
    even if it comes back (the zeroer's partly zeroed one): see :meth:`watch`."""

    def __init__(self) -> None:
        super().__init__()
        self._watched: int | None = None
        self.watched_left = False

    def watch(self, dpage: int | None) -> None:
        """Note in ``watched_left`` whether *dpage* is ever taken out from now on (None:
        stop watching).  Being in the set again later does not undo that: it may have
        been handed out, written and freed in between."""
        self._watched = dpage
        self.watched_left = False

    def take(self, start: int, count: int) -> list[Extent]:
        """Remove ``[start, start+count)`` from the set; return the parts that were in it."""
        out = super().take(start, count)
        if self._watched is not None and any(run.start <= self._watched < run.end
                                             for run in out):
            self.watched_left = True
        return out

    def clear(self) -> None:
        """Forget every dirty dpage."""
        super().clear()
        if self._watched is not None:
            self.watched_left = True


class Zeroer:
    """Zeroes the dirty dpages of *array* (the region's bytes) in bounded steps.

    *bad_in(start, count)* names the bad dpages of a range: those are dropped
    from the set and never written.  *array* is called for the region's bytes
    only when there is something to zero (the region may be set up later).
    """

    def __init__(self, dirty: DirtyRuns, dpage_size: int, array: Callable[[], np.ndarray],
                 bad_in: Callable[[int, int], list[int]],
                 chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> None:
        if chunk_bytes <= 0:
            raise ValueError(f"zeroing chunk of {chunk_bytes} bytes")
        self.dirty = dirty
        self.dpage_size = dpage_size
        self.array = array
        self.bad_in = bad_in
        self.chunk_bytes = chunk_bytes
        # Counters for status: dpages zeroed by the background task, and by
        # requests that found their dpages still dirty (in dpages).
        self.background_dpages = 0
        self.foreground_dpages = 0
        self.steps = 0
        # A dpage larger than a chunk, partly zeroed: (dpage, bytes done).  It
        # stays dirty until done, so anyone else who needs it zeroes it whole.
        self._partial: tuple[int, int] | None = None
        self._wake = trio.Event()

    def notify(self) -> None:
        """Dpages were added to the set: wake the background task if it sleeps."""
        self._wake.set()

    def zero(self, extents: Iterable[Extent]) -> int:
        """Zero *extents* now (a request needs them), skipping bad dpages; return dpages zeroed.

        The caller has taken them out of the set already.
        """
        done = 0
        for ext in extents:
            done += self._zero_good(ext)
        self.foreground_dpages += done
        return done

    def step(self) -> int:
        """Zero at most one chunk of dirty dpages; return the bytes it dealt with (zeroed, or
        dropped because bad), 0 when there is nothing left to do.

        Synchronous: it checks the set, takes its dpages out and zeroes them
        with no await in between (see the module's note on the race).
        """
        dps = self.dpage_size
        if self._partial is not None and self.dirty.watched_left:
            # A request took it out since the last step: it zeroed it whole, or wrote
            # into it (and maybe freed it again, dirty anew with bytes in the part
            # already done).  Hands off; if it is dirty again it is zeroed from the start.
            self._partial = None
            self.dirty.watch(None)
        if self._partial is None:
            run = self.dirty.first()
            if run is None:
                return 0
            self.steps += 1
            whole = self.chunk_bytes // dps
            if whole:
                taken = self.dirty.take(run.start, min(run.length, whole))
                self.background_dpages += sum(self._zero_good(ext) for ext in taken)
                return sum(ext.length for ext in taken) * dps
            self._partial = (run.start, 0)  # dpages larger than a chunk: one in parts
            self.dirty.watch(run.start)
        return self._continue_partial()

    async def run(self) -> None:
        """Zero dirty dpages a chunk at a time, only while the daemon has nothing else to do."""
        while True:
            if not self.dirty:
                # No checkpoint between this test and the wait: a notify()
                # cannot be missed.
                self._wake = trio.Event()
                await self._wake.wait()
                log.debug("zeroing %d dirty dpages in the background", self.dirty.dpages)
                continue
            # Idle priority: step only when no other task can run.  A request
            # then runs to its reply without steps between its own
            # checkpoints, and waits at most for the one step under way when
            # it arrived.  (With a plain checkpoint between steps, each await
            # of a request's path let another step in: several per request.)
            # The waiter watches every task wakeup, so it is there only while
            # there is a backlog.
            with IdleWaiter() as idle:
                while self.dirty:
                    await idle.wait()
                    self.step()

    def statistics(self) -> ZeroerStats:
        """The backlog and the counters, as they are now."""
        return ZeroerStats(self.dirty.dpages, len(self.dirty), self.background_dpages,
                           self.foreground_dpages)

    def _continue_partial(self) -> int:
        """Zero the next chunk of the partly zeroed dpage, which is still dirty."""
        assert self._partial is not None
        dpage, done = self._partial
        dps = self.dpage_size
        if self.bad_in(dpage, 1):
            self._finish_partial()
            return dps
        length = min(self.chunk_bytes, dps - done)
        base = dpage * dps + done
        self.array()[base : base + length] = 0
        done += length
        if done == dps:
            self._finish_partial()
            self.background_dpages += 1
        else:
            self._partial = (dpage, done)
        return length

    def _finish_partial(self) -> None:
        """The partly zeroed dpage is done (or bad): out of the set, no longer watched."""
        assert self._partial is not None
        self.dirty.watch(None)
        self.dirty.take(self._partial[0], 1)
        self._partial = None

    def _zero_good(self, ext: Extent) -> int:
        """Zero the dpages of *ext* that are not bad; return how many."""
        dps = self.dpage_size
        array = self.array()
        start, end = ext.start, ext.end
        zeroed = 0
        for bad in [*self.bad_in(start, ext.length), end]:
            if bad > start:
                array[start * dps : bad * dps] = 0
                zeroed += bad - start
            start = bad + 1
        return zeroed
