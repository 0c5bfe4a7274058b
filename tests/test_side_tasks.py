"""Clients that misbehave and side tasks that fail, against a real mount: the daemon keeps
serving its files, the control socket and the metrics endpoint through all of it."""

from __future__ import annotations

import json
import os
import random
import re
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from mounting import Mount, dmemctl, dmemfs, free_port, is_mounted, metrics, status

from dmemfs_fuse.insight import control
from dmemfs_fuse.insight.control import socket_path
from dmemfs_fuse.memory import bdi

pytestmark = pytest.mark.mount

M = 1 << 20
PRECIOUS = b"written before any client misbehaved\n"
CLIENTS = 20  # per misbehaviour, as in the report: one is not always enough


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[Mount, int]]:
    """A 256 MiB mount of 4K dpages, logging at debug level, with metrics and a file."""
    port = free_port()
    with dmemfs(tmp_path, f"size=256M,pagesize=4K,metrics={port}", "-v") as mount:
        (mount.path / "precious").write_bytes(PRECIOUS)
        yield mount, port
    assert mount.exit_code == 0, mount.log()


def assert_serving(mount: Mount, port: int) -> None:
    """The mount is up and its file intact; files, dmemctl and metrics all answer."""
    assert is_mounted(mount.path), mount.log()
    assert (mount.path / "precious").read_bytes() == PRECIOUS
    (mount.path / "fresh").write_bytes(b"y" * 8192)
    assert (mount.path / "fresh").read_bytes() == b"y" * 8192
    os.unlink(mount.path / "fresh")
    inodes = 1 + len(os.listdir(mount.path))  # the root and its files
    assert status(mount)["inodes_used"] == inodes
    assert metrics(port)["dmemfs_inodes_used"] == inodes
    assert "Traceback" not in mount.log()


def control_client() -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(30)
    return sock


def request_line(cmd: str) -> bytes:
    return json.dumps({"cmd": cmd}).encode() + b"\n"


def fill_map(mount: Mount, files: int = 2000) -> None:
    """*files* files of one byte with 250-byte names: a ``map`` reply names each of them,
    so it is a few times larger than a socket's buffer."""
    for i in range(files):
        (mount.path / f"{i:05d}{'n' * 245}").write_bytes(b"x")


def whole_reply(mount: Mount, line: bytes) -> bytes:
    with control_client() as sock:
        sock.connect(str(socket_path(str(mount.path))))
        sock.sendall(line)
        data = b""
        while chunk := sock.recv(1 << 16):
            data += chunk
    return data


def send_buffer() -> int:
    """The bytes a unix stream socket buffers for a reader that does not read."""
    return int(Path("/proc/sys/net/core/wmem_default").read_text())


def leave_after_connect(sock: socket.socket) -> None:
    pass


def leave_mid_request(sock: socket.socket) -> None:
    sock.sendall(request_line("status")[:7])


def leave_after_request(sock: socket.socket) -> None:
    sock.sendall(request_line("status"))


def leave_mid_answer(sock: socket.socket) -> None:
    """Read the answer's first bytes and close with the rest unread: the kernel then
    fails the daemon's next send (EPIPE, or ECONNRESET)."""
    sock.sendall(request_line("map"))
    assert sock.recv(100)


@pytest.mark.parametrize("leave", [leave_after_connect, leave_mid_request, leave_after_request,
                                   leave_mid_answer])
def test_control_clients_that_leave_early_end_only_their_connection(
        served: tuple[Mount, int], leave: Callable[[socket.socket], None]) -> None:
    mount, port = served
    if "answer" in leave.__name__:
        fill_map(mount)
        full = whole_reply(mount, request_line("map"))
        assert len(full) > 2 * send_buffer()  # the daemon is mid-answer when the client leaves
    for _ in range(CLIENTS):
        with control_client() as sock:
            sock.connect(str(socket_path(str(mount.path))))
            leave(sock)
    assert_serving(mount, port)
    # A connection that noticed its peer gone said so at debug level (a client that left
    # mid-answer always leaves unread bytes, which the kernel answers with EPIPE or
    # ECONNRESET), and nothing louder was logged.
    if "answer" in leave.__name__:
        assert mount.log().count("control client went away") == CLIENTS, mount.log()[-3000:]
    assert not re.search(r" (WARNING|ERROR) ", mount.log()), mount.log()[-3000:]


def test_the_reported_reproduction(tmp_path: Path) -> None:
    """The issue's own steps: 20 status requests whose clients close at once."""
    with dmemfs(tmp_path, "size=64M,pagesize=4K") as mount:
        (mount.path / "precious").write_bytes(b"data\n")
        for _ in range(20):
            with socket.socket(socket.AF_UNIX) as sock:
                sock.connect(str(socket_path(str(mount.path))))
                sock.sendall(request_line("status"))
        assert is_mounted(mount.path)
        assert (mount.path / "precious").read_bytes() == b"data\n"
        assert status(mount)["inodes_used"] == 2
    assert mount.exit_code == 0, mount.log()


