"""What the control socket and the metrics endpoint report: a read-only projection.

:meth:`Reporter.statistics` gathers the frozen statistics records of the pools,
the zeroer, the pool memory, the journal and recovery into one
:class:`MountStats`; ``status`` and the metrics are built from that record.  The
other answers (extents, files, policy, map) read the live objects.  Nothing
here changes anything: actions are control.py's.  Every method is synchronous,
so under trio each answer is a consistent snapshot.  The results are JSON-ready
dicts; sizes are in bytes unless a name says dpages.
"""

from __future__ import annotations

import errno
import logging
from dataclasses import asdict, dataclass
from typing import Any, Protocol

from ..adapter.connection import Negotiated
from ..adapter.datapath import REGION, DataPath
from ..alloc.poolset import PoolSetStats
from ..alloc.runs import Extent
from ..alloc.zeroing import ZeroerStats
from ..errors import fs_error
from ..files.inodes import ROOT_INO, Inode, InodeTable
from ..files.passthrough import PassthroughStore
from ..files.poison import MemoryErrors
from ..files.store import FileStore
from ..memory import numa
from ..memory.region import Region
from ..memory.shmem import PoolMemoryStats
from ..metadata.journal import Journal, JournalStats
from ..metadata.recovery import RecoveryReport

log = logging.getLogger(__name__)

JSON = dict[str, Any]


class FuseView(Protocol):
    """What the reporter reads of the FUSE side: whether requests are traced, and what INIT
    negotiated."""

    trace: bool
    connection: Negotiated | None


@dataclass(frozen=True)
class MountStats:
    """One consistent snapshot of a mount's counters, from the frozen records of its parts.

    Fields:
        region: what the memory is (the region or pool memory, described).
        data_path: the mount's data path and why.
        pools: the pools' totals and each pool's record.
        pool_ids: the name policies use for each pool, in the order of ``pools.pools``.
        pool_memory: passthrough: each pool's memory as the kernel counts it; else None.
        unledgered_dpages: passthrough: dpages the kernel allocated that the ledger has
            not entered yet.
        zeroing: the region path's zeroer; None on passthrough (shmem zeroes).
        memory_errors: dpages newly marked bad since start.
        inodes_used: inodes in use.
        inodes_total: the most there may be.
        trace: whether requests are traced.
        connection: what FUSE INIT negotiated; None before it.
        journal: the journal's counters; None when the mount is not persistent.
        recovered: what recovery found; None unless the mount was recovered.
    """

    region: str
    data_path: DataPath
    pools: PoolSetStats
    pool_ids: tuple[int, ...]
    pool_memory: tuple[PoolMemoryStats, ...] | None
    unledgered_dpages: int
    zeroing: ZeroerStats | None
    memory_errors: int
    inodes_used: int
    inodes_total: int
    trace: bool
    connection: Negotiated | None
    journal: JournalStats | None
    recovered: RecoveryReport | None

    def dirty_dpages(self) -> int:
        """Dpages that may still hold old bytes: the zeroer's backlog (none on passthrough)."""
        return self.zeroing.dirty_dpages if self.zeroing is not None else 0


class Reporter:
    """Answers the questions `dmemctl` and monitoring ask about a mounted dmemfs."""

    def __init__(self, inodes: InodeTable, store: FileStore | PassthroughStore,
                 region_description: str, fuse: FuseView, *,
                 errors: MemoryErrors | None = None, journal: Journal | None = None,
                 data_path: DataPath | None = None,
                 recovered: RecoveryReport | None = None, region: Region | None = None) -> None:
        self.inodes = inodes
        self.store = store
        self.data_path = data_path or DataPath(REGION, "passthrough=off")
        self.pools = store.pools
        self.region_description = region_description
        self.fuse = fuse
        self.errors = errors
        self.journal = journal
        self.recovered = recovered
        # The region path's mapped region, where the kernel is asked which node holds a page.
        self.region = region

    def statistics(self) -> MountStats:
        """A frozen snapshot of every counter of the mount."""
        store = self.store
        return MountStats(
            region=self.region_description,
            data_path=self.data_path,
            pools=self.pools.statistics(),
            pool_ids=tuple(self.pools.pool_id(pool) for pool in self.pools.pools),
            pool_memory=tuple(m.statistics() for m in store.memory.pools)
            if isinstance(store, PassthroughStore) else None,
            unledgered_dpages=store.unledgered_dpages
            if isinstance(store, PassthroughStore) else 0,
            zeroing=None if isinstance(store, PassthroughStore) else store.zeroer.statistics(),
            memory_errors=self.errors.events if self.errors is not None else 0,
            inodes_used=self.inodes.used,
            inodes_total=self.inodes.nr_inodes,
            trace=self.fuse.trace,
            connection=self.fuse.connection,
            journal=self.journal.statistics() if self.journal is not None else None,
            recovered=self.recovered,
        )

    def status(self) -> JSON:
        """Per pool and in total: dpages total/free/used, largest free run, fragmentation."""
        return status_of(self.statistics())

    def extents(self, ino: int) -> JSON:
        """A file's extents: file offset, pool, node, region offset and length, in bytes."""
        inode = self._file(ino)
        assert inode.data is not None
        dps = self.store.dpage_size
        out = []
        for run_file, run_region, run_length in inode.data.runs():
            # A run may cross from one pool into the next: report each part.
            for pool, piece in self.pools.split(Extent(run_region, run_length)):
                region, part = piece.start, piece.length
                file_offset = (run_file + region - run_region) * dps
                if isinstance(self.store, PassthroughStore):  # the backing file's pages
                    nodes = self.store.page_nodes(ino, file_offset, part * dps)
                else:
                    nodes = self._kernel_nodes(region * dps, part * dps)
                # On passthrough the region offset is the dpage's place in the ledger.
                out.append({"file_offset": file_offset,
                            "pool": self.pools.pool_id(pool), "node": pool.node,
                            "region_offset": region * dps, "length": part * dps,
                            "kernel_nodes": nodes})
        return {"ino": ino, "size": inode.size, "allocated": inode.data.mapped * dps,
                "policy": str(inode.policy or "local"), "extents": out}

    def files(self, limit: int = 20) -> JSON:
        """The largest consumers of dpages, largest first."""
        dps = self.store.dpage_size
        holders = sorted((n for n in self.inodes.inodes.values() if n.data and n.data.mapped),
                         key=lambda n: (-(n.data.mapped if n.data else 0), n.ino))[:limit]
        paths = self._paths({n.ino for n in holders})
        return {"files": [{
            "path": paths.get(n.ino, f"(deleted, inode {n.ino})"), "ino": n.ino,
            "size": n.size, "allocated": (n.data.mapped if n.data else 0) * dps,
            "extents": len(n.data) if n.data else 0, "policy": str(n.policy or "local"),
            "open": n.open_count,
        } for n in holders]}

    def policy(self, ino: int) -> JSON:
        """The policy of a file or directory, and whether it was set on it."""
        inode = self.inodes.get(ino)
        return {"ino": ino, "policy": str(inode.policy or "local"),
                "explicit": inode.policy is not None}

    def map(self) -> JSON:
        """Every pool's used runs with their owners, for drawing: ``[start, length, ino]``."""
        owners: list[tuple[int, int, int]] = []
        for inode in self.inodes.inodes.values():
            if inode.data is not None:
                owners.extend((region, length, inode.ino)
                              for _, region, length in inode.data.runs())
        owners.sort()
        paths = self._paths({ino for _, _, ino in owners})
        used: dict[int, list[list[int]]] = {pool.index: [] for pool in self.pools.pools}
        for start, length, ino in owners:
            for pool, part in self.pools.split(Extent(start, length)):
                used[pool.index].append([part.start - pool.first_dpage, part.length, ino])
        pools = [{"pool": self.pools.pool_id(pool), "node": pool.node,
                  "total_dpages": pool.size, "used": used[pool.index]} for pool in self.pools.pools]
        return {"dpage_size": self.store.dpage_size, "pools": pools,
                "names": {str(ino): paths.get(ino, f"(deleted, inode {ino})")
                          for _, _, ino in owners}}

    def _kernel_nodes(self, offset: int, length: int) -> list[int]:
        """The nodes the kernel says hold the extent's first, middle and last page."""
        if self.region is None:
            return []
        base = self.region.addr
        probes = numa.probe_offsets(offset, length)
        try:
            return sorted(set(numa.page_nodes([base + p for p in probes])))
        except OSError as exc:
            log.debug("move_pages: %s", exc)
            return []

    def _file(self, ino: int) -> Inode:
        inode = self.inodes.get(ino)
        if inode.data is None:
            raise fs_error(errno.EINVAL, f"inode {ino} is not a regular file")
        return inode

    def _paths(self, wanted: set[int]) -> dict[int, str]:
        """Paths (relative to the mount) of the linked inodes in *wanted*; one walk of the tree."""
        found: dict[int, str] = {}
        stack: list[tuple[int, str]] = [(ROOT_INO, "")]
        while stack and len(found) < len(wanted):
            ino, prefix = stack.pop()
            directory = self.inodes.inodes[ino].dir
            assert directory is not None
            for name, (child, _) in directory.entries.items():
                path = f"{prefix}/{name.decode(errors='replace')}"
                if child in wanted and child not in found:
                    found[child] = path
                if self.inodes.inodes[child].dir is not None:
                    stack.append((child, path))
        return found


