"""Where the worker has no cgroups: it becomes a child subreaper and kills what a task
left behind by the mark in its environment.

Without a cgroup (:mod:`.cgroups`), a task's process that calls ``setsid`` or ``setpgid``
leaves the group the worker kills, and once its parent exits it is reparented to init.
A *child subreaper* (``prctl(PR_SET_CHILD_SUBREAPER, 1)``, Linux >= 3.4) gets those
orphans instead: every descendant whose parent dies is reparented to the worker.  Every
task carries ``DSML_WORKER_DIR=<task dir>`` (:data:`~.groups.ORPHAN_MARK`) and
``DSML_ATTEMPT_ID=<id>`` in its environment (:class:`~.launch.TaskEnvironment`), so when
an attempt's leader has ended, :meth:`Subreaper.kill` finds every process carrying both
(one pass over ``/proc/*/environ``) and SIGKILLs it, wherever it is in the process tree;
the ones that end as the worker's children are then reaped (:meth:`Subreaper.reap`).
That pass costs about 2 ms per attempt end with 100 processes on the host (measured:
2.3 ms, reading each ``environ``), paid only where the worker has no cgroups.

Reaping: Twisted reaps only the pids it spawned, and a Popen-started leader is reaped by
its exit watcher, so an orphan reparented to the worker would stay a zombie.  This module
``waitpid``\\s (``WNOHANG``) only pids it killed (checked against their start time, so a
reused pid is not taken), and zombie children of the worker that nobody else waits for:
not a live leader the manager names (``known``), not in Twisted's
``reapProcessHandlers``.  So it never takes the exit status of a process Twisted or the
manager spawned (``waitpid(-1)`` would).

What a task can still do to escape: clear or rewrite its environment (``env -i``,
``execve`` with another environment: its processes carry no mark), or double-fork and
exit before its attempt ends without the mark, or run as another user (the worker cannot
read its environment).  Only a cgroup holds those.  An escaped process that exits by
itself before its attempt ends is reaped at the next attempt end (it is a zombie child
of the worker, not a known one).
"""

from __future__ import annotations

import ctypes
import os
import signal as signal_module
import sys
from collections.abc import Callable, Collection
from pathlib import Path
from typing import Any, Final

from twisted.internet import process as tx_process
from twisted.logger import Logger

from .groups import ORPHAN_MARK

__all__ = ["REAP_INTERVAL", "REAP_ROUNDS", "Subreaper", "set_subreaper", "subreaper_state"]

log = Logger()

PR_SET_CHILD_SUBREAPER: Final = 36
PR_GET_CHILD_SUBREAPER: Final = 37
#: Seconds between two tries to reap what was killed; tries before giving up on a pid.
REAP_INTERVAL: Final = 0.05
REAP_ROUNDS: Final = 200


def _prctl(option: int, arg: Any) -> str:
    """``prctl(option, arg)``; "" or why it failed."""
    if not sys.platform.startswith("linux"):
        return "not Linux"
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(option, arg, 0, 0, 0) != 0:
            return os.strerror(ctypes.get_errno())
    except (OSError, AttributeError) as e:
        return str(e)
    return ""


def set_subreaper(on: bool) -> str:
    """Make this process a child subreaper (or not); "" or why it cannot."""
    return _prctl(PR_SET_CHILD_SUBREAPER, ctypes.c_ulong(int(on)))


def subreaper_state() -> bool:
    """Whether this process is a child subreaper now."""
    flag = ctypes.c_int(0)
    return not _prctl(PR_GET_CHILD_SUBREAPER, ctypes.byref(flag)) and bool(flag.value)


def stat_of(pid: int, proc: Path = Path("/proc")) -> tuple[bytes, int, int] | None:
    """(state, ppid, start time) of ``pid`` from ``/proc/<pid>/stat``, None if gone."""
    try:
        raw = (proc / str(pid) / "stat").read_bytes()
    except OSError:
        return None
    fields = raw[raw.rfind(b")") + 2 :].split()
    try:
        return fields[0], int(fields[1]), int(fields[19])
    except (IndexError, ValueError):
        return None


