"""The endpoints: the proxy route (GET/HEAD of a signed URL), POST /purge, /healthz, /readyz and /metrics, over a
typed Components object that the app's lifespan builds. moxy.responses renders every answer of the proxy route;
moxy.telemetry counts and logs it."""

from __future__ import annotations

import asyncio
import hmac
import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
from starlette.applications import Starlette
from starlette.datastructures import Headers
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from moxy.cache import DiskStorage, MemoryStorage, Storage, TieredStorage
from moxy.cache.purges import PurgeLog
from moxy.cache.vary import ACCEPT_CLASSES
from moxy.config import Settings
from moxy.errors import MoxyError
from moxy.proxy import CacheResult, Proxy, ProxyRequest, Served
from moxy.responses import SECURITY_HEADERS, Answer, answer, error_answer, surrogate_key
from moxy.signing import Signer
from moxy.telemetry import (
    CONTENT_TYPE as METRICS_CONTENT_TYPE,
    INTERNAL_ERROR,
    Metrics,
    log_access,
    log_internal_error,
    set_tier_gauges,
)
from moxy.upstream import Upstream

__all__ = [
    "ADMIN_LISTENER",
    "ADMIN_PATHS",
    "DRAINING",
    "ORIGIN_SECRET_HEADER",
    "Components",
    "OnHit",
    "Tiers",
    "admin_router",
    "origin_lock",
    "router",
    "waiting",
]

# Told of every plain HIT the proxy route answered, with the request's ASGI scope (the hit memo learns from it).
OnHit = Callable[[Any, Served], None]


@dataclass(frozen=True, slots=True)
class Tiers:
    """The storage as built: the tiered whole, and the tiers the gauges and the readiness check look at."""

    storage: Storage
    memory: MemoryStorage | None
    disk: DiskStorage | None


@dataclass(frozen=True, slots=True)
class Components:
    """Everything a running Moxy serves with, built once per worker by the app's lifespan."""

    settings: Settings
    signer: Signer
    proxy: Proxy
    tiers: Tiers
    metrics: Metrics
    purges: PurgeLog
    upstream: Upstream

    @property
    def vary(self) -> str:
        """The Vary of an upstream's error answer: it was made for the forwarded headers as they were sent."""
        return ", ".join(self.settings.forward_headers)


# Operational answers (health, readiness, metrics, purge, refusals) are never cached and carry the same
# security headers as the proxy's own: whatever a client asks, no answer of Moxy's lacks them.
_NO_STORE = {**SECURITY_HEADERS, "cache-control": "no-store"}
# A purge body is a small JSON object naming one URL; anything larger is refused before it is read whole.
MAX_PURGE_BODY_BYTES = 64 * 1024


def _json(body: bytes, status: int = 200, headers: Mapping[str, str] = _NO_STORE) -> Response:
    return Response(body, status_code=status, media_type="application/json", headers=dict(headers))


async def healthz(request: Request) -> Response:
    return _json(b'{"status":"ok"}')


async def _starting(request: Request) -> Response:
    # 503 only while Moxy cannot answer at all: its components are not built yet.
    return _json(orjson.dumps({"status": "starting"}), 503)


def waiting() -> list[Route]:
    """The routes before the components exist: alive, not ready."""
    return [
        Route("/healthz", healthz, methods=["GET", "HEAD"]),
        Route("/readyz", _starting, methods=["GET", "HEAD"]),
    ]


def _probe_writable(folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=folder, prefix=".ready-") as probe:
        probe.write(b"ok")
        probe.flush()