def test_clients_that_never_read_or_never_finish_are_dropped_after_their_timeouts(
        served: tuple[Mount, int]) -> None:
    mount, port = served
    fill_map(mount)
    path = str(socket_path(str(mount.path)))
    silent, slow = control_client(), control_client()
    try:
        silent.connect(path)
        silent.sendall(request_line("map"))  # a large answer it never reads
        slow.connect(path)
        slow.sendall(b'{"cmd": "sta')        # half a request, never finished
        started = time.monotonic()
        # Meanwhile everyone else is served as usual.
        assert_serving(mount, port)
        assert time.monotonic() - started < control.READ_TIMEOUT, "served only after timeouts"
        # The slow client gets a clear error once its time is up...
        reply = json.loads(slow.recv(1 << 16))
        assert reply["ok"] is False and "no whole request" in reply["error"]
        # ...and the silent one is cut off.
        deadline = time.monotonic() + control.SEND_TIMEOUT + 20
        while "did not take its answer" not in mount.log():
            assert time.monotonic() < deadline, mount.log()[-3000:]
            time.sleep(0.1)
    finally:
        silent.close()
        slow.close()
    assert_serving(mount, port)


def test_a_thousand_control_clients_at_once(served: tuple[Mount, int]) -> None:
    mount, port = served
    path = str(socket_path(str(mount.path)))
    socks = [control_client() for _ in range(1000)]
    try:
        for i, sock in enumerate(socks):
            sock.connect(path)
            if i % 4 == 3:
                sock.close()           # every fourth leaves at once
            else:
                sock.sendall(request_line("status"))
        answered = 0
        for sock in socks:
            if sock.fileno() < 0:
                continue
            data = b""
            while chunk := sock.recv(1 << 16):
                data += chunk
            reply = json.loads(data)
            assert reply["ok"] is True, reply
            answered += 1
        assert answered == 750
    finally:
        for sock in socks:
            sock.close()
    assert_serving(mount, port)


def metrics_client(port: int) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=30)
    return sock


GET = b"GET /metrics HTTP/1.1\r\nHost: localhost\r\n\r\n"


@pytest.mark.parametrize("step", ["after connect", "mid-request", "after the request",
                                  "mid-answer", "reset mid-answer"])
def test_metrics_clients_that_leave_early(served: tuple[Mount, int], step: str) -> None:
    mount, port = served
    for _ in range(CLIENTS):
        with metrics_client(port) as sock:
            if step == "mid-request":
                sock.sendall(GET[:9])
            elif step != "after connect":
                sock.sendall(GET)
            if "mid-answer" in step:
                assert sock.recv(100).startswith(b"HTTP/1.1 200")
            if step == "reset mid-answer":
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    assert_serving(mount, port)
    assert not re.search(r" (WARNING|ERROR) ", mount.log()), mount.log()[-3000:]


def test_a_thousand_metrics_clients_at_once(served: tuple[Mount, int]) -> None:
    mount, port = served
    results: list[bool] = []

    def client(n: int) -> None:
        with metrics_client(port) as sock:
            sock.sendall(GET)
            if n % 4 == 3:
                return
            data = b""
            while chunk := sock.recv(1 << 16):
                data += chunk
            results.append(data.startswith(b"HTTP/1.1 200") and b"dmemfs_inodes_used" in data)

    threads = [threading.Thread(target=client, args=(n,)) for n in range(1000)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert results.count(True) == 750
    assert_serving(mount, port)


@pytest.mark.parametrize("path", ["region", "passthrough"])
def test_side_tasks_that_fail_are_logged_and_come_back(tmp_path: Path, path: str) -> None:
    """Every side task fails once on purpose (the DMEMFS_FAIL_TASKS test hook); the mount
    stays up, each failure is logged with its traceback, and each task works again."""
    region = path == "region"
    port = free_port()
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(tmp_path / "notify.sock"))
    notify.settimeout(60)
    env = {"DMEMFS_FAIL_TASKS": "*", "NOTIFY_SOCKET": str(tmp_path / "notify.sock")}
    try:
        options = f"size=64M,pagesize=4K,metrics={port},passthrough={'off' if region else 'on'}"
        with dmemfs(tmp_path, options, env=env) as mount:
            (mount.path / "precious").write_bytes(PRECIOUS)
            names = ["control socket", "metrics endpoint", "bdi tuning", "status updates",
                     *(["memory-error watcher", "zeroer"] if region else ["ledger"])]
            wait_for(lambda: all(f"side task {n} failed" in mount.log() for n in names),
                     mount)
            # The control socket is back; its first connection fails once, on purpose.
            wait_for(lambda: dmemctl("-m", str(mount.path), "status", check=False
                                     ).returncode == 0, mount)
            assert "side task control connection failed" in mount.log()
            wait_for(lambda: _metrics_answer(port), mount)
            if region:
                # The zeroer zeroes again: freed dpages are no longer dirty.
                (mount.path / "scratch").write_bytes(b"z" * (4 * M))
                os.unlink(mount.path / "scratch")
                wait_for(lambda: status(mount)["zeroing"]["dirty_dpages"] == 0, mount)
            else:
                # The ledger enters the kernel's writes again, with no statfs to ask it.
                used = status(mount)["used_dpages"]
                (mount.path / "scratch").write_bytes(b"z" * (4 * M))
                wait_for(lambda: status(mount)["used_dpages"] == used + 1024, mount)
            # bdi tuning ran after its failure.
            ahead = bdi.bdi_dir(str(mount.path)) / "read_ahead_kb"
            wait_for(lambda: ahead.read_text().strip() == "1024", mount)
            if region:
                # The memory-error watcher takes the kernel's notices again.
                dmemctl("-m", str(mount.path), "poison", "--kernel", str(32 * M))
                wait_for(lambda: status(mount)["memory_errors"] == 1, mount)
            # Status updates reach systemd again.
            while True:
                message = notify.recv(4096).decode()
                if message.startswith("STATUS=") and "file(s)" in message and \
                        "READY=1" not in message:
                    break
            assert is_mounted(mount.path)
            assert (mount.path / "precious").read_bytes() == PRECIOUS
            log = mount.log()
            for name in [*names, "control connection"]:
                assert log.count(f"side task {name} failed") == 1, name
            assert log.count("InjectedFailureError: DMEMFS_FAIL_TASKS: injected failure") == (
                7 if region else 6)
    finally:
        notify.close()
    assert mount.exit_code == 0, mount.log()


