"""Properties of the validator chain (moxy.validation): any upstream answer, however malformed, gets a verdict and
never an exception, and no verdict of Accept breaks the chain's promises: only 2xx (never a 206 fragment), a non-empty
body unless 204, the body length equal to an identity-coded Content-Length, within the size bound, of an allowed
type, and for JSON a whole body that parses.

Examples are derandomized and the database is off, so every run tries the same cases in a few seconds."""

from __future__ import annotations

import re
from collections.abc import Mapping

import orjson
from hypothesis import HealthCheck, event, given, settings, strategies as st

from moxy.config import DEFAULT_CONTENT_TYPES
from moxy.media import MediaPatterns, is_json_type, parse_content_type, sniff
from moxy.validation import (
    REASONS,
    Accept,
    Candidate,
    Reject,
    ValidatorChain,
    build_chain,
    error_envelope,
    parse_rules,
)

PROPERTY = settings(
    max_examples=300,
    derandomize=True,
    database=None,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

# RFC 9110 §5.5 field-value, as a str read from latin-1: no control byte but HTAB, no non-latin-1 character.
FIELD_VALUE = re.compile(r"[\t\x20-\x7e\x80-\xff]*")
MAX = 4096  # small, so the size bound is crossed as often as it is respected
RULES = parse_rules(
    """
[[rule]]
host = "api.example.com"
content_types = ["application/json", "text/plain"]
[[rule.check]]
pointer = "/items/0"
exists = true
[[rule.check]]
pointer = "/status"
not_equals = "degraded"

[[rule]]
host = "*"
[[rule.check]]
pointer = "/debug"
exists = false
""",
    source="rules.toml",
    fmt="toml",
)


def exploding(candidate: Candidate) -> object:
    """A custom validator that raises on some answers and returns a non-verdict on others."""
    if candidate.body[:1] == b"!":
        raise RuntimeError("boom")
    if candidate.body[:1] == b"?":
        return "yes"
    return Accept()


CHAINS: dict[str, ValidatorChain] = {
    "default": build_chain(content_types=DEFAULT_CONTENT_TYPES, max_body_bytes=MAX),
    "rules": build_chain(content_types=DEFAULT_CONTENT_TYPES, max_body_bytes=MAX, rules=RULES),
    "custom": build_chain(
        content_types=DEFAULT_CONTENT_TYPES,
        max_body_bytes=MAX,
        custom=["tests.unit.test_validation_properties:exploding"],
    ),
}
ALLOWED = MediaPatterns(DEFAULT_CONTENT_TYPES)
RULE_TYPES = MediaPatterns(["application/json", "text/plain"])

CONTENT_TYPES = [
    "image/png",
    "image/PNG; charset=x",
    "image/jpeg",
    "image/gif",
    "image/webp",
    "image/svg+xml",
    "image/x-unknown",
    "font/woff2",
    "video/mp4",
    "audio/mpeg",
    "application/json",
    "application/problem+json",
    'application/json; x="a, b"',
    "text/json",
    "text/plain",
    "text/html",
    "text/html; charset=utf-8",
    "image/png, image/jpeg",
    "image/png, image/png",
    "",
    " ",
    "image/",
    "/png",
    "image/png\x00",
    "image/png\x0b",
    "\x0cimage/png",
    "image/png\x1f",
    "\x1cimage/png; q=1",
    "image/png\xa0",
    "\u0130mage/png",
]
MAGIC = [
    b"",
    b"\x89PNG\r\n\x1a\n",
    b"\xff\xd8\xff",
    b"GIF89a",
    b"RIFF\x10\x00\x00\x00WEBP",
    b"\x00\x00\x00\x18ftypavif",
    b"wOF2",
    b"<svg>",
    b"<?xml version='1.0'?><svg xmlns='http://www.w3.org/2000/svg'/>",
    b"<!DOCTYPE html><html>",
    b"\xef\xbb\xbf",
    b"{",
    b"[",
    b"!",
    b"?",
]
json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=10),
    lambda children: (
        st.lists(children, max_size=4)
        | st.dictionaries(
            st.sampled_from(["error", "errors", "code", "message", "data", "status", "success", "ok", "items", "debug"])
            | st.text(max_size=5),
            children,
            max_size=5,
        )
    ),
    max_leaves=12,
)
bodies = st.one_of(
    st.binary(max_size=200),
    st.tuples(st.sampled_from(MAGIC), st.binary(max_size=100)).map(b"".join),
    json_values.map(orjson.dumps),
    st.tuples(st.sampled_from([b"", b"\xef\xbb\xbf"]), json_values.map(orjson.dumps)).map(b"".join),
    st.sampled_from([b"x" * (MAX + 1), b"\x89PNG\r\n\x1a\n" + bytes(MAX)]),
)
header_values = st.one_of(
    st.sampled_from(CONTENT_TYPES),
    st.text(st.characters(min_codepoint=0, max_codepoint=0xFF), max_size=40),
    st.text(max_size=20),
)
statuses = st.one_of(
    st.sampled_from([200, 201, 203, 204, 206, 226, 299, 300, 301, 304, 400, 404, 410, 500, 503]),
    st.integers(-(10**6), 10**6),
)
# Hosts as the destination policy hands them on: lowercase, no trailing dot.
hosts = st.sampled_from(["api.example.com", "img.example.com", "other.example", "x.api.example.com"])


