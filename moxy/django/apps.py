"""The Django application `moxy.django`: its templatetags package holds the `moxy` library."""

from __future__ import annotations

from django.apps import AppConfig  # type: ignore[import-untyped]

from moxy.django import get_signer


class MoxyConfig(AppConfig):  # type: ignore[misc]  # AppConfig is untyped
    name = "moxy.django"
    label = "moxy"
    verbose_name = "Moxy signed URLs"

    def ready(self) -> None:
        # A missing or short key stops the site at start-up with ConfigError, not on the first page with a picture.
        get_signer()
