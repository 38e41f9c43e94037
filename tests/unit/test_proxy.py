"""The request flow of moxy.proxy without sockets.

Signer, destination policy, validator chain, freshness rules, storage and purge log are the real ones; only the
upstream is a scripted fake (tests/fakes/fetch.py: it records every call and can hold a fetch open on an event) and
the clock is driven by hand, so every freshness decision below is exact."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urlsplit

import orjson
import pytest

from moxy.body import OFFLOAD_BYTES, OpenBody
from moxy.cache import DiskStorage, MemoryStorage, Storage, make_key
from moxy.cache.entry import Entry
from moxy.cache.freshness import FreshnessRules
from moxy.cache.purges import PurgeLog
from moxy.cache.vary import ACCEPT_CLASSES, JSON as ACCEPT_JSON_CLASS, normalise
from moxy.errors import BadSignature, DestinationRefused, ExpiredURL, UpstreamError, UpstreamTimeout
from moxy.policy import DestinationPolicy
from moxy.proxy import CacheResult, Failed, Outcome, Proxy, ProxyRequest, Served
from moxy.signing import Signer
from moxy.validation import ACCEPT, Candidate, Verdict, build_chain
from tests.assets import JSON_BODY, KEY, PNG
from tests.fakes.clock import Clock
from tests.fakes.fetch import Answer, Call, FakeFetch, Scripted

pytestmark = pytest.mark.anyio

URL = "https://api.example/wp-json/wp/v2/posts?per_page=3"
START = 1_700_000_000.0
MiB = 1024 * 1024
JSON = "application/json"
JSON_ACCEPT = ACCEPT_JSON_CLASS  # an Accept already in its normalised form, so the test's keys match the proxy's
# An upstream whose answer depends on Accept: each class is an entry of its own (a secondary key).
VARYING = {"content-type": JSON, "cache-control": "max-age=60", "vary": "Accept"}
GOOD = JSON_BODY  # what the fake upstream answers unless told otherwise
NEWER = orjson.dumps([{"id": 3, "title": "newer"}])
WP_ERROR = orjson.dumps(
    {"code": "rest_forbidden", "message": "Sorry, you are not allowed to do that.", "data": {"status": 401}}
)
LAST_MODIFIED = "Tue, 01 Oct 2024 10:00:00 GMT"
RULES = FreshnessRules(ttl_min=0, ttl_max=86400, ttl_default=60, stale_while_revalidate=0, stale_if_error=600)

# Threads the custom validator below ran on, to tell the inline path from the worker-thread one.
VALIDATING_THREADS: list[int] = []


def record_validating_thread(candidate: Candidate) -> Verdict:
    """A custom validator (loaded by build_chain through its dotted path) that only notes where it ran."""
    VALIDATING_THREADS.append(threading.get_ident())
    return ACCEPT


@dataclass
class Rig:
    proxy: Proxy
    upstream: FakeFetch
    clock: Clock
    storage: Storage
    signer: Signer
    purges: PurgeLog | None
    rejections: list[tuple[str, str]]

    def request(self, url: str = URL, **headers: str) -> ProxyRequest:
        parts = urlsplit(self.signer.sign(url))
        return ProxyRequest(path=parts.path, query=parts.query, headers=headers)

    async def get(self, url: str = URL, **headers: str) -> Outcome:
        return await self.proxy.handle(self.request(url, **headers))

    async def stored(self, url: str = URL, **headers: str) -> Entry | None:
        return await self.storage.get(make_key(url, headers))


class MakeRig(Protocol):
    def __call__(
        self,
        *,
        storage: Storage | None = ...,
        clock: Clock | None = ...,
        purges: PurgeLog | None = ...,
        rules: FreshnessRules = ...,
        lock_timeout: float = ...,
        negative_ttl: float = ...,
        policy: DestinationPolicy | None = ...,
        custom: tuple[str, ...] = ...,
    ) -> Rig: ...


@pytest.fixture
async def make_rig(tmp_path: Path) -> AsyncIterator[MakeRig]:
    built: list[Rig] = []

    def make(
        *,
        storage: Storage | None = None,
        clock: Clock | None = None,
        purges: PurgeLog | None = None,
        rules: FreshnessRules = RULES,
        lock_timeout: float = 5.0,
        negative_ttl: float = 10.0,
        policy: DestinationPolicy | None = None,
        custom: tuple[str, ...] = (),
    ) -> Rig:
        clock = clock or Clock(START)
        signer = Signer([KEY], "https://moxy.example", clock=clock)
        upstream = FakeFetch(clock)
        storage = storage if storage is not None else MemoryStorage(64 * MiB, 8 * MiB)
        purges = purges if purges is not None else PurgeLog(tmp_path / f"purges-{len(built)}.log")
        rejections: list[tuple[str, str]] = []
        proxy = Proxy(
            signer=signer,
            policy=policy or DestinationPolicy(),
            storage=storage,
            fetch=upstream,
            validators=build_chain(content_types=[JSON, "image/*"], max_body_bytes=8 * MiB, custom=custom),
            freshness=rules,
            negative_ttl=negative_ttl,
            lock_timeout=lock_timeout,
            clock=clock,
            on_rejection=lambda reason, url: rejections.append((reason, url)),
            purges=purges,
        )
        rig = Rig(proxy, upstream, clock, storage, signer, purges, rejections)
        built.append(rig)
        return rig

    yield make
    for rig in built:
        await rig.proxy.aclose()
        await rig.storage.aclose()


def served(outcome: Outcome) -> Served:
    assert isinstance(outcome, Served), f"expected a served answer, got {outcome!r}"
    return outcome


def failed(outcome: Outcome) -> Failed:
    assert isinstance(outcome, Failed), f"expected a failure, got {outcome!r}"
    return outcome


def body_of(outcome: Served) -> bytes:
    if isinstance(outcome.body, OpenBody):
        return outcome.body.read(0, outcome.body.length)
    return outcome.body


async def settle(rounds: int = 20) -> None:
    """Let every runnable task reach its next real suspension point."""
    for _ in range(rounds):
        await asyncio.sleep(0)


async def until(check: Callable[[], bool] | Callable[[], Awaitable[bool]], timeout: float = 2.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        result: Any = check()
        if asyncio.iscoroutine(result):
            result = await result
        if result:
            return
        if loop.time() > deadline:
            raise AssertionError(f"condition not met within {timeout} s")
        await asyncio.sleep(0.001)


# -- hits and misses -----------------------------------------------------------------------------------


async def test_miss_then_hit_without_a_second_fetch(make_rig: MakeRig) -> None:
    rig = make_rig()
    headers = {"content-type": JSON, "cache-control": "max-age=60", "set-cookie": "session=secret"}
    rig.upstream.then(Answer(headers=headers))

    first = served(await rig.get())
    assert (first.cache, first.stored, first.upstream_status, first.age) == (CacheResult.MISS, True, 200, 0)
    assert body_of(first) == GOOD
    assert rig.upstream.calls == [Call(URL, {})], "no client header is forwarded unless allowlisted and present"

    rig.clock.advance(7)
    second = served(await rig.get())
    assert (second.cache, second.age, second.upstream_status) == (CacheResult.HIT, 7, None)
    assert body_of(second) == GOOD
    rig.clock.advance(50)
    third = served(await rig.get())
    assert (third.cache, third.age) == (CacheResult.HIT, 57)
    assert len(rig.upstream.calls) == 1

    entry = await rig.stored()
    assert entry is not None and entry.body == GOOD
    assert entry.header("set-cookie") is None, "only the allowlisted response headers are kept"
    assert entry.header("content-type") == JSON


async def test_forwarded_accept_goes_upstream_normalised_and_keys_a_varying_answer(make_rig: MakeRig) -> None:
    rig = make_rig()
    varying = {"content-type": JSON, "cache-control": "max-age=60", "vary": "Accept"}
    rig.upstream.then(Answer(body=GOOD, headers=varying)).then(Answer(body=NEWER, headers=varying))

    plain = served(await rig.get())
    webp = served(await rig.get(accept="  image/webp,   */*  ", cookie="session=secret"))
    assert body_of(plain) == GOOD and body_of(webp) == NEWER
    # Accept goes upstream as its class (moxy.cache.vary): a thousand browser strings make a handful of variants.
    assert rig.upstream.calls == [Call(URL, {}), Call(URL, {"accept": "image/webp,*/*"})]

    again = served(await rig.get(accept="image/webp, */*"))
    assert (again.cache, body_of(again)) == (CacheResult.HIT, NEWER), "same variant after normalisation"
    assert len(rig.upstream.calls) == 2
    index = await rig.stored()
    assert index is not None and index.is_index and index.vary == ("accept",) and index.body == b""
    assert webp.entry.key == make_key(URL, {"accept": "image/webp,*/*"}) and webp.entry.vary == ("accept",)


# Five browsers' image Accept strings (Chromium, Firefox, Safari, an old Edge, curl): three classes.
BROWSER_ACCEPTS = (
    "image/avif,image/webp,image/apng,image/svg+xml,image/*,*/*;q=0.8",
    "image/avif,image/webp,*/*",
    "image/webp,image/png,image/svg+xml,image/*;q=0.8,video/*;q=0.8,*/*;q=0.5",
    "image/webp,*/*",
    "*/*",
)


async def test_an_answer_without_vary_is_one_entry_for_every_client(make_rig: MakeRig) -> None:
    rig = make_rig()
    rig.upstream.then(Answer(body=GOOD))

    outcomes = [served(await rig.get(accept=accept)) for accept in BROWSER_ACCEPTS]
    assert len(rig.upstream.calls) == 1
    assert [outcome.cache for outcome in outcomes] == [CacheResult.MISS] + [CacheResult.HIT] * 4
    assert {outcome.entry.key for outcome in outcomes} == {make_key(URL, ())}
    assert all(outcome.entry.vary == () for outcome in outcomes)


async def test_a_vary_on_a_header_never_forwarded_needs_no_key(make_rig: MakeRig) -> None:
    rig = make_rig()
    rig.upstream.then(Answer(body=GOOD, headers={"content-type": JSON, "vary": "Cookie, User-Agent"}))

    first, second = served(await rig.get(accept="image/webp")), served(await rig.get(accept="*/*"))
    assert (first.cache, second.cache, len(rig.upstream.calls)) == (CacheResult.MISS, CacheResult.HIT, 1)
    assert first.entry.vary == ()


async def test_vary_star_is_served_but_never_stored(make_rig: MakeRig) -> None:
    rig = make_rig()
    rig.upstream.then(Answer(body=GOOD, headers={"content-type": JSON, "vary": "Accept, *"}))
    rig.upstream.then(Answer(body=NEWER, headers={"content-type": JSON, "vary": "*"}))

    first, second = served(await rig.get()), served(await rig.get())
    assert (first.cache, second.cache) == (CacheResult.BYPASS, CacheResult.BYPASS)
    assert (body_of(first), body_of(second)) == (GOOD, NEWER)
    assert await rig.stored() is None


async def test_an_upstream_that_stops_varying_gets_one_entry_again(make_rig: MakeRig) -> None:
    rig = make_rig()
    varying = {"content-type": JSON, "cache-control": "max-age=60", "vary": "accept"}
    rig.upstream.then(Answer(body=GOOD, headers=varying))
    rig.upstream.then(Answer(body=NEWER, headers={"content-type": JSON, "cache-control": "max-age=60"}))

    assert body_of(served(await rig.get(accept="image/webp"))) == GOOD
    rig.clock.advance(61 + RULES.stale_while_revalidate)
    # The variant is stale; the refetch answers without Vary, and its entry replaces the index.
    refreshed = served(await rig.get(accept="image/webp"))
    assert (refreshed.cache, body_of(refreshed)) == (CacheResult.MISS, NEWER)
    primary = await rig.stored()
    assert primary is not None and not primary.is_index and primary.body == NEWER
    assert served(await rig.get(accept="*/*")).cache is CacheResult.HIT
    assert len(rig.upstream.calls) == 2


async def test_concurrent_cold_requests_of_every_class_share_one_fetch_unless_the_answer_varies(
    make_rig: MakeRig,
) -> None:
    rig = make_rig()
    gate = asyncio.Event()
    rig.upstream.then(Answer(body=GOOD), gate=gate)
    tasks = [asyncio.create_task(rig.get(accept=accept)) for accept in BROWSER_ACCEPTS * 4]
    await until(lambda: len(rig.upstream.calls) == 1)
    gate.set()
    results = [served(outcome) for outcome in await asyncio.gather(*tasks)]
    assert len(rig.upstream.calls) == 1 and {body_of(result) for result in results} == {GOOD}

    # Another URL whose upstream varies: the waiters of another class learn it from the shared answer and fetch
    # their own variant, once per class (never the first class's body).
    other = "https://img.example.com/varying.png"
    varying = {"content-type": JSON, "cache-control": "max-age=60", "vary": "Accept"}
    gate = asyncio.Event()
    rig.upstream.then(Answer(body=GOOD, headers=varying), gate=gate)
    rig.upstream.then(Answer(body=NEWER, headers=varying)).then(Answer(body=NEWER, headers=varying))
    tasks = [asyncio.create_task(rig.get(other, accept=accept)) for accept in BROWSER_ACCEPTS * 4]
    await until(lambda: len(rig.upstream.calls) == 2)
    gate.set()
    results = [served(outcome) for outcome in await asyncio.gather(*tasks)]
    classes = {call.headers.get("accept") for call in rig.upstream.calls[1:]}
    assert len(rig.upstream.calls) == 4 and len(classes) == 3, rig.upstream.calls
    first_class = rig.upstream.calls[1].headers.get("accept")
    for accept, result in zip(BROWSER_ACCEPTS * 4, results, strict=True):
        expected = GOOD if normalise("accept", accept) == first_class else NEWER
        assert body_of(result) == expected and result.entry.vary == ("accept",)


PICTURE = {"content-type": "image/png", "cache-control": "max-age=60", "vary": "Accept", "etag": '"v1"'}


async def test_a_variant_with_no_copy_yet_still_keeps_the_urls_kind(make_rig: MakeRig) -> None:
    """The reason Moxy exists, per variant: an image URL that starts answering JSON (without Vary now) replaces
    neither the other variants' good copies nor the index that leads to them, as it would not replace a copy
    of a URL that never varied."""
    rig = make_rig()
    rig.upstream.then(Answer(body=PNG, headers=PICTURE))
    assert body_of(served(await rig.get(accept="image/webp"))) == PNG
    rig.upstream.then(Answer(body=GOOD, headers={"content-type": JSON, "cache-control": "max-age=60"}))

    avif = await rig.get(accept="image/avif")
    assert isinstance(avif, Failed) and isinstance(avif.error, UpstreamError) and avif.error.reason == "type-changed"
    webp = served(await rig.get(accept="image/webp"))
    assert (webp.cache, body_of(webp)) == (CacheResult.HIT, PNG)
    index = await rig.stored()
    assert index is not None and index.is_index and index.header("content-type") == "image/png"


async def test_an_answer_that_varies_on_everything_is_shared_with_no_waiter(make_rig: MakeRig) -> None:
    rig = make_rig()
    gate = asyncio.Event()
    everything = {"content-type": JSON, "cache-control": "max-age=60", "vary": "*"}
    rig.upstream.then(Answer(body=GOOD, headers=everything), gate=gate)
    rig.upstream.otherwise = Answer(body=NEWER, headers=everything)
    accepts = ["image/webp", "image/avif", "*/*", "application/json"] * 2
    tasks = [asyncio.create_task(rig.get(accept=accept)) for accept in accepts]
    await until(lambda: len(rig.upstream.calls) == 1)
    await settle()
    gate.set()
    results = [served(outcome) for outcome in await asyncio.gather(*tasks)]
    assert len(rig.upstream.calls) == len(accepts), "each asked for its own answer"
    assert sum(body_of(result) == GOOD for result in results) == 1, "the first answer went to its own request only"
    assert all(result.cache is CacheResult.BYPASS and result.entry.vary == ("*",) for result in results)
    assert await rig.stored() is None


async def test_a_purge_during_a_revalidation_is_not_undone_by_the_304(make_rig: MakeRig, tmp_path: Path) -> None:
    rig = make_rig(purges=PurgeLog(tmp_path / "purges.log"))
    validators = {"content-type": JSON, "cache-control": "max-age=60", "etag": '"v1"'}
    rig.upstream.then(Answer(body=GOOD, headers=validators))
    served(await rig.get())
    rig.clock.advance(61 + RULES.stale_while_revalidate)
    gate = asyncio.Event()
    rig.upstream.then(Answer(status=304, body=b"", headers=validators), gate=gate)
    rig.upstream.then(Answer(body=NEWER, headers=validators))
    asking = asyncio.create_task(rig.get())
    await until(lambda: len(rig.upstream.calls) == 2)
    await rig.proxy.purge(URL)
    gate.set()
    # The 304 confirmed a copy that was purged meanwhile: Moxy fetches anew instead of bringing the copy back.
    outcome = served(await asking)
    assert (outcome.cache, body_of(outcome)) == (CacheResult.MISS, NEWER)
    assert rig.upstream.calls[2].headers == {}, "unconditional: the purged copy is not to be confirmed"
    stored = await rig.stored()
    assert stored is not None and stored.body == NEWER


async def test_a_revalidated_variant_renews_its_index(make_rig: MakeRig) -> None:
    rig = make_rig()
    rig.upstream.then(Answer(body=PNG, headers=PICTURE))
    served(await rig.get(accept="image/webp"))
    first = await rig.stored()
    assert first is not None and first.is_index
    rig.clock.advance(61 + RULES.stale_while_revalidate)
    rig.upstream.then(Answer(status=304, body=b"", headers=PICTURE))
    revalidated = served(await rig.get(accept="image/webp"))
    assert revalidated.cache is CacheResult.REVALIDATED
    renewed = await rig.stored()
    assert renewed is not None and renewed.is_index and renewed.stored_at == revalidated.entry.stored_at
    assert renewed.stored_at > first.stored_at, "the index lives as long as the variant it leads to"


async def test_purge_counts_every_variant_and_the_plain_entry(make_rig: MakeRig) -> None:
    rig = make_rig()
    varying = {"content-type": JSON, "cache-control": "max-age=60", "vary": "Accept"}
    for _ in range(3):
        rig.upstream.then(Answer(body=GOOD, headers=varying))
    rig.upstream.then(Answer(body=GOOD))
    for accept in ("image/avif,image/webp,*/*", "image/webp,*/*", "*/*"):
        await rig.get(accept=accept)
    await rig.get("https://img.example.com/plain.png")

    every_class = tuple({"accept": accept} for accept in ACCEPT_CLASSES)
    assert (await rig.proxy.purge(URL, ({}, *every_class)))[0] == 3
    assert (await rig.proxy.purge("https://img.example.com/plain.png", ({}, *every_class)))[0] == 1
    assert await rig.stored() is None


# -- coalescing ----------------------------------------------------------------------------------------


async def test_concurrent_cold_requests_share_one_fetch(make_rig: MakeRig) -> None:
    rig = make_rig()
    gate = asyncio.Event()
    rig.upstream.then(Answer(), gate=gate)

    tasks = [asyncio.create_task(rig.get()) for _ in range(40)]
    await until(lambda: len(rig.upstream.calls) == 1)
    await settle()
    assert not any(task.done() for task in tasks), "everyone waits for the one fetch"
    gate.set()
    results = await asyncio.gather(*tasks)

    assert len(rig.upstream.calls) == 1
    # The very same outcome object: every caller awaited the one fetch (a late one would have been a HIT).
    assert all(result is results[0] for result in results)
    assert served(results[0]).cache is CacheResult.MISS and body_of(served(results[0])) == GOOD


async def test_concurrent_cold_requests_share_one_failure(make_rig: MakeRig) -> None:
    rig = make_rig()
    gate = asyncio.Event()
    error = UpstreamError("connect-failed")
    rig.upstream.then(error, gate=gate)

    tasks = [asyncio.create_task(rig.get()) for _ in range(40)]
    await until(lambda: len(rig.upstream.calls) == 1)
    await settle()
    gate.set()
    results = await asyncio.gather(*tasks)

    assert len(rig.upstream.calls) == 1
    assert all(result is results[0] for result in results)
    outcome = failed(results[0])
    assert outcome.error is error and outcome.cache is CacheResult.MISS
    assert await rig.stored() is None


async def test_past_the_lock_timeout_a_waiter_fetches_alone_without_storing(make_rig: MakeRig) -> None:
    rig = make_rig(lock_timeout=0.05)
    gate = asyncio.Event()
    shared, own = b'{"from": "shared fetch"}', b'{"from": "own fetch"}'
    rig.upstream.then(Answer(body=shared), gate=gate)
    rig.upstream.otherwise = Answer(body=own)

    starter = asyncio.create_task(rig.get())
    await until(lambda: len(rig.upstream.calls) == 1)
    waiter = served(await asyncio.wait_for(rig.get(), timeout=2))
    assert body_of(waiter) == own
    assert waiter.stored is False and waiter.cache is CacheResult.MISS
    assert rig.upstream.calls[-1] == Call(URL, {})
    assert await rig.stored() is None, "the held fetch has not finished and the waiter's answer is not stored"

    gate.set()
    await asyncio.wait_for(starter, timeout=2)

    async def shared_stored() -> bool:
        entry = await rig.stored()
        return entry is not None and entry.body == shared

    # The held fetch is shielded from its waiters giving up: it still completes and stores.
    await until(shared_stored)
    fetches = len(rig.upstream.calls)
    hit = served(await rig.get())
    assert (hit.cache, body_of(hit)) == (CacheResult.HIT, shared)
    assert len(rig.upstream.calls) == fetches


async def test_the_request_that_starts_a_fetch_is_not_held_to_the_lock_timeout(make_rig: MakeRig) -> None:
    rig = make_rig(lock_timeout=0.05)
    gate = asyncio.Event()
    rig.upstream.then(Answer(body=GOOD), gate=gate)
    starter = asyncio.create_task(rig.get())
    await until(lambda: len(rig.upstream.calls) == 1)
    await asyncio.sleep(0.15)  # three lock timeouts: the starter must still be waiting for its own fetch
    assert not starter.done()
    gate.set()
    first = served(await asyncio.wait_for(starter, timeout=2))
    assert (first.cache, first.stored, body_of(first)) == (CacheResult.MISS, True, GOOD)
    assert len(rig.upstream.calls) == 1, "no second, unstored fetch of its own"


async def test_uncacheable_answer_is_bypassed_and_later_requests_do_not_queue(make_rig: MakeRig) -> None:
    rig = make_rig()
    no_store = {"content-type": JSON, "cache-control": "no-store"}
    rig.upstream.then(Answer(headers=no_store))

    first = served(await rig.get())
    assert (first.cache, first.stored, first.reason) == (CacheResult.BYPASS, False, "uncacheable")
    assert body_of(first) == GOOD
    assert await rig.stored() is None

    gate = asyncio.Event()
    for _ in range(5):
        rig.upstream.then(Answer(headers=no_store), gate=gate)
    tasks = [asyncio.create_task(rig.get()) for _ in range(5)]
    # All five are at the upstream at once: nobody queues behind a fetch whose answer cannot be shared.
    await until(lambda: rig.upstream.active == 5)
    gate.set()
    results = [served(result) for result in await asyncio.gather(*tasks)]
    assert all(result.cache is CacheResult.BYPASS and body_of(result) == GOOD for result in results)
    assert len(rig.upstream.calls) == 6
    assert await rig.stored() is None


class CountingStorage(MemoryStorage):
    """The memory tier, counting lookups."""

    lookups = 0

    async def get(self, key: str) -> Entry | None:
        self.lookups += 1
        return await super().get(key)


async def test_a_key_just_answered_uncacheably_with_nothing_stored_skips_the_lookup(make_rig: MakeRig) -> None:
    storage = CountingStorage(64 * MiB, 8 * MiB)
    rig = make_rig(storage=storage)
    no_store = {"content-type": JSON, "cache-control": "no-store"}
    for _ in range(4):
        rig.upstream.then(Answer(headers=no_store))
    assert served(await rig.get()).cache is CacheResult.BYPASS
    assert storage.lookups == 1
    assert served(await rig.get()).cache is CacheResult.BYPASS
    assert served(await rig.get()).cache is CacheResult.BYPASS
    assert storage.lookups == 1, "a lookup could only find nothing while the uncacheable mark stands"
    rig.clock.advance(6)  # the mark has lapsed: the next request looks again
    assert served(await rig.get()).cache is CacheResult.BYPASS
    assert storage.lookups == 2
    assert len(rig.upstream.calls) == 4


async def test_a_key_answered_uncacheably_over_a_stored_copy_keeps_looking_it_up(make_rig: MakeRig) -> None:
    storage = CountingStorage(64 * MiB, 8 * MiB)
    rig = make_rig(storage=storage)
    rig.upstream.then(Answer())  # cacheable: stored for 60 s
    rig.upstream.then(Answer(headers={"content-type": JSON, "cache-control": "no-store"}))
    rig.upstream.then(Answer(status=500))
    served(await rig.get())
    rig.clock.advance(61)  # stale; the refetch answers no-store
    assert served(await rig.get()).cache is CacheResult.BYPASS
    lookups = storage.lookups
    # The stored copy is still there for stale-if-error: the next request must find it when the upstream fails.
    stale = served(await rig.get())
    assert storage.lookups == lookups + 1
    assert (stale.cache, body_of(stale)) == (CacheResult.STALE, GOOD)


async def test_a_remembered_failure_is_not_skipped_by_the_uncacheable_mark(make_rig: MakeRig) -> None:
    rig = make_rig()
    rig.upstream.then(Answer(headers={"content-type": JSON, "cache-control": "no-store"}))
    rig.upstream.then(Answer(status=502))
    served(await rig.get())
    assert isinstance(await rig.get(), Failed)
    # Within the negative TTL the failure is remembered: no third fetch, even though the key is marked uncacheable.
    assert isinstance(await rig.get(), Failed)
    assert len(rig.upstream.calls) == 2


# -- stale copies --------------------------------------------------------------------------------------


async def test_stale_while_revalidate_serves_at_once_and_refreshes_once(make_rig: MakeRig) -> None:
    rig = make_rig(rules=replace(RULES, stale_while_revalidate=30))
    rig.upstream.then(Answer(body=GOOD))
    served(await rig.get())

    rig.clock.advance(70)  # past the 60 s lifetime, inside the 30 s window
    gate = asyncio.Event()
    rig.upstream.then(Answer(body=NEWER), gate=gate)
    sequential = [served(await asyncio.wait_for(rig.get(), timeout=1)) for _ in range(5)]
    concurrent = [served(result) for result in await asyncio.gather(*(rig.get() for _ in range(20)))]
    for result in sequential + concurrent:
        assert (result.cache, result.reason, result.age) == (CacheResult.STALE, "stale-while-revalidate", 70)
        assert body_of(result) == GOOD
    await settle()
    assert len(rig.upstream.calls) == 2, "one background refresh for 25 stale requests"

    gate.set()

    async def refreshed() -> bool:
        entry = await rig.stored()
        return entry is not None and entry.body == NEWER

    await until(refreshed)
    hit = served(await rig.get())
    assert (hit.cache, hit.age) == (CacheResult.HIT, 0)
    assert body_of(hit) == NEWER
    assert len(rig.upstream.calls) == 2


async def test_failed_background_refresh_is_remembered(make_rig: MakeRig) -> None:
    rig = make_rig(rules=replace(RULES, stale_while_revalidate=30))
    rig.upstream.then(Answer(body=GOOD))
    served(await rig.get())

    rig.clock.advance(70)
    rig.upstream.then(UpstreamError("connect-failed"))
    assert served(await rig.get()).cache is CacheResult.STALE
    await until(lambda: len(rig.upstream.calls) == 2)
    await settle()

    rig.upstream.otherwise = UpstreamError("connect-failed")
    for _ in range(3):
        rig.clock.advance(1)
        stale = served(await rig.get())
        assert (stale.cache, body_of(stale)) == (CacheResult.STALE, GOOD)
        await settle()
    # The failure is remembered for negative_ttl (10 s) so a broken upstream is not hammered.
    assert len(rig.upstream.calls) == 2


async def test_conditional_revalidation_with_304(make_rig: MakeRig) -> None:
    rig = make_rig()
    validators = {"content-type": JSON, "cache-control": "max-age=60", "etag": '"v1"', "last-modified": LAST_MODIFIED}
    rig.upstream.then(Answer(body=GOOD, headers=validators))
    served(await rig.get())
    before = await rig.stored()
    assert before is not None

    rig.clock.advance(61)
    rig.upstream.then(Answer(status=304, body=b"", headers={"etag": '"v1"', "cache-control": "max-age=120"}))
    revalidated = served(await rig.get())
    assert rig.upstream.calls[1] == Call(URL, {"if-none-match": '"v1"', "if-modified-since": LAST_MODIFIED})
    assert (revalidated.cache, revalidated.upstream_status, revalidated.age) == (CacheResult.REVALIDATED, 304, 0)
    assert body_of(revalidated) == GOOD

    after = await rig.stored()
    assert after is not None
    assert (after.body, after.digest, after.etag, after.last_modified) == (GOOD, before.digest, '"v1"', LAST_MODIFIED)
    assert (after.stored_at, after.lifetime) == (rig.clock.now, 120)

    rig.clock.advance(100)  # stale under the old 60 s lifetime, fresh under the refreshed 120 s one
    hit = served(await rig.get())
    assert (hit.cache, hit.age, body_of(hit)) == (CacheResult.HIT, 100, GOOD)
    assert len(rig.upstream.calls) == 2


async def test_refetch_after_a_vanished_body_keeps_the_variant(make_rig: MakeRig, tmp_path: Path) -> None:
    # Bodies over 1 KiB live in their own file and come back as BodyFile, so removing it mimics an eviction.
    disk = DiskStorage(tmp_path / "cache", 64 * MiB, inline_bytes=1024, embed_bytes=1024)
    rig = make_rig(storage=disk)
    big = orjson.dumps({"items": "x" * 4000})
    validators = {"content-type": JSON, "cache-control": "max-age=60", "etag": '"v1"'}
    rig.upstream.then(Answer(body=big, headers=validators))
    served(await rig.get(accept=JSON_ACCEPT))

    def evict_bodies() -> None:
        for path in (tmp_path / "cache" / "body").rglob("*.*"):
            path.unlink()

    rig.clock.advance(61)
    rig.upstream.then(Answer(status=304, body=b"", headers=validators, before=evict_bodies))
    rig.upstream.then(Answer(body=big, headers=validators))
    # The disk tier handed over the body's open descriptor with the stale entry, so the copy the 304 confirmed
    # is still readable and is served; the vanished file is noticed by the next lookup, which refetches.
    revalidated = served(await rig.get(accept=JSON_ACCEPT))
    assert (revalidated.cache, body_of(revalidated)) == (CacheResult.REVALIDATED, big)
    assert rig.upstream.calls[1].headers == {"accept": JSON_ACCEPT, "if-none-match": '"v1"'}
    assert body_of(served(await rig.get(accept=JSON_ACCEPT))) == big
    assert len(rig.upstream.calls) == 3
    assert rig.upstream.calls[2].headers == {"accept": JSON_ACCEPT}, "the refetch must ask for the same variant"


# -- rejections and failures ---------------------------------------------------------------------------


async def test_error_envelope_never_replaces_the_good_copy(make_rig: MakeRig) -> None:
    """The founding story: a WordPress error answered with 200 must not evict the good JSON."""
    rig = make_rig()
    rig.upstream.then(Answer(body=GOOD))
    served(await rig.get())
    good = await rig.stored()

    rig.clock.advance(61)
    rig.upstream.then(Answer(body=WP_ERROR))
    stale = served(await rig.get())
    assert (stale.cache, stale.reason, stale.upstream_status, stale.age) == (
        CacheResult.STALE,
        "json-error-envelope",
        200,
        61,
    )
    assert body_of(stale) == GOOD
    assert await rig.stored() == good, "the stored entry is untouched"
    assert rig.rejections == [("json-error-envelope", URL)]

    rig.clock.advance(5)  # inside negative_ttl: the failure is remembered, the good copy served again
    again = served(await rig.get())
    assert (again.cache, again.reason, body_of(again)) == (CacheResult.STALE, "json-error-envelope", GOOD)
    assert len(rig.upstream.calls) == 2


async def test_error_envelope_without_a_good_copy_fails_and_is_remembered(make_rig: MakeRig) -> None:
    rig = make_rig(negative_ttl=10)
    rig.upstream.then(Answer(body=WP_ERROR))

    first = failed(await rig.get())
    assert isinstance(first.error, UpstreamError)
    assert (first.error.reason, first.error.status, first.cache, first.upstream_status) == (
        "json-error-envelope",
        200,
        CacheResult.MISS,
        200,
    )
    assert await rig.stored() is None

    rig.clock.advance(9)
    remembered = failed(await rig.get())
    assert remembered.error is first.error and remembered.upstream_status == 200
    assert len(rig.upstream.calls) == 1, "no fetch inside negative_ttl"

    rig.clock.advance(2)
    rig.upstream.then(Answer(body=GOOD))
    recovered = served(await rig.get())
    assert (recovered.cache, body_of(recovered)) == (CacheResult.MISS, GOOD)
    assert len(rig.upstream.calls) == 2


FAILURES = [
    pytest.param(
        Answer(status=500, body=b"<h1>oops</h1>", headers={"content-type": "text/html"}),
        UpstreamError,
        "upstream-status-500",
        500,
        id="status-500",
    ),
    pytest.param(UpstreamTimeout("read-timeout"), UpstreamTimeout, "read-timeout", None, id="timeout"),
    pytest.param(UpstreamError("connect-failed"), UpstreamError, "connect-failed", None, id="connect"),
]


@pytest.mark.parametrize(("reply", "kind", "reason", "status"), FAILURES)
async def test_failure_with_a_good_copy_serves_it(
    make_rig: MakeRig, reply: Scripted, kind: type[UpstreamError], reason: str, status: int | None
) -> None:
    rig = make_rig()
    rig.upstream.then(Answer(body=GOOD))
    served(await rig.get())
    good = await rig.stored()

    rig.clock.advance(120)
    rig.upstream.then(reply)
    stale = served(await rig.get())
    assert (stale.cache, stale.reason, stale.upstream_status, body_of(stale)) == (
        CacheResult.STALE,
        reason,
        status,
        GOOD,
    )
    assert await rig.stored() == good


@pytest.mark.parametrize(("reply", "kind", "reason", "status"), FAILURES)
async def test_failure_without_a_good_copy(
    make_rig: MakeRig, reply: Scripted, kind: type[UpstreamError], reason: str, status: int | None
) -> None:
    rig = make_rig()
    rig.upstream.then(reply)
    outcome = failed(await rig.get())
    assert type(outcome.error) is kind
    assert isinstance(outcome.error, UpstreamError)
    assert (outcome.error.reason, outcome.error.status, outcome.upstream_status) == (reason, status, status)
    assert outcome.cache is CacheResult.MISS
    assert await rig.stored() is None


async def test_copy_past_its_stale_if_error_window_is_not_served(make_rig: MakeRig) -> None:
    rig = make_rig()
    rig.upstream.then(Answer(body=GOOD))
    served(await rig.get())

    rig.clock.advance(60 + 600)  # lifetime plus the whole stale-if-error window
    rig.upstream.then(UpstreamTimeout("total-timeout"))
    outcome = failed(await rig.get())
    assert isinstance(outcome.error, UpstreamTimeout) and outcome.error.reason == "total-timeout"


async def test_404_passes_through_with_its_status(make_rig: MakeRig) -> None:
    rig = make_rig()
    rig.upstream.then(Answer(status=404, body=b'{"message": "no such post"}'))
    outcome = failed(await rig.get())
    assert isinstance(outcome.error, UpstreamError)
    assert (outcome.error.reason, outcome.error.status, outcome.upstream_status) == ("upstream-status-404", 404, 404)
    assert await rig.stored() is None


# -- purge ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("by", ["upstream-url", "moxy-url"])
async def test_purge_removes_the_entry(make_rig: MakeRig, by: str) -> None:
    rig = make_rig()
    rig.upstream.then(Answer(body=GOOD)).then(Answer(body=NEWER))
    served(await rig.get())

    target = URL if by == "upstream-url" else rig.signer.sign(URL)
    assert await rig.proxy.purge(target) == (1, URL)
    assert await rig.stored() is None
    assert await rig.proxy.purge("https://api.example/never-stored") == (0, "https://api.example/never-stored")

    rig.clock.advance(1)
    refetched = served(await rig.get())
    assert (refetched.cache, body_of(refetched)) == (CacheResult.MISS, NEWER)
    hit = served(await rig.get())
    assert (hit.cache, body_of(hit)) == (CacheResult.HIT, NEWER), "the copy fetched after the purge stays"
    assert len(rig.upstream.calls) == 2


async def test_purge_reaches_other_variants_through_the_log(make_rig: MakeRig) -> None:
    rig = make_rig()
    rig.upstream.then(Answer(body=GOOD, headers=VARYING)).then(Answer(body=GOOD, headers=VARYING))
    served(await rig.get())
    served(await rig.get(accept=JSON_ACCEPT))

    assert await rig.proxy.purge(URL) == (1, URL), "only the listed (plain) variant is deleted at once"
    assert await rig.stored(accept=JSON_ACCEPT) is not None

    rig.clock.advance(1)
    rig.upstream.then(Answer(body=NEWER, headers=VARYING))
    variant = served(await rig.get(accept=JSON_ACCEPT))
    assert (variant.cache, body_of(variant)) == (CacheResult.MISS, NEWER)
    assert rig.upstream.calls[-1] == Call(URL, {"accept": JSON_ACCEPT})


async def test_purge_through_another_worker_stops_the_memory_copy(make_rig: MakeRig, tmp_path: Path) -> None:
    clock = Clock(START)
    log_path = tmp_path / "shared" / "purges.log"
    first = make_rig(clock=clock, purges=PurgeLog(log_path))
    second = make_rig(clock=clock, purges=PurgeLog(log_path))
    first.upstream.then(Answer(body=GOOD, headers=VARYING)).then(Answer(body=GOOD, headers=VARYING))
    served(await first.get())
    served(await first.get(accept=JSON_ACCEPT))

    assert await second.proxy.purge(URL) == (0, URL), "the other worker holds no copy of its own"
    hit = served(await first.get())
    assert hit.cache is CacheResult.HIT, "not seen before the log is read again"

    assert first.purges is not None
    await first.purges.refresh()
    clock.advance(1)
    first.upstream.then(Answer(body=NEWER, headers=VARYING)).then(Answer(body=NEWER, headers=VARYING))
    for headers in ({}, {"accept": JSON_ACCEPT}):
        outcome = served(await first.get(**headers))
        assert (outcome.cache, body_of(outcome)) == (CacheResult.MISS, NEWER)
    assert len(first.upstream.calls) == 4
    assert len(second.upstream.calls) == 0


# -- large bodies --------------------------------------------------------------------------------------


def _big_document() -> bytes:
    body = orjson.dumps({"items": [{"id": n, "text": "lorem ipsum dolor " * 5} for n in range(10_000)]})
    assert OFFLOAD_BYTES <= len(body) < 8 * MiB
    return body


def _big_envelope() -> bytes:
    return orjson.dumps(
        {"code": "rest_forbidden", "message": "denied", "data": {"status": 401, "trace": "x" * 1_000_000}}
    )


async def test_large_json_is_validated_off_the_loop(make_rig: MakeRig) -> None:
    rig = make_rig(custom=(f"{__name__}:record_validating_thread",))
    VALIDATING_THREADS.clear()
    big = _big_document()
    rig.upstream.then(Answer(body=big)).then(Answer(body=_big_envelope())).then(Answer(body=GOOD))

    stored = served(await rig.get())
    assert (stored.cache, stored.stored, body_of(stored)) == (CacheResult.MISS, True, big)
    entry = await rig.stored()
    assert entry is not None and entry.body == big
    assert VALIDATING_THREADS[-1] != threading.get_ident(), "a large body is validated in a worker thread"

    envelope_url = URL + "&page=2"
    rejected = failed(await rig.get(envelope_url))
    assert isinstance(rejected.error, UpstreamError) and rejected.error.reason == "json-error-envelope"
    assert await rig.stored(envelope_url) is None

    VALIDATING_THREADS.clear()
    served(await rig.get(URL + "&page=3"))
    assert VALIDATING_THREADS == [threading.get_ident()], "a small body stays on the loop"


async def test_large_spooled_json_is_validated_and_stored_on_disk(make_rig: MakeRig, tmp_path: Path) -> None:
    disk = DiskStorage(tmp_path / "cache", 64 * MiB)
    rig = make_rig(storage=disk)
    big = _big_document()
    rig.upstream.then(Answer(body=big, spool=disk.spool_dir)).then(Answer(body=_big_envelope(), spool=disk.spool_dir))

    stored = served(await rig.get())
    assert (stored.cache, stored.stored) == (CacheResult.MISS, True)
    assert isinstance(stored.body, OpenBody) and body_of(stored) == big
    assert not list(disk.spool_dir.glob("spooled-*")), "the spooled file is gone once stored"
    hit = served(await rig.get())
    assert (hit.cache, body_of(hit)) == (CacheResult.HIT, big)

    envelope_url = URL + "&page=2"
    rejected = failed(await rig.get(envelope_url))
    assert isinstance(rejected.error, UpstreamError) and rejected.error.reason == "json-error-envelope"
    assert await rig.stored(envelope_url) is None
    assert not list(disk.spool_dir.glob("spooled-*"))


# -- refused before any fetch --------------------------------------------------------------------------


async def test_tampered_signature_is_refused_without_a_fetch(make_rig: MakeRig) -> None:
    rig = make_rig()
    request = rig.request()
    _, digest, encoded = request.path.split("/")
    forged = ("B" if digest[0] == "A" else "A") + digest[1:]
    outcome = failed(await rig.proxy.handle(ProxyRequest(path=f"/{forged}/{encoded}", query=request.query)))
    assert isinstance(outcome.error, BadSignature) and outcome.cache is CacheResult.BYPASS
    assert rig.upstream.calls == []


async def test_expired_url_is_refused_without_a_fetch(make_rig: MakeRig) -> None:
    rig = make_rig()
    parts = urlsplit(rig.signer.sign(URL, expires_in=10, exact=True))
    rig.clock.advance(11)
    outcome = failed(await rig.proxy.handle(ProxyRequest(path=parts.path, query=parts.query)))
    assert isinstance(outcome.error, ExpiredURL) and outcome.cache is CacheResult.BYPASS
    assert rig.upstream.calls == []


@pytest.mark.parametrize("url", ["https://cdn.blocked.example/a.json", "http://127.0.0.1:8080/a.json"])
async def test_disallowed_destination_is_refused_without_a_fetch(make_rig: MakeRig, url: str) -> None:
    rig = make_rig(policy=DestinationPolicy.from_settings_values([], [], ["*.blocked.example"]))
    outcome = failed(await rig.get(url))
    assert isinstance(outcome.error, DestinationRefused) and outcome.cache is CacheResult.BYPASS
    assert rig.upstream.calls == []
