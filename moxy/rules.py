"""User validation rules: the rules-file format, RFC 6901 JSON pointers and the checks they drive.

Pure: the caller reads the file and passes its text; nothing here touches the disk, the clock or the environment.
`moxy.validation` applies these rules; this module sits below it and imports only `moxy.errors` and `moxy.media`.
"""

from __future__ import annotations

import enum
import json
import re
import tomllib
from collections.abc import Sequence
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from typing import Any, Literal

from moxy.errors import ConfigError
from moxy.media import MediaPatterns, media_pattern_problem

__all__ = [
    "MISSING",
    "Check",
    "Rule",
    "Rules",
    "json_equal",
    "parse_pointer",
    "parse_rules",
    "resolve_pointer",
]

SETTING = "MOXY_RULES_FILE"


class _Missing(enum.Enum):
    MISSING = enum.auto()


MISSING = _Missing.MISSING
"""What `resolve_pointer` answers when the pointer names nothing, and the "not set" value of a check's conditions
(JSON `null` is a legitimate value to compare with, so `None` cannot mean "not set")."""


# -- JSON pointer (RFC 6901) ---------------------------------------------------------------------

_ARRAY_INDEX = re.compile(r"0|[1-9][0-9]*")  # RFC 6901 §4: no leading zeros; "-" names no existing element


def parse_pointer(text: str) -> tuple[str, ...]:
    """The reference tokens of a JSON pointer, unescaped. Raises ValueError on bad syntax (RFC 6901 §3)."""
    if text == "":
        return ()
    if not text.startswith("/"):
        raise ValueError("a JSON pointer is empty or starts with '/' (RFC 6901 §3)")
    tokens = []
    for raw in text[1:].split("/"):
        tilde = raw.find("~")
        while tilde != -1:
            if raw[tilde + 1 : tilde + 2] not in ("0", "1"):
                raise ValueError("'~' must be followed by '0' or '1' (RFC 6901 §3)")
            tilde = raw.find("~", tilde + 2)
        # RFC 6901 §4: "~1" first, then "~0", so that "~01" becomes "~1" and not "/".
        tokens.append(raw.replace("~1", "/").replace("~0", "~"))
    return tuple(tokens)


def resolve_pointer(document: object, tokens: Sequence[str]) -> object:
    """The value `tokens` names in `document`, or MISSING."""
    node = document
    for token in tokens:
        if isinstance(node, dict):
            if token not in node:
                return MISSING
            node = node[token]
        elif isinstance(node, list):
            if _ARRAY_INDEX.fullmatch(token) is None:
                return MISSING
            index = int(token)
            if index >= len(node):
                return MISSING
            node = node[index]
        else:
            return MISSING
    return node


def json_equal(left: object, right: object) -> bool:
    """Equality of JSON values: unlike Python's `==`, `true` is not `1`; `1` and `1.0` are one number."""
    if isinstance(left, bool) or isinstance(right, bool):
        return type(left) is type(right) and left == right
    if isinstance(left, int | float) and isinstance(right, int | float):
        return left == right
    if isinstance(left, str) or left is None:
        return type(left) is type(right) and left == right
    if isinstance(left, list):
        return (
            isinstance(right, list)
            and len(left) == len(right)
            and all(json_equal(a, b) for a, b in zip(left, right, strict=True))
        )
    if isinstance(left, dict):
        return (
            isinstance(right, dict)
            and left.keys() == right.keys()
            and all(json_equal(value, right[key]) for key, value in left.items())
        )
    return False


def _is_json_value(value: object) -> bool:
    if value is None or isinstance(value, str | bool | int | float):
        return True
    if isinstance(value, list):
        return all(_is_json_value(item) for item in value)
    if isinstance(value, dict):
        return all(isinstance(key, str) and _is_json_value(item) for key, item in value.items())
    return False


def _show(value: object) -> str:
    text = json.dumps(value, ensure_ascii=False)
    return text if len(text) <= 60 else text[:57] + "..."


