"""The inode table alone: namespace operations, errnos, and the three lifetime counts."""

from __future__ import annotations

import dataclasses
import errno
import inspect
import stat
from typing import Any

import pytest

from dmemfs_fuse.alloc.runs import Extent
from dmemfs_fuse.files.changes import Changes
from dmemfs_fuse.files.extents import FileExtents
from dmemfs_fuse.files.inodes import (
    PERSISTED_FIELDS,
    RENAME_EXCHANGE,
    RENAME_NOREPLACE,
    ROOT_INO,
    Inode,
    InodeTable,
)

FILE = stat.S_IFREG | 0o644
DIR = stat.S_IFDIR | 0o755


def errno_of(call: object, *args: object) -> int:
    with pytest.raises(OSError) as info:
        call(*args)  # type: ignore[operator]
    assert info.value.errno is not None
    return info.value.errno


@pytest.fixture
def released() -> list[FileExtents]:
    return []


@pytest.fixture
def table(released: list[FileExtents]) -> InodeTable:
    return InodeTable(100, release_data=released.append)


def test_unlinked_file_lives_until_forget_and_close(table: InodeTable,
                                                    released: list[FileExtents]) -> None:
    node = table.make(ROOT_INO, b"f", FILE, 0, 0)
    assert node.data is not None
    node.data.insert(0, [Extent(7, 1)])
    table.open(node.ino)
    table.unlink(ROOT_INO, b"f")
    assert node.ino in table.inodes and node.nlink == 0
    table.forget(node.ino, 1)
    assert node.ino in table.inodes, "still open"
    table.close(node.ino)
    assert node.ino not in table.inodes
    assert released == [node.data]


def test_counts_are_separate(table: InodeTable) -> None:
    node = table.make(ROOT_INO, b"f", FILE, 0, 0)
    assert (node.link_count, node.lookup_count, node.open_count) == (1, 1, 0)
    table.lookup(ROOT_INO, b"f")
    table.open(node.ino)
    assert (node.link_count, node.lookup_count, node.open_count) == (1, 2, 1)
    table.forget(node.ino, 2)
    table.close(node.ino)
    assert node.ino in table.inodes  # still linked


def test_directories(table: InodeTable) -> None:
    d = table.make(ROOT_INO, b"d", DIR, 0, 0)
    table.make(d.ino, b"x", FILE, 0, 0)
    assert table.get(ROOT_INO).nlink == 3
    assert errno_of(table.rmdir, ROOT_INO, b"d") == errno.ENOTEMPTY
    assert errno_of(table.unlink, ROOT_INO, b"d") == errno.EISDIR
    assert errno_of(table.rmdir, d.ino, b"x") == errno.ENOTDIR
    table.unlink(d.ino, b"x")
    table.rmdir(ROOT_INO, b"d")
    assert table.get(ROOT_INO).nlink == 2
    assert errno_of(table.make, d.ino, b"y", FILE, 0, 0) == errno.ENOENT


def test_names(table: InodeTable) -> None:
    assert errno_of(table.make, ROOT_INO, b"a" * 256, FILE, 0, 0) == errno.ENAMETOOLONG
    table.make(ROOT_INO, b"a" * 255, FILE, 0, 0)
    assert errno_of(table.make, ROOT_INO, b"a" * 255, FILE, 0, 0) == errno.EEXIST
    assert errno_of(table.lookup, ROOT_INO, b"missing") == errno.ENOENT


def test_rename_rules(table: InodeTable) -> None:
    a = table.make(ROOT_INO, b"a", DIR, 0, 0)
    b = table.make(a.ino, b"b", DIR, 0, 0)
    f = table.make(ROOT_INO, b"f", FILE, 0, 0)
    g = table.make(ROOT_INO, b"g", FILE, 0, 0)
    assert errno_of(table.rename, ROOT_INO, b"a", b.ino, b"a2", 0) == errno.EINVAL
    assert errno_of(table.rename, ROOT_INO, b"f", ROOT_INO, b"g", RENAME_NOREPLACE) == errno.EEXIST
    assert errno_of(table.rename, ROOT_INO, b"f", ROOT_INO, b"a", 0) == errno.EISDIR
    assert errno_of(table.rename, ROOT_INO, b"a", ROOT_INO, b"f", 0) == errno.ENOTDIR
    assert errno_of(table.rename, ROOT_INO, b"f", ROOT_INO, b"zz", RENAME_EXCHANGE) == errno.ENOENT
    table.rename(ROOT_INO, b"f", ROOT_INO, b"g", RENAME_EXCHANGE)
    assert table.child(ROOT_INO, b"f") is g and table.child(ROOT_INO, b"g") is f
    table.rename(ROOT_INO, b"f", ROOT_INO, b"g", 0)  # replaces g (which was f)
    assert table.child(ROOT_INO, b"g") is g and f.link_count == 0
    # moving a directory updates both parents' link counts and its ".."
    table.rename(a.ino, b"b", ROOT_INO, b"b", 0)
    assert b.parent == ROOT_INO and a.nlink == 2 and table.get(ROOT_INO).nlink == 4
    assert table.child(b.ino, b"..") is table.get(ROOT_INO)


