"""The journal and recovery, without a mount: what is written comes back, exactly,
and a file that cannot be trusted is refused with a reason."""

from __future__ import annotations

import contextlib
import errno
import os
import random
import stat
from collections.abc import Callable, Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import pyfuse3
import pytest
import trio
from persistent import DIR, FILE, PlainFs, populate

from dmemfs_fuse.adapter.fs import DmemOperations
from dmemfs_fuse.alloc.policy import parse_policy
from dmemfs_fuse.alloc.poolset import PoolSet
from dmemfs_fuse.alloc.runs import Extent
from dmemfs_fuse.files.changes import Changes
from dmemfs_fuse.files.inodes import RENAME_EXCHANGE, ROOT_INO, Inode, InodeTable
from dmemfs_fuse.files.poison import MemoryErrors
from dmemfs_fuse.files.store import FileStore
from dmemfs_fuse.memory.region import PoolSpec, Region, RegionPlan
from dmemfs_fuse.metadata import persistence, records
from dmemfs_fuse.metadata.records import MetadataError
from dmemfs_fuse.metadata.recovery import install, load

DPS = 4096
POOL_DPAGES = 256


class Fs(PlainFs):
    """A PlainFs on a region file under *tmp*, whose metadata is ``region.meta`` beside it."""

    def __init__(self, tmp: Path, checkpoint_bytes: int = 1 << 30,
                 pools: tuple[int, ...] = (POOL_DPAGES, POOL_DPAGES)) -> None:
        plan = RegionPlan(pools=tuple(PoolSpec(0, n * DPS) for n in pools),
                          dpage_size=DPS, backend="path", path=str(tmp / "region"))
        region = Region.open(plan)  # before the layout, which names the region file
        super().__init__(plan, str(tmp / "region.meta"),
                         persistence.layout_for(plan, plan.path or ""),
                         checkpoint_bytes=checkpoint_bytes, region=region)


@pytest.fixture
def fs(tmp_path: Path) -> Iterator[Fs]:
    fs = Fs(tmp_path)
    fs.journal.checkpoint()
    yield fs
    fs.close()


def reopen(tmp: Path, old: Fs) -> Fs:
    """Crash *old* and recover a new Fs from its files."""
    old.close()
    new = Fs(tmp)
    new.recover()
    return new


def assert_recovers_as_it_was(tmp_path: Path, fs: Fs) -> None:
    """Crash *fs*; the Fs recovered from its files must show exactly what it showed."""
    before = fs.dump()
    again = reopen(tmp_path, fs)
    try:
        assert again.dump() == before
    finally:
        again.close()


def test_everything_comes_back_exactly(tmp_path: Path, fs: Fs) -> None:
    populate(fs)
    before = fs.dump()
    again = reopen(tmp_path, fs)
    try:
        assert again.dump() == before
        for pool in again.pools.pools:
            pool.check()
        # and it keeps working: new inode numbers do not collide
        ino = again.table.make(ROOT_INO, b"new", FILE, 0, 0).ino
        assert ino not in {v[0] for k, v in before.items() if k != b"<free>"}
    finally:
        again.close()


def test_random_operations_with_checkpoints(tmp_path: Path) -> None:
    fs = Fs(tmp_path, checkpoint_bytes=2048)
    fs.journal.checkpoint()
    rng = random.Random(5)
    files: list[int] = []
    for step in range(400):
        op = rng.random()
        t = fs.table
        try:
            if op < 0.2 or not files:
                files.append(t.make(ROOT_INO, f"f{step}".encode(), FILE, 0, 0).ino)
                fs.commit()
            elif op < 0.5:
                fs.write(rng.choice(files), rng.randrange(40 * DPS),
                         os.urandom(rng.randrange(1, 3 * DPS)))
            elif op < 0.7:
                fs.resize(rng.choice(files), rng.randrange(30 * DPS))
            elif op < 0.8:
                ino = files.pop(rng.randrange(len(files)))
                name = next(n for n, (i, _) in t.inodes[ROOT_INO].dir.entries.items()  # type: ignore[union-attr]
                            if i == ino)
                t.inodes[ino].lookup_count = 0
                t.unlink(ROOT_INO, name)
                fs.commit()
            else:
                t.setxattr(rng.choice(files), b"user.x", os.urandom(rng.randrange(50)))
                fs.commit()
        except OSError as exc:
            assert exc.errno == errno.ENOSPC
            fs.commit()
    assert fs.journal.checkpoints > 5
    assert_recovers_as_it_was(tmp_path, fs)


