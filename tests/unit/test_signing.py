"""Signed URL formats, key ring, sign and verify (moxy.signing).

Expected URLs come from an independent implementation written here straight from the native format,
`{base}/{b64url(HMAC-SHA256(key, url [+ "\\n" + exp]))}/{b64url(url)}[?e={exp}]` (and, for the legacy forms, from
camo's and go-camo's published algorithms), never from moxy.signing."""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import string
from urllib.parse import quote

import pytest
from click.testing import CliRunner
from hypothesis import example, given, settings, strategies as st

from moxy.cli import main as moxy_command
from moxy.errors import BadSignature, ConfigError, ExpiredURL, MalformedURL, UnsignableURL, VerificationError
from moxy.signing import Signer, VerifiedURL, check_signable, expiry_bucket, sign_url
from tests.assets import CAMO_KEY, KEY, OLD_KEY

BASE = "https://cdn.example.com"
NOW = 1_700_000_000
B64URL_ALPHABET = string.ascii_letters + string.digits + "-_"

URLS = [
    pytest.param("https://example.com/pic.png", id="ascii"),
    pytest.param("http://example.com:8081/a/b.jpg?size=large&v=2#frag", id="ascii-port-query"),
    pytest.param("https://example.com/a%20b/%E2%9C%93.png?q=%2F%3F%26", id="percent-encoded"),
    pytest.param("https://example.com/café/ñandú.png?q=日本語&emoji=🦊", id="non-ascii-path"),
    pytest.param("https://bücher.example/straße.gif", id="non-ascii-host"),
    pytest.param("HTTPS://EXAMPLE.COM/UPPER", id="upper-scheme"),
]


@pytest.fixture(autouse=True)
def _isolated_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: os.PathLike[str]) -> None:
    for name in list(os.environ):
        if name.upper().startswith("MOXY_"):
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)


# -- the independent implementation ------------------------------------------------------------


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode("ascii").rstrip("=")


def reference_sign(url: str, key: str | bytes, base_url: str, exp: int | None = None) -> str:
    """The native format, written out by hand."""
    key_bytes = key.encode("utf-8") if isinstance(key, str) else key
    message = url.encode("utf-8")
    if exp is not None:
        message += b"\n" + str(exp).encode("ascii")
    digest = _b64(hmac.new(key_bytes, message, hashlib.sha256).digest())
    signed = f"{base_url.rstrip('/')}/{digest}/{_b64(url.encode('utf-8'))}"
    return signed if exp is None else f"{signed}?e={exp}"


def _sha1(key: str, url: str) -> bytes:
    return hmac.new(key.encode("utf-8"), url.encode("utf-8"), hashlib.sha1).digest()


def camo_hex_path(url: str, key: str = CAMO_KEY) -> str:
    return f"/{_sha1(key, url).hex()}/{url.encode('utf-8').hex()}"


def camo_hex_query(url: str, key: str = CAMO_KEY) -> str:
    return f"/{_sha1(key, url).hex()}?url={quote(url, safe='')}"


def go_camo_base64(url: str, key: str = CAMO_KEY) -> str:
    return f"/{_b64(_sha1(key, url))}/{_b64(url.encode('utf-8'))}"


def fixed_clock(now: float) -> Signer:
    return Signer(keys=[KEY], base_url=BASE, clock=lambda: now)


# -- the format itself ---------------------------------------------------------------------------


def test_pinned_vector() -> None:
    # Pinned bytes (cross-checked with `openssl dgst -sha256 -hmac`) so the format cannot drift unnoticed.
    url = "https://example.com/pic.png"
    expected = (
        "https://cdn.example.com/cgupmeSrztbK6IWdNrjDbDlU2hohwaUwbKdH2c-b2A8/aHR0cHM6Ly9leGFtcGxlLmNvbS9waWMucG5n"
    )
    assert reference_sign(url, KEY, BASE) == expected
    assert Signer([KEY], BASE).sign(url) == expected
    expiring = reference_sign(url, KEY, BASE, exp=NOW + 60)
    assert expiring == (
        "https://cdn.example.com/wtMANmHj67Y99xRSgGiL5-KSB4im0ub_kDF5HUm1bvM"
        "/aHR0cHM6Ly9leGFtcGxlLmNvbS9waWMucG5n?e=1700000060"
    )
    assert fixed_clock(NOW).sign(url, expires_in=60, exact=True) == expiring


@pytest.mark.parametrize("url", URLS)
def test_sign_matches_reference(url: str) -> None:
    signer = fixed_clock(NOW)
    signed = signer.sign(url)
    assert signed == reference_sign(url, KEY, BASE)
    digest = signed.split("/")[-2]
    assert len(digest) == 43 and "=" not in signed
    assert sign_url(url, KEY, BASE) == signed


@pytest.mark.parametrize("url", URLS)
@pytest.mark.parametrize("expires_in", [1, 3600, 86400 * 365])
def test_sign_with_expiry_matches_reference(url: str, expires_in: int) -> None:
    signed = fixed_clock(NOW).sign(url, expires_in=expires_in, exact=True)
    assert signed == reference_sign(url, KEY, BASE, exp=NOW + expires_in)
    assert signed.endswith(f"?e={NOW + expires_in}")


