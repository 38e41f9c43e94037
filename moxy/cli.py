"""The `moxy` command: a thin layer over config, signing and the app.

Exit codes: 0 success, 1 the input was refused (bad URL, failed verification), 2 bad configuration."""

from __future__ import annotations

import asyncio
import base64
import bisect
import contextlib
import itertools
import os
import secrets
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn, TextIO
from urllib.parse import urlsplit

import click

from moxy import __version__
from moxy.config import Settings, load_settings
from moxy.errors import ConfigError, MoxyError, VerificationError
from moxy.signing import MAX_EXPIRES_AT, Signer, expiry_bucket

if TYPE_CHECKING:
    import urllib.request

    import httpx

__all__ = ["main"]


def _fail(message: str, code: int) -> NoReturn:
    click.echo(f"moxy: {message}", err=True)
    sys.exit(code)


def _settings(**flags: Any) -> Settings:
    try:
        return load_settings(**flags)
    except ConfigError as exc:
        _fail(str(exc), 2)


def _signer(settings: Settings) -> Signer:
    try:
        return Signer(settings.signing_keys(), settings.base_url, camo_keys=settings.camo_keys())
    except ConfigError as exc:
        _fail(str(exc), 2)


def new_key() -> str:
    """A fresh 32-byte key, base64url without padding (43 characters)."""
    return base64.urlsafe_b64encode(secrets.token_bytes(32)).rstrip(b"=").decode("ascii")


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, "-V", "--version", prog_name="moxy")
def main() -> None:
    """Moxy: an HMAC-signed caching URL proxy."""


@main.command()
@click.argument("url")
@click.option(
    "--expires",
    type=click.IntRange(min=1),
    help="Seconds the signed URL stays valid at least (rounded up to a shared bucket; see --exact).",
)
@click.option("--exact", is_flag=True, help="Expire exactly --expires seconds from now, not at the bucket's end.")
@click.option("--base-url", help="Public base URL of Moxy [MOXY_BASE_URL].")
def sign(url: str, expires: int | None, exact: bool, base_url: str | None) -> None:
    """Print the signed Moxy URL for URL; with URL `-`, sign each line of standard input (blank lines skipped),
    one signed URL per line, in order."""
    signer = _signer(_settings(base_url=base_url))
    if expires is not None and time.time() + expires + expiry_bucket(expires) > MAX_EXPIRES_AT:
        # Said in the option's own name, not the signer's parameter's.
        _fail(f"--expires {expires}: past the latest expiry a Moxy URL can carry (unix time {MAX_EXPIRES_AT})", 1)
    if url != "-":
        lines: Iterable[tuple[int, str]] = [(0, url)]
    else:
        lines = ((number, line.strip()) for number, line in enumerate(sys.stdin, start=1) if line.strip())
    for number, each in lines:
        try:
            click.echo(signer.sign(each, expires_in=expires, exact=exact))
        except ValueError as exc:  # UnsignableURL, or an expiry past what a Moxy URL can carry
            where = f" (line {number} of standard input)" if number else ""
            _fail(f"cannot sign {each!r}{where}: {exc}", 1)


@main.command()
@click.argument("moxy_url")
def verify(moxy_url: str) -> None:
    """Print the upstream URL a Moxy URL stands for, or exit 1 with the reason."""
    settings = _settings()
    if settings.key is None and settings.key_file is None and not settings.key_path().exists() and settings.camo_keys():
        # Only legacy camo keys here (a site still checking its camo links): native URLs cannot verify, as no
        # native key exists, so an unguessable placeholder stands in for the ring.
        signer = Signer([new_key()], settings.base_url, camo_keys=settings.camo_keys())
    else:
        signer = _signer(settings)
    try:
        click.echo(signer.verify(moxy_url))
    except VerificationError as exc:
        _fail(f"refused: {exc.reason}", 1)


