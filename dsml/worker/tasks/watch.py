"""Watching a running task: its output pipes, its exit, its memory.

The watchers know nothing of the manager: each is given what to call on data, on end of
file and on exit (:data:`OnData`, :data:`OnClosed`, :data:`OnExit`, :data:`OnStart`).

- A Popen-started task (:func:`~dsml.worker.tasks.launch.start_popen`) is watched by the
  reactor like any socket: a :class:`PipeReader` per output pipe and an
  :class:`ExitWatcher` on its pidfd, which reaps it as soon as it has exited.
- A task spawned through Twisted is watched by its :class:`TaskProcess`.
- :class:`MemorySampler` reads the resident memory of the live groups from ``/proc`` every
  :data:`SAMPLE_INTERVAL` seconds while any is live (:func:`scan_groups`).
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

import attrs
from twisted.internet import error as tx_error
from twisted.internet.interfaces import IProcessTransport
from twisted.internet.protocol import ProcessProtocol
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure

log = Logger()

#: Seconds between two samples of a running group's memory.
SAMPLE_INTERVAL = 0.5

#: Bytes read from a task's output pipe at a time.
READ_SIZE = 64 * 1024

_PAGE_SIZE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096

#: Called with each chunk a task writes to one of its streams (a log's ``write``).
OnData = Callable[[bytes], None]
#: Called once when a reader's descriptor is closed (end of file, error, or closed by its
#: owner), with the reader.
OnClosed = Callable[["FdReader"], None]
#: Called once when the leader has been reaped, with ``(exit_code, signal)``: the exit
#: status, or the signal that killed it (the other one is ``None``; both: unknown).
OnExit = Callable[[int | None, int | None], None]
#: Called when a process spawned through Twisted has started, with its transport.
OnStart = Callable[[IProcessTransport], None]


class _Readers(Protocol):
    """What the readers need of a reactor (``IReactorFDSet``)."""

    def addReader(self, reader: Any) -> None:  # noqa: N802 - Twisted's name
        """Watch ``reader.fileno()`` for reading."""
        ...

    def removeReader(self, reader: Any) -> None:  # noqa: N802 - Twisted's name
        """Stop watching ``reader``."""
        ...


class FdReader:
    """A descriptor of a task that the reactor watches for reading: the part of its life
    (fileno, close once, close when the reactor drops it) both kinds share."""

    kind = "fd"

    def __init__(self, reactor: _Readers, attempt_id: int, fd: int, on_closed: OnClosed) -> None:
        self.reactor = reactor
        self.attempt_id = attempt_id
        self.fd = fd
        self.on_closed = on_closed

    def fileno(self) -> int:
        """The descriptor (-1 once closed)."""
        return self.fd

    def logPrefix(self) -> str:  # noqa: N802 - Twisted's name
        """For Twisted's log."""
        return f"task-{self.attempt_id}-{self.kind}"

    def connectionLost(self, reason: Any = None) -> None:  # noqa: N802 - Twisted's name
        """The reactor dropped us (EOF, error or its shutdown): close."""
        self.close()

    def close(self) -> None:
        """Stop watching and close the descriptor (once); then ``on_closed(self)``."""
        if self.fd < 0:
            return
        self.reactor.removeReader(self)
        fd, self.fd = self.fd, -1
        try:
            os.close(fd)
        except OSError:
            pass
        self.on_closed(self)


class PipeReader(FdReader):
    """One output pipe of a Popen-started task, read by the reactor into ``on_data``."""

    kind = "pipe"

    def __init__(
        self, reactor: _Readers, attempt_id: int, fd: int, on_data: OnData, on_closed: OnClosed
    ) -> None:
        super().__init__(reactor, attempt_id, fd, on_closed)
        self.on_data = on_data
        os.set_blocking(fd, False)

    def doRead(self) -> Any:  # noqa: N802 - Twisted's name
        """Hand on what is there; CONNECTION_DONE at end of file."""
        try:
            data = os.read(self.fd, READ_SIZE)
        except BlockingIOError:
            return None
        except OSError:
            return tx_error.ConnectionLost()
        if not data:
            return tx_error.ConnectionDone()
        self.on_data(data)
        return None


def _ignore(reader: FdReader) -> None:
    """The exit watcher's ``on_closed``: its news is ``on_exit``."""


