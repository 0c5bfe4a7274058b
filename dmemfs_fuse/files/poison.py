"""Memory errors: dpages marked bad, and the files they hurt.

This is the user-space side of dmemfs's memory-failure handler.  A dpage
becomes bad in three ways: the operator marks it (``dmemctl poison``), as
soft-offline would; a scan finds a frame of the region with the HWPOISON page
flag; or the kernel sends SIGBUS BUS_MCEERR_AO for an address in the region.
The last two are the kernel's view of the memory (memory/hwpoison.py); the
control layer (insight/control.py) hands what they find to :class:`MemoryErrors`.

A bad dpage is never handed out again (pool.py), is kept in the journal
(survives restarts), and the file that owns it answers EIO for reads of it
until the range is truncated away or overwritten whole (store.py).
"""

from __future__ import annotations

import errno
import logging
from dataclasses import dataclass

from ..errors import fs_error
from .inodes import InodeTable
from .store import FileStore

log = logging.getLogger(__name__)

@dataclass(frozen=True)
class Poisoned:
    """The outcome of marking one dpage bad.

    Fields:
        dpage: the region dpage.
        region_offset: its byte offset in the region.
        newly: False if it was already bad.
        was_free: True if no file owned it (it simply leaves the free runs).
        owner: the inode of the file that owns it, if any.
        file_offset: where in that file it lies (bytes), if owned.
        source: who reported it (operator, scan, kernel).
    """

    dpage: int
    region_offset: int
    newly: bool
    was_free: bool
    owner: int | None
    file_offset: int | None
    source: str


class MemoryErrors:
    """Marks dpages bad and says which file each one hurt."""

    def __init__(self, table: InodeTable, store: FileStore) -> None:
        self.table = table
        self.store = store
        self.events = 0

    def mark(self, dpage: int, source: str) -> Poisoned:
        """Mark region dpage *dpage* bad; EINVAL if it is outside the region."""
        pools = self.store.pools
        if not 0 <= dpage < self.store.region.size // self.store.dpage_size:
            raise fs_error(errno.EINVAL, f"dpage {dpage} is outside the region")
        pool = pools.pool_of(dpage)
        newly = dpage not in pool.bad
        was_free = pool.mark_bad(dpage) if newly else False
        if newly and self.table.changes is not None:
            self.table.changes.marked_bad(dpage)
        owner = self.owner_of(dpage)
        dps = self.store.dpage_size
        result = Poisoned(dpage, dpage * dps, newly, was_free,
                          owner[0] if owner else None,
                          owner[1] * dps if owner else None, source)
        if newly:
            self.events += 1
            log.warning("memory error (%s): dpage %d at region offset %d marked bad; %s", source,
                        dpage, dpage * dps,
                        f"inode {result.owner} answers EIO at file offset {result.file_offset}"
                        if owner else "it was free and is out of service")
        return result

    def owner_of(self, dpage: int) -> tuple[int, int] | None:
        """``(inode, file dpage)`` of the file holding region dpage *dpage*, or None.

        A scan of every file's runs: memory errors are rare, a reverse map
        would cost memory on every allocation.
        """
        for inode in self.table.inodes.values():
            if inode.data is None:
                continue
            for file_dpage, region, count in inode.data.runs():
                if region <= dpage < region + count:
                    return inode.ino, file_dpage + dpage - region
        return None

    def locate(self, ino: int, offset: int) -> int:
        """The region dpage holding byte *offset* of file *ino*; ENXIO for a hole or past EOF."""
        inode = self.table.get(ino)
        if inode.data is None:
            raise fs_error(errno.EINVAL, f"inode {ino} is not a regular file")
        if not 0 <= offset < inode.size:
            raise fs_error(errno.ENXIO, f"offset {offset} is outside the file ({inode.size} "
                           "bytes)")
        file_dpage = offset // self.store.dpage_size
        piece = next(inode.data.pieces(file_dpage, file_dpage + 1))
        if piece.region is None:
            raise fs_error(errno.ENXIO, f"offset {offset} is in a hole")
        return piece.region