@main.command()
def keygen() -> None:
    """Print a new random key (32 bytes, base64url)."""
    click.echo(new_key())


@main.command("config")
@click.option("--check", is_flag=True, help="Run the checks `moxy serve` runs before it starts, and say if they pass.")
def show_config(check: bool) -> None:
    """Print the effective configuration, secrets masked; with --check, exit 2 naming what would stop `serve`."""
    if check:
        from moxy import supervisor

        try:
            settings = _preflight({})
            # The listeners too, bound and released by the same functions `serve` binds them with: a port already
            # in use would stop `serve` with exit 2 after this said "ok".
            supervisor.listen(settings.host, settings.port, None).close()
            if settings.admin_port is not None:
                supervisor.listen_admin(settings.admin_host, settings.admin_port).close()
        except ConfigError as exc:
            _fail(str(exc), 2)
        click.echo("configuration ok")
        return
    for name, value in _settings().masked().items():
        click.echo(f"{name}={'' if value is None else value}")


def ensure_key_file(path: Path) -> bool:
    """Create `path` holding a fresh key (mode 0600, in a folder only its owner may enter when it makes one) unless
    it exists. True when a key was made; ConfigError naming MOXY_KEY_FILE when it cannot be written."""
    try:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        try:
            descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            return False
    except OSError as exc:  # a file where a folder should be, no permission: one line, not a traceback
        raise ConfigError("MOXY_KEY_FILE", f"cannot create {path}: {exc.strerror or exc}") from None
    with os.fdopen(descriptor, "w", encoding="utf-8") as handle:
        handle.write(new_key() + "\n")
    return True


def _print_welcome(settings: Settings, signer: Signer, fd: int | None = None) -> None:
    where = f"the inherited socket {fd}" if fd is not None else f"http://{settings.host}:{settings.port}"
    # A key file named by MOXY_KEY_FILE must be named again to sign; the user's own key file is found from anywhere.
    key_source = f"MOXY_KEY_FILE={settings.key_file} " if settings.key is None and settings.key_file else ""
    example = signer.sign("https://www.python.org/static/img/python-logo.png")
    click.echo(
        f"moxy {__version__}: serving on {where} "
        f"({settings.workers} worker{'s' if settings.workers > 1 else ''}, cache in {settings.cache_dir})\n"
        f"  sign a URL:  {key_source}{sys.argv[0]} sign https://example.com/picture.png\n"
        f"  example:     {example}",
        err=True,
    )


