"""The Starlette shell and composition root: create_app(settings) wires storage, upstream, Proxy, metrics and the
hit shortcut in the lifespan, and routes requests; moxy.responses turns each Outcome into the HTTP answer."""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import sys
import tempfile
import time
import traceback
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from moxy import __version__
from moxy.accesslog import path_digest, write_access
from moxy.cache import DiskStorage, MemoryStorage, Storage, TieredStorage
from moxy.cache.disk import DiskWatcher, fault_kind
from moxy.cache.freshness import FreshnessRules
from moxy.cache.purges import PurgeLog
from moxy.config import Settings, load_settings
from moxy.errors import ConfigError, MoxyError, UpstreamError
from moxy.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE, Metrics
from moxy.policy import DestinationPolicy
from moxy.proxy import CacheResult, Failed, Fetch, Proxy, ProxyRequest, Served
from moxy.responses import error_response, render, surrogate_key
from moxy.rules import parse_rules
from moxy.shortcut import HitShortcut
from moxy.signing import MIN_KEY_BYTES, Signer
from moxy.upstream import Upstream, UpstreamResponse
from moxy.validation import build_chain

__all__ = ["MoxyApp", "create_app"]

TIER_REPORT_SECONDS = 5.0
# The reason of an answer Moxy gives when its own code failed: a bug, and what the tests look for in every log.
INTERNAL_ERROR = "internal-error"


@dataclass(slots=True)
class _Tiers:
    storage: Storage
    memory: MemoryStorage | None
    disk: DiskStorage | None


def _build_storage(settings: Settings, purges: PurgeLog, disk_watcher: DiskWatcher | None = None) -> _Tiers:
    tiers: list[Storage] = []
    memory: MemoryStorage | None = None
    if settings.memory_cache_bytes > 0:
        memory = MemoryStorage(settings.memory_cache_bytes, settings.memory_max_entry_bytes)
        tiers.append(memory)
    disk: DiskStorage | None = None
    if settings.disk_cache_bytes > 0:
        disk = DiskStorage(Path(settings.cache_dir), settings.disk_cache_bytes, watcher=disk_watcher)
        tiers.append(disk)
    if settings.redis_url is not None:
        from moxy.cache.redis import RedisStorage

        tiers.append(RedisStorage(settings.redis_url.get_secret_value()))
    return _Tiers(TieredStorage(tiers, purges), memory, disk)


def _build_rules(settings: Settings) -> Any:
    if settings.rules_file is None:
        return None
    path = Path(settings.rules_file)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
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
                prepared, entry, now = found
                headers = prepared.headers_at(entry, now)
                await send({"type": "http.response.start", "status": 200, "headers": headers})
                await send({"type": "http.response.body", "body": entry.body})
                self.metrics.count_hit(time.perf_counter() - started)
                if self.access_log:
                    _log_access("GET", scope["path"], 200, "HIT", None, None, None, entry.length, started)
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
        metrics.disk_bytes.set(tiers.disk.counted_usage())


async def _report_tiers(tiers: _Tiers, metrics: Metrics, interval: float = TIER_REPORT_SECONDS) -> None:
    # Each worker refreshes its own figures, so a scrape answered by one worker still sums current values.
    while True:
        with contextlib.suppress(OSError):
            await _set_tier_gauges(tiers, metrics)
            metrics.forget_dead_workers()
        await asyncio.sleep(interval)


async def _degraded(settings: Settings, tiers: _Tiers) -> list[str]:
    """The optional parts failing now. Moxy serves without them, so they make it degraded, not unready:
    "cache-dir" (the cache folder takes no writes: full, read-only, gone), "redis" (unreachable)."""
    failed: list[str] = []
    if tiers.disk is not None:
        writable = await tiers.disk.probe()  # also ends the disk tier's fault state once writes work again
    else:
        try:
            # No disk tier, but the spool and the purge log still live in the cache folder.
            await asyncio.to_thread(_probe_writable, Path(settings.cache_dir))
            writable = True
        except OSError:
            writable = False
    if not writable:
        failed.append("cache-dir")
    for tier in tiers.storage.tiers if isinstance(tiers.storage, TieredStorage) else ():
        ping = getattr(tier, "ping", None)
        if ping is not None and not await ping():
            failed.append("redis")
    return failed


