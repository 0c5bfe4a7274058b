"""Recovery: rebuild the filesystem from its metadata file, verifying before trusting it.

:func:`load` reads and replays the file (checksums, layout, replay errors);
:func:`install` checks the result against itself and the pools, and only then
hands it to the inode table:

* every directory entry names an existing inode, every inode is reachable
  from the root, link counts equal the names that point at an inode;
* no extent lies outside the pools and no dpage is claimed twice (the
  pools' bitmaps are rebuilt from the extents by claiming them);
* the rebuilt allocation equals what the file recorded (the snapshot's
  allocated runs, and the free count after the last batch).

Any failure raises :class:`MetadataError` with what is wrong; nothing is
repaired silently.  Inodes that were unlinked but still open at the crash
have no name and no holder any more and are freed, as tmpfs would have done
at their last close.
"""

from __future__ import annotations

import logging
import stat
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ..alloc.policy import Policy
from ..alloc.poolset import PoolSet
from ..alloc.runs import Extent, RunSet
from ..errors import AllocatorError
from ..files.changes import BAD, ENTRY_ADD, ENTRY_REMOVE, MAP, TRUNCATE, UNMAP
from ..files.extents import FileExtents
from ..files.inodes import ROOT_INO, Inode, InodeTable
from ..files.passthrough import PassthroughStore
from ..files.store import FileStore
from .records import Layout, MetadataError, decode_inode, layout_of, read_file

log = logging.getLogger(__name__)


@dataclass
class Recovered:
    """The state a metadata file describes, replayed but not yet verified against the pools.

    Fields:
        inodes: every inode by number, unlinked-but-open ones included.
        next_ino: the number the next new inode gets.
        bad: region dpages marked bad.
        free_dpages: the free count recorded after the last batch.
        snapshot_allocated: the allocated runs the snapshot recorded.
        uuid: the metadata file's uuid (kept across checkpoints).
        generation: its checkpoint generation.
        batches: batches replayed after the snapshot.
        torn_bytes: bytes of a torn last append that were dropped.
    """

    inodes: dict[int, Inode]
    next_ino: int
    bad: set[int]
    free_dpages: int
    snapshot_allocated: list[Extent]
    uuid: str
    generation: int
    batches: int = 0
    torn_bytes: int = 0
    seconds: float = field(default=0.0)


# What decoding a record of the wrong shape raises: a field missing, of another type or out
# of range (OverflowError).  Each is damage, refused with the path.  (A policy that does
# not parse is a MetadataError already, from decode_inode.)
MALFORMED = (KeyError, TypeError, ValueError, IndexError, AttributeError, ArithmeticError)


def load(path: str, layout: Layout, parse_policy: Callable[[str], Policy]) -> Recovered:
    """Read *path* and replay it; MetadataError if it is damaged, foreign or inconsistent."""
    started = time.monotonic()
    with open(path, "rb") as f:
        data = f.read()
    contents = read_file(path, data)
    try:
        stored = layout_of(contents.header)
    except MALFORMED as exc:
        raise MetadataError(f"metadata {path}, header: malformed ({exc!r})") from None
    if stored.region != layout.region:
        raise MetadataError(f"metadata {path} belongs to another region ({stored.region}); the "
                            f"region now is {layout.region} (deleted and made anew?)")
    if stored != layout:
        raise MetadataError(f"metadata {path} describes {stored.describe()}; the options give "
                            f"{layout.describe()}: mount with the same size, nodes and pagesize")
    snap = contents.snapshot
    inodes: dict[int, Inode] = {}
    try:
        for fields in snap["inodes"]:
            inode = decode_inode(fields, None, parse_policy)
            if inode.ino in inodes:
                raise MetadataError(f"inode {inode.ino} appears twice")
            inodes[inode.ino] = inode
            _fill(inode, fields[15])
        state = Recovered(inodes, int(snap["next_ino"]), {int(d) for d in snap["bad"]},
                          int(snap["free"]), [Extent(int(s), int(n)) for s, n in snap["allocated"]],
                          str(contents.header["uuid"]), int(contents.header["generation"]))
    except MetadataError as exc:
        raise MetadataError(f"metadata {path}, snapshot: {exc}") from None
    except MALFORMED as exc:
        raise MetadataError(f"metadata {path}, snapshot: malformed ({exc!r})") from None
    try:
        rebuilt = _allocated(inodes, state.bad)
    except MetadataError as exc:
        raise MetadataError(f"metadata {path}, snapshot: {exc}") from None
    if rebuilt != state.snapshot_allocated:
        raise MetadataError(f"metadata {path}: the snapshot's extents do not add up to the "
                            "allocation it recorded")
    for number, batch in enumerate(contents.batches, 1):
        try:
            _replay(state, batch, parse_policy)
        except MetadataError as exc:
            raise MetadataError(f"metadata {path}, batch {number}: {exc}") from None
        except MALFORMED as exc:
            raise MetadataError(f"metadata {path}, batch {number}: cannot apply ({exc!r})"
                                ) from None
    state.batches = len(contents.batches)
    state.torn_bytes = contents.torn_bytes
    state.seconds = time.monotonic() - started
    return state


