"""The simulation's task runner: attempts that "run" on a clock, with no processes.

Owns :class:`FakeTaskManager` (the interface of :class:`dsml.worker.tasks.TaskManager`
that the worker's glue uses, with the same refusals), how an attempt goes
(:class:`FakeRun`, a :data:`Script` choosing one per attempt, :func:`default_script`
reading the task's ``SIM_*`` environment), what the runner did (:class:`TaskEvent`) and
what a dead worker process leaves running (:class:`Orphan`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import attrs
from twisted.internet.defer import Deferred, DeferredList, succeed
from twisted.internet.interfaces import IDelayedCall
from twisted.logger import Logger

from ...worker.tasks import (
    STDERR_NAME,
    STDOUT_NAME,
    TIMEOUT_PREFIX,
    AttemptLedger,
    AttemptResult,
    AttemptSpec,
    TaskError,
    tail_text,
)
from .process import ProcessClock

log = Logger()


#: SIGTERM: how a fake attempt that was cancelled or timed out "died".
SIGTERM = 15


@attrs.frozen
class FakeRun:
    """How one fake attempt goes: it "runs" ``duration`` simulated seconds, then exits.

    ``reason`` None means the usual one: ``""`` for exit 0 with no signal, ``"exit N"``,
    ``"killed by signal N"``.  ``stdout`` and ``stderr`` are written to its logs when it
    starts; a failed attempt's result carries the tail of ``stderr``, as a real one's does.
    """

    duration: float = 1.0
    exit_code: int | None = 0
    signal: int | None = None
    reason: str | None = None
    stdout: bytes = b""
    stderr: bytes = b""

    def result(self, attempt_id: int, duration: float) -> AttemptResult:
        """The result of an attempt that ran to its end."""
        reason = self.reason
        if reason is None:
            if self.signal is not None:
                reason = f"killed by signal {self.signal}"
            elif self.exit_code != 0:
                reason = f"exit {self.exit_code}"
            else:
                reason = ""
        return AttemptResult(
            attempt_id, self.exit_code, self.signal, duration, 0, reason,
            tail_text(self.stderr) if reason else "",
        )


#: Decides how an attempt goes: ``script(worker name, spec)``.
Script = Callable[[str, AttemptSpec], FakeRun]


def default_script(worker: str, spec: AttemptSpec) -> FakeRun:
    """The task's own environment says: ``SIM_DURATION`` seconds (1 by default), then exit
    ``SIM_EXIT`` (0 by default); ``SIM_STDOUT`` and ``SIM_STDERR`` are what it prints."""
    env = dict(spec.env)
    return FakeRun(
        duration=float(env.get("SIM_DURATION", 1.0)),
        exit_code=int(env.get("SIM_EXIT", 0)),
        stdout=env.get("SIM_STDOUT", "").encode(),
        stderr=env.get("SIM_STDERR", "").encode(),
    )


@attrs.frozen
class TaskEvent:
    """Something a fake task runner did: ``start``, ``cancel`` (told to stop), ``end``
    (reported a result), ``adopt`` (a new worker process took over the attempt)."""

    time: float
    worker: str
    what: str
    attempt_id: int
    job_id: str
    task_index: int
    result: AttemptResult | None = None


@attrs.define(eq=False)
class _FakeAttempt:
    spec: AttemptSpec
    run: FakeRun
    started: float
    ends_at: float
    timer: IDelayedCall | None = None
    stop_reason: str = ""
    uploading: Deferred[Any] | None = None


@attrs.frozen
class Orphan:
    """An attempt still "running" when its worker process died (see
    :meth:`FakeTaskManager.orphans`): it may be adopted by the next process."""

    spec: AttemptSpec
    run: FakeRun
    started: float
    ends_at: float


class FakeTaskManager(AttemptLedger):
    """The :class:`~dsml.worker.tasks.TaskManager` of a simulated worker: no processes.

    Same interface as the glue (:class:`~dsml.worker.runner.WorkerJobs`) uses: ``start``,
    ``cancel``, ``free_slots``, ``running``, ``finished_results``, ``ack``, ``logs``,
    ``stop``, with the same refusals (``busy``, ``duplicate``, ``bad-task``,
    ``stopping``).  An attempt "runs" for the :class:`FakeRun` that ``script`` gives it,
    on the worker's :class:`ProcessClock` (so a killed worker's attempts die with it), is
    killed at its ``timeout``, ends a ``kill_delay`` after :meth:`cancel`, and then
    reports through ``on_result`` like the real one.  Its inputs and outputs are not
    moved, only recorded (:attr:`inputs`, :attr:`outputs`, the whole :attr:`specs`;
    the worker's real transfers can stage them: ``SimCluster.workers[name].transfers``);
    its logs are real files.
    Every start, cancel and end is appended to ``events``.
    """

    def __init__(
        self,
        clock: ProcessClock,
        *,
        name: str,
        slots: int,
        work_dir: Path,
        on_result: Callable[[AttemptResult], None],
        script: Script = default_script,
        events: list[TaskEvent] | None = None,
        on_change: Callable[[], None] = lambda: None,
        kill_delay: float = 0.0,
        transfers: Any = None,
    ) -> None:
        self.clock = clock
        #: With the worker's transfers, an attempt that exits 0 stores its declared
        #: outputs (as the real runner does, through ``transfers.store`` as that
        #: attempt's outputs) before it reports: each output file holds
        #: :func:`output_bytes` of the attempt.  Without, outputs are only recorded.
        self.transfers = transfers
        self.name = name
        self.slots = slots
        self.work_dir = Path(work_dir)
        self.on_result = on_result
        self.on_change = on_change
        self.script = script
        self.events: list[TaskEvent] = [] if events is None else events
        #: Seconds from :meth:`cancel` to the attempt's end (SIGTERM to exit).
        self.kill_delay = kill_delay
        #: The most slots ever held at once.
        self.peak = 0
        #: Attempt ids :meth:`cancel` was called for (known or not), in order.
        self.cancelled: list[int] = []
        #: Inputs and outputs of every attempt started, by attempt id.
        self.inputs: dict[int, tuple[tuple[str, str], ...]] = {}
        self.outputs: dict[int, tuple[tuple[str, str], ...]] = {}
        #: The spec of every attempt started (as the run order said), by attempt id.
        self.specs: dict[int, AttemptSpec] = {}
        self._active: dict[int, _FakeAttempt] = {}
        self._results: dict[int, AttemptResult] = {}
        self._kept: set[int] = set()
        self._done: dict[int, Deferred[None]] = {}
        self._stopping = False
        self.work_dir.mkdir(parents=True, exist_ok=True)

    # -- what the glue asks ---------------------------------------------------------

    def used(self) -> int:
        """Slots held by attempts."""
        return self.slots - self.free_slots()

    def start(self, spec: AttemptSpec) -> None:
        """Take the attempt (TaskError as the real one refuses) and start its run."""
        if self._stopping:
            raise TaskError("the worker is stopping", "stopping")
        aid = spec.attempt_id
        if aid in self._active or aid in self._results:
            raise TaskError(f"attempt {aid} already ran here", "duplicate")
        if not spec.command or not spec.command[0]:
            raise TaskError("empty command", "bad-task")
        if spec.slots < 1 or spec.slots > self.slots:
            raise TaskError(f"needs {spec.slots} slots; this worker has {self.slots}", "bad-task")
        free = self.free_slots()
        if spec.slots > free:
            raise TaskError(f"busy: {spec.slots} slots wanted, {free} free", "busy")
        run = self.script(self.name, spec)
        now = self.clock.seconds()
        att = _FakeAttempt(spec, run, now, now + run.duration)
        self._begin(att)
        self.inputs[aid] = spec.inputs
        self.outputs[aid] = spec.outputs
        self.specs[aid] = spec
        d = self.work_dir / str(aid)
        d.mkdir(parents=True, exist_ok=True)
        (d / STDOUT_NAME).write_bytes(run.stdout)
        (d / STDERR_NAME).write_bytes(run.stderr)
        self._event("start", att)
        self._notify_change()

    def _begin(self, att: _FakeAttempt) -> None:
        """Hold its slots and arm its end (or its timeout)."""
        spec = att.spec
        self._active[spec.attempt_id] = att
        self._done[spec.attempt_id] = Deferred()
        self.peak = max(self.peak, self.used())
        left = max(0.0, att.ends_at - self.clock.seconds())
        limit = None if spec.timeout is None else att.started + spec.timeout - self.clock.seconds()
        if limit is not None and limit < left:
            att.timer = self.clock.callLater(
                max(0.0, limit), self._stop, att, f"{TIMEOUT_PREFIX}{spec.timeout:g} s", 0.0
            )
        else:
            att.timer = self.clock.callLater(left, self._exited, att)

    def cancel(self, attempt_id: int, reason: str = "cancelled") -> None:
        """Stop an attempt: it ends ``kill_delay`` later with ``reason``.  Unknown or
        finished attempts are ignored (as the real one does)."""
        self.cancelled.append(attempt_id)
        att = self._active.get(attempt_id)
        if att is not None:
            self._event("cancel", att)
            self._stop(att, reason, self.kill_delay)

    def stop(self) -> Deferred[None]:
        """Refuse new attempts; stop the running ones ("worker stopping")."""
        self._stopping = True
        waiting = list(self._done.values())
        for att in list(self._active.values()):
            self._stop(att, "worker stopping", 0.0)
        if not waiting:
            return succeed(None)
        return DeferredList(waiting).addCallback(lambda _: None)

    # -- for the simulation ---------------------------------------------------------

    def orphans(self) -> list[Orphan]:
        """The attempts running now, with the end their script gave them (taken by
        :meth:`SimCluster.kill` before the process dies)."""
        return [
            Orphan(a.spec, a.run, a.started, a.ends_at)
            for a in self._active.values()
            if not a.stop_reason
        ]

    def adopt(self, orphans: Iterable[Orphan]) -> None:
        """Take over attempts an earlier process of this worker left running: they go on
        to their scripted end; one that ended meanwhile has its result waiting to be sent."""
        for o in orphans:
            att = _FakeAttempt(o.spec, o.run, o.started, o.ends_at)
            self._event("adopt", att)
            if o.ends_at <= self.clock.seconds():
                self._active[o.spec.attempt_id] = att
                self._done[o.spec.attempt_id] = Deferred()
                self._exited(att)  # its outputs are stored now, if it has any
            else:
                self._begin(att)

    # -- the runs -------------------------------------------------------------------

    def _exited(self, att: _FakeAttempt) -> None:
        att.timer = None
        result = att.run.result(att.spec.attempt_id, att.run.duration)
        if self.transfers is None or not att.spec.outputs or result.reason:
            self._finish(att, result)
            return
        self._upload(att, result)

    def _upload(self, att: _FakeAttempt, result: AttemptResult) -> None:
        """Store the attempt's outputs, then finish it (failed if an upload failed)."""
        spec = att.spec
        d = self.work_dir / str(spec.attempt_id)
        uploads = []
        for i, (_, key) in enumerate(spec.outputs):
            path = d / f"output-{i}"
            path.write_bytes(output_bytes(self.name, spec.attempt_id, key))
            uploads.append(self.transfers.store(path, key, spec.attempt_id))
        att.uploading = DeferredList(uploads, consumeErrors=True)

        def done(results: list[tuple[bool, Any]]) -> None:
            att.uploading = None
            if spec.attempt_id not in self._active or att.stop_reason:
                return  # cancelled or killed meanwhile: _killed reports it
            bad = [v for ok, v in results if not ok]
            if bad:
                why = getattr(bad[0].value, "message", None) or bad[0].getErrorMessage()
                self._finish(att, attrs.evolve(result, exit_code=None,
                                               reason=f"output upload failed: {why}"))
            else:
                self._finish(att, result)

        att.uploading.addCallback(done)
        self._event("upload", att)

    def _stop(self, att: _FakeAttempt, reason: str, delay: float) -> None:
        if att.stop_reason or att.spec.attempt_id not in self._active:
            return
        att.stop_reason = reason
        if att.timer is not None and att.timer.active():
            att.timer.cancel()
        att.timer = self.clock.callLater(delay, self._killed, att)

    def _killed(self, att: _FakeAttempt) -> None:
        att.timer = None
        duration = self.clock.seconds() - att.started
        self._finish(
            att,
            AttemptResult(att.spec.attempt_id, None, SIGTERM, duration, 0, att.stop_reason,
                          tail_text(att.run.stderr)),
        )

    def _finish(self, att: _FakeAttempt, result: AttemptResult) -> None:
        aid = att.spec.attempt_id
        del self._active[aid]
        self._results[aid] = result
        self._kept.add(aid)
        self._event("end", att, result)
        self._notify_change()
        try:
            self.on_result(result)
        except Exception:
            log.failure("on_result failed for attempt {attempt}", attempt=aid)
        self._done.pop(aid).callback(None)

    def _event(self, what: str, att: _FakeAttempt, result: AttemptResult | None = None) -> None:
        s = att.spec
        self.events.append(
            TaskEvent(self.clock.seconds(), self.name, what, s.attempt_id, s.job_id,
                      s.task_index, result)
        )

    def _notify_change(self) -> None:
        try:
            self.on_change()
        except Exception:
            log.failure("on_change failed")


def output_bytes(worker: str, attempt_id: int, key: str) -> bytes:
    """What a fake attempt writes as its output ``key``: names the attempt, so a check
    can tell whose output a stored key is."""
    return f"output {key} of attempt {attempt_id} on {worker}\n".encode()


__all__ = [
    "SIGTERM",
    "output_bytes",
    "FakeRun",
    "FakeTaskManager",
    "Orphan",
    "Script",
    "TaskEvent",
    "default_script",
]
