"""Size arithmetic shared by every layer: whole units that cover a length, and sizes for
people.  A foundation every layer may use."""

from __future__ import annotations

from humanfriendly import format_size


def ceil_div(length: int, unit: int) -> int:
    """How many *unit*-sized pieces it takes to cover *length* (length >= 0, unit > 0)."""
    return -(-length // unit)


def human(size: int) -> str:
    """*size* bytes as people read it: ``2 MiB``, ``1.5 GiB``."""
    return str(format_size(size, binary=True))
