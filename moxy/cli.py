"""The `moxy` command: a thin layer over config, signing and the app.

Exit codes: 0 success, 1 the input was refused (bad URL, failed verification), 2 bad configuration."""

from __future__ import annotations

import asyncio
import base64
import os
import secrets
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn, TextIO
from urllib.parse import urlsplit

import click

from moxy import __version__
from moxy.config import Settings, load_settings
from moxy.errors import ConfigError, MoxyError, VerificationError
from moxy.signing import MAX_EXPIRES_AT, Signer, expiry_bucket

if TYPE_CHECKING:
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
        try:
            _preflight({})
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
        with urllib.request.urlopen(request, timeout=30) as response:  # the endpoint is the operator's own Moxy
            body = orjson.loads(response.read() or b"{}")
    except urllib.error.HTTPError as exc:
        detail = exc.read().decode("utf-8", "replace").strip()
        _fail(f"purge refused ({exc.code}): {detail}", 1)
    except (urllib.error.URLError, OSError) as exc:
        _fail(f"cannot reach {target}: {exc}", 1)
    click.echo(f"purged {body.get('removed', 0)} entr{'y' if body.get('removed') == 1 else 'ies'}")


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
    import urllib.request

    settings = _settings(port=port)
    host = settings.host
    # Listening on every interface means loopback answers too; an IPv6 literal needs brackets in a URL.
    host = {"0.0.0.0": "127.0.0.1", "": "127.0.0.1", "::": "::1"}.get(host, host)
    target = f"http://{f'[{host}]' if ':' in host else host}:{settings.port}/healthz"
    # No proxy from the environment: the check is of this machine's Moxy, whatever HTTP_PROXY a container carries.
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(target, timeout=timeout) as response:
            status = response.status
    except urllib.error.HTTPError as exc:
        status = exc.code
    except (urllib.error.URLError, OSError) as exc:
        _fail(f"unhealthy: cannot reach {target}: {getattr(exc, 'reason', exc)}", 1)
    if status != 200:
        _fail(f"unhealthy: {target} answered {status}", 1)
    click.echo("healthy")


# -- warm -------------------------------------------------------------------------------------------

# Cache results in the order the summary lists them; any other outcome (an error) follows, sorted.
_WARM_ORDER = ("HIT", "MISS", "STALE", "REVALIDATED", "BYPASS", "OK")
_WARM_FAILURES_SHOWN = 20  # a whole broken list would bury the summary; the count says how many more


@dataclass(frozen=True, slots=True)
class _Warmed:
    position: int  # in the input, so failures are reported in its order whatever order they finished in
    url: str  # as the input gave it
    outcome: str  # X-Moxy-Cache (HIT, MISS, ...), "OK" for a 2xx without it, or "error <status or cause>"
    detail: str = ""

    @property
    def failed(self) -> bool:
        return self.outcome.startswith("error")


def _warm_targets(
    urls: list[str], settings: Settings, endpoint: str | None, expires: int | None, exact: bool
) -> list[tuple[str, str]]:
    """(input URL, URL to fetch) for each line: a Moxy URL is fetched as is (re-based on --endpoint), any other URL
    is signed with the configured key first. Fails (exit 1 or 2) before any fetch when a line cannot be used."""
    target = (endpoint or settings.base_url).rstrip("/")
    bases = {settings.base_url.rstrip("/"), target}
    signer: Signer | None = None
    missing_key: ConfigError | None = None
    try:
        signer = Signer(settings.signing_keys(), settings.base_url, camo_keys=settings.camo_keys())
    except ConfigError as exc:  # needed only if some line is an upstream URL
        missing_key = exc
    found: list[tuple[str, str]] = []
    for number, url in enumerate(urls, start=1):
        base = next((base for base in bases if url.startswith(base + "/")), None)
        if base is not None:  # a Moxy URL under this Moxy's public or given address: no key needed
            found.append((url, target + url[len(base) :]))
            continue
        if signer is not None and _verifies(signer, url):  # a Moxy URL published under another address
            parts = urlsplit(url)
            found.append((url, target + parts.path + (f"?{parts.query}" if parts.query else "")))
            continue
        if signer is None:
            assert missing_key is not None
            _fail(f"{missing_key} (line {number} is an upstream URL, which warm signs first)", 2)
        try:
            signed = signer.sign(url, expires_in=expires, exact=exact)
        except ValueError as exc:  # UnsignableURL, or an expiry past what a Moxy URL can carry
            _fail(f"cannot sign {url!r} (line {number}): {exc}", 1)
        found.append((url, target + signed[len(signer.base_url) :]))
    return found


