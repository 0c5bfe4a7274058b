"""RUN_DIR: where the daemon keeps what lives as long as the boot (control sockets, the
passthrough path's pool memory, its metadata).  A foundation every layer may use."""

from __future__ import annotations

import os
from pathlib import Path

RUN_DIR = Path(os.environ.get("DMEMFS_RUN_DIR", "/run/dmemfs"))
