"""File system semantics on a real mount, through os.* calls.

Every test mounts a fresh 64 MiB dmemfs of 2 MiB dpages (32 dpages; the
``mnt`` fixture) and checks what Linux file systems promise: open flags,
sparse files, truncation, renameat2, xattrs, readdir under change, the life of
unlinked open files, mmap coherence, and running out of space or file size.
"""

from __future__ import annotations

import collections
import ctypes
import errno
import mmap
import os
import random
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from mounting import Mount, dmemfs

M = 1 << 20
DPAGE = 2 * M
TOTAL_DPAGES = 32
REGION = TOTAL_DPAGES * DPAGE
BLOCKS_PER_DPAGE = DPAGE // 512  # st_blocks counts 512-byte units

SYS_RENAMEAT2 = 316  # x86_64
SYS_GETDENTS64 = 217  # x86_64
AT_FDCWD = -100
RENAME_NOREPLACE = 1
RENAME_EXCHANGE = 2
XATTR_CREATE = 1
XATTR_REPLACE = 2

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long

pytestmark = pytest.mark.mount


def renameat2(old: Path, new: Path, flags: int) -> None:
    """renameat2(2) through the raw system call (x86_64); OSError on failure."""
    res = _libc.syscall(ctypes.c_long(SYS_RENAMEAT2), ctypes.c_int(AT_FDCWD),
                        ctypes.c_char_p(os.fsencode(old)), ctypes.c_int(AT_FDCWD),
                        ctypes.c_char_p(os.fsencode(new)), ctypes.c_uint(flags))
    if res != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code), str(old), None, str(new))


def drop_caches() -> None:
    """Drop the page cache, so the next read of a file asks the daemon."""
    os.sync()
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3\n")


def read_all(path: Path) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def blocks(path: Path | int) -> int:
    """Dpages a file holds, from st_blocks."""
    st = os.stat(path)
    assert st.st_blocks % BLOCKS_PER_DPAGE == 0, st
    return st.st_blocks // BLOCKS_PER_DPAGE


def wait_free(mnt: Mount, expected: int, timeout: float = 5.0) -> int:
    """Poll statfs until f_bfree is *expected* (the kernel forgets inodes asynchronously)."""
    deadline = time.monotonic() + timeout
    free = mnt.free_dpages()
    while free != expected and time.monotonic() < deadline:
        time.sleep(0.02)
        free = mnt.free_dpages()
    return free


def wait_free_inodes(mnt: Mount, expected: int, timeout: float = 5.0) -> int:
    """Poll statfs until f_ffree is *expected*."""
    deadline = time.monotonic() + timeout
    free = mnt.statvfs().f_ffree
    while free != expected and time.monotonic() < deadline:
        time.sleep(0.02)
        free = mnt.statvfs().f_ffree
    return free


def pattern(size: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(size)


# -- statfs -------------------------------------------------------------------------------


def test_statfs_reports_dpages(mnt: Mount) -> None:
    st = mnt.statvfs()
    assert st.f_bsize == DPAGE
    assert st.f_frsize == DPAGE
    assert st.f_blocks == TOTAL_DPAGES
    assert st.f_bfree == st.f_bavail == TOTAL_DPAGES
    assert st.f_namemax == 255


def test_statfs_counts_inodes(mnt: Mount) -> None:
    start = mnt.statvfs().f_ffree
    (mnt.path / "f").touch()
    (mnt.path / "d").mkdir()
    os.symlink("f", mnt.path / "l")
    os.link(mnt.path / "f", mnt.path / "h")  # a second name is no new inode
    assert mnt.statvfs().f_ffree == start - 3
    for name in ("f", "l", "h"):
        os.unlink(mnt.path / name)
    os.rmdir(mnt.path / "d")
    assert wait_free_inodes(mnt, start) == start


def test_nr_inodes_limit(tmp_path: Path) -> None:
    with dmemfs(tmp_path, "size=64M,pagesize=2M,nr_inodes=4") as mount:
        st = mount.statvfs()
        assert (st.f_files, st.f_ffree) == (4, 3)
        for name in "abc":
            (mount.path / name).touch()
        with pytest.raises(OSError) as exc:
            (mount.path / "d").touch()
        assert exc.value.errno == errno.ENOSPC
        with pytest.raises(OSError) as exc:
            os.mkdir(mount.path / "e")
        assert exc.value.errno == errno.ENOSPC
        os.unlink(mount.path / "a")
        assert wait_free_inodes(mount, 1) == 1
        os.mkdir(mount.path / "e")
    assert mount.exit_code == 0, mount.log()


# -- open flags -----------------------------------------------------------------------------


def test_o_excl(mnt: Mount) -> None:
    path = mnt.path / "f"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640)
    os.write(fd, b"first")
    os.close(fd)
    assert os.stat(path).st_mode & 0o777 == 0o640
    with pytest.raises(FileExistsError):
        os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL)
    # O_CREAT|O_EXCL does not follow a symlink, even a dangling one.
    os.symlink("nowhere", mnt.path / "dangling")
    with pytest.raises(FileExistsError):
        os.open(mnt.path / "dangling", os.O_WRONLY | os.O_CREAT | os.O_EXCL)
    assert not (mnt.path / "nowhere").exists()
    # Without O_EXCL an existing file is opened as it is.
    fd = os.open(path, os.O_RDWR | os.O_CREAT)
    assert os.read(fd, 100) == b"first"
    os.close(fd)


