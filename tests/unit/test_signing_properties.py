"""Properties of signed-URL parsing and verification (moxy.signing), over generated input.

- Whatever arrives, verify answers with a URL or one of the documented VerificationError subclasses.
- Nothing sign refuses ever verifies, in any form, even under a correct signature.
- Every URL sign accepts verifies back to itself, under every key of a ring, with and without expiry.

Signed forms are built here by computing the HMAC directly (never through moxy.signing), so a URL the signer
refuses can still be given a correct signature. Runs are derandomized and bounded so the file takes seconds."""

from __future__ import annotations

import base64
import hashlib
import hmac
import string
from urllib.parse import quote, urlsplit

import pytest
from hypothesis import HealthCheck, example, given, settings, strategies as st

from moxy.errors import ExpiredURL, MalformedURL, UnsignableURL, VerificationError
from moxy.signing import MAX_EXPIRES_AT, Signer, VerifiedURL, check_signable

RING = ("ring-key-number-0-padding", b"\xff\x00raw-bytes-key-1\x00\xff", "ring-key-número-2-ünïcode")
CAMO_RING = ("short-camo-key", "second-camo-key-for-rotation")
BASE = "https://cdn.example.com"
BASE_WITH_PATH = "https://www.example.com/img"
NOW = 1_700_000_000
B64URL_ALPHABET = string.ascii_letters + string.digits + "-_"

# Fixed and bounded: the same examples on every run, and a few seconds for the whole file.
fast = settings(
    max_examples=100,
    derandomize=True,
    database=None,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)


# -- the signed forms, by hand ---------------------------------------------------------------------


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode("ascii").rstrip("=")


def _key(key: str | bytes) -> bytes:
    return key.encode("utf-8") if isinstance(key, str) else key


def native(url: bytes, key: str | bytes, exp: str | None = None, base: str = BASE) -> str:
    """A native Moxy URL with a correct digest over any URL bytes and any expiry spelling."""
    message = url if exp is None else url + b"\n" + exp.encode("utf-8")
    signed = f"{base}/{_b64(hmac.new(_key(key), message, hashlib.sha256).digest())}/{_b64(url)}"
    return signed if exp is None else f"{signed}?e={quote(exp, safe='')}"


def _sha1(key: str, url: bytes) -> bytes:
    return hmac.new(key.encode("utf-8"), url, hashlib.sha1).digest()


def camo_forms(url: bytes, key: str) -> list[str]:
    """The three legacy forms (camo hex path, camo hex query, go-camo base64) with correct digests."""
    digest = _sha1(key, url)
    forms = [f"{BASE}/{digest.hex()}/{url.hex()}", f"{BASE}/{_b64(digest)}/{_b64(url)}"]
    try:  # the query form carries text, so only UTF-8 URLs have one
        forms.append(f"{BASE}/{digest.hex()}?url={quote(url.decode('utf-8'), safe='')}")
    except UnicodeDecodeError:
        pass
    return forms


def ring_signer(*, camo: bool = True, base: str = BASE, now: float = NOW) -> Signer:
    return Signer(list(RING), base, camo_keys=list(CAMO_RING) if camo else [], clock=lambda: now)


def sign_refuses(url: str) -> bool:
    try:
        check_signable(url)
    except UnsignableURL:
        return True
    return False


def assert_documented_answer(signer: Signer, call: str, *args: str) -> None:
    """The one property of every answer: a URL the signer would sign, or a VerificationError."""
    try:
        verified = getattr(signer, call)(*args)
    except VerificationError as exc:
        assert isinstance(exc.reason, str) and exc.reason
        return
    url = verified if isinstance(verified, str) else verified.url
    assert check_signable(url) == url


# -- strategies ------------------------------------------------------------------------------------

