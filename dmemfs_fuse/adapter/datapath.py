"""Which data path a mount takes, decided before any memory is reserved.

The passthrough path (each file its own shmem file, passed through by the
kernel) is the default where it can work; the region path (files are extents
of one region, served by the daemon) is taken where it cannot, and the reason
is kept for the start-up log, ``dmemctl status`` and the metrics.  The kernel's
offer is only known from an INIT, so a throwaway FUSE mount asks for it
(connection.probe) once every cheaper reason has been ruled out.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

import pyfuse3

from ..errors import ConfigError
from ..host.options import DPAGE_SIZES, MountOptions
from ..memory.shmem import shmem_huge_possible
from .caller import CAP_SYS_ADMIN, has_capability
from .connection import Negotiated

PASSTHROUGH, REGION = "passthrough", "region"


@dataclass(frozen=True)
class DataPath:
    """The chosen path and why (``name`` is ``passthrough`` or ``region``)."""

    name: str
    reason: str

    @property
    def passthrough(self) -> bool:
        """Whether files are passed through to shmem backing files."""
        return self.name == PASSTHROUGH


def _blocker(opts: MountOptions) -> str | None:
    """Why the options or this process rule passthrough out, or None."""
    if opts.pagesize == DPAGE_SIZES["1G"]:
        return ("1G dpages come only from hugetlbfs, and the kernel refuses to pass through "
                "to hugetlbfs (ELOOP)")
    if opts.region != "auto":
        return f"region={opts.region} names the region's memory"
    if opts.hugetlbfs or opts.reserve_hugepages:
        return ("hugetlbfs and reserve_hugepages ask for hugetlbfs pages, which cannot be "
                "passed through")
    if opts.pagesize == DPAGE_SIZES["2M"] and not shmem_huge_possible():
        return "2M dpages need shmem transparent huge pages, which this host denies"
    if not has_capability(CAP_SYS_ADMIN):  # FUSE_DEV_IOC_BACKING_OPEN needs it
        return "registering backing files needs CAP_SYS_ADMIN"
    if not os.path.exists("/dev/fuse"):
        return "there is no /dev/fuse to probe the kernel with"
    return None


def choose(opts: MountOptions, probe: Callable[[], Negotiated]) -> DataPath:
    """The data path for *opts*: ConfigError for ``passthrough=on`` where it cannot work."""
    if opts.passthrough == "off":
        return DataPath(REGION, "passthrough=off")
    why = _blocker(opts)
    if why is None:
        try:
            found = probe()
        except (OSError, RuntimeError) as exc:
            why = f"probing the kernel's FUSE features failed: {exc}"
        else:
            if not found.capable & pyfuse3.FUSE_CAP_PASSTHROUGH:
                why = (f"the kernel (FUSE protocol {found.protocol}) or libfuse {found.libfuse} "
                       "does not offer passthrough (Linux 6.9 and libfuse 3.17 do)")
    if why is None:
        return DataPath(PASSTHROUGH, f"passthrough={opts.passthrough}: the kernel passes files "
                        "through to shmem")
    if opts.passthrough == "on":
        raise ConfigError(f"passthrough=on: {why}")
    return DataPath(REGION, why)
