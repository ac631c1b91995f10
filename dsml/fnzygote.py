"""A fork server of warm interpreters (a *zygote*): the task side.

``python -m dsml.fnrun --warm`` started with ``DSML_WARM_ZYGOTE=<fd>`` in its
environment (:mod:`dsml.worker.tasks.zygote` starts it so, where the worker has
``preload`` modules) imports what a warm interpreter imports (cloudpickle and the
preload modules, once), then serves the worker over ``<fd>``, a ``SOCK_SEQPACKET`` Unix
socket of a socketpair (no name: no task can connect to it; the zygote's descriptors
are not readable by other processes of its user, since it is not dumpable).  It never
runs a call itself: it only forks.  One message a fork:

- the worker sends ``F`` with three descriptors: the new interpreter's socket (its
  standard input, as a spawned warm interpreter's), and the write ends of its stdout
  and stderr pipes;
- the zygote forks.  The child makes itself a session leader (``setsid``), takes those
  as its descriptors 0, 1 and 2, closes every other one (the zygote's socket with them),
  reseeds what the fork would share (numpy's global random state; Python's ``random``
  reseeds itself) and goes on as a spawned warm interpreter after its imports would: it
  waits for its attempt on its standard input (:func:`dsml.fnrun.warm_run`), runs it once
  and exits;
- once the child leads its session and has closed the rest, the zygote answers
  ``P<pid>`` with one descriptor: its end of a new socketpair, the
  child's *status socket*.  When the child exits, the zygote writes its status there
  (``waitid`` with ``WNOWAIT``: ``<code>``, or ``-<signal>``) and leaves it a zombie until
  the worker closes its end: so its pid, which is its process group's and session's id,
  is not reused before the worker has killed what is left of its group, as for a child
  of the worker's own.  A fork that fails is answered ``E<why>``.

The zygote exits when the worker's end closes (the worker stopped or died); children
still waiting then see their own socket close and exit.
"""

from __future__ import annotations

import gc
import os
import selectors
import socket
import sys
import traceback
from collections.abc import Callable

__all__ = ["blas_threads", "reseed", "serve"]

#: How a child ends: :func:`dsml.fnrun.end` (never returns).
End = Callable[[int], None]


class _Child:
    """A forked interpreter as the zygote sees it."""

    def __init__(self, pid: int, pidfd: int, status: socket.socket) -> None:
        self.pid, self.pidfd, self.status = pid, pidfd, status
        self.exited = False
        self.released = False  # the worker closed its end of the status socket


def _returncode(pid: int) -> int | None:
    """The exit status of the exited child ``pid`` (negative: a signal), left a zombie."""
    res = os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
    if res is None:
        return None
    if res.si_code == os.CLD_EXITED:
        return res.si_status
    return -res.si_status


def reseed() -> None:
    """What a fork copies and a fresh interpreter would have drawn afresh: numpy's
    global random state (its legacy ``np.random.*`` functions)."""
    nprandom = sys.modules.get("numpy.random")
    seed = getattr(nprandom, "seed", None)
    if seed is not None:
        try:
            seed()
        except Exception:  # noqa: BLE001, S110 - best effort: never stops the call
            pass


def blas_threads(env: dict[str, str]) -> None:
    """The attempt's BLAS thread count (its ``OPENBLAS_NUM_THREADS`` or
    ``OMP_NUM_THREADS``), which the zygote's imports could not read (they ran with 1):
    set through threadpoolctl where it is installed and the attempt has more than one."""
    try:
        n = int(env.get("OPENBLAS_NUM_THREADS") or env.get("OMP_NUM_THREADS") or "1")
    except ValueError:
        return
    if n <= 1 or "numpy" not in sys.modules:
        return
    try:
        from threadpoolctl import threadpool_limits

        threadpool_limits(n)
    except Exception:  # noqa: BLE001, S110 - not installed: one thread, as it imported
        pass


