"""Memory errors: bad dpages are never handed out again, the owning file answers EIO
(through read and through its mappings) until the range is truncated away or overwritten
whole, and all of it survives a restart.  The kernel's paths are tested as far as a
kernel without CONFIG_MEMORY_FAILURE allows: the HWPOISON scan against fake
pagemap/kpageflags files and against the real ones, and the SIGBUS notice through the
daemon's signalfd."""

from __future__ import annotations

import errno
import json
import os
import select
import signal
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from mounting import Mount, dmemctl, dmemfs, free_port, metrics, status

from dmemfs_fuse.alloc.pool import Pool
from dmemfs_fuse.alloc.poolset import PoolSet
from dmemfs_fuse.errors import AllocatorError
from dmemfs_fuse.files.extents import FileExtents
from dmemfs_fuse.files.store import FileStore
from dmemfs_fuse.memory import numa
from dmemfs_fuse.memory.hwpoison import (
    BUS_MCEERR_AO,
    KPF_HWPOISON,
    PAGE_SIZE,
    hwpoisoned_dpages,
    open_sigbus_fd,
    parse_sigbus,
    send_mce_notice,
)
from dmemfs_fuse.memory.region import PoolSpec, Region, RegionPlan

DPS = 4096
M = 1 << 20


# -- the plain layers ------------------------------------------------------------------

def test_bad_dpage_leaves_the_free_runs_for_good() -> None:
    pool = Pool(0, 0, 0, 16, DPS)
    assert pool.mark_bad(5) is True  # free: out of service at once
    assert pool.avail == 15 and pool.statistics().bad_dpages == 1
    got = pool.alloc(15)
    assert all(not (e.start <= 5 < e.end) for e in got)
    for ext in got:
        pool.free(ext.start, ext.length)
    pool.check()
    ext = pool.alloc(3, goal=8)[0]
    assert pool.mark_bad(9) is False  # allocated: stays with its owner
    pool.free(ext.start, ext.length)  # the owner lets go: 9 stays out
    assert pool.avail == 14
    assert not any(r.start <= 9 < r.end for r in pool.free_runs())
    pool.check()
    with pytest.raises(AllocatorError):
        pool.claim(9, 1)


@pytest.fixture
def store() -> Iterator[FileStore]:
    plan = RegionPlan(pools=(PoolSpec(0, 32 * DPS),), dpage_size=DPS, backend="memfd")
    region = Region.open(plan)
    try:
        yield FileStore(region, PoolSet.from_plan(plan, 0))
    finally:
        region.close()


def test_read_eio_partial_write_eio_whole_write_moves(store: FileStore) -> None:
    fx = FileExtents()
    size, _ = store.write(fx, 0, 0, b"a" * (4 * DPS))
    bad = fx.runs()[0][1] + 2
    store.pools.mark_bad(bad)
    assert store.read(fx, size, 0, DPS) == b"a" * DPS  # other dpages read fine
    for off, length in ((2 * DPS, 1), (DPS, 2 * DPS), (3 * DPS - 1, 2)):
        with pytest.raises(OSError) as info:
            store.read(fx, size, off, length)
        assert info.value.errno == errno.EIO
    with pytest.raises(OSError) as info:
        store.write(fx, size, 2 * DPS + 10, b"x")
    assert info.value.errno == errno.EIO
    store.write(fx, size, 2 * DPS - 5, b"b" * (DPS + 10))  # covers dpage 2 whole
    assert bytes(store.read(fx, size, 0, size)) == (b"a" * (2 * DPS - 5) + b"b" * (DPS + 10)
                                                   + b"a" * (DPS - 5))
    assert bad not in [r + i for _, r, n in fx.runs() for i in range(n)]
    assert store.pools.free_dpages == 32 - 4 - 1


