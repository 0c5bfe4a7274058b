"""The plan: mount options resolved against this machine before any memory is taken.

Everything here reads the options and the machine's facts, and returns the
plain records the layers below act on: a RegionPlan for the memory, a DataPath
for the adapter, a MetaPlan for persistence.  A ConfigError from here stops the
start with one line, having reserved nothing.
"""

from __future__ import annotations

import logging
import os
import stat
from collections.abc import Callable
from pathlib import Path

import pyfuse3

from ..adapter.caller import CAP_SYS_ADMIN, has_capability
from ..adapter.connection import Negotiated
from ..adapter.datapath import PASSTHROUGH, REGION, DataPath
from ..errors import ConfigError
from ..memory import hugepages, numa
from ..memory.hugepages import DPAGE_SIZES
from ..memory.region import PoolSpec, RegionPlan, meminfo_available, on_hugetlbfs
from ..memory.shmem import shmem_huge_possible
from ..metadata.persistence import MetaPlan, default_meta_path
from ..sizes import human
from .options import MountOptions

log = logging.getLogger(__name__)


def plan_region(opts: MountOptions) -> RegionPlan:
    """Resolve *opts* against this machine; raise ConfigError if the plan cannot work."""
    nodes = numa.online_nodes()
    warnings: list[str] = []
    huge_2m = DPAGE_SIZES["2M"]
    pagesize = opts.pagesize
    if pagesize is None:
        if opts.region.startswith("/") and on_hugetlbfs(opts.region):
            pagesize = os.statvfs(os.path.dirname(opts.region)).f_bsize
        else:
            wanted = _requested_bytes(opts, nodes) // huge_2m
            enough = hugepages.supported(huge_2m) and hugepages.available(huge_2m) >= wanted
            pagesize = huge_2m if enough or opts.reserve_hugepages else DPAGE_SIZES["4K"]
    pools = plan_pools(opts, nodes, pagesize)
    total = sum(p.size for p in pools)
    huge = pagesize > DPAGE_SIZES["4K"] and hugepages.supported(pagesize)
    if pagesize > DPAGE_SIZES["4K"] and not hugepages.supported(pagesize):
        warnings.append(f"the kernel has no {human(pagesize)} huge pages")
    reserve: dict[int, int] = {}
    enough = False
    if huge:
        need = total // pagesize
        enough = hugepages.available(pagesize) >= need
        if not enough and opts.reserve_hugepages:
            for node in sorted({p.node for p in pools}):
                node_need = sum(p.size for p in pools if p.node == node) // pagesize
                free = int(hugepages.node_path(pagesize, node, "free_hugepages").read_text())
                if node_need > free:
                    reserve[node] = node_need - free
            enough = True
    short = (f"{hugepages.available(pagesize) if huge else 0} free huge pages of "
             f"{human(pagesize)}, {total // pagesize} needed")
    backend: str
    path: str | None = None
    if opts.region.startswith("/"):
        backend, path = "path", opts.region
        check_region_path(path, total)
    elif opts.region == "hugetlbfs":
        if not huge:
            raise ConfigError(f"region=hugetlbfs: needs pagesize 2M or 1G with kernel support, "
                              f"not {human(pagesize)}")
        path = _hugetlbfs_dir(opts, pagesize)
        if path is None:
            raise ConfigError(f"region=hugetlbfs: no hugetlbfs with pagesize={human(pagesize)} "
                              "is mounted; mount one or name it with hugetlbfs=DIR")
        if not enough:
            raise ConfigError(f"region=hugetlbfs: {short}; add reserve_hugepages or raise "
                              "/proc/sys/vm/nr_hugepages")
        backend = "hugetlbfs"
    else:
        path = _hugetlbfs_dir(opts, pagesize) if huge and opts.region == "auto" else None
        if huge and enough:
            backend = "hugetlbfs" if path else "memfd-hugetlb"
        else:
            backend, path = "memfd", None
            if huge:
                warnings.append(f"{short}: falling back to a plain memfd of small pages "
                                f"(dpages stay {human(pagesize)}); add reserve_hugepages or "
                                "raise /proc/sys/vm/nr_hugepages for huge pages")
    if backend == "memfd" or (backend == "path" and not on_hugetlbfs(path or "")):
        _check_available(total)
    return RegionPlan(pools=tuple(pools), dpage_size=pagesize, backend=backend, path=path,
                      reserve=reserve, allow_unlocked=opts.allow_unlocked,
                      warnings=tuple(warnings))


