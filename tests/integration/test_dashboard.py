"""deploy/grafana/moxy.json asks only for what Moxy exposes: every PromQL expression in it is parsed, and each
metric, label and label value it names is looked up on the /metrics page of a real two-worker Moxy after traffic
that produces every cache result the dashboard selects."""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import promql_parser
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.assets import PNG
from tests.integration.moxy_server import MoxyServer
from tests.integration.origin import Origin, Reply

pytestmark = pytest.mark.integration
StartMoxy = Callable[..., MoxyServer]

DASHBOARD = Path(__file__).resolve().parents[2] / "deploy" / "grafana" / "moxy.json"
# Labels Prometheus adds to every series when it scrapes a target: never on the page itself.
TARGET_LABELS = frozenset({"instance", "job"})
# Grafana's variables and interval macros, as a query Prometheus would receive them.
GRAFANA_VARIABLES = {"$__rate_interval": "5m", "$__interval": "1m", "$__range": "1h", "$instance": ".*"}
WORDPRESS_ERROR = {"code": "rest_no_route", "message": "No route.", "data": {"status": 404}}


@dataclass
class Exposed:
    """What one /metrics page holds: per sample name, the label names it carries and the values seen per label."""

    labels: dict[str, set[str]] = field(default_factory=dict)
    values: dict[str, dict[str, set[str]]] = field(default_factory=dict)

    @classmethod
    def of(cls, *pages: str) -> Exposed:
        exposed = cls()
        for family in (family for page in pages for family in text_string_to_metric_families(page)):
            for sample in family.samples:
                exposed.labels.setdefault(sample.name, set()).update(sample.labels)
                seen = exposed.values.setdefault(sample.name, {})
                for label, value in sample.labels.items():
                    seen.setdefault(label, set()).add(value)
        return exposed


def expressions(dashboard: dict[str, Any]) -> Iterator[tuple[str, str, str]]:
    """(where, PromQL, legend format) for every query target, rows' panels included."""

    def walk(panels: list[dict[str, Any]]) -> Iterator[tuple[str, str, str]]:
        for panel in panels:
            yield from walk(panel.get("panels", []))
            for target in panel.get("targets", []):
                yield panel["title"], target["expr"], target.get("legendFormat", "")

    yield from walk(dashboard["panels"])


def as_prometheus_gets_it(expr: str) -> str:
    for name, value in GRAFANA_VARIABLES.items():
        expr = expr.replace(name, value)
    assert "$" not in expr, f"a Grafana variable this test does not know: {expr}"
    return expr


def _plain_alternatives(pattern: str) -> list[str] | None:
    """The words of a regex that is only an alternation of plain words (HIT|STALE), else None."""
    words = pattern.split("|")
    return words if all(re.fullmatch(r"[\w-]+", word) for word in words) else None


