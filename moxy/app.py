"""The Starlette shell and composition root: create_app(settings) wires storage, upstream and Proxy in the
lifespan, renders Outcomes as responses (headers, 304, 206/416, HEAD) and maps errors to statuses in one table."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from email.utils import formatdate, parsedate_to_datetime
from pathlib import Path
from typing import Any

import orjson
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from moxy import __version__
from moxy.accesslog import path_digest, write_access
from moxy.cache import DiskStorage, Entry, MemoryStorage, Storage, TieredStorage
from moxy.cache.freshness import FreshnessRules
from moxy.cache.purges import PurgeLog
from moxy.config import Settings, load_settings
from moxy.errors import (
    BadSignature,
    DestinationRefused,
    ExpiredURL,
    MalformedURL,
    MoxyError,
    UpstreamError,
    UpstreamTimeout,
)
from moxy.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE, Metrics
from moxy.policy import DestinationPolicy
from moxy.proxy import CacheResult, Failed, Fetch, OpenBody, Proxy, ProxyRequest, Served
from moxy.rules import parse_rules
from moxy.shortcut import HitShortcut
from moxy.signing import MIN_KEY_BYTES, Signer
from moxy.upstream import Upstream, UpstreamResponse
from moxy.validation import build_chain

__all__ = ["MoxyApp", "create_app"]

SECURITY_HEADERS = {
    "x-content-type-options": "nosniff",
    "content-security-policy": "default-src 'none'; img-src data:; style-src 'unsafe-inline'; sandbox",
    "x-frame-options": "deny",
    "referrer-policy": "no-referrer",
}
# Stored headers that Moxy replaces with its own view (cache-control, age) or recomputes.
NOT_SENT = frozenset({"cache-control", "expires", "date", "age", "etag", "content-length"})
STREAM_CHUNK = 1024 * 1024
WHOLE_READ_BYTES = 4 * 1024 * 1024
TIER_REPORT_SECONDS = 5.0
UPSTREAM_ERROR_MAX_AGE = 10


def error_status(error: MoxyError) -> int:
    """The one table from Moxy's errors to HTTP statuses."""
    if isinstance(error, MalformedURL):
        return 400
    if isinstance(error, BadSignature | DestinationRefused):
        return 403
    if isinstance(error, ExpiredURL):
        return 410
    if isinstance(error, UpstreamTimeout):
        return 504
    if isinstance(error, UpstreamError):
        return error.status if error.status in (404, 410) else 502
    return 500


def _error_response(error: MoxyError, *, cache: str, head: bool = False) -> Response:
    status = error_status(error)
    kind = type(error).__name__
    reason = getattr(error, "reason", str(error))
    body = orjson.dumps({"error": kind, "reason": reason})
    headers = dict(SECURITY_HEADERS)
    # Errors the request caused must never be cached for everyone; upstream errors only briefly.
    headers["cache-control"] = "no-store" if status in (400, 403, 410) else f"public, max-age={UPSTREAM_ERROR_MAX_AGE}"
    headers["x-moxy-cache"] = cache
    headers["cache-status"] = f'moxy; fwd=uri-miss; detail="{reason}"' if status >= 500 else "moxy"
    return Response(b"" if head else body, status_code=status, headers=headers, media_type="application/json")


def surrogate_key(url: str) -> str:
    """The CDN purge key of an upstream URL: the same for all its variants, and no URL in the clear."""
    return hashlib.sha256(url.encode("utf-8", "surrogatepass")).hexdigest()[:24]


def _last_modified(entry: Entry) -> str:
    """The upstream's Last-Modified, else when Moxy stored the copy: the date clients revalidate against."""
    return entry.header("last-modified") or formatdate(entry.stored_at, usegmt=True)


def _etag(digest: str) -> str:
    return f'"{digest[:32]}"'


