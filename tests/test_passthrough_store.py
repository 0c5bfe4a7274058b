"""PassthroughStore and PoolMemory without a FUSE mount: the ledger against the kernel's
count, on a real pool (two tmpfs instances, so root is needed, but no daemon)."""

from __future__ import annotations

import errno
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from mounting import require_mounts

from dmemfs_fuse.alloc.poolset import PoolSet
from dmemfs_fuse.alloc.runs import Extent
from dmemfs_fuse.files.extents import FileExtents
from dmemfs_fuse.files.inodes import Inode
from dmemfs_fuse.files.passthrough import PassthroughStore
from dmemfs_fuse.memory import shmem
from dmemfs_fuse.memory.region import PoolSpec, RegionPlan
from dmemfs_fuse.memory.shmem import FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE, ShmemMemory

MIB = 1 << 20
DPS = 2 * MIB
DPAGES = 16


@pytest.fixture
def store(tmp_path: Path) -> Iterator[PassthroughStore]:
    require_mounts(fuse=False)  # the pool's tmpfs instances
    plan = RegionPlan(pools=(PoolSpec(0, DPAGES * DPS),), dpage_size=DPS, backend="shmem",
                      path=str(tmp_path / "pools"))
    memory = ShmemMemory.open(plan, tmp_path / "pools", 100)
    try:
        yield PassthroughStore(memory, PoolSet.from_plan(plan, 0))
    finally:
        memory.close()


def _file(ino: int) -> Inode:
    inode = Inode(ino=ino, mode=0o100644, uid=0, gid=0)
    inode.data = FileExtents(ino)
    return inode


def _memory(store: PassthroughStore) -> tuple[int, int]:
    stats = store.memory.pools[0].statistics()
    return stats.reserve_bytes, stats.file_bytes


def test_resize_lends_and_gives_back(store: PassthroughStore) -> None:
    f = _file(2)
    assert f.data is not None
    store.resize(f.data, 0, 5 * DPS + 1)
    assert f.data.mapped == 6 and store.pools.free_dpages == DPAGES - 6
    assert _memory(store) == ((DPAGES - 6) * DPS, 6 * DPS)
    store.resize(f.data, 5 * DPS + 1, DPS)
    assert f.data.mapped == 1 and _memory(store) == ((DPAGES - 1) * DPS, DPS)
    store.release(f.data)
    assert store.pools.free_dpages == DPAGES and store.backing_path(2) is None
    assert _memory(store)[1] == DPS  # the bytes stay until the release is committed
    store.purge()
    assert _memory(store) == (DPAGES * DPS, 0)


def test_what_the_kernel_wrote_is_entered_by_sync(store: PassthroughStore) -> None:
    f = _file(3)
    assert f.data is not None
    store.place(3)
    path = store.backing_path(3)
    assert path is not None
    fd = os.open(path, os.O_RDWR)
    try:
        os.pwrite(fd, b"a" * 100, 0)
        os.pwrite(fd, b"b", 7 * DPS + 5)  # a sparse write: dpages 0 and 7
    finally:
        os.close(fd)
    store.sync(f)
    assert f.size == 7 * DPS + 6
    assert [(fd_, n) for fd_, _, n in f.data.runs()] == [(0, 1), (7, 1)]
    store.reconcile({3: f}, set())
    assert _memory(store) == ((DPAGES - 2) * DPS, 2 * DPS)


