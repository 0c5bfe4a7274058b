"""Fresh mounts of every filesystem the benchmark compares, and an unmount on every path.

Each ``mounted()`` call gives a brand-new mount and takes it down afterwards,
whatever happens (an exception, Ctrl-C, SIGTERM).  Anything that is up is
also listed in :data:`ACTIVE`, so that :func:`cleanup_all` can take it down
from a signal handler or at exit.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
VENV_BIN = REPO / ".venv" / "bin"
DMEMFS = VENV_BIN / "dmemfs"
PLAINFS = Path(__file__).resolve().parent / "plainfs.py"
MOUNT_TIMEOUT = 600.0  # a 16 GiB region populates at first-touch speed
EXIT_TIMEOUT = 120.0

# path -> function that takes that mount down (idempotent)
ACTIVE: dict[str, Callable[[], None]] = {}


class MountError(RuntimeError):
    """A filesystem could not be mounted; the message says why (the daemon's own words)."""


@dataclass
class MountInfo:
    """One live mount."""

    kind: str
    path: Path
    options: str
    pid: int | None = None
    log_path: Path | None = None
    mount_seconds: float = 0.0
    details: dict[str, Any] = field(default_factory=dict)

    def bdi(self) -> str:
        """The mount's backing device as ``major:minor``."""
        dev = os.stat(self.path).st_dev
        return f"{os.major(dev)}:{os.minor(dev)}"

    def bdi_knobs(self) -> dict[str, int]:
        """read_ahead_kb, strict_limit and max_ratio of the mount's bdi, as they are now."""
        out = {}
        for knob in ("read_ahead_kb", "strict_limit", "max_ratio"):
            with contextlib.suppress(OSError, ValueError):
                out[knob] = int(Path(f"/sys/class/bdi/{self.bdi()}/{knob}").read_text())
        return out

    def read_ahead_kb(self) -> int | None:
        """The mount's readahead window (/sys/class/bdi/<bdi>/read_ahead_kb), if it has one."""
        try:
            return int(Path(f"/sys/class/bdi/{self.bdi()}/read_ahead_kb").read_text())
        except (OSError, ValueError):
            return None


def mount_table() -> list[tuple[str, str, str]]:
    """(source, mountpoint, type) of every mount."""
    out = []
    for line in Path("/proc/mounts").read_text().splitlines():
        fields = line.split()
        if len(fields) >= 3:
            out.append((fields[0], fields[1].replace("\\040", " "), fields[2]))
    return out


def mounted_type(path: Path) -> str | None:
    """The filesystem type mounted exactly at *path*, or None."""
    target = os.path.realpath(path)
    for _, point, fstype in reversed(mount_table()):
        if point == target:
            return fstype
    return None


def _run(*argv: str, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False,
                          stdin=subprocess.DEVNULL)


def _pid_alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def _wait_pid(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while _pid_alive(pid):
        if time.monotonic() > deadline:
            return False
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, os.WNOHANG)
        time.sleep(0.02)
    return True


def daemon_pids(path: Path) -> list[int]:
    """Processes running ``dmemfs ... none PATH ...`` (the detached daemon of *path*)."""
    target = str(path)
    out = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        args = [a.decode(errors="replace") for a in argv if a]
        if (target in args and "none" in args
                and any(a.endswith("/dmemfs") or a in ("dmemfs", "dmemfs_fuse.host.cli")
                        for a in args)):
            out.append(int(entry.name))
    return out


def _stop_pids(pids: list[int], timeout: float) -> None:
    """Wait for *pids* (processes this run started) to exit; SIGTERM, then SIGKILL, if not."""
    for pid in pids:
        if _wait_pid(pid, timeout):
            continue
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
        if not _wait_pid(pid, 30):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            _wait_pid(pid, 10)


def _fuse_unmount(path: Path) -> None:
    for _ in range(40):
        if mounted_type(path) is None:
            return
        if _run("fusermount3", "-u", str(path)).returncode == 0:
            return
        time.sleep(0.25)  # EBUSY: something still has it open
    _run("fusermount3", "-u", "-z", str(path))


def _kernel_unmount(path: Path) -> None:
    for _ in range(40):
        if mounted_type(path) is None:
            return
        if _run("umount", str(path)).returncode == 0:
            return
        time.sleep(0.25)
    _run("umount", "-l", str(path))


def cleanup_all() -> None:
    """Take down every mount that is still up (last mounted first)."""
    for path in list(reversed(ACTIVE)):
        down = ACTIVE.pop(path, None)
        if down is not None:
            with contextlib.suppress(Exception):
                down()


@contextlib.contextmanager
def _registered(path: Path, down: Callable[[], None]) -> Iterator[None]:
    ACTIVE[str(path)] = down
    try:
        yield
    finally:
        if ACTIVE.pop(str(path), None) is not None:
            down()


@contextlib.contextmanager
def dmemfs(path: Path, options: str, log_dir: Path, command: list[str] | None = None,
           bdi: dict[str, str] | None = None) -> Iterator[MountInfo]:
    """``dmemfs none PATH -o OPTIONS`` (detaches once mounted); ``fusermount3 -u`` at the end.

    *command* replaces the dmemfs executable (an experimental copy of the daemon);
    *bdi* settings are written to the mount's /sys/class/bdi/<bdi>/ once it is up.
    """
    path.mkdir(parents=True, exist_ok=True)
    argv = [*(command or [str(DMEMFS)]), "none", str(path), "-o", options]

    def down() -> None:
        pids = daemon_pids(path)
        if mounted_type(path) is None:
            # Interrupted while it was still reserving and populating: it never mounts by
            # itself going away, and it gives back its huge pages on SIGTERM.
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGTERM)
        _fuse_unmount(path)
        _stop_pids(pids, EXIT_TIMEOUT)
        _fuse_unmount(path)  # in case it mounted just before the signal

    with _registered(path, down):
        started = time.monotonic()
        # Its own session: a Ctrl-C reaches only the harness, which then unmounts in order.
        done = subprocess.run(argv, capture_output=True, text=True, timeout=MOUNT_TIMEOUT,
                              check=False, stdin=subprocess.DEVNULL, start_new_session=True)
        if done.returncode != 0 or mounted_type(path) != "fuse.dmemfs":
            reason = (done.stderr.strip().splitlines() or [f"exit status {done.returncode}"])
            raise MountError(f"dmemfs -o {options}: {reason[-1]}")
        info = MountInfo("dmemfs", path, options, mount_seconds=time.monotonic() - started)
        pids = daemon_pids(path)
        info.pid = pids[0] if pids else None
        for key, value in (bdi or {}).items():
            Path(f"/sys/class/bdi/{info.bdi()}/{key}").write_text(f"{value}\n")
            info.details[f"bdi.{key}"] = value
        yield info


