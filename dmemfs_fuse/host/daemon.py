"""The daemon's life: plan, reserve, mount, serve, and give everything back.

Order matters: every option is checked (plan_region) before anything is
reserved; the region is released and reserved huge pages are given back on
every exit path, SIGTERM during start-up included.

What may end the daemon once it is mounted: the FUSE main loop returning (an
unmount), SIGTERM, SIGINT or SIGHUP.  Nothing else.  Every other task is a
side task (the control socket and each connection, metrics, the zeroer, status
updates, bdi tuning, the SIGBUS watcher, and whatever comes later) and runs
inside tasks.supervise, its own boundary: what it raises is logged with its
traceback and the task starts over (a connection just ends).  A new side task
goes through supervise too, never straight into the nursery.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import logging.handlers
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import NoReturn

import pyfuse3
import trio
from prometheus_client import CollectorRegistry
from tqdm import tqdm

from ..adapter import connection
from ..adapter.datapath import DataPath
from ..adapter.fs import DmemOperations
from ..alloc.policy import Policy, parse_policy
from ..alloc.poolset import PoolSet
from ..files.changes import Changes
from ..files.inodes import InodeTable
from ..files.passthrough import PassthroughStore
from ..files.poison import MemoryErrors
from ..files.store import FileStore
from ..insight import control, metrics
from ..insight.control import Controller
from ..insight.metrics import RequestMetrics
from ..insight.report import Reporter
from ..memory import bdi, hwpoison
from ..memory.region import Region, RegionPlan
from ..memory.shmem import ShmemMemory
from ..metadata import persistence, recovery
from ..metadata.journal import Journal
from ..sizes import human
from ..tasks import supervise
from .notify import Notifier
from .options import MountOptions
from .plan import choose_data_path, plan_meta, plan_region, plan_shmem

log = logging.getLogger(__name__)

STATUS_INTERVAL = 5.0  # seconds between STATUS= refreshes under systemd
# Passthrough: how often what the kernel allocated behind the daemon is entered in the
# ledger and taken out of the reserve (shmem.py, passthrough.py).
RECONCILE_INTERVAL = 0.2


@dataclass(frozen=True)
class DaemonConfig:
    """What the command line asked for."""

    mountpoint: str
    options: MountOptions
    foreground: bool


def fuse_options(opts: MountOptions, euid: int | None = None) -> set[str]:
    """The options handed to libfuse for the mount.

    A mount made by root is open to every user, as tmpfs is, unless it is
    private; the kernel checks modes either way (default_permissions).  A
    user's mount stays the user's unless it asks for allow_other, which
    fusermount3 then allows only with user_allow_other in /etc/fuse.conf.
    """
    out = set(pyfuse3.default_options) | {"fsname=dmemfs", "subtype=dmemfs",
                                          "default_permissions"}
    root = (os.geteuid() if euid is None else euid) == 0
    if opts.allow_other or (root and not opts.private):
        out.add("allow_other")
    return out


def _terminate_on_signal(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)


def run(config: DaemonConfig) -> int:
    """Serve until the filesystem is unmounted or a signal stops it; return the exit code."""
    connection.check_library()
    opts = config.options
    path = choose_data_path(opts, connection.probe)
    plan = (plan_shmem(opts, pool_memory_dir(config.mountpoint)) if path.passthrough
            else plan_region(opts))
    pools = PoolSet.from_plan(plan, opts.max_alloc_try_dpages, explicit=bool(opts.nodes))

    def parse(text: str) -> Policy:
        return parse_policy(text, pools.ids)

    meta = plan_meta(opts, plan)
    lock = persistence.MetaLock(meta) if meta else None
    try:
        # Read and replay the metadata before reserving anything: a file that
        # cannot be trusted stops us here, with the memory untouched.
        found = persistence.find(meta, plan, parse) if meta else None
        return _run(config, plan, pools, lock=lock, found=found, path=path)
    finally:
        if lock is not None:
            lock.release()


def detach_dead_mount(mountpoint: str) -> bool:
    """A dmemfs whose daemon died answers ENOTCONN at *mountpoint*: detach it (lazily: its
    users' mappings stay), so that a new daemon can mount there and adopt its files.
    Returns whether it did."""
    try:
        os.stat(mountpoint)
        return False
    except OSError as exc:
        if exc.errno != errno.ENOTCONN:
            return False
    target = os.path.abspath(mountpoint)
    with open("/proc/self/mounts") as mounts:
        dead = any(f.split()[1] == target and f.split()[2] == "fuse.dmemfs" for f in mounts)
    if not dead:
        return False
    try:
        done = subprocess.run(["fusermount3", "-u", "-z", target], check=False,
                              capture_output=True)
    except OSError:  # no fusermount3: mounting fails next, with its own clear line
        return False
    return done.returncode == 0


def pool_memory_dir(mountpoint: str) -> Path:
    """Where the passthrough path mounts the pools' tmpfs instances (root only)."""
    return control.socket_path(mountpoint).with_suffix(".pools")


def _run(config: DaemonConfig, plan: RegionPlan, pools: PoolSet, *,
         lock: persistence.MetaLock | None, found: recovery.Recovered | None,
         path: DataPath) -> int:
    ready_fd = -1
    if not config.foreground:
        ready_fd = _detach()
    meta = lock.meta if lock is not None else None
    if lock is not None:
        lock.note_pid()
    # Before the threads we start (trio's workers, tqdm's monitor), which inherit the
    # mask: the signalfd must be the only taker of SIGBUS.  numpy's OpenBLAS threads
    # are older; the kernel's notice goes to this (the early-kill) thread anyway.
    if not hwpoison.block_sigbus():
        log.info("the kernel refused early memory-error notices (PR_MCE_KILL_EARLY)")
    # Until trio takes over the signals, a SIGTERM must still unwind through
    # the finally blocks below (to give back huge pages).
    signal.signal(signal.SIGTERM, _terminate_on_signal)
    signal.signal(signal.SIGHUP, _terminate_on_signal)
    notifier = Notifier()
    progress = _Progress(notifier)
    log.info("data path: %s (%s)", path.name, path.reason)
    memory: Region | ShmemMemory
    try:
        if path.passthrough and found is not None:
            try:
                memory = ShmemMemory.adopt(plan, pool_memory_dir(config.mountpoint),
                                           config.options.nr_inodes)
            except OSError as exc:
                raise persistence.refusal(exc) from None
        elif path.passthrough:
            memory = ShmemMemory.open(plan, pool_memory_dir(config.mountpoint),
                                      config.options.nr_inodes, progress)
        else:
            memory = Region.open(plan, progress=progress)
    finally:
        progress.close()
    mount: _Mount | None = None
    journal: Journal | None = None
    served_to_the_end = False
    try:  # from here on, every exit path releases the memory
        opts = config.options
        store: FileStore | PassthroughStore
        if isinstance(memory, ShmemMemory):
            store = PassthroughStore(memory, pools)
        else:
            # A persistent region outlives a kill: its allocations must be zero at once
            # (store.py says why).
            store = FileStore(memory, pools, defer_zeroing=meta is None)
        inodes = InodeTable(opts.nr_inodes, opts.mode, opts.uid, opts.gid,
                            release_data=store.release,
                            parse_policy=lambda text: parse_policy(text, pools.ids),
                            changes=Changes() if meta else None)
        if meta is not None:
            assert plan.path is not None
            journal, recovered = persistence.open_journal(meta, plan, inodes, store, found)
        else:
            recovered = None
        requests = RequestMetrics() if opts.metrics else None
        ops = DmemOperations(inodes, store, trace=opts.debug, metrics=requests, journal=journal)
        region = memory if isinstance(memory, Region) else None
        errors = MemoryErrors(inodes, store) if isinstance(store, FileStore) else None
        reporter = Reporter(inodes, store, memory.describe(), ops, errors=errors,
                            journal=journal, data_path=path, recovered=recovered, region=region)
        controller = Controller(reporter, inodes, ops, errors, region)
        if region is not None:
            _scan_for_poison(controller, region)
        registry = metrics.registry_for(reporter, requests) if requests is not None else None
        mount = _Mount(config, ops, ready_fd, notifier, reporter, controller)
        trio.run(_serve, mount, registry)
        served_to_the_end = True
    finally:
        notifier.stopping()
        if mount is not None and mount.mounted:
            pyfuse3.close(unmount=True)
        if journal is not None:
            # Only a clean stop checkpoints: after an error or a second signal the
            # memory may hold half a request, while the journal holds whole ones.
            journal.close(checkpoint=served_to_the_end)
        # Passthrough: an orderly stop ends the files with the memory, as on tmpfs.  Any
        # other exit after files may exist (adopted, or once mounted) keeps both the pool
        # memory and the metadata, as a kill does, for the next daemon to adopt.
        keep = (isinstance(memory, ShmemMemory) and meta is not None and not served_to_the_end
                and (found is not None or (mount is not None and mount.mounted)))
        if keep:
            assert isinstance(memory, ShmemMemory)
            memory.leave()
            log.warning("the pool memory and the metadata stay for the next daemon, which "
                        "adopts the files (-o start_empty discards them)")
        else:
            memory.close()
            if isinstance(memory, ShmemMemory) and meta is not None:
                for leftover in (meta.path, meta.path + ".lock"):
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(leftover)
            log.info("memory released; exiting")

    return 0


def _scan_for_poison(controller: Controller, region: Region) -> None:
    """Mark dpages on frames the kernel already flagged HWPOISON, before anyone uses them."""
    for dpage in region.poisoned_dpages:
        # The full scan below follows: no rescan per dpage.
        controller.kernel_error(dpage * region.dpage_size, region.dpage_size, rescan=False)
    try:
        found = controller.scan()
    except Exception as exc:  # the scan is a safeguard: never a reason not to start
        log.warning("cannot scan the region for HWPOISON frames: %s", exc)
        return
    log.info("HWPOISON scan: %d frames checked, %d bad dpages found", found["frames_checked"],
             len(found["bad"]))


@dataclass
class _Mount:
    """The FUSE mount and who waits for it."""

    config: DaemonConfig
    ops: DmemOperations
    ready_fd: int
    notifier: Notifier
    reporter: Reporter
    controller: Controller
    mounted: bool = False

    def mount(self) -> None:
        """Mount (pyfuse3.init) and tell a waiting parent that the mount is up."""
        opts = self.config.options
        pyfuse3.init(self.ops, self.config.mountpoint, fuse_options(opts))
        self.mounted = True
        store = self.ops.store
        log.info("mounted %s: %s of %s dpages, %s data path", self.config.mountpoint,
                 human(store.pools.total_dpages * store.dpage_size),
                 human(store.dpage_size), self.reporter.data_path.name)
        if self.ready_fd >= 0:
            _report_ready(self.ready_fd)
        self.notifier.ready(self.status_line())

    def status_line(self) -> str:
        """The one-line state systemctl status shows."""
        st = self.reporter.statistics()
        dps = st.pools.dpage_size
        return (f"{human(st.pools.free_dpages * dps)} free of "
                f"{human(st.pools.total_dpages * dps)} in {len(st.pools.pools)} pool(s), "
                f"{st.inodes_used - 1} file(s) on {self.config.mountpoint}")


async def _serve(mount: _Mount, registry: CollectorRegistry | None) -> None:
    """Start the control socket (and metrics) first, so a taken port fails before mounting.

    Every task but the FUSE main loop is a side task, run by tasks.supervise:
    what it raises is logged and it starts over, because only the main loop
    ending (an unmount), a signal or a start-up failure may end the daemon.
    """
    async with trio.open_nursery() as nursery:
        await nursery.start(supervise, "control socket", control.serve,
                            control.socket_path(mount.config.mountpoint), mount.controller)
        if registry is not None and mount.config.options.metrics:
            host, port = mount.config.options.metrics
            await nursery.start(supervise, "metrics endpoint", metrics.serve, host, port,
                                registry)
        nursery.start_soon(_watch_signals, nursery.cancel_scope)
        store = mount.ops.store
        if mount.controller.region is not None:
            nursery.start_soon(supervise, "memory-error watcher", _watch_memory_errors, mount,
                               mount.controller.region)
        mount.mount()
        if isinstance(store, FileStore):
            # Freed dpages are zeroed while no request is being served, a chunk at a time
            # (zeroing.py).
            nursery.start_soon(supervise, "zeroer", store.zeroer.run)
        else:
            nursery.start_soon(supervise, "ledger", _reconcile, mount)
        nursery.start_soon(supervise, "bdi tuning", _tune_bdi, mount)
        if mount.notifier.active:
            nursery.start_soon(supervise, "status updates", _update_status, mount)
        await pyfuse3.main()
        nursery.cancel_scope.cancel()


async def _reconcile(mount: _Mount) -> None:
    """Passthrough: enter what the kernel allocated behind us in the ledger, and keep each
    pool's reserve at what its files leave (reserve + files = pool)."""
    await mount.ops.initialized.wait()
    while True:
        await trio.sleep(RECONCILE_INTERVAL)
        mount.ops.reconcile()


async def _watch_memory_errors(mount: _Mount, region: Region) -> None:
    """Take the kernel's SIGBUS memory-error notices for the region (hwpoison.py)."""

    async def on_error(offset: int, length: int) -> None:
        try:
            mount.controller.kernel_error(offset, length)
        except Exception:  # a notice must never take the daemon down
            log.exception("handling the memory-error notice at region offset %d", offset)
        await mount.ops.flush_invalidations()

    await hwpoison.watch_sigbus(hwpoison.open_sigbus_fd(), region.addr, region.size, on_error)


async def _tune_bdi(mount: _Mount) -> None:
    """1 MiB readahead and no strict dirty limit, once INIT no longer clamps them (bdi.py)."""
    await mount.ops.initialized.wait()
    bdi.tune_for_guest_memory(mount.config.mountpoint)


async def _update_status(mount: _Mount) -> None:
    """Keep systemd's STATUS= line current (sent only when it changes)."""
    while True:
        await trio.sleep(STATUS_INTERVAL)
        mount.notifier.status(mount.status_line())


async def _watch_signals(scope: trio.CancelScope) -> None:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
        async for signum in signals:
            log.info("got %s; unmounting", signal.Signals(signum).name)
            pyfuse3.terminate()
            return


class _Progress:
    """Population progress: a bar on a terminal, else a log line and a STATUS= line a second."""

    def __init__(self, notifier: Notifier) -> None:
        self.notifier = notifier
        self.last = time.monotonic()
        self.bar: tqdm[NoReturn] | None = None
        if sys.stderr.isatty():
            self.bar = tqdm(desc="populating the region", unit="B", unit_scale=True,
                            unit_divisor=1024, leave=False)

    def __call__(self, done: int, total: int) -> None:
        if self.bar is not None:
            self.bar.total = total
            self.bar.update(done - self.bar.n)
        now = time.monotonic()
        if now - self.last >= 1.0 and done < total:
            self.last = now
            text = (f"populating the region: {human(done)} of "
                    f"{human(total)}")
            self.notifier.status(text)
            self.notifier.extend_timeout(30)  # still making progress: do not time us out
            if self.bar is None:
                log.info("%s", text)

    def close(self) -> None:
        """Remove the bar from the terminal."""
        if self.bar is not None:
            self.bar.close()


def _detach() -> int:
    """Fork; the parent waits until the child says the mount is ready and exits with its status.

    Returns the child's end of the readiness pipe.
    """
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid:
        os.close(write_fd)
        with os.fdopen(read_fd, "rb") as pipe:
            ready = pipe.read() == b"ready"
        if ready:
            os._exit(0)
        _, status = os.waitpid(pid, 0)
        os._exit(os.waitstatus_to_exitcode(status) or 1)
    os.close(read_fd)
    os.setsid()
    return write_fd


def _report_ready(fd: int) -> None:
    """Tell the waiting parent the mount is up, and leave the terminal (logs go to syslog)."""
    os.write(fd, b"ready")
    os.close(fd)
    null = os.open(os.devnull, os.O_RDWR)
    for std in (0, 1, 2):
        os.dup2(null, std)
    os.close(null)
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    if os.path.exists("/dev/log"):
        syslog = logging.handlers.SysLogHandler(address="/dev/log")
        syslog.setFormatter(logging.Formatter("dmemfs[%(process)d]: %(levelname)s %(message)s"))
        root.addHandler(syslog)
    sys.stderr = open(os.devnull, "w")  # noqa: SIM115 - lives as long as the process
