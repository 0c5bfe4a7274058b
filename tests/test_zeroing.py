"""Dirty runs and the background zeroer, driven step by step (no mount, no timing)."""

from __future__ import annotations

from typing import Any

import pytest
import trio
import trio.testing
from hypothesis import given, settings
from hypothesis import strategies as st
from regions import BufferRegion

from dmemfs_fuse.alloc.pool import Pool
from dmemfs_fuse.alloc.poolset import PoolSet
from dmemfs_fuse.alloc.runs import Extent
from dmemfs_fuse.alloc.zeroing import DirtyRuns, Zeroer
from dmemfs_fuse.files.extents import FileExtents
from dmemfs_fuse.files.store import FileStore

DPS = 4096


def make_store(dpages: int = 64, dps: int = DPS, *, fresh: bool = True,
               chunk: int = 4 * DPS, pools: int = 1, **kwargs: Any) -> FileStore:
    """A store over a bytearray "region" (no mmap, no root needed)."""
    per = dpages // pools
    pool_list = [Pool(i, 0, i * per, per, dps) for i in range(pools)]
    return FileStore(BufferRegion(dpages * dps, dps, fresh=fresh), PoolSet(pool_list, dps),
                     zero_chunk_bytes=chunk, **kwargs)


def dpage_bytes(store: FileStore, dpage: int) -> bytes:
    dps = store.dpage_size
    return bytes(store.region.view[dpage * dps : (dpage + 1) * dps])


def drain(zeroer: Zeroer) -> int:
    """Run steps until the zeroer has nothing left; return how many did something."""
    steps = 0
    while zeroer.step():
        steps += 1
    return steps


# -- DirtyRuns (a RunSet: tests/test_runs.py has its set operations) -------------------

def test_a_watched_dpage_leaves_only_when_taken() -> None:
    dirty = DirtyRuns()
    dirty.add(0, 10)
    dirty.watch(5)
    dirty.add(8, 10)  # joins the run that holds the watched dpage: it does not leave
    dirty.take(0, 5)  # splits that run around it
    dirty.take(6, 20)
    assert not dirty.watched_left and 5 in dirty
    dirty.take(5, 1)
    dirty.add(0, 10)  # back in the set: it left all the same
    assert dirty.watched_left
    dirty.watch(3)
    dirty.clear()
    assert dirty.watched_left and not dirty and dirty.dpages == 0


watch_ops = st.lists(st.tuples(st.sampled_from(["add", "take", "clear", "watch"]),
                               st.integers(0, 40), st.integers(0, 12)), max_size=40)


@settings(max_examples=300, deadline=None)
@given(ops=watch_ops)
def test_the_watched_dpage_leaves_exactly_when_a_take_or_clear_removes_it(
        ops: list[tuple[str, int, int]]) -> None:
    dirty = DirtyRuns()
    model: set[int] = set()
    watched: int | None = None
    left = False
    for op, start, count in ops:
        span = set(range(start, start + count))
        if op == "add":
            dirty.add(start, count)
            model |= span
        elif op == "take":
            dirty.take(start, count)
            left |= watched in (model & span)
            model -= span
        elif op == "clear":
            dirty.clear()
            left |= watched is not None
            model.clear()
        else:
            watched = start if count else None  # count 0: stop watching
            dirty.watch(watched)
            left = False
        assert dirty.watched_left == left
        assert {d for ext in dirty for d in range(ext.start, ext.end)} == model


# -- the zeroer's step -----------------------------------------------------------------

def test_step_zeroes_one_bounded_chunk_at_a_time() -> None:
    store = make_store(chunk=4 * DPS)
    fx = FileExtents()
    store.write(fx, 0, 0, b"\xff" * (10 * DPS))
    keep = FileExtents()
    store.write(keep, 0, 0, b"\xee" * DPS)  # a neighbour the zeroer must leave alone
    store.release(fx)
    assert store.dirty.dpages == 10
    assert store.zeroer.step() == 4 * DPS and store.dirty.dpages == 6
    assert store.zeroer.step() == 4 * DPS and store.dirty.dpages == 2
    assert store.zeroer.step() == 2 * DPS and store.dirty.dpages == 0
    assert store.zeroer.step() == 0
    assert bytes(store.region.view[: 10 * DPS]) == bytes(10 * DPS)
    assert dpage_bytes(store, keep.runs()[0][1]) == b"\xee" * DPS
    assert store.zeroer.background_dpages == 10


