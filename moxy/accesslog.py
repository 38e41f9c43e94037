"""One structured JSON line per request on stderr. Keys and full Moxy URLs never appear: the path is logged
as a short digest."""

from __future__ import annotations

import hashlib
import sys
from typing import Any

import orjson

__all__ = ["path_digest", "write_access"]


def path_digest(path: str) -> str:
    return hashlib.sha256(path.encode("utf-8", "surrogateescape")).hexdigest()[:16]


def write_access(record: dict[str, Any]) -> None:
    try:
        sys.stderr.buffer.write(orjson.dumps(record) + b"\n")
        sys.stderr.flush()
    except (OSError, ValueError):  # a closed stderr must never fail a request
        pass
