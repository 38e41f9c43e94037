"""Run a test module once per built-in upstream engine (`moxy.upstream.ENGINES`): the modules that prove the wire
(framing, codings, TLS, hostile upstreams, header bytes) hold every engine to the same promises.

In such a module::

    from tests.integration import engines

    upstream_engine = engines.upstream_engine  # overrides the default of tests/integration/conftest.py
    pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("upstream_engine")]

A Moxy started by `start_moxy` then runs with that MOXY_UPSTREAM_ENGINE, and an `Upstream` built in the test
without an engine uses it too (as `moxy.upstream.DEFAULT_ENGINE`). Module scope keeps one shared Moxy per engine."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from moxy.upstream import ENGINES

__all__ = ["upstream_engine"]


@pytest.fixture(scope="module", params=sorted(ENGINES))
def upstream_engine(request: pytest.FixtureRequest) -> Iterator[str]:
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr("moxy.upstream.DEFAULT_ENGINE", request.param)
        yield str(request.param)
