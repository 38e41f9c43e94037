"""Media types: Content-Type parsing, allowlist patterns with `*` wildcards, and the magic-byte table of the sniff
validator.

Pure and stdlib only: no I/O, no clock, no logging. Of Moxy it imports only `moxy.fields` (the RFC 9110 field-value
grammar a Content-Type must keep to); `moxy.validation` and `moxy.rules` build on it.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from fnmatch import fnmatchcase
from functools import lru_cache
from typing import TypeAlias

from moxy.fields import OWS, valid_field_value

__all__ = [
    "media_family",
    "DECLARED_FORMATS",
    "PAGE_MARKUP",
    "SIGNATURES",
    "MediaPatterns",
    "Sniffer",
    "is_json_type",
    "media_pattern_problem",
    "parse_content_type",
    "sniff",
]

# "type/subtype" of RFC 9110 §8.3.1: a token on each side of the slash (§5.6.2 token characters, lowercased). `*` is
# a token character, so the same grammar admits the wildcards of an allowlist pattern.
_TYPE_SUBTYPE = re.compile(r"[!#$%&'*+.^_`|~0-9a-z-]+/[!#$%&'*+.^_`|~0-9a-z-]+")


# -- Content-Type ---------------------------------------------------------------------------------


@lru_cache(maxsize=512)
def parse_content_type(content_type: str) -> tuple[str, str]:
    """(essence, problem) of a Content-Type value: ("image/png", "") for "image/PNG; charset=x".

    The problem is non-empty when the header is missing, malformed, or ambiguous: repeated Content-Type headers
    (joined with ", ") naming different types are refused rather than guessed (RFC 9110 §8.3 allows one).
    A value with a control byte is malformed: it is stored and sent again as it is, and no server can send it
    (RFC 9110 §5.5). Only SP and HTAB count as whitespace (str.strip() would hide a trailing control byte)."""
    if not content_type.strip(OWS):
        return "", "missing Content-Type"
    if not valid_field_value(content_type):
        return "", f"malformed Content-Type {content_type[:80]!r}"
    essences = set()
    for piece in content_type.split(","):
        essence = piece.split(";", 1)[0].strip(OWS).lower()
        if _TYPE_SUBTYPE.fullmatch(essence):  # other pieces come from commas inside quoted parameters
            essences.add(essence)
    if not essences:
        return "", f"malformed Content-Type {content_type[:80]!r}"
    if len(essences) > 1:
        return "", f"conflicting Content-Type values {sorted(essences)!r}"
    return essences.pop(), ""


_JSON_TYPES = frozenset({"application/json", "text/json", "application/x-json", "text/x-json"})


def is_json_type(essence: str) -> bool:
    """application/json, text/json and any structured-syntax "+json" type (RFC 6839 §3.1)."""
    return essence in _JSON_TYPES or essence.endswith("+json")


def media_family(content_type: str) -> str:
    """What kind of thing a Content-Type names: "json"; for a type the sniff table knows, its format's family
    ("image", "font", "media"); else its top-level type.
    A URL whose answers change family (an image that is now JSON) is more likely broken than redesigned."""
    essence, problem = parse_content_type(content_type)
    if problem or not essence:
        return ""
    if is_json_type(essence):
        return "json"
    # A type the sniff table knows is of its format's family: every font alias (application/x-font-woff, ...)
    # is a font, whatever its top-level type says.
    known = DECLARED_FORMATS.get(essence)
    if known is not None:
        return SIGNATURES[known][0]
    return essence.partition("/")[0]


# -- allowlist patterns --------------------------------------------------------------------------

# Markup a browser would render as a page. Only a literal entry in an allowlist admits these: a broad
# wildcard such as "text/*" or "*/*" must never turn Moxy into an HTML host by accident.
PAGE_MARKUP = frozenset({"text/html", "application/xhtml+xml"})


def media_pattern_problem(pattern: str) -> str | None:
    """Why `pattern` is not a usable allowlist entry ("image/png", "image/*", "application/*+json"), or None."""
    if _TYPE_SUBTYPE.fullmatch(pattern) is None:
        return f"{pattern!r} is not a media type pattern like 'image/png', 'image/*' or 'application/*+json'"
    return None


class MediaPatterns:
    """An allowlist of media types with `*` wildcards; matching takes the essence ("type/subtype", lowercase)."""

    __slots__ = ("_exact", "_globs", "_memo", "patterns")

    def __init__(self, patterns: Sequence[str]) -> None:
        self.patterns = tuple(pattern.strip().lower() for pattern in patterns)
        self._exact = frozenset(pattern for pattern in self.patterns if "*" not in pattern)
        self._globs = tuple(pattern for pattern in self.patterns if "*" in pattern)
        self._memo: dict[str, bool] = {}

    def allows(self, essence: str) -> bool:
        known = self._memo.get(essence)
        if known is None:
            known = essence in self._exact or (
                essence not in PAGE_MARKUP and any(fnmatchcase(essence, glob) for glob in self._globs)
            )
            if len(self._memo) >= 1024:  # upstreams choose these strings: keep the memo bounded
                self._memo.clear()
            self._memo[essence] = known
        return known

    def __repr__(self) -> str:
        return f"MediaPatterns({list(self.patterns)!r})"


# -- sniffing ------------------------------------------------------------------------------------
#
# A small table of published magic numbers, written here rather than taken from puremagic or filetype:
# those answer "what is this file?" by trying up to ~100 signatures, while Moxy only asks "is this what it
# claims?", which is one dict lookup and one `startswith` on the hot path, with no dependency.

Sniffer: TypeAlias = Callable[[bytes, bool], bool]
"""(leading bytes, whether they are the whole body) -> whether they look like the format."""


def _prefix(*magics: bytes) -> Sniffer:
    return lambda head, complete: head.startswith(magics)


def _riff(*forms: bytes) -> Sniffer:
    return lambda head, complete: head[:4] in (b"RIFF", b"RF64") and head[8:12] in forms


def _ftyp_brands(head: bytes) -> set[bytes]:
    """Major and compatible brands of a leading ISO-BMFF `ftyp` box (ISO/IEC 14496-12 §4.3)."""
    if head[4:8] != b"ftyp":
        return set()
    end = min(max(int.from_bytes(head[:4], "big"), 16), len(head), 1024)
    return {head[8:12]} | {head[offset : offset + 4] for offset in range(16, end - 3, 4)}


def _brands(*wanted: bytes) -> Sniffer:
    brands = frozenset(wanted)
    return lambda head, complete: not brands.isdisjoint(_ftyp_brands(head))


# Top-level boxes a whole file or a fragmented-MP4 segment may start with (ISO/IEC 14496-12, QuickTime).
_ISO_BOXES = frozenset({b"ftyp", b"styp", b"moov", b"moof", b"mdat", b"free", b"skip", b"wide", b"sidx", b"pnot"})


def _iso_bmff(head: bytes, complete: bool) -> bool:
    return head[4:8] in _ISO_BOXES


def _mpeg_audio(head: bytes, complete: bool) -> bool:
    # ID3v2 tag, or an MPEG audio frame: 11 sync bits set (ISO/IEC 11172-3 §2.4.2.3).
    return head.startswith(b"ID3") or (len(head) >= 2 and head[0] == 0xFF and head[1] & 0xE0 == 0xE0)


def _aac(head: bytes, complete: bool) -> bool:
    # ADTS: 12 sync bits and layer 00 (ISO/IEC 13818-7 §6.2); or an ADIF header; or an ID3 tag in front.
    return head.startswith((b"ID3", b"ADIF")) or (len(head) >= 2 and head[0] == 0xFF and head[1] & 0xF6 == 0xF0)


def _mpeg_ts(head: bytes, complete: bool) -> bool:
    return head[:1] == b"\x47" and (len(head) <= 188 or head[188] == 0x47)  # 188-byte packets, sync byte 0x47


def _eot(head: bytes, complete: bool) -> bool:
    return head[34:36] == b"LP"  # Embedded OpenType: MagicNumber 0x504C at offset 34, little-endian


_XML_SPACE = re.compile(rb"[ \t\r\n]*")
_SVG_ROOT = re.compile(rb"<(?:[A-Za-z_][\w.-]*:)?svg[\s>/]")


def _svg(head: bytes, complete: bool) -> bool:
    """The first element is <svg>, after an optional BOM, XML declaration, processing instructions, comments and
    a doctype. Running out of a partial head before deciding gives the benefit of the doubt."""
    position = 3 if head.startswith(b"\xef\xbb\xbf") else 0
    undecided = not complete
    while True:
        match = _XML_SPACE.match(head, position)
        position = match.end() if match else position
        if position >= len(head):
            return undecided
        if head.startswith(b"<?", position):
            end = head.find(b"?>", position + 2)
            if end < 0:
                return undecided
            position = end + 2
        elif head.startswith(b"<!--", position):
            end = head.find(b"-->", position + 4)
            if end < 0:
                return undecided
            position = end + 3
        elif head[position : position + 9].upper() == b"<!DOCTYPE":
            close = head.find(b">", position)
            bracket = head.find(b"[", position, close if close >= 0 else len(head))
            if bracket >= 0:  # an internal subset may hold '>' characters (XML 1.0 §2.8)
                subset_end = head.find(b"]", bracket)
                close = head.find(b">", subset_end) if subset_end >= 0 else -1
            if close < 0:
                return undecided
            position = close + 1
        else:
            return _SVG_ROOT.match(head, position) is not None or (undecided and len(head) - position < 6)


_SFNT = (b"\x00\x01\x00\x00", b"OTTO", b"true", b"typ1", b"ttcf")

# format name -> (family, sniffer). A family groups formats a browser decodes by content whatever the label
# (WHATWG MIME Sniffing §8.1 for images, §8.2 for audio and video; fonts go through the font sanitiser).
SIGNATURES: Mapping[str, tuple[str, Sniffer]] = {
    "PNG": ("image", _prefix(b"\x89PNG\r\n\x1a\n")),
    "JPEG": ("image", _prefix(b"\xff\xd8\xff")),
    "GIF": ("image", _prefix(b"GIF87a", b"GIF89a")),
    "WebP": ("image", _riff(b"WEBP")),
    "AVIF": ("image", _brands(b"avif", b"avis")),
    "HEIF": ("image", _brands(b"heic", b"heix", b"heim", b"heis", b"hevc", b"hevx", b"hevm", b"hevs", b"mif1")),
    "ICO": ("image", _prefix(b"\x00\x00\x01\x00", b"\x00\x00\x02\x00", b"\x89PNG\r\n\x1a\n")),
    "BMP": ("image", _prefix(b"BM")),
    "TIFF": ("image", _prefix(b"II*\x00", b"MM\x00*")),
    "JPEG XL": ("image", _prefix(b"\xff\x0a", b"\x00\x00\x00\x0cJXL \r\n\x87\n")),
    "SVG": ("svg", _svg),  # a family of its own: an <img> renders SVG only when labelled so, and vice versa
    "WOFF": ("font", _prefix(b"wOFF")),
    "WOFF2": ("font", _prefix(b"wOF2")),
    "SFNT": ("font", _prefix(*_SFNT)),
    "EOT": ("font", _eot),
    "ISO-BMFF": ("media", _iso_bmff),
    "Matroska": ("media", _prefix(b"\x1a\x45\xdf\xa3")),
    "MP3": ("media", _mpeg_audio),
    "AAC": ("media", _aac),
    "Ogg": ("media", _prefix(b"OggS")),
    "WAV": ("media", _riff(b"WAVE")),
    "AVI": ("media", _riff(b"AVI ")),
    "FLAC": ("media", _prefix(b"fLaC", b"ID3")),
    "FLV": ("media", _prefix(b"FLV\x01")),
    "MPEG-TS": ("media", _mpeg_ts),
}

# declared essence -> the format in SIGNATURES its leading bytes must agree with (by family, see `sniff`).
DECLARED_FORMATS: Mapping[str, str] = {
    **dict.fromkeys(("image/png", "image/apng", "image/x-png"), "PNG"),
    **dict.fromkeys(("image/jpeg", "image/jpg", "image/pjpeg"), "JPEG"),
    "image/gif": "GIF",
    "image/webp": "WebP",
    **dict.fromkeys(("image/avif", "image/avif-sequence"), "AVIF"),
    **dict.fromkeys(("image/heic", "image/heif", "image/heic-sequence", "image/heif-sequence"), "HEIF"),
    **dict.fromkeys(("image/x-icon", "image/vnd.microsoft.icon", "image/ico", "image/icon"), "ICO"),
    **dict.fromkeys(("image/bmp", "image/x-bmp", "image/x-ms-bmp"), "BMP"),
    "image/tiff": "TIFF",
    "image/jxl": "JPEG XL",
    "image/svg+xml": "SVG",
    **dict.fromkeys(("font/woff", "application/font-woff", "application/x-font-woff"), "WOFF"),
    **dict.fromkeys(("font/woff2", "application/font-woff2"), "WOFF2"),
    **dict.fromkeys(
        (
            "font/ttf",
            "font/otf",
            "font/sfnt",
            "font/collection",
            "application/x-font-ttf",
            "application/x-font-otf",
            "application/x-font-truetype",
            "application/x-font-opentype",
            "application/font-sfnt",
        ),
        "SFNT",
    ),
    "application/vnd.ms-fontobject": "EOT",
    **dict.fromkeys(
        (
            "video/mp4",
            "audio/mp4",
            "video/quicktime",
            "video/x-m4v",
            "audio/x-m4a",
            "audio/m4a",
            "video/3gpp",
            "video/3gpp2",
            "audio/3gpp",
            "audio/3gpp2",
            "video/iso.segment",
        ),
        "ISO-BMFF",
    ),
    **dict.fromkeys(("video/webm", "audio/webm", "video/x-matroska", "audio/x-matroska"), "Matroska"),
    **dict.fromkeys(("audio/mpeg", "audio/mp3", "audio/mpeg3", "audio/x-mpeg", "audio/mpa"), "MP3"),
    **dict.fromkeys(("audio/aac", "audio/aacp", "audio/x-aac"), "AAC"),
    **dict.fromkeys(("audio/ogg", "video/ogg", "application/ogg", "audio/opus", "audio/vorbis"), "Ogg"),
    **dict.fromkeys(("audio/wav", "audio/x-wav", "audio/wave", "audio/vnd.wave"), "WAV"),
    **dict.fromkeys(("video/x-msvideo", "video/avi", "video/msvideo"), "AVI"),
    **dict.fromkeys(("audio/flac", "audio/x-flac"), "FLAC"),
    "video/x-flv": "FLV",
    "video/mp2t": "MPEG-TS",
}

_MEDIA_FAMILIES = ("image/", "video/", "audio/", "font/")
_HTML_STARTS = (b"<!doctype html", b"<html", b"<head", b"<body", b"<title", b"<meta", b"<script", b"<br", b"<b>")


def _looks_like_html(head: bytes) -> bool:
    return head[:512].lstrip(b" \t\r\n\xef\xbb\xbf").lower().startswith(_HTML_STARTS)


def _is_text(sample: bytes) -> bool:
    try:
        decoded = sample.decode("utf-8")
    except UnicodeDecodeError as exc:
        if exc.reason != "unexpected end of data":  # only a character cut at the end of the sample is forgiven
            return False
        decoded = sample[: exc.start].decode("utf-8")
    return all(char.isprintable() or char in "\t\r\n" for char in decoded)


def _describe(head: bytes) -> str:
    """What the body looks like, for the rejection detail (only on the reject path)."""
    if _looks_like_html(head):
        return "HTML"
    text = head[:512].lstrip(b" \t\r\n\xef\xbb\xbf")
    if text[:1] in (b"{", b"["):
        return "JSON-like text"
    for name, (_, sniffer) in SIGNATURES.items():
        if sniffer(head, True) and name != "SVG":
            return name
    if text[:1] == b"<":
        return "XML/markup"
    if not text:
        return "whitespace"
    if _is_text(text[:256]):
        return "text"
    return f"unknown bytes {head[:8].hex(' ')}"


def sniff(essence: str, head: bytes, *, complete: bool = True) -> str | None:
    """Why the leading bytes disagree with the declared media type, or None when they agree.

    Agreement is by family: a JPEG labelled image/png is still an image every browser decodes, so it passes;
    an HTML or JSON error page labelled as an image, font or media file does not. Subtypes missing from the table
    pass, unless the body is plainly an HTML page."""
    name = DECLARED_FORMATS.get(essence)
    if name is None:
        if essence.startswith(_MEDIA_FAMILIES) and _looks_like_html(head):
            return f"declared {essence}, body looks like HTML"
        return None
    family, sniffer = SIGNATURES[name]
    if sniffer(head, complete):
        return None
    for other_family, other in SIGNATURES.values():  # SVG is alone in its family, so only SVG agrees with SVG
        if other_family == family and other is not sniffer and other(head, complete):
            return None
    return f"declared {essence} ({name}), body looks like {_describe(head)}"
