"""MOXY_UPSTREAM_PROXY against the real `moxy serve` on loopback, once per upstream engine, with a forward proxy the
tests run (tests/integration/forward_proxy.py): misses go through it, its own address is exempt from the destination
policy while every target and redirect hop is still checked before anything is sent, https goes by a tunnel to the
checked address with the name verified, its credentials are honoured and never shown, and a proxy that is down is a
502 with a good copy still served stale."""

from __future__ import annotations

import ssl
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import trustme

from tests.assets import PNG
from tests.integration import engines
from tests.integration.forward_proxy import ForwardProxy
from tests.integration.moxy_server import MoxyServer
from tests.integration.origin import Origin, Reply

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("upstream_engine")]
upstream_engine = engines.upstream_engine  # once per engine: each speaks to the proxy itself
StartMoxy = Callable[..., MoxyServer]

IMAGE = Reply(headers={"Content-Type": "image/png", "Cache-Control": "max-age=600"}, body=PNG)
PASSWORD = "pr0xy-p@ss:word"  # characters that must be escaped in the URL, and decoded for the proxy


@pytest.fixture
def proxy() -> Iterator[ForwardProxy]:
    with ForwardProxy() as running:
        yield running


@pytest.fixture
def far_origin() -> Iterator[Origin]:
    """The origin on 127.0.0.2: the only network the policy allows, so the proxy's 127.0.0.1 is not."""
    with Origin(host="127.0.0.2") as running:
        yield running


def test_misses_go_through_the_proxy_and_every_hop_is_checked_first(
    proxy: ForwardProxy, far_origin: Origin, start_moxy: StartMoxy
) -> None:
    moxy = start_moxy(upstream_proxy=proxy.url, allowed_networks="127.0.0.2/32")
    far_origin.route("/pic.png", IMAGE)
    first, second = moxy.get(far_origin.url("/pic.png")), moxy.get(far_origin.url("/pic.png"))
    assert (first.status_code, first.content, first.headers["x-moxy-cache"]) == (200, PNG, "MISS")
    assert second.headers["x-moxy-cache"] == "HIT"
    # Plain http: one absolute-form request, by name, through the proxy (its own address is not an allowed network).
    assert proxy.seen == [("GET", far_origin.url("/pic.png"))]
    assert far_origin.hits("/pic.png") == 1

    # A private target is refused before anything is sent: the proxy sees nothing.
    for private in ("http://127.0.0.1:9/secret", "http://169.254.169.254/latest/meta-data/", "http://10.0.0.1/"):
        refused = moxy.get(private)
        assert refused.status_code == 403, refused.text
    assert len(proxy.seen) == 1

    # Redirects through the proxy: each hop checked, then sent through it.
    far_origin.route("/hop", Reply(status=302, headers={"Location": far_origin.url("/pic2.png")}))
    far_origin.route("/pic2.png", IMAGE)
    hopped = moxy.get(far_origin.url("/hop"))
    assert (hopped.status_code, hopped.content) == (200, PNG)
    assert proxy.seen[1:] == [("GET", far_origin.url("/hop")), ("GET", far_origin.url("/pic2.png"))]
    far_origin.route("/escape", Reply(status=302, headers={"Location": "http://127.0.0.1:9/secret"}))
    escaped = moxy.get(far_origin.url("/escape"))
    assert escaped.status_code == 403, escaped.text
    assert proxy.seen[3:] == [("GET", far_origin.url("/escape"))], "the refused hop never reached the proxy"


