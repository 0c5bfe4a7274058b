"""The kernel's own FUSE request trace (tracepoints fuse:fuse_request_send/_end), for any daemon.

A private ftrace instance (``/sys/kernel/tracing/instances/dmemfs-bench-PID``)
records every request the kernel sends to one FUSE connection and its reply:
opcode, size, error, and the kernel-measured round trip.  Nothing global is
changed; the instance is removed afterwards (and tracefs unmounted again if
this module had to mount it).
"""

from __future__ import annotations

import contextlib
import os
import re
import statistics
import subprocess
from collections import Counter, defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

TRACEFS = Path("/sys/kernel/tracing")
SEND = re.compile(r"\s(\d+\.\d+): fuse_request_send: connection (\d+) req (\d+) opcode \d+ "
                  r"\((\w+)\) len (\d+)")
END = re.compile(r"\s(\d+\.\d+): fuse_request_end: connection (\d+) req (\d+) len (\d+) "
                 r"error (-?\d+)")


@dataclass
class Requests:
    """What one connection was asked, per opcode."""

    count: Counter[str] = field(default_factory=Counter)
    errors: Counter[tuple[str, int]] = field(default_factory=Counter)
    rtt_us: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))
    in_bytes: dict[str, Counter[int]] = field(default_factory=lambda: defaultdict(Counter))
    lost: bool = False

    def table(self) -> str:
        """Per opcode: count, kernel-measured round trip, errors."""
        lines = [f"{'opcode':<20} {'count':>8} {'rtt mean us':>12} {'rtt p50 us':>11} "
                 f"{'rtt total ms':>13}"]
        for op, n in self.count.most_common():
            rtts = sorted(self.rtt_us.get(op, []))
            mean = statistics.fmean(rtts) if rtts else 0.0
            p50 = statistics.median(rtts) if rtts else 0.0
            lines.append(f"{op:<20} {n:>8} {mean:>12.1f} {p50:>11.1f} {sum(rtts) / 1e3:>13.1f}")
        for (op, err), n in self.errors.most_common():
            lines.append(f"  {op} answered {os.strerror(-err) if err < 0 else err} x{n}")
        if self.lost:
            lines.append("  (trace buffer overran: counts are a lower bound)")
        return "\n".join(lines)


def parse(text: str, connection: int) -> Requests:
    """Pair send and end events of *connection* from an ftrace text dump."""
    out = Requests()
    pending: dict[int, tuple[str, float]] = {}
    for line in text.splitlines():
        if "LOST" in line:
            out.lost = True
        if m := SEND.search(line):
            if int(m.group(2)) != connection:
                continue
            op = m.group(4).removeprefix("FUSE_")
            out.count[op] += 1
            out.in_bytes[op][int(m.group(5))] += 1
            pending[int(m.group(3))] = (op, float(m.group(1)))
        elif m := END.search(line):
            if int(m.group(2)) != connection:
                continue
            started = pending.pop(int(m.group(3)), None)
            if started is None:
                continue
            op, t0 = started
            out.rtt_us[op].append((float(m.group(1)) - t0) * 1e6)
            if int(m.group(5)):
                out.errors[(op, int(m.group(5)))] += 1
    return out


@contextlib.contextmanager
def _tracefs() -> Iterator[Path]:
    if (TRACEFS / "instances").is_dir():
        yield TRACEFS
        return
    subprocess.run(["mount", "-t", "tracefs", "nodev", str(TRACEFS)], check=True)
    try:
        yield TRACEFS
    finally:
        subprocess.run(["umount", str(TRACEFS)], check=False)


@contextlib.contextmanager
def trace(mountpoint: Path, buffer_kb: int = 65536) -> Iterator[list[Requests]]:
    """Record the FUSE requests to the mount at *mountpoint*; the list gets the result at exit."""
    connection = os.minor(os.stat(mountpoint).st_dev)  # anonymous devices: major 0
    result: list[Requests] = []
    with _tracefs() as root:
        inst = root / "instances" / f"dmemfs-bench-{os.getpid()}"
        inst.mkdir()
        try:
            (inst / "buffer_size_kb").write_text(f"{buffer_kb}\n")
            for event in ("fuse_request_send", "fuse_request_end"):
                base = inst / "events" / "fuse" / event
                (base / "filter").write_text(f"connection == {connection}\n")
                (base / "enable").write_text("1\n")
            (inst / "tracing_on").write_text("1\n")
            yield result
            (inst / "tracing_on").write_text("0\n")
            result.append(parse((inst / "trace").read_text(errors="replace"), connection))
        finally:
            for event in ("fuse_request_send", "fuse_request_end"):
                with contextlib.suppress(OSError):
                    (inst / "events" / "fuse" / event / "enable").write_text("0\n")
            inst.rmdir()
