"""dmemctl, policies, metrics and the pool picture against a real mount."""

from __future__ import annotations

import errno
import json
import os
import stat
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from mounting import Mount, dmemctl, dmemfs, free_port, metrics
from PIL import Image

from dmemfs_fuse.insight.control import socket_path
from dmemfs_fuse.insight.picture import CELL, FREE, ROW_GAP, owner_colour

M = 1 << 20
DPS = 2 * M
POLICY = "user.dmem.policy"

pytestmark = pytest.mark.mount


@pytest.fixture
def two_pools(tmp_path: Path) -> Iterator[tuple[Mount, int]]:
    """Two 32 MiB pools of 2 MiB dpages on node 0, with metrics on a free port, on the
    region path, where files span pools and interleave dpage by dpage (test_passthrough
    has the passthrough path's policies)."""
    port = free_port()
    with dmemfs(tmp_path, f"nodes=0:32M,0:32M,pagesize=2M,metrics={port},passthrough=off"
                ) as mount:
        yield mount, port
    assert mount.exit_code == 0, mount.log()


def only_mount_dmemctl(mount: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """dmemctl without -m, in a private mount namespace where every other dmemfs (of other
    tests or benchmarks running on this host) is lazily unmounted, so *mount* is the only one."""
    script = ("for m in $(awk '$3 == \"fuse.dmemfs\" { print $2 }' /proc/mounts); do "
              f'[ "$m" = "{mount}" ] || umount -l "$m"; done; exec "$0" "$@"')
    result = subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c",
                             script, sys.executable, "-m", "dmemfs_fuse.insight.dmemctl", *args],
                            capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stderr
    return result


def ctl_json(*args: str) -> Any:
    return json.loads(dmemctl("--json", *args).stdout)


def make(path: Path, size: int) -> None:
    with open(path, "wb") as f:
        f.truncate(size)


def test_status_extents_and_files(two_pools: tuple[Mount, int]) -> None:
    mount, _ = two_pools
    make(mount.path / "vm0", 20 * M)
    status = ctl_json("-m", str(mount.path), "status")
    assert (status["total_dpages"], status["free_dpages"]) == (32, 22)
    assert [p["pool"] for p in status["pools"]] == [0, 1]
    assert status["pools"][0]["free_dpages"] == 6 and status["pools"][0]["largest_free_run"] == 6
    human = only_mount_dmemctl(mount.path, "status").stdout  # the only dmemfs: no -m needed
    assert "total_dpages 32  free_dpages 22" in human
    ext = ctl_json("extents", str(mount.path / "vm0"))
    assert ext["allocated"] == 20 * M and ext["policy"] == "local"
    assert ext["extents"] == [{"file_offset": 0, "pool": 0, "node": 0, "region_offset": 0,
                               "length": 20 * M, "kernel_nodes": [0]}]
    files = ctl_json("-m", str(mount.path), "files")["files"]
    assert files[0]["path"] == "/vm0" and files[0]["allocated"] == 20 * M


def wait_for(mount: Mount, done: Callable[[dict[str, Any]], bool]) -> dict[str, Any]:
    """Poll ``status`` until *done* holds (or a minute passes); return the last answer."""
    deadline = time.monotonic() + 60
    status: dict[str, Any] = ctl_json("-m", str(mount.path), "status")
    while not done(status) and time.monotonic() < deadline:
        time.sleep(0.05)
        status = ctl_json("-m", str(mount.path), "status")
    return status


def test_freed_dpages_are_zeroed_in_the_background(two_pools: tuple[Mount, int]) -> None:
    mount, port = two_pools
    (mount.path / "big").write_bytes(b"\xff" * (40 * M))
    os.unlink(mount.path / "big")
    # The kernel's FORGET frees the dpages, then the zeroer drains the backlog between
    # requests; neither is timed.
    status = wait_for(mount, lambda st: st["free_dpages"] == 32 and not st["dirty_dpages"])
    assert status["free_dpages"] == 32 and status["dirty_dpages"] == 0
    assert status["zeroing"]["background_zeroed_dpages"] == 20
    assert "dirty dpages 0 (" in dmemctl(
        "-m", str(mount.path), "status").stdout
    values = metrics(port)
    assert values["dmemfs_dirty_bytes"] == 0
    assert values["dmemfs_background_zeroed_bytes_total"] == 40 * M
    # The same dpages again: zero already, so the truncate had nothing to zero.
    make(mount.path / "again", 64 * M)
    assert (mount.path / "again").read_bytes() == bytes(64 * M)
    status = ctl_json("-m", str(mount.path), "status")
    assert status["zeroing"]["foreground_zeroed_dpages"] == 0


