"""The `moxy` command (moxy.cli) through click's CliRunner: sign, verify, keygen, config, serve start-up errors.

Exit codes under test: 0 success, 1 refused input, 2 bad configuration, always with one line on stderr."""

from __future__ import annotations

import base64
import hashlib
import hmac
import importlib.util
import os
import re
import socket
import stat
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from email.message import Message
from io import BytesIO
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result

from moxy import __version__, supervisor
from moxy.cli import ensure_key_file, main, new_key, server_options
from moxy.config import load_settings
from moxy.errors import ConfigError
from moxy.server import BoundedHttpToolsProtocol
from moxy.signing import Signer
from tests.assets import CAMO_KEY, KEY, OLD_KEY
from tests.net import free_port

BASE = "https://cdn.example.com"

URLS = [
    pytest.param("https://example.com/pic.png", id="ascii"),
    pytest.param("https://example.com/a%20b/%E2%9C%93.png?q=%2F%3F%26", id="percent-encoded"),
    pytest.param("https://example.com/café/ñandú.png?q=日本語", id="non-ascii"),
]
# serve copies given flags (and, for several workers, the metrics folder) into the environment for its workers;
# these are restored after each test, so no later test (or Moxy it starts) inherits them.
SERVE_WRITES = ("MOXY_HOST", "MOXY_PORT", "MOXY_WORKERS", "PROMETHEUS_MULTIPROC_DIR")


@pytest.fixture(autouse=True)
def _isolated_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for name in SERVE_WRITES:
        monkeypatch.setenv(name, "")  # recorded, so whatever serve writes is undone
    for name in list(os.environ):
        if name.upper().startswith("MOXY_"):
            monkeypatch.delenv(name)
    # The user's folders (an installed Moxy's defaults for its key and cache) are this test's, never the developer's.
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg-config"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg-cache"))
    monkeypatch.chdir(tmp_path)


