"""Runs of dpages (alloc/runs.py) and the pool-boundary split, against per-dpage models."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dmemfs_fuse.alloc.pool import FreeRuns, Pool
from dmemfs_fuse.alloc.poolset import PoolSet
from dmemfs_fuse.alloc.runs import Extent, Mapped, RunMap, RunSet, coalesce
from dmemfs_fuse.errors import AllocatorError


def dpages_of(runs: list[Extent]) -> list[int]:
    return [d for run in runs for d in range(run.start, run.end)]


def assert_maximal(runs: list[Extent]) -> None:
    """Sorted, never touching or overlapping, none empty: the fewest runs for the set."""
    assert all(a.end < b.start for a, b in itertools.pairwise(runs))
    assert all(run.length > 0 for run in runs)


# -- RunSet -----------------------------------------------------------------------------

def test_runs_join_and_split() -> None:
    runs = RunSet()
    runs.add(10, 5)
    runs.add(20, 5)
    assert runs.add(15, 5) == Extent(10, 15)  # fills the gap: one run
    assert list(runs) == [Extent(10, 15)] and runs.dpages == 15
    assert runs.add(12, 20) == Extent(10, 22)  # overlaps and extends
    assert runs.take(14, 4) == [Extent(14, 4)]
    assert list(runs) == [Extent(10, 4), Extent(18, 14)] and runs.dpages == 18
    assert runs.gaps(0, 40) == [Extent(0, 10), Extent(14, 4), Extent(32, 8)]
    assert runs.take(0, 100) == [Extent(10, 4), Extent(18, 14)]
    assert not runs and runs.dpages == 0
    assert runs.take(0, 5) == [] and runs.first() is None
    assert runs.add(7, 0) == Extent(7, 0) and not runs


set_ops = st.lists(
    st.tuples(st.sampled_from(["add", "take", "overlaps", "contains", "gaps"]),
              st.integers(0, 199), st.integers(0, 60)),
    max_size=60,
)


@settings(max_examples=300, deadline=None)
@given(ops=set_ops)
def test_run_set_agrees_with_a_set(ops: list[tuple[str, int, int]]) -> None:
    runs = RunSet()
    model: set[int] = set()
    for op, start, count in ops:
        span = set(range(start, start + count))
        if op == "add":
            held = runs.add(start, count)
            model |= span
            if count:
                assert set(range(held.start, held.end)) <= model
                assert held.start - 1 not in model and held.end not in model
                assert span <= set(range(held.start, held.end))
        elif op == "take":
            got = runs.take(start, count)
            assert dpages_of(got) == sorted(model & span)
            assert_maximal(got)
            model -= span
        elif op == "overlaps":
            assert runs.overlaps(start, count) == bool(model & span)
        elif op == "gaps":
            gaps = runs.gaps(start, start + count)
            assert dpages_of(gaps) == sorted(span - model)
            assert_maximal(gaps)
        else:
            assert (start in runs) == (start in model)
        listed = list(runs)
        assert dpages_of(listed) == sorted(model)
        assert runs.dpages == len(model) and len(runs) == len(listed)
        assert_maximal(listed)
        assert runs.first() == (listed[0] if listed else None)


@settings(max_examples=200, deadline=None)
@given(ops=set_ops)
def test_a_subclass_index_follows_every_change(ops: list[tuple[str, int, int]]) -> None:
    """_put and _drop see every change: FreeRuns' index by length always matches the runs."""
    runs = FreeRuns(0, 200)
    for op, start, count in ops:
        if op == "add":
            runs.add(start, count)
        elif op == "take":
            runs.take(start, count)
        assert list(runs.by_size) == sorted((run.length, run.start) for run in runs)
        assert runs.largest() == max((run.length for run in runs), default=0)


# -- RunMap -----------------------------------------------------------------------------

