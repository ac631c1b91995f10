"""The worker's task slots (the seed's TaskManager / WorkerClient): run one attempt of a task.

The master sends an :class:`AttemptSpec`; :meth:`TaskManager.start` reserves its slots and
then, one step after another:

1. makes the attempt directory ``work_dir/<attempt_id>/`` (the command's working directory,
   which also holds its two log files, :data:`STDOUT_NAME` and :data:`STDERR_NAME`);
2. fetches the declared inputs into it, all at once, through :class:`Transfers`;
3. checks that the command exists (``shutil.which`` with the task's own ``PATH``) and spawns
   it in a new session, so that it leads its own process group;
4. streams stdout and stderr into the two log files, each capped with its tail kept;
5. on a clean exit, uploads the declared outputs through :class:`Transfers`;
6. reports an :class:`AttemptResult` through ``on_result`` and frees the slots; a failed
   attempt's result carries the last lines of its stderr (:func:`stderr_tail`).

Process groups (the buildbot ``runprocess`` idea): the command is started in a new session,
so its pid is also the id of its session and process group.  Everything the command starts
stays in that group (unless it deliberately leaves it with ``setsid``/``setpgid``: only a
cgroup could follow those), so one ``os.killpg`` reaches the whole tree.

Starting: on Linux (``os.pidfd_open``, Linux >= 5.3) the command is started by
``subprocess.Popen(cwd=..., start_new_session=True)``: a vfork-style child that chdirs,
calls ``setsid()`` and execs the command, one exec in all (measured: about 0.5 ms of child
CPU against about 2.8 ms for the fallback below).  No thread waits for it: its two output
pipes and a pidfd (readable once the process has exited) are watched by the reactor like
any socket (:class:`_PipeReader`, :class:`_ExitWatcher`).  Twisted's SIGCHLD handling reaps
only the processes it spawned itself, so it never takes this child's exit status.

Elsewhere (or where ``pidfd_open`` fails), the command is spawned through Twisted as
``env -C <dir> -- setsid -- <command...>``.  Neither ``env`` nor ``setsid`` forks: ``setsid``
forks only when its caller already leads a process group, and a freshly spawned child never
does, so the pid Twisted reports is the pid of the command itself.  The working directory
is set by ``env -C`` rather than by ``spawnProcess(path=...)`` because Twisted uses
``posix_spawnp`` only when no ``path`` is given and falls back to ``fork()`` of the whole
worker otherwise.  Where ``setsid`` or ``env -C`` is missing, a three-line Python
trampoline does the same (slower to start).

Stopping: a timeout, :meth:`TaskManager.cancel` and :meth:`TaskManager.stop` send SIGTERM to
the group and SIGKILL ``grace`` seconds later if the leader is still alive.  Whenever the
leader ends (by itself or not), SIGKILL goes to its group at once, so a task cannot leave a
background child behind.  If the log pipes stay open after that (held by a process that left
the group), they are closed after :data:`DRAIN_TIMEOUT` seconds so the attempt still ends.

Failure is said by :attr:`AttemptResult.reason`: the empty string means success; anything
else is a failure, *even with* ``exit_code == 0`` (an output that is missing or could not be
uploaded fails the attempt although the command exited 0).  The master must treat a
non-empty reason as a failed attempt.
"""

from __future__ import annotations

import os
import re
import shutil
import signal as signal_module
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from functools import lru_cache
from pathlib import Path, PurePosixPath
from typing import Any, Protocol

import attrs
from twisted.internet import error as tx_error
from twisted.internet.defer import CancelledError, Deferred, DeferredList, maybeDeferred, succeed
from twisted.internet.interfaces import IDelayedCall, IProcessTransport
from twisted.internet.protocol import ProcessProtocol
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure

from ..errors import DsmlError, NotFound

log = Logger()

#: Default cap, per stream, on the bytes of a task's log kept on disk (the tail is kept).
LOG_CAP = 1024 * 1024

#: Names of the two log files inside an attempt directory.
STDOUT_NAME = "dsml-stdout.log"
STDERR_NAME = "dsml-stderr.log"
#: Under the work dir: the working directories of running attempts (see TaskManager._make_dir).
RUN_DIR = "run"

#: Environment variables passed from the worker's own environment to every task; nothing
#: else leaks (no credentials, no PYTHONPATH of the worker's virtualenv).
BASE_ENV_NAMES = ("PATH", "HOME", "LANG")

#: Seconds between two samples of a running group's memory.
SAMPLE_INTERVAL = 0.5

#: Seconds to wait, after the leader has ended and its group was killed, for the log pipes
#: to close before closing them ourselves (a process that left the group may hold them).
DRAIN_TIMEOUT = 2.0

#: Every timeout reason starts so: ``"timeout after 2 s"``.
TIMEOUT_PREFIX = "timeout after "

#: Unacknowledged results kept for re-sending; beyond this the oldest are dropped (a master
#: that never acknowledges must not grow the worker without bound).
MAX_UNACKED = 10_000

#: Started with ``python -I -S -c`` where ``setsid`` or ``env -C`` is missing:
#: argv is [cwd, command...].
TRAMPOLINE = "import os,sys;os.chdir(sys.argv[1]);os.setsid();os.execvp(sys.argv[2],sys.argv[2:])"

_LOG_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC

#: Bytes read from a task's output pipe at a time.
READ_SIZE = 64 * 1024

_PAGE_SIZE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


#: Per-attempt debug lines (accepted, started, ended ok) only with DSML_TRACE=1: twistd
#: writes debug events too, and three formatted lines per task were a measurable part of
#: a worker's CPU on arrays of short tasks.
TRACE = os.environ.get("DSML_TRACE") == "1"

#: Environment variable naming the worker's task dir in every task (see _kill_orphans).
ORPHAN_MARK = "DSML_WORKER_DIR"

#: Seconds a command's place along a PATH is remembered (see TaskManager._executable).
WHICH_TTL = 1.0

#: A failed attempt's result carries at most this many last lines of its stderr...
STDERR_TAIL_LINES = 10
#: ...and at most this many bytes of it (the tail).
STDERR_TAIL_BYTES = 2048

#: Control characters a stderr tail may not carry (newline and tab it may): a terminal
#: showing ``dsml status`` must not be driven by a task's escape sequences.
_TAIL_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")


class TaskError(DsmlError):
    """:meth:`TaskManager.start` refused an attempt.

    Codes: ``busy`` (not enough free slots; try later or elsewhere), ``bad-task`` (the spec
    itself is wrong: empty command, a path escaping the attempt directory...), ``duplicate``
    (that attempt id is running or already ran here), ``stopping`` (the worker is shutting
    down), ``not-found`` (from :meth:`TaskManager.logs`: no such attempt here).
    """

    code = "bad-task"


