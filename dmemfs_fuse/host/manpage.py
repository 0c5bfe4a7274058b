"""Man pages in roff, generated from the same parsers and option table as ``--help``.

    python -m dmemfs_fuse.host.manpage dmemfs > dmemfs.8
    python -m dmemfs_fuse.host.manpage dmemctl > dmemctl.8
    python -m dmemfs_fuse.host.manpage dmemfs-hugepages > dmemfs-hugepages.8

Every ``-o`` option comes from :data:`dmemfs_fuse.host.options.OPTIONS`, every
argument and subcommand from the argparse parsers, so a man page cannot drift
from ``--help``.  Plain ``man(7)`` macros only, so any man-db/groff or mandoc
renders them; no dependency beyond the standard library.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable, Iterable

from .. import __version__
from ..insight import dmemctl
from . import bootreserve, cli
from .options import IGNORED, OPTIONS

SECTION = "8"


def esc(text: str) -> str:
    """Escape *text* for roff: backslashes, and every '-' as a minus (so it can be pasted)."""
    return text.replace("\\", "\\e").replace("-", "\\-")


def lines(text: str) -> list[str]:
    """*text* as roff input lines, escaped, none starting with a control character."""
    out = []
    for raw in text.splitlines():
        line = esc(raw.strip())
        out.append("\\&" + line if line.startswith((".", "'")) else line)
    return out


def sentence(text: str) -> str:
    """argparse help fragments as man page sentences: 'how many' -> 'How many.'."""
    text = text.strip()
    if not text or "|" in text:   # a value grammar (local | bind:N ...) stays as written
        return text
    text = text[:1].upper() + text[1:]
    return text if text.endswith((".", "!", "?", ":")) else text + "."


def bold(text: str) -> str:
    return f"\\fB{esc(text)}\\fR"


def italic(text: str) -> str:
    return f"\\fI{esc(text)}\\fR"


def _help(action: argparse.Action, prog: str) -> str:
    if not action.help or action.help == argparse.SUPPRESS:
        return ""
    params = dict(vars(action), prog=prog)
    try:
        return action.help % params
    except (KeyError, TypeError, ValueError):
        return action.help


def _metavar(action: argparse.Action) -> str:
    if isinstance(action.metavar, tuple):
        return " ".join(action.metavar)
    if action.metavar:
        return action.metavar
    if action.choices is not None:
        return "|".join(str(c) for c in action.choices)
    return action.dest if not action.option_strings else action.dest.upper()


def _takes_value(action: argparse.Action) -> bool:
    return action.nargs != 0


def _arguments(parser: argparse.ArgumentParser) -> list[argparse.Action]:
    """The parser's own actions, without help and the subcommand dispatcher."""
    return [a for a in parser._actions
            if not isinstance(a, argparse._HelpAction | argparse._SubParsersAction)]


def _subcommands(parser: argparse.ArgumentParser) -> list[tuple[str, str,
                                                                argparse.ArgumentParser]]:
    """(name, help, parser) of each subcommand, in the order they were added."""
    out = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            helps = {c.dest: c.help or "" for c in action._choices_actions}
            for name, sub in action.choices.items():
                out.append((name, helps.get(name, ""), sub))
    return out


def synopsis_item(action: argparse.Action) -> str:
    """One argument as the synopsis shows it: [\\-o OPTIONS], FILE, [POLICY]."""
    if action.option_strings:
        text = bold(action.option_strings[0])
        if _takes_value(action):
            text += " " + italic(_metavar(action))
        return text if action.required else f"[{text}]"
    text = italic(_metavar(action))
    return f"[{text}]" if action.nargs == "?" else text


def term(action: argparse.Action) -> str:
    """An argument as the head of its .TP entry: \\-f, \\-\\-foreground."""
    if not action.option_strings:
        return italic(_metavar(action))
    value = " " + italic(_metavar(action)) if _takes_value(action) else ""
    return ", ".join(bold(o) + value for o in action.option_strings)


def describe(action: argparse.Action, prog: str) -> list[str]:
    """The body of an argument's entry: its help, its choices, its default."""
    text = sentence(_help(action, prog))
    if action.choices is not None and not action.metavar:
        text += f" One of: {', '.join(str(c) for c in action.choices)}."
    return lines(text.strip()) if text.strip() else []


def argument_list(actions: Iterable[argparse.Action], prog: str) -> list[str]:
    out = []
    for action in actions:
        out += [".TP", term(action), *describe(action, prog)]
    out += [".TP", f"{bold('-h')}, {bold('--help')}", "Show the help and exit."]
    return out


def epilog_examples(epilog: str | None) -> list[str]:
    """The indented lines under an 'example:' or 'examples:' heading in an epilog."""
    out: list[str] = []
    taking = False
    for line in (epilog or "").splitlines():
        if line.strip() in ("example:", "examples:"):
            taking = True
        elif taking and line.startswith("  "):
            out.append(line.strip())
        elif taking and line.strip():
            taking = False
    return out


