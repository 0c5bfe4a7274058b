"""The daemon's life on real mounts: backends, sizing, huge pages, signals, bad input."""

from __future__ import annotations

import errno
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from mounting import daemon_command, dmemfs, is_mounted, kernel_fs, run_daemon, unmount

from dmemfs_fuse.host.options import OPTIONS

M = 1 << 20
G = 1 << 30
HUGE_2M = Path("/sys/kernel/mm/hugepages/hugepages-2048kB")


def hugepages_total() -> int:
    return int((HUGE_2M / "nr_hugepages").read_text())


@pytest.fixture
def hugetlbfs(tmp_path: Path) -> Iterator[Path]:
    """A private hugetlbfs mount with 2 MiB pages."""
    with kernel_fs(tmp_path / "hugetlbfs", "hugetlbfs", "pagesize=2M") as path:
        yield path


@pytest.mark.parametrize(("options", "message"), [
    ("pagesize=2M", "size: required"),
    ("size=3M,pagesize=2M", "not a multiple of pagesize"),
    ("size=1G,bogus=1", "bogus: unknown option"),
    ("size=1P", "size=1P: not a size"),
    ("size=64M,pagesize=2M,nodes=0:2M", "not both"),
    ("nodes=7:64M", "node 7 does not exist"),
    ("size=100T,pagesize=4K", "of memory is available"),
    ("size=!100T", "no more free memory"),
    ("size=64M,pagesize=4K,region=hugetlbfs", "region=hugetlbfs: needs pagesize 2M or 1G"),
    ("size=64M,region=/proc", "is a directory"),
    ("size=64M,region=/nonexistent/dir/file", "its directory does not exist"),
])
def test_bad_options_fail_before_reserving(tmp_path: Path, options: str, message: str) -> None:
    before = hugepages_total()
    result = run_daemon(tmp_path, options)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], result.stderr
    assert hugepages_total() == before


def test_help_lists_every_option() -> None:
    out = subprocess.run([sys.executable, "-m", "dmemfs_fuse.host.cli", "--help"],
                         capture_output=True, text=True, check=True).stdout
    for opt in OPTIONS:
        assert f"  {opt.name}" in out
        assert opt.default in " ".join(out.split())


def test_version_names_the_library_and_the_kernels_protocol() -> None:
    """libfuse 3.17 is the one loaded (not the system's 3.14), and a throwaway mount asks
    the kernel for its FUSE protocol; it leaves no mount behind."""
    version = subprocess.run([sys.executable, "-m", "dmemfs_fuse.host.cli", "--version"],
                             capture_output=True, text=True, check=True).stdout.splitlines()
    assert version[0].startswith("dmemfs ")
    assert version[1].startswith("libfuse 3.17."), version
    assert "pyfuse3 3.5.0+dmemfs1" in version[1]
    # Linux 6.9 and later: protocol 7.40 or newer, with passthrough.
    assert re.fullmatch(r"kernel FUSE protocol 7\.(4\d|[5-9]\d) \(at INIT of a throwaway "
                        r"mount\); offered: passthrough, handle_killpriv_v2, .*", version[2]), \
        version
    assert "dmemfs-probe" not in Path("/proc/mounts").read_text()


def test_hugetlbfs_region_reserves_and_gives_back(tmp_path: Path, hugetlbfs: Path) -> None:
    before = hugepages_total()
    options = f"size=64M,pagesize=2M,region=hugetlbfs,hugetlbfs={hugetlbfs},reserve_hugepages"
    with dmemfs(tmp_path, options) as mount:
        assert hugepages_total() == before + 32
        assert "hugetlbfs file in" in mount.log()
        (mount.path / "f").write_bytes(b"x" * 3 * M)
        assert (mount.path / "f").read_bytes() == b"x" * 3 * M
    assert mount.exit_code == 0, mount.log()
    assert hugepages_total() == before


def test_hugetlbfs_without_pages_is_a_clear_error(tmp_path: Path, hugetlbfs: Path) -> None:
    result = run_daemon(tmp_path, f"size=64M,pagesize=2M,region=hugetlbfs,hugetlbfs={hugetlbfs}")
    assert result.returncode == 2
    assert "free huge pages of 2 MiB, 32 needed" in result.stderr


def test_memfd_hugetlb_region(tmp_path: Path) -> None:
    before = hugepages_total()
    with dmemfs(tmp_path, "size=32M,pagesize=2M,region=memfd,reserve_hugepages") as mount:
        assert "memfd with huge pages" in mount.log()
        assert hugepages_total() == before + 16
    assert mount.exit_code == 0 and hugepages_total() == before


def test_plain_memfd_fallback_is_announced(tmp_path: Path) -> None:
    # Ask for more 2M pages than are free, whatever the host has reserved.
    pages = int((HUGE_2M / "free_hugepages").read_text()) + 16
    with dmemfs(tmp_path, f"size={pages * 2}M,pagesize=2M,region=memfd") as mount:
        assert "falling back to a plain memfd" in mount.log()
        assert mount.statvfs().f_bsize == 2 * M