def _entry_headers(served: Served, vary: str) -> dict[str, str]:
    entry = served.entry
    headers = {name: value for name, value in entry.headers if name not in NOT_SENT}
    headers.update(SECURITY_HEADERS)
    headers["etag"] = _etag(entry.digest)
    headers["last-modified"] = _last_modified(entry)
    # DESIGN section 6: the full lifetime with Age, never the remaining lifetime (a CDN subtracts Age itself).
    headers["cache-control"] = (
        f"public, max-age={int(entry.lifetime)}, stale-while-revalidate={int(entry.stale_while_revalidate)}, "
        f"stale-if-error={int(entry.stale_if_error)}"
    )
    if not served.stored:
        headers["cache-control"] = "private, no-store"
    headers["age"] = str(max(0, int(served.age)))
    headers["accept-ranges"] = "bytes"
    headers["surrogate-key"] = surrogate_key(entry.url)
    if vary:
        headers["vary"] = vary
    result = served.cache.value
    headers["x-moxy-cache"] = result
    status = {"HIT": "hit", "STALE": "hit", "REVALIDATED": "fwd=stale", "MISS": "fwd=uri-miss", "BYPASS": "fwd=bypass"}
    detail = f'; detail="{served.reason}"' if served.reason else ""
    headers["cache-status"] = f"moxy; {status[result]}; ttl={int(entry.lifetime - served.age)}{detail}"
    return headers


def _not_modified(request: Request, served: Served) -> bool:
    etag = _etag(served.entry.digest)
    if_none_match = request.headers.get("if-none-match")
    if if_none_match is not None:
        candidates = [tag.strip().removeprefix("W/") for tag in if_none_match.split(",")]
        return "*" in candidates or etag in candidates
    since = request.headers.get("if-modified-since")
    modified = _last_modified(served.entry)
    if since and modified:
        try:
            return parsedate_to_datetime(modified) <= parsedate_to_datetime(since)
        except (TypeError, ValueError):
            return False
    return False


def _byte_range(request: Request, served: Served, length: int) -> tuple[int, int] | None | str:
    """(start, end inclusive) for a satisfiable single range, "unsatisfiable", or None to send the whole body."""
    header = request.headers.get("range")
    if request.method != "GET":
        return None  # RFC 9110 §14.2: Range is ignored for every other method, HEAD included
    if not header or not header.startswith("bytes=") or "," in header:
        return None  # absent, malformed or multi-range: the full 200 is a correct answer
    if_range = request.headers.get("if-range")
    if if_range is not None and if_range.strip() != _etag(served.entry.digest):
        return None
    first, _, last = header[6:].strip().partition("-")
    try:
        if first == "":
            suffix = int(last)
            if suffix <= 0:
                return "unsatisfiable"
            start, end = max(0, length - suffix), length - 1
        else:
            start = int(first)
            end = int(last) if last else length - 1
            if start > end and last:
                return None
            end = min(end, length - 1)
    except ValueError:
        return None
    if start >= length or length == 0:
        return "unsatisfiable"
    return start, end


async def _file_chunks(body: OpenBody, start: int, end: int) -> AsyncIterator[bytes]:
    position = start
    while position <= end:
        chunk = await asyncio.to_thread(body.read, position, min(STREAM_CHUNK, end + 1 - position))
        if not chunk:
            break
        position += len(chunk)
        yield chunk


class _FileRangeResponse(Response):
    """A body from a file small enough to read in one go: one thread hop and one send, instead of a stream
    of small reads (the disk-hit path for typical images)."""

    def __init__(self, body: OpenBody, start: int, end: int, **kwargs: Any) -> None:
        super().__init__(b"", **kwargs)
        self.file_body, self.start, self.end = body, start, end

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        content = await asyncio.to_thread(self.file_body.read, self.start, self.end + 1 - self.start)
        await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
        await send({"type": "http.response.body", "body": content})


def render(request: Request, served: Served, vary: str) -> Response:
    headers = _entry_headers(served, vary)
    media_type = headers.pop("content-type", "application/octet-stream")
    head = request.method == "HEAD"
    if _not_modified(request, served):
        return Response(status_code=304, headers={k: v for k, v in headers.items() if k != "content-type"})
    length = served.entry.length
    chosen = _byte_range(request, served, length)
    status, start, end = 200, 0, length - 1
    if chosen == "unsatisfiable":
        headers["content-range"] = f"bytes */{length}"
        return Response(status_code=416, headers=headers)
    if isinstance(chosen, tuple):
        status, (start, end) = 206, chosen
        headers["content-range"] = f"bytes {start}-{end}/{length}"
    headers["content-length"] = str(max(0, end + 1 - start))
    body = served.body
    if head or length == 0:
        return Response(b"", status_code=status, headers=headers, media_type=media_type)
    if isinstance(body, bytes):
        content = body if status == 200 else body[start : end + 1]
        return Response(content, status_code=status, headers=headers, media_type=media_type)
    if end + 1 - start <= WHOLE_READ_BYTES:
        return _FileRangeResponse(body, start, end, status_code=status, headers=headers, media_type=media_type)
    return StreamingResponse(_file_chunks(body, start, end), status_code=status, headers=headers, media_type=media_type)