def example_block(commands: Iterable[str]) -> list[str]:
    return [".PP", ".nf", ".RS 4", *lines("\n".join(commands)), ".RE", ".fi"]


def header(name: str, description: str) -> list[str]:
    """.TH and NAME.  The date is SOURCE_DATE_EPOCH's if set (reproducible builds), else empty."""
    epoch = os.environ.get("SOURCE_DATE_EPOCH")
    date = time.strftime("%Y-%m-%d", time.gmtime(int(epoch))) if epoch else ""
    summary = description.strip().rstrip(".")
    summary = summary[:1].lower() + summary[1:]
    return [f'.TH "{name.upper()}" "{SECTION}" "{date}" "dmemfs-fuse {__version__}" '
            '"System Administration"',
            ".\\\" Generated by dmemfs_fuse.host.manpage from the --help of the command; "
            "do not edit.",
            ".nh", ".ad l",   # no hyphenation, ragged right: options stay whole and greppable
            ".SH NAME", f"{esc(name)} \\- {esc(summary)}"]


def see_also(*pages: str) -> list[str]:
    refs = []
    for i, page in enumerate(pages):
        name, _, section = page.rstrip(")").partition("(")
        comma = "," if i < len(pages) - 1 else ""
        refs.append(f".BR {esc(name)} ({section}){comma}")
    return [".SH SEE ALSO", *refs]


def synopsis(prog: str, parser: argparse.ArgumentParser, tail: str = "") -> list[str]:
    items = [synopsis_item(a) for a in _arguments(parser)
             if not isinstance(a, argparse._VersionAction)]
    return [".SH SYNOPSIS", f"{bold(prog)} {' '.join(items)}{tail}".rstrip()]


def render_dmemfs() -> str:
    """dmemfs(8): the command line, every -o option, fstab and systemd use."""
    parser = cli.build_parser()
    out = header("dmemfs", parser.description or "")
    out += synopsis("dmemfs", parser)
    out += [".SH DESCRIPTION", *lines(parser.description or ""), ".PP", *lines(
        "dmemfs reserves a memory region when it starts (populated and locked), splits it "
        "into one pool per NUMA node and mounts a FUSE filesystem whose files are extents of "
        "that region. Growing a file with truncate takes its dpages from a pool at once; "
        "removing it gives them back.")]
    out += [".PP", *lines(
        "The command line follows the mount.fuse3 convention, so mount -t fuse dmemfs, "
        "mount -t fuse 'dmemfs#none', mount -t fuse.dmemfs dmemfs and their fstab lines all "
        "work, and all show the fsname dmemfs and the type fuse.dmemfs in /proc/mounts. With "
        "one argument it is the MOUNTPOINT; SOURCE is ignored. Without -f the command "
        "returns once the mount answers, or exits non-zero with the reason. Every option is "
        "checked before anything is reserved.")]
    out += [".SH OPTIONS", *argument_list(_arguments(parser), "dmemfs")]
    out += [".SH MOUNT OPTIONS", *lines(
        "Given with -o as a comma-separated list; -o may be repeated.")]
    for opt in OPTIONS:
        head = bold(opt.name + "=") + italic(opt.value) if opt.value else bold(opt.name)
        out += [".TP", head, *lines(opt.text), ".br", f"Default: {esc(opt.default)}."]
    passed = ", ".join(sorted(IGNORED))
    out += [".PP", *lines(
        f"Options that mount(8), fstab and systemd pass along are accepted and ignored: "
        f"{passed}, fsname=, subtype=, comment= and every x-* option (x-systemd.requires= "
        "and the like). ro is refused: dmemfs cannot be mounted read-only.")]
    out += [".SH EXAMPLES", *lines("Mount 1 GiB of 2 MiB dpages by hand:"),
            *example_block(epilog_examples(parser.epilog)),
            ".PP", *lines("The same without mount(8): dmemfs /mnt/dmem -o size=1G,pagesize=2M "
                          "(or dmemfs none /mnt/dmem -o ...)."),
            ".PP", *lines("As a systemd service, options in /etc/dmemfs/mnt-dmem.conf "
                          "(DMEMFS_OPTIONS=size=4G,pagesize=2M):"),
            *example_block(["systemctl enable --now dmemfs@mnt-dmem.service"]),
            ".PP", *lines("From /etc/fstab:"),
            *example_block(["dmemfs /mnt/dmem fuse size=4G,pagesize=2M,nofail,"
                            "x-systemd.requires=dmemfs-hugepages.service 0 0"]),
            ".PP", *lines("dmemfs#none /mnt/dmem fuse ... and dmemfs /mnt/dmem fuse.dmemfs ... "
                          "are the same mount.")]
    out += [".SH EXIT STATUS", ".TP", "0", *lines("Mounted (detached), or unmounted cleanly "
                                                  "(with -f, also on SIGTERM)."),
            ".TP", "1", *lines("The region could not be reserved, populated or locked, or "
                               "the mount failed."),
            ".TP", "2", *lines("A bad option; the message names it and what it accepts.")]
    out += [".SH FILES", ".TP", italic("/etc/dmemfs/MOUNT.conf"),
            *lines("DMEMFS_OPTIONS= for the dmemfs@MOUNT.service instance."),
            ".TP", italic("/run/dmemfs/"),
            *lines("The root-only control sockets that dmemctl talks to.")]
    out += see_also("dmemctl(8)", "dmemfs-hugepages(8)", "mount.fuse3(8)", "fusermount3(1)",
                    "systemd.mount(5)")
    return "\n".join(out) + "\n"


