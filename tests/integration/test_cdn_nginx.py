"""Moxy as a CDN origin: a real nginx proxy_cache in front of it must cache, expire, revalidate, serve ranges and
keep outages and forged URLs from its clients exactly as Moxy's headers tell it to."""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest

from tests.integration.cdn import NginxCache, moxy_requests, require_nginx
from tests.integration.moxy_server import MoxyServer
from tests.integration.origin import Origin, Reply, pattern

pytestmark = pytest.mark.integration

StartMoxy = Callable[..., MoxyServer]
StartCdn = Callable[[MoxyServer], NginxCache]

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
WORDPRESS_ERROR = {"code": "rest_error", "message": "x", "data": {"status": 500}}
POLL = 0.1


@pytest.fixture
def start_cdn(tmp_path: Path) -> Iterator[StartCdn]:
    """Start nginx caches in front of Moxy servers; all are stopped at teardown."""
    binary = require_nginx()
    started: list[NginxCache] = []

    def start(moxy: MoxyServer) -> NginxCache:
        cdn = NginxCache(moxy.base_url, tmp_path / f"nginx-{len(started)}", binary=binary)
        started.append(cdn)
        return cdn.start()

    yield start
    for cdn in started:
        cdn.stop()


def _png(size: int) -> bytes:
    return PNG_MAGIC + pattern(size - len(PNG_MAGIC))


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _poll_until(
    condition: Callable[[httpx.Response], bool], fetch: Callable[[], httpx.Response], seconds: float
) -> tuple[httpx.Response, list[httpx.Response]]:
    """Fetch every POLL seconds until `condition` holds; the answer that met it and every answer before it."""
    deadline = time.monotonic() + seconds
    seen: list[httpx.Response] = []
    while True:
        answer = fetch()
        if condition(answer):
            return answer, seen
        seen.append(answer)
        assert time.monotonic() < deadline, [(a.status_code, dict(a.headers)) for a in seen[-3:]]
        time.sleep(POLL)


def _summary(answer: httpx.Response) -> dict[str, Any]:
    keys = ("x-cdn-cache", "x-moxy-cache", "cache-control", "age")
    return {"status": answer.status_code, **{key: answer.headers.get(key) for key in keys}}


def test_second_request_is_a_cdn_hit_that_never_reaches_moxy(
    origin: Origin, start_moxy: StartMoxy, start_cdn: StartCdn
) -> None:
    small = orjson.dumps({"items": list(range(50))})
    big = _png(3 * 1024 * 1024)  # past the memory tier's entry cap: Moxy streams it from its disk file
    origin.route("/feed.json", Reply(headers={"Content-Type": "application/json"}, body=small))
    origin.route("/big.png", Reply(headers={"Content-Type": "image/png"}, body=big))
    moxy = start_moxy(access_log=1)
    cdn = start_cdn(moxy)
    for path, body in (("/feed.json", small), ("/big.png", big)):
        url = moxy.sign(origin.url(path))
        first = cdn.get(url)
        assert first.status_code == 200, first.text
        assert first.headers["x-cdn-cache"] == "MISS" and first.headers["x-moxy-cache"] == "MISS"
        assert _sha(first.content) == _sha(body)
        second = cdn.get(url)
        assert second.status_code == 200
        assert second.headers["x-cdn-cache"] == "HIT", _summary(second)
        assert _sha(second.content) == _sha(first.content)
        assert second.headers["etag"] == first.headers["etag"]
        assert len(moxy_requests(moxy, url)) == 1, moxy_requests(moxy, url)
        assert origin.hits(path) == 1
    assert [record["cache"] for record in cdn.access_log(4)] == ["MISS", "HIT", "MISS", "HIT"]
    assert len(cdn.upstream_log()) == 2


