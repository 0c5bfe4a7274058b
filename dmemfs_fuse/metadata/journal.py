"""The journal of a persistent mount: one appended batch per request, checkpoints now and then.

Crash-consistency rules (the README states them for users):

* A request's metadata changes are appended as one framed, checksummed batch
  (records.py) with one write(2) before the kernel gets the reply.  The
  bytes of a WRITE are copied into the region (a shared mapping of a file
  that outlives the daemon) before that.  So whatever a syscall on the mount
  did is kept when it returns, if the daemon is then killed.
* The daemon's own death cannot lose what was written to the metadata file's
  page cache; fsync is done only at checkpoints.  A host crash or power loss
  loses the region anyway (it is RAM), so the journal makes no promise there.
* A batch is all of a request or none of it: a request cut short by the kill
  leaves a torn frame that recovery drops, and the state of the request
  before it.
* A checkpoint writes header + snapshot to ``PATH.new``, fsyncs it and renames
  it over PATH: the file is always the old or the new one, whole.
* A batch longer than ``records.MAX_TORN_TAIL`` is written as a checkpoint
  instead: recovery would take a torn tail that long for damage.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import time
import uuid as uuidlib
from dataclasses import dataclass
from typing import Any

from ..alloc.poolset import PoolSet
from ..alloc.runs import Extent, coalesce
from ..files.changes import Changes
from ..files.inodes import InodeTable
from . import records
from .records import BATCH, SNAPSHOT, Layout, encode_inode, frame, header_record

log = logging.getLogger(__name__)

DEFAULT_CHECKPOINT_BYTES = 64 << 20


@dataclass(frozen=True)
class JournalStats:
    """The journal's counters.

    Fields:
        path: the metadata file.
        generation: checkpoints written over the file's whole life.
        batches: batches appended since the last checkpoint.
        log_bytes: bytes appended since the last checkpoint.
        snapshot_bytes: size of the last checkpoint (header + snapshot).
        checkpoints: checkpoints written since start.
        failures: appends or checkpoints that failed since start.
        healthy: False while the last write failed (requests answer EIO).
    """

    path: str
    generation: int
    batches: int
    log_bytes: int
    snapshot_bytes: int
    checkpoints: int
    failures: int
    healthy: bool


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


class Journal:
    """Keeps *path* up to date with *table* and *pools*; see the module's rules."""

    def __init__(self, path: str, layout: Layout, table: InodeTable, pools: PoolSet, *,
                 checkpoint_bytes: int = DEFAULT_CHECKPOINT_BYTES, uuid: str | None = None,
                 generation: int = 0) -> None:
        if table.changes is None:
            raise ValueError("the inode table records no changes")
        self.path = path
        self.layout = layout
        self.table = table
        self.pools = pools
        self.changes: Changes = table.changes
        self.checkpoint_bytes = checkpoint_bytes
        self.uuid = uuid or uuidlib.uuid4().hex
        self.generation = generation
        self.fd = -1
        self.seq = 0
        self.log_bytes = 0
        self.snapshot_bytes = 0
        self.checkpoints = 0
        self.failures = 0
        self.healthy = True
        # Where the last whole frame ends: a failed append is cut back to here.
        self._good_offset = 0
        # Journal size at which the next checkpoint is due (pushed back when one fails).
        self._checkpoint_due = checkpoint_bytes

    def commit(self) -> None:
        """Append what changed since the last commit as one batch; OSError(EIO) if that fails.

        On failure the changes stay pending and the next commit writes a full
        checkpoint instead, so nothing is lost while the daemon lives.
        """
        if not self.changes:
            return
        if not self.healthy:
            self.checkpoint()
            return
        try:
            data: bytes | None = frame(self._batch())
        except OSError:  # over MAX_FRAME
            data = None
        if data is None or len(data) > records.MAX_TORN_TAIL:
            # Recovery takes a torn tail this long for damage, so a batch this big (a
            # many-GiB allocation at 4K dpages) goes in as a checkpoint: whole or not at all.
            self.checkpoint()
            return
        try:
            _write_all(self.fd, data)
        except OSError as exc:
            self._failed("appending to", exc)
            with contextlib.suppress(OSError):  # the next commit rewrites the whole file anyway
                os.ftruncate(self.fd, self._good_offset)
            raise OSError(errno.EIO, f"journal {self.path}: {exc.strerror}") from None
        self.seq += 1
        self.log_bytes += len(data)
        self._good_offset += len(data)
        self.changes.clear()
        if self.log_bytes > max(self._checkpoint_due, self.snapshot_bytes):
            # The batch is in the journal: the request has succeeded whatever happens here.
            self.checkpoint(required=False)

    def checkpoint(self, *, required: bool = True) -> None:
        """Rewrite the file as header + snapshot (atomically); OSError(EIO) if that fails.

        A checkpoint that is not *required* (the journal merely grew) only logs a
        failure and is tried again after another ``checkpoint_bytes`` of journal:
        appends still work, so requests go on succeeding.
        """
        started = time.monotonic()
        generation = self.generation + 1
        tmp = self.path + ".new"
        try:
            data = (frame(header_record(self.layout, self.uuid, generation))
                    + frame(self._snapshot()))
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_APPEND | os.O_CLOEXEC,
                         0o600)
            try:
                _write_all(fd, data)
                os.fsync(fd)
                os.rename(tmp, self.path)
            except BaseException:
                os.close(fd)
                os.unlink(tmp)
                raise
        except OSError as exc:
            if not required:
                self.failures += 1
                self._checkpoint_due = self.log_bytes + self.checkpoint_bytes
                log.warning("metadata %s: checkpoint failed (%s); the journal keeps growing and "
                            "it is tried again later", self.path, exc)
                return
            self._failed("checkpointing", exc)
            raise OSError(errno.EIO, f"metadata checkpoint {self.path}: {exc.strerror}") from None
        try:  # the rename is done: the new file is the record whatever happens here
            _fsync_dir(os.path.dirname(os.path.abspath(self.path)))
        except OSError as exc:
            log.warning("metadata %s: fsync of its directory failed: %s", self.path, exc)
        if self.fd >= 0:
            os.close(self.fd)
        self.fd = fd
        self.generation = generation
        self.seq = 0
        self.log_bytes = 0
        self.snapshot_bytes = self._good_offset = len(data)
        self._checkpoint_due = self.checkpoint_bytes
        self.checkpoints += 1
        self.changes.clear()
        if not self.healthy:
            log.warning("journal %s: written again after a failure", self.path)
        self.healthy = True
        log.debug("checkpoint %d of %s: %d bytes, %d inodes in %.3f s", generation, self.path,
                  len(data), len(self.table.inodes), time.monotonic() - started)

    def close(self, *, checkpoint: bool = True) -> None:
        """A last checkpoint (a clean stop restarts from one record), then close the file.

        Without *checkpoint* (the daemon is going down on an error or a second
        signal, possibly in the middle of a request) the journal is left as it is:
        it holds exactly the requests that were answered.
        """
        if self.fd < 0:
            return
        if checkpoint:
            try:
                self.checkpoint()
            except OSError as exc:
                log.error("%s", exc)
        os.close(self.fd)
        self.fd = -1

    def statistics(self) -> JournalStats:
        """A frozen snapshot of the journal's counters."""
        return JournalStats(self.path, self.generation, self.seq, self.log_bytes,
                            self.snapshot_bytes, self.checkpoints, self.failures, self.healthy)

    def _failed(self, what: str, exc: OSError) -> None:
        self.failures += 1
        if self.healthy:
            log.error("journal %s: %s it failed (%s); requests answer EIO until a "
                      "checkpoint succeeds", self.path, what, exc)
        self.healthy = False

    def _batch(self) -> dict[str, Any]:
        changes = self.changes
        inodes = self.table.inodes
        puts = [encode_inode(inodes[ino], xattrs=ino in changes.xattrs_touched, contents=False)
                for ino in sorted(changes.touched) if ino in inodes]
        return {"t": BATCH, "seq": self.seq + 1, "put": puts, "d": changes.deltas,
                "drop": changes.dropped, "free": self.pools.free_dpages}

    def _snapshot(self) -> dict[str, Any]:
        return {
            "t": SNAPSHOT,
            "next_ino": self.table.next_ino,
            "inodes": [encode_inode(inode, xattrs=True, contents=True)
                       for inode in self.table.inodes.values()],
            "bad": [d for pool in self.pools.pools for d in pool.bad],
            "allocated": [list(ext) for ext in allocated_runs(self.pools)],
            "free": self.pools.free_dpages,
        }


def allocated_runs(pools: PoolSet) -> list[Extent]:
    """The pools' taken dpages (allocated or bad) as maximal runs, in region order."""
    return coalesce(run for pool in pools.pools for run in pool.taken_runs())


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
