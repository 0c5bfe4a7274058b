"""File bytes in a region store, without a mount: in a bytearray (tests/regions.py), and
in a real, small memfd region for where its pages live."""

from __future__ import annotations

import errno

import pytest
from regions import BufferRegion

from dmemfs_fuse.alloc.poolset import PoolSet
from dmemfs_fuse.files.extents import FileExtents
from dmemfs_fuse.files.store import FileStore
from dmemfs_fuse.memory import numa
from dmemfs_fuse.memory.region import PoolSpec, Region, RegionPlan

DPS = 4096
POOL = 64 * DPS


PLAN = RegionPlan(pools=(PoolSpec(0, POOL), PoolSpec(0, POOL)), dpage_size=DPS,
                  backend="memfd")


@pytest.fixture
def store() -> FileStore:
    return FileStore(BufferRegion(PLAN.size, DPS), PoolSet.from_plan(PLAN, 0))


def test_write_read_roundtrip_and_zero_copy(store: FileStore) -> None:
    fx = FileExtents()
    data = bytes(range(256)) * 64  # 16 KiB, 4 dpages
    size, written = store.write(fx, 0, 100, data)
    assert written == len(data)
    assert size == 100 + len(data)
    out = store.read(fx, size, 0, size)
    assert bytes(out) == b"\0" * 100 + data
    assert isinstance(out, memoryview), "a contiguous read is a view of the region"
    assert store.read(fx, size, size, 10) == b""


def test_sparse_write_leaves_holes(store: FileStore) -> None:
    fx = FileExtents()
    size, _ = store.write(fx, 0, 10 * DPS, b"x")
    assert fx.mapped == 1
    assert bytes(store.read(fx, size, 0, size)) == b"\0" * (10 * DPS) + b"x"


def test_freed_dpages_are_zeroed_before_reuse(store: FileStore) -> None:
    a = FileExtents()
    store.write(a, 0, 0, b"\xff" * (POOL * 2))
    assert store.pools.free_dpages == 0
    store.release(a)
    b = FileExtents()
    store.resize(b, 0, POOL * 2)
    assert bytes(store.read(b, POOL * 2, 0, POOL * 2)) == b"\0" * (POOL * 2)


def test_shrink_then_grow_reads_zeros(store: FileStore) -> None:
    fx = FileExtents()
    store.write(fx, 0, 0, b"\xaa" * (3 * DPS))
    store.resize(fx, 3 * DPS, DPS + 10)
    store.resize(fx, DPS + 10, 3 * DPS)
    out = bytes(store.read(fx, 3 * DPS, 0, 3 * DPS))
    assert out == b"\xaa" * (DPS + 10) + b"\0" * (2 * DPS - 10)


def test_enospc_is_all_or_nothing(store: FileStore) -> None:
    fx = FileExtents()
    store.resize(fx, 0, 100 * DPS)
    free = store.pools.free_dpages
    other = FileExtents()
    store.write(other, 0, 0, b"1")
    with pytest.raises(OSError) as info:
        store.write(other, DPS, 5 * DPS, b"2" * (free * DPS))
    assert info.value.errno == errno.ENOSPC
    assert store.pools.free_dpages == free - 1 and other.mapped == 1
    with pytest.raises(OSError) as info:  # larger than the region: the pools are short
        store.resize(fx, 100 * DPS, 200 * DPS)
    assert info.value.errno == errno.ENOSPC and fx.mapped == 100
    for pool in store.pools.pools:
        pool.check()


def test_truncate_as_large_as_free_space(store: FileStore) -> None:
    fx = FileExtents()
    store.resize(fx, 0, 128 * DPS)
    assert store.pools.free_dpages == 0
    store.resize(fx, 128 * DPS, 0)
    assert store.pools.free_dpages == 128


def test_region_pages_live_on_their_pools_node() -> None:
    region = Region.open(PLAN)
    try:
        assert region.locked
        addresses = [region.addr + offset for offset in range(0, region.size, 16 * DPS)]
        assert set(numa.page_nodes(addresses)) == {0}  # the one node of this machine
    finally:
        region.close()
