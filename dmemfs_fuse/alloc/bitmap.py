"""A packed bitmap: one bit per dpage, in 64-bit words.

The pool's record of which dpages are taken (pool.py), as genalloc keeps it:
a set bit is an allocated (or bad) dpage.  One bit per dpage is 32 KiB per
GiB at 4K dpages and 64 bytes per GiB at 2M dpages.

Range operations touch whole words in the middle of a range with one numpy
call and mask the partial words at its ends, so setting, clearing or testing
``count`` bits costs O(count / 64), with no per-dpage Python work.
Bit ``i`` is bit ``i % 64`` of word ``i // 64``; the words are little-endian
whatever the host, so the bytes unpack in dpage order (``np.unpackbits``
with ``bitorder="little"``).
"""

from __future__ import annotations

import numpy as np

from ..sizes import ceil_div

WORD_BITS = 64
_WORD = np.dtype("<u8")
_FULL = np.uint64(0xFFFF_FFFF_FFFF_FFFF)


def _mask(lo: int, hi: int) -> np.uint64:
    """Bits ``[lo, hi)`` of one word set, 0 <= lo < hi <= 64."""
    mask: np.uint64 = np.uint64(((1 << (hi - lo)) - 1) << lo)
    return mask


class Bitmap:
    """*size* bits, all clear at first."""

    def __init__(self, size: int) -> None:
        if size < 0:
            raise ValueError(f"bitmap of {size} bits")
        self.size = size
        self.words = np.zeros(ceil_div(size, WORD_BITS), dtype=_WORD)

    @property
    def nbytes(self) -> int:
        """Bytes the bits take."""
        return int(self.words.nbytes)

    def set(self, start: int, count: int) -> None:
        """Set bits ``[start, start+count)``."""
        for word, mask, lo, hi in self._span(start, count):
            if mask is None:
                self.words[lo:hi] = _FULL
            else:
                self.words[word] |= mask

    def clear(self, start: int, count: int) -> None:
        """Clear bits ``[start, start+count)``."""
        for word, mask, lo, hi in self._span(start, count):
            if mask is None:
                self.words[lo:hi] = 0
            else:
                self.words[word] &= ~mask

    def any(self, start: int, count: int) -> bool:
        """Whether any bit of ``[start, start+count)`` is set."""
        for word, mask, lo, hi in self._span(start, count):
            if mask is None:
                if self.words[lo:hi].any():
                    return True
            elif self.words[word] & mask:
                return True
        return False

    def all(self, start: int, count: int) -> bool:
        """Whether every bit of ``[start, start+count)`` is set."""
        for word, mask, lo, hi in self._span(start, count):
            if mask is None:
                if not (self.words[lo:hi] == _FULL).all():
                    return False
            elif (self.words[word] & mask) != mask:
                return False
        return True

    def bits(self, start: int = 0, count: int | None = None) -> np.ndarray:
        """Bits ``[start, start+count)`` (default: all) unpacked, one np.bool_ each.

        O(count) memory: for check() and error messages, not for hot paths.
        """
        if count is None:
            count = self.size - start
        self._check_range(start, count)
        if not count:
            return np.zeros(0, dtype=np.bool_)
        first, last = start // WORD_BITS, (start + count - 1) // WORD_BITS
        raw = np.unpackbits(self.words[first : last + 1].view(np.uint8), bitorder="little")
        offset = start - first * WORD_BITS
        return raw[offset : offset + count].astype(np.bool_)

    def count(self) -> int:
        """How many bits are set."""
        return int(np.unpackbits(self.words.view(np.uint8)).sum(dtype=np.int64))

    def _check_range(self, start: int, count: int) -> None:
        if start < 0 or count < 0 or start + count > self.size:
            raise IndexError(f"bits [{start}, {start + count}) outside [0, {self.size})")

    def _span(self, start: int, count: int
              ) -> list[tuple[int, np.uint64 | None, int, int]]:
        """The words ``[start, start+count)`` covers: ``(word, mask, lo, hi)`` for a partial
        word (mask set), or ``(-1, None, lo, hi)`` for whole words ``[lo, hi)``."""
        self._check_range(start, count)
        if not count:
            return []
        end = start + count
        first, first_bit = divmod(start, WORD_BITS)
        last, last_bit = divmod(end, WORD_BITS)
        if first == last:
            return [(first, _mask(first_bit, last_bit), 0, 0)]
        out: list[tuple[int, np.uint64 | None, int, int]] = []
        whole_lo = first
        if first_bit:
            out.append((first, _mask(first_bit, WORD_BITS), 0, 0))
            whole_lo = first + 1
        if last > whole_lo:
            out.append((-1, None, whole_lo, last))
        if last_bit:
            out.append((last, _mask(0, last_bit), 0, 0))
        return out
