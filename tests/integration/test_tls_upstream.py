"""https:// upstreams against a real Moxy: certificates from a private CA given in MOXY_UPSTREAM_CA_FILE are trusted
in addition to the system's store, the name checked is the URL's host (while the connection goes to the address the
policy checked), and every certificate fault is a 502 `tls-error` that is never stored."""

from __future__ import annotations

import datetime
import ssl
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import trustme
from pydantic import SecretStr

from moxy.config import Settings
from moxy.errors import ConfigError
from moxy.policy import DestinationPolicy
from moxy.upstream import Upstream
from tests.assets import PNG
from tests.integration import engines
from tests.integration.moxy_server import MoxyServer
from tests.integration.origin import Origin, Reply

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("upstream_engine")]
upstream_engine = engines.upstream_engine  # once per engine: the module proves the wire
StartMoxy = Callable[..., MoxyServer]

SECURITY_HEADERS = {
    "x-content-type-options": "nosniff",
    "content-security-policy": "default-src 'none'; img-src data:; style-src 'unsafe-inline'; sandbox",
    "x-frame-options": "deny",
    "referrer-policy": "no-referrer",
}


class TLSKit:
    """Three unrelated CAs and the server contexts the tests need, with the CA files written to `folder`."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.ca = trustme.CA()  # given to Moxy in MOXY_UPSTREAM_CA_FILE
        self.system_ca = trustme.CA()  # plays the system store (SSL_CERT_FILE) in the "added, not replaced" test
        self.stranger_ca = trustme.CA()  # trusted by nobody
        self.ca_file = self._write("extra-ca.pem", self.ca.cert_pem.bytes())
        self.system_ca_file = self._write("system-ca.pem", self.system_ca.cert_pem.bytes())

    def _write(self, name: str, data: bytes) -> Path:
        path = self.folder / name
        path.write_bytes(data)
        return path

    @staticmethod
    def server_context(leaf: trustme.LeafCert) -> ssl.SSLContext:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        leaf.configure_cert(context)
        return context

    def good(self) -> ssl.SSLContext:
        return self.server_context(self.ca.issue_cert("localhost", "127.0.0.1"))

    def name_only(self) -> ssl.SSLContext:
        """Valid for the name localhost only: connecting by IP address must fail the name check."""
        return self.server_context(self.ca.issue_cert("localhost"))

    def wrong_name(self) -> ssl.SSLContext:
        return self.server_context(self.ca.issue_cert("wrong.example"))

    def untrusted(self) -> ssl.SSLContext:
        return self.server_context(self.stranger_ca.issue_cert("localhost", "127.0.0.1"))

    def expired(self) -> ssl.SSLContext:
        # Right CA, right names, valid a month ago: expiry is the only fault.
        now = datetime.datetime.now(datetime.UTC)
        leaf = self.ca.issue_cert(
            "localhost",
            "127.0.0.1",
            not_before=now - datetime.timedelta(days=30),
            not_after=now - datetime.timedelta(days=1),
        )
        return self.server_context(leaf)

    def system(self) -> ssl.SSLContext:
        return self.server_context(self.system_ca.issue_cert("localhost", "127.0.0.1"))


@pytest.fixture(scope="module")
def kit(tmp_path_factory: pytest.TempPathFactory) -> TLSKit:
    return TLSKit(tmp_path_factory.mktemp("tls"))


@pytest.fixture(scope="module")
def moxy(kit: TLSKit, tmp_path_factory: pytest.TempPathFactory, upstream_engine: str) -> Iterator[MoxyServer]:
    # negative_ttl=0: a failure is not remembered, so "never cached" shows as a second connection attempt.
    cache = tmp_path_factory.mktemp("moxy") / "cache"
    with MoxyServer(cache, upstream_ca_file=kit.ca_file, negative_ttl=0, upstream_engine=upstream_engine) as server:
        yield server


def reaches(read: Callable[[], int], value: int, seconds: float = 3.0) -> bool:
    """Whether `read()` equals `value` within `seconds` (a counter the origin's thread updates a moment later)."""
    deadline = time.monotonic() + seconds
    while read() != value:
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def assert_security_headers(answer: object) -> None:
    headers = answer.headers  # type: ignore[attr-defined]
    for name, value in SECURITY_HEADERS.items():
        assert headers.get(name) == value, (name, dict(headers))


def test_trusted_ca_serves_with_the_name_verified_and_the_address_pinned(kit: TLSKit, moxy: MoxyServer) -> None:
    context = kit.name_only()
    server_names: list[str | None] = []
    context.sni_callback = lambda _sock, name, _ctx: server_names.append(name)
    with Origin(tls=context) as origin:
        origin.route("/pic.png", Reply(headers={"Content-Type": "image/png"}, body=PNG))
        # "localhost" goes through the policy's resolution; the connection lands on the checked loopback address
        # (the only one the origin listens on) and the certificate is checked against the URL's name.
        answer = moxy.get(origin.url("/pic.png", host="localhost"))
        assert answer.status_code == 200, answer.text
        assert answer.content == PNG
        assert answer.headers["x-moxy-cache"] == "MISS"
        assert_security_headers(answer)
        assert server_names == ["localhost"]  # SNI is the URL's host, not the pinned address
        assert origin.requests[-1].headers["host"] == f"localhost:{origin.port}"
        assert moxy.get(origin.url("/pic.png", host="localhost")).headers["x-moxy-cache"] == "HIT"
        # The same server reached by its address: the certificate names only "localhost", so the check must fail.
        # Had Moxy verified the pinned address instead of the name, the first answer would have failed as well.
        by_address = moxy.get(origin.url("/pic.png", host="127.0.0.1"))
        assert by_address.status_code == 502
        assert by_address.json() == {"error": "UpstreamError", "reason": "tls-error"}


@pytest.mark.parametrize("fault", ["untrusted", "wrong_name", "expired"])
def test_certificate_faults_are_502_tls_error_and_never_stored(kit: TLSKit, moxy: MoxyServer, fault: str) -> None:
    bad: ssl.SSLContext = getattr(kit, fault)()
    with Origin(tls=bad) as origin:
        origin.route("/pic.png", Reply(headers={"Content-Type": "image/png"}, body=PNG))
        url = origin.url("/pic.png", host="localhost")
        for attempt in (1, 2):
            answer = moxy.get(url)
            assert answer.status_code == 502, answer.text
            assert answer.json() == {"error": "UpstreamError", "reason": "tls-error"}
            assert_security_headers(answer)
            # Each request tries again (nothing stored, nothing remembered), and never gets past the handshake.
            assert origin.connections == attempt
            assert reaches(lambda: origin.tls_failures, attempt)  # the origin notices the abort a moment later
            assert origin.hits("/pic.png") == 0
        # The upstream fixes its certificate: the next answer is the real one, not a shadow of the failure.
        origin.tls = kit.good()
        healed = moxy.get(url)
        assert healed.status_code == 200, healed.text
        assert healed.content == PNG
        assert healed.headers["x-moxy-cache"] == "MISS"


def test_extra_cas_are_added_to_the_system_trust_not_replacing_it(
    kit: TLSKit, start_moxy: StartMoxy, monkeypatch: pytest.MonkeyPatch
) -> None:
    # OpenSSL's default store honours SSL_CERT_FILE: here it stands in for the system bundle, so one run shows an
    # upstream signed by a "public" CA and one signed by the extra CA both verifying, and a stranger still refused.
    monkeypatch.setenv("SSL_CERT_FILE", str(kit.system_ca_file))
    moxy = start_moxy(upstream_ca_file=kit.ca_file)
    cases = [(kit.system(), 200), (kit.good(), 200), (kit.untrusted(), 502)]
    for context, status in cases:
        with Origin(tls=context) as origin:
            origin.route("/pic.png", Reply(headers={"Content-Type": "image/png"}, body=PNG))
            answer = moxy.get(origin.url("/pic.png", host="localhost"))
            assert answer.status_code == status, answer.text
            if status == 502:
                assert answer.json()["reason"] == "tls-error"
            else:
                assert answer.content == PNG


def test_the_fetchers_context_keeps_the_system_store(kit: TLSKit, tmp_path: Path) -> None:
    upstream = Upstream(
        policy=DestinationPolicy.from_settings_values(("127.0.0.0/8",), (), ()),
        connect_timeout=1,
        read_timeout=1,
        total_timeout=1,
        max_body_bytes=1024,
        max_redirects=0,
        user_agent="Moxy/test",
        spool_dir=tmp_path,
        ca_file=kit.ca_file,
    )
    context = upstream.ssl_context
    assert context is not None
    assert context.verify_mode == ssl.CERT_REQUIRED and context.check_hostname
    subjects = [str(cert["subject"]) for cert in context.get_ca_certs()]
    assert any("trustme" in subject for subject in subjects)  # the extra CA is there
    system = ssl.create_default_context().cert_store_stats()["x509_ca"]
    if Path(ssl.get_default_verify_paths().cafile or "/nonexistent").is_file():
        assert system > 0
    # The extra CA comes on top of whatever the system store loaded eagerly, never instead of it.
    assert context.cert_store_stats()["x509_ca"] == system + 1


@pytest.mark.parametrize(
    "content, problem",
    [(None, "cannot read"), (b"", "no PEM certificate"), (b"-----BEGIN CERTIFICATE-----\nbroken\n", "no PEM")],
)
def test_an_unusable_ca_file_is_a_config_error_naming_the_setting(
    tmp_path: Path, content: bytes | None, problem: str
) -> None:
    path = tmp_path / "ca.pem"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(ConfigError) as caught:
        Settings(key=SecretStr("k" * 32), upstream_ca_file=path).check()
    assert caught.value.setting == "MOXY_UPSTREAM_CA_FILE"
    assert problem in caught.value.message


def test_a_good_ca_file_passes_the_check(kit: TLSKit) -> None:
    Settings(key=SecretStr("k" * 32), upstream_ca_file=kit.ca_file).check()