@attrs.frozen
class AttemptSpec:
    """What the master sends for one attempt of a task.

    :param inputs: ``(key, relative path)`` pairs, fetched into the attempt directory before
        the command runs.
    :param outputs: ``(relative path, key)`` pairs, uploaded after the command exits 0.
    :param timeout: seconds from spawn to SIGTERM (then SIGKILL after the grace period);
        ``None`` for no limit.  Staging inputs and uploading outputs do not count.
    """

    attempt_id: int
    job_id: str
    task_index: int
    command: tuple[str, ...]
    env: tuple[tuple[str, str], ...] = ()
    inputs: tuple[tuple[str, str], ...] = ()
    outputs: tuple[tuple[str, str], ...] = ()
    slots: int = 1
    timeout: float | None = None


@attrs.frozen
class AttemptResult:
    """How an attempt ended.

    ``reason`` is ``""`` on success and a one-line explanation otherwise: ``"exit 3"``,
    ``"killed by signal 9"``, ``"timeout after 2 s"``, ``"cancelled"``, ``"worker stopping"``,
    ``"command not found: foo"``, ``"input 'k' not found"``, ``"output 'out.txt' missing"``...
    A non-empty reason is a failure even when ``exit_code`` is 0.

    :param exit_code: the command's exit status, ``None`` if it was killed by a signal or
        never ran.
    :param signal: the signal that killed it, or ``None``.
    :param duration: seconds from spawn to the leader's exit (monotonic); 0 if never spawned.
    :param peak_rss: the largest resident memory seen for the process group, in bytes (sampled
        every :data:`SAMPLE_INTERVAL` s; 0 if unknown, e.g. a task shorter than one interval).
    """

    attempt_id: int
    exit_code: int | None
    signal: int | None
    duration: float
    peak_rss: int
    reason: str
    #: A failed attempt's last lines of stderr (:func:`stderr_tail`); "" on success.
    stderr_tail: str = ""

    @property
    def ok(self) -> bool:
        """Whether the attempt succeeded (an empty reason)."""
        return not self.reason

    @property
    def timed_out(self) -> bool:
        """Whether the attempt was stopped at its timeout."""
        return self.reason.startswith(TIMEOUT_PREFIX)


class Transfers(Protocol):
    """How inputs and outputs move between the cluster's store and an attempt directory."""

    def fetch(self, key: str, dest: Path) -> Deferred[None]:
        """Write the stored file ``key`` to ``dest`` (its directory exists).

        Fail with an error whose ``code`` is ``"not-found"`` (:class:`~dsml.errors.NotFound`,
        the store's ``NotFound``) if there is no such key; cancelling should stop the transfer.
        """
        ...

    def store(self, src: Path, key: str) -> Deferred[None]:
        """Upload the file ``src`` under ``key``."""
        ...


class TaskReactor(Protocol):
    """What :class:`TaskManager` needs of a reactor (``IReactorProcess`` + ``IReactorTime``)."""

    def spawnProcess(  # noqa: N802 - Twisted's name
        self,
        processProtocol: Any,  # noqa: N803
        executable: str,
        args: Sequence[str],
        env: Mapping[str, str] | None = None,
        path: str | None = None,
        uid: int | None = None,
        gid: int | None = None,
        usePTY: bool = False,  # noqa: N803
        childFDs: Mapping[int, int | str] | None = None,  # noqa: N803
    ) -> IProcessTransport:
        """Start a process."""
        ...

    def callLater(  # noqa: N802 - Twisted's name
        self, delay: float, callable: Callable[..., Any], *args: object, **kw: object
    ) -> IDelayedCall:
        """Call ``callable`` in ``delay`` seconds."""
        ...

    def seconds(self) -> float:
        """The reactor's current time."""
        ...

    def addReader(self, reader: Any) -> None:  # noqa: N802 - Twisted's name
        """Watch ``reader.fileno()`` for reading (``IReactorFDSet``; the Popen path only)."""
        ...

    def removeReader(self, reader: Any) -> None:  # noqa: N802 - Twisted's name
        """Stop watching ``reader``."""
        ...


#: Builds (executable, argv) that run ``command`` in ``cwd`` as the leader of a new session.
Launcher = Callable[[Path, Sequence[str]], tuple[str, list[str]]]


def setsid_launcher(env: str, setsid: str) -> Launcher:
    """``env -C cwd -- setsid -- command...``: two execs, no fork, no Python start-up."""

    def launch(cwd: Path, command: Sequence[str]) -> tuple[str, list[str]]:
        return env, [env, "-C", str(cwd), "--", setsid, "--", *command]

    return launch


def python_launcher(python: str = sys.executable) -> Launcher:
    """The fallback: a Python trampoline that chdirs, calls ``os.setsid()`` and execs."""

    def launch(cwd: Path, command: Sequence[str]) -> tuple[str, list[str]]:
        return python, [python, "-I", "-S", "-c", TRAMPOLINE, str(cwd), *command]

    return launch


def popen_launcher(cwd: Path, command: Sequence[str]) -> tuple[str, list[str]]:
    """The direct launcher: :class:`TaskManager` recognises it and starts the command with
    ``subprocess.Popen(cwd=cwd, start_new_session=True)``, watched through a pidfd."""
    return command[0], list(command)


def _pidfd_works() -> bool:
    """Whether ``os.pidfd_open`` exists and works here (it may be missing or blocked)."""
    pidfd_open = getattr(os, "pidfd_open", None)
    if pidfd_open is None:
        return False
    try:
        os.close(pidfd_open(os.getpid()))
    except OSError:
        return False
    return True


@lru_cache(maxsize=1)
def default_launcher() -> Launcher:
    """:func:`popen_launcher` where pidfds work, else :func:`spawn_launcher`."""
    if _pidfd_works():
        return popen_launcher
    return spawn_launcher()


@lru_cache(maxsize=1)
def spawn_launcher() -> Launcher:
    """``setsid_launcher`` when ``setsid`` and an ``env`` with ``-C`` exist, else Python."""
    env, setsid = shutil.which("env"), shutil.which("setsid")
    if env and setsid:
        try:
            probe = subprocess.run(
                [env, "-C", "/", "true"], capture_output=True, timeout=10, check=False
            )
        except (OSError, subprocess.SubprocessError):
            probe = None
        if probe is not None and probe.returncode == 0:
            return setsid_launcher(env, setsid)
    log.warn("setsid or env -C missing: tasks start through a Python trampoline")
    return python_launcher()


@attrs.frozen
class GroupUsage:
    """What /proc says about one process group: its live members and their summed RSS."""

    pids: tuple[int, ...]
    rss: int