@main.command()
@click.option("--host", help="Interface to listen on [MOXY_HOST].")
@click.option("--port", type=int, help="Port to listen on [MOXY_PORT].")
@click.option("--workers", help="Worker processes, or 'auto' for one per core [MOXY_WORKERS].")
@click.option(
    "--fd", type=click.IntRange(min=0), help="Serve on this inherited listening socket instead of --host/--port."
)
@click.option(
    "--init-key",
    is_flag=True,
    help="Without MOXY_KEY: create the key file (MOXY_KEY_FILE, else ~/.config/moxy/moxy.key) if it does not exist.",
)
# The app factory uvicorn loads in each worker; the integration tests wrap the real one to widen a crash window.
@click.option("--app", "app_factory", default="moxy.app:create_app", hidden=True)
def serve(
    host: str | None, port: int | None, workers: str | None, fd: int | None, init_key: bool, app_factory: str
) -> None:
    """Run the proxy. SIGHUP replaces the workers one at a time with the installed code and settings (a bad
    configuration is refused and the running workers keep serving); SIGTERM finishes what is in flight, then exits 0."""
    from moxy import supervisor

    flags = {"host": host, "port": port, "workers": workers}
    settings = _settings(**flags)
    try:
        if init_key and settings.key is None and ensure_key_file(settings.key_path()):
            # Kept (mode 0600) where the next start finds it again, so the URLs signed with it survive restarts.
            click.echo(f"moxy: generated a new key in {settings.key_path()}", err=True)
    except ConfigError as exc:
        _fail(str(exc), 2)
    signer = _signer(settings)  # a missing or short key stops start-up here, with one line
    try:
        # Everything a worker would trip over, before the banner: the files it must read, the rules and custom
        # validators it loads, the cache folder and tiers, then the address it listens on.
        _preflight(flags)
        listening = supervisor.listen(settings.host, settings.port, fd)
        admin = None
        if settings.admin_port is not None:  # 0 is a port too: any free one, named in the banner
            admin = supervisor.listen_admin(settings.admin_host, settings.admin_port)
    except ConfigError as exc:
        _fail(str(exc), 2)
    _print_welcome(settings, signer, fd)
    if admin is not None:
        host, admin_port = admin.getsockname()[:2]
        click.echo(
            f"  admin:       http://{f'[{host}]' if ':' in host else host}:{admin_port} (/metrics, /purge)", err=True
        )
    # Worker processes rebuild Settings from the environment, so given flags travel there.
    for name, value in flags.items():
        if value is not None:
            os.environ[f"MOXY_{name.upper()}"] = str(value)
    if settings.workers > 1 and not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(_fresh_metrics_dir(settings.cache_dir))
    try:
        code = supervisor.supervise(
            listening=listening,
            workers=settings.workers,
            # Each worker is a fresh interpreter, so a reload runs the code installed at the time of the SIGHUP.
            command=[sys.executable, "-m", "moxy", "worker", "--app", app_factory],
            preflight=lambda: _preflight(flags),
            admin=admin,
        )
    except ConfigError as exc:  # the address cannot be listened on
        _fail(str(exc), 2)
    sys.exit(code)


def _preflight(flags: dict[str, Any]) -> Settings:
    """What `serve` checks before its workers start, again before a reload replaces them: the settings (re-read
    from the environment and the files they name), the key ring, and `Settings.check()`. Raises ConfigError."""
    from moxy.app import Plan

    settings = load_settings(**flags)
    settings.check()
    Plan.of(settings, quiet=True)  # the key ring, rules file and custom validators, as each worker builds them
    return settings


@main.command(hidden=True)
@click.option("--listen-fd", type=int, required=True)
@click.option("--control-fd", type=int, required=True)
@click.option("--supervisor", "supervisor_pid", type=int, required=True)
@click.option("--app", "app_factory", default="moxy.app:create_app")
@click.option("--admin-fd", type=int)
def worker(listen_fd: int, control_fd: int, supervisor_pid: int, app_factory: str, admin_fd: int | None) -> None:
    """One worker process of `moxy serve`, started by its supervisor (moxy.supervisor), never by hand."""
    import uvicorn

    from moxy import supervisor

    supervisor.bind_to_supervisor(supervisor_pid)  # first: a supervisor killed from here on takes this worker along
    options = server_options(_settings(), app_factory)
    try:
        supervisor.run_worker(uvicorn.Config(**options), listen_fd, control_fd, admin_fd)
    except ConfigError as exc:  # raised by the app factory (a rules file that does not parse): one line, not a trace
        _fail(str(exc), 2)


def server_options(settings: Settings, app_factory: str) -> dict[str, Any]:
    """The uvicorn configuration of one worker, serving on the socket its supervisor hands it."""
    from moxy.server import BoundedHttpToolsProtocol
    from moxy.supervisor import GRACE_SECONDS

    return dict(
        app=app_factory,
        factory=True,
        # The bounds on what a client may send (moxy.server); its workers read them from MOXY_* like the app.
        http=BoundedHttpToolsProtocol,
        # Moxy speaks no WebSocket: an upgrade request is answered as the plain HTTP request it also is, by Moxy's
        # own routes (JSON errors, security headers, logged), not by a protocol library's bare 403.
        ws="none",
        lifespan="on",
        timeout_keep_alive=settings.keepalive_timeout,
        access_log=False,
        server_header=False,
        proxy_headers=False,
        timeout_graceful_shutdown=GRACE_SECONDS,
        log_config=_log_config(settings),  # JSON lines at MOXY_LOG_LEVEL, applied in every worker (moxy.logs)
    )


