"""fallocate(2) and SEEK_DATA/SEEK_HOLE on real mounts, on both data paths, with tmpfs as
the oracle for what it answers: allocation all or nothing, punched holes that give their
dpages back at once and read as zeros (through a mapping too), the modes tmpfs refuses
refused alike, and holes that survive a kill -9."""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from mounting import Mount, dmemfs, kernel_fs, path_options

MIB = 1 << 20
DPAGE = 2 * MIB
TOTAL = 32  # dpages of the mnt fixture
KEEP_SIZE, PUNCH_HOLE = 0x01, 0x02
COLLAPSE_RANGE, ZERO_RANGE, INSERT_RANGE, UNSHARE_RANGE = 0x08, 0x10, 0x20, 0x40

_libc = ctypes.CDLL(None, use_errno=True)
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_long, ctypes.c_long]


def fallocate(fd: int, mode: int, offset: int, length: int) -> int:
    """0, or the errno fallocate(2) failed with."""
    return 0 if _libc.fallocate(fd, mode, offset, length) == 0 else ctypes.get_errno()


@pytest.fixture
def oracle(tmp_path: Path) -> Iterator[Path]:
    with kernel_fs(tmp_path / "tmpfs", "tmpfs", "size=64M") as path:
        yield path


def _both(mnt: Mount, oracle: Path, name: str, data: bytes) -> tuple[int, int]:
    """The same file on dmemfs and on tmpfs, open read-write."""
    fds = []
    for root in (mnt.path, oracle):
        (root / name).write_bytes(data)
        fds.append(os.open(root / name, os.O_RDWR))
    return fds[0], fds[1]


@pytest.mark.parametrize("mode", [PUNCH_HOLE, ZERO_RANGE, ZERO_RANGE | KEEP_SIZE,
                                  COLLAPSE_RANGE, INSERT_RANGE, UNSHARE_RANGE, 0x80])
def test_refused_modes_match_tmpfs(mnt: Mount, oracle: Path, mode: int) -> None:
    fd, ref = _both(mnt, oracle, "f", b"x" * (2 * DPAGE))
    try:
        want = fallocate(ref, mode, 0, DPAGE)
        assert want != 0
        assert fallocate(fd, mode, 0, DPAGE) == want
        assert fallocate(fd, 0, 0, 0) == fallocate(ref, 0, 0, 0) == errno.EINVAL
        assert os.fstat(fd).st_size == 2 * DPAGE and mnt.free_dpages() == TOTAL - 2
    finally:
        os.close(fd)
        os.close(ref)


def test_allocation_takes_dpages_all_or_nothing(mnt: Mount) -> None:
    path = mnt.path / "f"
    fd = os.open(path, os.O_RDWR | os.O_CREAT)
    try:
        before = os.fstat(fd)
        assert fallocate(fd, 0, 0, 5 * DPAGE - 10) == 0  # mode 0: the size follows
        st = os.fstat(fd)
        assert st.st_size == 5 * DPAGE - 10 and mnt.free_dpages() == TOTAL - 5
        assert st.st_mtime_ns >= before.st_mtime_ns
        assert fallocate(fd, KEEP_SIZE, 6 * DPAGE, 2 * DPAGE) == 0  # past EOF, as tmpfs
        assert os.fstat(fd).st_size == 5 * DPAGE - 10 and mnt.free_dpages() == TOTAL - 7
        assert fallocate(fd, 0, 0, 40 * DPAGE) == errno.ENOSPC
        assert os.fstat(fd).st_size == 5 * DPAGE - 10 and mnt.free_dpages() == TOTAL - 7
        assert os.pread(fd, 5 * DPAGE, 0) == bytes(5 * DPAGE - 10)
        os.ftruncate(fd, DPAGE)  # a shrink gives back what lay past EOF too
        assert mnt.free_dpages() == TOTAL - 1
    finally:
        os.close(fd)
    path.unlink()
    assert mnt.free_dpages() == TOTAL


def test_punch_hole_gives_dpages_back_at_once(mnt: Mount, oracle: Path) -> None:
    data = os.urandom(12 * DPAGE)
    fd, ref = _both(mnt, oracle, "f", data)
    try:
        lo, hi = DPAGE + 100, 4 * DPAGE + 50  # dpages 2 and 3 whole, 1 and 4 in part
        for handle in (fd, ref):
            assert fallocate(handle, PUNCH_HOLE | KEEP_SIZE, lo, hi - lo) == 0
        assert mnt.free_dpages() == TOTAL - 12 + 2  # statfs sees it at once
        want = data[:lo] + bytes(hi - lo) + data[hi:]
        assert os.pread(ref, len(data), 0) == want
        assert os.pread(fd, len(data), 0) == want
        assert os.fstat(fd).st_size == len(data)
        # Past EOF and over an existing hole: nothing to give back, nothing breaks.
        assert fallocate(fd, PUNCH_HOLE | KEEP_SIZE, 2 * DPAGE, 20 * DPAGE) == 0
        assert mnt.free_dpages() == TOTAL - 2
        assert os.pread(fd, len(data), 0) == data[:lo] + bytes(len(data) - lo)
    finally:
        os.close(fd)
        os.close(ref)


