"""Mount options: one table that drives parsing, validation and ``--help``.

Everything here is checked before anything is reserved: a bad option is a
:class:`ConfigError` naming the option and what it accepts.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import NamedTuple

import humanfriendly

from ..errors import ConfigError
from ..memory.hugepages import DPAGE_SIZES
from ..memory.region import PoolSpec
from ..sizes import human

K = 1024


class OptionDoc(NamedTuple):
    """One ``-o`` option as ``--help`` shows it."""

    name: str
    value: str
    default: str
    text: str


OPTIONS: tuple[OptionDoc, ...] = (
    OptionDoc("size", "SIZE | !SIZE", "required (or nodes=)",
              "Memory reserved per NUMA node, like dmem=. SIZE takes K/M/G/T suffixes "
              "(powers of 1024) and must be a multiple of pagesize. !SIZE reserves all "
              "of each node's free memory but SIZE."),
    OptionDoc("nodes", "N:SIZE[,N:SIZE...]", "one pool per node with memory",
              "Explicit pools, one per entry, each bound to node N. A node may repeat: "
              "nodes=0:512M,0:512M makes two pools on node 0."),
    OptionDoc("pagesize", "4K | 2M | 1G", "2M if 2M huge pages are free, else 4K",
              "The dpage: the unit of allocation, reported as the block size by statfs."),
    OptionDoc("region", "auto | hugetlbfs | memfd | PATH", "auto",
              "Where the memory comes from. auto: a hugetlbfs file if enough huge pages of "
              "pagesize are free, else a memfd (MFD_HUGETLB when huge pages are free, plain "
              "otherwise, with a warning). PATH: any mmappable file or device (a file on "
              "hugetlbfs or /dev/shm, a /dev/dax device); a file is created or grown to size "
              "and outlives the daemon."),
    OptionDoc("passthrough", "auto | on | off", "auto",
              "The data path. on: each file is its own shmem file on the pool's memory and "
              "the kernel passes reads, writes and mappings straight to it (no page-cache "
              "copy; mappings outlive the daemon); refused at start, with the reason, where "
              "that cannot work (1G dpages, region=PATH, hugetlbfs options, no CAP_SYS_ADMIN, "
              "a kernel without FUSE passthrough). off: files are extents of one region and "
              "the daemon serves every read and write. auto: on where it can work, else off."),
    OptionDoc("meta", "PATH | none", "REGION.meta for region=PATH on a file, else none",
              "Keep the metadata (names, attributes, xattrs, policies, every file's extents, "
              "bad dpages) in PATH, so that a new dmemfs on the same region, after a crash or a "
              "stop, finds every file again. Needs a region that outlives the daemon "
              "(region=PATH). Use a directory on tmpfs or a local disk."),
    OptionDoc("start_empty", "", "off",
              "Start with an empty filesystem even if meta= holds files. The old metadata "
              "file is kept, renamed to PATH.discarded-TIME, never deleted."),
    OptionDoc("checkpoint", "SIZE", "64M",
              "Rewrite the metadata file as one snapshot once the changes appended since the "
              "last one pass SIZE (or the snapshot's own size, if larger)."),
    OptionDoc("hugetlbfs", "DIR", "a mounted hugetlbfs of pagesize",
              "The hugetlbfs mount that region=hugetlbfs creates its (unlinked) file on."),
    OptionDoc("reserve_hugepages", "", "off",
              "If too few huge pages of pagesize are free, add them to the kernel's pools "
              "(per node, through sysfs) and give back exactly those on exit."),
    OptionDoc("max_alloc_try_dpages", "N", "0 (no cap)",
              "Largest number of dpages one allocation step takes; larger requests are served "
              "in several steps that continue one another where possible."),
    OptionDoc("nr_inodes", "N", "1048576",
              "Most files, directories and links there may be (statfs f_files)."),
    OptionDoc("mode", "OCTAL", "1777", "Permissions of the root directory, as on tmpfs."),
    OptionDoc("uid", "UID", "0", "Owner of the root directory."),
    OptionDoc("gid", "GID", "0", "Group of the root directory."),
    OptionDoc("private", "", "off",
              "Only the user who mounted it may use the mount (FUSE's own default). Without "
              "it a mount made by root is open to every user, like tmpfs, and the kernel "
              "checks modes (default_permissions is always on)."),
    OptionDoc("allow_other", "", "on for root's mounts",
              "Let users other than the one who mounted it use the mount: the default when "
              "root mounts; a user's mount needs it, and user_allow_other in /etc/fuse.conf."),
    OptionDoc("allow_unlocked", "", "off",
              "Keep going (with a warning) if the region cannot be mlock()ed. Without it, a "
              "region that cannot be locked is an error."),
    OptionDoc("metrics", "[HOST:]PORT", "off",
              "Serve Prometheus metrics at http://HOST:PORT/metrics. HOST defaults to "
              "127.0.0.1 (loopback); name another address only on a trusted network."),
    OptionDoc("debug", "", "off", "Log every FUSE request (op, arguments, result, time)."),
)

# Options mount(8), fstab and systemd pass along that mean nothing here.
IGNORED = {"rw", "dev", "nodev", "suid", "nosuid", "exec", "noexec", "auto", "noauto", "user",
           "nouser", "users", "nofail", "_netdev", "defaults", "atime", "noatime", "relatime",
           "strictatime", "nodiratime", "lazytime", "async", "sync"}
FLAGS = {"reserve_hugepages", "private", "allow_other", "allow_unlocked", "debug",
         "start_empty"}
VALUED = {o.name for o in OPTIONS} - FLAGS


class SizeSpec(NamedTuple):
    """``size=`` as written: bytes per node, or (``all_but``) bytes to leave free per node."""

    size: int
    all_but: bool


@dataclass(frozen=True)
class MountOptions:
    """Validated ``-o`` options, before system facts (free memory, huge pages) are applied."""

    size: SizeSpec | None = None
    nodes: tuple[PoolSpec, ...] = ()
    pagesize: int | None = None
    region: str = "auto"
    passthrough: str = "auto"
    hugetlbfs: str | None = None
    meta: str | None = None
    start_empty: bool = False
    checkpoint: int = 64 << 20
    reserve_hugepages: bool = False
    max_alloc_try_dpages: int = 0
    nr_inodes: int = 1 << 20
    mode: int = 0o1777
    uid: int = 0
    gid: int = 0
    private: bool = False
    allow_other: bool = False  # asked for by name (root's mounts have it anyway)
    allow_unlocked: bool = False
    metrics: tuple[str, int] | None = None
    debug: bool = False
    ignored: tuple[str, ...] = field(default=())


def parse_size(text: str, option: str) -> int:
    """Parse a size with an optional K/M/G/T suffix (powers of 1024) into bytes."""
    if not re.fullmatch(r"\s*\d+(\.\d+)?\s*([kmgtKMGT](i?[bB])?|[bB])?\s*", text):
        raise ConfigError(f"{option}={text}: not a size; use a number with K, M, G or T")
    try:
        value = int(humanfriendly.parse_size(text, binary=True))
    except (ValueError, OverflowError):  # over 4300 digits (int), or past a float's range
        raise ConfigError(f"{option}={text[:40]}...: not a size; the number is too long"
                          ) from None
    if value <= 0:
        raise ConfigError(f"{option}={text}: must be larger than 0")
    return value


def _int(text: str, option: str, base: int = 10) -> int:
    try:
        value = int(text, base)
    except ValueError:
        kind = "an octal number" if base == 8 else "a number"
        raise ConfigError(f"{option}={text}: not {kind}") from None
    if value < 0:
        raise ConfigError(f"{option}={text}: must not be negative")
    return value


def split_options(opt_strings: list[str]) -> list[tuple[str, str | None]]:
    """Split ``-o a=1,b,nodes=0:1G,1:1G`` strings into ``(name, value)`` pairs.

    A bare ``N:SIZE`` item continues the ``nodes=`` list before it.
    """
    items: list[tuple[str, str | None]] = []
    for opts in opt_strings:
        for raw in opts.split(","):
            item = raw.strip()
            if not item:
                continue
            if re.fullmatch(r"\d+:\S+", item) and items and items[-1][0] == "nodes":
                items[-1] = ("nodes", f"{items[-1][1]},{item}")
                continue
            name, sep, value = item.partition("=")
            items.append((name, value if sep else None))
    return items


def parse_mount_options(opt_strings: list[str]) -> MountOptions:
    """Validate ``-o`` strings into MountOptions; raise ConfigError on the first bad one."""
    values: dict[str, object] = {}
    ignored: list[str] = []
    for name, value in split_options(opt_strings):
        if not name:
            raise ConfigError(f"={value}: an option needs a name before the '='")
        if name in IGNORED or name.startswith(("x-", "comment=")) or name == "comment":
            ignored.append(name if value is None else f"{name}={value}")
            continue
        if name in ("fsname", "subtype"):
            ignored.append(f"{name}={value}")
            continue
        if name == "ro":
            raise ConfigError("ro: dmemfs cannot be mounted read-only")
        if name in FLAGS:
            if value is not None:
                raise ConfigError(f"{name}={value}: {name} is a flag and takes no value")
            values[name] = True
            continue
        if name not in VALUED:
            known = ", ".join(o.name for o in OPTIONS)
            raise ConfigError(f"{name}: unknown option; known options are {known}")
        if not value:
            raise ConfigError(f"{name}: needs a value ({name}={_doc(name).value})")
        values[name] = _parse_value(name, value)
    opts = MountOptions(ignored=tuple(ignored), **values)  # type: ignore[arg-type]
    if opts.size is None and not opts.nodes:
        raise ConfigError("size: required (size=SIZE per node, size=!SIZE, or nodes=N:SIZE,...)")
    if opts.size is not None and opts.nodes:
        raise ConfigError("size and nodes: give one of them, not both")
    if opts.meta not in (None, "none") and not opts.region.startswith("/"):
        raise ConfigError(f"meta={opts.meta}: region={opts.region} dies with the daemon, so "
                          "there is nothing to find again; use region=PATH")
    if opts.private and opts.allow_other:
        raise ConfigError("private and allow_other: give one of them, not both")
    if opts.start_empty and opts.meta == "none":
        raise ConfigError("start_empty: there is no metadata to start from (meta=none)")
    if opts.pagesize is not None:
        sizes = [s.size for s in opts.nodes] + ([opts.size.size] if opts.size else [])
        for size in sizes:
            if size % opts.pagesize:
                raise ConfigError(
                    f"size {human(size)} is not a multiple "
                    f"of pagesize {human(opts.pagesize)}"
                )
    return opts


def _doc(name: str) -> OptionDoc:
    return next(o for o in OPTIONS if o.name == name)


def _parse_value(name: str, value: str) -> object:
    if name == "size":
        all_but = value.startswith("!")
        return SizeSpec(parse_size(value[1:] if all_but else value, name), all_but)
    if name == "nodes":
        specs = []
        for entry in value.split(","):
            node, sep, size = entry.partition(":")
            if not sep or not node.isdigit():
                raise ConfigError(f"nodes={value}: entries are NODE:SIZE, e.g. nodes=0:2G,1:2G")
            specs.append(PoolSpec(int(node), parse_size(size, "nodes")))
        return tuple(specs)
    if name == "pagesize":
        dpage = DPAGE_SIZES.get(value.upper().removesuffix("B").removesuffix("I"))
        if dpage is None:
            raise ConfigError(f"pagesize={value}: accepted are 4K, 2M and 1G")
        return dpage
    if name == "region":
        if value not in ("auto", "hugetlbfs", "memfd") and not value.startswith("/"):
            raise ConfigError(
                f"region={value}: accepted are auto, hugetlbfs, memfd or an absolute path")
        return value
    if name == "passthrough":
        if value not in ("auto", "on", "off"):
            raise ConfigError(f"passthrough={value}: accepted are auto, on and off")
        return value
    if name == "meta":
        if value != "none" and not value.startswith("/"):
            raise ConfigError(f"meta={value}: must be an absolute path, or none")
        return value
    if name == "checkpoint":
        return parse_size(value, name)
    if name == "hugetlbfs":
        if not value.startswith("/"):
            raise ConfigError(f"hugetlbfs={value}: must be an absolute path")
        return value
    if name == "metrics":
        host, sep, port = value.rpartition(":")
        host = host.strip("[]") if sep else "127.0.0.1"
        if not port.isdigit() or not 0 < int(port) < 65536 or (sep and not host):
            raise ConfigError(f"metrics={value}: use PORT or HOST:PORT, e.g. metrics=9464")
        return (host, int(port))
    if name == "mode":
        mode = _int(value, name, 8)
        if mode > 0o7777:
            raise ConfigError(f"mode={value}: must be at most 7777")
        return mode
    number = _int(value, name)
    if name == "nr_inodes" and number < 2:
        raise ConfigError(f"nr_inodes={value}: must be at least 2 (the root and one file)")
    return number
