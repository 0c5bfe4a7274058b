"""Memory pressure: workloads that map dmemfs files while the kernel reclaims memory.

A workload process writes a known pattern into dmemfs files, through a MAP_SHARED
mapping or with pwrite, and reads it back, while real reclaim happens:

- in a memory cgroup whose limit is a quarter of what it maps (cgroup v2
  ``memory.max``, with ``memory.high`` below it, where the memory controller is on
  the unified hierarchy; the v1 controller's ``memory.limit_in_bytes`` where it is
  not, as on this CI's hosts, which have no ``memory.high`` to set);
- and, separately, with ``MADV_PAGEOUT`` on its mapping;
- and a booted QEMU guest whose RAM is a dmemfs file runs in such a cgroup.

Afterwards every byte checks out (read with O_DIRECT: from the daemon on the region
path, from the backing file on passthrough; the guest's pattern for the guest), the daemon
still answers ``status``, and the pools' accounting is exact.  What each data path
does under pressure differs, and the tests pin it down:

- region path: the mapping is page cache of the FUSE file, charged to the workload.
  Reclaim writes dirty pages back to the daemon (WRITE) and drops them; a later touch
  faults them back in through the daemon (READ), which the daemon's byte counters show.
- passthrough path: the mapping is the pool's shmem (``noswap``), and the daemon took
  it when it sized the file, so it is charged to the daemon, not to the workload: the
  workload's cgroup stays small and nothing is evicted.  What the kernel allocates for
  the workload itself (a write past the end of a file) is charged to the workload and
  cannot be reclaimed; past the limit the OOM killer ends the workload, and the daemon
  and the accounting stay right.

Run as ``python test_pressure.py worker ...``, this file is the workload.
"""

from __future__ import annotations

import ctypes
import json
import mmap
import os
import secrets
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from mounting import (
    Mount,
    dmemfs,
    free_port,
    held_dpages,
    metrics,
    path_options,
    status,
    wait_statfs,
)
from test_qemu import (
    GUEST_MIB,
    Guest,
    assert_pattern_in_file,
    file_form,
    guest,  # noqa: F401 (the fixture)
    pattern_runs,
    power_off,
    presize,
    qemu,
    qemu_args,
)

pytestmark = [pytest.mark.mount, pytest.mark.timeout(300)]

M = 1 << 20
PAGE = 4096
GOLDEN = np.uint64(0x9E3779B97F4A7C15)
FILE_MIB = 256
LIMIT_MIB = 64  # a quarter of what the workload maps
HIGH_MIB = 48  # cgroup v2 only: reclaim starts here, before the hard limit
CHUNK = 4 * M
MOUNT_OPTIONS = "size=512M,pagesize=2M"
MADV_PAGEOUT = getattr(mmap, "MADV_PAGEOUT", 21)  # Linux 5.4; Python 3.11 may not name it


# -- the pattern ----------------------------------------------------------------------


