"""The control socket: `dmemctl` asks a running daemon questions over a unix socket.

One JSON object per line each way: ``{"cmd": "status", ...}`` in,
``{"ok": true, "result": {...}}`` or ``{"ok": false, "errno": N, "error": "..."}``
out, then the connection closes.  A client that leaves early, sends half a
line, or never reads its answer ends its own connection and nothing else.
The socket lives under /run/dmemfs, mode 0600, and the peer's credentials are
checked: only root or the daemon's own user may ask.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import socket
import struct
from dataclasses import asdict
from pathlib import Path
from typing import Any, Protocol, TypeVar

import trio

from ..errors import fs_error
from ..files.inodes import InodeTable
from ..files.poison import MemoryErrors, Poisoned
from ..memory.hwpoison import hwpoisoned_dpages, send_mce_notice
from ..memory.region import Region
from ..rundir import RUN_DIR
from ..tasks import supervise
from .report import JSON, FuseView, Reporter

log = logging.getLogger(__name__)

MAX_REQUEST = 1 << 16
MAX_DRAIN = 64 << 20  # the most of an oversized request read and dropped after the answer
BACKLOG = socket.SOMAXCONN
MAX_CONNECTIONS = 256  # served at once; each holds a file descriptor
READ_TIMEOUT = 10.0    # seconds for a whole request line
SEND_TIMEOUT = 10.0    # seconds for the peer to take its answer
ACCEPT_RETRY = 0.1     # seconds between accepts while out of file descriptors
OUT_OF_RESOURCES = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
GONE_BEFORE_ACCEPT = frozenset({errno.ECONNABORTED, errno.EPROTO, errno.EPERM})


def socket_path(mountpoint: str) -> Path:
    """Where the daemon serving *mountpoint* listens (a hash of the real path)."""
    digest = hashlib.sha256(os.path.realpath(mountpoint).encode()).hexdigest()[:16]
    return RUN_DIR / f"{digest}.sock"


class Frontend(FuseView, Protocol):
    """What actions need from the FUSE side: the trace, the journal, the page cache."""

    def set_trace(self, on: bool) -> None:
        """Turn the trace on or off."""

    def commit(self) -> None:
        """Write pending metadata changes to the journal (no-op when not persistent)."""

    def invalidate_later(self, ino: int) -> None:
        """Drop the kernel's cached pages of *ino* soon (outside any request)."""

    async def flush_invalidations(self) -> None:
        """Carry out the invalidations asked for so far."""


