"""Side tasks and their boundary: nothing a side task raises ends the daemon.

Beside the FUSE main loop the daemon runs side tasks: the control socket and
each of its connections, the metrics endpoint, the zeroer, systemd status
updates, bdi tuning, the SIGBUS watcher.  A bug or a surprise in one of them
must never unmount the filesystem, because the filesystem's files are the
memory of running guests.  So each side task runs inside :func:`supervise`,
the way each FUSE handler runs inside ``fs._boundary``: what it raises is
logged with its traceback and the task starts over after a pause that grows
while it keeps failing; a connection's task (``restart=False``) just ends.

Only ``Exception`` is caught.  ``trio.Cancelled`` (the daemon is stopping),
``KeyboardInterrupt`` and ``SystemExit`` pass through untouched.

A task started with ``nursery.start`` may still fail before it reports
itself started (a taken port, a socket that cannot be bound): that failure
is the caller's, and propagates, so that start-up fails before mounting.

Test hook: ``DMEMFS_FAIL_TASKS`` names side tasks (comma-separated, ``*``
for all) whose first run raises :class:`InjectedFailureError` at once, so that
tests can watch the boundary catch it and the task come back.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Awaitable, Callable
from typing import Any

import trio

log = logging.getLogger(__name__)

FIRST_PAUSE = 0.5   # seconds before the first restart
MAX_PAUSE = 30.0    # the pause doubles while a task keeps failing, up to this
HEALTHY_RUN = 60.0  # a run this long counts as healthy: the next failure starts over at FIRST_PAUSE

FAIL_TASKS_ENV = "DMEMFS_FAIL_TASKS"
_injected: set[str] = set()  # the task names whose injected failure has fired


class InjectedFailureError(RuntimeError):
    """Raised by the test hook (``DMEMFS_FAIL_TASKS``) in place of a side task's first run."""


class _StartedOnce:
    """A task status that passes the first ``started()`` on and remembers it.

    The test hook fires inside ``started()``, once the caller has been told:
    an injected failure of such a task is a failure after start-up.
    """

    def __init__(self, name: str, inner: trio.TaskStatus[None]) -> None:
        self.name = name
        self.inner = inner
        self.done = False

    def started(self, value: None = None) -> None:
        if not self.done:
            self.done = True
            self.inner.started(value)
            _inject(self.name)


def _inject(name: str) -> None:
    wanted = {n.strip() for n in os.environ.get(FAIL_TASKS_ENV, "").split(",") if n.strip()}
    if (name in wanted or "*" in wanted) and name not in _injected:
        _injected.add(name)
        raise InjectedFailureError(f"{FAIL_TASKS_ENV}: injected failure of {name!r}")


async def supervise(name: str, fn: Callable[..., Awaitable[Any]], *args: Any,
                    restart: bool = True,
                    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
    """Run the side task ``fn(*args)`` inside its own boundary, as *name* in the log.

    A return ends the task.  An ``Exception`` is logged with its traceback;
    then the task runs again after a pause if *restart*, else it ends.  When
    started with ``nursery.start``, *fn* gets a ``task_status`` of its own and
    a failure before it calls ``started()`` propagates to the caller.
    """
    status = (None if task_status is trio.TASK_STATUS_IGNORED
              else _StartedOnce(name, task_status))
    pause = FIRST_PAUSE
    while True:
        began = trio.current_time()
        try:
            if status is None:
                _inject(name)
                await fn(*args)
            else:
                await fn(*args, task_status=status)
            return
        except Exception:
            if status is not None and not status.done:
                raise  # a start-up failure: the caller decides
            if trio.current_time() - began >= HEALTHY_RUN:
                pause = FIRST_PAUSE
            log.exception("side task %s failed%s", name,
                          f"; restarting it in {pause:g} s" if restart else "")
        if not restart:
            return
        await trio.sleep(pause)
        pause = min(pause * 2, MAX_PAUSE)


class IdleWaiter(trio.abc.Instrument):
    """Waits until the trio scheduler has nothing else to run, for a task of idle priority.

    trio.testing's ``wait_all_tasks_blocked`` does this from inside the run loop, but
    importing trio.testing imports pytest where it is installed, and trio._core is
    private.  This uses public parts, as an instrument:

    * the scheduler waits for I/O with a timeout above zero only when no task is
      runnable, and ``before_io_wait`` sees that wait coming: the waiter then makes a
      pipe readable, so that the wait returns at once with the waiting task woken;
    * ``task_scheduled`` sees every other task woken by the same wait (a request that
      arrived meanwhile, a timer): then the moment was not idle, and the task goes on
      waiting for the next one.

    So the waiter returns only after a wait for I/O in which nothing else happened,
    which is trio's own rule.  One waiting task at a time.  The hooks cost a call per
    task wakeup while the waiter is entered: enter it only while there is work waiting.
    """

    def __init__(self) -> None:
        self._read_fd = self._write_fd = -1
        self._waiter: trio.lowlevel.Task | None = None
        self._signalled = False  # a byte is in the pipe
        self._others = False  # another task was woken since the byte was written

    def __enter__(self) -> IdleWaiter:
        self._read_fd, self._write_fd = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        try:
            trio.lowlevel.add_instrument(self)
        except BaseException:
            self._close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            # trio drops an instrument whose hook raised: it may be gone already.
            with contextlib.suppress(KeyError):
                trio.lowlevel.remove_instrument(self)
        finally:
            self._close()

    def before_io_wait(self, timeout: float) -> None:
        """The scheduler is about to wait for I/O: with nothing runnable if *timeout* > 0."""
        if self._waiter is not None and timeout > 0 and not self._signalled:
            self._signalled = True
            self._others = False
            os.write(self._write_fd, b"\0")

    def task_scheduled(self, task: trio.lowlevel.Task) -> None:
        """*task* became runnable: if it is not the waiter, the moment is not idle."""
        if self._signalled and task is not self._waiter:
            self._others = True

    async def wait(self) -> None:
        """Return once a wait for I/O woke no other task (a checkpoint, even when idle)."""
        self._waiter = trio.lowlevel.current_task()
        try:
            while True:
                if self._signalled:  # left over from a wait that was cancelled
                    self._drain()
                await trio.lowlevel.wait_readable(self._read_fd)
                busy = self._others
                self._drain()
                if not busy:
                    return
        finally:
            self._waiter = None

    def _drain(self) -> None:
        with contextlib.suppress(BlockingIOError):  # a wakeup with nothing written
            os.read(self._read_fd, 64)
        self._signalled = False

    def _close(self) -> None:
        for fd in (self._read_fd, self._write_fd):
            if fd >= 0:
                os.close(fd)
        self._read_fd = self._write_fd = -1
