"""moxy_build_info and the per-worker process gauges, in one process and in multiprocess mode (moxy.telemetry)."""

from __future__ import annotations

import os
import platform
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from moxy import __version__
from moxy.telemetry import Metrics

PROCESS = ("moxy_process_resident_memory_bytes", "moxy_process_open_fds", "moxy_process_cpu_seconds")


def samples(metrics: Metrics) -> list[tuple[str, dict[str, str], float]]:
    return [
        (sample.name, dict(sample.labels), sample.value)
        for family in text_string_to_metric_families(metrics.render().decode())
        for sample in family.samples
    ]


def test_single_process(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PROMETHEUS_MULTIPROC_DIR", raising=False)
    found = samples(Metrics())
    assert ("moxy_build_info", {"version": __version__, "python": platform.python_version()}, 1.0) in found
    mine = {"pid": str(os.getpid())}
    by_name = {name: (labels, value) for name, labels, value in found if name in PROCESS}
    assert sorted(by_name) == sorted(PROCESS)
    assert all(labels == mine for labels, _ in by_name.values())
    assert by_name["moxy_process_resident_memory_bytes"][1] > 10 * 1024 * 1024  # an interpreter with its libraries
    assert by_name["moxy_process_open_fds"][1] >= 3
    assert by_name["moxy_process_cpu_seconds"][1] > 0


def test_fds_follow_what_the_worker_opens(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("PROMETHEUS_MULTIPROC_DIR", raising=False)
    metrics = Metrics()

    def fds() -> float:
        return next(value for name, _, value in samples(metrics) if name == "moxy_process_open_fds")

    before = fds()
    handles = [open(tmp_path / f"f{n}", "w") for n in range(20)]  # held open on purpose
    try:
        assert fds() >= before + 20
    finally:
        for handle in handles:
            handle.close()


# Multiprocess mode is chosen when prometheus_client is imported, so it is checked against a real `moxy serve
# --workers 2` in tests/integration/test_observability.py.