def test_sign_with_absolute_expiry() -> None:
    url = "https://example.com/x.png"
    assert fixed_clock(NOW).sign(url, expires_at=NOW + 5) == reference_sign(url, KEY, BASE, exp=NOW + 5)
    assert sign_url(url, KEY, BASE, expires_at=NOW + 5) == reference_sign(url, KEY, BASE, exp=NOW + 5)


@pytest.mark.parametrize("expires_in", [1, 59, 60, 600, 3600, 86400, 30 * 86400])
def test_an_expiry_is_rounded_up_to_its_bucket(expires_in: int) -> None:
    url = "https://example.com/pic.png"
    bucket = expiry_bucket(expires_in)
    assert bucket == max(60, expires_in // 10)
    signed = fixed_clock(NOW).sign(url, expires_in=expires_in)
    exp = int(signed.rpartition("?e=")[2])
    assert exp % bucket == 0
    assert NOW + expires_in <= exp < NOW + expires_in + bucket  # valid at least as long as asked, at most a bucket more
    assert signed == reference_sign(url, KEY, BASE, exp=exp)


def signer_at(moment: float) -> Signer:
    return Signer([KEY], BASE, clock=lambda: moment)


def test_pages_rendered_within_one_bucket_share_one_url() -> None:
    url = "https://example.com/pic.png"
    # An hour's expiry is rounded up to 360 s: signing times in (edge - 360, edge] give the same URL.
    edge = (NOW // 360 + 20) * 360 - 3600
    urls = {signer_at(moment).sign(url, expires_in=3600) for moment in range(edge - 359, edge + 1, 7)}
    assert len(urls) == 1, "a CDN or browser can cache what does not change"
    later = signer_at(edge + 1).sign(url, expires_in=3600)
    assert later not in urls  # the next bucket: a new URL, valid an hour from then
    exact = {signer_at(moment).sign(url, expires_in=3600, exact=True) for moment in (edge - 7, edge)}
    assert len(exact) == 2


def test_an_expiry_already_past_is_kept_as_given() -> None:
    # Nothing to round up: an already expired link (an operator's test of the 410) must stay expired.
    assert fixed_clock(NOW).sign("https://example.com/", expires_in=-5).endswith(f"?e={NOW - 5}")


def test_fractional_clock_truncates_expiry() -> None:
    signed = Signer([KEY], BASE, clock=lambda: NOW + 0.9).sign("https://example.com/", expires_in=10, exact=True)
    assert signed.endswith(f"?e={NOW + 10}")


def test_expiry_arguments_conflict() -> None:
    with pytest.raises(ValueError, match="not both"):
        fixed_clock(NOW).sign("https://example.com/", expires_in=5, expires_at=NOW + 5)
    with pytest.raises(ValueError, match="unix time"):
        sign_url("https://example.com/", KEY, BASE, expires_at=-1)


def test_expiry_range_is_what_verification_reads() -> None:
    url = "https://example.com/far.png"
    latest = 10**12 - 1  # 12 digits: the most the verifier reads
    assert fixed_clock(NOW).verify_full(fixed_clock(NOW).sign(url, expires_at=latest)).expires_at == latest
    with pytest.raises(ExpiredURL) as caught:
        fixed_clock(NOW).verify(fixed_clock(NOW).sign(url, expires_at=0))
    assert caught.value.expired_at == 0
    assert caught.value.url == url, "the good signature still says which URL (purge needs it)"
    for too_late in (latest + 1, 2**63):
        with pytest.raises(ValueError, match="unix time"):
            fixed_clock(NOW).sign(url, expires_at=too_late)
    with pytest.raises(ValueError, match="unix time"):
        fixed_clock(NOW).sign(url, expires_in=10**13)


@pytest.mark.parametrize("base_url", [BASE, BASE + "/", BASE + "//"])
def test_trailing_slash_of_base_url_is_ignored(base_url: str) -> None:
    url = "https://example.com/a.png"
    signer = Signer([KEY], base_url)
    assert signer.base_url == BASE
    assert signer.sign(url) == reference_sign(url, KEY, BASE)
    assert sign_url(url, KEY, base_url) == reference_sign(url, KEY, BASE)


def test_base_url_with_a_path_round_trips() -> None:
    signer = Signer([KEY], "https://www.example.com/img/")
    signed = signer.sign("https://upstream.example/p.png")
    assert signed.startswith("https://www.example.com/img/")
    assert signer.verify(signed) == "https://upstream.example/p.png"


def test_bytes_keys_equal_str_keys() -> None:
    url = "https://example.com/p.png"
    assert Signer([KEY.encode()], BASE).sign(url) == Signer([KEY], BASE).sign(url)


def test_repr_hides_keys() -> None:
    shown = repr(Signer([KEY, OLD_KEY], BASE))
    assert KEY not in shown and OLD_KEY not in shown
    assert "2 hidden" in shown


# -- what may be signed -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "why"),
    [
        ("", "empty"),
        ("example.com/pic.png", "scheme: none"),
        ("not a url", "whitespace"),
        ("//example.com/pic.png", "scheme: none"),
        ("ftp://example.com/pic.png", "scheme: ftp"),
        ("file:///etc/passwd", "scheme: file"),
        ("javascript:alert(1)", "scheme: javascript"),
        ("data:image/png;base64,AAAA", "scheme: data"),
        ("http://", "no host"),
        ("https:///pic.png", "no host"),
        ("https://example.com/a b.png", "whitespace"),
        (" https://example.com/a.png", "whitespace"),
        ("https://example.com/a.png\n", "whitespace"),
        ("https://example.com/\ta.png", "whitespace"),
        ("https://example.com/\x00.png", "control"),
        ("https://example.com/\x7f.png", "control"),
        ("https://example.com/\x85.png", "control"),
        ("https://example.com/\u00a0.png", "whitespace"),
        ("https://example.com/\u2028.png", "whitespace"),
        ("https://example.com/\u3000.png", "whitespace"),
        ("https://example.com:99999/a.png", "bad port"),
        ("https://example.com:port/a.png", "bad port"),
        ("http://[::1/pic.png", "not a URL"),
        ("http://[example.com]/pic.png", "not a URL"),
        ("https://a\u2100b.example/pic.png", "not a URL"),  # NFKC turns the host into "aa/cb.example"
    ],
)
def test_unsignable_urls_are_refused_with_a_reason(url: str, why: str) -> None:
    with pytest.raises(UnsignableURL, match=why):
        Signer([KEY], BASE).sign(url)
    with pytest.raises(ValueError):  # UnsignableURL is also a ValueError
        check_signable(url)


def test_signable_url_is_returned_unchanged() -> None:
    url = "HTTP://Example.COM:80/./a/../b?x=1&x=2#f"
    assert check_signable(url) is url
    # No silent rewriting: the exact string given is what gets signed.
    assert Signer([KEY], BASE).verify(Signer([KEY], BASE).sign(url)) == url


# -- keys ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "keys",
    [
        pytest.param([], id="none"),
        pytest.param(["x" * 15], id="15-bytes"),
        pytest.param([KEY, "short"], id="second-short"),
        pytest.param(["é" * 7], id="14-bytes-utf8"),
        pytest.param([b"\x00" * 15], id="15-raw-bytes"),
    ],
)
def test_weak_key_rings_are_refused(keys: list[str | bytes]) -> None:
    with pytest.raises(ConfigError) as caught:
        Signer(keys, BASE)
    assert caught.value.setting == "MOXY_KEY"


