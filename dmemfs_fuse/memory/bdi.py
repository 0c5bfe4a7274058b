"""The mount's backing device info (bdi): readahead and dirty-page limits, through sysfs.

Every FUSE mount gets a bdi named after its device number, the
``major:minor`` of ``st_dev`` (``0:NN``), at ``/sys/class/bdi/0:NN/``.  Two of
its knobs decide what a first touch of a dmemfs file costs:

- ``read_ahead_kb``: how much a buffered read(2) asks for at once.  The kernel
  negotiates 128 KiB with the daemon at FUSE INIT (``max_readahead``), and a
  cold sequential read then arrives as 256 KiB READs; at 1024 they are 1 MiB
  READs, the most one FUSE request carries (``max_pages`` 256).  Page faults on
  a mapping (QEMU's prealloc) already read 1 MiB at a time whatever this says.
- ``strict_limit``: FUSE mounts start with it on and with ``max_ratio`` 1, so a
  process that dirties a shared mapping of a FUSE file is throttled as soon
  as about 1% of the dirty threshold (40 MB on a 24 GiB host) waits for
  write-back.
  QEMU ``share=on,prealloc=on`` dirties every page of guest RAM and spends
  half its prealloc time throttled.  With it off, the mount's dirty pages are
  bounded by the global ``vm.dirty_*`` limits, like a local filesystem's; the
  daemon is trusted and writes back at memory speed.

INIT clamps ``read_ahead_kb`` down to what was negotiated, so change it only
after the kernel has processed the daemon's INIT reply.  Nothing here sends a
request to the mount: the device number comes from /proc/self/mountinfo, so
these calls are safe from inside the daemon before it serves requests.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

log = logging.getLogger(__name__)

SYSFS_BDI = Path("/sys/class/bdi")
MOUNTINFO = Path("/proc/self/mountinfo")


def _unescape(field: str) -> str:
    """Undo mountinfo's octal escapes (``\\040`` for a space, and so on)."""
    out = []
    i = 0
    while i < len(field):
        if field[i] == "\\" and i + 3 < len(field) and field[i + 1 : i + 4].isdigit():
            out.append(chr(int(field[i + 1 : i + 4], 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)


def device_of(mountpoint: str) -> str:
    """The ``major:minor`` of the filesystem mounted on *mountpoint* (the topmost one).

    Raises FileNotFoundError if nothing is mounted there.
    """
    # Resolve symlinks in the parent only: a stat of the mountpoint itself would be
    # a FUSE request, which the daemon cannot answer while it is in this call.
    absolute = os.path.abspath(mountpoint)
    target = os.path.join(os.path.realpath(os.path.dirname(absolute)),
                          os.path.basename(absolute)) if absolute != "/" else "/"
    found = None
    for line in MOUNTINFO.read_text().splitlines():
        fields = line.split()
        if len(fields) > 4 and _unescape(fields[4]) == target:
            found = fields[2]  # later lines are mounted on top of earlier ones
    if found is None:
        raise FileNotFoundError(f"nothing is mounted on {mountpoint}")
    return found


def bdi_dir(mountpoint: str) -> Path:
    """``/sys/class/bdi/MAJOR:MINOR`` of the mount on *mountpoint*."""
    path = SYSFS_BDI / device_of(mountpoint)
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: no bdi for the mount on {mountpoint}")
    return path


def _set(mountpoint: str, knob: str, value: int) -> None:
    path = bdi_dir(mountpoint) / knob
    old = path.read_text().strip()
    try:
        path.write_text(f"{value}\n")
    except OSError as exc:
        raise OSError(exc.errno, f"setting {path} to {value}: {exc.strerror}") from None
    new = path.read_text().strip()
    if new != str(value):
        raise OSError(f"{path}: wrote {value}, the kernel kept {new}")
    log.info("%s: %s %s -> %s", mountpoint, knob, old, new)


def read_ahead(mountpoint: str) -> int:
    """The mount's readahead in KiB."""
    return int((bdi_dir(mountpoint) / "read_ahead_kb").read_text())


def set_read_ahead(mountpoint: str, kib: int) -> None:
    """Set the mount's readahead to *kib* KiB (1024 gives 1 MiB READs for cold reads).

    Call it after FUSE INIT has been answered, or INIT clamps it back to the
    negotiated 128 KiB.  Raises OSError if sysfs refuses.
    """
    if kib < 0:
        raise ValueError(f"read_ahead_kb must be >= 0, not {kib}")
    _set(mountpoint, "read_ahead_kb", kib)


def set_strict_limit(mountpoint: str, strict: bool) -> None:
    """Turn the mount's strict per-bdi dirty limit on or off (FUSE mounts start with it on).

    Off lets a shared mapping (QEMU ``share=on``) dirty pages up to the global
    ``vm.dirty_*`` limits without being throttled at 1% of them.  Raises
    OSError if sysfs refuses or the kernel has no such knob (before 6.2).
    """
    _set(mountpoint, "strict_limit", int(strict))


def tune_for_guest_memory(mountpoint: str, read_ahead_kib: int = 1024,
                          strict_limit: bool = False) -> bool:
    """Apply the settings measured for guest RAM on dmemfs (docs/qemu.md); never raises.

    Returns True if every setting took, False (after a warning) otherwise.
    """
    ok = True
    try:
        set_read_ahead(mountpoint, read_ahead_kib)
    except (OSError, ValueError) as exc:
        log.warning("%s: cannot set read_ahead_kb: %s", mountpoint, exc)
        ok = False
    try:
        set_strict_limit(mountpoint, strict_limit)
    except OSError as exc:
        log.warning("%s: cannot set strict_limit: %s", mountpoint, exc)
        ok = False
    return ok