def assert_refused(tmp_path: Path, match: str, **options: Any) -> None:
    """Recovering a fresh Fs from the metadata file in *tmp_path* fails, naming *match*."""
    new = Fs(tmp_path, **options)
    try:
        with pytest.raises(MetadataError, match=match):
            new.recover()
    finally:
        new.close()


def test_torn_last_append_is_dropped(tmp_path: Path, fs: Fs) -> None:
    ids = populate(fs)
    before = fs.dump()
    fs.write(ids["b"], 0, b"in flight")
    size = os.path.getsize(fs.meta)
    os.truncate(fs.meta, size - 3)  # the kill landed inside the last write(2)
    again = reopen(tmp_path, fs)
    try:
        report_dump = again.dump()
        assert report_dump[b"/b"][4] == before[b"/b"][4]
        assert report_dump == {**before, b"/b": report_dump[b"/b"]}
        assert report_dump[b"/b"][-1][:9] == b"in flight"  # the bytes landed, the size did not move
    finally:
        again.close()


def test_torn_tail_is_reported(tmp_path: Path, fs: Fs) -> None:
    populate(fs)
    fs.commit()
    with open(fs.meta, "ab") as f:
        f.write(records.frame({"t": "batch", "seq": 999})[:-4])
    fs.close()
    new = Fs(tmp_path)
    try:
        assert new.recover().torn_bytes > 0
    finally:
        new.close()