def _child(fds: list[int], run: Callable[[socket.socket], int], end: End) -> None:
    """In the forked child: become a spawned warm interpreter, run, exit (never returns)."""
    code = 1
    try:
        os.setsid()
        for target, fd in enumerate(fds):
            os.dup2(fd, target)
        os.closerange(3, 1 << 20)  # the zygote's socket, its children's, its selector
        reseed()
        code = run(socket.socket(fileno=0))
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except BaseException:  # noqa: BLE001 - as an uncaught exception ends an interpreter
        traceback.print_exc()
    end(code)
    os._exit(code)  # not reached: end exits


def _fork(ctl: socket.socket, fds: list[int], run: Callable[[socket.socket], int],
          end: End, children: dict[int, _Child], sel: selectors.BaseSelector) -> None:
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    settled, settling = os.pipe()  # closed by the child once it leads its session
    try:
        pid = os.fork()
    except OSError as e:
        for fd in (*fds, settled, settling):
            os.close(fd)
        ours.close()
        theirs.close()
        _send(ctl, b"E" + str(e).encode(), [])
        return
    if pid == 0:
        _child(fds, run, end)
    for fd in (*fds, settling):
        os.close(fd)
    os.read(settled, 1)  # its pid is its group's before the worker may signal it
    os.close(settled)
    child = _Child(pid, os.pidfd_open(pid), ours)
    children[pid] = child
    sel.register(child.pidfd, selectors.EVENT_READ, ("exit", child))
    sel.register(ours, selectors.EVENT_READ, ("release", child))
    _send(ctl, b"P%d" % pid, [theirs.fileno()])
    theirs.close()


def _send(sock: socket.socket, data: bytes, fds: list[int]) -> None:
    try:
        socket.send_fds(sock, [data], fds)
    except OSError:
        pass  # the worker is gone: its end's closing ends the loop


def _settle(child: _Child, children: dict[int, _Child]) -> None:
    """Reap ``child`` once it has exited and the worker is done with it."""
    if child.exited and child.released:
        os.waitpid(child.pid, 0)
        del children[child.pid]


def traced() -> bool:
    """Whether a process traces this one (``TracerPid`` in ``/proc/self/status``)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("TracerPid:"):
                    return line.split()[1] != "0"
    except (OSError, IndexError):
        pass
    return False


def serve(fd: int, run: Callable[[socket.socket], int], end: End) -> int:
    """The zygote's loop (see the module docstring); a child runs ``run`` and ends
    with ``end`` of what it returns.

    Refused (exit 1: the worker spawns, then starts another) if a process traces it:
    between its exec and its ``PR_SET_DUMPABLE`` (a few tens of milliseconds, as for a
    spawned warm interpreter) a task of the same user may attach to it, and would stay
    attached, able to plant code in every interpreter it forks."""
    ctl = socket.socket(fileno=fd)
    ctl.set_inheritable(False)
    if traced():
        print("dsml.fnzygote: traced by another process: not serving", file=sys.stderr,
              flush=True)
        return 1
    gc.collect()
    gc.freeze()  # what it imported: never scanned by a child's collector, so not copied
    children: dict[int, _Child] = {}
    sel = selectors.DefaultSelector()
    sel.register(ctl, selectors.EVENT_READ, ("ctl", None))
    while True:
        for key, _ in sel.select():
            what, child = key.data
            if what == "ctl":
                try:
                    data, fds, _, _ = socket.recv_fds(ctl, 64, 3)
                except OSError:
                    return 0
                if not data:
                    return 0  # the worker is gone
                if data == b"F" and len(fds) == 3:
                    _fork(ctl, fds, run, end, children, sel)
                else:
                    for f in fds:
                        os.close(f)
            elif what == "exit":
                code = _returncode(child.pid)
                if code is None:
                    continue
                sel.unregister(child.pidfd)
                os.close(child.pidfd)
                child.exited = True
                if not child.released:
                    try:
                        child.status.send(b"%d" % code)
                    except OSError:
                        pass
                _settle(child, children)
            else:  # the worker closed its end (or wrote to it: the same)
                sel.unregister(child.status)
                child.status.close()
                child.released = True
                _settle(child, children)
