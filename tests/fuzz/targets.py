"""Fuzz targets: one for each thing the daemon parses from outside (issue #16).

Each target is a function of one input (bytes) that returns when the input was handled
as the daemon must handle it and raises when it was not: an unexpected exception, or an
answer that breaks the contract the target states.  tools/fuzz runs them under atheris
(coverage-guided, libFuzzer), from the corpus in tests/fuzz/corpus/TARGET; tests/test_fuzz.py
runs every corpus input once and each target for a bounded time.

- ``options``: a mount option string, a memory policy or a size.  Any string gives a
  valid result or a ConfigError (policies: OSError EINVAL) whose message names the option.
- ``metadata``: a metadata file, loaded and installed as a start does (recovery.load,
  then recovery.install into empty pools).  The first byte picks whether the frames'
  checksums are taken as they are or recomputed first, so that mutations also reach
  the decoding and replay behind them.  Any file is refused with a MetadataError
  ("metadata PATH..."), or it installs into a state whose pools account for every dpage
  exactly once.
- ``control``: one control-socket request line, answered by a real Reporter over a small
  memfd region with files in it.  Any bytes give one JSON reply line, ``ok`` true or an
  error with an errno; never the catch-all "internal error", which means a bug.
"""

# ruff: noqa: PLC0415 - imports are late on purpose: atheris instruments what is imported
# inside instrument_imports(), and the targets import only what they fuzz.
from __future__ import annotations

import errno
import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

Check = Callable[[bytes], None]


@dataclass(frozen=True)
class Target:
    """A fuzz target: what it takes, and how to build its check (once per process)."""

    name: str
    doc: str
    build: Callable[[], Check]


def _text(data: bytes) -> str:
    """Bytes as the daemon gets them from argv or a config file (surrogateescape)."""
    return data.decode("utf-8", "surrogateescape")


def build_options() -> Check:
    """The options target: the first byte picks mount options, a policy or a size."""
    from dmemfs_fuse.alloc.policy import parse_policy
    from dmemfs_fuse.errors import ConfigError
    from dmemfs_fuse.host.options import OPTIONS, parse_mount_options, parse_size, split_options

    known_pools = (0, 1, 2, 3)
    option_names = {o.name for o in OPTIONS} | {"ro"}

    def check(data: bytes) -> None:
        if not data:
            return
        kind, text = data[0] % 3, _text(data[1:])
        if kind == 0:
            try:
                parse_mount_options([text])
            except ConfigError as exc:
                given = {name for name, _ in split_options([text])}
                message = str(exc)
                assert any(message.startswith(name + end) for name in given | option_names
                           if name for end in ":= ") or (
                    "" in given and message.startswith("=")  # an item with no name: itself
                ), f"the error names no option: {exc}"
        elif kind == 1:
            try:
                policy = parse_policy(text, known_pools)
            except OSError as exc:
                assert exc.errno == errno.EINVAL, exc
                assert str(exc.strerror).startswith("policy "), exc
            else:
                assert set(policy.pools) <= set(known_pools), policy
        else:
            try:
                value = parse_size(text, "size")
            except ConfigError as exc:
                assert str(exc).startswith("size="), exc
            else:
                assert value > 0, value

    return check