def test_o_trunc(mnt: Mount) -> None:
    path = mnt.path / "f"
    path.write_bytes(pattern(3 * M, 1))
    assert blocks(path) == 2
    assert mnt.free_dpages() == TOTAL_DPAGES - 2
    os.link(path, mnt.path / "other-name")
    fd = os.open(mnt.path / "other-name", os.O_WRONLY | os.O_TRUNC)
    try:
        assert os.fstat(fd).st_size == 0
        assert os.stat(path).st_size == 0
        assert blocks(path) == 0
        assert mnt.free_dpages() == TOTAL_DPAGES
        os.write(fd, b"ab")
    finally:
        os.close(fd)
    assert read_all(path) == b"ab"
    drop_caches()
    assert read_all(path) == b"ab"


def test_o_trunc_of_an_empty_file_marks_times(mnt: Mount) -> None:
    path = mnt.path / "stamp"
    path.touch()
    os.utime(path, ns=(10**18, 10**18))  # 2001: any update is plainly newer
    before = os.stat(path)
    os.close(os.open(path, os.O_WRONLY | os.O_TRUNC))  # what `: > stamp` does
    after = os.stat(path)
    assert after.st_mtime_ns > before.st_mtime_ns
    assert after.st_ctime_ns > before.st_ctime_ns


def test_timestamps_follow_changes(mnt: Mount) -> None:
    old = 10**18
    d = mnt.path / "d"
    d.mkdir()
    f = d / "f"
    f.write_bytes(b"x")

    def age(*paths: Path) -> dict[Path, os.stat_result]:
        for path in paths:
            os.utime(path, ns=(old, old))
        time.sleep(0.01)  # ctime, just set to now by utime, must be able to move on
        return {path: os.stat(path) for path in paths}

    def newer(path: Path, before: dict[Path, os.stat_result]) -> tuple[bool, bool]:
        st = os.stat(path)
        return st.st_mtime_ns > before[path].st_mtime_ns, st.st_ctime_ns > before[path].st_ctime_ns

    before = age(f)
    f.write_bytes(b"yy")
    assert newer(f, before) == (True, True)
    before = age(f)
    os.truncate(f, 100)
    assert newer(f, before) == (True, True)
    before = age(f)
    os.chmod(f, 0o600)
    assert newer(f, before) == (False, True)
    before = age(f)
    os.setxattr(f, "user.t", b"1")
    assert newer(f, before) == (False, True)
    before = age(f)
    os.link(f, d / "h")
    assert newer(f, before) == (False, True)
    os.unlink(d / "h")
    before = age(d)
    (d / "new").touch()
    assert newer(d, before) == (True, True)
    before = age(d, f)
    os.rename(f, d / "g")
    assert newer(d, before) == (True, True)
    assert os.stat(d / "g").st_mtime_ns == old
    before = age(d)
    os.unlink(d / "new")
    assert newer(d, before) == (True, True)
    assert os.stat(d / "g").st_atime_ns == old  # nothing above read it


def test_o_append(mnt: Mount) -> None:
    path = mnt.path / "log"
    path.write_bytes(b"x" * (DPAGE - 3))
    a = os.open(path, os.O_WRONLY | os.O_APPEND)
    b = os.open(path, os.O_WRONLY | os.O_APPEND)
    try:
        os.write(a, b"A1")
        os.write(b, b"B1.....")  # crosses into the second dpage
        os.write(a, b"A2")
        # On Linux, pwrite on an O_APPEND descriptor appends whatever the offset.
        os.pwrite(b, b"B2", 0)
    finally:
        os.close(a)
        os.close(b)
    expected = b"x" * (DPAGE - 3) + b"A1B1.....A2B2"
    assert read_all(path) == expected
    assert blocks(path) == 2
    drop_caches()
    assert read_all(path) == expected


# -- sparse files and truncate ------------------------------------------------------------------


def test_sparse_writes_read_zeros_and_count_touched_dpages(mnt: Mount) -> None:
    path = mnt.path / "sparse"
    model = bytearray()

    def pwrite(fd: int, data: bytes, off: int) -> None:
        assert os.pwrite(fd, data, off) == len(data)
        if len(model) < off + len(data):
            model.extend(bytes(off + len(data) - len(model)))
        model[off:off + len(data)] = data

    fd = os.open(path, os.O_RDWR | os.O_CREAT)
    try:
        pwrite(fd, b"X" * 10, 10 * M + 5)
        assert os.fstat(fd).st_size == 10 * M + 15
        assert blocks(path) == 1
        assert mnt.free_dpages() == TOTAL_DPAGES - 1
        assert os.pread(fd, 10 * M + 100, 0) == bytes(model)
        pwrite(fd, b"head", 0)
        assert blocks(path) == 2
        pwrite(fd, b"edge", 6 * M - 2)  # straddles dpages 2 and 3
        assert blocks(path) == 4
        assert mnt.free_dpages() == TOTAL_DPAGES - 4
        assert os.pread(fd, len(model) + 1, 0) == bytes(model)
    finally:
        os.close(fd)
    drop_caches()  # now the daemon answers, holes and all
    assert read_all(path) == bytes(model)
    with open(path, "rb") as f:
        f.seek(5 * M)
        assert f.read(2 * M) == bytes(model[5 * M:7 * M])