def _fresh_metrics_dir(cache_dir: Path) -> Path:
    """The folder where the workers' metrics meet; emptied first, as counters restart with the server."""
    folder = cache_dir / "metrics"
    folder.mkdir(parents=True, exist_ok=True)
    for stale in folder.glob("*.db"):
        stale.unlink(missing_ok=True)
    return folder


@main.command()
@click.argument("url")
@click.option(
    "--endpoint",
    help="Base URL of the running Moxy [MOXY_ADMIN_URL; default: this host's MOXY_ADMIN_PORT, else MOXY_PORT].",
)
def purge(url: str, endpoint: str | None) -> None:
    """Ask a running Moxy to drop URL (a Moxy URL or an upstream URL) from every tier."""
    import urllib.error
    import urllib.request

    import orjson

    settings = _settings()
    if settings.purge_token is None:
        _fail("MOXY_PURGE_TOKEN: not set; purge needs the token the server was started with", 2)
    # Never MOXY_BASE_URL: in production that is the CDN, where /purge should be blocked.
    target = (endpoint or settings.admin_url or settings.local_admin_url()).rstrip("/") + "/purge"
    request = urllib.request.Request(
        target,
        data=orjson.dumps({"url": url}),
        method="POST",
        headers={
            "Authorization": f"Bearer {settings.purge_token.get_secret_value()}",
            "Content-Type": "application/json",
        },
    )
    try:
        with _direct_opener().open(request, timeout=30) as response:
            body = orjson.loads(response.read() or b"{}")
    except urllib.error.HTTPError as exc:
        detail = exc.read().decode("utf-8", "replace").strip()
        _fail(f"purge refused ({exc.code}): {detail}", 1)
    except (urllib.error.URLError, OSError) as exc:
        _fail(f"cannot reach {target}: {exc}", 1)
    click.echo(f"purged {body.get('removed', 0)} entr{'y' if body.get('removed') == 1 else 'ies'}")


def _direct_opener() -> urllib.request.OpenerDirector:
    """urllib without any proxy from the environment (HTTP_PROXY, ALL_PROXY, ...): the CLI talks to the operator's
    own Moxy and sends it the purge token, which a proxy named in the environment would otherwise receive."""
    import urllib.request

    return urllib.request.build_opener(urllib.request.ProxyHandler({}))


def run() -> None:  # pragma: no cover - `python -m moxy`
    try:
        main()
    except MoxyError as exc:
        _fail(str(exc), 1)


def _log_config(settings: Settings) -> dict[str, Any]:
    from moxy.logs import log_config

    return log_config(settings.log_level)


@main.command()
@click.option("--port", type=int, help="Port the running Moxy listens on [MOXY_PORT].")
@click.option("--timeout", type=click.FloatRange(min=0.1), default=3.0, show_default=True, help="Seconds to wait.")
def health(port: int | None, timeout: float) -> None:
    """Exit 0 when the Moxy on this machine answers /healthz, else 1 (for a container's health check)."""
    import urllib.error

    settings = _settings(port=port)
    host = settings.host
    # Listening on every interface means loopback answers too; an IPv6 literal needs brackets in a URL.
    host = {"0.0.0.0": "127.0.0.1", "": "127.0.0.1", "::": "::1"}.get(host, host)
    target = f"http://{f'[{host}]' if ':' in host else host}:{settings.port}/healthz"
    try:
        with _direct_opener().open(target, timeout=timeout) as response:
            status = response.status
    except urllib.error.HTTPError as exc:
        status = exc.code
    except (urllib.error.URLError, OSError) as exc:
        _fail(f"unhealthy: cannot reach {target}: {getattr(exc, 'reason', exc)}", 1)
    if status != 200:
        _fail(f"unhealthy: {target} answered {status}", 1)
    click.echo("healthy")