def build_control() -> Check:
    """The control target: a Reporter over a 16-dpage memfd region holding two files."""
    from functools import partial

    from dmemfs_fuse.adapter.fs import DmemOperations
    from dmemfs_fuse.alloc.policy import parse_policy
    from dmemfs_fuse.alloc.poolset import PoolSet
    from dmemfs_fuse.files.data import FileData
    from dmemfs_fuse.files.inodes import ROOT_INO, InodeTable
    from dmemfs_fuse.files.poison import MemoryErrors
    from dmemfs_fuse.files.store import FileStore
    from dmemfs_fuse.insight.control import Controller, answer
    from dmemfs_fuse.insight.report import Reporter
    from dmemfs_fuse.memory.hwpoison import block_sigbus
    from dmemfs_fuse.memory.region import PoolSpec, Region, RegionPlan

    # The control protocol's kernel_error asks for a real SIGBUS: taken, as in the daemon,
    # only through a signalfd (none is read here), never delivered.
    block_sigbus()
    dpage = 4096
    plan = RegionPlan(pools=(PoolSpec(0, 8 * dpage), PoolSpec(0, 8 * dpage)),
                      dpage_size=dpage, backend="memfd")
    region = Region.open(plan)  # lives as long as the fuzzing process

    def fresh_controller() -> Controller:
        """A new filesystem on the region for each input (poison and policy requests
        change it), so that an input's result does not depend on the inputs before it."""
        pools = PoolSet.from_plan(plan, 0)
        store = FileStore(region, pools)
        inodes = InodeTable(64, 0o1777, 0, 0, release_data=store.release,
                            parse_policy=partial(parse_policy, known=pools.ids))
        data = FileData(inodes, store)
        for name, size in ((b"a", 3 * dpage), (b"b", dpage + 1)):
            data.truncate(inodes.make(ROOT_INO, name, 0o100644, 0, 0).ino, size, 0)
        ops, errors = DmemOperations(inodes, store), MemoryErrors(inodes, store)
        reporter = Reporter(inodes, store, "memfd (fuzz)", ops, errors=errors, region=region)
        return Controller(reporter, inodes, ops, errors, region)

    def check(data: bytes) -> None:
        reply = answer(fresh_controller(), data)
        assert reply.endswith(b"\n") and reply.count(b"\n") == 1, reply
        message = json.loads(reply)
        assert isinstance(message, dict) and isinstance(message.get("ok"), bool), message
        if not message["ok"]:
            assert isinstance(message.get("errno"), int) and message["errno"] > 0, message
            assert not str(message.get("error")).startswith("internal error"), message

    return check


# The metadata target's filesystem: two pools of 64 4K dpages on a memfd region, and a
# fixed region identity, so that the corpus (made by make_metadata_seeds) matches it.
META_DPAGE = 4096
META_POOL_DPAGES = 64
META_REGION = "file:fuzz"


def _meta_filesystem() -> tuple[Any, Any, Any]:
    """(plan, layout, region) of the metadata target."""
    from dmemfs_fuse.memory.region import PoolSpec, Region, RegionPlan
    from dmemfs_fuse.metadata.records import Layout

    plan = RegionPlan(pools=(PoolSpec(0, META_POOL_DPAGES * META_DPAGE),) * 2,
                      dpage_size=META_DPAGE, backend="memfd")
    layout = Layout(META_DPAGE, ((0, META_POOL_DPAGES),) * 2, META_REGION)
    return plan, layout, Region.open(plan)


def _fix_checksums(data: bytes) -> bytes:
    """*data* with each whole frame's CRC recomputed (a torn last frame is left as it is)."""
    import zlib

    from dmemfs_fuse.metadata.records import FRAME

    out = bytearray(data)
    pos = 0
    while pos + FRAME.size <= len(out):
        length, _ = FRAME.unpack_from(out, pos)
        body = pos + FRAME.size
        if body + length > len(out):
            break
        FRAME.pack_into(out, pos, length, zlib.crc32(out[body:body + length]))
        pos = body + length
    return bytes(out)


