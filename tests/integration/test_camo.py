"""Camo and go-camo URLs served by a real Moxy (the camo-compatible formats).

The legacy URLs are built here from camo's and go-camo's published algorithms, never with moxy.signing:
HMAC-SHA1 over the upstream URL's UTF-8 bytes, then either hex digest + hex URL (path form), hex digest +
percent-encoded `url` parameter (query form), or unpadded base64url digest + unpadded base64url URL (go-camo)."""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from urllib.parse import quote

import httpx
import pytest

from tests.assets import KEY, PNG
from tests.integration.moxy_server import MoxyServer
from tests.integration.origin import Origin, Reply

pytestmark = pytest.mark.integration

# Real deployments used short keys (camo's own README shows one like the first); both are below Moxy's
# 16-byte minimum for native keys, and MOXY_CAMO_KEY holds several, comma-separated.
LEGACY_KEY = "0x24FEEDFACEDEADBEEFCAFE"
SHORT_KEY = "secret"
CAMO_KEYS = f"{LEGACY_KEY},{SHORT_KEY}"
WRONG_KEY = "not-the-camo-key"


Form = Callable[[str, str], str]


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode("ascii").rstrip("=")


def _sha1(key: str, url: str) -> bytes:
    return hmac.new(key.encode("utf-8"), url.encode("utf-8"), hashlib.sha1).digest()


def camo_hex_path(url: str, key: str) -> str:
    return f"/{_sha1(key, url).hex()}/{url.encode('utf-8').hex()}"


def camo_hex_query(url: str, key: str) -> str:
    return f"/{_sha1(key, url).hex()}?url={quote(url, safe='')}"


def go_camo(url: str, key: str) -> str:
    return f"/{_b64(_sha1(key, url))}/{_b64(url.encode('utf-8'))}"


FORMS = [
    pytest.param(camo_hex_path, id="camo-hex-path"),
    pytest.param(camo_hex_query, id="camo-hex-query"),
    pytest.param(go_camo, id="go-camo-base64"),
]


def _png(tag: str) -> bytes:
    """A PNG-looking body distinct per route, so a wrong route shows in the bytes."""
    return PNG + tag.encode("utf-8")


# Upstream paths and the target the origin must see for each. Non-ASCII in the path reaches the origin
# percent-encoded (UTF-8) whether the published URL carried it raw or already encoded.
PATHS = [
    pytest.param("/plain.png", "/plain.png", id="ascii"),
    pytest.param("/q.png?w=10&h=20&label=a%2Bb%20c", "/q.png?w=10&h=20&label=a%2Bb%20c", id="query-string"),
    pytest.param("/caf%C3%A9/%C3%B1and%C3%BA.png", "/caf%C3%A9/%C3%B1and%C3%BA.png", id="non-ascii-encoded"),
    pytest.param("/café/ñandú.png", "/caf%C3%A9/%C3%B1and%C3%BA.png", id="non-ascii-raw"),
]
ORIGIN_ROUTES = ("/plain.png", "/q.png", "/caf%C3%A9/%C3%B1and%C3%BA.png", "/never.png")


@pytest.fixture(scope="module")
def http() -> Iterator[httpx.Client]:
    with httpx.Client(timeout=30) as client:
        yield client


@pytest.fixture(scope="module")
def camo_origin() -> Iterator[Origin]:
    with Origin() as running:
        for path in ORIGIN_ROUTES:
            running.route(path, Reply(headers={"Content-Type": "image/png"}, body=_png(path)))
        yield running


@pytest.fixture(scope="module")
def camo_moxy(camo_origin: Origin, tmp_path_factory: pytest.TempPathFactory) -> Iterator[MoxyServer]:
    with MoxyServer(tmp_path_factory.mktemp("camo") / "cache", camo_key=CAMO_KEYS) as server:
        yield server


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("key", [LEGACY_KEY, SHORT_KEY])
@pytest.mark.parametrize(("path", "seen"), PATHS)
def test_camo_forms_are_served(
    http: httpx.Client, camo_origin: Origin, camo_moxy: MoxyServer, form: Form, key: str, path: str, seen: str
) -> None:
    url = camo_origin.url(path)
    answer = http.get(camo_moxy.base_url + form(url, key), timeout=30)
    assert answer.status_code == 200, answer.text
    assert answer.content == _png(seen.split("?", 1)[0])
    assert answer.headers["content-type"] == "image/png"
    assert answer.headers["x-moxy-cache"] in ("MISS", "HIT")
    # The origin saw exactly the URL that was signed: the query survives, non-ASCII arrives as UTF-8 escapes.
    targets = {request.path for request in camo_origin.requests}
    assert seen in targets


@pytest.mark.parametrize("form", FORMS)
def test_trailing_slash_after_the_encoded_url_is_tolerated(
    http: httpx.Client, camo_origin: Origin, camo_moxy: MoxyServer, form: Form
) -> None:
    signed = form(camo_origin.url("/plain.png"), SHORT_KEY)
    path, _, query = signed.partition("?")
    slashed = f"{path}/" + (f"?{query}" if query else "")
    answer = http.get(camo_moxy.base_url + slashed, timeout=30)
    assert answer.status_code == 200, answer.text
    assert answer.content == _png("/plain.png")


def _refused(http: httpx.Client, moxy: MoxyServer, path: str) -> httpx.Response:
    answer = http.get(moxy.base_url + path, timeout=30)
    assert answer.status_code in (400, 403), (path, answer.status_code, answer.text)
    assert answer.headers["cache-control"] == "no-store"
    assert set(answer.json()) == {"error", "reason"}
    return answer