def test_map_joins_only_runs_contiguous_on_both_sides() -> None:
    m = RunMap()
    m.insert(0, 4, 100)
    m.insert(4, 4, 104)  # continues both: joined
    m.insert(8, 4, 200)  # continues the file only
    m.insert(12, 2, 204)  # continues the run before it: joined to it
    assert list(m.runs()) == [Mapped(0, 100, 8), Mapped(8, 200, 6)]
    assert m.cut(6, 4) == [Mapped(6, 106, 2), Mapped(8, 200, 2)]
    assert list(m.runs()) == [Mapped(0, 100, 6), Mapped(10, 202, 4)]
    assert list(m.pieces(4, 16)) == [Mapped(4, 104, 2), Mapped(6, None, 4),
                                     Mapped(10, 202, 4), Mapped(14, None, 2)]
    with pytest.raises(ValueError, match="overlap"):
        m.insert(13, 3, 500)
    with pytest.raises(ValueError):
        m.insert(20, 0, 500)
    assert m.dpages == 10 and m.last_end() == 14


map_ops = st.lists(
    st.tuples(st.sampled_from(["insert", "cut", "pieces"]), st.integers(0, 80),
              st.integers(1, 12), st.integers(0, 3)),
    max_size=50,
)


@settings(max_examples=300, deadline=None)
@given(ops=map_ops)
def test_run_map_agrees_with_a_dict(ops: list[tuple[str, int, int, int]]) -> None:
    m = RunMap()
    model: dict[int, int] = {}
    next_to = 0
    for op, start, count, skip in ops:
        span = range(start, start + count)
        if op == "insert":
            to = next_to + skip  # skip 0: the target continues the last insert's
            if any(d in model for d in span):
                before = list(m.runs())
                with pytest.raises(ValueError):
                    m.insert(start, count, to)
                assert list(m.runs()) == before
                continue
            m.insert(start, count, to)
            model.update({d: to + i for i, d in enumerate(span)})
            next_to = to + count
        elif op == "cut":
            got = m.cut(start, count)
            assert [(m0.start + i, m0.to + i) for m0 in got if m0.to is not None
                    for i in range(m0.length)] == [(d, model[d]) for d in span if d in model]
            for d in span:
                model.pop(d, None)
        else:
            pieces = list(m.pieces(start, start + count))
            assert pieces[0].start == start
            assert all(a.start + a.length == b.start for a, b in itertools.pairwise(pieces))
            assert pieces[-1].start + pieces[-1].length == start + count
            for piece in pieces:
                for i in range(piece.length):
                    got_to = None if piece.to is None else piece.to + i
                    assert got_to == model.get(piece.start + i)
        runs = list(m.runs())
        assert {r.start + i: r.to + i for r in runs if r.to is not None
                for i in range(r.length)} == model
        assert m.dpages == len(model) and m.last_end() == (max(model) + 1 if model else 0)
        # the fewest runs: no two that continue one another on both sides
        for a, b in itertools.pairwise(runs):
            assert a.start + a.length <= b.start
            assert a.to is not None and b.to is not None
            assert not (a.start + a.length == b.start and a.to + a.length == b.to)


# -- coalesce and the split at pool boundaries -------------------------------------------

@given(st.lists(st.tuples(st.integers(0, 3), st.integers(0, 5)), max_size=30))
def test_coalesce_joins_what_continues(steps: list[tuple[int, int]]) -> None:
    extents, cursor = [], 0
    for gap, length in steps:
        cursor += gap
        extents.append(Extent(cursor, length))
        cursor += length
    out = coalesce(extents)
    assert dpages_of(out) == dpages_of(extents)
    assert all(a.end != b.start for a, b in itertools.pairwise(out))
    assert all(run.length > 0 for run in out)


@given(sizes=st.lists(st.integers(1, 20), min_size=1, max_size=4),
       start=st.integers(0, 90), length=st.integers(1, 40))
def test_split_cuts_at_every_pool_boundary(sizes: list[int], start: int, length: int) -> None:
    pools, first = [], 0
    for i, size in enumerate(sizes):
        pools.append(Pool(i, 0, first, size, 4096))
        first += size
    poolset = PoolSet(pools, 4096)
    extent = Extent(start, length)
    if extent.end > first:
        with pytest.raises(AllocatorError, match="outside every pool"):
            list(poolset.split(extent))
        return
    parts = list(poolset.split(extent))
    assert dpages_of([part for _, part in parts]) == list(range(extent.start, extent.end))
    for pool, part in parts:
        assert pool.first_dpage <= part.start and part.end <= pool.end_dpage
    assert [pool.index for pool, _ in parts] == sorted({poolset.pool_of(d).index
                                                        for d in range(start, extent.end)})
