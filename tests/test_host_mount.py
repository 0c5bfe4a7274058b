"""The ways a host starts dmemfs: every mount -t form, their fstab lines, and systemd's notify
protocol."""

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


# The forms mount(8) accepts for a FUSE filesystem: (type, source).  mount.fuse3 runs
# `dmemfs MNT -o ...` for the first, `dmemfs none MNT -o ...` and `dmemfs dmemfs MNT -o ...`
# for the others.
FORMS = {
    "fuse dmemfs": ("fuse", "dmemfs"),
    "fuse dmemfs#none": ("fuse", "dmemfs#none"),
    "fuse.dmemfs dmemfs": ("fuse.dmemfs", "dmemfs"),
}


def mount_by(way: str, form: str, mnt: Path, options: str, tmp_path: Path
             ) -> subprocess.CompletedProcess[str]:
    """Mount *mnt* in *form*, by the command line or through a temporary fstab (``mount
    MNT`` or ``mount -a``)."""
    fstype, source = FORMS[form]
    if way == "command":
        command = ["mount", "-t", fstype, source, str(mnt), "-o", options]
    else:
        fstab = tmp_path / "fstab"
        other = tmp_path / "other"
        other.mkdir(exist_ok=True)
        fstab.write_text(f"# a test fstab\n{source} {mnt} {fstype} {options} 0 0\n"
                         f"{source} {other} {fstype} {options},noauto 0 0\n")
        command = ["mount", "--fstab", str(fstab), *(["-a"] if way == "mount -a" else
                                                     [str(mnt)])]
    return subprocess.run(command, capture_output=True, text=True, timeout=60, check=False)


@pytest.mark.parametrize("way", ["command", "fstab, mount MNT", "mount -a"])
@pytest.mark.parametrize("form", FORMS)
def test_every_mount_form_mounts_the_same_filesystem(tmp_path: Path, form: str,
                                                     way: str) -> None:
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    try:
        result = mount_by(way, form, mnt, "size=16M,pagesize=4K,nofail,"
                          "x-systemd.requires=x.service", tmp_path)
        assert result.returncode == 0, result.stderr
        assert (result.stdout, result.stderr) == ("", ""), "success is quiet, as for tmpfs"
        assert is_mounted(mnt)
        assert not is_mounted(tmp_path / "other")  # noauto is left alone by mount -a
        # The same fsname and type whatever the form: findmnt -t fuse.dmemfs lists each.
        line = next(line for line in Path("/proc/mounts").read_text().splitlines()
                    if line.split()[1] == str(mnt))
        assert line.split()[:3] == ["dmemfs", str(mnt), "fuse.dmemfs"], line
        listed = subprocess.run(["findmnt", "-n", "-t", "fuse.dmemfs", "-o", "TARGET"],
                                capture_output=True, text=True, check=True).stdout.split()
        assert str(mnt) in listed
        assert os.statvfs(mnt).f_bsize == 4096 and os.statvfs(mnt).f_blocks == 4096
        (mnt / "f").write_bytes(b"mounted the usual way")
        assert (mnt / "f").read_bytes() == b"mounted the usual way"
        assert os.statvfs(mnt).f_bfree == 4095
        subprocess.run(["umount", str(mnt)], check=True, timeout=60)
        assert not is_mounted(mnt)
        wait_daemon_gone(mnt)
    finally:
        cleanup(mnt)


def test_mount_t_fuse_reserves_huge_pages_and_gives_them_back(tmp_path: Path) -> None:
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    pages = HUGE_2M.read_text()
    try:
        subprocess.run(["mount", "-t", "fuse", "dmemfs", str(mnt), "-o",
                        "size=32M,pagesize=2M,region=memfd,reserve_hugepages"],
                       check=True, capture_output=True, text=True, timeout=60)
        assert is_mounted(mnt)
        (mnt / "f").write_bytes(b"mounted the usual way")
        assert os.statvfs(mnt).f_bfree == 15
        assert HUGE_2M.read_text() != pages  # the daemon reserved its huge pages
        subprocess.run(["umount", str(mnt)], check=True, timeout=60)
        assert not is_mounted(mnt)
        wait_daemon_gone(mnt)
        assert HUGE_2M.read_text() == pages  # ... and gave them back on exit
    finally:
        cleanup(mnt)


@pytest.mark.parametrize("form", FORMS)
def test_mount_failure_reaches_mount(tmp_path: Path, form: str) -> None:
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    result = mount_by("command", form, mnt, "size=3M,pagesize=2M", tmp_path)
    assert result.returncode != 0
    assert "not a multiple of pagesize" in result.stderr.strip().splitlines()[-1]
    assert not is_mounted(mnt)


@pytest.mark.parametrize("argv", [[], ["-o", "size=16M"], ["-f", "-v"]])
def test_a_call_without_a_mountpoint_says_so(argv: list[str]) -> None:
    result = subprocess.run([str(VENV_BIN / "dmemfs"), *argv], capture_output=True, text=True,
                            timeout=60, check=False)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == \
        "dmemfs: error: the following arguments are required: MOUNTPOINT"


@pytest.mark.parametrize("argv", [["{gone}"], ["none", "{gone}"], ["{gone}", "-o", "size=16M"],
                                  ["{gone}", "-o", "size=16M,pagesize=3K"]])
def test_a_missing_mountpoint_is_one_clear_line(tmp_path: Path, argv: list[str]) -> None:
    gone = tmp_path / "nowhere"
    result = subprocess.run([str(VENV_BIN / "dmemfs"), *(a.format(gone=gone) for a in argv)],
                            capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 2
    assert result.stderr == f"dmemfs: error: mountpoint {gone}: not an existing directory\n"


def test_a_source_without_a_mountpoint_is_taken_as_the_mountpoint(tmp_path: Path) -> None:
    """`dmemfs none -o ...` (the mountpoint forgotten): one argument is the mountpoint, so the
    line names it, as for `mount -t tmpfs none`."""
    result = subprocess.run([str(VENV_BIN / "dmemfs"), "none", "-o", "size=16M"], cwd=tmp_path,
                            capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 2
    assert result.stderr == "dmemfs: error: mountpoint none: not an existing directory\n"


def test_options_between_source_and_mountpoint(tmp_path: Path) -> None:
    """`dmemfs none -o OPTIONS MNT` (options first, as some scripts write it) still mounts."""
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    proc = subprocess.Popen([sys.executable, "-m", "dmemfs_fuse.host.cli", "none", "-o",
                             "size=16M,pagesize=4K", str(mnt), "-f"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while not is_mounted(mnt):
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.05)
        assert os.statvfs(mnt).f_blocks == 4096
    finally:
        assert unmount(mnt, proc) == 0


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