@pytest.mark.parametrize("key", ["x" * 16, "é" * 8, b"\xff" * 16])
def test_sixteen_byte_keys_are_enough(key: str | bytes) -> None:
    url = "https://example.com/a.png"
    signer = Signer([key], BASE)
    assert signer.sign(url) == reference_sign(url, key, BASE)


def test_sign_url_refuses_short_key() -> None:
    with pytest.raises(ConfigError, match="16"):
        sign_url("https://example.com/a.png", "short", BASE)


def test_rotation_old_key_second_still_verifies() -> None:
    url = "https://example.com/old.png"
    published = Signer([OLD_KEY], BASE).sign(url)
    rotated = Signer([KEY, OLD_KEY], BASE)
    assert rotated.verify(published) == url
    # The first key signs.
    assert rotated.sign(url) == reference_sign(url, KEY, BASE)
    assert rotated.sign(url) != published
    # Once the old key leaves the ring its URLs stop verifying.
    with pytest.raises(BadSignature):
        Signer([KEY], BASE).verify(published)


@pytest.mark.parametrize("position", [0, 1, 2])
def test_any_key_of_the_ring_verifies(position: int) -> None:
    ring = [f"ring-key-number-{i}-padding" for i in range(3)]
    url = "https://example.com/r.png"
    assert Signer(ring, BASE).verify(reference_sign(url, ring[position], BASE)) == url


def test_from_env_reads_moxy_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MOXY_KEY", f"{KEY},{OLD_KEY}")
    monkeypatch.setenv("MOXY_BASE_URL", BASE + "/")
    monkeypatch.setenv("MOXY_CAMO_KEY", CAMO_KEY)
    signer = Signer.from_env()
    url = "https://example.com/env.png"
    assert signer.sign(url) == reference_sign(url, KEY, BASE)
    assert signer.verify(reference_sign(url, OLD_KEY, BASE)) == url
    assert signer.verify(camo_hex_path(url)) == url


def test_from_env_without_key_is_a_config_error() -> None:
    with pytest.raises(ConfigError) as caught:
        Signer.from_env()
    assert caught.value.setting == "MOXY_KEY"


# -- verification ---------------------------------------------------------------------------------


@pytest.mark.parametrize("url", URLS)
def test_verify_round_trips(url: str) -> None:
    signer = fixed_clock(NOW)
    assert signer.verify(signer.sign(url)) == url
    full = signer.verify_full(signer.sign(url, expires_in=60, exact=True))
    assert full == VerifiedURL(url, NOW + 60, "native")
    rounded = signer.verify_full(signer.sign(url, expires_in=60))
    assert rounded.url == url and rounded.expires_at is not None
    assert rounded.expires_at % 60 == 0 and NOW + 60 <= rounded.expires_at < NOW + 120


def test_verify_accepts_a_bare_path_and_a_trailing_slash() -> None:
    url = "https://example.com/a.png"
    signed = fixed_clock(NOW).sign(url)
    path = signed[len(BASE) :]
    assert fixed_clock(NOW).verify(path) == url
    assert fixed_clock(NOW).verify(signed + "/") == url
    assert fixed_clock(NOW).verify_path(path.lstrip("/")).url == url


