"""POST /purge and `moxy purge` against a real Moxy.

A purge is proved by what the origin sees: after it, the next request for the URL reaches the origin again
(origin.hits) and carries the origin's new bytes."""

from __future__ import annotations

import concurrent.futures
import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from itertools import count
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.integration.moxy_server import MoxyServer
from tests.integration.origin import Origin, Reply

pytestmark = pytest.mark.integration

StartMoxy = Callable[..., MoxyServer]

TOKEN = "purge-token-for-integration-tests"
PNG_HEAD = b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR"
OLD = PNG_HEAD + b"old picture " * 200
NEW = PNG_HEAD + b"new picture " * 200
_paths = count()


def _picture(body: bytes, vary: str | None = None) -> Reply:
    headers = {"Content-Type": "image/png", "Cache-Control": "max-age=3600"}
    return Reply(headers={**headers, "Vary": vary} if vary else headers, body=body)


# One client for the module (building one costs ~40 ms of TLS set-up), without keep-alive so that every
# request is a new connection, which the workers of a multi-worker Moxy take in turn.
_http = httpx.Client(timeout=30, limits=httpx.Limits(max_keepalive_connections=0))
# Accept is part of the cache key, and the plain variant is the one a purge deletes at once.
del _http.headers["accept"]


@pytest.fixture(scope="module", autouse=True)
def _close_http() -> Iterator[None]:
    yield
    _http.close()


def fetch(url: str, accept: str | None = None) -> httpx.Response:
    """GET without httpx's default `Accept: */*` unless one is given."""
    return _http.get(url, headers={"Accept": accept} if accept else None)


def purge(moxy: MoxyServer, body: Any, authorization: str | None = f"Bearer {TOKEN}") -> httpx.Response:
    headers = {"Authorization": authorization} if authorization is not None else {}
    if isinstance(body, bytes):
        return httpx.post(moxy.base_url + "/purge", content=body, headers=headers, timeout=30)
    return httpx.post(moxy.base_url + "/purge", json=body, headers=headers, timeout=30)


def removed(answer: httpx.Response) -> int:
    """The count of a successful purge answer, after checking its shape: `{"removed": n}`, plus the URL's
    `surrogate_key` when Moxy reports one."""
    assert answer.status_code == 200, answer.text
    assert answer.headers["content-type"] == "application/json"
    body = answer.json()
    assert isinstance(body, dict) and set(body) <= {"removed", "surrogate_key"}, body
    count = body["removed"]
    assert type(count) is int and count >= 0, body
    if "surrogate_key" in body:
        assert isinstance(body["surrogate_key"], str) and body["surrogate_key"], body
    return count


def _raw_post(moxy: MoxyServer, authorization: bytes | None, body: bytes) -> int:
    """POST /purge written byte for byte (httpx refuses header values with trailing whitespace); the status."""
    head = b"POST /purge HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nConnection: close\r\n"
    if authorization is not None:
        head += b"Authorization: " + authorization + b"\r\n"
    head += b"Content-Length: %d\r\n\r\n" % len(body)
    with socket.create_connection(("127.0.0.1", moxy.port), timeout=10) as conn:
        conn.sendall(head + body)
        answer = b""
        while b"\r\n" not in answer:
            chunk = conn.recv(4096)
            if not chunk:
                break
            answer += chunk
    status_line = answer.split(b"\r\n", 1)[0].split()
    assert len(status_line) >= 2 and status_line[0].startswith(b"HTTP/1."), answer[:200]
    return int(status_line[1])


def _cached(origin: Origin, moxy: MoxyServer) -> tuple[str, str]:
    """A fresh upstream path serving OLD, cached by Moxy (miss, then a hit); returns (path, upstream URL)."""
    path = f"/p{next(_paths)}.png"
    origin.route(path, _picture(OLD))
    url = origin.url(path)
    first, second = fetch(moxy.sign(url)), fetch(moxy.sign(url))
    assert (first.headers["x-moxy-cache"], second.headers["x-moxy-cache"]) == ("MISS", "HIT")
    assert second.content == OLD and origin.hits(path) == 1
    return path, url


