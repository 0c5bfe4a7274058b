"""The metadata file's format: framed, checksummed msgpack records.

A metadata file is a sequence of frames ``[u32 length][u32 crc32][payload]``
(little endian), each payload one msgpack map:

1. a *header*: magic, format version, the file's uuid and generation, and the
   layout it describes (dpage size, pools, the region's identity);
2. a *snapshot*: every inode whole (directories with their entries, files
   with their extent runs), the bad dpages, the allocated runs and the free
   count, as they were at the checkpoint;
3. any number of *batches*, one per FUSE request that changed something:
   the changed inodes whole, the ordered deltas (changes.py), the inodes
   dropped, and the free count after the request.

A checkpoint writes header + snapshot to a new file and renames it over the
old one, so the file is always either the old or the new one whole.  A batch
is appended with one write(2) before the request is answered; a daemon killed
in the middle of that write leaves a *torn tail*: a last frame that is short
or fails its checksum.  Reading stops there (and says so); a bad frame with
good frames after it is damage, and the file is refused.
"""

from __future__ import annotations

import ctypes
import errno
import os
import stat
import struct
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import msgpack

from ..alloc.policy import Policy
from ..errors import ConfigError
from ..files.extents import FileExtents
from ..files.inodes import Directory, Inode
from ..libc import libc

MAGIC = "dmemfs-metadata"
VERSION = 1
FRAME = struct.Struct("<II")
# A frame longer than this is damage, not data (a snapshot of a million inodes is ~200 MiB).
MAX_FRAME = 1 << 31
# A torn append leaves less than one batch behind; more than this is damage.
MAX_TORN_TAIL = 64 << 20

HEADER, SNAPSHOT, BATCH = "header", "snapshot", "batch"


class MetadataError(ConfigError):
    """The metadata file cannot be trusted: damaged, foreign or inconsistent.

    A ConfigError, so the daemon stops before mounting with one clear line.
    """


@dataclass(frozen=True)
class Layout:
    """What a metadata file describes; a restart must present the same.

    Fields:
        dpage_size: bytes per dpage.
        pools: ``(node, dpages)`` per pool, in region order.
        region: identity of the region's backing file or device
            (``file:DEV:INO`` or ``device:RDEV``), so that metadata is never
            applied to a region it does not describe (for instance one that
            was deleted and created anew, empty).
    """

    dpage_size: int
    pools: tuple[tuple[int, int], ...]
    region: str

    @property
    def total_dpages(self) -> int:
        """Dpages in all pools."""
        return sum(n for _, n in self.pools)

    def describe(self) -> str:
        """The layout in words, for error messages."""
        pools = ", ".join(f"node {node}: {count} dpages" for node, count in self.pools)
        return f"dpage {self.dpage_size} bytes, pools [{pools}], region {self.region}"


AT_FDCWD = -100
STATX_BTIME = 0x800
STATX_BTIME_OFFSET = 80  # struct statx: stx_btime.tv_sec (s64), then tv_nsec (u32)


def _birth_time(path: str) -> int | None:
    """The file's creation time in ns through statx(2), or None where the filesystem has none."""
    buf = ctypes.create_string_buffer(256)
    if libc.statx(AT_FDCWD, os.fsencode(path), 0, STATX_BTIME, buf) != 0:
        return None
    mask = struct.unpack_from("<I", buf.raw, 0)[0]
    if not mask & STATX_BTIME:
        return None
    sec, nsec = struct.unpack_from("<qI", buf.raw, STATX_BTIME_OFFSET)
    return int(sec * 1_000_000_000 + nsec)


def region_identity(path: str) -> str:
    """The identity of the region at *path*, as stored in the header.

    Inode numbers are reused at once on tmpfs, so a region file deleted and
    made anew could pass as the old one by device and inode alone; its birth
    time (where the filesystem keeps one) tells them apart.
    """
    st = os.stat(path)
    if stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode):
        return f"device:{st.st_rdev}"
    born = _birth_time(path)
    return f"file:{st.st_dev}:{st.st_ino}" + (f":{born}" if born is not None else "")


