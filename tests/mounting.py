"""Real dmemfs mounts for end-to-end tests: daemon in a subprocess, readiness by polling,
and an unmount on every path (fusermount3 -u, then -z, then kill)."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

MOUNT_TIMEOUT = 60.0
EXIT_TIMEOUT = 20.0


def require_mounts(fuse: bool = True) -> None:
    """Skip the test where a real mount cannot be made (no root, or no /dev/fuse when
    *fuse*), as pyfuse3's own tests do; fail instead under tools/test and in CI, which
    set DMEMFS_REQUIRE_MOUNTS=1, so that there a test never goes unrun."""
    missing = [what for what, ok in (("root", os.geteuid() == 0),
                                     ("/dev/fuse", not fuse or os.path.exists("/dev/fuse")))
               if not ok]
    if missing:
        why = f"a real mount needs {' and '.join(missing)}"
        if os.environ.get("DMEMFS_REQUIRE_MOUNTS", "0") != "0":
            pytest.fail(why)
        pytest.skip(why)


def is_mounted(path: Path, fstype: str = "fuse.dmemfs") -> bool:
    """Whether a filesystem of *fstype* is mounted exactly at *path*."""
    target = os.path.realpath(path)
    with open("/proc/mounts") as mounts:
        return any(unescape(line.split()[1]) == target and line.split()[2] == fstype
                   for line in mounts)


def unescape(field: str) -> str:
    """Undo /proc/mounts' octal escapes (``\\040`` is a space)."""
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


@contextmanager
def kernel_fs(path: Path, fstype: str, options: str) -> Iterator[Path]:
    """Mount a kernel filesystem (tmpfs, hugetlbfs) at *path* for the block; always unmount."""
    require_mounts()
    path.mkdir(exist_ok=True)
    subprocess.run(["mount", "-t", fstype, "-o", options, fstype, str(path)], check=True)
    try:
        yield path
    finally:
        subprocess.run(["umount", str(path)], check=False)
        if is_mounted(path, fstype):
            subprocess.run(["umount", "-l", str(path)], check=False)
        assert not is_mounted(path, fstype), f"{path} is still mounted"


def path_options(data_path: str) -> str:
    """The -o option that puts a mount on *data_path* (``passthrough`` or ``region``),
    refusing to start if it cannot (the ``data_path`` fixture, conftest.py)."""
    return f"passthrough={'on' if data_path == 'passthrough' else 'off'}"


def daemon_command(mountpoint: Path, options: str, *extra: str) -> list[str]:
    """The command line that starts the daemon in the foreground (every test's daemon
    starts from it, so a test that cannot mount here is skipped, see require_mounts)."""
    require_mounts()
    return [sys.executable, "-m", "dmemfs_fuse.host.cli", "none", str(mountpoint), "-f",
            "-o", options, *extra]


@dataclass
class Mount:
    """A running daemon and its mountpoint."""

    path: Path
    proc: subprocess.Popen[bytes]
    log_path: Path
    exit_code: int | None = field(default=None)

    def log(self) -> str:
        """Everything the daemon printed so far."""
        return self.log_path.read_text(errors="replace")

    def statvfs(self) -> os.statvfs_result:
        """statfs of the mount."""
        return os.statvfs(self.path)

    def free_dpages(self) -> int:
        """Free dpages as statfs reports them."""
        return self.statvfs().f_bfree


def wait_mounted(path: Path, proc: subprocess.Popen[bytes], log_path: Path,
                 timeout: float = MOUNT_TIMEOUT) -> None:
    """Poll until *path* is a dmemfs mount; fail with the daemon's log if it exits or times out."""
    deadline = time.monotonic() + timeout
    while not is_mounted(path):
        if proc.poll() is not None:
            raise AssertionError(f"dmemfs exited with {proc.returncode} before mounting:\n"
                                 f"{log_path.read_text(errors='replace')}")
        if time.monotonic() > deadline:
            raise AssertionError(f"dmemfs did not mount within {timeout} s:\n"
                                 f"{log_path.read_text(errors='replace')}")
        time.sleep(0.05)
    os.stat(path)  # the first request waits for FUSE INIT: the mount now answers


