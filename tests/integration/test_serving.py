"""What a CDN in front of a real Moxy sees: validators, Cache-Control with the full lifetime and Age, Cache-Status,
Vary, security headers, no cookies, conditional and range requests, HEAD, error caching.

One Moxy and one origin serve the whole module; every test uses its own upstream paths."""

from __future__ import annotations

import email.utils
import math
import re
import time
from collections.abc import Callable, Iterator
from itertools import count

import httpx
import pytest

from moxy.signing import Signer
from tests.assets import KEY
from tests.integration.moxy_server import MoxyServer
from tests.integration.origin import Origin, Reply, pattern

pytestmark = pytest.mark.integration

PNG_HEAD = b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR"
SMALL = PNG_HEAD + pattern(4000)  # held in memory: served from bytes
LARGE = pattern(3 * 1024 * 1024)  # above the memory tier's entry cap: a hit is streamed from the disk file
LAST_MODIFIED = "Tue, 03 Jun 2025 10:00:00 GMT"
SWR, SIE = 30, 600
SECURITY_HEADERS = {
    "x-content-type-options": "nosniff",
    "content-security-policy": "default-src 'none'; img-src data:; style-src 'unsafe-inline'; sandbox",
    "x-frame-options": "deny",
    "referrer-policy": "no-referrer",
}
_paths = count()


@pytest.fixture(scope="module")
def serving_origin() -> Iterator[Origin]:
    with Origin() as running:
        yield running


@pytest.fixture(scope="module")
def moxy(serving_origin: Origin, tmp_path_factory: pytest.TempPathFactory) -> Iterator[MoxyServer]:
    cache_dir = tmp_path_factory.mktemp("serving") / "cache"
    with MoxyServer(cache_dir, stale_while_revalidate=SWR, stale_if_error=SIE) as server:
        yield server


@pytest.fixture(scope="module")
def http() -> Iterator[httpx.Client]:
    with httpx.Client(timeout=30) as client:
        yield client


def _publish(origin: Origin, moxy: MoxyServer, reply: Reply) -> tuple[str, str]:
    """Route `reply` at a fresh upstream path; returns (path, signed Moxy URL)."""
    path = f"/s{next(_paths)}.png"
    origin.route(path, reply)
    return path, moxy.sign(origin.url(path))


def _image(body: bytes = SMALL, headers: dict[str, str] | None = None) -> Reply:
    content_type = "image/png" if body.startswith(PNG_HEAD) else "video/x-raw"  # x-raw has no magic to sniff
    return Reply(headers={"Content-Type": content_type, "Last-Modified": LAST_MODIFIED, **(headers or {})}, body=body)


def _cache_control(value: str) -> dict[str, str | None]:
    directives: dict[str, str | None] = {}
    for part in value.split(","):
        name, _, argument = part.strip().partition("=")
        directives[name.lower()] = argument or None
    return directives


def _forged(moxy_url: str) -> str:
    """The same Moxy URL with one character of its digest changed."""
    digest = moxy_url.rsplit("/", 2)[-2]
    return moxy_url.replace(digest, ("A" if digest[0] != "A" else "B") + digest[1:])


def _assert_security_headers(answer: httpx.Response) -> None:
    for name, value in SECURITY_HEADERS.items():
        assert answer.headers.get(name) == value, (answer.status_code, name, answer.headers.get(name))
    assert "set-cookie" not in answer.headers


# -- headers of a good answer ----------------------------------------------------------------------------------


def test_strong_etag_and_last_modified_are_stable_across_hits(
    http: httpx.Client, serving_origin: Origin, moxy: MoxyServer
) -> None:
    path, url = _publish(serving_origin, moxy, _image(headers={"ETag": 'W/"upstream-weak"'}))
    miss, hit = http.get(url), http.get(url)
    head = http.head(url)
    assert (miss.headers["x-moxy-cache"], hit.headers["x-moxy-cache"]) == ("MISS", "HIT")
    etag = miss.headers["etag"]
    assert re.fullmatch(r'"[\x21\x23-\x7e]+"', etag), etag  # RFC 9110 §8.8.3: a strong, quoted entity-tag
    assert hit.headers["etag"] == etag and head.headers["etag"] == etag
    assert all(answer.headers["last-modified"] == LAST_MODIFIED for answer in (miss, hit, head))
    # The tag follows the bytes: other bytes at another path get another tag.
    _, other = _publish(serving_origin, moxy, _image(SMALL + b"!"))
    assert http.get(other).headers["etag"] != etag
    assert serving_origin.hits(path) == 1


