"""End to end through Moxy under uvicorn, with a real upstream on loopback."""

from __future__ import annotations

import concurrent.futures
import hashlib
import time
from collections.abc import Callable

import httpx
import pytest

from tests.assets import PNG
from tests.integration.moxy_server import MoxyServer
from tests.integration.origin import ConnectionCounter, Origin, Reply, pattern, pattern_sha256

pytestmark = pytest.mark.integration

StartMoxy = Callable[..., MoxyServer]


@pytest.mark.parametrize("size", [1024, 10 * 1024, 1024 * 1024, 50 * 1024 * 1024])
def test_bytes_intact_then_hit_without_upstream(origin: Origin, start_moxy: StartMoxy, size: int) -> None:
    origin.route("/blob.png", Reply(headers={"Content-Type": "image/png"}, body=PNG[:16] + pattern(size - 16)))
    moxy = start_moxy(max_body_bytes=64 * 1024 * 1024)
    expected = hashlib.sha256(PNG[:16] + pattern(size - 16)).hexdigest()
    first = moxy.get(origin.url("/blob.png"))
    assert first.status_code == 200, first.text
    assert hashlib.sha256(first.content).hexdigest() == expected
    assert first.headers["content-type"] == "image/png"
    assert first.headers["x-moxy-cache"] == "MISS"
    second = moxy.get(origin.url("/blob.png"))
    assert second.headers["x-moxy-cache"] == "HIT"
    assert hashlib.sha256(second.content).hexdigest() == expected
    head = httpx.head(moxy.sign(origin.url("/blob.png")))
    assert head.status_code == 200 and head.content == b""
    assert int(head.headers["content-length"]) == size
    assert origin.hits("/blob.png") == 1


def test_request_errors_are_json_and_never_cached(origin: Origin, start_moxy: StartMoxy) -> None:
    origin.route("/a.png", Reply(headers={"Content-Type": "image/png"}, body=PNG))
    moxy = start_moxy()
    good = moxy.sign(origin.url("/a.png"))
    digest, encoded = good.rsplit("/", 2)[-2:]
    tampered = good.replace(digest, ("A" if digest[0] != "A" else "B") + digest[1:])
    cases = {
        tampered: 403,
        f"{moxy.base_url}/{digest}": 400,
        f"{moxy.base_url}/{digest}/!!!": 400,
        moxy.sign(origin.url("/a.png"), expires_in=-10): 410,
    }
    for url, status in cases.items():
        answer = httpx.get(url)
        assert answer.status_code == status, (url, answer.text)
        assert answer.headers["cache-control"] == "no-store"
        assert set(answer.json()) == {"error", "reason"}
        assert answer.headers["x-content-type-options"] == "nosniff"
    assert origin.hits("/a.png") == 0
    assert httpx.get(good).status_code == 200


def test_private_destinations_get_403_and_no_connection(tmp_path, start_moxy: StartMoxy) -> None:
    moxy = MoxyServer(tmp_path / "cache")
    with ConnectionCounter() as target:
        moxy.settings = {"allowed_networks": ""}
        moxy.start()
        try:
            port = target.port
            for url in (
                f"http://127.0.0.1:{port}/x.png",
                f"http://localhost:{port}/x.png",
                f"http://[::1]:{port}/x.png",
                f"http://2130706433:{port}/x.png",
                f"http://0x7f.1:{port}/x.png",
                f"http://[::ffff:127.0.0.1]:{port}/x.png",
            ):
                answer = moxy.get(url)
                assert answer.status_code == 403, (url, answer.text)
                assert answer.json()["error"] == "DestinationRefused"
                assert answer.headers["cache-control"] == "no-store"
            assert target.connections == 0
        finally:
            moxy.stop()


def test_redirect_to_private_address_is_refused(origin: Origin, tmp_path) -> None:
    with ConnectionCounter(host="127.0.0.2", ipv6=False) as target:
        origin.route("/hop", Reply.redirect(f"http://127.0.0.2:{target.port}/x.png"))
        # Only the origin's own address is allowed: the hop to 127.0.0.2 must be refused.
        with MoxyServer(tmp_path / "cache", allowed_networks="127.0.0.1/32") as moxy:
            answer = moxy.get(origin.url("/hop"))
            assert answer.status_code == 403, answer.text
        assert target.connections == 0


