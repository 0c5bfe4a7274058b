"""Where a mount's metadata lives, who may use it, what a start finds there, and the journal
opened on it.

Everything here runs before the region is reserved, so a damaged or foreign
metadata file stops the daemon with one line before it takes any memory.
"""

from __future__ import annotations

import fcntl
import logging
import os
import stat
import time
from collections.abc import Callable
from dataclasses import dataclass

from ..alloc.policy import Policy
from ..errors import ConfigError
from ..files.inodes import InodeTable
from ..files.passthrough import PassthroughStore
from ..files.store import FileStore
from ..memory.region import RegionPlan, on_hugetlbfs
from ..rundir import RUN_DIR
from ..sizes import human
from .journal import Journal
from .records import Layout, MetadataError, region_identity
from .recovery import Recovered, RecoveryReport, install, load

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class MetaPlan:
    """A persistent mount's metadata file.

    Fields:
        path: the metadata file.
        start_empty: set the old file aside instead of recovering from it.
        checkpoint_bytes: appended bytes that trigger a checkpoint.
    """

    path: str
    start_empty: bool
    checkpoint_bytes: int


def default_meta_path(region: str) -> str:
    """``REGION.meta``; for a region on hugetlbfs, which takes no write(2), a file under
    RUN_DIR/meta named after the region (it lives as long as the hugetlbfs file: until
    reboot)."""
    if not on_hugetlbfs(region):
        return region + ".meta"
    directory = RUN_DIR / "meta"
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    name = region.strip("/").replace("-", "--").replace("/", "-")
    return str(directory / f"{name}.meta")


def refusal(why: BaseException) -> MetadataError:
    """The one line a start that cannot trust what it found stops with: what is wrong,
    that nothing was changed, and the way out."""
    return MetadataError(f"{why}. Nothing was changed. To start with an empty filesystem "
                         "instead, mount with -o start_empty (the old metadata is kept "
                         "beside it)")


class MetaLock:
    """An exclusive lock on ``PATH.lock`` for the daemon's life: one daemon per metadata file."""

    def __init__(self, meta: MetaPlan) -> None:
        self.meta = meta
        self.path = meta.path + ".lock"
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(self.fd, 32, 0).decode(errors="replace").strip() or "?"
            os.close(self.fd)
            raise ConfigError(f"meta={meta.path}: in use by another dmemfs (pid {holder})"
                              ) from None
        self.note_pid()

    def note_pid(self) -> None:
        """Write this process's pid into the lock file (again after detaching: a new pid)."""
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, f"{os.getpid()}\n".encode(), 0)

    def release(self) -> None:
        """Drop the lock (the file stays; it is harmless)."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def layout_for(plan: RegionPlan, region_path: str) -> Layout:
    """The layout a metadata file must describe for *plan* on the region at *region_path*."""
    return Layout(plan.dpage_size, tuple((p.node, p.size // plan.dpage_size) for p in plan.pools),
                  region_identity(region_path))


def find(meta: MetaPlan, plan: RegionPlan,
         parse_policy: Callable[[str], Policy]) -> Recovered | None:
    """What the metadata file holds, replayed (verified against the pools later), or None.

    None when there is no file or start_empty set it aside.  MetadataError
    when it cannot be trusted, naming start_empty as the way out.
    """
    if not os.path.exists(meta.path):
        if (plan.backend != "shmem" and plan.path and os.path.exists(plan.path)
                and os.stat(plan.path).st_size):
            log.info("no metadata at %s: starting empty on %s (its old bytes are zeroed "
                     "before reuse)", meta.path, plan.path)
        return None
    if meta.start_empty:
        aside = f"{meta.path}.discarded-{time.strftime('%Y%m%dT%H%M%S')}"
        os.rename(meta.path, aside)
        log.warning("start_empty: starting with an empty filesystem; the old metadata is "
                    "kept as %s", aside)
        return None
    assert plan.path is not None
    try:
        if not os.path.exists(plan.path):
            raise MetadataError(f"metadata {meta.path} describes files in {plan.path}, which "
                                "no longer exists: their bytes are gone")
        st = os.stat(plan.path)
        if stat.S_ISREG(st.st_mode) and st.st_size < plan.size:
            raise MetadataError(
                f"metadata {meta.path} describes a region of "
                f"{human(plan.size)} but {plan.path} holds only "
                f"{human(st.st_size)}")
        return load(meta.path, layout_for(plan, plan.path), parse_policy)
    except MetadataError as exc:
        raise refusal(exc) from None


def open_journal(meta: MetaPlan, plan: RegionPlan, inodes: InodeTable,
                 store: FileStore | PassthroughStore, found: Recovered | None
                 ) -> tuple[Journal, RecoveryReport | None]:
    """Install what *found* holds (verifying it against the pools) and open the journal on it;
    a start that cannot trust it stops with :func:`refusal`."""
    assert plan.path is not None
    layout = layout_for(plan, plan.path)
    if found is None:
        journal = Journal(meta.path, layout, inodes, store.pools,
                          checkpoint_bytes=meta.checkpoint_bytes)
        report = None
    else:
        try:
            if isinstance(store, PassthroughStore):
                store.discover()
            report = install(found, inodes, store.pools, store, meta.path)
            if isinstance(store, PassthroughStore):
                removed = store.adopt(inodes.inodes)
                if removed:
                    log.info("removed %d backing file(s) that no recovered inode names",
                             removed)
        except (OSError, MetadataError) as exc:
            raise refusal(exc) from None
        log.info("recovered from %s: %d files (%s), %d directories, %d inodes; %d batches "
                 "replayed%s, %d unlinked-but-open files freed, %d bad dpages, in %.2f s",
                 meta.path, report.files, human(report.bytes),
                 report.directories, report.inodes, report.batches,
                 f", a torn last append of {report.torn_bytes} bytes dropped"
                 if report.torn_bytes else "", report.orphans_freed, report.bad_dpages,
                 report.seconds)
        journal = Journal(meta.path, layout, inodes, store.pools,
                          checkpoint_bytes=meta.checkpoint_bytes, uuid=found.uuid,
                          generation=found.generation)
    journal.checkpoint()  # the recovered state becomes one snapshot: replay is done once
    return journal, report