def test_moving_off_a_bad_dpage_is_all_or_nothing(store: FileStore) -> None:
    fx = FileExtents()
    size, _ = store.write(fx, 0, 0, b"a" * (32 * DPS))  # the pool is full
    bad = fx.runs()[0][1] + 7
    store.pools.mark_bad(bad)
    with pytest.raises(OSError) as info:
        store.write(fx, size, 7 * DPS, b"b" * DPS)
    assert info.value.errno == errno.ENOSPC
    with pytest.raises(OSError) as info:  # still bad, not a hole of zeros
        store.read(fx, size, 7 * DPS, DPS)
    assert info.value.errno == errno.EIO
    store.resize(fx, size, 7 * DPS)  # truncated away: the file is healthy again
    assert store.read(fx, 7 * DPS, 0, 7 * DPS) == b"a" * (7 * DPS)
    assert store.pools.free_dpages == 32 - 7 - 1


def test_scan_finds_hwpoison_frames(tmp_path: Path) -> None:
    """A fake pagemap and kpageflags in the kernel's formats: the scan maps flagged frames
    back to dpages, skips absent pages, and reads scattered frames correctly."""
    pages, dpage = 64, 4 * PAGE_SIZE
    pfns = [1000 + i if i < 32 else 90_000 + 3 * i for i in range(pages)]
    pagemap = bytearray()
    for i, pfn in enumerate(pfns):
        if i == 20:
            entry = 0  # not present, not swapped: nothing to check
        elif i == 37:
            # memory_failure() unmapped it: a hwpoison swap entry, type | pfn << 5
            entry = (1 << 62) | (pfn << 5) | 23
        else:
            entry = (1 << 63) | pfn
        pagemap += struct.pack("<Q", entry)
    flags = {pfns[9]: 1 << KPF_HWPOISON, pfns[20]: 1 << KPF_HWPOISON,
             pfns[37]: 1 << KPF_HWPOISON,
             pfns[50]: (1 << KPF_HWPOISON) | 1, pfns[51]: 1 << 5}
    kpf = bytearray(8 * (max(pfns) + 1))
    for pfn, value in flags.items():
        struct.pack_into("<Q", kpf, 8 * pfn, value)
    (tmp_path / "pagemap").write_bytes(bytes(pagemap))
    (tmp_path / "kpageflags").write_bytes(bytes(kpf))
    bad, checked = hwpoisoned_dpages(0, pages * PAGE_SIZE, dpage, str(tmp_path / "pagemap"),
                                     str(tmp_path / "kpageflags"))
    assert bad == [9 // 4, 37 // 4, 50 // 4] and checked == pages - 1
    # frames past the end of kpageflags (device memory beyond max_pfn) read as no flags
    short = bytes(kpf[: 8 * 90_120])  # ends between pfns[37] and pfns[50]
    (tmp_path / "kpageflags").write_bytes(short)
    bad, _ = hwpoisoned_dpages(0, pages * PAGE_SIZE, dpage, str(tmp_path / "pagemap"),
                               str(tmp_path / "kpageflags"))
    assert bad == [9 // 4, 37 // 4]


def test_scan_of_a_real_mapping_reads_real_frames() -> None:
    plan = RegionPlan(pools=(PoolSpec(0, 64 * DPS),), dpage_size=DPS, backend="memfd")
    region = Region.open(plan)
    try:
        bad, checked = hwpoisoned_dpages(region.addr, region.size, DPS)
        assert (bad, checked) == ([], 64)  # populated and locked: every page has a frame
    finally:
        region.close()
    assert numa.online_nodes()


def test_a_notice_in_the_kernels_format_comes_through_a_signalfd() -> None:
    """send_mce_notice queues the siginfo the kernel's memory-failure code sends; the
    signalfd must hand back its code, address and granularity."""
    old = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGBUS})
    fd = open_sigbus_fd()
    try:
        send_mce_notice(0x7F00_1234_5000)
        readable, _, _ = select.select([fd], [], [], 10)
        assert readable, "no SIGBUS arrived on the signalfd"
        assert parse_sigbus(os.read(fd, 128)) == (BUS_MCEERR_AO, 0x7F00_1234_5000,
                                                  PAGE_SIZE.bit_length() - 1)
    finally:
        os.close(fd)
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def test_write_over_a_bad_dpage_and_a_hole_is_all_or_nothing(store: FileStore) -> None:
    """The move off a bad dpage and the allocation of a hole are one step: when the
    pools cannot give both, the bad dpage stays where it was (EIO, not zeros)."""
    fx = FileExtents()
    size, _ = store.write(fx, 0, 0, b"a" * DPS)  # file dpage 0
    store.write(FileExtents(), 0, 0, b"f" * (30 * DPS))  # another file leaves one free dpage
    store.pools.mark_bad(fx.runs()[0][1])
    assert store.pools.free_dpages == 1
    with pytest.raises(OSError) as info:  # dpage 0 (bad) and dpage 1 (a hole): two wanted
        store.write(fx, size, 0, b"b" * (2 * DPS))
    assert info.value.errno == errno.ENOSPC
    with pytest.raises(OSError) as info:
        store.read(fx, size, 0, DPS)
    assert info.value.errno == errno.EIO
    assert store.pools.free_dpages == 1


