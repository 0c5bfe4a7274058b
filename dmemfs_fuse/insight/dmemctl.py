"""``dmemctl``: ask a running dmemfs daemon about its pools and files, and set policies."""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
from pathlib import Path
from typing import Any

from humanfriendly import InvalidSize, parse_size

from .. import __version__
from ..sizes import human
from .control import socket_path
from .picture import render


class CtlError(Exception):
    """A failure to report to the user in one line (exit status 1)."""


def dmemfs_mounts() -> list[str]:
    """Mountpoints of every dmemfs, from /proc/mounts."""
    out = []
    with open("/proc/mounts") as mounts:
        for line in mounts:
            fields = line.split()
            if len(fields) > 2 and fields[2] == "fuse.dmemfs":
                out.append(fields[1].encode().decode("unicode_escape"))
    return out


def mount_of(path: str | None, mount: str | None) -> str:
    """The dmemfs mount to talk to: -m, else the one holding *path*, else the only one."""
    mounts = dmemfs_mounts()
    if mount:
        real = os.path.realpath(mount)
        if real not in mounts:
            raise CtlError(f"{mount}: no dmemfs is mounted there")
        return real
    if path is not None:
        real = os.path.realpath(path)
        holders = [m for m in mounts if real == m or real.startswith(m.rstrip("/") + "/")]
        if not holders:
            raise CtlError(f"{path}: not on a dmemfs mount")
        return max(holders, key=len)
    if not mounts:
        raise CtlError("no dmemfs is mounted")
    if len(mounts) > 1:
        raise CtlError(f"several dmemfs mounts ({', '.join(mounts)}): name one with -m")
    return mounts[0]


def exchange(path: Path, payload: dict[str, Any]) -> bytes:
    """Send *payload* as one JSON line to the control socket at *path*; the raw reply.

    OSError as the socket gives it (no daemon, no permission, timeout).
    """
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(30)
        sock.connect(str(path))
        sock.sendall(json.dumps(payload).encode() + b"\n")
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    return data


def request(mount: str, payload: dict[str, Any]) -> dict[str, Any]:
    """Send one request to the daemon of *mount*; return its result or raise CtlError."""
    path = socket_path(mount)
    try:
        data = exchange(path, payload)
    except (FileNotFoundError, ConnectionRefusedError):
        raise CtlError(f"no dmemfs daemon answers for {mount} (no control socket at {path})"
                       ) from None
    except PermissionError:
        raise CtlError(f"{path}: permission denied (dmemctl needs root)") from None
    except OSError as exc:
        raise CtlError(f"talking to the daemon of {mount}: {exc.strerror or exc}") from None
    try:
        reply = json.loads(data)
    except ValueError:
        raise CtlError(f"the daemon of {mount} sent a garbled reply") from None
    if not reply.get("ok"):
        raise CtlError(str(reply.get("error", "unknown error")))
    result: dict[str, Any] = reply["result"]
    return result


def _inode(path: str) -> int:
    try:
        return os.stat(path).st_ino
    except OSError as exc:
        raise CtlError(f"{path}: {exc.strerror}") from None


def show_status(mount: str, st: dict[str, Any]) -> str:
    """Human form of ``status``."""
    dps = st["dpage_size"]
    path = st.get("data_path") or {"name": "region", "reason": ""}
    lines = [f"dmemfs on {mount}: {st['region']}, dpage {human(dps)}",
             f"data path: {path['name']} ({path['reason']})",
             f"{'pool':>4} {'node':>4} {'total':>10} {'free':>10} {'used':>10} "
             f"{'largest free':>12} {'runs':>5} {'frag':>5}"]
    for p in st["pools"]:
        lines.append(f"{p['pool']:>4} {p['node']:>4} {human(p['total_dpages'] * dps):>10} "
                     f"{human(p['free_dpages'] * dps):>10} {human(p['used_dpages'] * dps):>10} "
                     f"{human(p['largest_free_run'] * dps):>12} {p['free_runs']:>5} "
                     f"{p['fragmentation']:>5.2f}")
    lines.append(f"total_dpages {st['total_dpages']}  free_dpages {st['free_dpages']}  "
                 f"({human(st['free_bytes'])} free of {human(st['total_bytes'])}); "
                 f"inodes {st['inodes_used']}/{st['inodes_total']}; "
                 f"ENOSPC {st['enospc']}; trace {'on' if st['trace'] else 'off'}")
    lines.append(f"bad dpages {st['bad_dpages']} ({human(st['bad_dpages'] * dps)}); "
                 f"memory errors {st['memory_errors']}")
    fuse = st.get("fuse")
    if fuse:
        lines.append(f"FUSE: libfuse {fuse['libfuse']}, kernel protocol {fuse['protocol']}; "
                     f"enabled: {', '.join(fuse['enabled']) or 'none'}")
    for memory in st.get("pool_memory") or ():
        lines.append(f"node {memory['node']} pool memory: {human(memory['reserve_bytes'])} "
                     f"in reserve, {human(memory['file_bytes'])} in files (the kernel's count)"
                     + (f"; {human(memory['short_bytes'])} short" if memory["short_bytes"]
                        else ""))
    if st.get("zeroing") is not None:
        lines.append(f"dirty dpages {st['dirty_dpages']} ({human(st['dirty_dpages'] * dps)} "
                     "of old bytes not zeroed yet)")
    journal = st.get("journal")
    if journal:
        lines.append(f"metadata {journal['path']}: generation {journal['generation']}, "
                     f"{journal['batches']} batches ({human(journal['log_bytes'])}) since the "
                     f"last checkpoint" + ("" if journal["healthy"] else "; FAILING"))
    else:
        lines.append("metadata: not persistent (files are gone when the daemon stops)")
    return "\n".join(lines)