# Answers a good upstream sends: the type and the leading bytes agree. Mixed in so Accept verdicts are common.
COHERENT = [
    ("image/png", b"\x89PNG\r\n\x1a\n"),
    ("image/png\x0b", b"\x89PNG\r\n\x1a\n"),
    ("image/jpeg", b"\xff\xd8\xff"),
    ("image/svg+xml", b"<svg xmlns='http://www.w3.org/2000/svg'/>"),
    ("font/woff2", b"wOF2"),
    ("image/x-unknown", b""),
    ("application/json", b""),
    ("text/plain", b""),
]


@st.composite
def coherent_candidates(draw: st.DrawFn) -> Candidate:
    content_type, magic = draw(st.sampled_from(COHERENT))
    body = magic + (draw(json_values.map(orjson.dumps)) if not magic else draw(st.binary(max_size=100)))
    host = draw(hosts)
    return Candidate(
        url=f"https://{host}/resource",
        host=host,
        status=draw(st.sampled_from([200, 200, 203, 204, 206])),
        headers={"content-type": content_type},
        body=body,
        length=len(body),
        declared_length=draw(st.sampled_from([None, len(body), len(body) + 1])),
        complete_body=draw(st.booleans()),
    )


@st.composite
def wild_candidates(draw: st.DrawFn) -> Candidate:
    body = draw(bodies)
    complete = draw(st.booleans())
    received = len(body) if complete else len(body) + draw(st.integers(0, 2 * MAX))
    length = draw(st.one_of(st.just(received), st.integers(0, 2 * MAX)))
    declared = draw(st.one_of(st.none(), st.just(length), st.integers(0, 2 * MAX), st.integers(0, 2**70)))
    headers: dict[str, str] = {}
    content_type = draw(st.one_of(st.none(), header_values))
    if content_type is not None:
        headers["content-type"] = content_type
    encoding = draw(st.one_of(st.none(), st.sampled_from(["identity", " Identity ", "gzip", "br", ""]), header_values))
    if encoding is not None:
        headers["content-encoding"] = encoding
    host = draw(hosts)
    return Candidate(
        url=f"https://{host}/resource",
        host=host,
        status=draw(statuses),
        headers=headers,
        body=body,
        length=length,
        declared_length=declared,
        complete_body=complete,
    )


candidates = st.one_of(coherent_candidates(), wild_candidates())


def _identity_coded(headers: Mapping[str, str]) -> bool:
    return headers.get("content-encoding", "").strip().lower() in ("", "identity")


@PROPERTY
@given(candidates, st.sampled_from(sorted(CHAINS)))
def test_every_answer_gets_a_verdict_and_accepts_keep_the_contract(candidate: Candidate, name: str) -> None:
    verdict = CHAINS[name].validate(candidate)
    event(verdict.reason if isinstance(verdict, Reject) else "accept")  # --hypothesis-show-statistics shows the mix
    if isinstance(verdict, Reject):
        assert verdict.reason in REASONS or verdict.reason == "custom:exploding", verdict
        assert isinstance(verdict.detail, str)
        return
    assert isinstance(verdict, Accept)
    status, length = candidate.status, candidate.length
    assert 200 <= status <= 299 and status != 206
    assert length > 0 or status == 204
    if candidate.complete_body:
        assert len(candidate.body) == length
    if candidate.declared_length is not None:
        # Content-Length counts the bytes on the wire (RFC 9110 §8.6): only with identity coding is it the body's.
        if _identity_coded(candidate.headers):
            assert candidate.declared_length == length
        assert candidate.declared_length <= MAX
    assert length <= MAX
    if name == "custom":
        assert candidate.body[:1] not in (b"!", b"?")  # a raising or confused custom validator fails closed
    if status == 204:
        return
    content_type = candidate.headers.get("content-type", "")
    essence, problem = parse_content_type(content_type)
    assert not problem and essence != "text/html"
    # The stored Content-Type is sent again as it is: it must be a field value a server can send (RFC 9110 §5.5).
    assert FIELD_VALUE.fullmatch(content_type), content_type
    ruled = name == "rules" and candidate.host == "api.example.com"
    assert (RULE_TYPES if ruled else ALLOWED).allows(essence)
    if is_json_type(essence) or ruled:
        assert candidate.complete_body
        body = candidate.body.removeprefix(b"\xef\xbb\xbf")
        document = orjson.loads(body)
        if is_json_type(essence):
            assert error_envelope(document) is None


@PROPERTY
@given(header_values)
def test_needs_full_body_never_raises(content_type: str) -> None:
    for chain in CHAINS.values():
        assert isinstance(chain.needs_full_body(content_type), bool)


@PROPERTY
@given(st.sampled_from(CONTENT_TYPES) | st.text(max_size=20), bodies, st.booleans())
def test_sniff_never_raises(content_type: str, head: bytes, complete: bool) -> None:
    essence, _ = parse_content_type(content_type)
    mismatch = sniff(essence, head, complete=complete)
    assert mismatch is None or isinstance(mismatch, str)


@PROPERTY
@given(json_values)
def test_error_envelope_never_raises(document: object) -> None:
    found = error_envelope(document)
    assert found is None or isinstance(found, str)
