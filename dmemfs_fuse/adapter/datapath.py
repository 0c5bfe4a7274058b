"""Which data path a mount takes, and why.

The passthrough path (each file its own shmem file, passed through by the
kernel) is the default where it can work; the region path (files are extents
of one region, served by the daemon) is taken where it cannot, and the reason
is kept for the start-up log, ``dmemctl status`` and the metrics.  The host's
plan (host/plan.py, ``choose_data_path``) decides, before any memory is
reserved.
"""

from __future__ import annotations

from dataclasses import dataclass

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