def test_truncate_grows_by_reserving_and_shrinks_by_releasing(mnt: Mount) -> None:
    path = mnt.path / "f"
    path.touch()
    os.truncate(path, 5 * M + 1)
    assert os.stat(path).st_size == 5 * M + 1
    assert blocks(path) == 3  # growing reserves the dpages, as dmemfs does
    assert mnt.free_dpages() == TOTAL_DPAGES - 3
    assert read_all(path) == bytes(5 * M + 1)
    os.truncate(path, 2 * M)
    assert blocks(path) == 1
    assert mnt.free_dpages() == TOTAL_DPAGES - 1
    os.truncate(path, 0)
    assert blocks(path) == 0
    assert mnt.free_dpages() == TOTAL_DPAGES


@pytest.mark.parametrize("small", [1000, DPAGE, DPAGE + 1])
def test_shrink_then_grow_reads_zeros(mnt: Mount, small: int) -> None:
    path = mnt.path / "f"
    path.write_bytes(b"\xab" * (3 * M))
    fd = os.open(path, os.O_RDWR)
    try:
        os.ftruncate(fd, small)
        os.ftruncate(fd, 3 * M)
        expected = b"\xab" * small + bytes(3 * M - small)
        assert os.pread(fd, 4 * M, 0) == expected
        drop_caches()
        assert os.pread(fd, 4 * M, 0) == expected
        # A write past the end after a shrink leaves zeros in between too.
        os.ftruncate(fd, small)
        os.pwrite(fd, b"end", 3 * M)
        drop_caches()
        assert os.pread(fd, 4 * M, 0) == b"\xab" * small + bytes(3 * M - small) + b"end"
    finally:
        os.close(fd)


def test_freed_dpages_come_back_zeroed(mnt: Mount) -> None:
    old = mnt.path / "old"
    old.write_bytes(b"\xcd" * (16 * M))
    old.unlink()
    assert wait_free(mnt, TOTAL_DPAGES) == TOTAL_DPAGES
    new = mnt.path / "new"
    new.touch()
    os.truncate(new, REGION)  # takes every dpage, the dirty ones included
    assert mnt.free_dpages() == 0
    drop_caches()
    with open(new, "rb") as f:
        while chunk := f.read(4 * M):
            assert chunk.count(0) == len(chunk)


# -- renames --------------------------------------------------------------------------------


def test_rename_noreplace(mnt: Mount) -> None:
    a, b, c = (mnt.path / n for n in "abc")
    a.write_bytes(b"A")
    b.write_bytes(b"B")
    with pytest.raises(FileExistsError):
        renameat2(a, b, RENAME_NOREPLACE)
    assert read_all(a) == b"A" and read_all(b) == b"B"
    renameat2(a, c, RENAME_NOREPLACE)
    assert not a.exists() and read_all(c) == b"A"


def test_rename_exchange(mnt: Mount) -> None:
    a, b = mnt.path / "a", mnt.path / "b"
    a.write_bytes(b"A")
    b.write_bytes(b"BB")
    ino_a = os.stat(a).st_ino
    renameat2(a, b, RENAME_EXCHANGE)
    assert read_all(a) == b"BB" and read_all(b) == b"A"
    assert os.stat(b).st_ino == ino_a
    # A file and a directory in different parents: link counts and ".." follow.
    p1, p2 = mnt.path / "p1", mnt.path / "p2"
    p1.mkdir()
    p2.mkdir()
    (p1 / "x").write_bytes(b"file")
    (p2 / "y").mkdir()
    (p2 / "y" / "child").write_bytes(b"kid")
    renameat2(p1 / "x", p2 / "y", RENAME_EXCHANGE)
    assert read_all(p1 / "x" / "child") == b"kid"
    assert read_all(p2 / "y") == b"file"
    assert os.stat(p1).st_nlink == 3
    assert os.stat(p2).st_nlink == 2
    assert os.stat(p1 / "x" / "..").st_ino == os.stat(p1).st_ino
    assert sorted(os.listdir(p1)) == ["x"] and sorted(os.listdir(p2)) == ["y"]
    with pytest.raises(FileNotFoundError):
        renameat2(a, mnt.path / "missing", RENAME_EXCHANGE)
    with pytest.raises(OSError) as exc:
        renameat2(a, b, RENAME_EXCHANGE | RENAME_NOREPLACE)
    assert exc.value.errno == errno.EINVAL
    # A directory cannot be exchanged with something inside itself.
    with pytest.raises(OSError) as exc:
        renameat2(p1 / "x", p1 / "x" / "child", RENAME_EXCHANGE)
    assert exc.value.errno == errno.EINVAL