# -- warm -------------------------------------------------------------------------------------------

# Moxy's X-Moxy-Cache values (moxy.proxy.CacheResult, not imported: that would load the server's upstream engine into
# the command; tests/unit/test_warm.py keeps the two equal), in the order the summary lists them.
_CACHE_RESULTS = ("HIT", "MISS", "STALE", "REVALIDATED", "BYPASS")
# "OK" is a 2xx without X-Moxy-Cache (a CDN that drops it), "other" a value Moxy never sends, each counted in one
# row whatever the answer said; errors follow, sorted.
_WARM_ORDER = (*_CACHE_RESULTS, "OK", "other")
_WARM_FAILURES_SHOWN = 20  # a whole broken list would bury the summary; the count says how many more
_WARM_AHEAD = 4  # lines read and signed ahead of the fetches, per worker: every worker finds one ready, no more
_REASON_BYTES = 4096  # read of an error's body: Moxy's JSON error is far smaller, and the rest is left unread
_SHOWN_CHARS = 300  # of a URL or reason echoed to the terminal


@dataclass(frozen=True, slots=True)
class _Job:
    line: int  # in the input, so failures are reported in its order whatever order they finished in
    url: str  # as the input gave it
    fetch: str  # the URL to fetch; "" when the line cannot be used, and `detail` says why
    detail: str = ""


@dataclass(frozen=True, slots=True)
class _Stop:
    """The list cannot go on (an upstream URL and no key to sign it, input that is not UTF-8): warm reads no
    further, finishes the lines before, and exits with `code`."""

    message: str
    code: int


@dataclass(frozen=True, slots=True)
class _Warmed:
    line: int
    url: str
    outcome: str  # a _CACHE_RESULTS value, "OK", "other", or "error <status or cause>"
    detail: str = ""

    @property
    def failed(self) -> bool:
        return self.outcome.startswith("error")


@dataclass(slots=True)
class _Tally:
    """What the summary needs, in memory that does not grow with the list: a count per outcome and the first
    failures by line."""

    counts: Counter[str] = field(default_factory=Counter)
    failures: list[_Warmed] = field(default_factory=list)  # at most _WARM_FAILURES_SHOWN, by line
    failed: int = 0

    def add(self, result: _Warmed) -> None:
        self.counts[result.outcome] += 1
        if result.failed:
            self.failed += 1
            # Fetches finish out of order: keep the lowest lines seen so far.
            bisect.insort(self.failures, result, key=lambda each: each.line)
            del self.failures[_WARM_FAILURES_SHOWN:]


class _Targets:
    """The URL to fetch for each line: a Moxy URL as it is (re-based on --endpoint), any other URL signed with the
    configured key first."""

    def __init__(self, settings: Settings, endpoint: str | None, expires: int | None, exact: bool) -> None:
        self.target = (endpoint or settings.base_url).rstrip("/")
        self.bases = {settings.base_url.rstrip("/"), self.target}
        self.expires = expires
        self.exact = exact
        self.signer: Signer | None = None
        self.missing_key: ConfigError | None = None
        try:
            self.signer = Signer(settings.signing_keys(), settings.base_url, camo_keys=settings.camo_keys())
        except ConfigError as exc:  # needed only if some line is an upstream URL
            self.missing_key = exc

    def resolve(self, line: int, url: str) -> _Job | _Stop:
        base = next((base for base in self.bases if url.startswith(base + "/")), None)
        if base is not None:  # a Moxy URL under this Moxy's public or given address: no key needed
            return _Job(line, url, self.target + url[len(base) :])
        if self.signer is None:
            return _Stop(f"{self.missing_key} (line {line} is an upstream URL, which warm signs first)", 2)
        if _verifies(self.signer, url):  # a Moxy URL published under another address
            parts = urlsplit(url)
            return _Job(line, url, self.target + parts.path + (f"?{parts.query}" if parts.query else ""))
        try:
            signed = self.signer.sign(url, expires_in=self.expires, exact=self.exact)
        except ValueError as exc:  # UnsignableURL, or an expiry past what a Moxy URL can carry
            return _Job(line, url, "", f"cannot sign: {exc}")
        return _Job(line, url, self.target + signed[len(self.signer.base_url) :])


