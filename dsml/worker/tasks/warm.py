"""Warm interpreters: a function task's Python started before its attempt.

A function task (``dsml-python -m dsml.fnrun CALLS RESULT``, see :mod:`dsml.fnrun`)
spends most of a short call starting the interpreter and importing cloudpickle (about
50 ms here), and where the worker has cgroups, joining the attempt's cgroup costs a
shell and often several milliseconds more (cgroup v1's memory controller waits for an
RCU grace period).  So once a worker has run one function task, it keeps
:data:`WARM_INTERPRETERS` interpreters ready (:class:`WarmPool`, refilled as attempts
end): ``python -m dsml.fnrun --warm``, started the way an attempt's command is (its own
session, its own cgroup ``aw<n>``, as the task user, with the worker's base environment
and mark), which imports what a run needs and then blocks on its standard input, a Unix
socket.

An attempt it suits (:func:`warm_args`: the worker's own interpreter, the same
``PYTHON*`` variables as the warm one has) takes it: the cgroup gets the attempt's memory
limit, then one message gives it the attempt's directory (a descriptor), environment and
arguments (:func:`dsml.fnrun.go_message`).  From then on it is the attempt's leader like
any spawned command: watched by its pidfd, its pipes read into the attempt's logs, its
cgroup the attempt's.  It runs once and exits: nothing carries from one attempt to the
next but the interpreter's start.  Anything amiss (it died waiting, the limit does not
fit, the message cannot be sent) and the attempt starts cold, as before.

Where the worker has ``preload`` modules, its interpreters are not spawned but forked
by its zygote (:mod:`.zygote`), which imported them once, and the pool is filled at the
worker's start rather than after a first function task; while the zygote is down they
are spawned as above.  An attempt that finds none ready while the zygote is forking
waits for one (:meth:`WarmPool.ready`, at most :data:`FORK_WAIT` seconds): a fork takes
milliseconds, a cold start the imports.
"""

from __future__ import annotations

import os
import signal as signal_module
import socket
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import attrs
from twisted.internet.defer import Deferred, succeed
from twisted.logger import Logger

from ...fnrun import PRELOAD_ENV, go_message, runtime
from ...protocol.limits import FN_RUNTIME
from .isolation import Isolation
from .launch import Executables, LaunchFailed, start_popen
from .taskuser import TaskUser
from .zygote import Zygote

log = Logger()

#: The command a warm interpreter runs (after the worker's interpreter for functions).
WARM_ARGS = ("-m", "dsml.fnrun")
#: How many a worker keeps ready once it has run a function task: two, so that calls
#: made one after another each find one that has finished its imports (one takes the
#: first while the next starts).
WARM_INTERPRETERS = 2
#: Seconds after an attempt's end before the pool starts its missing interpreters:
#: making their cgroups and forking them holds the worker's reactor a few milliseconds
#: (measured under cProfile: ~3 mkdirs of ~1 ms and a 2 ms fork per interpreter), which
#: must not delay the result being reported and read.
FILL_DELAY = 0.05
#: Seconds an attempt waits for an interpreter the zygote is forking (:meth:`WarmPool.ready`).
FORK_WAIT = 2.0
#: A larger message goes the cold way (it must fit the socket's buffer at once).
GO_SEND_MAX = 128 * 1024


def warm_args(command: Sequence[str], env: Mapping[str, str],
              warm_env: Mapping[str, str], python: str = sys.executable) -> list[str] | None:
    """The ``dsml.fnrun`` arguments of ``command`` if a warm interpreter can run it:
    ``python`` (the worker's for functions), ``-m dsml.fnrun`` and two arguments, and no
    ``PYTHON*`` variable (``PYTHONPATH``, ...: read at start) differing from the warm
    one's."""
    if (len(command) != 5 or command[0] != python
            or tuple(command[1:3]) != WARM_ARGS or command[3].startswith("--")):
        return None
    names = {k for k in (*env, *warm_env) if k.startswith("PYTHON")}
    if any(env.get(k) != warm_env.get(k) for k in names):
        return None
    return list(command[3:])


