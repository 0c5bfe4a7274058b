"""What the control socket and the metrics endpoint report: plain data from the live objects.

Every method is synchronous and reads (or, for policy and trace, changes)
state in one step, so under trio each answer is a consistent snapshot.  The
results are JSON-ready dicts; sizes are in bytes unless a name says dpages.
"""

from __future__ import annotations

import errno
import logging
from dataclasses import asdict
from typing import Any, Protocol

from ..adapter.connection import Negotiated
from ..adapter.datapath import REGION, DataPath
from ..alloc.runs import Extent
from ..errors import fs_error
from ..files.inodes import ROOT_INO, Inode, InodeTable
from ..files.passthrough import PassthroughStore
from ..files.poison import MemoryErrors, Poisoned, hwpoisoned_dpages, send_mce_notice
from ..files.store import FileStore
from ..memory import numa
from ..metadata.journal import Journal
from ..metadata.recovery import RecoveryReport

log = logging.getLogger(__name__)

JSON = dict[str, Any]


class Frontend(Protocol):
    """What the reporter needs from the FUSE side: the trace, the journal, the page cache."""

    trace: bool
    connection: Negotiated | None

    def set_trace(self, on: bool) -> None:
        """Turn the trace on or off."""

    def commit(self) -> None:
        """Write pending metadata changes to the journal (no-op when not persistent)."""

    def invalidate_later(self, ino: int) -> None:
        """Drop the kernel's cached pages of *ino* soon (outside any request)."""

    async def flush_invalidations(self) -> None:
        """Carry out the invalidations asked for so far."""


