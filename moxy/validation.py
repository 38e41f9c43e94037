"""The validator chain: every upstream answer passes it before it may be stored.

Pure: no I/O beyond importing the custom validators the settings name, no clock, no logging, no web imports.
Rejections are values (`Reject(reason)`), not exceptions; `moxy.proxy` decides what a rejection means.
What a media type is, which ones an allowlist admits and what their leading bytes look like is `moxy.media`'s.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TypeAlias

import orjson

from moxy.errors import ConfigError
from moxy.media import MediaPatterns, is_json_type, media_pattern_problem, parse_content_type, sniff
from moxy.rules import Rule, Rules, parse_rules

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
    "load_validator",
    "parse_rules",
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
        essence, problem = parse_content_type(content_type)
        if problem:
            return False  # rejected on the header alone
        if is_json_type(essence):
            return True
        return self._full_body is not None and self._full_body(essence)


# -- status, completeness, size ----------------------------------------------------------------


# RFC 9110 §15.3.1 and §15.3.4: the 2xx answers whose content is the target resource's representation.
WHOLE_REPRESENTATION_STATUSES = frozenset({200, 203})


def check_status(candidate: Candidate) -> Verdict:
    status = candidate.status
    if status == 206:
        # Moxy never asks for a range; a 206 is a fragment and storing it would serve the fragment as the whole.
        return Reject("status", "206 Partial Content is not a whole representation")
    if status not in WHOLE_REPRESENTATION_STATUSES:
        # 201, 202, 204, 205, 207... are successes of an operation, not the asset the URL names (RFC 9110 §15.3):
        # accepted, an upstream's "204 No Content" would replace an image with an empty 200 for its whole lifetime.
        return Reject("status", f"status {status} is not a representation of the resource")
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
        essence, problem = parse_content_type(candidate.headers.get("content-type", ""))
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


def check_sniff(candidate: Candidate) -> Verdict:
    if candidate.status == 204:
        return ACCEPT
    essence, problem = parse_content_type(candidate.headers.get("content-type", ""))
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


def _error_status(value: object) -> int | None:
    """An HTTP error status (400-599) written as a number or as a numeric string, else None."""
    if isinstance(value, str) and value.strip().isascii() and value.strip().isdigit() and len(value.strip()) == 3:
        value = int(value.strip())
    if isinstance(value, int) and not isinstance(value, bool) and 400 <= value <= 599:
        return value
    return None


# Members that, beside an error status, make an object an error report rather than data that holds a number.
_REPORT_MEMBERS = ("message", "error", "title", "detail", "msg")


def error_envelope(document: object) -> str | None:
    """A description of the error envelope `document` is, or None. Only a top-level object is inspected (member
    names in any case: `{"Error": ...}` is one too); an array is data, whatever its items hold, since a feed of
    records that each carry an "error" member is ordinary content."""
    if not isinstance(document, dict):
        return None
    return _object_envelope(document)


def _object_envelope(original: dict[object, object]) -> str | None:
    document = {key.lower(): value for key, value in original.items() if isinstance(key, str)}
    code, message, data = document.get("code"), document.get("message"), document.get("data")
    if isinstance(code, str) and isinstance(message, str) and isinstance(data, dict):
        status = _error_status(data.get("status"))
        if status is not None:
            return f"WordPress REST error {_show(code)} (status {status})"
    status = _error_status(document.get("status"))
    if status is None:
        status = _error_status(document.get("statuscode"))
    if status is not None and any(isinstance(document.get(name), str | dict) for name in _REPORT_MEMBERS):
        # RFC 9457 problem details ({"title", "status", "detail"}) and the many APIs shaped like them.
        return f"error report with status {status}"
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
        essence, problem = parse_content_type(candidate.headers.get("content-type", ""))
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
        if essence == "application/problem+json":
            # RFC 9457: this media type is by definition a report of a failure, never the resource itself.
            return Reject("json-error-envelope", "application/problem+json is an error report")
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
    """The chain in its fixed order: status, completeness, size, content type, sniff, JSON sanity and user rules, then
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