def test_cdn_keeps_the_object_for_max_age_then_revalidates_with_moxy(
    origin: Origin, start_moxy: StartMoxy, start_cdn: StartCdn
) -> None:
    body = orjson.dumps({"version": 1, "items": [1, 2, 3]})
    origin.route(
        "/feed.json",
        Reply(headers={"Content-Type": "application/json", "Cache-Control": "max-age=2", "ETag": '"v1"'}, body=body),
    )
    moxy = start_moxy(ttl_min=0, stale_while_revalidate=0, access_log=1)
    cdn = start_cdn(moxy)
    url = moxy.sign(origin.url("/feed.json"))

    started = time.monotonic()
    first = cdn.get(url)
    assert first.status_code == 200 and first.content == body
    assert first.headers["x-cdn-cache"] == "MISS"
    cache_control = first.headers["cache-control"]
    assert cache_control.startswith("public, max-age=2, "), cache_control
    assert "stale-while-revalidate=0" in cache_control
    assert first.headers["age"] == "0"
    etag = first.headers["etag"]

    time.sleep(max(0.0, started + 1.3 - time.monotonic()))  # past 1 s, well inside the 2 s lifetime
    held = cdn.get(url)
    assert held.headers["x-cdn-cache"] == "HIT", _summary(held)
    assert held.content == body
    assert len(moxy_requests(moxy, url)) == 1

    revalidated, hits = _poll_until(lambda a: a.headers["x-cdn-cache"] != "HIT", lambda: cdn.get(url), 4.5)
    expired_after = time.monotonic() - started
    assert all(a.status_code == 200 and a.content == body for a in hits)
    # nginx keeps the whole max-age (its clock has 1 s steps, so it may keep it up to a second longer).
    assert expired_after >= 1.95, expired_after
    assert revalidated.status_code == 200 and revalidated.content == body
    assert revalidated.headers["x-cdn-cache"] == "REVALIDATED", _summary(revalidated)

    edge = cdn.access_log(3 + len(hits))[-1]
    assert (edge["cache"], edge["upstream_status"], edge["status"]) == ("REVALIDATED", "304", 200), edge
    wire = cdn.upstream_log(2)
    assert len(wire) == 2, wire
    assert wire[-1]["if_none_match"] == etag and wire[-1]["status"] == 304, wire[-1]
    at_moxy = moxy_requests(moxy, url)
    assert [record["status"] for record in at_moxy] == [200, 304], at_moxy

    # The 304 renewed nginx's copy: the next client is served from the edge again.
    again = cdn.get(url)
    assert again.headers["x-cdn-cache"] == "HIT" and again.content == body
    assert len(moxy_requests(moxy, url)) == 2


def test_ranges_through_the_cdn(origin: Origin, start_moxy: StartMoxy, start_cdn: StartCdn) -> None:
    size = 200_000
    body = _png(size)
    origin.route("/warm.png", Reply(headers={"Content-Type": "image/png"}, body=body))
    origin.route("/cold.png", Reply(headers={"Content-Type": "image/png"}, body=body))
    moxy = start_moxy(access_log=1)
    cdn = start_cdn(moxy)

    warm = moxy.sign(origin.url("/warm.png"))
    assert cdn.get(warm).content == body
    for header, start, end in (("bytes=0-0", 0, 0), ("bytes=1000-1999", 1000, 1999), ("bytes=-500", size - 500, None)):
        part = cdn.get(warm, headers={"Range": header})
        assert part.status_code == 206, (header, _summary(part))
        assert part.headers["x-cdn-cache"] == "HIT"
        last = size - 1 if end is None else end
        assert part.headers["content-range"] == f"bytes {start}-{last}/{size}"
        assert part.content == body[start : last + 1]
    assert len(moxy_requests(moxy, warm)) == 1

    cold = moxy.sign(origin.url("/cold.png"))
    part = cdn.get(cold, headers={"Range": "bytes=150000-"})
    assert part.status_code == 206, _summary(part)
    assert part.headers["x-cdn-cache"] == "MISS"
    assert part.headers["content-range"] == f"bytes 150000-{size - 1}/{size}"
    assert part.content == body[150000:]
    # The cache fetched the whole object once (no Range upstream) and cut the part itself.
    assert [r["status"] for r in moxy_requests(moxy, cold)] == [200]
    assert cdn.upstream_log(2)[-1]["range"] == ""
    full = cdn.get(cold)
    assert full.status_code == 200 and full.content == body and full.headers["x-cdn-cache"] == "HIT"

    for url in (warm, cold):
        refused = cdn.get(url, headers={"Range": f"bytes={size}-"})
        assert refused.status_code == 416, _summary(refused)
        assert refused.headers["content-range"] == f"bytes */{size}"
    assert len(moxy_requests(moxy)) == 2


