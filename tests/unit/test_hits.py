"""The hit memo (moxy.hits): when it may answer, and that it answers exactly what the full flow would send."""

from __future__ import annotations

import asyncio
import gc
import weakref
from collections import Counter
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings, strategies as st
from pydantic import SecretStr
from starlette.requests import Request

from moxy import routes
from moxy.app import Plan, open_components
from moxy.cache import TieredStorage
from moxy.cache.entry import Entry, make_key, variant_index
from moxy.cache.freshness import FreshnessRules, current_age
from moxy.cache.memory import MemoryStorage
from moxy.cache.purges import PurgeLog
from moxy.cache.vary import normalise
from moxy.config import Settings
from moxy.errors import UpstreamError
from moxy.hits import HitMemo, Hits, MemoKey, PreparedHit
from moxy.policy import DestinationPolicy
from moxy.proxy import CacheResult, Proxy, Served
from moxy.responses import render
from moxy.signing import Signer
from moxy.validation import build_chain
from tests.assets import KEY
from tests.entries import make_entry
from tests.fakes.clock import Clock
from tests.fakes.fetch import FakeFetch

pytestmark = pytest.mark.anyio

URL = "https://images.example/cat.png"
BODY = b"\x89PNG\r\n\x1a\n" + b"z" * 1000


def entry(body: bytes = BODY, **changes: object) -> Entry:
    defaults: dict[str, object] = {"stored_at": 1000.0, "age": 5.0, "lifetime": 100.0, "digest": "a" * 64}
    return make_entry(URL, body, accept="image/webp", **{**defaults, **changes})


async def setup(
    tmp_path: Path, stored: Entry | None = None, now: float = 1000.0
) -> tuple[HitMemo, MemoryStorage, Clock, PurgeLog]:
    memory = MemoryStorage(1 << 20, 1 << 20)
    clock = Clock(now)
    purges = PurgeLog(tmp_path / "purges.log")
    memo = HitMemo(memory, purges, ["Accept"], clock)
    if stored is not None:
        await memory.put(stored)
    return memo, memory, clock, purges


REQUEST_HEADERS = [(b"host", b"moxy"), (b"accept", b"image/webp")]


def _get(path: str = "/d/e") -> Request:
    return Request({"type": "http", "method": "GET", "path": path, "query_string": b"", "headers": REQUEST_HEADERS})


async def test_prepared_answer_is_the_full_flows_answer_at_the_current_age(tmp_path: Path) -> None:
    stored = entry()
    memo, _, clock, _ = await setup(tmp_path, stored)
    key = memo.key_of("/d/e", b"", REQUEST_HEADERS)
    assert key is not None
    memo.remember(key, stored, None)
    clock.now = 1010.0
    found = memo.find(key)
    assert found is not None
    prepared, held, now = found
    assert held is stored and held.body is BODY
    headers = prepared.headers_at(current_age(held, now))
    assert dict(headers)[b"age"] == b"15"  # 5 s old when stored, 10 s resident
    assert dict(headers)[b"cache-status"] == b"moxy; hit; ttl=85"
    full = render(_get(), Served(stored, BODY, CacheResult.HIT, age=current_age(stored, now)))
    assert headers == full.raw_headers


async def test_it_learns_plain_hits_of_get_requests_only(tmp_path: Path) -> None:
    stored = entry()
    memo, *_ = await setup(tmp_path, stored)
    scope = _get().scope
    key = memo.key_of("/d/e", b"", REQUEST_HEADERS)
    assert key is not None
    for served, method in [
        (Served(stored, BODY, CacheResult.STALE, age=5.0, reason="stale-while-revalidate"), "GET"),
        (Served(stored, BODY, CacheResult.HIT, age=5.0, reason="x"), "GET"),
        (Served(stored, BODY, CacheResult.MISS, age=5.0), "GET"),
        (Served(stored, BODY, CacheResult.HIT, age=5.0, stored=False), "GET"),
        (Served(stored, BODY, CacheResult.HIT, age=5.0), "HEAD"),
    ]:
        memo.learn({**scope, "method": method}, served)
        assert memo.find(key) is None, (served, method)
    memo.learn(scope, Served(stored, BODY, CacheResult.HIT, age=5.0))
    assert memo.find(key) is not None


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
    memo, *_ = await setup(tmp_path)
    assert memo.key_of("/d/e", b"", headers) is None


