"""File contents on the passthrough path: each file is its own shmem file in a pool.

The kernel reads, writes and maps a passed-through file's backing file
without asking the daemon (FUSE passthrough), so the daemon is not in the
data path; it keeps the namespace, the placement and the ledger.

The allocator stays the authority over what is lent:

* The pool's bitmap is the ledger: a file's extents name the pool dpages lent
  to it.  A dpage here is a unit of the pool's memory, not a physical place
  (shmem folios move and are the kernel's), so extents and the pool picture
  on this path show the ledger, never made-up frames.
* What the daemon allocates (truncate, extending writes it serves, fallocate)
  takes dpages all or nothing: the ledger first, then the memory from the
  pool's reserve (PoolMemory.lend); ENOSPC leaves both unchanged.
* What the kernel allocates on its own (a passed-through write past EOF or into
  a hole, a fault into a hole) is bounded by the files instance's ``size=``,
  which is the pool: past it the writer gets ENOSPC from the kernel, as on
  tmpfs.  :meth:`sync` enters it in the ledger afterwards, from the backing
  file's data ranges (SEEK_DATA), and balance takes it out of the reserve.
* Shrinking and removal give dpages back to the ledger and memory to the
  reserve at once.

shmem zeroes a page on its first use in a file, so no file reads bytes it did
not write, whichever file held the memory before.

A file lives in one pool (a file cannot span tmpfs instances), chosen by its
policy when it is created: ``local`` the caller's node, ``bind`` and
``preferred`` the first listed pool with room, ``interleave`` the next pool
in turn, so files rather than pages are spread.
"""

from __future__ import annotations

import contextlib
import errno
import itertools
import logging
import mmap
import os
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from pathlib import Path

from ..alloc.policy import LOCAL, Policy
from ..alloc.pool import Pool
from ..alloc.poolset import PoolSet
from ..alloc.runs import Extent
from ..errors import NoSpaceError, fs_error
from ..memory import numa
from ..memory.shmem import (
    FALLOC_FL_KEEP_SIZE,
    FALLOC_FL_PUNCH_HOLE,
    PoolMemory,
    ShmemMemory,
    cached_pages,
    fallocate,
    holds_pages,
    page_nodes_of_file,
)
from ..sizes import ceil_div
from .extents import FileExtents
from .inodes import Inode
from .store import MAX_FILE_SIZE, check_fallocate_mode, seek_in, whole_dpages

log = logging.getLogger(__name__)

FREED = ".freed"  # the suffix of a released file's backing file until purge


@dataclass(frozen=True)
class _Seen:
    """A backing file's size, blocks and mtime when the inode last agreed with it."""

    size: int
    blocks: int
    mtime_ns: int


