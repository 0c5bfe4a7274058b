"""The passthrough data path: each file its own shmem file, passed through by the kernel.

What it promises, on real mounts: it is the default where it can work and
refused clearly where it cannot; a mapping costs the file's pages and no page
cache copy, keeps working after the daemon is killed, and can be pinned for
the long term (what vfio needs); the pool's ledger stays exact whoever
allocates, the daemon (truncate) or the kernel (a passed-through write); and
reserve + files = pool at every step.
"""

from __future__ import annotations

import ctypes
import errno
import json
import mmap
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from mounting import (
    Mount,
    dmemctl,
    dmemfs,
    free_port,
    metrics,
    run_daemon,
    start_over,
    status,
    unmount,
)
from test_qemu import _long_term_pin

from dmemfs_fuse.host.daemon import pool_memory_dir
from dmemfs_fuse.sizes import ceil_div

MIB = 1 << 20
DPAGE = 2 * MIB
MADV_PAGEOUT = 21
POOL = "size=64M,pagesize=2M"


def _meminfo(field: str) -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) * 1024
    raise KeyError(field)


def _pool_memory(mount: Mount) -> dict[str, int]:
    """The one pool's memory as the kernel counts it (reserve + files = pool)."""
    st = status(mount)
    assert st["data_path"]["name"] == "passthrough", st["data_path"]
    (pool,) = st["pool_memory"]
    return pool  # type: ignore[no-any-return]


def _settled(mount: Mount) -> dict[str, int]:
    """The pool memory once the ledger task has caught up with the kernel (statfs does)."""
    mount.statvfs()
    return _pool_memory(mount)


@pytest.fixture
def pmnt(tmp_path: Path) -> Iterator[Mount]:
    """A 64 MiB passthrough mount (refused, not skipped, where passthrough cannot work)."""
    with dmemfs(tmp_path, f"{POOL},passthrough=on") as mount:
        yield mount
    assert mount.exit_code == 0, mount.log()


def test_passthrough_is_the_default_here(tmp_path: Path) -> None:
    port = free_port()
    with dmemfs(tmp_path, f"{POOL},metrics={port}") as mount:
        st = status(mount)
        assert st["data_path"]["name"] == "passthrough"
        assert "passthrough" in st["fuse"]["enabled"]
        assert "data path: passthrough" in mount.log()
        found = metrics(port)
        info = [k for k in found if k.startswith('dmemfs_data_path_info{path="passthrough"')]
        assert len(info) == 1 and found[info[0]] == 1
        assert found['dmemfs_pool_reserve_bytes{node="0",pool="0"}'] == 64 * MIB
        text = dmemctl("status", "-m", str(mount.path)).stdout
        assert "data path: passthrough" in text


def test_region_path_when_asked(tmp_path: Path) -> None:
    with dmemfs(tmp_path, f"{POOL},passthrough=off") as mount:
        st = status(mount)
        assert st["data_path"] == {"name": "region", "reason": "passthrough=off"}
        assert st["pool_memory"] is None


@pytest.mark.parametrize(("options", "reason"), [
    ("size=1G,pagesize=1G", "1G dpages come only from hugetlbfs"),
    ("size=64M,region=memfd", "region=memfd names the region's memory"),
    ("size=64M,reserve_hugepages", "hugetlbfs and reserve_hugepages"),
])
def test_impossible_passthrough_on_is_refused(tmp_path: Path, options: str, reason: str) -> None:
    result = run_daemon(tmp_path, f"{options},passthrough=on")
    assert result.returncode != 0
    assert f"passthrough=on: {reason}" in result.stderr
    assert "Traceback" not in result.stderr


def test_auto_falls_back_to_the_region_with_the_reason(tmp_path: Path) -> None:
    with dmemfs(tmp_path, "size=64M,region=memfd,pagesize=2M") as mount:
        st = status(mount)
        assert st["data_path"] == {"name": "region",
                                   "reason": "region=memfd names the region's memory"}