def test_readdir_cookies_survive_changes(table: InodeTable) -> None:
    for i in range(5):
        table.make(ROOT_INO, f"n{i}".encode(), FILE, 0, 0)
    entries = table.get(ROOT_INO).dir
    assert entries is not None
    first_two = list(entries.after(2))[:2]
    table.unlink(ROOT_INO, first_two[0][1])
    table.make(ROOT_INO, b"late", FILE, 0, 0)
    rest = [name for _, name, _ in entries.after(first_two[1][0])]
    assert rest == [b"n2", b"n3", b"n4", b"late"]


def test_xattrs(table: InodeTable) -> None:
    f = table.make(ROOT_INO, b"f", FILE, 0, 0)
    assert errno_of(table.getxattr, f.ino, b"user.x") == errno.ENODATA
    table.setxattr(f.ino, b"user.x", b"1" * 65536)
    assert errno_of(table.setxattr, f.ino, b"user.y", b"1" * 65537) == errno.E2BIG
    assert errno_of(table.setxattr, f.ino, b"user." + b"n" * 251, b"") == errno.ERANGE
    assert errno_of(table.setxattr, f.ino, b"trusted.x", b"") == errno.EOPNOTSUPP
    assert table.listxattr(f.ino) == [b"user.x"]
    table.removexattr(f.ino, b"user.x")
    assert errno_of(table.removexattr, f.ino, b"user.x") == errno.ENODATA


def test_inode_limit(table: InodeTable) -> None:
    for i in range(99):
        table.make(ROOT_INO, f"f{i}".encode(), FILE, 0, 0)
    assert errno_of(table.make, ROOT_INO, b"one-more", FILE, 0, 0) == errno.ENOSPC
    table.unlink(ROOT_INO, b"f0")
    table.forget(table.get(2).ino, 1)
    table.make(ROOT_INO, b"one-more", FILE, 0, 0)


def test_setgid_directory_is_inherited(table: InodeTable) -> None:
    d = table.make(ROOT_INO, b"d", stat.S_IFDIR | stat.S_ISGID | 0o775, 0, 50)
    f = table.make(d.ino, b"f", FILE, 10, 10)
    sub = table.make(d.ino, b"s", DIR, 10, 10)
    assert f.gid == 50 and sub.gid == 50 and sub.mode & stat.S_ISGID


def test_the_constructor_takes_and_sets_every_field() -> None:
    """Inode's hand-written __init__ (which passes __setattr__ by) and its fields agree."""
    fields = dataclasses.fields(Inode)
    assert list(inspect.signature(Inode.__init__).parameters)[1:] == [f.name for f in fields]
    values: dict[str, Any] = {f.name: object() for f in fields}
    assert vars(Inode(**values)) == values
    plain = Inode(1, stat.S_IFREG, 0, 0)
    for f in fields[4:]:  # after ino, mode, uid and gid: the declared defaults
        assert getattr(plain, f.name) == ({} if f.name == "xattrs" else f.default), f.name
    assert plain.xattrs is not Inode(2, stat.S_IFREG, 0, 0).xattrs  # a dict of its own


def test_assigning_a_persisted_attribute_reports_the_inode() -> None:
    changes = Changes()
    inode = Inode(ino=7, mode=stat.S_IFREG | 0o644, uid=0, gid=0, changes=changes)
    assert not changes  # building it is not a change: InodeTable._new reports new inodes
    inode.lookup_count += 1
    inode.open_count += 1
    assert not changes  # the kernel's references and open handles are not kept
    for name in PERSISTED_FIELDS:
        changes.clear()
        setattr(inode, name, getattr(inode, name))
        assert changes.touched == {7}, name
    assert Inode(ino=8, mode=stat.S_IFREG, uid=0, gid=0).changes is None
