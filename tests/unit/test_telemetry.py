"""Metrics: what the counters say, and the housekeeping of multiprocess mode (moxy.telemetry)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from moxy.telemetry import Metrics


def scrape(metrics: Metrics) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    found = {}
    for family in text_string_to_metric_families(metrics.render().decode()):
        for sample in family.samples:
            found[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return found


def test_counts_requests_hits_and_reasons(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PROMETHEUS_MULTIPROC_DIR", raising=False)
    metrics = Metrics()
    metrics.count_hit(0.0001)
    metrics.count_hit(0.0002)
    metrics.count_request(200, "HIT", 0.001)
    metrics.count_request(502, "MISS", 0.2)
    metrics.rejections.labels(reason="json-error-envelope").inc()
    found = scrape(metrics)
    assert found[("moxy_requests_total", (("cache", "HIT"), ("status", "200")))] == 3
    assert found[("moxy_requests_total", (("cache", "MISS"), ("status", "502")))] == 1
    assert found[("moxy_request_duration_seconds_count", ())] == 4
    assert found[("moxy_validation_rejections_total", (("reason", "json-error-envelope"),))] == 1
    assert not any(name.endswith("_created") for name, _ in found), "no *_created series"


def test_two_apps_in_one_process_do_not_collide(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PROMETHEUS_MULTIPROC_DIR", raising=False)
    first, second = Metrics(), Metrics()
    first.count_hit(0.001)
    hits = ("moxy_requests_total", (("cache", "HIT"), ("status", "200")))
    assert scrape(first)[hits] == 1
    assert scrape(second).get(hits, 0) == 0


def test_dead_workers_live_gauges_are_dropped(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path))
    dead = 2**22 + 12345  # above the usual pid_max on Linux: no such process
    with pytest.raises(ProcessLookupError):
        os.kill(dead, 0)
    mine = os.getpid()
    names = [
        f"gauge_livesum_{dead}.db",
        f"gauge_livemax_{dead}.db",
        f"gauge_livesum_{mine}.db",
        f"counter_{dead}.db",  # history: a dead worker's requests still happened
    ]
    for name in names:
        (tmp_path / name).write_bytes(b"")
    Metrics().forget_dead_workers()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([f"gauge_livesum_{mine}.db", f"counter_{dead}.db"])
