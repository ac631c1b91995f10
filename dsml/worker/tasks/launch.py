"""Starting a task's process: its environment, where its command is, and a new session.

Every command is started in a new session, so its pid is also the id of its session and
process group (the buildbot ``runprocess`` idea; :mod:`.groups` signals that group).  Its
SIGPIPE disposition is the default one, although the worker (Python) ignores SIGPIPE and
an ignored signal stays ignored across exec: ``Popen(restore_signals=True)`` and Twisted's
``spawnProcess`` both reset it, so ``yes | head -n 1`` in a task ends quietly.

Two ways to start, chosen by a :data:`Launcher`:

- on Linux (``os.pidfd_open``, Linux >= 5.3), :func:`popen_launcher`: the command is
  started by ``subprocess.Popen(cwd=..., start_new_session=True)`` (:func:`start_popen`):
  a vfork-style child that chdirs, calls ``setsid()`` and execs the command, one exec in
  all (measured: about 0.5 ms of child CPU against about 2.8 ms for the fallback below).
  No thread waits for it: its two output pipes and a pidfd (readable once the process has
  exited) are watched by the reactor like any socket (:mod:`.watch`).  Twisted's SIGCHLD
  handling reaps only the processes it spawned itself, so it never takes this child's
  exit status.
- elsewhere (or where ``pidfd_open`` fails), the command is spawned through Twisted
  (:func:`spawn_through_twisted`) as ``env -C <dir> -- setsid -- <command...>``
  (:func:`setsid_launcher`).  Neither ``env`` nor ``setsid`` forks: ``setsid`` forks only
  when its caller already leads a process group, and a freshly spawned child never does,
  so the pid Twisted reports is the pid of the command itself.  The working directory is
  set by ``env -C`` rather than by ``spawnProcess(path=...)`` because Twisted uses
  ``posix_spawnp`` only when no ``path`` is given and falls back to ``fork()`` of the
  whole worker otherwise.  Where ``setsid`` or ``env -C`` is missing, a three-line Python
  trampoline does the same, slower to start (:func:`python_launcher`).

A task's environment holds only :data:`BASE_ENV_NAMES` from the worker's, then its spec's
variables, then the ``DSML_*`` ones (:class:`TaskEnvironment`).
"""

from __future__ import annotations

import os
import shutil
import signal as signal_module
import subprocess
import sys
from collections.abc import Callable, Mapping, Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any

from twisted.internet.protocol import ProcessProtocol
from twisted.logger import Logger

from .groups import ORPHAN_MARK
from .spec import AttemptSpec

log = Logger()

#: Environment variables passed from the worker's own environment to every task; nothing
#: else leaks (no credentials, no PYTHONPATH of the worker's virtualenv).
BASE_ENV_NAMES = ("PATH", "HOME", "LANG")

#: Seconds a command's place along a PATH is remembered (see Executables.find).
WHICH_TTL = 1.0

#: Started with ``python -I -S -c`` where ``setsid`` or ``env -C`` is missing:
#: argv is [cwd, command...].
TRAMPOLINE = "import os,sys;os.chdir(sys.argv[1]);os.setsid();os.execvp(sys.argv[2],sys.argv[2:])"

#: Builds (executable, argv) that run ``command`` in ``cwd`` as the leader of a new session.
Launcher = Callable[[Path, Sequence[str]], tuple[str, list[str]]]


