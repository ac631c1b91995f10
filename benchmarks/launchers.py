"""A worker's own CPU per one-shot task, launcher against launcher, without the network.

    .venv/bin/python benchmarks/launchers.py [--tasks 1000] [--reps 4] [--command true]

One TaskManager (two slots, as in benchmarks/jobs.py) on a real epoll reactor in this
process runs ``--tasks`` attempts of ``--command``, starting the next as each result
comes; this process's own CPU (user + system; the tasks' CPU is theirs) per attempt and
the attempts per second are printed for each launcher, alternating, with medians.  This
is the part of a worker's cost per task that a launcher, the attempt directory and the
log pipes decide; benchmarks/jobs.py measures the whole cluster.  A cheaper start was
judged this way: glibc's ``posix_spawn`` through ctypes (with addchdir_np and
POSIX_SPAWN_SETSID) took half Popen's CPU in a loop of bare starts, yet as a launcher
here it was no cheaper per attempt (533 against 504 us), so it was not kept.  Not a
benchmark with a target: no reference but each other.
"""

from __future__ import annotations

import argparse
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from twisted.internet import defer  # noqa: E402
from twisted.internet.epollreactor import EPollReactor  # noqa: E402

from dsml.worker import tasks  # noqa: E402
from dsml.worker.tasks import AttemptResult, AttemptSpec, TaskManager  # noqa: E402

SLOTS = 2


class NoTransfers:
    """The attempts here have no inputs or outputs."""

    def fetch(self, key: str, dest: Path) -> defer.Deferred[None]:
        raise AssertionError("no inputs here")

    def store(self, src: Path, key: str) -> defer.Deferred[None]:
        raise AssertionError("no outputs here")


def run(launcher: tasks.Launcher, n: int, work: Path, command: str) -> tuple[float, float]:
    """(this process's CPU us per attempt, attempts per second) for ``n`` attempts."""
    reactor = EPollReactor()
    started = 0
    ended = 0
    failures: list[str] = []

    def start() -> None:
        nonlocal started
        spec = AttemptSpec(attempt_id=started, job_id="bench", task_index=started,
                           command=(command,))
        started += 1
        manager.start(spec)

    def on_result(result: AttemptResult) -> None:
        nonlocal ended
        ended += 1
        if result.reason:
            failures.append(result.reason)
        if started < n:
            start()
        elif ended == n:
            reactor.stop()

    manager = TaskManager(reactor, slots=SLOTS, work_dir=work, transfers=NoTransfers(),
                          on_result=on_result, launcher=launcher)

    def begin() -> None:
        for _ in range(min(SLOTS, n)):
            start()

    reactor.callWhenRunning(begin)
    before = resource.getrusage(resource.RUSAGE_SELF)
    t0 = time.perf_counter()
    reactor.run()  # its SIGCHLD handler reaps what spawnProcess started
    elapsed = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_SELF)
    if failures:
        raise SystemExit(f"{len(failures)} attempts failed, e.g. {failures[0]!r}")
    cpu = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
    return cpu / n * 1e6, n / elapsed


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tasks", type=int, default=1000)
    p.add_argument("--reps", type=int, default=4)
    p.add_argument("--command", default="true",
                   help="the command each attempt runs (default: true, found along PATH)")
    args = p.parse_args(argv)
    launchers: dict[str, Any] = {"popen (default)": tasks.popen_launcher,
                                 "env -C + setsid": tasks.spawn_launcher()}
    figures: dict[str, list[tuple[float, float]]] = {name: [] for name in launchers}
    with tempfile.TemporaryDirectory(prefix="dsml-launchers-") as tmp:
        for name, launcher in launchers.items():  # warm-up, not counted
            run(launcher, min(100, args.tasks), Path(tmp) / f"warm-{len(name)}", args.command)
        for rep in range(args.reps):
            for i, (name, launcher) in enumerate(launchers.items()):
                cpu, rate = run(launcher, args.tasks, Path(tmp) / f"{rep}-{i}", args.command)
                figures[name].append((cpu, rate))
                print(f"  rep {rep + 1}  {name:16s} {cpu:6.0f} us CPU/attempt  {rate:6.0f}/s",
                      flush=True)
    print(f"\n{args.tasks} x `{args.command}` on {SLOTS} slots, {args.reps} reps, medians "
          f"(this process's CPU only; the tasks' own CPU is not counted):")
    for name, rows in figures.items():
        cpu = statistics.median(c for c, _ in rows)
        rate = statistics.median(r for _, r in rows)
        print(f"  {name:16s} {cpu:6.0f} us CPU per attempt   {rate:6.0f} attempts/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
