"""``dmemfs-hugepages``: reserve huge pages per node early at boot, give exactly those back.

The boot-time half of what ``-o reserve_hugepages`` does for one daemon:
``dmemfs-hugepages.service`` runs ``reserve`` before most services start,
while memory is still unfragmented, and ``release`` when it stops.

The config (default ``/etc/dmemfs/hugepages.conf``) has one pool per line::

    # node=N pagesize=2M|1G count=N
    node=0 pagesize=2M count=512
    node=1 pagesize=1G count=4

``reserve`` adds *count* pages to each node's pool on top of what is already
there (``hugepages=`` on the kernel command line, ``vm.nr_hugepages``), all or
nothing: if the kernel gives fewer pages than asked, everything added so far
is given back and the command fails.  What was added is recorded in the state
file (default ``/run/dmemfs/hugepages.state``) as it goes, so ``release``
gives back exactly that, and nothing else, even if the config changed since.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import fcntl
import json
import logging
import os
import re
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from .. import __version__
from ..errors import ConfigError
from ..memory.hugepages import GLOBAL_ROOT, HugePageReservation, node_path
from ..memory.numa import NODE_ROOT

log = logging.getLogger("dmemfs_fuse.host.bootreserve")

DEFAULT_CONFIG = "/etc/dmemfs/hugepages.conf"
DEFAULT_STATE = "/run/dmemfs/hugepages.state"
KEYS = ("node", "pagesize", "count")
_UNITS = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30}
STATE_VERSION = 1


class ReserveError(Exception):
    """A failure on the host (not in the config): exit status 1."""


@dataclass(frozen=True)
class PoolRequest:
    """One config line: add *count* huge pages of *pagesize* bytes on *node*."""

    node: int
    pagesize: int
    count: int
    line: int


@dataclass(frozen=True)
class Added:
    """Huge pages this tool added to one node's pool (a state file entry)."""

    node: int
    pagesize: int
    count: int


def size_name(size: int) -> str:
    """``2097152`` -> ``2M``, the form the config uses."""
    for suffix, unit in (("G", 1 << 30), ("M", 1 << 20), ("K", 1 << 10)):
        if size % unit == 0:
            return f"{size // unit}{suffix}"
    return str(size)


def parse_pagesize(text: str) -> int:
    """``2M``, ``2MB``, ``2MiB``, ``2048kB``, ``1G`` -> bytes; ValueError otherwise."""
    match = re.fullmatch(r"(\d+)([kKmMgG])(?:i?[bB])?", text)
    if not match:
        raise ValueError(text)
    return int(match.group(1)) * _UNITS[match.group(2).lower()]


def parse_config(text: str, source: str) -> list[PoolRequest]:
    """Parse the config *text*; raise ConfigError naming *source* and the line."""
    requests: list[PoolRequest] = []
    seen: dict[tuple[int, int], int] = {}
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        where = f"{source} line {number}"
        values: dict[str, str] = {}
        for word in line.split():
            key, sep, value = word.partition("=")
            if not sep or not key or not value:
                raise ConfigError(f"{where}: '{word}': expected key=value, as in "
                                  "'node=0 pagesize=2M count=512'")
            if key not in KEYS:
                raise ConfigError(f"{where}: unknown key '{key}' (known: {', '.join(KEYS)})")
            if key in values:
                raise ConfigError(f"{where}: {key}= given twice")
            values[key] = value
        missing = [k for k in KEYS if k not in values]
        if missing:
            raise ConfigError(f"{where}: missing {', '.join(k + '=' for k in missing)} "
                              "(each line is 'node=N pagesize=2M|1G count=N')")
        if not values["node"].isdigit():
            raise ConfigError(f"{where}: node={values['node']}: not a node number")
        try:
            pagesize = parse_pagesize(values["pagesize"])
        except ValueError:
            raise ConfigError(f"{where}: pagesize={values['pagesize']}: not a page size; "
                              "use 2M or 1G") from None
        if not values["count"].isdigit() or int(values["count"]) == 0:
            raise ConfigError(f"{where}: count={values['count']}: must be a whole number "
                              "larger than 0")
        request = PoolRequest(int(values["node"]), pagesize, int(values["count"]), number)
        pool = (request.node, request.pagesize)
        if pool in seen:
            raise ConfigError(f"{where}: node {request.node} pagesize "
                              f"{size_name(pagesize)} is already given on line {seen[pool]}")
        seen[pool] = number
        requests.append(request)
    return requests