@dataclass(slots=True)
class _Tiers:
    storage: Storage
    memory: MemoryStorage | None
    disk: DiskStorage | None


def _build_storage(settings: Settings) -> _Tiers:
    tiers: list[Storage] = []
    memory: MemoryStorage | None = None
    if settings.memory_cache_bytes > 0:
        memory = MemoryStorage(settings.memory_cache_bytes, settings.memory_max_entry_bytes)
        tiers.append(memory)
    disk: DiskStorage | None = None
    if settings.disk_cache_bytes > 0:
        disk = DiskStorage(Path(settings.cache_dir), settings.disk_cache_bytes)
        tiers.append(disk)
    if settings.redis_url is not None:
        from moxy.cache.redis import RedisStorage

        tiers.append(RedisStorage(settings.redis_url.get_secret_value()))
    return _Tiers(TieredStorage(tiers), memory, disk)


def _build_rules(settings: Settings) -> Any:
    if settings.rules_file is None:
        return None
    path = Path(settings.rules_file)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        from moxy.errors import ConfigError

        raise ConfigError("MOXY_RULES_FILE", f"cannot read {path}: {exc.strerror}") from exc
    if path.suffix.lower() == ".json":
        return parse_rules(text, source=str(path), fmt="json")
    return parse_rules(text, source=str(path), fmt="toml")


class MoxyApp:
    """The ASGI entry: repeat hits of fresh memory entries are answered by the shortcut, the rest by Starlette."""

    def __init__(self, router: Starlette, state: dict[str, Any], access_log: bool, metrics: Metrics) -> None:
        self.router = router
        self.state = state
        self.access_log = access_log
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        shortcut: HitShortcut | None = self.state.get("shortcut")
        if shortcut is not None and scope["type"] == "http" and scope["method"] == "GET":
            started = time.perf_counter()
            key = shortcut.key_of(scope["path"], scope["query_string"], scope["headers"])
            found = shortcut.find(key) if key is not None else None
            if found is not None:
                prepared, now = found
                await send({"type": "http.response.start", "status": 200, "headers": prepared.headers_at(now)})
                await send({"type": "http.response.body", "body": prepared.body})
                self.metrics.count_hit(time.perf_counter() - started)
                if self.access_log:
                    _log_access("GET", scope["path"], 200, "HIT", None, None, None, prepared.entry.length, started)
                return
        await self.router(scope, receive, send)


def _log_access(
    method: str,
    path: str,
    status: int,
    cache: str,
    reason: str | None,
    upstream_status: int | None,
    upstream_seconds: float | None,
    sent: int,
    started: float,
) -> None:
    write_access(
        {
            "time": round(time.time(), 3),
            "method": method,
            "path": path_digest(path),
            "status": status,
            "cache": cache,
            "reason": reason,
            "upstream_status": upstream_status,
            "upstream_ms": None if upstream_seconds is None else round(upstream_seconds * 1000, 1),
            "bytes": sent,
            "ms": round((time.perf_counter() - started) * 1000, 2),
        }
    )


def _measured(fetch: Fetch, metrics: Metrics) -> Fetch:
    """The upstream fetch, counted: time, fetches in flight, failures by reason (an error status is one too)."""

    async def fetch_measured(url: str, headers: Mapping[str, str]) -> UpstreamResponse:
        started = time.perf_counter()
        metrics.in_flight.inc()
        try:
            response = await fetch(url, headers)
        except UpstreamError as exc:
            metrics.upstream_failures.labels(reason=exc.reason).inc()
            raise
        finally:
            metrics.in_flight.dec()
            metrics.upstream_seconds.observe(time.perf_counter() - started)
        if response.status >= 500 or response.status in (404, 410):
            metrics.upstream_failures.labels(reason=f"upstream-status-{response.status}").inc()
        return response

    return fetch_measured


async def _set_tier_gauges(tiers: _Tiers, metrics: Metrics) -> None:
    if tiers.memory is not None:
        metrics.memory_bytes.set(tiers.memory.currsize)
        metrics.memory_items.set(len(tiers.memory))
    if tiers.disk is not None:
        metrics.disk_bytes.set(await tiers.disk.usage())


async def _report_tiers(tiers: _Tiers, metrics: Metrics, interval: float = TIER_REPORT_SECONDS) -> None:
    # Each worker refreshes its own figures, so a scrape answered by one worker still sums current values.
    while True:
        with contextlib.suppress(OSError):
            await _set_tier_gauges(tiers, metrics)
        await asyncio.sleep(interval)