@pytest.fixture
def uvicorn_calls(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    """Replaces the supervisor: records what it was asked to run (the listening address, the worker count) with the
    uvicorn configuration each of its workers would build, instead of serving."""
    calls: list[dict[str, Any]] = []
    listened: dict[str, Any] = {}

    def fake_listen(host: str, port: int, fd: int | None) -> Any:
        listened.update(host=host, port=port, fd=fd)  # the address it would listen on; nothing is bound
        return object()

    def fake_supervise(*, listening: object, command: list[str], preflight: Callable[[], object], **kwargs: Any) -> int:
        preflight()  # what a reload runs: passes here, as the same checks passed at start
        app = command[command.index("--app") + 1]
        calls.append({**server_options(load_settings(), app), **listened, **kwargs, "command": command})
        return 0

    monkeypatch.setattr(supervisor, "listen", fake_listen)
    monkeypatch.setattr(supervisor, "supervise", fake_supervise)
    return calls


def run(*args: str, env: dict[str, str] | None = None) -> Result:
    return CliRunner().invoke(main, list(args), env=env, catch_exceptions=False)


def one_line_error(result: Result, code: int) -> str:
    """Assert the result failed with `code` and said so in exactly one line on stderr; return that line."""
    assert result.exit_code == code, (result.exit_code, result.stdout, result.stderr)
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("moxy: ")
    return lines[0]


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode("ascii").rstrip("=")


def reference_sign(url: str, key: str, base_url: str, exp: int | None = None) -> str:
    """The native signed-URL format, written out by hand (independent of moxy.signing):
    `{base}/{b64url(HMAC-SHA256(key, url [+ "\\n" + exp]))}/{b64url(url)}[?e={exp}]`."""
    message = url.encode("utf-8") + (b"" if exp is None else b"\n" + str(exp).encode("ascii"))
    digest = _b64(hmac.new(key.encode("utf-8"), message, hashlib.sha256).digest())
    signed = f"{base_url.rstrip('/')}/{digest}/{_b64(url.encode('utf-8'))}"
    return signed if exp is None else f"{signed}?e={exp}"


# -- sign -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("url", URLS)
def test_sign_prints_the_native_format(url: str) -> None:
    result = run("sign", url, env={"MOXY_KEY": KEY, "MOXY_BASE_URL": BASE})
    assert result.exit_code == 0, result.stderr
    assert result.stdout == reference_sign(url, KEY, BASE) + "\n"
    assert result.stderr == ""


def test_sign_default_base_url() -> None:
    url = "https://example.com/pic.png"
    result = run("sign", url, env={"MOXY_KEY": KEY})
    assert result.stdout == reference_sign(url, KEY, "http://127.0.0.1:8080") + "\n"


@pytest.mark.parametrize("url", URLS)
@pytest.mark.parametrize("expires", [1, 3600])
@pytest.mark.parametrize("exact", [False, True])
def test_sign_with_expiry(url: str, expires: int, exact: bool) -> None:
    before = int(time.time())
    flags = ("--exact",) if exact else ()
    result = run("sign", url, "--expires", str(expires), *flags, env={"MOXY_KEY": KEY, "MOXY_BASE_URL": BASE})
    after = int(time.time()) + 1
    assert result.exit_code == 0, result.stderr
    match = re.fullmatch(r"(.+)\?e=([0-9]+)\n", result.stdout)
    assert match is not None, result.stdout
    exp = int(match.group(2))
    # The expiry is read back; the digest must still be exactly what the format gives for it.
    assert result.stdout == reference_sign(url, KEY, BASE, exp=exp) + "\n"
    if exact:
        assert before + expires <= exp <= after + expires
    else:  # rounded up to its bucket, so every page signed meanwhile carries the same URL
        bucket = max(60, expires // 10)
        assert exp % bucket == 0 and before + expires <= exp < after + expires + bucket


@pytest.mark.parametrize("base_url", ["https://other.example", "https://other.example/"])
def test_sign_base_url_flag_wins(base_url: str) -> None:
    url = "https://example.com/pic.png"
    result = run("sign", url, "--base-url", base_url, env={"MOXY_KEY": KEY, "MOXY_BASE_URL": BASE})
    assert result.stdout == reference_sign(url, KEY, "https://other.example") + "\n"


def test_sign_uses_the_first_key() -> None:
    url = "https://example.com/pic.png"
    result = run("sign", url, env={"MOXY_KEY": f"{KEY},{OLD_KEY}", "MOXY_BASE_URL": BASE})
    assert result.stdout == reference_sign(url, KEY, BASE) + "\n"


def test_sign_reads_the_key_file(tmp_path: Path) -> None:
    (tmp_path / "keys").write_text(f"{KEY}\n{OLD_KEY}\n", encoding="utf-8")
    url = "https://example.com/pic.png"
    result = run("sign", url, env={"MOXY_KEY_FILE": str(tmp_path / "keys"), "MOXY_BASE_URL": BASE})
    assert result.stdout == reference_sign(url, KEY, BASE) + "\n"


@pytest.mark.parametrize(
    "url",
    [
        pytest.param("not-a-url", id="not-a-url"),
        pytest.param("example.com/pic.png", id="no-scheme"),
        pytest.param("ftp://example.com/pic.png", id="ftp"),
        pytest.param("https://example.com/a b.png", id="space-inside"),
        pytest.param("https://example.com/a\tb.png", id="tab-inside"),
        pytest.param("https://example.com/a.png\n", id="newline-at-end"),
        pytest.param("https:///pic.png", id="no-host"),
    ],
)
def test_sign_refuses_bad_urls_with_one_line(url: str) -> None:
    line = one_line_error(run("sign", url, env={"MOXY_KEY": KEY}), 1)
    assert "cannot sign" in line


def test_sign_refuses_an_expiry_too_far_away() -> None:
    line = one_line_error(run("sign", "https://example.com/", "--expires", str(10**13), env={"MOXY_KEY": KEY}), 1)
    assert "unix time" in line


@pytest.mark.parametrize("expires", ["0", "-5", "soon"])
def test_sign_refuses_bad_expiry(expires: str) -> None:
    result = run("sign", "https://example.com/", "--expires", expires, env={"MOXY_KEY": KEY})
    assert result.exit_code == 2  # click's usage error
    assert result.stdout == ""
    assert "--expires" in result.stderr


# -- configuration problems exit 2 -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("env", "setting"),
    [
        pytest.param({}, "MOXY_KEY", id="no-key"),
        pytest.param({"MOXY_KEY": "x" * 15}, "MOXY_KEY", id="short-key"),
        pytest.param({"MOXY_KEY": f"{KEY},tiny"}, "MOXY_KEY", id="short-second-key"),
        pytest.param({"MOXY_KEY_FILE": "missing.key"}, "MOXY_KEY_FILE", id="missing-key-file"),
        pytest.param({"MOXY_KEY": KEY, "MOXY_BASE_URL": "ftp://x"}, "MOXY_BASE_URL", id="bad-base-url"),
        pytest.param({"MOXY_KEY": KEY, "MOXY_PORT": "abc"}, "MOXY_PORT", id="bad-port"),
    ],
)
@pytest.mark.parametrize(
    "args",
    [
        pytest.param(("sign", "https://example.com/pic.png"), id="sign"),
        pytest.param(("verify", f"{BASE}/{'A' * 43}/aHR0cHM6Ly9leGFtcGxlLmNvbS8"), id="verify"),
    ],
)
def test_config_problems_exit_2_with_one_line(env: dict[str, str], setting: str, args: tuple[str, ...]) -> None:
    line = one_line_error(run(*args, env=env), 2)
    assert f"{setting}:" in line
    assert KEY not in line and "x" * 15 not in line  # a key never appears in an error


# -- verify --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("url", URLS)
@pytest.mark.parametrize("expires", [None, "3600"])
def test_sign_then_verify_round_trips(url: str, expires: str | None) -> None:
    env = {"MOXY_KEY": KEY, "MOXY_BASE_URL": BASE}
    signed = run("sign", url, *(["--expires", expires] if expires else []), env=env).stdout.strip()
    result = run("verify", signed, env=env)
    assert result.exit_code == 0, result.stderr
    assert result.stdout == url + "\n"


def test_verify_after_rotation() -> None:
    url = "https://example.com/old.png"
    published = run("sign", url, env={"MOXY_KEY": OLD_KEY}).stdout.strip()
    assert run("verify", published, env={"MOXY_KEY": f"{KEY},{OLD_KEY}"}).stdout == url + "\n"
    line = one_line_error(run("verify", published, env={"MOXY_KEY": KEY}), 1)
    assert "signature" in line


def test_verify_refuses_every_changed_digest_character() -> None:
    url = "https://example.com/pic.png"
    signed = reference_sign(url, KEY, BASE)
    digest_start = len(BASE) + 1
    for position in range(digest_start, digest_start + 43):
        replacement = "A" if signed[position] != "A" else "B"
        tampered = signed[:position] + replacement + signed[position + 1 :]
        line = one_line_error(run("verify", tampered, env={"MOXY_KEY": KEY}), 1)
        assert line.startswith("moxy: refused: ")


@pytest.mark.parametrize(
    "moxy_url",
    [
        pytest.param("not a moxy url", id="garbage"),
        pytest.param(f"{BASE}/", id="no-path"),
        pytest.param(f"{BASE}/{'A' * 43}/aHR0cHM6Ly9leGFtcGxlLmNvbS8", id="wrong-digest"),
        pytest.param(f"{BASE}/{'A' * 40}/aHR0cHM6Ly9leGFtcGxlLmNvbS8", id="short-digest"),
    ],
)
def test_verify_refuses_with_one_line(moxy_url: str) -> None:
    one_line_error(run("verify", moxy_url, env={"MOXY_KEY": KEY}), 1)


def test_verify_expired_names_the_expiry() -> None:
    exp = 1_600_000_000
    signed = Signer([KEY], BASE, clock=lambda: exp - 60).sign("https://example.com/pic.png", expires_in=60, exact=True)
    assert signed.endswith(f"?e={exp}")
    line = one_line_error(run("verify", signed, env={"MOXY_KEY": KEY}), 1)
    assert "expired" in line and str(exp) in line


def test_verify_camo_form_with_camo_key() -> None:
    url = "http://example.com/pic.png"
    digest = hmac.new(CAMO_KEY.encode(), url.encode(), hashlib.sha1).hexdigest()
    camo = f"{BASE}/{digest}/{url.encode().hex()}"
    result = run("verify", camo, env={"MOXY_KEY": KEY, "MOXY_CAMO_KEY": CAMO_KEY})
    assert result.stdout == url + "\n"
    one_line_error(run("verify", camo, env={"MOXY_KEY": KEY}), 1)
    # A site checking its old camo links needs only the camo key; native URLs then cannot verify.
    assert run("verify", camo, env={"MOXY_CAMO_KEY": CAMO_KEY}).stdout == url + "\n"
    native = Signer([KEY], BASE).sign(url)
    one_line_error(run("verify", native, env={"MOXY_CAMO_KEY": CAMO_KEY}), 1)
    one_line_error(run("verify", native, env={}), 2)  # no key of any kind: a configuration error


# -- keygen and config ---------------------------------------------------------------------------------


def test_keygen_prints_a_fresh_32_byte_key() -> None:
    seen = set()
    for _ in range(3):
        result = run("keygen")
        assert result.exit_code == 0
        key = result.stdout.rstrip("\n")
        assert result.stdout == key + "\n"
        assert re.fullmatch(r"[A-Za-z0-9_-]{43}", key)
        assert len(base64.urlsafe_b64decode(key + "=")) == 32
        seen.add(key)
    assert len(seen) == 3


def test_new_key_is_usable() -> None:
    key = new_key()
    url = "https://example.com/pic.png"
    result = run("sign", url, env={"MOXY_KEY": key, "MOXY_BASE_URL": BASE})
    assert result.stdout == reference_sign(url, key, BASE) + "\n"


def test_config_masks_secrets(tmp_path: Path) -> None:
    env = {
        "MOXY_KEY": f"{KEY},{OLD_KEY}",
        "MOXY_CAMO_KEY": CAMO_KEY,
        "MOXY_PURGE_TOKEN": "purge-token-value-42",
        "MOXY_REDIS_URL": "redis://:redis-password-99@127.0.0.1:6379/0",
        "MOXY_PORT": "9000",
        "MOXY_ALLOWED_NETWORKS": "127.0.0.0/8,::1/128",
    }
    result = run("config", env=env)
    assert result.exit_code == 0, result.stderr
    lines = result.stdout.splitlines()
    assert "MOXY_PORT=9000" in lines
    assert "MOXY_KEY=********" in lines
    assert "MOXY_PURGE_TOKEN=********" in lines
    assert "MOXY_ALLOWED_NETWORKS=127.0.0.0/8,::1/128" in lines
    assert "MOXY_KEY_FILE=" in lines
    everything = result.stdout + result.stderr
    for secret in (KEY, OLD_KEY, CAMO_KEY, "purge-token-value-42", "redis-password-99"):
        assert secret not in everything


def test_config_with_a_bad_setting_exits_2() -> None:
    line = one_line_error(run("config", env={"MOXY_PORT": "abc"}), 2)
    assert "MOXY_PORT" in line


def test_version() -> None:
    result = run("--version")
    assert result.exit_code == 0
    assert __version__ in result.stdout


# -- serve: configuration is checked before uvicorn starts ------------------------------------------


@pytest.mark.parametrize(
    ("args", "env", "setting"),
    [
        pytest.param((), {"MOXY_KEY": KEY, "MOXY_PORT": "abc"}, "MOXY_PORT", id="env-port-not-int"),
        pytest.param(("--port", "70000"), {"MOXY_KEY": KEY}, "MOXY_PORT", id="flag-port-too-big"),
        pytest.param(("--workers", "0"), {"MOXY_KEY": KEY}, "MOXY_WORKERS", id="no-workers"),
        pytest.param((), {}, "MOXY_KEY", id="no-key"),
        pytest.param((), {"MOXY_KEY": "x" * 15}, "MOXY_KEY", id="short-key"),
        pytest.param((), {"MOXY_KEY_FILE": "missing.key"}, "MOXY_KEY_FILE", id="missing-key-file"),
        pytest.param((), {"MOXY_KEY": KEY, "MOXY_ALLOWED_NETWORKS": "10.0.0.0/40"}, "MOXY_ALLOWED_NETWORKS", id="net"),
        pytest.param((), {"MOXY_KEY": KEY, "MOXY_FORWARD_HEADERS": "Cookie"}, "MOXY_FORWARD_HEADERS", id="cookie"),
        pytest.param((), {"MOXY_KEY": KEY, "MOXY_TTL_MIN": "9", "MOXY_TTL_MAX": "1"}, "MOXY_TTL_MIN", id="ttl"),
        pytest.param(
            (), {"MOXY_KEY": KEY, "MOXY_UPSTREAM_CA_FILE": "missing-ca.pem"}, "MOXY_UPSTREAM_CA_FILE", id="ca-file"
        ),
        pytest.param(
            (), {"MOXY_KEY": KEY, "MOXY_UPSTREAM_CA_FILE": "pyproject.toml"}, "MOXY_UPSTREAM_CA_FILE", id="ca-not-pem"
        ),
        pytest.param((), {"MOXY_KEY": KEY, "MOXY_RULES_FILE": "missing.toml"}, "MOXY_RULES_FILE", id="rules-missing"),
        pytest.param(
            (), {"MOXY_KEY": KEY, "MOXY_VALIDATORS": "no_such_module:check"}, "MOXY_VALIDATORS", id="validator"
        ),
        pytest.param((), {"MOXY_KEY": KEY, "MOXY_REDIS_URL": "http://cache:6379"}, "MOXY_REDIS_URL", id="redis-scheme"),
        pytest.param((), {"MOXY_KEY": KEY, "MOXY_REDIS_URL": "redis://cache:port"}, "MOXY_REDIS_URL", id="redis-port"),
        pytest.param(
            (),
            {"MOXY_KEY": KEY, "MOXY_MEMORY_CACHE_BYTES": "0", "MOXY_DISK_CACHE_BYTES": "0"},
            "MOXY_MEMORY_CACHE_BYTES",
            id="no-tier",
        ),
        pytest.param((), {"MOXY_KEY": KEY, "MOXY_CACHE_DIR": "/proc/moxy-cache"}, "MOXY_CACHE_DIR", id="cache-dir"),
    ],
)
def test_serve_with_a_bad_setting_exits_2_before_uvicorn(
    uvicorn_calls: list[dict[str, Any]], args: tuple[str, ...], env: dict[str, str], setting: str
) -> None:
    line = one_line_error(run("serve", *args, env=env), 2)
    assert f"{setting}:" in line
    assert uvicorn_calls == []


def test_serve_passes_settings_to_uvicorn(uvicorn_calls: list[dict[str, Any]]) -> None:
    result = run("serve", "--port", "9123", "--workers", "2", env={"MOXY_KEY": KEY, "MOXY_HOST": "::1"})
    assert result.exit_code == 0, result.stderr
    assert len(uvicorn_calls) == 1
    call = uvicorn_calls[0]
    assert call["app"] == "moxy.app:create_app" and call["factory"] is True
    assert (call["host"], call["port"], call["workers"]) == ("::1", 9123, 2)
    # Workers rebuild Settings from the environment, so the flags must have been copied there.
    assert os.environ["MOXY_PORT"] == "9123" and os.environ["MOXY_WORKERS"] == "2"
    assert KEY not in result.stdout + result.stderr


def test_serve_runs_moxys_bounded_protocol_with_the_configured_limits(uvicorn_calls: list[dict[str, Any]]) -> None:
    env = {"MOXY_KEY": KEY, "MOXY_KEEPALIVE_TIMEOUT": "7"}
    result = run("serve", env=env)
    assert result.exit_code == 0, result.stderr
    call = uvicorn_calls[0]
    assert call["http"] is BoundedHttpToolsProtocol
    assert call["timeout_keep_alive"] == 7
    assert call["fd"] is None


def test_serve_on_an_inherited_socket(uvicorn_calls: list[dict[str, Any]]) -> None:
    result = run("serve", "--fd", "3", env={"MOXY_KEY": KEY})
    assert result.exit_code == 0, result.stderr
    assert uvicorn_calls[0]["fd"] == 3
    assert "serving on the inherited socket 3" in result.stderr


def test_serve_app_is_a_hidden_seam_for_tests(uvicorn_calls: list[dict[str, Any]]) -> None:
    result = run("serve", "--app", "tests.integration.seams:slow_commit_app", env={"MOXY_KEY": KEY})
    assert result.exit_code == 0, result.stderr
    assert uvicorn_calls[0]["app"] == "tests.integration.seams:slow_commit_app"
    assert "--app" not in run("serve", "--help").stdout


@pytest.mark.parametrize(
    ("name", "value"),
    [("MOXY_MAX_URL_BYTES", "100"), ("MOXY_MAX_HEADER_FIELDS", "0"), ("MOXY_HEAD_TIMEOUT", "0")],
)
def test_serve_refuses_a_bound_that_would_refuse_every_client(
    uvicorn_calls: list[dict[str, Any]], name: str, value: str
) -> None:
    line = one_line_error(run("serve", env={"MOXY_KEY": KEY, name: value}), 2)
    assert f"{name}:" in line
    assert uvicorn_calls == []


def test_serve_runs_its_workers_as_fresh_interpreters(uvicorn_calls: list[dict[str, Any]]) -> None:
    result = run("serve", env={"MOXY_KEY": KEY})
    assert result.exit_code == 0, result.stderr
    # `python -m moxy worker`: a reload starts workers on the code installed at the time of the SIGHUP.
    assert uvicorn_calls[0]["command"] == [sys.executable, "-m", "moxy", "worker", "--app", "moxy.app:create_app"]
    assert "worker" not in run("--help").stdout, "started by the supervisor only"


def test_serve_with_a_rules_file_that_does_not_parse_exits_2_before_uvicorn(
    uvicorn_calls: list[dict[str, Any]], tmp_path: Path
) -> None:
    (tmp_path / "rules.toml").write_text("[[rule]\nhost = ", encoding="utf-8")
    line = one_line_error(run("serve", env={"MOXY_KEY": KEY, "MOXY_RULES_FILE": "rules.toml"}), 2)
    assert "MOXY_RULES_FILE:" in line and "rules.toml" in line
    assert uvicorn_calls == []


def test_serve_without_the_redis_client_exits_2_naming_the_extra(
    uvicorn_calls: list[dict[str, Any]], monkeypatch: pytest.MonkeyPatch
) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "redis" else real(name, *a))
    line = one_line_error(run("serve", env={"MOXY_KEY": KEY, "MOXY_REDIS_URL": "redis://127.0.0.1:6379/0"}), 2)
    assert "MOXY_REDIS_URL:" in line and "moxy-proxy[redis]" in line
    assert uvicorn_calls == []


