"""Fonts and JSON through Moxy, read by a page of another origin in headless Chromium (MOXY_CORS_ORIGINS).

A browser fetches a web font and a script's `fetch()` in CORS mode: without the page's origin in the answer it
refuses them ("blocked by CORS policy"). The same page is loaded against a Moxy without the setting (both reads
must fail, or this test proves nothing) and against one that names the page's origin (both must succeed)."""

from __future__ import annotations

import io
from collections.abc import Callable, Iterator
from typing import Any

import orjson
import pytest
from fontTools.fontBuilder import FontBuilder
from fontTools.pens.ttGlyphPen import TTGlyphPen
from playwright.sync_api import sync_playwright

from tests.integration.moxy_server import MoxyServer
from tests.integration.origin import Origin, Reply
from tests.integration.servers import require_binary
from tests.integration.test_browser import CHROMIUM_ARGS

pytestmark = pytest.mark.integration
StartMoxy = Callable[..., MoxyServer]

FEED = {"items": [{"id": 1, "title": "hello"}]}


def _font() -> bytes:
    """A whole TrueType font of two glyphs: Chromium's font sanitiser refuses anything less."""
    builder = FontBuilder(1000, isTTF=True)
    builder.setupGlyphOrder([".notdef", "A"])
    builder.setupCharacterMap({ord("A"): "A"})
    pen = TTGlyphPen(None)
    for x, y in ((100, 0), (100, 700), (500, 700), (500, 0)):
        (pen.moveTo if (x, y) == (100, 0) else pen.lineTo)((x, y))
    pen.closePath()
    square = pen.glyph()
    builder.setupGlyf({".notdef": square, "A": square})
    builder.setupHorizontalMetrics({".notdef": (600, 100), "A": (600, 100)})
    builder.setupHorizontalHeader(ascent=800, descent=-200)
    builder.setupNameTable({"familyName": "Probe", "styleName": "Regular"})
    builder.setupOS2(sTypoAscender=800, sTypoDescender=-200, usWinAscent=800, usWinDescent=200)
    builder.setupPost()
    out = io.BytesIO()
    builder.save(out)
    return out.getvalue()


# Reads both through the fetch algorithm in CORS mode, as a stylesheet's @font-face and a script's fetch() do.
_PAGE = """<!doctype html><meta charset="utf-8"><title>cors</title><script>
const FONT = %(font)s, FEED = %(feed)s;
window.result = (async () => {
  let font, json;
  try { await new FontFace("Probe", `url("${FONT}")`).load(); font = "loaded"; }
  catch (error) { font = "failed: " + error; }
  try { json = await (await fetch(FEED)).json(); } catch (error) { json = "failed: " + error; }
  return {font, json};
})();
</script>"""


@pytest.fixture
def page_host() -> Iterator[Origin]:
    # Another loopback address: another origin than Moxy's (scheme, host and port all count).
    host = Origin("127.0.0.2")
    host.start()
    try:
        yield host
    finally:
        host.stop()


def _read_in_chromium(chromium: str, page_url: str) -> tuple[dict[str, Any], list[str]]:
    console: list[str] = []
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium, headless=True, args=CHROMIUM_ARGS)
        try:
            page = browser.new_context().new_page()
            page.on("console", lambda message: console.append(message.text))
            assert page.goto(page_url, wait_until="load") is not None
            result: dict[str, Any] = page.evaluate("window.result")
        finally:
            browser.close()
    return result, console


def test_a_page_of_an_allowed_origin_reads_fonts_and_json_through_moxy(
    origin: Origin, page_host: Origin, start_moxy: StartMoxy
) -> None:
    chromium = require_binary("chromium", "/usr/bin/chromium", "/usr/bin/chromium-browser")
    origin.route(
        "/probe.ttf", Reply(headers={"Content-Type": "font/ttf", "Cache-Control": "max-age=600"}, body=_font())
    )
    origin.route(
        "/feed.json",
        Reply(headers={"Content-Type": "application/json", "Cache-Control": "max-age=600"}, body=orjson.dumps(FEED)),
    )
    page_origin = page_host.url("").rstrip("/")

    def page_for(moxy: MoxyServer, name: str) -> str:
        urls = {"font": moxy.sign(origin.url("/probe.ttf")), "feed": moxy.sign(origin.url("/feed.json"))}
        body = _PAGE % {"font": orjson.dumps(urls["font"]).decode(), "feed": orjson.dumps(urls["feed"]).decode()}
        page_host.route(
            f"/{name}.html", Reply(headers={"Content-Type": "text/html; charset=utf-8"}, body=body.encode())
        )
        return page_host.url(f"/{name}.html")

    closed = start_moxy()
    result, console = _read_in_chromium(chromium, page_for(closed, "closed"))
    assert result["font"].startswith("failed") and str(result["json"]).startswith("failed"), result
    assert any("blocked by CORS policy" in line for line in console), console
    closed.stop()

    opened = start_moxy(cors_origins=f"https://elsewhere.example,{page_origin}")
    result, console = _read_in_chromium(chromium, page_for(opened, "opened"))
    assert result == {"font": "loaded", "json": FEED}, (result, console)
    # Read again from the cache (a HIT, through the hit memo): the answer still names the page.
    result, _ = _read_in_chromium(chromium, page_for(opened, "again"))
    assert result == {"font": "loaded", "json": FEED}
    # Both Moxys use one cache folder: the first fetched each once (the browser, not Moxy, refused to hand them
    # over), and every later read was served from the cache.
    assert origin.hits("/probe.ttf") == 1 and origin.hits("/feed.json") == 1
    opened.assert_no_internal_errors()