def _assert_gone(origin: Origin, moxy: MoxyServer, path: str, hits_before: int, accept: str | None = None) -> None:
    """The next request misses, reaches the origin and carries its new content."""
    answer = fetch(moxy.sign(origin.url(path)), accept)
    assert answer.status_code == 200, answer.text
    assert answer.headers["x-moxy-cache"] == "MISS"
    assert answer.content == NEW
    assert origin.hits(path) == hits_before + 1


def _assert_kept(origin: Origin, moxy: MoxyServer, path: str, hits_before: int) -> None:
    answer = fetch(moxy.sign(origin.url(path)))
    assert answer.headers["x-moxy-cache"] == "HIT" and answer.content == OLD
    assert origin.hits(path) == hits_before


@pytest.fixture(scope="module")
def purge_origin() -> Iterator[Origin]:
    with Origin() as running:
        yield running


@pytest.fixture(scope="module")
def moxy(purge_origin: Origin, tmp_path_factory: pytest.TempPathFactory) -> Iterator[MoxyServer]:
    with MoxyServer(tmp_path_factory.mktemp("purge") / "cache", purge_token=TOKEN) as server:
        yield server


# -- authorised purges -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("by", ["upstream-url", "moxy-url"])
def test_authorised_purge_removes_the_entry(purge_origin: Origin, moxy: MoxyServer, by: str) -> None:
    path, url = _cached(purge_origin, moxy)
    served = fetch(moxy.sign(url))
    answer = purge(moxy, {"url": url if by == "upstream-url" else moxy.sign(url)})
    assert removed(answer) == 1
    # An operator purges the CDN by the key the purge names: the one the answers for this URL carried.
    if "surrogate-key" in served.headers or "surrogate_key" in answer.json():
        assert answer.json()["surrogate_key"] == served.headers["surrogate-key"]
    purge_origin.route(path, _picture(NEW))
    _assert_gone(purge_origin, moxy, path, hits_before=1)
    # The new copy is cached as usual.
    assert fetch(moxy.sign(url)).headers["x-moxy-cache"] == "HIT"
    assert purge_origin.hits(path) == 2


def test_the_bearer_scheme_is_case_insensitive(purge_origin: Origin, moxy: MoxyServer) -> None:
    path, url = _cached(purge_origin, moxy)
    assert removed(purge(moxy, {"url": url}, authorization=f"bearer {TOKEN}")) == 1  # RFC 9110 §11.1
    purge_origin.route(path, _picture(NEW))
    _assert_gone(purge_origin, moxy, path, hits_before=1)


def test_purge_by_an_expired_moxy_url(purge_origin: Origin, moxy: MoxyServer) -> None:
    # The Moxy URL names the upstream URL whatever its expiry; an operator purging with a link that has since
    # expired still means that picture.
    path, url = _cached(purge_origin, moxy)
    answer = purge(moxy, {"url": moxy.sign(url, expires_in=-60)})
    assert answer.status_code == 200, answer.text
    purge_origin.route(path, _picture(NEW))
    _assert_gone(purge_origin, moxy, path, hits_before=1)


def test_purge_drops_every_variant(purge_origin: Origin, moxy: MoxyServer) -> None:
    # The upstream varies on Accept, so browsers and CDNs hold their own variants (one entry per Accept class).
    path = f"/p{next(_paths)}.png"
    purge_origin.route(path, _picture(OLD, vary="Accept"))
    signed = moxy.sign(purge_origin.url(path))
    accepts = [None, "image/webp,image/*", "*/*"]
    for accept in accepts:
        assert fetch(signed, accept).headers["x-moxy-cache"] == "MISS"
        assert fetch(signed, accept).headers["x-moxy-cache"] == "HIT"
    assert purge_origin.hits(path) == len(accepts)
    assert removed(purge(moxy, {"url": purge_origin.url(path)})) >= 1
    purge_origin.route(path, _picture(NEW, vary="Accept"))
    for number, accept in enumerate(accepts, start=1):
        _assert_gone(purge_origin, moxy, path, hits_before=len(accepts) + number - 1, accept=accept)


