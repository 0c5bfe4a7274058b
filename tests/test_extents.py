"""A file's extent map alone."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dmemfs_fuse.alloc.runs import Extent
from dmemfs_fuse.files.extents import FileExtents, Piece


def test_pieces_cover_holes_and_runs() -> None:
    fx = FileExtents()
    fx.insert(2, [Extent(100, 3)])
    fx.insert(7, [Extent(50, 1)])
    assert list(fx.pieces(0, 10)) == [
        Piece(0, None, 2), Piece(2, 100, 3), Piece(5, None, 2), Piece(7, 50, 1),
        Piece(8, None, 2),
    ]
    assert list(fx.pieces(3, 4)) == [Piece(3, 101, 1)]
    assert fx.holes(0, 10) == [(0, 2), (5, 2), (8, 2)]
    assert fx.mapped == 4


def test_contiguous_inserts_merge() -> None:
    fx = FileExtents()
    fx.insert(0, [Extent(10, 2)])
    fx.insert(2, [Extent(12, 3)])
    assert fx.runs() == [(0, 10, 5)]
    assert fx.region_after(5) == 15
    assert fx.region_after(3) is None


def test_truncate_splits_and_releases() -> None:
    fx = FileExtents()
    fx.insert(0, [Extent(10, 4), Extent(40, 4)])
    assert fx.truncate(2) == [Extent(12, 2), Extent(40, 4)]
    assert fx.runs() == [(0, 10, 2)] and fx.mapped == 2
    assert fx.truncate(0) == [Extent(10, 2)]
    assert fx.mapped == 0 and len(fx) == 0


def test_double_mapping_is_refused() -> None:
    fx = FileExtents()
    fx.insert(0, [Extent(10, 4)])
    with pytest.raises(ValueError):
        fx.insert(3, [Extent(90, 1)])


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 60), st.integers(1, 6)), max_size=30),
       st.integers(0, 70))
def test_matches_a_plain_dict(writes: list[tuple[int, int]], cut: int) -> None:
    fx = FileExtents()
    model: dict[int, int] = {}
    next_region = 0
    for start, count in writes:
        for hole_start, hole_count in fx.holes(start, start + count):
            fx.insert(hole_start, [Extent(next_region, hole_count)])
            for i in range(hole_count):
                model[hole_start + i] = next_region + i
            next_region += hole_count + 1  # never contiguous across inserts
    for piece in fx.pieces(0, 80):
        for i in range(piece.length):
            expect = model.get(piece.file_dpage + i)
            got = None if piece.region is None else piece.region + i
            assert got == expect
    released = fx.truncate(cut)
    freed = {e.start + i for e in released for i in range(e.length)}
    assert freed == {r for f, r in model.items() if f >= cut}
    assert fx.mapped == sum(1 for f in model if f < cut)