def test_forty_concurrent_cold_requests_cost_one_fetch(origin: Origin, start_moxy: StartMoxy) -> None:
    origin.route("/slow.png", Reply(headers={"Content-Type": "image/png"}, body=PNG, delay_headers=0.5))
    moxy = start_moxy()
    url = moxy.sign(origin.url("/slow.png"))
    with concurrent.futures.ThreadPoolExecutor(40) as pool:
        answers = list(pool.map(lambda _: httpx.get(url, timeout=30), range(40)))
    assert [a.status_code for a in answers] == [200] * 40
    assert all(a.content == PNG for a in answers)
    assert origin.hits("/slow.png") == 1


def test_stale_copy_with_etag_is_revalidated(origin: Origin, start_moxy: StartMoxy) -> None:
    # max-age=2: Date has whole seconds, so a copy may be ~1 s old on arrival; 2 s leaves it fresh for the HIT below.
    headers = {"Content-Type": "image/png", "ETag": '"v1"', "Cache-Control": "max-age=2"}
    origin.route("/r.png", Reply(headers=headers, body=PNG))
    moxy = start_moxy(ttl_min=0, stale_while_revalidate=0)
    assert moxy.get(origin.url("/r.png")).headers["x-moxy-cache"] == "MISS"
    time.sleep(2.1)
    again = moxy.get(origin.url("/r.png"))
    assert again.status_code == 200 and again.content == PNG
    assert again.headers["x-moxy-cache"] == "REVALIDATED"
    last = origin.requests[-1]
    assert last.headers.get("if-none-match") == '"v1"'
    assert origin.body_bytes_sent("/r.png") == len(PNG)  # the 304 carried no body
    assert moxy.get(origin.url("/r.png")).headers["x-moxy-cache"] == "HIT"


def test_restarted_moxy_serves_from_disk_and_workers_share_it(origin: Origin, start_moxy: StartMoxy, tmp_path) -> None:
    origin.route("/d.png", Reply(headers={"Content-Type": "image/png"}, body=PNG))
    first = start_moxy(cache_dir=tmp_path / "shared")
    assert first.get(origin.url("/d.png")).headers["x-moxy-cache"] == "MISS"
    second = start_moxy(cache_dir=tmp_path / "shared")  # another process on the same folder
    answer = second.get(origin.url("/d.png"))
    assert answer.headers["x-moxy-cache"] == "HIT" and answer.content == PNG
    first.stop()
    restarted = start_moxy(cache_dir=tmp_path / "shared")
    assert restarted.get(origin.url("/d.png")).content == PNG
    assert origin.hits("/d.png") == 1


@pytest.mark.parametrize(
    ("reply", "status", "reason"),
    [
        (Reply(headers={"Content-Type": "image/png"}, body=PNG, delay_headers=5), 504, "timeout"),
        (Reply(headers={"Content-Type": "image/png"}, stream_size=4 * 1024 * 1024), 502, "too-large"),
        (Reply(headers={"Content-Type": "image/png"}, body=PNG, declared_length=len(PNG) + 100), 502, "truncated"),
        (Reply(headers={"Content-Type": "image/png"}, body=PNG * 100, reset_after=1000), 502, ""),
        (Reply.redirect("/loop"), 502, "too-many-redirects"),
    ],
)
def test_hostile_upstreams_never_give_a_truncated_200(
    origin: Origin, start_moxy: StartMoxy, reply: Reply, status: int, reason: str
) -> None:
    origin.route("/loop", reply)
    moxy = start_moxy(total_timeout=1, read_timeout=1, max_body_bytes=1024 * 1024)
    started = time.monotonic()
    answer = moxy.get(origin.url("/loop"))
    assert answer.status_code == status, answer.text
    assert reason in answer.json()["reason"]
    assert time.monotonic() - started < 4
    assert answer.headers["cache-control"] == "public, max-age=10"


def test_streaming_a_large_body_keeps_memory_bounded(origin: Origin, start_moxy: StartMoxy) -> None:
    size = 200 * 1024 * 1024
    origin.route("/video.mp4", Reply(headers={"Content-Type": "video/x-raw"}, stream_size=size))  # no magic to sniff
    moxy = start_moxy(max_body_bytes=size + 1, disk_cache_bytes=1024 * 1024 * 1024)
    digest = hashlib.sha256()
    received = 0
    with httpx.stream("GET", moxy.sign(origin.url("/video.mp4")), timeout=120) as answer:
        assert answer.status_code == 200
        for chunk in answer.iter_bytes(1024 * 1024):
            digest.update(chunk)
            received += len(chunk)
    assert received == size
    assert digest.hexdigest() == pattern_sha256(size)
    assert moxy.peak_rss_kib() < 160 * 1024  # well under the 200 MiB body