def test_damage_in_the_middle_is_refused(tmp_path: Path, fs: Fs) -> None:
    populate(fs)
    fs.close()
    data = bytearray(Path(fs.meta).read_bytes())
    data[len(data) // 2] ^= 0xFF
    Path(fs.meta).write_bytes(bytes(data))
    assert_refused(tmp_path, r"checksum|decode")


def test_foreign_file_is_refused(tmp_path: Path, fs: Fs) -> None:
    fs.close()
    Path(fs.meta).write_bytes(os.urandom(4096))
    new = Fs(tmp_path)
    try:
        with pytest.raises(MetadataError):
            new.recover()
        Path(fs.meta).write_bytes(records.frame({"t": "header", "magic": "other"}))
        with pytest.raises(MetadataError, match="not a dmemfs metadata file"):
            new.recover()
    finally:
        new.close()


def test_other_layout_is_refused(tmp_path: Path, fs: Fs) -> None:
    populate(fs)
    fs.close()
    assert_refused(tmp_path, "same size, nodes and pagesize", pools=(POOL_DPAGES, POOL_DPAGES // 2))


def test_recreated_region_is_refused(tmp_path: Path, fs: Fs) -> None:
    populate(fs)
    fs.close()
    region = Path(fs.plan.path or "")
    region.unlink()
    region.write_bytes(bytes(2 * POOL_DPAGES * DPS))  # same size, new file: the data is gone
    assert_refused(tmp_path, "another region")


def test_extent_claimed_twice_is_refused(tmp_path: Path, fs: Fs) -> None:
    ids = populate(fs)
    a, b = fs.table.get(ids["a"]), fs.table.get(ids["b"])
    assert a.data is not None and b.data is not None
    _, region, _ = a.data.runs()[0]
    b.data.insert(100, [Extent(region, 1)])  # one dpage in two files
    b.size = 101 * DPS
    fs.journal.checkpoint()
    fs.close()
    assert_refused(tmp_path, "claimed twice")


def test_extent_outside_the_region_is_refused(tmp_path: Path, fs: Fs) -> None:
    ids = populate(fs)
    node = fs.table.get(ids["b"])
    assert node.data is not None
    node.data.insert(10_000, [Extent(2 * POOL_DPAGES + 5, 1)])
    node.size = 10_001 * DPS
    fs.journal.checkpoint()
    fs.close()
    assert_refused(tmp_path, r"outside|add up")


def test_broken_link_count_is_refused(tmp_path: Path, fs: Fs) -> None:
    ids = populate(fs)
    fs.table.get(ids["b"]).link_count = 3
    fs.table.get(ids["b"]).touch()
    fs.commit()
    fs.close()
    assert_refused(tmp_path, "names but a link count")


def test_unlinked_open_file_is_freed(tmp_path: Path, fs: Fs) -> None:
    ids = populate(fs)
    free_before = fs.pools.free_dpages
    fs.table.open(ids["b"])
    fs.table.unlink(ROOT_INO, b"b")  # still open, as QEMU's -mem-path file is
    fs.commit()
    assert fs.pools.free_dpages == free_before
    again = reopen(tmp_path, fs)
    try:
        assert ids["b"] not in again.table.inodes
        assert again.pools.free_dpages > free_before
        for pool in again.pools.pools:
            pool.check()
    finally:
        again.close()


def test_bytes_past_eof_are_zeroed_on_recovery(tmp_path: Path, fs: Fs) -> None:
    ids = populate(fs)
    node = fs.table.get(ids["b"])
    last = node.data.runs()[-1]  # type: ignore[union-attr]
    # a kill between a write's bytes and its record leaves bytes past EOF
    start = (last[1] + last[2] - 1) * DPS + node.size % DPS
    fs.region.array[start : start + 10] = 0x55
    again = reopen(tmp_path, fs)
    try:
        again.resize(ids["b"], 4 * DPS)
        assert again.read(ids["b"])[node.size % DPS + 3 * DPS:] == bytes(DPS - node.size % DPS)
    finally:
        again.close()


def test_failed_append_answers_eio_then_heals(tmp_path: Path, fs: Fs) -> None:
    ids = populate(fs)
    good = fs.journal.fd
    fs.journal.fd = os.open("/dev/full", os.O_WRONLY)
    try:
        with pytest.raises(OSError) as info:
            fs.write(ids["b"], 0, b"x")
        assert info.value.errno == errno.EIO and not fs.journal.healthy
    finally:
        os.close(fs.journal.fd)
        fs.journal.fd = good
    fs.commit()  # nothing new, but pending changes: rewritten whole
    assert fs.journal.healthy
    assert_recovers_as_it_was(tmp_path, fs)


def test_a_request_answered_eio_hands_out_no_references(
        tmp_path: Path, fs: Fs, monkeypatch: pytest.MonkeyPatch) -> None:
    """If the journal cannot record a create, the kernel gets EIO and will never send
    FORGET or RELEASE for it: the inode must not keep a lookup or an open count, or
    unlinking it later would leave its dpages allocated until restart."""
    ops = DmemOperations(fs.table, fs.store, journal=fs.journal)
    # what handlers read of a pyfuse3.RequestContext (which cannot be built in Python)
    ctx = cast(pyfuse3.RequestContext, SimpleNamespace(pid=os.getpid(), uid=0, gid=0, umask=0o022))
    info_kept, _ = trio.run(ops.create, ROOT_INO, b"kept", 0o644, os.O_RDWR, ctx)
    good = fs.journal.fd
    fs.journal.fd = os.open("/dev/full", os.O_WRONLY)  # appends fail
    Path(fs.meta + ".new").mkdir()  # and so do checkpoints
    try:
        with pytest.raises(pyfuse3.FUSEError) as info:
            trio.run(ops.create, ROOT_INO, b"lost", 0o644, os.O_RDWR, ctx)
        assert info.value.errno == errno.EIO and not fs.journal.healthy
        with pytest.raises(pyfuse3.FUSEError):  # a lookup's reference is given back too
            trio.run(ops.lookup, ROOT_INO, b"lost", ctx)
        # readdirplus entries take lookups that its result does not show: while the
        # journal fails it must answer EIO before it hands any out
        monkeypatch.setattr(pyfuse3, "readdir_reply", lambda *args: True)
        with pytest.raises(pyfuse3.FUSEError):
            trio.run(ops.readdir, ROOT_INO, 0, cast(pyfuse3.ReaddirToken, None))
        # a release runs (the kernel drops its handle whatever the answer), and the
        # failing journal is tried once per request, not twice
        checkpoints_tried = fs.journal.failures
        with pytest.raises(pyfuse3.FUSEError):
            trio.run(ops.release, info_kept.fh)
        assert fs.journal.failures == checkpoints_tried + 1
    finally:
        os.close(fs.journal.fd)
        fs.journal.fd = good
        Path(fs.meta + ".new").rmdir()
    node = fs.table.lookup(ROOT_INO, b"lost")  # the create did happen (EIO: maybe)
    # the 1 is this lookup's: none from the create, the lookup or the readdir
    assert (node.lookup_count, node.open_count) == (1, 0)
    assert ops._handles == {} and fs.table.lookup(ROOT_INO, b"kept").open_count == 0
    fs.table.forget(node.ino, 1)
    fs.write(node.ino, 0, b"x" * 3 * DPS)  # heals the journal: a checkpoint
    assert fs.journal.healthy
    free = fs.pools.free_dpages
    trio.run(ops.unlink, ROOT_INO, b"lost", ctx)
    assert node.ino not in fs.table.inodes and fs.pools.free_dpages == free + 3


def test_start_empty_keeps_the_old_file(tmp_path: Path, fs: Fs) -> None:
    populate(fs)
    fs.close()
    meta = persistence.MetaPlan(fs.meta, True, 1 << 20)
    assert persistence.find(meta, fs.plan, fs.parse) is None
    kept = [p for p in tmp_path.iterdir() if ".discarded-" in p.name]
    assert len(kept) == 1 and not Path(fs.meta).exists()
    layout = persistence.layout_for(fs.plan, fs.plan.path or "")
    assert load(str(kept[0]), layout, fs.parse).inodes


def test_second_daemon_is_locked_out(tmp_path: Path) -> None:
    meta = persistence.MetaPlan(str(tmp_path / "m"), False, 1 << 20)
    lock = persistence.MetaLock(meta)
    try:
        with pytest.raises(Exception, match="in use by another dmemfs"):
            persistence.MetaLock(meta)
    finally:
        lock.release()
    persistence.MetaLock(meta).release()


def test_inode_encoding_roundtrip() -> None:
    inode = Inode(ino=9, mode=FILE, uid=1, gid=2, size=77, atime_ns=1, mtime_ns=2, ctime_ns=3,
                  btime_ns=4, link_count=2, xattrs={b"user.a": b"\0\1"})
    fields = records.encode_inode(inode, xattrs=True, contents=False)
    back = records.decode_inode(fields, None, lambda t: parse_policy(t, [0]))
    assert records.encode_inode(back, xattrs=True, contents=False) == fields


def test_bad_dpage_at_the_start_of_a_run_survives_two_restarts(tmp_path: Path, fs: Fs) -> None:
    """A bad dpage its file still owns, at the first dpage of the file's run: the
    snapshot written at the first restart must be accepted at the second."""
    ids = populate(fs)
    node = fs.table.get(ids["a"])
    assert node.data is not None
    first = node.data.runs()[0][1]
    MemoryErrors(fs.table, fs.store).mark(first, "test")
    fs.commit()
    before = fs.dump()
    again = reopen(tmp_path, fs)  # replays the batch, then checkpoints
    third = reopen(tmp_path, again)  # loads that checkpoint
    try:
        assert third.dump() == before
        with pytest.raises(OSError) as info:
            third.read(ids["a"])
        assert info.value.errno == errno.EIO
    finally:
        third.close()


def _rewrite(meta: str, change: Any) -> None:
    """Apply *change* to the metadata file's parsed records and write them back, framed
    with good checksums: damage that only the consistency checks can see."""
    contents = records.read_file(meta, Path(meta).read_bytes())
    change(contents)
    data = b"".join(records.frame(r) for r in
                    [contents.header, contents.snapshot, *contents.batches])
    Path(meta).write_bytes(data)


def test_extent_outside_the_pools_is_refused_by_the_pools(tmp_path: Path, fs: Fs) -> None:
    ids = populate(fs)
    fs.journal.checkpoint()
    fs.close()
    beyond = 2 * POOL_DPAGES + 5

    def add_extent(contents: records.FileContents) -> None:
        for fields in contents.snapshot["inodes"]:
            if fields[0] == ids["b"]:
                fields[5] = 10_001 * DPS  # size
                fields[15].append([10_000, beyond, 1])
        contents.snapshot["allocated"].append([beyond, 1])  # the snapshot agrees with itself
    _rewrite(fs.meta, add_extent)
    assert_refused(tmp_path, "outside every pool")


def test_next_inode_number_in_use_is_refused(tmp_path: Path, fs: Fs) -> None:
    populate(fs)
    fs.journal.checkpoint()
    fs.close()

    def rewind(contents: records.FileContents) -> None:
        contents.snapshot["next_ino"] = 2
    _rewrite(fs.meta, rewind)
    assert_refused(tmp_path, "next inode number 2 is already in use")


def test_a_failed_checkpoint_does_not_fail_the_request(tmp_path: Path) -> None:
    """The batch is appended before the checkpoint is tried: if the checkpoint cannot be
    written (here: PATH.new is a directory), the request has still succeeded and is kept."""
    fs = Fs(tmp_path, checkpoint_bytes=512)
    fs.journal.checkpoint()
    Path(fs.meta + ".new").mkdir()
    ino = fs.table.make(ROOT_INO, b"kept", FILE, 0, 0).ino
    fs.commit()
    for n in range(40):  # the journal passes the snapshot's size: checkpoints are due
        fs.write(ino, n * 100, b"x" * 100)
    assert fs.journal.healthy and fs.journal.failures >= 1
    before = fs.dump()
    Path(fs.meta + ".new").rmdir()
    again = reopen(tmp_path, fs)
    try:
        assert again.dump() == before
    finally:
        again.close()


def test_a_batch_too_long_for_a_torn_tail_goes_in_as_a_checkpoint(
        tmp_path: Path, fs: Fs, monkeypatch: pytest.MonkeyPatch) -> None:
    """Recovery takes a torn tail longer than MAX_TORN_TAIL for damage, so the journal
    must never append a batch that long: it checkpoints instead."""
    monkeypatch.setattr(records, "MAX_TORN_TAIL", 600)
    ino = fs.table.make(ROOT_INO, b"small", FILE, 0, 0).ino
    fs.commit()
    assert fs.journal.seq == 1 and fs.journal.checkpoints == 1  # a short batch: appended
    for n in range(40):  # one request touching 40 inodes: a batch of about 2 KB
        fs.table.make(ROOT_INO, b"f%02d" % n, FILE, 0, 0)
    fs.commit()
    assert fs.journal.seq == 0 and fs.journal.checkpoints == 2 and fs.journal.log_bytes == 0
    fs.write(ino, 0, b"after")  # appends go on after it
    assert fs.journal.seq == 1
    assert_recovers_as_it_was(tmp_path, fs)


def test_a_record_over_the_frame_limit_fails_the_request(
        tmp_path: Path, fs: Fs, monkeypatch: pytest.MonkeyPatch) -> None:
    """A record the reader would refuse (longer than MAX_FRAME) is never written: the
    request answers EIO, and the file keeps the last state that fits."""
    before = fs.dump()
    monkeypatch.setattr(records, "MAX_FRAME", 300)
    for n in range(40):
        fs.table.make(ROOT_INO, b"f%02d" % n, FILE, 0, 0)
    with pytest.raises(OSError) as exc:
        fs.commit()
    assert exc.value.errno == errno.EIO and "limit of one frame" in str(exc.value)
    assert not fs.journal.healthy
    monkeypatch.undo()
    fs.close()
    again = Fs(tmp_path)
    try:
        again.recover()
        assert again.dump() == before
    finally:
        again.close()


def _attributes(node: Inode) -> tuple[object, ...]:
    return (node.mode, node.uid, node.gid, node.rdev, node.size, node.atime_ns, node.mtime_ns,
            node.ctime_ns, node.btime_ns, node.link_count, node.nlink, node.target,
            str(node.policy), dict(node.xattrs),
            node.parent if node.dir is not None else None,
            {k: v[0] for k, v in node.dir.entries.items()} if node.dir is not None else None,
            node.data.runs() if node.data is not None else None)


def _recovered_matches(fs: Fs) -> list[str]:
    """Load and install the metadata file into fresh objects and compare with *fs*."""
    shadow = Fs.__new__(Fs)
    shadow.plan, shadow.meta = fs.plan, fs.meta
    shadow.pools = PoolSet.from_plan(fs.plan, 0)
    shadow.region = Region.open(fs.plan)
    try:
        shadow.store = FileStore(shadow.region, shadow.pools)
        shadow.table = InodeTable(1000, release_data=shadow.store.release,
                                  parse_policy=shadow.parse, changes=Changes())
        layout = persistence.layout_for(fs.plan, fs.plan.path or "")
        install(load(fs.meta, layout, shadow.parse), shadow.table, shadow.pools, shadow.store,
                fs.meta)
        live = {i for i, n in fs.table.inodes.items() if n.link_count or i == ROOT_INO}
        problems = []
        if set(shadow.table.inodes) != live:
            problems.append(f"inodes differ: {set(shadow.table.inodes) ^ live}")
        problems += [f"inode {i} differs" for i in live & set(shadow.table.inodes)
                     if _attributes(fs.table.inodes[i]) != _attributes(shadow.table.inodes[i])]
        if live == set(fs.table.inodes):  # no unlinked-but-open files: pools must agree too
            for mine, theirs in zip(fs.pools.pools, shadow.pools.pools, strict=True):
                if (mine.avail, list(mine.bad), mine.free_runs()) != \
                        (theirs.avail, list(theirs.bad), theirs.free_runs()):
                    problems.append(f"pool {mine.index} differs")
        return problems
    finally:
        shadow.region.close()


class RandomRequests:
    """The differential test's operations on the plain layers, one per step, each as a
    request would make it; an operation with nothing to act on does nothing."""

    def __init__(self, fs: Fs, rng: random.Random) -> None:
        self.fs, self.table, self.rng = fs, fs.table, rng
        self.errors = MemoryErrors(fs.table, fs.store)

    def dirs(self) -> list[int]:
        return [i for i, n in self.table.inodes.items() if n.dir is not None and n.link_count]

    def names(self) -> list[tuple[int, bytes]]:
        return [(i, name) for i in self.dirs()
                for name in self.table.inodes[i].dir.entries]  # type: ignore[union-attr]

    def file(self) -> int | None:
        files = [i for i, n in self.table.inodes.items() if n.data is not None]
        return self.rng.choice(files) if files else None

    def make(self, step: int, mode: int = FILE, target: bytes | None = None) -> None:
        self.table.make(self.rng.choice(self.dirs()), f"n{step}".encode(), mode, 0, 0,
                        target=target)

    def mkdir(self, step: int) -> None:
        self.make(step, DIR)

    def symlink(self, step: int) -> None:
        self.make(step, stat.S_IFLNK | 0o777, b"t")

    def write(self, step: int) -> None:
        if (ino := self.file()) is not None:
            self.fs.data.write(ino, self.rng.randrange(12 * DPS),
                               os.urandom(self.rng.randrange(1, 3 * DPS)), 0)

    def resize(self, step: int) -> None:
        if (ino := self.file()) is not None:
            self.fs.data.truncate(ino, self.rng.randrange(12 * DPS), 0)

    def poison(self, step: int) -> None:
        if (ino := self.file()) is None:
            return
        data = self.table.inodes[ino].data
        assert data is not None
        if runs := data.runs():
            _, region, count = self.rng.choice(runs)
            self.errors.mark(region + self.rng.randrange(count), "test")
        else:
            self.errors.mark(self.rng.randrange(96), "test")

    def xattr(self, step: int) -> None:
        if (ino := self.file()) is not None:
            self.table.setxattr(ino, f"user.k{self.rng.randrange(3)}".encode(), os.urandom(5))

    def policy(self, step: int) -> None:
        if (ino := self.file()) is not None:
            self.table.set_policy(ino, self.rng.choice(["interleave:0-1", "bind:1", "local"]))

    def chmod(self, step: int) -> None:
        if (ino := self.file()) is not None:
            self.table.set_attributes(ino, mode=self.rng.randrange(0o7777),
                                      atime_ns=self.rng.randrange(10**9))

    def open(self, step: int) -> None:
        if (ino := self.file()) is not None:
            self.table.open(ino)

    def close(self, step: int) -> None:
        if opened := [i for i, n in self.table.inodes.items() if n.open_count]:
            self.table.close(self.rng.choice(opened))

    def forget(self, step: int) -> None:
        if held := [i for i, n in self.table.inodes.items() if n.lookup_count]:
            ino = self.rng.choice(held)
            self.table.forget(ino, self.table.inodes[ino].lookup_count)

    def unlink(self, step: int) -> None:
        if names := self.names():
            self.table.unlink(*self.rng.choice(names))

    def rmdir(self, step: int) -> None:
        if names := self.names():
            self.table.rmdir(*self.rng.choice(names))

    def rename(self, step: int, flags: int = 0) -> None:
        if not (names := self.names()):
            return
        parent, name = self.rng.choice(names)
        if self.rng.random() < 0.6:
            new_parent, new_name = self.rng.choice(names)
        else:
            new_parent, new_name = self.rng.choice(self.dirs()), f"r{step}".encode()
        self.table.rename(parent, name, new_parent, new_name, flags)

    def exchange(self, step: int) -> None:
        self.rename(step, RENAME_EXCHANGE)

    def link(self, step: int) -> None:
        linkable = [i for i, n in self.table.inodes.items() if n.dir is None and n.link_count]
        if linkable:
            self.table.link(self.rng.choice(linkable), self.rng.choice(self.dirs()),
                            f"l{step}".encode())


# The draw of the differential test: an operation listed twice comes twice as often.
REQUESTS: list[Callable[[RandomRequests, int], None]] = [
    RandomRequests.make, RandomRequests.make, RandomRequests.mkdir, RandomRequests.write,
    RandomRequests.write, RandomRequests.resize, RandomRequests.unlink, RandomRequests.rmdir,
    RandomRequests.rename, RandomRequests.exchange, RandomRequests.link, RandomRequests.xattr,
    RandomRequests.policy, RandomRequests.chmod, RandomRequests.open, RandomRequests.close,
    RandomRequests.forget, RandomRequests.poison, RandomRequests.symlink,
]


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_recovery_equals_the_live_state_after_every_request(tmp_path: Path, seed: int) -> None:
    """Differential: random namespace, data, xattr, policy, open/close/forget and poison
    operations; after each one the metadata file, loaded into fresh objects, must equal
    the live table and pools.  Checkpoints every 4 KiB of the journal."""
    fs = Fs(tmp_path, checkpoint_bytes=4096, pools=(48, 48))
    fs.journal.checkpoint()
    rng = random.Random(seed)
    requests = RandomRequests(fs, rng)
    try:
        for step in range(150):
            op = rng.choice(REQUESTS)
            with contextlib.suppress(OSError):  # refused (ENOSPC, EISDIR, EIO, ...): no change
                op(requests, step)
            fs.commit()
            problems = _recovered_matches(fs)
            assert not problems, f"step {step} ({op.__name__}): {problems}"
        assert fs.journal.checkpoints > 2
    finally:
        fs.close()