def _verifies(signer: Signer, url: str) -> bool:
    try:
        signer.verify(url)
    except VerificationError:
        return False
    return True


def _warm_jobs(source: TextIO, targets: _Targets) -> Iterator[_Job | _Stop]:
    """The list's URLs (blank lines and # comments skipped), one at a time as they are read, ending at a _Stop."""
    number = 0
    try:
        for number, text in enumerate(source, start=1):
            url = text.strip()
            if url and not url.startswith("#"):
                job = targets.resolve(number, url)
                yield job
                if isinstance(job, _Stop):
                    return
    except UnicodeDecodeError as exc:  # found a block at a time, so somewhere after the last line read
        where = f" after line {number}" if number else ""
        yield _Stop(f"cannot read the list{where}: not UTF-8 ({exc.reason})", 1)


def _count_urls(source: TextIO) -> int | None:
    """The URLs in a list that is a regular file, counted in a first pass (for the progress bar); None for a pipe,
    which can be read only once."""
    try:
        if not source.seekable():
            return None
        try:
            return sum(1 for text in source if text.strip() and not text.strip().startswith("#"))
        finally:
            source.seek(0)
    except (OSError, ValueError):  # UnicodeDecodeError is a ValueError: the pass that fetches names the line
        return None


def _printable(text: str, limit: int = _SHOWN_CHARS) -> str:
    """`text` safe to echo to a terminal: unprintable characters (ESC, BEL, CR, LF, bidi controls, ...) escaped as
    Python writes them, since an endpoint's reason may carry escape sequences; at most `limit` characters."""
    shown = "".join(char if char.isprintable() else repr(char)[1:-1] for char in text[:limit])
    return shown[:limit] + "..." if len(shown) > limit or len(text) > limit else shown


async def _read_reason(response: httpx.Response) -> str:
    """The `reason` of Moxy's JSON error, from the first bytes of the body only: an endless error body is no reason
    to wait for its end."""
    import orjson

    kept = b""
    async for chunk in response.aiter_raw():
        kept += chunk[: _REASON_BYTES - len(kept)]
        if len(kept) >= _REASON_BYTES:
            break
    try:
        return str(orjson.loads(kept).get("reason", ""))
    except (orjson.JSONDecodeError, AttributeError):  # not Moxy's JSON: a CDN's own error page
        return ""


async def _warm_one(client: httpx.AsyncClient, job: _Job, timeout: float, max_body: int) -> _Warmed:
    import httpx

    if not job.fetch:
        return _Warmed(job.line, job.url, "error unusable", job.detail)
    status = 0
    try:
        # The whole URL within the timeout, head and body, however the endpoint trickles them (httpx's own timeout
        # is per read).
        async with asyncio.timeout(timeout), client.stream("GET", job.fetch) as response:
            status = response.status_code
            if not 200 <= status < 300:
                return _Warmed(job.line, job.url, f"error {response.status_code}", await _read_reason(response))
            declared = response.headers.get("content-length", "")
            if declared.isdigit() and int(declared) > max_body:
                return _Warmed(job.line, job.url, "error too large", f"{declared} bytes, past {max_body}")
            # Read to the end, as a CDN does before it keeps a copy, but keep none of it; past the bound Moxy
            # itself holds to (MOXY_MAX_BODY_BYTES), the answer is not one it serves.
            received = 0
            async for chunk in response.aiter_raw():
                received += len(chunk)
                if received > max_body:
                    return _Warmed(job.line, job.url, "error too large", f"more than {max_body} bytes")
    except (TimeoutError, httpx.TimeoutException):
        if status and not 200 <= status < 300:  # the error is known; only its reason was too slow to come
            return _Warmed(job.line, job.url, f"error {status}")
        return _Warmed(job.line, job.url, "error timeout", f"not done within {timeout:g} s")
    except httpx.HTTPError as exc:
        return _Warmed(job.line, job.url, "error connection", str(exc) or type(exc).__name__)
    cache = response.headers.get("x-moxy-cache")
    if cache is None:
        return _Warmed(job.line, job.url, "OK")
    # One row per value Moxy sends; anything else (a CDN's, a hostile endpoint's) is one "other" row, not a new one.
    return _Warmed(job.line, job.url, cache.upper() if cache.upper() in _CACHE_RESULTS else "other")


