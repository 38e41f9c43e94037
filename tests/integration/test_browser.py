"""The Jinja2 example page (examples/app.py) in a real browser: headless Chromium, driven by Playwright, loads the
page, which signs images on three local upstreams; every image must reach the browser through Moxy and decode,
with no console error, failed request or Content-Security-Policy violation on the way.

Playwright drives the system's Chromium (`.ci/system-deps` installs Debian's); without it the test skips, except
under CI=true, where it fails."""

from __future__ import annotations

import io
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from PIL import Image
from playwright.sync_api import ConsoleMessage, Request, Response, sync_playwright

from tests.assets import KEY
from tests.integration.moxy_server import MoxyServer
from tests.integration.origin import Origin, Reply
from tests.integration.servers import require_binary
from tests.net import free_port

pytestmark = pytest.mark.integration
StartMoxy = Callable[..., MoxyServer]

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "app.py"
# Chromium's flags for a run that talks to nothing but loopback and leaves nothing behind: no GPU process, no QUIC,
# no first-run or background fetches of its own (updates, sync, component downloads). --no-sandbox: the test may
# run as root, where Chromium's sandbox refuses to start. Playwright adds --headless and a fresh profile folder.
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def image(kind: str, size: tuple[int, int], colour: tuple[int, int, int]) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", size, colour).save(out, format=kind)
    return out.getvalue()


SVG = b'<svg xmlns="http://www.w3.org/2000/svg" width="24" height="24"><rect width="24" height="24"/></svg>'
# (path, media type, body): one of each format a page commonly shows, spread over three upstream hosts below.
IMAGES = [
    ("/red.png", "image/png", image("PNG", (40, 30), (200, 30, 30))),
    ("/green.jpg", "image/jpeg", image("JPEG", (64, 48), (30, 160, 60))),
    ("/blue.webp", "image/webp", image("WEBP", (32, 32), (30, 60, 200))),
    ("/grey.gif", "image/gif", image("GIF", (16, 16), (128, 128, 128))),
    ("/logo.svg", "image/svg+xml", SVG),
    ("/wide.png", "image/png", image("PNG", (300, 20), (10, 10, 10))),
]


@pytest.fixture
def chromium() -> str:
    return require_binary("chromium", "/usr/bin/chromium", "/usr/bin/chromium-browser")


@pytest.fixture
def upstreams() -> Iterator[list[Origin]]:
    origins = [Origin(host) for host in ("127.0.0.1", "127.0.0.2", "127.0.0.3")]
    for origin in origins:
        origin.start()
    try:
        yield origins
    finally:
        for origin in origins:
            origin.stop()


@pytest.fixture
def example_page(tmp_path: Path) -> Iterator[Callable[[MoxyServer, list[str]], str]]:
    started: list[subprocess.Popen[bytes]] = []

    def start(moxy: MoxyServer, urls: list[str]) -> str:
        env = {k: v for k, v in os.environ.items() if not k.startswith("MOXY_")}
        env.update({"MOXY_KEY": KEY, "MOXY_BASE_URL": moxy.base_url, "MOXY_EXAMPLE_UPSTREAM": ",".join(urls)})
        for _ in range(5):  # free_port may lose a race: the page then exits, and another port is tried
            port = free_port()
            env["MOXY_EXAMPLE_PORT"] = str(port)
            with open(tmp_path / "example.log", "ab") as log:
                process = subprocess.Popen([sys.executable, str(EXAMPLE)], env=env, stdout=log, stderr=log)
            started.append(process)
            deadline = time.monotonic() + 20
            while process.poll() is None and time.monotonic() < deadline:
                try:
                    if httpx.get(f"http://127.0.0.1:{port}/", timeout=1).status_code == 200:
                        return f"http://127.0.0.1:{port}/"
                except httpx.HTTPError:
                    time.sleep(0.05)
        raise AssertionError((tmp_path / "example.log").read_text(errors="replace")[-2000:])

    yield start
    for process in started:
        if process.poll() is None:
            process.terminate()
            process.wait(timeout=10)


def test_every_image_of_the_example_page_decodes_in_chromium(
    chromium: str,
    upstreams: list[Origin],
    start_moxy: StartMoxy,
    example_page: Callable[[MoxyServer, list[str]], str],
) -> None:
    urls = []
    for number, (path, media_type, body) in enumerate(IMAGES):
        origin = upstreams[number % len(upstreams)]
        origin.route(path, Reply(headers={"Content-Type": media_type, "Cache-Control": "max-age=600"}, body=body))
        urls.append(origin.url(path))
    moxy = start_moxy(access_log=1)
    page_url = example_page(moxy, urls)

    problems: list[str] = []
    answers: list[tuple[str, int, str | None]] = []

    def on_console(message: ConsoleMessage) -> None:
        if message.type in ("error", "warning"):
            problems.append(f"console {message.type}: {message.text}")

    def on_failed(request: Request) -> None:
        problems.append(f"failed: {request.url} {request.failure}")

    def on_response(response: Response) -> None:
        if response.url.startswith(moxy.base_url):
            answers.append((response.url, response.status, response.headers.get("x-moxy-cache")))

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium, headless=True, args=CHROMIUM_ARGS)
        try:
            # Tall enough that no image waits for a scroll (the page lazy-loads).
            context = browser.new_context(viewport={"width": 1280, "height": 4000})
            # CSP violations, recorded as the page sees them (the console also reports them, as errors).
            context.add_init_script(
                "window.__csp = []; document.addEventListener('securitypolicyviolation',"
                " e => window.__csp.push(e.violatedDirective + ' ' + e.blockedURI));"
            )
            page = context.new_page()
            page.on("console", on_console)
            page.on("pageerror", lambda error: problems.append(f"page error: {error}"))
            page.on("requestfailed", on_failed)
            page.on("response", on_response)
            assert page.goto(page_url, wait_until="load") is not None
            # Polled from here: wait_for_function's in-page polling evaluates a string, which the page's CSP forbids.
            deadline = time.monotonic() + 20
            while not page.evaluate("Array.from(document.images).every(i => i.complete)"):
                assert time.monotonic() < deadline, "images still loading"
                page.wait_for_timeout(50)
            images: list[dict[str, Any]] = page.evaluate(
                "Array.from(document.images).map(i => ({src: i.currentSrc, width: i.naturalWidth,"
                " height: i.naturalHeight}))"
            )
            violations: list[str] = page.evaluate("window.__csp")
        finally:
            browser.close()

    # One image per upstream URL, plus the page's `moxy_url(...)` example of the first one.
    assert len(images) == len(IMAGES) + 1, images
    sizes = {
        (path, Image.open(io.BytesIO(body)).size if media_type != "image/svg+xml" else (24, 24))
        for path, media_type, body in IMAGES
    }
    for found in images:
        assert found["src"].startswith(moxy.base_url + "/"), found
        assert found["width"] > 0 and found["height"] > 0, f"not decoded: {found}"
    assert {(f["width"], f["height"]) for f in images} == {size for _, size in sizes}
    assert violations == []
    assert problems == []
    assert len(answers) >= len(IMAGES) and all(status == 200 for _, status, _ in answers), answers
    for origin in upstreams:
        assert origin.requests, "every upstream was reached, through Moxy"