def unmount(path: Path, proc: subprocess.Popen[bytes],
            fstype: str = "fuse.dmemfs") -> int | None:
    """Unmount *path* and end *proc*: fusermount3 -u, then -z, then kill.  Returns the exit code."""
    if is_mounted(path, fstype):
        subprocess.run(["fusermount3", "-u", str(path)], capture_output=True, check=False)
    try:
        code = proc.wait(timeout=EXIT_TIMEOUT)
    except subprocess.TimeoutExpired:
        pass
    else:
        if is_mounted(path, fstype):  # a daemon that died (kill -9) and a busy mount
            subprocess.run(["fusermount3", "-u", "-z", str(path)], capture_output=True,
                           check=False)
        return code
    if is_mounted(path, fstype):
        subprocess.run(["fusermount3", "-u", "-z", str(path)], capture_output=True, check=False)
    try:
        proc.wait(timeout=EXIT_TIMEOUT)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    if is_mounted(path, fstype):
        subprocess.run(["fusermount3", "-u", "-z", str(path)], capture_output=True, check=False)
    return None  # not a clean exit


@contextmanager
def dmemfs(tmp: Path, options: str = "size=64M,pagesize=2M", *extra: str,
           name: str = "mnt", env: dict[str, str] | None = None) -> Iterator[Mount]:
    """Mount a dmemfs under *tmp* for the duration of the block; always unmount.

    *env* is added to the daemon's environment."""
    path = tmp / name
    path.mkdir(exist_ok=True)
    log_path = tmp / f"{name}.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(daemon_command(path, options, *extra), stdout=log,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                env={**os.environ, **(env or {})})
    mount = Mount(path, proc, log_path)
    try:
        wait_mounted(path, proc, log_path)
        yield mount
    finally:
        mount.exit_code = unmount(path, proc)
        assert not is_mounted(path), f"{path} is still mounted"


def start_over(mountpoint: Path, options: str, log_path: Path) -> subprocess.Popen[bytes]:
    """Start a daemon on *mountpoint* whose own daemon was killed (its dead mount still
    there: the new daemon detaches it) and wait until it logs that it mounted or exits.
    The caller ends it with unmount()."""
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(daemon_command(mountpoint, options), stdout=log,
                                stderr=subprocess.STDOUT)
    deadline = time.monotonic() + MOUNT_TIMEOUT
    while "mounted " not in log_path.read_text() and proc.poll() is None:
        assert time.monotonic() < deadline, log_path.read_text()
        time.sleep(0.05)
    return proc


def wait_statfs(path: Path, bfree: int, ffree: int | None = None,
                timeout: float = 10.0) -> os.statvfs_result:
    """statfs of the mount at *path* once its free dpages (and free inodes, if *ffree* is
    given) are as expected, or when *timeout* has passed.

    The kernel forgets removed inodes a moment after unlink returns, and only then does
    the daemon give their dpages back; this gives it the time, the caller asserts.
    """
    deadline = time.monotonic() + timeout
    vfs = os.statvfs(path)
    while ((vfs.f_bfree, vfs.f_ffree if ffree is not None else None) != (bfree, ffree)
           and time.monotonic() < deadline):
        time.sleep(0.05)
        vfs = os.statvfs(path)
    return vfs


def held_dpages(root: Path) -> int:
    """The dpages the files under *root* hold (st_blocks), each inode counted once."""
    dpage = os.statvfs(root).f_bsize
    held: dict[int, int] = {}
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            st = os.lstat(os.path.join(dirpath, name))
            held[st.st_ino] = st.st_blocks * 512 // dpage
    return sum(held.values())


def run_daemon(tmp: Path, options: str, timeout: float = 60,
               name: str = "mnt-fail") -> subprocess.CompletedProcess[str]:
    """Run a daemon that is expected to fail before mounting; return its result."""
    path = tmp / name
    path.mkdir(exist_ok=True)
    try:
        return subprocess.run(daemon_command(path, options), capture_output=True, text=True,
                              timeout=timeout, check=False)
    finally:
        if is_mounted(path):
            subprocess.run(["fusermount3", "-u", "-z", str(path)], check=False)


def free_port() -> int:
    """A TCP port on loopback that nothing listens on now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def dmemctl(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run dmemctl; with *check*, fail unless it exits 0."""
    result = subprocess.run([sys.executable, "-m", "dmemfs_fuse.insight.dmemctl", *args],
                            capture_output=True, text=True, timeout=60, check=False)
    if check:
        assert result.returncode == 0, result.stderr
    return result


def status(mount: Mount) -> Any:
    """What `dmemctl --json status` says of *mount*."""
    return json.loads(dmemctl("-m", str(mount.path), "--json", "status").stdout)


def metrics(port: int) -> dict[str, float]:
    """The daemon's Prometheus samples by name (with labels)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
        assert resp.status == 200
        body = resp.read().decode()
    values: dict[str, float] = {}
    for line in body.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            values[name] = float(value)
    return values