class ExitWatcher(FdReader):
    """A pidfd of a Popen-started task: readable once the process has exited."""

    kind = "exit"

    def __init__(
        self,
        reactor: _Readers,
        attempt_id: int,
        popen: subprocess.Popen[bytes],
        pidfd: int,
        on_exit: OnExit,
    ) -> None:
        super().__init__(reactor, attempt_id, pidfd, _ignore)
        self.popen = popen
        self.pid = popen.pid
        self.on_exit = on_exit

    def doRead(self) -> None:  # noqa: N802 - Twisted's name
        """The process has exited: reap it (at once), hand on its status, stop watching.

        The descriptor is closed after ``on_exit``: for an interpreter a zygote forked
        (:mod:`.zygote`), it is the status socket whose closing lets the zygote reap it,
        so its pid (its group's id) stays its own while ``on_exit`` kills the group's
        leftovers.  Its status may be unknown (None: the zygote died): ``(None, None)``."""
        code = self.popen.wait()
        try:
            if code is None:
                self.on_exit(None, None)
            elif code < 0:
                self.on_exit(None, -code)
            else:
                self.on_exit(code, None)
        finally:
            self.close()


class TaskProcess(ProcessProtocol):
    """A task spawned through Twisted: hands its output on and says when it ends.

    :param outputs: where stdout's and stderr's data go, in that order.
    :param on_start: the process has started (its transport knows its pid).
    :param on_exit: the leader was reaped (its pipes may still be open).
    :param on_ended: reaped and every pipe closed: all output is in.
    """

    def __init__(
        self,
        outputs: Sequence[OnData],
        on_start: OnStart,
        on_exit: OnExit,
        on_ended: Callable[[], None],
    ) -> None:
        self.outputs = outputs
        self.on_start = on_start
        self.on_exit = on_exit
        self.on_ended = on_ended

    def connectionMade(self) -> None:  # noqa: N802
        """The process started; it gets no stdin (it reads EOF at once)."""
        assert self.transport is not None
        # The pid is read here, not from spawnProcess's return: a command that exits at once
        # may be reaped (and the transport's pid cleared) before spawnProcess returns.
        self.on_start(self.transport)
        self.transport.closeStdin()

    def childDataReceived(self, childFD: int, data: bytes) -> None:  # noqa: N802, N803
        """Hand output on to its stream's ``on_data``."""
        if childFD in (1, 2):
            self.outputs[childFD - 1](data)

    def processExited(self, reason: Failure) -> None:  # noqa: N802
        """The leader was reaped (its pipes may still be open)."""
        value = reason.value
        self.on_exit(getattr(value, "exitCode", None), getattr(value, "signal", None))

    def processEnded(self, reason: Failure) -> None:  # noqa: N802
        """Reaped and every pipe closed: all output is in."""
        self.on_ended()


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


def high_water_mark(pid: int, proc: Path = Path("/proc")) -> int:
    """The peak RSS (VmHWM) of ``pid`` in bytes, 0 if unknown."""
    try:
        with open(proc / str(pid) / "status", "rb") as f:
            for line in f:
                if line.startswith(b"VmHWM:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0


class Sampled(Protocol):
    """What the sampler raises: the largest resident memory seen for one group."""

    peak_rss: int


class MemorySampler:
    """Every ``interval`` seconds while any group is live, raise each live group's
    ``peak_rss`` to the larger of its summed RSS and its leader's peak (VmHWM).

    :param clock: ``IReactorTime``.
    :param live: the live groups now, by group id (a leader spawned and not reaped).
    """

    def __init__(
        self, clock: Any, interval: float, live: Callable[[], Mapping[int, Sampled]]
    ) -> None:
        self.interval = interval
        self._live = live
        self._loop = LoopingCall(self._sample)
        self._loop.clock = clock

    @property
    def running(self) -> bool:
        """Whether it samples now."""
        return self._loop.running

    def start(self) -> None:
        """Sample from ``interval`` seconds on, unless it already does."""
        if not self._loop.running:
            self._loop.start(self.interval, now=False).addErrback(
                lambda f: log.failure("memory sampler stopped", f)
            )

    def stop_if_idle(self) -> None:
        """Stop sampling if no group is live."""
        if self._loop.running and not self._live():
            self._loop.stop()

    def _sample(self) -> None:
        """Record each live group's memory; never raises (the LoopingCall would stop)."""
        try:
            live = self._live()
            if not live:
                self._loop.stop()
                return
            usage = scan_groups(set(live))
            for pgid, sampled in live.items():
                group = usage.get(pgid)
                seen = max(group.rss if group else 0, high_water_mark(pgid))
                sampled.peak_rss = max(sampled.peak_rss, seen)
        except Exception:
            log.failure("sampling task memory failed")