class LaunchFailed(Exception):
    """A command could not be started; ``reason`` is the attempt's one-line reason."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


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
    """The direct launcher: :class:`~dsml.worker.tasks.TaskManager` recognises it and
    starts the command with ``subprocess.Popen(cwd=cwd, start_new_session=True)``, watched
    through a pidfd."""
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


#: The variables that size a task's thread pools (OpenMP, MKL, OpenBLAS, numexpr,
#: Accelerate): each is set to the task's CPUs unless the task's own env gives it.
THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS",
               "NUMEXPR_NUM_THREADS", "VECLIB_MAXIMUM_THREADS")


class TaskEnvironment:
    """The environment of every task of a worker whose task dir is ``work_dir``.

    Besides what :meth:`for_attempt` takes from the worker and the spec, every task gets
    ``CUDA_VISIBLE_DEVICES`` naming exactly the GPUs the worker gave it (empty: none, so
    a task that asked for no GPU sees none) and :data:`THREAD_VARS` set to its CPUs.

    The variables taken from the worker are read once, here: those named in ``allow``
    (a name, or a prefix ending in ``*``: ``CUDA_*``), :data:`BASE_ENV_NAMES` by
    default; the worker's config extends the list (``task_env``).  ``user`` (the task
    user's ``HOME``, ``USER``, ``LOGNAME``) replaces the worker's own.
    """

    def __init__(self, work_dir: Path, allow: Sequence[str] = BASE_ENV_NAMES,
                 user: Mapping[str, str] | None = None) -> None:
        self.work_dir = work_dir
        exact = {a for a in allow if not a.endswith("*")}
        prefixes = tuple(a[:-1] for a in allow if a.endswith("*"))
        self._base = {name: value for name, value in os.environ.items()
                      if name in exact or (prefixes and name.startswith(prefixes))}
        self._base.setdefault("PATH", os.defpath)
        self._base.update(user or {})

    def for_warm(self) -> dict[str, str]:
        """A warm interpreter's until it is given its attempt's (:mod:`.warm`): the base
        variables and the worker's mark."""
        env = self._base.copy()
        env[ORPHAN_MARK] = str(self.work_dir)
        return env

    def for_attempt(self, spec: AttemptSpec) -> dict[str, str]:
        """Base variables from the worker, then the spec's, then the DSML_* ones."""
        env = self._base.copy()
        env.update(spec.env)
        spec_names = {name for name, _ in spec.env}
        env["DSML_TASK_INDEX"] = str(spec.task_index)
        env["DSML_JOB_ID"] = spec.job_id
        env["DSML_ATTEMPT_ID"] = str(spec.attempt_id)
        # Marks the process as this worker's, so a restarted worker can find and kill
        # what an earlier run of it (killed with -9) left behind: see groups.kill_orphans.
        env[ORPHAN_MARK] = str(self.work_dir)
        # Its own GPUs, and only those ("": none); thread pools sized to its CPUs (a
        # task that sets one itself keeps its own).
        env["CUDA_VISIBLE_DEVICES"] = ",".join(spec.gpu_ids)
        for name in THREAD_VARS:
            if name not in spec_names:
                env[name] = str(spec.slots)
        return env


class Executables:
    """Where commands are along a PATH, remembered for :data:`WHICH_TTL` seconds (as a
    shell's ``hash`` does, but short-lived).

    Measured: with a PATH of eleven directories, Popen's own search (a path joined and
    encoded per directory, then an exec tried in each) was about a tenth of a worker's
    CPU under cProfile on an array of one-shot tasks; remembering it took the worker's CPU
    per attempt from 592 to 512 us (benchmarks/launchers.py, medians of three runs each).
    Remembered only for a second, a program installed earlier in PATH is used from the
    next second on; one that vanished is looked for again at once (:func:`start_popen`).

    :param seconds: the clock (``reactor.seconds``).
    """

    def __init__(self, seconds: Callable[[], float]) -> None:
        self._seconds = seconds
        # (PATH, name) -> (where the command is, until when that is believed).
        self._found: dict[tuple[str, str], tuple[str, float]] = {}

    def find(self, name: str, path: str) -> str | None:
        """Where ``name`` is along ``path``; ``None`` lets Popen search itself."""
        if "/" in name:
            return None  # relative to the task's directory, or absolute: Popen's affair
        key = (path, name)
        now = self._seconds()
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

    def forget(self, name: str, path: str) -> None:
        """Forget where ``name`` was along ``path`` (it has gone, or changed)."""
        self._found.pop((path, name), None)


