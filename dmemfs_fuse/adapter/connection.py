"""The FUSE connection: what libfuse and the kernel offer at INIT, and what dmemfs asks for.

dmemfs runs on libfuse >= 3.17.1 and a pyfuse3 patched to let Operations see
and set the connection's capabilities (patches/pyfuse3).  At INIT it asks for:

* ``FUSE_CAP_HANDLE_KILLPRIV_V2``: the daemon clears set-user-ID and
  set-group-ID bits itself (fs.py), so the kernel sets SB_NOSEC and stops
  sending a GETXATTR security.capability before every write;
* no ``FUSE_CAP_AUTO_INVAL_DATA``: the daemon is the only writer and every
  change reaches it through the kernel, so a GETATTR that sees a new mtime
  (after write-back of a shared mapping) must not drop the page cache, which
  would unmap a running guest's RAM.

and, on the passthrough data path (datapath.py), ``FUSE_CAP_PASSTHROUGH`` with
backing files one level deep.
"""

from __future__ import annotations

import logging
import os
import tempfile
from dataclasses import dataclass

import pyfuse3
import trio

from ..errors import ConfigError

log = logging.getLogger(__name__)

if not hasattr(pyfuse3, "ConnectionInfo"):  # a pyfuse3 from PyPI, not the patched build
    raise ImportError("this pyfuse3 lacks the dmemfs patches (patches/pyfuse3); run "
                      "tools/setup (or tools/install) to build the FUSE layer")

MIN_LIBFUSE = (3, 17, 1)
PROBE_TIMEOUT = 10.0  # seconds for a throwaway mount's INIT

# The capabilities named in logs and status, in this order.
NAMED_CAPS = {
    "passthrough": pyfuse3.FUSE_CAP_PASSTHROUGH,
    "handle_killpriv_v2": pyfuse3.FUSE_CAP_HANDLE_KILLPRIV_V2,
    "auto_inval_data": pyfuse3.FUSE_CAP_AUTO_INVAL_DATA,
    "writeback_cache": pyfuse3.FUSE_CAP_WRITEBACK_CACHE,
    "atomic_o_trunc": pyfuse3.FUSE_CAP_ATOMIC_O_TRUNC,
    "splice_read": pyfuse3.FUSE_CAP_SPLICE_READ,
}


@dataclass(frozen=True)
class Negotiated:
    """One connection's INIT: the kernel's protocol, what was offered and what was asked for."""

    libfuse: str
    proto_major: int
    proto_minor: int
    capable: int
    want: int
    max_write: int

    @property
    def protocol(self) -> str:
        """The kernel's FUSE protocol version, as ``7.45``."""
        return f"{self.proto_major}.{self.proto_minor}"

    @property
    def kills_privileges(self) -> bool:
        """Whether the daemon must clear suid/sgid itself (killpriv v2 is on)."""
        return bool(self.want & pyfuse3.FUSE_CAP_HANDLE_KILLPRIV_V2)

    def names(self, bits: int) -> list[str]:
        """The named capabilities among *bits*."""
        return [name for name, bit in NAMED_CAPS.items() if bits & bit]

    def describe(self) -> dict[str, object]:
        """JSON-ready, for status and metrics."""
        return {"libfuse": self.libfuse, "protocol": self.protocol,
                "offered": self.names(self.capable), "enabled": self.names(self.want),
                "capable": self.capable, "want": self.want, "max_write": self.max_write}


def library_version() -> str:
    """The libfuse in use (not the one headers were built from, the one loaded)."""
    return pyfuse3.libfuse_version()


def check_library() -> None:
    """Refuse to start on a libfuse older than 3.17.1 (a pyfuse3 built against the wrong one)."""
    version = library_version()
    parts = tuple(int(p) for p in version.split(".")[:3] if p.isdigit())
    if parts < MIN_LIBFUSE:
        raise ConfigError(f"pyfuse3 is linked against libfuse {version}, older than "
                           f"{'.'.join(map(str, MIN_LIBFUSE))}; run tools/setup (or tools/install) "
                          "to build the FUSE layer")


def negotiate(conn: pyfuse3.ConnectionInfo, passthrough: bool = False) -> Negotiated:
    """Ask for what dmemfs uses (see the module's note), and passthrough if *passthrough*
    (backing files one level deep: shmem, which stacks on nothing); called while INIT is
    answered."""
    want = conn.want & ~pyfuse3.FUSE_CAP_AUTO_INVAL_DATA
    want |= conn.capable & pyfuse3.FUSE_CAP_HANDLE_KILLPRIV_V2
    if passthrough:
        want |= conn.capable & pyfuse3.FUSE_CAP_PASSTHROUGH
        conn.max_backing_stack_depth = 1
    conn.want = want
    return snapshot(conn)


def snapshot(conn: pyfuse3.ConnectionInfo) -> Negotiated:
    """A frozen record of *conn* as it stands."""
    return Negotiated(library_version(), conn.proto_major, conn.proto_minor, conn.capable,
                      conn.want, conn.max_write)


class _ProbeOperations(pyfuse3.Operations):
    """A filesystem that answers INIT and nothing else."""

    def __init__(self) -> None:
        super().__init__()
        self.negotiated: Negotiated | None = None
        self.ready = trio.Event()

    def init_connection(self, conn: pyfuse3.ConnectionInfo) -> None:
        self.negotiated = snapshot(conn)

    def init(self) -> None:
        self.ready.set()


def probe() -> Negotiated:
    """Mount a throwaway filesystem for its INIT alone and unmount it: what this kernel and
    library would negotiate.  Needs root (or fusermount3) and /dev/fuse; OSError otherwise."""
    ops = _ProbeOperations()
    with tempfile.TemporaryDirectory(prefix="dmemfs-probe-") as where:
        pyfuse3.init(ops, where, {"fsname=dmemfs-probe", "subtype=dmemfs-probe"})
        try:
            trio.run(_wait_for_init, ops)
        finally:
            pyfuse3.close(unmount=True)
    if ops.negotiated is None:
        raise OSError(f"no FUSE INIT within {PROBE_TIMEOUT:g} s")
    return ops.negotiated


async def _wait_for_init(ops: _ProbeOperations) -> None:
    async with trio.open_nursery() as nursery:
        nursery.start_soon(pyfuse3.main)
        with trio.move_on_after(PROBE_TIMEOUT):
            await ops.ready.wait()
        pyfuse3.terminate()


def version_text(program_version: str) -> str:
    """What ``dmemfs --version`` prints: the program, the library, and the kernel's protocol
    as a throwaway mount finds it (when this process may mount)."""
    lines = [f"dmemfs {program_version}",
             f"libfuse {library_version()} (pyfuse3 {pyfuse3.__version__})"]
    if os.geteuid() != 0 or not os.path.exists("/dev/fuse"):
        lines.append("FUSE protocol: not probed (needs root and /dev/fuse)")
    else:
        try:
            found = probe()
        except (OSError, RuntimeError) as exc:
            lines.append(f"FUSE protocol: probe failed: {exc}")
        else:
            lines.append(f"kernel FUSE protocol {found.protocol} (at INIT of a throwaway "
                         f"mount); offered: {', '.join(found.names(found.capable))}")
    return "\n".join(lines)
