"""Settings: the one reader of MOXY_* environment variables.

CLI flags arrive as init kwargs, which pydantic-settings ranks above the environment, so a flag given
on the command line wins without any code. Construction has no side effects: folders, sockets and a
first-start key are made by the composition roots (`app.create_app`, `cli serve`)."""

from __future__ import annotations

import importlib.util
import ipaddress
import os
import ssl
import tempfile
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from pydantic import BeforeValidator, Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from moxy.errors import ConfigError

__all__ = ["DEFAULT_CONTENT_TYPES", "Settings", "load_settings", "user_cache_dir", "user_key_file"]

MIN_KEY_BYTES = 16  # mirrors moxy.signing.MIN_KEY_BYTES; config sits below signing in the layers

DEFAULT_CONTENT_TYPES: tuple[str, ...] = (
    "image/*",
    "video/*",
    "audio/*",
    "font/*",
    "application/font-woff",
    "application/font-woff2",
    "application/x-font-ttf",
    "application/x-font-otf",
    "application/vnd.ms-fontobject",
    "application/json",
    "application/*+json",
    "application/ogg",
)

CommaList = Annotated[tuple[str, ...], NoDecode]


def _local_url(data: dict[str, Any]) -> str:
    host = str(data.get("host") or "127.0.0.1")
    if host in ("0.0.0.0", "::", ""):
        host = "127.0.0.1"
    elif ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{data.get('port') or 8080}"


def _xdg_folder(variable: str, fallback: str) -> Path:
    # XDG Base Directory spec: the variable when it holds an absolute path (a relative one is to be ignored), else
    # the fallback under the home folder. An installed Moxy keeps its state there whatever folder it runs from.
    base = os.environ.get(variable, "")
    if os.path.isabs(base):
        return Path(base) / "moxy"
    home = os.path.expanduser("~")
    if not os.path.isabs(home):  # no HOME and no passwd entry (an arbitrary container uid): still one fixed place
        return Path(tempfile.gettempdir()) / f"moxy-{os.getuid()}" / fallback.strip(".")
    return Path(home) / fallback / "moxy"


def user_cache_dir() -> Path:
    """MOXY_CACHE_DIR when unset: $XDG_CACHE_HOME/moxy, else ~/.cache/moxy (`make run` and the image set their own)."""
    return _xdg_folder("XDG_CACHE_HOME", ".cache")


def user_key_file() -> Path:
    """The key file read when neither MOXY_KEY nor MOXY_KEY_FILE is set, and the one `moxy serve --init-key` creates
    then: $XDG_CONFIG_HOME/moxy/moxy.key, else ~/.config/moxy/moxy.key."""
    return _xdg_folder("XDG_CONFIG_HOME", ".config") / "moxy.key"


def _split_commas(value: Any) -> Any:
    if isinstance(value, str):
        return tuple(part.strip() for part in value.split(",") if part.strip())
    return value


def _lower(value: Any) -> Any:
    return value.strip().lower() if isinstance(value, str) else value


# As for signing keys (moxy/signing.py MIN_KEY_BYTES): a purge token must not be guessable.
MIN_TOKEN_BYTES = 16


