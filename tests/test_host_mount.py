"""The ways a host starts dmemfs: mount -t fuse.dmemfs, fstab, and systemd's notify protocol."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from mounting import daemon_command, is_mounted, unmount

pytestmark = pytest.mark.mount
VENV_BIN = Path(sys.executable).parent
HUGE_2M = Path("/sys/kernel/mm/hugepages/hugepages-2048kB/nr_hugepages")


def daemon_pids(mountpoint: Path) -> list[int]:
    """Processes whose command line names *mountpoint* (the detached daemon)."""
    pids = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                cmdline = (proc / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if str(mountpoint).encode() in cmdline and int(proc.name) != os.getpid():
                pids.append(int(proc.name))
    return pids


def wait_daemon_gone(mountpoint: Path, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while daemon_pids(mountpoint):
        if time.monotonic() > deadline:
            for pid in daemon_pids(mountpoint):
                os.kill(pid, signal.SIGKILL)
            pytest.fail(f"the daemon for {mountpoint} did not exit after umount")
        time.sleep(0.1)


@pytest.fixture(autouse=True)
def installed() -> Iterator[None]:
    """mount(8) runs helpers with the standard PATH, so `dmemfs` must be in /usr/local/sbin,
    as tools/install puts it; link this checkout's there for the test."""
    link = Path("/usr/local/sbin/dmemfs")
    ours = VENV_BIN / "dmemfs"
    if link.exists() or link.is_symlink():
        if link.resolve() != ours.resolve():
            pytest.fail(f"{link} is another installation; these tests would run it, not "
                        "this checkout")
        yield
        return
    link.symlink_to(ours)
    try:
        yield
    finally:
        link.unlink()


def cleanup(mountpoint: Path) -> None:
    if is_mounted(mountpoint):
        subprocess.run(["umount", "-l", str(mountpoint)], check=False)
    for pid in daemon_pids(mountpoint):
        os.kill(pid, signal.SIGKILL)


def test_mount_t_fuse_dmemfs_and_umount(tmp_path: Path) -> None:
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    pages = HUGE_2M.read_text()
    try:
        subprocess.run(["mount", "-t", "fuse.dmemfs", "dmemfs", str(mnt), "-o",
                        "size=32M,pagesize=2M,region=memfd,reserve_hugepages"],
                       check=True, capture_output=True, text=True, timeout=60)
        assert is_mounted(mnt)
        line = next(line for line in Path("/proc/mounts").read_text().splitlines()
                    if line.split()[1] == str(mnt))
        assert line.split()[0] == "dmemfs" and line.split()[2] == "fuse.dmemfs"
        listed = subprocess.run(["findmnt", "-n", "-t", "fuse.dmemfs", "-o", "TARGET"],
                                capture_output=True, text=True, check=True).stdout.split()
        assert str(mnt) in listed
        (mnt / "f").write_bytes(b"mounted the usual way")
        assert os.statvfs(mnt).f_bfree == 15
        assert HUGE_2M.read_text() != pages  # the daemon reserved its huge pages
        subprocess.run(["umount", str(mnt)], check=True, timeout=60)
        assert not is_mounted(mnt)
        wait_daemon_gone(mnt)
        assert HUGE_2M.read_text() == pages  # ... and gave them back on exit
    finally:
        cleanup(mnt)


def test_fstab_entry(tmp_path: Path) -> None:
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    fstab = tmp_path / "fstab"
    fstab.write_text(f"# a test fstab\ndmemfs {mnt} fuse.dmemfs "
                     "size=16M,pagesize=4K,nofail,noauto,x-systemd.requires=x.service 0 0\n")
    try:
        subprocess.run(["mount", "--fstab", str(fstab), str(mnt)], check=True,
                       capture_output=True, text=True, timeout=60)
        assert is_mounted(mnt)
        assert os.statvfs(mnt).f_bsize == 4096 and os.statvfs(mnt).f_blocks == 4096
        subprocess.run(["umount", str(mnt)], check=True, timeout=60)
        wait_daemon_gone(mnt)
    finally:
        cleanup(mnt)


def test_mount_failure_reaches_mount(tmp_path: Path) -> None:
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    result = subprocess.run(["mount", "-t", "fuse.dmemfs", "dmemfs", str(mnt), "-o",
                             "size=3M,pagesize=2M"], capture_output=True,
                            text=True, timeout=60, check=False)
    assert result.returncode != 0
    assert "not a multiple of pagesize" in result.stderr
    assert not is_mounted(mnt)


@pytest.mark.parametrize("abstract", [False, True])
def test_notify_protocol(tmp_path: Path, abstract: bool) -> None:
    """Play systemd's end of NOTIFY_SOCKET and check what the daemon says, and when."""
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    if abstract:
        name = f"dmemfs-test-{os.getpid()}"
        sock.bind("\0" + name)
        address = "@" + name
    else:
        address = str(tmp_path / "notify.sock")
        sock.bind(address)
    sock.settimeout(30)
    log = open(tmp_path / "daemon.log", "wb")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(daemon_command(mnt, "size=32M,pagesize=2M"), stdout=log,
                            stderr=subprocess.STDOUT, env={**os.environ, "NOTIFY_SOCKET": address})
    messages: list[str] = []
    try:
        while not any("READY=1" in m for m in messages):
            messages.append(sock.recv(4096).decode())
        ready = messages[-1].split("\n")
        assert is_mounted(mnt), "READY=1 came before the mount answered"
        assert any(f.startswith("STATUS=32 MiB free of 32 MiB in 1 pool(s)") for f in ready), ready
        (mnt / "f").write_bytes(b"x" * (4 << 20))
        status = sock.recv(4096).decode()  # the periodic STATUS= refresh
        assert status.startswith("STATUS=28 MiB free of 32 MiB"), status
        proc.send_signal(signal.SIGTERM)
        stopping = sock.recv(4096).decode()
        assert "STOPPING=1" in stopping.split("\n")
        assert proc.wait(timeout=20) == 0
    finally:
        unmount(mnt, proc)
        log.close()
        sock.close()