def marked(work_dir: Path, attempt_id: int, proc: Path = Path("/proc")) -> list[int]:
    """The pids whose environment says they belong to attempt ``attempt_id`` of the
    worker with ``work_dir`` (zombies have none: they are not found)."""
    worker = f"{ORPHAN_MARK}={work_dir}".encode()
    attempt = f"DSML_ATTEMPT_ID={attempt_id}".encode()
    me = os.getpid()
    found = []
    try:
        names = os.listdir(proc)
    except OSError:
        return []
    for name in names:
        if not name.isdigit() or int(name) == me:
            continue
        try:
            with open(proc / name / "environ", "rb") as f:
                environ = f.read()
        except OSError:
            continue  # gone, or not ours to read
        if worker in environ and attempt in environ:
            variables = environ.split(b"\0")
            if worker in variables and attempt in variables:
                found.append(int(name))
    return found


def children(proc: Path = Path("/proc")) -> list[int]:
    """This process's children (``/proc/self/task/*/children``; [] where missing)."""
    found: list[int] = []
    try:
        tasks = os.listdir(proc / "self" / "task")
    except OSError:
        return []
    for tid in tasks:
        try:
            found.extend(int(x) for x in (proc / "self" / "task" / tid / "children")
                         .read_text().split())
        except (OSError, ValueError):
            continue
    return found


class Subreaper:
    """Kills and reaps the processes an attempt left, by the marks in their environment.

    :param clock: ``IReactorTime`` (reaping is retried every :data:`REAP_INTERVAL` s).
    :param work_dir: the worker's task dir (the value of :data:`ORPHAN_MARK`).
    :param known: pids the manager reaps itself (live attempts' leaders): never waited for.
    """

    def __init__(
        self,
        clock: Any,
        work_dir: Path,
        known: Callable[[], Collection[int]] = frozenset,
        proc: Path = Path("/proc"),
    ) -> None:
        self.clock = clock
        self.work_dir = work_dir
        self.known = known
        self.proc = proc
        self._was = False
        self.active = False
        #: pid -> (start time, tries left): killed, not yet reaped.
        self._pending: dict[int, tuple[int, int]] = {}
        self._retry: Any = None

    def start(self) -> str:
        """Become a child subreaper; "" or why not (then :meth:`kill` still kills)."""
        self._was = subreaper_state()
        why = set_subreaper(True)
        self.active = not why
        return why

    def close(self) -> None:
        """Stop being a subreaper (unless the process was one before :meth:`start`)."""
        if self.active and not self._was:
            set_subreaper(False)
        self.active = False  # (what is being reaped still is)

    def kill(self, attempt_id: int) -> int:
        """SIGKILL every process of the attempt, wherever it is; reap them as they end.
        Returns how many were killed."""
        known = set(self.known())
        pids = marked(self.work_dir, attempt_id, self.proc)
        for pid in pids:
            try:
                os.kill(pid, signal_module.SIGKILL)
            except OSError:
                continue
            st = stat_of(pid, self.proc)
            if st is not None and pid not in known:
                self._pending[pid] = (st[2], REAP_ROUNDS)
        self.reap()
        return len(pids)

    def reap(self) -> None:
        """Reap what was killed and has ended as our child, and stray zombie children;
        look again later for the others."""
        self._retry = None
        me = os.getpid()
        known = set(self.known()) | set(tx_process.reapProcessHandlers)
        for pid, (start, tries) in list(self._pending.items()):
            st = stat_of(pid, self.proc)
            if st is None or st[2] != start or pid in known:
                del self._pending[pid]  # gone (its parent reaped it), or not ours
            elif st[0] == b"Z" and st[1] == me and self._waitpid(pid):
                del self._pending[pid]
            elif tries <= 1:
                del self._pending[pid]
                log.warn("process {pid} of an ended task could not be reaped", pid=pid)
            else:
                self._pending[pid] = (start, tries - 1)
        if self.active:
            for pid in children(self.proc):
                st = stat_of(pid, self.proc)
                if st is not None and st[0] == b"Z" and pid not in known:
                    self._waitpid(pid)  # an orphan that ended by itself
        if self._pending:
            self._retry = self.clock.callLater(REAP_INTERVAL, self.reap)

    @staticmethod
    def _waitpid(pid: int) -> bool:
        """Reap ``pid`` if it has ended; whether it is gone (reaped, or not our child)."""
        try:
            done, _ = os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            return True
        return done == pid