def _verifies(signer: Signer, url: str) -> bool:
    try:
        signer.verify(url)
    except VerificationError:
        return False
    return True


async def _warm_one(client: httpx.AsyncClient, position: int, url: str, fetch: str) -> _Warmed:
    import httpx
    import orjson

    try:
        async with client.stream("GET", fetch) as response:
            ok = 200 <= response.status_code < 300
            kept = b""
            # Read to the end, as a CDN does before it keeps a copy; an error's small JSON body says why.
            async for chunk in response.aiter_raw():
                if not ok and len(kept) < 4096:
                    kept += chunk
    except httpx.TimeoutException:
        return _Warmed(position, url, "error timeout")
    except httpx.HTTPError as exc:
        return _Warmed(position, url, "error connection", str(exc) or type(exc).__name__)
    if ok:
        return _Warmed(position, url, response.headers.get("x-moxy-cache", "OK").upper())
    try:
        reason = str(orjson.loads(kept).get("reason", ""))
    except (orjson.JSONDecodeError, AttributeError):  # not Moxy's JSON: a CDN's own error page
        reason = ""
    return _Warmed(position, url, f"error {response.status_code}", reason)


async def _warm_all(
    targets: list[tuple[str, str]],
    concurrency: int,
    timeout: float,
    headers: dict[str, str],
    advance: Callable[[], None],
) -> list[_Warmed]:
    import httpx

    results: list[_Warmed] = []
    pending = iter(enumerate(targets))  # shared by the workers: one event loop, so no lock is needed
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(timeout=timeout, limits=limits, headers=headers, follow_redirects=False) as client:

        async def work() -> None:
            for position, (url, fetch) in pending:
                results.append(await _warm_one(client, position, url, fetch))
                advance()

        await asyncio.gather(*(work() for _ in range(min(concurrency, len(targets)))))
    return sorted(results, key=lambda result: result.position)


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
@click.option("--timeout", type=click.FloatRange(min=0.1), default=60.0, show_default=True, help="Seconds per URL.")
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
    URL is signed with the configured key first. Prints a summary by outcome (HIT, MISS, STALE, ... and errors by
    status); exits 1 if any URL failed.

    By default the URLs go to MOXY_BASE_URL, the address pages use: in production the CDN, so the edge that
    answers and Moxy behind it both keep a copy. --endpoint sends them to one Moxy directly (its path and query
    kept), with MOXY_ORIGIN_SECRET if set, to fill that host's tiers only."""
    settings = _settings()
    if endpoint is not None and not endpoint.startswith(("http://", "https://")):
        _fail(f"--endpoint {endpoint!r}: must start with http:// or https://", 2)
    urls = [line.strip() for line in source if line.strip() and not line.lstrip().startswith("#")]
    targets = _warm_targets(urls, settings, endpoint, expires, exact)
    sent = dict(_header(value) for value in headers)
    if endpoint is not None and settings.origin_secret is not None:
        # Straight to the origin, which answers only the CDN's requests when the secret is set.
        from moxy.routes import ORIGIN_SECRET_HEADER

        sent[ORIGIN_SECRET_HEADER.decode("ascii")] = settings.origin_secret.get_secret_value()
    started = time.monotonic()
    with click.progressbar(length=len(targets), label="warming", file=sys.stderr, show_pos=True) as bar:
        results = asyncio.run(_warm_all(targets, concurrency, timeout, sent, lambda: bar.update(1)))
    elapsed = time.monotonic() - started
    counts = Counter(result.outcome for result in results)
    order = [name for name in _WARM_ORDER if name in counts] + sorted(set(counts) - set(_WARM_ORDER))
    width = max((len(name) for name in order), default=0)
    for name in order:
        click.echo(f"{name:<{width}}  {counts[name]}")
    failed = [result for result in results if result.failed]
    click.echo(f"{len(results)} URL{'s' if len(results) != 1 else ''} in {elapsed:.1f} s, {len(failed)} failed")
    for result in failed[:_WARM_FAILURES_SHOWN]:
        click.echo(f"moxy: {result.outcome}: {result.url}{f' ({result.detail})' if result.detail else ''}", err=True)
    if len(failed) > _WARM_FAILURES_SHOWN:
        click.echo(f"moxy: ... and {len(failed) - _WARM_FAILURES_SHOWN} more failed", err=True)
    if failed:
        sys.exit(1)
