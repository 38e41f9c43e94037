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
import logging
import os
import platform
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

from moxy import __version__
from moxy.errors import UpstreamError

if TYPE_CHECKING:
    from moxy.cache import DiskStorage, MemoryStorage
    from moxy.proxy import Fetch
    from moxy.upstream import UpstreamResponse

__all__ = [
    "CONTENT_TYPE",
    "LOG_LEVELS",
    "INTERNAL_ERROR",
    "DiskReport",
    "Metrics",
    "iso_time",
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
        # The same times split by cache result, for a dashboard's latency per result (deploy/grafana/moxy.json);
        # a second histogram so the unlabelled one above keeps its shape. About a microsecond per answer.
        self.request_seconds_by_cache = Histogram(
            "moxy_request_duration_by_cache_seconds",
            "Time to answer a request, by cache result.",
            ["cache"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self._hit_seconds = self.request_seconds_by_cache.labels(cache="HIT")
        # Which Moxy answers: one series, 1, whose labels carry the version (a deploy shows as a change of label).
        self.build_info = Gauge(
            "moxy_build_info",
            "Always 1; the labels name the running Moxy and Python versions.",
            ["version", "python"],
            registry=registry,
            multiprocess_mode="livemax",
        )
        self.build_info.labels(version=__version__, python=platform.python_version()).set(1)
        self.process = ProcessGauges(registry)

    def count_hit(self, seconds: float) -> None:
        self._hit.inc()
        self.request_seconds.observe(seconds)
        self._hit_seconds.observe(seconds)

    def count_request(self, status: int, cache: str, seconds: float) -> None:
        self.requests.labels(status=str(status), cache=cache).inc()
        self.request_seconds.observe(seconds)
        self.request_seconds_by_cache.labels(cache=cache).observe(seconds)

    def render(self) -> bytes:
        self.process.sample()  # the answering worker's own figures are current; the others' are at most 5 s old
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


class ProcessGauges:
    """Resident memory, open descriptors and CPU seconds of this worker, labelled by its pid.

    prometheus_client's own process collector reads only the scraping process, and multiprocess mode has no place
    for it, so each worker writes its figures into gauges of mode `liveall`: the multiprocess collector adds the
    `pid` label itself, and a worker that stops or dies takes its series with it (`Metrics.close`,
    `Metrics.forget_dead_workers`). In a single process the same `pid` label is set here, so dashboards read one
    shape either way."""

    def __init__(self, registry: CollectorRegistry) -> None:
        # In multiprocess mode the collector appends pid to every gauge sample; a label of our own would repeat it.
        names = () if multiprocess_dir() is not None else ("pid",)

        def gauge(name: str, text: str) -> Gauge:
            made = Gauge(name, text, names, registry=registry, multiprocess_mode="liveall")
            return made.labels(pid=str(os.getpid())) if names else made

        self.rss = gauge("moxy_process_resident_memory_bytes", "Resident memory of one worker process.")
        self.fds = gauge("moxy_process_open_fds", "Open file descriptors of one worker process.")
        # A gauge, not a counter: multiprocess mode would add the workers' counters into one series.
        self.cpu = gauge("moxy_process_cpu_seconds", "User and system CPU time one worker process has used.")
        self.sample()

    def sample(self) -> None:
        times = os.times()
        self.cpu.set(times.user + times.system)
        with contextlib.suppress(OSError, ValueError, IndexError):  # no /proc (not Linux): those two stay unset
            self.rss.set(_resident_bytes())
            self.fds.set(len(os.listdir("/proc/self/fd")))


def _resident_bytes() -> int:
    # /proc/self/statm: sizes in pages; the second is what is resident now.
    with open("/proc/self/statm", "rb") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


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


# The levels MOXY_LOG_LEVEL names, as the numbers of Python's logging module.
LOG_LEVELS = {"debug": 10, "info": 20, "warning": 30, "error": 40, "critical": 50}
# The logger named "moxy" holds the threshold: moxy.logs' configuration gives it MOXY_LOG_LEVEL in every worker
# (uvicorn applies that configuration in each process it starts). Never configured (an app built in a test), its
# level is 0 and every record is written. The records themselves skip the logging machinery: the access line is
# written on every hit.
_threshold = logging.getLogger("moxy")


def iso_time(at: float | None = None) -> str:
    """`at` (default: now), seconds since the epoch, as ISO 8601 in UTC to the millisecond."""
    now = time.time() if at is None else at
    whole = int(now)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(whole)) + f".{int((now - whole) * 1000):03d}Z"


def write_record(record: Mapping[str, Any]) -> None:
    """One JSON line on stderr, unless its level (default info) is below the configured one."""
    if LOG_LEVELS.get(record.get("level", "info"), 20) < _threshold.level:
        return
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
    client: tuple[str, int] | list[Any] | None = None,
) -> None:
    """The access-log line of one answer; `started` is its time.perf_counter() on arrival, `client` the ASGI
    scope's (host, port) of the peer (behind an edge cache, the edge's address)."""
    write_record(
        {
            "time": iso_time(),
            "level": "info",
            "client": client[0] if client else None,
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
            "time": iso_time(),
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
            metrics.process.sample()
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
                "time": iso_time(),
                "level": "warning" if fault else "info",
                "event": "cache-dir-failed" if fault else "cache-dir-recovered",
                "error": fault,
                "operation": operation,
                "detail": error.strerror if error is not None else None,
            }
        )