async def test_forwarded_header_values_are_part_of_the_identity(tmp_path: Path) -> None:
    stored = entry()
    memo, *_ = await setup(tmp_path, stored)
    key = memo.key_of("/d/e", b"", REQUEST_HEADERS)
    assert key is not None
    memo.remember(key, stored, None)
    other = memo.key_of("/d/e", b"", [(b"accept", b"image/avif")])
    none = memo.key_of("/d/e", b"", [])
    assert other is not None and none is not None
    assert memo.find(other) is None and memo.find(none) is None
    assert memo.find(key) is not None
    assert memo.key_of("/d/e", b"e=1", REQUEST_HEADERS) != key


@pytest.mark.parametrize(
    "spoil",
    ["expired-entry", "expired-url", "evicted", "replaced", "purged"],
)
async def test_it_never_answers_once_the_full_flow_would_answer_differently(tmp_path: Path, spoil: str) -> None:
    stored = entry()
    memo, memory, clock, purges = await setup(tmp_path, stored)
    key = memo.key_of("/d/e", b"", REQUEST_HEADERS)
    assert key is not None
    memo.remember(key, stored, url_expires_at=1050.0)
    assert memo.find(key) is not None
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
    assert memo.find(key) is None
    if spoil != "evicted":
        clock.now = 1000.0
    assert memo.find(key) is None, "a spoiled answer is dropped, not revived"


async def test_only_plain_resident_hits_are_prepared(tmp_path: Path) -> None:
    stored = entry()
    memo, *_ = await setup(tmp_path, stored)
    key = memo.key_of("/d/e", b"", REQUEST_HEADERS)
    assert key is not None
    memo.remember(key, entry(no_cache=True), None)
    assert memo.find(key) is None
    memo.remember(key, entry(digest="b" * 64), None)  # not the object the memory tier holds
    assert memo.find(key) is None


async def test_a_dropped_entry_is_not_kept_alive_by_the_memo(tmp_path: Path) -> None:
    stored = entry(body=b"\x89PNG\r\n\x1a\n" + b"q" * 100_000)
    memo, memory, _, _ = await setup(tmp_path, stored)
    key = memo.key_of("/d/e", b"", REQUEST_HEADERS)
    assert key is not None
    memo.remember(key, stored, None)
    alive = weakref.ref(stored)
    await memory.delete(stored.key)
    del stored
    gc.collect()
    assert alive() is None, "an evicted body must be freed, not held by a prepared answer"
    assert memo.find(key) is None


async def test_junk_query_parameters_share_one_key(tmp_path: Path) -> None:
    # Verification ignores parameters it does not read, so they must not make a new memo entry per request.
    memo, _, _, _ = await setup(tmp_path)
    plain = memo.key_of("/d/e", b"e=1700000000", REQUEST_HEADERS)
    for junk in (b"e=1700000000&junk=1", b"x=%00&e=1700000000", b"e=1700000000&" + b"y" * 5000):
        assert memo.key_of("/d/e", junk, REQUEST_HEADERS) == plain
    assert memo.key_of("/d/e", b"e=1700000001", REQUEST_HEADERS) != plain
    assert memo.key_of("/d/e", b"e=1700000000&e=1700000000", REQUEST_HEADERS) != plain
    assert memo.key_of("/d", b"url=a", REQUEST_HEADERS) != memo.key_of("/d", b"url=b", REQUEST_HEADERS)
    # Too long to be an ordinary repeat hit: the full flow answers it, and nothing is kept.
    assert memo.key_of("/d/e", b"junk=" + b"y" * 50_000, REQUEST_HEADERS) is None


async def test_the_memo_is_bounded_in_bytes_whatever_clients_send(tmp_path: Path) -> None:
    memory = MemoryStorage(1 << 24, 1 << 20)
    memo = HitMemo(memory, None, ["Accept"], Clock(1000.0), max_bytes=256 * 1024)
    stored = entry()
    await memory.put(stored)
    for number in range(2_000):
        # Distinct forwarded values of 8 KiB each: 16 MB of keys if nothing bounded them.
        accept = b"image/%d," % number + b"a" * 8000
        key = memo.key_of("/d/e", b"", [(b"accept", accept)])
        assert key is not None
        memo.remember(key, stored, None)
        assert memo.held_bytes <= 256 * 1024
    assert memo.held_bytes > 128 * 1024  # still in use, the oldest evicted


# -- the memo and the full flow agree, byte for byte -------------------------------------------------------------

BASE = "http://testserver"
PROPERTY = settings(max_examples=300, derandomize=True, database=None, deadline=None)
CONTENT_TYPES = [None, "image/png", "text/plain", "text/css; charset=latin-1", "application/json"]
ACCEPTS = [None, "image/webp,*/*", "image/avif,image/webp,image/apng,*/*;q=0.8", "*/*", "application/json", ""]
DATES = [None, "Tue, 03 Jun 2025 10:00:00 GMT", "Sun, 06 Nov 1994 08:49:37 GMT", "yesterday"]


