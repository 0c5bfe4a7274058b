"""Load: many processes on one mount at once, and a long create/unlink churn.

The first test runs sixteen worker processes side by side for a bounded time, each in a
directory of its own, doing a random mix of create, pwrite, pread, truncate, MAP_SHARED
writes with msync, rename (within and across its subdirectories, sometimes over another
of its files), unlink, and a fallocate larger than the whole mount that must fail with
ENOSPC and change nothing.  Every read is checked against a model the worker keeps in
memory.  Afterwards the tree must hold exactly the files the workers last had, with the
bytes they last wrote; the pools' accounting must equal the dpages the files hold; the
daemon's own request counters must show no error but the ENOSPC provoked, the ENOENT of
looking up names before creating them and the EOPNOTSUPP for security.capability; and
removing everything must give every dpage and inode back.  The request latencies (p50,
p99) come from the daemon's metrics.

The second test runs 100,000 create/write/close/unlink cycles and checks that
the daemon gives back what it took: its anonymous memory (RssAnon: the region
is a shared mapping, so it is not counted there), its inodes and its dpages.

``DMEMFS_LOAD_SECONDS`` sets how long the workers run (60 s by default, as in CI), and
``DMEMFS_LOAD_SEED`` the seed a failed run printed (worker i uses seed + i).
Run as ``python test_load.py worker ...``, this file is the worker.
"""

from __future__ import annotations

import errno
import hashlib
import json
import mmap
import os
import random
import re
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import pytest
from mounting import dmemfs, free_port, metrics, path_options, wait_statfs

pytestmark = pytest.mark.mount

M = 1 << 20
K = 1 << 10

# -- concurrent workers ------------------------------------------------------------------------

WORKERS = 16
MAX_FILES = 3  # per worker at a time
DPAGE = 2 * M
TOTAL_DPAGES = 512
MOUNT_OPTIONS = f"size={TOTAL_DPAGES * 2}M,pagesize=2M"
MAX_FILE = 10 * M  # 5 dpages: 16 workers x 3 files x 5 = 240 of 512 at most
# Room for the dpages of removed files, which come back only when the kernel's FORGET
# reaches the daemon, a moment after the unlink or rename returned: the ENOSPC the test
# provokes is the only one it may see.
assert WORKERS * MAX_FILES * MAX_FILE // DPAGE <= TOTAL_DPAGES // 2
RUN_SECONDS = float(os.environ.get("DMEMFS_LOAD_SECONDS", "60"))
OPS = {"pwrite": 25, "pread": 25, "truncate": 8, "mmap": 12, "verify": 5, "create": 6,
       "rename": 8, "unlink": 5, "enospc": 2}
SUBDIRS = ("a", "b")
# Errors the daemon may count: a create looks its name up first (ENOENT); the kernel
# asks for security.capability at a file's first write, and the daemon keeps no
# security.* xattrs (EOPNOTSUPP); the fallocate larger than the mount fails on purpose.
EXPECTED_ERRORS = {("lookup", "ENOENT"), ("getxattr", errno.errorcode[errno.EOPNOTSUPP]),
                   ("fallocate", "ENOSPC")}


def read_exactly(fd: int, size: int) -> bytes:
    """The first *size* bytes of *fd*, read in as many calls as it takes."""
    parts = []
    done = 0
    while done < size:
        chunk = os.pread(fd, size - done, done)
        if not chunk:
            break
        parts.append(chunk)
        done += len(chunk)
    return b"".join(parts)


@dataclass
class File:
    """One of a worker's files: a read-write fd, an O_DIRECT fd and the bytes it holds."""

    fd: int
    direct: int  # O_DIRECT reads go to the daemon (after writing back dirty pages)
    model: bytearray

    def close(self) -> None:
        """Close both descriptors."""
        os.close(self.fd)
        os.close(self.direct)


