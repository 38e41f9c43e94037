"""What a server process tree costs, read from /proc: CPU time (user + system) and each worker's peak RSS.

A server is its first process and every live descendant (nginx's master and workers, granian's supervisor and
workers). /proc/<pid>/stat counts the CPU of all of a process's threads, so Moxy's thread pool (disk reads, DNS) is
in its figure; what a process's children spent is only in the parent's cutime once they have exited and been
waited for, so the live children are read one by one instead."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

PROC = Path("/proc")
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def _stat_fields(pid: int) -> list[str] | None:
    """The fields of /proc/<pid>/stat after the command name (which may hold spaces), or None once it has gone."""
    try:
        raw = (PROC / str(pid) / "stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    return raw[raw.rindex(")") + 2 :].split()


def _children_by_parent() -> dict[int, list[int]]:
    parents: dict[int, list[int]] = {}
    for entry in PROC.iterdir():
        if not entry.name.isdigit():
            continue
        fields = _stat_fields(int(entry.name))
        if fields is not None:
            # Field 4 of stat is the parent; after the name it is the second field.
            parents.setdefault(int(fields[1]), []).append(int(entry.name))
    return parents


def descendants(pid: int) -> list[int]:
    """The live processes below `pid`, children before grandchildren."""
    parents = _children_by_parent()
    found: list[int] = []
    level = [pid]
    for _ in range(8):  # nginx and granian are two levels deep; the bound only keeps a cycle from looping
        level = [child for parent in level for child in parents.get(parent, [])]
        if not level:
            break
        found.extend(level)
    return found


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds spent so far by `pid` and its live descendants."""
    ticks = 0
    for member in [pid, *descendants(pid)]:
        fields = _stat_fields(member)
        if fields is not None:
            # utime and stime are stat fields 14 and 15: the 12th and 13th after the name.
            ticks += int(fields[11]) + int(fields[12])
    return ticks / CLOCK_TICKS


def peak_rss_bytes(pid: int) -> int | None:
    """VmHWM: the largest resident set the process has had since it started; None once it has gone."""
    try:
        status = (PROC / str(pid) / "status").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    for line in status.splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return None


def workers(pid: int) -> list[int]:
    """The processes that serve requests: the children of a supervisor, or the process itself when it has none
    (`moxy serve --workers 1` serves in its own process)."""
    return _children_by_parent().get(pid) or [pid]


@dataclass(frozen=True, slots=True)
class CpuWindow:
    """CPU seconds of a server tree between two readings."""

    pid: int
    start: float

    @classmethod
    def open(cls, pid: int) -> CpuWindow:
        return cls(pid, cpu_seconds(pid))

    def seconds(self) -> float:
        return cpu_seconds(self.pid) - self.start
