"""What the kernel would know of a calling process, read from /proc.

With FUSE_HANDLE_KILLPRIV_V2 the kernel leaves clearing set-user-ID and
set-group-ID bits to the daemon.  It flags truncates and chowns that must
clear them (SetattrFields.kill_suidgid), but libfuse drops the flag that
writes and O_TRUNC opens carry.  For those the daemon asks the question the
kernel asks (setattr_should_drop_suidgid: does the caller hold CAP_FSETID?)
itself, of the process that opened the file.
"""

from __future__ import annotations

from pathlib import Path

CAP_FSETID = 4


def has_cap_fsetid(pid: int) -> bool:
    """Whether process *pid* holds CAP_FSETID in its effective set.

    A process that is gone or unreadable counts as unprivileged: the bits
    are then cleared, which is the safe side.
    """
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("CapEff:"):
                return bool(int(line.split()[1], 16) >> CAP_FSETID & 1)
    except (OSError, ValueError, IndexError):
        pass
    return False
