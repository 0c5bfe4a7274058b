"""The test harness itself: where a real mount cannot be made, a test says why."""

from __future__ import annotations

import os

import pytest
from mounting import require_mounts


def test_without_root_a_mount_test_is_skipped_and_under_tools_test_it_fails(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    monkeypatch.delenv("DMEMFS_REQUIRE_MOUNTS", raising=False)
    with pytest.raises(pytest.skip.Exception, match="a real mount needs root"):
        require_mounts()
    monkeypatch.setenv("DMEMFS_REQUIRE_MOUNTS", "1")
    with pytest.raises(pytest.fail.Exception, match="a real mount needs root"):
        require_mounts()


def test_as_root_with_dev_fuse_nothing_is_in_the_way(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    monkeypatch.setattr(os.path, "exists", lambda path: path == "/dev/fuse")
    require_mounts()


def test_a_test_that_needs_only_root_runs_without_dev_fuse(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    monkeypatch.setattr(os.path, "exists", lambda path: False)
    require_mounts(fuse=False)
    monkeypatch.setenv("DMEMFS_REQUIRE_MOUNTS", "0")  # 0 is off: a skip
    with pytest.raises(pytest.skip.Exception, match="needs /dev/fuse"):
        require_mounts()