def test_an_upstream_outage_is_hidden_from_cdn_clients_by_moxy(
    origin: Origin, start_moxy: StartMoxy, start_cdn: StartCdn
) -> None:
    cc = {"Cache-Control": "max-age=1"}
    # Two objects go down at once, each its own way: a 500, and a WordPress error that is a 200 to HTTP.
    outages = {
        "/wp-json/a": (Reply(status=500, headers={"Content-Type": "text/plain", **cc}, body=b"oops"), "500"),
        "/wp-json/b": (Reply.json(WORDPRESS_ERROR, headers=cc), "json-error-envelope"),
    }
    good = {path: orjson.dumps({"items": [1, 2, 3], "path": path}) for path in outages}
    healed = {path: orjson.dumps({"items": [4, 5], "path": path}) for path in outages}
    for path in outages:
        origin.route(path, Reply(headers={"Content-Type": "application/json", **cc}, body=good[path]))
    moxy = start_moxy(ttl_min=0, stale_while_revalidate=0, stale_if_error=600, negative_ttl=1, access_log=1)
    edge = start_cdn(moxy)
    urls = {path: moxy.sign(origin.url(path)) for path in outages}

    for path, url in urls.items():
        assert edge.get(url).content == good[path]
        assert edge.get(url).headers["x-cdn-cache"] == "HIT"
        origin.route(path, outages[path][0])

    def hidden(path: str) -> bool:
        answer = edge.get(urls[path])
        assert answer.status_code == 200, (_summary(answer), answer.content)
        assert answer.content == good[path]
        # Never STALE here: nginx may not serve from its own expired copy, only what Moxy said.
        assert answer.headers["x-cdn-cache"] in ("HIT", "REVALIDATED", "EXPIRED"), _summary(answer)
        reason = outages[path][1]
        return any(r["cache"] == "STALE" and reason in r["reason"] for r in moxy_requests(moxy, urls[path]))

    deadline = time.monotonic() + 6
    waiting = set(outages)
    while waiting:
        waiting = {path for path in waiting if not hidden(path)}
        assert time.monotonic() < deadline, waiting
        time.sleep(POLL)

    for path, url in urls.items():
        assert origin.hits(path) >= 2  # the bad answer really came from the origin
        # nginx revalidated its expired copy; Moxy answered from its own stale copy (a 304 when the bytes nginx
        # holds are the ones Moxy would send).
        outage = moxy_requests(moxy, url)[1:]
        assert outage and all(r["cache"] == "STALE" and r["status"] in (200, 304) for r in outage), outage
    asked = [r for r in edge.access_log() if r["upstream_status"]]
    assert all(r["status"] == 200 and r["upstream_status"] in ("200", "304") for r in asked), asked

    # An edge that never held the objects (another point of presence, or an eviction) gets full stale copies.
    other_edge = start_cdn(moxy)
    for path, url in urls.items():
        cold = other_edge.get(url)
        assert cold.status_code == 200 and cold.content == good[path]
        assert (cold.headers["x-cdn-cache"], cold.headers["x-moxy-cache"]) == ("MISS", "STALE"), _summary(cold)

    for path in outages:
        origin.route(path, Reply(headers={"Content-Type": "application/json", **cc}, body=healed[path]))
    fresh: dict[str, httpx.Response] = {}
    deadline = time.monotonic() + 6
    while len(fresh) < len(urls):
        for path in set(urls) - set(fresh):
            answer = edge.get(urls[path])
            assert answer.status_code == 200 and answer.content in (good[path], healed[path]), _summary(answer)
            if answer.content == healed[path]:
                fresh[path] = answer
        assert time.monotonic() < deadline, set(urls) - set(fresh)
        time.sleep(POLL)
    for answer in fresh.values():
        assert (answer.headers["x-cdn-cache"], answer.headers["x-moxy-cache"]) == ("EXPIRED", "MISS"), _summary(answer)