def _mixed_forms(url: str) -> dict[str, str]:
    digest = _sha1(SHORT_KEY, url)
    hex_url, b64_url = url.encode("utf-8").hex(), _b64(url.encode("utf-8"))
    return {
        "hex-digest-base64-url": f"/{digest.hex()}/{b64_url}",
        "base64-digest-hex-url": f"/{_b64(digest)}/{hex_url}",
        "base64-digest-query-url": f"/{_b64(digest)}?url={quote(url, safe='')}",
    }


def _truncated_forms(url: str) -> dict[str, str]:
    digest = _sha1(SHORT_KEY, url)
    hex_url, b64_url = url.encode("utf-8").hex(), _b64(url.encode("utf-8"))
    return {
        "hex-digest-short-by-one": f"/{digest.hex()[:-1]}/{hex_url}",
        "hex-digest-short-by-two": f"/{digest.hex()[:-2]}/{hex_url}",
        "hex-url-short-by-one": f"/{digest.hex()}/{hex_url[:-1]}",
        "hex-url-short-by-two": f"/{digest.hex()}/{hex_url[:-2]}",
        "query-digest-short": f"/{digest.hex()[:-2]}?url={quote(url, safe='')}",
        "query-url-short": f"/{digest.hex()}?url={quote(url[:-1], safe='')}",
        "query-url-empty": f"/{digest.hex()}?url=",
        "base64-digest-short": f"/{_b64(digest)[:-1]}/{b64_url}",
        "base64-url-short-by-one": f"/{_b64(digest)}/{b64_url[:-1]}",
        "base64-url-short-by-four": f"/{_b64(digest)}/{b64_url[:-4]}",
        "digest-only": f"/{digest.hex()}",
    }


def test_mixed_truncated_and_wrongly_keyed_forms_are_refused(
    http: httpx.Client, camo_origin: Origin, camo_moxy: MoxyServer
) -> None:
    url = camo_origin.url("/never.png")
    cases = {**_mixed_forms(url), **_truncated_forms(url)}
    for name, form in (("hex-path", camo_hex_path), ("hex-query", camo_hex_query), ("go-camo", go_camo)):
        cases[f"{name}-wrong-key"] = form(url, WRONG_KEY)
    for name, path in cases.items():
        answer = _refused(http, camo_moxy, path)
        assert answer.headers["x-content-type-options"] == "nosniff", name
        if name.endswith("wrong-key"):
            assert answer.status_code == 403, name
    assert camo_origin.hits("/never.png") == 0
    # The same URL correctly signed is served: the refusals above were about the forms, not the URL.
    assert http.get(camo_moxy.base_url + go_camo(url, SHORT_KEY), timeout=30).content == _png("/never.png")


def test_camo_signature_never_stands_in_for_a_native_one(
    http: httpx.Client, camo_origin: Origin, camo_moxy: MoxyServer
) -> None:
    # A camo HMAC-SHA1 digest (any encoding) on a native-length slot, and a native URL keyed with the camo key.
    url = camo_origin.url("/never.png")
    before = camo_origin.hits("/never.png")
    digest_sha256_under_camo_key = hmac.new(SHORT_KEY.encode(), url.encode(), hashlib.sha256).digest()
    _refused(http, camo_moxy, f"/{_b64(digest_sha256_under_camo_key)}/{_b64(url.encode('utf-8'))}")
    assert camo_origin.hits("/never.png") == before


def test_camo_forms_are_refused_without_a_camo_key(http: httpx.Client, camo_origin: Origin, tmp_path: Path) -> None:
    url = camo_origin.url("/never.png")
    before = camo_origin.hits("/never.png")
    with MoxyServer(tmp_path / "cache") as moxy:
        for form in (camo_hex_path, camo_hex_query, go_camo):
            for key in (LEGACY_KEY, SHORT_KEY):
                _refused(http, moxy, form(url, key))
        # The native form still works on this server.
        assert moxy.get(url).status_code == 200
    assert camo_origin.hits("/never.png") == before + 1


def test_short_camo_key_is_accepted_with_a_warning_at_start(camo_moxy: MoxyServer) -> None:
    # Short legacy keys are accepted, with a warning at start. The warning must name the
    # setting and must not leak the key.
    log = camo_moxy.log()
    not_access_log = [line for line in log.splitlines() if not line.startswith('{"time"')]
    assert any("MOXY_CAMO_KEY" in line for line in not_access_log), not_access_log
    assert LEGACY_KEY not in log


# -- moxy verify ---------------------------------------------------------------------------------------


def _verify(moxy_url: str, camo_key: str | None) -> subprocess.CompletedProcess[str]:
    env = {name: value for name, value in os.environ.items() if not name.startswith("MOXY_")}
    env.update({"MOXY_KEY": KEY, "PYTHONUTF8": "1"})
    if camo_key is not None:
        env["MOXY_CAMO_KEY"] = camo_key
    return subprocess.run(
        [sys.executable, "-m", "moxy", "verify", moxy_url],
        env=env,
        capture_output=True,
        text=True,
        encoding="utf-8",
        timeout=30,
    )


@pytest.mark.parametrize("form", FORMS)
def test_moxy_verify_understands_camo_forms(form: Form) -> None:
    url = "http://images.example.com/café/pic.png?size=2&x=a%2Bb"
    camo_url = "http://127.0.0.1:8080" + form(url, SHORT_KEY)
    done = _verify(camo_url, CAMO_KEYS)
    assert done.returncode == 0, done.stderr
    assert done.stdout == url + "\n"
    refused = _verify(camo_url, None)
    assert refused.returncode == 1
    assert refused.stdout == ""
    assert refused.stderr.startswith("moxy: refused:")
    assert len(refused.stderr.strip().splitlines()) == 1
    wrong = _verify(camo_url, WRONG_KEY)
    assert wrong.returncode == 1 and "signature" in wrong.stderr
