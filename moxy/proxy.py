"""The request flow as one framework-free coroutine.

verify -> policy -> cache lookup -> decide -> fetch (coalesced) -> validate -> store | stale-if-error -> Outcome.
Nothing here knows Starlette or an HTTP client; the app renders the Outcome and the upstream module does the I/O."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from enum import StrEnum
from typing import Protocol, assert_never

from cachetools import TTLCache

from moxy.body import Body, OpenBody, digest_bytes, digest_file, offload
from moxy.cache import Storage
from moxy.cache.entry import BodyFile, Entry, make_key, variant_index
from moxy.cache.fleet import Alone, Filled, FleetLocks, Lead
from moxy.cache.freshness import Decision, FreshnessRules, assess, current_age, decide, is_storable, usable_on_error
from moxy.cache.purges import PurgeLog
from moxy.cache.vary import ANY_HEADER, normalise, variant, vary_names
from moxy.errors import DestinationRefused, ExpiredURL, MoxyError, UpstreamError, VerificationError
from moxy.fields import valid_field_value
from moxy.media import media_family
from moxy.policy import DestinationPolicy
from moxy.signing import Signer
from moxy.upstream import UpstreamResponse
from moxy.validation import ACCEPT, Candidate, Reject, ValidatorChain, Verdict

__all__ = ["CacheResult", "Failed", "Outcome", "Proxy", "ProxyRequest", "Served"]

# Response headers kept in the cache and passed on; everything else the upstream sent is dropped: an allowlist, so a
# field nobody thought about (a cookie, a server banner, a debug header) never reaches a client.
STORED_HEADERS = frozenset(
    {
        "content-type",
        "content-language",
        # Content-Disposition is not kept: a file name chosen by a third party ("invoice.pdf\u202eexe.html") has no
        # use for an embedded asset and could mislead whoever saves it; browsers name downloads from the URL.
        "last-modified",
        "access-control-allow-origin",
        "timing-allow-origin",
        # Kept for the freshness arithmetic of a later 304 (RFC 9111 §4.3.4); never sent as they are.
        "cache-control",
        "expires",
        "date",
    }
)
HEAD_SAMPLE_BYTES = 64 * 1024
UNCACHEABLE_MARK_SECONDS = 5.0
# The bytes each worker may spend remembering failures and uncacheable answers (each kind).
MARKS_BYTES = 16 * 1024 * 1024
# What one remembered key costs besides its own characters: the dict slot, the TTL link, the small record.
_MARK_OVERHEAD = 256


class CacheResult(StrEnum):
    HIT = "HIT"
    MISS = "MISS"
    STALE = "STALE"
    REVALIDATED = "REVALIDATED"
    BYPASS = "BYPASS"


@dataclass(frozen=True, slots=True)
class _Remembered:
    """A failed fetch, answered again without asking the upstream until `until`."""

    until: float
    error: UpstreamError
    status: int | None
    size: int


@dataclass(frozen=True, slots=True)
class _Wanted:
    """One request as the flow carries it from the lookup to the upstream and back."""

    key: str  # the request as the upstream sees it (URL and forwarded headers): what marks are kept by
    url: str
    forwarded: dict[str, str]
    # An entry of the URL that tells what kind of answer it gives, when this request has no copy of its own (the
    # index of a URL whose variant for these headers was not fetched yet).
    kind: Entry | None = None


@dataclass(frozen=True, slots=True)
class ProxyRequest:
    path: str
    query: str = ""
    headers: Mapping[str, str] = field(default_factory=dict)  # lowercase names


@dataclass(frozen=True, slots=True)
class Served:
    entry: Entry
    body: Body
    cache: CacheResult
    age: float
    stored: bool = True
    reason: str | None = None  # why a stale copy was served, or why the answer was not stored
    upstream_status: int | None = None
    upstream_seconds: float | None = None
    url_expires_at: int | None = None  # when the signed URL stops being valid (set on hits, for the hit memo)


@dataclass(frozen=True, slots=True)
class Failed:
    error: MoxyError
    cache: CacheResult = CacheResult.MISS
    upstream_status: int | None = None
    upstream_seconds: float | None = None


Outcome = Served | Failed


class Fetch(Protocol):
    async def __call__(self, url: str, headers: Mapping[str, str]) -> UpstreamResponse: ...


class Proxy:
    """One per worker. Seams (storage, fetch, clock) are constructor arguments so tests choose real or fake."""

    def __init__(
        self,
        *,
        signer: Signer,
        policy: DestinationPolicy,
        storage: Storage,
        fetch: Fetch,
        validators: ValidatorChain,
        freshness: FreshnessRules,
        forward_headers: tuple[str, ...] = ("Accept",),
        negative_ttl: float = 10.0,
        lock_timeout: float = 30.0,
        clock: Callable[[], float] = time.time,
        on_rejection: Callable[[str, str], None] | None = None,
        purges: PurgeLog | None = None,
        fleet: FleetLocks | None = None,
    ) -> None:
        self.signer = signer
        self.policy = policy
        self.storage = storage
        self.fetch = fetch
        self.validators = validators
        self.freshness = freshness
        self.forward_headers = tuple(name.lower() for name in forward_headers)
        self.negative_ttl = negative_ttl
        self.lock_timeout = lock_timeout
        self.clock = clock
        self.on_rejection = on_rejection
        self.purges = purges
        self.fleet = fleet  # many hosts: cold misses shared across hosts through Redis (moxy.cache.fleet)
        self._inflight: dict[str, asyncio.Task[Outcome]] = {}
        self._background: set[asyncio.Task[Outcome]] = set()
        # Both are bounded in bytes, not items: a key holds the upstream URL (up to the request-line bound), and
        # the keys are chosen by whoever can get URLs signed. Each item costs its key plus a small overhead.
        self._negative: TTLCache[str, _Remembered] = TTLCache(
            maxsize=MARKS_BYTES, ttl=max(negative_ttl, 0.001), timer=clock, getsizeof=lambda mark: mark.size
        )
        # Keys whose last answer could not be stored, with their size and whether a copy was stored for them then.
        self._uncacheable: TTLCache[str, tuple[int, bool]] = TTLCache(
            maxsize=MARKS_BYTES, ttl=UNCACHEABLE_MARK_SECONDS, timer=clock, getsizeof=lambda mark: mark[0]
        )

    # -- the flow ---------------------------------------------------------------

    async def handle(self, request: ProxyRequest) -> Outcome:
        try:
            verified = self.signer.verify_path(request.path, request.query)
            url = verified.url
            self.policy.check_url(url)
        except (VerificationError, DestinationRefused) as exc:
            return Failed(exc, CacheResult.BYPASS)
        forwarded = self.forwarded_headers(request.headers)
        # The request as the upstream sees it: what failures and uncacheable answers are remembered by.
        key = make_key(url, forwarded)
        mark = self._uncacheable.get(key)
        if mark is not None and not mark[1] and key not in self._negative:
            # The upstream answered this key uncacheably moments ago and no copy was stored then: while the mark
            # stands every request is fetched and none stored (see _coalesced), so a lookup (a disk stat, a Redis
            # round trip) could only find nothing. Fetching instead of serving a copy is always a correct answer.
            return await self._coalesced(key, _Wanted(key, url, forwarded), None)
        # The entry: the URL's own, or, when its upstream answered with Vary, the variant the index names.
        slot = make_key(url, ())
        entry = await self._lookup(slot)
        index = entry if entry is not None and entry.is_index else None
        if index is not None:
            slot = make_key(url, variant(index.vary, forwarded))
            entry = await self._lookup(slot)
        now = self.clock()
        if entry is not None:
            decision = decide(entry, now)
            served: Served | None = None
            if decision is Decision.FRESH:
                served = await self._serve(entry, CacheResult.HIT, now)
                if served is not None and verified.expires_at is not None:
                    served = replace(served, url_expires_at=verified.expires_at)
            elif decision is Decision.STALE_WHILE_REVALIDATE:
                self._refresh_in_background(slot, _Wanted(key, url, forwarded), entry)
                served = await self._serve(entry, CacheResult.STALE, now, reason="stale-while-revalidate")
            if served is not None:
                return served
        remembered = self._negative.get(key)
        if remembered is not None and remembered.until > now:
            error, status = remembered.error, remembered.status
            if entry is not None and usable_on_error(entry, now):
                served = await self._serve(entry, CacheResult.STALE, now, reason=error.reason)
                if served is not None:
                    return served
            return Failed(error, CacheResult.MISS, upstream_status=status)
        return await self._coalesced(slot, _Wanted(key, url, forwarded, index), entry)

    async def _lookup(self, slot: str) -> Entry | None:
        entry = await self.storage.get(slot)
        if entry is not None and self.purges is not None and self.purges.covers(entry):
            # Purged through another worker (or another host): gone from every tier, here too.
            await self.storage.delete(slot)
            return None
        return entry

    def forwarded_headers(self, headers: Mapping[str, str]) -> dict[str, str]:
        """The allowlisted client headers, normalised (Accept to its class): they go upstream and into the key."""
        chosen: dict[str, str] = {}
        for name in self.forward_headers:
            value = normalise(name, headers.get(name) or "")
            # Blank, or holding bytes outside the field grammar (RFC 9110 §5.5) that an upstream engine refuses to
            # send: read as absent, so such a request shares the plain variant instead of making (or failing) its own.
            if value and valid_field_value(value):
                chosen[name] = value
        return chosen

    async def purge(self, url_or_moxy_url: str, variants: tuple[Mapping[str, str], ...] = ({},)) -> tuple[int, str]:
        """Remove the entries of one upstream URL from every tier; returns how many this worker removed, and
        the upstream URL that was purged.

        The variants listed are deleted at once; every other variant, and the copies other workers hold in
        memory, are dropped when next looked up (through the shared purge log)."""
        try:
            url = self.signer.verify(url_or_moxy_url)
        except ExpiredURL as exc:
            # Expired for clients, but the signature is good: it still names an entry an operator may purge.
            url = exc.url or url_or_moxy_url
        except VerificationError:
            url = url_or_moxy_url
        primary = make_key(url, ())
        # Read before the purge is recorded, which makes every tier's copy of the URL unreadable.
        found = await self.storage.get(primary)
        if self.purges is not None:
            await self.purges.record(url, self.clock())
        removed = int(await self.storage.delete(primary) and (found is None or not found.is_index))
        slots = set()
        for headers in variants:
            forwarded = self.forwarded_headers(headers)
            self._negative.pop(make_key(url, forwarded), None)
            if found is not None and found.is_index:
                slots.add(make_key(url, variant(found.vary, forwarded)))
        for slot in slots:
            removed += int(await self.storage.delete(slot))
        return removed, url

    async def aclose(self) -> None:
        tasks = list(self._background) + list(self._inflight.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    # -- coalescing ---------------------------------------------------------------

    async def _coalesced(self, slot: str, wanted: _Wanted, stale: Entry | None, *, rejoin: bool = True) -> Outcome:
        """The outcome of one fetch shared by every request for the entry `slot`."""
        if wanted.key in self._uncacheable:
            # The last answer for this key could not be stored: queueing behind one fetch would only serialise
            # the clients, so each fetches on its own.
            return await self._fetch_and_store(wanted, stale, store=False)
        task = self._inflight.get(slot)
        if task is None:
            # The request that starts the fetch waits for it whatever it takes (the upstream timeouts bound it);
            # the lock timeout is for those queued behind someone else's fetch.
            return await asyncio.shield(self._start(slot, wanted, stale))
        try:
            # shield: a client that goes away must not cancel the fetch the other waiters share.
            outcome = await asyncio.wait_for(asyncio.shield(task), timeout=self.lock_timeout)
        except TimeoutError:
            return await self._fetch_and_store(wanted, stale, store=False)
        if isinstance(outcome, Served) and outcome.entry.vary == ANY_HEADER:
            # An answer that varies on everything is nobody else's: this request asks for its own.
            return await self._fetch_and_store(wanted, stale, store=False)
        if isinstance(outcome, Served) and outcome.entry.vary:
            # Shared before anyone knew the answer varies: it is this request's only if its own headers pick the
            # same variant. Otherwise it joins (or starts) the fetch of its variant, once.
            own = make_key(wanted.url, variant(outcome.entry.vary, wanted.forwarded))
            if own != outcome.entry.key:
                if not rejoin:
                    return await self._fetch_and_store(wanted, stale, store=False)
                return await self._coalesced(own, wanted, stale, rejoin=False)
        return outcome

    def _start(self, slot: str, wanted: _Wanted, stale: Entry | None) -> asyncio.Task[Outcome]:
        if self.fleet is not None and stale is None:
            fetch = self._fetch_across_hosts(self.fleet, slot, wanted)
        else:
            fetch = self._fetch_and_store(wanted, stale, store=True)
        task = asyncio.get_running_loop().create_task(fetch)
        self._inflight[slot] = task
        task.add_done_callback(
            lambda done: self._inflight.pop(slot, None) if self._inflight.get(slot) is done else None
        )
        return task

    async def _fetch_across_hosts(self, fleet: FleetLocks, slot: str, wanted: _Wanted) -> Outcome:
        """A cold miss of the entry `slot` when many hosts share Redis: one host fetches, the others wait for it and
        serve what it stored; anything wrong with Redis, and this host fetches for itself at once."""

        async def stored() -> Entry | None:
            entry = await self._lookup(slot)
            if entry is not None and entry.is_index:
                entry = await self._lookup(make_key(wanted.url, variant(entry.vary, wanted.forwarded)))
            return entry

        claim = await fleet.claim(slot, stored, wait=self.lock_timeout)
        match claim:
            case Lead():
                try:
                    return await self._fetch_and_store(wanted, None, store=True)
                finally:
                    await fleet.release(claim)
            case Filled(entry=entry):
                # MISS: this host had no copy; the upstream was asked for this request, by another host.
                served = await self._serve(entry, CacheResult.MISS, self.clock())
                if served is not None:
                    return served
                return await self._fetch_and_store(wanted, None, store=True)
            case Alone():
                return await self._fetch_and_store(wanted, None, store=True)
            case _:
                assert_never(claim)

    def _refresh_in_background(self, slot: str, wanted: _Wanted, stale: Entry) -> None:
        if slot in self._inflight:
            return
        remembered = self._negative.get(wanted.key)
        if remembered is not None and remembered.until > self.clock():
            return  # the last refresh failed moments ago: do not hammer a broken upstream
        task = self._start(slot, wanted, stale)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    # -- fetch, validate, store ----------------------------------------------------

    async def _fetch_and_store(self, wanted: _Wanted, stale: Entry | None, *, store: bool) -> Outcome:
        headers = dict(wanted.forwarded)
        if stale is not None:
            if stale.etag:
                headers["if-none-match"] = stale.etag
            if stale.last_modified:
                headers["if-modified-since"] = stale.last_modified
        started = time.perf_counter()
        try:
            response = await self.fetch(wanted.url, headers)
        except DestinationRefused as exc:
            return Failed(exc, CacheResult.MISS)
        except UpstreamError as exc:
            return await self._failure(wanted.key, stale, exc, None, time.perf_counter() - started)
        elapsed = time.perf_counter() - started
        try:
            return await self._accept(wanted, stale, response, elapsed, store=store)
        finally:
            if response.body_path is not None:
                _unlink_quietly(response.body_path)

    async def _accept(
        self, wanted: _Wanted, stale: Entry | None, response: UpstreamResponse, elapsed: float, *, store: bool
    ) -> Outcome:
        key, url = wanted.key, wanted.url
        status = response.status
        if status == 304 and stale is not None:
            return await self._revalidated(wanted, stale, response, elapsed)
        if not 200 <= status < 300:
            error = UpstreamError(f"upstream-status-{status}", status=status)
            return await self._failure(key, stale, error, status, elapsed)
        body: Body
        if response.body is not None:
            body = response.body
            digest = await digest_bytes(body)
            sample = body
        else:
            assert response.body_path is not None
            body = await asyncio.to_thread(OpenBody.open, response.body_path, 0, response.length)
            full = self.validators.needs_full_body(response.headers.get("content-type", ""))
            sample, digest = await digest_file(body, None if full else HEAD_SAMPLE_BYTES)
        candidate = Candidate(
            url=url,
            host=self.policy.check_url(url).host,
            status=status,
            headers=response.headers,
            body=sample,
            length=response.length,
            declared_length=response.declared_length,
            complete_body=len(sample) == response.length,
        )
        verdict = await offload(len(sample), lambda: self.validators.validate(candidate))
        # The copy this answer would replace, or, for a variant not fetched yet, the index that stands for the URL's
        # other variants: an answer of another kind replaces neither while they could stand in on error.
        kept = stale if stale is not None else wanted.kind
        if not isinstance(verdict, Reject) and kept is not None:
            verdict = _same_kind_as(kept, response.headers.get("content-type", ""), self.clock())
        if isinstance(verdict, Reject):
            if self.on_rejection is not None:
                self.on_rejection(verdict.reason, url)
            error = UpstreamError(verdict.reason, status=status)
            return await self._failure(key, stale, error, status, elapsed, detail=verdict.detail)
        now = self.clock()
        names = vary_names(response.headers.get("vary", ""), self.forward_headers)
        vary = ANY_HEADER if names is None else names
        fresh = assess(
            response.headers,
            request_time=response.request_time,
            response_time=response.response_time,
            rules=self.freshness,
        )
        entry = Entry(
            # An answer that varies on everything is never stored: its key is only this request's own.
            key=key if names is None else make_key(url, variant(names, wanted.forwarded)),
            url=url,
            status=status,
            headers=tuple((name, value) for name, value in response.headers.items() if name in STORED_HEADERS),
            stored_at=response.response_time,
            age=fresh.age,
            lifetime=fresh.lifetime,
            stale_while_revalidate=fresh.stale_while_revalidate,
            stale_if_error=fresh.stale_if_error,
            must_revalidate=fresh.must_revalidate,
            no_cache=fresh.no_cache,
            etag=response.headers.get("etag"),
            last_modified=response.headers.get("last-modified"),
            digest=digest,
            length=response.length,
            vary=vary,
            body=body if isinstance(body, bytes) else BodyFile(response.body_path or "", 0, response.length),
        )
        # `Vary: *`: no later request can be known to match this answer (RFC 9111 §4.1), so it is not kept.
        storable = is_storable(status, response.headers) and names is not None
        if not storable:
            self._uncacheable[key] = (len(key) + _MARK_OVERHEAD, stale is not None)
        if storable and store:
            if entry.vary:
                # The index first: a reader that finds the variant's index a moment early only misses once more.
                await self.storage.put(variant_index(entry, make_key(url, ())))
            await self.storage.put(entry)
            self._negative.pop(key, None)
        cache = CacheResult.MISS if storable else CacheResult.BYPASS
        return Served(
            entry,
            body,
            cache,
            age=current_age(entry, now),
            stored=storable and store,
            reason=None if storable else "uncacheable",
            upstream_status=status,
            upstream_seconds=elapsed,
        )

    async def _revalidated(self, wanted: _Wanted, stale: Entry, response: UpstreamResponse, elapsed: float) -> Outcome:
        if self.purges is not None and self.purges.covers(stale):
            # Purged while the upstream was being asked: refreshing the copy would bring it back (its new storage
            # time is after the purge). The confirmation is for a copy that no longer exists; fetch anew.
            return await self._fetch_and_store(wanted, None, store=True)
        # RFC 9111 §4.3.4: the 304's headers update the stored ones; the body stays.
        merged = dict(stale.headers)
        merged.update(response.headers)
        fresh = assess(
            merged, request_time=response.request_time, response_time=response.response_time, rules=self.freshness
        )
        refreshed = stale.refreshed(
            stored_at=response.response_time,
            age=fresh.age,
            lifetime=fresh.lifetime,
            stale_while_revalidate=fresh.stale_while_revalidate,
            stale_if_error=fresh.stale_if_error,
            must_revalidate=fresh.must_revalidate,
            no_cache=fresh.no_cache,
            etag=response.headers.get("etag") or stale.etag,
            last_modified=response.headers.get("last-modified") or stale.last_modified,
        )
        await self.storage.touch(refreshed)
        if refreshed.vary:
            await self._keep_index(refreshed)
        self._negative.pop(wanted.key, None)
        served = await self._serve(refreshed, CacheResult.REVALIDATED, self.clock())
        if served is None:
            return await self._fetch_and_store(wanted, None, store=True)
        return replace(served, upstream_status=304, upstream_seconds=elapsed)

    async def _keep_index(self, refreshed: Entry) -> None:
        """A variant's index lives as long as the variants it leads to: a refreshed variant renews it too, so no
        tier drops the index (and with it the way to the variant) while the variant may still be served."""
        primary = make_key(refreshed.url, ())
        index = await self.storage.get(primary)
        # Only the index that leads here: an entry of the URL alone (its upstream stopped varying) is left as it is.
        if (
            index is not None
            and index.is_index
            and index.vary == refreshed.vary
            and index.stored_at < refreshed.stored_at
        ):
            await self.storage.put(variant_index(refreshed, primary))

    async def _failure(
        self,
        key: str,
        stale: Entry | None,
        error: UpstreamError,
        status: int | None,
        elapsed: float | None,
        detail: str = "",
    ) -> Outcome:
        now = self.clock()
        if self.negative_ttl > 0:
            self._negative[key] = _Remembered(now + self.negative_ttl, error, status, len(key) + _MARK_OVERHEAD)
        if stale is not None and usable_on_error(stale, now):
            # The reason Moxy exists: a bad answer never replaces the good copy, which keeps being served.
            served = await self._serve(stale, CacheResult.STALE, now, reason=error.reason)
            if served is not None:
                return replace(served, upstream_status=status, upstream_seconds=elapsed)
        return Failed(error, CacheResult.MISS, upstream_status=status, upstream_seconds=elapsed)

    async def _serve(self, entry: Entry, cache: CacheResult, now: float, reason: str | None = None) -> Served | None:
        """The entry ready to send, or None when its body file vanished (evicted between lookup and open)."""
        body: Body
        if isinstance(entry.body, BodyFile):
            source = entry.body
            if source.opened is not None:
                body = source.opened
            else:
                try:
                    body = await asyncio.to_thread(OpenBody.open, source.path, source.offset, source.length)
                except FileNotFoundError:
                    return None
        else:
            body = entry.body
        return Served(entry, body, cache, age=current_age(entry, now), reason=reason)


def _same_kind_as(stale: Entry, content_type: str, now: float) -> Verdict:
    """An answer of another kind than the good copy it would replace (an image URL now answering JSON) is far
    more often an upstream in trouble than a redesign: while the copy may still stand in on error, it is kept.
    Once its stale-if-error window has passed, the new kind is accepted, so a real change heals by itself."""
    before, after = media_family(stale.header("content-type") or ""), media_family(content_type)
    if before and after and before != after and usable_on_error(stale, now):
        return Reject("type-changed", f"the kept copy is {before}, this answer is {after}")
    return ACCEPT


def _unlink_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass
