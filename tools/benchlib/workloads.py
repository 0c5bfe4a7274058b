"""The workloads of issue #6, each run on one fresh mount and returning its numbers.

A workload lists its *variants* (the filesystems, or pool sizes and dpages,
it compares), its metrics and its targets.  The harness mounts one variant at
a time, fresh, alternating them round by round, and calls ``run``.
Nothing here asserts on time: numbers are measured and reported, never judged
by an exception.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import mmap
import os
import random
import re
import shutil
import subprocess
import time
import tracemalloc
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np

from .machine import GIB, KIB, MIB, drop_caches, mem_available
from .mounts import REPO, MountInfo

PAGE = 4096
HUGE_2M = 2 * MIB
DPAGE_BYTES = {"4K": 4 * KIB, "2M": 2 * MIB, "1G": GIB}
PREALLOC_TOOL = REPO / "tools" / "bench-prealloc"


@dataclass(frozen=True)
class Params:
    """Sizes and counts for one run (``--quick`` shrinks them)."""

    data_size: int = GIB
    rand_ops: int = 20000
    meta_files: int = 10000
    alloc_pools: tuple[int, ...] = (GIB, 4 * GIB, 16 * GIB)
    alloc_dpages: tuple[str, ...] = ("4K", "2M", "1G")
    alloc_reps: int = 5
    book_pools: tuple[int, ...] = (GIB, 4 * GIB, 16 * GIB)
    book_dpages: tuple[str, ...] = ("4K", "2M")
    dmemfs_pagesize: str = "2M"
    # Measure workload 7 on workload 6's mounts (set when both run): every 16 GiB
    # region is populated once instead of twice, which is most of the run's time.
    book_on_alloc_mounts: bool = False
    dmemfs_extra: str = ""
    seed: int = 6


QUICK = Params(data_size=128 * MIB, rand_ops=2000, meta_files=1000,
               alloc_pools=(256 * MIB, GIB), alloc_dpages=("4K", "2M", "1G"), alloc_reps=3,
               book_pools=(256 * MIB, GIB), book_dpages=("4K", "2M"))


@dataclass(frozen=True)
class Metric:
    """One number a workload reports."""

    key: str
    label: str
    unit: str
    higher_is_better: bool = True


@dataclass(frozen=True)
class Target:
    """A goal from the issue: ``dmemfs/peer >= ratio`` on *metric* (or an absolute check)."""

    metric: str
    peer: str | None
    ratio: float | None
    text: str


@dataclass
class Variant:
    """One thing to mount and measure: a filesystem with its options."""

    label: str
    kind: str  # dmemfs, tmpfs, hugetlbfs, plainfs
    options: str = ""
    memory: int = 0  # bytes this variant needs to be free before it is mounted
    hugepages_2m: int = 0  # 2M huge pages the harness must make free for it (hugetlbfs)
    skip: str | None = None  # why it is not measured at all
    info: dict[str, Any] = field(default_factory=dict)


@dataclass
class Workload:
    """A workload: variants, metrics, targets and the function that measures one mount."""

    name: str
    number: int
    title: str
    metrics: tuple[Metric, ...]
    targets: tuple[Target, ...]
    variants: Callable[[Params], list[Variant]]
    run: Callable[[Variant, MountInfo, Params], dict[str, float]]
    comparative: bool = True  # variants are peers of dmemfs (ratios make sense)
    note: str = ""


def _size(n: int) -> str:
    """A mount-option size: 1G, 64M, 4K."""
    for unit, suffix in ((GIB, "G"), (MIB, "M"), (KIB, "K")):
        if n % unit == 0:
            return f"{n // unit}{suffix}"
    return str(n)


def _human(n: float) -> str:
    for unit, suffix in ((GIB, "GiB"), (MIB, "MiB"), (KIB, "KiB")):
        if n >= unit:
            return f"{n / unit:g} {suffix}"
    return f"{n:g} B"


def _dmemfs_options(p: Params, size: int, pagesize: str | None = None,
                    path: str = "passthrough") -> str:
    """Options for a dmemfs of *size* on data *path*: ``passthrough`` (shmem, the default
    where it works; refused, not silently replaced, where it cannot) or ``region``
    (hugetlbfs pages reserved for it when the dpage is huge)."""
    pagesize = pagesize or p.dmemfs_pagesize
    dps = DPAGE_BYTES[pagesize]
    size = -(-size // dps) * dps
    opts = f"size={_size(size)},pagesize={pagesize}"
    if path == "passthrough":
        opts += ",passthrough=on"
    else:
        opts += ",passthrough=off" + (",reserve_hugepages" if pagesize != "4K" else "")
    return opts + (f",{p.dmemfs_extra}" if p.dmemfs_extra else "")


def _dmemfs_pair(p: Params, room: int, pagesize: str | None = None,
                 region_memory: int = 2) -> list[Variant]:
    """The passthrough path ("dmemfs", the default) and the region path ("dmemfs-region",
    whose mappings and reads cost a page-cache copy on top of the region)."""
    return [Variant("dmemfs", "dmemfs", _dmemfs_options(p, room, pagesize), memory=room),
            Variant("dmemfs-region", "dmemfs", _dmemfs_options(p, room, pagesize, "region"),
                    memory=region_memory * room)]


def _write_all(fd: int, buf: memoryview) -> None:
    done = 0
    while done < len(buf):
        done += os.write(fd, buf[done:])


def fill(path: str, size: int, block: bytes) -> None:
    """Write *path* to *size* bytes in writes of *block*, then fsync it."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        view = memoryview(block)
        for _ in range(size // len(block)):
            _write_all(fd, view)
        os.fsync(fd)
    finally:
        os.close(fd)


def read_all(path: str, block: int = MIB) -> tuple[float, int]:
    """Read all of *path* in reads of *block* bytes: (seconds, bytes read)."""
    buf = bytearray(block)
    total = 0
    started = time.perf_counter()
    fd = os.open(path, os.O_RDONLY)
    try:
        while n := os.readv(fd, [buf]):
            total += n
    finally:
        os.close(fd)
    return time.perf_counter() - started, total


def _mibps(nbytes: int, seconds: float) -> float:
    return nbytes / MIB / seconds if seconds > 0 else float("inf")


# -- 1. sequential ---------------------------------------------------------------------

def data_variants(p: Params) -> list[Variant]:
    """The mounts of the data workloads (sequential and random): dmemfs on both paths,
    tmpfs with and without huge pages, and plainfs."""
    room = p.data_size + 64 * MIB
    return [
        *_dmemfs_pair(p, room),
        Variant("tmpfs", "tmpfs", f"size={_size(room)}", memory=room),
        Variant("tmpfs-huge", "tmpfs", f"size={_size(room)},huge=always", memory=room),
        Variant("plainfs", "plainfs", memory=3 * room),
    ]


def _seq_run(v: Variant, m: MountInfo, p: Params) -> dict[str, float]:
    path = str(m.path / "seq")
    block = os.urandom(MIB)
    started = time.perf_counter()
    fill(path, p.data_size, block)  # 1 MiB writes, then fsync, then close
    write_s = time.perf_counter() - started
    drop_caches()
    cold_s, got = read_all(path)
    if got != p.data_size:
        raise RuntimeError(f"cold read returned {got} bytes, wrote {p.data_size}")
    warm_s, _ = read_all(path)
    return {
        "write_MiBps": _mibps(p.data_size, write_s),
        "cold_read_MiBps": _mibps(p.data_size, cold_s),
        "warm_read_MiBps": _mibps(p.data_size, warm_s),
    }


SEQ = Workload(
    "seq", 1, "Sequential write (1 MiB blocks, fsync) and read, cold and warm",
    (Metric("write_MiBps", "write + fsync", "MiB/s"),
     Metric("cold_read_MiBps", "read, cold cache", "MiB/s"),
     Metric("warm_read_MiBps", "read, warm cache", "MiB/s")),
    (Target("write_MiBps", "tmpfs", 0.8, "sequential write >= 0.8x tmpfs"),
     Target("cold_read_MiBps", "tmpfs", 1.0, "cold sequential read >= tmpfs")),
    data_variants, _seq_run,
    note="tmpfs has no backing store, so drop_caches cannot make its read cold: "
         "its 'cold' read is a page-cache read.",
)


# -- 2. random 4 KiB -------------------------------------------------------------------

def _direct_ok(path: str) -> bool:
    """Whether a 4 KiB O_DIRECT read at offset 0 works on *path*."""
    buf = mmap.mmap(-1, PAGE)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    except OSError:
        return False
    try:
        os.preadv(fd, [buf], 0)
        return True
    except OSError:
        return False
    finally:
        os.close(fd)


def _rand_run(v: Variant, m: MountInfo, p: Params) -> dict[str, float]:
    path = str(m.path / "rand")
    fill(path, p.data_size, os.urandom(MIB))
    blocks = p.data_size // PAGE
    rng = random.Random(p.seed)
    reads = [rng.randrange(blocks) * PAGE for _ in range(p.rand_ops)]
    writes = [rng.randrange(blocks) * PAGE for _ in range(p.rand_ops)]
    direct = _direct_ok(path)
    extra = os.O_DIRECT if direct else 0
    buf = mmap.mmap(-1, PAGE)  # page-aligned, as O_DIRECT wants
    drop_caches()
    fd = os.open(path, os.O_RDONLY | extra)
    try:
        started = time.perf_counter()
        for off in reads:
            os.preadv(fd, [buf], off)
        read_s = time.perf_counter() - started
    finally:
        os.close(fd)
    buf.write(b"\x5a" * PAGE)
    drop_caches()
    fd = os.open(path, os.O_WRONLY | extra)
    try:
        started = time.perf_counter()
        for off in writes:
            os.pwritev(fd, [buf], off)
        write_s = time.perf_counter() - started
    finally:
        os.close(fd)
    v.info["io_mode"] = "O_DIRECT" if direct else "cold cache (O_DIRECT refused)"
    return {
        "read_iops": p.rand_ops / read_s,
        "write_iops": p.rand_ops / write_s,
        "direct": 1.0 if direct else 0.0,
    }


RAND = Workload(
    "rand", 2, "Random 4 KiB reads and writes over the file (O_DIRECT where taken, else cold)",
    (Metric("read_iops", "random 4 KiB read", "IOPS"),
     Metric("write_iops", "random 4 KiB write", "IOPS"),
     Metric("direct", "O_DIRECT used (1) or cold cache (0)", "flag")),
    (Target("read_iops", "tmpfs", 0.7, "4 KiB random read >= 0.7x tmpfs"),
     Target("write_iops", "tmpfs", 0.5, "4 KiB random write >= 0.5x tmpfs"),
     Target("read_iops", "plainfs", 3.0, "4 KiB random read >= 3x plain pyfuse3"),
     Target("write_iops", "plainfs", 3.0, "4 KiB random write >= 3x plain pyfuse3")),
    data_variants, _rand_run,
)


# -- 3. mmap -----------------------------------------------------------------------------

def _mmap_variants(p: Params) -> list[Variant]:
    room = p.data_size + 64 * MIB
    return [
        *_dmemfs_pair(p, room, region_memory=3),
        Variant("tmpfs", "tmpfs", f"size={_size(room)}", memory=room),
        Variant("tmpfs-huge", "tmpfs", f"size={_size(room)},huge=always", memory=room),
        Variant("hugetlbfs", "hugetlbfs", f"pagesize=2M,size={_size(p.data_size)}",
                memory=p.data_size, hugepages_2m=p.data_size // HUGE_2M),
        Variant("plainfs", "plainfs", memory=4 * room),
    ]


def map_and_touch(fd: int, size: int, write: bool) -> tuple[float, float, int]:
    """Map *fd* shared, touch one byte of every page (write 0xA5, or read), msync if writing.

    Returns (seconds to fault in and touch, seconds for msync, sum of the bytes read).
    The mapping is gone when this returns or raises, so an interrupted run never holds
    the mount busy.
    """
    prot = mmap.PROT_READ | (mmap.PROT_WRITE if write else 0)
    started = time.perf_counter()
    mm = mmap.mmap(fd, size, mmap.MAP_SHARED, prot)
    array: np.ndarray[Any, Any] | None = None
    try:
        array = np.frombuffer(mm, dtype=np.uint8)
        total = 0
        if write:
            array[::PAGE] = 0xA5
        else:
            total = int(array[::PAGE].sum(dtype=np.uint64))
        faulted = time.perf_counter()
        if write:
            mm.flush()  # msync(MS_SYNC)
        return faulted - started, time.perf_counter() - faulted, total
    finally:
        array = None  # drop the exported buffer before closing the map
        mm.close()


def _mmap_run(v: Variant, m: MountInfo, p: Params) -> dict[str, float]:
    path = str(m.path / "map")
    size = p.data_size
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        os.ftruncate(fd, size)
        free_before = _mem_free()
        fault_s, msync_s, _ = map_and_touch(fd, size, write=True)
        added = free_before - _mem_free()
    finally:
        os.close(fd)
    # The file's own pages: dmemfs and hugetlbfs took them before the mapping (the pool,
    # the huge page pool); tmpfs and plainfs take them while it is touched.
    own = size if v.kind in ("dmemfs", "hugetlbfs") else 0
    drop_caches()
    fd = os.open(path, os.O_RDONLY)
    try:
        read_s, _, total = map_and_touch(fd, size, write=False)
    finally:
        os.close(fd)
    pages = size // PAGE
    if total != 0xA5 * pages:
        raise RuntimeError(f"read back {total}, expected {0xA5 * pages}: data lost through mmap")
    return {
        "write_fault_MiBps": _mibps(size, fault_s),
        "write_msync_MiBps": _mibps(size, fault_s + msync_s),
        "msync_s": msync_s,
        "read_fault_MiBps": _mibps(size, read_s),
        "host_GiB_per_GiB": (own + added) / size,
    }


def _mem_free() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemFree:"):
            return int(line.split()[1]) * KIB
    raise RuntimeError("no MemFree in /proc/meminfo")


MMAP = Workload(
    "mmap", 3, "mmap MAP_SHARED: fault in and write every page, msync; then read-only (cold)",
    (Metric("write_fault_MiBps", "fault in + write every page", "MiB/s"),
     Metric("write_msync_MiBps", "fault in + write + msync", "MiB/s"),
     Metric("msync_s", "msync alone", "s", higher_is_better=False),
     Metric("read_fault_MiBps", "read-only fault in, cold cache", "MiB/s"),
     Metric("host_GiB_per_GiB", "host memory per GiB mapped (file's pages + what the "
            "mapping added)", "GiB/GiB", higher_is_better=False)),
    (Target("write_fault_MiBps", "tmpfs", 1.0, "mmap write fault-in >= tmpfs"),
     Target("write_msync_MiBps", "tmpfs", 1.0, "mmap write fault-in + msync >= tmpfs"),
     Target("read_fault_MiBps", "tmpfs", 1.0, "mmap read fault-in >= tmpfs"),
     Target("host_GiB_per_GiB", None, 1.02,
            "host memory per GiB of mapped RAM <= 1.02 GiB (the file's own pages)")),
    _mmap_variants, _mmap_run,
    note="One byte is written (or read) per 4 KiB page, so the time is the faults, not a "
         "memset. The read-only pass checks every page's byte.",
)


# -- 4. guest (QEMU prealloc=on) ----------------------------------------------------------
# tools/bench-prealloc (written by another engineer) mounts tmpfs and dmemfs itself,
# alternates them and prints its medians as one "json: {...}" line; this workload runs
# it once and carries its numbers into the report.

GUEST_CONFIGS = ("tmpfs", "dmemfs", "dmemfs-region")
GUEST_SHARES = ("on", "off")


def _guest_variants(p: Params) -> list[Variant]:
    skip = None
    if not os.access(PREALLOC_TOOL, os.X_OK):
        skip = f"{PREALLOC_TOOL.relative_to(REPO)} is not there (yet)"
    elif shutil.which("qemu-system-x86_64") is None:
        skip = "qemu-system-x86_64 is not installed (tools/guest-image installs it)"
    return [Variant("bench-prealloc", "delegate", f"--size {_size(p.data_size)}",
                    memory=4 * p.data_size, skip=skip)]


def guest_key(share: str, config: str, what: str) -> str:
    """The flat metric key of one bench-prealloc number."""
    return f"{share}|{config}|{what}"


def _guest_run(v: Variant, m: MountInfo, p: Params) -> dict[str, float]:
    rounds = int(v.info.get("rounds", 5))
    argv = [str(PREALLOC_TOOL), "--size", _size(p.data_size), "--rounds", str(rounds)]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=3600, check=False,
                          stdin=subprocess.DEVNULL)
    v.info["command"] = " ".join(["tools/bench-prealloc", *argv[1:]])
    v.info["output"] = done.stdout[-4000:]
    if done.returncode != 0:
        raise RuntimeError(f"bench-prealloc exited {done.returncode}: "
                           f"{(done.stderr or done.stdout)[-400:]}")
    line = next((ln for ln in reversed(done.stdout.splitlines()) if ln.startswith("json:")), "")
    if not line:
        raise RuntimeError("bench-prealloc printed no json: line")
    summary = json.loads(line.removeprefix("json:"))
    out: dict[str, float] = {}
    for label, values in summary.items():
        share, _, config = label.partition(" ")
        for what, value in values.items():
            out[guest_key(share.removeprefix("share="), config, what)] = float(value)
    return out


GUEST = Workload(
    "guest", 4, "QEMU -mem-path prealloc=on start of a guest (tools/bench-prealloc)",
    tuple(Metric(guest_key(share, config, what), f"share={share} {config} {what}",
                 "s" if what.endswith("_s") else "x", higher_is_better=False)
          for share in GUEST_SHARES for config in GUEST_CONFIGS
          for what in ("ready_s", "total_s", "ratio_ready", "ratio_total")),
    (),
    _guest_variants, _guest_run, comparative=False,
    note="Delegated to tools/bench-prealloc, which mounts tmpfs and dmemfs itself and "
         "alternates them; 'ready' = QEMU's QMP greeting (every page preallocated), 'total' = "
         "until QEMU has exited; ratios are dmemfs time / tmpfs time (lower is better). "
         "dmemfs = the passthrough path, dmemfs-region = the region path (bdi tuned by the "
         "daemon). "
         "It has no hugetlbfs peer.",
)


# -- 5. metadata ---------------------------------------------------------------------------

def _meta_variants(p: Params) -> list[Variant]:
    # Small files: with 2 MiB dpages each non-empty file would hold 2 MiB, so 4K dpages.
    room = max(64 * MIB, -(-p.meta_files * 4 * KIB * 2 // MIB) * MIB)
    return [
        *_dmemfs_pair(p, room, "4K"),
        Variant("tmpfs", "tmpfs", f"size={_size(room)}", memory=room),
        Variant("plainfs", "plainfs", memory=room),
    ]


def meta_run(v: Variant, m: MountInfo, p: Params) -> dict[str, float]:
    """The metadata workload (create, stat, rename, unlink of many small files) on *m*."""
    n = p.meta_files
    top = m.path / "meta"
    top.mkdir()
    names = [f"f{i:06d}" for i in range(n)]
    moved = [f"g{i:06d}" for i in range(n)]
    payload = b"x" * 64
    out: dict[str, float] = {}
    dfd = os.open(top, os.O_RDONLY | os.O_DIRECTORY)
    try:
        started = time.perf_counter()
        for name in names:
            fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644, dir_fd=dfd)
            os.write(fd, payload)
            os.close(fd)
        out["create_ops"] = n / (time.perf_counter() - started)
        started = time.perf_counter()
        for name in names:
            os.stat(name, dir_fd=dfd)
        out["stat_ops"] = n / (time.perf_counter() - started)
        os.close(dfd)
        drop_caches()
        dfd = os.open(top, os.O_RDONLY | os.O_DIRECTORY)
        started = time.perf_counter()
        for name in names:
            os.stat(name, dir_fd=dfd)
        out["stat_cold_ops"] = n / (time.perf_counter() - started)
        started = time.perf_counter()
        for old, new in zip(names, moved, strict=True):
            os.rename(old, new, src_dir_fd=dfd, dst_dir_fd=dfd)
        out["rename_ops"] = n / (time.perf_counter() - started)
        os.close(dfd)
        drop_caches()
        dfd = os.open(top, os.O_RDONLY | os.O_DIRECTORY)
        started = time.perf_counter()
        listing = subprocess.run(["ls", "-l", str(top)], capture_output=True, check=True,
                                 env={**os.environ, "LC_ALL": "C"})
        ls_s = time.perf_counter() - started
        lines = listing.stdout.count(b"\n") - 1  # minus "total N"
        if lines != n:
            raise RuntimeError(f"ls -l listed {lines} entries, expected {n}")
        out["ls_l_entries_per_s"] = n / ls_s
        out["ls_l_s"] = ls_s
        started = time.perf_counter()
        for name in moved:
            os.unlink(name, dir_fd=dfd)
        out["unlink_ops"] = n / (time.perf_counter() - started)
    finally:
        with contextlib.suppress(OSError):
            os.close(dfd)
    phases = ("create_ops", "stat_ops", "stat_cold_ops", "rename_ops", "unlink_ops")
    total_s = sum(n / out[k] for k in phases) + out["ls_l_s"]
    out["all_ops"] = (len(phases) + 1) * n / total_s
    return out


META = Workload(
    "meta", 5, "Metadata: create, stat, rename, unlink of small files; ls -l of the directory",
    (Metric("create_ops", "create (open O_CREAT|O_EXCL, 64 B write, close)", "ops/s"),
     Metric("stat_ops", "stat, right after create", "ops/s"),
     Metric("stat_cold_ops", "stat, after drop_caches", "ops/s"),
     Metric("rename_ops", "rename", "ops/s"),
     Metric("ls_l_entries_per_s", "ls -l (after drop_caches)", "entries/s"),
     Metric("ls_l_s", "ls -l", "s", higher_is_better=False),
     Metric("unlink_ops", "unlink", "ops/s"),
     Metric("all_ops", "all phases together", "ops/s")),
    (Target("create_ops", "plainfs", 2.0, "metadata create >= 2x plain pyfuse3"),
     Target("stat_ops", "plainfs", 2.0, "metadata stat >= 2x plain pyfuse3"),
     Target("stat_cold_ops", "plainfs", 2.0, "metadata stat (cold) >= 2x plain pyfuse3"),
     Target("rename_ops", "plainfs", 2.0, "metadata rename >= 2x plain pyfuse3"),
     Target("ls_l_entries_per_s", "plainfs", 2.0, "ls -l >= 2x plain pyfuse3"),
     Target("unlink_ops", "plainfs", 2.0, "metadata unlink >= 2x plain pyfuse3"),
     Target("all_ops", "plainfs", 2.0, "metadata, all phases >= 2x plain pyfuse3")),
    _meta_variants, meta_run,
    note="dmemfs runs this with 4K dpages: every non-empty file holds at least one dpage, "
         "and 10,000 files of 2 MiB dpages would need 20 GiB.",
)


# -- 6. allocation ------------------------------------------------------------------------

def _huge_supported(dpage: str) -> bool:
    kb = DPAGE_BYTES[dpage] // KIB
    return dpage == "4K" or Path(f"/sys/kernel/mm/hugepages/hugepages-{kb}kB").is_dir()


def _alloc_variants(p: Params) -> list[Variant]:
    out = []
    for dpage in p.alloc_dpages:
        for pool in p.alloc_pools:
            label = f"dmemfs {_size(pool)}/{dpage}"
            skip = None
            if pool < 2 * DPAGE_BYTES[dpage]:
                skip = f"a {_size(pool)} pool holds fewer than two {dpage} dpages"
            elif not _huge_supported(dpage):
                skip = f"the kernel has no {dpage} huge pages"
            book = (p.book_on_alloc_mounts and pool in p.book_pools
                    and dpage in p.book_dpages)
            out.append(Variant(label, "dmemfs", _dmemfs_options(p, pool, dpage, "region"),
                               memory=pool + GIB, skip=skip,
                               info={"pool": pool, "dpage": dpage, "book": book}))
            if dpage in ("4K", "2M"):  # the passthrough path (1G dpages are hugetlbfs only)
                out.append(Variant(f"dmemfs-passthrough {_size(pool)}/{dpage}", "dmemfs",
                                   _dmemfs_options(p, pool, dpage), memory=pool + GIB,
                                   skip=skip if pool < 2 * DPAGE_BYTES[dpage] else None,
                                   info={"pool": pool, "dpage": f"{dpage} passthrough"}))
    for pool in p.alloc_pools:
        out.append(Variant(f"tmpfs {_size(pool)} (fallocate)", "tmpfs", f"size={_size(pool)}",
                           memory=pool + GIB, info={"pool": pool, "dpage": "4K"}))
    return out


def _alloc_run(v: Variant, m: MountInfo, p: Params) -> dict[str, float]:
    # Workload 7's idle reading comes first (nothing allocated yet, so the first grow
    # still takes fresh dpages) and its full reading last.
    idle = _book_reading(v, lambda: book_idle(m)) if v.info.get("book") else None
    path = str(m.path / "vm")
    st = os.statvfs(m.path)
    half = st.f_bavail * st.f_frsize // 2
    grow: list[float] = []
    shrink: list[float] = []
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        for _ in range(p.alloc_reps):
            started = time.perf_counter()
            if v.kind == "tmpfs":
                os.posix_fallocate(fd, 0, half)  # tmpfs truncate reserves nothing
            else:
                os.ftruncate(fd, half)  # what truncate -s does
            grown = time.perf_counter()
            os.ftruncate(fd, 0)
            shrink.append((time.perf_counter() - grown) * 1e3)
            grow.append((grown - started) * 1e3)
            if os.fstat(fd).st_size != 0:
                raise RuntimeError("truncate to 0 left bytes behind")
    finally:
        os.close(fd)
    out = {
        "grow_first_ms": grow[0],
        "grow_reuse_ms": float(np.median(grow[1:])) if len(grow) > 1 else grow[0],
        "shrink_ms": float(np.median(shrink)),
        "grow_bytes": float(half),
    }
    if idle is not None:
        book = _book_reading(v, lambda: book_full(v, m, idle))
        if book is not None:
            out.update({BOOK_PREFIX + key: val for key, val in book.items()})
    return out


def _book_reading(v: Variant, read: Callable[[], dict[str, float]]) -> dict[str, float] | None:
    """Workload 7's reading on a workload 6 mount, or None if it failed: workload 6's
    own numbers are kept, and workload 7 mounts for itself (where the error shows)."""
    try:
        return read()
    except Exception as exc:
        v.info["book_error"] = f"{type(exc).__name__}: {exc}"
        return None


ALLOC = Workload(
    "alloc", 6, "Allocation: truncate -s to half the free pool and back to 0",
    (Metric("grow_first_ms", "grow, fresh pool", "ms", higher_is_better=False),
     Metric("grow_reuse_ms", "grow again (dpages freed before: zeroed)", "ms",
            higher_is_better=False),
     Metric("shrink_ms", "truncate back to 0", "ms", higher_is_better=False),
     Metric("grow_bytes", "bytes allocated per grow", "B")),
    (Target("grow_first_ms", None, 10.0, "truncate -s (fresh dpages) < 10 ms, flat in pool"),
     Target("grow_reuse_ms", None, 10.0, "truncate -s (reused dpages) < 10 ms, flat in pool"),
     Target("shrink_ms", None, 10.0, "truncate -s 0 < 10 ms, flat in pool")),
    _alloc_variants, _alloc_run, comparative=False,
    note="The first grow takes dpages that were never used (zero already); later grows take "
         "dpages freed by the previous shrink, which the daemon zeroes before handing them "
         "out. tmpfs rows are a kernel reference (posix_fallocate, which also zeroes).",
)


# -- 7. bookkeeping ----------------------------------------------------------------------------

_SMAPS_HEAD = re.compile(r"^([0-9a-f]+)-([0-9a-f]+) ")


def daemon_memory(pid: int, region_size: int) -> dict[str, float]:
    """RSS, the region mapping's RSS, and page tables of *pid*, in bytes."""
    status = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, rest = line.partition(":")
        parts = rest.split()
        if len(parts) == 2 and parts[1] == "kB":
            status[key] = int(parts[0]) * KIB
    region_rss = region_hugetlb = 0
    found = False
    current_is_region = False
    for line in Path(f"/proc/{pid}/smaps").read_text().splitlines():
        head = _SMAPS_HEAD.match(line)
        if head:
            size = int(head.group(2), 16) - int(head.group(1), 16)
            current_is_region = size == region_size and not found
            found = found or current_is_region
            continue
        if current_is_region:
            key, _, rest = line.partition(":")
            parts = rest.split()
            if key == "Rss":
                region_rss = int(parts[0]) * KIB
            elif key in ("Shared_Hugetlb", "Private_Hugetlb"):
                region_hugetlb += int(parts[0]) * KIB
    if not found:
        raise RuntimeError(f"no mapping of {region_size} bytes in /proc/{pid}/smaps")
    rss = status.get("VmRSS", 0)
    return {
        "rss": float(rss),
        "region_rss": float(region_rss),
        "region_hugetlb": float(region_hugetlb),
        "nonregion_rss": float(rss - region_rss),
        "pte": float(status.get("VmPTE", 0)),
        # the daemon's heap and stacks: never the region (shared or hugetlb), never
        # library pages, so the part of nonregion_rss that can be per-GiB cost
        "anon": float(status.get("RssAnon", 0)),
    }


def _book_variants(p: Params) -> list[Variant]:
    out = []
    for dpage in p.book_dpages:
        for pool in p.book_pools:
            out.append(Variant(f"dmemfs {_size(pool)}/{dpage}", "dmemfs",
                               _dmemfs_options(p, pool, dpage, "region"), memory=pool + GIB,
                               info={"pool": pool, "dpage": dpage}))
    return out


BOOK_PREFIX = "book."  # workload 7's readings inside a workload 6 sample (shared mount)


def book_idle(m: MountInfo) -> dict[str, float]:
    """The daemon's memory on a mount where nothing is allocated yet."""
    if m.pid is None:
        raise RuntimeError("the daemon's pid was not found")
    st = os.statvfs(m.path)
    if st.f_bavail != st.f_blocks:
        raise RuntimeError("bookkeeping wants an empty pool to start from")
    return daemon_memory(m.pid, st.f_blocks * st.f_frsize)


def book_full(v: Variant, m: MountInfo, idle: dict[str, float]) -> dict[str, float]:
    """Allocate every free dpage, then read the daemon's memory again; both readings."""
    assert m.pid is not None
    st = os.statvfs(m.path)
    region = st.f_blocks * st.f_frsize
    fd = os.open(m.path / "all", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        os.ftruncate(fd, st.f_bavail * st.f_frsize)  # every dpage allocated
        full = daemon_memory(m.pid, region)
        if os.statvfs(m.path).f_bavail != 0:
            raise RuntimeError("the pool was not fully allocated")
    finally:
        os.close(fd)
    out = {f"idle_{k}": val for k, val in idle.items()}
    out.update({f"full_{k}": val for k, val in full.items()})
    out["region_bytes"] = float(region)
    model = model_bookkeeping(DPAGE_BYTES[v.info["dpage"]], region)
    if model is not None:
        out["model_bytes"] = float(model)
    return out


def _book_run(v: Variant, m: MountInfo, p: Params) -> dict[str, float]:
    return book_full(v, m, book_idle(m))


def model_bookkeeping(dpage: int, region: int) -> int | None:
    """Bytes the daemon's own structures take for a *region* of *dpage* dpages.

    Built here with the daemon's classes (Pool, PoolSet, FileStore) and counted
    with tracemalloc, so the number is exact where RSS is too coarse.  None if
    those classes cannot be built (their signatures changed).
    """
    try:
        pool_mod = importlib.import_module("dmemfs_fuse.alloc.pool")
        poolset_mod = importlib.import_module("dmemfs_fuse.alloc.poolset")
        store_mod = importlib.import_module("dmemfs_fuse.files.store")
    except ImportError:
        return None
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        pool = pool_mod.Pool(0, 0, 0, region // dpage, dpage)
        fake_region = SimpleNamespace(size=region, dpage_size=dpage, fresh=True)
        store = store_mod.FileStore(fake_region, poolset_mod.PoolSet([pool], dpage))
        used = tracemalloc.get_traced_memory()[0] - before
        del store, pool
        return int(used)
    except Exception:
        return None
    finally:
        tracemalloc.stop()


BOOK = Workload(
    "book", 7, "Bookkeeping: the daemon's memory beyond the region, per managed GiB",
    (Metric("idle_nonregion_rss", "RSS minus region, mounted and idle", "B",
            higher_is_better=False),
     Metric("full_nonregion_rss", "RSS minus region, every dpage allocated", "B",
            higher_is_better=False),
     Metric("full_anon", "anonymous RSS (RssAnon), every dpage allocated", "B",
            higher_is_better=False),
     Metric("full_pte", "page tables (VmPTE), every dpage allocated", "B",
            higher_is_better=False),
     Metric("model_bytes", "pool + store structures (tracemalloc)", "B",
            higher_is_better=False)),
    (Target("per_gib_4K", None, 64 * KIB, "bookkeeping <= 64 KiB per GiB at 4K dpages"),
     Target("per_gib_2M", None, 1 * KIB, "bookkeeping <= 1 KiB per GiB at 2M dpages")),
    _book_variants, _book_run, comparative=False,
    note="Per GiB = the slope over pool sizes (a fixed Python/numpy/pyfuse3 footprint is not "
         "per GiB). When workload 6 runs too, these readings are taken on its mounts: idle "
         "before its first grow, full after its last shrink. The kernel spends 64 bytes of "
         "struct page per 4 KiB page (16 MiB per GiB), about 2 MiB per GiB for 2M HugeTLB "
         "pages with vmemmap optimisation.",
)


WORKLOADS: tuple[Workload, ...] = (SEQ, RAND, MMAP, GUEST, META, ALLOC, BOOK)
BY_NAME = {w.name: w for w in WORKLOADS}


def fits(v: Variant) -> str | None:
    """Why *v* cannot be mounted now (memory), or None."""
    avail = mem_available()
    if v.memory > avail:
        return (f"needs about {_human(v.memory)} free, {_human(avail)} available "
                f"(MemAvailable)")
    return None
