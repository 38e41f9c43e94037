"""Cache entries, cache keys and the on-storage encoding of an entry (pure: no I/O, no clock).

Imports nothing from the storage backends; they all build on this module."""

from __future__ import annotations

import hashlib
import re
import struct
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import orjson

from moxy.body import OpenBody
from moxy.errors import MoxyError
from moxy.fields import valid_field_name, valid_field_value

__all__ = [
    "BodyFile",
    "CorruptEntry",
    "Entry",
    "decode_entry",
    "encode_entry",
    "make_key",
    "storage_id",
    "variant_index",
]


class CorruptEntry(MoxyError, ValueError):
    """Stored bytes that are not a whole, intact entry (torn write, bit rot, foreign file). Treat as a miss."""


@dataclass(frozen=True, slots=True)
class BodyFile:
    """A body held in a file at [offset, offset + length); the reader opens and streams it.

    `opened`, when a tier already opened the file to check it, is that descriptor: the answer is sent from it
    instead of opening the file a second time (and the copy read is the copy checked, even if a newer put
    replaces the file meanwhile). It is not part of the value."""

    path: str
    offset: int
    length: int
    opened: OpenBody | None = field(default=None, compare=False, repr=False)


@dataclass(frozen=True, slots=True, weakref_slot=True)
class Entry:
    """One stored response: its status, kept headers and freshness metadata, plus its body (bytes or a file range).

    `key` is the full cache key (see make_key); backends compare it on read, so a collision of the
    hashed storage id can never serve another URL's body."""

    key: str
    url: str
    status: int
    headers: tuple[tuple[str, str], ...]
    stored_at: float
    age: float
    lifetime: float
    stale_while_revalidate: float
    stale_if_error: float
    must_revalidate: bool
    no_cache: bool
    etag: str | None
    last_modified: str | None
    digest: str
    length: int
    verdict: str = "accepted"
    # The forwarded request headers this entry depends on (the upstream's Vary, see moxy.cache.vary); empty for
    # the common case, one entry for every client.
    vary: tuple[str, ...] = ()
    body: bytes | BodyFile = b""

    @property
    def is_index(self) -> bool:
        """Whether this is a variant index (see variant_index), which is never served."""
        return self.status == INDEX_STATUS

    def header(self, name: str) -> str | None:
        """The stored value of header `name` (case-insensitive), or None."""
        name = name.lower()
        for stored, value in self.headers:
            if stored == name:
                return value
        return None

    def with_body(self, body: bytes | BodyFile) -> Entry:
        return replace(self, body=body)

    def refreshed(
        self,
        *,
        stored_at: float,
        age: float,
        lifetime: float,
        stale_while_revalidate: float,
        stale_if_error: float,
        must_revalidate: bool,
        no_cache: bool,
        etag: str | None,
        last_modified: str | None,
    ) -> Entry:
        """This entry after a 304: new freshness metadata and validators, same body (RFC 9111 §4.3.4)."""
        return replace(
            self,
            stored_at=stored_at,
            age=age,
            lifetime=lifetime,
            stale_while_revalidate=stale_while_revalidate,
            stale_if_error=stale_if_error,
            must_revalidate=must_revalidate,
            no_cache=no_cache,
            etag=etag,
            last_modified=last_modified,
        )


# No HTTP status is 0: it marks an index, so nothing that reads a status can take one for an answer.
INDEX_STATUS = 0
_EMPTY_DIGEST = hashlib.sha256(b"").hexdigest()


def variant_index(variant: Entry, primary_key: str) -> Entry:
    """The entry kept at a URL's primary key once its upstream answered with Vary: no body, only the names of the
    headers the variants depend on (RFC 9111 §4.1), so a lookup knows which secondary key to read next. It lives
    as long as the variant it came with, so the tiers keep it while that variant can still be served. It keeps the
    variant's Content-Type: a request whose own variant has no copy yet still knows what kind of answer the URL
    gives (moxy.proxy refuses an answer of another kind while a copy could stand in for it)."""
    kind = variant.header("content-type")
    return replace(
        variant,
        key=primary_key,
        status=INDEX_STATUS,
        headers=(("content-type", kind),) if kind is not None else (),
        etag=None,
        last_modified=None,
        digest=_EMPTY_DIGEST,  # tiers check a body against its digest; an index's is the empty one
        length=0,
        verdict="index",
        body=b"",
    )


_WHITESPACE = re.compile(r"[ \t\r\n]+")
# Bumped when what a key means changes: v2 keys a URL alone unless its entry varies (older keys named every
# forwarded header), so entries of another meaning are never read as this one's.
KEY_VERSION = "moxy-key-2"


def _field(text: str) -> str:
    # Length prefix makes the concatenation uniquely decodable: ("a", "bc") and ("ab", "c") differ.
    return f"{len(text)}:{text}"


def make_key(url: str, forwarded: Mapping[str, str] | Iterable[tuple[str, str]]) -> str:
    """The full cache key of a request: URL plus the forwarded request headers its entry depends on (none for the
    primary key, the names the upstream's Vary gave for a secondary one).

    Names are lowercased and sorted (stable, so repeated headers keep their order); values have
    surrounding whitespace removed and inner runs collapsed to one space (RFC 9110 §5.5 makes them
    equivalent). Every part is length-prefixed, so the encoding is injective: two requests that differ
    after this normalisation never share a key."""
    pairs = forwarded.items() if isinstance(forwarded, Mapping) else forwarded
    normalised = sorted(
        ((name.strip().lower(), _WHITESPACE.sub(" ", value).strip()) for name, value in pairs),
        key=lambda pair: pair[0],
    )
    parts = [KEY_VERSION, _field(url), str(len(normalised)), ";"]
    for name, value in normalised:
        parts.append(_field(name))
        parts.append(_field(value))
    return "".join(parts)