class Reporter:
    """Answers the questions `dmemctl` and monitoring ask about a mounted dmemfs."""

    def __init__(self, inodes: InodeTable, store: FileStore | PassthroughStore,
                 region_description: str, frontend: Frontend, *,
                 errors: MemoryErrors | None = None, journal: Journal | None = None,
                 data_path: DataPath | None = None) -> None:
        self.inodes = inodes
        self.store = store
        self.data_path = data_path or DataPath(REGION, "passthrough=off")
        self.pools = store.pools
        self.region_description = region_description
        self.frontend = frontend
        self.errors = errors or MemoryErrors(inodes, store)  # type: ignore[arg-type]
        self.journal = journal
        # Set by the daemon when the mount was recovered from its metadata file.
        self.recovery: RecoveryReport | None = None

    def status(self) -> JSON:
        """Per pool and in total: dpages total/free/used, largest free run, fragmentation."""
        stats = self.pools.statistics()
        dps = stats.dpage_size
        pools = []
        for pool, st in zip(self.pools.pools, stats.pools, strict=True):
            pools.append({
                "pool": self.pools.pool_id(pool), "index": st.index, "node": st.node,
                "dpage_size": dps, "total_dpages": st.total_dpages,
                "free_dpages": st.free_dpages, "used_dpages": st.used_dpages,
                "largest_free_run": st.largest_free_run, "free_runs": st.free_runs,
                "fragmentation": round(st.fragmentation, 4), "allocs": st.allocs,
                "frees": st.frees, "fallback_dpages": st.fallback_dpages,
                "bad_dpages": st.bad_dpages,
            })
        store = self.store
        if isinstance(store, PassthroughStore):
            # shmem zeroes a page at its first use in a file: no backlog, no zeroer.
            dirty, zeroing = 0, None
        else:
            dirty, zeroing = store.dirty.dpages, asdict(store.zeroer.statistics())
        return {
            "region": self.region_description,
            "data_path": {"name": self.data_path.name, "reason": self.data_path.reason},
            # Passthrough: the memory as the kernel counts it (reserve + files = pool).
            "pool_memory": [asdict(m.statistics()) for m in store.memory.pools]
            if isinstance(store, PassthroughStore) else None,
            "unledgered_dpages": store.unledgered_dpages
            if isinstance(store, PassthroughStore) else 0,
            "dpage_size": dps,
            "total_dpages": stats.total_dpages,
            "free_dpages": stats.free_dpages,
            "used_dpages": stats.total_dpages - stats.free_dpages,
            "total_bytes": stats.total_dpages * dps,
            "free_bytes": stats.free_dpages * dps,
            "enospc": stats.enospc,
            "bad_dpages": stats.bad_dpages,
            # Dpages that may still hold old bytes: free ones, and (deferred zeroing)
            # ones a file has not touched yet.  The background zeroer's backlog.
            "dirty_dpages": dirty,
            "zeroing": zeroing,
            "memory_errors": self.errors.events,
            "inodes_used": self.inodes.used,
            "inodes_total": self.inodes.nr_inodes,
            "trace": self.frontend.trace,
            "fuse": conn.describe() if (conn := self.frontend.connection) else None,
            "persistent": self.journal is not None,
            "journal": asdict(self.journal.statistics()) if self.journal else None,
            "recovered": asdict(self.recovery) if self.recovery else None,
            "pools": pools,
        }

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

    def policy(self, ino: int, text: str | None = None) -> JSON:
        """Read, or set when *text* is given, the policy of a file or directory."""
        if text is not None:
            self.inodes.set_policy(ino, text)
            self.frontend.commit()
        inode = self.inodes.get(ino)
        return {"ino": ino, "policy": str(inode.policy or "local"),
                "explicit": inode.policy is not None}

    def set_trace(self, on: bool) -> JSON:
        """Turn the per-request trace on or off."""
        self.frontend.set_trace(on)
        log.info("request trace %s", "on" if on else "off")
        return {"trace": on}

    def _region(self, what: str) -> FileStore:
        """The region store, or EOPNOTSUPP saying why *what* has no meaning on passthrough."""
        if isinstance(self.store, PassthroughStore):
            raise fs_error(errno.EOPNOTSUPP, f"{what}: this mount uses the passthrough data "
                           "path, whose pages are the kernel's shmem; a memory error there is "
                           "the kernel's to handle (EIO on read, SIGBUS on a fault), and "
                           "dpages are units of the pool, not places in memory to mark bad")
        return self.store

    def poison(self, offset: int, ino: int | None = None) -> JSON:
        """Mark bad the dpage at region byte *offset*, or at byte *offset* of file *ino*."""
        region = self._region("poison").region
        dps = self.store.dpage_size
        if ino is not None:
            dpage = self.errors.locate(ino, offset)
        elif 0 <= offset < region.size:
            dpage = offset // dps
        else:
            raise fs_error(errno.EINVAL, f"region offset {offset} is outside the region "
                           f"({region.size} bytes)")
        return self._marked(self.errors.mark(dpage, "operator"))

    def notify_kernel_error(self, offset: int) -> JSON:
        """Have the daemon receive the SIGBUS BUS_MCEERR_AO the kernel sends for poison at
        region byte *offset* (poison.send_mce_notice): the kernel path, end to end."""
        region = self._region("poison --kernel").region
        if not 0 <= offset < region.size:
            raise fs_error(errno.EINVAL, f"region offset {offset} is outside the region")
        send_mce_notice(region.addr + offset)
        return {"sent": True, "region_offset": offset}

    def kernel_error(self, offset: int, length: int, *, rescan: bool = True) -> JSON:
        """The kernel reported a memory error in region bytes ``[offset, offset+length)``
        (a page, or a whole huge page): mark every dpage there bad, then rescan, because
        SIGBUS does not queue and a second notice may have been merged into this one."""
        dps = self.store.dpage_size
        last = min(offset + max(length, 1), self._region("memory errors").region.size) - 1
        marked = [self._marked(self.errors.mark(d, "kernel"))
                  for d in range(offset // dps, last // dps + 1)]
        found: list[JSON] = []
        if rescan:
            try:
                found = self.scan()["bad"]
            except Exception as exc:  # the notice itself is handled; the rescan is extra
                log.warning("rescan after a memory-error notice failed: %s", exc)
        return {"marked": marked, "rescan": found}

    def scan(self) -> JSON:
        """Look for HWPOISON frames under the region and mark their dpages bad."""
        region = self._region("scan").region
        dpages, frames = hwpoisoned_dpages(region.addr, region.size, region.dpage_size)
        marked = [self._marked(self.errors.mark(d, "scan")) for d in dpages]
        return {"frames_checked": frames, "bad": marked}

    def _marked(self, result: Poisoned) -> JSON:
        # Invalidate first: the page cache must go even if the journal write fails.
        if result.owner is not None and result.newly:
            self.frontend.invalidate_later(result.owner)
        self.frontend.commit()
        return asdict(result)

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
        base = self._region("kernel nodes").region.addr
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