def scan_groups(pgids: set[int], proc: Path = Path("/proc")) -> dict[int, GroupUsage]:
    """Live (non-zombie) members of each group in ``pgids`` and their resident memory.

    One pass over ``/proc/*/stat``.  Groups with no live member are absent.  Returns ``{}``
    where there is no ``/proc``.
    """
    found: dict[int, tuple[list[int], int]] = {}
    try:
        names = os.listdir(proc)
    except OSError:
        return {}
    for name in names:
        if not name.isdigit():
            continue
        try:
            with open(proc / name / "stat", "rb") as f:
                raw = f.read()
        except OSError:
            continue  # it ended while we looked
        # The command name may hold spaces and parentheses: fields start after the last ')'.
        fields = raw[raw.rfind(b")") + 2 :].split()
        try:
            state, pgrp, rss_pages = fields[0], int(fields[2]), int(fields[21])
        except (IndexError, ValueError):
            continue
        if pgrp in pgids and state not in (b"Z", b"X"):
            pids, rss = found.setdefault(pgrp, ([], 0))
            pids.append(int(name))
            found[pgrp] = (pids, rss + rss_pages * _PAGE_SIZE)
    return {g: GroupUsage(tuple(p), r) for g, (p, r) in found.items()}


def _high_water_mark(pid: int, proc: Path = Path("/proc")) -> int:
    """The peak RSS (VmHWM) of ``pid`` in bytes, 0 if unknown."""
    try:
        with open(proc / str(pid) / "status", "rb") as f:
            for line in f:
                if line.startswith(b"VmHWM:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0


class CappedLog:
    """A log file that keeps at most about ``cap`` bytes: the tail.

    Bytes are appended as they arrive (unbuffered, so a reader sees them at once).  When the
    file holds more than ``2 * cap`` bytes of output, it is rewritten to hold the last
    ``cap`` bytes after one line ``[dsml: N earlier bytes dropped]``, so rewriting costs
    O(1) per byte written and the file never exceeds ``2 * cap`` plus that line.  A write
    error (disk full) stops the capture and is logged once; the task itself goes on.
    """

    def __init__(self, path: Path, cap: int) -> None:
        self.path = path
        self.cap = cap
        self.kept = 0
        self.dropped = 0
        # Created on the first byte: most tasks of a big array print nothing, and
        # creating two files per attempt cost ~1 ms each on a busy disk.  (A reader
        # of a log that was never created sees an empty log.)
        self._fd: int | None = None
        self._closed = False

    def write(self, data: bytes) -> None:
        """Append ``data``; trim to the tail when the file has grown past twice the cap."""
        if self._closed:
            return
        try:
            if self._fd is None:
                # A bare descriptor: the cheapest way to create the file and append.
                self._fd = os.open(self.path, _LOG_FLAGS, 0o644)
            view = memoryview(data)
            while view:
                view = view[os.write(self._fd, view) :]
            self.kept += len(data)
            if self.kept > 2 * self.cap:
                self._trim()
        except OSError as e:
            log.error("log {path} no longer captured: {error}", path=str(self.path), error=e)
            self.close()

    def _trim(self) -> None:
        """Rewrite the file as a 'dropped' line plus its last ``cap`` bytes."""
        assert self._fd is not None
        os.close(self._fd)
        self._fd = None
        with open(self.path, "rb") as f:
            f.seek(-self.cap, os.SEEK_END)
            tail = f.read()
        self.dropped += self.kept - len(tail)
        tmp = self.path.with_name(self.path.name + ".tmp")
        with open(tmp, "wb") as f:
            f.write(self.dropped_line())
            f.write(tail)
        os.replace(tmp, self.path)
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC)
        self.kept = len(tail)

    def dropped_line(self) -> bytes:
        """The line the file begins with once trimmed (b"" while it never was)."""
        if not self.dropped:
            return b""
        return f"[dsml: {self.dropped} earlier bytes dropped]\n".encode()

    def close(self) -> None:
        """Stop capturing and close the file."""
        self._closed = True
        if self._fd is not None:
            fd, self._fd = self._fd, None
            try:
                os.close(fd)
            except OSError:
                pass


def tail_text(data: bytes, cut: bool = False) -> str:
    """The last :data:`STDERR_TAIL_LINES` lines of ``data``, within its last
    :data:`STDERR_TAIL_BYTES` bytes, as text: UTF-8 with errors replaced, and control
    characters but newline and tab replaced by U+FFFD.

    ``cut``: ``data`` is the end of something longer (so it may begin inside a character).
    """
    if len(data) > STDERR_TAIL_BYTES:
        data, cut = data[-STDERR_TAIL_BYTES:], True
    # A final line without a newline counts as a line; a final newline starts none.
    pos = len(data) - 1 if data.endswith(b"\n") else len(data)
    for _ in range(STDERR_TAIL_LINES):
        pos = data.rfind(b"\n", 0, pos)
        if pos < 0:
            break
    if pos >= 0:
        data = data[pos + 1 :]
    elif cut:
        # It begins inside a line, perhaps inside a character: not half a character.
        skip = 0
        while skip < 3 and skip < len(data) and 0x80 <= data[skip] < 0xC0:
            skip += 1
        data = data[skip:]
    return _TAIL_CONTROL.sub("\ufffd", data.decode("utf-8", "replace"))


def stderr_tail(log: CappedLog) -> str:
    """The tail of a finished attempt's stderr log for its result (:func:`tail_text`);
    "" if nothing was written (then no file is read) or it cannot be read."""
    if not log.kept:
        return ""
    # The "[dsml: N earlier bytes dropped]" line of a trimmed log is not the task's.
    first = len(log.dropped_line())
    try:
        with open(log.path, "rb") as f:
            start = max(first, os.fstat(f.fileno()).st_size - STDERR_TAIL_BYTES)
            f.seek(start)
            data = f.read(STDERR_TAIL_BYTES)
    except OSError:
        return ""
    return tail_text(data, cut=start > 0)


def _relative(rel: str, what: str) -> PurePosixPath:
    """``rel`` as a path that stays inside the attempt directory, or TaskError."""
    p = PurePosixPath(rel)
    if (
        not rel
        or "\0" in rel
        or p.is_absolute()
        or ".." in p.parts
        or p == PurePosixPath(".")
        or str(p) in (STDOUT_NAME, STDERR_NAME)
    ):
        raise TaskError(f"{what} path {rel!r} is not a plain relative path", "bad-task")
    return p


def _validate(spec: AttemptSpec, total_slots: int) -> None:
    """Refuse a spec that can never run (TaskError ``bad-task``)."""
    if not spec.command or not spec.command[0]:
        raise TaskError("empty command", "bad-task")
    if any("\0" in arg for arg in spec.command):
        raise TaskError("NUL byte in the command", "bad-task")
    if spec.slots < 1 or spec.slots > total_slots:
        raise TaskError(f"needs {spec.slots} slots; this worker has {total_slots}", "bad-task")
    if spec.timeout is not None and not spec.timeout > 0:
        raise TaskError(f"timeout must be positive, not {spec.timeout}", "bad-task")
    for name, value in spec.env:
        if not name or "=" in name or "\0" in name or "\0" in value:
            raise TaskError(f"bad environment variable {name!r}", "bad-task")
    seen: set[PurePosixPath] = set()
    for _, rel in spec.inputs:
        p = _relative(rel, "input")
        if p in seen:
            raise TaskError(f"two inputs go to {rel!r}", "bad-task")
        seen.add(p)
    for rel, _ in spec.outputs:
        _relative(rel, "output")