def storage_id(key: str) -> str:
    """SHA-256 hex of the key: the name of the entry in a folder or in Redis."""
    return hashlib.sha256(key.encode("utf-8", "surrogatepass")).hexdigest()


# Blob layout: MAGIC | meta length (u32) | body length (u64) | meta (orjson) | body | sha256 of all before it.
MAGIC = b"MOXYENT\x01"
_HEAD = struct.Struct(">8sIQ")
_SUM_SIZE = 32


def _metadata(entry: Entry, inline: bool) -> dict[str, Any]:
    return {
        "key": entry.key,
        "url": entry.url,
        "status": entry.status,
        "headers": [list(pair) for pair in entry.headers],
        "stored_at": entry.stored_at,
        "age": entry.age,
        "lifetime": entry.lifetime,
        "stale_while_revalidate": entry.stale_while_revalidate,
        "stale_if_error": entry.stale_if_error,
        "must_revalidate": entry.must_revalidate,
        "no_cache": entry.no_cache,
        "etag": entry.etag,
        "last_modified": entry.last_modified,
        "digest": entry.digest,
        "length": entry.length,
        "verdict": entry.verdict,
        "vary": list(entry.vary),
        "inline": inline,
    }


def encode_entry(entry: Entry, *, include_body: bool = True) -> bytes:
    """One self-checking blob: metadata, the body (when `include_body`), and a SHA-256 over both.

    With include_body=False only the metadata is encoded (a disk meta file or Redis meta key whose body
    lives elsewhere); decode_entry then returns the entry with an empty body."""
    if include_body:
        if not isinstance(entry.body, bytes):
            raise ValueError("encode_entry(include_body=True) needs the body as bytes")
        if len(entry.body) != entry.length:
            raise ValueError(f"body is {len(entry.body)} bytes, entry says {entry.length}")
        body = entry.body
    else:
        body = b""
    meta = orjson.dumps(_metadata(entry, include_body))
    head = _HEAD.pack(MAGIC, len(meta), len(body))
    checksum = hashlib.sha256(head)
    checksum.update(meta)
    checksum.update(body)
    return b"".join((head, meta, body, checksum.digest()))


def _typed(meta: dict[str, Any], name: str, kind: type | tuple[type, ...]) -> Any:
    value = meta.get(name)
    # bool is an int subclass; never accept it where a number is meant.
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
        raise CorruptEntry(f"field {name!r} missing or of the wrong type")
    return value


def decode_entry(blob: bytes) -> Entry:
    """The entry in `blob`; raises CorruptEntry on a wrong magic, a length mismatch, a bad checksum or bad fields."""
    view = memoryview(blob)
    if len(view) < _HEAD.size + _SUM_SIZE:
        raise CorruptEntry("too short")
    magic, meta_length, body_length = _HEAD.unpack_from(view)
    if magic != MAGIC:
        raise CorruptEntry("not a Moxy entry (magic)")
    end = _HEAD.size + meta_length + body_length
    if end + _SUM_SIZE != len(view):
        raise CorruptEntry("length mismatch (torn or truncated)")
    if hashlib.sha256(view[:end]).digest() != view[end:]:
        raise CorruptEntry("checksum mismatch")
    try:
        meta = orjson.loads(view[_HEAD.size : _HEAD.size + meta_length])
    except orjson.JSONDecodeError as exc:
        raise CorruptEntry("metadata is not JSON") from exc
    if not isinstance(meta, dict):
        raise CorruptEntry("metadata is not an object")
    number = (int, float)
    headers = _typed(meta, "headers", list)
    if not all(isinstance(pair, list) and len(pair) == 2 and all(isinstance(p, str) for p in pair) for pair in headers):
        raise CorruptEntry("field 'headers' malformed")
    etag = meta.get("etag")
    last_modified = meta.get("last_modified")
    if not isinstance(etag, str | None) or not isinstance(last_modified, str | None):
        raise CorruptEntry("validators malformed")
    # A tier shared with older Moxy versions (or another writer) may hold fields the server could never send;
    # such an entry is a miss, not an empty reply for every request.
    if not all(valid_field_name(name) and valid_field_value(value) for name, value in headers) or not all(
        valid_field_value(value) for value in (etag, last_modified) if value is not None
    ):
        raise CorruptEntry("a stored field is not a sendable HTTP field")
    length = _typed(meta, "length", int)
    vary = _typed(meta, "vary", list)
    if not all(isinstance(name, str) and valid_field_name(name) for name in vary):
        raise CorruptEntry("field 'vary' malformed")
    inline = _typed(meta, "inline", bool)
    if inline and body_length != length:
        raise CorruptEntry("inline body length differs from the entry length")
    return Entry(
        key=_typed(meta, "key", str),
        url=_typed(meta, "url", str),
        status=_typed(meta, "status", int),
        headers=tuple((name, value) for name, value in headers),
        stored_at=float(_typed(meta, "stored_at", number)),
        age=float(_typed(meta, "age", number)),
        lifetime=float(_typed(meta, "lifetime", number)),
        stale_while_revalidate=float(_typed(meta, "stale_while_revalidate", number)),
        stale_if_error=float(_typed(meta, "stale_if_error", number)),
        must_revalidate=_typed(meta, "must_revalidate", bool),
        no_cache=_typed(meta, "no_cache", bool),
        etag=etag,
        last_modified=last_modified,
        digest=_typed(meta, "digest", str),
        length=length,
        verdict=_typed(meta, "verdict", str),
        vary=tuple(vary),
        body=bytes(view[_HEAD.size + meta_length : end]) if inline else b"",
    )