def _popen(
    command: Sequence[str],
    executable: str | None,
    cwd: Path,
    env: dict[str, str],
    out_w: int,
    err_w: int,
    stdin: int,
) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        command,
        executable=executable,
        cwd=cwd,
        env=env,
        stdin=stdin,
        stdout=out_w,
        stderr=err_w,
        start_new_session=True,
        restore_signals=True,  # SIGPIPE (and the rest) back to their defaults
        close_fds=True,
    )


def start_popen(
    command: Sequence[str], cwd: Path, env: dict[str, str], executables: Executables,
    stdin: int = subprocess.DEVNULL,
) -> tuple[subprocess.Popen[bytes], int, int, int]:
    """``subprocess.Popen`` of ``command`` in ``cwd``, in a new session, with no stdin
    (or the descriptor ``stdin``: a warm interpreter's socket, :mod:`.warm`).

    Returns the Popen, the read ends of its stdout and stderr pipes (non-blocking is the
    reader's affair) and a pidfd of it.  A command that cannot be executed makes Popen
    raise (the child reports the exec error before Popen returns), so no ``which`` is
    needed beforehand.  Raises :class:`LaunchFailed`; then nothing is left open or running.
    """
    out_r, out_w = os.pipe()  # both close-on-exec; Popen dup2s the write ends to 1, 2
    err_r, err_w = os.pipe()
    try:
        executable = executables.find(command[0], env["PATH"])
        try:
            popen = _popen(command, executable, cwd, env, out_w, err_w, stdin)
        except (FileNotFoundError, PermissionError):
            if executable is None:
                raise
            # Remembered, but gone (or changed) since: look along PATH again.
            executables.forget(command[0], env["PATH"])
            executable = executables.find(command[0], env["PATH"])
            popen = _popen(command, executable, cwd, env, out_w, err_w, stdin)
    except OSError as e:
        for fd in (out_r, err_r):
            os.close(fd)
        if isinstance(e, FileNotFoundError | PermissionError | NotADirectoryError):
            raise LaunchFailed(f"command not found: {command[0]}") from None
        raise LaunchFailed(f"spawn failed: {e.strerror or e}") from None
    finally:
        os.close(out_w)
        os.close(err_w)
    try:
        pidfd = os.pidfd_open(popen.pid)
    except OSError as e:  # e.g. out of descriptors: do not leave it running unwatched
        os.killpg(popen.pid, signal_module.SIGKILL)
        popen.wait()
        for fd in (out_r, err_r):
            os.close(fd)
        raise LaunchFailed(f"spawn failed: {e.strerror or e}") from None
    return popen, out_r, err_r, pidfd


def command_found(program: str, cwd: Path, path: str | None) -> bool:
    """Whether ``program`` can be executed: relative to ``cwd`` if it holds a slash, else
    along ``path`` (the check before a spawn through Twisted, whose errors come late)."""
    if "/" in program:
        target = cwd / program
        return target.is_file() and os.access(target, os.X_OK)
    return shutil.which(program, path=path) is not None


def spawn_through_twisted(
    reactor: Any,
    launcher: Launcher,
    protocol: ProcessProtocol,
    cwd: Path,
    command: Sequence[str],
    env: Mapping[str, str],
) -> None:
    """``reactor.spawnProcess`` of the launcher's argv (``env -C dir -- setsid -- ...``),
    its stdin a pipe (the protocol closes it), stdout and stderr read into ``protocol``.
    Raises :class:`LaunchFailed`."""
    executable, argv = launcher(cwd, command)
    try:
        reactor.spawnProcess(
            protocol,
            executable,
            argv,
            env=env,
            path=None,  # env -C sets it: Twisted forks the worker when path is given
            usePTY=False,
            childFDs={0: "w", 1: "r", 2: "r"},
        )
    except OSError as e:
        raise LaunchFailed(f"spawn failed: {e.strerror or e}") from None