def _describe(failure: Failure) -> str:
    """One line for a failed transfer."""
    value = failure.value
    message = getattr(value, "message", None)
    if isinstance(message, str):
        return message
    return str(value) or type(value).__name__


@attrs.define(eq=False)
class _Attempt:
    """The manager's mutable record of one attempt."""

    spec: AttemptSpec
    dir: Path
    stop_reason: str = ""
    phase: str = "queued"  # queued, fetching, running, uploading
    pending: list[Deferred[Any]] = attrs.Factory(list)
    transport: IProcessTransport | None = None  # the spawnProcess path
    popen: subprocess.Popen[bytes] | None = None  # the Popen path, kept until waited for
    pipes: list[_PipeReader] = attrs.Factory(list)  # the Popen path: pipes still open
    pid: int | None = None
    reaped: bool = False
    started: float = 0.0
    duration: float = 0.0
    exit_code: int | None = None
    signal: int | None = None
    peak_rss: int = 0
    timers: dict[str, IDelayedCall] = attrs.Factory(dict)
    logs: tuple[CappedLog, CappedLog] | None = None
    ended: Deferred[None] = attrs.Factory(Deferred)
    done: Deferred[None] = attrs.Factory(Deferred)

    def result(self, reason: str) -> AttemptResult:
        """The result, with ``reason``; a failure's carries the tail of its stderr (read
        only then: a success reads no file)."""
        tail = stderr_tail(self.logs[1]) if reason and self.logs is not None else ""
        return AttemptResult(
            attempt_id=self.spec.attempt_id,
            exit_code=self.exit_code,
            signal=self.signal,
            duration=self.duration,
            peak_rss=self.peak_rss,
            reason=reason,
            stderr_tail=tail,
        )

    def cancel_timer(self, name: str) -> None:
        """Cancel the named timer if it is pending."""
        call = self.timers.pop(name, None)
        if call is not None and call.active():
            call.cancel()


class _TaskProcess(ProcessProtocol):
    """Moves a task's output into its log files and tells the manager when it ends."""

    def __init__(self, manager: TaskManager, attempt: _Attempt) -> None:
        self.manager = manager
        self.attempt = attempt

    def connectionMade(self) -> None:  # noqa: N802
        """The process started; it gets no stdin (it reads EOF at once)."""
        assert self.transport is not None
        # The pid is read here, not from spawnProcess's return: a command that exits at once
        # may be reaped (and the transport's pid cleared) before spawnProcess returns.
        self.attempt.pid = self.transport.pid
        self.attempt.transport = self.transport
        self.transport.closeStdin()

    def childDataReceived(self, childFD: int, data: bytes) -> None:  # noqa: N802, N803
        """Append output to the log of its stream."""
        logs = self.attempt.logs
        if logs is not None and childFD in (1, 2):
            logs[childFD - 1].write(data)

    def processExited(self, reason: Failure) -> None:  # noqa: N802
        """The leader was reaped (its pipes may still be open)."""
        value = reason.value
        self.manager._leader_exited(
            self.attempt, getattr(value, "exitCode", None), getattr(value, "signal", None)
        )

    def processEnded(self, reason: Failure) -> None:  # noqa: N802
        """Reaped and every pipe closed: all output is in."""
        self.manager._process_ended(self.attempt)


class _FdReader:
    """A descriptor of a task that the reactor watches for reading: the part of its
    life (fileno, close once, close when the reactor drops it) both kinds share."""

    kind = "fd"

    def __init__(self, manager: TaskManager, attempt: _Attempt, fd: int) -> None:
        self.manager = manager
        self.attempt = attempt
        self.fd = fd

    def fileno(self) -> int:
        """The descriptor (-1 once closed)."""
        return self.fd

    def logPrefix(self) -> str:  # noqa: N802 - Twisted's name
        """For Twisted's log."""
        return f"task-{self.attempt.spec.attempt_id}-{self.kind}"

    def connectionLost(self, reason: Any = None) -> None:  # noqa: N802 - Twisted's name
        """The reactor dropped us (EOF, error or its shutdown): close."""
        self.close()

    def close(self) -> None:
        """Stop watching and close the descriptor (once); then :meth:`closed`."""
        if self.fd < 0:
            return
        self.manager.reactor.removeReader(self)
        fd, self.fd = self.fd, -1
        try:
            os.close(fd)
        except OSError:
            pass
        self.closed()

    def closed(self) -> None:
        """Called once, after the descriptor is closed."""


class _PipeReader(_FdReader):
    """One output pipe of a Popen-started task, read by the reactor into its log."""

    kind = "pipe"

    def __init__(self, manager: TaskManager, attempt: _Attempt, fd: int, log: CappedLog) -> None:
        super().__init__(manager, attempt, fd)
        self.log = log
        os.set_blocking(fd, False)

    def doRead(self) -> Any:  # noqa: N802 - Twisted's name
        """Move what is there into the log; CONNECTION_DONE at end of file."""
        try:
            data = os.read(self.fd, READ_SIZE)
        except BlockingIOError:
            return None
        except OSError:
            return tx_error.ConnectionLost()
        if not data:
            return tx_error.ConnectionDone()
        self.log.write(data)
        return None

    def closed(self) -> None:
        """Tell the manager this pipe is done."""
        self.manager._pipe_closed(self.attempt, self)


class _ExitWatcher(_FdReader):
    """A pidfd of a Popen-started task: readable once the process has exited."""

    kind = "exit"

    def __init__(self, manager: TaskManager, attempt: _Attempt, pidfd: int) -> None:
        super().__init__(manager, attempt, pidfd)
        assert attempt.popen is not None
        self.pid = attempt.popen.pid

    def doRead(self) -> None:  # noqa: N802 - Twisted's name
        """The process has exited: reap it (at once) and hand its status to the manager."""
        popen = self.attempt.popen
        assert popen is not None
        code = popen.wait()
        self.close()
        self.attempt.popen = None
        if code < 0:
            self.manager._leader_exited(self.attempt, None, -code)
        else:
            self.manager._leader_exited(self.attempt, code, None)
        self.manager._maybe_ended(self.attempt)