def test_truncate_lends_from_the_reserve_all_or_nothing(pmnt: Mount) -> None:
    path = pmnt.path / "f"
    path.touch()
    huge_before = _meminfo("ShmemHugePages")
    os.truncate(path, 20 * MIB + 1)
    assert pmnt.free_dpages() == 32 - 11
    # The memory moved from the reserve to the file in whole huge pages: none was split.
    assert _meminfo("ShmemHugePages") == huge_before
    assert _pool_memory(pmnt) | {"short_bytes": 0} == {
        "node": 0, "size": 64 * MIB, "reserve_bytes": 42 * MIB, "file_bytes": 22 * MIB,
        "short_bytes": 0}
    with pytest.raises(OSError) as err:
        os.truncate(path, 64 * MIB + 1)
    assert err.value.errno == errno.ENOSPC
    assert path.stat().st_size == 20 * MIB + 1  # nothing changed
    assert pmnt.free_dpages() == 32 - 11
    assert _pool_memory(pmnt)["reserve_bytes"] == 42 * MIB
    os.truncate(path, 3 * MIB)
    assert pmnt.free_dpages() == 30
    assert _pool_memory(pmnt)["reserve_bytes"] == 60 * MIB
    path.unlink()
    assert pmnt.free_dpages() == 32
    assert _settled(pmnt)["reserve_bytes"] == 64 * MIB


def test_kernel_writes_are_entered_in_the_ledger(pmnt: Mount) -> None:
    """A passed-through write allocates without asking the daemon: the ledger, statfs and
    the reserve follow, and past the pool the writer gets ENOSPC from the kernel."""
    path = pmnt.path / "w"
    data = os.urandom(MIB)
    with open(path, "wb") as f:
        for _ in range(10):
            f.write(data)
    assert path.stat().st_size == 10 * MIB
    assert pmnt.free_dpages() == 32 - 5
    assert _settled(pmnt)["reserve_bytes"] == 54 * MIB
    assert path.read_bytes() == data * 10
    with pytest.raises(OSError) as err, open(path, "ab") as f:
        for _ in range(64):
            f.write(data)
            f.flush()
    assert err.value.errno == errno.ENOSPC
    assert pmnt.free_dpages() == 0
    pool = _settled(pmnt)
    assert pool["file_bytes"] == 64 * MIB and pool["reserve_bytes"] == 0
    assert status(pmnt)["unledgered_dpages"] == 0
    path.unlink()
    assert pmnt.free_dpages() == 32
    assert _settled(pmnt)["reserve_bytes"] == 64 * MIB


@pytest.mark.parametrize(("how", "size"), [("truncate", 3 * MIB + 1), ("O_TRUNC open", 0)])
def test_a_truncate_takes_in_what_the_kernel_wrote_first(pmnt: Mount, how: str,
                                                         size: int) -> None:
    """A truncate by another opener while a writer still holds the file: the daemon may
    not have seen the writer's bytes yet (the kernel wrote them to the backing file), so
    it takes them in first (store.sync).  Else a shrink from a size it never saw would
    look like a growth, and the dpages past the new end, which the kernel cuts, would
    stay in the ledger.  An O_TRUNC open truncates inside the daemon's open
    (atomic_o_trunc), through the same truncate; it cuts to 0, so nothing can stay
    there, and only its result is checked."""
    path = pmnt.path / "t"
    data = os.urandom(MIB)
    with open(path, "wb") as writer:
        for _ in range(6):
            writer.write(data)
            writer.flush()
        if how == "truncate":
            os.truncate(path, size)
        else:
            os.close(os.open(path, os.O_WRONLY | os.O_TRUNC))
        kept = ceil_div(size, DPAGE)
        assert path.stat().st_size == size
        assert pmnt.free_dpages() == 32 - kept
        assert _settled(pmnt)["reserve_bytes"] == 64 * MIB - kept * DPAGE
        writer.write(b"z")  # at the writer's offset, 6 MiB, as on tmpfs: a hole before it
    assert path.stat().st_size == 6 * MIB + 1
    assert pmnt.free_dpages() == 32 - kept - 1
    assert path.read_bytes() == (data * 4)[:size] + bytes(6 * MIB - size) + b"z"
    assert _settled(pmnt)["reserve_bytes"] == 64 * MIB - (kept + 1) * DPAGE
    assert status(pmnt)["unledgered_dpages"] == 0


