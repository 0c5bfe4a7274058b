"""The region's populate step: every chunk faulted in exactly once from worker threads,
the first error raised with its offset, and poisoned memory worked around per dpage."""

from __future__ import annotations

import ctypes
import errno
import os
import threading
from types import SimpleNamespace
from typing import Any

import pytest

from dmemfs_fuse.libc import libc as real
from dmemfs_fuse.memory import region as region_mod
from dmemfs_fuse.memory.region import EHWPOISON, MADV_POPULATE_WRITE, PoolSpec, Region, RegionPlan

DPS = 4096
M = 1 << 20
PARALLEL = len(os.sched_getaffinity(0)) > 1


class FakeMadvise:
    """Stands in for libc's madvise: records populate calls, fails where told to."""

    def __init__(self, real: Any, fail: dict[int, int]) -> None:
        self.real = real
        self.fail = fail  # offset inside the region -> errno for any range covering it
        self.base = 0
        self.calls: list[tuple[int, int]] = []
        self.lock = threading.Lock()
        # The first two populate calls must be under way at once (from two threads),
        # or the barrier times out: the populate is parallel where CPUs allow.
        self.together = threading.Barrier(2, timeout=20) if PARALLEL else None

    def __call__(self, addr: ctypes.c_void_p, length: int, advice: int) -> int:
        start = (addr.value or 0) - self.base
        if advice == MADV_POPULATE_WRITE:
            with self.lock:
                self.calls.append((start, length))
                first_two = len(self.calls) <= 2
            if self.together is not None and first_two:
                self.together.wait()
            for offset, err in self.fail.items():
                if start <= offset < start + length:
                    ctypes.set_errno(err)
                    return -1
        return int(self.real(addr, length, advice))


@pytest.fixture
def small_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(region_mod, "POPULATE_CHUNK", M)


def _open_with(monkeypatch: pytest.MonkeyPatch, size: int,
               fail: dict[int, int]) -> tuple[FakeMadvise, Region | BaseException]:
    plan = RegionPlan(pools=(PoolSpec(0, size),), dpage_size=DPS, backend="memfd")
    fake = FakeMadvise(real.madvise, fail)
    real_mmap = real.mmap

    def mmap(*args: Any) -> Any:
        fake.base = real_mmap(*args)
        return fake.base

    libc = SimpleNamespace(madvise=fake, mmap=mmap, munmap=real.munmap, mlock=real.mlock,
                           munlock=real.munlock)
    monkeypatch.setattr(region_mod, "libc", libc)
    try:
        return fake, Region.open(plan)
    except OSError as exc:
        return fake, exc


def test_every_chunk_is_populated_once_in_parallel(monkeypatch: pytest.MonkeyPatch,
                                       small_chunks: None) -> None:
    fake, region = _open_with(monkeypatch, 24 * M + 5 * DPS, {})
    assert isinstance(region, Region)
    try:
        assert sorted(fake.calls) == [(i * M, M) for i in range(24)] + [(24 * M, 5 * DPS)]
        assert region.poisoned_dpages == []
        progress: list[tuple[int, int]] = []
        fake.together = None
        region._populate(lambda done, total: progress.append((done, total)))
        assert len(progress) == 25 and progress[-1] == (region.size, region.size)
    finally:
        region.close()


def test_a_failed_chunk_fails_the_open_with_its_offset(monkeypatch: pytest.MonkeyPatch,
                                                       small_chunks: None) -> None:
    _, exc = _open_with(monkeypatch, 16 * M, {7 * M + 123: errno.ENOMEM})
    assert isinstance(exc, OSError) and exc.errno == errno.ENOMEM
    assert "at offset 7 MiB" in str(exc) and "not enough memory" in str(exc)


def test_poisoned_memory_is_populated_around(monkeypatch: pytest.MonkeyPatch,
                                             small_chunks: None) -> None:
    bad = [3 * M + 2 * DPS, 11 * M, 11 * M + 17 * DPS, 15 * M + 255 * DPS]
    fake, region = _open_with(monkeypatch, 16 * M, {off: EHWPOISON for off in bad})
    assert isinstance(region, Region)
    try:
        assert region.poisoned_dpages == [off // DPS for off in bad]  # sorted, each once
        # the chunks without poison were populated whole; the others dpage by dpage
        whole = {start for start, length in fake.calls if length == M}
        assert whole == {i * M for i in range(16)}  # tried whole first
        singles = [start for start, length in fake.calls if length == DPS]
        assert len(singles) == 3 * (M // DPS)  # chunks 3, 11 and 15, every dpage
    finally:
        region.close()
