"""The benchmark itself must not rot: its --quick mode runs every workload, small."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

pytestmark = pytest.mark.mount
ROOT = Path(__file__).resolve().parent.parent


def test_bench_quick_runs_every_workload(tmp_path: Path) -> None:
    result = subprocess.run([str(ROOT / "tools" / "bench"), "--quick", "--out", str(tmp_path)],
                            capture_output=True, text=True, timeout=600, check=False)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    data = json.loads((tmp_path / "bench-results.json").read_text())
    assert set(data["workloads"]) >= {"seq", "rand", "mmap", "guest", "meta", "alloc", "book"}
    # bookkeeping is read on the allocation workload's mounts: one sample per
    # (variant, round), taken on an allocation mount unless that mount failed
    book = [s for s in data["samples"] if s["workload"] == "book"]
    keys = [(s["variant"], s["round"]) for s in book]
    assert book and len(keys) == len(set(keys)) and all(s["ok"] for s in book)
    assert all(s["metrics"]["full_nonregion_rss"] > 0 for s in book)
    alloc_mounts = {(s["variant"], s["round"]) for s in data["samples"]
                    if s["workload"] == "alloc" and s["ok"] and s["kind"] == "dmemfs"}
    shared = {(s["variant"], s["round"]) for s in book if s.get("mount_shared_with")}
    assert shared and shared <= alloc_mounts
    assert all(s.get("mount_shared_with") == "alloc" for s in book
               if (s["variant"], s["round"]) in alloc_mounts)
    assert not data["interrupted"] and data["leftover_mounts"] == []
    assert data["targets"], "no target was evaluated"
    assert (tmp_path / "bench-results.md").read_text().startswith("# dmemfs-fuse benchmark")
    assert (tmp_path / "bench-results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