class AttemptLedger:
    """Which attempts hold slots, which results await the master's acknowledgement, and
    where an attempt's logs are: shared by :class:`TaskManager` and the simulation's
    fake runner, so both answer the worker's glue the same way.

    Subclasses set ``slots``, ``work_dir``, ``_active`` (attempt id -> an object with a
    ``spec``), ``_results`` (attempt id -> AttemptResult) and ``_kept`` (ids of finished
    attempt directories still on disk).
    """

    slots: int
    work_dir: Path
    _active: dict[int, Any]
    _results: dict[int, AttemptResult]
    _kept: Any

    def free_slots(self) -> int:
        """Slots not held by an attempt."""
        return self.slots - sum(a.spec.slots for a in self._active.values())

    def running(self) -> list[int]:
        """Ids of the attempts holding slots (staging, running or uploading)."""
        return list(self._active)

    def logs(self, attempt_id: int) -> tuple[Path, Path]:
        """Paths of the stdout and stderr logs of a running or kept attempt."""
        active = self._active.get(attempt_id)
        if active is None and attempt_id not in self._kept:
            raise TaskError(f"no attempt {attempt_id} on this worker", "not-found")
        # A running attempt works in its own directory (TaskManager: run/<n>); a
        # finished one's is work_dir/<id> (or absent: then its logs read as empty).
        d = getattr(active, "dir", None) or self.work_dir / str(attempt_id)
        return d / STDOUT_NAME, d / STDERR_NAME

    def finished_results(self) -> list[AttemptResult]:
        """Results not yet acknowledged by the master, oldest first (re-sent on reconnect)."""
        return list(self._results.values())

    def ack(self, attempt_id: int) -> None:
        """The master has committed this result: forget it (its directory stays a while)."""
        self._results.pop(attempt_id, None)