def test_rename_replace_rules(mnt: Mount) -> None:
    root = mnt.path
    (root / "file").write_bytes(b"f")
    (root / "full").mkdir()
    (root / "full" / "x").touch()
    (root / "empty").mkdir()
    (root / "d").mkdir()
    (root / "d" / "sub").mkdir()
    with pytest.raises(IsADirectoryError):
        os.rename(root / "file", root / "empty")
    with pytest.raises(NotADirectoryError):
        os.rename(root / "d", root / "file")
    with pytest.raises(OSError) as exc:
        os.rename(root / "d", root / "full")
    assert exc.value.errno == errno.ENOTEMPTY
    assert os.stat(root).st_nlink == 5
    os.rename(root / "d", root / "empty")  # over an empty directory
    assert os.stat(root).st_nlink == 4
    assert os.listdir(root / "empty") == ["sub"]
    # Renaming one name of a file onto another name of the same file does nothing.
    os.link(root / "file", root / "alias")
    os.rename(root / "alias", root / "file")
    assert (root / "alias").exists() and os.stat(root / "file").st_nlink == 2
    # A file replaced by rename stays readable through a descriptor opened before.
    (root / "new").write_bytes(b"new")
    fd = os.open(root / "file", os.O_RDONLY)
    try:
        os.rename(root / "new", root / "file")
        assert os.pread(fd, 10, 0) == b"f"
        assert os.fstat(fd).st_nlink == 1  # "alias" still names it
    finally:
        os.close(fd)
    assert read_all(root / "file") == b"new"
    assert read_all(root / "alias") == b"f"


def test_rename_directory_into_its_own_child(mnt: Mount) -> None:
    d = mnt.path / "d"
    (d / "sub" / "deeper").mkdir(parents=True)
    for target in (d / "sub" / "x", d / "sub" / "deeper" / "x"):
        with pytest.raises(OSError) as exc:
            os.rename(d, target)
        assert exc.value.errno == errno.EINVAL
    with pytest.raises(OSError) as exc:
        renameat2(d, d / "sub" / "x", RENAME_NOREPLACE)
    assert exc.value.errno == errno.EINVAL
    assert sorted(p.name for p in d.rglob("*")) == ["deeper", "sub"]


def test_rmdir_and_unlink_rules(mnt: Mount) -> None:
    d = mnt.path / "d"
    d.mkdir()
    (d / "f").touch()
    with pytest.raises(OSError) as exc:
        os.rmdir(d)
    assert exc.value.errno == errno.ENOTEMPTY
    with pytest.raises(NotADirectoryError):
        os.rmdir(d / "f")
    with pytest.raises(IsADirectoryError):
        os.unlink(d)
    os.unlink(d / "f")
    os.rmdir(d)
    assert os.listdir(mnt.path) == []
    assert os.stat(mnt.path).st_nlink == 2


def test_names_of_256_bytes_are_too_long(mnt: Mount) -> None:
    root = mnt.path
    long, longest = "n" * 256, "m" * 255
    (root / "file").touch()
    attempts: dict[str, Callable[[], object]] = {
        "create": lambda: os.close(os.open(root / long, os.O_CREAT | os.O_WRONLY)),
        "mkdir": lambda: os.mkdir(root / long),
        "stat": lambda: os.stat(root / long),
        "symlink": lambda: os.symlink("file", root / long),
        "link": lambda: os.link(root / "file", root / long),
        "rename": lambda: os.rename(root / "file", root / long),
        "mkfifo": lambda: os.mkfifo(root / long),
    }
    for what, attempt in attempts.items():
        with pytest.raises(OSError) as exc:
            attempt()
        assert exc.value.errno == errno.ENAMETOOLONG, what
    os.close(os.open(root / longest, os.O_CREAT | os.O_WRONLY))
    os.mkdir(root / (longest[:-1] + "d"))
    os.rename(root / "file", root / (longest[:-1] + "r"))
    assert sorted(len(n) for n in os.listdir(root)) == [255, 255, 255]


# -- extended attributes ------------------------------------------------------------------------


def test_user_xattrs(mnt: Mount) -> None:
    path = mnt.path / "f"
    path.touch()
    with pytest.raises(OSError) as exc:
        os.getxattr(path, "user.missing")
    assert exc.value.errno == errno.ENODATA
    os.setxattr(path, "user.a", b"hello")
    os.setxattr(path, "user.empty", b"")
    assert os.getxattr(path, "user.a") == b"hello"
    assert os.getxattr(path, "user.empty") == b""
    assert sorted(os.listxattr(path)) == ["user.a", "user.empty"]
    biggest = pattern(65536, 7)
    os.setxattr(path, "user.big", biggest)
    assert os.getxattr(path, "user.big") == biggest
    with pytest.raises(OSError) as exc:
        os.setxattr(path, "user.bigger", biggest + b"!")
    assert exc.value.errno == errno.E2BIG
    # XATTR_CREATE and XATTR_REPLACE.
    with pytest.raises(FileExistsError):
        os.setxattr(path, "user.a", b"x", XATTR_CREATE)
    with pytest.raises(OSError) as exc:
        os.setxattr(path, "user.nope", b"x", XATTR_REPLACE)
    assert exc.value.errno == errno.ENODATA
    os.setxattr(path, "user.a", b"replaced", XATTR_REPLACE)
    os.setxattr(path, "user.c", b"created", XATTR_CREATE)
    assert os.getxattr(path, "user.a") == b"replaced"
    os.removexattr(path, "user.a")
    with pytest.raises(OSError) as exc:
        os.removexattr(path, "user.a")
    assert exc.value.errno == errno.ENODATA
    assert sorted(os.listxattr(path)) == ["user.big", "user.c", "user.empty"]
    # Directories carry them too; they survive rename and belong to the inode.
    d = mnt.path / "d"
    d.mkdir()
    os.setxattr(d, "user.dir", b"yes")
    os.rename(path, d / "moved")
    os.link(d / "moved", mnt.path / "alias")
    assert os.getxattr(mnt.path / "alias", "user.c") == b"created"
    assert os.getxattr(d, "user.dir") == b"yes"