@pytest.mark.parametrize("taken", [True, False])
def test_serve_on_an_address_it_cannot_listen_on_exits_2_before_the_banner(
    monkeypatch: pytest.MonkeyPatch, taken: bool
) -> None:
    def never(**kwargs: Any) -> int:
        raise AssertionError("no worker may start")

    monkeypatch.setattr(supervisor, "supervise", never)
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        env = {"MOXY_KEY": KEY, "MOXY_PORT": str(port)} if taken else {"MOXY_KEY": KEY, "MOXY_HOST": "256.0.0.1"}
        line = one_line_error(run("serve", env=env), 2)
    assert ("MOXY_PORT:" if taken else "MOXY_HOST:") in line and "cannot listen" in line


def test_config_check_runs_the_serve_checks(tmp_path: Path) -> None:
    good = run("config", "--check", env={"MOXY_KEY": KEY, "MOXY_PORT": str(free_port())})
    assert good.exit_code == 0, good.stderr
    assert "configuration ok" in good.stdout
    line = one_line_error(run("config", "--check", env={"MOXY_KEY": KEY, "MOXY_VALIDATORS": "nope:check"}), 2)
    assert "MOXY_VALIDATORS:" in line


@pytest.mark.parametrize("taken", ["MOXY_PORT", "MOXY_ADMIN_PORT"])
def test_config_check_binds_both_listeners_as_serve_would(taken: str) -> None:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        ports = {"MOXY_PORT": str(free_port()), "MOXY_ADMIN_PORT": str(free_port())}
        ports[taken] = str(holder.getsockname()[1])
        line = one_line_error(run("config", "--check", env={"MOXY_KEY": KEY, **ports}), 2)
    assert line.startswith(f"moxy: {taken}: cannot listen on 127.0.0.1:{ports[taken]}"), line
    # Free, both pass, and are released again: `serve` can bind them next.
    result = run("config", "--check", env={"MOXY_KEY": KEY, **ports})
    assert (result.exit_code, result.stdout) == (0, "configuration ok\n"), result.stderr
    for port in ports.values():
        socket.create_server(("127.0.0.1", int(port))).close()


