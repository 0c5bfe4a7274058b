"""File contents: reads, writes and size changes of files whose bytes live in the region.

The store owns the zeroing rule: no file ever sees another file's old bytes.
A freed dpage is marked dirty (zeroing.py keeps the dirty runs).  A
background task zeroes dirty dpages while the daemon is idle, so fresh
memory (zero from the kernel) and memory the zeroer has caught up with cost
nothing to allocate.  An allocation that still gets dirty dpages either:

* zeroes them before handing them out (eager), or
* with ``defer_zeroing``, leaves them dirty: they now belong to a file that
  has not touched them, so they read as zeros to it whatever the memory
  holds.  The first read or write of such a dpage zeroes it first (a write
  that covers it whole just takes it out of the set), and the background
  zeroer may zero it before that.  A truncate then costs the same whether
  its dpages were used before or not.

Deferring is only for regions that do not outlive the daemon (no metadata
log): after a kill, a persistent mount's recovery would take a dpage that
was allocated but not yet zeroed for the file's data.  So persistent
mounts zero eagerly.

Bytes past EOF inside a file's last dpage are kept zero, so growing a file
needs no work on the dpage it already has.

Bad dpages (memory errors, poison.py) stay with the file that owns them:
reads that touch one answer EIO; a write that covers a bad dpage whole moves
that part of the file to a good dpage (the bad one is never handed out
again); a partial write to one answers EIO.
"""

from __future__ import annotations

import errno
import logging
import os
from typing import Protocol

import numpy as np

from ..alloc.policy import LOCAL, Policy
from ..alloc.poolset import PoolSet
from ..alloc.runs import Extent
from ..alloc.zeroing import DEFAULT_CHUNK_BYTES, DirtyRuns, Zeroer
from ..errors import fs_error
from ..memory.shmem import FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE
from ..sizes import ceil_div
from .extents import FileExtents
from .inodes import Inode

log = logging.getLogger(__name__)


# As on tmpfs, the pools limit what is allocated, not how large a file is: a sparse file
# may be larger than the region, up to the kernel's MAX_LFS_FILESIZE (FUSE's s_maxbytes).
MAX_FILE_SIZE = (1 << 63) - 1


def check_fallocate_mode(mode: int) -> None:
    """EOPNOTSUPP for the modes tmpfs refuses (ZERO_RANGE, COLLAPSE_RANGE, INSERT_RANGE,
    UNSHARE_RANGE, ...): it takes 0, KEEP_SIZE and PUNCH_HOLE|KEEP_SIZE (the kernel
    refuses PUNCH_HOLE alone before asking the filesystem)."""
    if mode & ~(FALLOC_FL_KEEP_SIZE | FALLOC_FL_PUNCH_HOLE):
        raise fs_error(errno.EOPNOTSUPP, f"fallocate mode {mode:#x}: only allocation and "
                       "punching holes are supported, as on tmpfs")


def whole_dpages(off: int, end: int, dps: int) -> tuple[int, int]:
    """The dpages ``[first, stop)`` that bytes ``[off, end)`` cover whole (maybe none)."""
    first, stop = ceil_div(off, dps), end // dps
    return first, max(first, stop)


