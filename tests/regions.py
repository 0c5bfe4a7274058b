"""A region in a bytearray, for tests of the plain layers: no mapping, no mlock, no root."""

from __future__ import annotations

import numpy as np


class BufferRegion:
    """*size* bytes of ordinary memory that a FileStore can use (files.store.RegionView).

    *fresh* False stands for a reused region: the store then takes every dpage for dirty.
    """

    def __init__(self, size: int, dpage_size: int, *, fresh: bool = True) -> None:
        self.buffer = bytearray(size)
        self.size = size
        self.dpage_size = dpage_size
        self.fresh = fresh
        self.view = memoryview(self.buffer)
        self.array: np.ndarray = np.frombuffer(self.buffer, dtype=np.uint8)