class _Endpoints:
    def __init__(self, components: Components, on_hit: OnHit | None) -> None:
        self.components = components
        self.on_hit = on_hit
        self.vary = components.vary

    async def proxy(self, scope: Scope, receive: Receive, send: Send) -> None:
        """The proxy route as plain ASGI: a miss is the path that must be cheap, so no framework Request or
        Response object is made for it (moxy.responses.Answer goes out as the ASGI messages themselves)."""
        started = time.perf_counter()
        metrics = self.components.metrics
        method = scope["method"]
        head = method == "HEAD"
        reason: str | None
        try:
            headers = Headers(scope=scope)
            # The path and query as the server decoded them (what a framework's URL would rebuild, unparsed).
            query = scope["query_string"].decode("latin-1")
            outcome = await self.components.proxy.handle(ProxyRequest(path=scope["path"], query=query, headers=headers))
            if isinstance(outcome, Served):
                reply = answer(method, headers, outcome)
                if outcome.cache is CacheResult.HIT and not head and reply.status == 200 and self.on_hit:
                    self.on_hit(scope, outcome)
                reason = outcome.reason
            else:
                reply = error_answer(outcome.error, cache=outcome.cache.value, head=head, vary=self.vary)
                reason = getattr(outcome.error, "reason", str(outcome.error))
            cache, upstream_status, upstream_seconds = (
                outcome.cache.value,
                outcome.upstream_status,
                outcome.upstream_seconds,
            )
        except Exception as exc:
            # A bug, never an expected outcome: the answer is still a well-formed, uncacheable JSON error with the
            # security headers, counted and logged like every other, and the traceback goes to the error log.
            log_internal_error(scope["path"], exc)
            reply = error_answer(MoxyError(INTERNAL_ERROR), cache=CacheResult.BYPASS.value, head=head)
            cache, reason, upstream_status, upstream_seconds = CacheResult.BYPASS.value, INTERNAL_ERROR, None, None
            metrics.internal_errors.inc()
        metrics.count_request(reply.status, cache, time.perf_counter() - started)
        if self.components.settings.access_log:
            log_access(
                method,
                scope["path"],
                reply.status,
                cache,
                reason,
                upstream_status,
                upstream_seconds,
                _sent_length(reply),
                started,
                client=scope.get("client"),
            )
        await reply(scope, receive, send)

    async def purge(self, request: Request) -> Response:
        settings = self.components.settings
        token = settings.purge_token.get_secret_value().encode("utf-8") if settings.purge_token else b""
        scheme, _, credentials = request.headers.get("authorization", "").strip().partition(" ")
        # RFC 9110 §11.1: the scheme is case-insensitive; the token is compared in constant time.
        given = credentials.strip().encode("utf-8", "replace")
        if not token or scheme.lower() != "bearer" or not hmac.compare_digest(given, token):
            return _json(
                b'{"error":"Unauthorized","reason":"bad or missing purge token"}',
                401,
                {**_NO_STORE, "www-authenticate": "Bearer"},
            )
        body = bytearray()
        try:
            async for chunk in request.stream():
                body += chunk
                if len(body) > MAX_PURGE_BODY_BYTES:
                    return _json(b'{"error":"PayloadTooLarge","reason":"a purge body is one small JSON object"}', 413)
        except ClientDisconnect:
            # Gone before its body arrived: nothing is purged, and there is nobody to tell.
            return _json(b'{"error":"BadRequest","reason":"the client left before sending the body"}', 400)
        try:
            payload = orjson.loads(body)
            url = payload["url"]
            if not isinstance(url, str):
                raise TypeError
        except (orjson.JSONDecodeError, KeyError, TypeError):
            return _json(b'{"error":"BadRequest","reason":"body must be {\\"url\\": \\"...\\"}"}', 400)
        # Every variant Accept can make is known (its classes), so all are deleted now and counted; variants of other
        # forwarded headers go when next looked up (the purge log), uncounted.
        variants: list[Mapping[str, str]] = [{}]
        if "accept" in self.components.proxy.forward_headers:
            variants += [{"accept": accept} for accept in ACCEPT_CLASSES]
        accept = request.headers.get("x-moxy-purge-accept")
        if accept:
            variants.append({"accept": accept})
        removed, upstream_url = await self.components.proxy.purge(url, tuple(variants))
        return _json(orjson.dumps({"removed": removed, "surrogate_key": surrogate_key(upstream_url)}))

    async def readyz(self, request: Request) -> Response:
        if DRAINING in (request.scope.get("extensions") or {}):
            return _json(b'{"status":"draining"}', 503)
        # A failing optional part is reported, with 200: Moxy still answers requests without it.
        return _json(orjson.dumps({"status": "ready", "degraded": await self.degraded()}))

    async def degraded(self) -> list[str]:
        """The optional parts failing now: "cache-dir" (the cache folder takes no writes: full, read-only, gone),
        "redis" (unreachable)."""
        tiers = self.components.tiers
        failed: list[str] = []
        if tiers.disk is not None:
            writable = await tiers.disk.probe()  # also ends the disk tier's fault state once writes work again
        else:
            try:
                # No disk tier, but the spool and the purge log still live in the cache folder.
                await asyncio.to_thread(_probe_writable, Path(self.components.settings.cache_dir))
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

    async def metrics(self, request: Request) -> Response:
        metrics, tiers = self.components.metrics, self.components.tiers
        set_tier_gauges(metrics, tiers.memory, tiers.disk)
        text = await asyncio.to_thread(metrics.render)  # multiprocess mode reads one file per worker
        return Response(text, media_type=METRICS_CONTENT_TYPE, headers=_NO_STORE)


