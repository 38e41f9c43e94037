"""Settings: MOXY_* parsing, flags over environment, key file, and the one-line ConfigError (moxy.config)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hypothesis import given, strategies as st
from pydantic import ValidationError

from moxy.config import DEFAULT_CONTENT_TYPES, Settings, load_settings, user_cache_dir
from moxy.errors import ConfigError
from tests.assets import CAMO_KEY, KEY, OLD_KEY


@pytest.fixture(autouse=True)
def _isolated_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for name in list(os.environ):
        if name.upper().startswith("MOXY_"):
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)


def test_defaults_without_environment() -> None:
    settings = load_settings()
    assert settings.port == 8080
    assert settings.host == "127.0.0.1"
    assert settings.base_url == "http://127.0.0.1:8080"
    assert settings.forward_headers == ("Accept",)
    assert settings.allowed_networks == ()
    assert settings.content_types == DEFAULT_CONTENT_TYPES
    assert settings.key is None and settings.key_file is None
    assert settings.camo_keys() == []
    assert "text/html" not in settings.content_types


@pytest.mark.parametrize(
    ("variable", "raw", "field", "expected"),
    [
        ("MOXY_PORT", "9000", "port", 9000),
        ("MOXY_WORKERS", "4", "workers", 4),
        ("MOXY_CONNECT_TIMEOUT", "1.5", "connect_timeout", 1.5),
        ("MOXY_ACCESS_LOG", "false", "access_log", False),
        ("MOXY_ACCESS_LOG", "1", "access_log", True),
        ("MOXY_CACHE_DIR", "/srv/moxy", "cache_dir", Path("/srv/moxy")),
        ("MOXY_BASE_URL", "https://cdn.example.com/", "base_url", "https://cdn.example.com"),
        ("MOXY_BASE_URL", "https://www.example.com/img//", "base_url", "https://www.example.com/img"),
        ("MOXY_FORWARD_HEADERS", "Accept, Accept-Language", "forward_headers", ("Accept", "Accept-Language")),
        ("MOXY_ALLOWED_NETWORKS", "127.0.0.0/8,::1/128", "allowed_networks", ("127.0.0.0/8", "::1/128")),
        ("MOXY_ALLOW_HOSTS", " a.example , ,b.example,", "allow_hosts", ("a.example", "b.example")),
        ("MOXY_DENY_HOSTS", "", "deny_hosts", ()),
        ("MOXY_CONTENT_TYPES", "image/png,application/json", "content_types", ("image/png", "application/json")),
        ("MOXY_VALIDATORS", "pkg.mod:check", "validators", ("pkg.mod:check",)),
        ("moxy_port", "9001", "port", 9001),  # environment names are case-insensitive
    ],
)
def test_environment_is_parsed(
    monkeypatch: pytest.MonkeyPatch, variable: str, raw: str, field: str, expected: object
) -> None:
    monkeypatch.setenv(variable, raw)
    assert getattr(load_settings(), field) == expected


@given(st.lists(st.from_regex(r"[A-Za-z][A-Za-z0-9-]{0,20}", fullmatch=True), max_size=6))
def test_comma_lists_round_trip(names: list[str]) -> None:
    names = [name for name in names if name.lower() not in {"cookie", "authorization", "host", "connection"}]
    assert load_settings(forward_headers=" , ".join(names)).forward_headers == tuple(names)


@pytest.mark.parametrize(
    ("variable", "raw"),
    [
        ("MOXY_PORT", "abc"),
        ("MOXY_PORT", "70000"),
        ("MOXY_PORT", "-1"),
        ("MOXY_PORT", "80.5"),
        ("MOXY_WORKERS", "0"),
        ("MOXY_CONNECT_TIMEOUT", "0"),
        ("MOXY_READ_TIMEOUT", "soon"),
        ("MOXY_MAX_BODY_BYTES", "-1"),
        ("MOXY_MAX_REDIRECTS", "51"),
        ("MOXY_ACCESS_LOG", "maybe"),
        ("MOXY_BASE_URL", "ftp://cdn.example.com"),
        ("MOXY_BASE_URL", "cdn.example.com"),
        ("MOXY_ALLOWED_NETWORKS", "10.0.0.0/33"),
        ("MOXY_ALLOWED_NETWORKS", "127.0.0.0/8,localhost"),
        ("MOXY_ALLOWED_NETWORKS", "::1/129"),
        ("MOXY_FORWARD_HEADERS", "Accept,Cookie"),
        ("MOXY_FORWARD_HEADERS", "cookie"),
        ("MOXY_FORWARD_HEADERS", "Authorization"),
        ("MOXY_FORWARD_HEADERS", "Proxy-Authorization"),
        ("MOXY_FORWARD_HEADERS", "Host"),
        ("MOXY_TTL_MIN", "-5"),
        ("MOXY_PURGE_TOKEN", ""),  # set but empty: an unfilled template must not open purge
        ("MOXY_PURGE_TOKEN", "   "),
        ("MOXY_PURGE_TOKEN", "x"),  # guessable: it empties the cache for whoever has it
        ("MOXY_PURGE_TOKEN", "fifteen-bytes.."),
        ("MOXY_ADMIN_URL", "localhost:8080"),
    ],
)
def test_bad_setting_names_itself(monkeypatch: pytest.MonkeyPatch, variable: str, raw: str) -> None:
    monkeypatch.setenv(variable, raw)
    with pytest.raises(ConfigError) as caught:
        load_settings()
    assert caught.value.setting == variable
    message = str(caught.value)
    assert message.startswith(f"{variable}: ")
    assert "\n" not in message  # one line
    assert "pydantic" not in message.lower() and "errors.pydantic.dev" not in message


def test_bad_port_message_is_plain() -> None:
    with pytest.raises(ConfigError) as caught:
        load_settings(port="abc")
    assert caught.value.setting == "MOXY_PORT"
    assert "integer" in caught.value.message


def test_forwarding_cookie_is_refused_as_a_flag_too() -> None:
    with pytest.raises(ConfigError) as caught:
        load_settings(forward_headers="Accept,COOKIE")
    assert caught.value.setting == "MOXY_FORWARD_HEADERS"
    assert "COOKIE" in caught.value.message


def test_host_name_networks_are_named_in_the_message(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MOXY_ALLOWED_NETWORKS", "127.0.0.0/8,not-a-network")
    with pytest.raises(ConfigError, match="not-a-network"):
        load_settings()


def test_networks_with_host_bits_are_accepted(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MOXY_ALLOWED_NETWORKS", "127.0.0.1/8")
    assert load_settings().allowed_networks == ("127.0.0.1/8",)


def test_ttl_bounds_must_be_ordered(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MOXY_TTL_MIN", "100")
    monkeypatch.setenv("MOXY_TTL_MAX", "10")
    with pytest.raises(ConfigError) as caught:
        load_settings()
    assert caught.value.setting == "MOXY_TTL_MIN"
    assert "MOXY_TTL_MAX" in caught.value.message


def test_unknown_override_is_refused() -> None:
    with pytest.raises(ConfigError) as caught:
        load_settings(no_such_setting=1)
    assert caught.value.setting == "MOXY_NO_SUCH_SETTING"


def test_flags_win_over_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MOXY_PORT", "2")
    monkeypatch.setenv("MOXY_HOST", "::1")
    settings = load_settings(port=1, host=None)
    assert settings.port == 1
    assert settings.host == "::1"  # a flag not given (None) leaves the environment in charge


def test_flag_fixes_a_bad_environment_value(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MOXY_PORT", "abc")
    assert load_settings(port=8081).port == 8081


def test_settings_are_frozen() -> None:
    settings = load_settings()
    with pytest.raises(ValidationError):
        settings.port = 1


def test_construction_has_no_side_effects(tmp_path: Path) -> None:
    load_settings(cache_dir=tmp_path / "cache", key_file=tmp_path / "state" / "moxy.key")
    assert list(tmp_path.iterdir()) == []


# -- keys -----------------------------------------------------------------------------------------


def test_key_list_in_order(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MOXY_KEY", f" {KEY} , {OLD_KEY},")
    assert load_settings().signing_keys() == [KEY, OLD_KEY]


@pytest.mark.parametrize(
    "content",
    [
        pytest.param(f"{KEY}\n{OLD_KEY}\n", id="lines"),
        pytest.param(f"{KEY},{OLD_KEY}", id="commas"),
        pytest.param(f"\n  {KEY}  \r\n\r\n{OLD_KEY}", id="crlf-blank-lines"),
        pytest.param(f"{KEY}, \n{OLD_KEY},\n", id="both"),
    ],
)
def test_key_file_is_read(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, content: str) -> None:
    path = tmp_path / "keys.txt"
    path.write_text(content, encoding="utf-8")
    monkeypatch.setenv("MOXY_KEY_FILE", str(path))
    assert load_settings().signing_keys() == [KEY, OLD_KEY]


def test_relative_key_file_is_read_from_the_working_folder(monkeypatch: pytest.MonkeyPatch) -> None:
    Path("moxy.key").write_text(KEY + "\n", encoding="utf-8")
    monkeypatch.setenv("MOXY_KEY_FILE", "moxy.key")
    assert load_settings().signing_keys() == [KEY]


def test_key_wins_over_key_file(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("MOXY_KEY", KEY)
    monkeypatch.setenv("MOXY_KEY_FILE", str(tmp_path / "missing"))
    assert load_settings().signing_keys() == [KEY]


def test_missing_key_file_names_the_setting(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("MOXY_KEY_FILE", str(tmp_path / "missing.key"))
    with pytest.raises(ConfigError) as caught:
        load_settings().signing_keys()
    assert caught.value.setting == "MOXY_KEY_FILE"
    assert "missing.key" in caught.value.message


def test_key_file_that_is_a_folder(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("MOXY_KEY_FILE", str(tmp_path))
    with pytest.raises(ConfigError) as caught:
        load_settings().signing_keys()
    assert caught.value.setting == "MOXY_KEY_FILE"


@pytest.mark.parametrize("content", ["", "\n\n", " , ,\n"])
def test_empty_key_file(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, content: str) -> None:
    path = tmp_path / "keys.txt"
    path.write_text(content, encoding="utf-8")
    monkeypatch.setenv("MOXY_KEY_FILE", str(path))
    with pytest.raises(ConfigError) as caught:
        load_settings().signing_keys()
    assert caught.value.setting == "MOXY_KEY_FILE"


def test_no_key_configured() -> None:
    with pytest.raises(ConfigError) as caught:
        load_settings().signing_keys()
    assert caught.value.setting == "MOXY_KEY"
    assert "keygen" in caught.value.message


@pytest.mark.parametrize(
    ("raw", "position"),
    [("x" * 15, 1), (f"{KEY},tiny-k3y", 2), ("é" * 7, 1), (f"{KEY},{OLD_KEY},{'y' * 15}", 3)],
)
def test_short_key_is_refused(monkeypatch: pytest.MonkeyPatch, raw: str, position: int) -> None:
    monkeypatch.setenv("MOXY_KEY", raw)
    with pytest.raises(ConfigError) as caught:
        load_settings().signing_keys()
    assert caught.value.setting == "MOXY_KEY"
    assert f"key {position}" in caught.value.message and "16" in caught.value.message
    for secret in raw.split(","):
        assert secret not in str(caught.value)


def test_short_key_in_file_names_the_file_setting(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    path = tmp_path / "keys.txt"
    path.write_text(f"{KEY}\nshort\n", encoding="utf-8")
    monkeypatch.setenv("MOXY_KEY_FILE", str(path))
    with pytest.raises(ConfigError) as caught:
        load_settings().signing_keys()
    assert caught.value.setting == "MOXY_KEY_FILE"


@pytest.mark.parametrize("key", ["x" * 16, "é" * 8])
def test_sixteen_byte_key_is_enough(monkeypatch: pytest.MonkeyPatch, key: str) -> None:
    monkeypatch.setenv("MOXY_KEY", key)
    assert load_settings().signing_keys() == [key]


def test_camo_keys_may_be_short_and_several(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MOXY_CAMO_KEY", f"{CAMO_KEY}, other ,")
    assert load_settings().camo_keys() == [CAMO_KEY, "other"]


# -- secrets stay hidden ---------------------------------------------------------------------------

SECRETS = {
    "MOXY_KEY": f"{KEY},{OLD_KEY}",
    "MOXY_CAMO_KEY": CAMO_KEY,
    "MOXY_PURGE_TOKEN": "purge-token-value-42",
    "MOXY_REDIS_URL": "redis://:redis-password-99@127.0.0.1:6379/0",
}


def test_masked_hides_every_secret(monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in SECRETS.items():
        monkeypatch.setenv(name, value)
    settings = load_settings()
    shown = settings.masked()
    for name in SECRETS:
        assert shown[name] == "********"
    flat = repr(shown) + repr(settings) + str(settings)
    for needle in (KEY, OLD_KEY, CAMO_KEY, "purge-token-value-42", "redis-password-99"):
        assert needle not in flat
    assert shown["MOXY_PORT"] == 8080
    assert shown["MOXY_FORWARD_HEADERS"] == "Accept"
    assert shown["MOXY_CACHE_DIR"] == str(user_cache_dir())  # absolute: the user's cache folder, not the working one
    assert set(shown) == {f"MOXY_{name.upper()}" for name in Settings.model_fields}


def test_masked_leaves_unset_secrets_empty() -> None:
    shown = load_settings().masked()
    assert shown["MOXY_KEY"] is None
    assert shown["MOXY_PURGE_TOKEN"] is None


@pytest.mark.parametrize("given", ["auto", "AUTO", " auto "])
def test_workers_auto_is_one_per_available_core(monkeypatch: pytest.MonkeyPatch, given: str) -> None:
    import os

    monkeypatch.setenv("MOXY_WORKERS", given)
    expected = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    assert load_settings().workers == expected
    assert load_settings(workers="3").workers == 3, "a flag still wins"
