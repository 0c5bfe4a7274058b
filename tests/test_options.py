"""Mount option parsing and validation, before anything is reserved."""

from __future__ import annotations

import pytest

from dmemfs_fuse.errors import ConfigError
from dmemfs_fuse.host.daemon import fuse_options
from dmemfs_fuse.host.options import SizeSpec, parse_mount_options, parse_size
from dmemfs_fuse.memory.region import PoolSpec

G = 1 << 30
M = 1 << 20


@pytest.mark.parametrize(("text", "value"), [
    ("1G", G), ("512M", 512 * M), ("4K", 4096), ("1T", 1 << 40), ("2MiB", 2 * M),
    ("4096", 4096),
])
def test_sizes(text: str, value: int) -> None:
    assert parse_size(text, "size") == value


@pytest.mark.parametrize("text", ["", "abc", "1X", "-1G", "0", "1 G G"])
def test_bad_sizes(text: str) -> None:
    with pytest.raises(ConfigError, match="size"):
        parse_size(text, "size")


def test_full_option_set() -> None:
    opts = parse_mount_options(["size=1G,pagesize=2M", "region=memfd,allow_other,nofail",
                                "x-systemd.requires=foo,max_alloc_try_dpages=8,mode=755"])
    assert opts.size == SizeSpec(G, False)
    assert opts.pagesize == 2 * M
    assert opts.region == "memfd" and opts.allow_other
    assert opts.max_alloc_try_dpages == 8 and opts.mode == 0o755
    assert "nofail" in opts.ignored


@pytest.mark.parametrize(("options", "euid", "open_to_all"), [
    ("size=1G", 0, True),                # root's mount: open to every user, like tmpfs
    ("size=1G,private", 0, False),
    ("size=1G,allow_other", 0, True),
    ("size=1G", 1000, False),            # a user's mount stays the user's...
    ("size=1G,allow_other", 1000, True),  # ...unless it asks (fusermount3 checks fuse.conf)
])
def test_who_may_use_the_mount(options: str, euid: int, open_to_all: bool) -> None:
    fuse = fuse_options(parse_mount_options([options]), euid=euid)
    assert ("allow_other" in fuse) == open_to_all
    assert "default_permissions" in fuse


def test_nodes_list_spans_commas() -> None:
    opts = parse_mount_options(["nodes=0:512M,0:256M,pagesize=4K"])
    assert opts.nodes == (PoolSpec(0, 512 * M), PoolSpec(0, 256 * M))
    assert opts.pagesize == 4096


def test_all_but() -> None:
    assert parse_mount_options(["size=!2G"]).size == SizeSpec(2 * G, True)


@pytest.mark.parametrize(("options", "message"), [
    ("pagesize=2M", "size: required"),
    ("size=1G,nodes=0:1G", "not both"),
    ("size=3M,pagesize=2M", "not a multiple of pagesize"),
    ("nodes=0:1G,0:5K,pagesize=4K", "not a multiple"),
    ("size=1G,pagesize=3M", "pagesize=3M: accepted are 4K, 2M and 1G"),
    ("size=1G,region=tmp", "region=tmp"),
    ("size=1G,bogus=1", "bogus: unknown option"),
    ("size=1G,allow_other=yes", "takes no value"),
    ("size=1G,private,allow_other", "private and allow_other: give one of them, not both"),
    ("size=1G,nr_inodes=1", "nr_inodes=1"),
    ("size=1G,mode=99", "mode=99: not an octal number"),
    ("size=1G,max_alloc_try_dpages=-3", "must not be negative"),
    ("nodes=x:1G", "entries are NODE:SIZE"),
    ("size=1G,ro", "read-only"),
    ("size=", "size: needs a value"),
    ("size=1G,meta=rel/path", "meta=rel/path: must be an absolute path"),
    ("size=1G,meta=/tmp/m", "region=auto dies with the daemon"),
    ("size=1G,region=memfd,meta=/tmp/m", "region=memfd dies with the daemon"),
    ("size=1G,region=/dev/shm/r,meta=none,start_empty", "start_empty: there is no metadata"),
    ("size=1G,start_empty=yes", "takes no value"),
    ("size=1G,checkpoint=lots", "checkpoint=lots: not a size"),
    ("size=1G,checkpoint=0", "checkpoint=0: must be larger than 0"),
    ("size=1G,=64M", "=64M: an option needs a name"),  # a fuzzing find: the error named nothing
])
def test_bad_options_name_the_option(options: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_mount_options([options])
