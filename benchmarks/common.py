"""Small helpers shared by the benchmark scripts: process accounting and statistics.

Nothing here imports dsml, so the raw reference scripts stay independent of it.
"""

from __future__ import annotations

import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from typing import Any

#: Clock ticks per second of /proc/<pid>/stat's utime and stime.
CLK_TCK = os.sysconf("SC_CLK_TCK")

MIB = 1024 * 1024


def cpu_model() -> str:
    """The CPU's model name (for the figures' machine line)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "?"


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds so far of process ``pid`` (all its threads)."""
    with open(f"/proc/{pid}/stat", "rb") as f:
        text = f.read()
    # The command name (field 2) may hold spaces: split after its closing parenthesis.
    fields = text[text.rindex(b")") + 2 :].split()
    utime, stime = int(fields[11]), int(fields[12])  # fields 14 and 15 of stat(5)
    return (utime + stime) / CLK_TCK


def proc_status_kib(pid: int, name: str) -> int | None:
    """A ``kB`` field of /proc/<pid>/status (VmHWM, VmRSS); None if unavailable."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(name + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")


def self_hwm_kib() -> int | None:
    """This process's own peak RSS.

    Not ``getrusage().ru_maxrss``: Linux carries the high-water mark across ``exec``, so
    a child spawned by a big parent reports at least the parent's size at the fork.
    """
    return proc_status_kib(os.getpid(), "VmHWM")


def run_measured(
    cmd: Sequence[str],
    timeout: float,
    env: dict[str, str] | None = None,
    cwd: str | None = None,
) -> tuple[int, float, int, str, str]:
    """Run ``cmd`` to completion; return (status, wall seconds, peak RSS KiB, out, err).

    The peak RSS is the child's VmHWM, sampled from /proc every 2 ms while it runs
    (VmHWM only grows, so this misses at most growth in its last 2 ms; ``wait4``'s
    ``ru_maxrss`` would include this parent's size, see :func:`self_hwm_kib`).
    The child is killed after ``timeout`` seconds.
    """
    import tempfile

    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        t0 = time.perf_counter()
        proc = subprocess.Popen(
            list(cmd), stdout=out, stderr=err, stdin=subprocess.DEVNULL, env=env, cwd=cwd
        )
        deadline = t0 + timeout
        hwm = 0
        try:
            while True:
                sample = proc_status_kib(proc.pid, "VmHWM")
                pid, status, _usage = os.wait4(proc.pid, os.WNOHANG)
                if pid:
                    break
                if sample:
                    hwm = max(hwm, sample)
                if time.perf_counter() > deadline:
                    proc.kill()
                    pid, status, _usage = os.wait4(proc.pid, 0)
                    break
                time.sleep(0.002)
        except BaseException:
            if proc.returncode is None:
                try:
                    proc.kill()
                    os.wait4(proc.pid, 0)
                except (ProcessLookupError, ChildProcessError):
                    pass
            raise
        wall = time.perf_counter() - t0
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        return (
            proc.returncode,
            wall,
            hwm,
            out.read().decode(errors="replace"),
            err.read().decode(errors="replace"),
        )


def run_json_helper(
    cmd: Sequence[str], timeout: float, env: dict[str, str] | None = None
) -> dict[str, Any]:
    """Run a helper that prints one JSON object as its last stdout line; add its rusage."""
    status, wall, maxrss, out, err = run_measured(cmd, timeout, env)
    if status != 0:
        raise RuntimeError(f"{' '.join(cmd[:3])} ... exited {status}:\n{err.strip()[-2000:]}")
    result: dict[str, Any] = json.loads(out.strip().splitlines()[-1])
    result["wall"] = wall
    result["hwm_kib_sampled"] = maxrss
    result["stderr"] = err
    return result


def stop_process(proc: subprocess.Popen[Any], grace: float = 10.0) -> None:
    """SIGTERM, then SIGKILL after ``grace`` seconds; reap it."""
    if proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


# -- report formatting shared by run.py, cluster.py and jobs.py --


def fmt(x: float | None, digits: int = 0) -> str:
    """A number with thousands separators, or n/a."""
    if x is None or x != x:  # None or NaN
        return "n/a"
    return f"{x:,.{digits}f}"


def ratio(a: float | None, b: float | None) -> float | None:
    """a / b, or None when either is missing."""
    if a is None or b is None or not b or a != a or b != b:
        return None
    return a / b


def verdict(ok: bool | None) -> str:
    """met / NOT met / n/a."""
    return "n/a" if ok is None else ("met" if ok else "NOT met")


def table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """Rows under a header, first column left-aligned, the rest right-aligned."""
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    lines = []
    for n, r in enumerate([header, *rows]):
        cells = [str(c).ljust(widths[0]) if i == 0 else str(c).rjust(widths[i])
                 for i, c in enumerate(r)]
        lines.append("  " + "  ".join(cells).rstrip())
        if n == 0:
            lines.append("  " + "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def say(*parts: object) -> None:
    """Print and flush."""
    print(*parts, flush=True)


def note(text: str) -> None:
    """Progress on stderr, so stdout holds only the report."""
    print(f"  .. {text}", file=sys.stderr, flush=True)
