"""The repeat-hit shortcut: when it may answer, and that it answers exactly what the full flow sent."""

from __future__ import annotations

import gc
import weakref
from dataclasses import replace
from pathlib import Path

import pytest

from moxy.cache.entry import Entry
from moxy.cache.memory import MemoryStorage
from moxy.cache.purges import PurgeLog
from moxy.shortcut import HitShortcut
from tests.entries import make_entry

pytestmark = pytest.mark.anyio

URL = "https://images.example/cat.png"
BODY = b"\x89PNG\r\n\x1a\n" + b"z" * 1000
SENT = [
    (b"content-type", b"image/png"),
    (b"etag", b'"abc"'),
    (b"cache-control", b"public, max-age=100, stale-while-revalidate=0, stale-if-error=0"),
    (b"age", b"5"),
    (b"x-moxy-cache", b"HIT"),
    (b"cache-status", b"moxy; hit; ttl=95"),
    (b"content-length", b"1008"),
]


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def entry(body: bytes = BODY, **changes: object) -> Entry:
    defaults: dict[str, object] = {"stored_at": 1000.0, "age": 5.0, "lifetime": 100.0, "digest": "a" * 64}
    return make_entry(URL, body, accept="image/webp", **{**defaults, **changes})


async def setup(
    tmp_path: Path, stored: Entry | None = None, now: float = 1000.0
) -> tuple[HitShortcut, MemoryStorage, Clock, PurgeLog]:
    memory = MemoryStorage(1 << 20, 1 << 20)
    clock = Clock(now)
    purges = PurgeLog(tmp_path / "purges.log")
    shortcut = HitShortcut(memory, purges, ["Accept"], clock)
    if stored is not None:
        await memory.put(stored)
    return shortcut, memory, clock, purges


REQUEST_HEADERS = [(b"host", b"moxy"), (b"accept", b"image/webp")]


async def test_prepared_answer_repeats_the_sent_headers_with_current_age(tmp_path: Path) -> None:
    stored = entry()
    shortcut, _, clock, _ = await setup(tmp_path, stored)
    key = shortcut.key_of("/d/e", b"", REQUEST_HEADERS)
    assert key is not None
    shortcut.remember(key, stored, SENT, None)
    clock.now = 1010.0
    found = shortcut.find(key)
    assert found is not None
    prepared, held, now = found
    assert held is stored and held.body is BODY
    headers = prepared.headers_at(held, now)
    expected = [h for h in SENT if h[0] not in (b"age", b"cache-status")]
    assert headers[: len(expected)] == expected
    assert dict(headers)[b"age"] == b"15"  # 5 s old when stored, 10 s resident
    assert dict(headers)[b"cache-status"] == b"moxy; hit; ttl=85"


@pytest.mark.parametrize(
    "headers",
    [
        [(b"range", b"bytes=0-1")],
        [(b"if-none-match", b'"abc"')],
        [(b"if-modified-since", b"Thu, 01 Jan 2026 00:00:00 GMT")],
        [(b"if-range", b'"abc"')],
        [(b"accept", b"a"), (b"accept", b"b")],  # two lines of a forwarded header: the full flow decides
        [(b"accept", b""), (b"accept", b"image/webp")],  # even after an empty one (it would be read as no Accept)
    ],
)
async def test_requests_asking_for_more_than_a_plain_200_go_the_full_way(
    tmp_path: Path, headers: list[tuple[bytes, bytes]]
) -> None:
    shortcut, *_ = await setup(tmp_path)
    assert shortcut.key_of("/d/e", b"", headers) is None


async def test_forwarded_header_values_are_part_of_the_identity(tmp_path: Path) -> None:
    stored = entry()
    shortcut, *_ = await setup(tmp_path, stored)
    key = shortcut.key_of("/d/e", b"", REQUEST_HEADERS)
    assert key is not None
    shortcut.remember(key, stored, SENT, None)
    other = shortcut.key_of("/d/e", b"", [(b"accept", b"image/avif")])
    none = shortcut.key_of("/d/e", b"", [])
    assert other is not None and none is not None
    assert shortcut.find(other) is None and shortcut.find(none) is None
    assert shortcut.find(key) is not None
    assert shortcut.key_of("/d/e", b"e=1", REQUEST_HEADERS) != key


