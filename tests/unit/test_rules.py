"""User rules: the TOML/JSON file format, its error messages, RFC 6901 pointers and check semantics."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given, strategies as st

from moxy.errors import ConfigError
from moxy.rules import (
    MISSING,
    Check,
    Rules,
    json_equal,
    parse_pointer,
    parse_rules,
    resolve_pointer,
)

EXAMPLE_TOML = """\
[[rule]]
host = "api.example.com"
content_types = ["application/json"]
[[rule.check]]
pointer = "/items"
exists = true
[[rule.check]]
pointer = "/status"
not_equals = "error"
"""

EXAMPLE_JSON = """\
{"rule": [
  {"host": "api.example.com",
   "content_types": ["application/json"],
   "check": [
     {"pointer": "/items", "exists": true},
     {"pointer": "/status", "not_equals": "error"}
   ]}
]}
"""


def describe(rules: Rules) -> list[Any]:
    """A plain picture of parsed rules, to compare the two formats."""
    return [
        (
            rule.host,
            rule.content_types.patterns if rule.content_types else None,
            [(c.pointer, c.tokens, c.must_exist, c.equals, c.not_equals) for c in rule.checks],
        )
        for rule in rules.rules
    ]


@pytest.mark.parametrize(("text", "fmt"), [(EXAMPLE_TOML, "toml"), (EXAMPLE_JSON, "json")])
def test_example_parses(text: str, fmt: Any) -> None:
    rules = parse_rules(text, source=f"rules.{fmt}", fmt=fmt)
    assert describe(rules) == [
        (
            "api.example.com",
            ("application/json",),
            [("/items", ("items",), True, MISSING, MISSING), ("/status", ("status",), None, MISSING, "error")],
        )
    ]
    assert rules.source == f"rules.{fmt}"


def test_toml_and_json_agree_on_values() -> None:
    toml = parse_rules(
        '[[rule]]\nhost = "*.Example.COM"\n[[rule.check]]\npointer = "/a~1b/0"\nequals = {x = [1, 2.5, "s", true]}\n'
        '[[rule.check]]\npointer = ""\nmust_exist = true\n',
        source="r.toml",
        fmt="toml",
    )
    as_json = parse_rules(
        '{"rule": [{"host": "*.Example.COM", "check": [{"pointer": "/a~1b/0", "equals": {"x": [1, 2.5, "s", true]}},'
        '{"pointer": "", "must_exist": true}]}]}',
        source="r.json",
        fmt="json",
    )
    assert describe(toml) == describe(as_json)
    assert toml.rules[0].host == "*.example.com"
    assert toml.rules[0].checks[0].tokens == ("a/b", "0")


@pytest.mark.parametrize(("text", "fmt"), [("", "toml"), ('{"rule": []}', "json"), ("{}", "json")])
def test_empty_rules(text: str, fmt: Any) -> None:
    assert parse_rules(text, source="x", fmt=fmt).rules == ()


@pytest.mark.parametrize(
    ("text", "fmt", "message"),
    [
        # syntax errors name the line
        ('[[rule]]\nhost = "a"\nhost = "b"\n', "toml", "r line 3:"),
        ('[[rule]]\nhost = "a"\n[[rule.check]]\npointer = /items\n', "toml", "r line 4:"),
        ('[[rule]]\nhost = "a\n', "toml", "r line 2:"),
        ('{"rule": [\n  {"host": "a",}\n]}', "json", "r line 2:"),
        ('{"rule": [\n\n\n  {"host": "a"}\n', "json", "r line 5:"),
        ('{"rule": [], "rule": []}', "json", "duplicate key 'rule'"),
        ('[[rule]]\nhost = "a"\ncontent_types = ["image/png"', "toml", "r: "),  # tomllib: "at end of document"
        ('{"rule": [{"host": "a", "check": [{"pointer": "", "equals": NaN}]}]}', "json", "NaN is not JSON"),
        # errors of meaning name the key path
        ('[[rule]]\nhost = "a"\nhots = "b"\n', "toml", "r key rule[0].hots: unknown key"),
        ("rules = []\n", "toml", "r key rules: unknown key"),
        ('[[rule]]\ncontent_types = ["image/png"]\n', "toml", "r key rule[0].host: a host pattern string is required"),
        ('[[rule]]\nhost = ""\n', "toml", "r key rule[0].host"),
        ("[[rule]]\nhost = 3\n", "toml", "r key rule[0].host"),
        ('[rule]\nhost = "a"\n', "toml", "r key rule: must be a list"),
        ('[[rule]]\nhost = "a"\ncontent_types = "image/png"\n', "toml", "r key rule[0].content_types: must be a list"),
        ('[[rule]]\nhost = "a"\ncontent_types = ["image/png", "png"]\n', "toml", "r key rule[0].content_types[1]"),
        (
            '[[rule]]\nhost = "a"\n[rule.check]\npointer = "/x"\nexists = true\n',
            "toml",
            "rule[0].check: must be a list",
        ),
        (
            '[[rule]]\nhost = "a"\n[[rule]]\nhost = "b"\n[[rule.check]]\npointer = "/x"\n'
            '[[rule.check]]\npointer = "x"\nexists = true\n',
            "toml",
            "r key rule[1].check[0]: needs at least one of",
        ),
        (
            '[[rule]]\nhost = "a"\n[[rule.check]]\npointer = "/x"\nexists = true\n[[rule.check]]\npointer = "x"\n'
            "exists = true\n",
            "toml",
            "r key rule[0].check[1].pointer: 'x': a JSON pointer is empty or starts with '/'",
        ),
        ('[[rule]]\nhost = "a"\n[[rule.check]]\npointer = "/a~2"\nexists = true\n', "toml", "rule[0].check[0].pointer"),
        ('[[rule]]\nhost = "a"\n[[rule.check]]\npointer = "/a~"\nexists = true\n', "toml", "'~' must be followed"),
        ('[[rule]]\nhost = "a"\n[[rule.check]]\npointer = 5\nexists = true\n', "toml", "rule[0].check[0].pointer"),
        ('[[rule]]\nhost = "a"\n[[rule.check]]\npointer = "/x"\nexists = 1\n', "toml", "rule[0].check[0].exists"),
        ('[[rule]]\nhost = "a"\n[[rule.check]]\npointer = "/x"\nexists = "yes"\n', "toml", "must be true or false"),
        (
            '[[rule]]\nhost = "a"\n[[rule.check]]\npointer = "/x"\nexists = true\nmust_exist = true\n',
            "toml",
            "not both",
        ),
        (
            '[[rule]]\nhost = "a"\n[[rule.check]]\npointer = "/x"\nequals = 1979-05-27\n',
            "toml",
            "rule[0].check[0].equals",
        ),
        ('[[rule]]\nhost = "a"\n[[rule.check]]\npointer = "/x"\nnope = 1\n', "toml", "rule[0].check[0].nope"),
        ('[[rule]]\nhost = "a"\n[[rule.check]]\npointer = "/x"\nexists = true\n', "yaml", "unknown rules format"),
        ("[1, 2]", "json", "the top level must be"),
        ('{"rule": ["api.example.com"]}', "json", "r key rule[0]: must be a table"),
        ('{"rule": [{"host": "a", "check": [7]}]}', "json", "r key rule[0].check[0]: must be a table"),
    ],
)
def test_errors_name_the_place(text: str, fmt: Any, message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_rules(text, source="r", fmt=fmt)
    assert caught.value.setting == "MOXY_RULES_FILE"
    assert message in caught.value.message


def test_toml_error_line_is_the_real_line() -> None:
    lines = EXAMPLE_TOML.splitlines()
    lines[5] = "exists = yes"  # line 6
    with pytest.raises(ConfigError) as caught:
        parse_rules("\n".join(lines), source="/etc/moxy/rules.toml", fmt="toml")
    assert caught.value.message.startswith("/etc/moxy/rules.toml line 6: ")
    assert "(column " in caught.value.message


# -- JSON pointer (RFC 6901) ---------------------------------------------------------------------

# The example document of RFC 6901 §5.
RFC_DOCUMENT = json.loads(
    '{"foo": ["bar", "baz"], "": 0, "a/b": 1, "c%d": 2, "e^f": 3, "g|h": 4, "i\\\\j": 5, "k\\"l": 6, " ": 7, "m~n": 8}'
)


@pytest.mark.parametrize(
    ("pointer", "expected"),
    [
        ("", RFC_DOCUMENT),
        ("/foo", ["bar", "baz"]),
        ("/foo/0", "bar"),
        ("/", 0),
        ("/a~1b", 1),
        ("/c%d", 2),
        ("/e^f", 3),
        ("/g|h", 4),
        ("/i\\j", 5),
        ('/k"l', 6),
        ("/ ", 7),
        ("/m~0n", 8),
    ],
)
def test_rfc6901_examples(pointer: str, expected: object) -> None:
    assert resolve_pointer(RFC_DOCUMENT, parse_pointer(pointer)) == expected


@pytest.mark.parametrize(
    ("document", "pointer", "expected"),
    [
        ({"a": [10, 20, 30]}, "/a/2", 30),
        ({"a": [10, 20, 30]}, "/a/3", MISSING),
        ({"a": [10, 20, 30]}, "/a/-", MISSING),  # "-" is the element after the last: never exists
        ({"a": [10, 20, 30]}, "/a/01", MISSING),  # leading zeros are not an index (RFC 6901 §4)
        ({"a": [10, 20, 30]}, "/a/+1", MISSING),
        ({"a": [10, 20, 30]}, "/a/1.0", MISSING),
        ({"a": [10, 20, 30]}, "/a/-1", MISSING),
        ({"a": [10, 20, 30]}, "/a/٣", MISSING),  # a non-ASCII digit is no index
        ({"a": {"01": "key"}}, "/a/01", "key"),  # ...but is a fine object key
        ({"a": {"0": "zero"}}, "/a/0", "zero"),
        ({"~1": "tilde-one", "/": "slash"}, "/~01", "tilde-one"),  # ~01 -> "~1", not "/"
        ({"~1": "tilde-one", "/": "slash"}, "/~1", "slash"),
        ({"a": None}, "/a", None),  # present, null
        ({"a": None}, "/a/b", MISSING),
        ({"a": "text"}, "/a/0", MISSING),  # strings are not indexable
        ({"a": 1}, "/b", MISSING),
        ([{"id": 7}], "/0/id", 7),
    ],
)
def test_pointer_semantics(document: object, pointer: str, expected: object) -> None:
    assert resolve_pointer(document, parse_pointer(pointer)) == expected


@pytest.mark.parametrize("bad", ["a", "a/b", "/a~", "/a~2", "/~x", "#/a"])
def test_bad_pointers(bad: str) -> None:
    with pytest.raises(ValueError):
        parse_pointer(bad)


def escape(token: str) -> str:
    return token.replace("~", "~0").replace("/", "~1")


@given(st.lists(st.text(alphabet=st.sampled_from("ab~/01-"), max_size=6), max_size=5), st.integers())
def test_escaped_tokens_round_trip(tokens: list[str], leaf: int) -> None:
    document: object = leaf
    for token in reversed(tokens):
        document = {token: document}
    pointer = "".join("/" + escape(token) for token in tokens)
    assert parse_pointer(pointer) == tuple(tokens)
    assert resolve_pointer(document, parse_pointer(pointer)) == leaf


# -- checks and values -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("left", "right", "equal"),
    [
        (1, 1.0, True),
        (True, 1, False),
        (False, 0, False),
        (True, True, True),
        (None, None, True),
        (None, False, False),
        ("1", 1, False),
        ([1, [2]], [1, [2.0]], True),
        ([1, 2], [2, 1], False),
        ([1], [1, 1], False),
        ({"a": 1, "b": [True]}, {"b": [True], "a": 1}, True),
        ({"a": 1}, {"a": True}, False),
        ({"a": 1}, {"a": 1, "b": 2}, False),
        ({"a": 1}, [1], False),
    ],
)
def test_json_equal(left: object, right: object, equal: bool) -> None:
    assert json_equal(left, right) is equal
    assert json_equal(right, left) is equal


@pytest.mark.parametrize(
    ("check", "document", "failure"),
    [
        (Check("/items", ("items",), must_exist=True), {"items": []}, None),
        (Check("/items", ("items",), must_exist=True), {"item": []}, "/items is missing"),
        (Check("/error", ("error",), must_exist=False), {"data": 1}, None),
        (Check("/error", ("error",), must_exist=False), {"error": None}, "/error exists (null)"),
        (Check("/status", ("status",), equals="ok"), {"status": "ok"}, None),
        (Check("/status", ("status",), equals="ok"), {"status": "down"}, '/status is "down", expected "ok"'),
        (Check("/status", ("status",), equals="ok"), {}, "/status is missing"),
        (Check("/n", ("n",), equals=1), {"n": True}, "/n is true, expected 1"),
        (Check("/v", ("v",), equals=None), {"v": None}, None),
        (Check("/v", ("v",), equals=None), {}, "missing"),
        (Check("/status", ("status",), not_equals="error"), {"status": "ok"}, None),
        (Check("/status", ("status",), not_equals="error"), {}, None),  # missing is not equal to anything
        (Check("/status", ("status",), not_equals="error"), {"status": "error"}, '/status is "error"'),
        (Check("", (), equals=[]), [], None),
        (Check("", (), equals=[]), [1], "the document is [1]"),
        (Check("/count", ("count",), must_exist=True, not_equals=0), {"count": 0}, "/count is 0"),
    ],
)
def test_check_semantics(check: Check, document: object, failure: str | None) -> None:
    got = check.failure(document)
    if failure is None:
        assert got is None
    else:
        assert got is not None and failure in got


@pytest.mark.parametrize(
    ("pattern", "host", "matches"),
    [
        ("api.example.com", "api.example.com", True),
        ("api.example.com", "API.EXAMPLE.COM", True),
        ("*.example.com", "a.b.example.com", True),
        ("*.example.com", "example.com", False),
        ("*.example.com", "example.com.evil.test", False),
        ("img?.example.com", "img1.example.com", True),
        ("*", "anything", True),
    ],
)
def test_host_patterns(pattern: str, host: str, matches: bool) -> None:
    rules = parse_rules(f'[[rule]]\nhost = "{pattern}"\n', source="r", fmt="toml")
    assert bool(rules.for_host(host)) is matches


def test_every_matching_rule_applies_in_file_order() -> None:
    rules = parse_rules(
        '[[rule]]\nhost = "*"\n[[rule]]\nhost = "other"\n[[rule]]\nhost = "*.example.com"\n',
        source="r",
        fmt="toml",
    )
    assert [rule.index for rule in rules.for_host("api.example.com")] == [0, 2]