def test_sparse_write_past_the_pool(pmnt: Mount) -> None:
    path = pmnt.path / "sparse"
    with open(path, "wb") as f:
        f.seek(2 << 30)
        f.write(b"xy")
    st = path.stat()
    assert st.st_size == (2 << 30) + 2
    assert pmnt.free_dpages() == 31
    with open(path, "rb") as f:
        f.seek((2 << 30) - 4)
        assert f.read() == b"\0\0\0\0xy"


def test_no_file_reads_what_another_wrote(pmnt: Mount) -> None:
    first = pmnt.path / "first"
    first.write_bytes(b"\xa5" * (60 * MIB))
    first.unlink()
    assert pmnt.free_dpages() == 32
    second = pmnt.path / "second"
    with open(second, "wb") as f:
        os.ftruncate(f.fileno(), 60 * MIB)
    with open(second, "rb") as f:
        while chunk := f.read(4 * MIB):
            assert chunk.count(0) == len(chunk)


def test_placement_on_the_pool_node(pmnt: Mount) -> None:
    path = pmnt.path / "placed"
    path.write_bytes(b"z" * (8 * MIB))
    found = json.loads(dmemctl("--json", "extents", str(path)).stdout)
    assert found["allocated"] == 8 * MIB
    assert {tuple(e["kernel_nodes"]) for e in found["extents"]} == {(0,)}


def test_poison_is_refused_on_passthrough(pmnt: Mount) -> None:
    path = pmnt.path / "p"
    path.write_bytes(b"p" * DPAGE)
    result = dmemctl("poison", f"{path}:0", check=False)
    assert result.returncode != 0
    assert "passthrough data path" in result.stderr


def test_a_mapping_adds_no_page_cache_copy(tmp_path: Path) -> None:
    """Touching and msyncing 512 MiB of a sized file takes at most 2% more host memory
    than the file's own pages, which the pool had already taken."""
    with dmemfs(tmp_path, "size=576M,pagesize=2M,passthrough=on") as mount:
        path = mount.path / "vm"
        size = 512 * MIB
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            os.ftruncate(fd, size)
            free_before = _meminfo("MemFree")
            area = mmap.mmap(fd, size, flags=mmap.MAP_SHARED)
            try:
                for offset in range(0, size, mmap.PAGESIZE):
                    area[offset] = 1
                area.flush()
                added = free_before - _meminfo("MemFree")
            finally:
                area.close()
        finally:
            os.close(fd)
        assert added <= size * 0.02, f"{added / MIB:.1f} MiB added"
        pool = _settled(mount)
        assert pool["file_bytes"] == size and pool["reserve_bytes"] == 64 * MIB


def _kill_daemon(mount: Mount) -> None:
    mount.proc.send_signal(signal.SIGKILL)
    mount.proc.wait()


