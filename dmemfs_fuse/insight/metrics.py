"""Prometheus metrics: pool gauges read at scrape time, request counters kept as they happen.

Served by a small HTTP endpoint on the daemon's own trio loop (not a
thread), so a scrape reads the pools in one consistent step.  Exposition
uses prometheus_client; names follow its conventions (``_bytes``,
``_total``, ``_seconds``).
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Iterator

import trio
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from ..alloc.pool import PoolStats
from .report import Reporter

log = logging.getLogger(__name__)

SEND_TIMEOUT = 10.0  # seconds for a client to take its answer
LATENCY_BUCKETS = (1e-5, 2.5e-5, 5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 1e-2, 0.1, 1.0)


class RequestMetrics:
    """Counters and latency histograms of FUSE requests, by operation."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        registry = self.registry
        self.requests = Counter("dmemfs_fuse_requests", "FUSE requests handled",
                                ["op", "result"], registry=registry)
        self.latency = Histogram("dmemfs_fuse_request_duration_seconds",
                                 "Time the daemon spent on a FUSE request", ["op"],
                                 buckets=LATENCY_BUCKETS, registry=registry)
        self.read_bytes = Counter("dmemfs_read_bytes", "Bytes returned by READ",
                                  registry=registry)
        self.written_bytes = Counter("dmemfs_written_bytes", "Bytes stored by WRITE",
                                     registry=registry)

    def observe(self, op: str, seconds: float, result: str) -> None:
        """Count one request of *op* taking *seconds*; *result* is ok or an errno name."""
        self.requests.labels(op, result).inc()
        self.latency.labels(op).observe(seconds)

    def read(self, nbytes: int) -> None:
        """Count *nbytes* returned by a READ."""
        self.read_bytes.inc(nbytes)

    def wrote(self, nbytes: int) -> None:
        """Count *nbytes* stored by a WRITE."""
        self.written_bytes.inc(nbytes)


