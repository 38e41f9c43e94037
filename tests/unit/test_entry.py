"""Entries, cache keys and the self-checking blob: round trips, injectivity, and every kind of damage refused."""

from __future__ import annotations

import hashlib
import struct

import orjson
import pytest
from hypothesis import given, strategies as st

from moxy.cache.entry import (
    MAGIC,
    BodyFile,
    CorruptEntry,
    Entry,
    decode_entry,
    encode_entry,
    make_key,
    storage_id,
    variant_index,
)
from moxy.errors import MoxyError
from tests.entries import make_entry as entry_of


def make_entry(body: bytes = b"\x89PNG body", **overrides: object) -> Entry:
    defaults: dict[str, object] = {
        "headers": (("content-type", "image/png"), ("last-modified", "Tue, 15 Nov 1994 08:12:31 GMT")),
        "stored_at": 1_700_000_000.5,
        "age": 3.0,
        "lifetime": 600.0,
        "stale_while_revalidate": 60.0,
        "stale_if_error": 86400.0,
        "etag": '"v1"',
        "last_modified": "Tue, 15 Nov 1994 08:12:31 GMT",
    }
    return entry_of("https://img.example/a.png", body, accept="image/*", **{**defaults, **overrides})


# -- keys ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("one", "other"),
    [
        # length prefix: moving a character across a boundary changes the key
        (("u", [("a", "bc")]), ("u", [("ab", "c")])),
        (("u", [("a", "b")]), ("u", [("a", "b"), ("c", "")])),
        (("https://x/1", []), ("https://x/2", [])),
        (("https://x/", [("accept", "image/png")]), ("https://x/", [("accept", "image/webp")])),
        # a value that looks like an encoded field cannot forge another header
        (("u", [("a", "1:b1:c")]), ("u", [("a", "1"), ("b", "c")])),
        (("u1:", [("a", "")]), ("u", [("1:a", "")])),
    ],
)
def test_different_requests_get_different_keys(one, other):
    assert make_key(one[0], one[1]) != make_key(other[0], other[1])


@pytest.mark.parametrize(
    ("one", "other"),
    [
        ({"Accept": "image/png"}, {"accept": "image/png"}),
        ({"accept": "  image/png,\t image/webp "}, {"accept": "image/png, image/webp"}),
        ({"b": "2", "a": "1"}, [("a", "1"), ("b", "2")]),
    ],
)
def test_equivalent_requests_share_a_key(one, other):
    assert make_key("https://x/", one) == make_key("https://x/", other)


def test_repeated_headers_keep_their_order():
    first = make_key("u", [("accept", "a"), ("accept", "b")])
    second = make_key("u", [("accept", "b"), ("accept", "a")])
    assert first != second


header_text = st.text(alphabet=st.characters(blacklist_categories=["Cs", "Zs", "Cc"]), max_size=6)


@given(
    st.tuples(header_text, st.lists(st.tuples(header_text, header_text), max_size=3)),
    st.tuples(header_text, st.lists(st.tuples(header_text, header_text), max_size=3)),
)
def test_key_is_injective_on_normalised_requests(one, other):
    def normal(request: tuple[str, list[tuple[str, str]]]) -> tuple[str, list[tuple[str, str]]]:
        url, pairs = request
        return url, sorted(((name.lower(), value) for name, value in pairs), key=lambda pair: pair[0])

    if normal(one) != normal(other):
        assert make_key(*one) != make_key(*other)
    else:
        assert make_key(*one) == make_key(*other)


def test_storage_id_is_sha256_of_key():
    key = make_key("https://x/", {"accept": "*/*"})
    assert storage_id(key) == hashlib.sha256(key.encode()).hexdigest()
    assert len(storage_id("\ud800 lone surrogate")) == 64


# -- entry helpers -----------------------------------------------------------------------


def test_header_lookup_is_case_insensitive():
    entry = make_entry()
    assert entry.header("Content-Type") == "image/png"
    assert entry.header("etag") is None


def test_refreshed_changes_metadata_and_keeps_body():
    entry = make_entry()
    fresh = entry.refreshed(
        stored_at=2e9,
        age=1.0,
        lifetime=30.0,
        stale_while_revalidate=0.0,
        stale_if_error=0.0,
        must_revalidate=True,
        no_cache=True,
        etag='"v2"',
        last_modified=None,
    )
    assert (fresh.stored_at, fresh.lifetime, fresh.etag, fresh.must_revalidate) == (2e9, 30.0, '"v2"', True)
    assert (fresh.body, fresh.digest, fresh.length, fresh.key) == (entry.body, entry.digest, entry.length, entry.key)