_text = st.text(alphabet=st.characters(exclude_categories=["Cs"]), max_size=40)
_url_text = st.text(
    alphabet=st.characters(exclude_categories=("Cc", "Cs", "Zs", "Zl", "Zp"), exclude_characters="\x85"), max_size=20
).filter(lambda text: not any(char.isspace() for char in text))
_label = st.text(alphabet=string.ascii_lowercase + string.digits + "-éжß漢", min_size=1, max_size=8)
_hosts = st.one_of(
    st.lists(_label, min_size=1, max_size=3).map(".".join),
    st.ip_addresses(v=4).map(str),
    st.ip_addresses(v=6).map(lambda address: f"[{address}]"),
)
_userinfo = st.one_of(st.just(""), st.from_regex(r"[a-z0-9]{1,6}(:[a-z0-9%]{0,6})?@", fullmatch=True))
_ports = st.one_of(st.just(""), st.integers(0, 65535).map(lambda port: f":{port}"))
_suffixes = st.tuples(
    _url_text.map(lambda path: "/" + path),
    st.one_of(st.just(""), _url_text.map(lambda query: "?" + query)),
    st.one_of(st.just(""), _url_text.map(lambda fragment: "#" + fragment)),
).map("".join)

# URLs the signer accepts (the filter drops the rare host that urlsplit itself refuses).
signable_urls = st.builds(
    lambda scheme, userinfo, host, port, rest: f"{scheme}://{userinfo}{host}{port}{rest}",
    st.sampled_from(["http", "https", "HTTP", "hTTps"]),
    _userinfo,
    _hosts,
    _ports,
    _suffixes,
).filter(lambda url: not sign_refuses(url))

_forbidden_chars = st.one_of(
    st.characters(max_codepoint=0x20),
    st.sampled_from("\x7f\x85\xa0\u1680\u2000\u2007\u200a\u2028\u2029\u202f\u205f\u3000"),
    st.characters(min_codepoint=0x80, max_codepoint=0x9F),
)


@st.composite
def with_forbidden_char(draw: st.DrawFn) -> str:
    url = draw(signable_urls)
    position = draw(st.integers(0, len(url)))
    return url[:position] + draw(_forbidden_chars) + url[position:]


@st.composite
def repacked_expiry(draw: st.DrawFn) -> str:
    """The ambiguity itself: a URL spelled `url + "\\n" + exp`, which is an expiring URL's whole message."""
    return f"{draw(signable_urls)}\n{draw(st.integers(0, MAX_EXPIRES_AT))}"


@st.composite
def other_scheme(draw: st.DrawFn) -> str:
    scheme = draw(st.sampled_from(["ftp", "file", "javascript", "data", "gopher", "httpx", "ws", "h", ""]))
    rest = urlsplit(draw(signable_urls))
    return f"{scheme}:" + draw(st.sampled_from([f"//{rest.netloc}{rest.path}", rest.path, "alert(1)"]))


no_host = st.tuples(st.sampled_from(["http://", "https://", "http:///", "https://@", "http://:80"]), _suffixes).map(
    "".join
)
bad_port = st.tuples(
    st.sampled_from(["http://example.com:", "https://[::1]:"]),
    st.one_of(st.integers(65536, 10**9).map(str), st.from_regex(r"[a-z+-]{1,5}", fullmatch=True)),
    _suffixes,
).map("".join)
no_scheme = st.tuples(st.sampled_from(["", "//", "/"]), _hosts, _suffixes).map("".join)

# URLs the signer refuses, each kind on purpose, plus arbitrary text that happens to be refused.
refused_urls = st.one_of(
    with_forbidden_char(),
    repacked_expiry(),
    other_scheme(),
    no_host,
    bad_port,
    no_scheme,
    _text,
).filter(sign_refuses)
# URL bytes no signer could have signed: refused URLs, and bytes that are not UTF-8 at all.
refused_url_bytes = st.one_of(
    refused_urls.map(lambda url: url.encode("utf-8")),
    st.binary(max_size=40).filter(lambda raw: not _utf8(raw)),
)


