"""One wrk run and what its report says, refusing runs whose answers were errors (a benchmark of 403s is worthless)."""

from __future__ import annotations

import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from bench.servers import BenchError

THREADS = 2
_TIME_UNITS = {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60_000.0, "h": 3_600_000.0}
_BYTE_UNITS = {"": 1, "K": 1024, "M": 1024**2, "G": 1024**3, "T": 1024**4, "P": 1024**5}
_SUMMARY = re.compile(r"^\s*(\d+) requests in ([\d.]+)(us|ms|s|m|h), ([\d.]+)([KMGTP]?)B read", re.MULTILINE)
_RATE = re.compile(r"^Requests/sec:\s+([\d.]+)", re.MULTILINE)
_P99 = re.compile(r"^\s*99(?:\.000)?%\s+([\d.]+)(us|ms|s|m|h)\s*$", re.MULTILINE)
_SOCKET_ERRORS = re.compile(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)")
_NON_2XX = re.compile(r"Non-2xx or 3xx responses: (\d+)")


@dataclass(frozen=True, slots=True)
class WrkResult:
    requests: int
    req_per_s: float
    p99_ms: float
    bytes_per_request: float


def wrk_binary() -> str:
    found = shutil.which("wrk")
    if found is None:
        raise BenchError("wrk is not installed (make system-deps installs it)")
    return found


def parse(report: str, *, min_body: int) -> WrkResult:
    """The figures of a `wrk --latency` report. Raises BenchError if any answer was an error or too short."""
    summary, rate, p99 = _SUMMARY.search(report), _RATE.search(report), _P99.search(report)
    if summary is None or rate is None or p99 is None:
        raise BenchError(f"unreadable wrk report:\n{report}")
    non_2xx = _NON_2XX.search(report)
    if non_2xx is not None and int(non_2xx.group(1)) > 0:
        raise BenchError(f"{non_2xx.group(1)} answers were errors (status >= 400)")
    errors = _SOCKET_ERRORS.search(report)
    if errors is not None and any(int(count) for count in errors.groups()):
        raise BenchError(f"wrk saw socket errors: {errors.group(0)}")
    requests = int(summary.group(1))
    if requests == 0:
        raise BenchError("wrk completed no request")
    read = float(summary.group(4)) * _BYTE_UNITS[summary.group(5)]
    per_request = read / requests
    # wrk rounds the byte total to 2 decimals of its unit; 1 % slack covers that, not a short or empty body.
    if per_request < min_body * 0.99:
        raise BenchError(f"answers average {per_request:.0f} bytes, expected a {min_body}-byte body")
    return WrkResult(
        requests=requests,
        req_per_s=float(rate.group(1)),
        p99_ms=float(p99.group(1)) * _TIME_UNITS[p99.group(2)],
        bytes_per_request=per_request,
    )


SCRIPTS = Path(__file__).parent / "lua"


def run_wrk(
    url: str,
    *,
    seconds: int,
    connections: int,
    min_body: int,
    script: str | None = None,
    script_args: tuple[str, ...] = (),
) -> WrkResult:
    """One wrk run on `url`; with `script` (a file in bench/lua/), the script picks each request's path."""
    command = [wrk_binary(), f"-t{THREADS}", f"-c{connections}", f"-d{seconds}s", "--latency"]
    if script is not None:
        command += ["-s", str(SCRIPTS / script)]
    command.append(url)
    if script_args:
        command += ["--", *script_args]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=seconds + 30, check=False)
    except subprocess.TimeoutExpired as exc:
        raise BenchError(f"wrk did not finish within {seconds + 30} s") from exc
    if done.returncode != 0:
        raise BenchError(f"wrk exited with {done.returncode}: {done.stderr.strip() or done.stdout.strip()}")
    return parse(done.stdout, min_body=min_body)