def show_extents(path: str, ex: dict[str, Any]) -> str:
    """Human form of ``extents``."""
    lines = [f"{path}: size {human(ex['size'])}, allocated {human(ex['allocated'])}, "
             f"policy {ex['policy']}, {len(ex['extents'])} extent(s)",
             f"{'file offset':>14} {'pool':>4} {'node':>4} {'region offset':>14} {'length':>10}"]
    for e in ex["extents"]:
        lines.append(f"{e['file_offset']:>14} {e['pool']:>4} {e['node']:>4} "
                     f"{e['region_offset']:>14} {human(e['length']):>10}")
    return "\n".join(lines)


def show_files(files: dict[str, Any]) -> str:
    """Human form of ``files``."""
    lines = [f"{'allocated':>10} {'size':>10} {'extents':>7} {'policy':<14} path"]
    for f in files["files"]:
        lines.append(f"{human(f['allocated']):>10} {human(f['size']):>10} {f['extents']:>7} "
                     f"{f['policy']:<14} {f['path']}")
    return "\n".join(lines)


def poison_command(mount: str, file: str, offset: int, kernel: bool) -> str:
    """Carry out ``dmemctl poison``; return the line to print."""
    if kernel:
        request(mount, {"cmd": "kernel_error", "offset": offset})
        return (f"sent a memory-error notice for region offset {offset}; "
                "see `dmemctl status` for the bad dpage count")
    payload: dict[str, Any] = {"cmd": "poison", "offset": offset}
    if file:
        payload["ino"] = _inode(file)
    got = request(mount, payload)
    where = f"{file}:{offset}" if file else f"region offset {offset}"
    if not got["newly"]:
        return f"{where}: dpage {got['dpage']} was already bad"
    owner = (f"inode {got['owner']} answers EIO at file offset {got['file_offset']}"
             if got["owner"] is not None else "it was free and is now out of service")
    return f"{where}: dpage {got['dpage']} marked bad; {owner}"


