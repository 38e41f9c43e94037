"""The validator chain: one table per validator, with the payloads real upstreams send."""

from __future__ import annotations

import struct
import zlib
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
    is_json_type,
    load_validator,
    media_type,
    parse_rules,
    sniff,
)

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


# -- real file heads, built from their published magic numbers ----------------------------------


def png(width: int = 1, height: int = 1) -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 6, 0, 0, 0)
    pixels = zlib.compress(b"\x00" + b"\x00\x00\x00\x00" * width)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", pixels) + chunk(b"IEND", b"")


def ftyp(major: bytes, *compatible: bytes) -> bytes:
    payload = major + b"\x00\x00\x00\x00" + b"".join(compatible)
    return struct.pack(">I", 8 + len(payload)) + b"ftyp" + payload + b"\x00\x00\x00\x08free"


PNG = png()
JPEG = b"\xff\xd8\xff\xe0\x00\x10JFIF\x00\x01\x01\x00\x00\x01\x00\x01\x00\x00" + b"\x00" * 32 + b"\xff\xd9"
GIF = (
    b"GIF89a\x01\x00\x01\x00\x80\x00\x00\xff\xff\xff\x00\x00\x00"
    b"!\xf9\x04\x01\x00\x00\x00\x00,\x00\x00\x00\x00\x01\x00\x01\x00\x00\x02\x02D\x01\x00;"
)
WEBP = b"RIFF\x1a\x00\x00\x00WEBPVP8L\x0d\x00\x00\x00/\x00\x00\x00\x10\x07\x10\x11\x11\x88\x88\xfe\x07\x00"
AVIF = ftyp(b"avif", b"mif1", b"miaf", b"MA1B")
AVIF_VIA_COMPATIBLE = ftyp(b"mif1", b"avif", b"miaf")
HEIC = ftyp(b"heic", b"mif1", b"heic")
ICO = b"\x00\x00\x01\x00\x01\x00\x10\x10\x00\x00\x01\x00 \x00h\x04\x00\x00\x16\x00\x00\x00" + b"\x00" * 40
BMP = b"BM" + struct.pack("<IHHI", 70, 0, 0, 54) + b"\x28\x00\x00\x00" + b"\x00" * 40
TIFF = b"II*\x00\x08\x00\x00\x00" + b"\x00" * 16
SVG = b'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 1 1"><rect width="1" height="1"/></svg>'
SVG_FULL_PROLOGUE = (
    b"\xef\xbb\xbf"
    b'<?xml version="1.0" encoding="UTF-8" standalone="no"?>\n'
    b"<!-- Generator: Adobe Illustrator 24.0.0, SVG Export Plug-In -->\n"
    b'<!DOCTYPE svg PUBLIC "-//W3C//DTD SVG 1.1//EN" "http://www.w3.org/Graphics/SVG/1.1/DTD/svg11.dtd" [\n'
    b'  <!ENTITY ns_svg "http://www.w3.org/2000/svg">\n'
    b"]>\n"
    b'<svg version="1.1" xmlns="&ns_svg;"></svg>'
)
WOFF = b"wOFF\x00\x01\x00\x00" + b"\x00" * 36
WOFF2 = b"wOF2\x00\x01\x00\x00" + b"\x00" * 40
TTF = b"\x00\x01\x00\x00\x00\x0a\x00\x80\x00\x03\x00\x20" + b"\x00" * 32
OTF = b"OTTO\x00\x0a\x00\x80\x00\x03\x00\x20" + b"\x00" * 32
EOT = struct.pack("<IIII", 100, 90, 0x00020001, 0) + b"\x00" * 18 + b"LP" + b"\x00" * 40
MP4 = ftyp(b"isom", b"isom", b"iso2", b"avc1", b"mp41")
MOV = b"\x00\x00\x00\x14ftypqt  \x00\x00\x02\x00qt  "
WEBM = b"\x1a\x45\xdf\xa3\x9f\x42\x86\x81\x01\x42\xf7\x81\x01\x42\xf2\x81\x04\x42\x82\x84webm"
MP3_ID3 = b"ID3\x04\x00\x00\x00\x00\x00\x23TSSE" + b"\x00" * 32
MP3_FRAME = b"\xff\xfb\x90\x64" + b"\x00" * 60
OGG = b"OggS\x00\x02" + b"\x00" * 20 + b"\x01\x1e\x01vorbis"
WAV = b"RIFF\x24\x08\x00\x00WAVEfmt \x10\x00\x00\x00\x01\x00\x02\x00"
FLAC = b"fLaC\x00\x00\x00\x22" + b"\x00" * 34
AAC = b"\xff\xf1\x50\x80\x02\x1f\xfc" + b"\x00" * 16

