"""The bytes of regular files, with everything a change of them implies.

A write, truncate or fallocate changes the file's bytes (through the store of
the mount's data path), its size, its mtime and ctime, and so what the journal
must record.  These operations do all of it in one place, so that the adapter
(fs.py), the tests and the fuzzing seeds drive files the same way: none of them
has to remember to set the size or touch the times, and assigning the size or
times reports the inode to the journal (inodes.py).  Committing the journal is
left to the caller, which commits once per FUSE request.
"""

from __future__ import annotations

import errno

from ..alloc.policy import LOCAL
from ..errors import fs_error
from .extents import FileExtents
from .inodes import Inode, InodeTable
from .passthrough import PassthroughStore
from .store import FileStore


class FileData:
    """Writes, truncates and fallocates of the files of *inodes*, through *store*.

    *node* is the NUMA node of the caller, for the local policy.
    """

    def __init__(self, inodes: InodeTable, store: FileStore | PassthroughStore) -> None:
        self.inodes = inodes
        self.store = store

    def write(self, ino: int, off: int, data: bytes, node: int) -> int:
        """Write *data* at *off*; return the bytes written (cut short at the largest file)."""
        inode, extents = self._file(ino)
        inode.size, written = self.store.write(extents, inode.size, off, data, node=node,
                                               policy=inode.policy or LOCAL)
        inode.touch(data=True)
        return written

    def truncate(self, ino: int, size: int, node: int) -> None:
        """Make the file *size* bytes long (times change even if the size does not).
        ENOSPC when growing finds no room, with nothing changed."""
        inode, extents = self._file(ino)
        self.store.sync(inode)  # the size the kernel may have grown it to (passthrough)
        self.store.resize(extents, inode.size, size, node=node, policy=inode.policy or LOCAL)
        inode.size = size
        inode.touch(data=True)

    def fallocate(self, ino: int, mode: int, off: int, length: int, node: int) -> None:
        """fallocate(2) of ``[off, off+length)`` in *mode*; ENOSPC with nothing changed."""
        inode, extents = self._file(ino)
        self.store.sync(inode)
        inode.size = self.store.fallocate(extents, inode.size, mode, off, length, node=node,
                                          policy=inode.policy or LOCAL)
        inode.touch(data=True)  # as on tmpfs, every mode changes mtime and ctime

    def _file(self, ino: int) -> tuple[Inode, FileExtents]:
        inode = self.inodes.get(ino)
        if inode.data is None:
            raise fs_error(errno.EISDIR if inode.dir is not None else errno.EINVAL,
                           "not a regular file")
        return inode, inode.data