def test_extents_are_placed_where_the_kernel_says(two_pools: tuple[Mount, int]) -> None:
    mount, _ = two_pools
    (mount.path / "d").mkdir()
    os.setxattr(mount.path / "d", POLICY, b"bind:1")
    make(mount.path / "d" / "f", 8 * M)
    ext = ctl_json("extents", str(mount.path / "d" / "f"))
    # the daemon asks move_pages() about its own mapping of each extent
    assert {e["pool"] for e in ext["extents"]} == {1}
    for e in ext["extents"]:
        assert e["kernel_nodes"] == [e["node"]]
        assert e["region_offset"] >= 32 * M  # inside pool 1's slice of the region


def test_policy_xattr_inherit_and_errors(two_pools: tuple[Mount, int]) -> None:
    mount, _ = two_pools
    d = mount.path / "tenant"
    d.mkdir()
    with pytest.raises(OSError) as info:
        os.getxattr(d, POLICY)
    assert info.value.errno == errno.ENODATA
    os.setxattr(d, POLICY, b"interleave:0-1")
    assert os.getxattr(d, POLICY) == b"interleave:0-1"
    assert POLICY in os.listxattr(d)
    make(d / "f", 8 * M)
    assert os.getxattr(d / "f", POLICY) == b"interleave:0-1"  # inherited
    assert [e["pool"] for e in ctl_json("extents", str(d / "f"))["extents"]] == [0, 1, 0, 1]
    for bad in (b"bind:7", b"sideways", b"bind:", b"interleave:0-99999999999"):
        with pytest.raises(OSError) as info:
            os.setxattr(d, POLICY, bad)
        assert info.value.errno == errno.EINVAL
    result = dmemctl("policy", str(d), "bind:9", check=False)
    assert result.returncode == 1
    assert "no pool 9 (pools: 0, 1)" in result.stderr
    assert dmemctl("policy", str(d), "preferred:1").stdout.strip() == f"{d}: preferred:1"
    os.removexattr(d, POLICY)
    assert dmemctl("policy", str(d)).stdout.strip() == f"{d}: local (default)"


def test_bind_enospc_and_preferred_fallback(two_pools: tuple[Mount, int]) -> None:
    mount, _ = two_pools
    (mount.path / "b").mkdir()
    os.setxattr(mount.path / "b", POLICY, b"bind:1")
    make(mount.path / "b" / "full", 32 * M)
    with open(mount.path / "b" / "more", "wb") as f, pytest.raises(OSError) as info:
        f.truncate(DPS)
    assert info.value.errno == errno.ENOSPC
    assert mount.free_dpages() == 16  # pool 0 untouched
    (mount.path / "p").mkdir()
    os.setxattr(mount.path / "p", POLICY, b"preferred:1")
    make(mount.path / "p" / "f", 4 * M)
    ext = ctl_json("extents", str(mount.path / "p" / "f"))
    assert {e["pool"] for e in ext["extents"]} == {0}
    status = ctl_json("-m", str(mount.path), "status")
    assert status["pools"][1]["fallback_dpages"] == 2
    assert status["enospc"] >= 1


def test_metrics_endpoint(two_pools: tuple[Mount, int]) -> None:
    mount, port = two_pools
    make(mount.path / "a", 6 * M)
    (mount.path / "a").read_bytes()
    values = metrics(port)
    assert values['dmemfs_pool_free_bytes{node="0",pool="0"}'] == 26 * M
    assert values['dmemfs_pool_total_bytes{node="0",pool="1"}'] == 32 * M
    assert values['dmemfs_pool_allocations_total{node="0",pool="0"}'] >= 1
    assert values["dmemfs_read_bytes_total"] == 6 * M
    assert values['dmemfs_fuse_requests_total{op="setattr",result="ok"}'] >= 1
    assert any(k.startswith('dmemfs_fuse_request_duration_seconds_bucket{le="0.001",op="read"')
               for k in values)
    assert values["dmemfs_dpage_size_bytes"] == DPS
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(f"http://127.0.0.1:{port}/nothing", timeout=10)
    assert info.value.code == 404