def _utf8(raw: bytes) -> bool:
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def _random_digest() -> st.SearchStrategy[str]:
    return st.one_of(
        st.binary(min_size=32, max_size=32).map(_b64),
        st.binary(min_size=20, max_size=20).map(lambda raw: raw.hex()),
        st.binary(min_size=20, max_size=20).map(_b64),
        st.text(alphabet=B64URL_ALPHABET, min_size=26, max_size=44),
        st.text(alphabet=string.hexdigits, min_size=39, max_size=41),
        _text,
    )


_encoded = st.one_of(
    st.binary(max_size=60).map(_b64),
    st.binary(max_size=60).map(lambda raw: raw.hex()),
    signable_urls.map(lambda url: _b64(url.encode("utf-8"))),
    signable_urls.map(lambda url: url.encode("utf-8").hex()),
    st.text(alphabet=string.hexdigits, max_size=60),
    st.text(alphabet=B64URL_ALPHABET + "=+/%.", max_size=60),
    _text,
)
# A request path arrives percent-decoded, so a segment may end in a newline (%0A) or other whitespace.
_segments = st.tuples(
    st.one_of(_random_digest(), _encoded), st.sampled_from(["", "", "", "\n", " ", "\t", "\x00"])
).map("".join)
_expiry_strings = st.one_of(
    st.integers(-(10**13), 10**13).map(str),
    st.from_regex(r"0[0-9]{1,12}", fullmatch=True),
    st.text(alphabet=string.digits + " +-_.eE٣\n", max_size=14),
    _text,
)
_queries = st.one_of(
    st.just(""),
    _expiry_strings.map(lambda exp: f"e={quote(exp, safe='')}"),
    st.tuples(_expiry_strings, _expiry_strings).map(lambda pair: f"e={pair[0]}&e={pair[1]}"),
    st.builds(lambda url: f"url={quote(url, safe='')}", st.one_of(signable_urls, refused_urls)),
    _text,
)


@st.composite
def shaped_moxy_urls(draw: st.DrawFn) -> str:
    """Near misses: the right shape, random parts."""
    base = draw(
        st.one_of(
            st.sampled_from([BASE, "", BASE_WITH_PATH, "http://[::1]:8080"]),
            st.text(alphabet="[]:@.%a1\u2100", max_size=8).map(lambda netloc: f"https://{netloc}"),
        )
    )
    path = "/" + "/".join(draw(st.lists(_segments, min_size=0, max_size=3)))
    path += draw(st.sampled_from(["", "/", "//"]))
    query = draw(_queries)
    return f"{base}{path}?{query}" if query else f"{base}{path}"


# -- no input makes verify raise anything but the documented errors ----------------------------------


@fast
@given(moxy_url=st.one_of(_text, shaped_moxy_urls()), camo=st.booleans())
@example(moxy_url="http://[/x", camo=True)
@example(moxy_url="https://a\u2100b/x/y", camo=True)
def test_any_moxy_url_gets_a_url_or_a_documented_error(moxy_url: str, camo: bool) -> None:
    for signer in (ring_signer(camo=camo), ring_signer(camo=camo, base=BASE_WITH_PATH)):
        assert_documented_answer(signer, "verify", moxy_url)
        assert_documented_answer(signer, "verify_full", moxy_url)


@fast
@given(
    segments=st.lists(st.one_of(_segments, _text), max_size=3),
    trailer=st.sampled_from(["", "/", "\n", "%0A"]),
    query=_queries,
    camo=st.booleans(),
)
@example(segments=["a" * 39 + "\n", "61" * 20], trailer="", query="", camo=True)
@example(segments=["a" * 40, "616\n"], trailer="", query="", camo=True)
def test_any_request_path_gets_a_url_or_a_documented_error(
    segments: list[str], trailer: str, query: str, camo: bool
) -> None:
    # verify_path sees what the server sees: a percent-decoded path, newlines and all (urlsplit would drop them).
    path = "/" + "/".join(segments) + trailer
    assert_documented_answer(ring_signer(camo=camo), "verify_path", path, query)