def test_expiry_boundaries() -> None:
    url = "https://example.com/soon.png"
    exp = NOW + 100
    signed = reference_sign(url, KEY, BASE, exp=exp)
    assert fixed_clock(exp - 1).verify(signed) == url
    assert fixed_clock(exp - 0.001).verify(signed) == url
    for now in (exp, exp + 0.5, exp + 1, exp + 10**6):
        with pytest.raises(ExpiredURL) as caught:
            fixed_clock(now).verify(signed)
        assert caught.value.expired_at == exp
        assert str(exp) in str(caught.value)
        assert "2023-11-14T22:15:00Z" in caught.value.reason  # the same instant, for humans


def test_tampered_expired_url_is_a_bad_signature_not_expired() -> None:
    signed = reference_sign("https://example.com/x", KEY, BASE, exp=NOW)
    with pytest.raises(BadSignature):
        fixed_clock(NOW - 10).verify(signed.replace(f"e={NOW}", f"e={NOW + 10**6}"))


@pytest.mark.parametrize(
    "path",
    [
        pytest.param("", id="empty"),
        pytest.param("/", id="root"),
        pytest.param("/onlyonesegment", id="one-segment"),
        pytest.param("/a/b/c", id="three-segments"),
        pytest.param("/" + "A" * 42 + "/aHR0cHM6Ly9leGFtcGxlLmNvbS8", id="digest-42"),
        pytest.param("/" + "A" * 44 + "/aHR0cHM6Ly9leGFtcGxlLmNvbS8", id="digest-44"),
        pytest.param("/" + "A" * 42 + "=/aHR0cHM6Ly9leGFtcGxlLmNvbS8", id="digest-padded"),
        pytest.param("/" + "A" * 42 + "+/aHR0cHM6Ly9leGFtcGxlLmNvbS8", id="digest-std-alphabet"),
        pytest.param("/" + "A" * 43 + "/aHR0cHM6Ly9leGFtcGxlLmNvbS8=", id="encoded-padded"),
        pytest.param("/" + "A" * 43 + "/aHR0cHM6Ly9leGFtcGxlLmNvbS8ab", id="encoded-length-1-mod-4"),
        pytest.param("/" + "A" * 43 + "/aHR0cHM6Ly9leGFt+GxlLmNvbS8", id="encoded-std-alphabet"),
        pytest.param("/" + "A" * 43 + "/_w", id="encoded-not-utf8"),
        pytest.param("/" + "A" * 43 + "/aHR0cHM6Ly9leGFtcGxlLmNvbS8?e=abc", id="expiry-not-number"),
        pytest.param("/" + "A" * 43 + "/aHR0cHM6Ly9leGFtcGxlLmNvbS8?e=-5", id="expiry-negative"),
        pytest.param("/" + "A" * 43 + "/aHR0cHM6Ly9leGFtcGxlLmNvbS8?e=", id="expiry-empty"),
        pytest.param("/" + "A" * 43 + "/aHR0cHM6Ly9leGFtcGxlLmNvbS8?e=1&e=2", id="expiry-twice"),
        pytest.param("/" + "A" * 43 + "/aHR0cHM6Ly9leGFtcGxlLmNvbS8?e=1234567890123", id="expiry-too-long"),
        pytest.param("/" + "A" * 43 + "/aHR0cHM6Ly9leGFtcGxlLmNvbS8?e=%D9%A1", id="expiry-arabic-digit"),
    ],
)
def test_malformed_paths(path: str) -> None:
    with pytest.raises(MalformedURL):
        fixed_clock(NOW).verify(path)


def test_non_canonical_base64_spellings_are_refused() -> None:
    # A 43-character digest carries 2 spare bits; so does an encoded URL whose length is 3 mod 4.
    url = "https://example.com/"  # 20 bytes -> 27 characters, 2 spare bits
    signed = reference_sign(url, KEY, BASE)
    digest, encoded = signed[len(BASE) + 1 :].split("/")
    flipped_digest = digest[:-1] + B64URL_ALPHABET[B64URL_ALPHABET.index(digest[-1]) ^ 1]
    flipped_encoded = encoded[:-1] + B64URL_ALPHABET[B64URL_ALPHABET.index(encoded[-1]) ^ 1]
    assert base64.urlsafe_b64decode(flipped_digest + "=") == base64.urlsafe_b64decode(digest + "=")
    assert base64.urlsafe_b64decode(flipped_encoded + "=") == url.encode()
    signer = fixed_clock(NOW)
    assert signer.verify(signed) == url
    for tampered in (f"/{flipped_digest}/{encoded}", f"/{digest}/{flipped_encoded}"):
        with pytest.raises(MalformedURL, match="base64url"):
            signer.verify(tampered)


# -- the signed message is unambiguous ---------------------------------------------------------------------


def repack_as_never_expiring(signed: str) -> str:
    """The repack attack: an expiring URL's message is the URL, a newline and the expiry, so its digest also
    fits a never-expiring URL whose encoded URL is those very bytes."""
    head, _, exp = signed.partition("?e=")
    base, digest, encoded = head.rsplit("/", 2)
    message = base64.urlsafe_b64decode(encoded + "=" * (-len(encoded) % 4)) + b"\n" + exp.encode("ascii")
    return f"{base}/{digest}/{_b64(message)}"


