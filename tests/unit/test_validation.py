"""The validator chain: one table per validator, with the payloads real upstreams send."""

from __future__ import annotations

from typing import Any

import orjson
import pytest
from hypothesis import given, settings, strategies as st

from moxy.config import DEFAULT_CONTENT_TYPES
from moxy.errors import ConfigError
from moxy.validation import (
    ACCEPT,
    REASONS,
    Accept,
    Candidate,
    Reject,
    ValidatorChain,
    Verdict,
    build_chain,
    error_envelope,
    load_validator,
    parse_rules,
)
from tests.unit.test_media import BAD_HEADS, EOT, GOOD_HEADS, HTML_ERROR, JPEG, PNG, SVG, WOFF2

MAX = 50 * 1024 * 1024


def candidate(
    content_type: str | None = "application/json",
    body: bytes = b"{}",
    *,
    status: int = 200,
    host: str = "upstream.example",
    length: int | None = None,
    declared: int | None = None,
    complete: bool = True,
    headers: dict[str, str] | None = None,
) -> Candidate:
    all_headers = dict(headers or {})
    if content_type is not None:
        all_headers["content-type"] = content_type
    return Candidate(
        url=f"https://{host}/resource",
        host=host,
        status=status,
        headers=all_headers,
        body=body,
        length=len(body) if length is None else length,
        declared_length=declared,
        complete_body=complete,
    )


@pytest.fixture(scope="module")
def chain() -> ValidatorChain:
    return build_chain(content_types=DEFAULT_CONTENT_TYPES, max_body_bytes=MAX)


def reason(verdict: Verdict) -> str | None:
    return verdict.reason if isinstance(verdict, Reject) else None


# -- status ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "expected"),
    [
        (200, None),
        (203, None),
        # Successes of an operation, not the asset: a 204 must never replace an image with an empty answer.
        (201, "status"),
        (202, "status"),
        (204, "status"),
        (205, "status"),
        (207, "status"),
        (206, "status"),  # a fragment, never the whole representation
        (199, "status"),
        (301, "status"),
        (304, "status"),  # only a revalidation answer, which never reaches the chain
        (404, "status"),
        (500, "status"),
        (503, "status"),
    ],
)
def test_status(chain: ValidatorChain, status: int, expected: str | None) -> None:
    body = b"" if status == 204 else b'{"id": 1}'
    assert reason(chain.validate(candidate(body=body, status=status))) == expected


# -- completeness ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("case", "expected"),
    [
        (candidate("image/png", PNG, declared=len(PNG)), None),
        (candidate("image/png", PNG[:40], declared=len(PNG)), "truncated"),  # connection dropped mid-PNG
        (candidate("image/png", PNG, declared=len(PNG) - 5), "length-mismatch"),
        # gzip: Content-Length counts compressed wire bytes, the decoded body is longer; that is fine
        (candidate("application/json", b'{"ok": true}', declared=5, headers={"content-encoding": "gzip"}), None),
        (candidate("application/json", b'{"ok": true}', declared=12, headers={"content-encoding": "identity"}), None),
        (candidate("image/png", b""), "empty"),  # the empty 200
        (candidate("application/json", b"", declared=0), "empty"),
        (candidate(None, b"", status=204), "status"),  # an empty 204 is complete, but no representation
        (candidate("image/png", PNG[:20], length=len(PNG)), "truncated"),  # complete_body claims a body it lacks
        (candidate("image/png", PNG[:20], length=len(PNG), complete=False), None),  # a head sample is fine
        (candidate("application/json", b"", length=0, declared=300), "truncated"),
    ],
)
def test_completeness(chain: ValidatorChain, case: Candidate, expected: str | None) -> None:
    assert reason(chain.validate(case)) == expected


# -- size -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("length", "declared", "expected"),
    [
        (1000, None, None),
        (1000, 1000, None),
        (1001, None, "too-large"),
        (1001, 1001, "too-large"),
        (100, 5000, "too-large"),  # declared over the limit: the cap stopped reading early
    ],
)
def test_size(length: int, declared: int | None, expected: str | None) -> None:
    small = build_chain(content_types=["image/*"], max_body_bytes=1000)
    body = PNG + b"\x00" * (length - len(PNG))
    case = candidate("image/png", body, declared=declared, headers={"content-encoding": "br"})
    verdict = small.validate(case)
    assert reason(verdict) == expected