def test_path_region_outlives_the_daemon(tmp_path: Path) -> None:
    backing = Path("/dev/shm") / f"dmemfs-test-{os.getpid()}"
    try:
        with dmemfs(tmp_path, f"size=16M,pagesize=4K,region={backing}") as mount:
            (mount.path / "f").write_bytes(b"persist")
        assert mount.exit_code == 0
        assert backing.stat().st_size == 16 * M
        # its metadata beside it: the next daemon finds the file again
        with dmemfs(tmp_path, f"size=16M,pagesize=4K,region={backing}") as mount:
            assert (mount.path / "f").read_bytes() == b"persist"
        # without metadata the file's old bytes are reused: new files must read as zeros
        with dmemfs(tmp_path, f"size=16M,pagesize=4K,region={backing},meta=none") as mount:
            assert os.listdir(mount.path) == []
            with open(mount.path / "g", "wb") as f:
                f.truncate(16 * M)
            assert (mount.path / "g").read_bytes() == bytes(16 * M)
    finally:
        for leftover in backing.parent.glob(backing.name + "*"):
            leftover.unlink()


def test_explicit_pools_on_one_node(tmp_path: Path) -> None:
    with dmemfs(tmp_path, "nodes=0:16M,0:16M,pagesize=2M,passthrough=off") as mount:
        assert mount.statvfs().f_blocks == 16
        # larger than either pool: spills from the first into the second (the region
        # path; a passthrough file lives in one pool's tmpfs)
        with open(mount.path / "big", "wb") as f:
            f.truncate(24 * M)
        assert mount.free_dpages() == 4


def test_one_gib_region_exact_enospc_and_recovery(tmp_path: Path) -> None:
    with dmemfs(tmp_path, "size=1G,pagesize=2M") as mount:
        st = mount.statvfs()
        assert (st.f_bsize, st.f_blocks, st.f_bfree) == (2 * M, 512, 512)
        (mount.path / "vm0").touch()
        (mount.path / "one-more").touch()
        os.truncate(mount.path / "vm0", 512 * 2 * M)
        assert mount.free_dpages() == 0
        with pytest.raises(OSError) as info:
            os.truncate(mount.path / "one-more", 1)
        assert info.value.errno == errno.ENOSPC
        os.unlink(mount.path / "vm0")
        os.unlink(mount.path / "one-more")
        assert mount.free_dpages() == 512


def test_not_lockable_is_an_error_unless_allowed(tmp_path: Path) -> None:
    # Without CAP_IPC_LOCK, RLIMIT_MEMLOCK (1 MiB here) applies and mlock fails.
    drop = ["setpriv", "--inh-caps=-ipc_lock", "--bounding-set=-ipc_lock",
            "prlimit", "--memlock=1048576", "--"]
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    result = subprocess.run(drop + daemon_command(mnt, "size=16M,pagesize=4K,passthrough=off"),
                            capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 1
    assert "mlock of 16 MiB failed" in result.stderr and "allow_unlocked" in result.stderr
    assert not is_mounted(mnt)
    log_path = tmp_path / "unlocked.log"
    with open(log_path, "wb") as log:
        options = "size=16M,pagesize=4K,allow_unlocked,passthrough=off"
        proc = subprocess.Popen(drop + daemon_command(mnt, options),
                                stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 30
        while not is_mounted(mnt) and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert is_mounted(mnt), log_path.read_text()
        assert "running UNLOCKED" in log_path.read_text()
    finally:
        assert unmount(mnt, proc) == 0


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_signal_unmounts_cleanly(tmp_path: Path, signum: int) -> None:
    before = hugepages_total()
    with dmemfs(tmp_path, "size=32M,pagesize=2M,region=memfd,reserve_hugepages") as mount:
        mount.proc.send_signal(signum)
        assert mount.proc.wait(timeout=20) == 0, mount.log()
        assert not is_mounted(mount.path)
    assert hugepages_total() == before


def test_detaches_once_mounted(tmp_path: Path) -> None:
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    cmd = daemon_command(mnt, "size=16M,pagesize=4K")
    cmd.remove("-f")
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=60, check=False)
    try:
        assert result.returncode == 0, result.stderr
        assert (result.stdout, result.stderr) == ("", ""), "success is quiet, as for mount(8)"
        assert is_mounted(mnt), "the command returned before the mount was up"
        (mnt / "f").write_text("detached")
        assert (mnt / "f").read_text() == "detached"
    finally:
        subprocess.run(["fusermount3", "-u", str(mnt)], check=False)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        pids = subprocess.run(["pgrep", "-f", f"dmemfs_fuse.host.cli none {mnt} "],
                              capture_output=True, text=True, check=False).stdout.split()
        if not pids:
            break
        time.sleep(0.1)
    else:
        pytest.fail(f"the detached daemon did not exit after unmount: {pids}")
    assert not is_mounted(mnt)


def test_verbose_brings_the_start_up_log_back(tmp_path: Path) -> None:
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    cmd = daemon_command(mnt, "size=16M,pagesize=4K,passthrough=off", "-v")
    cmd.remove("-f")
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=60, check=False)
    try:
        assert result.returncode == 0, result.stderr
        assert "INFO dmemfs_fuse.memory.region: region: 16 MiB of memfd" in result.stderr
    finally:
        subprocess.run(["fusermount3", "-u", str(mnt)], check=False)
        wait_gone = time.monotonic() + 20
        while is_mounted(mnt) and time.monotonic() < wait_gone:
            time.sleep(0.1)


def test_detached_start_failure_is_reported(tmp_path: Path, hugetlbfs: Path) -> None:
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    cmd = daemon_command(mnt, "size=64M,pagesize=4K,region=/dev/null")
    cmd.remove("-f")
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode != 0
    assert "dmemfs:" in result.stderr
    assert not is_mounted(mnt)