def test_other_xattr_namespaces_are_not_supported(mnt: Mount) -> None:
    # tmpfs supports trusted.* and security.*; dmemfs documents user.* only and
    # answers EOPNOTSUPP for every other namespace, for set, get and remove alike.
    path = mnt.path / "f"
    path.touch()
    for name in ("trusted.x", "security.x"):
        with pytest.raises(OSError) as exc:
            os.setxattr(path, name, b"1")
        assert exc.value.errno == errno.EOPNOTSUPP, name
        with pytest.raises(OSError) as exc:
            os.getxattr(path, name)
        assert exc.value.errno == errno.EOPNOTSUPP, name
        with pytest.raises(OSError) as exc:
            os.removexattr(path, name)
        assert exc.value.errno == errno.EOPNOTSUPP, name
    assert os.listxattr(path) == []


def test_xattr_name_list_is_capped_at_64k(mnt: Mount) -> None:
    path = mnt.path / "f"
    path.touch()
    # Names of 255 bytes take 256 bytes of the list each: 256 of them fill 64 KiB exactly.
    names = [f"user.{i:03d}".ljust(255, "x") for i in range(257)]
    for name in names[:256]:
        os.setxattr(path, name, b"")
    with pytest.raises(OSError) as exc:
        os.setxattr(path, names[256], b"")
    assert exc.value.errno == errno.ENOSPC
    assert sorted(os.listxattr(path)) == names[:256]
    os.setxattr(path, names[0], b"still replaceable")
    with pytest.raises(OSError) as exc:
        os.setxattr(path, "user." + "y" * 251, b"")  # 256 bytes: too long a name
    assert exc.value.errno == errno.ERANGE


# -- readdir ---------------------------------------------------------------------------------


class Churn:
    """A directory of *keep* entries that stay and *churn* entries that go, plus new arrivals."""

    def __init__(self, d: Path, count: int, width: int) -> None:
        self.d = d
        self.width = width
        self.keep = [self.name("keep", i) for i in range(count)]
        self.alive = [self.name("churn", i) for i in range(count)]
        self.removed: set[str] = set()
        self.created: list[str] = []
        self.rng = random.Random(3)
        d.mkdir()
        for k, c in zip(self.keep, self.alive, strict=True):
            os.mknod(d / k)
            os.mknod(d / c)

    def name(self, kind: str, i: int) -> str:
        return f"{kind}{i:06d}".ljust(self.width, "x")

    def change(self, removals: int, additions: int) -> None:
        """Remove random churn entries (seen or not yet seen) and add new ones."""
        for _ in range(min(removals, len(self.alive))):
            victim = self.alive.pop(self.rng.randrange(len(self.alive)))
            os.unlink(self.d / victim)
            self.removed.add(victim)
        for _ in range(additions):
            name = self.name("new", len(self.created))
            os.mknod(self.d / name)
            self.created.append(name)

    def check(self, seen: list[str]) -> None:
        counts = collections.Counter(seen)
        assert [name for name, count in counts.items() if count > 1] == []
        assert [name for name in self.keep if name not in counts] == []
        assert set(seen) <= set(self.keep) | set(self.alive) | self.removed | set(self.created)
        # The listing really changed under the reader: entries removed before
        # the reader got to them were not listed.
        assert self.removed - set(seen)
        assert sorted(os.listdir(self.d)) == sorted(self.keep + self.alive + self.created)


def test_scandir_neither_skips_nor_repeats_under_change(mnt: Mount) -> None:
    # glibc reads directories in buffers of st_blksize (2 MiB here) capped at
    # 1 MiB: with names of 250 bytes the listing takes more than one getdents.
    churn = Churn(mnt.path / "d", 2000, 250)
    seen: list[str] = []
    with os.scandir(churn.d) as it:
        for n, entry in enumerate(it):
            seen.append(entry.name)
            if n % 40 == 0:
                churn.change(15, 15 if len(churn.created) < 1500 else 0)
    churn.check(seen)


def getdents(fd: int, size: int) -> list[str]:
    """One getdents64(2) call with a buffer of *size* bytes; the names it returned."""
    buf = ctypes.create_string_buffer(size)
    got = _libc.syscall(ctypes.c_long(SYS_GETDENTS64), ctypes.c_int(fd), buf,
                        ctypes.c_size_t(size))
    if got < 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code))
    names, pos = [], 0
    while pos < got:
        reclen = int.from_bytes(buf.raw[pos + 16:pos + 18], "little")
        name = buf.raw[pos + 19:pos + reclen].split(b"\0", 1)[0]
        names.append(os.fsdecode(name))
        pos += reclen
    return names