def _ttl(cache_status: str) -> int:
    match = re.search(r"ttl=(-?\d+)", cache_status)
    assert match, cache_status
    return int(match.group(1))


def test_cache_control_carries_the_full_lifetime_and_age_grows(
    http: httpx.Client, serving_origin: Origin, moxy: MoxyServer
) -> None:
    _, url = _publish(serving_origin, moxy, _image(headers={"Cache-Control": "max-age=100"}))
    _, aged_url = _publish(serving_origin, moxy, _image(headers={"Cache-Control": "max-age=100", "Age": "30"}))
    expiring_path, _ = _publish(serving_origin, moxy, _image())
    # The signed URL expires one to two whole seconds from now (expiry has one-second resolution).
    expires_at = math.ceil(time.time()) + 1
    expiring = Signer([KEY], moxy.base_url).sign(serving_origin.url(expiring_path), expires_at=expires_at)
    miss = http.get(url)
    aged = http.get(aged_url)
    # A second and third request: the repeat hits answered without the full flow must say the same.
    early_hits = [http.get(url), http.get(url)]
    expiring_answers = [http.get(expiring) for _ in range(3)]
    assert [answer.status_code for answer in expiring_answers] == [200, 200, 200]
    expected = f"public, max-age=100, stale-while-revalidate={SWR}, stale-if-error={SIE}"
    assert miss.headers["cache-control"] == expected
    assert int(miss.headers["age"]) == 0
    assert [hit.headers["x-moxy-cache"] for hit in early_hits] == ["HIT", "HIT"]
    time.sleep(max(1.1, expires_at - time.time() + 0.05))
    late_hits = [http.get(url), http.get(url)]
    for hit in late_hits:
        assert hit.headers["x-moxy-cache"] == "HIT"
        # The lifetime stays whole and Age counts up; a CDN subtracts Age itself.
        assert hit.headers["cache-control"] == expected
        assert 1 <= int(hit.headers["age"]) <= 5
        assert abs(_ttl(hit.headers["cache-status"]) - (100 - int(hit.headers["age"]))) <= 1  # both truncate
        stable = {k: v for k, v in hit.headers.items() if k not in ("date", "age", "cache-status")}
        assert stable == {k: v for k, v in early_hits[-1].headers.items() if k not in ("date", "age", "cache-status")}
    # RFC 9111 §4.2.3: the upstream's own Age is part of the age Moxy reports.
    assert aged.headers["cache-control"] == expected
    assert 30 <= int(aged.headers["age"]) <= 35
    # A repeat hit never outlives the signed URL it was first served for.
    late = http.get(expiring)
    assert late.status_code == 410, late.headers
    assert late.headers["cache-control"] == "no-store"


def test_cache_status_and_vary(http: httpx.Client, serving_origin: Origin, moxy: MoxyServer) -> None:
    path, url = _publish(serving_origin, moxy, _image())
    miss, hit, repeat = http.get(url), http.get(url), http.get(url)
    for answer in (miss, hit, repeat):
        # The upstream sent no Vary: one copy serves every client, so nothing is named.
        assert "vary" not in answer.headers
        status = answer.headers["cache-status"]
        assert status.startswith("moxy;"), status  # RFC 9211: the cache's name first
        assert "key=" not in status
    assert "fwd=" in miss.headers["cache-status"]
    for answer in (hit, repeat):
        assert re.search(r";\s*hit\b", answer.headers["cache-status"]), answer.headers["cache-status"]
    assert http.get(url, headers={"Accept": "image/webp"}).headers["x-moxy-cache"] == "HIT"
    assert serving_origin.hits(path) == 1
    # An upstream that varies on Accept: what Vary then promises, another Accept is another cached answer,
    # fetched with that Accept.
    path, url = _publish(serving_origin, moxy, _image(headers={"Vary": "Accept"}))
    assert http.get(url).headers["vary"] == "Accept"
    webp = http.get(url, headers={"Accept": "image/webp"})
    assert webp.headers["x-moxy-cache"] == "MISS" and webp.content == SMALL and webp.headers["vary"] == "Accept"
    # Sent as its class (image/webp and anything else), the form every WebP-capable browser shares.
    assert serving_origin.requests[-1].headers.get("accept") == "image/webp,*/*"
    assert http.get(url, headers={"Accept": "image/webp"}).headers["x-moxy-cache"] == "HIT"
    assert http.get(url).headers["x-moxy-cache"] == "HIT"
    assert serving_origin.hits(path) == 2


