"""Variants as browsers make them: one entry for every client unless the upstream answers with Vary (RFC 9111
§4.1 secondary keys), and then no more than Accept's few classes. A client cannot multiply upstream fetches or
cached variants by varying Accept, nor grow Moxy's memory of failures by it."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from moxy.cache import DiskStorage, Entry, make_key
from moxy.cache.vary import ACCEPT_CLASSES
from tests.assets import PNG
from tests.integration.moxy_server import MoxyServer
from tests.integration.origin import Origin, Reply

pytestmark = pytest.mark.integration


def test_distinct_accept_strings_make_a_few_variants(origin: Origin, start_moxy: Callable[..., MoxyServer]) -> None:
    moxy = start_moxy()
    varying = {"Content-Type": "image/png", "Cache-Control": "max-age=600", "Vary": "Accept"}
    origin.route("/pic.png", Reply(headers=varying, body=PNG))
    origin.route("/down.png", Reply(status=500, body=b"down"))
    good, down = moxy.sign(origin.url("/pic.png")), moxy.sign(origin.url("/down.png"))
    with httpx.Client(timeout=30) as client:
        for number in range(600):
            accept = f"image/x-{number}, image/webp;q=0.{number % 10}, */*;q=0.1"
            answer = client.get(good, headers={"Accept": accept})
            assert answer.status_code == 200 and answer.content == PNG
            assert client.get(down, headers={"Accept": accept}).status_code == 502
    # Two classes appear above (webp with q=0 and without); never more than there are classes.
    assert origin.hits("/pic.png") <= 2
    assert origin.hits("/down.png") <= 2, "each failure remembered per class, not per string"
    assert {request.headers.get("accept") for request in origin.requests} <= set(ACCEPT_CLASSES)


# The Accept of an <img> request in five real browsers.
BROWSER_ACCEPTS = {
    "chromium": "image/avif,image/webp,image/apng,image/svg+xml,image/*,*/*;q=0.8",
    "firefox": "image/avif,image/webp,*/*",
    "firefox-esr-78": "image/webp,*/*",
    "safari-17": "image/webp,image/avif,image/jxl,image/heic,image/heic-sequence,video/*;q=0.8,image/png,"
    "image/svg+xml,image/*;q=0.8,*/*;q=0.5",
    "safari-14": "image/png,image/svg+xml,image/*;q=0.8,video/*;q=0.8,*/*;q=0.5",
}


def _entries_on_disk(cache_dir: Path, url: str) -> list[Entry]:
    """Every entry the disk tier holds for `url`: the one of the URL alone, and one per Accept class."""

    async def read() -> list[Entry]:
        disk = DiskStorage(cache_dir, 1 << 30)
        keys = [make_key(url, ())] + [make_key(url, {"accept": accept}) for accept in ACCEPT_CLASSES]
        found = [await disk.get(key) for key in keys]
        await disk.aclose()
        return [entry for entry in found if entry is not None]

    return asyncio.run(read())


def test_five_browsers_share_one_entry_when_the_upstream_does_not_vary(
    origin: Origin, start_moxy: Callable[..., MoxyServer]
) -> None:
    moxy = start_moxy()
    origin.route("/one.png", Reply(headers={"Content-Type": "image/png", "Cache-Control": "max-age=600"}, body=PNG))
    url = moxy.sign(origin.url("/one.png"))
    with httpx.Client(timeout=30) as client:
        answers = {name: client.get(url, headers={"Accept": accept}) for name, accept in BROWSER_ACCEPTS.items()}
    assert [answer.headers["x-moxy-cache"] for answer in answers.values()] == ["MISS"] + ["HIT"] * 4
    for answer in answers.values():
        assert answer.content == PNG
        # Nothing to vary on: a CDN in front may keep one copy for every browser too.
        assert "vary" not in answer.headers
    assert origin.hits("/one.png") == 1
    moxy.stop()
    entries = _entries_on_disk(moxy.cache_dir, origin.url("/one.png"))
    assert [(entry.key, entry.vary) for entry in entries] == [(make_key(origin.url("/one.png"), ()), ())]


def test_five_browsers_make_at_most_three_variants_when_the_upstream_varies_on_accept(
    origin: Origin, start_moxy: Callable[..., MoxyServer]
) -> None:
    moxy = start_moxy()
    varying = {"Content-Type": "image/png", "Cache-Control": "max-age=600", "Vary": "Accept-Encoding, Accept"}
    origin.route("/some.png", Reply(headers=varying, body=PNG))
    url = moxy.sign(origin.url("/some.png"))
    with httpx.Client(timeout=30) as client:
        for accept in BROWSER_ACCEPTS.values():
            first = client.get(url, headers={"Accept": accept})
            assert first.status_code == 200 and first.content == PNG
            # Only what the entry depends on and Moxy forwards: Accept-Encoding never reaches the upstream.
            assert first.headers["vary"] == "Accept"
        again = {
            client.get(url, headers={"Accept": accept}).headers["x-moxy-cache"] for accept in BROWSER_ACCEPTS.values()
        }
    assert again == {"HIT"}
    assert origin.hits("/some.png") == 3, "avif+webp, webp and the rest: one fetch per class"
    assert {request.headers.get("accept") for request in origin.requests} <= set(ACCEPT_CLASSES)
    moxy.stop()
    entries = _entries_on_disk(moxy.cache_dir, origin.url("/some.png"))
    index, variants = entries[0], entries[1:]
    assert index.is_index and index.vary == ("accept",)
    assert len(variants) == 3 and all(entry.vary == ("accept",) and entry.length == len(PNG) for entry in variants)