class Worker:
    """One worker's directory, its files, the bytes each should hold, and the checks."""

    def __init__(self, root: Path, ident: int, seed: int) -> None:
        self.rng = random.Random(seed)
        self.home = root / f"w{ident}"
        self.home.mkdir()
        for sub in SUBDIRS:
            (self.home / sub).mkdir()
        self.files: dict[str, File] = {}  # path relative to home -> file
        self.made = 0
        self.counts: Counter[str] = Counter()
        for _ in range(MAX_FILES):
            self.create()

    def close(self) -> None:
        for file in self.files.values():
            file.close()

    def new_name(self) -> str:
        """A name never used in this worker's directory, in one of its subdirectories."""
        self.made += 1
        return f"{self.rng.choice(SUBDIRS)}/f{self.made}"

    def create(self) -> None:
        """A new empty file, opened for reading and writing and for O_DIRECT reads."""
        name = self.new_name()
        fd = os.open(self.home / name, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
        self.files[name] = File(fd, os.open(self.home / name, os.O_RDONLY | os.O_DIRECT),
                                bytearray())

    def remove(self, name: str) -> None:
        """Close and unlink *name*."""
        self.files.pop(name).close()
        os.unlink(self.home / name)

    def check(self, name: str, what: str, got: bytes, off: int, length: int) -> None:
        want = bytes(self.files[name].model[off:off + length])
        if got != want:
            pairs = zip(got, want, strict=False)
            diff = next((i for i, (a, b) in enumerate(pairs) if a != b), min(len(got), len(want)))
            raise AssertionError(f"{name}: {what} of {length} at {off}: got {len(got)} bytes, "
                                 f"want {len(want)}; first difference at {off + diff}")

    def step(self) -> None:
        """One random operation on one random file, checked against the model."""
        rng = self.rng
        name = rng.choice(sorted(self.files))
        file = self.files[name]
        fd, model = file.fd, file.model
        op = rng.choices(list(OPS), weights=list(OPS.values()))[0]
        if op == "mmap" and not model:
            op = "truncate"  # nothing to map yet
        if op == "create" and len(self.files) == MAX_FILES:
            op = "unlink"
        if op == "unlink" and len(self.files) == 1:
            op = "create"
        if op == "pwrite":
            off = rng.randrange(MAX_FILE)
            data = rng.randbytes(rng.randint(1, min(256 * K, MAX_FILE - off)))
            assert os.pwrite(fd, data, off) == len(data), f"{name}: short write"
            if off > len(model):
                model.extend(bytes(off - len(model)))
            model[off:off + len(data)] = data
        elif op == "pread":
            off = rng.randrange(len(model) + 64 * K)
            length = rng.randint(1, 512 * K)
            self.check(name, "pread", os.pread(fd, length, off), off, length)
        elif op == "truncate":
            size = rng.choice([0, rng.randrange(MAX_FILE + 1), rng.randrange(4 * DPAGE)])
            os.ftruncate(fd, size)
            if size < len(model):
                del model[size:]
            else:
                model.extend(bytes(size - len(model)))
        elif op == "mmap":
            self.mapped_writes(name)
        elif op == "verify":
            size = os.fstat(fd).st_size
            assert size == len(model), f"{name}: size {size}, want {len(model)}"
            self.check(name, "O_DIRECT read", read_exactly(file.direct, size + 1), 0, size + 1)
        elif op == "create":
            self.create()
        elif op == "unlink":
            self.remove(name)
        elif op == "rename":
            others = [other for other in self.files if other != name]
            target = rng.choice(others) if others and rng.random() < 0.3 else self.new_name()
            if target in self.files:  # rename over another file: that one is gone
                self.files.pop(target).close()
            os.rename(self.home / name, self.home / target)
            self.files[target] = self.files.pop(name)
        else:
            self.too_large(name)
        self.counts[op] += 1

    def too_large(self, name: str) -> None:
        """A fallocate of more than the whole mount: ENOSPC, and nothing changed."""
        file = self.files[name]
        before = os.fstat(file.fd)
        try:
            os.posix_fallocate(file.fd, 0, (TOTAL_DPAGES + 1) * DPAGE)
        except OSError as exc:
            assert exc.errno == errno.ENOSPC, f"{name}: fallocate failed with {exc}"
        else:
            raise AssertionError(f"{name}: a fallocate larger than the mount succeeded")
        after = os.fstat(file.fd)
        assert (after.st_size, after.st_blocks) == (before.st_size, before.st_blocks), name

    def mapped_writes(self, name: str) -> None:
        """A few writes through a MAP_SHARED mapping of the whole file, then msync."""
        rng, file = self.rng, self.files[name]
        model = file.model
        size = len(model)
        written = []
        with mmap.mmap(file.fd, size, mmap.MAP_SHARED,
                       mmap.PROT_READ | mmap.PROT_WRITE) as mapping:
            for _ in range(rng.randint(1, 4)):
                off = rng.randrange(size)
                data = rng.randbytes(rng.randint(1, min(64 * K, size - off)))
                mapping[off:off + len(data)] = data
                model[off:off + len(data)] = data
                written.append((off, len(data)))
            off = rng.randrange(size)
            length = rng.randint(1, 256 * K)
            self.check(name, "read through the mapping", mapping[off:off + length], off,
                       length)
            mapping.flush()  # msync(MS_SYNC)
        for off, length in written:  # the daemon has them now
            self.check(name, "O_DIRECT read after msync",
                       os.pread(file.direct, length, off), off, length)

    def report(self) -> dict[str, object]:
        files = {f"{self.home.name}/{name}": {"size": len(file.model),
                                              "sha256": hashlib.sha256(file.model).hexdigest()}
                 for name, file in self.files.items()}
        return {"files": files, "counts": dict(self.counts)}


def worker_main(root: str, ident: str, seed: str, seconds: str, report: str) -> None:
    """Run a worker for *seconds*, then write its final model's digests to *report*."""
    worker = Worker(Path(root), int(ident), int(seed))
    try:
        deadline = time.monotonic() + float(seconds)
        while time.monotonic() < deadline:
            worker.step()
        for name, file in worker.files.items():  # a last full check of every file
            size = len(file.model)
            worker.check(name, "final O_DIRECT read", read_exactly(file.direct, size + 1),
                         0, size + 1)
    finally:
        worker.close()
    Path(report).write_text(json.dumps(worker.report()))


def direct_read(path: Path) -> bytes:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    try:
        return read_exactly(fd, os.fstat(fd).st_size + 1)
    finally:
        os.close(fd)


SAMPLE = re.compile(r'(?P<name>\w+)\{(?P<labels>[^}]*)\}')


def labelled(values: dict[str, float], name: str) -> list[tuple[dict[str, str], float]]:
    """The samples of metric *name*: (labels, value) pairs."""
    out = []
    for key, value in values.items():
        match = SAMPLE.fullmatch(key)
        if match and match["name"] == name:
            labels = dict(re.findall(r'(\w+)="([^"]*)"', match["labels"]))
            out.append((labels, value))
    return out


def quantile(buckets: dict[float, float], q: float) -> float:
    """The *q* quantile of a cumulative histogram {upper bound: count}, interpolated
    linearly inside its bucket as Prometheus's histogram_quantile() does."""
    bounds = sorted(buckets)
    total = buckets[float("inf")]
    rank = q * total
    lower, below = 0.0, 0.0
    for bound in bounds:
        if buckets[bound] >= rank:
            if bound == float("inf"):
                return lower  # past the last finite bound: the most it can say
            return lower + (bound - lower) * (rank - below) / (buckets[bound] - below)
        lower, below = bound, buckets[bound]
    raise AssertionError("a histogram without its +Inf bucket")


def latencies(values: dict[str, float]) -> dict[str, tuple[int, float, float]]:
    """Per operation, and over all ("all"): request count, p50 and p99 in seconds."""
    per_op: dict[str, dict[float, float]] = {}
    for labels, value in labelled(values, "dmemfs_fuse_request_duration_seconds_bucket"):
        bound = float(labels["le"])
        per_op.setdefault(labels["op"], {})[bound] = value
        overall = per_op.setdefault("all", {})
        overall[bound] = overall.get(bound, 0.0) + value
    return {op: (int(buckets[float("inf")]), quantile(buckets, 0.5), quantile(buckets, 0.99))
            for op, buckets in per_op.items()}


@pytest.mark.timeout(RUN_SECONDS + 240)
def test_concurrent_workers_keep_their_bytes_and_the_accounting(tmp_path: Path,
                                                                data_path: str) -> None:
    """Sixteen processes at once: every byte read back is right, and nothing is lost.

    Each worker checks its reads during the run; afterwards the parent reads every file
    from the daemon and compares its digest with the worker's model, checks that used
    dpages equal the sum over the files of st_blocks in dpages (and that no file holds a
    dpage past its end), that the daemon counted the workers' ENOSPC and no other
    unexpected error, and that removing the files gives every dpage and inode back.
    """
    seed = int(os.environ.get("DMEMFS_LOAD_SEED", random.randrange(1 << 32)))
    print(f"\n{data_path}: DMEMFS_LOAD_SEED={seed}")
    port = free_port()
    options = f"{MOUNT_OPTIONS},metrics={port},{path_options(data_path)}"
    with dmemfs(tmp_path, options) as mount:
        start = mount.statvfs()
        assert start.f_bsize == DPAGE and start.f_bfree == start.f_blocks == TOTAL_DPAGES
        reports = [tmp_path / f"worker-{i}.json" for i in range(WORKERS)]
        logs = [tmp_path / f"worker-{i}.err" for i in range(WORKERS)]
        procs = []
        try:
            for i in range(WORKERS):
                with open(logs[i], "wb") as err:
                    procs.append(subprocess.Popen(
                        [sys.executable, __file__, "worker", str(mount.path), str(i),
                         str(seed + i), str(RUN_SECONDS), str(reports[i])],
                        stdout=subprocess.DEVNULL, stderr=err, stdin=subprocess.DEVNULL))
            for proc in procs:
                proc.wait(timeout=RUN_SECONDS + 120)
        finally:
            for proc in procs:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
        for i, proc in enumerate(procs):
            assert proc.returncode == 0, (f"worker {i} (seed {seed + i}) exited with "
                                          f"{proc.returncode}:\n{logs[i].read_text()}")
        expected: dict[str, dict[str, object]] = {}
        counts: Counter[str] = Counter()
        for report in reports:
            data = json.loads(report.read_text())
            expected.update(data["files"])
            counts.update(data["counts"])
        assert set(counts) == set(OPS), f"some operation never ran: {counts}"
        found = sorted(str(path.relative_to(mount.path)) for path in mount.path.rglob("*")
                       if path.is_file())
        assert found == sorted(expected)

        held = 0
        for name, want in expected.items():
            path = mount.path / name
            st = os.stat(path)
            assert st.st_size == want["size"], name
            assert hashlib.sha256(direct_read(path)).hexdigest() == want["sha256"], name
            assert hashlib.sha256(path.read_bytes()).hexdigest() == want["sha256"], name
            assert st.st_blocks * 512 % DPAGE == 0, (name, st.st_blocks)
            dpages = st.st_blocks * 512 // DPAGE
            assert dpages <= -(-st.st_size // DPAGE), f"{name} holds dpages past its end"
            held += dpages
        # Removed files' dpages come back with their FORGET, a moment after the run.
        vfs = wait_statfs(mount.path, start.f_blocks - held,
                          start.f_ffree - len(expected) - WORKERS * (1 + len(SUBDIRS)))
        assert vfs.f_blocks - vfs.f_bfree == held, (vfs, held)
        assert vfs.f_ffree == start.f_ffree - len(expected) - WORKERS * (1 + len(SUBDIRS))

        values = metrics(port)
        errors = {(labels["op"], labels["result"]): int(value)
                  for labels, value in labelled(values, "dmemfs_fuse_requests_total")
                  if labels["result"] != "ok"}
        assert set(errors) <= EXPECTED_ERRORS, errors
        assert errors.get(("fallocate", "ENOSPC"), 0) == counts["enospc"], (errors, counts)
        timing = latencies(values)
        print(f"{data_path}: {WORKERS} workers for {RUN_SECONDS:.0f} s, "
              f"operations: {dict(counts)}")
        for op, (requests, p50, p99) in sorted(timing.items(), key=lambda item: -item[1][0]):
            print(f"  {op:12} {requests:9} requests  p50 {p50 * 1e6:8.0f} us  "
                  f"p99 {p99 * 1e6:8.0f} us")

        for name in expected:
            os.unlink(mount.path / name)
        for worker in range(WORKERS):
            for sub in SUBDIRS:
                os.rmdir(mount.path / f"w{worker}" / sub)
            os.rmdir(mount.path / f"w{worker}")
        vfs = wait_statfs(mount.path, start.f_bfree, start.f_ffree)
        assert (vfs.f_bfree, vfs.f_bavail) == (vfs.f_blocks, vfs.f_blocks)
        assert vfs.f_ffree == start.f_ffree
    assert mount.exit_code == 0, mount.log()


# -- create/unlink churn -----------------------------------------------------------------------

WARMUP_CYCLES = 5_000
CYCLES = 100_000
# 4 MiB over 100,000 cycles catches any leak of 42 bytes or more a cycle.  A cycle is
# about five FUSE requests, so one small object kept per request (an int in a list, ~36
# bytes) is well above that, and a file handle kept per cycle (~200 bytes) far above.
# Without a leak RssAnon moved by less than 16 KiB in every run measured, so 4 MiB leaves
# room for a few CPython allocator arenas (1 MiB each) and dict resizes.
RSS_BOUND = 4 * M


def rss_anon(pid: int) -> int:
    """The anonymous resident memory of *pid*, in bytes."""
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    raise AssertionError(f"no RssAnon in /proc/{pid}/status")


def churn(root: Path, cycles: int) -> None:
    """*cycles* times: create a file, write a little to it, close it, remove it."""
    payload = b"x" * 100
    for i in range(cycles):
        path = f"{root}/churn-{i % 64}"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            assert os.write(fd, payload) == len(payload)
        finally:
            os.close(fd)
        os.unlink(path)


@pytest.mark.timeout(400)
def test_create_unlink_churn_returns_memory(tmp_path: Path) -> None:
    """100,000 create/write/close/unlink cycles leave the daemon's memory where it was.

    RssAnon after the cycles is within RSS_BOUND of its value after a warm-up (which lets
    caches, interned strings and allocator pools reach their working size), and every
    inode and dpage is free again.
    """
    with dmemfs(tmp_path) as mount:
        pid = mount.proc.pid
        with open(f"/proc/{pid}/cmdline", "rb") as cmdline:
            assert b"dmemfs_fuse.host.cli" in cmdline.read(), "not the daemon's pid"
        start = mount.statvfs()
        churn(mount.path, WARMUP_CYCLES)
        wait_statfs(mount.path, start.f_bfree, start.f_ffree)
        base = rss_anon(pid)
        began = time.monotonic()
        churn(mount.path, CYCLES)
        elapsed = time.monotonic() - began
        vfs = wait_statfs(mount.path, start.f_bfree, start.f_ffree)
        after = rss_anon(pid)
        print(f"\n{CYCLES} cycles in {elapsed:.1f} s ({elapsed / CYCLES * 1e6:.0f} us each); "
              f"RssAnon {base / M:.2f} MiB -> {after / M:.2f} MiB")
        assert after - base < RSS_BOUND, (base, after)
        assert vfs.f_ffree == start.f_ffree
        assert vfs.f_bfree == start.f_bfree == vfs.f_blocks
        assert os.listdir(mount.path) == []
    assert mount.exit_code == 0, mount.log()


if __name__ == "__main__":
    if len(sys.argv) != 7 or sys.argv[1] != "worker":
        sys.exit(f"usage: {sys.argv[0]} worker ROOT IDENT SEED SECONDS REPORT")
    worker_main(*sys.argv[2:])