def test_cookies_never_cross(http: httpx.Client, serving_origin: Origin, moxy: MoxyServer) -> None:
    reply = _image(headers={"Set-Cookie": "session=upstream-secret; Path=/"})
    path, url = _publish(serving_origin, moxy, reply)
    miss = http.get(url, headers={"Cookie": "client=private", "Authorization": "Bearer client-token"})
    hit = http.get(url)
    assert miss.status_code == hit.status_code == 200
    for answer in (miss, hit):
        assert "set-cookie" not in answer.headers
        assert "upstream-secret" not in str(answer.headers)
    forwarded = serving_origin.requests[-1]
    assert forwarded.path == path
    assert "cookie" not in forwarded.headers and "authorization" not in forwarded.headers


# -- security headers on every kind of answer ------------------------------------------------------------------


def test_security_headers_on_every_answer(http: httpx.Client, serving_origin: Origin, moxy: MoxyServer) -> None:
    _, url = _publish(serving_origin, moxy, _image())
    _, broken = _publish(serving_origin, moxy, Reply(status=500, headers={"Content-Type": "image/png"}, body=b"oops"))
    ok = http.get(url)
    http.get(url)  # the first hit; the one below is a repeat hit
    answers = {
        "200": ok,
        "repeat 200": http.get(url),
        "304": http.get(url, headers={"If-None-Match": ok.headers["etag"]}),
        "206": http.get(url, headers={"Range": "bytes=0-9"}),
        "416": http.get(url, headers={"Range": f"bytes={len(SMALL)}-"}),
        "HEAD 200": http.head(url),
        "403": http.get(_forged(url)),
        "400": http.get(f"{moxy.base_url}/not-a-digest"),
        "410": http.get(moxy.sign(serving_origin.url("/gone.png"), expires_in=-5)),
        "502": http.get(broken),
        "HEAD 502": http.head(broken),
    }
    for label, answer in answers.items():
        assert str(answer.status_code) == label.split()[-1], (label, answer.status_code, answer.text)
        _assert_security_headers(answer)


# -- conditional requests ----------------------------------------------------------------------------------------


def test_if_none_match(http: httpx.Client, serving_origin: Origin, moxy: MoxyServer) -> None:
    path, url = _publish(serving_origin, moxy, _image())
    etag = http.get(url).headers["etag"]
    matching = [etag, "*", f'"nope", {etag}', f'"a","b" ,  {etag}', f"W/{etag}", f'W/"x", W/{etag}']
    for value in matching:
        answer = http.get(url, headers={"If-None-Match": value})
        assert answer.status_code == 304, value
        assert answer.content == b""
        assert answer.headers["etag"] == etag
        assert answer.headers["cache-control"].startswith("public, max-age=")
    for value in ('"nope"', f'{etag[:-2]}"', '"a", "b"'):
        answer = http.get(url, headers={"If-None-Match": value})
        assert answer.status_code == 200 and answer.content == SMALL, value
    assert serving_origin.hits(path) == 1


def test_if_modified_since(http: httpx.Client, serving_origin: Origin, moxy: MoxyServer) -> None:
    _, url = _publish(serving_origin, moxy, _image())
    assert http.get(url).status_code == 200
    later = "Wed, 04 Jun 2025 10:00:00 GMT"
    earlier = "Mon, 02 Jun 2025 10:00:00 GMT"
    for since in (LAST_MODIFIED, later):
        answer = http.get(url, headers={"If-Modified-Since": since})
        assert answer.status_code == 304, since
        assert answer.content == b""
    assert http.get(url, headers={"If-Modified-Since": earlier}).content == SMALL
    assert http.get(url, headers={"If-Modified-Since": "not a date"}).content == SMALL
    # RFC 9110 §13.2.2: If-None-Match decides when both are present, so a mismatching tag means 200.
    both = http.get(url, headers={"If-None-Match": '"other"', "If-Modified-Since": later})
    assert both.status_code == 200 and both.content == SMALL