def build_parser() -> argparse.ArgumentParser:
    """The argument parser for dmemctl."""
    parser = argparse.ArgumentParser(
        prog="dmemctl", description="Inspect and steer a running dmemfs.",
        epilog="examples:\n  dmemctl status\n  dmemctl extents /mnt/dmem/vm0\n"
               "  dmemctl policy /mnt/dmem/tenant-a bind:0\n  dmemctl map --png pools.png",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    _global_options(parser, after_command=False)
    parser.add_argument("--version", action="version", version=f"dmemctl {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def sub(name: str, **kwargs: Any) -> argparse.ArgumentParser:
        # The global options work after the command too: `dmemctl status --json`.
        command = commands.add_parser(name, **kwargs)
        _global_options(command, after_command=True)
        return command

    sub("status", help="pools: total, free, used, largest free run, fragmentation")
    ext = sub("extents", help="a file's extents: file offset, pool, region offset")
    ext.add_argument("file", metavar="FILE")
    pol = sub("policy", help="show or set the memory policy of a file or directory")
    pol.add_argument("file", metavar="FILE")
    pol.add_argument("policy", metavar="POLICY", nargs="?",
                     help="local | bind:N[,M] | preferred:N | interleave:N-M")
    files = sub("files", help="the largest consumers of dpages")
    files.add_argument("-n", "--limit", type=positive, default=20, help="how many (default 20)")
    trace = sub("trace", help="log every FUSE request in the daemon's log, or stop")
    trace.add_argument("state", choices=["on", "off"])
    picture = sub("map", help="draw the pools as coloured strips of dpages")
    picture.add_argument("--png", required=True, metavar="OUT", help="PNG file to write")
    poison = sub(
        "poison", help="mark the dpage at a region offset or FILE:OFFSET bad (soft-offline)",
        description="Mark a dpage bad: it is never handed out again, and the file that owns "
                    "it answers EIO for that range until it is truncated away or overwritten "
                    "whole. OFFSET is bytes: decimal, 0x hex, or with a K/M/G suffix.")
    poison.add_argument("target", metavar="OFFSET|FILE:OFFSET", type=poison_target)
    poison.add_argument("--kernel", action="store_true",
                        help="deliver it as the kernel would, as a SIGBUS BUS_MCEERR_AO "
                             "notice to the daemon (tests the kernel path; region offsets only)")
    sub("scan", help="look for HWPOISON frames under the region; mark their dpages")
    return parser


def _global_options(parser: argparse.ArgumentParser, *, after_command: bool) -> None:
    """-m and --json.  After the command their defaults are suppressed, so that a value
    given before the command is not overwritten by the command's own default."""
    parser.add_argument("-m", "--mount", help="the dmemfs mountpoint (default: the only one, "
                        "or the one holding FILE)",
                        default=argparse.SUPPRESS if after_command else None)
    parser.add_argument("--json", action="store_true", help="print JSON for scripts",
                        default=argparse.SUPPRESS if after_command else False)


def positive(text: str) -> int:
    """A whole number of at least 1."""
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number of at least 1")
    return int(text)


def parse_offset(text: str) -> int:
    """A byte offset: decimal, 0x hex, or a size with a K/M/G/T suffix (powers of 1024)."""
    try:
        value = int(text, 0)
    except ValueError:
        try:
            value = int(parse_size(text, binary=True)) if text[:1].isdigit() else -1
        except InvalidSize:
            value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a byte offset (e.g. 4096, 0x1000, 6M)")
    return value


def poison_target(text: str) -> tuple[str | None, int]:
    """``OFFSET`` or ``FILE:OFFSET`` as (file or None, offset)."""
    file, sep, offset = text.rpartition(":")
    if sep and file:
        return file, parse_offset(offset)
    return None, parse_offset(text)


def run(args: argparse.Namespace) -> str:
    """Carry out *args*; return what to print."""
    file: str = getattr(args, "file", None) or ""
    if args.command == "poison":
        file = args.target[0] or ""
        if file and args.kernel:
            raise CtlError("poison --kernel takes a region offset, not FILE:OFFSET")
    mount = mount_of(file or None, args.mount)
    result: dict[str, Any]
    if args.command == "status":
        result = request(mount, {"cmd": "status"})
        text = show_status(mount, result)
    elif args.command == "extents":
        result = request(mount, {"cmd": "extents", "ino": _inode(file)})
        text = show_extents(file, result)
    elif args.command == "policy":
        result = request(mount, {"cmd": "policy", "ino": _inode(file), "policy": args.policy})
        text = f"{file}: {result['policy']}" + ("" if result["explicit"] else " (default)")
    elif args.command == "files":
        result = request(mount, {"cmd": "files", "limit": args.limit})
        text = show_files(result)
    elif args.command == "poison":
        text = poison_command(mount, file, args.target[1], args.kernel)
        result = {"text": text}
    elif args.command == "scan":
        result = request(mount, {"cmd": "scan"})
        text = (f"{result['frames_checked']} frames checked, "
                f"{sum(1 for b in result['bad'] if b['newly'])} new bad dpage(s)")
    elif args.command == "trace":
        result = request(mount, {"cmd": "trace", "on": args.state == "on"})
        text = f"trace {args.state}"
    else:
        result = request(mount, {"cmd": "map"})
        width, height = render(result, args.png)
        result = {"png": args.png, "width": width, "height": height}
        text = f"wrote {args.png} ({width}x{height})"
    return json.dumps(result, indent=2) if args.json else text


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``dmemctl`` command."""
    args = build_parser().parse_args(argv)
    try:
        print(run(args))
        sys.stdout.flush()
    except CtlError as exc:
        print(f"dmemctl: {exc}", file=sys.stderr)
        return 1
    except BrokenPipeError:  # `dmemctl files | head`: the reader has all it wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return 0


if __name__ == "__main__":
    sys.exit(main())