def frame(record: dict[str, Any]) -> bytes:
    """One record as a frame, ready to append; OSError(EFBIG) past ``MAX_FRAME``,
    which the reader would take for damage."""
    payload: bytes = msgpack.packb(record, use_bin_type=True)
    if len(payload) > MAX_FRAME:
        raise OSError(errno.EFBIG, f"a {record.get('t')} record of {len(payload)} bytes is over "
                      f"the {MAX_FRAME}-byte limit of one frame")
    return FRAME.pack(len(payload), zlib.crc32(payload)) + payload


def header_record(layout: Layout, uuid: str, generation: int) -> dict[str, Any]:
    """The first record of a metadata file."""
    return {"t": HEADER, "magic": MAGIC, "version": VERSION, "uuid": uuid,
            "generation": generation, "dpage_size": layout.dpage_size,
            "pools": [list(p) for p in layout.pools], "region": layout.region}


# -- inodes ------------------------------------------------------------------------

def encode_inode(inode: Inode, *, xattrs: bool, contents: bool) -> list[Any]:
    """An inode as a list: attributes, xattrs (None if unchanged) and, for snapshots, contents."""
    out: list[Any] = [
        inode.ino, inode.mode, inode.uid, inode.gid, inode.rdev, inode.size,
        inode.atime_ns, inode.mtime_ns, inode.ctime_ns, inode.btime_ns, inode.link_count,
        inode.parent, inode.target, str(inode.policy) if inode.policy is not None else None,
        dict(inode.xattrs) if xattrs else None,
    ]
    if contents:
        if inode.dir is not None:
            out.append([[inode.dir.entries[name][0], name]
                        for name in inode.dir.by_cookie.values()])
        elif inode.data is not None:
            out.append(inode.data.runs())
        else:
            out.append(None)
    return out


def decode_inode(fields: list[Any], existing: Inode | None,
                 parse_policy: Callable[[str], Policy]) -> Inode:
    """The inode *fields* encode, as a new Inode.  It takes over the entries or extents of
    *existing* (the same inode, replayed before), and its xattrs if *fields* has none."""
    (ino, mode, uid, gid, rdev, size, atime, mtime, ctime, btime, link_count, parent,
     target, policy, xattrs) = fields[:15]
    numbers = (ino, mode, uid, gid, rdev, size, atime, mtime, ctime, btime, link_count, parent)
    # Checked here, where they are read: install's verification takes their types for
    # granted (a fuzzing find: a size that was a map failed in the tail zeroing).
    if not all(type(n) is int for n in numbers) or min(ino, mode, size, link_count) < 0:
        raise MetadataError(f"inode {ino!r}: attributes of the wrong type or sign")
    if not isinstance(target, (bytes, type(None))):
        raise MetadataError(f"inode {ino}: a symlink target that is not bytes")
    if existing is None:
        directory = Directory(ino) if stat.S_ISDIR(mode) else None
        data = FileExtents(ino) if stat.S_ISREG(mode) else None
        kept_xattrs: dict[bytes, bytes] = {}
    elif stat.S_IFMT(existing.mode) != stat.S_IFMT(mode):
        raise MetadataError(f"inode {ino} changes type from {stat.S_IFMT(existing.mode):o} "
                            f"to {stat.S_IFMT(mode):o}")
    else:
        directory, data, kept_xattrs = existing.dir, existing.data, existing.xattrs
    try:
        parsed = parse_policy(policy) if policy is not None else None
    except OSError as exc:
        raise MetadataError(f"inode {ino}: {exc.strerror}") from None
    return Inode(ino, mode, uid, gid, rdev=rdev, size=size, atime_ns=atime, mtime_ns=mtime,
                 ctime_ns=ctime, btime_ns=btime, link_count=link_count, parent=parent,
                 target=target, policy=parsed, dir=directory, data=data,
                 xattrs=dict(xattrs) if xattrs is not None else kept_xattrs)


# -- reading -----------------------------------------------------------------------