@pytest.mark.parametrize("url", URLS)
def test_expired_url_repacked_as_never_expiring_is_refused(url: str) -> None:
    signed = reference_sign(url, KEY, BASE, exp=NOW)
    later = fixed_clock(NOW + 3600)
    with pytest.raises(ExpiredURL):
        later.verify(signed)
    repacked = repack_as_never_expiring(signed)
    # Same message, same digest: the repacked URL is what a signer would make for the URL "url\nexp".
    assert repacked == reference_sign(f"{url}\n{NOW}", KEY, BASE)
    for signer in (later, Signer([OLD_KEY, KEY], BASE, camo_keys=[CAMO_KEY], clock=lambda: NOW + 3600)):
        with pytest.raises(MalformedURL, match="whitespace or control characters"):
            signer.verify(repacked)
        with pytest.raises(MalformedURL):
            signer.verify_path(repacked[len(BASE) :])


@pytest.mark.parametrize(
    "moxy_url",
    [
        pytest.param(
            repack_as_never_expiring(reference_sign("https://example.com/pic.png", KEY, BASE, exp=NOW)), id="repacked"
        ),
        pytest.param("http://[/x", id="unbalanced-bracket"),  # was a traceback (urlsplit's ValueError)
    ],
)
def test_cli_verify_refuses_with_exit_1(moxy_url: str) -> None:
    result = CliRunner().invoke(moxy_command, ["verify", moxy_url], env={"MOXY_KEY": KEY}, catch_exceptions=False)
    assert result.exit_code == 1, result.stdout
    assert result.stdout == ""
    assert result.stderr.startswith("moxy: refused: ") and len(result.stderr.splitlines()) == 1


@pytest.mark.parametrize(
    ("url", "why"),
    [
        pytest.param("https://example.com/a.png\n1700000000", "whitespace", id="newline-expiry"),
        pytest.param("https://example.com/a b.png", "whitespace", id="space"),
        pytest.param("https://example.com/\x00.png", "control", id="nul"),
        pytest.param("https://example.com/\u2028.png", "whitespace", id="line-separator"),
        pytest.param("ftp://example.com/a.png", "scheme: ftp", id="ftp"),
        pytest.param("javascript:alert(1)", "scheme: javascript", id="javascript"),
        pytest.param("https:///a.png", "no host", id="no-host"),
        pytest.param("https://example.com:99999/a.png", "bad port", id="bad-port"),
    ],
)
@pytest.mark.parametrize("exp", [None, NOW + 60], ids=["forever", "expiring"])
def test_correctly_signed_but_unsignable_native_urls_are_refused(url: str, why: str, exp: int | None) -> None:
    # The digest is right (computed here by hand), but sign would have refused the URL, so verify does too.
    with pytest.raises(UnsignableURL):
        sign_url(url, KEY, BASE, expires_at=exp)
    with pytest.raises(MalformedURL, match=why):
        fixed_clock(NOW).verify(reference_sign(url, KEY, BASE, exp=exp))


@pytest.mark.parametrize("expiry", [f"0{NOW + 60}", "00", "+5", " 5", "5 ", "٣", "1e3", "0x10"])
def test_correctly_signed_expiry_the_signer_never_writes_is_refused(expiry: str) -> None:
    # The signer writes str() of an integer, so any other spelling, however signed, is not a Moxy URL.
    url = "https://example.com/a.png"
    digest = _b64(hmac.new(KEY.encode(), f"{url}\n{expiry}".encode(), hashlib.sha256).digest())
    with pytest.raises(MalformedURL, match="expiry"):
        fixed_clock(NOW).verify(f"{BASE}/{digest}/{_b64(url.encode())}?e={quote(expiry, safe='')}")


@pytest.mark.parametrize(
    "moxy_url",
    [
        pytest.param("http://[/x", id="unbalanced-bracket"),
        pytest.param("https://a\u2100b/" + "A" * 43 + "/aHR0cHM6Ly9leGFtcGxlLmNvbS8", id="nfkc-host"),
    ],
)
def test_unparseable_url_is_a_malformed_url_not_a_crash(moxy_url: str) -> None:
    # Found by the property tests: urlsplit's ValueError escaped verify (and `moxy verify` showed a traceback).
    with pytest.raises(MalformedURL):
        camo_signer().verify(moxy_url)


@pytest.mark.parametrize(
    ("path", "query"),
    [
        pytest.param("/" + "a" * 39 + "\n/" + "61" * 20, "", id="hex-digest-trailing-newline"),
        pytest.param("/" + "a" * 40 + "/616\n", "", id="hex-url-trailing-newline"),
        pytest.param("/" + "a" * 39 + "\n", "url=http%3A%2F%2Fexample.com%2F", id="query-digest-trailing-newline"),
    ],
)
def test_request_path_with_a_trailing_newline_is_a_malformed_url_not_a_crash(path: str, query: str) -> None:
    # Found by the property tests: a request path is percent-decoded, so %0A arrives as a newline, which a
    # "^...$" pattern let through to bytes.fromhex (ValueError). urlsplit drops newlines, so only
    # verify_path sees them.
    with pytest.raises(MalformedURL):
        camo_signer().verify_path(path, query)


