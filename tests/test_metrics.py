"""The Prometheus pool collector on plain parts, without a mount: each gauge and counter
against the state that made it, and against ``dmemctl status``, which is built from the
same MountStats (test_control and test_monitoring read them through a real mount)."""

from __future__ import annotations

import errno
import stat
from types import SimpleNamespace

import pytest
from prometheus_client import CollectorRegistry
from regions import BufferRegion

from dmemfs_fuse.alloc.poolset import PoolSet
from dmemfs_fuse.files.data import FileData
from dmemfs_fuse.files.inodes import ROOT_INO, InodeTable
from dmemfs_fuse.files.store import FileStore
from dmemfs_fuse.insight.metrics import PoolCollector
from dmemfs_fuse.insight.report import Reporter
from dmemfs_fuse.memory.region import PoolSpec, RegionPlan

DPS = 4096
POOL_DPAGES = 16
PLAN = RegionPlan(pools=(PoolSpec(0, POOL_DPAGES * DPS), PoolSpec(0, POOL_DPAGES * DPS)),
                  dpage_size=DPS, backend="memfd")


class Mount:
    """The plain parts of a region-path mount, a reporter on them and a registry."""

    def __init__(self) -> None:
        self.pools = PoolSet.from_plan(PLAN, 0)
        self.store = FileStore(BufferRegion(PLAN.size, DPS), self.pools)
        self.inodes = InodeTable(100, release_data=self.store.release)
        self.data = FileData(self.inodes, self.store)
        fuse = SimpleNamespace(trace=False, connection=None)
        self.reporter = Reporter(self.inodes, self.store, "a test buffer", fuse)
        self.registry = CollectorRegistry()
        self.registry.register(PoolCollector(self.reporter))

    def file(self, name: bytes) -> int:
        return self.inodes.make(ROOT_INO, name, stat.S_IFREG | 0o644, 0, 0).ino

    def value(self, name: str, pool: int | None = None) -> float:
        labels = {"pool": str(pool), "node": "0"} if pool is not None else {}
        got = self.registry.get_sample_value(name, labels)
        assert got is not None, f"{name} {labels} is not exported"
        return got


@pytest.fixture
def mount() -> Mount:
    return Mount()


def test_pool_gauges_follow_allocation_and_match_status(mount: Mount) -> None:
    ino = mount.file(b"f")
    mount.data.write(ino, 0, b"x" * (5 * DPS), node=0)  # five dpages, first fit in pool 0
    mount.data.write(ino, 8 * DPS, b"y", node=0)  # one more, after a hole of three
    status = mount.reporter.status()
    for index, pool in enumerate(status["pools"]):
        pool_id = pool["pool"]
        assert mount.value("dmemfs_pool_total_bytes", pool_id) == POOL_DPAGES * DPS
        for metric, key in (("free_bytes", "free_dpages"), ("used_bytes", "used_dpages"),
                            ("largest_free_run_bytes", "largest_free_run")):
            assert mount.value(f"dmemfs_pool_{metric}", pool_id) == pool[key] * DPS, metric
        for metric, key in (("free_runs", "free_runs"), ("bad_dpages", "bad_dpages"),
                            ("fragmentation_ratio", "fragmentation"),
                            ("allocations_total", "allocs"), ("frees_total", "frees"),
                            ("preferred_fallback_dpages_total", "fallback_dpages")):
            assert mount.value(f"dmemfs_pool_{metric}", pool_id) == pool[key], metric
        used = 6 if index == 0 else 0
        assert pool["used_dpages"] == used
        assert mount.value("dmemfs_pool_used_bytes", pool_id) == used * DPS
    assert mount.value("dmemfs_pool_allocations_total", status["pools"][0]["pool"]) == 2
    assert mount.value("dmemfs_dpage_size_bytes") == DPS
    assert mount.value("dmemfs_inodes_used") == status["inodes_used"] == 2  # root and f
    assert mount.value("dmemfs_inodes_total") == 100
    assert mount.registry.get_sample_value(
        "dmemfs_data_path_info", {"path": "region", "reason": "passthrough=off"}) == 1
    # Not persistent, not passthrough: those families are absent, not zero.
    assert mount.registry.get_sample_value("dmemfs_journal_healthy") is None
    assert mount.registry.get_sample_value("dmemfs_pool_reserve_bytes",
                                           {"pool": "0", "node": "0"}) is None


def test_freed_dpages_are_the_zeroers_backlog_until_it_steps(mount: Mount) -> None:
    ino = mount.file(b"f")
    mount.data.write(ino, 0, b"x" * (4 * DPS), node=0)
    mount.data.truncate(ino, DPS, node=0)  # three dpages freed, dirty
    pool_id = mount.reporter.status()["pools"][0]["pool"]
    assert mount.value("dmemfs_pool_frees_total", pool_id) == 1
    assert mount.value("dmemfs_dirty_bytes") == 3 * DPS
    assert mount.reporter.status()["dirty_dpages"] == 3
    assert mount.value("dmemfs_background_zeroed_bytes_total") == 0
    while mount.store.zeroer.step():
        pass
    assert mount.value("dmemfs_dirty_bytes") == 0
    assert mount.value("dmemfs_background_zeroed_bytes_total") == 3 * DPS
    assert mount.value("dmemfs_foreground_zeroed_bytes_total") == 0
    # Freed again and taken before the zeroer ran: zeroed inside the request.
    mount.data.truncate(ino, 0, node=0)
    mount.data.truncate(mount.file(b"g"), DPS, node=0)
    assert mount.value("dmemfs_foreground_zeroed_bytes_total") == DPS


def test_refused_allocations_are_counted(mount: Mount) -> None:
    ino = mount.file(b"f")
    with pytest.raises(OSError) as refused:
        mount.data.truncate(ino, (2 * POOL_DPAGES + 1) * DPS, node=0)
    assert refused.value.errno == errno.ENOSPC
    assert mount.value("dmemfs_enospc_total") == mount.reporter.status()["enospc"] == 1
    assert mount.value("dmemfs_pool_used_bytes", 0) == 0  # all or nothing