class _Plain:
    """An ASGI callable as the framework's route endpoint (a bare function or method would be taken for a
    Request-to-Response handler)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self.app(scope, receive, send)


# The header a CDN adds with MOXY_ORIGIN_SECRET; without it (or with another value) Moxy answers nothing but 403.
ORIGIN_SECRET_HEADER = b"x-moxy-origin-secret"
# Answered to anyone: the orchestrator's probes do not come through the CDN.
_UNLOCKED_PATHS = frozenset({"/healthz", "/readyz"})
_LOCKED = orjson.dumps({"error": "Forbidden", "reason": "requests reach this origin through its CDN only"})
_LOCKED_HEADERS = [
    *((name.encode("latin-1"), value.encode("latin-1")) for name, value in _NO_STORE.items()),
    (b"content-type", b"application/json"),
    (b"content-length", b"%d" % len(_LOCKED)),
]


def origin_lock(app: ASGIApp, secret: str, metrics: Metrics) -> ASGIApp:
    """`app` answering only requests that carry `secret` in ORIGIN_SECRET_HEADER (compared in constant time), and
    a JSON 403 to every other, before the hit memo or anything else sees it."""
    expected = secret.encode("utf-8")

    async def locked(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in _UNLOCKED_PATHS:
            await app(scope, receive, send)
            return
        given = next((value for name, value in scope["headers"] if name == ORIGIN_SECRET_HEADER), b"")
        if hmac.compare_digest(given, expected):
            await app(scope, receive, send)
            return
        metrics.count_request(403, CacheResult.BYPASS.value, 0.0)
        await send({"type": "http.response.start", "status": 403, "headers": _LOCKED_HEADERS})
        await send({"type": "http.response.body", "body": b"" if scope["method"] == "HEAD" else _LOCKED})

    return locked


def _sent_length(reply: Answer) -> int:
    for name, value in reply.headers:
        if name == b"content-length":
            return int(value)
    return 0


# The endpoints that are not the proxy route for GET and HEAD (HEAD is taken wherever GET is).
_OPERATIONAL_PATHS = frozenset({"/healthz", "/readyz", "/metrics"})
# What MOXY_ADMIN_PORT moves to the admin listener: on the main one these paths then answer 404, whatever the method.
ADMIN_PATHS = frozenset({"/metrics", "/purge"})
# The ASGI scope extension moxy.server sets on a request that arrived on the admin listener.
ADMIN_LISTENER = "moxy.admin_listener"
# The mark moxy.server puts in the scope's extensions of a request that arrives while its worker drains (it stopped
# accepting: a reload replaced it, or it was told to stop). Readiness then says so, so a probe on a kept-alive
# connection takes this worker out of a load balancer's rotation instead of being told all is well.
DRAINING = "moxy.draining"


def _refusals(components: Components, *, allow: str | None) -> Callable[[Request, Exception], Any]:
    """The framework's answer to what no route takes (another method, a target that is no path such as `OPTIONS *`):
    the same JSON error shape, security headers, no-store, access log and metrics as every other answer. `allow`:
    the methods a 405 names; None answers a wrong method with 404, as if the endpoint were not there."""
    metrics, access_log = components.metrics, components.settings.access_log

    async def refused(request: Request, exc: Exception) -> Response:
        started = time.perf_counter()
        status = getattr(exc, "status_code", 404)
        headers = dict(_NO_STORE)
        if status == 405 and allow is not None:
            headers["allow"] = allow
            body = b'{"error":"MethodNotAllowed","reason":"Moxy answers GET and HEAD"}'
        else:
            status, body = 404, b'{"error":"NotFound","reason":"no such endpoint"}'
        headers["content-length"] = str(len(body))  # a HEAD answer says the length the GET would have
        response = _json(b"" if request.method == "HEAD" else body, status, headers)
        metrics.count_request(status, CacheResult.BYPASS.value, time.perf_counter() - started)
        if access_log:
            path = request.scope.get("path", "")
            client = request.scope.get("client")
            log_access(request.method, path, status, "BYPASS", None, None, None, len(body), started, client=client)
        return response

    return refused


def _probes(endpoints: _Endpoints) -> list[Route]:
    return [
        Route("/healthz", healthz, methods=["GET", "HEAD"]),
        Route("/readyz", endpoints.readyz, methods=["GET", "HEAD"]),
    ]


def _operations(endpoints: _Endpoints) -> list[Route]:
    """/metrics, and /purge when a purge token is configured."""
    routes = [Route("/metrics", endpoints.metrics, methods=["GET"])]
    if endpoints.components.settings.purge_token is not None:
        routes.append(Route("/purge", endpoints.purge, methods=["POST"]))
    return routes


def router(components: Components, *, on_hit: OnHit | None = None) -> ASGIApp:
    """The endpoints of the main listener over `components`. /purge exists only when a purge token is configured;
    with MOXY_ADMIN_PORT, /metrics and /purge are the admin listener's (`admin_router`) and answer 404 here.

    A GET or HEAD of any other path goes straight to the proxy route; the framework's router takes the rest
    (the operational endpoints, other methods, targets that are no path)."""
    endpoints = _Endpoints(components, on_hit)
    moved = components.settings.admin_port is not None
    routes = _probes(endpoints) + ([] if moved else _operations(endpoints))
    # Reached through the framework only for a method other than GET and HEAD: the route names the methods it
    # takes, which makes the framework's answer a 405 (with Allow) instead of a 404.
    routes.append(Route("/{path:path}", _Plain(endpoints.proxy), methods=["GET", "HEAD"]))
    refused = _refusals(components, allow="GET, HEAD")
    framework = Starlette(routes=routes, exception_handlers={404: refused, 405: refused})
    framework.router.redirect_slashes = False  # as on the admin listener: an unknown path is a 404, never a redirect
    # No route at all: every request it takes is answered 404 by `refused`.
    missing = Starlette(exception_handlers={404: refused})
    hidden = ADMIN_PATHS if moved else frozenset()
    proxy = endpoints.proxy

    async def front(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await framework(scope, receive, send)
        elif scope["path"] in hidden:
            await missing(scope, receive, send)
        elif (
            scope["method"] in ("GET", "HEAD")
            and scope["path"].startswith("/")
            and scope["path"] not in _OPERATIONAL_PATHS
        ):
            await proxy(scope, receive, send)
        else:
            await framework(scope, receive, send)

    return front


def admin_router(components: Components) -> ASGIApp:
    """The endpoints of the admin listener (MOXY_ADMIN_PORT): /metrics and /purge, and the probes (one port for
    an orchestrator to watch). Every other request is answered 404: no proxy route here."""
    endpoints = _Endpoints(components, None)
    refused = _refusals(components, allow=None)
    admin = Starlette(
        routes=_probes(endpoints) + _operations(endpoints), exception_handlers={404: refused, 405: refused}
    )
    # `/purge/` is not `/purge`: a 404 like any unknown path, not a bare redirect to an address built from Host.
    admin.router.redirect_slashes = False
    return admin
