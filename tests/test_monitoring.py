"""The shipped monitoring (monitoring/): Prometheus alerting rules checked and unit-tested
with promtool, and a Grafana dashboard that is valid JSON and names only metrics a real
daemon exports."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from mounting import dmemfs, free_port, metrics

MONITORING = Path(__file__).resolve().parent.parent / "monitoring"
RULES = MONITORING / "dmemfs-alerts.yml"
RULE_TESTS = MONITORING / "dmemfs-alerts.test.yml"
DASHBOARD = MONITORING / "dmemfs-dashboard.json"
# tools/setup takes promtool from Debian's prometheus package into the venv.
PROMTOOL = Path(sys.executable).parent / "promtool"
METRIC = re.compile(r"\bdmemfs_[a-z_]+\b")


def promtool(*args: str) -> subprocess.CompletedProcess[str]:
    if not PROMTOOL.exists():
        pytest.fail(f"{PROMTOOL} is missing; run tools/setup")
    return subprocess.run([str(PROMTOOL), *args], capture_output=True, text=True, timeout=120,
                          check=False, cwd=MONITORING)


def test_the_alert_rules_are_valid() -> None:
    result = promtool("check", "rules", RULES.name)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS: 5 rules found" in result.stdout


def test_each_alert_fires_when_it_should_and_not_before() -> None:
    """promtool's rule unit tests: pool nearly full, ENOSPC, memory errors, the journal
    failing and the daemon gone, each with the series that fires it and a time before."""
    result = promtool("test", "rules", RULE_TESTS.name)
    assert result.returncode == 0, result.stdout + result.stderr
    alerts = set(re.findall(r"alert: (\w+)", RULES.read_text()))
    assert alerts == {"DmemfsPoolNearlyFull", "DmemfsEnospc", "DmemfsMemoryErrors",
                      "DmemfsJournalFailing", "DmemfsDown"}
    assert set(re.findall(r"alertname: (\w+)", RULE_TESTS.read_text())) == alerts


def dashboard_expressions() -> list[str]:
    dash = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p["targets"]]
    exprs += [v["query"] for v in dash["templating"]["list"]]
    return exprs


def test_the_dashboard_is_a_grafana_dashboard() -> None:
    dash = json.loads(DASHBOARD.read_text())
    assert dash["title"] == "dmemfs" and dash["schemaVersion"] >= 36
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids)) and all(p["targets"] for p in dash["panels"])
    assert dash["__inputs"][0]["pluginId"] == "prometheus"


def test_rules_and_dashboard_name_only_exported_metrics(tmp_path: Path) -> None:
    """Every dmemfs_* name in the rules and the dashboard is in a real daemon's /metrics,
    on a persistent mount (which adds the journal's metrics)."""
    named = set(METRIC.findall(RULES.read_text()))
    for expr in dashboard_expressions():
        named |= set(METRIC.findall(expr))
    port = free_port()
    region = tmp_path / "region"
    with dmemfs(tmp_path, f"size=16M,pagesize=4K,region={region},metrics={port}") as mount:
        (mount.path / "f").write_bytes(b"x" * 8192)
        exported = {re.sub(r"\{.*", "", name) for name in metrics(port)}
    assert mount.exit_code == 0, mount.log()
    assert named - exported == set(), f"not exported: {sorted(named - exported)}"
    # The dashboard covers the pools, the request latencies and the memory errors.
    assert {"dmemfs_pool_free_bytes", "dmemfs_fuse_request_duration_seconds_bucket",
            "dmemfs_memory_errors_total"} <= named
