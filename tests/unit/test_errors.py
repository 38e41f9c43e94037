"""The error tree (moxy.errors): shape, the data each error carries, and no HTTP status anywhere."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from moxy import errors
from moxy.errors import (
    BadSignature,
    ConfigError,
    DestinationRefused,
    ExpiredURL,
    MalformedURL,
    MoxyError,
    UnsignableURL,
    UpstreamError,
    UpstreamTimeout,
    VerificationError,
)


@pytest.fixture(autouse=True)
def _isolated_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for name in list(os.environ):
        if name.upper().startswith("MOXY_"):
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)


TREE: list[tuple[type[Exception], type[Exception]]] = [
    (ConfigError, MoxyError),
    (UnsignableURL, MoxyError),
    (UnsignableURL, ValueError),
    (VerificationError, MoxyError),
    (MalformedURL, VerificationError),
    (BadSignature, VerificationError),
    (ExpiredURL, VerificationError),
    (DestinationRefused, MoxyError),
    (UpstreamError, MoxyError),
    (UpstreamTimeout, UpstreamError),
    (MoxyError, Exception),
]


@pytest.mark.parametrize(("child", "parent"), TREE, ids=[f"{c.__name__}<{p.__name__}" for c, p in TREE])
def test_tree(child: type[Exception], parent: type[Exception]) -> None:
    assert issubclass(child, parent)


@pytest.mark.parametrize(
    ("error", "other"),
    [
        (MalformedURL, BadSignature),
        (BadSignature, ExpiredURL),
        (DestinationRefused, VerificationError),
        (UpstreamError, VerificationError),
        (ConfigError, ValueError),
        (VerificationError, ValueError),
    ],
)
def test_siblings_do_not_catch_each_other(error: type[Exception], other: type[Exception]) -> None:
    assert not issubclass(error, other)


def test_every_error_is_exported_and_documented() -> None:
    defined = {name for name, value in vars(errors).items() if isinstance(value, type) and issubclass(value, Exception)}
    assert set(errors.__all__) == defined
    assert errors.__all__ == sorted(errors.__all__)
    for name in defined:
        assert getattr(errors, name).__doc__
        assert name in (errors.__doc__ or "")  # the module docstring draws the whole tree


def test_config_error_names_the_setting() -> None:
    error = ConfigError("MOXY_PORT", "not a number")
    assert (error.setting, error.message) == ("MOXY_PORT", "not a number")
    assert str(error) == "MOXY_PORT: not a number"


@pytest.mark.parametrize("cls", [VerificationError, MalformedURL, BadSignature])
def test_verification_errors_carry_a_reason(cls: type[VerificationError]) -> None:
    error = cls("signature does not match")
    assert error.reason == "signature does not match" == str(error)


def test_expired_url_carries_its_expiry() -> None:
    error = ExpiredURL("URL expired at 1700000000", 1_700_000_000)
    assert error.expired_at == 1_700_000_000
    assert error.reason == str(error) == "URL expired at 1700000000"
    with pytest.raises(VerificationError):
        raise error


def test_destination_refused_carries_a_reason() -> None:
    assert DestinationRefused("private address").reason == "private address"


@pytest.mark.parametrize("cls", [UpstreamError, UpstreamTimeout])
def test_upstream_errors_carry_reason_and_optional_status(cls: type[UpstreamError]) -> None:
    plain = cls("connect failed")
    assert (plain.reason, plain.status) == ("connect failed", None)
    with_status = cls("upstream said so", 404)
    assert (with_status.reason, with_status.status, str(with_status)) == ("upstream said so", 404, "upstream said so")


@pytest.mark.parametrize(
    "error",
    [
        ConfigError("MOXY_KEY", "missing"),
        UnsignableURL("no host"),
        MalformedURL("bad"),
        BadSignature("bad"),
        ExpiredURL("old", 1),
        DestinationRefused("private address"),
        UpstreamError("bad", 500),
        UpstreamTimeout("slow"),
    ],
    ids=lambda error: type(error).__name__,
)
def test_errors_carry_no_http_status(error: MoxyError) -> None:
    # The web shell maps errors to statuses in one table; an error that chose its own would bypass it.
    for attribute in ("status_code", "http_status", "code"):
        assert not hasattr(error, attribute)
