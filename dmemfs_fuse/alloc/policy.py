"""Memory policies: which pools a file's dpages come from.

The forms follow numactl and set_mempolicy(2)::

    local             pools of the node the calling process last ran on, then the nearest
    bind:N[,M...]     only these pools; ENOSPC when they are full
    preferred:N       pool N first, then the nearest other pools (counted as fallbacks)
    interleave:N-M    dpage by dpage across these pools, by file offset

N names a pool.  In the default layout (one pool per node) a pool is named by
its node number, exactly as numactl names nodes; with explicit ``nodes=``
pools it is the pool's position in that list.  A policy is set and read as
the xattr ``user.dmem.policy``; directories pass theirs to what is created in
them.
"""

from __future__ import annotations

import errno
import re
from collections.abc import Collection
from dataclasses import dataclass

POLICY_XATTR = b"user.dmem.policy"
MODES = ("local", "bind", "preferred", "interleave")


@dataclass(frozen=True)
class Policy:
    """A parsed policy: its mode and the pool ids it names (empty for ``local``)."""

    mode: str
    pools: tuple[int, ...] = ()

    def __str__(self) -> str:
        if self.mode == "local":
            return "local"
        return f"{self.mode}:{_compact(self.pools)}"


LOCAL = Policy("local")


def _compact(ids: tuple[int, ...]) -> str:
    """``(0, 1, 2, 5)`` -> ``0-2,5``."""
    parts: list[str] = []
    i = 0
    while i < len(ids):
        j = i
        while j + 1 < len(ids) and ids[j + 1] == ids[j] + 1:
            j += 1
        parts.append(str(ids[i]) if i == j else f"{ids[i]}-{ids[j]}")
        i = j + 1
    return ",".join(parts)


def _invalid(text: str, why: str) -> OSError:
    return OSError(errno.EINVAL, f"policy {text!r}: {why}")


def parse_policy(text: str, known: Collection[int]) -> Policy:
    """Parse *text*; raise OSError(EINVAL) naming the problem, or for pools not in *known*."""
    text = text.strip()
    mode, sep, rest = text.partition(":")
    if mode not in MODES:
        raise _invalid(text, f"mode must be one of {', '.join(MODES)}")
    if mode == "local":
        if sep:
            raise _invalid(text, "local takes no pools")
        return LOCAL
    if not rest:
        raise _invalid(text, f"{mode} needs pools, e.g. {mode}:0")
    ids: list[int] = []
    for part in rest.split(","):
        # At most 9 digits: a pool number is small, and int() refuses over 4300 digits.
        m = re.fullmatch(r"(\d{1,9})(?:-(\d{1,9}))?", part.strip())
        if not m:
            raise _invalid(text, f"{part!r} is not a pool number or range N-M")
        lo, hi = int(m.group(1)), int(m.group(2) or m.group(1))
        if hi < lo:
            raise _invalid(text, f"range {part} runs backwards")
        if hi - lo >= len(known):
            # More numbers than pools, so some are not pools: name the first, without
            # expanding the range (0-999999999 is a short text).
            missing = next(n for n in range(lo, hi + 1) if n not in known)
            have = ", ".join(map(str, sorted(known)))
            raise _invalid(text, f"no pool {missing} (pools: {have})")
        ids.extend(range(lo, hi + 1))
    unknown = sorted(set(ids) - set(known))
    if unknown:
        have = ", ".join(map(str, sorted(known)))
        raise _invalid(text, f"no pool {', '.join(map(str, unknown))} (pools: {have})")
    if mode == "preferred" and len(set(ids)) != 1:
        raise _invalid(text, "preferred takes exactly one pool")
    return Policy(mode, tuple(dict.fromkeys(ids)))