class Controller:
    """The actions an operator (or the kernel's memory-error notices) may take on a mount.

    Each one changes the objects it acts on (the inode table, the memory errors, the
    FUSE side) and commits, so that what it did is in the journal before it answers.
    *reporter* answers the questions, which change nothing.
    """

    def __init__(self, reporter: Reporter, inodes: InodeTable, frontend: Frontend,
                 errors: MemoryErrors | None = None, region: Region | None = None) -> None:
        self.reporter = reporter
        self.inodes = inodes
        self.frontend = frontend
        # The region path's memory errors and mapped region; None on passthrough.
        self.errors = errors
        self.region = region

    def set_policy(self, ino: int, text: str) -> JSON:
        """Set the policy of a file or directory; what it is now."""
        self.inodes.set_policy(ino, text)
        self.frontend.commit()
        return self.reporter.policy(ino)

    def set_trace(self, on: bool) -> JSON:
        """Turn the per-request trace on or off."""
        self.frontend.set_trace(on)
        log.info("request trace %s", "on" if on else "off")
        return {"trace": on}

    def poison(self, offset: int, ino: int | None = None) -> JSON:
        """Mark bad the dpage at region byte *offset*, or at byte *offset* of file *ino*."""
        region, errors = self._region("poison")
        if ino is not None:
            dpage = errors.locate(ino, offset)
        elif 0 <= offset < region.size:
            dpage = offset // region.dpage_size
        else:
            raise fs_error(errno.EINVAL, f"region offset {offset} is outside the region "
                           f"({region.size} bytes)")
        return self._marked(errors.mark(dpage, "operator"))

    def notify_kernel_error(self, offset: int) -> JSON:
        """Have the daemon receive the SIGBUS BUS_MCEERR_AO the kernel sends for poison at
        region byte *offset* (hwpoison.send_mce_notice): the kernel path, end to end."""
        region = self._region("poison --kernel")[0]
        if not 0 <= offset < region.size:
            raise fs_error(errno.EINVAL, f"region offset {offset} is outside the region")
        send_mce_notice(region.addr + offset)
        return {"sent": True, "region_offset": offset}

    def kernel_error(self, offset: int, length: int, *, rescan: bool = True) -> JSON:
        """The kernel reported a memory error in region bytes ``[offset, offset+length)``
        (a page, or a whole huge page): mark every dpage there bad, then rescan, because
        SIGBUS does not queue and a second notice may have been merged into this one."""
        region, errors = self._region("memory errors")
        dps = region.dpage_size
        last = min(offset + max(length, 1), region.size) - 1
        marked = [self._marked(errors.mark(d, "kernel"))
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
        region, errors = self._region("scan")
        dpages, frames = hwpoisoned_dpages(region.addr, region.size, region.dpage_size)
        marked = [self._marked(errors.mark(d, "scan")) for d in dpages]
        return {"frames_checked": frames, "bad": marked}

    def _region(self, what: str) -> tuple[Region, MemoryErrors]:
        """The region and its memory errors, or EOPNOTSUPP saying why *what* has no
        meaning on passthrough."""
        if self.region is None or self.errors is None:
            raise fs_error(errno.EOPNOTSUPP, f"{what}: this mount uses the passthrough data "
                           "path, whose pages are the kernel's shmem; a memory error there is "
                           "the kernel's to handle (EIO on read, SIGBUS on a fault), and "
                           "dpages are units of the pool, not places in memory to mark bad")
        return self.region, self.errors

    def _marked(self, result: Poisoned) -> JSON:
        # Invalidate first: the page cache must go even if the journal write fails.
        if result.owner is not None and result.newly:
            self.frontend.invalidate_later(result.owner)
        self.frontend.commit()
        return asdict(result)


def dispatch(controller: Controller, request: dict[str, Any]) -> JSON:
    """Run one request: questions go to the reporter, actions to *controller*; raise
    OSError (with errno) for bad ones."""
    reporter = controller.reporter
    cmd = request.get("cmd")
    if cmd == "status":
        return reporter.status()
    if cmd == "extents":
        return reporter.extents(_argument(request, "ino", int))
    if cmd == "files":
        return reporter.files(_argument(request, "limit", int, 20))
    if cmd == "policy":
        ino, text = _argument(request, "ino", int), _argument(request, "policy", str, None)
        return reporter.policy(ino) if text is None else controller.set_policy(ino, text)
    if cmd == "trace":
        return controller.set_trace(_argument(request, "on", bool))
    if cmd == "map":
        return reporter.map()
    if cmd == "poison":
        return controller.poison(_argument(request, "offset", int),
                                 _argument(request, "ino", int, None))
    if cmd == "kernel_error":
        return controller.notify_kernel_error(_argument(request, "offset", int))
    if cmd == "scan":
        return controller.scan()
    raise OSError(errno.EINVAL, f"unknown command {cmd!r}")


T = TypeVar("T")
_REQUIRED = object()


def _argument(request: dict[str, Any], key: str, kind: type[T], default: Any = _REQUIRED) -> T:
    """The request's *key*, which must be a JSON value of *kind* (true and false are not
    numbers, 1e400 is not an integer); *default* when absent, if given, and also when
    null if *default* is None."""
    value = request.get(key)
    if key not in request or (value is None and default is None):
        if default is _REQUIRED:
            raise ValueError(f"{key!r} is missing")
        return default  # type: ignore[no-any-return]
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ValueError(f"{key!r} must be {_KIND_NAMES[kind]}, not {json.dumps(value)[:40]}")
    return value


_KIND_NAMES: dict[type, str] = {int: "an integer", str: "a string", bool: "true or false"}


def answer(controller: Controller, line: bytes) -> bytes:
    """The reply line to request *line*; never raises."""
    try:
        request = json.loads(line)
        if not isinstance(request, dict):
            raise ValueError("a request is a JSON object")
        reply: JSON = {"ok": True, "result": dispatch(controller, request)}
    except OSError as exc:
        reply = {"ok": False, "errno": exc.errno, "error": exc.strerror or str(exc)}
    except ValueError as exc:  # not JSON, not an object, an argument missing or mistyped
        reply = {"ok": False, "errno": errno.EINVAL, "error": f"bad request: {exc}"}
    except Exception as exc:  # a bug: say so, keep serving
        log.exception("control request %r failed", line[:200])
        reply = {"ok": False, "errno": errno.EIO, "error": f"internal error: {exc}"}
    return json.dumps(reply).encode() + b"\n"


async def serve(path: Path, controller: Controller,
                task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
    """Listen on *path* until cancelled; the socket file is removed on the way out.

    Each connection is a task of its own with its own boundary: a client that
    leaves early, never reads, or trips a bug ends only its own connection.
    At most MAX_CONNECTIONS are served at once; the rest wait in the backlog.
    """
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    path.unlink(missing_ok=True)
    raw = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        # Born 0600: no window where others could connect.  Bound here, on this thread
        # and at once: the umask is the process's, and nothing else may run meanwhile.
        old_umask = os.umask(0o177)
        try:
            raw.bind(str(path))
        finally:
            os.umask(old_umask)
        raw.listen(BACKLOG)
    except BaseException:
        raw.close()
        raise
    listener = trio.socket.from_stdlib_socket(raw)
    log.info("control socket %s", path)
    slots = trio.Semaphore(MAX_CONNECTIONS)
    try:
        task_status.started()
        async with trio.open_nursery() as nursery:
            while True:
                await slots.acquire()
                try:
                    conn = await _accept(listener)
                except BaseException:
                    slots.release()
                    raise
                nursery.start_soon(_connection_task, conn, controller, slots)
    finally:
        listener.close()
        path.unlink(missing_ok=True)


async def _accept(listener: trio.socket.SocketType) -> trio.socket.SocketType:
    """The next connection; out of file descriptors, wait and try again."""
    while True:
        try:
            conn, _ = await listener.accept()
            return conn
        except OSError as exc:
            if exc.errno in GONE_BEFORE_ACCEPT:  # that peer is gone; the next one may come
                continue
            if exc.errno not in OUT_OF_RESOURCES:
                raise
            log.warning("control socket: cannot accept a connection now: %s", exc.strerror)
            await trio.sleep(ACCEPT_RETRY)


async def _connection_task(conn: trio.socket.SocketType, controller: Controller,
                           slots: trio.Semaphore) -> None:
    """One connection inside its own boundary; its socket and its slot are given back
    whatever happens in it."""
    try:
        with conn:
            await supervise("control connection", _connection, conn, controller, restart=False)
    finally:
        slots.release()


async def _connection(conn: trio.socket.SocketType, controller: Controller) -> None:
    """One connection, from request to reply; a peer that leaves ends only this."""
    try:
        await _converse(conn, controller)
    except (BrokenPipeError, ConnectionResetError, ConnectionAbortedError) as exc:
        log.debug("control client went away: %s", exc.strerror)


async def _converse(conn: trio.socket.SocketType, controller: Controller) -> None:
    creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    pid, uid, _ = struct.unpack("3i", creds)
    # Read the request even from a peer that will be refused: closing with its
    # bytes unread would reset the connection and lose the refusal.
    data = b""
    with trio.move_on_after(READ_TIMEOUT) as reading:
        while b"\n" not in data and len(data) < MAX_REQUEST:
            chunk = await conn.recv(4096)
            if not chunk:
                break  # the peer shut its side: answer what came
            data += chunk
    oversized = not reading.cancelled_caught and b"\n" not in data and len(data) >= MAX_REQUEST
    if reading.cancelled_caught:
        log.debug("control client pid %d sent no whole request within %g s", pid, READ_TIMEOUT)
        reply = _error(errno.ETIMEDOUT, f"no whole request within {READ_TIMEOUT:g} s")
    elif oversized:
        reply = _error(errno.E2BIG, f"a request is one line of at most {MAX_REQUEST} bytes")
    elif uid not in (0, os.getuid()):
        log.warning("control request from pid %d uid %d refused", pid, uid)
        reply = _error(errno.EPERM, "only root may ask")
    else:
        reply = answer(controller, data.split(b"\n", 1)[0])
        # Pages of a file hit by a memory error are dropped before the reply, so a
        # caller that sees the answer also sees EIO through its mappings.
        await controller.frontend.flush_invalidations()
    with trio.move_on_after(SEND_TIMEOUT) as sending:
        await _send_all(conn, reply)
    if sending.cancelled_caught:
        log.debug("control client pid %d did not take its answer within %g s", pid, SEND_TIMEOUT)
    elif oversized:
        await _drain(conn)


async def _drain(conn: trio.socket.SocketType) -> None:
    """Read and drop the rest of an oversized request after answering it: closing with
    bytes unread would reset the connection, and the client would lose the answer."""
    try:
        conn.shutdown(socket.SHUT_WR)
    except OSError:  # the peer is gone: nothing to drain
        return
    dropped = 0
    with trio.move_on_after(READ_TIMEOUT):
        while dropped < MAX_DRAIN and (chunk := await conn.recv(1 << 16)):
            dropped += len(chunk)


def _error(code: int, text: str) -> bytes:
    return json.dumps({"ok": False, "errno": code, "error": text}).encode() + b"\n"


async def _send_all(conn: trio.socket.SocketType, data: bytes) -> None:
    view = memoryview(data)
    while view:
        sent = await conn.send(view)
        view = view[sent:]