# -- content type ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("content_type", "body", "expected"),
    [
        ("image/png", PNG, None),
        ("IMAGE/PNG", PNG, None),
        ("image/png; charset=binary", PNG, None),
        ("image/svg+xml", SVG, None),  # allowed as image/*; the CSP sandbox header protects clients
        ("application/json; charset=UTF-8", b"[]", None),
        ("application/ld+json", b"{}", None),
        ("application/vnd.api+json", b'{"data": []}', None),
        # RFC 9457: a problem document reports a failure, whatever it holds; it is never the resource.
        ("application/problem+json", b'{"type": "about:blank"}', "json-error-envelope"),
        ("font/woff2", WOFF2, None),
        ("application/vnd.ms-fontobject", EOT, None),
        ("text/html", HTML_ERROR, "content-type"),
        ("text/html; charset=utf-8", HTML_ERROR, "content-type"),
        ("application/xhtml+xml", HTML_ERROR, "content-type"),
        ("text/plain", b"hello", "content-type"),
        ("application/octet-stream", PNG, "content-type"),
        ("application/javascript", b"alert(1)", "content-type"),
        (None, PNG, "content-type"),  # missing Content-Type
        ("", PNG, "content-type"),
        ("png", PNG, "content-type"),  # malformed
        ("image/png, text/html", PNG, "content-type"),  # repeated headers that disagree
        ("image/png, image/png", PNG, None),  # repeated but identical
        ('application/json; profile="a,b/c"', b"{}", None),  # comma inside a quoted parameter
    ],
)
def test_content_type(chain: ValidatorChain, content_type: str | None, body: bytes, expected: str | None) -> None:
    assert reason(chain.validate(candidate(content_type, body))) == expected


@pytest.mark.parametrize(
    ("allowlist", "content_type", "expected"),
    [
        (["*/*"], "image/png", None),
        (["*/*"], "text/html", "content-type"),  # a wildcard never admits HTML
        (["text/*"], "text/html", "content-type"),
        (["text/*"], "text/plain", None),
        (["text/html"], "text/html", None),  # ...only a literal entry does
        (["application/*+json"], "application/geo+json", None),
        (["application/*+json"], "application/json", "content-type"),
        (["image/png"], "image/jpeg", "content-type"),
        (["Image/PNG"], "image/png", None),
    ],
)
def test_allowlist_patterns(allowlist: list[str], content_type: str, expected: str | None) -> None:
    custom = build_chain(content_types=allowlist, max_body_bytes=MAX)
    body = {"image/png": PNG, "image/jpeg": JPEG}.get(content_type, b'{"fine": true}')
    assert reason(custom.validate(candidate(content_type, body))) == expected


@pytest.mark.parametrize("bad", ["image", "image/", "/png", "image/png extra", ""])
def test_bad_allowlist_entry_is_a_config_error(bad: str) -> None:
    with pytest.raises(ConfigError) as caught:
        build_chain(content_types=["image/*", bad], max_body_bytes=MAX)
    assert caught.value.setting == "MOXY_CONTENT_TYPES"


def test_non_positive_size_is_a_config_error() -> None:
    with pytest.raises(ConfigError) as caught:
        build_chain(content_types=["image/*"], max_body_bytes=0)
    assert caught.value.setting == "MOXY_MAX_BODY_BYTES"


# -- sniff ----------------------------------------------------------------------------------------
# The validator over the real heads of test_media.py, whose tables test moxy.media.sniff itself.


@pytest.mark.parametrize(("content_type", "body"), GOOD_HEADS)
def test_sniff_validator_accepts_real_heads(chain: ValidatorChain, content_type: str, body: bytes) -> None:
    assert chain.validate(candidate(content_type, body)) == ACCEPT


