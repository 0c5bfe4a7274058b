"""Pool memory on the passthrough path: shmem bound to the pool's node, taken at start-up.

Each pool gets two tmpfs instances in a root-only directory:

* ``reserve`` holds one file, sized to the pool and populated at start (the
  stand-in for the boot-time reservation), so the memory is taken from the
  host before any file needs it;
* ``files`` holds one backing file per dmemfs file, named by inode number,
  which the kernel reads, writes and maps directly (FUSE passthrough).

Both are mounted ``size=POOL,huge=always|never,mpol=bind:NODE,noswap``.
``noswap`` keeps every page out of swap (mlock would cover only mapped pages);
``mpol`` puts every page on the pool's node whoever allocates it, the daemon's
worker threads or a process faulting a hole; ``size`` on the files instance is
the hard limit: whatever allocates there, the daemon's fallocate or the
kernel's own passed-through write, gets ENOSPC past the pool.

One rule ties the two (:meth:`PoolMemory.balance`): reserve + files = pool.
Memory moves into a file at the reserve's tail, in whole dpages: the reserve
is cut by what the file is about to take, the file fallocates it, and the
reserve is set to what is left.  What the kernel allocated on its own (a write
past EOF, a fault into a hole) comes out of the reserve at the next balance.
Both instances stay mounted if the daemon dies, so mappings and open files
keep their bytes; the next start detaches them.
"""

from __future__ import annotations

import ctypes
import errno
import functools
import logging
import mmap
import os
import shutil
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from ..libc import MAP_FAILED, libc
from ..sizes import ceil_div, human
from . import numa
from .hugepages import DPAGE_SIZES
from .region import RegionPlan

log = logging.getLogger(__name__)

MADV_POPULATE_WRITE = 23
MNT_DETACH = 2
MS_NOSUID, MS_NODEV, MS_NOEXEC = 2, 4, 8
FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE = 1, 2
POPULATE_CHUNK = 256 << 20
THP_SHMEM = Path("/sys/kernel/mm/transparent_hugepage/shmem_enabled")



def fallocate(fd: int, offset: int, length: int, mode: int = 0) -> None:
    """fallocate(2); OSError with the errno on failure."""
    if length > 0 and libc.fallocate(fd, mode, offset, length) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def shmem_huge_possible() -> bool:
    """Whether tmpfs may use 2 MiB transparent huge pages here (``huge=always`` is honoured
    unless the administrator denies shmem THP)."""
    try:
        text = THP_SHMEM.read_text()
    except OSError:
        return False
    return "[deny]" not in text


def mount_tmpfs(target: Path, size: int, dpage_size: int, node: int, nr_inodes: int) -> None:
    """Mount a tmpfs at *target* for one pool (see the module's note for each option)."""
    huge = "always" if dpage_size >= DPAGE_SIZES["2M"] else "never"
    data = (f"size={size},nr_inodes={nr_inodes},huge={huge},mpol=bind:{node},noswap,"
            "mode=0700")
    if libc.mount(b"dmemfs-pool", os.fsencode(target), b"tmpfs",
                  MS_NOSUID | MS_NODEV | MS_NOEXEC, data.encode()) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"mounting tmpfs ({data}) at {target}: {os.strerror(err)}")


def detach(target: Path) -> bool:
    """Lazily unmount *target*: what processes still map or hold open stays theirs."""
    if libc.umount2(os.fsencode(target), MNT_DETACH) != 0:
        err = ctypes.get_errno()
        if err not in (errno.EINVAL, errno.ENOENT):  # not a mount point: nothing to do
            log.warning("unmounting %s: %s", target, os.strerror(err))
        return False
    return True


def mounts_under(base: Path) -> list[Path]:
    """Mount points at or below *base*, deepest first."""
    found = []
    prefix = str(base).rstrip("/") + "/"
    with open("/proc/self/mountinfo") as mountinfo:
        for line in mountinfo:
            point = line.split()[4].replace("\\040", " ")
            if point == str(base) or point.startswith(prefix):
                found.append(Path(point))
    return sorted(found, key=lambda p: len(p.parts), reverse=True)