@pytest.mark.parametrize(
    "spoil",
    ["expired-entry", "expired-url", "evicted", "replaced", "purged"],
)
async def test_it_never_answers_once_the_full_flow_would_answer_differently(tmp_path: Path, spoil: str) -> None:
    stored = entry()
    shortcut, memory, clock, purges = await setup(tmp_path, stored)
    key = shortcut.key_of("/d/e", b"", REQUEST_HEADERS)
    assert key is not None
    shortcut.remember(key, stored, SENT, url_expires_at=1050.0)
    assert shortcut.find(key) is not None
    if spoil == "expired-entry":
        clock.now = 1000.0 + 95.0  # stored 5 s old with a 100 s lifetime: stale now
    elif spoil == "expired-url":
        clock.now = 1050.0
    elif spoil == "evicted":
        await memory.delete(stored.key)
    elif spoil == "replaced":
        await memory.put(replace(stored, stored_at=1001.0))
    else:
        await purges.record(URL, 1000.5)
    assert shortcut.find(key) is None
    if spoil != "evicted":
        clock.now = 1000.0
    assert shortcut.find(key) is None, "a spoiled answer is dropped, not revived"


async def test_only_plain_resident_hits_are_prepared(tmp_path: Path) -> None:
    stored = entry()
    shortcut, *_ = await setup(tmp_path, stored)
    key = shortcut.key_of("/d/e", b"", REQUEST_HEADERS)
    assert key is not None
    stale_status = [(n, b'moxy; hit; ttl=0; detail="x"' if n == b"cache-status" else v) for n, v in SENT]
    shortcut.remember(key, stored, stale_status, None)
    assert shortcut.find(key) is None
    shortcut.remember(key, entry(no_cache=True), SENT, None)
    assert shortcut.find(key) is None
    shortcut.remember(key, entry(digest="b" * 64), SENT, None)  # not the object the memory tier holds
    assert shortcut.find(key) is None


async def test_a_dropped_entry_is_not_kept_alive_by_the_shortcut(tmp_path: Path) -> None:
    stored = entry(body=b"\x89PNG\r\n\x1a\n" + b"q" * 100_000)
    shortcut, memory, _, _ = await setup(tmp_path, stored)
    key = shortcut.key_of("/d/e", b"", REQUEST_HEADERS)
    assert key is not None
    shortcut.remember(key, stored, SENT, None)
    alive = weakref.ref(stored)
    await memory.delete(stored.key)
    del stored
    gc.collect()
    assert alive() is None, "an evicted body must be freed, not held by a prepared answer"
    assert shortcut.find(key) is None


async def test_junk_query_parameters_share_one_key(tmp_path: Path) -> None:
    # Verification ignores parameters it does not read, so they must not make a new memo entry per request.
    shortcut, _, _, _ = await setup(tmp_path)
    plain = shortcut.key_of("/d/e", b"e=1700000000", REQUEST_HEADERS)
    for junk in (b"e=1700000000&junk=1", b"x=%00&e=1700000000", b"e=1700000000&" + b"y" * 5000):
        assert shortcut.key_of("/d/e", junk, REQUEST_HEADERS) == plain
    assert shortcut.key_of("/d/e", b"e=1700000001", REQUEST_HEADERS) != plain
    assert shortcut.key_of("/d/e", b"e=1700000000&e=1700000000", REQUEST_HEADERS) != plain
    assert shortcut.key_of("/d", b"url=a", REQUEST_HEADERS) != shortcut.key_of("/d", b"url=b", REQUEST_HEADERS)
    # Too long to be an ordinary repeat hit: the full flow answers it, and nothing is kept.
    assert shortcut.key_of("/d/e", b"junk=" + b"y" * 50_000, REQUEST_HEADERS) is None


async def test_the_memo_is_bounded_in_bytes_whatever_clients_send(tmp_path: Path) -> None:
    memory = MemoryStorage(1 << 24, 1 << 20)
    shortcut = HitShortcut(memory, None, ["Accept"], Clock(1000.0), max_bytes=256 * 1024)
    stored = entry()
    await memory.put(stored)
    for number in range(2_000):
        # Distinct forwarded values of 8 KiB each: 16 MB of keys if nothing bounded them.
        accept = b"image/%d," % number + b"a" * 8000
        key = shortcut.key_of("/d/e", b"", [(b"accept", accept)])
        assert key is not None
        shortcut.remember(key, stored, SENT, None)
        assert shortcut.held_bytes <= 256 * 1024
    assert shortcut.held_bytes > 128 * 1024  # still in use, the oldest evicted
