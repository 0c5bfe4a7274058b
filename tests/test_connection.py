"""connection.py without a mount: what INIT asks for, and the library check."""

from __future__ import annotations

from dataclasses import dataclass

import pyfuse3
import pytest

from dmemfs_fuse.adapter import connection
from dmemfs_fuse.errors import ConfigError

KILLPRIV_V2 = pyfuse3.FUSE_CAP_HANDLE_KILLPRIV_V2
AUTO_INVAL = pyfuse3.FUSE_CAP_AUTO_INVAL_DATA
PASSTHROUGH = pyfuse3.FUSE_CAP_PASSTHROUGH


@dataclass
class FakeConn:
    """What negotiate() touches of a pyfuse3.ConnectionInfo."""

    capable: int
    want: int
    proto_major: int = 7
    proto_minor: int = 45
    max_write: int = 1 << 20


def test_asks_for_killpriv_v2_and_clears_auto_invalidation() -> None:
    conn = FakeConn(capable=KILLPRIV_V2 | AUTO_INVAL | PASSTHROUGH, want=AUTO_INVAL)
    got = connection.negotiate(conn)  # type: ignore[arg-type]
    assert conn.want == KILLPRIV_V2
    assert got.kills_privileges and got.want == KILLPRIV_V2
    assert got.names(got.capable) == ["passthrough", "handle_killpriv_v2", "auto_inval_data"]
    assert got.describe()["enabled"] == ["handle_killpriv_v2"]
    assert got.protocol == "7.45"


def test_asks_only_for_what_the_kernel_offers() -> None:
    """An older kernel without killpriv v2: the kernel keeps clearing suid/sgid itself."""
    conn = FakeConn(capable=AUTO_INVAL, want=AUTO_INVAL)
    got = connection.negotiate(conn)  # type: ignore[arg-type]
    assert conn.want == 0 and not got.kills_privileges


def test_an_old_libfuse_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(pyfuse3, "libfuse_version", lambda: "3.14.0")
    with pytest.raises(ConfigError, match=r"libfuse 3\.14\.0, older than 3\.17\.1; "
                                          r"run tools/setup \(or tools/install\)"):
        connection.check_library()
    monkeypatch.setattr(pyfuse3, "libfuse_version", lambda: "3.17.1")
    connection.check_library()


def test_the_library_in_use_is_3_17() -> None:
    """The pyfuse3 in this environment loads libfuse 3.17 or newer, not Debian 12's 3.14."""
    major, minor = (int(p) for p in connection.library_version().split(".")[:2])
    assert (major, minor) >= (3, 17)
    assert pyfuse3.__version__ == "3.5.0+dmemfs1"
