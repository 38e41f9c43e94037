"""bench/chart.py: which targets are drawn, in which colour, and that the PNG is written beside the results."""

from __future__ import annotations

import json
from pathlib import Path

from PIL import Image

from bench.chart import bars, draw


def target(label: str, rate: float | None, p99: float | None, result: str = "-") -> dict[str, object]:
    return {"label": label, "req_per_s": rate, "p99_ms": p99, "result": result}


DOCUMENT = {
    "started": "2026-01-01T00:00:00+00:00",
    "machine": {"cpus": 2, "python": "3.11.7", "nginx": "nginx version: nginx/1.22.1"},
    "targets": [
        target("nginx proxy_cache hit (10 KiB) [reference]", 70_000.0, 2.8),
        target("Moxy memory hit (10 KiB)", 20_000.0, 4.6, "PASS"),
        target("Moxy cold burst", None, None),  # not measured in this run
    ],
}


def test_bars_keep_measured_targets_in_order_and_tell_nginx_from_moxy() -> None:
    found = bars(DOCUMENT)
    assert [(bar.label, bar.nginx) for bar in found] == [
        ("nginx proxy_cache hit (10 KiB) [reference]", True),
        ("Moxy memory hit (10 KiB)", False),
    ]
    assert (found[1].req_per_s, found[1].p99_ms, found[1].result) == (20_000.0, 4.6, "PASS")


def test_draw_writes_a_png_beside_the_results(tmp_path: Path) -> None:
    results = tmp_path / "latest.json"
    results.write_text(json.dumps(DOCUMENT))
    out = draw(results)
    assert out == tmp_path / "latest.png"
    with Image.open(out) as picture:
        assert picture.format == "PNG"
        width, height = picture.size
    assert width > 1000 and height > 200  # two panels side by side, one bar per measured target


def test_a_run_with_nothing_measured_still_gets_a_picture(tmp_path: Path) -> None:
    results = tmp_path / "smoke.json"
    results.write_text(json.dumps({**DOCUMENT, "targets": [target("Moxy", None, None)]}))
    with Image.open(draw(results, tmp_path / "out.png")) as picture:
        assert picture.format == "PNG"