def read_config(path: str) -> list[PoolRequest]:
    """Read and parse the config file at *path*."""
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise ConfigError(f"{path}: {exc.strerror or exc}") from None
    return parse_config(text, path)


def host_page_sizes() -> list[int]:
    """The huge page sizes this kernel has, in bytes, smallest first."""
    sizes = []
    for entry in GLOBAL_ROOT.glob("hugepages-*kB"):
        sizes.append(int(entry.name.removeprefix("hugepages-").removesuffix("kB")) * 1024)
    return sorted(sizes)


def check_host(requests: list[PoolRequest], source: str) -> None:
    """Raise ConfigError if a line names a node or page size this host does not have."""
    sizes = host_page_sizes()
    nodes = sorted(int(p.name[4:]) for p in NODE_ROOT.glob("node[0-9]*")) if \
        NODE_ROOT.is_dir() else [0]
    for request in requests:
        where = f"{source} line {request.line}"
        if request.pagesize not in sizes:
            have = ", ".join(size_name(s) for s in sizes) or "none"
            raise ConfigError(f"{where}: pagesize={size_name(request.pagesize)}: this kernel "
                              f"has no huge pages of that size (it has: {have})")
        if request.node not in nodes:
            raise ConfigError(f"{where}: node={request.node}: no such NUMA node "
                              f"(this host has: {', '.join(map(str, nodes))})")


def _read_int(path: Path) -> int:
    return int(path.read_text().strip())


def load_state(path: Path) -> list[Added]:
    """What an earlier ``reserve`` added, from the state file; [] if there is none."""
    try:
        data = json.loads(path.read_text())
        return [Added(int(e["node"]), int(e["pagesize"]), int(e["count"]))
                for e in data["added"]]
    except FileNotFoundError:
        return []
    except OSError as exc:
        raise ReserveError(f"{path}: {exc.strerror or exc}") from None
    except (ValueError, KeyError, TypeError):
        raise ReserveError(f"{path}: not a state file written by dmemfs-hugepages") from None


def save_state(path: Path, added: list[Added]) -> None:
    """Record *added* atomically; remove the state file when nothing is left."""
    if not added:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        return
    data = {"version": STATE_VERSION,
            "added": [{"node": a.node, "pagesize": a.pagesize, "count": a.count} for a in added]}
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1) + "\n")
    os.replace(tmp, path)


