"""Mappings across truncate, munmap and msync behave as on tmpfs (tmpfs is the oracle)."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from mounting import dmemfs, kernel_fs, path_options

pytestmark = pytest.mark.mount
M = 1 << 20

# Run in a child: a fault must kill the child, not the test.
PROBE = """
import mmap, os, sys
path, action = sys.argv[1], sys.argv[2]
fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
os.ftruncate(fd, 4 << 20)
m = mmap.mmap(fd, 4 << 20, mmap.MAP_SHARED)
m[0:5] = b"hello"
m[(3 << 20):(3 << 20) + 5] = b"world"
m.flush()
if action == "shrink":
    os.truncate(path, 4096)      # through another path, as another process would
    print(bytes(m[0:5]).decode(), flush=True)
    m[(3 << 20)]                  # past the new end: SIGBUS on tmpfs
elif action == "grow-back":
    os.truncate(path, 4096)
    os.truncate(path, 4 << 20)
    print(bytes(m[0:5]).decode(), bytes(m[(3 << 20):(3 << 20) + 5]).hex(), flush=True)
elif action == "msync-read":
    m[100:103] = b"abc"
    m.flush()
    with open(path, "rb") as f:
        f.seek(100)
        print(f.read(3).decode(), flush=True)
elif action == "munmap":
    m.close()
    with open(path, "rb") as f:
        print(f.read(5).decode(), os.fstat(fd).st_size, flush=True)
"""


@pytest.fixture
def roots(tmp_path: Path, data_path: str) -> Iterator[tuple[Path, Path]]:
    with dmemfs(tmp_path, f"size=64M,pagesize=2M,{path_options(data_path)}") as mount, \
            kernel_fs(tmp_path / "tmpfs", "tmpfs", "size=64M") as tmpfs:
        yield mount.path, tmpfs
    assert mount.exit_code == 0, mount.log()


def probe(root: Path, action: str) -> tuple[int, str]:
    result = subprocess.run([sys.executable, "-c", PROBE, str(root / f"f-{action}"), action],
                            capture_output=True, text=True, timeout=60, check=False)
    return result.returncode, result.stdout


@pytest.mark.parametrize("action", ["shrink", "grow-back", "msync-read", "munmap"])
def test_mapping_behaves_as_on_tmpfs(roots: tuple[Path, Path], action: str) -> None:
    dmem, tmpfs = roots
    ours, oracle = probe(dmem, action), probe(tmpfs, action)
    assert ours == oracle
    if action == "shrink":
        assert oracle[0] == -7 and oracle[1] == "hello\n"  # killed by SIGBUS after the read
    if action == "grow-back":
        assert oracle[1] == "hello 0000000000\n"  # the shrunk-away part comes back as zeros
