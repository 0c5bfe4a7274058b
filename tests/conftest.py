"""Shared fixtures: a dmemfs mount per test, and a session guard against leftovers.

A test that takes ``mnt`` runs on both data paths (``mnt[passthrough]`` and
``mnt[region]``), unless it is marked ``region_only`` with the reason it
means nothing on the passthrough path.  DMEMFS_TEST_PATHS=region (or
passthrough) narrows a run to one path.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from mounting import Mount, dmemfs, path_options, require_mounts, unescape

HUGEPAGE_ROOT = Path("/sys/kernel/mm/hugepages")
DATA_PATHS = ("passthrough", "region")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "region_only(reason): the test means something only on "
                            "the region data path (the reason says why)")


def pytest_runtest_setup(item: pytest.Item) -> None:
    """A test marked ``mount`` is skipped (or failed, see require_mounts) before its
    fixtures run where it cannot mount."""
    if item.get_closest_marker("mount") is not None:
        require_mounts()


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "data_path" not in metafunc.fixturenames:
        return
    paths = list(DATA_PATHS)
    marker = metafunc.definition.get_closest_marker("region_only")
    if marker is not None:
        assert marker.args and marker.args[0], "region_only needs a reason"
        paths = ["region"]
    wanted = os.environ.get("DMEMFS_TEST_PATHS")
    if wanted:
        paths = [p for p in paths if p in wanted.split(",")]
    metafunc.parametrize("data_path", paths)


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
def mnt(tmp_path: Path, data_path: str) -> Iterator[Mount]:
    """A fresh 64 MiB dmemfs with 2M dpages on *data_path*."""
    with dmemfs(tmp_path, f"size=64M,pagesize=2M,{path_options(data_path)}") as mount:
        yield mount
    assert mount.exit_code == 0, f"daemon exit code {mount.exit_code}:\n{mount.log()}"