@contextlib.contextmanager
def locked(state: Path) -> Iterator[None]:
    """Hold an exclusive lock next to the state file, so two runs cannot interleave."""
    # 0700 like the daemon's control socket directory, which may be the same one.
    state.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    with open(state.with_name(state.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def give_back(entries: list[Added]) -> list[Added]:
    """Lower each pool by what was added; return the entries that could not be given back."""
    failed = []
    for entry in entries:
        path = node_path(entry.pagesize, entry.node, "nr_hugepages")
        try:
            now = _read_int(path)
            path.write_text(str(max(0, now - entry.count)))
            log.info("gave back %d huge pages of %s on node %d (pool now %d)", entry.count,
                     size_name(entry.pagesize), entry.node, _read_int(path))
        except OSError as exc:
            log.error("could not give back %d huge pages of %s on node %d: %s", entry.count,
                      size_name(entry.pagesize), entry.node, exc.strerror or exc)
            failed.append(entry)
    return failed


def reserve(requests: list[PoolRequest], state: Path, source: str = "config") -> list[Added]:
    """Add every requested pool, all or nothing; record what was added in *state*."""
    with locked(state):
        earlier = load_state(state)
        if earlier:
            total = sum(a.count for a in earlier)
            raise ReserveError(f"{state} already records {total} huge pages added; "
                               "run 'dmemfs-hugepages release' first")
        added: list[Added] = []
        for request in requests:
            reservation = HugePageReservation(request.pagesize)
            try:
                reservation.reserve(request.node, request.count)
            except OSError as exc:
                got = reservation.added.get(request.node, 0)
                partial = [*added, Added(request.node, request.pagesize, got)] if got else added
                left = give_back(partial)
                save_state(state, left)
                if got < request.count and exc.errno == errno.ENOMEM:
                    reason = (f"node {request.node}: the kernel gave {got} of {request.count} "
                              f"huge pages of {size_name(request.pagesize)} (memory too small "
                              "or too fragmented; hugepages= on the kernel command line "
                              "reserves before anything else runs)")
                else:
                    reason = f"node {request.node}: {exc.strerror or exc}"
                raise ReserveError(f"{source} line {request.line}: {reason}; gave back the "
                                   "pages added so far") from None
            added.append(Added(request.node, request.pagesize, reservation.added[request.node]))
            save_state(state, added)
        return added


def release(state: Path) -> list[Added]:
    """Give back what the state file records; return what was given back."""
    with locked(state):
        entries = load_state(state)
        failed = give_back(entries)
        save_state(state, failed)
        if failed:
            raise ReserveError(f"{len(failed)} pool(s) could not be given back; they stay "
                               f"recorded in {state}")
        return entries


def status(config: str, state: Path) -> str:
    """The config, what the state file records, and the kernel's pools, as text."""
    lines = []
    try:
        requests = read_config(config)
        lines.append(f"config {config}:")
        lines += [f"  node {r.node} pagesize {size_name(r.pagesize)} count {r.count}"
                  for r in requests] or ["  (no pools)"]
    except ConfigError as exc:
        requests = []
        lines.append(f"config: {exc}")
    entries = load_state(state)
    lines.append(f"added (state {state}):")
    lines += [f"  node {a.node} pagesize {size_name(a.pagesize)} count {a.count}"
              for a in entries] or ["  nothing"]
    lines.append("kernel pools:")
    pools = sorted({(r.node, r.pagesize) for r in requests} | {(a.node, a.pagesize)
                                                               for a in entries})
    for node, size in pools:
        try:
            total = _read_int(node_path(size, node, "nr_hugepages"))
            free = _read_int(node_path(size, node, "free_hugepages"))
            lines.append(f"  node {node} pagesize {size_name(size)}: {total} pages, {free} free")
        except OSError as exc:
            lines.append(f"  node {node} pagesize {size_name(size)}: {exc.strerror or exc}")
    if not pools:
        lines.append("  (none configured)")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser for dmemfs-hugepages."""
    parser = argparse.ArgumentParser(
        prog="dmemfs-hugepages",
        description="Reserve huge pages per NUMA node at boot for dmemfs, and give exactly "
                    "those back.",
        epilog="config format, one pool per line (# starts a comment):\n"
               "  node=0 pagesize=2M count=512\n"
               "  node=1 pagesize=1G count=4\n\n"
               "examples:\n"
               "  dmemfs-hugepages reserve\n"
               "  dmemfs-hugepages status\n"
               "  dmemfs-hugepages release",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", metavar="FILE", default=DEFAULT_CONFIG,
                        help=f"the pools to reserve (default {DEFAULT_CONFIG})")
    parser.add_argument("--state", metavar="FILE", default=DEFAULT_STATE,
                        help=f"where what was added is recorded (default {DEFAULT_STATE})")
    parser.add_argument("--version", action="version", version=f"dmemfs-hugepages {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    sub.add_parser("reserve", help="add the configured pages, all or nothing, and record them")
    sub.add_parser("release", help="give back exactly what reserve recorded")
    sub.add_parser("status", help="show the config, what was added, and the kernel's pools")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``dmemfs-hugepages`` command."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="dmemfs-hugepages: %(message)s",
                        stream=sys.stderr)
    state = Path(args.state)
    try:
        if args.command == "reserve":
            requests = read_config(args.config)
            check_host(requests, args.config)
            added = reserve(requests, state, args.config)
            total = sum(a.count for a in added)
            print(f"dmemfs-hugepages: reserved {total} huge pages in {len(added)} pool(s)",
                  file=sys.stderr)
        elif args.command == "release":
            given = release(state)
            print(f"dmemfs-hugepages: gave back {sum(a.count for a in given)} huge pages",
                  file=sys.stderr)
        else:
            print(status(args.config, state))
    except ConfigError as exc:
        print(f"dmemfs-hugepages: error: {exc}", file=sys.stderr)
        return 2
    except ReserveError as exc:
        print(f"dmemfs-hugepages: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"dmemfs-hugepages: {exc.strerror or exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