def _fill(inode: Inode, contents: Any) -> None:
    if inode.dir is not None:
        for ino, name in contents:
            inode.dir.add(bytes(name), int(ino))
    elif inode.data is not None:
        for file_dpage, region, count in contents:
            inode.data.insert(int(file_dpage), [Extent(int(region), int(count))])


def _replay(state: Recovered, batch: dict[str, Any], parse_policy: Callable[[str], Policy]) -> None:
    inodes = state.inodes
    for fields in batch["put"]:
        ino = int(fields[0])
        inodes[ino] = decode_inode(fields, inodes.get(ino), parse_policy)
        state.next_ino = max(state.next_ino, ino + 1)
    for delta in batch["d"]:
        kind = delta[0]
        if kind == ENTRY_ADD:
            _directory(inodes, delta[1]).add(bytes(delta[2]), int(delta[3]))
        elif kind == ENTRY_REMOVE:
            _directory(inodes, delta[1]).remove(bytes(delta[2]))
        elif kind == MAP:
            _file(inodes, delta[1]).insert(int(delta[2]), [Extent(int(delta[3]), int(delta[4]))])
        elif kind == UNMAP:
            _file(inodes, delta[1]).punch(int(delta[2]), int(delta[3]))
        elif kind == TRUNCATE:
            _file(inodes, delta[1]).truncate(int(delta[2]))
        elif kind == BAD:
            state.bad.add(int(delta[1]))
        else:
            raise MetadataError(f"unknown change {kind!r}")
    for ino in batch["drop"]:
        if inodes.pop(int(ino), None) is None:
            raise MetadataError(f"drop of inode {ino}, which does not exist")
    state.free_dpages = int(batch["free"])


def _directory(inodes: dict[int, Inode], ino: int) -> Any:
    inode = inodes.get(int(ino))
    if inode is None or inode.dir is None:
        raise MetadataError(f"directory change in inode {ino}, which is no directory")
    return inode.dir


def _file(inodes: dict[int, Inode], ino: int) -> FileExtents:
    inode = inodes.get(int(ino))
    if inode is None or inode.data is None:
        raise MetadataError(f"extent change in inode {ino}, which is no regular file")
    return inode.data


def _allocated(inodes: dict[int, Inode], bad: set[int]) -> list[Extent]:
    """Every file run and bad dpage as maximal runs; MetadataError if two files' runs overlap.

    A bad dpage may still belong to a file (it answers EIO), so bad dpages
    inside file runs are not overlaps.
    """
    taken = RunSet()
    for inode in inodes.values():
        if inode.data is None:
            continue
        for _, region, count in inode.data.runs():
            if taken.overlaps(region, count):
                raise MetadataError(f"dpages [{region}, {region + count}) of inode {inode.ino} "
                                    "are claimed twice (by another inode too)")
            taken.add(region, count)
    for dpage in bad:
        taken.add(dpage, 1)
    return list(taken)


@dataclass(frozen=True)
class RecoveryReport:
    """What recovery found, for the log and ``dmemctl status``.

    Fields:
        files: regular files recovered.
        directories: directories recovered (the root included).
        inodes: inodes recovered in all.
        bytes: bytes in regular files (sum of sizes).
        batches: journal batches replayed after the snapshot.
        torn_bytes: bytes of a torn last append dropped.
        orphans_freed: unlinked inodes that were still open at the crash, freed.
        bad_dpages: dpages marked bad.
        seconds: time spent reading, replaying and verifying.
    """

    files: int
    directories: int
    inodes: int
    bytes: int
    batches: int
    torn_bytes: int
    orphans_freed: int
    bad_dpages: int
    seconds: float