@dataclass(frozen=True)
class PoolMemoryStats:
    """One pool's memory, read from its two tmpfs instances.

    Fields:
        node: the NUMA node every page is bound to.
        size: bytes the pool holds.
        reserve_bytes: taken and unlent (the reserve file's blocks).
        file_bytes: lent to files (the files instance's used blocks).
        short_bytes: what the reserve could not take back (the pool shrank).
    """

    node: int
    size: int
    reserve_bytes: int
    file_bytes: int
    short_bytes: int


class PoolMemory:
    """One pool's shmem: its reserve, its files' backing files, and the rule between them."""

    def __init__(self, base: Path, index: int, *, node: int, size: int, dpage_size: int,
                 nr_inodes: int) -> None:
        self.base = base / f"pool{index}"
        self.index = index
        self.node = node
        self.size = size
        self.dpage_size = dpage_size
        self.nr_inodes = nr_inodes
        self.reserve_dir = self.base / "reserve"
        self.files_dir = self.base / "files"
        self._reserve_fd = -1
        self.reserve_size = 0
        self.short_bytes = 0
        self.huge_pages_at_start = 0

    def mount(self) -> None:
        """Mount both instances and create the (empty) reserve file."""
        for where in (self.reserve_dir, self.files_dir):
            where.mkdir(parents=True, mode=0o700)
        # The reserve holds one file, and the files instance one per dmemfs inode.
        mount_tmpfs(self.reserve_dir, self.size, self.dpage_size, self.node, 2)
        mount_tmpfs(self.files_dir, self.size, self.dpage_size, self.node, self.nr_inodes)
        self._reserve_fd = os.open(self.reserve_dir / "reserve",
                                   os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)

    def adopt(self) -> None:
        """Take over the instances a daemon that died left (their files are the namespace's
        that the metadata describes); OSError if they are not what this pool needs."""
        mounted = set(mounts_under(self.base))
        for where in (self.reserve_dir, self.files_dir):
            if where not in mounted:
                raise OSError(errno.ENOENT, f"{where} is not mounted: the pool memory the "
                              "metadata describes is gone")
            st = os.statvfs(where)
            if st.f_blocks * st.f_frsize != self.size:
                raise OSError(errno.EINVAL, f"{where} holds {human(st.f_blocks * st.f_frsize)}, "
                              f"not the pool's {human(self.size)}")
        self._reserve_fd = os.open(self.reserve_dir / "reserve", os.O_RDWR | os.O_CLOEXEC)
        self.reserve_size = os.fstat(self._reserve_fd).st_size
        self.balance()

    def populate(self, done: Callable[[int], None]) -> None:
        """Take the whole pool into the reserve and touch every page (*done(bytes)* per chunk)."""
        fd = self._reserve_fd
        try:
            fallocate(fd, 0, self.size)
        except OSError as exc:
            raise OSError(exc.errno, f"taking {human(self.size)} for pool {self.index} on node "
                          f"{self.node}: {exc.strerror}") from None
        self.reserve_size = self.size
        chunks = [(off, min(POPULATE_CHUNK, self.size - off))
                  for off in range(0, self.size, POPULATE_CHUNK)]
        workers = max(1, min(len(chunks), len(os.sched_getaffinity(0))))
        with ThreadPoolExecutor(workers, thread_name_prefix="populate") as pool:
            for length in pool.map(self._touch, chunks):
                done(length)

    def _touch(self, chunk: tuple[int, int]) -> int:
        """Write-fault one chunk of the reserve (the host backs it now, not at a guest's start)."""
        offset, length = chunk
        addr = libc.mmap(None, length, mmap.PROT_READ | mmap.PROT_WRITE, mmap.MAP_SHARED,
                         self._reserve_fd, offset)
        if addr in (None, MAP_FAILED):
            err = ctypes.get_errno()
            raise OSError(err, f"mapping the reserve of pool {self.index}: {os.strerror(err)}")
        try:
            if libc.madvise(addr, length, MADV_POPULATE_WRITE) != 0:
                err = ctypes.get_errno()
                raise OSError(err, f"populating pool {self.index} at {human(offset)}: "
                              f"{os.strerror(err)}")
        finally:
            libc.munmap(addr, length)
        return length

    def file_bytes(self) -> int:
        """Bytes the files instance holds (the kernel's count, whoever allocated them)."""
        st = os.statvfs(self.files_dir)
        return (st.f_blocks - st.f_bfree) * st.f_frsize

    def file_room(self) -> int:
        """Bytes the files instance can still take."""
        st = os.statvfs(self.files_dir)
        return st.f_bavail * st.f_frsize

    def balance(self) -> None:
        """Set the reserve to what the files leave of the pool: reserve + files = pool.

        Cutting frees the reserve's tail (whole dpages) for a file to take; growing
        takes memory back.  When growing fails the pool has shrunk: reported, and
        tried again at the next balance.
        """
        dps = self.dpage_size
        target = max(0, self.size - self.file_bytes()) // dps * dps
        if target < self.reserve_size:
            os.ftruncate(self._reserve_fd, target)
        elif target > self.reserve_size:
            try:
                fallocate(self._reserve_fd, self.reserve_size, target - self.reserve_size)
            except OSError as exc:
                st = os.fstat(self._reserve_fd)
                got = min(target, st.st_blocks * 512 // dps * dps)
                os.ftruncate(self._reserve_fd, got)
                short = target - got
                if short != self.short_bytes:
                    log.warning("pool %d: the reserve could not take back %s (%s); the pool "
                                "holds that much less until it can", self.index, human(short),
                                exc.strerror)
                self.short_bytes = short
                self.reserve_size = got
                return
        self.reserve_size = target
        self.short_bytes = 0

    def lend(self, length: int, take: Callable[[], None]) -> None:
        """Free *length* bytes at the reserve's tail, let *take()* allocate them in a file,
        and balance.  If *take* fails, the reserve takes the memory back and the error
        goes on."""
        cut = max(0, self.reserve_size - length)
        os.ftruncate(self._reserve_fd, cut)
        self.reserve_size = cut
        try:
            take()
        finally:
            self.balance()

    def path_of(self, ino: int) -> Path:
        """The backing file of inode *ino*."""
        return self.files_dir / str(ino)

    def backing_files(self) -> Iterator[tuple[int, os.stat_result]]:
        """``(inode, stat)`` of every backing file in this pool."""
        with os.scandir(self.files_dir) as entries:
            for entry in entries:
                if entry.name.isdigit():
                    yield int(entry.name), entry.stat()

    def freed_files(self) -> Iterator[tuple[int, Path]]:
        """``(inode, path)`` of backing files of released files not removed yet."""
        with os.scandir(self.files_dir) as entries:
            for entry in entries:
                name = entry.name.removesuffix(".freed")
                if name != entry.name and name.isdigit():
                    yield int(name), Path(entry.path)

    def statistics(self) -> PoolMemoryStats:

        """A frozen record of this pool's memory as the kernel counts it now."""
        return PoolMemoryStats(self.node, self.size, self.reserve_size, self.file_bytes(),
                               self.short_bytes)

    def leave(self) -> None:
        """Close the reserve's fd only: the instances stay mounted (ShmemMemory.leave)."""
        if self._reserve_fd >= 0:
            os.close(self._reserve_fd)
            self._reserve_fd = -1

    def close(self) -> None:
        """Give the memory back: detach both instances (mappings that outlive us keep theirs)."""

        if self._reserve_fd >= 0:
            os.close(self._reserve_fd)
            self._reserve_fd = -1
        for where in (self.files_dir, self.reserve_dir):
            detach(where)


class ShmemMemory:
    """Every pool's shmem on the passthrough path (what Region is to the region path)."""

    def __init__(self, plan: RegionPlan, base: Path, nr_inodes: int) -> None:
        self.plan = plan
        self.base = base
        self.size = plan.size
        self.dpage_size = plan.dpage_size
        self.populate_seconds = 0.0
        self.pools = [PoolMemory(base, i, node=spec.node, size=spec.size,
                                 dpage_size=plan.dpage_size, nr_inodes=nr_inodes)
                      for i, spec in enumerate(plan.pools)]

    @classmethod
    def open(cls, plan: RegionPlan, base: Path, nr_inodes: int,
             progress: Callable[[int, int], None] | None = None) -> ShmemMemory:
        """Mount, take and touch every pool's memory; undo everything on failure."""
        memory = cls(plan, base, nr_inodes)
        try:
            memory._open(progress)
        except BaseException:
            memory.close()
            raise
        return memory

    @classmethod
    def adopt(cls, plan: RegionPlan, base: Path, nr_inodes: int) -> ShmemMemory:
        """Take over the pool memory a daemon that died left at *base* (PoolMemory.adopt).
        On failure nothing is detached: the files stay for whoever looks next."""
        memory = cls(plan, base, nr_inodes)
        for pool in memory.pools:
            pool.adopt()
        log.info("pool memory: adopted %s of shmem in %d pool(s) from %s, left by a daemon "
                 "that did not stop", human(memory.size), len(memory.pools), base)
        return memory

    def _open(self, progress: Callable[[int, int], None] | None) -> None:
        clear_stale(self.base)
        self.base.mkdir(parents=True, mode=0o700)
        started = time.monotonic()
        huge_before = _shmem_huge_bytes()
        done = 0

        def step(length: int) -> None:
            nonlocal done
            done += length
            if progress is not None:
                progress(done, self.size)

        for pool in self.pools:
            pool.mount()
            pool.populate(step)
        self.populate_seconds = time.monotonic() - started
        if self.dpage_size >= DPAGE_SIZES["2M"]:
            huge = _shmem_huge_bytes() - huge_before
            if huge < self.size * 9 // 10:
                log.warning("only %s of the %s reserve is in 2 MiB pages (memory is "
                            "fragmented): guest RAM will be mapped partly with 4 KiB pages",
                            human(max(0, huge)), human(self.size))
        log.info("pool memory: %s of shmem in %d pool(s), dpage %s, kept out of swap, "
                 "populated in %.2f s", human(self.size), len(self.pools),
                 human(self.dpage_size), self.populate_seconds)

    def describe(self) -> str:
        """The backend in words, for logs and status."""
        pages = "2 MiB transparent huge pages" if self.dpage_size >= DPAGE_SIZES["2M"] else \
            "4 KiB pages"
        return f"shmem ({pages}) in {self.base}"

    def leave(self) -> None:
        """Close this daemon's hold on the pool memory but leave it mounted, files and all,
        for the next daemon (what a kill leaves); never raises."""
        for pool in self.pools:
            pool.leave()

    def close(self) -> None:
        """Give every pool's memory back; never raises."""
        for pool in self.pools:
            try:
                pool.close()
            except OSError as exc:
                log.warning("releasing pool %d: %s", pool.index, exc)
        shutil.rmtree(self.base, ignore_errors=True)


def clear_stale(base: Path) -> None:
    """Detach what a daemon that died left at *base*.  Its files stay with whoever still
    maps or holds them, and their memory goes back when they let go."""
    if not base.exists():
        return
    stale = mounts_under(base)
    for point in stale:
        detach(point)
    if stale:
        log.warning("detached %d pool memory mount(s) a previous daemon left in %s; "
                    "processes that still map its files keep them", len(stale), base)
    shutil.rmtree(base, ignore_errors=True)


def _shmem_huge_bytes() -> int:
    with open("/proc/meminfo") as meminfo:
        for line in meminfo:
            if line.startswith("ShmemHugePages:"):
                return int(line.split()[1]) * 1024
    return 0


MADV_POPULATE_READ = 22


def page_nodes_of_file(path: str, offsets: list[int]) -> list[int]:
    """The NUMA nodes of the pages of *path* at *offsets* (each faulted in for reading
    first: move_pages knows only mapped pages).  Offsets must hold allocated pages: a
    read fault into a shmem hole would allocate one."""
    page = mmap.PAGESIZE
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        nodes = []
        for wanted in offsets:
            offset = wanted // page * page
            addr = libc.mmap(None, page, mmap.PROT_READ, mmap.MAP_SHARED, fd, offset)
            if addr in (None, MAP_FAILED):
                err = ctypes.get_errno()
                raise OSError(err, f"mapping {path} at {offset}: {os.strerror(err)}")
            try:
                libc.madvise(addr, page, MADV_POPULATE_READ)
                nodes.extend(numa.page_nodes([addr]))
            finally:
                libc.munmap(addr, page)
        return nodes
    finally:
        os.close(fd)


class _CachestatRange(ctypes.Structure):
    _fields_ = [("off", ctypes.c_uint64), ("len", ctypes.c_uint64)]


class _Cachestat(ctypes.Structure):
    _fields_ = [(name, ctypes.c_uint64) for name in
                ("nr_cache", "nr_dirty", "nr_writeback", "nr_evicted", "nr_recently_evicted")]


# x86_64's number, and that of every architecture on the generic syscall table (Linux 6.5;
# alpha and MIPS differ).
SYS_CACHESTAT = 451


@functools.cache
def _cachestat_unusable(err: int) -> None:
    """Say once why cachestat cannot be used here."""
    log.warning("cachestat(2) fails here (%s): pages fallocated but not written yet are not "
                "seen, so a daemon killed in the middle of sizing or cutting a file may leave "
                "the ledger counting memory wrongly until the file is resized or removed",
                os.strerror(err))


def cached_pages(fd: int, offset: int, length: int) -> int | None:
    """How many pages of bytes ``[offset, offset+length)`` the file *fd* holds in its page
    cache (cachestat(2)), fallocated ones not written yet included, which mincore and
    SEEK_DATA do not see on tmpfs.  None where cachestat cannot be called: a seccomp
    filter that does not know it (systemd 252's answers EPERM), or any other failure,
    which is logged once; what this serves is bookkeeping, never a reason to stop."""
    # struct cachestat_range and struct cachestat: include/uapi/linux/mman.h
    where, stats = _CachestatRange(offset, length), _Cachestat()
    if libc.syscall(ctypes.c_long(SYS_CACHESTAT), ctypes.c_int(fd), ctypes.byref(where),
                    ctypes.byref(stats), ctypes.c_uint(0)) != 0:
        _cachestat_unusable(ctypes.get_errno())
        return None
    return int(stats.nr_cache)


def holds_pages(fd: int, offset: int, length: int) -> bool:
    """Whether the file *fd* holds any page in ``[offset, offset+length)``, for what
    SEEK_DATA cannot see (fallocated pages not written yet; and on this kernel no data in
    the last page below MAX_LFS_FILESIZE, on tmpfs too).  cachestat sees both; where it
    cannot be called, mincore of a read-only mapping (which faults nothing in) sees the
    second only."""
    cached = cached_pages(fd, offset, length)
    if cached is not None:
        return cached > 0
    page = mmap.PAGESIZE
    length = ceil_div(length, page) * page
    addr = libc.mmap(None, length, mmap.PROT_READ, mmap.MAP_SHARED, fd, offset)
    if addr in (None, MAP_FAILED):
        err = ctypes.get_errno()
        raise OSError(err, f"mapping bytes at {offset}: {os.strerror(err)}")
    try:
        vec = ctypes.create_string_buffer(length // page)
        if libc.mincore(addr, length, vec) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"mincore: {os.strerror(err)}")
        return any(byte & 1 for byte in vec.raw)
    finally:
        libc.munmap(addr, length)
