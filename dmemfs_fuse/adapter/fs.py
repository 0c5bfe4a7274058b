"""The FUSE adapter: translates pyfuse3 requests into calls on the inode table and the file store.

Nothing is decided here that the plain layers could decide.  Every handler
passes through :func:`_boundary`, the one place where errors become errno:
OSError carries its errno, anything else is a bug, logged with its traceback
and answered with EIO.  Only FUSEError leaves a handler; ``init`` and
``forget`` never raise.

On a persistent mount the boundary is also where a request's metadata
changes are committed to the journal, before the reply.  Handlers make their
changes without awaiting in between (the one await, _forgets_landed, comes
in statfs, or after an allocation that failed and changed nothing), so the
changes pending at a handler's end are its own.  When the
commit fails the request answers EIO, and the references its reply would have
handed out (a lookup, an open handle) are dropped again: the kernel never
forgets or releases what it did not get.  A readdir, whose entries take
lookups that its result does not show, answers EIO before it runs while the
journal is failing.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import logging
import os
import stat
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

import pyfuse3
import trio

from ..errors import NoSpaceError
from ..files.data import FileData
from ..files.inodes import Inode, InodeTable
from ..files.passthrough import PassthroughStore
from ..files.store import FileStore
from ..memory import numa
from ..metadata.journal import Journal
from .caller import Caller
from .connection import Negotiated, negotiate

log = logging.getLogger(__name__)

# The daemon is the only writer, and every change passes through the kernel,
# which updates or drops its cached entries and attributes itself (unlink, link,
# rename, write, setattr), so they stay true for long (docs/performance.md measures
# what a short timeout costs in LOOKUPs).
CACHE_TIMEOUT = 60.0
FORGET_GRACE = 0.1
# Handlers whose reply gives the kernel a reference (a lookup count) to the entry.
ENTRY_OPS = frozenset({"lookup", "mknod", "mkdir", "symlink", "link", "create"})
# Handlers that hand out references their result does not show (readdirplus entries
# each take a lookup): while the journal is failing they answer EIO before running,
# since a failed commit afterwards could not give those back.
HEAL_FIRST_OPS = frozenset({"readdir"})
QUIET_ERRNOS = {errno.ENOENT, errno.EEXIST, errno.ENODATA, errno.ENOTEMPTY, errno.EOPNOTSUPP,
                errno.ENXIO}

F = TypeVar("F", bound=Callable[..., Awaitable[Any]])


def _changes_anything(fields: pyfuse3.SetattrFields) -> bool:
    return bool(fields.update_atime or fields.update_mtime or fields.update_ctime
                or fields.update_mode or fields.update_uid or fields.update_gid
                or fields.update_size)


def _summary(args: tuple[Any, ...]) -> str:
    parts = []
    for arg in args:
        if isinstance(arg, (bytes, bytearray, memoryview)) and len(arg) > 64:
            parts.append(f"<{len(arg)} bytes>")
        elif isinstance(arg, pyfuse3.RequestContext):
            parts.append(f"pid={arg.pid}")
        elif isinstance(arg, (pyfuse3.EntryAttributes, pyfuse3.SetattrFields,
                              pyfuse3.ReaddirToken)):
            continue
        else:
            parts.append(repr(arg))
    return ", ".join(parts)


def _boundary(handler: F) -> F:
    """Turn whatever *handler* raises into a FUSEError, logged once, and trace it when asked."""

    @functools.wraps(handler)
    async def wrapper(self: DmemOperations, *args: Any) -> Any:
        name = handler.__name__
        timed = self.trace or self.metrics is not None
        started = time.perf_counter() if timed else 0.0
        journal_failed = False  # the journal failed in this request: no second try
        try:
            if self.journal is not None and not self.journal.healthy and name in HEAL_FIRST_OPS:
                journal_failed = True
                self.journal.commit()  # heal (a checkpoint) or answer EIO before running
                journal_failed = False
            result = await handler(self, *args)
            if self.journal is not None:
                journal_failed = True
                try:
                    self.journal.commit()
                except OSError:
                    self._give_back(name, result)
                    raise
                journal_failed = False
            self._committed()
        except pyfuse3.FUSEError as exc:
            if not journal_failed:
                self._commit_quietly()
            self._account(name, started, errno.errorcode.get(exc.errno, str(exc.errno)))
            raise
        except OSError as exc:
            if not journal_failed:
                self._commit_quietly()
            code = exc.errno or errno.EIO
            level = logging.DEBUG if code in QUIET_ERRNOS else logging.INFO
            log.log(level, "%s(%s): %s", name, _summary(args), exc)
            self._account(name, started, errno.errorcode.get(code, str(code)))
            raise pyfuse3.FUSEError(code) from None
        except Exception:
            if not journal_failed:
                self._commit_quietly()
            log.exception("%s(%s) failed; answering EIO", name, _summary(args))
            self._account(name, started, "EIO")
            raise pyfuse3.FUSEError(errno.EIO) from None
        if timed:
            self._account(name, started, "ok")
            if self.trace:
                log.debug("%s(%s) -> ok in %.1f us", name, _summary(args),
                          (time.perf_counter() - started) * 1e6)
        return result

    return wrapper  # type: ignore[return-value]


class RequestObserver(Protocol):
    """What the operations report of each request (insight's RequestMetrics is one)."""

    def observe(self, op: str, seconds: float, result: str) -> None:
        """One request of *op* took *seconds*; *result* is ok or an errno name."""

    def read(self, nbytes: int) -> None:
        """A READ returned *nbytes*."""

    def wrote(self, nbytes: int) -> None:
        """A WRITE stored *nbytes*."""


@dataclass
class Handle:
    """An open file: its inode and the NUMA node of the process that opened it."""

    ino: int
    node: int


class DmemOperations(pyfuse3.Operations):
    """pyfuse3 operations over an InodeTable (metadata) and a FileStore (bytes)."""

    supports_dot_lookup = True
    enable_writeback_cache = False
    enable_acl = False

    def __init__(self, inodes: InodeTable, store: FileStore | PassthroughStore,
                 trace: bool = False,
                 metrics: RequestObserver | None = None, journal: Journal | None = None) -> None:
        super().__init__()
        self.inodes = inodes
        self.store = store
        self.data = FileData(inodes, store)
        self.journal = journal
        self.trace = trace
        self.metrics = metrics
        self._handles: dict[int, Handle] = {}
        self._next_fh = 1
        # Set once the kernel has our INIT reply: sysfs tuning of the mount must wait for it.
        self.initialized = trio.Event()
        # What INIT negotiated (connection.py); None until then.
        self.connection: Negotiated | None = None
        # Inodes whose page cache must be dropped (a memory error hit them).
        self._to_invalidate: set[int] = set()
        # One flusher at a time: a second caller must not answer while the first is
        # still dropping pages it asked for.
        self._invalidating = trio.Lock()
        # Passthrough: inode -> [backing id, open handles using it].  One id per inode
        # (the kernel allows one backing file per inode), closed with its last handle.
        self._backing: dict[int, list[int]] = {}

    def commit(self) -> None:
        """Write pending metadata changes (made outside a request) to the journal."""
        if self.journal is not None:
            self.journal.commit()
        self._committed()

    def _committed(self) -> None:
        """The metadata now says what the plain layers did (or none is kept): the backing
        files of released files can go (passthrough.py, purge)."""
        if isinstance(self.store, PassthroughStore):
            try:
                self.store.purge()
            except OSError as exc:  # tried again after the next commit
                log.warning("removing the backing files of released files: %s", exc)


    def invalidate_later(self, ino: int) -> None:
        """Ask for the kernel's cached pages of *ino* to be dropped by flush_invalidations()."""
        self._to_invalidate.add(ino)

    async def flush_invalidations(self) -> None:
        """Drop the cached pages of every inode asked for, so that mappings fault in again.

        In a worker thread: the kernel writes dirty pages back first, and those
        WRITE requests must be served by this very loop while it waits.
        """
        async with self._invalidating:
            while self._to_invalidate:
                ino = self._to_invalidate.pop()
                try:
                    await trio.to_thread.run_sync(pyfuse3.invalidate_inode, ino, False)
                except OSError as exc:  # the kernel may not know the inode (never looked up)
                    log.debug("invalidate inode %d: %s", ino, exc)

    def set_trace(self, on: bool) -> None:
        """Log every request (op, arguments, result, time) at debug level, or stop."""
        self.trace = on
        log.setLevel(logging.DEBUG if on else logging.NOTSET)

    def _commit_quietly(self) -> None:
        """Commit what a failed request changed anyway; the journal logs its own failures."""
        try:
            if self.journal is not None:
                self.journal.commit()
        except OSError:
            return
        self._committed()

    def _give_back(self, op: str, result: Any) -> None:
        """Undo the references a handler handed out in *result*, which is not sent.

        The kernel takes nothing from an error reply, so it will never send the
        FORGET or RELEASE that would drop them, and an unlinked file would keep its
        dpages until restart.
        """
        entry = result[1] if isinstance(result, tuple) else result
        if op in ENTRY_OPS and isinstance(entry, pyfuse3.EntryAttributes):
            self.inodes.forget(entry.st_ino, 1)
        info = result[0] if isinstance(result, tuple) else result
        if isinstance(info, pyfuse3.FileInfo):
            handle = self._handles.pop(info.fh)
            self._backing_close(handle.ino)
            self.inodes.close(handle.ino)

    def _account(self, op: str, started: float, result: str) -> None:
        if self.metrics is not None:
            self.metrics.observe(op, time.perf_counter() - started, result)

    def init_connection(self, conn: pyfuse3.ConnectionInfo) -> None:
        """Choose the connection's capabilities while INIT is answered; must not raise."""
        try:
            self.connection = negotiate(conn, isinstance(self.store, PassthroughStore))
        except Exception:  # INIT goes out as libfuse proposed it, and the kernel kills privs
            log.exception("negotiating the FUSE connection failed")
            with contextlib.suppress(Exception):
                conn.want &= ~pyfuse3.FUSE_CAP_HANDLE_KILLPRIV_V2

    def init(self) -> None:
        """Called once the kernel has connected; must not raise."""
        got = self.connection
        if got is not None:
            log.info("filesystem ready: libfuse %s, kernel FUSE protocol %s; enabled: %s",
                     got.libfuse, got.protocol, ", ".join(got.names(got.want)) or "none")
        else:
            log.info("filesystem ready")
        self.initialized.set()

    @property
    def kills_privileges(self) -> bool:
        """Whether this daemon clears suid/sgid itself (killpriv v2 negotiated)."""
        return self.connection is not None and self.connection.kills_privileges

    @staticmethod
    def _kill_privileges(entry: Inode, pid: int, caller: Caller | None = None) -> bool:
        """Clear set-user-ID and set-group-ID as the kernel does for process *pid* (*caller*
        if it was read already, else read only if needed), once it has been decided that
        the caller must lose them (see setattr and open).  Set-group-ID goes too on a file
        that is not group-executable when the caller is neither in its group nor holds
        CAP_FSETID (setattr_should_drop_sgid).  Returns whether the mode changed."""
        stranger = False
        if entry.mode & stat.S_ISGID and not entry.mode & stat.S_IXGRP:
            caller = caller or Caller.of(pid)
            stranger = not caller.in_group(entry.gid) and not caller.cap_fsetid
        return entry.kill_suidgid(also_sgid=stranger)

    # -- attributes ------------------------------------------------------------

    def _attrs(self, inode: Inode) -> pyfuse3.EntryAttributes:
        dps = self.store.dpage_size
        # Passthrough: the kernel writes files without us; the backing file knows their
        # size and mtime (an old size in a GETATTR reply would cut the file).
        self.store.sync(inode)
        attr = pyfuse3.EntryAttributes()
        attr.st_ino = inode.ino
        attr.generation = 0
        attr.entry_timeout = CACHE_TIMEOUT
        attr.attr_timeout = CACHE_TIMEOUT
        attr.st_mode = inode.mode
        attr.st_nlink = inode.nlink
        attr.st_uid = inode.uid
        attr.st_gid = inode.gid
        attr.st_rdev = inode.rdev
        attr.st_size = inode.size
        # The dpage for files; directory reads need no 2 MiB buffers.
        attr.st_blksize = dps if inode.data is not None else 4096
        attr.st_blocks = inode.data.mapped * (dps // 512) if inode.data is not None else 0
        attr.st_atime_ns = inode.atime_ns
        attr.st_mtime_ns = inode.mtime_ns
        attr.st_ctime_ns = inode.ctime_ns
        return attr

    @_boundary
    async def lookup(self, parent_inode: int, name: bytes,
                     ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        return self._attrs(self.inodes.lookup(parent_inode, name))

    async def forget(self, inode_list: Sequence[tuple[int, int]]) -> None:
        if self.trace:
            log.debug("forget(%s)", inode_list)
        for ino, count in inode_list:
            try:
                self.inodes.forget(ino, count)
            except Exception:
                log.exception("forget(%d, %d) failed", ino, count)
        self._commit_quietly()

    @_boundary
    async def getattr(self, inode: int, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        return self._attrs(self.inodes.get(inode))

    @_boundary
    async def setattr(self, inode: int, attr: pyfuse3.EntryAttributes,
                      fields: pyfuse3.SetattrFields, fh: int | None,
                      ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        entry = self.inodes.get(inode)
        if fields.update_size:
            node = self._node_of(fh, ctx)
            await self._with_room(lambda: self.data.truncate(inode, attr.st_size, node))
        # Under killpriv v2 the kernel leaves clearing suid/sgid to us, and says when:
        # FATTR_KILL_SUIDGID on a truncate or chown, and an otherwise empty SETATTR from
        # file_remove_privs() before a write (or fallocate) by a caller without
        # CAP_FSETID; the writer is the caller here.  libfuse drops the flag the WRITE
        # itself carries, and the write-back of a mapping, which keeps the bits, sends none.
        if fields.kill_suidgid or (self.kills_privileges and entry.data is not None
                                   and not _changes_anything(fields)):
            self._kill_privileges(entry, ctx.pid)
        now = time.time_ns()
        self.inodes.set_attributes(
            inode,
            mode=attr.st_mode if fields.update_mode else None,
            uid=attr.st_uid if fields.update_uid else None,
            gid=attr.st_gid if fields.update_gid else None,
            atime_ns=attr.st_atime_ns if fields.update_atime else None,
            mtime_ns=attr.st_mtime_ns if fields.update_mtime else (
                now if fields.update_size else None),
        )
        return self._attrs(entry)

    async def _with_room(self, allocate: Callable[[], None]) -> None:
        """Run *allocate* (a truncate or fallocate); on ENOSPC, which changed nothing, run it
        once more if a removal's dpages came back meanwhile: `rm a; truncate -s N b` must
        work."""
        try:
            allocate()
        except NoSpaceError:
            if not await self._forgets_landed():
                raise
            allocate()

    async def _forgets_landed(self) -> bool:
        """Give FORGETs in flight a short, bounded time to land; whether dpages came back.

        The kernel sends FORGET for a just-removed file a moment after unlink()
        returns, so `rm f; df` or `rm f; truncate -s N g` could find its dpages still
        held.  Awaited only before a request changes anything (statfs, or after an
        allocation that changed nothing), so a request's changes stay its own.
        """
        free = self.store.pools.free_dpages
        deadline = trio.current_time() + FORGET_GRACE
        while self.inodes.orphans and trio.current_time() < deadline:
            await trio.sleep(0.001)
        return self.store.pools.free_dpages > free

    def _node_of(self, fh: int | None, ctx: pyfuse3.RequestContext) -> int:
        handle = self._handles.get(fh) if fh is not None else None
        return handle.node if handle else numa.process_node(ctx.pid)

    # -- names -------------------------------------------------------------------

    @_boundary
    async def readlink(self, inode: int, ctx: pyfuse3.RequestContext) -> bytes:
        target = self.inodes.get(inode).target
        if target is None:
            raise OSError(errno.EINVAL, "not a symlink")
        return target

    @_boundary
    async def mknod(self, parent_inode: int, name: bytes, mode: int, rdev: int,
                    ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        return self._attrs(self.inodes.make(parent_inode, name, mode, ctx.uid, ctx.gid,
                                            rdev=rdev))

    @_boundary
    async def mkdir(self, parent_inode: int, name: bytes, mode: int,
                    ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        mode = stat.S_IFDIR | stat.S_IMODE(mode)
        return self._attrs(self.inodes.make(parent_inode, name, mode, ctx.uid, ctx.gid))

    @_boundary
    async def symlink(self, parent_inode: int, name: bytes, target: bytes,
                      ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        mode = stat.S_IFLNK | 0o777
        return self._attrs(self.inodes.make(parent_inode, name, mode, ctx.uid, ctx.gid,
                                            target=target))

    @_boundary
    async def link(self, inode: int, new_parent_inode: int, new_name: bytes,
                   ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        return self._attrs(self.inodes.link(inode, new_parent_inode, new_name))

    @_boundary
    async def unlink(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        self.inodes.unlink(parent_inode, name)

    @_boundary
    async def rmdir(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        self.inodes.rmdir(parent_inode, name)

    @_boundary
    async def rename(self, parent_inode_old: int, name_old: bytes, parent_inode_new: int,
                     name_new: bytes, flags: int, ctx: pyfuse3.RequestContext) -> None:
        self.inodes.rename(parent_inode_old, name_old, parent_inode_new, name_new, flags)

    # -- files -------------------------------------------------------------------

    def _open_handle(self, inode: Inode, ctx: pyfuse3.RequestContext) -> pyfuse3.FileInfo:
        node = numa.process_node(ctx.pid)
        backing_id = self._backing_open(inode, node) if isinstance(
            self.store, PassthroughStore) else 0
        self.inodes.open(inode.ino)
        fh = self._next_fh
        self._next_fh += 1
        self._handles[fh] = Handle(inode.ino, node)
        if backing_id:
            # The kernel reads, writes and maps the backing file itself (no page cache
            # of ours to keep: it refuses keep_cache with passthrough).
            return pyfuse3.FileInfo(fh=fh, keep_cache=False, direct_io=False,
                                    backing_id=backing_id)
        # keep_cache: the page cache stays valid across opens, since every
        # change reaches us through the kernel.  No direct_io: MAP_SHARED
        # must keep working.
        return pyfuse3.FileInfo(fh=fh, keep_cache=True, direct_io=False)

    def _backing_open(self, inode: Inode, node: int) -> int:
        """The backing id for an open of *inode*, registered at its first open."""
        held = self._backing.get(inode.ino)
        if held is None:
            assert isinstance(self.store, PassthroughStore)
            fd = self.store.open_backing(inode, node)
            try:
                held = [pyfuse3.backing_open(fd), 0]
            finally:
                os.close(fd)
            self._backing[inode.ino] = held
        held[1] += 1
        return held[0]

    def _backing_close(self, ino: int) -> None:
        """A handle of *ino* is gone: at its last one, close the id and take in what the
        last writer left.  Never raises: the caller must still close the inode."""
        held = self._backing.get(ino)
        if held is None:
            return
        held[1] -= 1
        if held[1] > 0:
            return
        del self._backing[ino]
        assert isinstance(self.store, PassthroughStore)
        try:
            # Files the kernel opened with the id keep the backing file; the id goes.
            pyfuse3.backing_close(held[0])
            entry = self.inodes.inodes.get(ino)
            if entry is not None:
                self.store.sync(entry)
        except Exception:  # the reconcile task syncs the file again later
            log.exception("closing the backing file of inode %d", ino)


    def reconcile(self) -> None:
        """Passthrough: take in what the kernel wrote behind the daemon (sizes, times,
        dpages) and set each pool's reserve to what is left.  Called by a side task."""
        if isinstance(self.store, PassthroughStore):
            self.store.reconcile(self.inodes.inodes, set(self._backing))
            self._commit_quietly()

    def _inode_of(self, fh: int) -> Inode:
        handle = self._handles.get(fh)
        if handle is None:
            raise OSError(errno.EBADF, f"file handle {fh}")
        return self.inodes.get(handle.ino)

    @_boundary
    async def open(self, inode: int, flags: int, ctx: pyfuse3.RequestContext) -> pyfuse3.FileInfo:
        entry = self.inodes.get(inode)
        if entry.data is None:
            raise OSError(errno.EISDIR if entry.dir is not None else errno.ENXIO, "open")
        if flags & os.O_TRUNC:  # times change even if the file is already empty
            self.data.truncate(inode, 0, numa.process_node(ctx.pid))
            self._kill_privileges_on_open(entry, ctx.pid)
        return self._open_handle(entry, ctx)

    def _kill_privileges_on_open(self, entry: Inode, pid: int) -> None:
        """An O_TRUNC open: libfuse drops the kernel's FUSE_OPEN_KILL_SUIDGID, so ask as the
        kernel does whether the opener (blocked in open) holds CAP_FSETID."""
        if not (self.kills_privileges and entry.mode & (stat.S_ISUID | stat.S_ISGID)):
            return
        caller = Caller.of(pid)
        if not caller.cap_fsetid and self._kill_privileges(entry, pid, caller):
            # The open reply carries no attributes: without this, `stat -c %a` would show
            # the old mode.  Attributes only: no page lock is taken, so this is safe inside
            # a request.
            try:
                pyfuse3.invalidate_inode(entry.ino, attr_only=True)
            except OSError as exc:  # the kernel may not know the inode
                log.debug("invalidate attributes of inode %d: %s", entry.ino, exc)

    @_boundary
    async def create(self, parent_inode: int, name: bytes, mode: int, flags: int,
                     ctx: pyfuse3.RequestContext) -> tuple[pyfuse3.FileInfo,
                                                           pyfuse3.EntryAttributes]:
        mode = stat.S_IFREG | stat.S_IMODE(mode)
        entry = self.inodes.make(parent_inode, name, mode, ctx.uid, ctx.gid)
        try:
            info = self._open_handle(entry, ctx)
        except BaseException:  # no backing file for it: as if it had never been created
            self.inodes.unlink(parent_inode, name)
            self.inodes.forget(entry.ino, 1)
            raise
        return info, self._attrs(entry)

    @_boundary
    async def read(  # type: ignore[override]  # any buffer will do: a view avoids a copy
            self, fh: int, off: int, size: int) -> memoryview | bytes:
        entry = self._inode_of(fh)
        assert entry.data is not None
        data = self.store.read(entry.data, entry.size, off, size)
        if self.metrics is not None:
            self.metrics.read(len(data))
        return data

    @_boundary
    async def write(self, fh: int, off: int, buf: bytes) -> int:
        entry = self._inode_of(fh)
        written = self.data.write(entry.ino, off, buf, self._handles[fh].node)
        if self.metrics is not None:
            self.metrics.wrote(written)
        return written

    @_boundary
    async def fallocate(self, fh: int, mode: int, offset: int, length: int) -> None:
        entry, node = self._inode_of(fh), self._handles[fh].node
        await self._with_room(lambda: self.data.fallocate(entry.ino, mode, offset, length, node))

    @_boundary
    async def lseek(self, fh: int, offset: int, whence: int) -> int:
        entry = self._inode_of(fh)
        assert entry.data is not None
        self.store.sync(entry)
        return self.store.seek(entry.data, entry.size, offset, whence)

    # No flush handler: pyfuse3 answers ENOSYS and the kernel stops sending FLUSH
    # on every close(); there is nothing to flush, the region is the store of record.

    @_boundary
    async def fsync(self, fh: int, datasync: bool) -> None:
        """Nothing to sync: a write is in the region when it returns."""

    @_boundary
    async def release(self, fh: int) -> None:
        handle = self._handles.pop(fh, None)
        if handle is None:
            raise OSError(errno.EBADF, f"release of unknown handle {fh}")
        self._backing_close(handle.ino)
        self.inodes.close(handle.ino)

    # -- directories ---------------------------------------------------------------

    @_boundary
    async def opendir(self, inode: int, ctx: pyfuse3.RequestContext) -> int:
        self.inodes.directory(inode)
        return inode

    @_boundary
    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        directory, entries = self.inodes.directory(fh)
        if start_id < 1 and not pyfuse3.readdir_reply(token, b".", self._attrs(directory), 1):
            return
        if start_id < 2:
            parent = self.inodes.get(directory.parent)
            if not pyfuse3.readdir_reply(token, b"..", self._attrs(parent), 2):
                return
        for cookie, name, ino in entries.after(max(start_id, 2)):
            child = self.inodes.inodes[ino]
            if not pyfuse3.readdir_reply(token, name, self._attrs(child), cookie):
                return
            child.lookup_count += 1

    @_boundary
    async def releasedir(self, fh: int) -> None:
        """Directory handles hold no state."""

    @_boundary
    async def fsyncdir(self, fh: int, datasync: bool) -> None:
        """Nothing to sync."""

    @_boundary
    async def statfs(self, ctx: pyfuse3.RequestContext) -> pyfuse3.StatvfsData:
        await self._forgets_landed()
        self.reconcile()
        pools = self.store.pools
        out = pyfuse3.StatvfsData()
        out.f_bsize = out.f_frsize = self.store.dpage_size
        out.f_blocks = pools.total_dpages
        out.f_bfree = out.f_bavail = pools.free_dpages
        out.f_files = self.inodes.nr_inodes
        out.f_ffree = out.f_favail = self.inodes.nr_inodes - self.inodes.used
        out.f_namemax = 255
        return out

    # -- extended attributes -------------------------------------------------------

    @_boundary
    async def setxattr(self, inode: int, name: bytes, value: bytes,
                       ctx: pyfuse3.RequestContext) -> None:
        self.inodes.setxattr(inode, name, value)

    @_boundary
    async def getxattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> bytes:
        return self.inodes.getxattr(inode, name)

    @_boundary
    async def listxattr(self, inode: int, ctx: pyfuse3.RequestContext) -> list[bytes]:
        return self.inodes.listxattr(inode)

    @_boundary
    async def removexattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        self.inodes.removexattr(inode, name)
