"""Odd and hostile use of a mount: running out of inodes with tiny files, and truncate
racing writes and mappings of the same file.  Errnos must be tmpfs's, no other file may
be touched, and no dpage may leak."""

from __future__ import annotations

import errno
import hashlib
import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from mounting import Mount, dmemfs

M = 1 << 20

pytestmark = pytest.mark.mount


def used_by_files(root: Path, dpage: int) -> int:
    """Dpages the files under *root* hold, from st_blocks."""
    total = 0
    for dirpath, _, names in os.walk(root):
        for name in names:
            total += os.lstat(os.path.join(dirpath, name)).st_blocks * 512 // dpage
    return total


def wait_accounting(mount: Mount) -> tuple[int, int]:
    """(used dpages by statfs, by st_blocks), once the kernel's FORGETs have landed."""
    deadline = time.monotonic() + 10
    while True:
        st = mount.statvfs()
        pair = (st.f_blocks - st.f_bfree, used_by_files(mount.path, st.f_bsize))
        if pair[0] == pair[1] or time.monotonic() > deadline:
            return pair
        time.sleep(0.05)


def test_tiny_files_until_inodes_run_out(tmp_path: Path) -> None:
    """Fill every inode with one-byte files: ENOSPC exactly at nr_inodes (statfs says so),
    nothing leaks, and deleting some makes room again."""
    nr_inodes = 3000
    with dmemfs(tmp_path, f"size=64M,pagesize=4K,nr_inodes={nr_inodes}") as mount:
        made = 0
        with pytest.raises(OSError) as info:
            while True:
                fd = os.open(mount.path / f"f{made}", os.O_CREAT | os.O_EXCL | os.O_WRONLY)
                os.write(fd, b"x")
                os.close(fd)
                made += 1
        assert info.value.errno == errno.ENOSPC
        assert made == nr_inodes - 1  # the root is one of them
        st = mount.statvfs()
        assert (st.f_files, st.f_ffree) == (nr_inodes, 0)
        assert st.f_blocks - st.f_bfree == made  # one 4K dpage each
        for n in range(0, made, 10):
            os.unlink(mount.path / f"f{n}")
        deadline = time.monotonic() + 10
        while mount.statvfs().f_ffree < made // 10 + (made % 10 > 0):
            assert time.monotonic() < deadline
            time.sleep(0.05)
        for n in range(0, made, 10):
            (mount.path / f"g{n}").write_bytes(b"yy")
        assert wait_accounting(mount)[0] == made
        assert (mount.path / "f1").read_bytes() == b"x"
    assert mount.exit_code == 0, mount.log()


MAPPER = """
import mmap, os, sys, time
path, until = sys.argv[1], float(sys.argv[2])
while time.time() < until:
    fd = os.open(path, os.O_RDWR)
    size = os.fstat(fd).st_size
    try:  # Python's own size check can lose the race with a truncate
        m = mmap.mmap(fd, size, mmap.MAP_SHARED) if size else None
    except ValueError:
        m = None
    if m is not None:
        for off in range(0, size, 4096):
            m[off] = m[off]  # fault in and dirty every page: write-back races the truncates
        m.flush()
        m.close()
    os.close(fd)
"""


def test_truncate_racing_writes_and_mappings(tmp_path: Path) -> None:
    """One file is truncated up and down while threads write to it and a process maps,
    dirties and msyncs it.  A mapping past a concurrent truncate may take SIGBUS, as on
    tmpfs; nothing else may fail, the bystander file keeps its bytes, and afterwards the
    pools' accounting equals what the files hold."""
    with dmemfs(tmp_path, "size=64M,pagesize=4K") as mount:
        bystander = mount.path / "bystander"
        content = random.Random(1).randbytes(6 * M)
        bystander.write_bytes(content)
        target = mount.path / "target"
        target.write_bytes(b"")
        until = time.time() + 4
        errors: list[BaseException] = []

        def truncater() -> None:
            rng = random.Random(2)
            try:
                while time.time() < until:
                    os.truncate(target, rng.randrange(0, 8 * M))
            except BaseException as exc:  # reported below
                errors.append(exc)

        def writer(seed: int) -> None:
            rng = random.Random(seed)
            fd = os.open(target, os.O_WRONLY)
            try:
                while time.time() < until:
                    os.pwrite(fd, rng.randbytes(rng.randrange(1, 200_000)),
                              rng.randrange(0, 8 * M))
            except BaseException as exc:
                errors.append(exc)
            finally:
                os.close(fd)

        threads = [threading.Thread(target=truncater)] + [
            threading.Thread(target=writer, args=(seed,)) for seed in (3, 4)]
        for thread in threads:
            thread.start()
        mapper_runs, sigbus = 0, 0
        while time.time() < until:
            code = subprocess.run([sys.executable, "-c", MAPPER, str(target), str(until)],
                                  timeout=60, check=False).returncode
            mapper_runs += 1
            assert code in (0, -signal.SIGBUS), f"mapper exited with {code}"
            sigbus += code == -signal.SIGBUS
        for thread in threads:
            thread.join()
        assert not errors, errors
        assert hashlib.sha256(bystander.read_bytes()).digest() == \
            hashlib.sha256(content).digest()
        statfs_used, file_used = wait_accounting(mount)
        assert statfs_used == file_used, "dpages leaked or were double-counted"
        size = target.stat().st_size
        assert len(target.read_bytes()) == size
        os.unlink(target)
        os.unlink(bystander)
        assert wait_accounting(mount) == (0, 0)
        assert "Traceback" not in mount.log() and "EIO" not in mount.log()
    assert mount.exit_code == 0, mount.log()
    print(f"mapper runs {mapper_runs}, of which SIGBUS {sigbus}")
