"""The inode table: namespace, attributes, extended attributes and lifetimes.

Plain synchronous code with no FUSE or trio in it: each method is one atomic
metadata update under trio.  Errors are OSError with the errno tmpfs would give.

An inode lives while any of three counts is non-zero: ``link_count`` (names in
directories), ``lookup_count`` (references the kernel holds, dropped by
forget) and ``open_count`` (open file handles).  When all three reach zero the
inode is dropped and its dpages go back to the pools (QEMU's unlinked
``-mem-path`` file relies on this).
"""

from __future__ import annotations

import errno
import logging
import stat
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from sortedcontainers import SortedDict

from ..alloc.policy import POLICY_XATTR, Policy
from ..errors import fs_error
from .changes import Changes
from .extents import FileExtents

log = logging.getLogger(__name__)

ROOT_INO = 1
NAME_MAX = 255
XATTR_NAME_MAX = 255
XATTR_SIZE_MAX = 65536
XATTR_LIST_MAX = 65536
RENAME_NOREPLACE = 1
RENAME_EXCHANGE = 2
XATTR_NAMESPACES = (b"user.",)
# Cookies 1 and 2 are "." and ".." in readdir.
FIRST_COOKIE = 3
# The attributes the journal keeps, which report the inode when assigned (records.py writes
# them).  The kernel's references and the open handles end with the daemon and are not kept;
# xattrs change in place and are reported by InodeTable._xattrs_changed.
PERSISTED_FIELDS = frozenset({"mode", "uid", "gid", "rdev", "size", "atime_ns", "mtime_ns",
                              "ctime_ns", "btime_ns", "link_count", "parent", "target",
                              "policy"})


class Directory:
    """A directory's entries, each with a cookie that readdir offsets are made of.

    Cookies only grow, so a listing resumed at any cookie neither skips nor
    repeats entries that were there all along, whatever was added or removed.
    """

    def __init__(self, ino: int = 0, changes: Changes | None = None) -> None:
        self.entries: dict[bytes, tuple[int, int]] = {}
        self.by_cookie: SortedDict = SortedDict()
        self.next_cookie = FIRST_COOKIE
        self.subdirs = 0
        # The directory's own inode number, under which changes are reported to *changes*.
        self.ino = ino
        self.changes = changes

    def get(self, name: bytes) -> int | None:
        """The inode number under *name*, or None."""
        entry = self.entries.get(name)
        return entry[0] if entry else None

    def add(self, name: bytes, ino: int) -> None:
        """Add (or re-point) *name*; the entry gets a new cookie."""
        self.remove(name)
        cookie = self.next_cookie
        self.next_cookie += 1
        self.entries[name] = (ino, cookie)
        self.by_cookie[cookie] = name
        if self.changes is not None:
            self.changes.entry_added(self.ino, name, ino)

    def remove(self, name: bytes) -> None:
        """Drop *name* if present."""
        entry = self.entries.pop(name, None)
        if entry:
            del self.by_cookie[entry[1]]
            if self.changes is not None:
                self.changes.entry_removed(self.ino, name)

    def after(self, cookie: int) -> Iterator[tuple[int, bytes, int]]:
        """Entries with a cookie greater than *cookie*: ``(cookie, name, ino)``."""
        for c in list(self.by_cookie.irange(minimum=cookie, inclusive=(False, True))):
            name = self.by_cookie.get(c)
            if name is not None:
                yield c, name, self.entries[name][0]


