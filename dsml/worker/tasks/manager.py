"""TaskManager: runs attempts within the worker's slots and reports how each ended.

It holds the slots (:class:`~dsml.worker.tasks.ledger.AttemptLedger`), takes each attempt
through its steps (directory, inputs through :class:`Transfers`, the process, outputs,
result), and decides when to signal a task's group: on a timeout, a cancel or a stop,
SIGTERM then SIGKILL after ``grace`` seconds; when the leader ends, SIGKILL to what is
left of its group at once (the rules: :mod:`.groups`).  If the log pipes stay open after
that (held by a process that left the group), they are closed after :data:`DRAIN_TIMEOUT`
seconds so the attempt still ends.  How processes start is :mod:`.launch`'s affair, how
they are watched :mod:`.watch`'s, their logs :mod:`.logs`', their directories
:mod:`.workdirs`' and their cgroups (or the subreaper) :mod:`.isolation`'s.
"""

from __future__ import annotations

import os
import signal as signal_module
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import Any

from twisted.internet.defer import CancelledError, Deferred, DeferredList, maybeDeferred, succeed
from twisted.internet.interfaces import IProcessTransport
from twisted.logger import Logger
from twisted.python.failure import Failure

from ...config import DEFAULT_ATTEMPT_DIRS_MAX_AGE, DEFAULT_ATTEMPT_DIRS_MAX_BYTES
from ...errors import NotFound
from ...fnrun import PRELOAD_ENV
from ...fsutil import makedirs_private, private_dir
from ...protocol.limits import MAX_INLINE_RESULT
from .attempt import Attempt
from .cgroups import CgroupTree
from .groups import kill_leftovers, kill_orphans, signal_group
from .isolation import Isolation
from .launch import (
    BASE_ENV_NAMES,
    Executables,
    Launcher,
    LaunchFailed,
    TaskEnvironment,
    command_found,
    default_launcher,
    popen_launcher,
    spawn_launcher,
    spawn_through_twisted,
    start_popen,
)
from .ledger import AttemptLedger
from .logs import LOG_CAP, open_logs
from .spec import (
    TIMEOUT_PREFIX,
    AttemptResult,
    AttemptSpec,
    TaskError,
    TaskReactor,
    Transfers,
    relative,
)
from .taskuser import TaskUser
from .warm import WARM_INTERPRETERS, WarmPool, warm_args
from .watch import (
    SAMPLE_INTERVAL,
    ExitWatcher,
    FdReader,
    MemorySampler,
    PipeReader,
    TaskProcess,
)
from .workdirs import AttemptDirs, output_problem, read_small
from .zygote import LOST

log = Logger()

#: Seconds to wait, after the leader has ended and its group was killed, for the log pipes
#: to close before closing them ourselves (a process that left the group may hold them).
DRAIN_TIMEOUT = 2.0

#: Unacknowledged results kept for re-sending; beyond this the oldest are dropped (a master
#: that never acknowledges must not grow the worker without bound).
MAX_UNACKED = 10_000

#: Per-attempt debug lines (accepted, inputs staged, started, ended ok) only with
#: DSML_TRACE=1: twistd writes debug events too, and three formatted lines per task were a
#: measurable part of a worker's CPU on arrays of short tasks.
TRACE = os.environ.get("DSML_TRACE") == "1"


