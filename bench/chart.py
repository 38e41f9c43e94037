"""The picture of a `make bench` run: req/s and p99 latency of every target, Moxy's next to nginx's, drawn from the
JSON file bench/report.py writes, as a PNG beside it. `python -m bench.chart [results.json [out.png]]` redraws one."""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only: no display, no GUI toolkit

import matplotlib.pyplot as plt  # after the backend is chosen
from matplotlib.patches import Patch

from bench.report import RESULTS

__all__ = ["Bar", "bars", "draw"]

NGINX_COLOUR = "#8c8c8c"
MOXY_COLOUR = "#1f6fb4"


@dataclass(frozen=True, slots=True)
class Bar:
    label: str
    req_per_s: float
    p99_ms: float
    nginx: bool
    result: str


def bars(document: dict[str, Any]) -> list[Bar]:
    """The targets that were measured, in the run's order (each Moxy target follows the nginx it is judged by)."""
    found = []
    for target in document["targets"]:
        if target.get("req_per_s") is None or target.get("p99_ms") is None:
            continue  # not run (a smoke run, a missing tool)
        label = str(target["label"])
        found.append(
            Bar(label, float(target["req_per_s"]), float(target["p99_ms"]), label.startswith("nginx"), target["result"])
        )
    return found


def draw(results: Path = RESULTS, out: Path | None = None) -> Path:
    """Draw `results` (bench/report.py's JSON) into `out` (default: the same name, .png) and return its path."""
    document = json.loads(results.read_text())
    shown = bars(document)
    out = out or results.with_suffix(".png")
    if not shown:  # every target failed or was skipped: say so rather than fail the run's report
        figure = plt.figure(figsize=(6, 1.5))
        figure.text(0.5, 0.5, f"make bench, {document.get('started', '?')}: no target was measured", ha="center")
        figure.savefig(out, dpi=110)
        plt.close(figure)
        return out
    labels = [bar.label + ("" if bar.result in ("-", "") else f"  [{bar.result}]") for bar in shown]
    colours = [NGINX_COLOUR if bar.nginx else MOXY_COLOUR for bar in shown]
    positions = list(range(len(shown)))
    figure, (rate, latency) = plt.subplots(
        1, 2, figsize=(14, 0.5 * len(shown) + 1.8), sharey=True, gridspec_kw={"width_ratios": [3, 2]}
    )
    try:
        rate.barh(positions, [bar.req_per_s for bar in shown], color=colours)
        rate.set_yticks(positions, labels, fontsize=8)
        rate.invert_yaxis()  # the run's order, top to bottom
        rate.set_xlabel("requests per second (median of rounds; higher is better)")
        latency.barh(positions, [bar.p99_ms for bar in shown], color=colours)
        latency.set_xlabel("p99 latency, ms (median of rounds; lower is better)")
        for axes, values, spec in (
            (rate, [b.req_per_s for b in shown], ",.0f"),
            (latency, [b.p99_ms for b in shown], ".1f"),
        ):
            axes.grid(axis="x", alpha=0.3)
            for position, value in zip(positions, values, strict=True):
                axes.annotate(
                    format(value, spec),
                    (value, position),
                    xytext=(3, 0),
                    textcoords="offset points",
                    va="center",
                    fontsize=7,
                )
        legend = [Patch(color=colour) for colour in (NGINX_COLOUR, MOXY_COLOUR)]
        rate.legend(legend, ["nginx", "Moxy"], loc="lower right", fontsize=8)
        machine = document.get("machine", {})
        figure.suptitle(
            f"make bench, {document.get('started', '?')}: {machine.get('cpus', '?')} CPUs, "
            f"Python {machine.get('python', '?')}, {machine.get('nginx', 'nginx')}",
            fontsize=10,
        )
        figure.tight_layout()
        figure.savefig(out, dpi=110)
    finally:
        plt.close(figure)
    return out


if __name__ == "__main__":  # pragma: no cover - the command-line form
    arguments = sys.argv[1:]
    source = Path(arguments[0]) if arguments else RESULTS
    print(draw(source, Path(arguments[1]) if len(arguments) > 1 else None))