def test_a_mapping_outlives_a_killed_daemon(tmp_path: Path) -> None:
    """After kill -9 and MADV_PAGEOUT a process keeps reading and writing its mapping; the
    bytes are in the backing file, and the next daemon on the mount point adopts it with
    everything the process wrote, before and after the kill."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    size = 16 * MIB
    pattern = bytes(range(256)) * (size // 256)
    with dmemfs(tmp_path, f"{POOL},passthrough=on") as mount:
        path = mount.path / "guest-ram"
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        os.ftruncate(fd, size)
        area = mmap.mmap(fd, size, flags=mmap.MAP_SHARED)
        os.close(fd)
        try:
            area[:] = pattern
            area.flush()
            _kill_daemon(mount)
            base = ctypes.addressof(ctypes.c_char.from_buffer(area))
            assert libc.madvise(base, size, MADV_PAGEOUT) == 0, os.strerror(ctypes.get_errno())
            assert area[:] == pattern
            area[0:5] = b"after"
            assert area[0:5] == b"after"
            with pytest.raises(OSError) as err:
                os.stat(path)
            assert err.value.errno == errno.ENOTCONN
        except BaseException:
            area.close()
            raise
    # A new daemon on the same mount point detaches the dead mount and adopts the file.
    expected = b"after" + pattern[5:]
    try:
        with dmemfs(tmp_path, f"{POOL},passthrough=on") as again:
            log = again.log()
            assert "adopted 64 MiB of shmem" in log and "recovered from" in log
            assert (again.path / "guest-ram").read_bytes() == expected
            assert again.free_dpages() == 32 - 8
            area[5:10] = b"again"  # the old mapping and the new mount share the bytes
            assert (again.path / "guest-ram").read_bytes()[:10] == b"afteragain"
    finally:
        area.close()


def test_a_mapping_can_be_pinned_for_the_long_term(pmnt: Mount) -> None:
    """io_uring buffer registration takes the pin vfio takes (FOLL_LONGTERM); the region
    path refuses it (test_qemu), the passthrough path maps shmem and allows it."""
    assert _long_term_pin(pmnt.path / "pinned", shared=True) == 0


def _our_pool_mounts(mount: Mount) -> list[str]:
    """``TARGET OPTIONS`` of the tmpfs instances that hold *mount*'s pool memory."""
    return _our_pool_mounts_at(mount.path)


def _our_pool_mounts_at(mountpoint: Path) -> list[str]:
    base = str(pool_memory_dir(str(mountpoint)))
    table = subprocess.run(["findmnt", "-rn", "-o", "TARGET,OPTIONS", "-t", "tmpfs"],
                           capture_output=True, text=True, check=True).stdout
    return [line for line in table.splitlines() if line.startswith(base + "/")]


def test_pool_memory_is_kept_out_of_swap_and_bound(pmnt: Mount) -> None:
    ours = _our_pool_mounts(pmnt)
    assert [line.split()[0].rsplit("/", 1)[1] for line in ours] == ["reserve", "files"]
    for line in ours:
        assert all(o in line.split()[1].split(",") for o in
                   ("noswap", "huge=always", "size=65536k", "mpol=bind:0", "mode=700"))


def test_clean_stop_gives_the_memory_back(tmp_path: Path) -> None:
    shmem_before = _meminfo("Shmem")
    with dmemfs(tmp_path, "size=256M,pagesize=2M,passthrough=on") as mount:
        assert _meminfo("Shmem") - shmem_before >= 250 * MIB
        (mount.path / "f").write_bytes(b"f" * MIB)
        assert len(_our_pool_mounts(mount)) == 2
    deadline = time.monotonic() + 5
    while _meminfo("Shmem") - shmem_before > 16 * MIB and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _meminfo("Shmem") - shmem_before <= 16 * MIB
    assert _our_pool_mounts(mount) == []
    assert not pool_memory_dir(str(mount.path)).exists()


def _pools_of(path: Path) -> set[int]:
    found = json.loads(dmemctl("--json", "extents", str(path)).stdout)
    return {e["pool"] for e in found["extents"]}