async def _warm_all(
    jobs: Iterator[_Job | _Stop],
    *,
    concurrency: int,
    timeout: float,
    max_body: int,
    headers: dict[str, str],
    record: Callable[[_Warmed], None],
) -> _Stop | None:
    """Fetch each job with `concurrency` workers, while a thread reads and signs the list at most a few lines
    ahead of them: memory stays flat whatever the list's length, and a slow pipe (a crawler still writing) never
    blocks the event loop, where a wait would eat into the fetches' deadlines. The _Stop that ended the list, if
    any."""
    import httpx

    loop = asyncio.get_running_loop()
    ready: asyncio.Queue[_Job | _Stop | None] = asyncio.Queue()  # unbounded here; `room` is the bound
    room = threading.Semaphore(concurrency * _WARM_AHEAD)
    closing = threading.Event()
    broken: list[BaseException] = []

    def hand(item: _Job | _Stop | None) -> None:
        if not closing.is_set():
            with contextlib.suppress(RuntimeError):  # the loop closed under a reader still blocked in a read
                loop.call_soon_threadsafe(ready.put_nowait, item)

    def read() -> None:
        try:
            for job in jobs:
                while not room.acquire(timeout=0.2):
                    if closing.is_set():
                        return
                hand(job)
        except Exception as exc:  # a fault of warm's own, raised again below rather than lost with the thread
            broken.append(exc)
        finally:
            for _ in range(concurrency):
                hand(None)

    stopped: list[_Stop] = []
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(
        timeout=timeout,
        limits=limits,
        headers=headers,
        follow_redirects=False,
        # No proxy, .netrc or other client setting from the environment: the requests carry the origin secret, and
        # go to the operator's own Moxy or CDN. The CA bundle named by SSL_CERT_FILE / SSL_CERT_DIR is still used.
        trust_env=False,
        verify=httpx.create_ssl_context(trust_env=True),
    ) as client:

        async def work() -> None:
            while (item := await ready.get()) is not None:
                room.release()
                if isinstance(item, _Stop):  # the jobs before it are taken already: the others finish those
                    stopped.append(item)
                    return
                record(await _warm_one(client, item, timeout, max_body))

        reader = threading.Thread(target=read, name="moxy-warm-reader", daemon=True)
        reader.start()
        try:
            await asyncio.gather(*(work() for _ in range(concurrency)))
        finally:
            closing.set()
    if broken:
        raise broken[0]
    return stopped[0] if stopped else None


def _header(value: str) -> tuple[str, str]:
    name, colon, text = value.partition(":")
    if not colon or not name.strip():
        raise click.BadParameter(f"{value!r} is not 'Name: value'", param_hint="--header")
    return name.strip(), text.strip()


