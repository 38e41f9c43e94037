"""Accept classes: what a browser's Accept string becomes before it is forwarded and keyed."""

from __future__ import annotations

import pytest
from hypothesis import given, settings, strategies as st

from moxy.cache.vary import (
    ACCEPT_CLASSES,
    ANY,
    AVIF,
    AVIF_WEBP,
    JSON,
    WEBP,
    accept_class,
    normalise,
    variant,
    vary_header,
    vary_names,
)


@pytest.mark.parametrize(
    ("accept", "expected"),
    [
        # Chromium, Firefox and Safari image requests, as they send them.
        ("image/avif,image/webp,image/apng,image/svg+xml,image/*,*/*;q=0.8", AVIF_WEBP),
        ("image/avif,image/webp,*/*", AVIF_WEBP),
        ("image/webp,*/*", WEBP),
        ("image/webp,image/png,image/svg+xml,image/*;q=0.8,video/*;q=0.8,*/*;q=0.5", WEBP),
        ("IMAGE/AVIF", AVIF),
        ("image/avif;q=0, image/webp", WEBP),  # q=0 means "not acceptable" (RFC 9110 §12.4.2)
        ("image/webp;q=0.0", ANY),
        ("image/webp;q=junk", WEBP),
        ("application/json", JSON),
        ("application/json, text/plain, */*", JSON),
        ("application/json, image/png", ANY),
        ("*/*", ANY),
        ("text/html", ANY),
        (",,;;", ANY),
    ],
)
def test_accept_classes(accept: str, expected: str) -> None:
    assert accept_class(accept) == expected


def test_normalise_leaves_other_headers_whitespace_normalised() -> None:
    assert normalise("accept", "  image/webp,   */*  ") == WEBP
    assert normalise("accept", "") == ""
    assert normalise("x-variant", "  a   b ") == "a b"


@settings(max_examples=300, derandomize=True, database=None, deadline=None)
@given(st.text(max_size=300))
def test_any_accept_is_one_of_a_few_classes(accept: str) -> None:
    # The bound that matters: however many distinct strings clients send, Moxy fetches and keeps this many variants.
    assert accept_class(accept) in ACCEPT_CLASSES


@pytest.mark.parametrize(
    ("vary", "names"),
    [
        ("", ()),
        ("Accept", ("accept",)),
        (" accept ,\tACCEPT", ("accept",)),
        ("Accept-Encoding, Cookie", ()),  # never forwarded: the upstream never saw them, nothing to key on
        ("Accept-Language, Accept", ("accept", "accept-language")),
        ("Accept, *", None),  # RFC 9111 §4.1: no stored answer can match
        (",,", ()),
        ("Accept\xe9", None),  # no field name: it might be anything the client sent
        ("Accept, x y", None),
    ],
)
def test_vary_names_what_an_entry_depends_on(vary: str, names: tuple[str, ...] | None) -> None:
    assert vary_names(vary, ("Accept", "accept-language")) == names


def test_a_variant_keys_an_absent_header_as_empty() -> None:
    assert variant(("accept", "accept-language"), {"accept": WEBP}) == (("accept", WEBP), ("accept-language", ""))
    assert variant((), {"accept": WEBP}) == ()


def test_vary_header_spells_names_as_usual() -> None:
    assert vary_header(("accept", "accept-language")) == "Accept, Accept-Language"
    assert vary_header(()) == ""