def test_a_shrink_never_writes_into_a_bad_dpage(store: FileStore) -> None:
    fx = FileExtents()
    size, _ = store.write(fx, 0, 0, b"a" * (2 * DPS))
    bad = fx.runs()[0][1] + 1
    store.pools.mark_bad(bad)
    store.region.array[bad * DPS : (bad + 1) * DPS] = 7  # stands for memory we must not touch
    store.resize(fx, size, DPS + 10)
    assert (store.region.array[bad * DPS : (bad + 1) * DPS] == 7).all()


# -- end to end, through dmemctl ---------------------------------------------------------


@pytest.fixture
def region() -> Iterator[Path]:
    path = Path("/dev/shm") / f"dmemfs-poison-{os.getpid()}"
    yield path
    for leftover in path.parent.glob(path.name + "*"):
        leftover.unlink()


def mapped_read(path: Path, offset: int) -> int:
    """Read one byte through a MAP_SHARED mapping in a child; its exit status (or -signal)."""
    code = ("import mmap, os, sys\n"
            f"fd = os.open({str(path)!r}, os.O_RDONLY)\n"
            "m = mmap.mmap(fd, 0, mmap.MAP_SHARED, mmap.PROT_READ)\n"
            f"sys.exit(m[{offset}] * 0)\n")
    return subprocess.run([sys.executable, "-c", code], timeout=60, check=False).returncode