def test_allocation_after_the_zeroer_caught_up_zeroes_nothing() -> None:
    store = make_store()
    fx = FileExtents()
    store.write(fx, 0, 0, b"\xff" * (64 * DPS))
    store.release(fx)
    drain(store.zeroer)
    other = FileExtents()
    store.resize(other, 0, 64 * DPS)
    assert store.zeroer.foreground_dpages == 0
    assert bytes(store.read(other, 64 * DPS, 0, 64 * DPS)) == bytes(64 * DPS)


def test_allocation_before_the_zeroer_zeroes_what_is_left() -> None:
    store = make_store(chunk=8 * DPS)
    fx = FileExtents()
    store.write(fx, 0, 0, b"\xff" * (64 * DPS))
    store.release(fx)
    store.zeroer.step()  # 8 of 64 done in the background
    other = FileExtents()
    store.resize(other, 0, 64 * DPS)
    assert store.zeroer.foreground_dpages == 56 and not store.dirty
    assert bytes(store.read(other, 64 * DPS, 0, 64 * DPS)) == bytes(64 * DPS)
    assert drain(store.zeroer) == 0


def test_dpages_taken_between_steps_are_not_zeroed_after_the_file_wrote_them() -> None:
    store = make_store(chunk=2 * DPS)
    fx = FileExtents()
    store.write(fx, 0, 0, b"\xff" * (64 * DPS))
    store.release(fx)
    store.zeroer.step()
    owner = FileExtents()
    data = bytes(range(256)) * (64 * DPS // 256)
    store.write(owner, 0, 0, data)  # every dpage, most of them still dirty
    drain(store.zeroer)
    assert bytes(store.read(owner, len(data), 0, len(data))) == data


def test_a_dpage_larger_than_the_chunk_is_zeroed_in_parts_and_let_go_if_taken() -> None:
    dps = 64 * 1024
    store = make_store(8, dps, chunk=16 * 1024)
    fx = FileExtents()
    store.write(fx, 0, 0, b"\xff" * (8 * dps))
    store.release(fx)
    assert store.zeroer.step() == 16 * 1024
    first = store.dirty.first()
    assert first is not None and first.start == 0  # still dirty: only a quarter is done
    assert dpage_bytes(store, 0) == bytes(16 * 1024) + b"\xff" * (48 * 1024)
    # A request takes that very dpage now: it must see zeros, and what it writes stays.
    owner = FileExtents()
    store.resize(owner, 0, 8 * dps)
    assert bytes(store.read(owner, 8 * dps, 0, 8 * dps)) == bytes(8 * dps)
    store.write(owner, 8 * dps, 100, b"mine")
    assert drain(store.zeroer) == 0
    assert bytes(store.read(owner, 8 * dps, 100, 4)) == b"mine"


def test_a_partly_zeroed_dpage_that_came_back_dirty_is_started_over() -> None:
    """Taken by a file, written, freed again while the zeroer was part-way: the part
    already done now holds that file's bytes, so the zeroer must not just finish the rest."""
    dps = 64 * 1024
    store = make_store(4, dps, chunk=16 * 1024)
    old = FileExtents()
    store.write(old, 0, 0, b"\xff" * (4 * dps))
    store.release(old)
    assert store.zeroer.step() == 16 * 1024  # the first quarter of dpage 0
    fx = FileExtents()
    store.write(fx, 0, 0, b"\x02")  # dpage 0 (best fit: the lowest of one run)
    assert fx.runs() == [(0, 0, 1)]
    store.release(fx)  # dirty again, with b"\x02" in the quarter already done
    drain(store.zeroer)
    assert dpage_bytes(store, 0) == bytes(dps)


def test_large_dpages_drain_in_parts() -> None:
    dps = 64 * 1024
    store = make_store(4, dps, chunk=16 * 1024)
    fx = FileExtents()
    store.write(fx, 0, 0, b"\xff" * (4 * dps))
    store.release(fx)
    assert drain(store.zeroer) == 16  # 4 dpages in 4 parts each
    assert bytes(store.region.view) == bytes(4 * dps)
    assert store.zeroer.background_dpages == 4


def test_bad_dpages_are_never_written() -> None:
    store = make_store(16)
    fx = FileExtents()
    store.write(fx, 0, 0, b"\xff" * (16 * DPS))
    store.release(fx)
    store.pools.mark_bad(3)  # free and dirty: out of service, and its memory is poison
    drain(store.zeroer)
    assert not store.dirty
    assert dpage_bytes(store, 3) == b"\xff" * DPS
    assert bytes(store.region.view[: 3 * DPS]) == bytes(3 * DPS)
    assert bytes(store.region.view[4 * DPS :]) == bytes(12 * DPS)


def test_reused_region_is_dirty_except_what_files_claim() -> None:
    store = make_store(16, fresh=False)
    store.region.array[:] = 0xAB
    assert store.dirty.dpages == 16
    store.claim([Extent(2, 3)])  # a recovered file's bytes live there
    assert list(store.dirty) == [Extent(0, 2), Extent(5, 11)]
    drain(store.zeroer)
    assert bytes(store.region.view[2 * DPS : 5 * DPS]) == b"\xab" * (3 * DPS)
    assert bytes(store.region.view[: 2 * DPS]) == bytes(2 * DPS)
    assert bytes(store.region.view[5 * DPS :]) == bytes(11 * DPS)


def test_a_refused_free_marks_nothing_dirty() -> None:
    store = make_store(16)
    fx = FileExtents()
    store.write(fx, 0, 0, b"\xff" * (4 * DPS))
    with pytest.raises(Exception, match="not allocated"):
        store.free([Extent(2, 4)])  # dpages 4 and 5 were never allocated
    assert not store.dirty.overlaps(0, 16)


# -- the background task ---------------------------------------------------------------

def test_background_task_yields_to_requests_and_drains_when_idle() -> None:
    store = make_store(64, chunk=DPS)  # one dpage per step: 64 steps to drain
    fx = FileExtents()
    store.write(fx, 0, 0, b"\xff" * (64 * DPS))
    seen: list[int] = []

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(store.zeroer.run)
            await trio.testing.wait_all_tasks_blocked(0.01)
            assert store.zeroer.steps == 0  # up and idle: nothing is dirty
            store.release(fx)
            # A busy "request loop" never blocks: the zeroer must not take a step meanwhile.
            for _ in range(100):
                seen.append(store.zeroer.steps)
                await trio.sleep(0)
            # Once everything else is blocked, it drains the backlog; a waiter with a
            # longer cushion wakes only when the zeroer has gone idle again.
            await trio.testing.wait_all_tasks_blocked(0.01)
            nursery.cancel_scope.cancel()

    trio.run(main)
    assert set(seen) == {0}
    assert not store.dirty and bytes(store.region.view) == bytes(64 * DPS)
    assert store.zeroer.steps == 64
    assert store.zeroer.background_dpages == 64 and store.zeroer.foreground_dpages == 0


# -- deferred zeroing: dirty dpages handed to a file, zeroed at its first touch -------------

def dirty_store(defer: bool = True, dpages: int = 16, dps: int = DPS, **kwargs: Any
                ) -> FileStore:
    """A store whose every dpage was used and freed, none of them zeroed yet."""
    store = make_store(dpages, dps, defer_zeroing=defer, **kwargs)
    old = FileExtents()
    store.write(old, 0, 0, b"\xff" * (dpages * dps))
    store.release(old)
    assert store.dirty.dpages == dpages
    return store


def test_deferred_truncate_zeroes_nothing_and_reads_zeros() -> None:
    store = dirty_store()
    fx = FileExtents()
    store.resize(fx, 0, 16 * DPS)
    assert store.zeroer.foreground_dpages == 0 and store.dirty.dpages == 16
    assert bytes(store.read(fx, 16 * DPS, DPS + 5, 2 * DPS)) == bytes(2 * DPS)
    assert store.zeroer.foreground_dpages == 3  # the three dpages that read touched
    assert store.dirty.dpages == 13


def test_deferred_write_zeroes_only_partly_covered_dpages() -> None:
    store = dirty_store()
    fx = FileExtents()
    store.resize(fx, 0, 16 * DPS)
    store.write(fx, 16 * DPS, 2 * DPS, b"a" * (3 * DPS))  # three whole dpages: no zeroing
    assert store.zeroer.foreground_dpages == 0 and store.dirty.dpages == 13
    store.write(fx, 16 * DPS, 6 * DPS + 10, b"b" * (DPS + 20))  # two partial dpages
    assert store.zeroer.foreground_dpages == 2 and store.dirty.dpages == 11
    out = bytes(store.read(fx, 16 * DPS, 0, 16 * DPS))
    want = bytearray(16 * DPS)
    want[2 * DPS : 5 * DPS] = b"a" * (3 * DPS)
    want[6 * DPS + 10 : 7 * DPS + 30] = b"b" * (DPS + 20)
    assert out == bytes(want)


def test_write_into_a_fresh_allocation_zeroes_the_rest_of_its_dpage() -> None:
    store = dirty_store()
    fx = FileExtents()
    store.write(fx, 0, 100, b"xyz")  # allocates one dirty dpage
    assert bytes(store.read(fx, DPS, 0, DPS)) == bytes(100) + b"xyz" + bytes(DPS - 103)


def test_zeroer_may_zero_untouched_allocated_dpages_but_never_written_ones() -> None:
    store = dirty_store(chunk=2 * DPS)
    fx = FileExtents()
    store.resize(fx, 0, 16 * DPS)
    store.zeroer.step()  # two of the file's dpages, which it has not touched
    store.write(fx, 16 * DPS, 5 * DPS, b"keep" * 100)
    drain(store.zeroer)
    assert not store.dirty and store.zeroer.background_dpages == 15
    assert bytes(store.read(fx, 16 * DPS, 5 * DPS, 400)) == b"keep" * 100
    assert bytes(store.read(fx, 16 * DPS, 0, 5 * DPS)) == bytes(5 * DPS)


def test_deferred_large_dpage_taken_mid_zeroing_keeps_what_the_file_wrote() -> None:
    dps = 64 * 1024
    store = dirty_store(dpages=4, dps=dps, chunk=16 * 1024)
    assert store.zeroer.step() == 16 * 1024  # a quarter of dpage 0
    fx = FileExtents()
    store.write(fx, 0, 100, b"mine")  # dpage 0: written in part, so zeroed whole first
    assert 0 in [r for _, r, _ in fx.runs()]
    drain(store.zeroer)
    assert bytes(store.read(fx, 104, 0, 104)) == bytes(100) + b"mine"


def test_deferred_shrink_leaves_an_untouched_last_dpage_alone() -> None:
    store = dirty_store()
    fx = FileExtents()
    store.resize(fx, 0, 4 * DPS)
    store.resize(fx, 4 * DPS, DPS + 10)  # the tail of dpage 1 need not be zeroed: it is dirty
    assert store.zeroer.foreground_dpages == 0
    store.resize(fx, DPS + 10, 3 * DPS)
    assert bytes(store.read(fx, 3 * DPS, 0, 3 * DPS)) == bytes(3 * DPS)


def test_eager_store_zeroes_at_allocation() -> None:
    store = dirty_store(defer=False)
    fx = FileExtents()
    store.resize(fx, 0, 16 * DPS)
    assert store.zeroer.foreground_dpages == 16 and not store.dirty
    assert bytes(store.region.view) == bytes(16 * DPS)


store_ops = st.lists(
    st.tuples(st.sampled_from(["write", "resize", "read", "release", "step", "step"]),
              st.integers(0, 2), st.integers(0, 12 * DPS), st.integers(0, 3 * DPS)),
    max_size=60,
)


@settings(max_examples=400, deadline=None)
@given(ops=store_ops, defer=st.booleans(), chunk=st.sampled_from([DPS // 2, DPS, 3 * DPS]))
def test_no_file_sees_old_bytes_and_the_zeroer_never_clobbers(
        ops: list[tuple[str, int, int, int]], defer: bool, chunk: int) -> None:
    """Files against bytearrays, with zeroer steps anywhere in between."""
    store = make_store(24, defer_zeroing=defer, chunk=chunk, pools=2)
    store.region.array[:] = 0xEE  # a reused region: every byte is somebody's old byte
    store.dirty.add(0, 24)
    files = [FileExtents() for _ in range(3)]
    model = [bytearray() for _ in range(3)]
    for number, (op, which, a, b) in enumerate(ops):
        fx, want = files[which], model[which]
        try:
            if op == "write":
                data = bytes([number % 250 + 1]) * b
                store.write(fx, len(want), a, data)
                if a > len(want):
                    want.extend(bytes(a - len(want)))
                want[a : a + b] = data
            elif op == "resize":
                store.resize(fx, len(want), a)
                del want[a:]
                want.extend(bytes(a - len(want)))
            elif op == "read":
                got = bytes(store.read(fx, len(want), a, b))
                assert got == bytes(want[a : a + b])
            elif op == "release":
                store.release(fx)
                want.clear()
            else:
                store.zeroer.step()
        except OSError as exc:
            assert exc.errno == 28  # ENOSPC: nothing changed
    # Read everything only at the end: reading settles dirty dpages, so checking after
    # every step would hide untouched dirty dpages from the later steps.
    for fx, want in zip(files, model, strict=True):
        assert bytes(store.read(fx, len(want), 0, len(want))) == bytes(want)
    for pool in store.pools.pools:
        pool.check()