def plan_pools(opts: MountOptions, nodes: list[int], pagesize: int) -> tuple[PoolSpec, ...]:
    """The pools *opts* ask for on a machine with memory on *nodes*, sized in *pagesize*
    dpages; ConfigError if they cannot be."""
    if opts.nodes:
        for spec in opts.nodes:
            if spec.node not in nodes:
                raise ConfigError(f"nodes: node {spec.node} does not exist or has no memory "
                                  f"(nodes with memory: {', '.join(map(str, nodes))})")
        pools = tuple(opts.nodes)
    else:
        assert opts.size is not None
        if opts.size.all_but:
            pools = tuple(
                PoolSpec(n, (numa.node_meminfo(n).get("MemFree", 0) - opts.size.size)
                         // pagesize * pagesize)
                for n in nodes
            )
            for spec in pools:
                if spec.size <= 0:
                    raise ConfigError(f"size=!{human(opts.size.size)}: node {spec.node} has no "
                                      "more free memory than that")
        else:
            pools = tuple(PoolSpec(n, opts.size.size) for n in nodes)
    for spec in pools:
        if spec.size % pagesize:
            raise ConfigError(f"size {human(spec.size)} is not a multiple of pagesize "
                              f"{human(pagesize)}")
    return pools


def _requested_bytes(opts: MountOptions, nodes: list[int]) -> int:
    if opts.nodes:
        return sum(p.size for p in opts.nodes)
    assert opts.size is not None
    if opts.size.all_but:
        return sum(max(0, numa.node_meminfo(n).get("MemFree", 0) - opts.size.size) for n in nodes)
    return opts.size.size * len(nodes)


def _hugetlbfs_dir(opts: MountOptions, pagesize: int) -> str | None:
    if opts.hugetlbfs:
        if not on_hugetlbfs(os.path.join(opts.hugetlbfs, "x")):
            raise ConfigError(f"hugetlbfs={opts.hugetlbfs}: not a hugetlbfs mount")
        return opts.hugetlbfs
    mounts = hugepages.hugetlbfs_mounts(pagesize)
    return str(mounts[0]) if mounts else None


def _check_available(total: int) -> None:
    """ConfigError unless *total* bytes of ordinary memory are available (MemAvailable)."""
    avail = meminfo_available()
    if total > avail:
        raise ConfigError(f"size: {human(total)} wanted but only {human(avail)} of memory "
                          "is available")


def check_region_path(path: str, size: int) -> None:
    """ConfigError unless region=*path* can be a region: a file or a device, or a new file in
    a directory that exists."""
    if os.path.exists(path):
        st = os.stat(path)
        if stat.S_ISDIR(st.st_mode):
            raise ConfigError(f"region={path}: is a directory; name a file or a device")
        if not (stat.S_ISREG(st.st_mode) or stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode)):
            raise ConfigError(f"region={path}: not a regular file or a device")
    elif not os.path.isdir(os.path.dirname(path) or "/"):
        raise ConfigError(f"region={path}: its directory does not exist")


def plan_shmem(opts: MountOptions, base: Path) -> RegionPlan:
    """The pools for the passthrough path, their memory mounted at *base*: 2M dpages
    (transparent huge pages) by default, 4K where shmem may not use huge pages;
    ConfigError if the memory is not there."""
    nodes = numa.online_nodes()
    pagesize = opts.pagesize or (DPAGE_SIZES["2M"] if shmem_huge_possible()
                                 else DPAGE_SIZES["4K"])
    pools = plan_pools(opts, nodes, pagesize)
    _check_available(sum(p.size for p in pools))
    return RegionPlan(pools=pools, dpage_size=pagesize, backend="shmem", path=str(base))


