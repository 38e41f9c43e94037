"""Composition only: create_app(settings) derives what needs no I/O (so a configuration error surfaces before
start-up); its lifespan builds the Components, mounts the hit memo in front of the routes, and closes it all."""

from __future__ import annotations

import asyncio
import contextlib
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

from starlette.applications import Starlette
from starlette.types import ASGIApp, Receive, Scope, Send

from moxy import __version__, routes
from moxy.cache import DiskStorage, MemoryStorage, Storage, TieredStorage
from moxy.cache.disk import fault_kind
from moxy.cache.fleet import FleetLocks
from moxy.cache.freshness import FreshnessRules
from moxy.cache.purges import PurgeLog
from moxy.config import Settings, load_settings
from moxy.cors import Cors
from moxy.errors import ConfigError
from moxy.hits import HitMemo, Hits
from moxy.policy import DestinationPolicy
from moxy.proxy import Proxy
from moxy.responses import SEND_SLICE
from moxy.rules import Rules, parse_rules
from moxy.signing import MIN_KEY_BYTES, Signer
from moxy.telemetry import DiskReport, Metrics, measured, report_tiers
from moxy.upstream import Upstream
from moxy.upstream.egress import ForwardProxy
from moxy.validation import ValidatorChain, build_chain

__all__ = ["MoxyApp", "Plan", "create_app", "open_components"]


@dataclass(frozen=True, slots=True)
class Plan:
    """What Settings make of Moxy before any folder or socket is opened."""

    settings: Settings
    signer: Signer
    policy: DestinationPolicy
    validators: ValidatorChain
    freshness: FreshnessRules
    proxy: ForwardProxy | None = None  # MOXY_UPSTREAM_PROXY

    @classmethod
    def of(cls, settings: Settings, *, quiet: bool = False) -> Plan:
        """The plan; `quiet`: without the start-up warnings (a check run before the workers, which warn)."""
        s = settings
        # Legacy camo keys are often short: accepted (published URLs must keep working), never silently.
        for position, key in enumerate(s.camo_keys(), start=1):
            if len(key.encode("utf-8")) < MIN_KEY_BYTES and not quiet:
                sys.stderr.write(
                    f"moxy: warning: MOXY_CAMO_KEY key {position} is shorter than {MIN_KEY_BYTES} bytes; accepted "
                    "for camo compatibility only (verification), plan to re-sign with MOXY_KEY\n"
                )
        return cls(
            settings=s,
            signer=Signer(s.signing_keys(), s.base_url, camo_keys=s.camo_keys()),
            policy=DestinationPolicy.from_settings_values(s.allowed_networks, s.allow_hosts, s.deny_hosts),
            validators=build_chain(
                content_types=s.content_types, max_body_bytes=s.max_body_bytes, rules=_rules(s), custom=s.validators
            ),
            freshness=FreshnessRules(
                ttl_min=s.ttl_min,
                ttl_max=s.ttl_max,
                ttl_default=s.ttl_default,
                stale_while_revalidate=s.stale_while_revalidate,
                stale_if_error=s.stale_if_error,
            ),
            proxy=_proxy(s),
        )


def _proxy(settings: Settings) -> ForwardProxy | None:
    if settings.upstream_proxy is None:
        return None
    try:
        return ForwardProxy.from_url(settings.upstream_proxy.get_secret_value())
    except ValueError as exc:  # its message never repeats the URL, which may hold the proxy's password
        raise ConfigError("MOXY_UPSTREAM_PROXY", str(exc)) from None


def _rules(settings: Settings) -> Rules | None:
    if settings.rules_file is None:
        return None
    path = Path(settings.rules_file)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError("MOXY_RULES_FILE", f"cannot read {path}: {exc.strerror}") from exc
    return parse_rules(text, source=str(path), fmt="json" if path.suffix.lower() == ".json" else "toml")


