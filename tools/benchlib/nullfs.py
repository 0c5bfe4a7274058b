"""nullfs: the ceiling of a pyfuse3 + trio filesystem, for the performance evidence.

One file, ``/f``, of a fixed size.  A read answers with a slice of a
preallocated zero buffer, a write is acknowledged without storing anything,
create makes nothing.  Whatever a real pyfuse3 filesystem does per request,
it cannot be faster than this.

    python nullfs.py MOUNTPOINT [SIZE_BYTES]     (NULLFS_WRITEBACK=1: writeback cache)
"""

from __future__ import annotations

import errno
import os
import stat
import sys

import pyfuse3
import trio

FILE_INO = pyfuse3.ROOT_INODE + 1
ZERO = memoryview(bytes(4 << 20))


class NullFS(pyfuse3.Operations):
    """Answers every request with as little Python as possible."""

    # NULLFS_WRITEBACK=1: ask the kernel for the writeback cache (an experiment).
    enable_writeback_cache = bool(os.environ.get("NULLFS_WRITEBACK"))

    def __init__(self, size: int) -> None:
        super().__init__()
        self.size = size
        self.next_fh = 0

    def _attr(self, ino: int) -> pyfuse3.EntryAttributes:
        attr = pyfuse3.EntryAttributes()
        attr.st_ino = ino
        if ino == pyfuse3.ROOT_INODE:
            attr.st_mode = stat.S_IFDIR | 0o1777
            attr.st_nlink = 2
        else:
            attr.st_mode = stat.S_IFREG | 0o666
            attr.st_nlink = 1
            attr.st_size = self.size
            attr.st_blocks = self.size // 512
        attr.st_blksize = 4096
        return attr

    async def lookup(self, parent_inode: int, name: bytes,
                     ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        if name == b"f":
            return self._attr(FILE_INO)
        raise pyfuse3.FUSEError(errno.ENOENT)

    async def getattr(self, inode: int, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        return self._attr(inode)

    async def setattr(self, inode: int, attr: pyfuse3.EntryAttributes,
                      fields: pyfuse3.SetattrFields, fh: int | None,
                      ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        return self._attr(inode)

    async def open(self, inode: int, flags: int, ctx: pyfuse3.RequestContext) -> pyfuse3.FileInfo:
        return pyfuse3.FileInfo(fh=inode, keep_cache=True)

    async def read(self, fh: int, off: int, size: int) -> memoryview:  # type: ignore[override]
        end = min(self.size, off + size)
        return ZERO[: max(0, end - off)]

    async def write(self, fh: int, off: int, buf: bytes) -> int:
        return len(buf)

    async def flush(self, fh: int) -> None:
        pass

    async def fsync(self, fh: int, datasync: bool) -> None:
        pass

    async def release(self, fh: int) -> None:
        pass

    async def opendir(self, inode: int, ctx: pyfuse3.RequestContext) -> int:
        return inode

    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        if start_id == 0:
            pyfuse3.readdir_reply(token, b"f", self._attr(FILE_INO), 1)

    async def releasedir(self, fh: int) -> None:
        pass


def main(argv: list[str]) -> int:
    """Mount on argv[1] and serve until unmounted."""
    if len(argv) not in (2, 3):
        print("usage: nullfs.py MOUNTPOINT [SIZE_BYTES]", file=sys.stderr)
        return 2
    size = int(argv[2]) if len(argv) == 3 else 1 << 30
    options = set(pyfuse3.default_options) | {"fsname=nullfs", "subtype=nullfs"}
    pyfuse3.init(NullFS(size), argv[1], options)
    try:
        trio.run(pyfuse3.main)
    finally:
        pyfuse3.close(unmount=True)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main(sys.argv))