def render_dmemctl() -> str:
    """dmemctl(8): global options and every subcommand with its arguments."""
    parser = dmemctl.build_parser()
    out = header("dmemctl", parser.description or "")
    out += synopsis("dmemctl", parser, " " + italic("COMMAND") + " [" + italic("ARGS") + "]")
    out += [".SH DESCRIPTION", *lines(parser.description or ""), ".PP", *lines(
        "dmemctl talks to the daemon of a dmemfs mount over a unix socket under /run/dmemfs/, "
        "mode 0600; the daemon checks the peer's credentials, so only root (or the daemon's "
        "own user) may ask. Without -m, dmemctl uses the mount that holds FILE, or the only "
        "dmemfs mounted.")]
    out += [".SH OPTIONS", *argument_list(_arguments(parser), "dmemctl"), ".PP",
            *lines("-m and --json may also follow the command, as in dmemctl status --json.")]
    out += [".SH COMMANDS"]
    global_dests = {a.dest for a in _arguments(parser)}
    for name, text, sub in _subcommands(parser):
        args = [a for a in _arguments(sub) if a.dest not in global_dests]
        head = " ".join([bold(name), *(synopsis_item(a) for a in args)])
        out += [".TP", head, *lines(sentence(text))]
        described = [a for a in args if describe(a, f"dmemctl {name}")]
        if described:
            out += [".RS"]
            for action in described:
                out += [".TP", term(action), *describe(action, f"dmemctl {name}")]
            out += [".RE"]
    out += [".SH EXAMPLES", *example_block(epilog_examples(parser.epilog))]
    out += [".SH EXIT STATUS", ".TP", "0", "Success.",
            ".TP", "1", *lines("No dmemfs answered, or the daemon refused the request; one "
                               "line on standard error says why."),
            ".TP", "2", "A bad command line."]
    out += see_also("dmemfs(8)", "dmemfs-hugepages(8)")
    return "\n".join(out) + "\n"


def render_hugepages() -> str:
    """dmemfs-hugepages(8): the boot-time huge page reservation."""
    parser = bootreserve.build_parser()
    out = header("dmemfs-hugepages", parser.description or "")
    out += synopsis("dmemfs-hugepages", parser,
                    " " + italic("COMMAND"))
    out += [".SH DESCRIPTION", *lines(parser.description or ""), ".PP", *lines(
        "dmemfs-hugepages.service runs reserve early at boot, before most services start and "
        "fragment memory, and release when it stops. reserve adds the configured pages on top "
        "of what the kernel already holds, all or nothing, and records what it added in the "
        "state file; release gives back exactly that.")]
    out += [".SH OPTIONS", *argument_list(_arguments(parser), "dmemfs-hugepages")]
    out += [".SH COMMANDS"]
    for name, text, _ in _subcommands(parser):
        out += [".TP", bold(name), *lines(sentence(text))]
    out += [".SH CONFIGURATION", *lines(
        "One pool per line, as key=value words; # starts a comment. Each node and page size "
        "may appear once. A bad line is refused with its line number before anything is "
        "reserved."), *example_block(["node=0 pagesize=2M count=512",
                                      "node=1 pagesize=1G count=4"])]
    out += [".SH EXAMPLES", *example_block(epilog_examples(parser.epilog))]
    out += [".SH EXIT STATUS", ".TP", "0", "Success.",
            ".TP", "1", *lines("The kernel gave fewer pages than configured (everything added "
                               "was given back), or a pool could not be given back."),
            ".TP", "2", *lines("A bad config line or command line.")]
    out += [".SH FILES", ".TP", italic(bootreserve.DEFAULT_CONFIG), "The pools.",
            ".TP", italic(bootreserve.DEFAULT_STATE), "What reserve added."]
    out += see_also("dmemfs(8)", "dmemctl(8)")
    return "\n".join(out) + "\n"


PAGES: dict[str, Callable[[], str]] = {
    "dmemfs": render_dmemfs,
    "dmemctl": render_dmemctl,
    "dmemfs-hugepages": render_hugepages,
}


def main(argv: list[str] | None = None) -> int:
    """Write the man page of the named command to standard output."""
    parser = argparse.ArgumentParser(prog="python -m dmemfs_fuse.host.manpage",
                                     description="Print a man page (roff) generated from "
                                                 "the command's own --help.")
    parser.add_argument("page", choices=sorted(PAGES))
    args = parser.parse_args(argv)
    sys.stdout.write(PAGES[args.page]())
    return 0


if __name__ == "__main__":
    sys.exit(main())
