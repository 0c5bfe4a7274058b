"""caller.py: what the kernel knows of a process, from /proc/PID/status."""

from __future__ import annotations

import os
import subprocess
import sys
import time

from dmemfs_fuse.adapter.caller import Caller


def test_this_process() -> None:
    me = Caller.of(os.getpid())
    assert me.cap_fsetid == (os.geteuid() == 0)  # root holds every capability here
    assert me.in_group(os.getegid())
    assert all(me.in_group(g) for g in os.getgroups())


def test_an_unprivileged_process_has_no_cap_fsetid() -> None:
    child = subprocess.Popen(["setpriv", "--reuid=1000", "--regid=1000", "--clear-groups",
                              sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        deadline = time.monotonic() + 10
        while Caller.of(child.pid).groups != frozenset({1000}) and time.monotonic() < deadline:
            time.sleep(0.01)  # setpriv may not have changed its ids yet
        seen = Caller.of(child.pid)
        assert seen == Caller(False, frozenset({1000}))
        assert not seen.in_group(0)
    finally:
        child.kill()
        child.wait()


def test_a_gone_process_counts_as_unprivileged_and_in_no_group() -> None:
    child = subprocess.Popen(["true"])
    child.wait()
    assert Caller.of(child.pid) == Caller(False, frozenset())