def status_of(stats: MountStats) -> JSON:
    """*stats* as ``dmemctl status`` shows it (JSON-ready)."""
    dps = stats.pools.dpage_size
    pools = [{
        "pool": pool_id, "index": st.index, "node": st.node,
        "dpage_size": dps, "total_dpages": st.total_dpages,
        "free_dpages": st.free_dpages, "used_dpages": st.used_dpages,
        "largest_free_run": st.largest_free_run, "free_runs": st.free_runs,
        "fragmentation": round(st.fragmentation, 4), "allocs": st.allocs,
        "frees": st.frees, "fallback_dpages": st.fallback_dpages,
        "bad_dpages": st.bad_dpages,
    } for pool_id, st in zip(stats.pool_ids, stats.pools.pools, strict=True)]
    totals = stats.pools
    return {
        "region": stats.region,
        "data_path": {"name": stats.data_path.name, "reason": stats.data_path.reason},
        # Passthrough: the memory as the kernel counts it (reserve + files = pool).
        "pool_memory": [asdict(m) for m in stats.pool_memory]
        if stats.pool_memory is not None else None,
        "unledgered_dpages": stats.unledgered_dpages,
        "dpage_size": dps,
        "total_dpages": totals.total_dpages,
        "free_dpages": totals.free_dpages,
        "used_dpages": totals.total_dpages - totals.free_dpages,
        "total_bytes": totals.total_dpages * dps,
        "free_bytes": totals.free_dpages * dps,
        "enospc": totals.enospc,
        "bad_dpages": totals.bad_dpages,
        # Dpages that may still hold old bytes: free ones, and (deferred zeroing)
        # ones a file has not touched yet.  The background zeroer's backlog.
        "dirty_dpages": stats.dirty_dpages(),
        "zeroing": asdict(stats.zeroing) if stats.zeroing is not None else None,
        "memory_errors": stats.memory_errors,
        "inodes_used": stats.inodes_used,
        "inodes_total": stats.inodes_total,
        "trace": stats.trace,
        "fuse": stats.connection.describe() if stats.connection else None,
        "persistent": stats.journal is not None,
        "journal": asdict(stats.journal) if stats.journal is not None else None,
        "recovered": asdict(stats.recovered) if stats.recovered is not None else None,
        "pools": pools,
    }
