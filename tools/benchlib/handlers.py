"""The daemon's own cost per request: its handlers called in-process, no kernel, no FUSE.

    .venv/bin/python -m benchlib.handlers [--whatif]      (from tools/)

Builds the daemon's real objects (Pool, PoolSet, FileStore, InodeTable,
DmemOperations) over an anonymous buffer standing in for the region, calls
each handler many times under trio and prints microseconds per call.  It
separates what dmemfs itself spends per request from what FUSE costs (see
bench-evidence's nullfs/nullfs_ll ceilings).

``--whatif`` repeats every measurement with candidate fixes applied *to this
process only* (the daemon's files are not touched): NUMA answers cached,
the caller's node not re-read from /proc for every open.  The difference is
the expected saving per request of those proposals.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import functools
import importlib
import os
import stat
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pyfuse3
import trio

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

MIB = 1 << 20


class FakeContext:
    """Stands in for pyfuse3.RequestContext (whose fields are read-only): our own pid."""

    def __init__(self) -> None:
        self.pid = os.getpid()
        self.uid = 0
        self.gid = 0
        self.umask = 0o022


def build(dpage: int, size: int) -> Any:
    """A DmemOperations over a fresh, zeroed buffer of *size* bytes with *dpage* dpages."""
    pool_mod = importlib.import_module("dmemfs_fuse.alloc.pool")
    poolset_mod = importlib.import_module("dmemfs_fuse.alloc.poolset")
    store_mod = importlib.import_module("dmemfs_fuse.files.store")
    inodes_mod = importlib.import_module("dmemfs_fuse.files.inodes")
    fs_mod = importlib.import_module("dmemfs_fuse.adapter.fs")
    policy_mod = importlib.import_module("dmemfs_fuse.alloc.policy")
    buffer = bytearray(size)
    region = SimpleNamespace(size=size, dpage_size=dpage, fresh=True, view=memoryview(buffer),
                             array=np.frombuffer(buffer, dtype=np.uint8))
    pools = poolset_mod.PoolSet([pool_mod.Pool(0, 0, 0, size // dpage, dpage)], dpage)
    store = store_mod.FileStore(region, pools)
    inodes = inodes_mod.InodeTable(1 << 20, 0o1777, 0, 0, release_data=store.release,
                                   parse_policy=lambda t: policy_mod.parse_policy(t, pools.ids))
    return fs_mod.DmemOperations(inodes, store)


async def _timeit(label: str, n: int, call: Callable[[int], Awaitable[Any]],
                  out: dict[str, float]) -> None:
    started = time.perf_counter()
    for i in range(n):
        await call(i)
    out[label] = (time.perf_counter() - started) / n * 1e6


async def measure(n: int = 3000) -> dict[str, float]:
    """Microseconds per call of the handlers the benchmark's workloads exercise."""
    out: dict[str, float] = {}
    ctx = FakeContext()
    ops = build(4096, 256 * MIB)
    mode = stat.S_IFREG | 0o644
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL
    handles: list[int] = []

    async def create(i: int) -> None:
        info, _ = await ops.create(1, b"f%06d" % i, mode, flags, ctx)
        handles.append(info.fh)

    await _timeit("create (open handle included)", n, create, out)
    await _timeit("write 64 B to an empty file (allocates one 4K dpage)", n,
                  lambda i: ops.write(handles[i], 0, b"x" * 64), out)
    await _timeit("write 4 KiB over allocated dpages", n,
                  lambda i: ops.write(handles[i], 0, b"y" * 4096), out)
    await _timeit("flush", n, lambda i: ops.flush(handles[i]), out)
    await _timeit("release", n, lambda i: ops.release(handles[i]), out)
    await _timeit("getattr", n, lambda i: ops.getattr(2 + i, ctx), out)
    await _timeit("lookup, hit", n, lambda i: ops.lookup(1, b"f%06d" % i, ctx), out)

    async def missing(i: int) -> None:
        try:
            await ops.lookup(1, b"missing", ctx)
        except pyfuse3.FUSEError as exc:
            assert exc.errno == errno.ENOENT

    await _timeit("lookup, miss (ENOENT)", n, missing, out)

    async def getxattr(i: int) -> None:
        with contextlib.suppress(pyfuse3.FUSEError):
            await ops.getxattr(2 + i, b"security.capability", ctx)

    await _timeit("getxattr security.capability (sent before every write)", n, getxattr, out)
    await _timeit("rename", n, lambda i: ops.rename(1, b"f%06d" % i, 1, b"g%06d" % i, 0, ctx),
                  out)
    await _timeit("unlink", n, lambda i: ops.unlink(1, b"g%06d" % i, ctx), out)

    big = build(2 * MIB, 1024 * MIB)
    info, _ = await big.create(1, b"seq", mode, flags, ctx)
    chunk = os.urandom(MIB)
    await _timeit("write 1 MiB, sequential (allocates 2M dpages every other call)", 1000,
                  lambda i: big.write(info.fh, i * MIB, chunk), out)
    await _timeit("read 128 KiB (returns a view)", 4000,
                  lambda i: big.read(info.fh, (i % 8000) * 131072, 131072), out)
    await _timeit("read 4 KiB", 4000, lambda i: big.read(info.fh, (i * 4096) % (1 << 30), 4096),
                  out)
    numa = importlib.import_module("dmemfs_fuse.memory.numa")
    await _timeit("numa.process_node(pid) (each open/create)", n,
                  lambda i: _aw(numa.process_node, os.getpid()), out)
    await _timeit("numa.node_distance(0, 0) (each pool, each allocation)", n,
                  lambda i: _aw(numa.node_distance, 0, 0), out)
    return out


async def _aw(fn: Callable[..., Any], *args: Any) -> Any:
    return fn(*args)


def apply_whatif() -> list[str]:
    """Patch this process's copy of the daemon with the candidate fixes; describe them."""
    numa = importlib.import_module("dmemfs_fuse.memory.numa")
    fs_mod = importlib.import_module("dmemfs_fuse.adapter.fs")
    poolset_mod = importlib.import_module("dmemfs_fuse.alloc.poolset")
    for name in ("node_distance", "cpu_node"):
        setattr(numa, name, functools.lru_cache(maxsize=None)(getattr(numa, name)))
    setattr(poolset_mod, "numa", numa)  # noqa: B010 - a module attribute, patched in-process
    setattr(fs_mod, "numa", numa)  # noqa: B010
    return ["node_distance and cpu_node cached (sysfs does not change while mounted)"]


def main(argv: list[str] | None = None) -> int:
    """Print microseconds per handler call, and with --whatif, with the fixes applied."""
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--whatif", action="store_true")
    parser.add_argument("-n", type=int, default=3000)
    args = parser.parse_args(argv)
    base = trio.run(measure, args.n)
    rows = {k: [v] for k, v in base.items()}
    notes: list[str] = []
    if args.whatif:
        notes = apply_whatif()
        for k, v in trio.run(measure, args.n).items():
            rows[k].append(v)
    width = max(len(k) for k in rows)
    head = f"{'handler':<{width}}  {'us/call':>8}" + (f"  {'what-if':>8}" if args.whatif else "")
    print(head)
    for k, values in rows.items():
        print(f"{k:<{width}}  " + "  ".join(f"{v:8.1f}" for v in values))
    for note in notes:
        print(f"what-if: {note}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