def test_policies_choose_each_file_s_pool(tmp_path: Path) -> None:
    """A file lives in one pool's tmpfs; the policy picks it when the file is created."""
    with dmemfs(tmp_path, "nodes=0:32M,0:32M,pagesize=2M,passthrough=on") as mount:
        local = mount.path / "local"
        local.write_bytes(b"l" * DPAGE)
        assert _pools_of(local) == {0}  # both pools are on node 0: the first
        bound = mount.path / "bound"
        bound.mkdir()
        os.setxattr(bound, "user.dmem.policy", b"bind:1")
        (bound / "f").write_bytes(b"b" * (4 * DPAGE))
        assert _pools_of(bound / "f") == {1}
        spread = mount.path / "spread"
        spread.mkdir()
        os.setxattr(spread, "user.dmem.policy", b"interleave:0-1")
        for name in "abcd":
            (spread / name).write_bytes(b"i" * DPAGE)
        assert [_pools_of(spread / name) for name in "abcd"] == [{0}, {1}, {0}, {1}]
        # bind:1 is full at 32 MiB: the kernel refuses the write past it, ENOSPC.
        with pytest.raises(OSError) as err:
            (bound / "g").write_bytes(b"g" * (14 * DPAGE))
        assert err.value.errno == errno.ENOSPC
        (bound / "g").unlink()
        # preferred:1 with pool 1 full (nearly): a new file goes to the next pool.
        os.truncate(bound / "f", 14 * DPAGE)  # pool 1: 14 + spread/b and d = 16, full
        preferred = mount.path / "pref"
        preferred.mkdir()
        os.setxattr(preferred, "user.dmem.policy", b"preferred:1")
        (preferred / "p").write_bytes(b"p" * DPAGE)
        assert _pools_of(preferred / "p") == {0}
        st = status(mount)
        for pool, memory in zip(st["pools"], st["pool_memory"], strict=True):
            assert memory["file_bytes"] == pool["used_dpages"] * DPAGE
            assert memory["reserve_bytes"] + memory["file_bytes"] == memory["size"]


def _kill_and_restart_files(tmp_path: Path) -> dict[str, bytes]:
    """Files of every kind on a passthrough mount whose daemon is then killed."""
    contents = {"small": b"hello\n", "d/big": os.urandom(5 * MIB), "d/e/sized": bytes(9 * MIB)}
    with dmemfs(tmp_path, f"{POOL},passthrough=on") as mount:
        (mount.path / "d" / "e").mkdir(parents=True)
        for name, data in contents.items():
            (mount.path / name).write_bytes(data)
        os.setxattr(mount.path / "small", "user.note", b"kept")
        os.chmod(mount.path / "small", 0o640)
        os.utime(mount.path / "small", ns=(1_000_000_000, 2_000_000_000))
        os.symlink("d/big", mount.path / "link")
        os.link(mount.path / "d" / "big", mount.path / "hard")
        # Written by the kernel (passed through) right before the kill: in no commit yet.
        with open(mount.path / "d" / "big", "r+b") as f:
            f.seek(0, os.SEEK_END)
            f.write(b"tail")
        contents["d/big"] += b"tail"
        _kill_daemon(mount)
    return contents


