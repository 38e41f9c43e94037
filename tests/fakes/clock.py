"""A clock the test moves by hand, for every seam of Moxy that takes a `clock` callable."""

from __future__ import annotations

__all__ = ["Clock"]


class Clock:
    """Returns `now` when called; a test sets `now` or calls advance()."""

    def __init__(self, now: float = 1_700_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds
