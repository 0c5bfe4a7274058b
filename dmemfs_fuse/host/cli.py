"""``dmemfs [SOURCE] MOUNTPOINT -o OPTIONS``: the command line, in the mount.fuse3 convention.

mount.fuse3 runs ``dmemfs MOUNTPOINT -o ...`` for ``mount -t fuse dmemfs MNT`` and
``dmemfs SOURCE MOUNTPOINT -o ...`` for ``mount -t fuse.dmemfs SOURCE MNT`` and
``mount -t fuse 'dmemfs#SOURCE' MNT``: with one argument it is the mountpoint.
SOURCE is ignored, as for tmpfs.
"""

from __future__ import annotations

import argparse
import logging
import logging.handlers
import os
import sys
import textwrap

from .. import __version__
from ..adapter.connection import version_text
from ..errors import ConfigError
from .daemon import DaemonConfig, detach_dead_mount, run
from .options import OPTIONS, parse_mount_options

log = logging.getLogger("dmemfs_fuse")


def _options_help() -> str:
    lines = ["mount options (-o, comma-separated):"]
    for opt in OPTIONS:
        head = f"  {opt.name}={opt.value}" if opt.value else f"  {opt.name}"
        lines.append(head)
        body = f"{opt.text} Default: {opt.default}."
        lines.extend(textwrap.wrap(body, 76, initial_indent="      ", subsequent_indent="      "))
    lines += [
        "",
        "Options that mount(8) and fstab pass along (rw, nofail, noauto, x-systemd.*, ...) are",
        "accepted and ignored.",
        "",
        "example:",
        "  mount -t fuse dmemfs /mnt/dmem -o size=1G,pagesize=2M",
        "  truncate -s 512M /mnt/dmem/vm0 && df -h /mnt/dmem",
        "  umount /mnt/dmem",
        "",
        "mount -t fuse runs this command as `dmemfs /mnt/dmem -o ...`; running it so",
        "yourself does the same.",
    ]
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser; its epilog documents every -o option."""
    parser = argparse.ArgumentParser(
        prog="dmemfs",
        description="Reserve host memory and serve it as files on a FUSE filesystem "
                    "(the dmemfs model on a stock kernel).",
        epilog=_options_help(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("source", metavar="SOURCE", nargs="?",
                        help="ignored, as for tmpfs ('dmemfs', 'none' or left out)")
    parser.add_argument("mountpoint", metavar="MOUNTPOINT", help="an existing directory")
    parser.add_argument("-o", dest="options", action="append", default=[], metavar="OPTIONS",
                        help="mount options, see below; may be repeated")
    parser.add_argument("-f", "--foreground", action="store_true",
                        help="stay attached to the terminal (default: detach once mounted)")
    parser.add_argument("-v", "--verbose", action="store_true", help="log at debug level")
    parser.add_argument("--version", action=_Version, nargs=0,
                        help="show the version, the libfuse in use and the kernel's FUSE "
                             "protocol (probed with a throwaway mount as root), and exit")
    return parser


class _Version(argparse.Action):
    """--version: computed when asked, since probing the kernel mounts a throwaway FUSE."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace,
                 values: object, option_string: str | None = None) -> None:
        print(version_text(__version__))
        parser.exit()


def _set_up_logging(*, verbose: bool, foreground: bool) -> None:
    """Where the log goes until the daemon detaches (daemon.py then sends it to syslog).

    In the foreground (and under systemd) everything goes to stderr.  A detaching
    command is quiet on success, as mount(8) and tmpfs are: the terminal gets
    warnings and errors, and the INFO lines go to syslog; -v brings them back.
    """
    root = logging.getLogger()
    root.setLevel(logging.DEBUG if verbose else logging.INFO)
    # Under systemd, journald stamps each line itself: no second timestamp.
    stamp = "" if os.environ.get("JOURNAL_STREAM") else "%(asctime)s dmemfs "
    terminal = logging.StreamHandler()
    terminal.setFormatter(logging.Formatter(f"{stamp}%(levelname)s %(name)s: %(message)s"))
    if not (foreground or verbose):
        terminal.setLevel(logging.WARNING)
        if os.path.exists("/dev/log"):
            syslog = logging.handlers.SysLogHandler(address="/dev/log")
            syslog.setFormatter(logging.Formatter(
                "dmemfs[%(process)d]: %(levelname)s %(message)s"))
            root.addHandler(syslog)
    root.addHandler(terminal)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``dmemfs`` command."""
    parser = build_parser()
    # Intermixed: `dmemfs none -o size=1G /mnt/dmem` works as well as the mount.fuse3 order.
    args = parser.parse_intermixed_args(argv)
    try:
        mountpoint = os.path.abspath(args.mountpoint)
        dead = detach_dead_mount(mountpoint)
        if not os.path.isdir(mountpoint):
            raise ConfigError(f"mountpoint {args.mountpoint}: not an existing directory")
        opts = parse_mount_options(args.options)
    except ConfigError as exc:
        parser.exit(2, f"dmemfs: error: {exc}\n")
    _set_up_logging(verbose=args.verbose or opts.debug, foreground=args.foreground)
    if dead:
        log.warning("%s: detached the dmemfs mount of a daemon that died", mountpoint)
    if opts.ignored:
        log.debug("ignoring mount options %s", ", ".join(opts.ignored))
    try:
        return run(DaemonConfig(mountpoint, opts, args.foreground))
    except ConfigError as exc:
        print(f"dmemfs: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"dmemfs: {exc.strerror or exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