def test_if_modified_since_with_the_last_modified_moxy_sent(
    http: httpx.Client, serving_origin: Origin, moxy: MoxyServer
) -> None:
    # The upstream sent no Last-Modified; Moxy sends one of its own, and a client revalidating with it must get
    # a 304 like any other (If-Modified-Since -> 304).
    _, url = _publish(serving_origin, moxy, Reply(headers={"Content-Type": "image/png"}, body=SMALL))
    first = http.get(url)
    assert first.status_code == 200
    last_modified = first.headers["last-modified"]
    assert email.utils.parsedate_to_datetime(last_modified) is not None
    answer = http.get(url, headers={"If-Modified-Since": last_modified})
    assert answer.status_code == 304, (last_modified, answer.status_code)


# -- ranges --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("body", [SMALL, LARGE], ids=["memory", "disk-file"])
def test_single_ranges(http: httpx.Client, serving_origin: Origin, moxy: MoxyServer, body: bytes) -> None:
    path, url = _publish(serving_origin, moxy, _image(body))
    assert http.get(url).content == body  # the miss; the ranges below are hits
    size = len(body)
    cases = {
        "bytes=0-9": (0, 9),
        "bytes=10-": (10, size - 1),
        "bytes=-5": (size - 5, size - 1),
        f"bytes=5-{size + 1000}": (5, size - 1),
        f"bytes={size - 1}-{size - 1}": (size - 1, size - 1),
        f"bytes=-{size + 10}": (0, size - 1),
    }
    for header, (start, end) in cases.items():
        answer = http.get(url, headers={"Range": header})
        assert answer.status_code == 206, header
        assert answer.headers["content-range"] == f"bytes {start}-{end}/{size}", header
        assert answer.content == body[start : end + 1], header
        assert int(answer.headers["content-length"]) == end + 1 - start
        assert answer.headers["x-moxy-cache"] == "HIT"
    assert serving_origin.hits(path) == 1


@pytest.mark.parametrize("body", [SMALL, LARGE], ids=["memory", "disk-file"])
def test_unsatisfiable_malformed_and_multi_ranges(
    http: httpx.Client, serving_origin: Origin, moxy: MoxyServer, body: bytes
) -> None:
    _, url = _publish(serving_origin, moxy, _image(body))
    size = len(body)
    for header in (f"bytes={size}-", f"bytes={size + 10}-{size + 20}", "bytes=-0"):
        answer = http.get(url, headers={"Range": header})
        assert answer.status_code == 416, header
        assert answer.headers["content-range"] == f"bytes */{size}"
        # The request's fault: a JSON error like every other, never kept by a cache, with the security headers.
        assert answer.json()["error"] == "RangeNotSatisfiable"
        assert answer.headers["cache-control"] == "no-store"
        assert answer.headers["x-content-type-options"] == "nosniff"
        assert "etag" not in answer.headers and "age" not in answer.headers
    # RFC 9110 §14.2: a Range that does not parse is ignored; Moxy answers every multi-range with the whole
    # body too, which is always a correct answer.
    for header in ("bytes=oops", "bytes=5-2", "items=0-9", "bytes 0-9", "bytes=0-1,5-9", "bytes=0-9, -5"):
        answer = http.get(url, headers={"Range": header})
        assert answer.status_code == 200, header
        assert answer.content == body, header
        assert "content-range" not in answer.headers
        assert int(answer.headers["content-length"]) == size


def test_if_range(http: httpx.Client, serving_origin: Origin, moxy: MoxyServer) -> None:
    _, url = _publish(serving_origin, moxy, _image())
    etag = http.get(url).headers["etag"]
    matching = http.get(url, headers={"Range": "bytes=0-9", "If-Range": etag})
    assert matching.status_code == 206 and matching.content == SMALL[:10]
    # RFC 9110 §13.1.5: If-Range uses the strong comparison, so another tag and a weak tag both mean the whole body.
    for validator in ('"something-else"', f"W/{etag}"):
        answer = http.get(url, headers={"Range": "bytes=0-9", "If-Range": validator})
        assert answer.status_code == 200, validator
        assert answer.content == SMALL and "content-range" not in answer.headers


