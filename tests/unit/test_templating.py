"""The Jinja2 helpers (moxy.templating): the `moxy` filter and `moxy_url` global render exactly what `moxy sign`
prints, in a plain jinja2.Environment and through Starlette's Jinja2Templates; bad input fails loudly."""

from __future__ import annotations

import base64
import hashlib
import hmac
import importlib
import importlib.util
import math
import os
import re
import sys
from html.parser import HTMLParser
from pathlib import Path

import httpx
import jinja2
import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings, strategies as st
from markupsafe import Markup
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.templating import Jinja2Templates

from moxy.cli import main
from moxy.errors import ConfigError, UnsignableURL
from moxy.signing import Signer, check_signable
from moxy.templating import setup_jinja2
from tests.assets import KEY, OLD_KEY

BASE = "https://cdn.example.com"
NOW = 1_700_000_000.25  # a fixed clock with a fraction, so truncation to whole seconds is exercised

URL_CASES = {
    "ascii": "https://example.com/pic.png",
    "ampersand": "https://example.com/a.png?w=100&h=50",
    "percent-encoded": "https://example.com/a%20b/%E2%9C%93.png?q=%2F%3F%26",
    "non-ascii": "https://example.com/café/ñandú.png?q=日本語",
    "html-special": 'https://example.com/<b>"quoted"\'&amp;.png',
    "loopback-port": "http://127.0.0.1:9000/img.gif",
}
URLS = [pytest.param(url, id=name) for name, url in URL_CASES.items()]


@pytest.fixture(autouse=True)
def _isolated_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for name in list(os.environ):
        if name.upper().startswith("MOXY_"):
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def independent_sign(url: str, key: str, base: str, expires_at: int | None = None) -> str:
    """The native signed-URL format computed here by hand, without moxy.signing."""
    message = url.encode("utf-8")
    suffix = ""
    if expires_at is not None:
        message += b"\n" + str(expires_at).encode("ascii")
        suffix = f"?e={expires_at}"
    digest = _b64(hmac.new(key.encode("utf-8"), message, hashlib.sha256).digest())
    return f"{base.rstrip('/')}/{digest}/{_b64(url.encode('utf-8'))}{suffix}"


def cli_sign(url: str, *flags: str, env: dict[str, str] | None = None) -> str:
    """What `moxy sign URL [flags]` prints, with MOXY_KEY and MOXY_BASE_URL set unless `env` says otherwise."""
    result = CliRunner().invoke(
        main, ["sign", url, *flags], env={"MOXY_KEY": KEY, "MOXY_BASE_URL": BASE} if env is None else env
    )
    assert result.exit_code == 0, result.output
    return result.stdout.rstrip("\n")


