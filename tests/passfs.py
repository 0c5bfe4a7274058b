"""A tiny pyfuse3 filesystem for testing the pyfuse3 patch on its own (test_pyfuse3_patch.py).

``python passfs.py MOUNTPOINT REPORT [--no-passthrough]``

One file, ``data``, whose bytes are a 64 MiB memfd.  With passthrough (the
default) INIT asks for ``FUSE_CAP_PASSTHROUGH``, ``open`` registers the memfd
with ``pyfuse3.backing_open`` and answers with its backing id, and ``release``
closes the id.  Every request is counted.  Once mounted, REPORT.ready gets
``PID FD`` (the memfd, for /proc/PID/fd/FD); after the unmount REPORT gets the
counts and what INIT negotiated, as JSON.
"""

from __future__ import annotations

import errno
import json
import os
import stat
import sys
from collections import Counter
from pathlib import Path

import pyfuse3
import trio

DATA = pyfuse3.ROOT_INODE + 1
SIZE = 64 << 20


class PassFS(pyfuse3.Operations):
    """The filesystem; ``counts`` holds the requests it was sent, by name."""

    def __init__(self, passthrough: bool) -> None:
        super().__init__()
        self.passthrough = passthrough
        self.memfd = os.memfd_create("passfs-data")
        os.ftruncate(self.memfd, SIZE)
        self.counts: Counter[str] = Counter()
        self.handles: dict[int, int] = {}  # fh -> backing id (0: none)
        self.next_fh = 1
        self.conn: dict[str, int] = {}

    def init_connection(self, conn: pyfuse3.ConnectionInfo) -> None:
        want = conn.want & ~pyfuse3.FUSE_CAP_AUTO_INVAL_DATA
        if self.passthrough:
            want |= conn.capable & pyfuse3.FUSE_CAP_PASSTHROUGH
            conn.max_backing_stack_depth = 1
        conn.want = want
        self.conn = {"capable": conn.capable, "want": conn.want,
                     "proto_minor": conn.proto_minor}

    def _attrs(self, ino: int) -> pyfuse3.EntryAttributes:
        attr = pyfuse3.EntryAttributes()
        attr.st_ino = ino
        attr.attr_timeout = attr.entry_timeout = 60
        if ino == pyfuse3.ROOT_INODE:
            attr.st_mode, attr.st_nlink = stat.S_IFDIR | 0o755, 2
        else:
            attr.st_mode, attr.st_nlink, attr.st_size = stat.S_IFREG | 0o644, 1, SIZE
        return attr

    async def getattr(self, inode: int, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        self.counts["getattr"] += 1
        return self._attrs(inode)

    async def lookup(self, parent_inode: int, name: bytes,
                     ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        self.counts["lookup"] += 1
        if parent_inode != pyfuse3.ROOT_INODE or name != b"data":
            raise pyfuse3.FUSEError(errno.ENOENT)
        return self._attrs(DATA)

    async def open(self, inode: int, flags: int, ctx: pyfuse3.RequestContext) -> pyfuse3.FileInfo:
        self.counts["open"] += 1
        backing = pyfuse3.backing_open(self.memfd) if self.passthrough else 0
        if backing:
            self.counts["backing_open"] += 1
        fh, self.next_fh = self.next_fh, self.next_fh + 1
        self.handles[fh] = backing
        return pyfuse3.FileInfo(fh=fh, backing_id=backing)

    async def read(self, fh: int, off: int, size: int) -> bytes:
        self.counts["read"] += 1
        return os.pread(self.memfd, size, off)

    async def write(self, fh: int, off: int, buf: bytes) -> int:
        self.counts["write"] += 1
        return os.pwrite(self.memfd, buf, off)

    async def release(self, fh: int) -> None:
        self.counts["release"] += 1
        backing = self.handles.pop(fh)
        if backing:
            pyfuse3.backing_close(backing)
            self.counts["backing_close"] += 1


def main() -> None:
    mountpoint, report = sys.argv[1], Path(sys.argv[2])
    fs = PassFS(passthrough="--no-passthrough" not in sys.argv[3:])
    pyfuse3.init(fs, mountpoint, {"fsname=passfs", "subtype=passfs"})
    Path(f"{report}.ready").write_text(f"{os.getpid()} {fs.memfd}")
    try:
        trio.run(pyfuse3.main)
    finally:
        pyfuse3.close(unmount=True)
    report.write_text(json.dumps({"counts": fs.counts, "conn": fs.conn,
                                  "libfuse": pyfuse3.libfuse_version()}))


if __name__ == "__main__":
    main()