def _metrics_answer(port: int) -> bool:
    try:
        return metrics(port)["dmemfs_inodes_used"] == 2
    except OSError:
        return False


def wait_for(condition: Callable[[], bool], mount: Mount, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, mount.log()[-5000:]
        assert is_mounted(mount.path), mount.log()[-5000:]
        time.sleep(0.1)


def hostile_lines(seed: int, count: int) -> list[bytes]:
    """Requests no client should send: random bytes, random JSON of every shape, the
    control fuzz corpus, cut-off lines and one line over the size limit.  The corpus's
    poison and kernel_error requests are left out: they are root's orders to take memory
    out of service, which the daemon rightly obeys."""
    rng = random.Random(seed)
    corpus = Path(__file__).parent / "fuzz" / "corpus" / "control"
    lines = [p.read_bytes() for p in sorted(corpus.iterdir())
             if b"poison" not in p.read_bytes() and b"kernel_error" not in p.read_bytes()]
    values: list[object] = [None, True, 0, -1, 2**70, 1e400, "", "x" * 300, [], {}, [1, "a"]]
    for _ in range(count):
        kind = rng.randrange(4)
        if kind == 0:
            lines.append(bytes(rng.randrange(256) for _ in range(rng.randrange(1, 200))))
        elif kind == 1:
            request = {rng.choice(["cmd", "ino", "limit", "policy", "on", "x"]):
                       rng.choice(values) for _ in range(rng.randrange(4))}
            request["cmd"] = rng.choice(["status", "extents", "files", "policy", "trace",
                                         "map", "scan", "nope", 7])
            lines.append(json.dumps(request).encode())
        elif kind == 2:
            whole = json.dumps({"cmd": "extents", "ino": 2}).encode()
            lines.append(whole[:rng.randrange(len(whole))])
        else:
            lines.append(json.dumps(rng.choice(values)).encode())
    lines.append(b'{"cmd": "status", "pad": "' + b"p" * (control.MAX_REQUEST + 10) + b'"}')
    return [line.replace(b"\n", b" ") for line in lines]


def test_hostile_control_requests_get_error_replies(served: tuple[Mount, int]) -> None:
    """Each hostile line, sent and then the client's side shut, gets exactly one JSON
    reply (an answer or an error with an errno, never "internal error"); afterwards the
    daemon serves as before and its file is untouched."""
    mount, port = served
    path = str(socket_path(str(mount.path)))
    before = status(mount)
    for line in hostile_lines(seed=16, count=300):
        with control_client() as sock:
            sock.connect(path)
            sock.sendall(line + b"\n" if len(line) <= control.MAX_REQUEST else line)
            sock.shutdown(socket.SHUT_WR)
            data = b""
            while chunk := sock.recv(1 << 16):
                data += chunk
        assert data.endswith(b"\n") and data.count(b"\n") == 1, (line[:100], data[:300])
        reply = json.loads(data)
        assert isinstance(reply.get("ok"), bool), reply
        if not reply["ok"]:
            assert reply["errno"] > 0 and not reply["error"].startswith("internal"), reply
    assert "internal error" not in mount.log() and "Traceback" not in mount.log()
    after = status(mount)
    for key in ("free_dpages", "inodes_used", "bad_dpages"):
        assert after[key] == before[key], (key, before[key], after[key])
    assert_serving(mount, port)