def pattern(seed: int, offset: int, length: int) -> np.ndarray:
    """The 64-bit words of the pattern at byte *offset*: (seed + word index) * GOLDEN."""
    first = np.uint64(seed) + np.uint64(offset // 8)
    with np.errstate(over="ignore"):
        words: np.ndarray = (first + np.arange(length // 8, dtype=np.uint64)) * GOLDEN
    return words


def first_difference(got: np.ndarray, seed: int, offset: int) -> int | None:
    """The byte offset of the first word of *got* that differs from the pattern, or None."""
    bad = np.flatnonzero(got != pattern(seed, offset, got.nbytes))
    return None if not bad.size else offset + int(bad[0]) * 8


def check_file(path: Path, seed: int, length: int) -> None:
    """The first *length* bytes of *path* (a multiple of CHUNK) hold the pattern, read
    with O_DIRECT (past the page cache: from the daemon on the region path, from the
    backing file on passthrough)."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    try:
        with mmap.mmap(-1, CHUNK) as buf:  # page-aligned, as O_DIRECT wants
            for offset in range(0, length, CHUNK):
                assert os.preadv(fd, [buf], offset) == CHUNK, f"short read at {offset}"
                bad = first_difference(np.frombuffer(buf, dtype="<u8"), seed, offset)
                assert bad is None, f"{path}: byte {bad:#x} does not hold the pattern"
    finally:
        os.close(fd)


# -- the workload (run in its own process, in the cgroup) ---------------------------------


def resident(area: mmap.mmap) -> int:
    """Pages of *area* resident in memory, as mincore(2) sees them."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p]
    vec = ctypes.create_string_buffer(len(area) // PAGE)
    buf = ctypes.c_char.from_buffer(area)
    try:
        assert libc.mincore(ctypes.addressof(buf), len(area), vec) == 0, \
            os.strerror(ctypes.get_errno())
    finally:
        del buf
    return sum(byte & 1 for byte in vec.raw)


def map_and_check(path: str, seed: int) -> dict[str, int]:
    """Write the pattern through a MAP_SHARED mapping of all of *path*, then read it back
    through the mapping; no msync, so write-back and eviction are the kernel's doing."""
    fd = os.open(path, os.O_RDWR)
    try:
        size = os.fstat(fd).st_size
        with mmap.mmap(fd, size, mmap.MAP_SHARED) as area:
            words = np.frombuffer(area, dtype="<u8")
            for offset in range(0, size, CHUNK):
                words[offset // 8 : (offset + CHUNK) // 8] = pattern(seed, offset, CHUNK)
            after_write = resident(area)
            for offset in range(0, size, CHUNK):
                bad = first_difference(words[offset // 8 : (offset + CHUNK) // 8], seed,
                                       offset)
                assert bad is None, f"byte {bad:#x} read through the mapping differs"
            del words
            return {"pages": size // PAGE, "resident_after_write": after_write}
    finally:
        os.close(fd)


def write_past_end(path: str, seed: int, size: int) -> dict[str, int]:
    """pwrite the pattern into the empty file *path* up to *size*, each write past its end."""
    fd = os.open(path, os.O_WRONLY)
    try:
        for offset in range(0, size, CHUNK):
            assert os.pwrite(fd, pattern(seed, offset, CHUNK).tobytes(), offset) == CHUNK
            print(f"written {offset + CHUNK}", flush=True)
    finally:
        os.close(fd)
    return {}


def worker_main(procs: str, mode: str, path: str, seed: str, size: str) -> None:
    """Join the cgroup (its cgroup.procs file is *procs*), then run the workload."""
    Path(procs).write_text(f"{os.getpid()}\n")
    if mode == "map":
        result = map_and_check(path, int(seed))
    else:
        result = write_past_end(path, int(seed), int(size))
    print(json.dumps(result), flush=True)


# -- memory cgroups ------------------------------------------------------------------


@dataclass
class MemoryCgroup:
    """A memory cgroup made for one test: its directory, and which hierarchy it is on."""

    path: Path
    version: int

    def file(self, v2: str, v1: str) -> Path:
        """The control file named *v2* on cgroup v2, *v1* on v1."""
        return self.path / (v2 if self.version == 2 else v1)

    @property
    def procs(self) -> Path:
        """The file a process writes its pid to, to join the cgroup."""
        return self.path / "cgroup.procs"

    def peak(self) -> int:
        """The most memory charged to the cgroup at once."""
        return int(self.file("memory.peak", "memory.max_usage_in_bytes").read_text())

    def limit_hits(self) -> int:
        """How often a charge met the hard limit (and had to reclaim)."""
        if self.version == 1:
            return int((self.path / "memory.failcnt").read_text())
        return self.events()["max"]

    def events(self) -> dict[str, int]:
        """memory.events (v2) or memory.oom_control (v1), by name."""
        text = self.file("memory.events", "memory.oom_control").read_text()
        return {key: int(value) for key, value in (line.split() for line in text.splitlines())}

    def oom_kills(self) -> int:
        """Processes of the cgroup the OOM killer ended."""
        return self.events().get("oom_kill", 0)

    def stat(self) -> dict[str, int]:
        """memory.stat: what is charged, by kind (bytes)."""
        text = (self.path / "memory.stat").read_text()
        return {key: int(value) for key, value in (line.split() for line in text.splitlines())}


def memory_hierarchy() -> tuple[int, Path]:
    """Where memory cgroups can be made: (2, a cgroup2 root whose children get the memory
    controller) or (1, this process's cgroup on the v1 memory hierarchy)."""
    mounts = [line.split() for line in Path("/proc/self/mounts").read_text().splitlines()]
    for _, where, fstype, *_ in mounts:
        root = Path(where)
        if fstype == "cgroup2" and "memory" in (root / "cgroup.controllers").read_text().split():
            return 2, root
    for _, where, fstype, options, *_ in mounts:
        if fstype == "cgroup" and "memory" in options.split(","):
            for line in Path("/proc/self/cgroup").read_text().splitlines():
                _, controllers, own = line.split(":", 2)
                if "memory" in controllers.split(","):
                    return 1, Path(where) / own.lstrip("/")
    pytest.fail("no memory cgroup controller is mounted, on cgroup v2 or v1")


@contextmanager
def memory_cgroup(limit: int, high: int) -> Iterator[MemoryCgroup]:
    """A new memory cgroup with hard limit *limit* (and, on v2, ``memory.high`` *high* and
    no swap; v1 has no swap limit without memsw, and the hosts here have no swap);
    removed afterwards, once every process in it is gone, with the parent's controllers
    as they were."""
    version, parent = memory_hierarchy()
    control = parent / "cgroup.subtree_control"
    enabled = False
    if version == 2 and "memory" not in control.read_text().split():
        try:  # a root cgroup may; a namespaced one holding processes says EBUSY
            control.write_text("+memory\n")
        except OSError as exc:
            pytest.fail(f"cannot give {parent}'s children the memory controller: {exc}")
        enabled = True
    group = MemoryCgroup(parent / f"dmemfs-test-{uuid.uuid4().hex[:12]}", version)
    group.path.mkdir()
    try:
        if version == 2:
            (group.path / "memory.max").write_text(f"{limit}\n")
            (group.path / "memory.high").write_text(f"{high}\n")
            if (group.path / "memory.swap.max").exists():
                (group.path / "memory.swap.max").write_text("0\n")
        else:
            (group.path / "memory.limit_in_bytes").write_text(f"{limit}\n")
        yield group
    finally:
        deadline = time.monotonic() + 30
        while pids := group.procs.read_text().split():
            for pid in pids:
                os.kill(int(pid), signal.SIGKILL)
            assert time.monotonic() < deadline, f"{group.path} keeps processes {pids}"
            time.sleep(0.05)
        group.path.rmdir()
        if enabled:
            control.write_text("-memory\n")


def run_workload(group: MemoryCgroup, *args: str, timeout: float = 180) -> \
        subprocess.CompletedProcess[str]:
    """Run this file's worker in *group* and wait for it."""
    return subprocess.run([sys.executable, __file__, "worker", str(group.procs), *args],
                          capture_output=True, text=True, timeout=timeout, check=False)


def daemon_bytes(port: int) -> tuple[int, int]:
    """Bytes the daemon returned by READ and stored by WRITE so far."""
    values = metrics(port)
    return int(values["dmemfs_read_bytes_total"]), int(values["dmemfs_written_bytes_total"])


def daemon_bytes_since(port: int, before: tuple[int, int]) -> tuple[int, int]:
    """Bytes the daemon returned by READ and stored by WRITE since *before* (daemon_bytes)."""
    read, written = daemon_bytes(port)
    return read - before[0], written - before[1]


def assert_accounting(mount: Mount) -> None:
    """Used dpages are exactly what the mount's files hold, and the daemon answers status."""
    vfs = mount.statvfs()
    held = held_dpages(mount.path)
    assert vfs.f_blocks - vfs.f_bfree == held, (vfs, held)
    state = status(mount)
    assert state["used_dpages"] == held, state


def assert_all_free(mount: Mount) -> None:
    """Every dpage is free again (the dpages of a removed file come back at its FORGET)."""
    vfs = wait_statfs(mount.path, mount.statvfs().f_blocks)
    assert vfs.f_bfree == vfs.f_blocks, vfs


# -- the tests -----------------------------------------------------------------------


def test_mapped_pattern_survives_a_memory_limit(tmp_path: Path, data_path: str) -> None:
    """A workload limited to 64 MiB writes and reads back 256 MiB through a mapping.

    Region path: the limit is hit, dirty pages are written back to the daemon and
    evicted, and reading them back faults them in through the daemon: the daemon
    stores and returns at least the part that cannot stay resident.  Passthrough: the
    mapped memory is the daemon's, so the workload's cgroup never holds it.
    """
    port = free_port()
    seed = int.from_bytes(os.urandom(6), "little")
    size = FILE_MIB * M
    with dmemfs(tmp_path, f"{MOUNT_OPTIONS},metrics={port},{path_options(data_path)}") \
            as mount, memory_cgroup(LIMIT_MIB * M, HIGH_MIB * M) as group:
        target = mount.path / "mapped"
        presize(target, size)
        before = daemon_bytes(port)
        result = run_workload(group, "map", str(target), str(seed), str(size))
        assert result.returncode == 0, result.stderr
        report = json.loads(result.stdout.splitlines()[-1])
        read, written = daemon_bytes_since(port, before)
        peak, hits, kills = group.peak(), group.limit_hits(), group.oom_kills()
        print(f"\n{data_path}, cgroup v{group.version}: peak {peak / M:.1f} MiB of "
              f"{LIMIT_MIB} MiB, limit hit {hits} times, OOM kills {kills}; resident after "
              f"the writes {report['resident_after_write'] * PAGE / M:.0f} of {FILE_MIB} MiB; "
              f"the daemon stored {written / M:.0f} MiB and returned {read / M:.0f} MiB")
        assert kills == 0
        if data_path == "region":
            assert hits > 0, "the workload never met its limit: no pressure"
            # Each page's first touch READs it; what was not resident after the writes
            # is READ once more by the read-back.
            evicted = (report["pages"] - report["resident_after_write"]) * PAGE
            assert evicted >= size - LIMIT_MIB * M, report
            assert written >= evicted and read >= size + evicted, (written, read)
        else:
            # The file's memory is shmem; charged to the workload, it would show here (and
            # stay after the workload ended, as the file keeps it).
            assert group.stat()["shmem"] == 0, "the workload was charged for the pool's memory"
            assert report["resident_after_write"] == report["pages"]
            assert (read, written) == (0, 0), "passthrough I/O reached the daemon"
        check_file(target, seed, size)
        assert_accounting(mount)
        target.unlink()
        assert_all_free(mount)
    assert mount.exit_code == 0, mount.log()


def test_writes_past_the_end_under_a_memory_limit(tmp_path: Path, data_path: str) -> None:
    """A workload limited to 64 MiB pwrites 256 MiB into an empty file, each write past
    its end."""
    seed = int.from_bytes(os.urandom(6), "little")
    size = FILE_MIB * M
    with dmemfs(tmp_path, f"{MOUNT_OPTIONS},{path_options(data_path)}") as mount, \
            memory_cgroup(LIMIT_MIB * M, HIGH_MIB * M) as group:
        target = mount.path / "written"
        presize(target, 0)
        result = run_workload(group, "write", str(target), str(seed), str(size))
        confirmed = max((int(line.split()[1]) for line in result.stdout.splitlines()
                         if line.startswith("written ")), default=0)
        peak, hits, kills = group.peak(), group.limit_hits(), group.oom_kills()
        print(f"\n{data_path}, cgroup v{group.version}: exit {result.returncode}, "
              f"{confirmed / M:.0f} MiB written, peak {peak / M:.1f} MiB, "
              f"limit hit {hits} times, OOM kills {kills}, file {target.stat().st_size / M:.0f} "
              f"MiB")
        if data_path == "region":
            # WRITE stores in the daemon before it returns: the page cache it leaves is
            # clean, and reclaim simply drops it.
            assert result.returncode == 0 and kills == 0, result.stderr
            assert hits > 0, "the writer never met its limit: no pressure"
            assert target.stat().st_size == size
        else:
            # The kernel allocates the shmem for a write past the end, charged to the
            # writer; noswap memory cannot be reclaimed, so at the limit the OOM killer
            # ends the writer.  What it wrote before stays, and is accounted for.
            assert result.returncode == -signal.SIGKILL and kills == 1, result.stderr
            assert group.stat()["shmem"] >= confirmed, "the written shmem was not charged"
            assert confirmed < size
            assert confirmed <= target.stat().st_size <= confirmed + CHUNK
        check_file(target, seed, confirmed)
        assert_accounting(mount)
        if data_path == "passthrough":  # the pool gives the rest to a writer with room
            with open(target, "r+b") as rest:
                for offset in range(confirmed, size, CHUNK):
                    assert os.pwrite(rest.fileno(), pattern(seed, offset, CHUNK).tobytes(),
                                     offset) == CHUNK
            check_file(target, seed, size)
            assert_accounting(mount)
        target.unlink()
        assert_all_free(mount)
    assert mount.exit_code == 0, mount.log()


def test_madv_pageout_of_a_mapping(tmp_path: Path, data_path: str) -> None:
    """MADV_PAGEOUT of a written mapping, dirty and then after msync; the bytes read back
    right after each.

    Dirty pages of a file cannot be written back from the caller's context: MADV_PAGEOUT
    only unmaps them, and they stay in the page cache on both paths.  After msync, on the
    region path it evicts them, and reading them again brings them in through the daemon;
    on the passthrough path the memory is noswap shmem and stays where it is.
    """
    port = free_port()
    seed = int.from_bytes(os.urandom(6), "little")
    size = 32 * M
    with dmemfs(tmp_path, f"size=64M,pagesize=2M,metrics={port},{path_options(data_path)}") \
            as mount:
        target = mount.path / "paged"
        presize(target, size)
        fd = os.open(target, os.O_RDWR)
        try:
            with mmap.mmap(fd, size, mmap.MAP_SHARED) as area:
                words = np.frombuffer(area, dtype="<u8")
                try:
                    words[:] = pattern(seed, 0, size)
                    area.madvise(MADV_PAGEOUT)
                    dirty = resident(area)
                    before = daemon_bytes(port)
                    assert first_difference(words, seed, 0) is None
                    read_dirty, _ = daemon_bytes_since(port, before)
                    area.flush()  # msync(MS_SYNC): clean, and mapped again by the read
                    area.madvise(MADV_PAGEOUT)
                    clean = resident(area)
                    before = daemon_bytes(port)
                    assert first_difference(words, seed, 0) is None
                    read_clean, _ = daemon_bytes_since(port, before)
                finally:
                    del words  # the mapping cannot close while a view of it exists
        finally:
            os.close(fd)
        pages = size // PAGE
        print(f"\n{data_path}: resident after MADV_PAGEOUT of {size // M} MiB: dirty "
              f"{dirty * PAGE / M:.0f} MiB (read back: {read_dirty / M:.0f} MiB from the "
              f"daemon), after msync {clean * PAGE / M:.0f} MiB (read back: "
              f"{read_clean / M:.0f} MiB from the daemon)")
        assert dirty == pages and read_dirty == 0
        if data_path == "region":
            assert clean == 0 and read_clean == size
        else:
            assert clean == pages and read_clean == 0
        check_file(target, seed, size)
        assert_accounting(mount)
    assert mount.exit_code == 0, mount.log()

# QEMU's own anonymous memory (TCG, its heap) is about 80 MiB; 160 MiB leaves a
# region-path guest at most 80 MiB of its 128 MiB resident.  DMEMFS_GUEST_LIMIT_MIB
# tries another limit (memory.high stays 16 MiB below it).
GUEST_LIMIT_MIB = int(os.environ.get("DMEMFS_GUEST_LIMIT_MIB", "160"))
GUEST_HIGH_MIB = GUEST_LIMIT_MIB - 16


def test_booted_guest_under_a_memory_limit(guest: Guest, tmp_path: Path,  # noqa: F811
                                           data_path: str) -> None:
    """A TCG guest whose 128 MiB of RAM is a share=on dmemfs file boots, writes its
    pattern and twice fills 40 MiB more, with QEMU in a 160 MiB memory cgroup.

    Region path: the guest's RAM is page cache charged to QEMU, so the limit is hit, and
    the daemon returns more than the guest's RAM (each page once at its first touch, and
    again each time reclaim evicted it).  Passthrough: the guest's RAM is the daemon's
    memory and QEMU stays below the guest's size.  On both the pattern is in the file
    afterwards, QEMU exits cleanly and no dpage is lost.
    """
    port = free_port()
    with dmemfs(tmp_path, f"size=256M,pagesize=2M,metrics={port},{path_options(data_path)}") \
            as mount, memory_cgroup(GUEST_LIMIT_MIB * M, GUEST_HIGH_MIB * M) as group:
        vm0 = mount.path / "vm0"
        presize(vm0, GUEST_MIB * M)
        seed = secrets.randbits(48)
        args = ["sh", "-c", 'echo $$ > "$0" && exec "$@"', str(group.procs),
                *qemu_args(guest, file_form(vm0, share=True, prealloc=False), seed)]
        before = daemon_bytes(port)
        started = time.monotonic()
        with qemu(args) as vm:
            _, runs = pattern_runs(vm)
            for _ in range(2):
                vm.send("fill 40\n")
                assert "DMEMFS-FILL-OK" in vm.wait_for("DMEMFS-FILL-"), vm.output()
            shmem = group.stat()["shmem"]  # while the guest's RAM is mapped
            power_off(vm)
        elapsed = time.monotonic() - started
        read, written = daemon_bytes_since(port, before)
        peak, hits, kills = group.peak(), group.limit_hits(), group.oom_kills()
        print(f"\n{data_path}, cgroup v{group.version}: {elapsed:.1f} s, QEMU peak "
              f"{peak / M:.1f} MiB (shmem {shmem / M:.1f} MiB), limit {GUEST_LIMIT_MIB} MiB "
              f"hit {hits} times, OOM kills {kills}; the daemon stored "
              f"{written / M:.0f} MiB and returned {read / M:.0f} MiB")
        assert kills == 0
        if data_path == "region":
            assert hits > 0, "QEMU never met its limit: no pressure"
            assert read > GUEST_MIB * M, "no page of the guest's RAM was evicted and read again"
        else:
            # The guest's RAM is shmem; charged to QEMU, it would show here.  (The rest of
            # QEMU's charge is its own heap and whatever disk page cache it read first.)
            assert shmem == 0, "QEMU was charged for the guest's RAM"
            assert (read, written) == (0, 0), "passthrough I/O reached the daemon"
        assert_pattern_in_file(vm0, seed, runs)
        assert_accounting(mount)
        vm0.unlink()
        assert_all_free(mount)
    assert mount.exit_code == 0, mount.log()


if __name__ == "__main__":
    if len(sys.argv) != 7 or sys.argv[1] != "worker":
        sys.exit(f"usage: {sys.argv[0]} worker PROCS MODE PATH SEED SIZE")
    worker_main(*sys.argv[2:])
