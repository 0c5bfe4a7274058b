"""dmemfs_fuse.memory.bdi on real mounts: finding the mount's bdi, readahead and the dirty limit."""

from __future__ import annotations

import os
import re
import time
from pathlib import Path

import pytest
from mounting import Mount, dmemfs

from dmemfs_fuse.memory import bdi

pytestmark = pytest.mark.mount
MIB = 1 << 20
READ_RE = re.compile(r"fs: read\(\d+, \d+, (\d+)\)")


def _device(path: Path) -> str:
    st_dev = os.stat(path).st_dev
    return f"{os.major(st_dev)}:{os.minor(st_dev)}"


def test_device_of_is_the_mounts_st_dev(mnt: Mount) -> None:
    assert bdi.device_of(str(mnt.path)) == _device(mnt.path)
    assert bdi.bdi_dir(str(mnt.path)) == Path("/sys/class/bdi") / _device(mnt.path)


def test_device_of_resolves_a_symlinked_parent(tmp_path: Path) -> None:
    with dmemfs(tmp_path, "size=16M,pagesize=2M") as mount:
        link = tmp_path / "link"
        link.symlink_to(tmp_path)
        assert bdi.device_of(str(link / mount.path.name)) == _device(mount.path)
    assert mount.exit_code == 0, mount.log()


def test_device_of_reads_escaped_mountinfo_and_takes_the_topmost_mount(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    info = tmp_path / "mountinfo"
    info.write_text(
        "22 1 0:21 / /proc rw - proc proc rw\n"
        "40 22 0:39 / /srv/vm\\040disks rw - fuse.dmemfs dmemfs rw\n"
        "41 40 0:40 / /srv/vm\\040disks rw - fuse.dmemfs dmemfs rw\n")
    monkeypatch.setattr(bdi, "MOUNTINFO", info)
    assert bdi.device_of("/srv/vm disks") == "0:40"
    with pytest.raises(FileNotFoundError):
        bdi.device_of("/srv/vm")


def test_device_of_a_directory_that_is_no_mountpoint(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        bdi.device_of(str(tmp_path))


def _cold_read_sizes(mount: Mount, path: Path) -> set[int]:
    """The sizes of the READs a cold sequential read of *path* sends."""
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("3\n")
    before = len(mount.log().splitlines())
    with open(path, "rb") as f:
        while f.read(MIB):
            pass
    lines = mount.log().splitlines()[before:]
    return {int(m.group(1)) for line in lines if (m := READ_RE.search(line))}


def test_read_ahead_1024_gives_1_mib_reads(tmp_path: Path) -> None:
    # The region path: on passthrough reads never reach the daemon.
    with dmemfs(tmp_path, "size=64M,pagesize=2M,debug,passthrough=off") as mount:
        path = mount.path / "f"
        path.write_bytes(os.urandom(32 * MIB))
        bdi.set_read_ahead(str(mount.path), 128)  # what FUSE INIT negotiates by default
        assert max(_cold_read_sizes(mount, path)) < MIB
        bdi.set_read_ahead(str(mount.path), 1024)
        assert (bdi.bdi_dir(str(mount.path)) / "read_ahead_kb").read_text().strip() == "1024"
        sizes = _cold_read_sizes(mount, path)
        assert max(sizes) == MIB, sizes
    assert mount.exit_code == 0, mount.log()


def test_strict_limit_can_be_turned_off_and_on(mnt: Mount) -> None:
    knob = bdi.bdi_dir(str(mnt.path)) / "strict_limit"
    # FUSE mounts start strict; the daemon turns it off once INIT is done.
    deadline = time.monotonic() + 2.0
    while knob.read_text().strip() != "0" and time.monotonic() < deadline:
        time.sleep(0.05)
    assert knob.read_text().strip() == "0"
    bdi.set_strict_limit(str(mnt.path), True)
    assert knob.read_text().strip() == "1"
    bdi.set_strict_limit(str(mnt.path), False)
    assert knob.read_text().strip() == "0"


def test_tune_for_guest_memory(mnt: Mount) -> None:
    assert bdi.tune_for_guest_memory(str(mnt.path))
    assert bdi.read_ahead(str(mnt.path)) == 1024
    assert (bdi.bdi_dir(str(mnt.path)) / "strict_limit").read_text().strip() == "0"


def test_tune_for_guest_memory_warns_instead_of_raising(tmp_path: Path,
                                                       caplog: pytest.LogCaptureFixture) -> None:
    assert not bdi.tune_for_guest_memory(str(tmp_path))
    assert "cannot set read_ahead_kb" in caplog.text


def test_negative_read_ahead_is_refused(mnt: Mount) -> None:
    with pytest.raises(ValueError, match="read_ahead_kb"):
        bdi.set_read_ahead(str(mnt.path), -1)


def test_the_daemon_tunes_its_mount(mnt: Mount) -> None:
    deadline = time.monotonic() + 2.0
    while bdi.read_ahead(str(mnt.path)) != 1024 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert bdi.read_ahead(str(mnt.path)) == 1024
    assert (bdi.bdi_dir(str(mnt.path)) / "strict_limit").read_text().strip() == "0"