def test_a_forged_url_is_refused_every_time_and_never_cached(
    origin: Origin, start_moxy: StartMoxy, start_cdn: StartCdn
) -> None:
    body = _png(4096)
    origin.route("/a.png", Reply(headers={"Content-Type": "image/png"}, body=body))
    moxy = start_moxy(access_log=1)
    cdn = start_cdn(moxy)
    good = moxy.sign(origin.url("/a.png"))
    digest = good.rsplit("/", 2)[-2]
    # The first character: the last one of an unpadded base64 digest carries bits a decoder may ignore.
    forged = good.replace(digest, ("A" if digest[0] != "A" else "B") + digest[1:])

    for _ in range(2):
        refused = cdn.get(forged)
        assert refused.status_code == 403, _summary(refused)
        assert refused.headers["cache-control"] == "no-store"
        assert refused.headers["x-cdn-cache"] == "MISS"
        assert refused.json()["error"] == "BadSignature"
    assert [r["status"] for r in moxy_requests(moxy, forged)] == [403, 403]
    assert [(r["cache"], r["upstream_status"]) for r in cdn.access_log(2)] == [("MISS", "403"), ("MISS", "403")]
    assert origin.hits("/a.png") == 0

    first, second = cdn.get(good), cdn.get(good)
    assert first.status_code == 200 and first.content == body and first.headers["x-cdn-cache"] == "MISS"
    assert second.status_code == 200 and second.content == body and second.headers["x-cdn-cache"] == "HIT"
    assert len(moxy_requests(moxy, good)) == 1


def test_cdn_answers_if_none_match_with_moxys_etag(origin: Origin, start_moxy: StartMoxy, start_cdn: StartCdn) -> None:
    body = _png(8192)
    origin.route("/b.png", Reply(headers={"Content-Type": "image/png", "Cache-Control": "max-age=60"}, body=body))
    moxy = start_moxy(access_log=1)
    cdn = start_cdn(moxy)
    url = moxy.sign(origin.url("/b.png"))

    # Moxy's copy is a second old when nginx first asks: the answer carries the full lifetime and the Age, so a
    # cache that subtracts Age counts the second once.
    assert moxy.get(origin.url("/b.png")).headers["x-moxy-cache"] == "MISS"
    time.sleep(1.1)
    first = cdn.get(url)
    assert first.status_code == 200 and first.content == body
    assert (first.headers["x-cdn-cache"], first.headers["x-moxy-cache"]) == ("MISS", "HIT")
    assert first.headers["cache-control"].startswith("public, max-age=60, "), first.headers["cache-control"]
    assert int(first.headers["age"]) >= 1
    etag = first.headers["etag"]
    assert etag.startswith('"') and not etag.startswith("W/")

    unchanged = cdn.get(url, headers={"If-None-Match": etag})
    assert unchanged.status_code == 304, _summary(unchanged)
    assert unchanged.content == b""
    assert unchanged.headers["etag"] == etag
    assert unchanged.headers["x-cdn-cache"] == "HIT"

    other = cdn.get(url, headers={"If-None-Match": '"not-this-one"'})
    assert other.status_code == 200 and other.content == body
    assert other.headers["x-cdn-cache"] == "HIT"
    assert len(moxy_requests(moxy, url)) == 2  # the direct warm-up and nginx's one miss