@pytest.mark.parametrize(("content_type", "body", "looks_like"), BAD_HEADS)
def test_sniff_validator_rejects_mismatches(
    chain: ValidatorChain, content_type: str, body: bytes, looks_like: str
) -> None:
    verdict = chain.validate(candidate(content_type, body))
    assert isinstance(verdict, Reject)
    assert verdict.reason == "sniff-mismatch"
    assert content_type in verdict.detail and looks_like in verdict.detail


# -- JSON sanity ----------------------------------------------------------------------------------

WORDPRESS_NO_ROUTE = {
    "code": "rest_no_route",
    "message": "No route was found matching the URL and request method.",
    "data": {"status": 404},
}
WORDPRESS_FORBIDDEN = {
    "code": "rest_forbidden",
    "message": "Sorry, you are not allowed to do that.",
    "data": {"status": 401},
}
WORDPRESS_CANNOT_VIEW = {"code": "rest_forbidden_context", "message": "Sorry...", "data": {"status": 403}}
WORDPRESS_CRITICAL = {
    "code": "internal_server_error",
    "message": "<p>There has been a critical error on this website.</p>",
    "data": {"status": 500},
    "additional_errors": [],
}


@pytest.mark.parametrize(
    ("document", "detail"),
    [
        (WORDPRESS_NO_ROUTE, 'WordPress REST error "rest_no_route" (status 404)'),
        (WORDPRESS_FORBIDDEN, 'WordPress REST error "rest_forbidden" (status 401)'),
        (WORDPRESS_CANNOT_VIEW, "status 403"),
        (WORDPRESS_CRITICAL, 'WordPress REST error "internal_server_error" (status 500)'),
        ({"data": None, "errors": [{"message": 'Cannot query field "nme" on type "User".'}]}, "Cannot query field"),
        ({"data": {"user": None}, "errors": [{"message": "Not authorised", "path": ["user"]}]}, "Not authorised"),
        ({"errors": [{"status": "404", "title": "Resource not found"}]}, "Resource not found"),
        ({"errors": {"email": ["is invalid"]}}, '"errors"'),
        ({"errors": "token expired"}, "token expired"),
        ({"success": False, "data": {"message": "Invalid nonce"}}, '"success": false'),
        ({"ok": False}, '"ok": false'),
        ({"ok": False, "error": "channel_not_found"}, "channel_not_found"),  # Slack Web API
        ({"error": "invalid_grant", "error_description": "Bad code"}, "invalid_grant"),  # OAuth 2 (RFC 6749 §5.2)
        ({"error": {"code": 403, "message": "The caller does not have permission"}}, '"error"'),  # Google APIs
        ({"error": True, "reason": "rate limited"}, '"error": true'),
        ({"error": 1, "msg": "no such id"}, '"error": 1'),
        ({"status": "error", "message": "Unknown key"}, '"status": "error"'),  # JSend
        ({"status": "FAIL", "data": {"title": "required"}}, '"status": "FAIL"'),
        ({"status": " Failed "}, '"status"'),
        ({"stat": "fail", "code": 1, "message": "Photo not found"}, '"stat": "fail"'),  # Flickr
        # Found by an attack run: each of these replaced a good copy before.
        ({"code": "x", "message": "y", "data": {"status": "500"}}, "(status 500)"),  # the status as a string
        ({"title": "Internal Server Error", "status": 500}, "status 500"),  # RFC 9457 shape, plain JSON type
        ({"status": 500, "message": "database is down"}, "status 500"),
        ({"statusCode": 503, "error": "Service Unavailable"}, "status 503"),  # many Node.js frameworks
        ({"Error": "x"}, '"error"'),  # member names in any case
    ],
)
def test_json_error_envelopes(chain: ValidatorChain, document: dict[str, Any], detail: str) -> None:
    verdict = chain.validate(candidate("application/json; charset=UTF-8", orjson.dumps(document)))
    assert isinstance(verdict, Reject)
    assert verdict.reason == "json-error-envelope"
    assert detail in verdict.detail


