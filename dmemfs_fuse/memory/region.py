"""The region: one memory mapping taken at start-up, populated, locked and kept until exit.

It stands in for the ``dmem=`` boot reservation.  The host's plan
(host/plan.py) turns the mount options and the machine's facts into a
:class:`RegionPlan`, checked before anything is reserved; :meth:`Region.open`
carries the plan out.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import mmap
import os
import stat
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import numpy as np

from ..libc import MAP_FAILED, libc
from ..sizes import human
from . import hugepages, numa

log = logging.getLogger(__name__)

MADV_POPULATE_WRITE = 23
EHWPOISON = 133  # "memory page has hardware error" (errno.EHWPOISON on newer Pythons)
POPULATE_CHUNK = 256 << 20
POPULATE_THREADS = 16  # at most; fewer if fewer CPUs are allowed


class PoolSpec(NamedTuple):
    """A pool to carve: its node and size in bytes (``size`` may be relative, see SizeSpec)."""

    node: int
    size: int


@dataclass(frozen=True)
class RegionPlan:
    """What to reserve, decided before anything is reserved.

    Fields:
        pools: the pools to carve, in region order.
        dpage_size: bytes per dpage.
        backend: ``hugetlbfs``, ``memfd-hugetlb``, ``memfd`` or ``path``.
        path: the hugetlbfs directory (hugetlbfs) or the file/device (path).
        reserve: huge pages to add to the kernel's pools, per node.
        allow_unlocked: go on (loudly) if mlock fails.
        warnings: fallbacks taken, to be logged when the plan is carried out.
    """

    pools: tuple[PoolSpec, ...]
    dpage_size: int
    backend: str
    path: str | None = None
    reserve: dict[int, int] = field(default_factory=dict)
    allow_unlocked: bool = False
    warnings: tuple[str, ...] = ()

    @property
    def size(self) -> int:
        """Bytes in the whole region."""
        return sum(p.size for p in self.pools)


def meminfo_available() -> int:
    """MemAvailable from /proc/meminfo, in bytes."""
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return 0


def on_hugetlbfs(path: str) -> bool:
    """Whether *path* (or, if it does not exist yet, its directory) is on a hugetlbfs."""
    try:
        target = path if os.path.exists(path) else os.path.dirname(path)
        # os.statvfs has no f_type, so look the path up in /proc/mounts.
        for line in Path("/proc/mounts").read_text().splitlines():
            fields = line.split()
            if len(fields) > 2 and fields[2] == "hugetlbfs" and (
                    os.path.realpath(target) + "/").startswith(fields[1].rstrip("/") + "/"):
                return True
    except OSError:
        pass
    return False


class Region:
    """A locked, populated shared mapping of the plan's size, sliced into pools.

    ``view`` is a memoryview of all of it and ``array`` the same bytes as a
    numpy uint8 array; both stay valid until :meth:`close`.
    """

    def __init__(self, plan: RegionPlan) -> None:
        self.plan = plan
        self.size = plan.size
        self.dpage_size = plan.dpage_size
        self.fd = -1
        self.addr = 0
        self.locked = False
        # True when every byte is known to be zero (fresh memory); a reused
        # file or device may hold old bytes, which must be zeroed before use.
        self.fresh = True
        self.populate_seconds = 0.0
        # Dpages whose memory the kernel reported poisoned while populating.
        self.poisoned_dpages: list[int] = []
        self._reservation = hugepages.HugePageReservation(plan.dpage_size)
        self.view: memoryview = memoryview(b"")
        self.array: np.ndarray = np.zeros(0, dtype=np.uint8)

    @classmethod
    def open(cls, plan: RegionPlan, progress: Callable[[int, int], None] | None = None) -> Region:
        """Reserve, map, bind, populate and lock the region; undo everything on failure."""
        region = cls(plan)
        try:
            region._open(progress)
        except BaseException:
            region.close()
            raise
        return region

    def _open(self, progress: Callable[[int, int], None] | None) -> None:
        plan = self.plan
        for warning in plan.warnings:
            log.warning("%s", warning)
        for node, count in sorted(plan.reserve.items()):
            self._reservation.reserve(node, count)
        self.fd = self._open_fd()
        addr = libc.mmap(None, self.size, mmap.PROT_READ | mmap.PROT_WRITE, mmap.MAP_SHARED,
                         self.fd, 0)
        if addr in (None, MAP_FAILED):
            err = ctypes.get_errno()
            raise OSError(err, f"mmap of {human(self.size)} ({plan.backend}): {os.strerror(err)}")
        self.addr = int(addr)
        offset = 0
        for spec in plan.pools:
            try:
                numa.mbind(self.addr + offset, spec.size, spec.node)
            except OSError as exc:
                if plan.backend != "path":
                    raise
                log.warning("cannot bind %s to node %d (%s); device memory keeps its own node",
                            plan.path, spec.node, exc)
            offset += spec.size
        self._populate(progress)
        if libc.mlock(ctypes.c_void_p(self.addr), self.size) == 0:
            self.locked = True
        else:
            err = ctypes.get_errno()
            message = (f"mlock of {human(self.size)} failed: {os.strerror(err)} (run as root or "
                       "raise RLIMIT_MEMLOCK, e.g. LimitMEMLOCK=infinity under systemd)")
            if not plan.allow_unlocked:
                raise OSError(err, message + "; allow_unlocked lets it run unlocked")
            log.warning("%s; running UNLOCKED because of allow_unlocked: the region may be swapped",
                        message)
        array_type = ctypes.c_ubyte * self.size
        buffer = array_type.from_address(self.addr)
        self.view = memoryview(buffer).cast("B")
        self.array = np.frombuffer(self.view, dtype=np.uint8)
        log.info("region: %s of %s in %d pool(s), dpage %s, populated%s in %.2f s",
                 human(self.size), self.describe(), len(plan.pools), human(self.dpage_size),
                 " and locked" if self.locked else "", self.populate_seconds)

    def describe(self) -> str:
        """The backend in words, for logs and status."""
        plan = self.plan
        if plan.backend == "hugetlbfs":
            return f"hugetlbfs file in {plan.path}"
        if plan.backend == "path":
            return str(plan.path)
        return "memfd with huge pages" if plan.backend == "memfd-hugetlb" else "memfd"

    def _open_fd(self) -> int:
        plan = self.plan
        if plan.backend == "memfd-hugetlb":
            shift = self.dpage_size.bit_length() - 1
            flags = os.MFD_CLOEXEC | os.MFD_HUGETLB | (shift << os.MFD_HUGE_SHIFT)
            fd = os.memfd_create("dmemfs", flags)
        elif plan.backend == "memfd":
            fd = os.memfd_create("dmemfs", os.MFD_CLOEXEC)
        elif plan.backend == "hugetlbfs":
            assert plan.path is not None
            fd, name = tempfile.mkstemp(prefix="dmemfs.", dir=plan.path)
            os.unlink(name)  # lives as long as the daemon holds it
        else:
            assert plan.path is not None
            fd = os.open(plan.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            st = os.fstat(fd)
            if stat.S_ISREG(st.st_mode):
                self.fresh = st.st_size == 0
                if st.st_size < self.size:
                    os.ftruncate(fd, self.size)
            else:
                self.fresh = False
            return fd
        try:
            os.ftruncate(fd, self.size)
        except OSError as exc:
            os.close(fd)
            raise OSError(exc.errno, f"sizing the {plan.backend} region to {human(self.size)}: "
                          f"{exc.strerror}") from None
        return fd

    def _populate(self, progress: Callable[[int, int], None] | None) -> None:
        # First touch is the cost of start-up, and it goes to faults, not to memory
        # bandwidth (docs/performance.md, "Populate from one thread per CPU"), so chunks
        # are faulted in from one thread per CPU.  mbind() above decides the node of
        # every page, whichever CPU faults it.
        started = time.monotonic()
        chunk = max(POPULATE_CHUNK, self.dpage_size)
        offsets = range(0, self.size, chunk)
        workers = max(1, min(POPULATE_THREADS, len(offsets), len(os.sched_getaffinity(0))))
        done = 0
        with ThreadPoolExecutor(workers, thread_name_prefix="populate") as pool:
            futures = [pool.submit(self._populate_chunk, offset, min(chunk, self.size - offset))
                       for offset in offsets]
            try:
                for future in as_completed(futures):
                    done += future.result()
                    if progress:
                        progress(done, self.size)
            except BaseException:
                for future in futures:
                    future.cancel()  # chunks not started yet; running ones end by themselves
                raise
        self.poisoned_dpages.sort()
        self.populate_seconds = time.monotonic() - started

    def _populate_chunk(self, start: int, length: int) -> int:
        """Fault in ``[start, start+length)``; return *length*.  Runs in a worker thread."""
        if libc.madvise(ctypes.c_void_p(self.addr + start), length, MADV_POPULATE_WRITE):
            err = ctypes.get_errno()
            if err != EHWPOISON:
                hint = ""
                if err in (errno.ENOMEM, errno.EFAULT):
                    hint = " (not enough memory or huge pages for the region)"
                raise OSError(err, f"populating {self.describe()} at offset {human(start)}: "
                              f"{os.strerror(err)}{hint}")
            # A reused region with poisoned memory: populate around it, one dpage at a
            # time, and report those dpages for marking bad.
            self._populate_around_poison(start, length)
        return length

    def _populate_around_poison(self, start: int, length: int) -> None:
        for offset in range(start, start + length, self.dpage_size):
            if libc.madvise(ctypes.c_void_p(self.addr + offset), self.dpage_size,
                            MADV_POPULATE_WRITE) == 0:
                continue
            err = ctypes.get_errno()
            if err != EHWPOISON:
                raise OSError(err, f"populating {self.describe()} at offset {human(offset)}: "
                              f"{os.strerror(err)}")
            log.warning("region offset %d: the kernel reports poisoned memory there", offset)
            self.poisoned_dpages.append(offset // self.dpage_size)  # list.append is atomic

    def close(self) -> None:
        """Unlock, unmap and close the region and give back reserved huge pages; never raises."""
        self.view = memoryview(b"")
        self.array = np.zeros(0, dtype=np.uint8)
        if self.addr:
            if self.locked:
                libc.munlock(ctypes.c_void_p(self.addr), self.size)
            libc.munmap(ctypes.c_void_p(self.addr), self.size)
            self.addr = 0
            self.locked = False
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        self._reservation.release()
