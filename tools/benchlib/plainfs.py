"""plainfs: the in-memory pyfuse3 filesystem anyone would write first.

It is the benchmark's baseline, deliberately plain: a dict of inodes, a
bytearray per file, a dict per directory, and pyfuse3's defaults for
everything else (entry and attribute timeouts, keep_cache, no direct_io, no
writeback cache).  No tricks, no extra caching, nothing tuned.

    python plainfs.py MOUNTPOINT        # stays in the foreground; fusermount3 -u ends it
"""

from __future__ import annotations

import errno
import os
import stat
import sys
import time

import pyfuse3
import trio

ROOT = pyfuse3.ROOT_INODE


class Node:
    """One file or directory."""

    def __init__(self, ino: int, mode: int, uid: int, gid: int) -> None:
        now = time.time_ns()
        self.ino = ino
        self.mode = mode
        self.uid = uid
        self.gid = gid
        self.nlink = 1
        self.data = bytearray()
        self.entries: dict[bytes, int] = {}
        self.parent = ROOT
        self.target = b""
        self.rdev = 0
        self.atime_ns = self.mtime_ns = self.ctime_ns = now
        self.open_count = 0


class PlainFS(pyfuse3.Operations):
    """Everything in Python dicts and bytearrays."""

    def __init__(self) -> None:
        super().__init__()
        root = Node(ROOT, stat.S_IFDIR | 0o1777, 0, 0)
        root.nlink = 2
        self.nodes: dict[int, Node] = {ROOT: root}
        self.next_ino = ROOT + 1

    def _attr(self, node: Node) -> pyfuse3.EntryAttributes:
        attr = pyfuse3.EntryAttributes()
        attr.st_ino = node.ino
        attr.st_mode = node.mode
        attr.st_nlink = node.nlink
        attr.st_uid = node.uid
        attr.st_gid = node.gid
        attr.st_rdev = node.rdev
        attr.st_size = len(node.target) if stat.S_ISLNK(node.mode) else len(node.data)
        attr.st_blksize = 4096
        attr.st_blocks = (len(node.data) + 511) // 512
        attr.st_atime_ns = node.atime_ns
        attr.st_mtime_ns = node.mtime_ns
        attr.st_ctime_ns = node.ctime_ns
        return attr

    def _node(self, ino: int) -> Node:
        try:
            return self.nodes[ino]
        except KeyError:
            raise pyfuse3.FUSEError(errno.ENOENT) from None

    def _child(self, parent: int, name: bytes) -> Node:
        ino = self._node(parent).entries.get(name)
        if ino is None:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return self.nodes[ino]

    def _make(self, parent: int, name: bytes, mode: int, ctx: pyfuse3.RequestContext) -> Node:
        directory = self._node(parent)
        if name in directory.entries:
            raise pyfuse3.FUSEError(errno.EEXIST)
        node = Node(self.next_ino, mode, ctx.uid, ctx.gid)
        self.next_ino += 1
        node.parent = parent
        self.nodes[node.ino] = node
        directory.entries[name] = node.ino
        directory.mtime_ns = directory.ctime_ns = time.time_ns()
        return node

    def _drop_name(self, parent: int, name: bytes) -> None:
        directory = self._node(parent)
        node = self.nodes[directory.entries.pop(name)]
        node.nlink -= 2 if stat.S_ISDIR(node.mode) else 1
        if stat.S_ISDIR(node.mode):
            directory.nlink -= 1
        if node.nlink <= 0 and node.open_count == 0:
            del self.nodes[node.ino]
        directory.mtime_ns = directory.ctime_ns = time.time_ns()

    async def lookup(self, parent_inode: int, name: bytes,
                     ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        if name == b".":
            return self._attr(self._node(parent_inode))
        if name == b"..":
            return self._attr(self._node(self._node(parent_inode).parent))
        return self._attr(self._child(parent_inode, name))

    async def getattr(self, inode: int, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        return self._attr(self._node(inode))

    async def setattr(self, inode: int, attr: pyfuse3.EntryAttributes,
                      fields: pyfuse3.SetattrFields, fh: int | None,
                      ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        node = self._node(inode)
        now = time.time_ns()
        if fields.update_size:
            size = attr.st_size
            if size < len(node.data):
                del node.data[size:]
            else:
                node.data.extend(bytes(size - len(node.data)))
            node.mtime_ns = now
        if fields.update_mode:
            node.mode = (node.mode & ~0o7777) | (attr.st_mode & 0o7777)
        if fields.update_uid:
            node.uid = attr.st_uid
        if fields.update_gid:
            node.gid = attr.st_gid
        if fields.update_atime:
            node.atime_ns = attr.st_atime_ns
        if fields.update_mtime:
            node.mtime_ns = attr.st_mtime_ns
        node.ctime_ns = now
        return self._attr(node)

    async def readlink(self, inode: int, ctx: pyfuse3.RequestContext) -> bytes:
        return self._node(inode).target

    async def symlink(self, parent_inode: int, name: bytes, target: bytes,
                      ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        node = self._make(parent_inode, name, stat.S_IFLNK | 0o777, ctx)
        node.target = target
        return self._attr(node)

    async def mknod(self, parent_inode: int, name: bytes, mode: int, rdev: int,
                    ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        node = self._make(parent_inode, name, mode, ctx)
        node.rdev = rdev
        return self._attr(node)

    async def mkdir(self, parent_inode: int, name: bytes, mode: int,
                    ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        node = self._make(parent_inode, name, stat.S_IFDIR | (mode & 0o7777), ctx)
        node.nlink = 2
        self.nodes[parent_inode].nlink += 1
        return self._attr(node)

    async def unlink(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        self._child(parent_inode, name)
        self._drop_name(parent_inode, name)

    async def rmdir(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        if self._child(parent_inode, name).entries:
            raise pyfuse3.FUSEError(errno.ENOTEMPTY)
        self._drop_name(parent_inode, name)

    async def rename(  # noqa: PLR0917 - pyfuse3 fixes the signature
            self, parent_inode_old: int, name_old: bytes, parent_inode_new: int,
            name_new: bytes, flags: int, ctx: pyfuse3.RequestContext) -> None:
        if flags:
            raise pyfuse3.FUSEError(errno.EINVAL)
        node = self._child(parent_inode_old, name_old)
        if name_new in self._node(parent_inode_new).entries:
            self._drop_name(parent_inode_new, name_new)
        del self.nodes[parent_inode_old].entries[name_old]
        self.nodes[parent_inode_new].entries[name_new] = node.ino
        node.parent = parent_inode_new
        node.ctime_ns = time.time_ns()

    async def link(self, inode: int, new_parent_inode: int, new_name: bytes,
                   ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        node = self._node(inode)
        self._node(new_parent_inode).entries[new_name] = inode
        node.nlink += 1
        return self._attr(node)

    async def open(self, inode: int, flags: int, ctx: pyfuse3.RequestContext) -> pyfuse3.FileInfo:
        node = self._node(inode)
        if flags & os.O_TRUNC:
            node.data = bytearray()
        node.open_count += 1
        return pyfuse3.FileInfo(fh=inode)

    async def create(self, parent_inode: int, name: bytes, mode: int, flags: int,
                     ctx: pyfuse3.RequestContext) -> tuple[pyfuse3.FileInfo,
                                                           pyfuse3.EntryAttributes]:
        node = self._make(parent_inode, name, stat.S_IFREG | (mode & 0o7777), ctx)
        node.open_count += 1
        return pyfuse3.FileInfo(fh=node.ino), self._attr(node)

    async def read(self, fh: int, off: int, size: int) -> bytes:
        return bytes(self.nodes[fh].data[off : off + size])

    async def write(self, fh: int, off: int, buf: bytes) -> int:
        data = self.nodes[fh].data
        if off > len(data):
            data.extend(bytes(off - len(data)))
        data[off : off + len(buf)] = buf
        self.nodes[fh].mtime_ns = time.time_ns()
        return len(buf)

    async def flush(self, fh: int) -> None:
        pass

    async def fsync(self, fh: int, datasync: bool) -> None:
        pass

    async def release(self, fh: int) -> None:
        node = self.nodes[fh]
        node.open_count -= 1
        if node.nlink <= 0 and node.open_count == 0:
            del self.nodes[fh]

    async def opendir(self, inode: int, ctx: pyfuse3.RequestContext) -> int:
        self._node(inode)
        return inode

    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        entries = list(self._node(fh).entries.items())
        for index in range(start_id, len(entries)):
            name, ino = entries[index]
            if not pyfuse3.readdir_reply(token, name, self._attr(self.nodes[ino]), index + 1):
                return

    async def releasedir(self, fh: int) -> None:
        pass

    async def statfs(self, ctx: pyfuse3.RequestContext) -> pyfuse3.StatvfsData:
        out = pyfuse3.StatvfsData()
        out.f_bsize = out.f_frsize = 4096
        out.f_blocks = out.f_bfree = out.f_bavail = 1 << 24
        out.f_files = out.f_ffree = out.f_favail = 1 << 20
        out.f_namemax = 255
        return out


def main(argv: list[str]) -> int:
    """Mount on argv[1] and serve until unmounted."""
    if len(argv) != 2:
        print("usage: plainfs.py MOUNTPOINT", file=sys.stderr)
        return 2
    options = set(pyfuse3.default_options) | {"fsname=plainfs", "subtype=plainfs"}
    pyfuse3.init(PlainFS(), argv[1], options)
    try:
        trio.run(pyfuse3.main)
    finally:
        pyfuse3.close(unmount=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
