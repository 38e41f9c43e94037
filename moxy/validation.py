"""The validator chain (DESIGN §5): every upstream answer passes it before it may be stored.

Pure: no I/O beyond importing the custom validators the settings name, no clock, no logging, no web imports.
Rejections are values (`Reject(reason)`), not exceptions; `moxy.proxy` decides what a rejection means.
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import TypeAlias

import orjson

from moxy.errors import ConfigError
from moxy.fields import OWS, valid_field_value
from moxy.rules import MediaPatterns, Rule, Rules, media_pattern_problem, parse_rules

__all__ = [
    "ACCEPT",
    "REASONS",
    "Accept",
    "Candidate",
    "Reject",
    "Rules",
    "Validator",
    "ValidatorChain",
    "Verdict",
    "build_chain",
    "error_envelope",
    "is_json_type",
    "load_validator",
    "media_type",
    "parse_rules",
    "sniff",
]


@dataclass(frozen=True, slots=True)
class Accept:
    """The answer may be stored."""


@dataclass(frozen=True, slots=True)
class Reject:
    """The answer must not be stored. `reason` is a short stable code (a metrics label); `detail` is for humans."""

    reason: str
    detail: str = ""


Verdict: TypeAlias = Accept | Reject
ACCEPT = Accept()

REASONS: tuple[str, ...] = (
    "status",
    "truncated",
    "length-mismatch",
    "empty",
    "too-large",
    "content-type",
    "sniff-mismatch",
    "json-invalid",
    "json-error-envelope",
    "rule",
)
"""Every reason the built-in validators give; custom validators add "custom:<name>"."""


@dataclass(frozen=True, slots=True)
class Candidate:
    """An upstream answer awaiting a verdict.

    `headers` have lowercase names, repeated ones joined with ", ". `body` is the whole decoded body when
    `complete_body` is True, else at least its first 64 KiB. `length` is the decoded length received;
    `declared_length` the Content-Length the upstream declared for the bytes on the wire."""

    url: str
    host: str
    status: int
    headers: Mapping[str, str]
    body: bytes
    length: int
    declared_length: int | None
    complete_body: bool = True


Validator: TypeAlias = Callable[[Candidate], Verdict]


class ValidatorChain:
    """Named validators run in order; the first Reject wins."""

    __slots__ = ("_full_body", "_validators")

    def __init__(
        self, validators: Sequence[tuple[str, Validator]], *, full_body: Callable[[str], bool] | None = None
    ) -> None:
        self._validators = tuple(validators)
        self._full_body = full_body

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(name for name, _ in self._validators)

    def validate(self, candidate: Candidate) -> Verdict:
        for _, validator in self._validators:
            verdict = validator(candidate)
            if type(verdict) is not Accept:
                return verdict
        return ACCEPT

    def needs_full_body(self, content_type: str) -> bool:
        """Whether validating this Content-Type reads the whole body: JSON types and any type a user rule's
        checks read. Images, video, audio and fonts need only their first 64 KiB."""
        essence, problem = media_type(content_type)
        if problem:
            return False  # rejected on the header alone
        if is_json_type(essence):
            return True
        return self._full_body is not None and self._full_body(essence)


# -- media types ---------------------------------------------------------------------------------

_ESSENCE = re.compile(r"[!#$%&'*+.^_`|~0-9a-z-]+/[!#$%&'*+.^_`|~0-9a-z-]+")


@lru_cache(maxsize=512)
def media_type(content_type: str) -> tuple[str, str]:
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
        if _ESSENCE.fullmatch(essence):  # other pieces come from commas inside quoted parameters
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


# -- status, completeness, size ----------------------------------------------------------------


def check_status(candidate: Candidate) -> Verdict:
    status = candidate.status
    if status == 206:
        # Moxy never asks for a range; a 206 is a fragment and storing it would serve the fragment as the whole.
        return Reject("status", "206 Partial Content is not a whole representation")
    if not 200 <= status <= 299:
        return Reject("status", f"status {status} is not storable")
    return ACCEPT


def _identity_encoded(headers: Mapping[str, str]) -> bool:
    encoding = headers.get("content-encoding", "").strip().lower()
    return encoding in ("", "identity")


def check_completeness(candidate: Candidate) -> Verdict:
    length = candidate.length
    if candidate.complete_body and len(candidate.body) != length:
        return Reject("truncated", f"body holds {len(candidate.body)} of {length} bytes received")
    declared = candidate.declared_length
    # Content-Length counts wire bytes (RFC 9110 §8.6); only with identity coding do they equal the decoded body.
    if declared is not None and _identity_encoded(candidate.headers):
        if length < declared:
            return Reject("truncated", f"received {length} of {declared} declared bytes")
        if length > declared:
            return Reject("length-mismatch", f"received {length} bytes, {declared} declared")
    if length == 0 and candidate.status != 204:
        return Reject("empty", f"empty body with status {candidate.status}")
    return ACCEPT


class SizeLimit:
    """Rejects bodies larger than `max_body_bytes` (decoded, or declared)."""

    __slots__ = ("max_body_bytes",)

    def __init__(self, max_body_bytes: int) -> None:
        self.max_body_bytes = max_body_bytes

    def __call__(self, candidate: Candidate) -> Verdict:
        size = candidate.length
        if candidate.declared_length is not None and candidate.declared_length > size:
            size = candidate.declared_length
        if size > self.max_body_bytes:
            return Reject("too-large", f"{size} bytes exceeds MOXY_MAX_BODY_BYTES={self.max_body_bytes}")
        return ACCEPT


# -- content type --------------------------------------------------------------------------------


class ContentTypeAllowlist:
    """Content-Type must be allowed: by every matching user rule that lists content types, else by the
    global allowlist. A 204 carries no content and so no type."""

    __slots__ = ("allowed", "rules")

    def __init__(self, allowed: MediaPatterns, rules: Rules | None) -> None:
        self.allowed = allowed
        self.rules = rules if rules is not None and rules.rules else None

    def __call__(self, candidate: Candidate) -> Verdict:
        if candidate.status == 204:
            return ACCEPT
        essence, problem = media_type(candidate.headers.get("content-type", ""))
        if problem:
            return Reject("content-type", problem)
        if self.rules is not None:
            overridden = False
            for rule in self.rules.for_host(candidate.host):
                if rule.content_types is not None:
                    overridden = True
                    if not rule.content_types.allows(essence):
                        where = f"{self.rules.source} rule[{rule.index}]"
                        return Reject("content-type", f"{essence} is not allowed for {candidate.host} by {where}")
            if overridden:
                return ACCEPT
        if not self.allowed.allows(essence):
            return Reject("content-type", f"{essence} is not in MOXY_CONTENT_TYPES")
        return ACCEPT


# -- sniffing ------------------------------------------------------------------------------------
#
# A small table of published magic numbers, written here rather than taken from puremagic or filetype:
# those answer "what is this file?" by trying up to ~100 signatures, while Moxy only asks "is this what it
# claims?", which is one dict lookup and one `startswith` on the hot path, with no dependency.

_Sniffer: TypeAlias = Callable[[bytes, bool], bool]


def _prefix(*magics: bytes) -> _Sniffer:
    return lambda head, complete: head.startswith(magics)


def _riff(*forms: bytes) -> _Sniffer:
    return lambda head, complete: head[:4] in (b"RIFF", b"RF64") and head[8:12] in forms


def _ftyp_brands(head: bytes) -> set[bytes]:
    """Major and compatible brands of a leading ISO-BMFF `ftyp` box (ISO/IEC 14496-12 §4.3)."""
    if head[4:8] != b"ftyp":
        return set()
    end = min(max(int.from_bytes(head[:4], "big"), 16), len(head), 1024)
    return {head[8:12]} | {head[offset : offset + 4] for offset in range(16, end - 3, 4)}


def _brands(*wanted: bytes) -> _Sniffer:
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
_FORMATS: dict[str, tuple[str, _Sniffer]] = {
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

_DECLARED: dict[str, str] = {
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
    for name, (_, sniffer) in _FORMATS.items():
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
    name = _DECLARED.get(essence)
    if name is None:
        if essence.startswith(_MEDIA_FAMILIES) and _looks_like_html(head):
            return f"declared {essence}, body looks like HTML"
        return None
    family, sniffer = _FORMATS[name]
    if sniffer(head, complete):
        return None
    for other_family, other in _FORMATS.values():  # SVG is alone in its family, so only SVG agrees with SVG
        if other_family == family and other is not sniffer and other(head, complete):
            return None
    return f"declared {essence} ({name}), body looks like {_describe(head)}"


def check_sniff(candidate: Candidate) -> Verdict:
    if candidate.status == 204:
        return ACCEPT
    essence, problem = media_type(candidate.headers.get("content-type", ""))
    if problem:
        return ACCEPT  # the content-type validator owns this
    mismatch = sniff(essence, candidate.body, complete=candidate.complete_body)
    return ACCEPT if mismatch is None else Reject("sniff-mismatch", mismatch)


# -- JSON sanity and user rules -------------------------------------------------------------------

_FAIL_WORDS = frozenset({"error", "fail", "failed", "failure"})


def _is_error_value(value: object) -> bool:
    """A top-level "error"/"errors" value that signals a failure: `null`, `false`, `0`, `""`, `[]`, `{}` do not."""
    if isinstance(value, bool):
        return value
    if isinstance(value, str):
        return bool(value.strip())
    if isinstance(value, int | float):
        return value != 0  # legacy PHP APIs: {"error": 0} on success, {"error": 1, "msg": ...} on failure
    if isinstance(value, list | dict):
        return bool(value)
    return False


def _show(value: object) -> str:
    text = orjson.dumps(value).decode()
    return text if len(text) <= 100 else text[:97] + "..."


def _first_error_text(errors: object) -> str:
    first = errors[0] if isinstance(errors, list) and errors else errors
    if isinstance(first, dict):
        for key in ("message", "title", "detail", "code"):
            if isinstance(first.get(key), str):
                return f": {_show(first[key])}"
    if isinstance(first, str):
        return f": {_show(first)}"
    return ""


def error_envelope(document: object) -> str | None:
    """A description of the error envelope `document` is, or None. Only a top-level object is inspected."""
    if not isinstance(document, dict):
        return None
    code, message, data = document.get("code"), document.get("message"), document.get("data")
    if isinstance(code, str) and isinstance(message, str) and isinstance(data, dict):
        status = data.get("status")
        if isinstance(status, int) and not isinstance(status, bool) and status >= 400:
            return f"WordPress REST error {_show(code)} (status {status})"
    if "error" in document and _is_error_value(document["error"]):
        return f'"error": {_show(document["error"])}'
    errors = document.get("errors")
    if _is_error_value(errors):
        count = len(errors) if isinstance(errors, list | dict) else 1
        return f'"errors" holds {count} item(s){_first_error_text(errors)}'
    if document.get("success") is False:
        return '"success": false'
    if document.get("ok") is False:
        return '"ok": false'
    for key in ("status", "stat"):  # JSend {"status": "fail"}; Flickr {"stat": "fail"}
        value = document.get(key)
        if isinstance(value, str) and value.strip().lower() in _FAIL_WORDS:
            return f'"{key}": {_show(value)}'
    return None


class JsonSanity:
    """For JSON types: the body parses (orjson) and is no error envelope. Then the checks of every user rule
    matching the host, on JSON bodies and on the extra types a rule lists. One parse serves both."""

    __slots__ = ("rules",)

    def __init__(self, rules: Rules | None) -> None:
        self.rules = rules if rules is not None and rules.rules else None

    def __call__(self, candidate: Candidate) -> Verdict:
        if candidate.status == 204:
            return ACCEPT
        essence, problem = media_type(candidate.headers.get("content-type", ""))
        if problem:
            return ACCEPT
        is_json = is_json_type(essence)
        checked: tuple[Rule, ...] = ()
        if self.rules is not None:
            checked = tuple(
                rule
                for rule in self.rules.for_host(candidate.host)
                if rule.checks and (is_json or rule.targets(essence))
            )
        if not is_json and not checked:
            return ACCEPT
        reason = "json-invalid" if is_json else "rule"
        if not candidate.complete_body:
            return Reject(reason, "only part of the body was supplied; JSON needs all of it")
        body = candidate.body
        try:
            # RFC 8259 §8.1: a parser MAY ignore a BOM; orjson does not, so skip it without copying the body.
            document = orjson.loads(memoryview(body)[3:] if body.startswith(b"\xef\xbb\xbf") else body)
        except orjson.JSONDecodeError as exc:
            return Reject(reason, f"body is not JSON: {exc}")
        if is_json:
            envelope = error_envelope(document)
            if envelope is not None:
                return Reject("json-error-envelope", envelope)
        for rule in checked:
            for position, check in enumerate(rule.checks):
                failure = check.failure(document)
                if failure is not None:
                    where = f"{self.rules.source if self.rules else ''} rule[{rule.index}].check[{position}]"
                    return Reject("rule", f"{where}: {failure}")
        return ACCEPT


# -- custom validators ---------------------------------------------------------------------------

_CUSTOM_SETTING = "MOXY_VALIDATORS"


def load_validator(path: str) -> tuple[str, Validator]:
    """Import "package.module:function" (or "package.module.function"). Returns (name, guarded validator):
    its rejections carry reason "custom:<function name>", and an exception or a non-verdict rejects (fail closed:
    a broken validator must not let answers through unchecked)."""
    spec = path.strip()
    module_name, _, attribute = spec.partition(":") if ":" in spec else spec.rpartition(".")
    if not module_name or not attribute:
        raise ConfigError(_CUSTOM_SETTING, f"{path!r} is not 'package.module:function'")
    try:
        target: object = importlib.import_module(module_name)
    except Exception as exc:  # a module failing at import time is a configuration error too
        raise ConfigError(_CUSTOM_SETTING, f"cannot import {module_name!r} for {path!r}: {exc}") from None
    for part in attribute.split("."):
        try:
            target = getattr(target, part)
        except AttributeError:
            raise ConfigError(_CUSTOM_SETTING, f"{module_name!r} has no {attribute!r} (from {path!r})") from None
    if not callable(target):
        raise ConfigError(_CUSTOM_SETTING, f"{path!r} is not callable")
    name = attribute.rsplit(".", 1)[-1]
    return name, _guarded(name, target)


def _guarded(name: str, validator: Callable[[Candidate], object]) -> Validator:
    reason = f"custom:{name}"

    def run(candidate: Candidate) -> Verdict:
        try:
            verdict = validator(candidate)
        except Exception as exc:
            return Reject(reason, f"raised {type(exc).__name__}: {exc}")
        if isinstance(verdict, Accept):
            return verdict
        if isinstance(verdict, Reject):
            return Reject(reason, f"{verdict.reason}: {verdict.detail}" if verdict.detail else verdict.reason)
        return Reject(reason, f"returned {type(verdict).__name__}, not Accept or Reject")

    return run


# -- assembly ------------------------------------------------------------------------------------


def build_chain(
    *,
    content_types: Sequence[str],
    max_body_bytes: int,
    rules: Rules | None = None,
    custom: Sequence[str] = (),
) -> ValidatorChain:
    """The chain of DESIGN §5: status, completeness, size, content type, sniff, JSON sanity and user rules, then
    custom validators in the order given. Raises ConfigError for a bad allowlist entry, size or import."""
    for pattern in content_types:
        problem = media_pattern_problem(pattern.strip().lower())
        if problem is not None:
            raise ConfigError("MOXY_CONTENT_TYPES", problem)
    if max_body_bytes <= 0:
        raise ConfigError("MOXY_MAX_BODY_BYTES", "must be a positive number of bytes")
    validators: list[tuple[str, Validator]] = [
        ("status", check_status),
        ("completeness", check_completeness),
        ("size", SizeLimit(max_body_bytes)),
        ("content-type", ContentTypeAllowlist(MediaPatterns(content_types), rules)),
        ("sniff", check_sniff),
        ("json", JsonSanity(rules)),
    ]
    validators.extend(load_validator(path) for path in custom)
    return ValidatorChain(validators, full_body=rules.targets if rules is not None and rules.rules else None)