class TaskManager(AttemptLedger):
    """Runs attempts on this worker within ``slots`` slots, and reports how each ended.

    :param reactor: provides ``IReactorProcess`` and ``IReactorTime``.
    :param slots: how many slots this worker offers; an attempt holds ``spec.slots`` of them
        from :meth:`start` until its result is reported.
    :param work_dir: where attempt directories are made (created if missing).  Directories
        found there at start-up count as finished attempts for the cleanup.
    :param transfers: fetches inputs and stores outputs.
    :param on_change: called after every change in the number of free slots.
    :param on_result: called once per started attempt with its result.  The result also stays
        in :meth:`finished_results` until :meth:`ack`.
    :param grace: seconds between SIGTERM and SIGKILL.
    :param log_cap: bytes kept per stream and attempt (the tail).
    :param keep_finished: finished attempt directories kept (with their logs); older ones are
        removed (their inputs and outputs too: on a small disk, keep fewer).
    :param launcher: how a command is started in its own session (the default is
        :func:`default_launcher`): :func:`popen_launcher` for ``subprocess.Popen`` watched
        through a pidfd (the reactor must then provide ``IReactorFDSet``), anything else
        builds the argv given to ``reactor.spawnProcess``.
    :param sample_interval: seconds between two memory samples of running groups.
    """

    def __init__(
        self,
        reactor: TaskReactor,
        *,
        slots: int,
        work_dir: Path,
        transfers: Transfers,
        on_result: Callable[[AttemptResult], None],
        on_change: Callable[[], None] = lambda: None,
        grace: float = 5.0,
        log_cap: int = LOG_CAP,
        keep_finished: int = 1000,
        launcher: Launcher | None = None,
        sample_interval: float = SAMPLE_INTERVAL,
    ) -> None:
        if slots < 1:
            raise ValueError(f"slots must be at least 1, not {slots}")
        if log_cap < 1 or keep_finished < 0 or grace < 0 or sample_interval <= 0:
            raise ValueError("log_cap >= 1, keep_finished >= 0, grace >= 0, sample_interval > 0")
        self.reactor = reactor
        self.slots = slots
        self.work_dir = Path(work_dir)
        self.transfers = transfers
        self.on_result = on_result
        self.on_change = on_change
        self.grace = grace
        self.log_cap = log_cap
        self.keep_finished = keep_finished
        self.launcher = launcher if launcher is not None else default_launcher()
        if self.launcher is popen_launcher and not hasattr(reactor, "addReader"):
            self.launcher = spawn_launcher()  # no IReactorFDSet: spawn through Twisted
        self.sample_interval = sample_interval
        self._active: dict[int, _Attempt] = {}
        self._results: dict[int, AttemptResult] = {}
        # Finished attempts whose logs can still be read, oldest first: True if their
        # directory is on disk (work_dir/<id>), False if they left nothing behind.
        self._kept: dict[int, bool] = {}
        # Empty working directories (work_dir/run/<n>) left by attempts that wrote
        # nothing, for the next attempt: no mkdir and no rmtree per task.
        self._run_root = self.work_dir / RUN_DIR
        self._free_dirs: list[Path] = []
        self._next_dir = 0
        self._stopping = False
        # (PATH, name) -> (where the command is, until when that is believed): see
        # _executable.  The variables every task gets from the worker, read once.
        self._found: dict[tuple[str, str], tuple[str, float]] = {}
        self._base_env = {name: os.environ[name] for name in BASE_ENV_NAMES if name in os.environ}
        self._base_env.setdefault("PATH", os.defpath)
        self._sampler = LoopingCall(self._sample)
        self._sampler.clock = reactor  # type: ignore[assignment]
        self.work_dir.mkdir(parents=True, exist_ok=True)
        self._kill_orphans()
        # Working directories of attempts an earlier run did not finish: their results
        # are unknown to the master anyway (it counts them lost).
        shutil.rmtree(self._run_root, ignore_errors=True)
        self._adopt_old_dirs()

    # --- what the worker's link asks -------------------------------------------------

    def process_group(self, attempt_id: int) -> int | None:
        """The process group id (= leader pid) of a spawned, not yet reaped attempt."""
        att = self._active.get(attempt_id)
        if att is None or att.reaped:
            return None
        return att.pid

    def start(self, spec: AttemptSpec) -> None:
        """Reserve the slots and launch the attempt; its result comes through ``on_result``.

        Raises :class:`TaskError` (``busy``, ``bad-task``, ``duplicate``, ``stopping``) and
        then nothing has changed.  The work itself starts on the next reactor turn, so
        ``on_result`` is never called from inside ``start``.
        """
        if self._stopping:
            raise TaskError("the worker is stopping", "stopping")
        if spec.attempt_id in self._active or spec.attempt_id in self._results:
            raise TaskError(f"attempt {spec.attempt_id} already ran here", "duplicate")
        _validate(spec, self.slots)
        free = self.free_slots()
        if spec.slots > free:
            raise TaskError(f"busy: {spec.slots} slots wanted, {free} free", "busy")
        att = _Attempt(spec=spec, dir=self._run_root)  # its own directory: _make_dir
        self._active[spec.attempt_id] = att
        if TRACE:
            log.debug(
                "attempt {attempt} of job {job} task {index} accepted",
                attempt=spec.attempt_id,
                job=spec.job_id,
                index=spec.task_index,
            )
        self._notify_change()
        self.reactor.callLater(0, self._launch, att)

    def cancel(self, attempt_id: int, reason: str = "cancelled") -> None:
        """Stop an attempt: cancel its transfers, or TERM its group (KILL after ``grace``).

        Its result comes through ``on_result`` with ``reason``.  Unknown or finished attempts
        are ignored (the master may cancel what just ended).
        """
        att = self._active.get(attempt_id)
        if att is not None:
            self._terminate(att, reason)

    def stop(self) -> Deferred[None]:
        """Refuse new attempts, stop every running one, fire once all have ended.

        Each group gets SIGTERM, then SIGKILL after ``grace``; the Deferred fires once every
        leader has been reaped and every result reported (reason ``"worker stopping"``).
        """
        self._stopping = True
        waiting = [att.done for att in self._active.values()]
        for att in list(self._active.values()):
            self._terminate(att, "worker stopping")
        if not waiting:
            return succeed(None)
        d: Deferred[Any] = DeferredList(waiting)
        return d.addCallback(lambda _: None)

    # --- one attempt, step by step ---------------------------------------------------

    def _launch(self, att: _Attempt) -> None:
        """Run the attempt's steps as a coroutine; any bug still ends it with a result."""
        d = Deferred.fromCoroutine(self._steps(att))
        d.addErrback(self._bug, att)
        d.addCallback(lambda reason: self._finish(att, reason))
        d.addErrback(lambda f: log.failure("finishing attempt failed", f))

    def _bug(self, failure: Failure, att: _Attempt) -> str:
        """An unexpected exception: log it, end the attempt with an internal error."""
        log.failure(
            "attempt {attempt} failed inside the worker", failure, attempt=att.spec.attempt_id
        )
        if att.pid is not None and not att.reaped:
            # Never leave a process running that nobody will report on.
            try:
                os.killpg(att.pid, signal_module.SIGKILL)
            except OSError:
                pass
        return f"worker error: {_describe(failure)}"

    async def _steps(self, att: _Attempt) -> str:
        """Stage, run, upload; return the reason ("" for success)."""
        if att.stop_reason:
            return att.stop_reason
        try:
            self._make_dir(att)
        except OSError as e:
            return f"workspace: {e.strerror or e}"
        reason = await self._fetch_inputs(att)
        if att.stop_reason:
            return att.stop_reason
        if reason:
            return reason
        reason = self._spawn(att)
        if reason:
            return reason
        await att.ended
        if att.stop_reason:
            return att.stop_reason
        if att.signal is not None:
            return f"killed by signal {att.signal}"
        if att.exit_code != 0:
            return f"exit {att.exit_code}"
        reason = await self._store_outputs(att)
        return att.stop_reason or reason

    def _make_dir(self, att: _Attempt) -> None:
        """An empty working directory for the attempt and its two logs.

        An empty one left by an earlier attempt if there is one, else a new
        ``run/<n>`` (a name never used twice).  At the end (:meth:`_keep_dir`) it becomes
        ``work_dir/<attempt id>`` if the attempt left anything in it, else it is reused.
        Measured: a mkdir plus a later rmtree cost ~0.4 ms of the worker's time per task
        on ext4, about an eighth of all the CPU a one-shot task costs.
        """
        if att.spec.attempt_id in self._kept:  # the same id again, after a master reset
            if self._kept.pop(att.spec.attempt_id):
                shutil.rmtree(self.work_dir / str(att.spec.attempt_id), ignore_errors=True)
        while self._free_dirs:
            path = self._free_dirs.pop()
            try:  # still empty (nothing may have written there since)?
                empty = not os.listdir(path)
            except OSError:
                empty = False
            if empty:
                att.dir = path
                break
            shutil.rmtree(path, ignore_errors=True)
        else:
            path = self._run_root / str(self._next_dir)
            self._next_dir += 1
            try:  # one mkdir in the usual case: no stat first
                os.mkdir(path)
            except FileExistsError:
                shutil.rmtree(path)
                os.mkdir(path)
            except FileNotFoundError:  # the run dir (or the work dir) is not there yet
                os.makedirs(path)
            att.dir = path
        att.logs = (
            CappedLog(att.dir / STDOUT_NAME, self.log_cap),
            CappedLog(att.dir / STDERR_NAME, self.log_cap),
        )

    async def _fetch_inputs(self, att: _Attempt) -> str:
        """Fetch every input at once; the first failure in spec order, or ""."""
        if not att.spec.inputs:
            return ""
        att.phase = "fetching"
        fetches = []
        for key, rel in att.spec.inputs:
            dest = att.dir / _relative(rel, "input")
            try:
                dest.parent.mkdir(parents=True, exist_ok=True)
            except OSError as e:  # e.g. inputs "a" and "a/b"
                for d in fetches:
                    d.cancel()
                    d.addErrback(lambda _: None)
                return f"input {key!r} cannot go to {rel!r}: {e.strerror or e}"
            fetches.append(maybeDeferred(self.transfers.fetch, key, dest))
        att.pending = fetches
        results = await DeferredList(fetches, consumeErrors=True)
        att.pending = []
        for (key, _), (ok, value) in zip(att.spec.inputs, results, strict=True):
            if ok:
                continue
            if getattr(value.value, "code", None) == NotFound.code:
                return f"input {key!r} not found"
            if value.check(CancelledError):
                return att.stop_reason or "cancelled"
            return f"input {key!r} failed: {_describe(value)}"
        return ""

    def _environment(self, spec: AttemptSpec) -> dict[str, str]:
        """Base variables from the worker, then the spec's, then the DSML_* ones."""
        env = self._base_env.copy()
        env.update(spec.env)
        env["DSML_TASK_INDEX"] = str(spec.task_index)
        env["DSML_JOB_ID"] = spec.job_id
        env["DSML_ATTEMPT_ID"] = str(spec.attempt_id)
        # Marks the process as this worker's, so a restarted worker can find and kill
        # what an earlier run of it (killed with -9) left behind: see _kill_orphans.
        env[ORPHAN_MARK] = str(self.work_dir)
        return env

    def _spawn(self, att: _Attempt) -> str:
        """Start the command as the leader of a new session; a reason if it cannot start."""
        env = self._environment(att.spec)
        if self.launcher is popen_launcher:
            reason = self._spawn_popen(att, env)
        else:
            reason = self._spawn_twisted(att, env)
        if reason:
            return reason
        if TRACE:
            log.debug(
                "attempt {attempt} running as process group {pid}",
                attempt=att.spec.attempt_id,
                pid=att.pid,
            )
        if att.reaped:  # it has already come and gone
            return ""
        if att.spec.timeout is not None:
            att.timers["timeout"] = self.reactor.callLater(
                att.spec.timeout, self._terminate, att, f"{TIMEOUT_PREFIX}{att.spec.timeout:g} s"
            )
        if not self._sampler.running:
            self._sampler.start(self.sample_interval, now=False).addErrback(
                lambda f: log.failure("memory sampler stopped", f)
            )
        return ""

    def _spawn_popen(self, att: _Attempt, env: dict[str, str]) -> str:
        """``subprocess.Popen`` in a new session; the reactor watches its pipes and pidfd.

        A command that cannot be executed makes Popen raise (the child reports the exec
        error before Popen returns), so no ``which`` is needed beforehand.
        """
        spec = att.spec
        assert att.logs is not None
        out_r, out_w = os.pipe()  # both close-on-exec; Popen dup2s the write ends to 1, 2
        err_r, err_w = os.pipe()
        att.phase = "running"
        att.started = time.monotonic()
        try:
            executable = self._executable(spec.command[0], env["PATH"])
            try:
                popen = self._popen(spec.command, executable, att.dir, env, out_w, err_w)
            except (FileNotFoundError, PermissionError):
                if executable is None:
                    raise
                # Remembered, but gone (or changed) since: look along PATH again.
                self._found.pop((env["PATH"], spec.command[0]), None)
                executable = self._executable(spec.command[0], env["PATH"])
                popen = self._popen(spec.command, executable, att.dir, env, out_w, err_w)
        except OSError as e:
            for fd in (out_r, err_r):
                os.close(fd)
            if isinstance(e, FileNotFoundError | PermissionError | NotADirectoryError):
                return f"command not found: {spec.command[0]}"
            return f"spawn failed: {e.strerror or e}"
        finally:
            os.close(out_w)
            os.close(err_w)
        att.popen = popen
        att.pid = popen.pid
        try:
            pidfd = os.pidfd_open(popen.pid)
        except OSError as e:  # e.g. out of descriptors: do not leave it running unwatched
            os.killpg(popen.pid, signal_module.SIGKILL)
            popen.wait()
            att.popen = None
            att.pid = None
            for fd in (out_r, err_r):
                os.close(fd)
            return f"spawn failed: {e.strerror or e}"
        att.pipes = [
            _PipeReader(self, att, out_r, att.logs[0]),
            _PipeReader(self, att, err_r, att.logs[1]),
        ]
        for reader in att.pipes:
            self.reactor.addReader(reader)
        self.reactor.addReader(_ExitWatcher(self, att, pidfd))
        return ""

    @staticmethod
    def _popen(
        command: Sequence[str],
        executable: str | None,
        cwd: Path,
        env: dict[str, str],
        out_w: int,
        err_w: int,
    ) -> subprocess.Popen[bytes]:
        return subprocess.Popen(
            command,
            executable=executable,
            cwd=cwd,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=out_w,
            stderr=err_w,
            start_new_session=True,
            close_fds=True,
        )

    def _executable(self, name: str, path: str) -> str | None:
        """Where ``name`` is along ``path``, remembered for :data:`WHICH_TTL` seconds (as
        a shell's ``hash`` does, but short-lived); ``None`` lets Popen search itself.

        Measured: with a PATH of eleven directories, Popen's own search (a path joined
        and encoded per directory, then an exec tried in each) was about a tenth of a
        worker's CPU under cProfile on an array of one-shot tasks; remembering it took
        the worker's CPU per attempt from 592 to 512 us (benchmarks/launchers.py,
        medians of three runs each).  Remembered only for a second, a program
        installed earlier in PATH is used from the next second on; one that vanished
        is looked for again at once.
        """
        if "/" in name:
            return None  # relative to the task's directory, or absolute: Popen's affair
        key = (path, name)
        now = self.reactor.seconds()
        hit = self._found.get(key)
        if hit is not None and hit[1] > now:
            return hit[0] or None
        # A relative entry names a directory under the task's working directory, which
        # the worker cannot search from here: then Popen searches, in the child.
        relative = not all(os.path.isabs(d) for d in path.split(os.pathsep))
        found = None if relative else shutil.which(name, path=path)
        if len(self._found) >= 1024:  # many distinct PATHs or names: start afresh
            self._found.clear()
        if found is not None or relative:
            self._found[key] = (found or "", now + WHICH_TTL)  # "": let Popen search
        else:
            # Not found: not remembered, so that a program installed now is found at
            # once.  Popen then raises FileNotFoundError ("command not found").
            self._found.pop(key, None)
        return found

    def _spawn_twisted(self, att: _Attempt, env: dict[str, str]) -> str:
        """``reactor.spawnProcess`` of the launcher's argv (``env -C dir -- setsid -- ...``)."""
        spec = att.spec
        program = spec.command[0]
        if "/" in program:
            path = att.dir / program
            found = path.is_file() and os.access(path, os.X_OK)
        else:
            found = shutil.which(program, path=env.get("PATH")) is not None
        if not found:
            return f"command not found: {program}"
        executable, argv = self.launcher(att.dir, spec.command)
        att.phase = "running"
        att.started = time.monotonic()
        try:
            self.reactor.spawnProcess(
                _TaskProcess(self, att),
                executable,
                argv,
                env=env,
                path=None,  # env -C sets it: Twisted forks the worker when path is given
                usePTY=False,
                childFDs={0: "w", 1: "r", 2: "r"},
            )
        except OSError as e:
            return f"spawn failed: {e.strerror or e}"
        return ""

    async def _store_outputs(self, att: _Attempt) -> str:
        """Upload every declared output at once; the first problem in spec order, or ""."""
        if not att.spec.outputs:
            return ""
        att.phase = "uploading"
        root = os.path.realpath(att.dir)
        for rel, _ in att.spec.outputs:
            path = att.dir / _relative(rel, "output")
            real = os.path.realpath(path)
            # A symlink out of the directory counts as missing: never upload other files.
            if not path.is_file() or os.path.commonpath([root, real]) != root:
                return f"output {rel!r} missing"
        uploads = [
            maybeDeferred(self.transfers.store, att.dir / rel, key) for rel, key in att.spec.outputs
        ]
        att.pending = uploads
        results = await DeferredList(uploads, consumeErrors=True)
        att.pending = []
        for (rel, _), (ok, value) in zip(att.spec.outputs, results, strict=True):
            if not ok:
                if value.check(CancelledError):
                    return att.stop_reason or "cancelled"
                return f"output {rel!r} upload failed: {_describe(value)}"
        return ""

    def _finish(self, att: _Attempt, reason: str) -> None:
        """Report the result, free the slots, clean up old attempt directories."""
        for name in list(att.timers):
            att.cancel_timer(name)
        if att.logs is not None:
            att.logs[0].close()
            att.logs[1].close()
        result = att.result(reason)
        del self._active[att.spec.attempt_id]
        self._results[att.spec.attempt_id] = result
        while len(self._results) > MAX_UNACKED:
            dropped = next(iter(self._results))
            log.warn("result of attempt {attempt} never acknowledged: dropped", attempt=dropped)
            del self._results[dropped]
        self._kept[att.spec.attempt_id] = self._keep_dir(att)
        self._cleanup()
        if reason or TRACE:
            (log.info if reason else log.debug)(
                "attempt {attempt} ended: {reason}",
                attempt=att.spec.attempt_id,
                reason=reason or "ok",
            )
        # Free slots first, then the result: a result handler that starts the next attempt at
        # once then sees (and reports) the slots in the order they changed.
        self._notify_change()
        try:
            self.on_result(result)
        except Exception:
            log.failure("on_result failed for attempt {attempt}", attempt=att.spec.attempt_id)
        att.done.callback(None)

    # --- stopping processes ----------------------------------------------------------

    def _terminate(self, att: _Attempt, reason: str) -> None:
        """Stop an attempt for ``reason`` (the first reason given wins)."""
        if att.stop_reason:
            return
        att.stop_reason = reason
        log.info("stopping attempt {attempt}: {reason}", attempt=att.spec.attempt_id, reason=reason)
        for d in list(att.pending):
            d.cancel()
        if att.pid is not None and not att.reaped:
            self._terminate_process(att)

    def _terminate_process(self, att: _Attempt) -> None:
        """SIGTERM to the group now, SIGKILL after the grace period."""
        att.cancel_timer("timeout")
        self._signal_group(att, signal_module.SIGTERM)
        if "kill" not in att.timers:
            att.timers["kill"] = self.reactor.callLater(
                self.grace, self._signal_group, att, signal_module.SIGKILL
            )

    def _signal_group(self, att: _Attempt, sig: int) -> None:
        """Send ``sig`` to the attempt's group while its leader is not reaped.

        Right after the spawn the leader may not have called ``setsid()`` yet: then there is
        no such group (ESRCH), it has no children either, and the signal goes to the leader.
        """
        if att.pid is None or att.reaped:
            return
        try:
            os.killpg(att.pid, sig)
        except ProcessLookupError:
            try:
                os.kill(att.pid, sig)
            except ProcessLookupError:
                pass
        except PermissionError as e:
            log.error("cannot signal group {pid}: {error}", pid=att.pid, error=e)

    def _leader_exited(self, att: _Attempt, exit_code: int | None, signal: int | None) -> None:
        """The leader was reaped: record how, kill what is left of its group."""
        att.duration = time.monotonic() - att.started
        att.exit_code = exit_code
        att.signal = signal
        att.cancel_timer("timeout")
        att.cancel_timer("kill")
        assert att.pid is not None
        try:
            # Until the last member is gone the group id cannot be reused as a pid, so
            # this reaches only leftovers of this attempt (or nothing: ESRCH).
            os.killpg(att.pid, signal_module.SIGKILL)
        except ProcessLookupError:
            pass
        except PermissionError as e:
            log.error("cannot kill group {pid}: {error}", pid=att.pid, error=e)
        att.reaped = True
        if att.transport is not None:
            att.timers["drain"] = self.reactor.callLater(
                DRAIN_TIMEOUT, att.transport.loseConnection
            )
        elif att.pipes:
            att.timers["drain"] = self.reactor.callLater(DRAIN_TIMEOUT, self._close_pipes, att)
        if not any(a.pid is not None and not a.reaped for a in self._active.values()):
            if self._sampler.running:
                self._sampler.stop()

    def _close_pipes(self, att: _Attempt) -> None:
        """The drain timeout: stop waiting for pipes a process outside the group holds."""
        att.timers.pop("drain", None)
        for reader in list(att.pipes):
            reader.close()

    def _pipe_closed(self, att: _Attempt, reader: _PipeReader) -> None:
        """One pipe of a Popen-started attempt is closed."""
        if reader in att.pipes:
            att.pipes.remove(reader)
        self._maybe_ended(att)

    def _maybe_ended(self, att: _Attempt) -> None:
        """A Popen-started attempt has ended once reaped with both pipes closed."""
        if att.reaped and not att.pipes and not att.ended.called:
            self._process_ended(att)

    def _process_ended(self, att: _Attempt) -> None:
        """All output is in: the attempt may move on to its outputs."""
        att.cancel_timer("drain")
        if att.logs is not None:
            att.logs[0].close()
            att.logs[1].close()
        att.ended.callback(None)

    # --- bookkeeping -----------------------------------------------------------------

    def _sample(self) -> None:
        """Record each running group's memory; never raises (the LoopingCall would stop)."""
        try:
            live = {a.pid: a for a in self._active.values() if a.pid is not None and not a.reaped}
            if not live:
                self._sampler.stop()
                return
            usage = scan_groups(set(live))
            for pgid, att in live.items():
                group = usage.get(pgid)
                seen = max(group.rss if group else 0, _high_water_mark(pgid))
                att.peak_rss = max(att.peak_rss, seen)
        except Exception:
            log.failure("sampling task memory failed")

    def _notify_change(self) -> None:
        """Call on_change, logging (not raising) its errors."""
        try:
            self.on_change()
        except Exception:
            log.failure("on_change failed")

    def _kill_orphans(self, proc: Path = Path("/proc")) -> int:
        """Kill the process groups of tasks an earlier run of this worker left running.

        A worker killed with -9 cannot stop its tasks; they keep running (the master has
        already given them to another worker).  Every task carries ``DSML_WORKER_DIR``
        naming this work dir in its environment, so the next start finds them and
        SIGKILLs their groups before taking any new work.  Returns the groups killed.
        """
        mark = f"{ORPHAN_MARK}={self.work_dir}".encode()
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

    def _keep_dir(self, att: _Attempt) -> bool:
        """Keep a finished attempt's directory as ``work_dir/<id>`` if it holds anything
        (logs, inputs, outputs, files the task made); else keep it empty for the next
        attempt.  Whether anything is kept on disk."""
        path = att.dir
        if path == self._run_root:  # it never got a directory
            return False
        try:
            if not att.spec.inputs and not os.listdir(path):
                # (Not after inputs: a cancelled fetch might still land a file in it.)
                self._free_dirs.append(path)
                return False
            kept = self.work_dir / str(att.spec.attempt_id)
            try:
                os.rename(path, kept)
            except OSError:  # kept exists (an id seen again): replace it
                shutil.rmtree(kept, ignore_errors=True)
                os.rename(path, kept)
            att.dir = kept
            return True
        except OSError as e:
            log.warn("attempt {attempt}: directory not kept: {e}", attempt=att.spec.attempt_id, e=e)
            shutil.rmtree(path, ignore_errors=True)
            return False

    def _adopt_old_dirs(self) -> None:
        """Count attempt directories left by an earlier run as finished, oldest first."""
        old = []
        for entry in self.work_dir.iterdir():
            if entry.name.lstrip("-").isdigit() and entry.is_dir():
                old.append((entry.stat().st_mtime, int(entry.name)))
        for _, attempt_id in sorted(old):
            self._kept[attempt_id] = True
        self._cleanup()

    def _cleanup(self) -> None:
        """Remove the oldest finished attempt directories beyond ``keep_finished``."""
        while len(self._kept) > self.keep_finished:
            attempt_id = next(iter(self._kept))
            if self._kept.pop(attempt_id):
                shutil.rmtree(self.work_dir / str(attempt_id), ignore_errors=True)