# -- rules ---------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Check:
    """One condition on the JSON body. Every condition given must hold.

    `must_exist`: True - the pointer must name a value; False - it must name nothing; None - no condition.
    `equals` / `not_equals`: JSON values, or MISSING when not set. A missing value is "not equal" to anything."""

    pointer: str
    tokens: tuple[str, ...]
    must_exist: bool | None = None
    equals: object = MISSING
    not_equals: object = MISSING

    def failure(self, document: object) -> str | None:
        """Why `document` fails this check, or None when it passes."""
        value = resolve_pointer(document, self.tokens)
        where = self.pointer or "the document"
        if self.must_exist is True and value is MISSING:
            return f"{where} is missing"
        if self.must_exist is False and value is not MISSING:
            return f"{where} exists ({_show(value)})"
        if self.equals is not MISSING:
            if value is MISSING:
                return f"{where} is missing (expected {_show(self.equals)})"
            if not json_equal(value, self.equals):
                return f"{where} is {_show(value)}, expected {_show(self.equals)}"
        if self.not_equals is not MISSING and value is not MISSING and json_equal(value, self.not_equals):
            return f"{where} is {_show(value)}"
        return None


@dataclass(frozen=True, slots=True)
class Rule:
    """Checks and an optional content-type allowlist for hosts matching `host` (a glob: "*.example.com")."""

    host: str
    index: int = 0
    content_types: MediaPatterns | None = field(default=None, compare=False)
    checks: tuple[Check, ...] = ()

    def matches(self, host: str) -> bool:
        return fnmatchcase(host, self.host)

    def targets(self, essence: str) -> bool:
        """Whether this rule's checks read bodies of this media type beyond JSON ones (a mislabelled API)."""
        return bool(self.checks) and self.content_types is not None and self.content_types.allows(essence)


@dataclass(frozen=True, slots=True)
class Rules:
    """Every rule of one rules file. Every rule whose host pattern matches applies (checks and allowlists)."""

    rules: tuple[Rule, ...] = ()
    source: str = "<rules>"

    def for_host(self, host: str) -> tuple[Rule, ...]:
        host = host.lower()
        return tuple(rule for rule in self.rules if rule.matches(host))

    def targets(self, essence: str) -> bool:
        """Whether some rule's checks read bodies of this media type (for any host)."""
        return any(rule.targets(essence) for rule in self.rules)


def parse_rules(text: str, *, source: str, fmt: Literal["toml", "json"]) -> Rules:
    """Parse a rules file (the caller read it). Raises ConfigError("MOXY_RULES_FILE", ...) naming the line for
    syntax errors and the key path (`rule[1].check[0].pointer`) for errors of meaning."""
    document: Any
    if fmt == "toml":
        try:
            document = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(SETTING, _toml_problem(source, str(exc))) from None
    elif fmt == "json":
        try:
            document = json.loads(text, object_pairs_hook=_no_duplicates, parse_constant=_no_constant)
        except json.JSONDecodeError as exc:
            raise ConfigError(SETTING, f"{source} line {exc.lineno}: {exc.msg} (column {exc.colno})") from None
        except ValueError as exc:
            raise ConfigError(SETTING, f"{source}: {exc}") from None
    else:
        raise ConfigError(SETTING, f"{source}: unknown rules format {fmt!r} (toml or json)")
    return _build(document, source)


_TOML_POSITION = re.compile(r"\s*\(at line (\d+), column (\d+)\)$")


def _toml_problem(source: str, message: str) -> str:
    # tomllib (3.11) puts the position only in the message: "Invalid value (at line 3, column 9)".
    found = _TOML_POSITION.search(message)
    if found is None:
        return f"{source}: {message}"
    return f"{source} line {found[1]}: {message[: found.start()]} (column {found[2]})"


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise ValueError(f"duplicate key {key!r}")
        result[key] = value
    return result


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON (RFC 8259 §6)")


