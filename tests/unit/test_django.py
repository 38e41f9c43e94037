"""The Django helpers (moxy.django), rendered through Django's own template engine: `{% load moxy %}` finds the
library of the installed app, the filter and tags print what the signer prints, settings.MOXY wins over MOXY_*, and
bad input or a missing key fail loudly."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import django  # type: ignore[import-untyped]
import pytest
from django.conf import settings as django_settings  # type: ignore[import-untyped]
from django.template import engines  # type: ignore[import-untyped]
from django.test import override_settings  # type: ignore[import-untyped]

from moxy.errors import UnsignableURL
from moxy.signing import Signer
from tests.assets import KEY, OLD_KEY

BASE = "https://cdn.example.com"
URLS = [
    pytest.param("https://example.com/pic.png", id="ascii"),
    pytest.param("https://example.com/a.png?w=100&h=50", id="ampersand"),
    pytest.param("https://example.com/café/ñandú.png?q=日本語", id="non-ascii"),
]


@pytest.fixture(scope="module", autouse=True)
def _django() -> Iterator[None]:
    # One configuration per process (Django's rule); no other test module configures Django.
    if not django_settings.configured:
        django_settings.configure(
            INSTALLED_APPS=["moxy.django"],
            TEMPLATES=[{"BACKEND": "django.template.backends.django.DjangoTemplates"}],
            MOXY={"KEY": KEY, "BASE_URL": BASE},
        )
        django.setup()
    yield


def render(source: str, **context: Any) -> str:
    return str(engines["django"].from_string("{% load moxy %}" + source).render(context))


def expiry(url: str) -> int:
    return int(parse_qs(urlsplit(url).query)["e"][0])


@pytest.mark.parametrize("url", URLS)
def test_filter_and_tags_print_the_signed_url(url: str) -> None:
    signed = Signer([KEY], BASE).sign(url)
    assert render("{{ url|moxy }}", url=url) == signed
    assert render("{% moxy url %}", url=url) == signed
    assert render("{% moxy_url url as src %}<img src='{{ src }}'>", url=url) == f"<img src='{signed}'>"
    assert Signer([KEY], BASE).verify(signed) == url


def test_expiring_urls_are_rounded_up_to_a_bucket_unless_exact() -> None:
    url = "https://example.com/pic.png"
    before = time.time()
    bucketed = [render("{{ url|moxy:3600 }}", url=url), render('{{ url|moxy:"3600" }}', url=url)]
    tagged = render("{% moxy url expires=3600 %}", url=url)
    exact = render("{% moxy url expires=60 exact=True %}", url=url)
    after = time.time()
    for signed in [*bucketed, tagged]:
        # Valid at least an hour, at the end of a bucket of a tenth of it (Signer.sign), so pages share one URL.
        assert before + 3600 <= expiry(signed) <= after + 3600 + 360 and expiry(signed) % 360 == 0
        assert Signer([KEY], BASE).verify(signed) == url
    assert int(before) + 60 <= expiry(exact) <= int(after) + 61


def test_settings_moxy_wins_over_the_environment_and_changes_are_seen(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MOXY_BASE_URL", "https://from-the-environment.example")
    url = "https://example.com/pic.png"
    assert render("{{ url|moxy }}", url=url) == Signer([KEY], BASE).sign(url)
    with override_settings(MOXY={"KEY": f"{OLD_KEY},{KEY}"}):  # no BASE_URL here: the environment's is used
        assert render("{{ url|moxy }}", url=url) == Signer([OLD_KEY], "https://from-the-environment.example").sign(url)
    assert render("{{ url|moxy }}", url=url) == Signer([KEY], BASE).sign(url)


@pytest.mark.parametrize(
    ("source", "value"),
    [
        pytest.param("{{ url|moxy }}", None, id="none"),
        pytest.param("{{ url|moxy }}", 42, id="number"),
        pytest.param("{% moxy url %}", "ftp://example.com/a.png", id="not-http"),
        pytest.param("{{ url|moxy }}", "/relative.png", id="relative"),
    ],
)
def test_what_cannot_be_signed_fails_naming_the_value(source: str, value: object) -> None:
    with pytest.raises(UnsignableURL, match="moxy: cannot sign"):
        render(source, url=value)


@pytest.mark.parametrize("expires", ["0", "-5", "'soon'", "True", "huge"])
def test_a_bad_expiry_fails(expires: str) -> None:
    with pytest.raises(ValueError, match="expires must be a positive number"):
        render("{% moxy url expires=" + expires + " %}", url="https://example.com/pic.png", huge=float("inf"))


def test_a_missing_key_stops_the_site_at_start_up(tmp_path: Path) -> None:
    # A fresh process: Django is configured once per process, and this start must fail in AppConfig.ready.
    program = (
        "import django\n"
        "from django.conf import settings\n"
        "settings.configure(INSTALLED_APPS=['moxy.django'])\n"
        "django.setup()\n"
    )
    env = {name: value for name, value in os.environ.items() if not name.startswith("MOXY_")}
    env["XDG_CONFIG_HOME"] = str(tmp_path)  # no user key file either
    done = subprocess.run([sys.executable, "-c", program], env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 1
    assert "moxy.errors.ConfigError: MOXY_KEY: no key configured" in done.stderr
