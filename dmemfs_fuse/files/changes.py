"""What changed in the metadata since the last commit, for the journal.

The inode table, directories and extent maps report each change here as it
happens (an inode's persisted attributes when they are assigned); the journal
turns the pending changes into one batch at the end of every FUSE request
(``Journal.commit``).  Two kinds of change are kept:

* *touched* inodes, written out whole (their attributes at commit time), so a
  request that changes an inode five times costs one entry;
* ordered *deltas* for what is too large to rewrite whole: directory entries
  added or removed, runs of a file mapped or unmapped, dpages marked bad.

Nothing here does I/O; with persistence off there are no Changes at all and
the reporters skip them (``changes`` is None).
"""

from __future__ import annotations

from dataclasses import dataclass, field

# Delta kinds (the first item of each delta tuple; short, they are in every record).
ENTRY_ADD = "e+"      # (ENTRY_ADD, parent, name, ino)
ENTRY_REMOVE = "e-"   # (ENTRY_REMOVE, parent, name)
MAP = "m"             # (MAP, ino, file_dpage, region_dpage, count)
UNMAP = "u"           # (UNMAP, ino, file_dpage, count)
TRUNCATE = "t"        # (TRUNCATE, ino, dpages): unmap everything at or past dpages
BAD = "b"             # (BAD, region_dpage)

Delta = tuple[object, ...]


@dataclass
class Changes:
    """Pending changes since the last commit.

    Fields:
        touched: inodes whose attributes changed (written whole at commit).
        xattrs_touched: inodes whose extended attributes changed.
        deltas: ordered directory, extent-map and bad-dpage changes.
        dropped: inodes removed from the table.
    """

    touched: set[int] = field(default_factory=set)
    xattrs_touched: set[int] = field(default_factory=set)
    deltas: list[Delta] = field(default_factory=list)
    dropped: list[int] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.touched or self.deltas or self.dropped)

    def clear(self) -> None:
        """Forget everything pending (it has been written, or a checkpoint covers it)."""
        self.touched.clear()
        self.xattrs_touched.clear()
        self.deltas.clear()
        self.dropped.clear()

    def entry_added(self, parent: int, name: bytes, ino: int) -> None:
        """*name* in directory *parent* now names *ino* (replacing any old entry)."""
        self.deltas.append((ENTRY_ADD, parent, name, ino))

    def entry_removed(self, parent: int, name: bytes) -> None:
        """*name* is gone from directory *parent*."""
        self.deltas.append((ENTRY_REMOVE, parent, name))

    def mapped(self, ino: int, file_dpage: int, region_dpage: int, count: int) -> None:
        """File dpages ``[file_dpage, +count)`` of *ino* now live at *region_dpage* onward."""
        self.deltas.append((MAP, ino, file_dpage, region_dpage, count))

    def unmapped(self, ino: int, file_dpage: int, count: int) -> None:
        """File dpages ``[file_dpage, +count)`` of *ino* are holes now."""
        self.deltas.append((UNMAP, ino, file_dpage, count))

    def truncated(self, ino: int, dpages: int) -> None:
        """Every file dpage of *ino* at or past *dpages* is unmapped."""
        self.deltas.append((TRUNCATE, ino, dpages))

    def marked_bad(self, region_dpage: int) -> None:
        """Region dpage *region_dpage* has a memory error and is never handed out again."""
        self.deltas.append((BAD, region_dpage))