def test_a_mapping_of_a_punched_range_reads_zeros(mnt: Mount) -> None:
    path = mnt.path / "vm"
    path.write_bytes(b"\xa5" * (4 * DPAGE))
    fd = os.open(path, os.O_RDWR)
    try:
        with mmap.mmap(fd, 4 * DPAGE, mmap.MAP_SHARED) as area:
            assert area[DPAGE] == 0xA5
            assert fallocate(fd, PUNCH_HOLE | KEEP_SIZE, DPAGE, 2 * DPAGE) == 0
            assert area[DPAGE : 3 * DPAGE] == bytes(2 * DPAGE)
            assert area[0] == area[3 * DPAGE] == 0xA5
            area[DPAGE : DPAGE + 5] = b"again"  # the hole takes a dpage again
            area.flush()
        assert os.pread(fd, 5, DPAGE) == b"again"
    finally:
        os.close(fd)


def test_seek_data_and_hole_show_the_holes(mnt: Mount, tmp_path: Path) -> None:
    path = mnt.path / "sparse"
    fd = os.open(path, os.O_RDWR | os.O_CREAT)
    try:
        os.pwrite(fd, b"a", 0)
        os.pwrite(fd, b"b" * 10, 5 * DPAGE)
        size = 5 * DPAGE + 10
        hole = os.lseek(fd, 0, os.SEEK_HOLE)
        assert 0 < hole <= DPAGE and hole % 4096 == 0  # a page (tmpfs) or a dpage (region)
        assert os.lseek(fd, 100, os.SEEK_DATA) == 100
        assert os.lseek(fd, DPAGE, os.SEEK_DATA) == 5 * DPAGE
        assert os.lseek(fd, 5 * DPAGE, os.SEEK_HOLE) == size  # EOF is a hole
        for whence in (os.SEEK_DATA, os.SEEK_HOLE):
            with pytest.raises(OSError) as err:
                os.lseek(fd, size, whence)
            assert err.value.errno == errno.ENXIO
    finally:
        os.close(fd)
    copy = tmp_path / "copy"
    subprocess.run(["cp", "--sparse=always", str(path), str(copy)], check=True)
    assert copy.read_bytes() == path.read_bytes()
    assert copy.stat().st_blocks * 512 < 2 * DPAGE  # the holes were seen, not copied
    copy.unlink()


@pytest.mark.parametrize("path", ["region", "passthrough"])
def test_a_punched_hole_survives_kill_9(tmp_path: Path, path: str) -> None:
    region = Path("/dev/shm") / f"dmemfs-punch-{os.getpid()}"
    options = (f"size=64M,pagesize=2M,region={region}" if path == "region"
               else f"size=64M,pagesize=2M,{path_options(path)}")
    data = os.urandom(8 * DPAGE)
    try:
        with dmemfs(tmp_path, options) as mount:
            (mount.path / "f").write_bytes(data)
            fd = os.open(mount.path / "f", os.O_RDWR)
            try:
                assert fallocate(fd, PUNCH_HOLE | KEEP_SIZE, 2 * DPAGE, 3 * DPAGE) == 0
            finally:
                os.close(fd)
            assert mount.free_dpages() == TOTAL - 5
            mount.proc.kill()
            mount.proc.wait()
        with dmemfs(tmp_path, options) as mount:
            assert mount.free_dpages() == TOTAL - 5
            want = data[:2 * DPAGE] + bytes(3 * DPAGE) + data[5 * DPAGE:]
            assert (mount.path / "f").read_bytes() == want
            (mount.path / "f").unlink()
    finally:
        for leftover in region.parent.glob(region.name + "*"):
            if leftover.is_dir():
                shutil.rmtree(leftover)
            else:
                leftover.unlink()


def test_a_dpage_punched_in_pieces_goes_back(mnt: Mount, oracle: Path) -> None:
    """A balloon gives 4 KiB pages back, one punch each: once every piece of a 2 MiB
    dpage is punched, the dpage is free again, while its neighbours keep their bytes."""
    data = os.urandom(3 * DPAGE)
    fd, ref = _both(mnt, oracle, "f", data)
    try:
        for offset in range(DPAGE, 2 * DPAGE, 4096):
            for handle in (fd, ref):
                assert fallocate(handle, PUNCH_HOLE | KEEP_SIZE, offset, 4096) == 0
            if offset < 2 * DPAGE - 4096:
                assert mnt.free_dpages() == TOTAL - 3
        assert mnt.free_dpages() == TOTAL - 2
        want = data[:DPAGE] + bytes(DPAGE) + data[2 * DPAGE:]
        assert os.pread(fd, len(data), 0) == os.pread(ref, len(data), 0) == want
    finally:
        os.close(fd)
        os.close(ref)

