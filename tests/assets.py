"""Bodies and keys the tests share. A test that needs a different one defines its own and says why."""

from __future__ import annotations

import orjson

__all__ = ["CAMO_KEY", "JSON_BODY", "KEY", "OLD_KEY", "PNG"]

# Signing keys: KEY signs, OLD_KEY is a second key of the ring (a rotated-out one), CAMO_KEY a legacy camo key.
KEY = "k3y-for-tests-0123456789abcdef"  # 30 bytes, over the 16 Moxy requires
OLD_KEY = "an-older-key-that-was-rotated-out"
CAMO_KEY = "short-camo-key"  # 14 bytes: legacy camo keys may be short

# A body that sniffs as PNG (signature and the start of an IHDR chunk), then a kilobyte of every byte value.
PNG = b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + bytes(range(256)) * 4

# A JSON API answer (a WordPress-style list of posts).
JSON_BODY = orjson.dumps([{"id": 1, "title": "hello"}, {"id": 2, "title": "world"}])
