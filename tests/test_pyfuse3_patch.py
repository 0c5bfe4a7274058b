"""The pyfuse3 patch on its own (patches/pyfuse3): a tiny filesystem (passfs.py) passes a
memfd-backed file through, and its own request counts prove that read, write and a
MAP_SHARED mapping never reach it, and that the mapping adds no page cache of its own.
The same filesystem without passthrough is the control: there every byte is a request
and the FUSE file has a page cache of its own."""

from __future__ import annotations

import ctypes
import json
import mmap
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pyfuse3
import pytest
import trio
from mounting import is_mounted, unmount

from dmemfs_fuse.adapter import connection

pytestmark = pytest.mark.mount

HERE = Path(__file__).parent
M = 1 << 20
PAGE = 4096
SYS_CACHESTAT = 451  # x86_64, Linux 6.5+


class CachestatRange(ctypes.Structure):
    _fields_ = [("off", ctypes.c_uint64), ("len", ctypes.c_uint64)]


class Cachestat(ctypes.Structure):
    _fields_ = [(name, ctypes.c_uint64) for name in
                ("nr_cache", "nr_dirty", "nr_writeback", "nr_evicted", "nr_recently_evicted")]


def cached_pages(fd: int) -> int:
    """Pages of *fd*'s file in the page cache (cachestat(2)): its own mapping's, not the
    file it may pass through to."""
    libc = ctypes.CDLL(None, use_errno=True)
    out = Cachestat()
    whole = CachestatRange(0, 0)
    if libc.syscall(SYS_CACHESTAT, fd, ctypes.byref(whole), ctypes.byref(out), 0) != 0:
        raise OSError(ctypes.get_errno(), "cachestat")
    return int(out.nr_cache)


@contextmanager
def passfs(tmp_path: Path, *flags: str) -> Iterator[tuple[Path, Path, dict[str, Any]]]:
    """Mount passfs; yield (mountpoint, the daemon's memfd as /proc/PID/fd/N, its report),
    the report filled in after the unmount."""
    mnt, report = tmp_path / "mnt", tmp_path / "report.json"
    mnt.mkdir()
    log = open(tmp_path / "passfs.log", "wb")  # noqa: SIM115 - closed below
    proc = subprocess.Popen([sys.executable, str(HERE / "passfs.py"), str(mnt), str(report),
                             *flags], stdout=log, stderr=subprocess.STDOUT)
    result: dict[str, Any] = {}
    try:
        deadline = time.monotonic() + 30
        while not (is_mounted(mnt, "fuse.passfs") and Path(f"{report}.ready").exists()):
            assert proc.poll() is None, (tmp_path / "passfs.log").read_text()
            assert time.monotonic() < deadline, "passfs did not mount"
            time.sleep(0.05)
        os.stat(mnt)  # waits for INIT
        pid, fd = Path(f"{report}.ready").read_text().split()
        yield mnt, Path(f"/proc/{pid}/fd/{fd}"), result
    finally:
        assert unmount(mnt, proc, "fuse.passfs") == 0, (tmp_path / "passfs.log").read_text()
        log.close()
    result.update(json.loads(report.read_text()))


def exercise(mnt: Path, memfd: Path) -> tuple[int, int]:
    """pwrite and pread 4 MiB, then write and read 8 MiB through a MAP_SHARED mapping; check
    every byte, in the file and in the daemon's memfd.  Returns (page cache pages of the
    FUSE file, of the memfd) while the file is still open."""
    data = os.urandom(4 * M)
    pattern = os.urandom(8 * M)
    fd = os.open(mnt / "data", os.O_RDWR)
    try:
        assert os.pwrite(fd, data, 0) == len(data)
        assert os.pread(fd, len(data), 0) == data
        with mmap.mmap(fd, len(pattern), flags=mmap.MAP_SHARED, offset=16 * M) as area:
            area[:] = pattern
            area.flush()
            assert area[:] == pattern
        fuse_pages = cached_pages(fd)
        with open(memfd, "rb") as backing:
            assert os.pread(backing.fileno(), len(data), 0) == data
            assert os.pread(backing.fileno(), len(pattern), 16 * M) == pattern
            backing_pages = cached_pages(backing.fileno())
    finally:
        os.close(fd)
    return fuse_pages, backing_pages


def test_a_passed_through_file_never_reaches_the_daemon(tmp_path: Path) -> None:
    with passfs(tmp_path) as (mnt, memfd, report):
        fuse_pages, backing_pages = exercise(mnt, memfd)
    counts = report["counts"]
    assert counts.get("read", 0) == 0 and counts.get("write", 0) == 0, counts
    assert counts["open"] == counts["backing_open"] == counts["backing_close"] >= 1, counts
    assert report["conn"]["want"] & pyfuse3.FUSE_CAP_PASSTHROUGH
    # The mapping is the memfd's: the FUSE file has no page cache, and the memfd holds
    # just the 12 MiB that were written.
    assert fuse_pages == 0
    assert backing_pages == 12 * M // PAGE


def test_without_passthrough_every_byte_is_a_request(tmp_path: Path) -> None:
    """The control: the same filesystem and client, no backing id."""
    with passfs(tmp_path, "--no-passthrough") as (mnt, memfd, report):
        fuse_pages, backing_pages = exercise(mnt, memfd)
    counts = report["counts"]
    assert counts["read"] >= 1 and counts["write"] >= 1, counts
    assert counts.get("backing_open", 0) == 0
    assert not report["conn"]["want"] & pyfuse3.FUSE_CAP_PASSTHROUGH
    assert fuse_pages >= 12 * M // PAGE  # a page-cache copy beside the memfd's pages
    assert backing_pages == 12 * M // PAGE


def test_connection_info_refuses_what_was_not_offered() -> None:
    """Asking for a capability the kernel did not offer would fail INIT: the setter
    refuses it, and nothing can be changed once INIT is answered."""
    seen: dict[str, Any] = {}

    class Probe(pyfuse3.Operations):
        def init_connection(self, conn: pyfuse3.ConnectionInfo) -> None:
            unoffered = ~conn.capable & 0xFFFFFFFF
            try:
                conn.want = conn.want | (unoffered & -unoffered)
            except ValueError as exc:
                seen["refused"] = str(exc)
            seen["conn"] = conn

        def init(self) -> None:
            pyfuse3.terminate()  # INIT is answered: the main loop may end

    ops = Probe()
    with tempfile.TemporaryDirectory() as where:
        pyfuse3.init(ops, where, {"fsname=probe"})
        try:
            trio.run(pyfuse3.main)
        finally:
            pyfuse3.close(unmount=True)
    assert "not offered" in seen["refused"]
    with pytest.raises(RuntimeError, match="only be changed"):
        seen["conn"].want = 0
    assert connection.library_version() == pyfuse3.libfuse_version()
