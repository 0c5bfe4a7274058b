"""A persistent filesystem's plain layers without a mount, and a populated state of it.

Used by test_journal (which crashes and recovers it) and by the fuzzing target for
metadata files (whose seeds are the metadata files it writes).
"""

from __future__ import annotations

import os
import stat
from typing import Any

from dmemfs_fuse.alloc.policy import parse_policy
from dmemfs_fuse.alloc.poolset import PoolSet
from dmemfs_fuse.files.changes import Changes
from dmemfs_fuse.files.data import FileData
from dmemfs_fuse.files.inodes import ROOT_INO, InodeTable
from dmemfs_fuse.files.store import FileStore
from dmemfs_fuse.memory.region import Region, RegionPlan
from dmemfs_fuse.metadata.journal import Journal
from dmemfs_fuse.metadata.persistence import MetaPlan, open_journal
from dmemfs_fuse.metadata.records import Layout
from dmemfs_fuse.metadata.recovery import RecoveryReport, load

FILE = stat.S_IFREG | 0o640
DIR = stat.S_IFDIR | 0o750


class PlainFs:
    """Region, pools, store, inode table and journal of a persistent mount, driven as fs.py
    drives them: every write or truncate is one request, committed to the journal.

    *region* is the plan's region, opened here unless given; *layout* what the metadata
    file must describe.
    """

    def __init__(self, plan: RegionPlan, meta: str, layout: Layout, *,
                 checkpoint_bytes: int = 1 << 30, region: Region | None = None) -> None:
        self.plan, self.meta, self.layout = plan, meta, layout
        self.checkpoint_bytes = checkpoint_bytes
        self.region = region if region is not None else Region.open(plan)
        self.pools = PoolSet.from_plan(plan, 0)
        self.store = FileStore(self.region, self.pools)
        self.table = InodeTable(1000, release_data=self.store.release,
                                parse_policy=self.parse, changes=Changes())
        self.data = FileData(self.table, self.store)
        self.journal = Journal(meta, layout, self.table, self.pools,
                               checkpoint_bytes=checkpoint_bytes)

    def parse(self, text: str) -> Any:
        return parse_policy(text, self.pools.ids)

    def recover(self) -> RecoveryReport:
        """Load the metadata file and install it here (this one must be fresh), as the
        daemon's start does (persistence.open_journal, which takes the layout from the
        plan's region file: a plan with a path, then)."""
        found = load(self.meta, self.layout, self.parse)
        meta = MetaPlan(self.meta, start_empty=False, checkpoint_bytes=self.checkpoint_bytes)
        self.journal, report = open_journal(meta, self.plan, self.table, self.store, found)
        assert report is not None
        return report

    def commit(self) -> None:
        self.journal.commit()

    def write(self, ino: int, off: int, data: bytes) -> None:
        self.data.write(ino, off, data, 0)
        self.commit()

    def resize(self, ino: int, size: int) -> None:
        self.data.truncate(ino, size, 0)
        self.commit()

    def read(self, ino: int) -> bytes:
        node = self.table.get(ino)
        assert node.data is not None
        return bytes(self.store.read(node.data, node.size, 0, node.size))

    def dump(self) -> dict[bytes, tuple[Any, ...]]:
        """Everything a user could see, by path, plus the allocator's accounting."""
        out: dict[bytes, tuple[Any, ...]] = {}

        def walk(ino: int, path: bytes) -> None:
            node = self.table.get(ino)
            try:
                content = self.read(ino) if node.data is not None else node.target
            except OSError as exc:  # a file on a bad dpage
                content = f"error {exc.errno}".encode()
            out[path] = (ino, node.mode, node.uid, node.gid, node.size, node.nlink,
                         node.atime_ns, node.mtime_ns, node.ctime_ns, node.btime_ns,
                         sorted(node.xattrs.items()), str(node.policy), content)
            if node.dir is not None:
                for name, (child, _) in sorted(node.dir.entries.items()):
                    walk(child, path + b"/" + name)

        walk(ROOT_INO, b"")
        out[b"<free>"] = (self.pools.free_dpages, self.pools.bad_dpages)
        return out

    def close(self) -> None:
        """Stop as a crash would: no last checkpoint, just let go of everything."""
        if self.journal.fd >= 0:
            os.close(self.journal.fd)
            self.journal.fd = -1
        self.region.close()


def populate(fs: PlainFs) -> dict[str, int]:
    """Files, a directory, a symlink, a hard link, xattrs, a policy and changed attributes,
    each committed as the requests that make them would be; the inode numbers by name."""
    dps = fs.store.dpage_size
    t = fs.table
    d = t.make(ROOT_INO, b"dir", DIR, 1000, 100).ino
    fs.commit()
    a = t.make(d, b"a", FILE, 1000, 100).ino
    fs.commit()
    fs.write(a, 0, b"hello " * 3000)
    fs.write(a, 5 * dps + 7, b"tail")
    b = t.make(ROOT_INO, b"b", FILE, 0, 0).ino
    fs.commit()
    fs.resize(b, 3 * dps + 5)
    fs.write(b, 10, b"xyz")
    t.setxattr(b, b"user.k", b"v" * 300)
    t.set_policy(b, "interleave:0-1")
    fs.commit()
    t.make(ROOT_INO, b"ln", stat.S_IFLNK | 0o777, 0, 0, target=b"dir/a")
    t.link(a, ROOT_INO, b"hard")
    t.rename(ROOT_INO, b"hard", d, b"hard2")
    fs.commit()
    t.set_attributes(a, mode=0o600, uid=7, gid=8, atime_ns=123, mtime_ns=456)
    fs.commit()
    return {"dir": d, "a": a, "b": b}