async def _unready(settings: Settings, tiers: _Tiers) -> list[str]:
    """What stops this worker from doing its job: an unwritable cache folder, an unreachable Redis."""
    failed: list[str] = []
    try:
        await asyncio.to_thread(_probe_writable, Path(settings.cache_dir))
    except OSError:
        failed.append("cache-dir")
    for tier in tiers.storage.tiers if isinstance(tiers.storage, TieredStorage) else ():
        ping = getattr(tier, "ping", None)
        if ping is not None and not await ping():
            failed.append("redis")
    return failed


def _probe_writable(folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=folder, prefix=".ready-") as probe:
        probe.write(b"ok")
        probe.flush()


def _warn_about_short_camo_keys(keys: list[str]) -> None:
    # DESIGN section 1: legacy camo keys are often short; they are accepted (published URLs must keep working)
    # but never silently. The key itself is never printed.
    for position, key in enumerate(keys, start=1):
        if len(key.encode("utf-8")) < MIN_KEY_BYTES:
            sys.stderr.write(
                f"moxy: warning: MOXY_CAMO_KEY key {position} is shorter than {MIN_KEY_BYTES} bytes; accepted for "
                "camo compatibility only (verification), plan to re-sign with MOXY_KEY\n"
            )


def create_app(settings: Settings | None = None) -> MoxyApp:
    """The Moxy ASGI app. Configuration errors surface here, before the first request."""
    settings = settings or load_settings()
    signer = Signer(settings.signing_keys(), settings.base_url, camo_keys=settings.camo_keys())
    _warn_about_short_camo_keys(settings.camo_keys())
    policy = DestinationPolicy.from_settings_values(
        settings.allowed_networks, settings.allow_hosts, settings.deny_hosts
    )
    validators = build_chain(
        content_types=settings.content_types,
        max_body_bytes=settings.max_body_bytes,
        rules=_build_rules(settings),
        custom=settings.validators,
    )
    freshness = FreshnessRules(
        ttl_min=settings.ttl_min,
        ttl_max=settings.ttl_max,
        ttl_default=settings.ttl_default,
        stale_while_revalidate=settings.stale_while_revalidate,
        stale_if_error=settings.stale_if_error,
    )
    vary = ", ".join(settings.forward_headers)
    state: dict[str, Any] = {}
    metrics = Metrics()

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        tiers = _build_storage(settings)
        storage, disk = tiers.storage, tiers.disk
        spool = disk.spool_dir if disk is not None else Path(settings.cache_dir) / "tmp"
        spool.mkdir(parents=True, exist_ok=True)
        purges = PurgeLog(Path(settings.cache_dir) / "purges.log")
        await purges.refresh()
        upstream = Upstream(
            policy=policy,
            connect_timeout=settings.connect_timeout,
            read_timeout=settings.read_timeout,
            total_timeout=settings.total_timeout,
            max_body_bytes=settings.max_body_bytes,
            max_redirects=settings.max_redirects,
            user_agent=f"Moxy/{__version__}",
            via=f"1.1 moxy/{__version__}",
            spool_dir=spool,
        )
        state["proxy"] = Proxy(
            signer=signer,
            policy=policy,
            storage=storage,
            fetch=_measured(upstream.fetch, metrics),
            validators=validators,
            freshness=freshness,
            forward_headers=settings.forward_headers,
            negative_ttl=settings.negative_ttl,
            lock_timeout=settings.lock_timeout,
            purges=purges,
            on_rejection=lambda reason, url: metrics.rejections.labels(reason=reason).inc(),
        )
        if tiers.memory is not None:
            state["shortcut"] = HitShortcut(tiers.memory, purges, settings.forward_headers, time.time)
        loop = asyncio.get_running_loop()
        state["tiers"] = tiers
        watchers = [loop.create_task(purges.watch()), loop.create_task(_report_tiers(tiers, metrics))]
        try:
            yield
        finally:
            for watcher in watchers:
                watcher.cancel()
            metrics.close()
            state.pop("shortcut", None)
            await state["proxy"].aclose()
            await upstream.aclose()
            await storage.aclose()

    async def serve(request: Request) -> Response:
        started = time.perf_counter()
        proxy: Proxy = state["proxy"]
        outcome = await proxy.handle(
            ProxyRequest(path=request.url.path, query=request.url.query, headers=request.headers)
        )
        head = request.method == "HEAD"
        if isinstance(outcome, Served):
            response = render(request, outcome, vary)
            if outcome.cache is CacheResult.HIT and not head and response.status_code == 200:
                _prepare_shortcut(request, outcome, response)
            cache, reason, upstream_status = outcome.cache.value, outcome.reason, outcome.upstream_status
            upstream_seconds = outcome.upstream_seconds
        else:
            assert isinstance(outcome, Failed)
            response = _error_response(outcome.error, cache=outcome.cache.value, head=head)
            cache, reason = outcome.cache.value, getattr(outcome.error, "reason", str(outcome.error))
            upstream_status, upstream_seconds = outcome.upstream_status, outcome.upstream_seconds
        metrics.count_request(response.status_code, cache, time.perf_counter() - started)
        if settings.access_log:
            sent = int(response.headers.get("content-length", 0) or 0)
            _log_access(
                request.method,
                request.url.path,
                response.status_code,
                cache,
                reason,
                upstream_status,
                upstream_seconds,
                sent,
                started,
            )
        return response

    def _prepare_shortcut(request: Request, served: Served, response: Response) -> None:
        shortcut: HitShortcut | None = state.get("shortcut")
        if shortcut is None:
            return
        key = shortcut.key_of(request.scope["path"], request.scope["query_string"], request.scope["headers"])
        if key is None:
            return
        # Verified again (once per prepared answer, not per hit) only to learn when the signed URL expires.
        expires_at = signer.verify_path(request.url.path, request.url.query).expires_at
        shortcut.remember(key, served.entry, response.raw_headers, expires_at)

    async def healthz(request: Request) -> Response:
        return Response(b'{"status":"ok"}', media_type="application/json", headers={"cache-control": "no-store"})

    async def readyz(request: Request) -> Response:
        failed = await _unready(settings, state["tiers"])
        body = orjson.dumps({"status": "unready", "failed": failed} if failed else {"status": "ready"})
        return Response(
            body,
            status_code=503 if failed else 200,
            media_type="application/json",
            headers={"cache-control": "no-store"},
        )

    async def metrics_page(request: Request) -> Response:
        await _set_tier_gauges(state["tiers"], metrics)
        text = await asyncio.to_thread(metrics.render)  # multiprocess mode reads one file per worker
        return Response(text, media_type=METRICS_CONTENT_TYPE, headers={"cache-control": "no-store"})

    async def purge(request: Request) -> Response:
        token = settings.purge_token.get_secret_value().encode("utf-8") if settings.purge_token else b""
        scheme, _, credentials = request.headers.get("authorization", "").strip().partition(" ")
        # RFC 9110 §11.1: the scheme is case-insensitive; the token is compared in constant time.
        given = credentials.strip().encode("utf-8", "replace")
        if not token or scheme.lower() != "bearer" or not hmac.compare_digest(given, token):
            return Response(
                b'{"error":"Unauthorized","reason":"bad or missing purge token"}',
                status_code=401,
                media_type="application/json",
                headers={"cache-control": "no-store", "www-authenticate": "Bearer"},
            )
        try:
            payload = orjson.loads(await request.body())
            url = payload["url"]
            if not isinstance(url, str):
                raise TypeError
        except (orjson.JSONDecodeError, KeyError, TypeError):
            return Response(
                b'{"error":"BadRequest","reason":"body must be {\\"url\\": \\"...\\"}"}',
                status_code=400,
                media_type="application/json",
                headers={"cache-control": "no-store"},
            )
        variants: tuple[Mapping[str, str], ...] = ({},)
        accept = request.headers.get("x-moxy-purge-accept")
        if accept:
            variants = ({}, {"accept": accept})
        removed, upstream_url = await state["proxy"].purge(url, variants)
        answer = {"removed": removed, "surrogate_key": surrogate_key(upstream_url)}
        return Response(orjson.dumps(answer), media_type="application/json", headers={"cache-control": "no-store"})

    routes = [
        Route("/healthz", healthz, methods=["GET", "HEAD"]),
        Route("/readyz", readyz, methods=["GET", "HEAD"]),
        Route("/metrics", metrics_page, methods=["GET"]),
    ]
    if settings.purge_token is not None:
        routes.append(Route("/purge", purge, methods=["POST"]))
    routes.append(Route("/{path:path}", serve, methods=["GET", "HEAD"]))
    return MoxyApp(Starlette(routes=routes, lifespan=lifespan), state, settings.access_log, metrics)