class _Sources(HTMLParser):
    """Collects the `src` attributes of a page as a browser reads them (character references decoded)."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.sources: list[str | None] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.sources.extend(value for name, value in attrs if name == "src")


def sources(html: str) -> list[str | None]:
    parser = _Sources()
    parser.feed(html)
    parser.close()
    return parser.sources


def environment(signer: Signer | None = None, **options: object) -> jinja2.Environment:
    env = jinja2.Environment(autoescape=True, **options)  # type: ignore[arg-type]
    setup_jinja2(env, signer=signer if signer is not None else Signer([KEY], BASE))
    return env


IMG_FILTER = '<img src="{{ url | moxy }}">'
IMG_GLOBAL = '<img src="{{ moxy_url(url) }}">'
IMG_FILTER_EXPIRES = '<img src="{{ url | moxy(expires=3600) }}">'
IMG_GLOBAL_EXPIRES = '<img src="{{ moxy_url(url, expires=3600) }}">'


# -- same bytes as `moxy sign` ------------------------------------------------------------------------------------


@pytest.mark.parametrize("url", URLS)
@pytest.mark.parametrize("template", [IMG_FILTER, IMG_GLOBAL])
@pytest.mark.parametrize("autoescape", [True, False])
def test_renders_what_the_cli_signs(url: str, template: str, autoescape: bool) -> None:
    expected = cli_sign(url)
    env = jinja2.Environment(autoescape=autoescape)
    setup_jinja2(env, signer=Signer([KEY], BASE))

    html = env.from_string(template).render(url=url)

    assert sources(html) == [expected]
    assert html == f'<img src="{expected}">'  # nothing was escaped: a signed URL holds no character needing it
    assert expected == independent_sign(url, KEY, BASE)
    assert Signer([KEY], BASE).verify(expected) == url


@pytest.mark.parametrize("url", URLS)
@pytest.mark.parametrize("template", [IMG_FILTER_EXPIRES, IMG_GLOBAL_EXPIRES])
def test_expiring_url_matches_the_cli(url: str, template: str) -> None:
    expected = cli_sign(url, "--expires", "3600")
    match = re.fullmatch(r".*\?e=(\d+)", expected)
    assert match is not None
    expires_at = int(match.group(1))
    # The CLI read the real clock and rounded the expiry up to its bucket (360 s for an hour); a signer whose clock
    # stood anywhere in that bucket renders the same bytes.
    signer = Signer([KEY], BASE, clock=lambda: expires_at - 3600 - 200.25)

    html = environment(signer).from_string(template).render(url=url)

    assert sources(html) == [expected]
    assert expected == independent_sign(url, KEY, BASE, expires_at)


@pytest.mark.parametrize(
    ("expires", "expires_at"),
    [
        pytest.param(1, 1_700_000_001, id="one-second"),
        pytest.param(3600, 1_700_003_600, id="hour"),
        pytest.param(2.5, 1_700_000_002, id="float-truncated"),
        pytest.param(365 * 24 * 3600, 1_731_536_000, id="year"),
    ],
)
@pytest.mark.parametrize("url", URLS)
def test_expiring_url_with_fixed_clock(url: str, expires: float, expires_at: int) -> None:
    # exact=true: the expiry to the second, as given; the default rounding is tested below.
    env = environment(Signer([KEY], BASE, clock=lambda: NOW))
    expected = independent_sign(url, KEY, BASE, expires_at)

    by_filter = env.from_string('<img src="{{ url | moxy(expires=expires, exact=true) }}">').render(
        url=url, expires=expires
    )
    by_global = env.from_string('<img src="{{ moxy_url(url, expires=expires, exact=true) }}">').render(
        url=url, expires=expires
    )

    assert sources(by_filter) == [expected]
    assert sources(by_global) == [expected]


def test_no_expiry_when_expires_is_none() -> None:
    env = environment(Signer([KEY], BASE, clock=lambda: NOW))
    html = env.from_string('<img src="{{ url | moxy(expires=none) }}">').render(url="https://example.com/a.png")
    assert sources(html) == [independent_sign("https://example.com/a.png", KEY, BASE)]


# -- Starlette ----------------------------------------------------------------------------------------------------


def test_two_renders_a_few_seconds_apart_give_one_cacheable_url() -> None:
    template = '<img src="{{ url | moxy(expires=3600) }}">'
    url = URL_CASES["ascii"]
    first = environment(Signer([KEY], BASE, clock=lambda: NOW)).from_string(template).render(url=url)
    again = environment(Signer([KEY], BASE, clock=lambda: NOW + 5)).from_string(template).render(url=url)
    assert first == again
    signed = sources(first)[0]
    assert signed is not None
    expires_at = int(signed.rpartition("?e=")[2])
    assert expires_at % 360 == 0 and NOW + 3600 <= expires_at < NOW + 3600 + 360


@pytest.mark.anyio
async def test_starlette_jinja2templates(tmp_path: Path) -> None:
    folder = tmp_path / "templates"
    folder.mkdir()
    (folder / "page.html").write_text(
        "{% for url in urls %}<img src=\"{{ url | moxy }}\"><img src='{{ moxy_url(url) }}'>{% endfor %}"
        '<img src="{{ urls[0] | moxy(expires=60) }}"><p>{{ marker }}</p>',
        encoding="utf-8",
    )
    templates = Jinja2Templates(directory=folder)
    setup_jinja2(templates.env, signer=Signer([KEY], BASE, clock=lambda: NOW))
    urls = list(URL_CASES.values())

    async def page(request: Request) -> Response:
        return templates.TemplateResponse(request, "page.html", {"urls": urls, "marker": "<b>"})

    # httpx drives the ASGI app in process: no socket is opened.
    transport = httpx.ASGITransport(app=Starlette(routes=[Route("/", page)]))
    async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as client:
        response = await client.get("/")

    assert response.status_code == 200
    assert "<p>&lt;b&gt;</p>" in response.text  # autoescaping is on, so the byte-for-byte check below means something
    expected = [signed for url in urls for signed in [cli_sign(url)] * 2]
    expected.append(independent_sign(urls[0], KEY, BASE, 1_700_000_100))  # NOW + 60 rounded up to the minute
    assert sources(response.text) == expected


# -- settings from the environment --------------------------------------------------------------------------------


@pytest.mark.parametrize("base", ["https://cdn.example.com", "https://img.example.org/moxy/", "http://127.0.0.1:8080"])
def test_signer_from_environment(monkeypatch: pytest.MonkeyPatch, base: str) -> None:
    monkeypatch.setenv("MOXY_KEY", f"{KEY},{OLD_KEY}")  # the first key signs
    monkeypatch.setenv("MOXY_BASE_URL", base)
    env = jinja2.Environment(autoescape=True)
    setup_jinja2(env)
    url = "https://example.com/a.png?x=1&y=2"

    html = env.from_string(IMG_FILTER + IMG_GLOBAL).render(url=url)

    expected = cli_sign(url, env={})  # the CLI reads the same environment
    assert sources(html) == [expected, expected]
    assert expected == independent_sign(url, KEY, base)


def test_settings_are_read_once_at_setup(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MOXY_KEY", KEY)
    monkeypatch.setenv("MOXY_BASE_URL", BASE)
    env = jinja2.Environment()
    setup_jinja2(env)
    monkeypatch.setenv("MOXY_KEY", OLD_KEY)
    monkeypatch.setenv("MOXY_BASE_URL", "https://elsewhere.example.net")

    rendered = env.from_string("{{ url | moxy }}").render(url="https://example.com/a.png")

    assert rendered == independent_sign("https://example.com/a.png", KEY, BASE)


@pytest.mark.parametrize(
    ("variables", "setting"),
    [
        pytest.param({}, "MOXY_KEY", id="no-key"),
        pytest.param({"MOXY_KEY": "short"}, "MOXY_KEY", id="short-key"),
        pytest.param({"MOXY_KEY_FILE": "missing.key"}, "MOXY_KEY_FILE", id="missing-key-file"),
    ],
)
def test_bad_settings_fail_at_setup(monkeypatch: pytest.MonkeyPatch, variables: dict[str, str], setting: str) -> None:
    for name, value in variables.items():
        monkeypatch.setenv(name, value)
    env = jinja2.Environment()

    with pytest.raises(ConfigError) as caught:
        setup_jinja2(env)

    assert caught.value.setting == setting
    assert "moxy" not in env.filters
    assert "moxy_url" not in env.globals


# -- values that cannot be signed -----------------------------------------------------------------------------------

UNSIGNABLE = [
    pytest.param("javascript:alert(1)", "scheme: javascript", id="javascript"),
    pytest.param("/static/relative.png", "scheme: none", id="relative"),
    pytest.param("ftp://example.com/a.png", "scheme: ftp", id="ftp"),
    pytest.param("https://exa mple.com/a.png", "whitespace", id="space"),
    pytest.param("https://example.com/a.png\n", "whitespace", id="newline"),
    pytest.param("https:///a.png", "no host", id="no-host"),
    pytest.param("", "empty", id="empty"),
]


@pytest.mark.parametrize(("url", "reason"), UNSIGNABLE)
@pytest.mark.parametrize("template", [IMG_FILTER, IMG_GLOBAL, IMG_FILTER_EXPIRES])
def test_unsignable_url_raises_naming_it(url: str, reason: str, template: str) -> None:
    with pytest.raises(UnsignableURL) as caught:
        environment().from_string(template).render(url=url)

    message = str(caught.value)
    assert repr(url) in message
    assert reason in message
    assert isinstance(caught.value.__cause__, UnsignableURL)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        pytest.param(None, "None instead of a URL", id="none"),
        pytest.param(42, "got int 42", id="int"),
        pytest.param(b"https://example.com/a.png", "got bytes", id="bytes"),
        pytest.param(["https://example.com/a.png"], "got list", id="list"),
    ],
)
def test_non_string_values_raise(value: object, expected: str) -> None:
    with pytest.raises(UnsignableURL, match=re.escape(expected)):
        environment().from_string(IMG_FILTER).render(url=value)


def test_long_values_are_shortened_in_the_message() -> None:
    url = "data:image/png;base64," + "A" * 10_000
    with pytest.raises(UnsignableURL) as caught:
        environment().from_string(IMG_FILTER).render(url=url)
    assert "data:image/png;base64,AAAA" in str(caught.value)
    assert len(str(caught.value)) < 400


@pytest.mark.parametrize(
    ("undefined", "template", "context", "hint"),
    [
        pytest.param(jinja2.Undefined, "{{ pic | moxy }}", {}, "'pic' is undefined", id="default-name"),
        pytest.param(jinja2.Undefined, "{{ moxy_url(pic) }}", {}, "'pic' is undefined", id="default-global"),
        pytest.param(jinja2.Undefined, "{{ user.avatar | moxy }}", {"user": {}}, "no attribute 'avatar'", id="attr"),
        pytest.param(jinja2.StrictUndefined, "{{ pic | moxy }}", {}, "'pic' is undefined", id="strict"),
        pytest.param(jinja2.ChainableUndefined, "{{ a.b.c | moxy }}", {}, "'a' is undefined", id="chainable"),
    ],
)
def test_undefined_raises_even_with_on_error(
    undefined: type[jinja2.Undefined], template: str, context: dict[str, object], hint: str
) -> None:
    calls: list[object] = []

    def record(value: object, error: UnsignableURL) -> str:
        calls.append(value)
        return ""

    env = jinja2.Environment(autoescape=True, undefined=undefined)
    setup_jinja2(env, signer=Signer([KEY], BASE), on_error=record)

    with pytest.raises(jinja2.UndefinedError, match=re.escape(hint)):
        env.from_string(template).render(**context)
    assert calls == []


def test_on_error_replaces_what_cannot_be_signed() -> None:
    calls: list[tuple[object, str]] = []

    def placeholder(value: object, error: UnsignableURL) -> str:
        calls.append((value, str(error)))
        return "/static/missing.png"

    env = jinja2.Environment(autoescape=True)
    setup_jinja2(env, signer=Signer([KEY], BASE), on_error=placeholder)
    good = "https://example.com/a.png"
    template = env.from_string('{% for url in urls %}<img src="{{ url | moxy }}">{% endfor %}')

    html = template.render(urls=[good, None, "javascript:alert(1)", good])

    assert sources(html) == [cli_sign(good), "/static/missing.png", "/static/missing.png", cli_sign(good)]
    assert [value for value, _ in calls] == [None, "javascript:alert(1)"]
    assert "scheme: javascript" in calls[1][1]


def test_on_error_result_is_escaped() -> None:
    env = jinja2.Environment(autoescape=True)
    setup_jinja2(env, signer=Signer([KEY], BASE), on_error=lambda value, error: '"><script>')
    html = env.from_string(IMG_FILTER).render(url=None)
    assert "<script>" not in html
    assert sources(html) == ['"><script>']


@pytest.mark.parametrize(
    ("expires", "error"),
    [
        pytest.param(0, ValueError, id="zero"),
        pytest.param(-60, ValueError, id="negative"),
        pytest.param(math.nan, ValueError, id="nan"),
        pytest.param(math.inf, ValueError, id="infinity"),
        pytest.param("3600", TypeError, id="string"),
        pytest.param(True, TypeError, id="bool"),
    ],
)
def test_bad_expires_is_a_template_error(expires: object, error: type[Exception]) -> None:
    # A wrong `expires` is a bug in the template, so it raises even when on_error is set.
    env = jinja2.Environment()
    setup_jinja2(env, signer=Signer([KEY], BASE), on_error=lambda value, exc: "unused")
    with pytest.raises(error, match="expires"):
        env.from_string("{{ url | moxy(expires=expires) }}").render(url="https://example.com/a.png", expires=expires)


# -- what the helper returns ----------------------------------------------------------------------------------------


def test_markup_input_is_the_url_its_html_reads_as() -> None:
    env = environment()
    html = env.from_string(IMG_FILTER).render(url=Markup("https://example.com/a.png?w=1&amp;h=2"))
    assert sources(html) == [independent_sign("https://example.com/a.png?w=1&h=2", KEY, BASE)]


def test_returns_plain_str_so_autoescape_guards_an_odd_base_url() -> None:
    # A configured base URL is not under the helper's control; returning str (not Markup) keeps it escaped.
    odd_base = "https://cdn.example.com/a&b\"c'd"
    signer = Signer([KEY], odd_base)
    env = environment(signer)
    url = "https://example.com/a.png"

    result = env.filters["moxy"](url)
    html = env.from_string(IMG_FILTER).render(url=url)

    assert type(result) is str
    assert '"c' not in html
    assert sources(html) == [signer.sign(url)] == [independent_sign(url, KEY, odd_base)]


@pytest.mark.anyio
async def test_async_environment() -> None:
    env = environment(enable_async=True)
    url = "https://example.com/a.png"
    html = await env.from_string(IMG_FILTER + IMG_GLOBAL).render_async(url=url)
    assert sources(html) == [independent_sign(url, KEY, BASE)] * 2


_HOSTS = st.sampled_from(["example.com", "127.0.0.1:9000", "[::1]", "bücher.example", "a.b.c.example.org:8443"])
_PATH = st.text(
    st.characters(codec="utf-8", exclude_categories=["Cc", "Cs", "Zs", "Zl", "Zp"]),
    max_size=60,
)


@settings(max_examples=150, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(scheme=st.sampled_from(["http", "https"]), host=_HOSTS, path=_PATH)
def test_any_signable_url_survives_autoescape_byte_for_byte(scheme: str, host: str, path: str) -> None:
    url = f"{scheme}://{host}/{path}"
    try:
        check_signable(url)
    except UnsignableURL:
        return
    env = environment()
    html = env.from_string(IMG_FILTER + IMG_GLOBAL).render(url=url)
    expected = independent_sign(url, KEY, BASE)
    assert sources(html) == [expected, expected]
    assert html == f'<img src="{expected}">' * 2


# -- the optional dependency ------------------------------------------------------------------------------------------


def test_missing_jinja2_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delitem(sys.modules, "moxy.templating")
    monkeypatch.setitem(sys.modules, "jinja2", None)  # makes `import jinja2` fail as if it were not installed

    with pytest.raises(ImportError, match=re.escape("pip install 'moxy-proxy[jinja2]'")) as caught:
        importlib.import_module("moxy.templating")

    assert caught.value.name == "jinja2"
    assert "moxy.templating" not in sys.modules


# -- the example app ------------------------------------------------------------------------------------------------

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "app.py"


@pytest.mark.anyio
async def test_example_page_shows_signed_images(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MOXY_KEY", KEY)
    monkeypatch.setenv("MOXY_BASE_URL", BASE)
    upstream = ["http://127.0.0.1:9000/a.png", "https://example.com/b.jpg?w=1&h=2"]
    monkeypatch.setenv("MOXY_EXAMPLE_UPSTREAM", ", ".join(upstream))
    spec = importlib.util.spec_from_file_location("moxy_example_app", EXAMPLE)
    assert spec is not None and spec.loader is not None
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)

    transport = httpx.ASGITransport(app=example.create_app())
    async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as client:
        response = await client.get("/")

    assert response.status_code == 200
    shown = sources(response.text)
    assert shown[: len(upstream)] == [independent_sign(url, KEY, BASE) for url in upstream]
    signer = Signer([KEY], BASE)
    assert [signer.verify(str(src)) for src in shown] == [*upstream, upstream[0]]
