"""Processes as Linux's /proc shows them: children, descendants, and those carrying this test session's mark in their
environment (how a worker orphaned by its supervisor's death is still known as ours)."""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["SESSION_MARK", "alive", "children", "descendants", "describe", "marked"]

# Set by tests/conftest.py to the pytest process's pid; every process the tests start inherits it unless a test
# builds an environment from nothing.
SESSION_MARK = "PYTEST_MOXY_SESSION"  # not MOXY_: the harnesses strip those from what they start


def _stat(pid: int) -> tuple[str, int] | None:
    """(state, parent pid) of a process, or None once it is gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name is in parentheses and may itself hold spaces or parentheses: fields resume after the last.
    fields = text[text.rindex(")") + 2 :].split()
    return fields[0], int(fields[1])


def _pids() -> list[int]:
    return [int(name) for name in os.listdir("/proc") if name.isdigit()]


def alive(pid: int) -> bool:
    """Running or stopped; a zombie (dead, not yet reaped by its parent) is not alive."""
    stat = _stat(pid)
    return stat is not None and stat[0] not in ("Z", "X")


def children(pid: int) -> set[int]:
    found = set()
    for candidate in _pids():
        stat = _stat(candidate)
        if stat is not None and stat[1] == pid and stat[0] not in ("Z", "X"):
            found.add(candidate)
    return found


def descendants(pid: int) -> set[int]:
    found: set[int] = set()
    frontier = [pid]
    while frontier:
        for child in children(frontier.pop()):
            if child not in found:
                found.add(child)
                frontier.append(child)
    return found


def marked(value: str) -> set[int]:
    """Living processes whose environment carries SESSION_MARK=value (those of another user may be unreadable)."""
    needle = f"{SESSION_MARK}={value}".encode()
    found = set()
    for pid in _pids():
        if pid == os.getpid():
            continue
        try:
            environment = Path(f"/proc/{pid}/environ").read_bytes()
        except OSError:
            continue
        if needle in environment.split(b"\0") and alive(pid):
            found.add(pid)
    return found


def describe(pid: int) -> str:
    try:
        command = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        command = "?"
    stat = _stat(pid)
    parent = stat[1] if stat is not None else "?"
    return f"pid {pid} (parent {parent}): {command[:200]}"