@pytest.mark.parametrize(
    "document",
    [
        [],
        [{"error": "this is data, not an envelope"}],  # only a top-level object is inspected
        {"code": "SKU-1", "message": "Hello", "data": {"status": 200}},  # looks WordPress-like, status < 400
        {"code": "SKU-1", "message": "Hello"},  # no data
        {"code": "SKU-1", "message": "Hello", "data": {"status": True}},
        {"code": 404, "message": "Hello", "data": {"status": 404}},  # code not a string
        {"data": {"id": 1}, "errors": []},
        {"errors": {}},
        {"error": None},
        {"error": False},
        {"error": ""},
        {"error": "   "},
        {"error": 0},
        {"error": {}},
        {"success": True},
        {"success": "false"},  # a string is not the boolean
        {"ok": True},
        {"ok": None},
        {"status": "ok"},
        {"status": "active"},
        {"status": 500},
        {"posts": [{"id": 1, "status": "error"}]},  # nested: not the envelope
        {"message": "error", "errorCount": 0},
        "just a string",
        42,
        None,
    ],
)
def test_json_valid_documents(chain: ValidatorChain, document: Any) -> None:
    assert chain.validate(candidate("application/json", orjson.dumps(document))) == ACCEPT


@pytest.mark.parametrize(
    ("content_type", "body", "expected"),
    [
        ("application/json", b'{"items": [1, 2, 3], "next": "/page/2', "json-invalid"),  # cut mid-way
        ("application/json", b'{"items": [1, 2, 3]', "json-invalid"),
        ("application/json", HTML_ERROR, "json-invalid"),  # an HTML error page labelled JSON
        ("application/json", b"   ", "json-invalid"),
        ("application/json", b"{'single': 'quotes'}", "json-invalid"),
        ("application/json", b'{"a": NaN}', "json-invalid"),
        ("application/json", b"[" * 2000 + b"]" * 2000, "json-invalid"),  # deeper than orjson's recursion limit
        ("application/json", b'\xef\xbb\xbf{"with": "bom"}', None),  # RFC 8259 §8.1 lets a parser skip it
        ("text/json", b'[{"id": 1}, {"id": 2}]', None),
        ("application/json", b'  [{"id": 1}]\n', None),
        ("application/geo+json", b'{"type": "FeatureCollection", "features": []}', None),
        ("application/problem+json", b'{"type": "x", "status": "error"}', "json-error-envelope"),
    ],
)
def test_json_parsing(content_type: str, body: bytes, expected: str | None) -> None:
    chain = build_chain(content_types=[*DEFAULT_CONTENT_TYPES, "text/json"], max_body_bytes=MAX)
    assert reason(chain.validate(candidate(content_type, body))) == expected


def test_json_partial_body_is_not_trusted(chain: ValidatorChain) -> None:
    head = b'{"items": [' + b"1," * 40_000
    verdict = chain.validate(candidate("application/json", head, length=len(head) + 100, complete=False))
    assert reason(verdict) == "json-invalid"


def test_huge_valid_json_is_accepted(chain: ValidatorChain) -> None:
    items = [{"id": n, "title": f"Post number {n}", "tags": ["a", "b", "c"], "score": n / 7} for n in range(60_000)]
    body = orjson.dumps({"items": items, "total": len(items)})
    assert len(body) > 5_000_000
    assert chain.validate(candidate("application/json", body, declared=len(body))) == ACCEPT


@settings(max_examples=200)
@given(
    st.dictionaries(
        st.text(max_size=12).filter(lambda key: key not in {"error", "errors", "success", "ok", "status", "stat"}),
        st.recursive(
            st.none() | st.booleans() | st.integers() | st.text(max_size=20),
            lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
            max_leaves=10,
        ),
        max_size=8,
    )
)
def test_objects_without_error_keys_are_no_envelope(document: dict[str, Any]) -> None:
    wordpress = (
        isinstance(document.get("code"), str)
        and isinstance(document.get("message"), str)
        and isinstance(document.get("data"), dict)
    )
    if not wordpress:
        assert error_envelope(document) is None


# -- the whole chain ------------------------------------------------------------------------------