def test_https_goes_by_a_tunnel_to_the_checked_address(tmp_path: Path, start_moxy: StartMoxy) -> None:
    ca = trustme.CA()
    ca_file = tmp_path / "ca.pem"
    ca_file.write_bytes(ca.cert_pem.bytes())
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("localhost").configure_cert(context)  # the name only: an address in the URL would fail
    server_names: list[str | None] = []
    context.sni_callback = lambda _sock, name, _ctx: server_names.append(name)
    with (
        ForwardProxy(credentials=("moxy", PASSWORD)) as proxy,
        Origin(tls=context) as origin,
    ):
        origin.route("/pic.png", IMAGE)
        moxy = start_moxy(
            upstream_proxy=proxy.url_with("moxy", PASSWORD),
            upstream_ca_file=ca_file,
            allowed_networks="127.0.0.0/8,::1/128",
        )
        answer = moxy.get(origin.url("/pic.png", host="localhost"))
        assert (answer.status_code, answer.content) == (200, PNG), answer.text
        # CONNECT names an address the policy checked (localhost may resolve to ::1 first, where nothing listens:
        # the proxy cannot open that tunnel and the next checked address is tried), never the name; TLS inside
        # the tunnel names and verifies localhost.
        assert proxy.seen and all(method == "CONNECT" for method, _ in proxy.seen)
        assert proxy.seen[-1] == ("CONNECT", f"127.0.0.1:{origin.port}")
        assert not any("localhost" in target for _, target in proxy.seen)
        assert server_names == ["localhost"]
        assert PASSWORD not in moxy.log()


def test_the_proxys_credentials_are_honoured_and_never_shown(
    far_origin: Origin, start_moxy: StartMoxy, tmp_path: Path
) -> None:
    far_origin.route("/pic.png", IMAGE)
    with ForwardProxy(credentials=("moxy", PASSWORD)) as proxy:
        without = start_moxy(tmp_path / "a", upstream_proxy=proxy.url, allowed_networks="127.0.0.2/32")
        refused = without.get(far_origin.url("/pic.png"))
        assert refused.status_code == 502
        assert refused.json()["reason"] == "proxy-refused", refused.text
        assert proxy.refused == [("GET", far_origin.url("/pic.png"))] and proxy.seen == []
        wrong = start_moxy(
            tmp_path / "b", upstream_proxy=proxy.url_with("moxy", "not-" + PASSWORD), allowed_networks="127.0.0.2/32"
        )
        assert wrong.get(far_origin.url("/pic.png")).status_code == 502
        right = start_moxy(
            tmp_path / "c", upstream_proxy=proxy.url_with("moxy", PASSWORD), allowed_networks="127.0.0.2/32"
        )
        answer = right.get(far_origin.url("/pic.png"))
        assert (answer.status_code, answer.content) == (200, PNG)
        assert proxy.seen == [("GET", far_origin.url("/pic.png"))]
        assert far_origin.hits("/pic.png") == 1, "no request reached the origin without the proxy's consent"
        for moxy in (without, wrong, right):
            assert PASSWORD not in moxy.log()
        assert PASSWORD not in refused.text


def test_a_proxy_that_is_down_is_a_502_and_a_good_copy_is_served_stale(
    proxy: ForwardProxy, far_origin: Origin, start_moxy: StartMoxy
) -> None:
    moxy = start_moxy(
        upstream_proxy=proxy.url, allowed_networks="127.0.0.2/32", ttl_min=0, stale_while_revalidate=0, negative_ttl=0
    )
    far_origin.route("/pic.png", Reply(headers={"Content-Type": "image/png", "Cache-Control": "max-age=1"}, body=PNG))
    far_origin.route("/other.png", IMAGE)
    assert moxy.get(far_origin.url("/pic.png")).headers["x-moxy-cache"] == "MISS"
    proxy.stop()
    time.sleep(2.1)  # stale for sure (Date has whole seconds)
    stale = moxy.get(far_origin.url("/pic.png"))
    assert (stale.status_code, stale.content, stale.headers["x-moxy-cache"]) == (200, PNG, "STALE")
    failed = moxy.get(far_origin.url("/other.png"))
    assert failed.status_code == 502, failed.text
    assert failed.json()["reason"] == "proxy-failed"
    assert far_origin.hits("/other.png") == 0