# -- tampering ---------------------------------------------------------------------------------------

TAMPER_ALPHABET = B64URL_ALPHABET + "=/?&%.+~ é"


@pytest.mark.parametrize("expires", [None, NOW + 3600], ids=["forever", "expiring"])
def test_every_single_character_change_is_refused(expires: int | None) -> None:
    url = "https://example.com/some/picture.png?size=2"
    signed = reference_sign(url, KEY, BASE, exp=expires)
    signer = fixed_clock(NOW)
    assert signer.verify(signed) == url
    tail = signed[len(BASE) + 1 :]  # digest, "/", encoded URL and the expiry: everything signed or checked
    checked = 0
    for position, original in enumerate(tail):
        for replacement in TAMPER_ALPHABET:
            if replacement == original:
                continue
            tampered = f"{BASE}/{tail[:position]}{replacement}{tail[position + 1 :]}"
            with pytest.raises(VerificationError):
                signer.verify(tampered)
            checked += 1
    assert checked > 100 * len(TAMPER_ALPHABET)


@pytest.mark.parametrize("expires", [None, NOW + 3600], ids=["forever", "expiring"])
def test_truncations_are_refused(expires: int | None) -> None:
    signed = reference_sign("https://example.com/some/picture.png", KEY, BASE, exp=expires)
    signer = fixed_clock(NOW)
    stop = signed.index("?") if expires else len(signed)
    for end in range(len(BASE) + 1, stop):
        with pytest.raises(VerificationError):
            signer.verify(signed[:end])
    if expires:  # cutting the expiry short, or dropping it, changes the signed message
        for end in range(stop, len(signed)):
            with pytest.raises(VerificationError):
                signer.verify(signed[:end])


# -- hypothesis ------------------------------------------------------------------------------------------


def _no_space(text: str) -> bool:
    return not any(char.isspace() for char in text)


_url_text = st.text(alphabet=st.characters(exclude_categories=("Cc", "Cs", "Zs", "Zl", "Zp")), max_size=24).filter(
    _no_space
)
_label = st.text(alphabet=string.ascii_lowercase + string.digits + "-éüжß漢", min_size=1, max_size=10)
_hosts = st.one_of(
    st.lists(_label, min_size=1, max_size=3).map(".".join),
    st.ip_addresses(v=4).map(str),
    st.ip_addresses(v=6).map(lambda address: f"[{address}]"),
)
_ports = st.one_of(st.just(""), st.integers(0, 65535).map(lambda port: f":{port}"))
_queries = st.one_of(st.just(""), _url_text.map(lambda query: "?" + query))
http_urls = st.builds(
    lambda scheme, host, port, path, query: f"{scheme}://{host}{port}/{path}{query}",
    st.sampled_from(["http", "https", "HTTP", "Https"]),
    _hosts,
    _ports,
    _url_text,
    _queries,
)
keys = st.one_of(
    st.binary(min_size=16, max_size=64),
    st.text(alphabet=st.characters(exclude_categories=["Cs"]), min_size=16, max_size=40),
)


@given(url=http_urls, key=keys, exp=st.one_of(st.none(), st.integers(NOW + 1, 10**12 - 1)))
@example(url="https://example.com/日本?q=é", key="x" * 16, exp=None)
def test_round_trip_property(url: str, key: str | bytes, exp: int | None) -> None:
    signer = Signer([key], BASE, clock=lambda: NOW)
    signed = signer.sign(url, expires_at=exp)
    assert signed == reference_sign(url, key, BASE, exp=exp)
    assert signer.verify_full(signed) == VerifiedURL(url, exp, "native")


@given(url=http_urls, other=http_urls)
def test_signature_of_one_url_never_verifies_another(url: str, other: str) -> None:
    signer = Signer([KEY], BASE)
    digest = signer.sign(url).split("/")[-2]
    forged = f"{BASE}/{digest}/{_b64(other.encode('utf-8'))}"
    if other == url:
        assert signer.verify(forged) == url
    else:
        with pytest.raises(VerificationError):
            signer.verify(forged)


@settings(max_examples=300)
@given(url=http_urls, data=st.data())
def test_random_single_character_change_is_refused(url: str, data: st.DataObject) -> None:
    signer = Signer([KEY], BASE, clock=lambda: NOW)
    exp = data.draw(st.one_of(st.none(), st.just(NOW + 60)))
    signed = signer.sign(url, expires_at=exp)
    tail = signed[len(BASE) + 1 :]
    position = data.draw(st.integers(0, len(tail) - 1))
    replacement = data.draw(st.sampled_from(TAMPER_ALPHABET).filter(lambda char: char != tail[position]))
    with pytest.raises(VerificationError):
        signer.verify(f"{BASE}/{tail[:position]}{replacement}{tail[position + 1 :]}")