@settings(max_examples=300)
@given(
    content_type=st.sampled_from(
        ["image/png", "image/svg+xml", "application/json", "video/mp4", "font/woff2", "image/x-new", "", "a/b, c/d"]
    ),
    body=st.binary(max_size=300),
    status=st.sampled_from([200, 204, 206, 404]),
    declared=st.none() | st.integers(min_value=0, max_value=400),
)
def test_chain_never_raises(content_type: str, body: bytes, status: int, declared: int | None) -> None:
    chain = build_chain(content_types=DEFAULT_CONTENT_TYPES, max_body_bytes=MAX)
    verdict = chain.validate(candidate(content_type, body, status=status, declared=declared))
    assert isinstance(verdict, Accept | Reject)
    if isinstance(verdict, Reject):
        assert verdict.reason in REASONS


def test_first_reject_wins_and_order_is_kept() -> None:
    seen: list[str] = []

    def make(name: str, verdict: Verdict) -> tuple[str, Any]:
        def run(_: Candidate) -> Verdict:
            seen.append(name)
            return verdict

        return name, run

    chain = ValidatorChain([make("a", ACCEPT), make("b", Reject("b-said-no")), make("c", Reject("c-said-no"))])
    assert chain.validate(candidate()) == Reject("b-said-no")
    assert seen == ["a", "b"]
    assert chain.names == ("a", "b", "c")
    assert ValidatorChain([]).validate(candidate()) == ACCEPT


def test_chain_order(chain: ValidatorChain) -> None:
    assert chain.names == ("status", "completeness", "size", "content-type", "sniff", "json")
    # a 404 HTML page labelled image/png fails on status first, not on its type or its bytes
    assert reason(chain.validate(candidate("image/png", HTML_ERROR, status=404))) == "status"


@pytest.mark.parametrize(
    ("content_type", "expected"),
    [
        ("application/json", True),
        ("application/json; charset=utf-8", True),
        ("application/vnd.api+json", True),
        ("image/png", False),
        ("video/mp4", False),
        ("", False),
        ("text/plain", False),
    ],
)
def test_needs_full_body(chain: ValidatorChain, content_type: str, expected: bool) -> None:
    assert chain.needs_full_body(content_type) is expected


# -- user rules in the chain ----------------------------------------------------------------------

RULES = parse_rules(
    """
[[rule]]
host = "api.example.com"
content_types = ["application/json", "text/plain"]
[[rule.check]]
pointer = "/items"
exists = true
[[rule.check]]
pointer = "/status"
not_equals = "degraded"

[[rule]]
host = "*.cdn.example.com"
content_types = ["image/png"]

[[rule]]
host = "*"
[[rule.check]]
pointer = "/debug"
exists = false
""",
    source="rules.toml",
    fmt="toml",
)


@pytest.fixture(scope="module")
def ruled() -> ValidatorChain:
    return build_chain(content_types=DEFAULT_CONTENT_TYPES, max_body_bytes=MAX, rules=RULES)


@pytest.mark.parametrize(
    ("host", "content_type", "body", "expected", "detail"),
    [
        ("api.example.com", "application/json", b'{"items": []}', None, ""),
        ("API.example.com", "application/json", b'{"items": [], "status": "ok"}', None, ""),
        ("api.example.com", "application/json", b'{"data": []}', "rule", "rule[0].check[0]: /items is missing"),
        ("api.example.com", "application/json", b'{"items": [], "status": "degraded"}', "rule", "rule[0].check[1]"),
        ("api.example.com", "application/json", b'{"items": [], "debug": 1}', "rule", "rule[2].check[0]"),
        ("api.example.com", "text/plain", b'{"items": [1]}', None, ""),  # the rule admits and reads text/plain
        ("api.example.com", "text/plain", b"items: 1", "rule", "not JSON"),
        ("api.example.com", "image/png", PNG, "content-type", "rules.toml rule[0]"),  # overrides the global list
        ("a.cdn.example.com", "image/png", PNG, None, ""),
        ("a.cdn.example.com", "image/jpeg", JPEG, "content-type", "rule[1]"),
        ("cdn.example.com", "image/jpeg", JPEG, None, ""),  # "*.cdn" does not match the bare domain
        ("other.example", "application/json", b'{"debug": true}', "rule", "/debug exists"),
        ("other.example", "application/json", b'{"fine": true}', None, ""),
        ("other.example", "text/plain", b"{}", "content-type", ""),  # global allowlist for other hosts
        ("other.example", "image/png", PNG, None, ""),  # "*" checks read JSON only; an image passes
        ("api.example.com", "application/json", b'{"ok": false, "items": []}', "json-error-envelope", ""),
    ],
)
def test_rules_in_chain(
    ruled: ValidatorChain, host: str, content_type: str, body: bytes, expected: str | None, detail: str
) -> None:
    verdict = ruled.validate(candidate(content_type, body, host=host))
    assert reason(verdict) == expected
    if detail:
        assert isinstance(verdict, Reject) and detail in verdict.detail