async def _ask(app: Any, method: str, target: str, headers: list[tuple[bytes, bytes]]) -> tuple[Any, ...]:
    path, _, query = target.removeprefix(BASE).partition("?")
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "server": ("testserver", 80),
        "client": ("127.0.0.1", 50000),
        "root_path": "",
        "path": path,
        "raw_path": path.encode(),
        "query_string": query.encode(),
        "headers": [(b"host", b"testserver"), *headers],
    }
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: Any) -> None:
        sent.append(message)

    await app(scope, receive, send)
    start = sent[0]
    body = b"".join(message.get("body", b"") for message in sent[1:])
    return start["status"], [(bytes(name), bytes(value)) for name, value in start["headers"]], body


class CountingMemo(HitMemo):
    answered = 0

    def find(self, key: MemoKey) -> tuple[PreparedHit, Entry, float] | None:
        found = super().find(key)
        CountingMemo.answered += found is not None
        return found


@pytest.fixture
def base(tmp_path: Path) -> Iterator[tuple[routes.Components, Path]]:
    settings_ = Settings(key=SecretStr(KEY), base_url=BASE, cache_dir=tmp_path / "cache", access_log=False)
    components = asyncio.run(open_components(Plan.of(settings_)))
    yield components, tmp_path
    asyncio.run(components.upstream.aclose())


