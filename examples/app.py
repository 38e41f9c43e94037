"""The Moxy template example: a Starlette page showing a grid of images signed with the `moxy` Jinja2 filter.

Start Moxy first (`make run`), then this page (`make example` or `python examples/app.py`) and open
http://127.0.0.1:8081. Both read the same MOXY_* settings, so the URLs this page signs are ones Moxy accepts."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import NoReturn

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.templating import Jinja2Templates

from moxy.errors import ConfigError, UnsignableURL
from moxy.signing import Signer, check_signable
from moxy.templating import setup_jinja2

HERE = Path(__file__).resolve().parent
# `make run` keeps its generated key here (Makefile: STATE=var), so the example finds it without any setup.
RUN_KEY_FILE = HERE.parent / "var" / "moxy.key"

DEFAULT_UPSTREAM = (
    "https://www.python.org/static/img/python-logo.png",
    "https://www.google.com/images/branding/googlelogo/2x/googlelogo_color_272x92dp.png",
    "https://www.gstatic.com/webp/gallery/1.jpg",
    "https://www.gstatic.com/webp/gallery/2.webp",
    "https://httpbin.org/image/png",
    "https://httpbin.org/image/jpeg",
)


def fail(message: str) -> NoReturn:
    print(f"example: {message}", file=sys.stderr)
    sys.exit(2)  # bad configuration, as with `moxy`


def upstream_urls() -> list[str]:
    """MOXY_EXAMPLE_UPSTREAM: image URLs separated by commas or whitespace; a few public images by default."""
    raw = os.environ.get("MOXY_EXAMPLE_UPSTREAM", "")
    urls = [part for part in raw.replace(",", " ").split() if part] or list(DEFAULT_UPSTREAM)
    for url in urls:
        try:
            check_signable(url)
        except UnsignableURL as exc:
            fail(f"MOXY_EXAMPLE_UPSTREAM: cannot sign {url!r}: {exc}")
    return urls


def make_signer() -> Signer:
    if "MOXY_KEY" not in os.environ and "MOXY_KEY_FILE" not in os.environ and RUN_KEY_FILE.exists():
        os.environ["MOXY_KEY_FILE"] = str(RUN_KEY_FILE)
    try:
        return Signer.from_env()
    except ConfigError as exc:
        fail(f"{exc} (start Moxy once with `make run`, which creates {RUN_KEY_FILE}, or set MOXY_KEY)")


def create_app() -> Starlette:
    signer = make_signer()
    urls = upstream_urls()
    templates = Jinja2Templates(directory=HERE / "templates")
    setup_jinja2(templates.env, signer=signer)  # `setup_jinja2(templates.env)` alone reads the same settings

    # A strict policy for the page: images from Moxy alone. Moxy is the one image origin a page needs to allow,
    # whatever the upstreams are (tests/integration/test_browser.py checks that nothing is blocked).
    policy = (
        f"default-src 'none'; img-src {signer.base_url}; style-src 'unsafe-inline'; "
        "base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    )

    async def index(request: Request) -> Response:
        return templates.TemplateResponse(
            request,
            "index.html",
            {"urls": urls, "base_url": signer.base_url},
            headers={"Content-Security-Policy": policy},
        )

    return Starlette(routes=[Route("/", index)])


if __name__ == "__main__":
    uvicorn.run(create_app(), host="127.0.0.1", port=int(os.environ.get("MOXY_EXAMPLE_PORT", "8081")))