def test_getdents_offsets_stay_true_between_small_reads(mnt: Mount) -> None:
    # Small buffers: dozens of getdents calls, the directory changing between each.
    churn = Churn(mnt.path / "d", 1200, 12)
    seen: list[str] = []
    fd = os.open(churn.d, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for _ in range(1000):  # bounded: the listing must end
            names = getdents(fd, 2048)
            if not names:
                break
            seen.extend(n for n in names if n not in (".", ".."))
            # Stop adding at some point, or a reader that keeps up never ends.
            churn.change(20, 10 if len(churn.created) < 600 else 0)
        else:
            pytest.fail("getdents never reached the end of the directory")
    finally:
        os.close(fd)
    assert len(seen) > 1500
    churn.check(seen)


# -- lifetimes -------------------------------------------------------------------------------


def test_unlink_frees_dpages_at_once(mnt: Mount) -> None:
    # `rm f; df` must already see the space back: no polling here.
    for size in (1, DPAGE, 5 * M):
        path = mnt.path / "f"
        path.write_bytes(b"z" * size)
        assert mnt.free_dpages() == TOTAL_DPAGES - -(-size // DPAGE)
        path.unlink()
        assert mnt.free_dpages() == TOTAL_DPAGES


@pytest.mark.parametrize("allocate", ["truncate", "fallocate"])
def test_the_whole_pool_right_after_a_removal(mnt: Mount, allocate: str) -> None:
    """`rm a; truncate -s SIZE b` with *a* holding the whole pool: the kernel may send a's
    FORGET after the truncate arrives, which then waits for it briefly instead of failing
    (fs.py, _with_room)."""
    a, b = mnt.path / "a", mnt.path / "b"
    b.touch()
    for _ in range(20):
        a.touch()
        os.truncate(a, REGION)
        a.unlink()
        if allocate == "truncate":
            os.truncate(b, REGION)
        else:
            fd = os.open(b, os.O_WRONLY)
            try:
                os.posix_fallocate(fd, 0, REGION)
            finally:
                os.close(fd)
        assert mnt.free_dpages() == 0
        os.truncate(b, 0)
    assert mnt.free_dpages() == TOTAL_DPAGES


def test_rename_over_a_file_frees_its_dpages(mnt: Mount) -> None:
    a, b = mnt.path / "a", mnt.path / "b"
    a.write_bytes(b"a")
    b.write_bytes(b"b" * (4 * M))
    assert mnt.free_dpages() == TOTAL_DPAGES - 3
    os.rename(a, b)
    assert wait_free(mnt, TOTAL_DPAGES - 1) == TOTAL_DPAGES - 1
    assert read_all(b) == b"a"


def test_unlinked_open_file_keeps_data_and_dpages_until_close(mnt: Mount) -> None:
    path = mnt.path / "f"
    data = pattern(5 * M, 11)
    fd = os.open(path, os.O_RDWR | os.O_CREAT)
    try:
        os.write(fd, data)
        assert mnt.free_dpages() == TOTAL_DPAGES - 3
        os.unlink(path)
        assert not path.exists()
        time.sleep(0.3)  # give any (wrong) release a chance to happen
        assert mnt.free_dpages() == TOTAL_DPAGES - 3
        assert os.fstat(fd).st_nlink == 0
        drop_caches()
        assert os.pread(fd, 6 * M, 0) == data
        os.pwrite(fd, b"more", 7 * M)
        assert mnt.free_dpages() == TOTAL_DPAGES - 4
        assert os.pread(fd, 4, 7 * M) == b"more"
    finally:
        os.close(fd)
    assert wait_free(mnt, TOTAL_DPAGES) == TOTAL_DPAGES
    assert os.listdir(mnt.path) == []


def test_unlinked_mapped_file_keeps_dpages_until_munmap(mnt: Mount) -> None:
    # QEMU's -mem-path pattern: open, size, map, close, unlink, then use the mapping.
    path = mnt.path / "guest-ram"
    fd = os.open(path, os.O_RDWR | os.O_CREAT)
    os.ftruncate(fd, 4 * M)
    mapping = mmap.mmap(fd, 4 * M, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
    os.close(fd)
    path.unlink()
    try:
        mapping[3 * M:3 * M + 5] = b"guest"
        mapping.flush()
        time.sleep(0.3)
        assert mnt.free_dpages() == TOTAL_DPAGES - 2
        drop_caches()
        assert mapping[3 * M:3 * M + 5] == b"guest"
    finally:
        mapping.close()
    assert wait_free(mnt, TOTAL_DPAGES) == TOTAL_DPAGES


# -- mmap coherence -------------------------------------------------------------------------------


def test_mmap_shared_write_reaches_the_file(mnt: Mount) -> None:
    path = mnt.path / "f"
    path.write_bytes(bytes(3 * M))
    data = pattern(3 * M, 5)
    with open(path, "r+b") as f:
        mapping = mmap.mmap(f.fileno(), 3 * M, mmap.MAP_SHARED)
        mapping[:] = data
        mapping.flush()
        mapping.close()
    drop_caches()
    assert read_all(path) == data


def test_write_is_seen_by_an_existing_mapping(mnt: Mount) -> None:
    path = mnt.path / "f"
    path.write_bytes(b"a" * (3 * M))
    fd = os.open(path, os.O_RDWR)
    try:
        mapping = mmap.mmap(fd, 3 * M, mmap.MAP_SHARED, mmap.PROT_READ)
        try:
            assert mapping[DPAGE - 2:DPAGE + 2] == b"aaaa"  # faulted in
            os.pwrite(fd, b"WXYZ", DPAGE - 2)
            assert mapping[DPAGE - 2:DPAGE + 2] == b"WXYZ"
        finally:
            mapping.close()
    finally:
        os.close(fd)
    with open(path, "rb") as f:
        mapping = mmap.mmap(f.fileno(), 0, mmap.MAP_SHARED, mmap.PROT_READ)
        assert mapping[DPAGE - 2:DPAGE + 2] == b"WXYZ"
        mapping.close()


def test_map_private_writes_never_reach_the_file(mnt: Mount) -> None:
    path = mnt.path / "f"
    original = pattern(2 * M + 100, 9)
    path.write_bytes(original)
    with open(path, "r+b") as f, open(path, "rb") as g:
        private = mmap.mmap(f.fileno(), 0, mmap.MAP_PRIVATE,
                            mmap.PROT_READ | mmap.PROT_WRITE)
        shared = mmap.mmap(g.fileno(), 0, mmap.MAP_SHARED, mmap.PROT_READ)
        private[0:7] = b"private"
        private[2 * M:2 * M + 7] = b"private"
        private.flush()
        assert private[0:7] == b"private"
        assert shared[0:7] == original[0:7]
        private.close()
        shared.close()
    drop_caches()
    assert read_all(path) == original


@pytest.mark.region_only("on passthrough a fault into a hole of a full pool is SIGBUS, as on "
                         "tmpfs (test_passthrough covers the kernel's allocation)")
def test_mmap_write_into_a_hole_allocates_or_reports_enospc(mnt: Mount) -> None:
    path = mnt.path / "sparse"
    fd = os.open(path, os.O_RDWR | os.O_CREAT)
    try:
        os.pwrite(fd, b"e", 6 * DPAGE - 1)
        assert blocks(path) == 1
        mapping = mmap.mmap(fd, 6 * DPAGE, mmap.MAP_SHARED)
        try:
            mapping[DPAGE + 5:DPAGE + 10] = b"hello"
            mapping.flush()
            assert blocks(path) == 2
            assert mnt.free_dpages() == TOTAL_DPAGES - 2
            filler = mnt.path / "filler"
            filler.touch()
            os.truncate(filler, mnt.free_dpages() * DPAGE)
            # No dpage left for the hole: the page fault itself succeeds (the
            # page cache takes it; tmpfs would raise SIGBUS here) and msync
            # reports ENOSPC when the write-back reaches the daemon.
            mapping[3 * DPAGE:3 * DPAGE + 5] = b"nospc"
            with pytest.raises(OSError) as exc:
                mapping.flush()
            assert exc.value.errno == errno.ENOSPC
        finally:
            mapping.close()
    finally:
        os.close(fd)
    drop_caches()
    data = read_all(path)
    assert data[DPAGE + 5:DPAGE + 10] == b"hello"
    assert data[3 * DPAGE:3 * DPAGE + 5] == bytes(5)
    assert blocks(path) == 2


CHILD = """
import mmap, sys
with open(sys.argv[1], "r+b") as f:
    m = mmap.mmap(f.fileno(), 0, mmap.MAP_SHARED)
    m[100:105] = b"child"
    print("written", flush=True)
    sys.stdin.readline()
    print(m[200:206].decode(), flush=True)
    m.close()
"""


def test_two_shared_mappings_see_each_other(mnt: Mount) -> None:
    path = mnt.path / "f"
    path.write_bytes(bytes(DPAGE + 4096))
    with open(path, "r+b") as f, open(path, "r+b") as g:
        one = mmap.mmap(f.fileno(), 0, mmap.MAP_SHARED)
        two = mmap.mmap(g.fileno(), 0, mmap.MAP_SHARED)
        one[DPAGE:DPAGE + 3] = b"one"
        assert two[DPAGE:DPAGE + 3] == b"one"
        two[0:3] = b"two"
        assert one[0:3] == b"two"
        child = subprocess.Popen([sys.executable, "-c", CHILD, str(path)], text=True,
                                 stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        try:
            assert child.stdout is not None and child.stdin is not None
            assert child.stdout.readline() == "written\n"
            assert one[100:105] == b"child"
            two[200:206] = b"parent"
            child.stdin.write("go\n")
            child.stdin.flush()
            assert child.stdout.readline() == "parent\n"
        finally:
            child.wait(timeout=30)
        assert child.returncode == 0
        one.flush()
        two.flush()
        one.close()
        two.close()
    drop_caches()
    data = read_all(path)
    assert data[0:3] == b"two" and data[100:105] == b"child" and data[200:206] == b"parent"
    assert data[DPAGE:DPAGE + 3] == b"one"


# -- running out of space and size ------------------------------------------------------------


def test_enospc_on_truncate(mnt: Mount) -> None:
    start = mnt.free_dpages()
    assert start == TOTAL_DPAGES
    a, b = mnt.path / "a", mnt.path / "b"
    a.touch()
    b.touch()
    os.truncate(a, start * DPAGE)
    assert mnt.free_dpages() == 0
    with pytest.raises(OSError) as exc:
        os.truncate(b, 1)
    assert exc.value.errno == errno.ENOSPC
    assert os.stat(b).st_size == 0 and blocks(b) == 0
    # Growing within the dpages already held needs nothing more.
    os.truncate(a, start * DPAGE - 1)
    os.truncate(a, start * DPAGE)
    a.unlink()
    assert wait_free(mnt, start) == start
    os.truncate(b, 1)
    assert mnt.free_dpages() == start - 1


@pytest.mark.region_only("a passed-through write is the kernel's: as on tmpfs it writes what "
                         "fits and stops short (test_passthrough checks the ledger after it)")
def test_enospc_write_is_all_or_nothing(mnt: Mount) -> None:
    filler, f = mnt.path / "filler", mnt.path / "f"
    filler.touch()
    os.truncate(filler, 30 * DPAGE)
    f.write_bytes(b"keep")
    assert mnt.free_dpages() == 1
    fd = os.open(f, os.O_RDWR)
    try:
        # One write of two whole pages, sent as one FUSE request, that needs
        # dpages 1 and 2 while one is free: nothing of it may be taken or written.
        with pytest.raises(OSError) as exc:
            os.pwrite(fd, b"z" * 8192, 2 * DPAGE - 4096)
        assert exc.value.errno == errno.ENOSPC
        assert mnt.free_dpages() == 1
        assert os.fstat(fd).st_size == 4 and blocks(f) == 1
        drop_caches()
        assert os.pread(fd, 100, 0) == b"keep"
        # The one free dpage can still be used, and written dpages stay writable when full.
        assert os.pwrite(fd, b"fits", DPAGE + 10) == 4
        assert mnt.free_dpages() == 0
        assert os.pwrite(fd, b"KEEP", 0) == 4
        with pytest.raises(OSError) as exc:
            os.pwrite(fd, b"x", 2 * DPAGE)
        assert exc.value.errno == errno.ENOSPC
        assert os.fstat(fd).st_size == DPAGE + 14
    finally:
        os.close(fd)
    drop_caches()
    assert read_all(f) == b"KEEP" + bytes(DPAGE + 6) + b"fits"
    filler.unlink()
    f.unlink()
    assert wait_free(mnt, TOTAL_DPAGES) == TOTAL_DPAGES


def test_large_write_stops_short_at_the_last_free_dpage(mnt: Mount) -> None:
    # The kernel splits a large write() into requests of at most max_write
    # bytes; each is all-or-nothing, so write() returns what fitted.
    filler = mnt.path / "filler"
    filler.touch()
    os.truncate(filler, 31 * DPAGE)
    data = pattern(2 * DPAGE, 13)
    fd = os.open(mnt.path / "f", os.O_RDWR | os.O_CREAT)
    try:
        assert os.write(fd, data) == DPAGE
        assert mnt.free_dpages() == 0
        with pytest.raises(OSError) as exc:
            os.write(fd, data[DPAGE:])
        assert exc.value.errno == errno.ENOSPC
        assert os.fstat(fd).st_size == DPAGE
    finally:
        os.close(fd)
    drop_caches()
    assert read_all(mnt.path / "f") == data[:DPAGE]


def test_sparse_files_past_the_capacity(mnt: Mount) -> None:
    """As on tmpfs, the pools limit what is allocated, not the file size: a byte written
    at 2 GiB + 1 on this small mount makes a 2 GiB + 2 file that holds one dpage."""
    path = mnt.path / "f"
    far = (2 << 30) + 1
    fd = os.open(path, os.O_RDWR | os.O_CREAT)
    try:
        assert far > REGION
        assert os.pwrite(fd, b"x", far) == 1
        assert os.fstat(fd).st_size == far + 1
        assert blocks(path) == 1 and mnt.free_dpages() == TOTAL_DPAGES - 1
        assert os.pread(fd, 3, far - 1) == b"\0x"      # the hole before it reads as zeros
        assert os.pread(fd, 4096, 1 << 30) == b"\0" * 4096
        drop_caches()
        assert os.pread(fd, 2, far) == b"x"
        # The largest file is the kernel's, as on tmpfs (MAX_LFS_FILESIZE).
        top = (1 << 63) - 2
        assert os.pwrite(fd, b"y", top) == 1
        assert os.fstat(fd).st_size == top + 1 and blocks(path) == 2
    finally:
        os.close(fd)
    os.unlink(path)
    assert mnt.free_dpages() == TOTAL_DPAGES


def test_truncate_past_the_free_space_is_enospc_and_changes_nothing(mnt: Mount) -> None:
    """truncate reserves what it grows by, so growing past the free dpages fails whole."""
    path = mnt.path / "f"
    fd = os.open(path, os.O_RDWR | os.O_CREAT)
    try:
        assert os.pwrite(fd, b"y", 0) == 1
        for size in (REGION + 1, 1 << 40):
            with pytest.raises(OSError) as exc:
                os.ftruncate(fd, size)
            assert exc.value.errno == errno.ENOSPC
            assert os.fstat(fd).st_size == 1 and blocks(path) == 1
        assert mnt.free_dpages() == TOTAL_DPAGES - 1
        os.ftruncate(fd, REGION)  # exactly the region: every dpage, as before
        assert blocks(path) == TOTAL_DPAGES
    finally:
        os.close(fd)