def problems(expr: str, exposed: Exposed) -> tuple[list[str], set[str]]:
    """What `expr` names that the page lacks, and the labels its result may carry (for the legend)."""
    found: list[str] = []

    def check(node: Any) -> tuple[set[str], set[str]]:
        """The sample names under `node` and the labels its result carries."""
        kind = type(node).__name__
        if kind == "VectorSelector":
            name = node.name
            if name not in exposed.labels:
                found.append(f"metric {name} is not exposed")
                return {name}, set()
            carried = exposed.labels[name] | TARGET_LABELS
            for matcher in node.matchers.matchers:
                if matcher.name not in carried:
                    found.append(f"{name} has no label {matcher.name}")
                    continue
                if matcher.name in TARGET_LABELS:
                    continue
                op = str(matcher.op)
                wanted = [matcher.value] if op == "MatchOp.Equal" else None
                if op == "MatchOp.Re":
                    wanted = _plain_alternatives(matcher.value)
                seen = exposed.values[name].get(matcher.name, set())
                for value in wanted or []:
                    if value not in seen:
                        found.append(f'{name}{{{matcher.name}="{value}"}} never appeared (seen: {sorted(seen)})')
            return {name}, carried
        if kind == "MatrixSelector":
            return check(node.vector_selector)
        if kind in ("ParenExpr", "UnaryExpr", "SubqueryExpr"):
            return check(node.expr)
        if kind == "Call":
            names: set[str] = set()
            carried = set()
            for argument in node.args:
                inner_names, inner_carried = check(argument)
                names |= inner_names
                carried |= inner_carried
            if node.func.name == "histogram_quantile":
                carried.discard("le")
            return names, carried
        if kind == "AggregateExpr":
            names, carried = check(node.expr)
            grouping = list(node.modifier.labels) if node.modifier is not None else []
            for label in grouping:
                for name in names:
                    if label not in exposed.labels.get(name, set()) | TARGET_LABELS:
                        found.append(f"{name} has no label {label} to aggregate by")
            if node.modifier is None:
                return names, set()
            if node.modifier.type == promql_parser.AggModifierType.By:
                return names, set(grouping)
            return names, carried - set(grouping)
        if kind == "BinaryExpr":
            left_names, left = check(node.lhs)
            right_names, right = check(node.rhs)
            modifier = node.modifier
            if modifier is not None and modifier.matching is not None:
                for label in modifier.matching.labels:
                    for name in left_names | right_names:
                        if label not in exposed.labels.get(name, set()) | TARGET_LABELS:
                            found.append(f"{name} has no label {label} to match on")
            return left_names | right_names, left | right
        if kind in ("NumberLiteral", "StringLiteral"):
            return set(), set()
        raise AssertionError(f"a PromQL node this test does not read: {kind} in {expr}")

    _, carried = check(promql_parser.parse(expr))
    return found, carried


def check_dashboard(dashboard: dict[str, Any], exposed: Exposed) -> list[str]:
    failures = []
    for where, expr, legend in expressions(dashboard):
        found, carried = problems(as_prometheus_gets_it(expr), exposed)
        for label in re.findall(r"\{\{\s*(\w+)\s*\}\}", legend):
            if label not in carried:
                found.append(f"legend names {label}, which the result does not carry")
        failures += [f"{where}: {problem}  [{expr}]" for problem in found]
    for variable in dashboard["templating"]["list"]:
        if variable["type"] != "query":
            continue
        query = re.fullmatch(r"label_values\((\w+),\s*(\w+)\)", variable["definition"])
        if query is None:
            failures.append(f"variable {variable['name']}: a query this test does not read")
            continue
        metric, label = query.groups()
        if metric not in exposed.labels:
            failures.append(f"variable {variable['name']}: metric {metric} is not exposed")
        elif label not in exposed.labels[metric] | TARGET_LABELS:
            failures.append(f"variable {variable['name']}: {metric} has no label {label}")
    return failures


@pytest.fixture(scope="module")
def dashboard() -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return loaded


def drive_traffic(origin: Origin, moxy: MoxyServer) -> None:
    """MISS, HIT, REVALIDATED, STALE and BYPASS answers, a validation rejection and an upstream failure."""
    short = {"Content-Type": "image/png", "Cache-Control": "max-age=1"}
    origin.route("/hit.png", Reply(headers={"Content-Type": "image/png"}, body=PNG))
    origin.route("/again.png", Reply(headers={**short, "ETag": '"v1"'}, body=PNG))
    origin.route("/stale.png", Reply(headers=short, body=PNG))
    origin.route("/feed.json", Reply.json(WORDPRESS_ERROR))
    origin.route("/down.png", Reply(status=500, body=b"oops"))
    for path in ("/hit.png", "/hit.png", "/hit.png", "/again.png", "/stale.png"):
        assert moxy.get(origin.url(path)).status_code == 200
    assert moxy.get(origin.url("/feed.json")).status_code == 502
    assert moxy.get(origin.url("/down.png")).status_code == 502
    assert httpx.get(moxy.base_url + "/not-a-signed-url").status_code == 400
    origin.route("/stale.png", Reply(status=500, body=b"oops"))
    time.sleep(2.1)  # both short-lived copies expired (Date has whole seconds)
    assert moxy.get(origin.url("/again.png")).headers["x-moxy-cache"] == "REVALIDATED"
    assert moxy.get(origin.url("/stale.png")).headers["x-moxy-cache"] == "STALE"


