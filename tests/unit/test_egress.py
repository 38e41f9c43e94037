"""moxy.upstream.egress: MOXY_UPSTREAM_PROXY's URL, read once, with every refusal a message that never repeats it
(it may hold the proxy's password), and the CONNECT request both engines' tunnels start with."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import SecretStr

from moxy.app import Plan
from moxy.config import Settings
from moxy.errors import ConfigError
from moxy.upstream.egress import ForwardProxy, connect_request
from tests.assets import KEY

SECRET = "s3cret/p@ss"


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("http://proxy.internal:3128", ForwardProxy("proxy.internal", 3128)),
        ("http://10.0.0.5", ForwardProxy("10.0.0.5", 80)),
        ("HTTP://[fd00::1]:8080/", ForwardProxy("fd00::1", 8080)),
        ("http://moxy:s3cret%2Fp%40ss@proxy:3128", ForwardProxy("proxy", 3128, "moxy", SECRET)),
        ("http://moxy@proxy:3128", ForwardProxy("proxy", 3128, "moxy", None)),
    ],
)
def test_proxy_urls(url: str, expected: ForwardProxy) -> None:
    proxy = ForwardProxy.from_url(url)
    assert (proxy.host, proxy.port, proxy.username, proxy.password) == (
        expected.host,
        expected.port,
        expected.username,
        expected.password,
    )
    assert "@" not in proxy.url and SECRET not in repr(proxy)


def test_basic_credentials_and_the_connect_request() -> None:
    proxy = ForwardProxy.from_url("http://moxy:s3cret%2Fp%40ss@proxy:3128")
    assert proxy.authorization == "Basic bW94eTpzM2NyZXQvcEBzcw=="  # base64 of "moxy:s3cret/p@ss"
    assert connect_request("203.0.113.7", 443, proxy) == (
        b"CONNECT 203.0.113.7:443 HTTP/1.1\r\nHost: 203.0.113.7:443\r\n"
        b"Proxy-Authorization: Basic bW94eTpzM2NyZXQvcEBzcw==\r\n\r\n"
    )
    assert connect_request("2001:db8::1", 8443, ForwardProxy("proxy", 3128)) == (
        b"CONNECT [2001:db8::1]:8443 HTTP/1.1\r\nHost: [2001:db8::1]:8443\r\n\r\n"
    )
    assert ForwardProxy("proxy", 3128).authorization is None


@pytest.mark.parametrize(
    "url",
    [
        f"https://moxy:{SECRET}@proxy:3128",
        f"socks5://moxy:{SECRET}@proxy:1080",
        f"http://moxy:{SECRET}@proxy:99999",
        f"http://moxy:{SECRET}@proxy:3128/path",
        f"http://moxy:{SECRET}@:3128",
        "proxy:3128",
    ],
)
def test_a_bad_proxy_url_stops_the_start_naming_the_setting_not_the_password(tmp_path: Path, url: str) -> None:
    settings = Settings(key=SecretStr(KEY), cache_dir=tmp_path, upstream_proxy=SecretStr(url))
    with pytest.raises(ConfigError) as caught:
        Plan.of(settings, quiet=True)
    assert str(caught.value).startswith("MOXY_UPSTREAM_PROXY: ")
    assert SECRET not in str(caught.value) and "s3cret" not in str(caught.value)


def test_the_plan_carries_the_proxy(tmp_path: Path) -> None:
    settings = Settings(key=SecretStr(KEY), cache_dir=tmp_path, upstream_proxy=SecretStr("http://u:p@proxy:3128"))
    assert Plan.of(settings, quiet=True).proxy == ForwardProxy("proxy", 3128, "u", "p")
    assert Plan.of(Settings(key=SecretStr(KEY), cache_dir=tmp_path), quiet=True).proxy is None