def test_range_and_conditional_requests(origin: Origin, start_moxy: StartMoxy) -> None:
    body = PNG + pattern(100_000)
    origin.route("/r.png", Reply(headers={"Content-Type": "image/png"}, body=body))
    moxy = start_moxy()
    url = moxy.sign(origin.url("/r.png"))
    full = httpx.get(url)
    part = httpx.get(url, headers={"Range": "bytes=10-19"})
    assert part.status_code == 206 and part.content == body[10:20]
    assert part.headers["content-range"] == f"bytes 10-19/{len(body)}"
    suffix = httpx.get(url, headers={"Range": "bytes=-5"})
    assert suffix.status_code == 206 and suffix.content == body[-5:]
    beyond = httpx.get(url, headers={"Range": f"bytes={len(body)}-"})
    assert beyond.status_code == 416 and beyond.headers["content-range"] == f"bytes */{len(body)}"
    assert httpx.get(url, headers={"Range": "bytes=oops"}).status_code == 200
    not_modified = httpx.get(url, headers={"If-None-Match": full.headers["etag"]})
    assert not_modified.status_code == 304 and not_modified.content == b""
    assert origin.hits("/r.png") == 1


def test_five_hundred_concurrent_requests(origin: Origin, start_moxy: StartMoxy) -> None:
    for index in range(20):
        origin.route(f"/m{index}.png", Reply(headers={"Content-Type": "image/png"}, body=PNG + bytes([index])))
    moxy = start_moxy()
    urls = [moxy.sign(origin.url(f"/m{i % 20}.png")) for i in range(500)]
    with httpx.Client(limits=httpx.Limits(max_connections=100), timeout=60) as client:
        with concurrent.futures.ThreadPoolExecutor(100) as pool:
            answers = list(pool.map(client.get, urls))
    for index, answer in enumerate(answers):
        assert answer.status_code == 200
        assert answer.content == PNG + bytes([index % 20])
    assert sum(origin.hits(f"/m{i}.png") for i in range(20)) == 20


def test_repeat_hits_answer_exactly_like_the_first_hit(origin: Origin, start_moxy: StartMoxy) -> None:
    """The third request is answered by the hit memo (moxy.hits); nothing a client sees may differ from the second."""
    origin.route("/same.png", Reply(headers={"Content-Type": "image/png", "Cache-Control": "max-age=600"}, body=PNG))
    moxy = start_moxy()
    url = moxy.sign(origin.url("/same.png"))
    answers = [httpx.get(url, headers={"Accept": "image/webp"}) for _ in range(4)]
    assert [a.headers["x-moxy-cache"] for a in answers] == ["MISS", "HIT", "HIT", "HIT"]

    def visible(answer: httpx.Response) -> list[tuple[str, str]]:
        return [(n, v) for n, v in answer.headers.multi_items() if n not in ("date", "age", "cache-status")]

    assert visible(answers[1]) == visible(answers[2]) == visible(answers[3])
    for answer in answers[1:]:
        assert answer.content == PNG
        assert answer.headers["cache-status"].startswith("moxy; hit; ttl=")
        assert int(answer.headers["age"]) >= 0
    # Conditional and range requests still get their own answers after the memo holds the hit.
    etag = answers[3].headers["etag"]
    assert httpx.get(url, headers={"Accept": "image/webp", "If-None-Match": etag}).status_code == 304
    ranged = httpx.get(url, headers={"Accept": "image/webp", "Range": "bytes=0-7"})
    assert ranged.status_code == 206 and ranged.content == PNG[:8]
    assert httpx.head(url, headers={"Accept": "image/webp"}).content == b""
    # The upstream sent no Vary: another Accept value is the same entry (a memo key of its own, the same answer).
    other = httpx.get(url, headers={"Accept": "image/avif"})
    assert other.headers["x-moxy-cache"] == "HIT" and visible(other) == visible(answers[1])
    assert origin.hits("/same.png") == 1
