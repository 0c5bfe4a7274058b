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

from dataclasses import dataclass
from pathlib import Path

CAP_FSETID = 4
CAP_SYS_ADMIN = 21


def _status(pid: int | str) -> dict[str, str]:
    """The fields of /proc/PID/status; OSError if the process is gone."""
    return dict(line.split(":\t", 1) for line in
                Path(f"/proc/{pid}/status").read_text().splitlines() if ":\t" in line)


def has_capability(cap: int, pid: int | str = "self") -> bool:
    """Whether process *pid* (this one by default) holds capability *cap* now."""
    try:
        return bool(int(_status(pid)["CapEff"], 16) >> cap & 1)
    except (OSError, KeyError, ValueError):
        return False


@dataclass(frozen=True)
class Caller:
    """A process's CAP_FSETID and groups, as one read of /proc/PID/status found them.

    A process that is gone or unreadable has no capability and no group: its
    bits are then cleared, which is the safe side.
    """

    cap_fsetid: bool
    groups: frozenset[int]  # the filesystem gid and the supplementary groups

    @classmethod
    def of(cls, pid: int) -> Caller:
        """Read the caller *pid* from /proc."""
        try:
            fields = _status(pid)
            cap = bool(int(fields["CapEff"], 16) >> CAP_FSETID & 1)
            groups = {int(fields["Gid"].split()[3]), *map(int, fields["Groups"].split())}
        except (OSError, KeyError, IndexError, ValueError):
            return cls(False, frozenset())
        return cls(cap, frozenset(groups))

    def in_group(self, gid: int) -> bool:
        """in_group_p: *gid* is the caller's filesystem group or a supplementary one."""
        return gid in self.groups