def test_the_memo_answers_exactly_what_the_full_flow_answers(base: tuple[routes.Components, Path]) -> None:
    """Two copies of one Moxy, one with the memo in front of its routes and one without, get the same requests at
    the same times over the same stored entry; every answer is the same bytes (status, header fields in order,
    body). The upstream is down, so whatever the full flow decides (stale-if-error, 502) needs no upstream."""
    components, folder = base
    CountingMemo.answered = 0
    # What the memo held when the second request came, by what the test did in between: each must be tried.
    prepared_before: Counter[str] = Counter()
    runs = iter(range(1_000_000))

    @PROPERTY
    @given(
        entry_fields=st.fixed_dictionaries(
            {
                "lifetime": st.integers(0, 1000).map(float),
                "age": st.one_of(st.floats(0, 5), st.floats(0, 200)),
                "stale_while_revalidate": st.sampled_from([0.0, 30.0, 1000.0]),
                "stale_if_error": st.sampled_from([0.0, 50.0, 1000.0]),
                "must_revalidate": st.booleans(),
                "no_cache": st.sampled_from([False] * 5 + [True]),
            }
        ),
        content_type=st.sampled_from(CONTENT_TYPES),
        last_modified=st.sampled_from(DATES),
        body=st.binary(max_size=64),
        stored_accept=st.sampled_from(ACCEPTS),
        asking=st.sampled_from(["plain", "plain", "plain", "repeated", "random"]),
        accepts=st.lists(st.sampled_from(ACCEPTS), max_size=2),
        extra=st.sampled_from([[], [], [(b"x-any", b"1")], [(b"range", b"bytes=0-3")], [(b"if-none-match", b"ETAG")]]),
        method=st.sampled_from(["GET", "GET", "GET", "HEAD"]),
        expires_in=st.sampled_from([None, 5000, 5000, 30]),
        junk=st.booleans(),
        warm_after=st.one_of(st.floats(0, 5), st.floats(0, 300)),
        then=st.sampled_from(["soon", "soon", "anytime", "past-lifetime", "past-url-expiry"]),
        then_after=st.floats(0, 300),
        spoil=st.sampled_from([None, None, None, "purge", "evict"]),
    )
    def check(
        entry_fields: dict[str, Any],
        content_type: str | None,
        last_modified: str | None,
        body: bytes,
        stored_accept: str | None,
        asking: str,
        accepts: list[str | None],
        extra: list[tuple[bytes, bytes]],
        method: str,
        expires_in: int | None,
        junk: bool,
        warm_after: float,
        then: str,
        then_after: float,
        spoil: str | None,
    ) -> None:
        stored_headers = tuple(
            (name, value) for name, value in (("content-type", content_type), ("last-modified", last_modified)) if value
        )
        accept = normalise("accept", stored_accept) if stored_accept else None
        stored = make_entry(URL, body, accept=accept, headers=stored_headers, stored_at=1_750_000_000.0, **entry_fields)
        etag = render(_get(), Served(stored, body, CacheResult.HIT, age=0.0)).headers["etag"].encode()
        # The first request asks for the stored variant plainly, so the memo learns whenever the entry is fresh.
        plain = [(b"accept", stored_accept.encode())] if stored_accept is not None else []
        if asking == "repeated":
            # Another line first, then the stored variant's: the full flow reads the first line.
            request_headers = [(b"accept", b"application/json"), *plain, *plain]
        elif asking == "plain":
            request_headers = list(plain)
        else:
            request_headers = [(b"accept", value.encode()) for value in accepts if value is not None]
        request_headers += [(name, value.replace(b"ETAG", etag)) for name, value in extra]
        clock = Clock(stored.stored_at + warm_after)
        signer = Signer([KEY], BASE, clock=clock)
        target = signer.sign(URL, expires_in=expires_in)
        if junk:
            target += ("&" if "?" in target else "?") + "junk=1"
        # Moves the clock past what the memo must notice, or by a random span.
        if then == "soon":
            then_after = min(then_after, 2.0)
        elif then == "past-lifetime":
            then_after = max(0.0, stored.lifetime - stored.age - warm_after) + then_after / 100
        elif then == "past-url-expiry" and expires_in is not None:
            then_after = expires_in - warm_after + then_after / 100

        async def scenario() -> list[tuple[Any, ...]]:
            stacks: list[tuple[Any, Proxy, MemoryStorage, PurgeLog]] = []
            memos: list[HitMemo] = []
            for memo_in_front in (True, False):
                memory = MemoryStorage(1 << 20, 1 << 20)
                await memory.put(stored)
                purges = PurgeLog(folder / f"purges-{next(runs)}.log")
                proxy = Proxy(
                    signer=signer,
                    policy=DestinationPolicy(),
                    storage=TieredStorage([memory], purges),
                    fetch=FakeFetch(clock, otherwise=UpstreamError("connect-failed")),
                    validators=build_chain(content_types=["image/*"], max_body_bytes=1 << 20),
                    freshness=FreshnessRules(0, 1e9, 60, 0, 0),
                    purges=purges,
                    clock=clock,
                )
                running = replace(
                    components, proxy=proxy, purges=purges, tiers=routes.Tiers(proxy.storage, memory, None)
                )
                app: Any = routes.router(running)
                if memo_in_front:
                    memos.append(CountingMemo(memory, purges, ["Accept"], clock))
                    app = Hits(routes.router(running, on_hit=memos[0].learn), memos[0], running.metrics, False)
                stacks.append((app, proxy, memory, purges))
            warm = [await _ask(app, "GET", target, plain) for app, *_ in stacks]
            for _ in range(20):  # background refreshes (stale-while-revalidate) end before the clock moves
                await asyncio.sleep(0)
            clock.now += then_after
            for _, _, memory, purges in stacks:
                if spoil == "purge":
                    await purges.record(URL, clock.now)
                elif spoil == "evict":
                    await memory.delete(stored.key)
            if memos[0].held_bytes:
                prepared_before.update([str(spoil), method, repr(extra), asking, str(expires_in), then])
            answers = [await _ask(app, method, target, request_headers) for app, *_ in stacks]
            for _, proxy, *_ in stacks:
                await proxy.aclose()
            assert warm[0] == warm[1]
            return answers

        with_memo, without = asyncio.run(scenario())
        assert with_memo == without

    check()
    assert CountingMemo.answered >= 20, "the memo answered too rarely for the comparison to mean much"
    tried = ["purge", "evict", "HEAD", "[(b'range', b'bytes=0-3')]", "[(b'if-none-match', b'ETAG')]", "repeated"]
    tried += ["past-lifetime", "past-url-expiry"]
    assert all(prepared_before[situation] >= 3 for situation in tried), prepared_before


async def test_a_variant_is_answered_only_while_its_index_still_leads_to_it(tmp_path: Path) -> None:
    variant = entry(vary=("accept",))
    memo, memory, _, _ = await setup(tmp_path, variant)
    await memory.put(variant_index(variant, make_key(URL, ())))
    key = memo.key_of("/d/e", b"", REQUEST_HEADERS)
    assert key is not None
    memo.remember(key, variant, None)
    assert memo.find(key) is not None
    # The upstream stopped varying: the URL's own entry replaced the index, and the full flow now serves that one.
    # The variant is still resident, but the memo must not keep answering with it.
    await memory.put(entry(key=make_key(URL, ()), body=b"\x89PNG\r\n\x1a\nnewer"))
    assert memory.holds(variant)
    assert memo.find(key) is None
