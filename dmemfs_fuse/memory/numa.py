"""NUMA topology from sysfs and the memory-policy system calls, through ctypes.

Only what dmemfs needs: which nodes exist and how far apart they are, which
node a CPU (and so a calling process) is on, mbind() to bind a pool's memory
to its node, and move_pages() with no target to ask where a page really lives.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import os
import re
from pathlib import Path

from ..libc import libc

log = logging.getLogger(__name__)

NODE_ROOT = Path("/sys/devices/system/node")
MPOL_BIND = 2
MPOL_MF_STRICT = 1
MPOL_MF_MOVE = 2
_SYS_MBIND = 237  # x86_64
_SYS_MOVE_PAGES = 279  # x86_64



def parse_cpulist(text: str) -> list[int]:
    """Parse a sysfs list such as ``0-3,8,10-11`` into numbers."""
    out: list[int] = []
    for part in text.strip().split(","):
        if not part:
            continue
        lo, _, hi = part.partition("-")
        out.extend(range(int(lo), int(hi or lo) + 1))
    return out


def online_nodes() -> list[int]:
    """Nodes that have memory, from sysfs; ``[0]`` on a machine without NUMA sysfs."""
    for name in ("has_memory", "has_normal_memory", "online"):
        path = NODE_ROOT / name
        if path.exists():
            nodes = parse_cpulist(path.read_text())
            if nodes:
                return nodes
    return [0]


@functools.cache  # topology is fixed while we run, and this sits on the allocation path
def node_distance(src: int, dst: int) -> int:
    """The SLIT distance from *src* to *dst* (10 for the same node); 20 if sysfs does not say."""
    path = NODE_ROOT / f"node{src}" / "distance"
    try:
        distances = [int(x) for x in path.read_text().split()]
        nodes = sorted(int(m.group(1)) for p in NODE_ROOT.glob("node*")
                       if (m := re.fullmatch(r"node(\d+)", p.name)))
        return distances[nodes.index(dst)]
    except (OSError, ValueError, IndexError):
        return 10 if src == dst else 20


def node_meminfo(node: int) -> dict[str, int]:
    """The node's meminfo in bytes (``MemTotal``, ``MemFree``, ...)."""
    out: dict[str, int] = {}
    path = NODE_ROOT / f"node{node}" / "meminfo"
    text = path.read_text() if path.exists() else Path("/proc/meminfo").read_text()
    for line in text.splitlines():
        m = re.match(r"(?:Node \d+ )?(\w+):\s+(\d+)(?: kB)?", line)
        if m:
            value = int(m.group(2))
            out[m.group(1)] = value * 1024 if line.rstrip().endswith("kB") else value
    return out


@functools.cache
def cpu_nodes() -> dict[int, int]:
    """Every CPU's node, read from sysfs once."""
    out: dict[int, int] = {}
    for node in online_nodes():
        path = NODE_ROOT / f"node{node}" / "cpulist"
        if path.exists():
            out.update(dict.fromkeys(parse_cpulist(path.read_text()), node))
    return out


def cpu_node(cpu: int) -> int:
    """The node that *cpu* belongs to (0 when sysfs does not say)."""
    return cpu_nodes().get(cpu, 0)


def process_node(pid: int) -> int:
    """The node of the CPU that *pid* last ran on (field 39 of /proc/PID/stat), 0 if unknown."""
    nodes = set(cpu_nodes().values())
    if len(nodes) <= 1:  # one node: no need to ask where the process ran
        return nodes.pop() if nodes else 0
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        fields = stat.rsplit(")", 1)[1].split()
        return cpu_node(int(fields[36]))
    except (OSError, ValueError, IndexError):
        return 0


def mbind(address: int, length: int, node: int) -> None:
    """Bind ``[address, address+length)`` to *node* with MPOL_BIND; raise OSError on failure."""
    mask = ctypes.c_ulong(1 << node)
    ret = libc.syscall(
        _SYS_MBIND, ctypes.c_void_p(address), ctypes.c_ulong(length), MPOL_BIND,
        ctypes.byref(mask), ctypes.c_ulong(node + 2), MPOL_MF_STRICT | MPOL_MF_MOVE,
    )
    if ret != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"mbind to node {node}: {os.strerror(err)}")


def probe_offsets(offset: int, length: int) -> list[int]:
    """The first, middle and last 4 KiB page of bytes ``[offset, offset+length)``: where
    to ask move_pages which nodes hold an extent."""
    return sorted({offset, offset + length // 2 // 4096 * 4096, offset + length - 4096})


def page_nodes(addresses: list[int]) -> list[int]:
    """Ask the kernel which node holds each page (move_pages with no target nodes).

    A negative entry is an errno for that page (e.g. -ENOENT: not present).
    """
    count = len(addresses)
    pages = (ctypes.c_void_p * count)(*addresses)
    status = (ctypes.c_int * count)()
    ret = libc.syscall(_SYS_MOVE_PAGES, 0, ctypes.c_ulong(count), pages, None, status, 0)
    if ret != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"move_pages: {os.strerror(err)}")
    return list(status)