@given(url=http_urls, key=keys, other_key=keys)
def test_a_different_key_is_refused(url: str, key: str | bytes, other_key: str | bytes) -> None:
    as_bytes = key.encode() if isinstance(key, str) else key
    other_bytes = other_key.encode() if isinstance(other_key, str) else other_key
    signed = Signer([key], BASE).sign(url)
    if as_bytes == other_bytes:
        assert Signer([other_key], BASE).verify(signed) == url
    else:
        with pytest.raises(BadSignature):
            Signer([other_key], BASE).verify(signed)


# -- camo-compatible forms -------------------------------------------------------------------------

CAMO_URLS = [
    pytest.param("http://example.com/pic.png", id="ascii"),
    pytest.param("https://example.com/a%20b.png?x=%2F&y=1", id="percent-encoded"),
    pytest.param("https://example.com/café/图片.png?q=ñ", id="non-ascii"),
]
CAMO_FORMS = [
    pytest.param(camo_hex_path, "camo-hex-path", id="hex-path"),
    pytest.param(camo_hex_query, "camo-hex-query", id="hex-query"),
    pytest.param(go_camo_base64, "camo-base64", id="go-camo-base64"),
]


def camo_signer(camo_keys: list[str] | None = None) -> Signer:
    return Signer([KEY], BASE, camo_keys=[CAMO_KEY] if camo_keys is None else camo_keys, clock=lambda: NOW)


def test_camo_vectors_have_the_published_shapes() -> None:
    url = "http://example.com/pic.png"
    expected_sha1 = hmac.new(b"short-camo-key", b"http://example.com/pic.png", "sha1").hexdigest()
    assert camo_hex_path(url) == f"/{expected_sha1}/687474703a2f2f6578616d706c652e636f6d2f7069632e706e67"
    assert camo_hex_query(url) == f"/{expected_sha1}?url=http%3A%2F%2Fexample.com%2Fpic.png"
    digest, encoded = go_camo_base64(url)[1:].split("/")
    assert len(digest) == 27 and "=" not in encoded
    assert encoded == "aHR0cDovL2V4YW1wbGUuY29tL3BpYy5wbmc"


@pytest.mark.parametrize("url", CAMO_URLS)
@pytest.mark.parametrize(("form", "name"), CAMO_FORMS)
def test_camo_forms_verify_with_camo_keys(url: str, form: object, name: str) -> None:
    path = form(url)  # type: ignore[operator]
    for moxy_url in (path, BASE + path):
        assert camo_signer().verify_full(moxy_url) == VerifiedURL(url, None, name)


@pytest.mark.parametrize(("form", "name"), CAMO_FORMS)
def test_camo_forms_tolerate_a_trailing_slash(form: object, name: str) -> None:
    url = "http://example.com/pic.png"
    path: str = form(url)  # type: ignore[operator]
    if "?" in path:
        slashed = path.replace("?", "/?", 1)
    else:
        slashed = path + "/"
    assert camo_signer().verify_full(slashed).form == name


@pytest.mark.parametrize(("form", "name"), CAMO_FORMS)
def test_camo_forms_refused_without_camo_keys(form: object, name: str) -> None:
    with pytest.raises(VerificationError):
        camo_signer(camo_keys=[]).verify(form("http://example.com/pic.png"))  # type: ignore[operator]


@pytest.mark.parametrize(("form", "name"), CAMO_FORMS)
def test_camo_forms_refused_under_another_camo_key(form: object, name: str) -> None:
    with pytest.raises(BadSignature):
        camo_signer(camo_keys=["some-other-camo-key"]).verify(form("http://example.com/pic.png"))  # type: ignore[operator]


def test_camo_rotation_accepts_any_camo_key() -> None:
    url = "http://example.com/pic.png"
    signer = Signer([KEY], BASE, camo_keys=["newer-camo", CAMO_KEY])
    assert signer.verify(camo_hex_path(url)) == url
    assert signer.verify(go_camo_base64(url, key="newer-camo")) == url


def test_camo_keys_and_native_keys_do_not_mix() -> None:
    url = "http://example.com/pic.png"
    signer = camo_signer()
    # A native URL made with the camo key is refused: camo keys never sign (or vouch for) native URLs.
    with pytest.raises(BadSignature):
        signer.verify(reference_sign(url, CAMO_KEY, BASE))
    # A camo form made with the native key is refused: the native key only speaks the native format.
    for form in (camo_hex_path, camo_hex_query, go_camo_base64):
        with pytest.raises(BadSignature):
            signer.verify(form(url, key=KEY))


def test_camo_key_cannot_sign() -> None:
    with pytest.raises(ConfigError):
        Signer([CAMO_KEY], BASE)


def _hex_digest(url: str) -> str:
    return _sha1(CAMO_KEY, url).hex()


def _b64_digest(url: str) -> str:
    return _b64(_sha1(CAMO_KEY, url))


MIXED_URL = "http://example.com/pic.png"


@pytest.mark.parametrize(
    "path",
    [
        pytest.param(f"/{_hex_digest(MIXED_URL)}/{_b64(MIXED_URL.encode())}", id="hex-digest-b64-url"),
        pytest.param(f"/{_b64_digest(MIXED_URL)}/{MIXED_URL.encode().hex()}", id="b64-digest-hex-url"),
        pytest.param(f"/{_b64_digest(MIXED_URL)}?url={quote(MIXED_URL, safe='')}", id="b64-digest-query"),
        pytest.param(f"/{_hex_digest(MIXED_URL)}/{quote(MIXED_URL, safe='')}", id="hex-digest-raw-url"),
    ],
)
def test_mixed_camo_forms_are_refused(path: str) -> None:
    with pytest.raises(VerificationError):
        camo_signer().verify(path)