@fast
@given(url=st.binary(max_size=60), exp=st.one_of(st.none(), _expiry_strings), key=st.sampled_from(RING))
def test_correctly_signed_arbitrary_bytes_get_a_url_or_a_documented_error(
    url: bytes, exp: str | None, key: str | bytes
) -> None:
    signer = ring_signer()
    assert_documented_answer(signer, "verify", native(url, key, exp))
    for form in camo_forms(url, CAMO_RING[0]):
        assert_documented_answer(signer, "verify", form)


_TAMPER_CHARS = st.sampled_from(["\n", "\n", " ", "\t", "\x00", "=", "+", "/", "%", "é", "A", "0"])


@st.composite
def tampered_paths(draw: st.DrawFn) -> tuple[str, str, str]:
    """(upstream URL, request path, query): a correctly signed request path with one piece of it changed,
    the way a request path arrives (percent-decoded, so a newline is possible)."""
    url = draw(signable_urls)
    raw = url.encode("utf-8")
    digest = _sha1(CAMO_RING[0], raw)
    native_digest = hmac.new(_key(RING[0]), raw, hashlib.sha256).digest()
    pieces, query = draw(
        st.sampled_from(
            [
                ([_b64(native_digest), _b64(raw)], ""),
                ([digest.hex(), raw.hex()], ""),
                ([_b64(digest), _b64(raw)], ""),
                ([digest.hex()], f"url={quote(url, safe='')}"),
            ]
        )
    )
    index = draw(st.integers(0, len(pieces) - 1))
    piece, char = pieces[index], draw(_TAMPER_CHARS)
    position = draw(st.one_of(st.just(len(piece) - 1), st.integers(0, max(len(piece) - 1, 0))))
    pieces[index] = draw(
        st.sampled_from(
            [
                piece[:position] + char + piece[position + 1 :],  # replace
                piece + char,  # append: what a "^...$" pattern lets through when char is a newline
                char + piece,
                piece[:position] + piece[position + 1 :],  # delete
            ]
        )
    )
    return url, "/" + "/".join(pieces), query


@settings(fast, max_examples=300)  # one change in a few dozen hits a hex piece's last character with a newline
@given(case=tampered_paths())
@example(case=("http://a/", "/" + "a" * 39 + "\n/" + "61" * 20, ""))
@example(case=("http://a/", "/" + "a" * 40 + "/616\n", ""))
def test_a_tampered_request_path_is_refused_or_means_the_same(case: tuple[str, str, str]) -> None:
    url, path, query = case
    signer = ring_signer()
    try:
        verified = signer.verify_path(path, query)
    except VerificationError:
        return
    # Only changes that name the same bytes may pass (hex is read case-insensitively; a trailing "/" is allowed).
    assert verified.url == url


# -- nothing the signer refuses verifies -----------------------------------------------------------------


@fast
@given(url=refused_url_bytes, key=st.sampled_from(RING), exp=st.integers(NOW + 1, MAX_EXPIRES_AT))
@example(url=b"https://example.com/a.png\n1700000060", key=RING[0], exp=NOW + 60)
def test_correctly_signed_refused_url_never_verifies_natively(url: bytes, key: str | bytes, exp: int) -> None:
    signer = ring_signer()
    for signed in (native(url, key), native(url, key, str(exp)), native(url, key, base=BASE_WITH_PATH)):
        with pytest.raises(MalformedURL):
            signer.verify(signed)
        with pytest.raises(MalformedURL):
            ring_signer(base=BASE_WITH_PATH).verify(signed)


@fast
@given(url=refused_url_bytes, key=st.sampled_from(CAMO_RING))
def test_correctly_signed_refused_url_never_verifies_in_a_camo_form(url: bytes, key: str) -> None:
    signer = ring_signer()
    for signed in camo_forms(url, key):
        with pytest.raises(MalformedURL):
            signer.verify(signed)