def build_metadata() -> Check:
    """The metadata target: load and install, as a start does, into fresh pools."""
    import atexit
    import shutil
    import tempfile
    from functools import partial

    from dmemfs_fuse.alloc.policy import parse_policy
    from dmemfs_fuse.alloc.poolset import PoolSet
    from dmemfs_fuse.files.inodes import InodeTable
    from dmemfs_fuse.files.store import FileStore
    from dmemfs_fuse.metadata.records import MetadataError
    from dmemfs_fuse.metadata.recovery import install, load

    plan, layout, region = _meta_filesystem()
    work = tempfile.mkdtemp(prefix="dmemfs-fuzz-metadata-")
    atexit.register(shutil.rmtree, work, ignore_errors=True)
    path = f"{work}/region.meta"

    def check(data: bytes) -> None:
        if not data:
            return
        with open(path, "wb") as f:
            f.write(_fix_checksums(data[1:]) if data[0] % 2 else data[1:])
        pools = PoolSet.from_plan(plan, 0)
        store = FileStore(region, pools)
        parse = partial(parse_policy, known=pools.ids)
        table = InodeTable(1000, release_data=store.release, parse_policy=parse)
        try:
            state = load(path, layout, parse)
            report = install(state, table, pools, store, path)
        except MetadataError as exc:
            assert str(exc).startswith(f"metadata {path}"), f"the refusal names no file: {exc}"
            return
        # Installed: every dpage is free, or a file's, or bad (a file's dpage may be bad
        # too: a memory error in a file), and each is counted once.
        owned = {first + i for inode in table.inodes.values() if inode.data is not None
                 for _, first, count in inode.data.runs() for i in range(count)}
        bad = set(pools.bad_in(0, pools.total_dpages))
        assert pools.free_dpages + len(owned | bad) == pools.total_dpages, (
            pools.free_dpages, len(owned), len(bad))
        assert report.inodes == len(table.inodes)

    return check


def make_metadata_seeds(directory: str) -> list[str]:
    """Write the metadata corpus: real metadata files, made by the daemon's own journal
    over the target's filesystem, in the states a start meets (fresh, with files and
    every record kind, after a checkpoint, with a torn tail, with a bad dpage, with an
    unlinked file still open).  Each file is prefixed by the target's mode byte 0."""
    import os
    import shutil
    import stat
    import tempfile

    from persistent import PlainFs, populate

    from dmemfs_fuse.files.inodes import ROOT_INO
    from dmemfs_fuse.files.poison import MemoryErrors
    from dmemfs_fuse.metadata.records import frame

    plan, layout, region = _meta_filesystem()
    work = tempfile.mkdtemp(prefix="dmemfs-fuzz-seeds-")
    written: list[str] = []
    try:
        meta = f"{work}/region.meta"
        fs = PlainFs(plan, meta, layout, region=region)
        table, pools, journal = fs.table, fs.pools, fs.journal
        journal.checkpoint()

        def keep(name: str, tail: bytes = b"", cut: int = 0) -> None:
            with open(meta, "rb") as f:
                data = f.read()
            data = (data[:-cut] if cut else data) + tail
            target = os.path.join(directory, name)
            with open(target, "wb") as f:
                f.write(b"\0" + data)
            written.append(target)

        keep("seed-empty")
        a = populate(fs)["a"]
        keep("seed-batches")
        keep("seed-torn-tail", cut=3)
        keep("seed-torn-frame", tail=frame({"t": "batch", "seq": 999})[:-4])
        journal.checkpoint()
        keep("seed-checkpoint")
        c = table.make(ROOT_INO, b"open", stat.S_IFREG | 0o600, 0, 0).ino
        table.open(c)
        fs.write(c, 0, b"x" * (2 * META_DPAGE))
        table.unlink(ROOT_INO, b"open")
        journal.commit()
        keep("seed-unlinked-open")
        pools.mark_bad(META_POOL_DPAGES + 5)
        journal.commit()
        journal.checkpoint()
        keep("seed-bad-dpage")
        # a memory error in a file's dpage: bad, and still the file's (it answers EIO)
        node = table.get(a)
        assert node.data is not None
        MemoryErrors(table, fs.store).mark(node.data.runs()[0][1], "operator")
        journal.commit()
        journal.checkpoint()
        keep("seed-bad-file-dpage")
        journal.close(checkpoint=False)
    finally:
        region.close()
        shutil.rmtree(work, ignore_errors=True)
    return written


TARGETS = {t.name: t for t in (
    Target("options", "mount options, policies and sizes", build_options),
    Target("control", "control-socket request lines", build_control),
    Target("metadata", "metadata files, loaded and installed", build_metadata),
)}
