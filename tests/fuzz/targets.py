"""Fuzz targets: one for each thing the daemon parses from outside (issue #16).

Each target is a function of one input (bytes) that returns when the input was handled
as the daemon must handle it and raises when it was not: an unexpected exception, or an
answer that breaks the contract the target states.  tools/fuzz runs them under atheris
(coverage-guided, libFuzzer), from the corpus in tests/fuzz/corpus/TARGET; tests/test_fuzz.py
runs every corpus input once and each target for a bounded time.

- ``options``: a mount option string, a memory policy or a size.  Any string gives a
  valid result or a ConfigError (policies: OSError EINVAL) whose message names the option.
- ``control``: one control-socket request line, answered by a real Reporter over a small
  memfd region with files in it.  Any bytes give one JSON reply line, ``ok`` true or an
  error with an errno; never the catch-all "internal error", which means a bug.
"""

# ruff: noqa: PLC0415 - imports are late on purpose: atheris instruments what is imported
# inside instrument_imports(), and the targets import only what they fuzz.
from __future__ import annotations

import errno
import json
from collections.abc import Callable
from dataclasses import dataclass

Check = Callable[[bytes], None]


@dataclass(frozen=True)
class Target:
    """A fuzz target: what it takes, and how to build its check (once per process)."""

    name: str
    doc: str
    build: Callable[[], Check]


def _text(data: bytes) -> str:
    """Bytes as the daemon gets them from argv or a config file (surrogateescape)."""
    return data.decode("utf-8", "surrogateescape")


def build_options() -> Check:
    """The options target: the first byte picks mount options, a policy or a size."""
    from dmemfs_fuse.errors import ConfigError
    from dmemfs_fuse.options import OPTIONS, parse_mount_options, parse_size, split_options
    from dmemfs_fuse.policy import parse_policy

    known_pools = (0, 1, 2, 3)
    option_names = {o.name for o in OPTIONS} | {"ro"}

    def check(data: bytes) -> None:
        if not data:
            return
        kind, text = data[0] % 3, _text(data[1:])
        if kind == 0:
            try:
                parse_mount_options([text])
            except ConfigError as exc:
                given = {name for name, _ in split_options([text])}
                message = str(exc)
                assert any(message.startswith(name + end) for name in given | option_names
                           if name for end in ":= ") or (
                    "" in given and message.startswith("=")  # an item with no name: itself
                ), f"the error names no option: {exc}"
        elif kind == 1:
            try:
                policy = parse_policy(text, known_pools)
            except OSError as exc:
                assert exc.errno == errno.EINVAL, exc
                assert str(exc.strerror).startswith("policy "), exc
            else:
                assert set(policy.pools) <= set(known_pools), policy
        else:
            try:
                value = parse_size(text, "size")
            except ConfigError as exc:
                assert str(exc).startswith("size="), exc
            else:
                assert value > 0, value

    return check


def build_control() -> Check:
    """The control target: a Reporter over a 16-dpage memfd region holding two files."""
    from dmemfs_fuse.control import answer
    from dmemfs_fuse.daemon import build_pools
    from dmemfs_fuse.fs import DmemOperations
    from dmemfs_fuse.inodes import ROOT_INO, InodeTable
    from dmemfs_fuse.options import PoolSpec
    from dmemfs_fuse.poison import block_sigbus
    from dmemfs_fuse.policy import parse_policy
    from dmemfs_fuse.region import Region, RegionPlan
    from dmemfs_fuse.report import Reporter
    from dmemfs_fuse.store import FileStore

    # The control protocol's kernel_error asks for a real SIGBUS: taken, as in the daemon,
    # only through a signalfd (none is read here), never delivered.
    block_sigbus()
    dpage = 4096
    plan = RegionPlan(pools=(PoolSpec(0, 8 * dpage), PoolSpec(0, 8 * dpage)),
                      dpage_size=dpage, backend="memfd")
    region = Region.open(plan)  # lives as long as the fuzzing process
    pools = build_pools(plan, 0)
    store = FileStore(region, pools)
    inodes = InodeTable(64, 0o1777, 0, 0, release_data=store.release,
                        parse_policy=lambda text: parse_policy(text, pools.ids))
    for name, size in ((b"a", 3 * dpage), (b"b", dpage + 1)):
        node = inodes.make(ROOT_INO, name, 0o100644, 0, 0)
        assert node.data is not None
        store.resize(node.data, 0, size)
        node.size = size
    reporter = Reporter(inodes, store, "memfd (fuzz)", DmemOperations(inodes, store))

    def check(data: bytes) -> None:
        reply = answer(reporter, data)
        assert reply.endswith(b"\n") and reply.count(b"\n") == 1, reply
        message = json.loads(reply)
        assert isinstance(message, dict) and isinstance(message.get("ok"), bool), message
        if not message["ok"]:
            assert isinstance(message.get("errno"), int) and message["errno"] > 0, message
            assert not str(message.get("error")).startswith("internal error"), message

    return check


TARGETS = {t.name: t for t in (
    Target("options", "mount options, policies and sizes", build_options),
    Target("control", "control-socket request lines", build_control),
)}