@fast
@given(url=signable_urls, key=st.sampled_from(RING), exp=st.integers(0, MAX_EXPIRES_AT), now=st.integers(0, 2**40))
def test_an_expiring_url_repacked_as_never_expiring_never_verifies(
    url: str, key: str | bytes, exp: int, now: int
) -> None:
    # The digest of "url\nexp" moved onto a never-expiring URL whose encoded URL is "url\nexp".
    signer = ring_signer(now=now)
    expiring = native(url.encode("utf-8"), key, str(exp))
    repacked = native(f"{url}\n{exp}".encode(), key)
    assert repacked.split("/")[-2] == expiring.split("?")[0].split("/")[-2], "same message, same digest"
    if now < exp:
        assert signer.verify(expiring) == url
    else:
        with pytest.raises(ExpiredURL):
            signer.verify(expiring)
    with pytest.raises(MalformedURL):
        signer.verify(repacked)


@fast
@given(url=signable_urls, key=st.sampled_from(RING), exp=_expiry_strings)
@example(url="https://example.com/", key=RING[0], exp=f"0{NOW + 60}")
def test_a_correctly_signed_expiry_the_signer_would_not_write_never_verifies(
    url: str, key: str | bytes, exp: str
) -> None:
    written = exp.isascii() and exp.isdigit() and str(int(exp)) == exp and int(exp) <= MAX_EXPIRES_AT
    signer = ring_signer()
    signed = native(url.encode("utf-8"), key, exp)
    if written and int(exp) > NOW:
        assert signer.verify_full(signed) == VerifiedURL(url, int(exp), "native")
    elif written:
        with pytest.raises(ExpiredURL):
            signer.verify(signed)
    else:
        with pytest.raises(MalformedURL):
            signer.verify(signed)


# -- round trip: what sign accepts verifies back to itself -----------------------------------------------


@fast
@given(url=signable_urls, position=st.integers(0, len(RING) - 1), exp=st.integers(NOW + 1, MAX_EXPIRES_AT))
@example(url="https://example.com/日本?q=é#f", position=0, exp=NOW + 1)
def test_every_signable_url_verifies_back_under_every_key_of_the_ring(url: str, position: int, exp: int) -> None:
    ring = Signer(list(RING), BASE, clock=lambda: NOW)
    alone = Signer([RING[position]], BASE, clock=lambda: NOW)  # the key that signs, e.g. before a rotation
    for expires_at in (None, exp):
        signed = alone.sign(url, expires_at=expires_at)
        assert signed == native(url.encode("utf-8"), RING[position], None if expires_at is None else str(exp))
        assert ring.verify_full(signed) == VerifiedURL(url, expires_at, "native")
        path, _, query = signed[len(BASE) :].partition("?")
        assert ring.verify_path(path, query) == VerifiedURL(url, expires_at, "native")
    relative = alone.sign(url, expires_in=exp - NOW, exact=True)
    assert ring.verify_full(relative) == VerifiedURL(url, exp, "native")


@fast
@given(url=signable_urls, exp=st.one_of(st.none(), st.integers(NOW + 1, MAX_EXPIRES_AT)))
def test_round_trip_under_a_base_url_with_a_path(url: str, exp: int | None) -> None:
    signer = Signer(list(RING), BASE_WITH_PATH + "/", clock=lambda: NOW)
    assert signer.verify_full(signer.sign(url, expires_at=exp)) == VerifiedURL(url, exp, "native")


@fast
@given(url=signable_urls, key=st.sampled_from(CAMO_RING))
def test_every_signable_url_verifies_back_in_every_camo_form(url: str, key: str) -> None:
    signer = ring_signer()
    forms = camo_forms(url.encode("utf-8"), key)
    names = {signer.verify_full(form).form for form in forms}
    assert names == {"camo-hex-path", "camo-base64", "camo-hex-query"}
    for form in forms:
        assert signer.verify(form) == url
