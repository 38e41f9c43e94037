"""Media types (moxy.media): Content-Type parsing, allowlist patterns, and the magic-byte table of the sniff
validator, tried on the heads of real files."""

from __future__ import annotations

import struct
import zlib

import pytest

from moxy.media import (
    DECLARED_FORMATS,
    PAGE_MARKUP,
    SIGNATURES,
    MediaPatterns,
    is_json_type,
    media_family,
    media_pattern_problem,
    parse_content_type,
    sniff,
)

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


# A whole, well-formed PNG (checked chunks), not tests/assets.PNG, which only starts like one: sniffing is tested on
# real file heads.
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


# -- Content-Type ---------------------------------------------------------------------------------


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
def test_parse_content_type(header: str, essence: str, problem: str) -> None:
    got_essence, got_problem = parse_content_type(header)
    assert got_essence == essence
    assert problem in got_problem and bool(got_problem) == bool(problem)


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


# -- allowlist patterns ---------------------------------------------------------------------------


@pytest.mark.parametrize("pattern", ["image/png", "image/*", "*/*", "application/*+json", "font/woff2"])
def test_good_patterns(pattern: str) -> None:
    assert media_pattern_problem(pattern) is None


@pytest.mark.parametrize("bad", ["image", "image/", "/png", "image/png extra", "", "image/png;q=1"])
def test_bad_patterns(bad: str) -> None:
    problem = media_pattern_problem(bad)
    assert problem is not None and repr(bad) in problem


@pytest.mark.parametrize(
    ("patterns", "essence", "allowed"),
    [
        (["image/*"], "image/png", True),
        (["image/*"], "video/mp4", False),
        (["*/*"], "text/html", False),
        (["*/*", "text/html"], "text/html", True),
        (["text/*"], "application/xhtml+xml", False),
        (["application/*+json"], "application/vnd.api+json", True),
        ([], "image/png", False),
    ],
)
def test_media_patterns(patterns: list[str], essence: str, allowed: bool) -> None:
    compiled = MediaPatterns(patterns)
    assert compiled.allows(essence) is allowed
    assert compiled.allows(essence) is allowed  # answered from the memo the second time


def test_media_pattern_memo_stays_bounded() -> None:
    compiled = MediaPatterns(["image/*"])
    for number in range(3000):
        assert compiled.allows(f"image/x-{number}")
    assert len(compiled._memo) <= 1024
    assert "image/*" in repr(compiled)


@pytest.mark.parametrize("essence", sorted(PAGE_MARKUP))
def test_page_markup_needs_a_literal_entry(essence: str) -> None:
    assert not MediaPatterns(["*/*", "text/*", "application/*"]).allows(essence)
    assert MediaPatterns([essence]).allows(essence)


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
def test_sniff_accepts_real_heads(content_type: str, body: bytes) -> None:
    essence, problem = parse_content_type(content_type)
    assert not problem
    assert sniff(essence, body) is None


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
def test_sniff_rejects_mismatches(content_type: str, body: bytes, looks_like: str) -> None:
    essence, problem = parse_content_type(content_type)
    assert not problem
    mismatch = sniff(essence, body)
    assert mismatch is not None
    assert content_type in mismatch and looks_like in mismatch


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


def test_every_declared_type_names_a_known_format() -> None:
    assert set(DECLARED_FORMATS.values()) <= set(SIGNATURES)
    assert all(
        essence == essence.lower() and parse_content_type(essence) == (essence, "") for essence in DECLARED_FORMATS
    )


@pytest.mark.parametrize(
    ("content_type", "family"),
    [
        ("image/png", "image"),
        ("IMAGE/WEBP; q=1", "image"),
        ("application/json", "json"),
        ("application/problem+json", "json"),
        ("text/json", "json"),
        ("font/woff2", "font"),
        # Found in review: an upstream that relabels a font with another of its aliases is not a change of kind.
        ("application/font-woff", "font"),
        ("application/x-font-woff", "font"),
        ("application/font-woff2", "font"),
        ("application/x-font-otf", "font"),
        ("application/font-sfnt", "font"),
        ("application/vnd.ms-fontobject", "font"),
        ("video/mp4", "media"),  # video and audio share containers: one kind (audio/mp4 and video/mp4)
        ("audio/mpeg", "media"),
        ("application/octet-stream", "application"),
        ("", ""),
        ("image/png\x0b", ""),
    ],
)
def test_media_family(content_type: str, family: str) -> None:
    assert media_family(content_type) == family