# -- HEAD --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("body", [SMALL, LARGE], ids=["memory", "disk-file"])
def test_head_on_a_miss_and_a_hit(http: httpx.Client, serving_origin: Origin, moxy: MoxyServer, body: bytes) -> None:
    path, url = _publish(serving_origin, moxy, _image(body))
    miss = http.head(url)
    hit = http.head(url)
    assert (miss.headers["x-moxy-cache"], hit.headers["x-moxy-cache"]) == ("MISS", "HIT")
    for answer in (miss, hit):
        assert answer.status_code == 200
        assert answer.content == b""
        assert int(answer.headers["content-length"]) == len(body)
        assert answer.headers["content-type"] in ("image/png", "video/x-raw")
        assert answer.headers["etag"] == miss.headers["etag"]
        _assert_security_headers(answer)
    ranged_head = http.head(url, headers={"Range": "bytes=0-9"})
    assert ranged_head.status_code == 200, "RFC 9110 §14.2: Range applies to GET only"
    assert int(ranged_head.headers["content-length"]) == len(body) and "content-range" not in ranged_head.headers
    full = http.get(url)
    assert full.headers["x-moxy-cache"] == "HIT" and full.content == body
    assert full.headers["etag"] == miss.headers["etag"]
    assert serving_origin.hits(path) == 1


# -- how errors may be cached ----------------------------------------------------------------------------------


def test_upstream_errors_are_cached_briefly(http: httpx.Client, serving_origin: Origin, moxy: MoxyServer) -> None:
    _, broken = _publish(serving_origin, moxy, Reply(status=500, headers={"Content-Type": "image/png"}, body=b"x"))
    _, missing = _publish(serving_origin, moxy, Reply(status=404, body=b"no such picture"))
    _, liar = _publish(serving_origin, moxy, Reply(headers={"Content-Type": "image/png"}, body=b"<html>error</html>"))
    for url, status in ((broken, 502), (missing, 404), (liar, 502)):
        answer = http.get(url)
        assert answer.status_code == status, answer.text
        directives = _cache_control(answer.headers["cache-control"])
        assert "no-store" not in directives and "private" not in directives
        assert directives.get("max-age") == "10", answer.headers["cache-control"]
        assert set(answer.json()) == {"error", "reason"}


def test_request_errors_are_never_stored(http: httpx.Client, serving_origin: Origin, moxy: MoxyServer) -> None:
    _, url = _publish(serving_origin, moxy, _image())
    digest = url.rsplit("/", 2)[-2]
    for bad, status in (
        (f"{moxy.base_url}/{digest}", 400),
        (f"{moxy.base_url}/{digest}/%%%", 400),
        (_forged(url), 403),
        (moxy.sign(serving_origin.url("/expired.png"), expires_in=-5), 410),
        (moxy.sign("http://10.0.0.1/private.png"), 403),
    ):
        for method in ("GET", "HEAD"):
            answer = http.request(method, bad)
            assert answer.status_code == status, (bad, method)
            assert answer.headers["cache-control"] == "no-store", (bad, method)


def test_an_origin_locked_to_its_cdn_answers_only_requests_with_the_secret(
    start_moxy: Callable[..., MoxyServer], serving_origin: Origin
) -> None:
    secret = "origin-secret-for-the-edge-0123"
    moxy = start_moxy(origin_secret=secret)
    url = serving_origin.url("/locked.png")
    reply = Reply(headers={"Content-Type": "image/png", "Cache-Control": "max-age=600"}, body=SMALL)
    serving_origin.route("/locked.png", reply)
    around = moxy.get(url)
    assert around.status_code == 403 and around.json()["error"] == "Forbidden"
    assert around.headers["cache-control"] == "no-store"
    through = moxy.get(url, headers={"X-Moxy-Origin-Secret": secret})
    assert (through.status_code, through.content) == (200, SMALL)
    hit = moxy.get(url, headers={"X-Moxy-Origin-Secret": secret})
    assert hit.headers["x-moxy-cache"] == "HIT"
    assert moxy.get(url).status_code == 403, "a cached copy is no way around the lock"
    assert httpx.get(moxy.base_url + "/healthz").status_code == 200  # probes do not pass the CDN
