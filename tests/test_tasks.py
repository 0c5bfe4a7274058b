"""tasks.supervise, the side tasks' boundary, and tasks.IdleWaiter, without a mount."""

from __future__ import annotations

import itertools
import logging
import socket

import pytest
import trio
import trio.testing

from dmemfs_fuse import tasks
from dmemfs_fuse.tasks import FIRST_PAUSE, HEALTHY_RUN, MAX_PAUSE, IdleWaiter, supervise


def run(fn: object) -> None:
    """Run the async *fn* on a clock that jumps over sleeps."""
    trio.run(fn, clock=trio.testing.MockClock(autojump_threshold=0))  # type: ignore[arg-type]


def failures(caplog: pytest.LogCaptureFixture, name: str) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.getMessage().startswith(f"side task {name} failed")]


def test_a_failing_task_is_logged_and_restarted_with_growing_pauses(
        caplog: pytest.LogCaptureFixture) -> None:
    starts: list[float] = []

    async def flaky() -> None:
        starts.append(trio.current_time())
        if len(starts) <= 8:
            raise ValueError(f"failure {len(starts)}")

    async def main() -> None:
        await supervise("flaky", flaky)

    run(main)
    assert len(starts) == 9
    pauses = [b - a for a, b in itertools.pairwise(starts)]
    expected = [min(FIRST_PAUSE * 2**i, MAX_PAUSE) for i in range(8)]
    assert pauses == pytest.approx(expected)
    logged = failures(caplog, "flaky")
    assert len(logged) == 8
    assert all(r.exc_info and isinstance(r.exc_info[1], ValueError) for r in logged)
    assert logged[0].getMessage() == f"side task flaky failed; restarting it in {FIRST_PAUSE:g} s"


def test_a_healthy_run_starts_the_pauses_over(caplog: pytest.LogCaptureFixture) -> None:
    starts: list[float] = []

    async def task() -> None:
        starts.append(trio.current_time())
        if len(starts) == 4:
            await trio.sleep(HEALTHY_RUN)  # a long healthy run before this failure
        if len(starts) < 6:
            raise RuntimeError("again")

    run(lambda: supervise("t", task))
    pauses = [b - a for a, b in itertools.pairwise(starts)]
    assert pauses[:3] == pytest.approx([FIRST_PAUSE, 2 * FIRST_PAUSE, 4 * FIRST_PAUSE])
    assert pauses[3] == pytest.approx(HEALTHY_RUN + FIRST_PAUSE)  # not 8 * FIRST_PAUSE
    assert pauses[4] == pytest.approx(2 * FIRST_PAUSE)


def test_without_restart_a_failure_is_logged_and_the_task_ends(
        caplog: pytest.LogCaptureFixture) -> None:
    calls = 0

    async def once() -> None:
        nonlocal calls
        calls += 1
        raise OSError(5, "boom")

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(lambda: supervise("conn", once, restart=False))
            nursery.start_soon(lambda: supervise("conn", once, restart=False))

    run(main)
    assert calls == 2
    assert [r.getMessage() for r in failures(caplog, "conn")] == ["side task conn failed"] * 2