def test_a_restart_after_kill_adopts_every_file(tmp_path: Path) -> None:
    contents = _kill_and_restart_files(tmp_path)
    with dmemfs(tmp_path, f"{POOL},passthrough=on") as mount:
        for name, data in contents.items():
            assert (mount.path / name).read_bytes() == data, name
        small = (mount.path / "small").stat()
        assert (small.st_mode & 0o777, small.st_mtime_ns) == (0o640, 2_000_000_000)
        assert os.getxattr(mount.path / "small", "user.note") == b"kept"
        assert os.readlink(mount.path / "link") == "d/big"
        assert (mount.path / "hard").stat().st_ino == (mount.path / "d" / "big").stat().st_ino
        used = sum(-(-len(d) // DPAGE) for d in contents.values())
        assert mount.free_dpages() == 32 - used
        pool = _settled(mount)
        assert pool["file_bytes"] == used * DPAGE
        assert pool["reserve_bytes"] == 64 * MIB - used * DPAGE
        for name in contents:
            (mount.path / name).unlink()
        (mount.path / "hard").unlink()
        assert mount.free_dpages() == 32
    # An orderly stop ends the files, as on tmpfs: the next mount is empty.
    with dmemfs(tmp_path, f"{POOL},passthrough=on") as mount:
        assert os.listdir(mount.path) == []
        assert "adopted" not in mount.log()


def test_start_empty_after_a_kill_detaches_the_old_files(tmp_path: Path) -> None:
    _kill_and_restart_files(tmp_path)
    with dmemfs(tmp_path, f"{POOL},passthrough=on,start_empty") as mount:
        assert os.listdir(mount.path) == []
        assert mount.free_dpages() == 32
        assert "detached 2 pool memory mount(s)" in mount.log()
    _remove_discarded(mount.path)


def _remove_discarded(mountpoint: Path) -> None:
    """The metadata start_empty set aside (kept, never deleted, by the daemon)."""
    base = pool_memory_dir(str(mountpoint))
    aside = list(base.parent.glob(base.name + ".meta.discarded-*"))
    assert aside
    for path in aside:
        path.unlink()


def test_a_restart_refuses_when_the_pool_memory_is_gone(tmp_path: Path) -> None:
    _kill_and_restart_files(tmp_path)
    mountpoint = tmp_path / "mnt"
    for line in _our_pool_mounts_at(mountpoint):
        subprocess.run(["umount", "-l", line.split()[0]], check=True)
    result = run_daemon(tmp_path, f"{POOL},passthrough=on", name="mnt")
    assert result.returncode == 2, result.stderr
    assert "is not mounted: the pool memory the metadata describes is gone" in result.stderr
    assert "start_empty" in result.stderr and "Traceback" not in result.stderr
    with dmemfs(tmp_path, f"{POOL},passthrough=on,start_empty") as mount:
        assert os.listdir(mount.path) == []
    _remove_discarded(mount.path)


def test_the_next_daemon_detaches_a_dead_mount_itself(tmp_path: Path) -> None:
    """No `fusermount3 -u -z` needed by hand: a daemon started on a dead dmemfs mount
    point detaches it, mounts, and adopts the files."""
    with dmemfs(tmp_path, f"{POOL},passthrough=on") as mount:
        (mount.path / "kept").write_bytes(b"kept")
        _kill_daemon(mount)
        log_path = tmp_path / "second.log"
        proc = start_over(mount.path, f"{POOL},passthrough=on", log_path)
        try:
            text = log_path.read_text()
            assert "detached the dmemfs mount of a daemon that died" in text, text
            assert (mount.path / "kept").read_bytes() == b"kept"
        finally:
            assert unmount(mount.path, proc) == 0, log_path.read_text()


def test_a_restart_that_cannot_adopt_changes_nothing(tmp_path: Path) -> None:
    """A file whose backing file is gone stops the start with start_empty named; the pool
    memory and the metadata stay exactly as the dead daemon left them."""
    _kill_and_restart_files(tmp_path)
    mountpoint = tmp_path / "mnt"
    base = pool_memory_dir(str(mountpoint))
    meta = Path(str(base) + ".meta")
    victim = next(p for p in (base / "pool0" / "files").iterdir()
                  if p.stat().st_size == 5 * MIB + 4)  # d/big
    victim.unlink()
    before = meta.read_bytes()
    result = run_daemon(tmp_path, f"{POOL},passthrough=on", name="mnt")
    assert result.returncode == 2, result.stderr
    assert "has no backing file: its bytes are gone" in result.stderr
    assert "start_empty" in result.stderr and "Traceback" not in result.stderr
    assert meta.read_bytes() == before
    assert len(_our_pool_mounts_at(mountpoint)) == 2
    with dmemfs(tmp_path, f"{POOL},passthrough=on,start_empty") as mount:
        assert os.listdir(mount.path) == []
    _remove_discarded(mount.path)