class PoolCollector(Collector):
    """Per-pool gauges and counters, read from the reporter's snapshot at scrape time."""

    def __init__(self, reporter: Reporter) -> None:
        self.reporter = reporter

    def collect(self) -> Iterator[Metric]:
        stats = self.reporter.statistics()
        dps = stats.pools.dpage_size
        labels = ["pool", "node"]
        pools = [([str(pool_id), str(st.node)], st)
                 for pool_id, st in zip(stats.pool_ids, stats.pools.pools, strict=True)]
        gauge, counter = GaugeMetricFamily, CounterMetricFamily
        per_pool: list[tuple[type[GaugeMetricFamily] | type[CounterMetricFamily], str, str,
                             Callable[[PoolStats], float]]] = [
            (gauge, "total_bytes", "Bytes in the pool", lambda p: p.total_dpages * dps),
            (gauge, "free_bytes", "Free bytes in the pool", lambda p: p.free_dpages * dps),
            (gauge, "used_bytes", "Allocated bytes in the pool", lambda p: p.used_dpages * dps),
            (gauge, "largest_free_run_bytes", "Longest run of free dpages, in bytes",
             lambda p: p.largest_free_run * dps),
            (gauge, "free_runs", "Separate runs of free dpages", lambda p: p.free_runs),
            (gauge, "fragmentation_ratio", "1 - largest free run / free space",
             lambda p: round(p.fragmentation, 4)),
            (gauge, "bad_dpages", "Dpages marked bad (memory errors), never handed out again",
             lambda p: p.bad_dpages),
            (counter, "allocations", "Allocation calls served by the pool", lambda p: p.allocs),
            (counter, "frees", "Free calls served by the pool", lambda p: p.frees),
            (counter, "preferred_fallback_dpages", "Dpages a preferred policy took elsewhere",
             lambda p: p.fallback_dpages),
        ]
        for kind, name, text, value in per_pool:
            family = kind(f"dmemfs_pool_{name}", text, labels=labels)
            for pool_labels, st in pools:
                family.add_metric(pool_labels, value(st))
            yield family
        yield CounterMetricFamily("dmemfs_enospc", "Allocations refused for lack of space",
                                  value=stats.pools.enospc)
        yield GaugeMetricFamily("dmemfs_dirty_bytes",
                                "Bytes of old data not zeroed yet (the zeroer's backlog)",
                                value=stats.dirty_dpages() * dps)
        if stats.zeroing is not None:  # the region path's zeroer (shmem zeroes on passthrough)
            yield CounterMetricFamily("dmemfs_background_zeroed_bytes",
                                      "Bytes zeroed by the background zeroer",
                                      value=stats.zeroing.background_zeroed_dpages * dps)
            yield CounterMetricFamily("dmemfs_foreground_zeroed_bytes",
                                      "Bytes zeroed inside requests (the zeroer had not "
                                      "caught up)",
                                      value=stats.zeroing.foreground_zeroed_dpages * dps)
        info = GaugeMetricFamily("dmemfs_data_path_info",
                                 "The mount's data path (passthrough or region) and why",
                                 labels=["path", "reason"])
        info.add_metric([stats.data_path.name, stats.data_path.reason], 1)
        yield info
        if stats.pool_memory is not None:
            reserve = GaugeMetricFamily("dmemfs_pool_reserve_bytes",
                                        "Passthrough: pool memory taken and not lent to files",
                                        labels=labels)
            lent = GaugeMetricFamily("dmemfs_pool_file_bytes",
                                     "Passthrough: pool memory the kernel counts in files",
                                     labels=labels)
            for (pool_labels, _), memory in zip(pools, stats.pool_memory, strict=True):
                reserve.add_metric(pool_labels, memory.reserve_bytes)
                lent.add_metric(pool_labels, memory.file_bytes)
            yield reserve
            yield lent
        yield GaugeMetricFamily("dmemfs_dpage_size_bytes", "Bytes per dpage", value=dps)
        yield GaugeMetricFamily("dmemfs_inodes_used", "Inodes in use", value=stats.inodes_used)
        yield GaugeMetricFamily("dmemfs_inodes_total", "Most inodes there may be",
                                value=stats.inodes_total)
        yield CounterMetricFamily("dmemfs_memory_errors", "Dpages newly marked bad since start",
                                  value=stats.memory_errors)
        journal = stats.journal
        if journal is not None:
            yield GaugeMetricFamily("dmemfs_journal_log_bytes",
                                    "Journal bytes appended since the last checkpoint",
                                    value=journal.log_bytes)
            yield CounterMetricFamily("dmemfs_journal_checkpoints",
                                      "Metadata checkpoints written since start",
                                      value=journal.checkpoints)
            yield CounterMetricFamily("dmemfs_journal_failures",
                                      "Journal writes that failed since start",
                                      value=journal.failures)
            yield GaugeMetricFamily("dmemfs_journal_healthy",
                                    "1 while the journal is written, 0 after a failure",
                                    value=int(journal.healthy))


def registry_for(reporter: Reporter, requests: RequestMetrics) -> CollectorRegistry:
    """*requests*' registry with the pool collector on *reporter* added to it."""
    requests.registry.register(PoolCollector(reporter))
    return requests.registry


async def serve(host: str, port: int, registry: CollectorRegistry,
                task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
    """Answer ``GET /metrics`` on *host*:*port* until cancelled."""
    listeners = await trio.open_tcp_listeners(port, host=host)
    try:
        log.info("metrics on http://%s:%d/metrics", host, port)
        task_status.started()
        await trio.serve_listeners(functools.partial(_handle, registry=registry), listeners)
    finally:
        for listener in listeners:  # so that a restart can bind the port again
            listener.socket.close()


async def _handle(stream: trio.SocketStream, registry: CollectorRegistry) -> None:
    try:
        data = b""
        with trio.move_on_after(5):
            while b"\r\n\r\n" not in data and len(data) < 8192:
                chunk = await stream.receive_some(4096)
                if not chunk:
                    break
                data += chunk
        request = data.split(b"\r\n", 1)[0].split()
        if len(request) >= 2 and request[0] == b"GET" and request[1].split(b"?")[0] in (
                b"/metrics", b"/"):
            status, ctype, body = "200 OK", CONTENT_TYPE_LATEST, generate_latest(registry)
        else:
            status, ctype, body = "404 Not Found", "text/plain", b"try /metrics\n"
        head = (f"HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\n"
                f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode()
        with trio.move_on_after(SEND_TIMEOUT):  # a client that never reads
            await stream.send_all(head + body)
    except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
        log.debug("metrics client went away: %s", exc)
    except Exception:
        log.exception("metrics request failed")
    finally:
        await stream.aclose()
