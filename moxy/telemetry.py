"""What Moxy tells its operators: Prometheus metrics, the JSON access-log line, the measured upstream fetch, the
tier gauges and the disk-fault report. Imports no web framework; the routes and the hit memo call it.

With several worker processes each keeps its own counters; prometheus_client's multiprocess mode (files in
PROMETHEUS_MULTIPROC_DIR, set by `moxy serve` before the workers start) lets whichever worker answers /metrics
report the sum. Without that variable the registry is this process's own. Keys and full Moxy URLs never appear
in a log line: a path is logged as a short digest."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import sys
import time
import traceback
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import orjson
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
    multiprocess as _multiprocess,
)

from moxy.errors import UpstreamError

if TYPE_CHECKING:
    from moxy.cache import DiskStorage, MemoryStorage
    from moxy.proxy import Fetch
    from moxy.upstream import UpstreamResponse

__all__ = [
    "CONTENT_TYPE",
    "INTERNAL_ERROR",
    "DiskReport",
    "Metrics",
    "log_access",
    "log_internal_error",
    "measured",
    "multiprocess_dir",
    "path_digest",
    "report_tiers",
    "set_tier_gauges",
    "write_record",
]

# The *_created series double the page for a start time nobody graphs (and multiprocess mode has none).
disable_created_metrics()  # type: ignore[no-untyped-call]

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
# From a sub-millisecond memory hit to a slow upstream near the total timeout.
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


def multiprocess_dir() -> str | None:
    return os.environ.get("PROMETHEUS_MULTIPROC_DIR") or None


class Metrics:
    """Requests by status and cache result, latency (total and upstream), upstream failures and validation
    rejections by reason, fetches in flight, bytes and items per tier, disk faults, internal errors. One instance
    per app; its registry is never the global one, so two apps in one process (tests) do not collide."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        registry = self.registry
        self.requests = Counter("moxy_requests", "Answered requests.", ["status", "cache"], registry=registry)
        self.request_seconds = Histogram(
            "moxy_request_duration_seconds", "Time to answer a request.", buckets=LATENCY_BUCKETS, registry=registry
        )
        self.upstream_seconds = Histogram(
            "moxy_upstream_duration_seconds",
            "Time from sending an upstream request to its whole body.",
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.upstream_failures = Counter(
            "moxy_upstream_failures", "Upstream fetches that failed, by reason.", ["reason"], registry=registry
        )
        self.internal_errors = Counter(
            "moxy_internal_errors",
            "Requests Moxy's own code failed to answer (a bug: the answer was a 500); zero in a healthy deployment.",
            registry=registry,
        )
        self.rejections = Counter(
            "moxy_validation_rejections",
            "Upstream answers refused by validation, by reason.",
            ["reason"],
            registry=registry,
        )
        self.in_flight = Gauge(
            "moxy_upstream_fetches_in_flight",
            "Upstream fetches under way.",
            registry=registry,
            multiprocess_mode="livesum",
        )
        # The memory tier is per worker (summed); the disk tier is one folder that every worker sees whole.
        self.memory_bytes = Gauge(
            "moxy_memory_cache_bytes", "Bytes held by memory tiers.", registry=registry, multiprocess_mode="livesum"
        )
        self.memory_items = Gauge(
            "moxy_memory_cache_items", "Entries held by memory tiers.", registry=registry, multiprocess_mode="livesum"
        )
        self.disk_bytes = Gauge(
            "moxy_disk_cache_bytes", "Bytes held by the disk tier.", registry=registry, multiprocess_mode="livemax"
        )
        # Counters, so each worker's failures add up in multiprocess mode like every other counter here.
        self.disk_failures = Counter(
            "moxy_disk_failures",
            "Cache folder operations that failed (Moxy served on without the disk), by operation and error class.",
            ["operation", "error"],
            registry=registry,
        )
        # The answer nearly every request gets, bound once: labels() takes a lock and a dict lookup.
        self._hit = self.requests.labels(status="200", cache="HIT")

    def count_hit(self, seconds: float) -> None:
        self._hit.inc()
        self.request_seconds.observe(seconds)

    def count_request(self, status: int, cache: str, seconds: float) -> None:
        self.requests.labels(status=str(status), cache=cache).inc()
        self.request_seconds.observe(seconds)

    def render(self) -> bytes:
        directory = multiprocess_dir()
        if directory is None:
            return generate_latest(self.registry)
        # Multiprocess mode: every worker's files, this one's included, not this process's registry.
        combined = CollectorRegistry()
        _multiprocess.MultiProcessCollector(combined, path=directory)  # type: ignore[no-untyped-call]
        return generate_latest(combined)

    def forget_dead_workers(self) -> None:
        """Drop the live gauges of workers that died without a clean exit (SIGKILL, OOM): uvicorn replaces them,
        and their last memory and in-flight figures must not be added in for ever."""
        directory = multiprocess_dir()
        if directory is None:
            return
        for name in os.listdir(directory):
            if not (name.startswith("gauge_live") and name.endswith(".db")):
                continue
            pid_text = name[:-3].rpartition("_")[2]
            if pid_text.isdigit() and not _alive(int(pid_text)):
                _multiprocess.mark_process_dead(int(pid_text), directory)  # type: ignore[no-untyped-call]

    def close(self) -> None:
        """Drop this worker's live gauges from the shared files (its counters stay: they are history)."""
        if multiprocess_dir() is not None:
            _multiprocess.mark_process_dead(os.getpid())  # type: ignore[no-untyped-call]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    return True


# -- the access log and the error log -----------------------------------------------------------------------------

# The reason of an answer Moxy gives when its own code failed: a bug, and what the tests look for in every log.
INTERNAL_ERROR = "internal-error"


def path_digest(path: str) -> str:
    return hashlib.sha256(path.encode("utf-8", "surrogateescape")).hexdigest()[:16]


def write_record(record: Mapping[str, Any]) -> None:
    """One JSON line on stderr."""
    with contextlib.suppress(OSError, ValueError):  # a closed stderr must never fail a request
        sys.stderr.buffer.write(orjson.dumps(record) + b"\n")
        sys.stderr.flush()


def log_access(
    method: str,
    path: str,
    status: int,
    cache: str,
    reason: str | None,
    upstream_status: int | None,
    upstream_seconds: float | None,
    sent: int,
    started: float,
) -> None:
    """The access-log line of one answer; `started` is its time.perf_counter() on arrival."""
    write_record(
        {
            "time": round(time.time(), 3),
            "method": method,
            "path": path_digest(path),
            "status": status,
            "cache": cache,
            "reason": reason,
            "upstream_status": upstream_status,
            "upstream_ms": None if upstream_seconds is None else round(upstream_seconds * 1000, 1),
            "bytes": sent,
            "ms": round((time.perf_counter() - started) * 1000, 2),
        }
    )


def log_internal_error(path: str, exc: Exception) -> None:
    """A fault of Moxy's own code, with its traceback: never an expected outcome."""
    write_record(
        {
            "time": round(time.time(), 3),
            "level": "error",
            "event": INTERNAL_ERROR,
            "path": path_digest(path),
            "error": type(exc).__name__,
            "traceback": "".join(traceback.format_exception(exc)),
        }
    )


# -- the upstream fetch, the tiers, the disk ----------------------------------------------------------------------

TIER_REPORT_SECONDS = 5.0


def measured(fetch: Fetch, metrics: Metrics) -> Fetch:
    """The upstream fetch, counted: time, fetches in flight, failures by reason (an error status is one too)."""

    async def fetch_measured(url: str, headers: Mapping[str, str]) -> UpstreamResponse:
        started = time.perf_counter()
        metrics.in_flight.inc()
        try:
            response = await fetch(url, headers)
        except UpstreamError as exc:
            metrics.upstream_failures.labels(reason=exc.reason).inc()
            raise
        finally:
            metrics.in_flight.dec()
            metrics.upstream_seconds.observe(time.perf_counter() - started)
        if response.status >= 500 or response.status in (404, 410):
            metrics.upstream_failures.labels(reason=f"upstream-status-{response.status}").inc()
        return response

    return fetch_measured


def set_tier_gauges(metrics: Metrics, memory: MemoryStorage | None, disk: DiskStorage | None) -> None:
    if memory is not None:
        metrics.memory_bytes.set(memory.currsize)
        metrics.memory_items.set(len(memory))
    if disk is not None:
        metrics.disk_bytes.set(disk.counted_usage())


async def report_tiers(
    metrics: Metrics, memory: MemoryStorage | None, disk: DiskStorage | None, interval: float = TIER_REPORT_SECONDS
) -> None:
    """Refresh the tier gauges until cancelled."""
    # Each worker refreshes its own figures, so a scrape answered by one worker still sums current values.
    while True:
        with contextlib.suppress(OSError):
            set_tier_gauges(metrics, memory, disk)
            metrics.forget_dead_workers()
        await asyncio.sleep(interval)


class DiskReport:
    """What the disk tier could not do: every failure counted, each change of state one JSON line on stderr."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics

    def failed(self, operation: str, kind: str) -> None:
        self.metrics.disk_failures.labels(operation=operation, error=kind).inc()

    def changed(self, fault: str | None, operation: str, error: OSError | None) -> None:
        write_record(
            {
                "time": round(time.time(), 3),
                "level": "warning" if fault else "info",
                "event": "cache-dir-failed" if fault else "cache-dir-recovered",
                "error": fault,
                "operation": operation,
                "detail": error.strerror if error is not None else None,
            }
        )
