"""Why a target is missed: one scenario at a time, traced, profiled, and against the FUSE ceiling.

    tools/bench-evidence SCENARIO[,SCENARIO] [--fs dmemfs,nullfs,nullfs_ll,plainfs]
                         [--trace] [--pyspy] [--native] [--perf] [--readahead KB] [--out DIR]

Scenarios: seqwrite, coldread, randread, randwrite, create, stat, unlink, mmap, lookup
(stat of a missing name: one LOOKUP round trip), meta (the whole metadata workload).
Each (filesystem, scenario) gets a fresh mount.  dmemfs runs in the
foreground so that its pid and its log are ours:

- ``--trace`` mounts it with ``-o debug`` and summarises the kernel's
  requests (ops, counts, sizes, handler time) with tracesum;
- ``--pyspy`` samples the daemon with py-spy while the scenario runs (no
  trace: tracing costs time) and lists the hottest frames;
- ``--ktrace`` records the kernel's FUSE tracepoints for the mount (any
  daemon): every request's opcode, error and kernel-measured round trip;
- ``--perf`` records the workload and the daemon with perf (kernel stacks included);
- ``--readahead KB`` sets the mount's /sys/class/bdi/<bdi>/read_ahead_kb
  before the scenario (the daemon is unchanged);
- ``nullfs`` (pyfuse3, does nothing) and ``nullfs_ll`` (libfuse C, does
  nothing, one thread) give the ceilings: the most any pyfuse3 daemon, and
  any one-thread FUSE daemon, can do on this machine;
- ``--pin same|split`` puts the daemon on the workload's CPU or on another
  one (a FUSE round trip costs very differently in the two cases in a VM).
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import mmap
import os
import random
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from . import ktrace, mounts, tracesum
from .machine import GIB, MIB, drop_caches
from .mounts import MountInfo
from .workloads import PAGE, Params, Variant, fill, map_and_touch, meta_run, read_all

HERE = Path(__file__).resolve().parent
PYSPY = mounts.VENV_BIN / "py-spy"


class Ctx:
    """What a scenario needs: the mount, sizes, and hooks around the timed part."""

    def __init__(self, mount: MountInfo, kind: str, *, size: int, ops: int, files: int,
                 readahead: int | None) -> None:
        self.mount = mount
        self.size = size
        self.ops = ops
        self.files = files
        self.readahead = readahead
        self.kind = kind
        self.target = str(mount.path / ("f" if kind.startswith("nullfs") else "data"))
        self.start_hooks: list[Callable[[], None]] = []
        self.stop_hooks: list[Callable[[], None]] = []

    @contextlib.contextmanager
    def timed(self) -> Iterator[list[float]]:
        """Run the profilers only around the measured part; yields [seconds] when done."""
        for hook in self.start_hooks:
            hook()
        out: list[float] = []
        started = time.perf_counter()
        try:
            yield out
        finally:
            out.append(time.perf_counter() - started)
            for hook in self.stop_hooks:
                hook()


BDI: dict[str, str] = {}  # --bdi KEY=VALUE settings for every mount


def _set_readahead(ctx: Ctx) -> None:
    """Apply --readahead and --bdi to the mount's bdi (the daemon is not involved)."""
    settings = dict(BDI)
    if ctx.readahead is not None:
        settings["read_ahead_kb"] = str(ctx.readahead)
    for key, value in settings.items():
        Path(f"/sys/class/bdi/{ctx.mount.bdi()}/{key}").write_text(f"{value}\n")


def s_seqwrite(ctx: Ctx) -> str:
    """1 MiB writes of the whole size, then fsync."""
    _set_readahead(ctx)
    block = os.urandom(MIB)
    with ctx.timed() as t:
        fill(ctx.target, ctx.size, block)
    return f"{ctx.size / MIB / t[0]:.0f} MiB/s ({t[0]:.2f} s)"


