"""Signalling a task's process group: the kill rules, and the orphans of an earlier run.

Every task leads its own session and process group (see :mod:`.launch`), so its pid is
also its group id, and one ``os.killpg`` reaches everything it started (unless a process
deliberately left the group with ``setsid``/``setpgid``: only a cgroup, or the mark in
its environment where the worker is a subreaper (:mod:`.isolation`), follows those).
The rules, applied by :class:`~dsml.worker.tasks.manager.TaskManager`:

- a timeout, a cancel and a stop send SIGTERM to the group (:func:`signal_group`), then
  SIGKILL ``grace`` seconds later if the leader is still alive;
- whenever the leader ends (by itself or not), SIGKILL goes to its group at once
  (:func:`kill_leftovers`), so a task cannot leave a background child behind;
- a worker killed with -9 cannot stop its tasks; every task carries :data:`ORPHAN_MARK`
  naming the worker's task dir in its environment, so the next start of that worker finds
  them and SIGKILLs their groups before taking any new work (:func:`kill_orphans`).
"""

from __future__ import annotations

import os
import signal as signal_module
from pathlib import Path

from twisted.logger import Logger

log = Logger()

#: Environment variable naming the worker's task dir in every task (see kill_orphans).
ORPHAN_MARK = "DSML_WORKER_DIR"


def signal_group(pid: int, sig: int) -> None:
    """Send ``sig`` to the group that ``pid`` leads (its leader is not reaped yet).

    Right after the spawn the leader may not have called ``setsid()`` yet: then there is
    no such group (ESRCH), it has no children either, and the signal goes to the leader.
    """
    try:
        os.killpg(pid, sig)
    except ProcessLookupError:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass
    except PermissionError as e:
        log.error("cannot signal group {pid}: {error}", pid=pid, error=e)


def kill_leftovers(pgid: int) -> None:
    """SIGKILL what is left of a group whose leader has just been reaped.

    Until the last member is gone the group id cannot be reused as a pid, so this reaches
    only leftovers of that task (or nothing: ESRCH).
    """
    try:
        os.killpg(pgid, signal_module.SIGKILL)
    except ProcessLookupError:
        pass
    except PermissionError as e:
        log.error("cannot kill group {pid}: {error}", pid=pgid, error=e)


def kill_orphans(work_dir: Path, proc: Path = Path("/proc")) -> int:
    """Kill the process groups of tasks an earlier run of the worker with this
    ``work_dir`` left running (they carry ``DSML_WORKER_DIR=<work_dir>``); the master
    has already given them to another worker.  Returns the groups killed."""
    mark = f"{ORPHAN_MARK}={work_dir}".encode()
    groups: set[int] = set()
    me = os.getpid()
    try:
        entries = list(proc.iterdir())
    except OSError:
        return 0
    for entry in entries:
        if not entry.name.isdigit() or int(entry.name) == me:
            continue
        try:
            environ = (entry / "environ").read_bytes()
        except OSError:
            continue  # gone, or not ours to read
        if mark in environ.split(b"\0"):
            try:
                groups.add(os.getpgid(int(entry.name)))
            except OSError:
                continue
    for pgid in groups:
        if pgid in (0, 1, os.getpgrp()):
            continue
        try:
            os.killpg(pgid, signal_module.SIGKILL)
            log.warn("killed process group {pgid} left by an earlier run", pgid=pgid)
        except OSError:
            pass
    return len(groups)
