"""The bitmap allocator alone: exact counts, no overlaps, no leaks, loud misuse."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dmemfs_fuse.alloc.bitmap import Bitmap
from dmemfs_fuse.alloc.pool import Pool
from dmemfs_fuse.alloc.poolset import PoolSet
from dmemfs_fuse.alloc.runs import Extent
from dmemfs_fuse.errors import AllocatorError, NoSpaceError

DPS = 2 << 20


def covered(extents: list[Extent]) -> set[int]:
    out: set[int] = set()
    for ext in extents:
        out.update(range(ext.start, ext.end))
    return out


def test_contiguous_when_possible() -> None:
    pool = Pool(0, 0, 100, 64, DPS)
    assert pool.alloc(64) == [Extent(100, 64)]
    assert pool.avail == 0
    with pytest.raises(NoSpaceError):
        pool.alloc(1)
    pool.free(100, 64)
    assert pool.avail == 64
    pool.check()


def test_fewest_runs_when_fragmented() -> None:
    pool = Pool(0, 0, 0, 16, DPS)
    held = pool.alloc(16)
    assert held == [Extent(0, 16)]
    # free runs of 1, 2, 3 and 4 dpages
    for start, count in ((0, 1), (2, 2), (5, 3), (9, 4)):
        pool.free(start, count)
    got = pool.alloc(7)
    assert sorted(e.length for e in got) == [3, 4]
    pool.check()


def test_best_fit_leaves_large_runs_whole() -> None:
    pool = Pool(0, 0, 0, 16, DPS)
    pool.alloc(16)
    pool.free(0, 2)
    pool.free(4, 8)
    assert pool.alloc(2) == [Extent(0, 2)]
    assert pool.largest_free_run() == 8


def test_goal_continues_a_run() -> None:
    pool = Pool(0, 0, 0, 32, DPS)
    pool.alloc(4)  # 0..3
    other = pool.alloc(4)  # 4..7
    pool.free(other[0].start, 4)
    assert pool.alloc(4, goal=4) == [Extent(4, 4)]


def test_free_of_unallocated_is_loud() -> None:
    pool = Pool(0, 0, 0, 8, DPS)
    pool.alloc(2)
    with pytest.raises(AllocatorError, match="not allocated"):
        pool.free(1, 2)
    with pytest.raises(AllocatorError, match="outside"):
        pool.free(7, 4)
    assert pool.avail == 6  # nothing changed
    pool.check()


def test_statistics_are_frozen_and_exact() -> None:
    pool = Pool(3, 1, 0, 10, DPS)
    pool.alloc(4)
    pool.free(1, 1)
    stats = pool.statistics()
    assert (stats.index, stats.node, stats.total_dpages, stats.free_dpages) == (3, 1, 10, 7)
    assert stats.largest_free_run == 6 and stats.free_runs == 2
    assert stats.fragmentation == pytest.approx(1 - 6 / 7)
    with pytest.raises(AttributeError):
        stats.free_dpages = 0  # type: ignore[misc]


def test_poolset_all_or_nothing_and_spill() -> None:
    pools = PoolSet([Pool(0, 0, 0, 8, DPS), Pool(1, 0, 8, 8, DPS)], DPS)
    got = pools.alloc(12)
    assert sum(e.length for e in got) == 12
    assert pools.free_dpages == 4
    with pytest.raises(NoSpaceError):
        pools.alloc(5)
    assert pools.free_dpages == 4  # untouched by the failed attempt
    # an extent that runs across the pool boundary is split on free
    pools.free(got)
    assert pools.free_dpages == 16
    for pool in pools.pools:
        pool.check()


def test_max_alloc_try_dpages_steps_stay_contiguous() -> None:
    pools = PoolSet([Pool(0, 0, 0, 64, DPS)], DPS, max_alloc_try_dpages=4)
    assert pools.alloc(20) == [Extent(0, 20)]


ops = st.lists(
    st.tuples(st.sampled_from(["alloc", "free"]), st.integers(1, 40), st.integers(0, 1000)),
    max_size=60,
)


@settings(max_examples=300, deadline=None)
@given(ops=ops, sizes=st.lists(st.integers(1, 50), min_size=1, max_size=3),
       cap=st.integers(0, 8))
def test_random_sequences_never_overlap_or_leak(
        ops: list[tuple[str, int, int]], sizes: list[int], cap: int) -> None:
    pools_list = []
    first = 0
    for index, size in enumerate(sizes):
        pools_list.append(Pool(index, 0, first, size, DPS))
        first += size
    pools = PoolSet(pools_list, DPS, max_alloc_try_dpages=cap)
    total = sum(sizes)
    live: list[list[Extent]] = []
    owned: set[int] = set()
    for op, count, pick in ops:
        if op == "alloc":
            before = pools.free_dpages
            try:
                got = pools.alloc(count, goal=pick % total)
            except NoSpaceError:
                assert count > before
                assert pools.free_dpages == before
                continue
            dpages = covered(got)
            assert len(dpages) == count == sum(e.length for e in got)
            assert not dpages & owned, "an extent was handed out twice"
            assert all(0 <= d < total for d in dpages)
            owned |= dpages
            live.append(got)
        elif live:
            got = live.pop(pick % len(live))
            pools.free(got)
            owned -= covered(got)
        assert pools.free_dpages == total - len(owned)
        for pool in pools.pools:
            pool.check()
    for got in live:
        pools.free(got)
    assert pools.free_dpages == total


# -- the packed bitmap ---------------------------------------------------------------

def test_bitmap_is_one_bit_per_dpage() -> None:
    assert Bitmap(1 << 18).nbytes == (1 << 18) // 8  # 1 GiB of 4K dpages: 32 KiB
    assert Bitmap(65).nbytes == 16  # whole 64-bit words
    pool = Pool(0, 0, 0, 1 << 18, 4096)
    assert pool.bitmap.nbytes == 32 << 10


def test_bitmap_word_edges() -> None:
    bits = Bitmap(200)
    bits.set(63, 2)  # across the first word boundary
    assert bits.all(63, 2) and not bits.any(0, 63) and not bits.any(65, 135)
    bits.set(64, 128)  # one whole word and the partial ones around it
    assert bits.all(63, 129) and not bits.all(62, 2)
    bits.clear(100, 100)
    assert bits.bits(60, 45).tolist() == [False] * 3 + [True] * 37 + [False] * 5
    assert bits.count() == 100 - 63
    with pytest.raises(IndexError):
        bits.set(199, 2)


bit_ops = st.lists(
    st.tuples(st.sampled_from(["set", "clear", "any", "all"]), st.integers(0, 299),
              st.integers(0, 300)),
    max_size=40,
)


@settings(max_examples=300, deadline=None)
@given(size=st.integers(1, 300), ops=bit_ops)
def test_bitmap_agrees_with_a_list_of_bools(size: int, ops: list[tuple[str, int, int]]) -> None:
    bits = Bitmap(size)
    model = [False] * size
    for op, raw_start, raw_count in ops:
        start = raw_start % size
        count = min(raw_count, size - start)
        if op == "set":
            bits.set(start, count)
            model[start : start + count] = [True] * count
        elif op == "clear":
            bits.clear(start, count)
            model[start : start + count] = [False] * count
        elif op == "any":
            assert bits.any(start, count) == any(model[start : start + count])
        else:
            assert bits.all(start, count) == all(model[start : start + count])
        assert bits.bits().tolist() == model
        assert bits.count() == sum(model)


pool_ops = st.lists(
    st.tuples(st.sampled_from(["alloc", "free", "claim", "bad", "bad_free"]),
              st.integers(1, 40), st.integers(0, 1000)),
    max_size=50,
)


@settings(max_examples=300, deadline=None)
@given(size=st.integers(1, 130), first=st.integers(0, 100), ops=pool_ops)
def test_pool_bitmap_follows_every_operation(size: int, first: int,
                                             ops: list[tuple[str, int, int]]) -> None:
    """alloc, free, claim and mark_bad against a model: the bitmap, the free-run index and
    avail stay exact, misuse raises and changes nothing, bad dpages stay set."""
    pool = Pool(0, 0, first, size, DPS)
    taken = [False] * size  # allocated to someone, or bad
    bad: set[int] = set()
    live: list[Extent] = []
    for op, wanted, pick in ops:
        dpage = first + pick % size
        count = min(wanted, first + size - dpage)  # for claim and bad_free: inside the pool
        if op == "alloc":
            count = wanted
            if count > pool.avail:
                with pytest.raises(NoSpaceError):
                    pool.alloc(count, goal=dpage)
            else:
                got = pool.alloc(count, goal=dpage)
                assert sum(e.length for e in got) == count
                for ext in got:
                    assert not any(taken[ext.start - first : ext.end - first])
                    taken[ext.start - first : ext.end - first] = [True] * ext.length
                live.extend(got)
        elif op == "free" and live:
            ext = live.pop(pick % len(live))
            pool.free(ext.start, ext.length)
            for d in range(ext.start, ext.end):
                taken[d - first] = d in bad
        elif op == "claim":
            if any(taken[dpage - first : dpage - first + count]):
                with pytest.raises(AllocatorError):
                    pool.claim(dpage, count)
            else:
                pool.claim(dpage, count)
                taken[dpage - first : dpage - first + count] = [True] * count
                live.append(Extent(dpage, count))
        elif op == "bad":
            was_free = not taken[dpage - first]
            assert pool.mark_bad(dpage) == (was_free and dpage not in bad)
            bad.add(dpage)
            taken[dpage - first] = True
        elif op == "bad_free" and not all(taken[dpage - first : dpage - first + count]):
            before = pool.avail  # freeing what is not allocated is loud and changes nothing
            with pytest.raises(AllocatorError, match="not allocated"):
                pool.free(dpage, count)
            assert pool.avail == before
        assert pool.bitmap.bits().tolist() == taken
        assert pool.avail == size - sum(taken)
        pool.check()
