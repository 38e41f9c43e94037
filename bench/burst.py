"""The cold burst: many clients ask for one URL nobody has fetched yet, all at the same moment.

Every connection is opened first and only then do all the requests go out, so they reach Moxy together rather
than trickling in after the first fetch is already done."""

from __future__ import annotations

import asyncio

from bench.rawhttp import Answer, address, get_on
from bench.servers import BenchError

TIMEOUT = 30.0


async def _burst(url: str, clients: int) -> list[Answer]:
    host, port = address(url)
    streams = await asyncio.gather(*(asyncio.open_connection(host, port) for _ in range(clients)))
    try:
        return await asyncio.gather(*(get_on(reader, writer, url) for reader, writer in streams))
    finally:
        for _, writer in streams:
            writer.close()


def burst(url: str, clients: int) -> list[Answer]:
    """`clients` simultaneous GETs of `url`; their answers."""
    try:
        return asyncio.run(asyncio.wait_for(_burst(url, clients), TIMEOUT))
    except (OSError, TimeoutError) as exc:
        raise BenchError(f"cold burst on {url} failed: {exc!r}") from exc
