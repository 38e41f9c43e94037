"""The goals of `make bench` (ratios within one run), the verdict on each target, the table and the JSON file."""

from __future__ import annotations

import json
import statistics
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from bench.wrk import WrkResult

RESULTS = Path(__file__).parent / "results" / "latest.json"
MIB = 1024 * 1024
# The allowance over the memory-cache budget for a worker's peak RSS: the interpreter, the libraries, buffers in
# flight. Written as the issue writes it, 80 MB (decimal), the stricter reading.
RSS_ALLOWANCE_BYTES = 80_000_000


@dataclass(frozen=True, slots=True)
class Measured:
    """What a goal is judged on: one target's medians over the rounds and its peak RSS."""

    ratio: float
    p99_ms: float
    cpu_us: float | None = None
    peer_ratio: float | None = None  # rate / the rate of the target's peer (another target of the same run)
    peak_rss_bytes: int | None = None  # the largest VmHWM of its workers
    memory_budget_bytes: int | None = None  # MOXY_MEMORY_CACHE_BYTES it ran with


@dataclass(frozen=True, slots=True)
class Goal:
    """A target's bar. Every bound is either a share of another figure measured in the same run or, for the
    latencies and CPU costs that matter to a client or a bill whatever nginx does, an absolute figure."""

    min_ratio: float | None = None  # of the reference's req/s
    max_p99_ms: float | None = None
    max_p99_vs_reference: float | None = None
    min_peer_ratio: float | None = None  # of the peer's req/s
    max_cpu_us: float | None = None
    max_cpu_vs_reference: float | None = None
    rss_within_budget: bool = False  # peak RSS per worker <= memory budget + RSS_ALLOWANCE_BYTES

    def describe(self, reference: Measured | None = None, peer_label: str = "peer") -> str:
        parts = []
        if self.min_ratio is not None:
            parts.append(f">= {self.min_ratio:.2f}x")
        if self.min_peer_ratio is not None:
            parts.append(f">= {self.min_peer_ratio:g}x {peer_label}")
        if self.max_p99_ms is not None:
            parts.append(f"p99 <= {self.max_p99_ms:g} ms")
        if self.max_p99_vs_reference is not None:
            bound = "" if reference is None else f" = {self.max_p99_vs_reference * reference.p99_ms:.1f} ms"
            parts.append(f"p99 <= {self.max_p99_vs_reference:g}x ref{bound}")
        if self.max_cpu_us is not None:
            parts.append(f"CPU <= {self.max_cpu_us:g} us")
        if self.max_cpu_vs_reference is not None:
            reference_cpu = None if reference is None else reference.cpu_us
            bound = "" if reference_cpu is None else f" = {self.max_cpu_vs_reference * reference_cpu:.0f} us"
            parts.append(f"CPU <= {self.max_cpu_vs_reference:g}x ref{bound}")
        if self.rss_within_budget:
            parts.append("RSS <= budget + 80 MB")
        return ", ".join(parts)

    def misses(self, got: Measured, reference: Measured) -> list[str]:
        """The parts of the goal the target did not meet (a figure that could not be read counts as not met)."""
        missed = []
        if self.min_ratio is not None and got.ratio < self.min_ratio:
            missed.append("rate")
        if self.min_peer_ratio is not None and (got.peer_ratio is None or got.peer_ratio < self.min_peer_ratio):
            missed.append("rate vs peer")
        if self.max_p99_ms is not None and got.p99_ms > self.max_p99_ms:
            missed.append("p99")
        if self.max_p99_vs_reference is not None and got.p99_ms > self.max_p99_vs_reference * reference.p99_ms:
            missed.append("p99")
        if self.max_cpu_us is not None and (got.cpu_us is None or got.cpu_us > self.max_cpu_us):
            missed.append("CPU")
        if self.max_cpu_vs_reference is not None and (
            got.cpu_us is None or reference.cpu_us is None or got.cpu_us > self.max_cpu_vs_reference * reference.cpu_us
        ):
            missed.append("CPU")
        if self.rss_within_budget and (
            got.peak_rss_bytes is None
            or got.memory_budget_bytes is None
            or got.peak_rss_bytes > got.memory_budget_bytes + RSS_ALLOWANCE_BYTES
        ):
            missed.append("RSS")
        return list(dict.fromkeys(missed))


@dataclass(slots=True)
class Row:
    key: str
    label: str
    reference: str
    goal: str
    req_per_s: float | None = None
    p99_ms: float | None = None
    ratio: float | None = None
    cpu_us: float | None = None  # server CPU (user + system, whole process tree) per request served, median
    peer: str = ""  # the key of the target `peer_ratio` divides by
    peer_label: str = ""
    peer_ratio: float | None = None
    peak_rss_mib: float | None = None  # the largest VmHWM among Moxy's workers after the runs
    memory_budget_mib: float | None = None  # MOXY_MEMORY_CACHE_BYTES of that Moxy
    result: str = "-"
    note: str = ""
    rounds: list[dict[str, float]] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)


def summarise(runs: list[WrkResult]) -> tuple[float, float]:
    """Median req/s and median p99 over the rounds."""
    return statistics.median(run.req_per_s for run in runs), statistics.median(run.p99_ms for run in runs)


def _number(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def table(rows: list[Row]) -> str:
    header = ("target", "req/s", "ratio", "p99 ms", "CPU us/req", "RSS MiB (budget)", "vs peer", "goal", "result")
    lines = [header]
    for row in rows:
        rss = "-"
        if row.peak_rss_mib is not None:
            rss = f"{row.peak_rss_mib:.0f} ({_number(row.memory_budget_mib, '.0f')})"
        peer = "-" if row.peer_ratio is None else f"{row.peer_ratio:.2f}x {row.peer_label}"
        lines.append(
            (
                row.label,
                _number(row.req_per_s, ",.0f"),
                _number(row.ratio, ".2f"),
                _number(row.p99_ms, ".1f"),
                _number(row.cpu_us, ".0f"),
                rss,
                peer,
                row.goal,
                row.result + (f" ({row.note})" if row.note else ""),
            )
        )
    widths = [max(len(line[column]) for line in lines) for column in range(len(header))]
    right = {1, 2, 3, 4, 5}
    rendered = []
    for line in lines:
        cells = [
            cell.rjust(width) if i in right else cell.ljust(width)
            for i, (cell, width) in enumerate(zip(line, widths, strict=True))
        ]
        rendered.append("  ".join(cells).rstrip())
    rendered.insert(1, "  ".join("-" * width for width in widths))
    return "\n".join(rendered)


def write_json(document: dict[str, Any], rows: list[Row], path: Path = RESULTS) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    document = {**document, "targets": [asdict(row) for row in rows]}
    path.write_text(json.dumps(document, indent=2) + "\n")
    return path