@main.command()
@click.argument("source", type=click.File("r", encoding="utf-8"))
@click.option("--concurrency", type=click.IntRange(1, 256), default=8, show_default=True, help="Fetches at once.")
@click.option(
    "--endpoint", help="Fetch from this Moxy instead of the public address [default: MOXY_BASE_URL, the CDN]."
)
@click.option("--expires", type=click.IntRange(min=1), help="Sign upstream URLs to expire, as `moxy sign` does.")
@click.option("--exact", is_flag=True, help="With --expires: to the second, not at the bucket's end.")
@click.option("-H", "--header", "headers", multiple=True, help="Extra request header 'Name: value' (e.g. Accept).")
@click.option(
    "--timeout",
    type=click.FloatRange(min=0.1),
    default=60.0,
    show_default=True,
    help="Seconds for each URL, from its request to the end of its body.",
)
def warm(
    source: TextIO,
    concurrency: int,
    endpoint: str | None,
    expires: int | None,
    exact: bool,
    headers: tuple[str, ...],
    timeout: float,
) -> None:
    """Fetch every URL of SOURCE (a file, or - for standard input; one per line, blank lines and # comments
    skipped) through a running Moxy, so later readers find it cached. Moxy URLs are fetched as they are; any other
    URL is signed with the configured key first. The list is read as it is fetched, so it may be of any length, or
    still being written. Prints a summary by outcome (HIT, MISS, STALE, ... and errors by status); exits 1 if any
    URL failed (a line that cannot be signed counts as failed), 2 at an upstream URL with no key configured.

    By default the URLs go to MOXY_BASE_URL, the address pages use: in production the CDN, so the edge that
    answers and Moxy behind it both keep a copy. --endpoint sends them to one Moxy directly (its path and query
    kept), with MOXY_ORIGIN_SECRET if set, to fill that host's tiers only. Each body is read to its end, up to
    MOXY_MAX_BODY_BYTES, and not kept."""
    settings = _settings()
    if endpoint is not None and not endpoint.startswith(("http://", "https://")):
        _fail(f"--endpoint {endpoint!r}: must start with http:// or https://", 2)
    sent = dict(_header(value) for value in headers)
    if endpoint is not None and settings.origin_secret is not None:
        # Straight to the origin, which answers only the CDN's requests when the secret is set.
        from moxy.routes import ORIGIN_SECRET_HEADER

        sent[ORIGIN_SECRET_HEADER.decode("ascii")] = settings.origin_secret.get_secret_value()
    jobs = _warm_jobs(source, _Targets(settings, endpoint, expires, exact))
    tally = _Tally()
    started = time.monotonic()
    # click's bar needs an iterable or a length: a count of no known end stands for a list read from a pipe.
    with click.progressbar(
        itertools.count(), length=_count_urls(source), label="warming", file=sys.stderr, show_pos=True
    ) as bar:

        def record(result: _Warmed) -> None:
            tally.add(result)
            bar.update(1)

        stop = asyncio.run(
            _warm_all(
                jobs,
                concurrency=concurrency,
                timeout=timeout,
                max_body=settings.max_body_bytes,
                headers=sent,
                record=record,
            )
        )
    elapsed = time.monotonic() - started
    counts = tally.counts
    order = [name for name in _WARM_ORDER if name in counts] + sorted(set(counts) - set(_WARM_ORDER))
    width = max((len(name) for name in order), default=0)
    for name in order:
        click.echo(f"{name:<{width}}  {counts[name]}")
    total = sum(counts.values())
    click.echo(f"{total} URL{'s' if total != 1 else ''} in {elapsed:.1f} s, {tally.failed} failed")
    for result in tally.failures:
        detail = f" ({_printable(result.detail)})" if result.detail else ""
        click.echo(f"moxy: {result.outcome}: {_printable(result.url)}{detail}", err=True)
    if tally.failed > len(tally.failures):
        click.echo(f"moxy: ... and {tally.failed - len(tally.failures)} more failed", err=True)
    if stop is not None:
        _fail(stop.message, stop.code)
    if tally.failed:
        sys.exit(1)