def _describe(failure: Failure) -> str:
    """One line for a failed transfer."""
    value = failure.value
    message = getattr(value, "message", None)
    if isinstance(message, str):
        return message
    return str(value) or type(value).__name__


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
    :param dirs_max_bytes: bytes the kept directories may hold (inputs lent by a link not
        counted); ``dirs_max_age``: seconds one is kept (None: no bound).
    :param launcher: how a command is started in its own session (the default is
        :func:`default_launcher`): :func:`popen_launcher` for ``subprocess.Popen`` watched
        through a pidfd (the reactor must then provide ``IReactorFDSet``), anything else
        builds the argv given to ``reactor.spawnProcess``.
    :param sample_interval: seconds between two memory samples of running groups.
    :param cgroups: the worker's attempt cgroups (:func:`~.cgroups.detect`), or None;
        ``subreaper``: without them, become a child subreaper (:mod:`.subreaper`).
    :param task_user: who tasks run as (:mod:`.taskuser`); None: the worker's user.
    :param warm: warm interpreters kept for function tasks once one has come (:mod:`.warm`;
        0: none).  ``python``: the interpreter ``dsml-python`` names.
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
        dirs_max_bytes: int | None = DEFAULT_ATTEMPT_DIRS_MAX_BYTES,
        dirs_max_age: float | None = DEFAULT_ATTEMPT_DIRS_MAX_AGE,
        launcher: Launcher | None = None,
        sample_interval: float = SAMPLE_INTERVAL,
        cgroups: CgroupTree | None = None,
        subreaper: bool = False,
        task_env: Sequence[str] = BASE_ENV_NAMES,
        mem: int = 0,
        gpus: Sequence[str] = (),
        task_user: TaskUser | None = None,
        warm: int = WARM_INTERPRETERS,
        python: str = sys.executable,
        preload: Sequence[str] = (),
    ) -> None:
        if slots < 1:
            raise ValueError(f"slots must be at least 1, not {slots}")
        if log_cap < 1 or keep_finished < 0 or grace < 0 or sample_interval <= 0:
            raise ValueError("log_cap >= 1, keep_finished >= 0, grace >= 0, sample_interval > 0")
        self.reactor = reactor
        self.slots, self.mem, self.gpus, self.python = slots, mem, tuple(gpus), python
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
        self._active: dict[int, Attempt] = {}
        self._results: dict[int, AttemptResult] = {}
        # Ages on the wall clock: recovered directories are dated by their mtime.
        self._dirs = AttemptDirs(self.work_dir, keep_finished, max_bytes=dirs_max_bytes,
                                 max_age=dirs_max_age)
        # The ledger's finished attempts whose logs can still be read (the same dict).
        self._kept = self._dirs.kept
        self._stopping = False
        self.task_user = task_user
        self._environment = TaskEnvironment(
            self.work_dir, task_env,
            None if task_user is None else task_user.env(os.environ.get("PATH", os.defpath)))
        self._executables = Executables(reactor.seconds)
        self._sampler = MemorySampler(reactor, sample_interval, self._live_groups)
        private_dir(self.work_dir)  # the worker's alone, like its attempt directories
        kill_orphans(self.work_dir)
        self.isolation = Isolation(reactor, self.work_dir, cgroups, subreaper,
                                   known=self._live_groups)
        # Warm interpreters need the pidfd path, and cgroups or nothing: the subreaper
        # finds an attempt's processes by a mark their environment had at exec.
        self._warm = WarmPool(
            reactor, self.isolation, task_user,
            {**self._environment.for_warm(), **({PRELOAD_ENV: ",".join(preload)}
                                                 if preload else {})},
            self._dirs.run_root, self._executables, warm, python,
        ) if warm and self.launcher is popen_launcher and not self.isolation.subreaper else None
        self._dirs.recover()

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
        spec = self.admit(spec)
        att = Attempt(spec=spec, dir=self._dirs.run_root)  # its own directory: _make_dir
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
        if self._warm is not None:
            self._warm.close()
        waiting = [att.done for att in self._active.values()]
        for att in list(self._active.values()):
            self._terminate(att, "worker stopping")
        if not waiting:
            self.isolation.close()
            return succeed(None)
        d: Deferred[Any] = DeferredList(waiting)
        return d.addCallback(lambda _: self.isolation.close())

    # --- one attempt, step by step ---------------------------------------------------

    def _launch(self, att: Attempt) -> None:
        """Run the attempt's steps as a coroutine; any bug still ends it with a result."""
        d = Deferred.fromCoroutine(self._steps(att))
        d.addErrback(self._bug, att)
        d.addCallback(lambda reason: self._finish(att, reason))
        d.addErrback(lambda f: log.failure("finishing attempt failed", f))

    def _bug(self, failure: Failure, att: Attempt) -> str:
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

    async def _steps(self, att: Attempt) -> str:
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
        if self._warm is not None:  # one the zygote is forking, rather than a cold start
            await self._warm.ready(att.spec.command)
            if att.stop_reason:
                return att.stop_reason
        reason = self._spawn(att)
        if reason:
            return reason
        await att.ended
        usage, oom = self.isolation.ended(
            att.spec, att.cgroup, att.signal is not None or att.exit_code != 0)
        att.peak_rss, att.cpu_seconds = max(att.peak_rss, usage.peak), usage.cpu_seconds
        if att.stop_reason or oom:
            return att.stop_reason or oom
        if att.signal is not None:
            return f"killed by signal {att.signal}"
        if att.exit_code != 0:
            return f"exit {att.exit_code}"
        reason = await self._store_outputs(att)
        return att.stop_reason or reason

    def _make_dir(self, att: Attempt) -> None:
        """An empty working directory for the attempt (:meth:`AttemptDirs.make`) and its
        two logs."""
        att.dir = self._dirs.make(att.spec.attempt_id)
        att.logs = open_logs(att.dir, self.log_cap)

    async def _fetch_inputs(self, att: Attempt) -> str:
        """Fetch every input at once; the first failure in spec order, or ""."""
        if not att.spec.inputs:
            return ""
        att.phase = "fetching"
        fetches = []
        for key, rel in att.spec.inputs:
            dest = att.dir / relative(rel, "input")
            try:
                makedirs_private(dest.parent)
            except OSError as e:  # e.g. inputs "a" and "a/b"
                for d in fetches:
                    d.cancel()
                    d.addErrback(lambda _: None)
                return f"input {key!r} cannot go to {rel!r}: {e.strerror or e}"
            current = att.spec.version_of(key)
            fetches.append(maybeDeferred(self.transfers.fetch, key, dest, current))
        att.pending = fetches
        staging = time.monotonic()
        results = await DeferredList(fetches, consumeErrors=True)
        att.pending = []
        if TRACE:
            log.debug(
                "attempt {attempt} staged {n} inputs in {seconds:.6f} s",
                attempt=att.spec.attempt_id, n=len(fetches), seconds=time.monotonic() - staging,
            )
        for (key, _), (ok, value) in zip(att.spec.inputs, results, strict=True):
            if ok:
                continue
            if getattr(value.value, "code", None) == NotFound.code:
                return f"input {key!r} not found"
            if value.check(CancelledError):
                return att.stop_reason or "cancelled"
            return f"input {key!r} failed: {_describe(value)}"
        return ""

    def _spawn(self, att: Attempt) -> str:
        """Start the command as the leader of a new session (in its own cgroup where the
        worker has them); a reason if it cannot start."""
        env = self._environment.for_attempt(att.spec)
        command = list(att.spec.command)
        user = self.task_user
        # The shell that joins the cgroup (or setpriv) would report it as exit 127.
        if (self.isolation.wraps or user is not None) and (
                self._executables.find(command[0], env["PATH"]) is None
                and not command_found(command[0], att.dir, env.get("PATH"))):
            return f"command not found: {command[0]}"
        if user is not None:  # its directory is the task user's; it drops after the join
            try:
                user.hand_over(att.dir, [relative(r, "input") for _, r in att.spec.inputs])
            except OSError as e:
                return f"workspace: {e.strerror or e}"
            command = user.wrap(command)
        if not self._start_warm(att, env):
            if self.isolation.wraps:
                try:
                    att.cgroup = self.isolation.prepare(att.spec)
                except OSError as e:
                    return f"spawn failed: cannot make its cgroup: {e.strerror or e}"
                command = self.isolation.wrap(att.cgroup, command)
            if self.launcher is popen_launcher:
                reason = self._spawn_popen(att, env, command)
            else:
                reason = self._spawn_twisted(att, env, command)
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
        self._sampler.start()
        return ""

    def _start_warm(self, att: Attempt, env: dict[str, str]) -> bool:
        """Whether the attempt's leader is a warm interpreter (:mod:`.warm`), now started."""
        pool = self._warm
        args = None if pool is None else warm_args(att.spec.command, env, pool.env, self.python)
        w = None if pool is None or args is None else pool.take(att.spec.mem)
        if w is None or args is None:
            return False
        if not w.go(att.dir, env, args):
            pool.drop(w)  # type: ignore[union-attr]
            return False
        att.cgroup = w.cgroup  # the attempt's from now on: released with it
        self._watch_popen(att, w.popen, w.out_r, w.err_r, w.pidfd)
        return True

    def _spawn_popen(self, att: Attempt, env: dict[str, str], command: list[str]) -> str:
        """``subprocess.Popen`` in a new session; the reactor watches its pipes and pidfd."""
        try:
            popen, out_r, err_r, pidfd = start_popen(command, att.dir, env, self._executables)
        except LaunchFailed as e:
            return e.reason
        self._watch_popen(att, popen, out_r, err_r, pidfd)
        return ""

    def _watch_popen(self, att: Attempt, popen: subprocess.Popen[bytes], out_r: int,
                     err_r: int, pidfd: int) -> None:
        spec = att.spec
        assert att.logs is not None
        att.phase = "running"
        att.started = time.monotonic()
        att.popen = popen
        att.pid = popen.pid
        closed = partial(self._pipe_closed, att)
        att.pipes = [
            PipeReader(self.reactor, spec.attempt_id, out_r, att.logs[0].write, closed),
            PipeReader(self.reactor, spec.attempt_id, err_r, att.logs[1].write, closed),
        ]
        for reader in att.pipes:
            self.reactor.addReader(reader)
        exited = partial(self._popen_exited, att)
        self.reactor.addReader(ExitWatcher(self.reactor, spec.attempt_id, popen, pidfd, exited))

    def _spawn_twisted(self, att: Attempt, env: dict[str, str], command: list[str]) -> str:
        """``reactor.spawnProcess`` through the launcher (``env -C dir -- setsid -- ...``)."""
        spec = att.spec
        assert att.logs is not None
        if not command_found(spec.command[0], att.dir, env.get("PATH")):
            return f"command not found: {spec.command[0]}"
        att.phase = "running"
        att.started = time.monotonic()
        protocol = TaskProcess(
            (att.logs[0].write, att.logs[1].write),
            on_start=partial(self._twisted_started, att),
            on_exit=partial(self._leader_exited, att),
            on_ended=partial(self._process_ended, att),
        )
        try:
            spawn_through_twisted(self.reactor, self.launcher, protocol, att.dir, command, env)
        except LaunchFailed as e:
            return e.reason
        return ""

    async def _store_outputs(self, att: Attempt) -> str:
        """Upload every declared output at once; the first problem in spec order, or ""."""
        if not att.spec.outputs:
            return ""
        att.phase = "uploading"
        for rel, _ in att.spec.outputs:
            problem = output_problem(att.dir, relative(rel, "output"))
            if problem:
                return f"output {rel!r} {problem}"
        if att.spec.result:
            try:
                # Reported with the result and committed with it: no cluster write.
                att.inline = read_small(att.dir, att.spec.result, MAX_INLINE_RESULT) or b""
            except OSError:
                pass  # the upload below says what is wrong with it
        todo = [(r, k) for r, k in att.spec.outputs if not att.inline or r != att.spec.result]
        uploads = [
            maybeDeferred(self.transfers.store, att.dir / rel, key, att.spec.attempt_id)
            for rel, key in todo
        ]
        att.pending = uploads
        results = await DeferredList(uploads, consumeErrors=True)
        att.pending = []
        for (rel, _), (ok, value) in zip(todo, results, strict=True):
            if not ok:
                if value.check(CancelledError):
                    return att.stop_reason or "cancelled"
                return f"output {rel!r} upload failed: {_describe(value)}"
        return ""

    def _finish(self, att: Attempt, reason: str) -> None:
        """Report the result, free the slots, keep or recycle the attempt's directory."""
        for name in list(att.timers):
            att.cancel_timer(name)
        if att.logs is not None:
            att.logs[0].close()
            att.logs[1].close()
        self._release_inputs(att)
        result = att.result(reason)
        del self._active[att.spec.attempt_id]
        self._results[att.spec.attempt_id] = result
        while len(self._results) > MAX_UNACKED:
            dropped = next(iter(self._results))
            log.warn("result of attempt {attempt} never acknowledged: dropped", attempt=dropped)
            del self._results[dropped]
        self.isolation.release(att.cgroup)
        if self._warm is not None:
            self._warm.fill()  # what attempts took
        kept = self._dirs.retire(att.spec.attempt_id, att.dir, bool(att.spec.inputs))
        if kept is not None:
            att.dir = kept
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

    def _release_inputs(self, att: Attempt) -> None:
        """Give back what staging lent the attempt (links into the store, checked now
        that nothing of the attempt runs any more)."""
        if att.dir is None:
            return
        for _, rel in att.spec.inputs:
            try:
                self.transfers.release(att.dir / relative(rel, "input"))
            except Exception:
                log.failure("releasing input {rel!r} of attempt {attempt} failed",
                            rel=rel, attempt=att.spec.attempt_id)

    # --- stopping processes ----------------------------------------------------------

    def _terminate(self, att: Attempt, reason: str) -> None:
        """Stop an attempt for ``reason`` (the first reason given wins)."""
        if att.stop_reason:
            return
        att.stop_reason = reason
        log.info("stopping attempt {attempt}: {reason}", attempt=att.spec.attempt_id, reason=reason)
        for d in list(att.pending):
            d.cancel()
        if att.pid is not None and not att.reaped:
            self._terminate_process(att)

    def _terminate_process(self, att: Attempt) -> None:
        """SIGTERM to the group now, SIGKILL after the grace period."""
        att.cancel_timer("timeout")
        self._signal_group(att, signal_module.SIGTERM)
        if "kill" not in att.timers:
            att.timers["kill"] = self.reactor.callLater(
                self.grace, self._signal_group, att, signal_module.SIGKILL
            )

    def _signal_group(self, att: Attempt, sig: int) -> None:
        """Send ``sig`` to the attempt's group while its leader is not reaped."""
        if att.pid is None or att.reaped:
            return
        signal_group(att.pid, sig)
        if sig == signal_module.SIGKILL:
            self.isolation.kill(att.spec.attempt_id, att.cgroup)

    # --- what the watchers tell ------------------------------------------------------

    def _twisted_started(self, att: Attempt, transport: IProcessTransport) -> None:
        """A process spawned through Twisted has started."""
        att.pid = transport.pid
        att.transport = transport

    def _popen_exited(self, att: Attempt, exit_code: int | None, signal: int | None) -> None:
        """A Popen-started leader was reaped by its exit watcher (or its zygote died)."""
        att.popen = None
        if exit_code is None and signal is None:
            att.stop_reason = att.stop_reason or LOST
        self._leader_exited(att, exit_code, signal)
        self._maybe_ended(att)

    def _leader_exited(self, att: Attempt, exit_code: int | None, signal: int | None) -> None:
        """The leader was reaped: record how, kill what is left of its group."""
        att.duration = time.monotonic() - att.started
        att.exit_code = exit_code
        att.signal = signal
        att.cancel_timer("timeout")
        att.cancel_timer("kill")
        assert att.pid is not None
        kill_leftovers(att.pid)
        att.reaped = True
        self.isolation.kill(att.spec.attempt_id, att.cgroup)  # what left the group too
        if att.transport is not None:
            att.timers["drain"] = self.reactor.callLater(
                DRAIN_TIMEOUT, att.transport.loseConnection
            )
        elif att.pipes:
            att.timers["drain"] = self.reactor.callLater(DRAIN_TIMEOUT, self._close_pipes, att)
        self._sampler.stop_if_idle()

    def _close_pipes(self, att: Attempt) -> None:
        """The drain timeout: stop waiting for pipes a process outside the group holds."""
        att.timers.pop("drain", None)
        for reader in list(att.pipes):
            reader.close()

    def _pipe_closed(self, att: Attempt, reader: FdReader) -> None:
        """One pipe of a Popen-started attempt is closed."""
        if reader in att.pipes:
            att.pipes.remove(reader)
        self._maybe_ended(att)

    def _maybe_ended(self, att: Attempt) -> None:
        """A Popen-started attempt has ended once reaped with both pipes closed."""
        if att.reaped and not att.pipes and not att.ended.called:
            self._process_ended(att)

    def _process_ended(self, att: Attempt) -> None:
        """All output is in: the attempt may move on to its outputs."""
        att.cancel_timer("drain")
        if att.logs is not None:
            att.logs[0].close()
            att.logs[1].close()
        att.ended.callback(None)

    # --- bookkeeping -----------------------------------------------------------------

    def _live_groups(self) -> dict[int, Attempt]:
        """Attempts whose leader is spawned and not reaped, by group id."""
        return {a.pid: a for a in self._active.values() if a.pid is not None and not a.reaped}

    def _notify_change(self) -> None:
        """Call on_change, logging (not raising) its errors."""
        try:
            self.on_change()
        except Exception:
            log.failure("on_change failed")
