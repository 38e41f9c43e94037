"""A cache Entry with plain defaults, for tests that need one and care about a few fields only."""

from __future__ import annotations

import hashlib
from dataclasses import replace
from typing import Any

from moxy.cache.entry import Entry, make_key


def make_entry(
    url: str = "https://images.example/cat.png", body: bytes = b"", accept: str | None = None, **changes: Any
) -> Entry:
    entry = Entry(
        key=make_key(url, {"accept": accept} if accept else {}),
        url=url,
        status=200,
        headers=(("content-type", "image/png"),),
        stored_at=1000.0,
        age=0.0,
        lifetime=60.0,
        stale_while_revalidate=0.0,
        stale_if_error=0.0,
        must_revalidate=False,
        no_cache=False,
        etag=None,
        last_modified=None,
        digest=hashlib.sha256(body).hexdigest(),
        length=len(body),
        body=body,
    )
    return replace(entry, **changes)