def test_unknown_url_removes_nothing(purge_origin: Origin, moxy: MoxyServer) -> None:
    path, url = _cached(purge_origin, moxy)
    for unknown in (purge_origin.url("/never-cached.png"), url + "?other", "https://example.com/x.png", ""):
        answer = purge(moxy, {"url": unknown})
        assert removed(answer) == 0, unknown
    _assert_kept(purge_origin, moxy, path, hits_before=1)


# -- refusals ---------------------------------------------------------------------------------------------------


def test_unauthorised_purges_are_refused_and_remove_nothing(purge_origin: Origin, moxy: MoxyServer) -> None:
    path, url = _cached(purge_origin, moxy)
    wrong_same_length = TOKEN[:-1] + ("x" if TOKEN[-1] != "x" else "y")
    for authorization in (
        None,
        "",
        "Bearer",
        f"Bearer {wrong_same_length}",
        f"Bearer {TOKEN[:-1]}",
        f"Bearer {TOKEN}x",
        f"Basic {TOKEN}",
        TOKEN,
        f"Bearer  {TOKEN}x",
        f"Bearer {TOKEN}, Bearer {TOKEN}",
    ):
        answer = purge(moxy, {"url": url}, authorization=authorization)
        assert answer.status_code == 401, (authorization, answer.text)
        assert answer.headers["cache-control"] == "no-store"
        assert answer.headers.get("www-authenticate", "").startswith("Bearer")
        assert TOKEN not in answer.text
    # Values an HTTP client library refuses to send, written on the wire by hand.
    for raw in (b"Bearer ", b"Bearer  ", f"Bearer {TOKEN} x".encode()):
        assert _raw_post(moxy, raw, f'{{"url": "{url}"}}'.encode()) == 401, raw
    # Without the token even a malformed body is a 401: nothing is said about the endpoint's input.
    assert purge(moxy, b"not json", authorization=None).status_code == 401
    _assert_kept(purge_origin, moxy, path, hits_before=1)


def test_malformed_bodies_are_400(purge_origin: Origin, moxy: MoxyServer) -> None:
    path, url = _cached(purge_origin, moxy)
    for body in (b"", b"not json", b"{", b"[]", b'"text"', b"{}", b'{"uri": "x"}', b'{"url": 5}', b'{"url": null}'):
        answer = purge(moxy, body)
        assert answer.status_code == 400, (body, answer.text)
        assert answer.headers["cache-control"] == "no-store"
        assert set(answer.json()) == {"error", "reason"}
    for body_obj in ([url], {"url": [url]}, {"url": {"url": url}}):
        answer = purge(moxy, body_obj)
        assert answer.status_code == 400, (body_obj, answer.text)
    _assert_kept(purge_origin, moxy, path, hits_before=1)


def test_no_purge_endpoint_without_a_token(origin: Origin, start_moxy: StartMoxy) -> None:
    moxy = start_moxy()
    path, url = _cached(origin, moxy)
    for authorization in (f"Bearer {TOKEN}", "Bearer", None):
        answer = purge(moxy, {"url": url}, authorization=authorization)
        assert answer.status_code in (404, 405), (authorization, answer.status_code, answer.text)
        assert b"removed" not in answer.content
    assert _raw_post(moxy, b"Bearer ", f'{{"url": "{url}"}}'.encode()) in (404, 405)
    _assert_kept(origin, moxy, path, hits_before=1)


