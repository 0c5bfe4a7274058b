"""What the kernel knows of a calling process, read from /proc/PID/status.

With FUSE_HANDLE_KILLPRIV_V2 the kernel leaves clearing set-user-ID and
set-group-ID bits to the daemon (fs.py says when).  Where the kernel's own
verdict does not reach the daemon (libfuse drops FUSE_OPEN_KILL_SUIDGID), or
does not say which bits, the daemon asks what the kernel asks
(setattr_should_drop_suidgid, setattr_should_drop_sgid): does the caller
hold CAP_FSETID, and is it in the file's group?  The caller is blocked in
its system call while the request is served, so its pid is its own.
"""

from __future__ import annotations

from pathlib import Path

CAP_FSETID = 4


def _status(pid: int) -> dict[str, str]:
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return {}
    return dict(line.split(":\t", 1) for line in text.splitlines() if ":\t" in line)


def has_cap_fsetid(pid: int) -> bool:
    """Whether process *pid* holds CAP_FSETID in its effective set.

    A process that is gone or unreadable counts as unprivileged: the bits
    are then cleared, which is the safe side.
    """
    try:
        return bool(int(_status(pid).get("CapEff", "0"), 16) >> CAP_FSETID & 1)
    except ValueError:
        return False


def in_group(pid: int, gid: int) -> bool:
    """Whether process *pid* has *gid* as its filesystem group or a supplementary one
    (in_group_p); False if it is gone."""
    status = _status(pid)
    try:
        fsgid = int(status.get("Gid", "").split()[3])
        groups = {int(g) for g in status.get("Groups", "").split()}
    except (IndexError, ValueError):
        return False
    return gid == fsgid or gid in groups
