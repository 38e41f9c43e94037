"""Goals (PERF.md "Goals", as ratios within one run), the verdict of each target, the table and the JSON file."""

from __future__ import annotations

import json
import statistics
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from bench.wrk import WrkResult

RESULTS = Path(__file__).parent / "results" / "latest.json"


@dataclass(frozen=True, slots=True)
class Goal:
    """A target's bar: its rate as a share of its reference's, and a bound on p99 (absolute or relative)."""

    min_ratio: float | None = None
    max_p99_ms: float | None = None
    max_p99_vs_reference: float | None = None

    def describe(self, reference_p99_ms: float | None = None) -> str:
        parts = []
        if self.min_ratio is not None:
            parts.append(f">= {self.min_ratio:.2f}x")
        if self.max_p99_ms is not None:
            parts.append(f"p99 <= {self.max_p99_ms:g} ms")
        if self.max_p99_vs_reference is not None:
            bound = "" if reference_p99_ms is None else f" = {self.max_p99_vs_reference * reference_p99_ms:.1f} ms"
            parts.append(f"p99 <= {self.max_p99_vs_reference:g}x ref{bound}")
        return ", ".join(parts)

    def met(self, ratio: float, p99_ms: float, reference_p99_ms: float) -> bool:
        if self.min_ratio is not None and ratio < self.min_ratio:
            return False
        if self.max_p99_ms is not None and p99_ms > self.max_p99_ms:
            return False
        return self.max_p99_vs_reference is None or p99_ms <= self.max_p99_vs_reference * reference_p99_ms


@dataclass(slots=True)
class Row:
    key: str
    label: str
    reference: str
    goal: str
    req_per_s: float | None = None
    p99_ms: float | None = None
    ratio: float | None = None
    result: str = "-"
    note: str = ""
    rounds: list[dict[str, float]] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)


def summarise(runs: list[WrkResult]) -> tuple[float, float]:
    """Median req/s and median p99 over the rounds."""
    return statistics.median(run.req_per_s for run in runs), statistics.median(run.p99_ms for run in runs)


def table(rows: list[Row]) -> str:
    header = ("target", "req/s", "ratio", "p99 ms", "goal", "result")
    lines = [header]
    for row in rows:
        lines.append(
            (
                row.label,
                "-" if row.req_per_s is None else f"{row.req_per_s:,.0f}",
                "-" if row.ratio is None else f"{row.ratio:.2f}",
                "-" if row.p99_ms is None else f"{row.p99_ms:.1f}",
                row.goal,
                row.result + (f" ({row.note})" if row.note else ""),
            )
        )
    widths = [max(len(line[column]) for line in lines) for column in range(len(header))]
    right = {1, 2, 3}
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