def test_every_query_names_what_moxy_exposes(
    dashboard: dict[str, Any], origin: Origin, start_moxy: StartMoxy, tmp_path: Path
) -> None:
    moxy = start_moxy(workers=2, ttl_min=0, stale_while_revalidate=0)
    drive_traffic(origin, moxy)
    # The disk-failure series exist only once the cache folder failed: a second Moxy whose folder cannot be
    # made (a file stands where its "meta" folder goes) shows them.
    broken = tmp_path / "broken-cache"
    broken.mkdir()
    (broken / "meta").write_bytes(b"")
    failing = start_moxy(cache_dir=broken)
    assert httpx.get(failing.base_url + "/readyz").json()["degraded"] == ["cache-dir"]
    pages = [httpx.get(server.base_url + "/metrics", timeout=10).text for server in (moxy, failing)]
    exposed = Exposed.of(*pages)
    assert len(list(expressions(dashboard))) >= 15
    assert check_dashboard(dashboard, exposed) == []


def test_the_check_catches_what_is_not_there(dashboard: dict[str, Any]) -> None:
    page = (
        "# TYPE moxy_requests_total counter\n"
        'moxy_requests_total{status="200",cache="HIT"} 1\n'
        "# TYPE moxy_build_info gauge\n"
        'moxy_build_info{version="1",python="3"} 1\n'
    )
    exposed = Exposed.of(page)
    broken = {
        "panels": [
            {
                "title": "t",
                "targets": [
                    {"expr": "sum by (colour) (rate(moxy_requests_total[$__rate_interval]))"},
                    {"expr": 'rate(moxy_requests_total{cache="STALE"}[5m])'},
                    {"expr": "rate(moxy_nothing_total[5m])", "legendFormat": "{{reason}}"},
                    {"expr": "sum(rate(moxy_requests_total[5m]))", "legendFormat": "{{cache}}"},
                    {"expr": 'rate(moxy_requests_total{cache=~"HIT|MISS"}[5m])', "legendFormat": "{{cache}}"},
                ],
            }
        ],
        "templating": {"list": [{"name": "v", "type": "query", "definition": "label_values(moxy_build_info, os)"}]},
    }
    failures = check_dashboard(broken, exposed)
    assert [failure.split("  [")[0] for failure in failures] == [
        "t: moxy_requests_total has no label colour to aggregate by",
        "t: moxy_requests_total{cache=\"STALE\"} never appeared (seen: ['HIT'])",
        "t: metric moxy_nothing_total is not exposed",
        "t: legend names reason, which the result does not carry",
        "t: legend names cache, which the result does not carry",
        "t: moxy_requests_total{cache=\"MISS\"} never appeared (seen: ['HIT'])",
        "variable v: moxy_build_info has no label os",
    ]
    # The real dashboard against this thin page fails too: the check reads the dashboard, not a fixed list.
    assert check_dashboard(dashboard, exposed)


def test_dashboard_shape(dashboard: dict[str, Any]) -> None:
    titles = [panel["title"] for panel in dashboard["panels"]]
    for wanted in (
        "Requests by cache result",
        "Hit ratio",
        "Latency p50 and p99 by cache result",
        "Upstream failures by reason",
        "Validation rejections by reason",
        "Tier sizes",
        "Upstream fetches in flight",
        "Stale answers served",
        "Resident memory per worker",
    ):
        assert wanted in titles
    ids = [panel["id"] for panel in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    assert dashboard["uid"] == "moxy"