def install(state: Recovered, table: InodeTable, pools: PoolSet,
            store: FileStore | PassthroughStore, path: str) -> RecoveryReport:
    """Verify *state* against itself and the (empty) pools, then make it the live filesystem."""
    started = time.monotonic()
    inodes = state.inodes
    try:
        if inodes and state.next_ino <= max(inodes):
            raise MetadataError(f"the next inode number {state.next_ino} is already in use")
        orphans = _check_namespace(inodes)
        _check_sizes(inodes, store.dpage_size)
        store.claim(_allocated(inodes, set()))
        for dpage in sorted(state.bad):
            pools.mark_bad(dpage)
    except AllocatorError as exc:
        raise MetadataError(f"metadata {path}: {exc}") from None
    except (MetadataError, ValueError) as exc:
        raise MetadataError(f"metadata {path}: {exc}") from None
    if pools.free_dpages != state.free_dpages:
        raise MetadataError(f"metadata {path}: the extents leave {pools.free_dpages} dpages free, "
                            f"the journal recorded {state.free_dpages}")
    for ino in orphans:
        inode = inodes.pop(ino)
        if inode.data is not None:
            store.release(inode.data)
    table.restore(inodes, state.next_ino)
    if isinstance(store, FileStore):  # shmem zeroes a truncated tail itself
        for inode in inodes.values():
            if inode.data is not None:
                store.zero_past_eof(inode.data, inode.size)
    files = [i for i in inodes.values() if i.data is not None]
    return RecoveryReport(
        files=len(files), directories=sum(1 for i in inodes.values() if i.dir is not None),
        inodes=len(inodes), bytes=sum(i.size for i in files), batches=state.batches,
        torn_bytes=state.torn_bytes, orphans_freed=len(orphans), bad_dpages=len(state.bad),
        seconds=state.seconds + time.monotonic() - started)


def _check_namespace(inodes: dict[int, Inode]) -> list[int]:
    """Check names, links and reachability; return the unlinked inodes (held open at the crash)."""
    root = inodes.get(ROOT_INO)
    if root is None or root.dir is None:
        raise MetadataError("no root directory")
    names: Counter[int] = Counter()
    for inode in inodes.values():
        if inode.dir is None:
            continue
        inode.dir.subdirs = 0
        for name, (ino, _) in inode.dir.entries.items():
            child = inodes.get(ino)
            if child is None:
                raise MetadataError(f"entry {name!r} in directory {inode.ino} names inode {ino}, "
                                    "which does not exist")
            names[ino] += 1
            if child.dir is not None:
                inode.dir.subdirs += 1
                if child.parent != inode.ino:
                    raise MetadataError(f"directory {ino} is in {inode.ino} but says its parent "
                                        f"is {child.parent}")
    orphans = []
    for inode in inodes.values():
        count = names[inode.ino]
        if inode.ino == ROOT_INO:
            if count:
                raise MetadataError("the root directory has a name")
            continue
        if inode.link_count == 0 and count == 0:
            orphans.append(inode.ino)
            continue
        want = 1 if inode.dir is not None else inode.link_count
        if count != want:
            raise MetadataError(f"inode {inode.ino} has {count} names but a link count of "
                                f"{inode.link_count}")
    # Every named inode must hang off the root (a cycle of directories would not).
    seen = {ROOT_INO}
    todo = [root]
    while todo:
        node = todo.pop()
        assert node.dir is not None
        for ino, _ in node.dir.entries.values():
            if ino not in seen:
                seen.add(ino)
                child = inodes[ino]
                if child.dir is not None:
                    todo.append(child)
    unreachable = set(inodes) - seen - set(orphans)
    if unreachable:
        raise MetadataError(f"inodes {sorted(unreachable)[:10]} are not reachable from the root")
    return orphans


def _check_sizes(inodes: dict[int, Inode], dpage_size: int) -> None:
    for inode in inodes.values():
        if inode.data is None:
            if inode.dir is None and stat.S_ISLNK(inode.mode) and inode.target is None:
                raise MetadataError(f"symlink {inode.ino} has no target")
            continue
        # Dpages past EOF are legitimate: fallocate(FALLOC_FL_KEEP_SIZE) takes them.
        # Before the file's start they are not: nothing would ever free them (a
        # fuzzing find).
        for file_dpage, _, count in inode.data.runs():
            if file_dpage < 0 or count <= 0:
                raise MetadataError(f"file {inode.ino} has an extent of {count} dpages at "
                                    f"file dpage {file_dpage}")