@dataclass
class FileContents:
    """Everything read from a metadata file.

    Fields:
        header: the header record.
        snapshot: the snapshot record.
        batches: the batch records after it, in order.
        good_bytes: where the last whole frame ends.
        torn_bytes: bytes after that which were dropped as a torn tail.
    """

    header: dict[str, Any]
    snapshot: dict[str, Any]
    batches: list[dict[str, Any]]
    good_bytes: int
    torn_bytes: int


def _frames(data: bytes, path: str) -> Iterator[tuple[int, dict[str, Any] | None]]:
    """Yield ``(offset, record)``; record None for a frame cut short by EOF, which ends it.

    Appends are sequential writes, so a daemon killed while appending leaves a
    prefix of its last frame: short, never whole with wrong bytes.  A whole
    frame that fails its checksum is therefore damage and raises.
    """
    pos = 0
    while pos < len(data):
        if pos + FRAME.size > len(data):
            yield pos, None
            return
        length, crc = FRAME.unpack_from(data, pos)
        body = pos + FRAME.size
        if length > MAX_FRAME:
            raise MetadataError(f"metadata {path}: record at byte {pos} claims {length} bytes")
        if body + length > len(data):
            yield pos, None
            return
        if zlib.crc32(data[body : body + length]) != crc:
            raise MetadataError(f"metadata {path}: record at byte {pos} fails its checksum")
        try:
            record = msgpack.unpackb(data[body : body + length], raw=False, strict_map_key=False)
        # TypeError: a map whose key is a list (found by fuzzing)
        except (ValueError, TypeError, msgpack.UnpackException) as exc:
            raise MetadataError(f"metadata {path}: record at byte {pos} passes its checksum but "
                                f"does not decode ({exc})") from None
        if not isinstance(record, dict) or "t" not in record:
            raise MetadataError(f"metadata {path}: record at byte {pos} is not a record")
        yield pos, record
        pos = body + length


def read_file(path: str, data: bytes) -> FileContents:
    """Parse the metadata file's bytes *data*; raise MetadataError if it cannot be trusted."""
    header: dict[str, Any] | None = None
    snapshot: dict[str, Any] | None = None
    batches: list[dict[str, Any]] = []
    good = 0
    for pos, record in _frames(data, path):
        if record is None:
            what = "header" if header is None else "snapshot" if snapshot is None else None
            if what is not None:
                raise MetadataError(f"metadata {path}: the {what} at byte {pos} is damaged or "
                                    "missing (bad checksum or short)")
            if len(data) - pos > MAX_TORN_TAIL:
                raise MetadataError(f"metadata {path}: the record at byte {pos} runs past the "
                                    f"end, and {len(data) - pos} bytes follow it: too many for "
                                    "a torn append")
            break
        if header is None:
            if record.get("t") != HEADER or record.get("magic") != MAGIC:
                raise MetadataError(f"metadata {path}: not a dmemfs metadata file (no header)")
            if record.get("version") != VERSION:
                raise MetadataError(f"metadata {path}: format version {record.get('version')}, "
                                    f"this dmemfs reads version {VERSION}")
            header = record
        elif snapshot is None:
            if record.get("t") != SNAPSHOT:
                raise MetadataError(f"metadata {path}: record at byte {pos} should be the "
                                    "snapshot")
            snapshot = record
        else:
            if record.get("t") != BATCH:
                raise MetadataError(f"metadata {path}: unexpected {record.get('t')!r} record at "
                                    f"byte {pos}")
            if record.get("seq") != len(batches) + 1:
                raise MetadataError(f"metadata {path}: batch at byte {pos} has sequence "
                                    f"{record.get('seq')}, expected {len(batches) + 1}")
            batches.append(record)
        good = pos + FRAME.size + FRAME.unpack_from(data, pos)[0]
    if header is None or snapshot is None:
        raise MetadataError(f"metadata {path}: empty or truncated before its snapshot")
    return FileContents(header, snapshot, batches, good, len(data) - good)


def layout_of(header: dict[str, Any]) -> Layout:
    """The layout a header describes."""
    return Layout(int(header["dpage_size"]), tuple((int(n), int(c)) for n, c in header["pools"]),
                  str(header["region"]))
