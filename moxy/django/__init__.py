"""Django helpers: add `moxy.django` to INSTALLED_APPS, then `{% load moxy %}` gives the `moxy` filter and the `moxy`
and `moxy_url` tags (moxy/django/templatetags/moxy.py), which turn upstream URLs into signed Moxy URLs.

Settings come from the MOXY_* environment, with Django's `settings.MOXY` (a dict of the same names without the
prefix, e.g. {"KEY_FILE": "/etc/moxy.key", "BASE_URL": "https://images.example.com"}) winning. Imports nothing from
Moxy's server; only this package imports django."""

from __future__ import annotations

from typing import Any

try:
    from django.conf import settings as django_settings  # type: ignore[import-untyped]
    from django.core.signals import setting_changed  # type: ignore[import-untyped]
except ImportError as exc:  # as moxy.templating does for Jinja2: name the extra that brings it
    raise ImportError(
        "moxy.django needs Django, an optional extra of Moxy: pip install 'moxy-proxy[django]'", name=exc.name
    ) from exc

from moxy.config import load_settings
from moxy.signing import Signer

__all__ = ["get_signer"]

_signer: Signer | None = None


def get_signer() -> Signer:
    """The signer of the templates, built once from MOXY_* and settings.MOXY (a bad setting raises ConfigError,
    at start-up when the app is installed: its AppConfig.ready builds it)."""
    global _signer
    if _signer is None:
        given: dict[str, Any] = getattr(django_settings, "MOXY", None) or {}
        settings = load_settings(**{str(name).lower(): value for name, value in given.items()})
        _signer = Signer(settings.signing_keys(), settings.base_url, camo_keys=settings.camo_keys())
    return _signer


def _forget_signer(*, setting: str, **kwargs: Any) -> None:
    # Tests (override_settings) and reloaders change settings.MOXY at run time: the next page builds a new signer.
    global _signer
    if setting == "MOXY":
        _signer = None


setting_changed.connect(_forget_signer, dispatch_uid="moxy.django.forget_signer")