@dataclass(eq=False, init=False)
class Inode:
    """One file, directory, symlink or special file.

    Assigning a persisted field (PERSISTED_FIELDS) reports the inode to *changes*.
    """

    ino: int
    mode: int
    uid: int
    gid: int
    rdev: int = 0
    size: int = 0
    atime_ns: int = 0
    mtime_ns: int = 0
    ctime_ns: int = 0
    btime_ns: int = 0
    link_count: int = 0
    lookup_count: int = 0
    open_count: int = 0
    parent: int = ROOT_INO
    xattrs: dict[bytes, bytes] = field(default_factory=dict)
    target: bytes | None = None
    dir: Directory | None = None
    data: FileExtents | None = None
    # None: the default (local); set through the user.dmem.policy xattr.
    policy: Policy | None = None
    # Where changes are reported for the journal (None: not persistent).
    changes: Changes | None = field(default=None, repr=False)

    def __init__(self, ino: int, mode: int, uid: int, gid: int, *, rdev: int = 0,
                 size: int = 0, atime_ns: int = 0, mtime_ns: int = 0, ctime_ns: int = 0,
                 btime_ns: int = 0, link_count: int = 0, lookup_count: int = 0,
                 open_count: int = 0, parent: int = ROOT_INO,
                 xattrs: dict[bytes, bytes] | None = None, target: bytes | None = None,
                 dir: Directory | None = None, data: FileExtents | None = None,
                 policy: Policy | None = None, changes: Changes | None = None) -> None:
        # Every field at once, not one __setattr__ call each as a dataclass __init__ does:
        # that made creates and recovery slower (docs/performance.md, "recovery of many
        # inodes").  A new inode reports nothing: InodeTable._new reports it.
        self.__dict__.update(
            ino=ino, mode=mode, uid=uid, gid=gid, rdev=rdev, size=size, atime_ns=atime_ns,
            mtime_ns=mtime_ns, ctime_ns=ctime_ns, btime_ns=btime_ns, link_count=link_count,
            lookup_count=lookup_count, open_count=open_count, parent=parent,
            xattrs={} if xattrs is None else xattrs, target=target, dir=dir, data=data,
            policy=policy, changes=changes)

    def __setattr__(self, name: str, value: object) -> None:
        # A persisted field reports the inode as changed when it is assigned, so that no
        # caller has to remember to (s3ql's _Inode.__setattr__ does the same).
        object.__setattr__(self, name, value)
        if name in PERSISTED_FIELDS:
            changes = self.__dict__.get("changes")
            if changes is not None:
                changes.touched.add(self.ino)

    @property
    def nlink(self) -> int:
        """st_nlink: names for files; 2 + subdirectories for a live directory."""
        if self.dir is not None:
            return 2 + self.dir.subdirs if self.link_count else 0
        return self.link_count

    def touch(self, *, data: bool = False, now: int | None = None) -> None:
        """Set ctime (and mtime when *data* changed) to now (which reports the inode to the
        journal, as any assignment of a persisted field does)."""
        now = now or time.time_ns()
        self.ctime_ns = now
        if data:
            self.mtime_ns = now

    def kill_suidgid(self, *, also_sgid: bool = False) -> bool:
        """Clear set-user-ID, and set-group-ID if group-executable (or *also_sgid*), as the
        kernel does on a write, truncate or chown by a caller without CAP_FSETID (the FUSE
        protocol leaves it to the daemon under killpriv v2).  Returns whether the mode
        changed."""
        mode = self.mode & ~stat.S_ISUID
        if mode & stat.S_IXGRP or also_sgid:
            mode &= ~stat.S_ISGID
        if mode == self.mode:
            return False
        self.mode = mode
        self.touch()
        return True