@pytest.mark.mount
def test_operator_poison_end_to_end_and_across_restart(tmp_path: Path, region: Path) -> None:
    options = f"size=16M,pagesize=4K,region={region}"
    port = free_port()
    with dmemfs(tmp_path, f"{options},metrics={port}") as mount:
        f = mount.path / "f"
        f.write_bytes(os.urandom(64 * 1024))
        assert mapped_read(f, 8192) == 0  # the page is in the page cache now
        out = dmemctl("-m", str(mount.path), "poison", f"{f}:8192").stdout
        assert "marked bad" in out and "answers EIO at file offset 8192" in out
        fd = os.open(f, os.O_RDONLY)
        try:
            assert len(os.pread(fd, 4096, 4096)) == 4096
            with pytest.raises(OSError) as info:
                os.pread(fd, 4096, 8192)
            assert info.value.errno == errno.EIO
        finally:
            os.close(fd)
        assert mapped_read(f, 8192) == -signal.SIGBUS  # the cached copy was dropped
        assert mapped_read(f, 4096) == 0
        st = status(mount)
        assert (st["bad_dpages"], st["memory_errors"]) == (1, 1)
        assert st["pools"][0]["bad_dpages"] == 1
        bad_dpage = json.loads(dmemctl("-m", str(mount.path), "--json", "extents",
                                       str(f)).stdout)["extents"][0]["region_offset"] // 4096 + 2
        # poisoning a free dpage by region offset takes it out of service at once
        free_before = mount.free_dpages()
        dmemctl("-m", str(mount.path), "poison", str(15 * M))
        assert mount.free_dpages() == free_before - 1
        again = dmemctl("-m", str(mount.path), "poison", str(15 * M)).stdout
        assert "already bad" in again
        values = metrics(port)
        assert values['dmemfs_pool_bad_dpages{node="0",pool="0"}'] == 2
        assert values["dmemfs_memory_errors_total"] == 2
        assert values["dmemfs_journal_healthy"] == 1
        assert values["dmemfs_journal_log_bytes"] > 0
    assert mount.exit_code == 0
    with dmemfs(tmp_path, options) as mount:
        f = mount.path / "f"
        st = status(mount)
        assert st["bad_dpages"] == 2
        with pytest.raises(OSError) as info:  # still EIO after the restart
            f.read_bytes()
        assert info.value.errno == errno.EIO
        # overwriting the dpage whole moves the file to good memory
        with open(f, "r+b") as out_file:
            out_file.seek(8192)
            out_file.write(b"z" * 4096)
        assert f.read_bytes()[8192:12288] == b"z" * 4096
        # fill the filesystem: the two bad dpages are never handed out
        filler = mount.path / "all"
        with open(filler, "wb") as out_file:
            out_file.truncate(mount.free_dpages() * 4096)
        assert mount.free_dpages() == 0
        used: set[int] = set()
        for path in (f, filler):
            for ext in json.loads(dmemctl("-m", str(mount.path), "--json", "extents",
                                          str(path)).stdout)["extents"]:
                start = ext["region_offset"] // 4096
                used.update(range(start, start + ext["length"] // 4096))
        assert bad_dpage not in used and 15 * M // 4096 not in used
        assert len(used) == 4096 - 2
    assert mount.exit_code == 0


@pytest.mark.mount
def test_kernel_notice_and_scan_through_the_daemon(tmp_path: Path) -> None:
    with dmemfs(tmp_path, "size=16M,pagesize=4K,region=memfd") as mount:
        assert "HWPOISON scan: 4096 frames checked, 0 bad dpages found" in mount.log()
        f = mount.path / "g"
        f.write_bytes(b"q" * 8192)
        offset = json.loads(dmemctl("-m", str(mount.path), "--json", "extents",
                                    str(f)).stdout)["extents"][0]["region_offset"]
        dmemctl("-m", str(mount.path), "poison", "--kernel", str(offset + 4096))
        deadline = time.monotonic() + 10
        while status(mount)["bad_dpages"] != 1:
            assert time.monotonic() < deadline, "the SIGBUS notice was not handled"
            time.sleep(0.05)
        assert "memory error (kernel)" in mount.log()
        with pytest.raises(OSError) as info:
            f.read_bytes()
        assert info.value.errno == errno.EIO
        scan = json.loads(dmemctl("-m", str(mount.path), "--json", "scan").stdout)
        assert scan == {"frames_checked": 4096, "bad": []}
    assert mount.exit_code == 0


@pytest.mark.mount
@pytest.mark.parametrize(("args", "message"), [
    (["poison", "lots"], "is not a byte offset"),
    (["poison", "-5"], "is not a byte offset"),
    (["poison", "{mnt}/f:1M"], "outside the file"),
    (["poison", "{mnt}/hole:0"], "in a hole"),
    (["poison", "--kernel", "{mnt}/f:0"], "takes a region offset"),
    (["poison", "64M"], "outside the region"),
    (["poison", "--kernel", "64M"], "outside the region"),
    (["poison", "{mnt}/d:0"], "not a regular file"),
])
@pytest.mark.region_only("on passthrough every poison request is refused, with its reason "
                         "(test_passthrough)")
def test_bad_poison_arguments_are_refused(mnt: Mount, args: list[str], message: str) -> None:
    (mnt.path / "f").write_bytes(b"x" * 100)
    with open(mnt.path / "hole", "wb") as f:  # dpage 0 is a hole, dpage 2 holds the byte
        f.seek(4 * M)
        f.write(b"x")
    (mnt.path / "d").mkdir(exist_ok=True)
    args = [a.replace("{mnt}", str(mnt.path)) for a in args]
    result = dmemctl("-m", str(mnt.path), *args, check=False)
    assert result.returncode != 0 and message in result.stderr, result.stderr
    assert status(mnt)["bad_dpages"] == 0