def s_coldread(ctx: Ctx) -> str:
    """Sequential 1 MiB reads after drop_caches."""
    if not ctx.kind.startswith("nullfs"):
        fill(ctx.target, ctx.size, os.urandom(MIB))
    _set_readahead(ctx)
    drop_caches()
    with ctx.timed() as t:
        _, got = read_all(ctx.target)
    return f"{got / MIB / t[0]:.0f} MiB/s ({t[0]:.2f} s, read_ahead_kb={ctx.mount.read_ahead_kb()})"


def _rand(ctx: Ctx, write: bool) -> str:
    if not ctx.kind.startswith("nullfs"):
        fill(ctx.target, ctx.size, os.urandom(MIB))
    rng = random.Random(6)
    offsets = [rng.randrange(ctx.size // PAGE) * PAGE for _ in range(ctx.ops)]
    buf = mmap.mmap(-1, PAGE)
    fd = os.open(ctx.target, (os.O_WRONLY if write else os.O_RDONLY) | os.O_DIRECT)
    try:
        with ctx.timed() as t:
            for off in offsets:
                if write:
                    os.pwritev(fd, [buf], off)
                else:
                    os.preadv(fd, [buf], off)
    finally:
        os.close(fd)
    return f"{ctx.ops / t[0]:.0f} IOPS ({t[0] / ctx.ops * 1e6:.1f} us per 4 KiB O_DIRECT op)"


def s_randread(ctx: Ctx) -> str:
    """O_DIRECT 4 KiB reads at random offsets."""
    return _rand(ctx, write=False)


def s_randwrite(ctx: Ctx) -> str:
    """O_DIRECT 4 KiB writes at random offsets."""
    return _rand(ctx, write=True)


def _names(ctx: Ctx) -> list[str]:
    return [f"f{i:06d}" for i in range(ctx.files)]


def _create_all(dfd: int, names: list[str]) -> None:
    for name in names:
        fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644, dir_fd=dfd)
        os.write(fd, b"x" * 64)
        os.close(fd)


def s_create(ctx: Ctx) -> str:
    """open(O_CREAT|O_EXCL) + 64-byte write + close of many files."""
    names = _names(ctx)
    dfd = os.open(ctx.mount.path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        with ctx.timed() as t:
            _create_all(dfd, names)
    finally:
        os.close(dfd)
    return f"{len(names) / t[0]:.0f} creates/s ({t[0] / len(names) * 1e6:.0f} us each)"


def s_stat(ctx: Ctx) -> str:
    """stat of every file, after drop_caches."""
    names = _names(ctx)
    dfd = os.open(ctx.mount.path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        _create_all(dfd, names)
        os.close(dfd)
        drop_caches()
        dfd = os.open(ctx.mount.path, os.O_RDONLY | os.O_DIRECTORY)
        with ctx.timed() as t:
            for name in names:
                os.stat(name, dir_fd=dfd)
    finally:
        os.close(dfd)
    return f"{len(names) / t[0]:.0f} stats/s ({t[0] / len(names) * 1e6:.0f} us each)"


def s_unlink(ctx: Ctx) -> str:
    """unlink of every file."""
    names = _names(ctx)
    dfd = os.open(ctx.mount.path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        _create_all(dfd, names)
        with ctx.timed() as t:
            for name in names:
                os.unlink(name, dir_fd=dfd)
    finally:
        os.close(dfd)
    return f"{len(names) / t[0]:.0f} unlinks/s ({t[0] / len(names) * 1e6:.0f} us each)"


def s_mmap(ctx: Ctx) -> str:
    """MAP_SHARED: fault in and write every page, msync."""
    fd = os.open(ctx.target, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        os.ftruncate(fd, ctx.size)
        _set_readahead(ctx)
        drop_caches()
        with ctx.timed() as t:
            map_and_touch(fd, ctx.size, write=True)
    finally:
        os.close(fd)
    return f"{ctx.size / MIB / t[0]:.0f} MiB/s fault+write+msync ({t[0]:.2f} s)"


def s_lookup(ctx: Ctx) -> str:
    """stat of a name that does not exist: one LOOKUP round trip each (ENOENT is not cached)."""
    dfd = os.open(ctx.mount.path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        with ctx.timed() as t:
            for _ in range(ctx.ops):
                with contextlib.suppress(FileNotFoundError):
                    os.stat("missing", dir_fd=dfd)
    finally:
        os.close(dfd)
    return f"{ctx.ops / t[0]:.0f} lookups/s ({t[0] / ctx.ops * 1e6:.1f} us per LOOKUP round trip)"


def s_meta(ctx: Ctx) -> str:
    """The benchmark's whole metadata workload (create, stat, rename, ls -l, unlink)."""
    params = Params(meta_files=ctx.files)
    with ctx.timed() as t:
        out = meta_run(Variant("x", ctx.kind), ctx.mount, params)
    return f"{t[0]:.2f} s: " + ", ".join(f"{k}={v:.0f}" for k, v in out.items())


SCENARIOS: dict[str, Callable[[Ctx], str]] = {
    "lookup": s_lookup, "meta": s_meta,
    "seqwrite": s_seqwrite, "coldread": s_coldread, "randread": s_randread,
    "randwrite": s_randwrite, "create": s_create, "stat": s_stat, "unlink": s_unlink,
    "mmap": s_mmap,
}
DATA_SCENARIOS = {"seqwrite", "coldread", "randread", "randwrite", "mmap"}
NULL_SCENARIOS = {"seqwrite", "coldread", "randread", "randwrite", "lookup"}


PIN: dict[str, list[str]] = {}  # the daemon's argv prefix (taskset), set by --pin


def _pinned(argv: list[str]) -> list[str]:
    return PIN.get("daemon", []) + argv


def _build_nullfs_ll(work: Path) -> Path:
    binary = work / "nullfs_ll"
    flags = subprocess.run(["pkg-config", "--cflags", "--libs", "fuse3"], capture_output=True,
                           text=True, check=True).stdout.split()
    subprocess.run(["gcc", "-O2", "-Wall", "-o", str(binary), str(HERE / "nullfs_ll.c"), *flags],
                   check=True)
    return binary


@contextlib.contextmanager
def _mount(kind: str, path: Path, work: Path, args: argparse.Namespace,
           scenario: str) -> Iterator[MountInfo]:
    log = work / f"{kind}-{scenario}.log"
    if kind == "dmemfs":
        pagesize = "4K" if scenario in ("create", "stat", "unlink", "meta", "lookup") else "2M"
        size = args.size + 64 * MIB if scenario in DATA_SCENARIOS else 64 * MIB
        opts = f"size={size // MIB}M,pagesize={pagesize}"
        opts += ",reserve_hugepages" if pagesize == "2M" else ""
        opts += ",debug" if args.trace else ""
        opts += f",{args.dmemfs_opts}" if args.dmemfs_opts else ""
        daemon = shlex.split(args.dmemfs_cmd) if args.dmemfs_cmd else [str(mounts.DMEMFS)]
        argv = _pinned([*daemon, "none", str(path), "-f", "-o", opts])
        with mounts.foreground("dmemfs", argv, path, "fuse.dmemfs", log) as m:
            yield m
    elif kind == "plainfs":
        argv = _pinned([sys.executable, str(mounts.PLAINFS), str(path)])
        with mounts.foreground("plainfs", argv, path, "fuse.plainfs", log) as m:
            yield m
    elif kind == "nullfs":
        argv = _pinned([sys.executable, str(HERE / "nullfs.py"), str(path), str(args.size)])
        with mounts.foreground("nullfs", argv, path, "fuse.nullfs", log) as m:
            yield m
    elif kind == "nullfs_ll":
        binary = work / "nullfs_ll"
        if not binary.exists():
            _build_nullfs_ll(work)
        os.environ["NULLFS_SIZE"] = str(args.size)
        argv = _pinned([str(binary), str(path), "-f", "-o",
                        "fsname=nullfs_ll,subtype=nullfs_ll"])
        with mounts.foreground("nullfs_ll", argv, path, "fuse.nullfs_ll", log) as m:
            yield m
    else:
        raise SystemExit(f"unknown filesystem {kind}")


def pyspy_summary(raw: Path, top: int = 18) -> str:
    """Self and inclusive time of the hottest frames in a py-spy raw (collapsed) file."""
    total = 0
    own: collections.Counter[str] = collections.Counter()
    incl: collections.Counter[str] = collections.Counter()
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        total += n
        frames = stack.split(";")
        own[frames[-1]] += n
        for frame in set(frames):
            incl[frame] += n
    if not total:
        return "(no samples)"
    lines = [f"{total} samples; self time:"]
    lines += [f"  {n / total * 100:5.1f}%  {f}" for f, n in own.most_common(top)]
    lines.append("inclusive time:")
    lines += [f"  {n / total * 100:5.1f}%  {f}" for f, n in incl.most_common(top + 10)
              if "<module>" not in f]
    return "\n".join(lines)


def _perf_summary(data: Path, top: int = 30) -> str:
    done = subprocess.run(["perf", "report", "-i", str(data), "--no-children",
                           "--sort", "comm,dso,sym", "--stdio", "-g", "none",
                           "--percent-limit", "0.7"],
                          capture_output=True, text=True, check=False)
    rows = [line for line in done.stdout.splitlines() if "%" in line and not line.startswith("#")]
    return "\n".join(rows[:top])


def run_one(kind: str, scenario: str, args: argparse.Namespace, work: Path) -> str:
    """Mount *kind* fresh, run *scenario*, with the profilers asked for; return the report."""
    path = work / f"mnt-{kind}-{scenario}"
    report = [f"### {scenario} on {kind}"]
    with _mount(kind, path, work, args, scenario) as m:
        ctx = Ctx(m, kind, size=args.size, ops=args.ops, files=args.files,
                  readahead=args.readahead)
        spy_out = work / f"pyspy-{kind}-{scenario}.txt"
        perf_out = work / f"perf-{kind}-{scenario}.data"
        procs: list[subprocess.Popen[bytes]] = []
        if args.pyspy and kind != "nullfs_ll" and m.pid:
            argv = [str(PYSPY), "record", "-p", str(m.pid), "-r", "250", "-f", "raw",
                    "-o", str(spy_out)]
            # --native pauses the process to unwind C frames; without it, sample without pausing.
            argv += ["--native"] if args.native else ["--nonblocking"]

            def start_spy() -> None:
                procs.append(subprocess.Popen(argv, stdout=subprocess.DEVNULL,
                                              stderr=subprocess.DEVNULL))
                time.sleep(1.0)  # let it attach
            ctx.start_hooks.append(start_spy)
        if args.perf:
            def start_perf() -> None:
                # Only the workload (this process) and the daemon: others' work stays out.
                pids = ",".join(str(p) for p in (os.getpid(), m.pid) if p)
                procs.append(subprocess.Popen(["perf", "record", "-g", "-p", pids,
                                               "-o", str(perf_out)],
                                              stdout=subprocess.DEVNULL,
                                              stderr=subprocess.DEVNULL))
                time.sleep(1.0)
            ctx.start_hooks.append(start_perf)

        def stop_all() -> None:
            for proc in procs:
                proc.send_signal(signal.SIGINT)
            for proc in procs:
                try:
                    proc.wait(timeout=120)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        ctx.stop_hooks.append(stop_all)
        log_path = m.log_path
        marker = f"BENCH-EVIDENCE-START {scenario}"
        if args.trace and log_path is not None:
            def mark() -> None:  # only the measured part is summarised
                time.sleep(0.3)
                with open(log_path, "a") as log:
                    log.write(f"{marker}\n")
            ctx.start_hooks.insert(0, mark)
        if args.ktrace:
            with ktrace.trace(m.path) as kernel:
                report.append(SCENARIOS[scenario](ctx))
            if kernel:
                report.append("kernel's FUSE requests (whole scenario, set-up included):\n"
                              + kernel[0].table())
        else:
            report.append(SCENARIOS[scenario](ctx))
        if args.trace and log_path is not None:
            time.sleep(0.5)
            lines = log_path.read_text(errors="replace").splitlines()
            start = next((i for i, line in enumerate(lines) if marker in line), 0)
            report.append("requests seen by the daemon during the measured part:\n"
                          + tracesum.summarise(lines[start:]))
    if spy_out.exists():
        report.append("py-spy:\n" + pyspy_summary(spy_out))
    if perf_out.exists():
        report.append("perf (workload + daemon, self time):\n" + _perf_summary(perf_out))
    return "\n".join(report)


def main(argv: list[str] | None = None) -> int:
    """Entry point of tools/bench-evidence."""
    parser = argparse.ArgumentParser(prog="tools/bench-evidence",
                                     description=(__doc__ or "").splitlines()[0])
    parser.add_argument("scenarios", help=",".join(SCENARIOS))
    parser.add_argument("--fs", default="dmemfs", help="dmemfs,nullfs,nullfs_ll,plainfs")
    parser.add_argument("--size", type=int, default=GIB)
    parser.add_argument("--ops", type=int, default=20000)
    parser.add_argument("--files", type=int, default=10000)
    parser.add_argument("--trace", action="store_true")
    parser.add_argument("--ktrace", action="store_true",
                        help="count the kernel's FUSE requests (tracepoints fuse:fuse_request_*)")
    parser.add_argument("--pyspy", action="store_true")
    parser.add_argument("--native", action="store_true", help="py-spy --native")
    parser.add_argument("--perf", action="store_true")
    parser.add_argument("--readahead", type=int, default=None, metavar="KB")
    parser.add_argument("--bdi", action="append", default=[], metavar="KEY=VALUE",
                        help="set /sys/class/bdi/<bdi>/KEY before the scenario, e.g. "
                             "strict_limit=0")
    parser.add_argument("--dmemfs-opts", default="")
    parser.add_argument("--dmemfs-cmd", default=None, metavar="CMD",
                        help="run this instead of .venv/bin/dmemfs (an experimental copy)")
    parser.add_argument("--pin", choices=("same", "split"), default=None,
                        help="same: daemon and workload both on the last CPU; split: daemon on "
                             "CPU 0, workload on the last CPU (default: the scheduler decides)")
    parser.add_argument("--out", type=Path, default=None, help="keep logs and profiles here")
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        print("bench-evidence: needs root", file=sys.stderr)
        return 2
    signal.signal(signal.SIGTERM, lambda s, f: (_ for _ in ()).throw(KeyboardInterrupt()))
    BDI.update(item.split("=", 1) for item in args.bdi)
    last = max(os.sched_getaffinity(0))
    if args.pin:
        os.sched_setaffinity(0, {last})
        PIN["daemon"] = ["taskset", "-c", str(last if args.pin == "same" else 0)]
    work = Path(tempfile.mkdtemp(prefix="dmemfs-evidence."))
    try:
        for scenario in args.scenarios.split(","):
            for kind in args.fs.split(","):
                if kind.startswith("nullfs") and scenario not in NULL_SCENARIOS:
                    continue
                print(run_one(kind, scenario, args, work), flush=True)
                print(flush=True)
    finally:
        mounts.cleanup_all()
        if args.out:
            args.out.mkdir(parents=True, exist_ok=True)
            for item in work.iterdir():
                if item.is_file():
                    shutil.copy2(item, args.out / item.name)
        if not mounts.leftovers(work):
            shutil.rmtree(work, ignore_errors=True)
    return 0