class InodeTable:
    """Every inode of the filesystem, by number, and the operations on the namespace."""

    def __init__(self, nr_inodes: int, root_mode: int = 0o1777, root_uid: int = 0,
                 root_gid: int = 0, *,
                 release_data: Callable[[FileExtents], None] | None = None,
                 parse_policy: Callable[[str], Policy] | None = None,
                 changes: Changes | None = None) -> None:
        self.nr_inodes = nr_inodes
        # Where every change is reported for the journal; None = not persistent.
        self.changes = changes
        self._release_data = release_data or (lambda extents: None)
        self._parse_policy = parse_policy
        self.inodes: dict[int, Inode] = {}
        # Inodes whose last name is gone but that are still held (open or known to the kernel).
        self._unlinked: set[int] = set()
        self._next_ino = ROOT_INO
        root = self._new(stat.S_IFDIR | (root_mode & 0o7777), root_uid, root_gid)
        root.dir = Directory(root.ino, changes)
        root.link_count = 1
        root.parent = ROOT_INO

    def restore(self, inodes: dict[int, Inode], next_ino: int) -> None:
        """Replace every inode (the root included) with recovered ones.

        *inodes* must be consistent (recovery.py checks it): no kernel
        references and no open handles exist yet after a restart.
        """
        if ROOT_INO not in inodes:
            raise ValueError("recovered inodes have no root")
        self.inodes = inodes
        self._unlinked = set()
        self._next_ino = next_ino
        for inode in inodes.values():
            inode.changes = self.changes
            if inode.dir is not None:
                inode.dir.changes = self.changes
            if inode.data is not None:
                inode.data.changes = self.changes

    @property
    def next_ino(self) -> int:
        """The number the next new inode gets."""
        return self._next_ino

    # -- lookups -----------------------------------------------------------

    def get(self, ino: int) -> Inode:
        """The inode numbered *ino*; ENOENT if there is none."""
        inode = self.inodes.get(ino)
        if inode is None:
            raise fs_error(errno.ENOENT, f"inode {ino}")
        return inode

    def directory(self, ino: int) -> tuple[Inode, Directory]:
        """The directory inode *ino* and its entries; ENOTDIR if it is not one."""
        inode = self.get(ino)
        if inode.dir is None:
            raise fs_error(errno.ENOTDIR, f"inode {ino}")
        return inode, inode.dir

    def child(self, parent: int, name: bytes) -> Inode:
        """The inode under *name* in *parent* (``.`` and ``..`` included); ENOENT if none."""
        node, entries = self.directory(parent)
        if name == b".":
            return node
        if name == b"..":
            return self.get(node.parent)
        _check_name(name)
        ino = entries.get(name)
        if ino is None:
            raise fs_error(errno.ENOENT, name.decode(errors="replace"))
        return self.inodes[ino]

    def lookup(self, parent: int, name: bytes) -> Inode:
        """Like child(), and the kernel now holds one more reference to it."""
        inode = self.child(parent, name)
        inode.lookup_count += 1
        return inode

    def forget(self, ino: int, count: int) -> None:
        """The kernel dropped *count* references to *ino*."""
        inode = self.inodes.get(ino)
        if inode is None:
            log.error("forget of unknown inode %d", ino)
            return
        if count > inode.lookup_count:
            log.error("forget of %d references to inode %d, which has %d", count, ino,
                      inode.lookup_count)
            count = inode.lookup_count
        inode.lookup_count -= count
        self._maybe_drop(inode)

    @property
    def orphans(self) -> int:
        """Inodes with no name and no open handle that wait only for the kernel's forget."""
        return sum(1 for ino in self._unlinked
                   if (node := self.inodes.get(ino)) is not None and not node.open_count)

    @property
    def used(self) -> int:
        """Inodes in use, including unlinked ones still held open or known to the kernel."""
        return len(self.inodes)

    # -- creating and removing names ---------------------------------------

    def make(self, parent: int, name: bytes, mode: int, uid: int, gid: int, *, rdev: int = 0,
             target: bytes | None = None) -> Inode:
        """Create a file, directory, symlink or special file named *name* in *parent*."""
        pnode, entries = self.directory(parent)
        _check_name(name)
        if entries.get(name) is not None or name in (b".", b".."):
            raise fs_error(errno.EEXIST, name.decode(errors="replace"))
        if pnode.link_count == 0:
            raise fs_error(errno.ENOENT, "directory was removed")
        kind = stat.S_IFMT(mode)
        if kind not in (stat.S_IFREG, stat.S_IFDIR, stat.S_IFLNK, stat.S_IFIFO, stat.S_IFSOCK,
                        stat.S_IFCHR, stat.S_IFBLK):
            raise fs_error(errno.EINVAL, f"file type {kind:o}")
        if pnode.mode & stat.S_ISGID:
            gid = pnode.gid
            if kind == stat.S_IFDIR:
                mode |= stat.S_ISGID
        inode = self._new(mode, uid, gid, rdev)
        if kind in (stat.S_IFDIR, stat.S_IFREG):
            inode.policy = pnode.policy  # inherited, as a directory's default
        if kind == stat.S_IFDIR:
            inode.dir = Directory(inode.ino, self.changes)
            inode.parent = parent
            entries.subdirs += 1
        elif kind == stat.S_IFREG:
            inode.data = FileExtents(inode.ino, self.changes)
        elif kind == stat.S_IFLNK:
            inode.target = target or b""
            inode.size = len(inode.target)
        inode.link_count = 1
        inode.lookup_count = 1
        entries.add(name, inode.ino)
        pnode.touch(data=True, now=inode.ctime_ns)
        return inode

    def link(self, ino: int, parent: int, name: bytes) -> Inode:
        """Give inode *ino* another name; the kernel holds one more reference."""
        inode = self.get(ino)
        if inode.dir is not None:
            raise fs_error(errno.EPERM, "hard link to a directory")
        pnode, entries = self.directory(parent)
        _check_name(name)
        if entries.get(name) is not None:
            raise fs_error(errno.EEXIST, name.decode(errors="replace"))
        if inode.link_count == 0:
            raise fs_error(errno.ENOENT, "link to an unlinked file")
        entries.add(name, ino)
        inode.link_count += 1
        inode.lookup_count += 1
        inode.touch()
        pnode.touch(data=True, now=inode.ctime_ns)
        return inode

    def unlink(self, parent: int, name: bytes) -> None:
        """Remove the name *name* of a non-directory."""
        inode = self.child(parent, name)
        if inode.dir is not None:
            raise fs_error(errno.EISDIR, name.decode(errors="replace"))
        self._remove_entry(parent, name, inode)

    def rmdir(self, parent: int, name: bytes) -> None:
        """Remove the empty directory *name*."""
        if name == b".":
            raise fs_error(errno.EINVAL, "rmdir of .")
        if name == b"..":
            raise fs_error(errno.ENOTEMPTY, "rmdir of ..")
        inode = self.child(parent, name)
        if inode.dir is None:
            raise fs_error(errno.ENOTDIR, name.decode(errors="replace"))
        if inode.dir.entries:
            raise fs_error(errno.ENOTEMPTY, name.decode(errors="replace"))
        self._remove_entry(parent, name, inode)

    def rename(self, old_parent: int, old_name: bytes, new_parent: int, new_name: bytes,
               flags: int = 0) -> None:
        """rename(2) / renameat2(2) with RENAME_NOREPLACE and RENAME_EXCHANGE."""
        if flags & ~(RENAME_NOREPLACE | RENAME_EXCHANGE) or flags == (
                RENAME_NOREPLACE | RENAME_EXCHANGE):
            raise fs_error(errno.EINVAL, f"rename flags {flags}")
        for name in (old_name, new_name):
            if name in (b".", b".."):
                raise fs_error(errno.EBUSY if name == b"." else errno.EINVAL, "rename of . or ..")
        src = self.child(old_parent, old_name)
        _check_name(new_name)
        old_pnode, old_entries = self.directory(old_parent)
        new_pnode, new_entries = self.directory(new_parent)
        dst_ino = new_entries.get(new_name)
        dst = self.inodes[dst_ino] if dst_ino is not None else None
        if flags & RENAME_EXCHANGE:
            if dst is None:
                raise fs_error(errno.ENOENT, new_name.decode(errors="replace"))
            if src.dir is not None:
                self._check_not_inside(new_parent, src)
            if dst.dir is not None:
                self._check_not_inside(old_parent, dst)
            old_entries.add(old_name, dst.ino)
            new_entries.add(new_name, src.ino)
            self._reparent(src, old_pnode, new_pnode)
            self._reparent(dst, new_pnode, old_pnode)
            now = time.time_ns()
            for node in (src, dst):
                node.touch(now=now)
            for node in (old_pnode, new_pnode):
                node.touch(data=True, now=now)
            return
        if dst is not None and flags & RENAME_NOREPLACE:
            raise fs_error(errno.EEXIST, new_name.decode(errors="replace"))
        if dst is src:
            return  # two names of one file: rename does nothing (POSIX)
        if src.dir is not None:
            self._check_not_inside(new_parent, src)
            if dst is not None:
                if dst.dir is None:
                    raise fs_error(errno.ENOTDIR, new_name.decode(errors="replace"))
                if dst.dir.entries:
                    raise fs_error(errno.ENOTEMPTY, new_name.decode(errors="replace"))
        elif dst is not None and dst.dir is not None:
            raise fs_error(errno.EISDIR, new_name.decode(errors="replace"))
        if dst is not None:
            self._remove_entry(new_parent, new_name, dst)
        old_entries.remove(old_name)
        new_entries.add(new_name, src.ino)
        self._reparent(src, old_pnode, new_pnode)
        now = time.time_ns()
        src.touch(now=now)
        old_pnode.touch(data=True, now=now)
        new_pnode.touch(data=True, now=now)

    # -- open handles --------------------------------------------------------

    def open(self, ino: int) -> Inode:
        """Count one more open handle on *ino*."""
        inode = self.get(ino)
        inode.open_count += 1
        return inode

    def close(self, ino: int) -> None:
        """Count one open handle less; drop the inode if nothing else holds it."""
        inode = self.inodes.get(ino)
        if inode is None or inode.open_count <= 0:
            log.error("release of inode %d that is not open", ino)
            return
        inode.open_count -= 1
        self._maybe_drop(inode)

    # -- attributes ----------------------------------------------------------

    def set_attributes(self, ino: int, *, mode: int | None = None, uid: int | None = None,
                       gid: int | None = None, atime_ns: int | None = None,
                       mtime_ns: int | None = None) -> Inode:
        """chmod, chown and utimens in one step; ctime becomes now."""
        inode = self.get(ino)
        if mode is not None:
            inode.mode = stat.S_IFMT(inode.mode) | (mode & 0o7777)
        if uid is not None:
            inode.uid = uid
        if gid is not None:
            inode.gid = gid
        if atime_ns is not None:
            inode.atime_ns = atime_ns
        if mtime_ns is not None:
            inode.mtime_ns = mtime_ns
        inode.touch()
        return inode

    # -- extended attributes -------------------------------------------------

    def getxattr(self, ino: int, name: bytes) -> bytes:
        """The value of xattr *name*; ENODATA if it is not set."""
        inode = self.get(ino)
        _check_xattr_name(name)
        if name == POLICY_XATTR and self._parse_policy is not None:
            if inode.policy is None:
                raise fs_error(errno.ENODATA, "no policy set")
            return str(inode.policy).encode()
        value = inode.xattrs.get(name)
        if value is None:
            raise fs_error(errno.ENODATA, name.decode(errors="replace"))
        return value

    def setxattr(self, ino: int, name: bytes, value: bytes) -> None:
        """Set xattr *name*; E2BIG over 64 KiB, ENOSPC when the name list would pass 64 KiB."""
        inode = self.get(ino)
        _check_xattr_name(name)
        if len(value) > XATTR_SIZE_MAX:
            raise fs_error(errno.E2BIG, f"xattr value of {len(value)} bytes")
        if name == POLICY_XATTR and self._parse_policy is not None:
            self.set_policy(ino, value.decode(errors="replace"))
            return
        if name not in inode.xattrs:
            listed = sum(len(n) + 1 for n in inode.xattrs) + len(name) + 1
            if listed > XATTR_LIST_MAX:
                raise fs_error(errno.ENOSPC, "xattr name list full")
        inode.xattrs[name] = bytes(value)
        self._xattrs_changed(inode)

    def listxattr(self, ino: int) -> list[bytes]:
        """Names of the xattrs of *ino*."""
        inode = self.get(ino)
        names = list(inode.xattrs)
        if inode.policy is not None:
            names.append(POLICY_XATTR)
        return names

    def removexattr(self, ino: int, name: bytes) -> None:
        """Remove xattr *name*; ENODATA if it is not set."""
        inode = self.get(ino)
        _check_xattr_name(name)
        if name == POLICY_XATTR and self._parse_policy is not None:
            if inode.policy is None:
                raise fs_error(errno.ENODATA, "no policy set")
            inode.policy = None
            inode.touch()
            return
        if inode.xattrs.pop(name, None) is None:
            raise fs_error(errno.ENODATA, name.decode(errors="replace"))
        self._xattrs_changed(inode)

    def set_policy(self, ino: int, text: str) -> Policy:
        """Parse and set the memory policy of a file or directory; EINVAL with a reason if bad."""
        inode = self.get(ino)
        if inode.data is None and inode.dir is None:
            raise fs_error(errno.EINVAL, "policies apply to files and directories")
        if self._parse_policy is None:
            raise fs_error(errno.EOPNOTSUPP, "no policies on this table")
        inode.policy = self._parse_policy(text)
        inode.touch()
        return inode.policy

    # -- internals -----------------------------------------------------------

    def _xattrs_changed(self, inode: Inode) -> None:
        inode.touch()
        if self.changes is not None:
            self.changes.xattrs_touched.add(inode.ino)

    def _new(self, mode: int, uid: int, gid: int, rdev: int = 0) -> Inode:
        if len(self.inodes) >= self.nr_inodes:
            raise fs_error(errno.ENOSPC, f"all {self.nr_inodes} inodes are in use")
        now = time.time_ns()
        ino = self._next_ino
        self._next_ino += 1
        inode = Inode(ino=ino, mode=mode, uid=uid, gid=gid, rdev=rdev, atime_ns=now,
                      mtime_ns=now, ctime_ns=now, btime_ns=now, changes=self.changes)
        self.inodes[ino] = inode
        if self.changes is not None:
            self.changes.touched.add(ino)
            self.changes.xattrs_touched.add(ino)
        return inode

    def _remove_entry(self, parent: int, name: bytes, inode: Inode) -> None:
        pnode, entries = self.directory(parent)
        entries.remove(name)
        if inode.dir is not None:
            entries.subdirs -= 1
            inode.link_count = 0
        else:
            inode.link_count -= 1
        now = time.time_ns()
        inode.touch(now=now)
        pnode.touch(data=True, now=now)
        self._maybe_drop(inode)

    def _reparent(self, inode: Inode, old: Inode, new: Inode) -> None:
        if inode.dir is None or old is new:
            return
        assert old.dir is not None and new.dir is not None
        old.dir.subdirs -= 1
        new.dir.subdirs += 1
        inode.parent = new.ino

    def _check_not_inside(self, ino: int, ancestor: Inode) -> None:
        """EINVAL if directory *ino* is *ancestor* or lies below it."""
        while True:
            if ino == ancestor.ino:
                raise fs_error(errno.EINVAL, "a directory cannot move into itself")
            if ino == ROOT_INO:
                return
            ino = self.inodes[ino].parent

    def _maybe_drop(self, inode: Inode) -> None:
        if inode.link_count or inode.ino == ROOT_INO:
            return
        if inode.lookup_count or inode.open_count:
            self._unlinked.add(inode.ino)
            return
        self._unlinked.discard(inode.ino)
        del self.inodes[inode.ino]
        if self.changes is not None:
            self.changes.dropped.append(inode.ino)
        if inode.data is not None:
            self._release_data(inode.data)


def _check_name(name: bytes) -> None:
    if len(name) > NAME_MAX:
        raise fs_error(errno.ENAMETOOLONG, f"name of {len(name)} bytes")
    if not name or b"/" in name:
        raise fs_error(errno.EINVAL, "empty name or name with /")


def _check_xattr_name(name: bytes) -> None:
    if len(name) > XATTR_NAME_MAX or not name:
        raise fs_error(errno.ERANGE, f"xattr name of {len(name)} bytes")
    if not name.startswith(XATTR_NAMESPACES):
        raise fs_error(errno.EOPNOTSUPP, f"xattr namespace of {name.decode(errors='replace')}")
