"""tools/bench: every workload on dmemfs and its peers, alternated, with medians and ratios.

    tools/bench [--quick] [--rounds N] [--only WORKLOAD[,WORKLOAD]] [--out DIR]

Writes bench-results.json, bench-results.md and bench-results.png in --out.
Needs root (mounts, drop_caches, huge pages).  Every mount is fresh and is
taken down on every path, Ctrl-C included; huge pages reserved for the run
are given back exactly.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import shlex
import shutil
import signal
import sys
import tempfile
import time
import traceback
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path
from types import FrameType
from typing import Any

from tqdm import tqdm

from . import machine, mounts, report
from .machine import GIB, MIB, HugePageReservation
from .mounts import MountError, MountInfo
from .workloads import (
    BOOK_PREFIX,
    BY_NAME,
    QUICK,
    WORKLOADS,
    Params,
    Variant,
    Workload,
    fits,
)


def _parse_size(text: str) -> int:
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    text = text.strip().upper().removesuffix("IB").removesuffix("B")
    if text and text[-1] in units:
        return int(float(text[:-1]) * units[text[-1]])
    return int(text)


def build_parser() -> argparse.ArgumentParser:
    """Command-line options."""
    parser = argparse.ArgumentParser(
        prog="tools/bench",
        description="Benchmark dmemfs against tmpfs, hugetlbfs and a plain pyfuse3 "
                    "filesystem (issue #6). Needs root.",
        epilog="workloads: " + ", ".join(f"{w.name} ({w.number}. {w.title})" for w in WORKLOADS))
    parser.add_argument("--quick", action="store_true",
                        help="small sizes and 2 rounds: about a minute")
    parser.add_argument("--rounds", type=int, default=None,
                        help="rounds of the comparative workloads (default 5, quick 2)")
    parser.add_argument("--abs-rounds", type=int, default=None,
                        help="rounds of alloc and book (default 2, quick 1)")
    parser.add_argument("--only", action="append", default=[], metavar="WORKLOAD",
                        help="run only these workloads (name or number; repeat or comma-separate)")
    parser.add_argument("--out", type=Path, default=Path("."), help="output directory")
    parser.add_argument("--size", type=_parse_size, default=None,
                        help="file size for seq/rand/mmap (default 1G, quick 128M)")
    parser.add_argument("--pools", default=None,
                        help="pool sizes for alloc and book, e.g. 1G,4G,16G")
    parser.add_argument("--dmemfs-pagesize", default="2M", choices=("4K", "2M", "1G"),
                        help="dpage size for dmemfs in seq/rand/mmap/guest (default 2M)")
    parser.add_argument("--dmemfs-opts", default="",
                        help="extra -o options for every dmemfs mount")
    parser.add_argument("--dmemfs-cmd", default=None, metavar="CMD",
                        help="run this instead of .venv/bin/dmemfs (e.g. an experimental copy: "
                             "'env PYTHONPATH=/tmp/x .venv/bin/python -m dmemfs_fuse.host.cli')")
    parser.add_argument("--dmemfs-bdi", action="append", default=[], metavar="KEY=VALUE",
                        help="write /sys/class/bdi/<bdi>/KEY after each dmemfs mount "
                             "(e.g. read_ahead_kb=1024), as the daemon could do itself")
    parser.add_argument("--also-dmemfs", default=None, metavar="CMD",
                        help="add a second dmemfs variant, 'dmemfs-exp', run by CMD (an "
                             "experimental copy of the daemon), alternated with the others; "
                             "--also-bdi settings apply to it only")
    parser.add_argument("--also-bdi", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--no-chart", action="store_true", help="skip the PNG")
    return parser


def _select(names: list[str]) -> list[Workload]:
    if not names:
        return list(WORKLOADS)
    wanted = []
    for raw in ",".join(names).split(","):
        item = raw.strip()
        if not item:
            continue
        match = BY_NAME.get(item) or next((w for w in WORKLOADS if str(w.number) == item), None)
        if match is None:
            raise SystemExit(f"bench: unknown workload {item!r}; choose from "
                             + ", ".join(w.name for w in WORKLOADS))
        if match not in wanted:
            wanted.append(match)
    return sorted(wanted, key=lambda w: w.number)


def _on_signal(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in text).strip("-")


DMEMFS_CMD: list[str] = []  # --dmemfs-cmd
DMEMFS_BDI: dict[str, str] = {}  # --dmemfs-bdi


@contextlib.contextmanager
def _mount(v: Variant, path: Path, logs: Path) -> Iterator[MountInfo]:
    if v.kind == "delegate":  # a tool that mounts for itself
        yield MountInfo("delegate", path, v.options)
    elif v.kind == "dmemfs":
        command = v.info.get("command") or DMEMFS_CMD or None
        bdi = v.info.get("bdi", DMEMFS_BDI)
        with mounts.dmemfs(path, v.options, logs, command, bdi) as m:
            yield m
    elif v.kind == "plainfs":
        with mounts.plainfs(path, logs) as m:
            yield m
    else:
        with mounts.kernel_fs(v.kind, path, v.options) as m:
            yield m


class Bench:
    """One run: the plan, the progress bar and the results."""

    def __init__(self, args: argparse.Namespace) -> None:
        base = QUICK if args.quick else Params()
        changes: dict[str, Any] = {"dmemfs_pagesize": args.dmemfs_pagesize,
                                   "dmemfs_extra": args.dmemfs_opts}
        if args.size:
            changes["data_size"] = args.size
        if args.pools:
            pools = tuple(_parse_size(p) for p in args.pools.split(","))
            changes.update(alloc_pools=pools, book_pools=pools)
        self.workloads = _select(args.only)
        names = {w.name for w in self.workloads}
        changes["book_on_alloc_mounts"] = {"alloc", "book"} <= names
        self.params = dataclasses.replace(base, **changes)
        self.rounds = args.rounds or (2 if args.quick else 5)
        self.abs_rounds = args.abs_rounds or (1 if args.quick else 2)
        # Samples taken on another workload's mounts (workload 7 on workload 6's), by
        # (workload, variant label, round): that workload then mounts nothing for them.
        self.shared: dict[tuple[str, str, int], dict[str, Any]] = {}
        self.also = shlex.split(args.also_dmemfs) if args.also_dmemfs else []
        self.also_bdi = dict(item.split("=", 1) for item in args.also_bdi)
        self.root = Path(tempfile.mkdtemp(prefix="dmemfs-bench."))
        self.logs = self.root / "logs"
        self.logs.mkdir()
        self.reservations: list[HugePageReservation] = []
        self.results: dict[str, Any] = {
            "command": " ".join(shlex.quote(a) for a in ["tools/bench", *sys.argv[1:]]),
            "started": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "rounds": self.rounds,
            "rounds_absolute": self.abs_rounds,
            "params": dataclasses.asdict(self.params),
            "machine": machine.summary(),
            "dmemfs_command": args.dmemfs_cmd or str(mounts.DMEMFS),
            "dmemfs_bdi": dict(item.split("=", 1) for item in args.dmemfs_bdi),
            "dmemfs_exp": {"command": args.also_dmemfs, "bdi": self.also_bdi}
            if args.also_dmemfs else None,
            "workloads": {},
            "samples": [],
        }
        self.bar: tqdm[Any] | None = None

    def plan(self) -> list[tuple[Workload, list[Variant], int]]:
        """Each workload with its variants and its number of rounds."""
        out = []
        for work in self.workloads:
            rounds = self.rounds if work.comparative else self.abs_rounds
            variants = work.variants(self.params)
            if self.also and work.comparative:
                base = next(v for v in variants if v.label == "dmemfs")
                extra = dataclasses.replace(base, label="dmemfs-exp", info=dict(base.info))
                extra.info.update(command=self.also, bdi=self.also_bdi)
                variants.insert(1, extra)
            if any(v.kind == "delegate" for v in variants):
                for v in variants:
                    v.info["rounds"] = self.rounds  # the tool alternates for itself
                rounds = 1
            out.append((work, variants, rounds))
        return out

    def say(self, text: str) -> None:
        """A line on the terminal that does not break the progress bar."""
        if self.bar is not None:
            self.bar.write(text)
        else:
            print(text, flush=True)

    def run(self) -> None:
        """Every selected workload, each variant alternated over the rounds."""
        for line in machine.describe(self.results["machine"]):
            self.say(line)
        plan = self.plan()
        total = sum(rounds * sum(1 for v in variants if not v.skip)
                    for _, variants, rounds in plan)
        self.bar = tqdm(total=total, unit="mount", dynamic_ncols=True, file=sys.stderr,
                        disable=None)  # no bar when stderr is not a terminal
        started = time.monotonic()
        try:
            for work, variants, rounds in plan:
                self.run_workload(work, variants, rounds)
        finally:
            self.results["elapsed_s"] = time.monotonic() - started
            self.bar.close()
            self.bar = None

    def run_workload(self, work: Workload, variants: list[Variant], rounds: int) -> None:
        """Alternate the variants of *work* for *rounds* rounds, each on a fresh mount
        (or on the mount another workload measured it on: see ``Params.book_on_alloc_mounts``)."""
        entry: dict[str, Any] = {
            "title": work.title, "rounds": rounds, "skipped": [], "errors": [], "notes": [],
            "sizes": self._sizes(work),
            "variants": [],
        }
        self.results["workloads"][work.name] = entry
        self.say(f"== {work.number}. {work.title}")
        for v in variants:
            if v.skip:
                entry["skipped"].append({"variant": v.label, "reason": v.skip})
                self.say(f"   skipped {v.label}: {v.skip}")
        need = max((v.hugepages_2m for v in variants if not v.skip), default=0)
        res: HugePageReservation | None = None
        if need:
            res = HugePageReservation(2048)
            self.reservations.append(res)
            free = res.ensure_free(need)
            self.say(f"   huge pages: {need} free 2M pages wanted for hugetlbfs, {free} free "
                     f"({res.added} added for this run)")
            if free < need:
                for v in variants:
                    if v.hugepages_2m and not v.skip:
                        v.skip = f"only {free} of {need} 2M huge pages could be reserved"
                        entry["skipped"].append({"variant": v.label, "reason": v.skip})
                        self.say(f"   skipped {v.label}: {v.skip}")
        try:
            for rnd in range(rounds):
                for v in variants:
                    if v.skip:
                        continue
                    shared = self.shared.pop((work.name, v.label, rnd), None)
                    if shared is not None:
                        self.results["samples"].append(shared)
                        assert self.bar is not None
                        self.bar.update(1)
                        self.say(f"   {work.name} r{rnd + 1} {v.label:<24} "
                                 + _brief(work, shared)
                                 + f" (on the {shared['mount_shared_with']} mount)")
                        continue
                    self.measure(work, v, rnd, rounds, entry)
        finally:
            if res is not None:
                res.release()
                self.reservations.remove(res)
                self.results.setdefault("hugepage_log", []).extend(res.log)
        entry["variants"] = [{"label": v.label, "kind": v.kind, "options": v.options,
                              "info": {k: val for k, val in v.info.items() if k != "output"},
                              "skip": v.skip} for v in variants]

    def _sizes(self, work: Workload) -> str:
        p = self.params
        if work.name in ("seq", "rand", "mmap", "guest"):
            extra = f", {p.rand_ops} operations of each kind" if work.name == "rand" else ""
            return f"file of {p.data_size / MIB:g} MiB{extra}"
        if work.name == "meta":
            return f"{p.meta_files} files in one directory"
        if work.name == "alloc":
            return (f"pools {', '.join(f'{s / GIB:g} GiB' for s in p.alloc_pools)}; dpages "
                    f"{', '.join(p.alloc_dpages)}; {p.alloc_reps} grow/shrink pairs per mount")
        return (f"pools {', '.join(f'{s / GIB:g} GiB' for s in p.book_pools)}; dpages "
                f"{', '.join(p.book_dpages)}")

    def measure(self, work: Workload, v: Variant, rnd: int, rounds: int,
                entry: dict[str, Any]) -> None:
        """Mount *v* fresh, run *work* on it, record the sample, unmount."""
        assert self.bar is not None
        self.bar.set_description(f"{work.name} {rnd + 1}/{rounds} {v.label}")
        sample: dict[str, Any] = {"workload": work.name, "variant": v.label, "kind": v.kind,
                                  "round": rnd + 1, "ok": False, "metrics": {},
                                  "loadavg": Path("/proc/loadavg").read_text().split()[:3]}
        reason = fits(v)
        if reason:
            entry["skipped"].append({"variant": v.label, "round": rnd + 1, "reason": reason})
            self.say(f"   skipped {v.label} (round {rnd + 1}): {reason}")
            self.bar.update(1)
            return
        path = self.root / f"{work.name}-{_slug(v.label)}-r{rnd + 1}"
        if v.kind == "delegate":
            self.bar.set_description(f"{work.name}: {v.label} (its own rounds, a few minutes)")
        try:
            with _mount(v, path, self.logs) as m:
                sample["mount"] = {"options": m.options, "seconds": round(m.mount_seconds, 3),
                                   "read_ahead_kb": m.read_ahead_kb(), "pid": m.pid,
                                   **m.details}
                started = time.perf_counter()
                metrics = work.run(v, m, self.params)
                sample["metrics"] = {k: val for k, val in metrics.items()
                                     if not k.startswith(BOOK_PREFIX)}
                book = {k.removeprefix(BOOK_PREFIX): val for k, val in metrics.items()
                        if k.startswith(BOOK_PREFIX)}
                if v.kind in ("dmemfs", "plainfs"):  # as the workload found it (the daemon
                    sample["bdi"] = m.bdi_knobs()     # may tune it after INIT)
                sample["seconds"] = round(time.perf_counter() - started, 3)
                sample["ok"] = True
                v.info["mount_failures"] = 0
                sample["info"] = {k: val for k, val in v.info.items() if k != "output"}
                if "output" in v.info:
                    (self.logs / f"{path.name}.out").write_text(v.info["output"])
                    entry["output"] = v.info["output"]
                if book:
                    # The mount and its time are charged to the workload that made it.
                    self.shared[("book", v.label, rnd)] = {
                        **sample, "workload": "book", "metrics": book, "seconds": 0.0,
                        "mount": {**sample["mount"], "seconds": 0.0},
                        "mount_shared_with": work.name}
        except MountError as exc:
            # Retried next round (huge pages may be taken by someone else for a moment);
            # given up after two failures in a row.
            sample["error"] = str(exc)
            failures = int(v.info.get("mount_failures", 0)) + 1
            v.info["mount_failures"] = failures
            reason = f"mount failed: {exc}"
            entry["skipped"].append({"variant": v.label, "round": rnd + 1, "reason": reason})
            if failures >= 2 or rnd + 1 == rounds:
                v.skip = reason
                self.say(f"   {v.label}: {reason} (given up)")
                self.bar.total = max(0, (self.bar.total or 0) - (rounds - rnd - 1))
            else:
                self.say(f"   {v.label}: {reason} (will retry next round)")
        except Exception as exc:
            sample["error"] = f"{type(exc).__name__}: {exc}"
            entry["errors"].append({"variant": v.label, "round": rnd + 1,
                                    "error": sample["error"]})
            self.say(f"   {v.label} round {rnd + 1} failed: {sample['error']}")
            (self.logs / f"{path.name}.traceback").write_text(traceback.format_exc())
        finally:
            with contextlib.suppress(OSError):
                path.rmdir()
        self.results["samples"].append(sample)
        self.bar.update(1)
        if sample["ok"]:
            self.say(f"   {work.name} r{rnd + 1} {v.label:<24} " + _brief(work, sample))

    def finish(self, out: Path, chart: bool) -> list[Path]:
        """Take everything down, then write the outputs; return the files written."""
        mounts.cleanup_all()
        for res in list(self.reservations):
            res.release()
            self.results.setdefault("hugepage_log", []).extend(res.log)
        self.results["finished"] = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
        self.results.setdefault("elapsed_s", 0.0)
        left = mounts.leftovers(self.root)
        self.results["leftover_mounts"] = left
        self.results["hugepages_at_end"] = machine.hugepage_state()
        if not left:
            shutil.rmtree(self.root, ignore_errors=True)
        report.summarize(self.results)
        out.mkdir(parents=True, exist_ok=True)
        files = [out / "bench-results.json", out / "bench-results.md"]
        report.write_json(self.results, files[0])
        files[1].write_text(report.markdown(self.results))
        if chart:
            files.append(out / "bench-results.png")
            report.chart(self.results, files[2])
        return files


def _brief(work: Workload, sample: dict[str, Any]) -> str:
    parts = []
    for metric in work.metrics:
        value = sample["metrics"].get(metric.key)
        if value is None or metric.unit in ("flag", "x"):
            continue
        parts.append(f"{metric.key}={report._fmt(value, metric)}")
    return " ".join(parts)


def main(argv: list[str] | None = None) -> int:
    """Entry point of tools/bench."""
    args = build_parser().parse_args(argv)
    if os.geteuid() != 0:
        print("bench: needs root (mounts, drop_caches, huge pages)", file=sys.stderr)
        return 2
    for tool in ("fusermount3", "mount", "umount"):
        if shutil.which(tool) is None:
            print(f"bench: {tool} is missing", file=sys.stderr)
            return 2
    if not mounts.DMEMFS.exists() and not args.dmemfs_cmd:
        print(f"bench: {mounts.DMEMFS} is missing; run tools/setup", file=sys.stderr)
        return 2
    if args.dmemfs_cmd:
        DMEMFS_CMD.extend(shlex.split(args.dmemfs_cmd))
    DMEMFS_BDI.update(item.split("=", 1) for item in args.dmemfs_bdi)
    # Ctrl-C raises KeyboardInterrupt even if we were started with SIGINT ignored (as a
    # background job of a non-interactive shell is); SIGTERM and SIGHUP do the same.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGHUP, _on_signal)
    bench = Bench(args)
    interrupted = False
    try:
        bench.run()
    except KeyboardInterrupt:
        interrupted = True
        print("\nbench: interrupted; unmounting and writing partial results", file=sys.stderr)
    finally:
        # Ignore a second Ctrl-C while taking things down.
        previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
        bench.results["interrupted"] = interrupted
        try:
            files = bench.finish(args.out, not args.no_chart)
        finally:
            signal.signal(signal.SIGINT, previous)
    for line in report.markdown(bench.results).split("## ")[1].splitlines()[1:]:
        if line.strip():
            print(line)
    print("wrote " + ", ".join(str(f) for f in files))
    left = bench.results["leftover_mounts"]
    if left:
        print("bench: WARNING: still mounted: " + ", ".join(left), file=sys.stderr)
        return 1
    return 130 if interrupted else 0