@pytest.mark.parametrize(
    "path",
    [
        pytest.param(f"/{_hex_digest(MIXED_URL)[:-1]}/{MIXED_URL.encode().hex()}", id="hex-digest-short"),
        pytest.param(f"/{_hex_digest(MIXED_URL)}/{MIXED_URL.encode().hex()[:-1]}", id="hex-url-odd"),
        pytest.param(f"/{_hex_digest(MIXED_URL)}/{MIXED_URL.encode().hex()[:-2]}", id="hex-url-short"),
        pytest.param(f"/{_hex_digest(MIXED_URL)}?url={quote(MIXED_URL[:-1], safe='')}", id="query-url-short"),
        pytest.param(f"/{_hex_digest(MIXED_URL)[:-2]}?url={quote(MIXED_URL, safe='')}", id="query-digest-short"),
        pytest.param(f"/{_hex_digest(MIXED_URL)}?url=", id="query-empty"),
        pytest.param(f"/{_hex_digest(MIXED_URL)}", id="digest-only"),
        pytest.param(f"/{_b64_digest(MIXED_URL)[:-1]}/{_b64(MIXED_URL.encode())}", id="b64-digest-short"),
        pytest.param(f"/{_b64_digest(MIXED_URL)}/{_b64(MIXED_URL.encode())[:-1]}", id="b64-url-short"),
        pytest.param(f"/{_b64_digest(MIXED_URL)}/{_b64(MIXED_URL.encode())[:-2]}", id="b64-url-shorter"),
        pytest.param(f"/{_b64_digest(MIXED_URL)}=/{_b64(MIXED_URL.encode())}", id="b64-digest-padded"),
    ],
)
def test_truncated_camo_forms_are_refused(path: str) -> None:
    with pytest.raises(VerificationError):
        camo_signer().verify(path)


def test_camo_query_form_with_two_urls_is_refused() -> None:
    digest = _hex_digest(MIXED_URL)
    with pytest.raises(MalformedURL):
        camo_signer().verify(f"/{digest}?url={quote(MIXED_URL, safe='')}&url={quote(MIXED_URL, safe='')}")


@pytest.mark.parametrize(
    "url",
    [
        pytest.param("ftp://example.com/pic.png", id="ftp"),
        pytest.param("http://example.com/a b", id="space"),
        pytest.param("javascript:alert(1)", id="javascript"),
    ],
)
@pytest.mark.parametrize(("form", "name"), CAMO_FORMS)
def test_camo_signed_but_unsignable_urls_are_refused(url: str, form: object, name: str) -> None:
    # A correctly signed legacy URL still has to name an http(s) destination Moxy could have signed.
    with pytest.raises(MalformedURL):
        camo_signer().verify(form(url))  # type: ignore[operator]


def test_camo_non_utf8_url_is_refused() -> None:
    raw = b"http://example.com/\xff"
    digest = hmac.new(CAMO_KEY.encode(), raw, hashlib.sha1)
    with pytest.raises(MalformedURL, match="UTF-8"):
        camo_signer().verify(f"/{digest.hexdigest()}/{raw.hex()}")
    with pytest.raises(MalformedURL, match="UTF-8"):
        camo_signer().verify(f"/{_b64(digest.digest())}/{_b64(raw)}")


def _value_changing_substitutes(char: str, alphabet: str) -> list[str]:
    # Hex is read case-insensitively (go-camo does too), so 'a' -> 'A' names the same bytes; skip those.
    return [other for other in alphabet if other.lower() != char.lower()]


@pytest.mark.parametrize(("form", "name"), CAMO_FORMS)
def test_every_single_character_change_of_a_camo_url_is_refused(form: object, name: str) -> None:
    url = "http://example.com/pic.png"
    path: str = form(url)  # type: ignore[operator]
    signer = camo_signer()
    assert signer.verify(path) == url
    head, separator, rest = path[1:].partition("?" if name == "camo-hex-query" else "/")
    alphabet = B64URL_ALPHABET if name == "camo-base64" else string.hexdigits.lower()
    # The query form's URL is checked through its digest (changing it is covered by the mixed/truncated tables).
    pieces = [head] if name == "camo-hex-query" else [head, rest]
    for index, piece in enumerate(pieces):
        for position, original in enumerate(piece):
            for replacement in _value_changing_substitutes(original, alphabet):
                changed = pieces.copy()
                changed[index] = piece[:position] + replacement + piece[position + 1 :]
                tampered = "/" + (changed[0] + separator + rest if name == "camo-hex-query" else "/".join(changed))
                with pytest.raises(VerificationError):
                    signer.verify(tampered)


@given(url=http_urls, data=st.data())
def test_camo_query_url_change_is_refused(url: str, data: st.DataObject) -> None:
    other = data.draw(http_urls.filter(lambda candidate: candidate != url))
    with pytest.raises(VerificationError):
        camo_signer().verify(f"/{_hex_digest(url)}?url={quote(other, safe='')}")
    assert camo_signer().verify(camo_hex_query(url)) == url