class Settings(BaseSettings):
    """Every setting of Moxy. Field `foo_bar` is read from `MOXY_FOO_BAR`."""

    model_config = SettingsConfigDict(env_prefix="MOXY_", extra="forbid", frozen=True, validate_default=True)

    # -- keys and URLs
    key: SecretStr | None = None
    key_file: Path | None = None
    camo_key: SecretStr | None = None
    base_url: str = "http://127.0.0.1:8080"
    # Where `moxy purge` reaches a running Moxy: its own address, never the public MOXY_BASE_URL (in production the
    # CDN, where /purge should be blocked). Unset: this host's MOXY_HOST and MOXY_PORT.
    admin_url: str | None = None
    # With it, Moxy answers only requests that carry it in ORIGIN_SECRET_HEADER (added by the CDN), so the origin
    # cannot be used around the CDN; health and readiness stay open for the orchestrator's probes.
    origin_secret: SecretStr | None = None
    # `*`, or the origins (scheme://host[:port]) whose pages may read Moxy's answers from script (fonts, JSON).
    cors_origins: CommaList = ()

    # -- server
    host: str = "127.0.0.1"
    port: int = Field(default=8080, ge=0, le=65535)
    workers: int = Field(default=1, ge=1, le=256)
    purge_token: SecretStr | None = None
    # A second listener for /metrics and /purge (on MOXY_ADMIN_HOST, loopback by default), so they need not be
    # reachable where the proxy is. Unset: both are served on the main listener.
    admin_port: int | None = Field(default=None, ge=0, le=65535)
    admin_host: str = "127.0.0.1"
    access_log: bool = True
    # Moxy's own records and uvicorn's below this level are not written (moxy.logs); the access line is "info".
    log_level: Annotated[Literal["debug", "info", "warning", "error", "critical"], BeforeValidator(_lower)] = "info"

    # -- what one client may send (moxy.server): past these Moxy answers 414/431/408/503 and closes the connection.
    # A signed URL is about 4/3 of its upstream URL (base64) plus ~50 bytes, so 16 KiB leaves room for any upstream URL
    # up to 12 KiB, past the 8 KiB request line that nginx and Apache accept by default; camo's hex form doubles a URL.
    max_url_bytes: int = Field(default=16 * 1024, ge=1024)
    # nginx's default (4 buffers of 8 KiB) and room for what browsers and a CDN in front add; Moxy reads few headers.
    max_header_bytes: int = Field(default=32 * 1024, ge=1024)
    max_header_fields: int = Field(default=100, ge=8)  # Apache's LimitRequestFields
    head_timeout: float = Field(default=10.0, gt=0)  # from accept, or a head's first byte, to its end
    keepalive_timeout: int = Field(default=5, ge=1)  # idle time between requests on one connection
    max_connections: int = Field(default=1000, ge=0)  # per worker, counting idle ones; 0: no limit

    # -- upstream
    connect_timeout: float = Field(default=5.0, gt=0)
    read_timeout: float = Field(default=10.0, gt=0)
    total_timeout: float = Field(default=30.0, gt=0)
    max_body_bytes: int = Field(default=50 * 1024 * 1024, gt=0)
    max_redirects: int = Field(default=5, ge=0, le=50)
    forward_headers: CommaList = ("Accept",)
    allowed_networks: CommaList = ()
    allow_hosts: CommaList = ()
    deny_hosts: CommaList = ()
    upstream_ca_file: Path | None = None  # PEM of extra CAs, added to the system's trust (never replacing it)
    # Per upstream host, per worker: fetches at once, and how long a fetch waits for a slot (then 504 host-busy).
    upstream_host_concurrency: int = Field(default=64, ge=1, le=10_000)
    upstream_queue_timeout: float = Field(default=5.0, gt=0)
    # Consecutive transport failures that open a host's circuit breaker, and how long it stays open.
    upstream_breaker_failures: int = Field(default=5, ge=1)
    upstream_breaker_cooldown: float = Field(default=10.0, gt=0)
    # The HTTP client under the fetcher (moxy.upstream.ENGINES): aiohttp, or h1 (httptools, half the CPU per miss).
    upstream_engine: Literal["aiohttp", "h1"] = "aiohttp"
    # An HTTP proxy every upstream request goes through (http://[user:pass@]host:port). Its own address is exempt
    # from the destination policy; every target is still checked.
    upstream_proxy: SecretStr | None = None

    # -- cache
    # Absolute whatever the working folder (user_cache_dir), so a Moxy started from anywhere finds its cache again.
    cache_dir: Path = Field(default_factory=user_cache_dir)
    memory_cache_bytes: int = Field(default=256 * 1024 * 1024, ge=0)
    memory_max_entry_bytes: int = Field(default=2 * 1024 * 1024, ge=0)
    disk_cache_bytes: int = Field(default=4 * 1024 * 1024 * 1024, ge=0)
    # Flush every disk entry before relying on it (moxy.cache.disk): entries then survive a power cut. Off, a power
    # cut can cost entries but never serves a bad one (each is checked on read), and a fill costs no disk flush.
    disk_fsync: bool = False
    redis_url: SecretStr | None = None
    # Many hosts, one Redis (docs/deploy.md). Every Redis call waits at most MOXY_REDIS_TIMEOUT: what a slow or dead
    # Redis can add to a request before the breaker stops calling it. A cold miss takes a lock for MOXY_REDIS_LOCK_TTL
    # seconds, so other hosts wait for its fetch (at most that long) instead of making their own. MOXY_REDIS_CLUSTER
    # talks to a Redis Cluster through the URL of any of its nodes (a flag, not a URL scheme: redis:// and rediss://
    # keep meaning what they mean to every other Redis tool, TLS included).
    redis_timeout: float = Field(default=0.25, gt=0, le=60)
    redis_lock_ttl: float = Field(default=10.0, gt=0, le=3600)
    redis_cluster: bool = False
    ttl_min: int = Field(default=60, ge=0)
    ttl_max: int = Field(default=30 * 24 * 3600, ge=0)
    ttl_default: int = Field(default=3600, ge=0)
    stale_while_revalidate: int = Field(default=60, ge=0)
    stale_if_error: int = Field(default=7 * 24 * 3600, ge=0)
    negative_ttl: int = Field(default=10, ge=0)
    lock_timeout: float = Field(default=30.0, gt=0)

    # -- validation
    content_types: CommaList = DEFAULT_CONTENT_TYPES
    rules_file: Path | None = None
    validators: CommaList = ()

    _split = field_validator(
        "forward_headers",
        "allowed_networks",
        "allow_hosts",
        "cors_origins",
        "deny_hosts",
        "content_types",
        "validators",
        mode="before",
    )(_split_commas)

    @model_validator(mode="before")
    @classmethod
    def _default_base_url(cls, data: Any) -> Any:
        # Unset, the public base URL is where this server listens, so `--port 9000` alone gives working links.
        if isinstance(data, dict) and not data.get("base_url"):
            return {**data, "base_url": _local_url(data)}
        return data

    def local_url(self) -> str:
        """This server's own address as a client on this host reaches it (a wildcard listener via loopback)."""
        return _local_url({"host": self.host, "port": self.port})

    def local_admin_url(self) -> str:
        """Where a client on this host reaches /metrics and /purge: the admin listener with MOXY_ADMIN_PORT, else
        the main one."""
        if self.admin_port is None:
            return self.local_url()
        return _local_url({"host": self.admin_host, "port": self.admin_port})

    @field_validator("workers", mode="before")
    @classmethod
    def _resolve_auto_workers(cls, value: Any) -> Any:
        # "auto": one worker per core this process may run on (a container's CPU set, not the host's count).
        if isinstance(value, str) and value.strip().lower() == "auto":
            return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1))
        return value

    @field_validator("base_url", "admin_url")
    @classmethod
    def _check_base_url(cls, value: str | None) -> str | None:
        if value is None:
            return None
        if not value.startswith(("http://", "https://")):
            raise ValueError("must start with http:// or https://")
        return value.rstrip("/")

    @field_validator("purge_token", "origin_secret")
    @classmethod
    def _check_purge_token(cls, value: SecretStr | None) -> SecretStr | None:
        # Set but empty is an unfilled template, not a choice: it must not open purge to an empty credential.
        if value is not None and not value.get_secret_value().strip():
            raise ValueError("is empty; unset it to turn this off, or give a secret")
        # Whoever has the purge token can empty the cache, and the origin secret opens the origin around the CDN:
        # each must be as hard to guess as a signing key (`moxy keygen`).
        if value is not None and len(value.get_secret_value().strip().encode("utf-8")) < MIN_TOKEN_BYTES:
            raise ValueError(f"is shorter than {MIN_TOKEN_BYTES} bytes; `moxy keygen` makes a good one")
        return value

    @field_validator("allowed_networks")
    @classmethod
    def _check_networks(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for cidr in value:
            try:
                ipaddress.ip_network(cidr, strict=False)
            except ValueError as exc:
                raise ValueError(f"{cidr!r} is not a network in CIDR form") from exc
        return value

    @field_validator("cors_origins")
    @classmethod
    def _check_cors_origins(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        if "*" in value and len(value) > 1:
            raise ValueError("is `*` or a list of origins, not both")
        for origin in value:
            if origin == "*":
                continue
            parts = urlsplit(origin)
            # An origin as browsers send it in `Origin`: scheme, host and port only (RFC 6454 §6.2).
            if parts.scheme not in ("http", "https") or not parts.hostname or parts.path or parts.query:
                raise ValueError(f"{origin!r} is not an origin (scheme://host[:port], no path)")
        return tuple(origin.lower() if origin != "*" else origin for origin in value)

    @field_validator("forward_headers")
    @classmethod
    def _check_forward_headers(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        never = {"cookie", "authorization", "proxy-authorization", "host", "connection"}
        for name in value:
            if name.lower() in never:
                raise ValueError(f"{name} may never be forwarded upstream")
        return value

    @model_validator(mode="after")
    def _check_ttls(self) -> Settings:
        if self.ttl_min > self.ttl_max:
            raise ValueError("MOXY_TTL_MIN is larger than MOXY_TTL_MAX")
        return self

    # -- pre-flight ---------------------------------------------------------------

    def check(self) -> None:
        """The checks that touch the world, run before serving; each failure is a ConfigError naming its setting."""
        self._check_upstream_ca_file()
        self._check_tiers()
        self._check_redis_url()
        self._check_cache_dir()

    def _check_tiers(self) -> None:
        if self.memory_cache_bytes == 0 and self.disk_cache_bytes == 0 and self.redis_url is None:
            raise ConfigError(
                "MOXY_MEMORY_CACHE_BYTES",
                "0, and MOXY_DISK_CACHE_BYTES is 0 with no MOXY_REDIS_URL: Moxy needs at least one cache tier",
            )

    def _check_redis_url(self) -> None:
        if self.redis_url is None:
            return
        url = self.redis_url.get_secret_value()
        try:
            parts = urlsplit(url)
            parts.port  # noqa: B018 - a port that is no number raises here, as the client would on first use
        except ValueError as exc:
            raise ConfigError("MOXY_REDIS_URL", f"not a URL: {exc}") from None
        if parts.scheme not in ("redis", "rediss", "unix") or (parts.scheme != "unix" and not parts.hostname):
            raise ConfigError("MOXY_REDIS_URL", "must be redis://host[:port][/db], rediss://... or unix:///path")
        if self.redis_cluster and parts.scheme == "unix":
            raise ConfigError("MOXY_REDIS_CLUSTER", "a cluster is reached over TCP: redis:// or rediss://, not unix://")
        if importlib.util.find_spec("redis") is None:
            raise ConfigError("MOXY_REDIS_URL", "needs the redis client: pip install 'moxy-proxy[redis]'")

    def _check_cache_dir(self) -> None:
        # The spool, the purge log and (with a disk tier) the entries live there: a folder Moxy cannot write to
        # would fail every large answer, so it stops the start instead.
        folder = Path(self.cache_dir)
        try:
            folder.mkdir(parents=True, exist_ok=True)
            with tempfile.NamedTemporaryFile(dir=folder, prefix=".check-"):
                pass
        except OSError as exc:
            raise ConfigError("MOXY_CACHE_DIR", f"cannot write to {folder}: {exc.strerror or exc}") from None

    def _check_upstream_ca_file(self) -> None:
        if self.upstream_ca_file is None:
            return
        path, setting = self.upstream_ca_file, "MOXY_UPSTREAM_CA_FILE"
        try:
            # The same call the upstream fetcher makes, on a throwaway context: what passes here loads there.
            ssl.create_default_context().load_verify_locations(cafile=path)
        except ssl.SSLError as exc:  # before OSError, its base class
            raise ConfigError(setting, f"{path} holds no PEM certificate that parses ({exc.reason})") from exc
        except OSError as exc:
            raise ConfigError(setting, f"cannot read {path}: {exc.strerror or exc}") from exc

    # -- derived values ---------------------------------------------------------

    def key_path(self) -> Path:
        """The file the key ring is read from when MOXY_KEY is unset: MOXY_KEY_FILE, else the user's (user_key_file)."""
        return self.key_file if self.key_file is not None else user_key_file()

    def signing_keys(self) -> list[str]:
        """The key ring: MOXY_KEY, else the comma-separated keys in MOXY_KEY_FILE, else in the user's key file if it
        exists (made by `moxy serve --init-key`). The first signs."""
        if self.key is not None:
            raw, setting = self.key.get_secret_value(), "MOXY_KEY"
        elif self.key_file is not None or self.key_path().exists():
            setting, path = "MOXY_KEY_FILE", self.key_path()
            try:
                raw = path.read_text(encoding="utf-8")
            except OSError as exc:
                raise ConfigError(setting, f"cannot read {path}: {exc.strerror}") from exc
        else:
            raise ConfigError(
                "MOXY_KEY",
                f"no key configured (set MOXY_KEY or MOXY_KEY_FILE; `moxy keygen` makes one, "
                f"`moxy serve --init-key` keeps one in {self.key_path()})",
            )
        keys = [part.strip() for part in raw.replace("\n", ",").split(",") if part.strip()]
        if not keys:
            raise ConfigError(setting, "holds no key")
        for position, key in enumerate(keys, start=1):
            if len(key.encode("utf-8")) < MIN_KEY_BYTES:
                raise ConfigError(setting, f"key {position} is shorter than {MIN_KEY_BYTES} bytes")
        return keys

    def camo_keys(self) -> list[str]:
        if self.camo_key is None:
            return []
        return [part.strip() for part in self.camo_key.get_secret_value().split(",") if part.strip()]

    def masked(self) -> dict[str, Any]:
        """The effective configuration with every secret replaced by a mask, for `moxy config`."""
        shown: dict[str, Any] = {}
        for name, value in self.model_dump().items():
            if isinstance(value, SecretStr):
                value = "********" if value.get_secret_value() else ""
            elif isinstance(value, Path):
                value = str(value)
            elif isinstance(value, tuple):
                value = ",".join(value)
            shown[f"MOXY_{name.upper()}"] = value
        return shown


def load_settings(**overrides: Any) -> Settings:
    """Settings from the environment, with `overrides` (CLI flags actually given) winning.

    Raises ConfigError naming the first bad setting the way the user wrote it."""
    given = {name: value for name, value in overrides.items() if value is not None}
    try:
        return Settings(**given)
    except ValidationError as exc:
        error = exc.errors()[0]
        location = error["loc"][0] if error["loc"] else ""
        setting = f"MOXY_{str(location).upper()}" if location else "MOXY"
        message = str(error["msg"]).removeprefix("Value error, ")
        if not location and "MOXY_" in message:
            setting, _, message = message.partition(" ")
        raise ConfigError(setting, message) from None
