"""A fork server of warm interpreters (a *zygote*): the worker side.

Where the worker has ``preload`` modules (numpy, pandas, ...), every warm interpreter
spawned as :mod:`.warm` describes imports them again: about 0.7 s of CPU for numpy and
pandas, which on a small host competes with the running calls.  So such a worker starts
one more process at its start, started exactly as a warm interpreter is (its own session
and cgroup ``az<n>``, the task user, the base environment and mark, not dumpable) but
with ``DSML_WARM_ZYGOTE`` set: it imports the preload modules once, then forks warm
interpreters on request (:mod:`dsml.fnzygote`, the protocol).  A forked one becomes
what a spawned one is: its own session (``setsid``), its own descriptors 0-2 (the
socket and pipes the worker made), moved by the worker into its own cgroup ``aw<n>``
before it is given an attempt (the attempt's memory limit is written then, as for a
spawned one), dumpable again only for its attempt, run once and gone.  Nothing but the
zygote's imports carries from one attempt to the next.  Those OpenBLAS imports run
with one thread (``OMP_NUM_THREADS`` and the like set to 1 in the zygote's
environment, and pyarrow's jemalloc told to start no background thread: see
:data:`NO_THREADS`), so the zygote has no thread a fork would lose; a forked attempt
given more than one CPU sets its BLAS threads through threadpoolctl where it is
installed.

The exit status of a forked interpreter, which is the zygote's child, not the
worker's: the zygote waits for it (``waitid`` with ``WNOWAIT``) and writes it on the
child's *status socket*, whose other end the worker holds (:class:`Forked`, a
``Popen`` to the manager's exit watcher, which watches that socket as it watches a
spawned leader's pidfd).  The zygote reaps the child only once the worker closes its
end, after it has killed what is left of the attempt's group: until then the group's
id is not reused, as with the worker's own children.  Kills are the worker's, as for a
spawned attempt: ``killpg`` of the group (the worker is root or the same user) and the
attempt's cgroup.  Why not a double fork making the worker the reaper: the worker would
then have to be a child subreaper, and inherit every orphan of every task, which the
pidfd path (:mod:`.launch`) was designed to avoid (``waitpid(-1)`` would race the
``Popen`` children's own waits).

When the zygote dies (killed by a task of the same user, out of memory, ...), its socket
closes: the pool spawns its interpreters as before (a log line says so) and the zygote
is started again after :data:`RESTART_DELAY` seconds (doubling, up to
:data:`RESTART_MAX`, while it keeps dying young).  An attempt running in an interpreter
it forked has lost its exit status (its status socket closes): it is killed, and ends
with :data:`LOST`.  A fork refused, or no answer in :data:`FORK_TIMEOUT` seconds (a
stopped zygote), counts as its death.  The worker's stop stops it once no interpreter
it forked is running.
"""

from __future__ import annotations

import os
import select
import signal as signal_module
import socket
import subprocess
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

from twisted.logger import Logger

from ...fnrun import ZYGOTE_ENV
from .isolation import Isolation
from .launch import THREAD_VARS, Executables
from .taskuser import TaskUser

log = Logger()

#: The zygote's environment besides one thread per pool (:data:`~.launch.THREAD_VARS`):
#: pandas imports pyarrow where it is installed, whose jemalloc starts a background
#: thread of its own (unless the worker's environment configures it otherwise).
NO_THREADS = {"JE_ARROW_MALLOC_CONF": "background_thread:false"}
#: An attempt's reason when the zygote that forked its interpreter died under it.
LOST = "lost: its interpreter's zygote died (exit status unknown)"
#: Seconds a fork may wait for its answer (the zygote's own imports first).
FORK_TIMEOUT = 60.0
#: Seconds before a dead zygote is started again; doubled while it keeps dying young
#: (before :data:`STABLE` seconds), up to :data:`RESTART_MAX`.
RESTART_DELAY = 1.0
RESTART_MAX = 300.0
STABLE = 60.0


