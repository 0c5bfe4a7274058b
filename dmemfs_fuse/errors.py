"""Exceptions shared by the plain (FUSE-free) layers.

Metadata and storage code raise :class:`OSError` subclasses carrying the errno
that the filesystem boundary (``fs.py``) hands to the kernel.  Anything else
that escapes a handler is a bug and becomes EIO there, logged with a traceback.
"""

from __future__ import annotations

import errno
import os


class ConfigError(ValueError):
    """A mount option or command-line argument is invalid; raised before anything is reserved."""


class NoSpaceError(OSError):
    """The pools cannot satisfy an allocation; nothing was allocated."""

    def __init__(self, message: str) -> None:
        super().__init__(errno.ENOSPC, message)


class AllocatorError(RuntimeError):
    """The allocator was asked to do something impossible, e.g. free dpages it never handed out.

    This is a bug in the caller, never an expected condition, so it is not an
    OSError: the FUSE boundary logs it with a traceback and answers EIO.
    """


def fs_error(code: int, detail: str = "") -> OSError:
    """Return an OSError for *code* whose message names the errno and *detail*."""
    message = os.strerror(code)
    return OSError(code, f"{message}: {detail}" if detail else message)