async def open_components(plan: Plan) -> routes.Components:
    """Open the storage tiers and the upstream client, and build the Proxy over them."""
    s, metrics = plan.settings, Metrics()
    link, fleet = None, None
    if s.redis_url is not None:
        from moxy.cache.redis import RedisFleet, RedisLink

        # One client and one breaker for everything Redis does here: the tier, the locks, the purge stream.
        link = RedisLink(s.redis_url.get_secret_value(), cluster=s.redis_cluster, timeout=s.redis_timeout)
        fleet = RedisFleet(link)
    purges = PurgeLog(Path(s.cache_dir) / "purges.log", fleet)
    await purges.refresh()
    memory = MemoryStorage(s.memory_cache_bytes, s.memory_max_entry_bytes) if s.memory_cache_bytes > 0 else None
    disk = (
        DiskStorage(
            Path(s.cache_dir),
            s.disk_cache_bytes,
            # A body the memory tier would keep is read whole, so a disk hit fills the memory tier above it;
            # larger ones are handed over as open files, which the server sends without copying them.
            inline_bytes=s.memory_max_entry_bytes if memory is not None else SEND_SLICE,
            watcher=DiskReport(metrics),
            fsync=s.disk_fsync,
        )
        if s.disk_cache_bytes
        else None
    )
    tiers: list[Storage] = [tier for tier in (memory, disk) if tier is not None]
    if link is not None:
        from moxy.cache.redis import RedisStorage

        tiers.append(RedisStorage(link))
    storage = TieredStorage(tiers, purges)
    spool = disk.spool_dir if disk is not None else Path(s.cache_dir) / "tmp"
    spool.mkdir(parents=True, exist_ok=True)
    upstream = Upstream(
        policy=plan.policy,
        connect_timeout=s.connect_timeout,
        read_timeout=s.read_timeout,
        total_timeout=s.total_timeout,
        max_body_bytes=s.max_body_bytes,
        max_redirects=s.max_redirects,
        user_agent=f"Moxy/{__version__}",
        via=f"1.1 moxy/{__version__}",
        spool_dir=spool,
        ca_file=s.upstream_ca_file,
        proxy=plan.proxy,
        host_concurrency=s.upstream_host_concurrency,
        host_queue_timeout=s.upstream_queue_timeout,
        breaker_failures=s.upstream_breaker_failures,
        breaker_cooldown=s.upstream_breaker_cooldown,
        engine_name=s.upstream_engine,
        on_spool_failure=lambda exc: metrics.disk_failures.labels(operation="spool", error=fault_kind(exc)).inc(),
    )
    proxy = Proxy(
        signer=plan.signer,
        policy=plan.policy,
        storage=storage,
        fetch=measured(upstream.fetch, metrics),
        validators=plan.validators,
        freshness=plan.freshness,
        forward_headers=s.forward_headers,
        negative_ttl=s.negative_ttl,
        lock_timeout=s.lock_timeout,
        purges=purges,
        on_rejection=lambda reason, url: metrics.rejections.labels(reason=reason).inc(),
        fleet=FleetLocks(fleet, ttl=s.redis_lock_ttl) if fleet is not None else None,
    )
    tiered = routes.Tiers(storage, memory, disk)
    return routes.Components(s, plan.signer, proxy, tiered, metrics, purges, upstream)


def _public(app: ASGIApp, c: routes.Components) -> ASGIApp:
    """`app` as the main listener's requests reach it: through the origin lock, then the CORS fields."""
    if c.settings.cors_origins:
        app = Cors(app, c.settings.cors_origins)
    secret = c.settings.origin_secret
    return routes.origin_lock(app, secret.get_secret_value(), c.metrics) if secret else app


class MoxyApp:
    """The ASGI app: `router` runs the lifespan (and answers "starting" until it has run); then `front`, the hit
    memo in front of the routes over the built Components, takes every request, and `admin` those that arrived on
    the admin listener (MOXY_ADMIN_PORT; moxy.server marks them)."""

    def __init__(self, plan: Plan) -> None:
        self.plan = plan
        self.router = Starlette(routes=routes.waiting(), lifespan=self.lifespan)
        self.front: ASGIApp = self.router
        self.admin: ASGIApp = self.router

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self.router(scope, receive, send)
        elif routes.ADMIN_LISTENER in (scope.get("extensions") or ()):
            await self.admin(scope, receive, send)
        else:
            await self.front(scope, receive, send)

    @contextlib.asynccontextmanager
    async def lifespan(self, _: Starlette) -> AsyncIterator[None]:
        c = await open_components(self.plan)
        memory = c.tiers.memory
        memo = HitMemo(memory, c.purges, c.settings.forward_headers) if memory is not None else None
        inner = routes.router(c, on_hit=memo.learn if memo is not None else None)
        front = Hits(inner, memo, c.metrics, c.settings.access_log) if memo is not None else inner
        self.front = _public(front, c)
        self.admin = routes.admin_router(c)  # not behind the origin lock: the admin listener is not the CDN's
        loop = asyncio.get_running_loop()
        watchers = [loop.create_task(c.purges.watch()), loop.create_task(report_tiers(c.metrics, memory, c.tiers.disk))]
        watchers.append(loop.create_task(c.purges.follow()))  # other hosts' purges (returns at once without Redis)
        try:
            yield
        finally:
            for watcher in watchers:
                watcher.cancel()
            c.metrics.close()
            self.front = _public(routes.router(c), c)  # no more memo answers once closing has begun
            await c.proxy.aclose()
            await c.upstream.aclose()
            await c.purges.aclose()
            await c.tiers.storage.aclose()


def create_app(settings: Settings | None = None) -> MoxyApp:
    """The Moxy ASGI app. Configuration errors surface here, before the first request."""
    return MoxyApp(Plan.of(settings or load_settings()))