def test_serve_checks_a_reload_as_it_checked_the_start(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    checks: list[Callable[[], object]] = []

    def keep_preflight(*, preflight: Callable[[], object], **kwargs: Any) -> int:
        checks.append(preflight)
        return 0

    monkeypatch.setattr(supervisor, "supervise", keep_preflight)
    monkeypatch.setattr(supervisor, "listen", lambda host, port, fd: object())  # nothing is bound
    key_file = tmp_path / "moxy.key"
    key_file.write_text(KEY)
    monkeypatch.setenv("MOXY_KEY_FILE", str(key_file))
    assert run("serve").exit_code == 0
    key_file.write_text("short")  # the key file was edited, then SIGHUP: the supervisor runs the same checks again
    with pytest.raises(ConfigError, match="MOXY_KEY_FILE"):
        checks[0]()
    key_file.write_text(f"{OLD_KEY},{KEY}")
    checks[0]()


def test_serve_init_key_creates_a_private_key_file(uvicorn_calls: list[dict[str, Any]], tmp_path: Path) -> None:
    key_file = tmp_path / "state" / "moxy.key"
    env = {"MOXY_KEY_FILE": str(key_file)}
    first = run("serve", "--init-key", env=env)
    assert first.exit_code == 0, first.stderr
    assert "generated a new key" in first.stderr
    key = key_file.read_text(encoding="utf-8").strip()
    assert len(base64.urlsafe_b64decode(key + "=")) == 32
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    assert key not in first.stdout + first.stderr
    second = run("serve", "--init-key", env=env)
    assert second.exit_code == 0 and "generated" not in second.stderr
    assert key_file.read_text(encoding="utf-8").strip() == key  # kept, so URLs survive restarts
    assert len(uvicorn_calls) == 2


def test_init_key_without_a_key_file_keeps_the_key_in_the_users_config_folder(
    uvicorn_calls: list[dict[str, Any]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # An installed Moxy, no settings at all: the key goes where any later start, from any folder, finds it again.
    first = run("serve", "--init-key")
    assert first.exit_code == 0, first.stderr
    key_file = tmp_path / "xdg-config" / "moxy" / "moxy.key"
    assert f"generated a new key in {key_file}" in first.stderr
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    assert stat.S_IMODE(key_file.parent.stat().st_mode) == 0o700
    key = key_file.read_text(encoding="utf-8").strip()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    second = run("serve", "--init-key")
    assert second.exit_code == 0 and "generated" not in second.stderr
    assert "MOXY_KEY_FILE=" not in second.stderr  # the banner's sign line needs no setting: the key is found
    signed = run("sign", "https://example.com/pic.png")
    assert signed.exit_code == 0, signed.stderr
    assert signed.stdout.strip() == reference_sign("https://example.com/pic.png", key, "http://127.0.0.1:8080")
    assert run("verify", signed.stdout.strip()).stdout.strip() == "https://example.com/pic.png"
    assert len(uvicorn_calls) == 2


def test_home_config_folder_when_xdg_is_unset_or_relative(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("XDG_CONFIG_HOME")
    monkeypatch.setenv("XDG_CACHE_HOME", "relative/cache")  # the XDG spec: a relative path is ignored
    settings = load_settings()
    assert settings.key_path() == tmp_path / "home" / ".config" / "moxy" / "moxy.key"
    assert settings.cache_dir == tmp_path / "home" / ".cache" / "moxy"


def test_cache_folder_default_is_absolute_and_shown(tmp_path: Path) -> None:
    shown = run("config", env={"MOXY_KEY": KEY})
    assert f"MOXY_CACHE_DIR={tmp_path / 'xdg-cache' / 'moxy'}" in shown.stdout.splitlines()
    assert run("config", env={"MOXY_CACHE_DIR": "/srv/moxy"}).stdout.count("MOXY_CACHE_DIR=/srv/moxy") == 1


def test_no_key_names_where_init_key_would_keep_one(tmp_path: Path) -> None:
    line = one_line_error(run("sign", "https://example.com/pic.png"), 2)
    assert "MOXY_KEY" in line and str(tmp_path / "xdg-config" / "moxy" / "moxy.key") in line


def test_init_key_in_a_folder_it_cannot_write_is_one_line(uvicorn_calls: list[dict[str, Any]], tmp_path: Path) -> None:
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("")
    line = one_line_error(run("serve", "--init-key", env={"MOXY_KEY_FILE": str(blocker / "moxy.key")}), 2)
    assert line.startswith("moxy: MOXY_KEY_FILE") and "cannot create" in line
    assert uvicorn_calls == []


def test_init_key_leaves_an_explicit_key_alone(uvicorn_calls: list[dict[str, Any]], tmp_path: Path) -> None:
    result = run("serve", "--init-key", env={"MOXY_KEY": KEY})
    assert result.exit_code == 0 and "generated" not in result.stderr
    assert not (tmp_path / "xdg-config").exists()


def test_ensure_key_file_keeps_an_existing_file(tmp_path: Path) -> None:
    path = tmp_path / "a" / "b" / "moxy.key"
    assert ensure_key_file(path) is True
    assert ensure_key_file(path) is False
    assert len(path.read_text(encoding="utf-8").strip()) == 43


# -- purge (the opener's open replaced: no sockets in unit tests) ---------------------------------------------


class _Answer(BytesIO):
    def __enter__(self) -> _Answer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def test_purge_without_token_exits_2() -> None:
    line = one_line_error(run("purge", "https://example.com/pic.png", env={"MOXY_KEY": KEY}), 2)
    assert "MOXY_PURGE_TOKEN" in line


def test_purge_posts_the_url_with_the_token(monkeypatch: pytest.MonkeyPatch) -> None:
    sent: list[urllib.request.Request] = []

    def fake_open(opener: urllib.request.OpenerDirector, request: urllib.request.Request, timeout: float) -> _Answer:
        # No handler that would send it through a proxy named in the environment (HTTP_PROXY below).
        assert not any(isinstance(handler, urllib.request.ProxyHandler) for handler in vars(opener)["handlers"])
        sent.append(request)
        return _Answer(b'{"removed": 1}')

    monkeypatch.setattr(urllib.request.OpenerDirector, "open", fake_open)
    env = {"MOXY_PURGE_TOKEN": "purge-token-value-42", "MOXY_ADMIN_URL": "http://127.0.0.1:8089/"}
    env |= {"HTTP_PROXY": "http://127.0.0.1:9", "http_proxy": "http://127.0.0.1:9", "NO_PROXY": ""}
    result = run("purge", "https://example.com/pic.png", env=env)
    assert result.exit_code == 0, result.stderr
    assert result.stdout == "purged 1 entry\n"
    (request,) = sent
    assert request.full_url == "http://127.0.0.1:8089/purge"
    assert request.get_method() == "POST"
    assert request.get_header("Authorization") == "Bearer purge-token-value-42"
    assert request.data == b'{"url":"https://example.com/pic.png"}'
    assert "purge-token-value-42" not in result.stdout + result.stderr


@pytest.mark.parametrize(
    ("env", "flags", "target"),
    [
        # The public base URL (in production the CDN, where /purge is blocked) is never where a purge goes.
        ({"MOXY_BASE_URL": "https://cdn.example.com"}, (), "http://127.0.0.1:8080/purge"),
        ({"MOXY_BASE_URL": "https://cdn.example.com", "MOXY_PORT": "9001"}, (), "http://127.0.0.1:9001/purge"),
        ({"MOXY_HOST": "0.0.0.0", "MOXY_PORT": "9002"}, (), "http://127.0.0.1:9002/purge"),
        ({"MOXY_HOST": "::1", "MOXY_PORT": "9003"}, (), "http://[::1]:9003/purge"),
        ({"MOXY_ADMIN_URL": "http://10.0.0.5:8080"}, (), "http://10.0.0.5:8080/purge"),
        ({"MOXY_ADMIN_URL": "http://10.0.0.5:8080"}, ("--endpoint", "http://10.0.0.6:81/"), "http://10.0.0.6:81/purge"),
    ],
)
def test_purge_goes_to_the_admin_address_never_the_public_one(
    monkeypatch: pytest.MonkeyPatch, env: dict[str, str], flags: tuple[str, ...], target: str
) -> None:
    sent: list[str] = []

    def fake_open(opener: urllib.request.OpenerDirector, request: urllib.request.Request, timeout: float) -> _Answer:
        sent.append(request.full_url)
        return _Answer(b'{"removed": 3}')

    monkeypatch.setattr(urllib.request.OpenerDirector, "open", fake_open)
    result = run("purge", "https://example.com/pic.png", *flags, env={"MOXY_PURGE_TOKEN": "t" * 24, **env})
    assert result.exit_code == 0, result.stderr
    assert (sent, result.stdout) == ([target], "purged 3 entries\n")


def test_purge_refused_exits_1(monkeypatch: pytest.MonkeyPatch) -> None:
    def fake_open(opener: urllib.request.OpenerDirector, request: urllib.request.Request, timeout: float) -> _Answer:
        raise urllib.error.HTTPError(request.full_url, 401, "Unauthorized", Message(), BytesIO(b"bad token\n"))

    monkeypatch.setattr(urllib.request.OpenerDirector, "open", fake_open)
    env = {"MOXY_PURGE_TOKEN": "purge-token-value-42"}
    line = one_line_error(run("purge", "https://example.com/pic.png", "--endpoint", "http://127.0.0.1:1", env=env), 1)
    assert "401" in line and "bad token" in line


def test_purge_unreachable_exits_1(monkeypatch: pytest.MonkeyPatch) -> None:
    def fake_open(opener: urllib.request.OpenerDirector, request: urllib.request.Request, timeout: float) -> _Answer:
        raise urllib.error.URLError("connection refused")

    monkeypatch.setattr(urllib.request.OpenerDirector, "open", fake_open)
    line = one_line_error(run("purge", "https://example.com/x", env={"MOXY_PURGE_TOKEN": "t" * 16}), 1)
    assert "cannot reach http://127.0.0.1:8080/purge" in line


def test_sign_reads_urls_from_standard_input() -> None:
    urls = ["https://example.com/a.png", "https://example.com/b.png?x=1"]
    text = f"{urls[0]}\n\n  {urls[1]}  \n"
    result = CliRunner().invoke(main, ["sign", "-"], input=text, env={"MOXY_KEY": KEY, "MOXY_BASE_URL": BASE})
    assert result.exit_code == 0, result.stderr
    assert result.stdout.splitlines() == [reference_sign(url, KEY, BASE) for url in urls]


def test_sign_from_standard_input_names_the_line_it_cannot_sign() -> None:
    text = "https://example.com/a.png\nnot a url\nhttps://example.com/c.png\n"
    result = CliRunner().invoke(main, ["sign", "-"], input=text, env={"MOXY_KEY": KEY, "MOXY_BASE_URL": BASE})
    assert result.exit_code == 1
    assert result.stdout == reference_sign("https://example.com/a.png", KEY, BASE) + "\n"  # what came before it
    assert "line 2 of standard input" in result.stderr


def test_short_version_flag() -> None:
    result = run("-V")
    assert result.exit_code == 0 and result.stdout.startswith("moxy, version ")


def test_an_expiry_too_far_names_the_option_not_an_internal_parameter() -> None:
    line = one_line_error(
        run("sign", "https://example.com/a.png", "--expires", "99999999999999", env={"MOXY_KEY": KEY}), 1
    )
    assert line.startswith("moxy: --expires 99999999999999:") and "expires_at" not in line