def test_a_lend_the_memory_cannot_cover_changes_nothing(store: PassthroughStore) -> None:
    """Memory the ledger does not know of fills the pool (here a file put beside the
    backing files, as a removed file that is still mapped would): a truncate the ledger
    allows fails with ENOSPC and leaves no page behind in the file."""
    stranger = store.memory.pools[0].files_dir / "stranger"
    stranger.write_bytes(b"s" * (10 * DPS))
    store.memory.pools[0].balance()
    f = _file(4)
    assert f.data is not None
    with pytest.raises(OSError) as err:
        store.resize(f.data, 0, 8 * DPS)
    assert err.value.errno == errno.ENOSPC
    assert f.data.mapped == 0 and store.pools.free_dpages == DPAGES
    path = store.backing_path(4)
    assert path is not None and os.stat(path).st_blocks == 0
    assert _memory(store) == ((DPAGES - 10) * DPS, 10 * DPS)
    stranger.unlink()
    store.memory.pools[0].balance()
    assert _memory(store) == (DPAGES * DPS, 0)


def test_adopt_removes_backing_files_no_inode_names(store: PassthroughStore) -> None:
    kept, dropped = _file(5), _file(6)
    for inode in (kept, dropped):
        assert inode.data is not None
        store.resize(inode.data, 0, DPS)
    again = PassthroughStore(store.memory, store.pools)
    assert again.discover() == 2
    assert kept.data is not None and dropped.data is not None
    store.pools.free(dropped.data.truncate(0))  # recovery never saw inode 6
    assert again.adopt({5: kept}) == 1
    assert again.backing_path(6) is None and again.backing_path(5) is not None
    assert _memory(store) == ((DPAGES - 1) * DPS, DPS)


def test_a_release_that_never_committed_is_undone_by_adopt(store: PassthroughStore) -> None:
    """release() renames the backing file aside; only purge (after the commit) removes it.
    A kill in between leaves the metadata naming the file: adoption takes it back."""
    kept, gone = _file(7), _file(8)
    for inode in (kept, gone):
        assert inode.data is not None
        store.resize(inode.data, 0, DPS)
        inode.size = DPS
    assert kept.data is not None and gone.data is not None
    path = store.backing_path(7)
    assert path is not None
    with open(path, "r+b") as f:
        f.write(b"precious")
    store.release(kept.data)
    store.release(gone.data)  # both released; the kill comes before any commit
    assert _memory(store)[1] == 2 * DPS  # not removed yet
    again = PassthroughStore(store.memory, store.pools)
    again.discover()
    kept.data = FileExtents(7)  # recovered with no extents: sync enters its dpage
    assert again.adopt({7: kept}) == 1  # gone's backing file is removed
    back = again.backing_path(7)
    assert back is not None and Path(back).read_bytes()[:8] == b"precious"
    assert kept.size == DPS and kept.data.mapped == 1
    assert _memory(store) == ((DPAGES - 1) * DPS, DPS)


def test_what_the_ledger_cannot_enter_is_counted_once_and_retried(
        store: PassthroughStore) -> None:
    f = _file(9)
    assert f.data is not None
    store.place(9)
    store.pools.claim([Extent(0, DPAGES)])  # the ledger is full; the files instance is not
    path = store.backing_path(9)
    assert path is not None
    with open(path, "r+b") as backing:
        backing.write(b"k" * (DPS + 1))
    store.sync(f)
    store.sync(f)
    assert store.unledgered_dpages == 2 and f.data.mapped == 0
    store.pools.free([Extent(0, DPAGES)])
    store.sync(f)  # nothing changed in the file, but the ledger has room now
    assert store.unledgered_dpages == 0 and f.data.mapped == 2


# -- pages fallocated but not written yet (cachestat) -------------------------------------


def test_cachestat_sees_fallocated_pages_that_mincore_and_seek_data_do_not() -> None:
    """On tmpfs a fallocated page not written yet is no data for SEEK_DATA or mincore;
    cachestat counts it, and holds_pages asks cachestat first."""
    with tempfile.TemporaryFile(dir="/dev/shm") as f:
        fd = f.fileno()
        os.ftruncate(fd, 4 * DPS)
        shmem.fallocate(fd, DPS, DPS, shmem.FALLOC_FL_KEEP_SIZE)
        with pytest.raises(OSError) as none:
            os.lseek(fd, 0, os.SEEK_DATA)
        assert none.value.errno == errno.ENXIO
        assert shmem.cached_pages(fd, 0, 4 * DPS) == DPS // 4096
        assert shmem.cached_pages(fd, 0, DPS) == 0
        assert shmem.holds_pages(fd, DPS, DPS) and not shmem.holds_pages(fd, 2 * DPS, DPS)