def test_rules_widen_needs_full_body(ruled: ValidatorChain, chain: ValidatorChain) -> None:
    assert ruled.needs_full_body("text/plain; charset=utf-8") is True  # a rule's checks read it
    assert chain.needs_full_body("text/plain") is False
    assert ruled.needs_full_body("image/png") is False  # rule[1] lists it but has no checks


# -- custom validators ----------------------------------------------------------------------------


def no_watermark(candidate: Candidate) -> Verdict:
    """A custom validator the tests import by dotted path."""
    if b"WATERMARK" in candidate.body:
        return Reject("watermarked", "body holds the placeholder watermark")
    return ACCEPT


def explodes(candidate: Candidate) -> Verdict:
    raise RuntimeError("validator bug")


def returns_junk(candidate: Candidate) -> Any:
    return "yes"


class Holder:
    @staticmethod
    def nested(candidate: Candidate) -> Verdict:
        return Reject("nested")


NOT_CALLABLE = 3


@pytest.mark.parametrize(
    "path",
    ["tests.unit.test_validation:no_watermark", "tests.unit.test_validation.no_watermark"],
)
def test_custom_validator_by_dotted_path(path: str) -> None:
    chain = build_chain(content_types=DEFAULT_CONTENT_TYPES, max_body_bytes=MAX, custom=[path])
    assert chain.names[-1] == "no_watermark"
    assert chain.validate(candidate("application/json", b'{"a": 1}')) == ACCEPT
    verdict = chain.validate(candidate("application/json", b'{"a": "WATERMARK"}'))
    assert verdict == Reject("custom:no_watermark", "watermarked: body holds the placeholder watermark")


@pytest.mark.parametrize(
    ("path", "detail"),
    [
        ("tests.unit.test_validation:explodes", "raised RuntimeError: validator bug"),  # fail closed
        ("tests.unit.test_validation:returns_junk", "returned str"),
        ("tests.unit.test_validation:Holder.nested", "nested"),
    ],
)
def test_custom_validator_failures_reject(path: str, detail: str) -> None:
    name, validator = load_validator(path)
    verdict = validator(candidate())
    assert isinstance(verdict, Reject)
    assert verdict.reason == f"custom:{name}"
    assert detail in verdict.detail


def test_custom_validators_run_last() -> None:
    chain = build_chain(
        content_types=DEFAULT_CONTENT_TYPES, max_body_bytes=MAX, custom=["tests.unit.test_validation:explodes"]
    )
    # the built-in rejection comes first; the custom validator is not even asked
    assert reason(chain.validate(candidate("text/html", HTML_ERROR))) == "content-type"


@pytest.mark.parametrize(
    ("path", "message"),
    [
        ("no_such_package_xyz.module:fn", "cannot import"),
        ("tests.unit.test_validation:missing_function", "has no"),
        ("tests.unit.test_validation:NOT_CALLABLE", "not callable"),
        ("justaname", "is not 'package.module:function'"),
        ("tests.unit.test_validation:", "is not 'package.module:function'"),
    ],
)
def test_custom_validator_config_errors(path: str, message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        build_chain(content_types=DEFAULT_CONTENT_TYPES, max_body_bytes=MAX, custom=[path])
    assert caught.value.setting == "MOXY_VALIDATORS"
    assert message in caught.value.message
