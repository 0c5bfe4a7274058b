"""Shared fixtures: a dmemfs mount per test, and a session guard against leftovers."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from mounting import Mount, dmemfs, unescape

HUGEPAGE_ROOT = Path("/sys/kernel/mm/hugepages")


def _hugepage_counts() -> dict[str, str]:
    return {p.name: (p / "nr_hugepages").read_text().strip()
            for p in sorted(HUGEPAGE_ROOT.glob("hugepages-*"))}


def _pool_mounts() -> list[str]:
    """The passthrough path's tmpfs instances (left by a daemon that was killed)."""
    with open("/proc/mounts") as mounts:
        return [unescape(line.split()[1]) for line in mounts
                if line.split()[0] == "dmemfs-pool"]


def _fuse_mounts(under: Path) -> list[str]:
    with open("/proc/mounts") as mounts:
        return [unescape(line.split()[1]) for line in mounts
                if line.split()[2].startswith("fuse")
                and unescape(line.split()[1]).startswith(str(under))]


@pytest.fixture(scope="session", autouse=True)
def no_leftovers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Fail the run if it leaves a FUSE mount, pool memory or a changed huge page reservation
    behind."""
    base = tmp_path_factory.getbasetemp().resolve()
    pages_before = _hugepage_counts()
    yield
    assert _fuse_mounts(base) == [], "a test left a FUSE mount behind"
    assert _pool_mounts() == [], "a test left pool memory (tmpfs) mounted"
    assert _hugepage_counts() == pages_before, "a test left huge pages reserved"


@pytest.fixture
def mnt(tmp_path: Path) -> Iterator[Mount]:
    """A fresh 64 MiB dmemfs with 2M dpages."""
    if os.geteuid() != 0 or not os.path.exists("/dev/fuse"):
        pytest.fail("end-to-end tests need root and /dev/fuse")
    with dmemfs(tmp_path) as mount:
        yield mount
    assert mount.exit_code == 0, f"daemon exit code {mount.exit_code}:\n{mount.log()}"
