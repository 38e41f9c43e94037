"""The public surface of `moxy`: an exact, sorted `__all__`, and an import that loads no web stack."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest

import moxy
import moxy.errors
import moxy.signing

# Importing moxy from a template-rendering web app must not drag in a server, a client or a framework.
HEAVY = ("starlette", "httpx", "aiohttp", "uvicorn", "click", "jinja2", "redis", "prometheus_client", "anyio", "django")
EXPECTED = {
    "BadSignature",
    "ConfigError",
    "DestinationRefused",
    "ExpiredURL",
    "MalformedURL",
    "MoxyError",
    "Signer",
    "UnsignableURL",
    "UpstreamError",
    "UpstreamTimeout",
    "VerificationError",
    "__version__",
    "sign_url",
}


@pytest.fixture(autouse=True)
def _isolated_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for name in list(os.environ):
        if name.upper().startswith("MOXY_"):
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)


def _public_names(module: types.ModuleType) -> set[str]:
    """Names a user could import: no underscore, no submodule, not the `annotations` __future__ flag."""
    return {
        name
        for name, value in vars(module).items()
        if not name.startswith("_") and not isinstance(value, types.ModuleType) and name != "annotations"
    }


def test_all_is_sorted_and_unique() -> None:
    assert moxy.__all__ == sorted(moxy.__all__)
    assert len(set(moxy.__all__)) == len(moxy.__all__)


def test_all_equals_the_exported_names() -> None:
    assert set(moxy.__all__) == _public_names(moxy) | {"__version__"}
    assert set(moxy.__all__) == EXPECTED
    for name in moxy.__all__:
        assert hasattr(moxy, name)


@pytest.mark.parametrize("module", [moxy.errors, moxy.signing], ids=lambda module: module.__name__)
def test_module_all_is_sorted_and_complete(module: types.ModuleType) -> None:
    exported = module.__all__
    assert exported == sorted(exported)
    defined_here = {
        name
        for name in _public_names(module)
        if getattr(getattr(module, name), "__module__", None) == module.__name__  # classes and functions
    }
    assert defined_here <= set(exported)


def test_reexports_are_the_same_objects() -> None:
    for name in moxy.errors.__all__:
        assert getattr(moxy, name) is getattr(moxy.errors, name)
    assert moxy.Signer is moxy.signing.Signer
    assert moxy.sign_url is moxy.signing.sign_url


def test_version_is_a_release_string() -> None:
    parts = moxy.__version__.split(".")
    assert len(parts) >= 2 and all(part.isdigit() for part in parts[:2])


def test_documented_library_usage() -> None:
    signer = moxy.Signer(keys=["a-key-of-at-least-16-bytes"], base_url="https://cdn.example.com")
    signed = signer.sign("https://upstream.example/pic.png", expires_in=3600)
    assert signed.startswith("https://cdn.example.com/")
    assert signer.verify(signed) == "https://upstream.example/pic.png"
    assert moxy.sign_url("https://upstream.example/pic.png", "a-key-of-at-least-16-bytes", "https://cdn.example.com")
    with pytest.raises(moxy.VerificationError):
        signer.verify("https://cdn.example.com/nope")


def _modules_after(statement: str) -> set[str]:
    code = f"import json, sys\n{statement}\nprint(json.dumps(sorted(sys.modules)))"
    env = {name: value for name, value in os.environ.items() if not name.upper().startswith("MOXY_")}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env, timeout=60)
    return set(json.loads(done.stdout))


def test_import_moxy_loads_no_web_stack() -> None:
    loaded = _modules_after("import moxy")
    assert "moxy.signing" in loaded and "moxy.errors" in loaded
    for heavy in HEAVY:
        assert not {name for name in loaded if name == heavy or name.startswith(heavy + ".")}, heavy


def test_the_check_would_see_a_heavy_import() -> None:
    # Guards the test above against passing vacuously (e.g. a subprocess that never imported anything).
    assert "httpx" in _modules_after("import moxy, httpx")