def seek_in(extents: FileExtents, file_size: int, off: int, whence: int, dps: int) -> int:
    """SEEK_DATA or SEEK_HOLE from *off* over the dpages the ledger maps (a mapped dpage is
    data, a hole is a hole, EOF is a hole); ENXIO at or past EOF, as on tmpfs."""
    if off >= file_size or off < 0:
        raise fs_error(errno.ENXIO, f"offset {off} is not before EOF ({file_size})")
    end = ceil_div(file_size, dps)
    for piece in extents.pieces(off // dps, end):
        if (piece.region is not None) == (whence == os.SEEK_DATA):
            return min(max(off, piece.file_dpage * dps), file_size)
    if whence == os.SEEK_HOLE:
        return file_size
    raise fs_error(errno.ENXIO, f"no data at or after byte {off}")


class RegionView(Protocol):
    """What the store uses of its region: sizes, whether it is known to be zero, its bytes.

    memory/region.py's Region is one; a test can use a bytearray (tests/regions.py).
    """

    @property
    def size(self) -> int:
        """Bytes in the region."""

    @property
    def dpage_size(self) -> int:
        """Bytes per dpage."""

    @property
    def fresh(self) -> bool:
        """Whether every byte is zero (new memory), so that nothing needs zeroing at start."""

    @property
    def view(self) -> memoryview:
        """The region's bytes."""

    @property
    def array(self) -> np.ndarray:
        """The same bytes as a numpy array of uint8."""


class FileStore:
    """Reads and writes file bytes in *region*, taking and returning dpages through *pools*."""

    def __init__(self, region: RegionView, pools: PoolSet, *, defer_zeroing: bool = False,
                 zero_chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> None:
        self.region = region
        self.pools = pools
        self.dpage_size = region.dpage_size
        self.defer_zeroing = defer_zeroing
        # Region dpages that may hold old bytes: zeroed before a file gets them.
        self.dirty = DirtyRuns()
        if not region.fresh:  # a reused file or device: anything may be in it
            self.dirty.add(0, region.size // region.dpage_size)
        self.zeroer = Zeroer(self.dirty, self.dpage_size, lambda: self.region.array,
                             pools.bad_in, zero_chunk_bytes)

    def read(self, extents: FileExtents, file_size: int, off: int,
             length: int) -> memoryview | bytes:
        """Return up to *length* bytes at *off*: a view of the region when contiguous there."""
        if off >= file_size or length <= 0:
            return b""
        end = min(file_size, off + length)
        dps = self.dpage_size
        pieces = list(extents.pieces(off // dps, ceil_div(end, dps)))
        if self.pools.bad_dpages:
            for piece in pieces:
                if piece.region is not None and self.pools.bad_in(piece.region, piece.length):
                    raise fs_error(errno.EIO, f"read of bytes [{off}, {end}): a memory error in "
                                   "this range")
        if self.dirty:  # only allocated dpages this file never touched (deferred zeroing)
            for piece in pieces:
                if piece.region is not None:
                    self._zero_now(piece.region, piece.length)
        view = self.region.view
        if len(pieces) == 1 and pieces[0].region is not None:
            base = pieces[0].region * dps + (off - pieces[0].file_dpage * dps)
            return view[base : base + end - off]
        out = bytearray(end - off)
        for piece in pieces:
            lo = max(off, piece.file_dpage * dps)
            hi = min(end, (piece.file_dpage + piece.length) * dps)
            if piece.region is not None:
                src = piece.region * dps + (lo - piece.file_dpage * dps)
                out[lo - off : hi - off] = view[src : src + hi - lo]
        return memoryview(out)

    def write(self, extents: FileExtents, file_size: int, off: int, data: bytes, *,
              node: int = 0, policy: Policy = LOCAL) -> tuple[int, int]:
        """Write *data* at *off*, allocating the dpages it touches.

        Returns the new file size and the bytes written: a write that runs past
        the largest possible file is cut short there (EFBIG only if it starts
        there), as the kernel does at s_maxbytes.  Allocation is all or
        nothing: on ENOSPC nothing was taken or written.
        """
        if off >= MAX_FILE_SIZE and data:
            raise fs_error(errno.EFBIG, f"write at byte {off}, past the largest file "
                           f"({MAX_FILE_SIZE} bytes)")
        end = min(off + len(data), MAX_FILE_SIZE)
        if end <= off:
            return file_size, 0
        dps = self.dpage_size
        replace = self._bad_to_replace(extents, off, end) if self.pools.bad_dpages else []
        self._allocate(extents, off // dps, ceil_div(end, dps), node, policy, replace=replace)
        if self.dirty:
            self._settle_for_write(extents, off, end)
        view = self.region.view
        source = memoryview(data)  # slicing a view copies nothing
        pos = 0
        for piece in extents.pieces(off // dps, ceil_div(end, dps)):
            assert piece.region is not None
            lo = max(off, piece.file_dpage * dps)
            hi = min(end, (piece.file_dpage + piece.length) * dps)
            dst = piece.region * dps + (lo - piece.file_dpage * dps)
            view[dst : dst + hi - lo] = source[pos : pos + hi - lo]
            pos += hi - lo
        return max(file_size, end), end - off

    def resize(self, extents: FileExtents, old_size: int, new_size: int, *, node: int = 0,
               policy: Policy = LOCAL) -> None:
        """Make the file *new_size* bytes long.

        Growing allocates every dpage of the new range now (a reservation, as
        on dmemfs); shrinking returns the dpages past the new end to the pools
        at once and zeroes the tail of the last one.
        """
        if new_size > MAX_FILE_SIZE:
            raise fs_error(errno.EFBIG, f"size {new_size}, past the largest file "
                           f"({MAX_FILE_SIZE} bytes)")
        dps = self.dpage_size
        if new_size > old_size:
            self._allocate(extents, old_size // dps, ceil_div(new_size, dps), node, policy)
            return
        self.free(extents.truncate(ceil_div(new_size, dps)))
        self.zero_past_eof(extents, new_size)

    def zero_past_eof(self, extents: FileExtents, size: int) -> None:
        """Zero every mapped byte at or past *size*, the file's EOF: the tail of its last
        dpage, and dpages mapped wholly past it (fallocate with KEEP_SIZE).

        The one rule for bytes past EOF, which must read as zeros once the file grows
        over them.  A shrink applies it; so does recovery, to every file, because a kill
        between a shrink's batch and its zeroing, or between a write's bytes and its
        batch, can leave bytes there.  A bad dpage is never written (on real poison that
        is a SIGBUS), and a dirty one was never touched by this file: it reads as zeros
        already, and whoever touches it first zeroes it whole.
        """
        dps = self.dpage_size
        array = self.region.array
        for piece in extents.pieces(size // dps, max(extents.end_dpage(), size // dps)):
            if piece.region is None:
                continue
            for i in range(piece.length):
                dpage = piece.region + i
                if self.pools.bad_in(dpage, 1) or self.dirty.overlaps(dpage, 1):
                    continue
                before_eof = max(0, size - (piece.file_dpage + i) * dps)
                array[dpage * dps + before_eof : (dpage + 1) * dps] = 0

    def fallocate(self, extents: FileExtents, file_size: int, mode: int, off: int,
                  length: int, *, node: int = 0, policy: Policy = LOCAL) -> int:
        """fallocate(2) as tmpfs does it; returns the new size.

        Allocation (mode 0, KEEP_SIZE) takes every dpage of the range all or nothing
        (ENOSPC with nothing changed), past EOF too with KEEP_SIZE.  PUNCH_HOLE gives
        the dpages the range covers whole back to the pools at once and zeroes the
        bytes of the ones it covers in part; the kernel drops its cached pages of the
        range itself, so a mapping then reads zeros.
        """
        check_fallocate_mode(mode)
        end = off + length
        if end > MAX_FILE_SIZE:
            raise fs_error(errno.EFBIG, f"fallocate to byte {end}, past the largest file")
        dps = self.dpage_size
        if not mode & FALLOC_FL_PUNCH_HOLE:
            self._allocate(extents, off // dps, ceil_div(end, dps), node, policy)
            return file_size if mode & FALLOC_FL_KEEP_SIZE else max(file_size, end)
        first, stop = whole_dpages(off, end, dps)
        for lo, hi in ((off, min(end, first * dps)), (max(off, stop * dps), end)):
            if lo < hi:
                self._zero_bytes(extents, lo, hi)
                # A dpage punched in pieces (a balloon gives 4 KiB pages back) goes
                # back to the pool once nothing in it is left.
                if self._all_zero(extents, lo // dps):
                    self.free(extents.punch(lo // dps, 1))
        self.free(extents.punch(first, stop - first))
        return file_size

    def _all_zero(self, extents: FileExtents, file_dpage: int) -> bool:
        """Whether file dpage *file_dpage* is mapped, good, and holds only zeros."""
        piece = next(extents.pieces(file_dpage, file_dpage + 1))
        if piece.region is None or self.pools.bad_in(piece.region, 1):
            return False
        if self.dirty.overlaps(piece.region, 1):
            return True  # never touched by this file: it reads as zeros
        dps = self.dpage_size
        return not self.region.array[piece.region * dps : (piece.region + 1) * dps].any()

    def sync(self, inode: Inode) -> None:
        """Nothing to take in: on the region path every change reaches the daemon (the
        passthrough store's sync reads what the kernel did behind it)."""

    def seek(self, extents: FileExtents, file_size: int, off: int, whence: int) -> int:
        """SEEK_DATA/SEEK_HOLE over the file's dpages (seek_in)."""
        return seek_in(extents, file_size, off, whence, self.dpage_size)

    def _zero_bytes(self, extents: FileExtents, lo: int, hi: int) -> None:
        """Zero file bytes ``[lo, hi)``, which lie in one dpage, if it is mapped.  A dpage
        still dirty reads as zeros already (deferred zeroing), and a bad one is never
        touched (on real poison that is a SIGBUS): both are left alone."""
        dps = self.dpage_size
        piece = next(extents.pieces(lo // dps, lo // dps + 1))
        if (piece.region is None or self.pools.bad_in(piece.region, 1)
                or self.dirty.overlaps(piece.region, 1)):
            return
        base = piece.region * dps - piece.file_dpage * dps
        self.region.array[base + lo : base + hi] = 0

    def release(self, extents: FileExtents) -> None:
        """Give every dpage of a file back to the pools (the file is gone)."""
        self.free(extents.truncate(0))

    def free(self, released: list[Extent]) -> None:
        """Return *released* to the pools, marking them dirty."""
        # Marked dirty only once a pool took them back: a refused free (a bug)
        # must not mark another file's dpages.
        self.pools.free(released, freed=self.dirty.add)
        if released:
            self.zeroer.notify()

    def claim(self, extents: list[Extent]) -> None:
        """Take exactly *extents* for files recovered from the journal (PoolSet.claim).

        They hold those files' bytes, so they are no longer dirty.
        """
        self.pools.claim(extents)
        for ext in extents:
            self.dirty.take(ext.start, ext.length)

    def _bad_to_replace(self, extents: FileExtents, off: int, end: int) -> list[int]:
        """File dpages on bad dpages that ``[off, end)`` covers whole (to move to good ones).

        EIO, with nothing changed, if the range covers a bad dpage only in part.
        """
        dps = self.dpage_size
        found: list[int] = []
        for piece in extents.pieces(off // dps, ceil_div(end, dps)):
            if piece.region is None:
                continue
            for bad in self.pools.bad_in(piece.region, piece.length):
                file_dpage = piece.file_dpage + bad - piece.region
                if off > file_dpage * dps or end < (file_dpage + 1) * dps:
                    raise fs_error(errno.EIO, f"write of bytes [{off}, {end}) covers only part "
                                   f"of file dpage {file_dpage}, which has a memory error")
                found.append(file_dpage)
        return found

    def _allocate(self, extents: FileExtents, first: int, end: int, node: int,
                  policy: Policy, *, replace: list[int] | None = None) -> None:
        """Map every hole in ``[first, end)``, and move the file dpages in *replace* (on bad
        dpages) to fresh ones: all of it or, on ENOSPC, nothing."""
        holes = extents.holes(first, end) + [(f, 1) for f in replace or ()]
        if not holes:
            return
        # Take everything first, map it only once all of it is there.
        done: list[tuple[int, Extent]] = []
        try:
            for file_dpage, count in holes:
                done.extend(self.pools.allocate(count, policy=policy, node=node,
                                                file_dpage=file_dpage,
                                                goal=extents.region_after(file_dpage)))
        except BaseException:
            self.pools.free([ext for _, ext in done])
            raise
        self._allocated([ext for _, ext in done])
        for file_dpage in replace or ():
            self.free(extents.punch(file_dpage, 1))  # the bad dpage stays out of the free runs
        for file_dpage, ext in done:
            extents.insert(file_dpage, [ext])
        if replace:
            log.info("moved %d file dpage(s) off bad memory", len(replace))

    def _allocated(self, got: list[Extent]) -> None:
        """New dpages for a file: zero those the background zeroer has not reached yet,
        unless zeroing is deferred to the file's first touch."""
        if self.defer_zeroing or not self.dirty:
            return
        for ext in got:
            self._zero_now(ext.start, ext.length)

    def _zero_now(self, start: int, count: int) -> None:
        """Zero the dirty dpages of ``[start, start+count)`` and take them out of the set."""
        self.zeroer.zero(self.dirty.take(start, count))

    def _settle_for_write(self, extents: FileExtents, off: int, end: int) -> None:
        """Before bytes ``[off, end)`` are written: take the file's dirty dpages there out of
        the set, zeroing the ones the write covers only in part."""
        dps = self.dpage_size
        whole_lo, whole_hi = ceil_div(off, dps), end // dps  # file dpages covered whole
        for piece in extents.pieces(off // dps, ceil_div(end, dps)):
            assert piece.region is not None
            for ext in self.dirty.take(piece.region, piece.length):
                first = piece.file_dpage + ext.start - piece.region  # file dpage of ext.start
                keep_lo = min(max(first, whole_lo), first + ext.length)
                keep_hi = max(min(first + ext.length, whole_hi), keep_lo)
                # [keep_lo, keep_hi) is overwritten whole: no need to zero it first.
                parts = [Extent(ext.start, keep_lo - first),
                         Extent(ext.start + keep_hi - first, first + ext.length - keep_hi)]
                self.zeroer.zero(part for part in parts if part.length)