def test_with_body_accepts_a_file_range():
    entry = make_entry().with_body(BodyFile("/tmp/x", 10, 9))
    assert entry.body == BodyFile("/tmp/x", 10, 9)


# -- blob ------------------------------------------------------------------------------


@pytest.mark.parametrize("body", [b"", b"x", bytes(range(256)) * 100])
def test_round_trip_with_body(body):
    entry = make_entry(body)
    assert decode_entry(encode_entry(entry)) == entry


def test_round_trip_metadata_only():
    entry = make_entry(b"large body elsewhere")
    decoded = decode_entry(encode_entry(entry, include_body=False))
    assert decoded == entry.with_body(b"")
    assert decoded.length == len(b"large body elsewhere")


def test_encode_refuses_a_body_of_the_wrong_length():
    with pytest.raises(ValueError):
        encode_entry(make_entry(b"abc", length=4))
    with pytest.raises(ValueError):
        encode_entry(make_entry().with_body(BodyFile("/x", 0, 9)))


def test_corrupt_entry_is_a_moxy_error_and_value_error():
    assert issubclass(CorruptEntry, MoxyError)
    assert issubclass(CorruptEntry, ValueError)


def test_every_flipped_byte_is_detected():
    blob = encode_entry(make_entry(b"0123456789"))
    for position in range(len(blob)):
        damaged = bytearray(blob)
        damaged[position] ^= 0x01
        with pytest.raises(CorruptEntry):
            decode_entry(bytes(damaged))


def test_every_truncation_is_detected():
    blob = encode_entry(make_entry(b"0123456789"))
    for size in range(len(blob)):
        with pytest.raises(CorruptEntry):
            decode_entry(blob[:size])
    with pytest.raises(CorruptEntry):
        decode_entry(blob + b"\0")


def _forge(meta: object, body: bytes = b"") -> bytes:
    """A blob with a valid checksum around arbitrary metadata (what a buggy writer might leave)."""
    raw = orjson.dumps(meta)
    head = struct.pack(">8sIQ", MAGIC, len(raw), len(body))
    return head + raw + body + hashlib.sha256(head + raw + body).digest()


def _good_meta() -> dict[str, object]:
    blob = encode_entry(make_entry(b"abc"), include_body=False)
    (meta_length,) = struct.unpack_from(">I", blob, 8)
    meta: dict[str, object] = orjson.loads(blob[20 : 20 + meta_length])
    return meta


@pytest.mark.parametrize(
    "change",
    [
        {"status": "200"},
        {"length": True},
        {"stored_at": None},
        {"headers": [["content-type"]]},
        {"headers": [["a", 1]]},
        {"etag": 5},
        {"must_revalidate": 1},
        {"inline": True},  # says the body is inline but none is there
        {"key": None},
        {"vary": "accept"},
        {"vary": ["a\r\nb"]},  # never a field name Moxy could send in Vary
    ],
)
def test_well_checksummed_but_malformed_metadata_is_refused(change):
    meta = _good_meta()
    meta.update(change)
    with pytest.raises(CorruptEntry):
        decode_entry(_forge(meta))


def test_good_forged_metadata_decodes():
    assert decode_entry(_forge(_good_meta())).digest == make_entry(b"abc").digest


@pytest.mark.parametrize("blob", [b"", b"MOXYENT\x02" + b"\0" * 60, _forge([1, 2]), b"\0" * 100])
def test_foreign_bytes_are_refused(blob):
    with pytest.raises(CorruptEntry):
        decode_entry(blob)


def test_a_variant_index_round_trips_through_the_encoding_and_is_never_an_answer() -> None:
    variant = entry_of(body=b"png bytes", accept="image/webp,*/*", vary=("accept",))
    index = variant_index(variant, make_key(variant.url, ()))
    assert index.is_index and not variant.is_index
    # Only the kind of answer is kept, for the check of a later answer of another kind (moxy.proxy).
    assert (index.length, index.body, index.headers, index.vary) == (
        0,
        b"",
        (("content-type", "image/png"),),
        ("accept",),
    )
    assert index.digest == hashlib.sha256(b"").hexdigest()
    decoded = decode_entry(encode_entry(index))
    assert decoded == index and decoded.is_index
    assert decode_entry(encode_entry(variant)).vary == ("accept",)
