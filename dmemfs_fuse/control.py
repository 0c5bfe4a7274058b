"""The control socket: `dmemctl` asks a running daemon questions over a unix socket.

One JSON object per line each way: ``{"cmd": "status", ...}`` in,
``{"ok": true, "result": {...}}`` or ``{"ok": false, "errno": N, "error": "..."}``
out, then the connection closes.  The socket lives under /run/dmemfs, mode
0600, and the peer's credentials are checked: only root or the daemon's own
user may ask.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import socket
import struct
from pathlib import Path
from typing import Any

import trio

from .report import JSON, Reporter

log = logging.getLogger(__name__)

RUN_DIR = Path(os.environ.get("DMEMFS_RUN_DIR", "/run/dmemfs"))
MAX_REQUEST = 1 << 16


def socket_path(mountpoint: str) -> Path:
    """Where the daemon serving *mountpoint* listens (a hash of the real path)."""
    digest = hashlib.sha256(os.path.realpath(mountpoint).encode()).hexdigest()[:16]
    return RUN_DIR / f"{digest}.sock"


def dispatch(reporter: Reporter, request: dict[str, Any]) -> JSON:
    """Run one request against *reporter*; raise OSError (with errno) for bad ones."""
    cmd = request.get("cmd")
    if cmd == "status":
        return reporter.status()
    if cmd == "extents":
        return reporter.extents(int(request["ino"]))
    if cmd == "files":
        return reporter.files(int(request.get("limit", 20)))
    if cmd == "policy":
        text = request.get("policy")
        return reporter.policy(int(request["ino"]), None if text is None else str(text))
    if cmd == "trace":
        return reporter.set_trace(bool(request["on"]))
    if cmd == "map":
        return reporter.map()
    if cmd == "poison":
        ino = request.get("ino")
        return reporter.poison(int(request["offset"]), None if ino is None else int(ino))
    if cmd == "kernel_error":
        return reporter.notify_kernel_error(int(request["offset"]))
    if cmd == "scan":
        return reporter.scan()
    raise OSError(errno.EINVAL, f"unknown command {cmd!r}")


def answer(reporter: Reporter, line: bytes) -> bytes:
    """The reply line to request *line*; never raises."""
    try:
        request = json.loads(line)
        if not isinstance(request, dict):
            raise ValueError("a request is a JSON object")
        reply: JSON = {"ok": True, "result": dispatch(reporter, request)}
    except OSError as exc:
        reply = {"ok": False, "errno": exc.errno, "error": exc.strerror or str(exc)}
    except (ValueError, KeyError, TypeError) as exc:
        reply = {"ok": False, "errno": errno.EINVAL, "error": f"bad request: {exc}"}
    except Exception as exc:  # a bug: say so, keep serving
        log.exception("control request %r failed", line[:200])
        reply = {"ok": False, "errno": errno.EIO, "error": f"internal error: {exc}"}
    return json.dumps(reply).encode() + b"\n"


async def serve(path: Path, reporter: Reporter,
                task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
    """Listen on *path* until cancelled; the socket file is removed on the way out."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    path.unlink(missing_ok=True)
    listener = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old_umask = os.umask(0o177)  # born 0600: no window where others could connect
    try:
        await listener.bind(str(path))
    finally:
        os.umask(old_umask)
    listener.listen(16)
    log.info("control socket %s", path)
    task_status.started()
    try:
        async with trio.open_nursery() as nursery:
            while True:
                conn, _ = await listener.accept()
                nursery.start_soon(_handle, conn, reporter)
    finally:
        listener.close()
        path.unlink(missing_ok=True)


async def _handle(conn: trio.socket.SocketType, reporter: Reporter) -> None:
    with conn:
        creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        pid, uid, _ = struct.unpack("3i", creds)
        # Read the request even from a peer that will be refused: closing with its
        # bytes unread would reset the connection and lose the refusal.
        data = b""
        with trio.move_on_after(10):
            while b"\n" not in data and len(data) < MAX_REQUEST:
                chunk = await conn.recv(4096)
                if not chunk:
                    break
                data += chunk
        if uid not in (0, os.getuid()):
            log.warning("control request from pid %d uid %d refused", pid, uid)
            await _send_all(conn, json.dumps({"ok": False, "errno": errno.EPERM,
                                              "error": "only root may ask"}).encode() + b"\n")
            return
        reply = answer(reporter, data.split(b"\n", 1)[0])
        # Pages of a file hit by a memory error are dropped before the reply, so a
        # caller that sees the answer also sees EIO through its mappings.
        await reporter.frontend.flush_invalidations()
        await _send_all(conn, reply)


async def _send_all(conn: trio.socket.SocketType, data: bytes) -> None:
    view = memoryview(data)
    while view:
        sent = await conn.send(view)
        view = view[sent:]