class Forked:
    """A forked interpreter as the manager's exit watcher sees a ``Popen``: its
    ``pid``, and its exit status read from its status socket ``fd`` (None if the
    zygote died first).  ``on_done`` is called once its status is in, or it is given up."""

    def __init__(self, pid: int, fd: int, on_done: Callable[[], None]) -> None:
        self.pid, self.fd, self._on_done = pid, fd, on_done
        self.returncode: int | None = None
        self.lost = False
        self._done = False

    def _read(self) -> None:
        try:
            data = os.read(self.fd, 32)
        except OSError:
            data = b""
        try:
            self.returncode = int(data)
        except ValueError:
            self.lost = True
        self.forget()

    def forget(self) -> None:
        """Nothing more will be read of it (also once it is discarded)."""
        if not self._done:
            self._done = True
            self._on_done()

    def poll(self) -> int | None:
        """Its status if it has exited (SIGKILL's if unknown), else None; never blocks."""
        if self.returncode is None and not self.lost:
            p = select.poll()
            p.register(self.fd, select.POLLIN)
            if p.poll(0):
                self._read()
        return -signal_module.SIGKILL if self.lost else self.returncode

    def wait(self, timeout: float | None = None) -> int | None:
        """Its status (None if unknown): read at once when the watcher says it is
        there; with a ``timeout``, only what is already there (never blocks the
        worker on a zygote that might be stopped)."""
        if timeout is not None:
            return self.poll()
        if self.returncode is None and not self.lost:
            self._read()
        return None if self.lost else self.returncode


class _Control:
    """The zygote's socket, read by the reactor."""

    def __init__(self, zygote: Zygote, sock: socket.socket) -> None:
        self.zygote, self.sock = zygote, sock

    def fileno(self) -> int:
        return self.sock.fileno()

    def logPrefix(self) -> str:  # noqa: N802 - Twisted's name
        return "zygote"

    def doRead(self) -> None:  # noqa: N802 - Twisted's name
        self.zygote.answer()

    def connectionLost(self, reason: Any = None) -> None:  # noqa: N802 - Twisted's name
        self.zygote.down("its socket was dropped")


