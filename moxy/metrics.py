"""Prometheus metrics of one Moxy worker, summed over all workers when several share the machine.

With several worker processes each keeps its own counters; prometheus_client's multiprocess mode (files in
PROMETHEUS_MULTIPROC_DIR, set by `moxy serve` before the workers start) lets whichever worker answers /metrics
report the sum. Without that variable the registry is this process's own."""

from __future__ import annotations

import os

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
    multiprocess as _multiprocess,
)

__all__ = ["CONTENT_TYPE", "Metrics", "multiprocess_dir"]

# The *_created series double the page for a start time nobody graphs (and multiprocess mode has none).
disable_created_metrics()  # type: ignore[no-untyped-call]

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
# From a sub-millisecond memory hit to a slow upstream near the total timeout.
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


def multiprocess_dir() -> str | None:
    return os.environ.get("PROMETHEUS_MULTIPROC_DIR") or None


class Metrics:
    """The metrics of DESIGN section 7. One instance per app; its registry is never the global one, so two
    apps in one process (tests) do not collide."""

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