class _DiskReport:
    """What the disk tier could not do: every failure counted, each change of state one JSON line on stderr."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics

    def failed(self, operation: str, kind: str) -> None:
        self.metrics.disk_failures.labels(operation=operation, error=kind).inc()

    def changed(self, fault: str | None, operation: str, error: OSError | None) -> None:
        record = {
            "time": round(time.time(), 3),
            "level": "warning" if fault else "info",
            "event": "cache-dir-failed" if fault else "cache-dir-recovered",
            "error": fault,
            "operation": operation,
            "detail": error.strerror if error is not None else None,
        }
        with contextlib.suppress(OSError, ValueError):  # a closed stderr must not fail a request
            sys.stderr.buffer.write(orjson.dumps(record) + b"\n")
            sys.stderr.flush()


def _probe_writable(folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=folder, prefix=".ready-") as probe:
        probe.write(b"ok")
        probe.flush()


def _log_internal_error(path: str, exc: Exception) -> None:
    record = {
        "time": round(time.time(), 3),
        "level": "error",
        "event": INTERNAL_ERROR,
        "path": path_digest(path),
        "error": type(exc).__name__,
        "traceback": "".join(traceback.format_exception(exc)),
    }
    with contextlib.suppress(OSError, ValueError):
        sys.stderr.buffer.write(orjson.dumps(record) + b"\n")
        sys.stderr.flush()


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
        purges = PurgeLog(Path(settings.cache_dir) / "purges.log")
        await purges.refresh()
        tiers = _build_storage(settings, purges, _DiskReport(metrics))
        storage, disk = tiers.storage, tiers.disk
        spool = disk.spool_dir if disk is not None else Path(settings.cache_dir) / "tmp"
        spool.mkdir(parents=True, exist_ok=True)
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
            ca_file=settings.upstream_ca_file,
            host_concurrency=settings.upstream_host_concurrency,
            host_queue_timeout=settings.upstream_queue_timeout,
            breaker_failures=settings.upstream_breaker_failures,
            breaker_cooldown=settings.upstream_breaker_cooldown,
            on_spool_failure=lambda exc: metrics.disk_failures.labels(operation="spool", error=fault_kind(exc)).inc(),
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
        head = request.method == "HEAD"
        try:
            outcome = await proxy.handle(
                ProxyRequest(path=request.url.path, query=request.url.query, headers=request.headers)
            )
            if isinstance(outcome, Served):
                response = render(request, outcome, vary)
                if outcome.cache is CacheResult.HIT and not head and response.status_code == 200:
                    _prepare_shortcut(request, outcome, response)
                cache, reason, upstream_status = outcome.cache.value, outcome.reason, outcome.upstream_status
                upstream_seconds = outcome.upstream_seconds
            else:
                assert isinstance(outcome, Failed)
                response = error_response(outcome.error, cache=outcome.cache.value, head=head, vary=vary)
                cache, reason = outcome.cache.value, getattr(outcome.error, "reason", str(outcome.error))
                upstream_status, upstream_seconds = outcome.upstream_status, outcome.upstream_seconds
        except Exception as exc:
            # A bug, never an expected outcome: the answer is still a well-formed, uncacheable JSON error with the
            # security headers, counted and logged like every other, and the traceback goes to the error log.
            _log_internal_error(request.url.path, exc)
            response = error_response(MoxyError(INTERNAL_ERROR), cache=CacheResult.BYPASS.value, head=head)
            cache, reason, upstream_status, upstream_seconds = CacheResult.BYPASS.value, INTERNAL_ERROR, None, None
            metrics.internal_errors.inc()
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
        if shortcut is None or not shortcut.eligible(served.entry):
            return
        key = shortcut.key_of(request.scope["path"], request.scope["query_string"], request.scope["headers"])
        if key is not None:
            shortcut.remember(key, served.entry, response.raw_headers, served.url_expires_at)

    async def healthz(request: Request) -> Response:
        return Response(b'{"status":"ok"}', media_type="application/json", headers={"cache-control": "no-store"})

    async def readyz(request: Request) -> Response:
        # 503 only while Moxy cannot answer at all (still starting); a failing optional part is reported, with 200.
        body: dict[str, object]
        if "tiers" not in state:
            body, status = {"status": "starting"}, 503
        else:
            body, status = {"status": "ready", "degraded": await _degraded(settings, state["tiers"])}, 200
        return Response(
            orjson.dumps(body), status_code=status, media_type="application/json", headers={"cache-control": "no-store"}
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