class Zygote:
    """The fork server of one worker's warm interpreters (see the module docstring).

    :param env: the warm interpreters' environment (with the preload list); ``command``
        what they run (``python -m dsml.fnrun --warm``).
    :param make: makes a :class:`~.warm.Warm` of a forked one (its :class:`Forked`, its
        socket, the read ends of its pipes, its status socket, its cgroup).
    :param on_forked: called with each interpreter asked for (:meth:`fork`) once it is
        ready, or with None if it will not come.
    """

    def __init__(self, clock: Any, isolation: Isolation, user: TaskUser | None,
                 env: dict[str, str], cwd: Path, executables: Executables,
                 command: list[str], make: Callable[..., Any],
                 on_forked: Callable[[Any], None]) -> None:
        self.clock, self.isolation, self.user = clock, isolation, user
        self.cwd = cwd.parent  # the tasks' directory: the run directory may not be there yet
        self.env = {**NO_THREADS, **env, **dict.fromkeys(THREAD_VARS, "1")}
        self.executables, self.command, self.on_forked = executables, command, on_forked
        self.make = make
        self.popen: subprocess.Popen[bytes] | None = None
        self.cgroup: Path | None = None
        self._control: _Control | None = None
        self._pending: deque[tuple[Path | None, socket.socket, int, int]] = deque()
        self._live = 0  # interpreters it forked whose status is still to come
        self._count = 0
        self._timer: Any = None
        self._restart: Any = None
        self._delay = RESTART_DELAY
        self._started = 0.0
        self._closed = False
        #: Called once it has been started again after a death.
        self.on_restarted: Callable[[], None] = lambda: None

    @property
    def up(self) -> bool:
        """Whether it runs (or is starting)."""
        return self._control is not None

    def first(self) -> bool:
        """Start it if it never was (the pool's first fill, once the worker runs)."""
        return not self._count and self.start()

    def start(self) -> bool:
        """Start it (a line in the log says why if it cannot)."""
        if self._closed or self.up:
            return self.up
        self._count += 1
        try:
            cgroup = self.isolation.prepare_warm(f"z{self._count}")
        except OSError as e:
            self._later(f"cannot have its cgroup: {e}")
            return False
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        env = {**self.env, ZYGOTE_ENV: str(theirs.fileno())}
        command = list(self.command)
        if self.user is not None:
            command = self.user.wrap(command)
        command = self.isolation.wrap(cgroup, command)
        try:
            with open(self.cwd / "zygote.log", "wb") as out:
                self.popen = subprocess.Popen(
                    command, executable=self.executables.find(command[0], env["PATH"]),
                    cwd=self.cwd, env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=out,
                    pass_fds=(theirs.fileno(),), start_new_session=True,
                    restore_signals=True, close_fds=True)
        except OSError as e:
            ours.close()
            self.isolation.release(cgroup)
            self._later(f"cannot start: {e.strerror or e}")
            return False
        finally:
            theirs.close()
        ours.setblocking(False)
        self.cgroup, self._control = cgroup, _Control(self, ours)
        self.clock.addReader(self._control)
        self._started = self.clock.seconds()
        log.info("zygote of warm interpreters started (pid {pid})", pid=self.popen.pid)
        return True

    def fork(self, cgroup: Path | None) -> bool:
        """Ask for a warm interpreter, to go into ``cgroup``: it comes through
        ``on_forked``.  False if it cannot be asked (then it will not come)."""
        if self._control is None:
            return False
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        out_r, out_w = os.pipe()
        err_r, err_w = os.pipe()
        try:
            socket.send_fds(self._control.sock, [b"F"], [theirs.fileno(), out_w, err_w])
        except OSError as e:
            ours.close()
            os.close(out_r)
            os.close(err_r)
            self.down(f"cannot be asked ({e})")
            return False
        finally:
            theirs.close()
            os.close(out_w)
            os.close(err_w)
        self._pending.append((cgroup, ours, out_r, err_r))
        if self._timer is None:
            self._timer = self.clock.callLater(FORK_TIMEOUT, self._timeout)
        return True

    def answer(self) -> None:
        """What the zygote says: a fork's pid and status socket, or its end."""
        assert self._control is not None
        try:
            data, fds, _, _ = socket.recv_fds(self._control.sock, 256, 1)
        except BlockingIOError:
            return
        except OSError as e:
            self.down(f"its socket failed ({e})")
            return
        if not data or not self._pending:
            for fd in fds:
                os.close(fd)
            self.down("died" if not data else "said what was not asked")
            return
        cgroup, ours, out_r, err_r = self._pending.popleft()
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = (self.clock.callLater(FORK_TIMEOUT, self._timeout)
                       if self._pending else None)
        if data[:1] != b"P" or len(fds) != 1:
            for fd in (*fds, out_r, err_r):
                os.close(fd)
            ours.close()
            self.isolation.release(cgroup)
            self.down(f"could not fork ({data[1:200].decode(errors='replace')})")
            self.on_forked(None)
            return
        self._live += 1
        w = self.make(Forked(int(data[1:]), fds[0], self._child_done), ours, out_r, err_r,
                      fds[0], cgroup)
        try:
            self.isolation.adopt(cgroup, w.popen.pid)
        except OSError as e:
            log.warn("a forked warm interpreter cannot join its cgroup: {e}", e=e)
            w.discard()
            self.isolation.release(cgroup)
            self.on_forked(None)
            return
        self._delay = RESTART_DELAY if self.clock.seconds() - self._started >= STABLE \
            else self._delay
        self.on_forked(w)

    def _timeout(self) -> None:
        self._timer = None
        self.down(f"did not fork in {FORK_TIMEOUT:g} s")

    def _child_done(self) -> None:
        self._live -= 1
        if self._closed and not self._live:
            self.clock.callLater(0, self._stop)

    def down(self, why: str) -> None:
        """It died, or is of no use: kill it; spawn meanwhile, start it again later."""
        if self._control is None:
            return
        self._stop()
        if not self._closed:
            self._later(why)

    def _later(self, why: str) -> None:
        delay = self._delay
        self._delay = min(RESTART_MAX, self._delay * 2)
        log.warn("zygote of warm interpreters {why}: they are spawned (importing their "
                 "preload each) until it is started again in {delay:g} s", why=why,
                 delay=delay)
        if self._restart is None and not self._closed:
            self._restart = self.clock.callLater(delay, self._again)

    def _again(self) -> None:
        self._restart = None
        if self.start():
            self.on_restarted()

    def _stop(self) -> None:
        """Kill it, wait for it, and give up what it was asked."""
        control, popen, self._control, self.popen = self._control, self.popen, None, None
        if control is None or popen is None:
            return
        self.clock.removeReader(control)
        control.sock.close()
        try:
            os.killpg(popen.pid, signal_module.SIGKILL)
        except OSError:
            pass
        try:
            popen.wait(5)
        except subprocess.TimeoutExpired:
            log.warn("zygote {pid} outlived SIGKILL by 5 s", pid=popen.pid)
        self.isolation.release(self.cgroup)  # and what it forked, not yet moved out
        self.cgroup = None
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        pending = list(self._pending)
        self._pending.clear()
        for cgroup, ours, out_r, err_r in pending:
            ours.close()
            os.close(out_r)
            os.close(err_r)
            self.isolation.release(cgroup)
        for _ in pending:
            self.on_forked(None)

    def close(self) -> None:
        """The worker stops: stop it now, or once what it forked has ended."""
        self._closed = True
        if self._restart is not None and self._restart.active():
            self._restart.cancel()
        self._restart = None
        if not self._live:
            self._stop()