def probe_runtime(python: str, env: Mapping[str, str]) -> tuple[str, str]:
    """(What ``python`` runs function calls with, "") or ("", why it cannot run them):
    asked once, as the worker starts (:func:`dsml.fnrun.runtime`, run by ``python``
    with the tasks' base environment)."""
    if python == sys.executable:
        here = runtime()
        return here, "" if here else "cloudpickle cannot be imported"
    try:
        p = subprocess.run([python, "-c", "from dsml.fnrun import runtime; print(runtime())"],
                           env=dict(env), capture_output=True, timeout=120, check=False)
    except (OSError, subprocess.SubprocessError) as e:
        return "", f"cannot run {python}: {e}"
    said = p.stdout.decode(errors="replace").strip()
    if p.returncode != 0 or not said or not FN_RUNTIME.match(said):
        tail = p.stderr.decode(errors="replace").strip().splitlines()[-1:] or [said[:200]]
        return "", f"{python} cannot run them (exit {p.returncode}): {tail[0]}"
    return said, ""


@attrs.define
class Warm:
    """A warm interpreter: its Popen, the worker's end of its socket, the read ends of
    its stdout and stderr, its pidfd and its cgroup."""

    popen: subprocess.Popen[bytes]
    ctl: socket.socket
    out_r: int
    err_r: int
    pidfd: int
    cgroup: Path | None

    def go(self, directory: Path, env: dict[str, str], args: list[str]) -> bool:
        """Send it its attempt; False if it cannot be (then :meth:`discard` it)."""
        message = go_message(env, args)
        if len(message) > GO_SEND_MAX:
            return False
        try:
            fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
        except OSError:
            return False
        try:
            sent = socket.send_fds(self.ctl, [message], [fd])
        except OSError:
            return False
        finally:
            os.close(fd)
        self.ctl.close()
        return sent == len(message)

    def discard(self) -> None:
        """Kill it and wait for it; close what the worker holds of it."""
        self.ctl.close()
        try:
            os.killpg(self.popen.pid, signal_module.SIGKILL)
        except OSError:
            pass
        try:
            self.popen.wait(5)  # a forked one's (:mod:`.zygote`) never blocks
        except subprocess.TimeoutExpired:
            log.warn("warm interpreter {pid} outlived SIGKILL by 5 s", pid=self.popen.pid)
        forget = getattr(self.popen, "forget", None)
        if forget is not None:
            forget()  # a forked one: its zygote reaps it once its status socket closes
        for fd in (self.out_r, self.err_r, self.pidfd):
            os.close(fd)


