"""Huge page pools: what is free, where hugetlbfs is mounted, and reserving pages via sysfs.

A reservation records exactly how many pages it added on each node, so that
:meth:`HugePageReservation.release` gives back what it took and nothing else,
even if someone else changed ``nr_hugepages`` in the meantime.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

from humanfriendly import parse_size

from .numa import NODE_ROOT

log = logging.getLogger(__name__)

# The dpage sizes a mount may use: the base page and the two huge page sizes.
DPAGE_SIZES = {"4K": 4 << 10, "2M": 2 << 20, "1G": 1 << 30}
GLOBAL_ROOT = Path("/sys/kernel/mm/hugepages")
HUGETLBFS_MAGIC = 0x958458F6


def _dir(size: int) -> str:
    return f"hugepages-{size // 1024}kB"


def supported(size: int) -> bool:
    """Whether the kernel has a huge page pool of *size* bytes."""
    return (GLOBAL_ROOT / _dir(size)).is_dir()


def _read(path: Path) -> int:
    return int(path.read_text().strip())


def available(size: int) -> int:
    """Huge pages of *size* that are free and not promised to a mapping (free - resv)."""
    root = GLOBAL_ROOT / _dir(size)
    if not root.is_dir():
        return 0
    return _read(root / "free_hugepages") - _read(root / "resv_hugepages")


def node_path(size: int, node: int, name: str) -> Path:
    """The per-node sysfs file *name* for huge pages of *size* on *node*."""
    per_node = NODE_ROOT / f"node{node}" / "hugepages" / _dir(size) / name
    return per_node if per_node.parent.is_dir() else GLOBAL_ROOT / _dir(size) / name


def default_size() -> int:
    """The kernel's default huge page size in bytes (``Hugepagesize`` in /proc/meminfo)."""
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("Hugepagesize:"):
            return int(line.split()[1]) * 1024
    return 2 * 1024 * 1024


def hugetlbfs_mounts(size: int) -> list[Path]:
    """Mount points of hugetlbfs instances whose page size is *size*."""
    out: list[Path] = []
    for line in Path("/proc/mounts").read_text().splitlines():
        fields = line.split()
        if len(fields) < 4 or fields[2] != "hugetlbfs":
            continue
        pagesize = default_size()
        for opt in fields[3].split(","):
            if opt.startswith("pagesize="):
                pagesize = parse_size(opt.split("=", 1)[1], binary=True)
        if pagesize == size:
            out.append(Path(fields[1].replace("\\040", " ")))
    return out


@dataclass
class HugePageReservation:
    """Huge pages this process added to the kernel's pools, per node, to be given back on exit."""

    size: int
    added: dict[int, int] = field(default_factory=dict)

    def reserve(self, node: int, count: int) -> None:
        """Raise node *node*'s pool by *count* pages; raise OSError if the kernel gives fewer."""
        path = node_path(self.size, node, "nr_hugepages")
        before = _read(path)
        started = time.monotonic()
        path.write_text(str(before + count))
        after = _read(path)
        got = after - before
        if got > 0:
            self.added[node] = self.added.get(node, 0) + got
        log.info("reserved %d of %d huge pages of %d KiB on node %d in %.2f s",
                 got, count, self.size // 1024, node, time.monotonic() - started)
        if got < count:
            raise OSError(
                12, f"node {node}: the kernel gave {got} of {count} huge pages of "
                f"{self.size // 1024} KiB (memory too fragmented or too small); "
                "reserve them at boot (hugepages= on the kernel command line) instead",
            )

    def release(self) -> None:
        """Give back every page this reservation added.  Never raises; logs what it could not do."""
        for node, count in sorted(self.added.items()):
            path = node_path(self.size, node, "nr_hugepages")
            try:
                now = _read(path)
                path.write_text(str(max(0, now - count)))
                log.info("gave back %d huge pages of %d KiB on node %d", count,
                         self.size // 1024, node)
            except OSError as exc:
                log.error("could not give back %d huge pages on node %d: %s", count, node, exc)
        self.added.clear()