def test_an_empty_purge_token_lets_nobody_purge(origin: Origin, tmp_path: Path) -> None:
    # MOXY_PURGE_TOKEN= (set, but empty: an unfilled secret in a deployment template) must not open the endpoint
    # to an empty bearer token. Refusing to start, naming the setting, is as good as having no endpoint.
    moxy = MoxyServer(tmp_path / "cache", purge_token="")
    try:
        try:
            moxy.start()
        except RuntimeError:
            assert "MOXY_PURGE_TOKEN" in moxy.log()
            return
        path, url = _cached(origin, moxy)
        body = f'{{"url": "{url}"}}'.encode()
        for raw in (b"Bearer ", b"Bearer", None):
            assert _raw_post(moxy, raw, body) in (404, 405), raw
        _assert_kept(origin, moxy, path, hits_before=1)
    finally:
        moxy.stop()


# -- tiers and restarts -----------------------------------------------------------------------------------------


TIERS = [
    pytest.param({}, id="memory-and-disk"),
    # The entry is larger than the memory tier's cap: it lives on disk only.
    pytest.param({"memory_max_entry_bytes": 64}, id="disk-only-entry"),
    pytest.param({"memory_cache_bytes": 64 * 1024 * 1024, "disk_cache_bytes": 0}, id="memory-only"),
]


@pytest.mark.parametrize("tiers", TIERS)
def test_purge_in_every_tier_layout(origin: Origin, start_moxy: StartMoxy, tiers: dict[str, int]) -> None:
    moxy = start_moxy(purge_token=TOKEN, **tiers)
    path, url = _cached(origin, moxy)
    answer = purge(moxy, {"url": url})
    assert removed(answer) == 1
    origin.route(path, _picture(NEW))
    _assert_gone(origin, moxy, path, hits_before=1)


def test_a_restart_does_not_resurrect_a_purged_entry(origin: Origin, start_moxy: StartMoxy, tmp_path: Path) -> None:
    cache_dir = tmp_path / "shared-cache"
    first = start_moxy(cache_dir=cache_dir, purge_token=TOKEN, memory_max_entry_bytes=64)
    path, url = _cached(origin, first)
    kept_path, _ = _cached(origin, first)
    assert removed(purge(first, {"url": url})) == 1
    first.stop()
    origin.route(path, _picture(NEW))
    restarted = start_moxy(cache_dir=cache_dir, purge_token=TOKEN)
    _assert_gone(origin, restarted, path, hits_before=1)
    # The disk tier itself survived the restart: the entry not purged is still a hit.
    _assert_kept(origin, restarted, kept_path, hits_before=1)


# -- the command line --------------------------------------------------------------------------------------------


def _moxy_cli(*args: str, **env_settings: str) -> subprocess.CompletedProcess[str]:
    env = {name: value for name, value in os.environ.items() if not name.startswith("MOXY_")}
    env.update({f"MOXY_{name.upper()}": value for name, value in env_settings.items()})
    return subprocess.run([sys.executable, "-m", "moxy", *args], env=env, capture_output=True, text=True, timeout=60)


