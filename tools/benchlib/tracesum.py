"""Summarise a dmemfs request trace (``-o debug`` or ``dmemctl trace on``): the kernel's requests.

    python tracesum.py DAEMON.LOG [--since REGEX]

For each FUSE op: how many requests, the time the daemon spent in its handler
(from the trace's "-> ok in N us"), and for read/write the request sizes the
kernel chose.  Errors (ENOENT lookups, ...) are counted per op and errno.
"""

from __future__ import annotations

import argparse
import re
import statistics
import sys
from collections import Counter, defaultdict
from pathlib import Path

# The handlers log as dmemfs_fuse.adapter.fs (dmemfs_fuse.fs before the layout change).
HANDLERS = r"dmemfs_fuse(?:\.adapter)?\.fs: "
OK = re.compile(HANDLERS + r"(?P<op>\w+)\((?P<args>.*)\) -> ok in (?P<us>[\d.]+) us$")
ERR = re.compile(HANDLERS + r"(?P<op>\w+)\((?P<args>.*)\): (?P<err>\[Errno \d+\] [^:]*)")
FORGET = re.compile(HANDLERS + r"forget\((?P<args>.*)\)$")
BIG = re.compile(r"<(\d+) bytes>")


def _size(op: str, args: str) -> int | None:
    if op == "read":
        parts = [p.strip() for p in args.split(",")]
        return int(parts[2]) if len(parts) >= 3 and parts[2].isdigit() else None
    if op == "write":
        match = BIG.search(args)
        return int(match.group(1)) if match else 64  # the trace prints <= 64 bytes inline
    return None


def summarise(lines: list[str]) -> str:
    """The trace in a table: count, total and per-request time, sizes, errors."""
    times: dict[str, list[float]] = defaultdict(list)
    sizes: dict[str, Counter[int]] = defaultdict(Counter)
    errors: Counter[tuple[str, str]] = Counter()
    forgets = 0
    for line in lines:
        if m := OK.search(line):
            times[m["op"]].append(float(m["us"]))
            size = _size(m["op"], m["args"])
            if size is not None:
                sizes[m["op"]][size] += 1
        elif m := ERR.search(line):
            errors[(m["op"], m["err"])] += 1
        elif FORGET.search(line):
            forgets += 1
    out = [f"{'op':<12} {'count':>8} {'total ms':>10} {'mean us':>9} {'p50 us':>8} "
           f"{'p99 us':>8}"]
    for op, values in sorted(times.items(), key=lambda kv: -sum(kv[1])):
        values.sort()
        p99 = values[min(len(values) - 1, int(len(values) * 0.99))]
        out.append(f"{op:<12} {len(values):>8} {sum(values) / 1e3:>10.1f} "
                   f"{statistics.fmean(values):>9.1f} {statistics.median(values):>8.1f} "
                   f"{p99:>8.1f}")
    if forgets:
        out.append(f"{'forget':<12} {forgets:>8}   (batched FORGET requests)")
    for op, counter in sorted(sizes.items()):
        common = ", ".join(f"{size // 1024} KiB x{n}" if size >= 1024 else f"{size} B x{n}"
                           for size, n in counter.most_common(6))
        out.append(f"{op} sizes: {common}")
    for (op, err), n in errors.most_common():
        out.append(f"error {op}: {err} x{n}")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    """Entry point."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("log", type=Path)
    parser.add_argument("--since", help="start after the first line matching this regex")
    args = parser.parse_args(argv)
    lines = args.log.read_text(errors="replace").splitlines()
    if args.since:
        pattern = re.compile(args.since)
        start = next((i for i, line in enumerate(lines) if pattern.search(line)), len(lines))
        lines = lines[start:]
    print(summarise(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