HTML_ERROR = b"<!DOCTYPE html>\n<html><head><title>404 Not Found</title></head><body><h1>Not Found</h1></body></html>"
PHP_WARNING = b"<br />\n<b>Warning</b>:  file_get_contents(): failed to open stream in <b>/var/www/x.php</b>"
JSON_ERROR = b'{"code":"rest_no_route","message":"No route was found","data":{"status":404}}'


# -- status ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "expected"),
    [
        (200, None),
        (201, None),
        (203, None),
        (204, None),
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
        (candidate(None, b"", status=204), None),
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
        ("application/problem+json", b'{"type": "about:blank"}', None),
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


@pytest.mark.parametrize(
    ("header", "essence", "problem"),
    [
        ("image/png", "image/png", ""),
        ("  Image/PNG ; q=1", "image/png", ""),
        ("", "", "missing Content-Type"),
        ("nonsense", "", "malformed"),
        ("text/html, image/png", "", "conflicting"),
        ("\t image/png \t", "image/png", ""),  # RFC 9110 §5.6.3 OWS
        # A control byte at either end (which str.strip() would have hidden) or inside: it could never be sent again.
        ("image/png\x0b", "", "malformed"),
        ("\x0cimage/png", "", "malformed"),
        ("image/png\x1f", "", "malformed"),
        ("image/png; q=\x00", "", "malformed"),
        ("image/png\xa0", "", "malformed"),  # NO-BREAK SPACE is no whitespace in HTTP
        ("image/p\u0130ng", "", "malformed"),  # beyond latin-1: no field value at all
    ],
)
def test_media_type(header: str, essence: str, problem: str) -> None:
    got_essence, got_problem = media_type(header)
    assert got_essence == essence
    assert problem in got_problem and bool(got_problem) == bool(problem)


# -- sniff ----------------------------------------------------------------------------------------

GOOD_HEADS = [
    ("image/png", PNG),
    ("image/apng", PNG),
    ("image/jpeg", JPEG),
    ("image/pjpeg", JPEG),
    ("image/gif", GIF),
    ("image/gif", b"GIF87a" + b"\x00" * 20),
    ("image/webp", WEBP),
    ("image/avif", AVIF),
    ("image/avif", AVIF_VIA_COMPATIBLE),
    ("image/heic", HEIC),
    ("image/heif", HEIC),
    ("image/x-icon", ICO),
    ("image/vnd.microsoft.icon", ICO),
    ("image/x-icon", PNG),  # PNG-in-ICO: browsers accept it
    ("image/bmp", BMP),
    ("image/tiff", TIFF),
    ("image/svg+xml", SVG),
    ("image/svg+xml", SVG_FULL_PROLOGUE),
    ("image/svg+xml", b"\n\n   <svg>"),
    ("image/svg+xml", b"<svg:svg xmlns:svg='http://www.w3.org/2000/svg'/>"),
    ("font/woff", WOFF),
    ("application/font-woff", WOFF),
    ("font/woff2", WOFF2),
    ("font/ttf", TTF),
    ("font/otf", OTF),
    ("application/x-font-ttf", TTF),
    ("application/vnd.ms-fontobject", EOT),
    ("video/mp4", MP4),
    ("video/quicktime", MOV),
    ("audio/mp4", MP4),
    ("video/webm", WEBM),
    ("audio/webm", WEBM),
    ("video/x-matroska", WEBM),
    ("audio/mpeg", MP3_ID3),
    ("audio/mpeg", MP3_FRAME),
    ("audio/ogg", OGG),
    ("application/ogg", OGG),
    ("audio/wav", WAV),
    ("audio/flac", FLAC),
    ("audio/aac", AAC),
    # family agreement: mislabelled but decodable by every browser, so a working site keeps working
    ("image/png", JPEG),
    ("image/jpeg", WEBP),
    ("font/ttf", WOFF2),
    ("video/mp4", WEBM),
    # subtypes not in the table pass
    ("image/x-portable-pixmap", b"P6\n1 1\n255\n\x00\x00\x00"),
    ("audio/midi", b"MThd\x00\x00\x00\x06"),
]


@pytest.mark.parametrize(("content_type", "body"), GOOD_HEADS)
def test_sniff_accepts_real_heads(chain: ValidatorChain, content_type: str, body: bytes) -> None:
    assert chain.validate(candidate(content_type, body)) == ACCEPT


BAD_HEADS = [
    ("image/png", HTML_ERROR, "HTML"),  # the classic: an error page labelled as the image
    ("image/png", PHP_WARNING, "HTML"),
    ("image/jpeg", JSON_ERROR, "JSON"),
    ("image/gif", b"Not Found", "text"),
    ("image/gif", "Seite nicht gefunden – Grüße".encode()[:-1], "text"),  # a character cut at the sample's end
    ("image/jpeg", b" \r\n ", "whitespace"),
    ("image/webp", b"RIFF\x1a\x00\x00\x00WAVEfmt ", "WAV"),
    ("image/avif", MP4, "ISO-BMFF"),
    ("image/png", b"\x89PN", "unknown"),  # a PNG cut inside its signature
    ("image/svg+xml", HTML_ERROR, "HTML"),
    ("image/svg+xml", b'<?xml version="1.0"?><html xmlns="http://www.w3.org/1999/xhtml"/>', "XML"),
    ("image/svg+xml", PNG, "PNG"),  # SVG forms a family of its own
    ("image/png", SVG, "XML"),
    ("image/svg+xml", b"<svgfoo/>", "XML"),
    ("font/woff2", HTML_ERROR, "HTML"),
    ("font/woff", PNG, "PNG"),
    ("video/mp4", HTML_ERROR, "HTML"),
    ("video/webm", b"{}", "JSON"),
    ("audio/mpeg", b"<html><body>Forbidden</body></html>", "HTML"),
    ("audio/ogg", b"\x00\x01\x02\x03", "unknown"),
    ("image/x-portable-pixmap", HTML_ERROR, "HTML"),  # unknown subtype, but plainly a page
]


@pytest.mark.parametrize(("content_type", "body", "looks_like"), BAD_HEADS)
def test_sniff_rejects_mismatches(chain: ValidatorChain, content_type: str, body: bytes, looks_like: str) -> None:
    verdict = chain.validate(candidate(content_type, body))
    assert isinstance(verdict, Reject)
    assert verdict.reason == "sniff-mismatch"
    assert content_type in verdict.detail and looks_like in verdict.detail


@pytest.mark.parametrize(
    ("head", "complete", "agrees"),
    [
        (b"<!-- " + b"x" * 70_000, False, True),  # a long comment at the cut of a head sample: cannot tell yet
        (b"<!-- " + b"x" * 70_000, True, False),  # ...but a whole body that is only a comment is no SVG
        (b'<?xml version="1.0"?>', False, True),
        (b'<?xml version="1.0"?>', True, False),
        (b"<!DOCTYPE svg [ <!ENTITY a '>'> ]><svg/>", True, True),
        (b"<sv", False, True),
        (b"<sv", True, False),
    ],
)
def test_svg_sniff_partial_heads(head: bytes, complete: bool, agrees: bool) -> None:
    assert (sniff("image/svg+xml", head, complete=complete) is None) is agrees


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
        {"code": "SKU-1", "message": "Hello", "data": {"status": "404"}},  # status not a number
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


@pytest.mark.parametrize(
    ("essence", "expected"),
    [
        ("application/json", True),
        ("text/json", True),
        ("application/ld+json", True),
        ("application/vnd.api+json", True),
        ("application/jsonp", False),
        ("application/javascript", False),
        ("image/png", False),
    ],
)
def test_is_json_type(essence: str, expected: bool) -> None:
    assert is_json_type(essence) is expected


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