class PassthroughStore:
    """Backing files for every regular file, placed in *memory*'s pools, lent through *pools*."""

    def __init__(self, memory: ShmemMemory, pools: PoolSet) -> None:
        self.memory = memory
        self.pools = pools
        self.dpage_size = memory.dpage_size
        self._home: dict[int, int] = {}  # inode -> pool index of its backing file
        self._seen: dict[int, _Seen] = {}
        self._turn = itertools.count()  # interleave: the next pool in turn
        self._freed: list[Path] = []  # backing files of released files, until purge
        self._freed_found: dict[int, tuple[int, Path]] = {}  # discover: left by a kill
        # Per inode, dpages the kernel allocated that the ledger could not enter (4 KiB
        # fallback folios spread over more dpages than the pool has); reported, retried
        # at every sync, never expected.
        self._unledgered: dict[int, int] = {}

    # -- placement ------------------------------------------------------------------

    def _choose(self, node: int, policy: Policy) -> Pool:
        pools = self.pools
        if policy.mode == "interleave":
            ids = policy.pools
            return pools.ids[ids[next(self._turn) % len(ids)]]
        if policy.mode == "bind":
            order = pools.order_for(node, [pools.ids[i] for i in policy.pools])
        elif policy.mode == "preferred":
            first = pools.ids[policy.pools[0]]
            order = [first, *(p for p in pools.order_for(first.node) if p is not first)]
        else:
            order = pools.order_for(node)
        return next((p for p in order if p.avail), order[0])

    def _only(self, home: PoolMemory) -> Policy:
        """The policy that takes ledger dpages from *home*'s pool alone (a file's bytes
        live in one tmpfs instance)."""
        return Policy("bind", (self.pools.pool_id(self.pools.pools[home.index]),))

    def place(self, ino: int, node: int = 0, policy: Policy = LOCAL) -> PoolMemory:
        """The pool memory holding *ino*'s backing file, created (empty) if it has none."""
        index = self._home.get(ino)
        if index is None:
            index = self._choose(node, policy).index
            path = self.memory.pools[index].path_of(ino)
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
            os.close(fd)
            self._home[ino] = index
            self._seen[ino] = _Seen(0, 0, os.stat(path).st_mtime_ns)
        return self.memory.pools[index]

    def open_backing(self, inode: Inode, node: int = 0) -> int:
        """An fd of *inode*'s backing file (for FUSE_DEV_IOC_BACKING_OPEN); the caller closes it."""
        home = self.place(inode.ino, node, inode.policy or LOCAL)
        return os.open(home.path_of(inode.ino), os.O_RDWR | os.O_CLOEXEC)

    def backing_path(self, ino: int) -> str | None:
        """Where *ino*'s bytes are (root only), or None."""
        index = self._home.get(ino)
        return None if index is None else str(self.memory.pools[index].path_of(ino))

    def page_nodes(self, ino: int, offset: int, length: int) -> list[int]:
        """The nodes the kernel says hold the first, middle and last page of file bytes
        ``[offset, offset+length)``, which the ledger lent (so they are allocated)."""
        path = self.backing_path(ino)
        if path is None or length <= 0:
            return []
        probes = numa.probe_offsets(offset, length)
        try:
            return sorted(set(page_nodes_of_file(path, probes)))
        except OSError as exc:
            log.debug("move_pages on %s: %s", path, exc)
            return []

    # -- what the kernel did ---------------------------------------------------------

    def sync(self, inode: Inode) -> None:
        """Take in what the kernel changed behind the daemon: size, mtime, and the dpages a
        passed-through write or fault allocated (entered in the ledger)."""
        index = self._home.get(inode.ino)
        if index is None or inode.data is None:
            return
        home = self.memory.pools[index]
        try:
            st = os.stat(home.path_of(inode.ino))
        except FileNotFoundError:
            return
        seen = self._seen[inode.ino]
        if ((st.st_size, st.st_blocks, st.st_mtime_ns) == (seen.size, seen.blocks, seen.mtime_ns)
                and inode.ino not in self._unledgered):
            return
        # Adopted (seen unknown): the times change only if the kernel changed the data
        # after the metadata last heard of the file (its size or its blocks differ), so
        # that a utimens the daemon served stays.
        if seen.mtime_ns < 0:
            changed = (st.st_size != inode.size
                       or ceil_div(st.st_blocks * 512, self.dpage_size) > inode.data.mapped)
        else:
            changed = st.st_mtime_ns != seen.mtime_ns
        if st.st_size != inode.size:
            inode.size = st.st_size
            inode.touch()
        if changed:
            inode.touch(data=True, now=st.st_mtime_ns)
        if st.st_blocks > seen.blocks or inode.ino in self._unledgered:
            self._enter_data(inode.data, home)
        self._seen[inode.ino] = _Seen(st.st_size, st.st_blocks, st.st_mtime_ns)

    @property
    def unledgered_dpages(self) -> int:
        """Dpages the kernel holds in files that the ledger has no room to enter."""
        return sum(self._unledgered.values())

    def _enter_data(self, extents: FileExtents, home: PoolMemory, *,
                    resident: bool = False) -> None:
        """Lend ledger dpages for every data range of the backing file the ledger lacks.

        With *resident* (adoption), also for pages the file holds that SEEK_DATA cannot
        see: fallocated ones not written yet (tmpfs calls them holes), lent by a request
        whose commit the kill prevented (holds_pages sees them through cachestat).
        """
        dps = self.dpage_size
        fd = os.open(home.path_of(extents.ino), os.O_RDONLY | os.O_CLOEXEC)
        try:
            runs = _dpage_runs(data_ranges(fd), dps)
            st = os.fstat(fd)
            held = ceil_div(st.st_blocks * 512, dps)
            if st.st_size and held > sum(e - f for f, e in runs):
                last = (st.st_size - 1) // dps
                if _probe(fd, last, dps):  # SEEK_DATA's blind spot at the largest size
                    runs = _dpage_runs([(f * dps, e * dps) for f, e in runs]
                                       + [(last * dps, st.st_size)], dps)
            if resident and held > extents.mapped:
                found = [(d * dps, (d + 1) * dps) for f, n in
                         extents.holes(0, max(ceil_div(st.st_size, dps), 1))
                         for d in _probe_run(fd, f, n, dps)]
                runs = _dpage_runs([(f * dps, e * dps) for f, e in runs] + found, dps)
        finally:
            os.close(fd)
        holes = [hole for first, end in runs for hole in extents.holes(first, end)]
        policy = self._only(home)
        missing = 0
        for file_dpage, count in holes:
            try:
                got = self.pools.allocate(count, policy=policy, file_dpage=file_dpage)
            except NoSpaceError:
                missing += count
                continue
            for start, ext in got:
                extents.insert(start, [ext])
        if missing and self._unledgered.get(extents.ino) != missing:
            log.warning("pool %d: the kernel holds %d dpage(s) of inode %d the ledger has no "
                        "room for", home.index, missing, extents.ino)
        if missing:
            self._unledgered[extents.ino] = missing
        else:
            self._unledgered.pop(extents.ino, None)
        home.balance()

    def reconcile(self, inodes: Mapping[int, Inode], busy: Collection[int]) -> None:
        """Sync the files the kernel may be writing and balance every pool.

        *busy* are the inodes open now; a file written through a mapping that
        outlived its last close shows as a pool holding more than its ledger
        says, and then every file of that pool is synced.
        """
        for ino in busy:
            if (inode := inodes.get(ino)) is not None:
                self.sync(inode)
        dps = self.dpage_size
        for pool, memory in zip(self.pools.pools, self.memory.pools, strict=True):
            lent = (pool.size - pool.avail) * dps  # the ledger's count, read every 0.2 s
            if memory.file_bytes() > lent:
                for ino, index in list(self._home.items()):
                    if index == memory.index and (inode := inodes.get(ino)) is not None:
                        self.sync(inode)
            memory.balance()

    # -- what the daemon does --------------------------------------------------------

    def read(self, extents: FileExtents, file_size: int, off: int, length: int) -> bytes:
        """Up to *length* bytes at *off* (only asked for if the kernel sends READ)."""
        if off >= file_size or length <= 0:
            return b""
        fd = self._open(extents.ino)
        try:
            return os.pread(fd, min(length, file_size - off), off)
        finally:
            os.close(fd)

    def write(self, extents: FileExtents, file_size: int, off: int, data: bytes, *,
              node: int = 0, policy: Policy = LOCAL) -> tuple[int, int]:
        """Write *data* at *off*, lending the dpages it touches first (all or nothing);
        returns the new size and the bytes written (only if the kernel sends WRITE)."""
        if off >= MAX_FILE_SIZE and data:
            raise fs_error(errno.EFBIG, f"write at byte {off}, past the largest file")
        end = min(off + len(data), MAX_FILE_SIZE)
        if end <= off:
            return file_size, 0
        dps = self.dpage_size
        self.place(extents.ino, node, policy)
        self._lend(extents, off // dps, ceil_div(end, dps), node)
        fd = self._open(extents.ino)
        try:
            written = os.pwrite(fd, memoryview(data)[: end - off], off)
        finally:
            os.close(fd)
        self._note(extents.ino)
        return max(file_size, off + written), written

    def resize(self, extents: FileExtents, old_size: int, new_size: int, *, node: int = 0,
               policy: Policy = LOCAL) -> None:
        """Make the file *new_size* bytes long: growing lends every dpage of the new range
        now (ENOSPC with nothing changed); shrinking gives the dpages past the end back."""
        if new_size > MAX_FILE_SIZE:
            raise fs_error(errno.EFBIG, f"size {new_size}, past the largest file "
                           f"({MAX_FILE_SIZE} bytes)")
        dps = self.dpage_size
        home = self.place(extents.ino, node, policy)
        if new_size > old_size:
            self._lend(extents, old_size // dps, ceil_div(new_size, dps), node)
        fd = self._open(extents.ino)
        try:
            os.ftruncate(fd, new_size)
        finally:
            os.close(fd)
        if new_size < old_size:
            self.pools.free(extents.truncate(ceil_div(new_size, dps)))
            home.balance()
        self._note(extents.ino)

    def _lend(self, extents: FileExtents, first: int, end: int, node: int) -> None:
        """Lend every ledger hole of file dpages ``[first, end)`` and its memory, or nothing."""
        home = self.memory.pools[self._home[extents.ino]]
        # What the kernel wrote since the last sync is data, not a hole to lend (and to
        # punch again if the memory cannot be had).
        self._enter_data(extents, home)
        holes = extents.holes(first, end)
        if not holes:
            return
        policy = self._only(home)
        dps = self.dpage_size
        fd = self._open(extents.ino)  # before anything is taken: EMFILE leaves nothing
        done: list[tuple[int, Extent]] = []
        try:
            for file_dpage, count in holes:
                done.extend(self.pools.allocate(count, policy=policy, node=node,
                                                file_dpage=file_dpage))
        except BaseException:
            self.pools.free([ext for _, ext in done])
            os.close(fd)
            raise
        taken: list[tuple[int, int]] = []

        def take() -> None:
            try:
                for file_dpage, count in holes:
                    # KEEP_SIZE: the size is set by the caller; the dpage past EOF stays
                    # whole (cutting it would split a huge folio).
                    fallocate(fd, file_dpage * dps, count * dps, FALLOC_FL_KEEP_SIZE)
                    taken.append((file_dpage * dps, (file_dpage + count) * dps))
            except OSError:
                # A failed fallocate undoes itself; the ranges taken before it go back
                # too, except what holds data (a passed-through write since the sync).
                _punch_unwritten(fd, taken)
                raise

        try:
            home.lend(sum(count for _, count in holes) * dps, take)
        except OSError as exc:
            self.pools.free([ext for _, ext in done])
            if exc.errno in (errno.ENOSPC, errno.ENOMEM):
                raise NoSpaceError(f"pool {home.index}: the memory for {len(done)} extent(s) "
                                   f"could not be taken ({exc.strerror})") from None
            raise
        finally:
            os.close(fd)
        for file_dpage, ext in done:
            extents.insert(file_dpage, [ext])

    def fallocate(self, extents: FileExtents, file_size: int, mode: int, off: int,
                  length: int, *, node: int = 0, policy: Policy = LOCAL) -> int:
        """fallocate(2) as tmpfs does it, through the ledger; returns the new size.

        Allocation lends the range's dpages and their memory all or nothing
        (_lend).  PUNCH_HOLE punches the backing file (the kernel zeroes the
        partial pages and unmaps the range from every mapping) and gives the dpages
        the range covers whole back to the ledger and their memory to the reserve.
        """
        check_fallocate_mode(mode)
        end = off + length
        if end > MAX_FILE_SIZE:
            raise fs_error(errno.EFBIG, f"fallocate to byte {end}, past the largest file")
        dps = self.dpage_size
        home = self.place(extents.ino, node, policy)
        if not mode & FALLOC_FL_PUNCH_HOLE:
            self._lend(extents, off // dps, ceil_div(end, dps), node)
            new_size = file_size if mode & FALLOC_FL_KEEP_SIZE else max(file_size, end)
        else:
            new_size = file_size
        fd = self._open(extents.ino)
        try:
            if mode & FALLOC_FL_PUNCH_HOLE:
                fallocate(fd, off, length, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE)
            elif new_size != file_size:
                os.ftruncate(fd, new_size)
        finally:
            os.close(fd)
        if mode & FALLOC_FL_PUNCH_HOLE:
            first, stop = whole_dpages(off, end, dps)
            self.pools.free(extents.punch(first, stop - first))
            # A dpage punched in pieces (a balloon gives 4 KiB pages back) goes back
            # once the backing file holds no page of it any more.
            for dpage in {off // dps, (end - 1) // dps}:
                if not first <= dpage < stop and self._emptied(extents.ino, dpage):
                    self.pools.free(extents.punch(dpage, 1))
            home.balance()
        self._note(extents.ino)
        return new_size

    def _emptied(self, ino: int, dpage: int) -> bool:
        """Whether the backing file holds no page (written or only allocated) in *dpage*."""
        dps = self.dpage_size
        length = _probe_length(dpage, dps)
        fd = self._open(ino)
        try:
            return length > 0 and not holds_pages(fd, dpage * dps, length)
        finally:
            os.close(fd)

    def seek(self, extents: FileExtents, file_size: int, off: int, whence: int) -> int:
        """SEEK_DATA/SEEK_HOLE as the backing file answers it: tmpfs's own answer."""
        path = self.backing_path(extents.ino)
        if path is None:  # never opened: no data anywhere
            return seek_in(extents, file_size, off, whence, self.dpage_size)
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            return os.lseek(fd, off, whence)
        finally:
            os.close(fd)

    def release(self, extents: FileExtents) -> None:
        """The file is gone: remove its backing file and give its dpages back.

        A process that still maps it keeps those pages until it unmaps them; the
        pool's reserve takes them back at the balance after that.
        """
        index = self._home.pop(extents.ino, None)
        self._seen.pop(extents.ino, None)
        self._unledgered.pop(extents.ino, None)

        self.pools.free(extents.truncate(0))
        if index is None:
            return
        home = self.memory.pools[index]
        # Removed only once the metadata says the file is gone (purge, after the commit):
        # a kill in between must not leave the metadata naming a file whose bytes are gone.
        path = home.path_of(extents.ino)
        try:
            os.rename(path, path.with_name(path.name + FREED))
        except FileNotFoundError:
            log.warning("inode %d: its backing file was already gone", extents.ino)
            return
        self._freed.append(path.with_name(path.name + FREED))

    def purge(self) -> None:
        """Remove the backing files of released files, now that their release is committed
        (or the mount keeps no metadata), and give their memory back to the reserves."""
        if not self._freed:
            return
        for path in self._freed:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
        self._freed.clear()
        for memory in self.memory.pools:
            memory.balance()

    # -- a daemon that died -------------------------------------------------------------

    def discover(self) -> int:
        """Find the backing files in adopted pool memory (before recovery installs the
        metadata, which frees its orphans through release); returns how many."""
        for memory in self.memory.pools:
            for ino, _ in memory.backing_files():
                self._home[ino] = memory.index
                self._seen[ino] = _Seen(-1, -1, -1)  # the next sync takes all of it in
            for ino, path in memory.freed_files():
                self._freed_found[ino] = (memory.index, path)
        return len(self._home)

    def claim(self, extents: list[Extent]) -> None:
        """Take exactly *extents* in the ledger for files recovered from the metadata."""
        self.pools.claim(extents)

    def adopt(self, inodes: Mapping[int, Inode]) -> int:
        """After recovery: take in what the kernel did after the last commit (sizes,
        mtimes, dpages written, and pages a lend took whose commit the kill prevented),
        take back the backing file of a file whose release never committed, and remove
        backing files that no inode names (created or freed in a request the metadata
        never saw).  A file the metadata says holds data but whose backing file is gone
        is an error: its bytes are lost.  Returns the backing files removed."""
        for inode in inodes.values():

            if inode.data is None:
                continue
            if inode.ino not in self._home and inode.ino in self._freed_found:
                # Released in a request whose commit the kill prevented: still the file's.
                index, path = self._freed_found.pop(inode.ino)
                os.rename(path, self.memory.pools[index].path_of(inode.ino))
                self._home[inode.ino] = index
                self._seen[inode.ino] = _Seen(-1, -1, -1)
            if inode.ino not in self._home:
                if inode.data.mapped or inode.size:
                    raise OSError(errno.ENOENT, f"file {inode.ino} of {inode.size} bytes has no "
                                  "backing file: its bytes are gone")
                continue
            self.sync(inode)
            home = self.memory.pools[self._home[inode.ino]]
            self._drop_unheld(inode.data, home)  # first: what it frees may be entered next
            self._enter_data(inode.data, home, resident=True)
        removed = len(self._freed_found)
        for _, path in self._freed_found.values():
            os.unlink(path)
        self._freed_found.clear()
        self.purge()
        for ino, index in list(self._home.items()):
            node = inodes.get(ino)
            if node is None or node.data is None:
                del self._home[ino], self._seen[ino]
                os.unlink(self.memory.pools[index].path_of(ino))
                removed += 1
        for memory in self.memory.pools:
            memory.balance()
        return removed

    def _drop_unheld(self, extents: FileExtents, home: PoolMemory) -> None:
        """Adoption: give back the ledger dpages of which the backing file holds no page.

        A committed lend is in the backing file (its fallocate comes before the commit),
        so such a dpage lost its memory behind the ledger's back: cut or punched by a
        request the kill stopped before its commit, or by MADV_REMOVE on a mapping.
        Kept, it would be lent to nothing: a file truncated to 0 would go on counting its
        old blocks, and the pool would stay that much short until the file is removed.
        """
        dps = self.dpage_size
        unheld: list[int] = []
        fd = os.open(home.path_of(extents.ino), os.O_RDONLY | os.O_CLOEXEC)
        try:
            for file_dpage, _, count in extents.runs():
                found = _unheld(fd, file_dpage, count, dps)
                if found is None:
                    return  # no cachestat here (logged once): the ledger stays as recorded
                unheld += found
        finally:
            os.close(fd)
        for dpage in unheld:
            self.pools.free(extents.punch(dpage, 1))
        if unheld:
            log.info("inode %d: %d dpage(s) the metadata lends it hold no memory: given back",
                     extents.ino, len(unheld))

    def _open(self, ino: int) -> int:
        return os.open(self.memory.pools[self._home[ino]].path_of(ino), os.O_RDWR | os.O_CLOEXEC)

    def _note(self, ino: int) -> None:
        """The daemon changed the backing file itself: what sync compares with from now."""
        st = os.stat(self.memory.pools[self._home[ino]].path_of(ino))
        self._seen[ino] = _Seen(st.st_size, st.st_blocks, st.st_mtime_ns)


def _punch_unwritten(fd: int, ranges: list[tuple[int, int]]) -> None:
    """Punch byte *ranges* of *fd*, leaving alone every part SEEK_DATA shows holds data."""
    data = data_ranges(fd)
    for lo, hi in ranges:
        pos = lo
        for dlo, dhi in data:
            if dhi <= pos or dlo >= hi:
                continue
            if dlo > pos:
                fallocate(fd, pos, dlo - pos, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE)
            pos = max(pos, dhi)
        if pos < hi:
            fallocate(fd, pos, hi - pos, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE)


def _dpage_runs(ranges: list[tuple[int, int]], dps: int) -> list[tuple[int, int]]:
    """The dpages ``[first, end)`` that byte *ranges* (sorted or not) touch, merged: two
    data ranges may share a dpage (a page not written yet between them)."""
    runs: list[list[int]] = []
    for lo, hi in sorted(ranges):
        first, end = lo // dps, ceil_div(hi, dps)
        if runs and first <= runs[-1][1]:
            runs[-1][1] = max(runs[-1][1], end)
        else:
            runs.append([first, end])
    return [(f, e) for f, e in runs]


def _probe_length(dpage: int, dps: int) -> int:
    """The bytes of *dpage* mincore can look at: the kernel maps nothing that ends past
    MAX_LFS_FILESIZE's last page, so a probe stops short of it there (0: nothing)."""
    return min(dps, MAX_FILE_SIZE + 1 - mmap.PAGESIZE - dpage * dps)


def _probe(fd: int, dpage: int, dps: int) -> bool:
    """Whether *fd* holds any page of *dpage* (_probe_length)."""
    length = _probe_length(dpage, dps)
    return length > 0 and holds_pages(fd, dpage * dps, length)


def _held(fd: int, first: int, count: int, dps: int) -> list[int] | None:
    """The dpages of ``[first, first+count)`` of which *fd* holds any page, fallocated ones
    not written yet included: one cachestat for a range that is full or empty, halving
    the others; None where cachestat cannot be called."""
    cached = cached_pages(fd, first * dps, count * dps)
    if cached is None:
        return None
    if cached == 0:
        return []
    if count == 1 or cached == count * dps // mmap.PAGESIZE:
        return list(range(first, first + count))
    half = count // 2
    low, high = _held(fd, first, half, dps), _held(fd, first + half, count - half, dps)
    return None if low is None or high is None else low + high


def _unheld(fd: int, first: int, count: int, dps: int) -> list[int] | None:
    """The dpages of ``[first, first+count)`` of which *fd* holds no page; None where
    cachestat cannot be called."""
    held = _held(fd, first, count, dps)
    if held is None:
        return None
    kept = set(held)
    return [d for d in range(first, first + count) if d not in kept]


def _probe_run(fd: int, first: int, count: int, dps: int) -> list[int]:
    """The dpages of ``[first, first+count)`` that *fd* holds a page of (_held; one probe
    per dpage where cachestat cannot be called)."""
    held = _held(fd, first, count, dps)
    if held is None:
        return [d for d in range(first, first + count) if _probe(fd, d, dps)]
    return held


def data_ranges(fd: int) -> list[tuple[int, int]]:
    """``[start, end)`` byte ranges of *fd* that hold data (SEEK_DATA/SEEK_HOLE)."""
    out: list[tuple[int, int]] = []
    pos = 0
    while True:
        try:
            start = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError as exc:
            if exc.errno == errno.ENXIO:  # no data at or after pos
                return out
            raise
        end = os.lseek(fd, start, os.SEEK_HOLE)
        out.append((start, end))
        pos = end
