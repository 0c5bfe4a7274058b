"""Random sequences of namespace and data operations, on dmemfs and on tmpfs side by side.

After every step both trees must agree (names, types, sizes, bytes, link
counts), and the pools' accounting must equal the dpages that the live files
hold (statfs used blocks == sum of st_blocks over distinct inodes).
"""

from __future__ import annotations

import ctypes
import errno
import hashlib
import itertools
import os
import shutil
import stat
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule, run_state_machine_as_test
from mounting import dmemfs, kernel_fs

pytestmark = pytest.mark.mount
DPAGE = 4096  # the mount below uses 4K dpages: many allocations and frees
NAMES = st.sampled_from(["a", "b", "c", "d/e", "d/f", "g/h", "d", "g"])
OFFSETS = st.integers(0, 80 * DPAGE)
SIZES = st.integers(0, 40 * DPAGE)
_counter = itertools.count()
_libc = ctypes.CDLL(None, use_errno=True)
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_long, ctypes.c_long]


def attempt(action: str, path: Path, *args: object) -> tuple[str, object]:
    """Run one os-level action; return ('ok', result) or ('err', errno)."""
    try:
        if action == "write":
            offset, data = args
            fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o644)
            try:
                return "ok", os.pwrite(fd, data, offset)  # type: ignore[arg-type]
            finally:
                os.close(fd)
        if action == "fallocate":
            mode, offset, length = args
            fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o644)
            try:
                if _libc.fallocate(fd, mode, offset, length) != 0:
                    raise OSError(ctypes.get_errno(), "fallocate")
            finally:
                os.close(fd)
        elif action == "truncate":
            os.truncate(path, args[0])  # type: ignore[arg-type]
        elif action == "unlink":
            os.unlink(path)
        elif action == "mkdir":
            os.mkdir(path)
        elif action == "rmdir":
            os.rmdir(path)
        elif action == "rename":
            os.rename(path, args[0])  # type: ignore[arg-type]
        elif action == "link":
            os.link(path, args[0])  # type: ignore[arg-type]
        return "ok", None
    except OSError as exc:
        return "err", errno.errorcode.get(exc.errno or 0, exc.errno)


def snapshot(root: Path) -> dict[str, tuple[object, ...]]:
    out: dict[str, tuple[object, ...]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            st_ = os.lstat(path)
            rel = str(path.relative_to(root))
            if stat.S_ISDIR(st_.st_mode):
                out[rel] = ("dir", st_.st_nlink)
            else:
                digest = hashlib.sha256(path.read_bytes()).hexdigest()
                out[rel] = ("file", st_.st_size, st_.st_nlink, digest)
    return out


class TwoTrees(RuleBasedStateMachine):
    """The same operations on a dmemfs directory and a tmpfs directory."""

    dmem_root: Path
    tmpfs_root: Path
    mount: Path

    def __init__(self) -> None:
        super().__init__()
        case = f"case{next(_counter)}"
        self.dirs = (self.dmem_root / case, self.tmpfs_root / case)
        for d in self.dirs:
            d.mkdir()

    def both(self, action: str, name: str, *args: object) -> None:
        results = []
        for d in self.dirs:
            extra = [d / a if isinstance(a, str) else a for a in args]
            results.append(attempt(action, d / name, *extra))
        assert results[0] == results[1], f"{action} {name} {args}: {results}"

    @rule(name=NAMES, offset=OFFSETS, size=SIZES, byte=st.integers(1, 255))
    def write(self, name: str, offset: int, size: int, byte: int) -> None:
        self.both("write", name, offset, bytes([byte]) * size)

    @rule(name=NAMES, mode=st.sampled_from([0, 1, 3]), offset=OFFSETS,
          length=st.integers(1, 40 * DPAGE))
    def fallocate(self, name: str, mode: int, offset: int, length: int) -> None:
        """Allocate (0), allocate past EOF (KEEP_SIZE) or punch a hole (PUNCH|KEEP)."""
        self.both("fallocate", name, mode, offset, length)

    @rule(name=NAMES, size=st.integers(0, 100 * DPAGE))
    def truncate(self, name: str, size: int) -> None:
        self.both("truncate", name, size)

    @rule(name=NAMES)
    def unlink(self, name: str) -> None:
        self.both("unlink", name)

    @rule(name=NAMES)
    def mkdir(self, name: str) -> None:
        self.both("mkdir", name)

    @rule(name=NAMES)
    def rmdir(self, name: str) -> None:
        self.both("rmdir", name)

    @rule(src=NAMES, dst=NAMES)
    def rename(self, src: str, dst: str) -> None:
        self.both("rename", src, dst)

    @rule(src=NAMES, dst=NAMES)
    def link(self, src: str, dst: str) -> None:
        self.both("link", src, dst)

    @invariant()
    def trees_agree(self) -> None:
        assert snapshot(self.dirs[0]) == snapshot(self.dirs[1])

    @invariant()
    def accounting_matches_files(self) -> None:
        seen: dict[int, int] = {}
        for dirpath, _, filenames in os.walk(self.mount):
            for name in filenames:
                st_ = os.lstat(Path(dirpath) / name)
                seen[st_.st_ino] = st_.st_blocks
        vfs = os.statvfs(self.mount)
        used_dpages = vfs.f_blocks - vfs.f_bfree
        assert used_dpages * (DPAGE // 512) == sum(seen.values())

    def teardown(self) -> None:
        for d in self.dirs:
            shutil.rmtree(d)


@pytest.mark.parametrize("persistent", [False, True], ids=["memfd", "persistent"])
@pytest.mark.parametrize("path", ["passthrough", "region"])
def test_random_operations_match_tmpfs(tmp_path: Path, persistent: bool, path: str) -> None:
    """The persistent variant runs the same machine with the journal written on every
    request (restarts are tested in test_crash.py and, on the passthrough path, whose
    journal is for the daemon that replaces a dead one, in test_passthrough.py)."""
    region = Path("/dev/shm") / f"dmemfs-oracle-{os.getpid()}"
    if path == "passthrough":
        options = "size=32M,pagesize=4K,passthrough=on" + ("" if persistent else ",meta=none")
    else:
        options = f"size=32M,pagesize=4K,region={region if persistent else 'memfd'}"
    try:
        with dmemfs(tmp_path, options) as mount, \
                kernel_fs(tmp_path / "tmpfs", "tmpfs", "size=64M") as oracle:
            TwoTrees.dmem_root, TwoTrees.tmpfs_root, TwoTrees.mount = (mount.path, oracle,
                                                                       mount.path)
            run_state_machine_as_test(TwoTrees, settings=settings(
                max_examples=40, stateful_step_count=30, deadline=None,
                suppress_health_check=list(HealthCheck)))
        assert mount.exit_code == 0, mount.log()
    finally:
        for leftover in region.parent.glob(region.name + "*"):
            leftover.unlink()