def test_moxy_purge_command(purge_origin: Origin, moxy: MoxyServer) -> None:
    path, url = _cached(purge_origin, moxy)
    # To the admin address: MOXY_BASE_URL is the public one (a CDN in production), never where a purge goes.
    done = _moxy_cli("purge", url, purge_token=TOKEN, admin_url=moxy.base_url, base_url="http://127.0.0.1:9")
    assert done.returncode == 0, done.stderr
    assert done.stdout == "purged 1 entry\n"
    assert TOKEN not in done.stdout + done.stderr
    purge_origin.route(path, _picture(NEW))
    _assert_gone(purge_origin, moxy, path, hits_before=1)

    # By Moxy URL, with --endpoint winning over MOXY_ADMIN_URL.
    path, url = _cached(purge_origin, moxy)
    done = _moxy_cli(
        "purge", moxy.sign(url), "--endpoint", moxy.base_url, purge_token=TOKEN, admin_url="http://127.0.0.1:9"
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout == "purged 1 entry\n"
    again = _moxy_cli("purge", url, "--endpoint", moxy.base_url, purge_token=TOKEN)
    assert (again.returncode, again.stdout) == (0, "purged 0 entries\n")

    kept_path, kept_url = _cached(purge_origin, moxy)
    refused = _moxy_cli("purge", kept_url, purge_token="wrong-token-of-full-length", admin_url=moxy.base_url)
    assert refused.returncode == 1 and refused.stdout == ""
    assert refused.stderr.startswith("moxy: purge refused (401)"), refused.stderr
    assert "wrong-token" not in refused.stderr
    missing = _moxy_cli("purge", kept_url, base_url=moxy.base_url)
    assert missing.returncode == 2 and "MOXY_PURGE_TOKEN" in missing.stderr
    _assert_kept(purge_origin, moxy, kept_path, hits_before=1)


def test_moxy_purge_counts_every_variant(purge_origin: Origin, moxy: MoxyServer) -> None:
    # A plain upstream: five browsers share one entry, and one is what a purge reports.
    browsers = [
        "image/avif,image/webp,image/apng,image/svg+xml,image/*,*/*;q=0.8",
        "image/avif,image/webp,*/*",
        "image/webp,*/*",
        "image/png,image/svg+xml,image/*;q=0.8,video/*;q=0.8,*/*;q=0.5",
        "*/*",
    ]
    plain = f"/p{next(_paths)}.png"
    purge_origin.route(plain, _picture(OLD))
    for accept in browsers:
        fetch(moxy.sign(purge_origin.url(plain)), accept)
    done = _moxy_cli("purge", purge_origin.url(plain), purge_token=TOKEN, admin_url=moxy.base_url)
    assert (done.returncode, done.stdout) == (0, "purged 1 entry\n"), done.stderr
    # One that varies on Accept: three classes among these browsers, three entries, all counted.
    varying = f"/p{next(_paths)}.png"
    purge_origin.route(varying, _picture(OLD, vary="Accept"))
    for accept in browsers:
        fetch(moxy.sign(purge_origin.url(varying)), accept)
    assert purge_origin.hits(varying) == 3
    done = _moxy_cli("purge", purge_origin.url(varying), purge_token=TOKEN, admin_url=moxy.base_url)
    assert (done.returncode, done.stdout) == (0, "purged 3 entries\n"), done.stderr


# -- several workers ---------------------------------------------------------------------------------------------
# The cross-worker case: it fails whenever a worker's private memory tier keeps serving a copy purged through
# another worker (the purge must travel between the processes, not only reach the shared disk tier).


def test_purge_reaches_every_worker(origin: Origin, start_moxy: StartMoxy) -> None:
    """workers=2 on one cache folder: the worker that takes the purge is only one of them, and each holds its
    own memory tier. Within 3 s of the purge, every answer must carry the new content."""
    moxy = start_moxy(purge_token=TOKEN, workers=2)
    path = "/shared.png"
    origin.route(path, _picture(OLD))
    signed = moxy.sign(origin.url(path))

    def batch() -> list[bytes]:
        # A new connection per request, in parallel, so both workers take a share.
        with concurrent.futures.ThreadPoolExecutor(20) as pool:
            return [answer.content for answer in pool.map(lambda _: fetch(signed), range(20))]

    assert batch() == [OLD] * 20
    assert batch() == [OLD] * 20
    removed(purge(moxy, {"url": origin.url(path)}))
    purged_at = time.monotonic()
    origin.route(path, _picture(NEW))
    stale_answers = 0
    while True:
        contents = batch()
        assert set(contents) <= {OLD, NEW}
        stale_answers += contents.count(OLD)
        if contents == [NEW] * 20:
            break
        assert time.monotonic() - purged_at < 3, f"{stale_answers} answers still carried the purged content"
    # Once every worker has dropped it, the purged content never comes back.
    assert batch() == [NEW] * 20
