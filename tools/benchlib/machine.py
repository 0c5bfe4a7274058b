"""The machine under test: a summary for the report, caches, memory and huge page reservations."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from dataclasses import dataclass, field
from importlib.metadata import version
from pathlib import Path
from typing import Any

GIB = 1 << 30
MIB = 1 << 20
KIB = 1 << 10
HUGE_ROOT = Path("/sys/kernel/mm/hugepages")
REPO = Path(__file__).resolve().parents[2]


def meminfo() -> dict[str, int]:
    """/proc/meminfo in bytes (counts such as HugePages_Total stay counts)."""
    out: dict[str, int] = {}
    for line in Path("/proc/meminfo").read_text().splitlines():
        key, _, rest = line.partition(":")
        parts = rest.split()
        if not parts:
            continue
        value = int(parts[0])
        out[key] = value * KIB if len(parts) > 1 and parts[1] == "kB" else value
    return out


def mem_available() -> int:
    """MemAvailable in bytes."""
    return meminfo().get("MemAvailable", 0)


def drop_caches() -> None:
    """sync, then drop the page cache, dentries and inodes (echo 3 > drop_caches)."""
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


def _read_int(path: Path) -> int:
    return int(path.read_text().strip())


def hugepage_state() -> dict[str, dict[str, int]]:
    """nr/free/resv/surplus per huge page size, e.g. ``{"2M": {"nr": 0, ...}}``."""
    out: dict[str, dict[str, int]] = {}
    if not HUGE_ROOT.is_dir():
        return out
    for entry in sorted(HUGE_ROOT.iterdir()):
        kb = int(entry.name.removeprefix("hugepages-").removesuffix("kB"))
        label = f"{kb // 1024}M" if kb < 1024 * 1024 else f"{kb // (1024 * 1024)}G"
        out[label] = {
            "nr": _read_int(entry / "nr_hugepages"),
            "free": _read_int(entry / "free_hugepages"),
            "resv": _read_int(entry / "resv_hugepages"),
            "surplus": _read_int(entry / "surplus_hugepages"),
        }
    return out


def _text(path: str) -> str:
    try:
        return Path(path).read_text().strip()
    except OSError:
        return "n/a"


def _command(*argv: str) -> str:
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return "n/a"
    return (done.stdout or done.stderr).strip().splitlines()[0] if (
        done.stdout or done.stderr).strip() else "n/a"


def _version(module: str) -> str:
    try:
        return version(module)
    except Exception:
        return "n/a"


def _cpu_model() -> str:
    for line in _text("/proc/cpuinfo").splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "n/a"


def summary() -> dict[str, Any]:
    """Cores, memory, kernel, huge page state and software versions, as plain data."""
    info = meminfo()
    git = _command("git", "-C", str(REPO), "rev-parse", "--short", "HEAD")
    dirty = _command("git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=no")
    return {
        "hostname": platform.node(),
        "cores": os.cpu_count(),
        "cpu_model": _cpu_model(),
        "virtualization": _command("systemd-detect-virt"),
        "mem_total_bytes": info.get("MemTotal", 0),
        "mem_available_bytes": info.get("MemAvailable", 0),
        "kernel": platform.release(),
        "kernel_version": platform.version(),
        "os": _text("/etc/debian_version"),
        "hugepages": hugepage_state(),
        "hugetlb_optimize_vmemmap": _text("/proc/sys/vm/hugetlb_optimize_vmemmap"),
        "thp_enabled": _text("/sys/kernel/mm/transparent_hugepage/enabled"),
        "thp_shmem_enabled": _text("/sys/kernel/mm/transparent_hugepage/shmem_enabled"),
        "fuse_max_pages_limit": _text("/proc/sys/fs/fuse/max_pages_limit"),
        "loadavg": _text("/proc/loadavg"),
        "python": sys.version.split()[0],
        "pyfuse3": _version("pyfuse3"),
        "trio": _version("trio"),
        "libfuse": _command("fusermount3", "-V"),
        "dmemfs_fuse": _version("dmemfs-fuse"),
        "git_commit": git + ("+uncommitted" if dirty not in ("", "n/a") else ""),
    }


def describe(machine: dict[str, Any]) -> list[str]:
    """The summary as a few human lines (for the terminal and the Markdown report)."""
    huge = ", ".join(f"{size}: {s['nr']} reserved, {s['free']} free"
                     for size, s in machine["hugepages"].items())
    return [
        f"machine: {machine['cores']} cores ({machine['cpu_model']}, "
        f"virt: {machine['virtualization']}), "
        f"{machine['mem_total_bytes'] / GIB:.1f} GiB memory "
        f"({machine['mem_available_bytes'] / GIB:.1f} GiB available at start)",
        f"kernel: Linux {machine['kernel']} ({machine['os'] and 'Debian ' + machine['os']}); "
        f"load average at start: {machine['loadavg']}",
        f"huge pages: {huge}; hugetlb_optimize_vmemmap={machine['hugetlb_optimize_vmemmap']}; "
        f"THP: {machine['thp_enabled']}",
        f"software: Python {machine['python']}, pyfuse3 {machine['pyfuse3']}, trio "
        f"{machine['trio']}, {machine['libfuse']}, dmemfs-fuse {machine['dmemfs_fuse']} "
        f"(git {machine['git_commit']})",
    ]


@dataclass
class HugePageReservation:
    """Huge pages this run added to the kernel's pool; release() takes back exactly those.

    Works with increments, not absolute values, so a concurrent change by
    someone else is left alone.
    """

    size_kb: int
    added: int = 0
    log: list[str] = field(default_factory=list)

    @property
    def path(self) -> Path:
        """The pool's nr_hugepages file."""
        return HUGE_ROOT / f"hugepages-{self.size_kb}kB" / "nr_hugepages"

    def _free(self) -> int:
        root = self.path.parent
        return _read_int(root / "free_hugepages") - _read_int(root / "resv_hugepages")

    def ensure_free(self, count: int) -> int:
        """Make at least *count* pages free (adding what is missing); return how many are free."""
        missing = count - self._free()
        if missing > 0:
            before = _read_int(self.path)
            self.path.write_text(f"{before + missing}\n")
            after = _read_int(self.path)
            self.added += max(0, after - before)
            self.log.append(f"nr_hugepages({self.size_kb} kB): {before} -> {after} "
                            f"(wanted +{missing})")
        return self._free()

    def release(self) -> None:
        """Give back exactly the pages added."""
        if self.added:
            before = _read_int(self.path)
            self.path.write_text(f"{max(0, before - self.added)}\n")
            after = _read_int(self.path)
            self.log.append(f"nr_hugepages({self.size_kb} kB): {before} -> {after} (gave back "
                            f"{self.added})")
            self.added -= before - after