@contextmanager
def _backing(store: PassthroughStore, ino: int) -> Iterator[int]:
    """The backing file of *ino*, open for reading and writing behind the ledger's back
    (as the kernel's passed-through writes, a killed request or MADV_REMOVE would)."""
    path = store.backing_path(ino)
    assert path is not None
    fd = os.open(path, os.O_RDWR)
    try:
        yield fd
    finally:
        os.close(fd)


def _punch(store: PassthroughStore, ino: int, off: int, length: int) -> None:
    """Punch the backing file of *ino* behind the ledger's back."""
    with _backing(store, ino) as fd:
        shmem.fallocate(fd, off, length, shmem.FALLOC_FL_PUNCH_HOLE | shmem.FALLOC_FL_KEEP_SIZE)


def test_adopt_gives_back_the_dpages_the_backing_file_no_longer_holds(
        store: PassthroughStore) -> None:
    """Four dpages lent (0 written, 1 only fallocated, 2 punched whole, 3 punched in
    part): adoption gives back dpage 2 alone, whatever was written or not."""
    f = _file(10)
    assert f.data is not None
    store.resize(f.data, 0, 4 * DPS)
    f.size = 4 * DPS
    path = store.backing_path(10)
    assert path is not None
    with open(path, "r+b") as backing:
        backing.write(b"w" * 100)
    _punch(store, 10, 2 * DPS, DPS)
    _punch(store, 10, 3 * DPS, 4096)
    again = PassthroughStore(store.memory, store.pools)
    again.discover()
    assert again.adopt({10: f}) == 0
    assert [(first, count) for first, _, count in f.data.runs()] == [(0, 2), (3, 1)]
    assert store.pools.free_dpages == DPAGES - 3
    # The 4 KiB punched out of dpage 3 went back to the kernel; the reserve moves in
    # whole dpages.
    assert _memory(store) == ((DPAGES - 3) * DPS, 3 * DPS - 4096)


def test_adopt_enters_a_lend_whose_commit_the_kill_prevented(store: PassthroughStore) -> None:
    """A truncate up killed after the backing file was sized and fallocated but before its
    commit: the recovered file has no extents, and adoption enters every dpage the
    backing file holds, written or not, with its size."""
    f = _file(11)
    assert f.data is not None
    store.place(11)
    with _backing(store, 11) as fd:
        shmem.fallocate(fd, 0, 3 * DPS, shmem.FALLOC_FL_KEEP_SIZE)
        os.ftruncate(fd, 3 * DPS)
    again = PassthroughStore(store.memory, store.pools)
    again.discover()
    assert again.adopt({11: f}) == 0
    assert f.size == 3 * DPS and f.data.mapped == 3
    assert store.pools.free_dpages == DPAGES - 3
    assert _memory(store) == ((DPAGES - 3) * DPS, 3 * DPS)


def test_a_punch_of_part_of_a_dpage_not_written_yet_keeps_it(store: PassthroughStore) -> None:
    """A balloon gives back 4 KiB of a dpage the guest never touched: the rest of the
    dpage is still fallocated in the backing file, so the dpage stays lent."""
    f = _file(12)
    assert f.data is not None
    store.resize(f.data, 0, 2 * DPS)
    store.fallocate(f.data, 2 * DPS, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, 4096, 4096)
    assert f.data.mapped == 2 and store.pools.free_dpages == DPAGES - 2
    store.fallocate(f.data, 2 * DPS, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, 0, DPS)
    assert f.data.mapped == 1 and store.pools.free_dpages == DPAGES - 1