def _fail(source: str, path: str, message: str) -> ConfigError:
    return ConfigError(SETTING, f"{source} key {path}: {message}")


def _only_keys(table: dict[str, Any], allowed: set[str], source: str, path: str) -> None:
    for key in table:
        if key not in allowed:
            known = ", ".join(sorted(allowed))
            raise _fail(source, f"{path}.{key}" if path else key, f"unknown key (known: {known})")


def _build(document: Any, source: str) -> Rules:
    if not isinstance(document, dict):
        raise ConfigError(SETTING, f"{source}: the top level must be a table/object holding 'rule'")
    _only_keys(document, {"rule"}, source, "")
    raw_rules = document.get("rule", [])
    if not isinstance(raw_rules, list):
        raise _fail(source, "rule", "must be a list of tables ([[rule]] in TOML)")
    return Rules(tuple(_build_rule(raw, index, source) for index, raw in enumerate(raw_rules)), source)


def _build_rule(raw: Any, index: int, source: str) -> Rule:
    path = f"rule[{index}]"
    if not isinstance(raw, dict):
        raise _fail(source, path, "must be a table/object")
    _only_keys(raw, {"host", "content_types", "check"}, source, path)
    host = raw.get("host")
    if not isinstance(host, str) or not host.strip():
        raise _fail(
            source, f"{path}.host", "a host pattern string is required (e.g. 'api.example.com', '*.example.com')"
        )
    patterns: MediaPatterns | None = None
    if "content_types" in raw:
        types = raw["content_types"]
        if not isinstance(types, list) or not all(isinstance(item, str) for item in types):
            raise _fail(source, f"{path}.content_types", "must be a list of strings")
        for position, item in enumerate(types):
            problem = media_pattern_problem(item.strip().lower())
            if problem is not None:
                raise _fail(source, f"{path}.content_types[{position}]", problem)
        patterns = MediaPatterns(types)
    raw_checks = raw.get("check", [])
    if not isinstance(raw_checks, list):
        raise _fail(source, f"{path}.check", "must be a list of tables ([[rule.check]] in TOML)")
    checks = tuple(_build_check(item, f"{path}.check[{position}]", source) for position, item in enumerate(raw_checks))
    return Rule(host=host.strip().lower(), index=index, content_types=patterns, checks=checks)


def _build_check(raw: Any, path: str, source: str) -> Check:
    if not isinstance(raw, dict):
        raise _fail(source, path, "must be a table/object")
    _only_keys(raw, {"pointer", "exists", "must_exist", "equals", "not_equals"}, source, path)
    pointer = raw.get("pointer")
    if not isinstance(pointer, str):
        raise _fail(source, f"{path}.pointer", "a JSON pointer string is required (e.g. '/items/0/id')")
    try:
        tokens = parse_pointer(pointer)
    except ValueError as exc:
        raise _fail(source, f"{path}.pointer", f"{pointer!r}: {exc}") from None
    if "exists" in raw and "must_exist" in raw:
        raise _fail(source, f"{path}.must_exist", "give either 'exists' or 'must_exist', not both")
    exists_key = "exists" if "exists" in raw else "must_exist"
    must_exist = raw.get(exists_key)
    if must_exist is not None and not isinstance(must_exist, bool):
        raise _fail(source, f"{path}.{exists_key}", "must be true or false")
    conditions: dict[str, object] = {}
    for key in ("equals", "not_equals"):
        if key in raw:
            if not _is_json_value(raw[key]):
                raise _fail(source, f"{path}.{key}", "must be a JSON value (TOML dates and times are not)")
            conditions[key] = raw[key]
    if must_exist is None and not conditions:
        raise _fail(source, path, "needs at least one of 'exists', 'equals', 'not_equals'")
    return Check(
        pointer=pointer,
        tokens=tokens,
        must_exist=must_exist,
        equals=conditions.get("equals", MISSING),
        not_equals=conditions.get("not_equals", MISSING),
    )