def test_map_png_shows_owners_and_free(two_pools: tuple[Mount, int], tmp_path: Path) -> None:
    mount, _ = two_pools
    make(mount.path / "a", 4 * M)
    ino = os.stat(mount.path / "a").st_ino
    out = tmp_path / "map.png"
    assert "wrote" in dmemctl("-m", str(mount.path), "map", "--png", str(out)).stdout
    image = Image.open(out).convert("RGB")
    step = CELL + ROW_GAP

    def cell(n: int) -> tuple[int, ...]:
        pixel = image.getpixel((10 + n * step + CELL // 2, 4 + 16 + CELL // 2))
        assert isinstance(pixel, tuple)
        return pixel

    assert cell(0) == owner_colour(ino) and cell(1) == owner_colour(ino)
    assert cell(2) == FREE


def test_global_options_work_after_the_command(two_pools: tuple[Mount, int]) -> None:
    """`dmemctl status --json -m MNT` is `dmemctl --json -m MNT status`, as people type it."""
    mount, _ = two_pools
    make(mount.path / "g", 2 * M)
    before = json.loads(dmemctl("--json", "-m", str(mount.path), "status").stdout)
    after = json.loads(dmemctl("status", "--json", "-m", str(mount.path)).stdout)
    assert before["pools"] == after["pools"]
    extents = json.loads(dmemctl("extents", str(mount.path / "g"), "--json",
                                 "-m", str(mount.path)).stdout)
    assert extents["extents"]
    files = dmemctl("-m", str(mount.path), "files", "-n", "1", "--json").stdout
    assert json.loads(files)["files"][0]["path"] == "/g"


def test_trace_toggles_the_request_log(two_pools: tuple[Mount, int]) -> None:
    mount, _ = two_pools
    dmemctl("-m", str(mount.path), "trace", "on")
    (mount.path / "traced").write_bytes(b"x")
    deadline = time.monotonic() + 10
    while "create(1, b'traced'" not in mount.log() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert "create(1, b'traced'" in mount.log()
    dmemctl("-m", str(mount.path), "trace", "off")
    (mount.path / "quiet").write_bytes(b"x")
    time.sleep(0.3)
    assert "b'quiet'" not in mount.log()


def test_control_socket_is_root_only(two_pools: tuple[Mount, int]) -> None:
    mount, _ = two_pools
    path = socket_path(str(mount.path))
    assert stat.S_IMODE(path.stat().st_mode) == 0o600 and path.stat().st_uid == 0
    result = subprocess.run(
        ["setpriv", "--reuid=1000", "--regid=1000", "--clear-groups", sys.executable,
         "-m", "dmemfs_fuse.insight.dmemctl", "-m", str(mount.path), "status"],
        capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 1 and "permission denied" in result.stderr


@pytest.mark.parametrize(("args", "message"), [
    (["files", "-n", "many"], "argument -n/--limit: 'many' is not a whole number"),
    (["files", "-n", "0"], "argument -n/--limit: '0' is not a whole number"),
    (["trace", "maybe"], "argument state: invalid choice: 'maybe'"),
    (["map"], "the following arguments are required: --png"),
    (["policy"], "the following arguments are required: FILE"),
    (["poison"], "the following arguments are required: OFFSET|FILE:OFFSET"),
    (["poison", "12Q"], "'12Q' is not a byte offset"),
    (["status", "extra"], "unrecognized arguments: extra"),
])
def test_dmemctl_bad_arguments_exit_2_naming_them(args: list[str], message: str) -> None:
    result = dmemctl(*args, check=False)
    assert result.returncode == 2
    assert message in result.stderr.strip().splitlines()[-1], result.stderr


def test_dmemctl_errors_are_one_clear_line(tmp_path: Path) -> None:
    result = dmemctl("-m", str(tmp_path), "status", check=False)
    assert result.returncode == 1
    assert result.stderr.strip() == f"dmemctl: {tmp_path}: no dmemfs is mounted there"
    result = dmemctl("extents", str(tmp_path), check=False)
    assert result.stderr.strip() == f"dmemctl: {tmp_path}: not on a dmemfs mount"
    assert dmemctl("frobnicate", check=False).returncode == 2