@contextlib.contextmanager
def plainfs(path: Path, log_dir: Path) -> Iterator[MountInfo]:
    """The plain pyfuse3 baseline, in the foreground of a child process."""
    with foreground("plainfs", [sys.executable, str(PLAINFS), str(path)], path,
                    "fuse.plainfs", log_dir / f"plainfs-{path.name}.log") as info:
        info.options = "pyfuse3 defaults"
        yield info


@contextlib.contextmanager
def foreground(kind: str, argv: list[str], path: Path, fstype: str,
               log_path: Path) -> Iterator[MountInfo]:
    """A FUSE daemon that stays in the foreground of a child process (its output to *log_path*)."""
    path.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as log:  # O_APPEND: others may add marker lines
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)

    def down() -> None:
        _fuse_unmount(path)
        try:
            proc.wait(timeout=EXIT_TIMEOUT)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    with _registered(path, down):
        started = time.monotonic()
        while mounted_type(path) != fstype:
            if proc.poll() is not None:
                raise MountError(f"{kind} exited with {proc.returncode}: "
                                 f"{log_path.read_text(errors='replace')[-500:]}")
            if time.monotonic() - started > MOUNT_TIMEOUT:
                raise MountError(f"{kind} did not mount within {MOUNT_TIMEOUT:.0f} s")
            time.sleep(0.02)
        os.stat(path)  # waits for FUSE INIT
        yield MountInfo(kind, path, " ".join(argv[2:]), pid=proc.pid, log_path=log_path,
                        mount_seconds=time.monotonic() - started)


@contextlib.contextmanager
def kernel_fs(kind: str, path: Path, options: str) -> Iterator[MountInfo]:
    """``mount -t KIND -o OPTIONS`` (tmpfs or hugetlbfs); ``umount`` at the end."""
    path.mkdir(parents=True, exist_ok=True)
    with _registered(path, lambda: _kernel_unmount(path)):
        started = time.monotonic()
        done = _run("mount", "-t", kind, "-o", options, f"bench-{kind}", str(path))
        if done.returncode != 0 or mounted_type(path) != kind:
            raise MountError(f"mount -t {kind} -o {options}: {done.stderr.strip()}")
        yield MountInfo(kind, path, options, mount_seconds=time.monotonic() - started)


def leftovers(root: Path) -> list[str]:
    """Mounts under *root* that are still up (should be none)."""
    prefix = str(root.resolve()) + "/"
    return [f"{point} ({fstype})" for _, point, fstype in mount_table()
            if point.startswith(prefix)]