def test_a_failure_before_started_is_the_callers() -> None:
    async def cannot_bind(task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        raise OSError(98, "Address already in use")

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            with pytest.raises(OSError, match="already in use"):
                await nursery.start(supervise, "listener", cannot_bind)

    run(main)


def test_a_failure_after_started_restarts_and_started_is_passed_on_once(
        caplog: pytest.LogCaptureFixture) -> None:
    runs = 0

    async def listener(task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        nonlocal runs
        runs += 1
        task_status.started()
        if runs < 3:
            raise ConnectionError("a later failure")
        await trio.sleep_forever()

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            assert await nursery.start(supervise, "listener", listener) is None
            await trio.sleep(10)
            assert runs == 3
            nursery.cancel_scope.cancel()

    run(main)
    assert len(failures(caplog, "listener")) == 2


def test_cancellation_passes_through_unlogged(caplog: pytest.LogCaptureFixture) -> None:
    async def forever() -> None:
        await trio.sleep_forever()

    async def main() -> None:
        with trio.move_on_after(1) as scope:
            await supervise("forever", forever)
        assert scope.cancelled_caught

    run(main)
    assert not caplog.records


def test_base_exceptions_are_not_caught() -> None:
    async def leaves() -> None:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run(lambda: supervise("leaves", leaves))


def test_the_test_hook_fails_a_named_task_once(monkeypatch: pytest.MonkeyPatch,
                                               caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setenv(tasks.FAIL_TASKS_ENV, "zeroer, other")
    monkeypatch.setattr(tasks, "_injected", set())
    calls: list[str] = []

    async def task(name: str) -> None:
        calls.append(name)

    async def main() -> None:
        for name in ("zeroer", "zeroer", "untouched"):
            await supervise(name, task, name)

    run(main)
    assert calls == ["zeroer", "zeroer", "untouched"]  # the first run never started
    logged = failures(caplog, "zeroer")
    assert len(logged) == 1 and logged[0].exc_info
    assert isinstance(logged[0].exc_info[1], tasks.InjectedFailureError)
    assert not failures(caplog, "untouched")


def test_a_restart_that_fails_before_started_is_retried_not_raised(
        caplog: pytest.LogCaptureFixture) -> None:
    """Run 1 starts and fails; run 2 fails before started() (the caller returned long ago,
    so that is the task's failure, not a start-up one); run 3 runs."""
    runs = 0

    async def listener(task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        nonlocal runs
        runs += 1
        if runs == 2:
            raise OSError(98, "Address already in use")
        task_status.started()
        if runs == 1:
            raise ConnectionError("after start-up")
        await trio.sleep_forever()

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            await nursery.start(supervise, "listener", listener)
            await trio.sleep(10)
            assert runs == 3
            nursery.cancel_scope.cancel()

    run(main)
    logged = failures(caplog, "listener")
    assert [type(r.exc_info[1]) for r in logged if r.exc_info] == [ConnectionError, OSError]


# -- IdleWaiter ---------------------------------------------------------------------------

def test_the_idle_waiter_waits_for_busy_tasks_and_not_for_blocked_ones() -> None:
    order: list[str] = []

    async def busy(steps: int) -> None:
        for _ in range(steps):
            await trio.sleep(0)
        order.append("busy done")

    async def blocked(gate: trio.Event) -> None:
        await gate.wait()
        order.append("blocked woke")

    async def main() -> None:
        gate = trio.Event()
        with IdleWaiter() as idle:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(busy, 200)
                nursery.start_soon(blocked, gate)
                nursery.start_soon(trio.sleep, 3600)  # a far deadline is not work
                await idle.wait()
                order.append("idle")
                gate.set()
                await idle.wait()  # again: the pipe was drained
                order.append("idle again")
                nursery.cancel_scope.cancel()

    trio.run(main)
    assert order == ["busy done", "idle", "blocked woke", "idle again"]


def test_a_wait_for_io_that_woke_another_task_is_not_idle() -> None:
    """A request that arrives in the very wait the waiter's signal ends runs first."""
    order: list[str] = []

    async def main() -> None:
        ours, peer = socket.socketpair()
        ours.setblocking(False)

        async def reader() -> None:
            while True:
                await trio.lowlevel.wait_readable(ours)
                ours.recv(1)
                order.append("request")

        with ours, peer, IdleWaiter() as idle:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(reader)
                for _ in range(20):  # a waiter that took such a wait would win half of them
                    await trio.testing.wait_all_tasks_blocked()
                    peer.send(b"x")  # readable at the next wait for I/O: the idle one
                    await idle.wait()
                    order.append("idle")
                nursery.cancel_scope.cancel()

    trio.run(main)
    assert order == ["request", "idle"] * 20


def test_a_cancelled_idle_wait_leaves_the_next_one_working() -> None:
    async def main() -> None:
        with IdleWaiter() as idle:
            with trio.CancelScope() as scope:
                scope.cancel()
                await idle.wait()  # a checkpoint: cancelled at once
            assert scope.cancelled_caught
            with trio.move_on_after(0):  # cancelled after it was signalled, maybe
                await idle.wait()
            with trio.fail_after(5):
                await idle.wait()

    trio.run(main)