class WarmPool:
    """At most ``size`` warm interpreters ready (see the module docstring).

    :param clock: ``IReactorTime``; ``env``: their environment (the worker's base and
        mark); ``cwd``: where they start (they never read it); ``python``: what they run.
    """

    def __init__(self, clock: Any, isolation: Isolation, user: TaskUser | None,
                 env: dict[str, str], cwd: Path, executables: Executables,
                 size: int = WARM_INTERPRETERS, python: str = sys.executable) -> None:
        self.clock = clock
        self.python = python
        self.isolation = isolation
        self.user = user
        self.env = env
        self.cwd = cwd
        self.executables = executables
        self.size = size
        self._ready: list[Warm] = []
        self._count = 0
        self._fill_call: Any = None
        self._closed = False
        #: Whether a function task has come: until then no interpreter is kept.
        self.wanted = False
        self._forking = 0  # asked of the zygote, not yet come
        self._waiting: list[Deferred[None]] = []  # attempts waiting for one (ready())
        self.zygote: Zygote | None = None
        if env.get(PRELOAD_ENV):  # forked from one zygote that imports them once
            self.zygote = Zygote(clock, isolation, user, env, cwd, executables,
                                 [python, *WARM_ARGS, "--warm"], Warm, self._forked)
            self.zygote.on_restarted = self.fill
            self.wanted = True  # ready at the worker's start: a first call pays no import
            self.fill()

    def take(self, mem: int) -> Warm | None:
        """A ready interpreter, its cgroup limited to ``mem`` bytes (0: none); None if
        none is ready.  From now on the pool is kept full (:meth:`fill`)."""
        self.wanted = True
        while self._ready:
            w = self._ready.pop(0)  # the oldest: the likeliest to have done its imports
            if w.popen.poll() is not None:  # it died waiting
                self.drop(w)
                continue
            try:
                self.isolation.limit(w.cgroup, mem)
            except OSError:
                self.drop(w)
                return None
            if self.zygote is not None:
                self.fill()  # a fork costs the worker little: refill now, not at the end
            return w
        return None

    def ready(self, command: Sequence[str]) -> Deferred[None]:
        """Fires once an interpreter is ready for a function task's ``command`` if the
        zygote will fork one (at most :data:`FORK_WAIT` seconds): a fork takes
        milliseconds, a spawn its imports.  At once otherwise."""
        if (self._ready or self.zygote is None or not self.zygote.up
                or warm_args(command, {}, {}, self.python) is None):  # not a function task
            return succeed(None)
        if not self._forking:
            if self._fill_call is not None and self._fill_call.active():
                self._fill_call.cancel()
            self._fill()
        d: Deferred[None] = Deferred()
        self._waiting.append(d)
        call = self.clock.callLater(FORK_WAIT, self._wake, d)
        return d.addBoth(lambda r: (call.active() and call.cancel(), r)[1])

    def _wake(self, d: Deferred[None] | None = None) -> None:
        """Fire ``d`` (its time is up), or the first waiting (one is ready, or none
        will be)."""
        if d is None:
            d = self._waiting.pop(0) if self._waiting else None
        elif d in self._waiting:
            self._waiting.remove(d)
        if d is not None and not d.called:
            d.callback(None)

    def fill(self) -> None:
        """Start what is missing in :data:`FILL_DELAY` seconds (called as an attempt
        ends: its result goes out first, and the client's read of it)."""
        if self._fill_call is None and self.wanted and not self._closed and len(
                self._ready) + self._forking < self.size:
            self._fill_call = self.clock.callLater(FILL_DELAY, self._fill)

    def _fill(self) -> None:
        self._fill_call = None
        while not self._closed and len(self._ready) + self._forking < self.size:
            if self._fork():
                continue
            w = self._start()
            if w is None:
                return
            self._ready.append(w)

    def _fork(self) -> bool:
        """Ask the zygote for one (:mod:`.zygote`); False if there is none to ask."""
        if self.zygote is None or not (self.zygote.up or self.zygote.first()):
            return False
        self._count += 1
        try:
            cgroup = self.isolation.prepare_warm(f"w{self._count}")
        except OSError:
            return False  # spawning says it
        if self.zygote.fork(cgroup):
            self._forking += 1
            return True
        self.isolation.release(cgroup)
        return False

    def _forked(self, w: Warm | None) -> None:
        """The zygote's answer to :meth:`_fork`: an interpreter, or None (spawn one)."""
        self._forking -= 1
        if w is None:
            self.fill()
        elif self._closed:
            self.drop(w)
        else:
            self._ready.append(w)
        self._wake()

    def _start(self) -> Warm | None:
        self._count += 1
        try:
            cgroup = self.isolation.prepare_warm(f"w{self._count}")
        except OSError as e:
            log.warn("no warm interpreter: cannot make its cgroup: {e}", e=e)
            return None
        command = [self.python, *WARM_ARGS, "--warm"]
        if self.user is not None:
            command = self.user.wrap(command)
        command = self.isolation.wrap(cgroup, command)
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            popen, out_r, err_r, pidfd = start_popen(
                command, self.cwd, self.env, self.executables, stdin=theirs.fileno())
        except LaunchFailed as e:
            ours.close()
            self.isolation.release(cgroup)
            log.warn("no warm interpreter: {reason}", reason=e.reason)
            return None
        finally:
            theirs.close()
        return Warm(popen, ours, out_r, err_r, pidfd, cgroup)

    def drop(self, w: Warm) -> None:
        """Kill ``w`` and release its cgroup (it was taken, then could not be used)."""
        w.discard()
        self.isolation.release(w.cgroup)

    def close(self) -> None:
        """The worker stops: no more, and those ready are killed."""
        self._closed = True
        if self._fill_call is not None and self._fill_call.active():
            self._fill_call.cancel()
        self._fill_call = None
        while self._ready:
            self.drop(self._ready.pop())
        if self.zygote is not None:
            self.zygote.close()
        while self._waiting:
            self._wake()