# The kernel's offer is only known from an INIT, so a throwaway FUSE mount asks for it
# (connection.probe) once every cheaper reason has been ruled out.
def _blocker(opts: MountOptions) -> str | None:
    """Why the options or this process rule passthrough out, or None."""
    if opts.pagesize == DPAGE_SIZES["1G"]:
        return ("1G dpages come only from hugetlbfs, and the kernel refuses to pass through "
                "to hugetlbfs (ELOOP)")
    if opts.region != "auto":
        return f"region={opts.region} names the region's memory"
    if opts.hugetlbfs or opts.reserve_hugepages:
        return ("hugetlbfs and reserve_hugepages ask for hugetlbfs pages, which cannot be "
                "passed through")
    if opts.pagesize == DPAGE_SIZES["2M"] and not shmem_huge_possible():
        return "2M dpages need shmem transparent huge pages, which this host denies"
    if not has_capability(CAP_SYS_ADMIN):  # FUSE_DEV_IOC_BACKING_OPEN needs it
        return "registering backing files needs CAP_SYS_ADMIN"
    if not os.path.exists("/dev/fuse"):
        return "there is no /dev/fuse to probe the kernel with"
    return None


def choose_data_path(opts: MountOptions, probe: Callable[[], Negotiated]) -> DataPath:
    """The data path for *opts*: ConfigError for ``passthrough=on`` where it cannot work."""
    if opts.passthrough == "off":
        return DataPath(REGION, "passthrough=off")
    why = _blocker(opts)
    if why is None:
        try:
            found = probe()
        except (OSError, RuntimeError) as exc:
            why = f"probing the kernel's FUSE features failed: {exc}"
        else:
            if not found.capable & pyfuse3.FUSE_CAP_PASSTHROUGH:
                why = (f"the kernel (FUSE protocol {found.protocol}) or libfuse {found.libfuse} "
                       "does not offer passthrough (Linux 6.9 and libfuse 3.17 do)")
    if why is None:
        return DataPath(PASSTHROUGH, f"passthrough={opts.passthrough}: the kernel passes files "
                        "through to shmem")
    if opts.passthrough == "on":
        raise ConfigError(f"passthrough=on: {why}")
    return DataPath(REGION, why)


def plan_meta(opts: MountOptions, plan: RegionPlan) -> MetaPlan | None:
    """The metadata file for *opts*, or None when the mount does not persist."""
    if opts.meta == "none":
        return None
    path = opts.meta
    if plan.backend == "shmem":
        # The passthrough path: the backing files outlive a daemon that dies (their
        # tmpfs instances stay mounted), so the namespace goes beside them, in RUN_DIR,
        # for the next daemon to adopt them.  An orderly stop ends both, as on tmpfs.
        assert plan.path is not None and path is None  # meta=PATH takes the region path
        if opts.size is not None and opts.size.all_but:
            log.info("size=!%s: the pool sizes follow free memory, so files are not kept "
                     "for a daemon that replaces this one after a crash",
                     human(opts.size.size))
            return None
        os.makedirs(os.path.dirname(plan.path), mode=0o700, exist_ok=True)
        return MetaPlan(plan.path + ".meta", opts.start_empty, opts.checkpoint)
    if path is None:
        if plan.backend != "path" or plan.path is None:
            return None
        if os.path.exists(plan.path) and not stat.S_ISREG(os.stat(plan.path).st_mode):
            log.warning("region=%s is a device: files will not be found again after a restart "
                        "unless meta=PATH names where to keep the metadata", plan.path)
            return None
        path = default_meta_path(plan.path)
    if opts.size is not None and opts.size.all_but:
        raise ConfigError(f"size=!{human(opts.size.size)}: the pool sizes "
                          "would follow free memory and differ from start to start, so a "
                          f"persistent region (metadata {path}) needs size=SIZE or nodes=; "
                          "or meta=none")
    if not os.path.isdir(os.path.dirname(path) or "/"):
        raise ConfigError(f"meta={path}: its directory does not exist")
    if os.path.isdir(path):
        raise ConfigError(f"meta={path}: is a directory; name a file")
    if opts.start_empty and not os.path.exists(path):
        log.info("start_empty: there is no metadata at %s anyway", path)
    return MetaPlan(path, opts.start_empty, opts.checkpoint)
