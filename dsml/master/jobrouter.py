"""The master's side of jobs: client requests, dispatch to workers, results back.

The :class:`~dsml.master.jobs.JobManager` decides (queue, attempts, fencing) and keeps
it durable; this module moves messages.  Tasks go to a worker down its link the moment
it has free slots (after a submit, a result, a registration), not at the next heartbeat.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from typing import Any

from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure

from ..errors import DsmlError
from ..net.server import Reply, ServerProtocol
from ..protocol.codec import Head
from .directory import Directory, DirectoryError
from .jobs import Assignment, FinishedReport, JobError, JobManager, JobSpec, JobView, TaskSpec
from .membership import Membership, WorkerRecord

log = Logger()

#: Longest a ``wait`` request is held before it is answered with the job as it is.
WAIT_MAX = 600


def job_spec_from_json(data: Any) -> JobSpec:
    """A JobSpec from the JSON a client submits; JobError for anything malformed."""
    try:
        tasks = tuple(
            TaskSpec(
                command=tuple(str(a) for a in t["command"]),
                env=tuple((str(k), str(v)) for k, v in dict(t.get("env", {})).items()),
                inputs=tuple((str(k), str(p)) for k, p in t.get("inputs", ())),
                outputs=tuple((str(p), str(k)) for p, k in t.get("outputs", ())),
                slots=int(t.get("slots", 1)),
                timeout=None if t.get("timeout") is None else float(t["timeout"]),
                max_attempts=int(t.get("max_attempts", 3)),
            )
            for t in data["tasks"]
        )
        return JobSpec(
            name=str(data.get("name", "")),
            tasks=tasks,
            priority=int(data.get("priority", 0)),
            after=tuple(str(j) for j in data.get("after", ())),
        )
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise JobError(f"malformed job: {e}", "bad-job") from None


def job_json(view: JobView, queued: Mapping[int, str] | None = None) -> dict[str, Any]:
    """A job view as JSON (``dsml status``, ``wait`` and ``jobs``).

    Each task's ``waiting_for`` says why it waits: the view's sentence for a ``waiting``
    task, ``queued[index]`` for a ``queued`` one (the router's, from the workers: see
    :meth:`JobRouter.queued_reasons`), else "".  Each attempt's ``number`` is its place
    among its task's attempts, from 1; ``id`` stays the master's attempt id.
    """
    queued = queued or {}
    return {
        "id": view.id,
        "name": view.name,
        "state": view.state,
        "priority": view.priority,
        "after": list(view.after),
        "created": view.created,
        "started": view.started,
        "finished": view.finished,
        "reason": view.reason,
        "counts": view.counts,
        "done": view.done,
        "total": view.total,
        "tasks": [
            {
                "index": t.index,
                "state": t.state,
                "reason": t.reason,
                "waiting_for": t.waiting_for or queued.get(t.index, ""),
                "attempts": [
                    {
                        "id": a.id,
                        "number": number,
                        "worker": a.worker,
                        "state": a.state,
                        "started": a.started,
                        "ended": a.ended,
                        "exit_code": a.exit_code,
                        "signal": a.signal,
                        "duration": a.duration,
                        "peak_rss": a.peak_rss,
                        "reason": a.reason,
                        "stderr_tail": a.stderr_tail,
                    }
                    for number, a in enumerate(t.attempts, 1)
                ],
            }
            for t in view.tasks
        ],
    }


def assignment_json(a: Assignment) -> bytes:
    """The ``run`` order's payload."""
    s = a.spec
    return json.dumps(
        {
            "attempt_id": a.attempt_id,
            "job_id": a.job_id,
            "task_index": a.task_index,
            "command": list(s.command),
            "env": [list(p) for p in s.env],
            "inputs": [list(p) for p in s.inputs],
            "outputs": [list(p) for p in s.outputs],
            "slots": s.slots,
            "timeout": s.timeout,
        }
    ).encode()


class JobRouter:
    """Answers the job methods and keeps workers busy."""

    def __init__(
        self,
        *,
        jobs: JobManager,
        membership: Membership,
        directory: Directory,
        clock: Any,
    ) -> None:
        self.jobs = jobs
        self.membership = membership
        self.directory = directory
        self.clock = clock
        self._dispatch_call: Any = None
        # Fix (tests/test_jobs_sim.py): the slots of attempts a worker was told to kill,
        # by worker then attempt, until the worker reports them ended (a result, taken or
        # refused), re-registers (its Running list is then the truth) or dies.  The
        # manager forgets a cancelled attempt at once, but the worker holds its slots
        # until the process is gone (SIGTERM, then SIGKILL after a grace period); a run
        # order sent meanwhile was refused as busy, and that wasted one of the task's
        # attempts (with max_attempts=1, failed it).
        self._killing: dict[str, dict[int, int]] = {}
        self.fns: dict[str, Callable[[Head, bytes, ServerProtocol], Any]] = {
            "submit": self._submit,
            "jobs": self._jobs,
            "status": self._status,
            "cancel": self._cancel,
            "wait": self._wait,
            "logs": self._logs,
            "task_result": self._task_result,
        }
        membership.on_dead.append(self._worker_dead)

    # -- events from the rest of the master --------------------------------------------

    def registered(self, record: WorkerRecord, running: list[int]) -> None:
        """A worker (re)registered with the attempts it still runs: reconcile, then feed it."""
        kill = self.jobs.reconcile(record.name, record.incarnation, running, [])
        killing = self._killing[record.name] = {}
        for attempt in kill:
            # Its slots are unknown here (the master no longer holds it): at least one.
            killing[attempt] = max(1, self.jobs.slots_of(attempt))
            _order(record, "kill", {"Attempt": attempt})
        self.dispatch_soon()

    def _worker_dead(self, record: WorkerRecord) -> None:
        if self.jobs.closed:
            return
        self._killing.pop(record.name, None)  # gone with its process
        lost = self.jobs.worker_lost(record.name, record.incarnation)
        if lost:
            log.warn(
                "worker {name} died with {n} attempts running: lost, tasks requeued",
                name=record.name, n=len(lost),
            )
        self.dispatch_soon()

    def dispatch_soon(self) -> None:
        """Dispatch on the next reactor turn (a burst of events dispatches once)."""
        if self._dispatch_call is None or not self._dispatch_call.active():
            self._dispatch_call = self.clock.callLater(0, self.dispatch)

    def dispatch(self) -> None:
        """Offer queued tasks to every alive worker with free slots.

        Fix (tests/test_jobs_sim.py): locality used to be only each worker's preference
        among the queued tasks, and workers were offered work in name order, so with all
        workers free a task always went to the first one, whoever held its inputs.  Now a
        first pass offers every free worker only tasks whose inputs it holds (priority
        still first), then a second pass offers what is left as before.
        """
        try:
            if not self.jobs.queued:
                return
            where: dict[str, set[str]] = {}  # key -> workers holding it, for this dispatch
            passes = (True, False) if self.jobs._queued_inputs else (False,)
            for local_only in passes:
                for record in self.membership.alive():
                    if record.conn is None:
                        continue
                    free = record.slots - self._busy(record.name)
                    if free <= 0:
                        continue
                    holds = self._holds(record.name, where)
                    for a in self.jobs.next_assignments(
                        record.name, record.incarnation, free, holds, local_only=local_only
                    ):
                        self._send(record, a)
                    if not self.jobs.queued:
                        return
        except Exception:
            log.failure("dispatch failed")

    def _busy(self, worker: str) -> int:
        """Slots held by the attempts the master has running on ``worker``."""
        running = self.jobs._running
        return sum(
            running[a].task.spec.slots for a in self.jobs.running_attempts(worker) if a in running
        ) + sum(self._killing.get(worker, {}).values())

    def _holds(self, worker: str, where: dict[str, set[str]]) -> Callable[[str], bool]:
        def holds(key: str) -> bool:
            workers = where.get(key)
            if workers is None:
                try:
                    workers = {r.worker for r in self.directory.locate(key)}
                except DirectoryError:
                    workers = set()
                where[key] = workers
            return worker in workers

        return holds

    def _send(self, record: WorkerRecord, a: Assignment) -> None:
        d = _order(record, "run", {"Attempt": a.attempt_id}, assignment_json(a))

        def refused(f: Failure) -> None:
            # The worker would not start it (busy, bad task, gone): the attempt ends here
            # and counts; the task is retried while attempts remain.
            why = f.value.message if isinstance(f.value, DsmlError) else f.getErrorMessage()
            self.jobs.finished(
                a.attempt_id, record.name, record.incarnation, exit_code=None, signal=None,
                duration=0.0, peak_rss=0, reason=f"could not start on {record.name}: {why}",
            ).addBoth(lambda _: self.dispatch_soon())

        d.addErrback(refused)

    # -- requests ---------------------------------------------------------------------

    def _submit(self, head: Head, payload: bytes, conn: ServerProtocol) -> Deferred[Reply]:
        try:
            data = json.loads(payload)
        except ValueError as e:
            raise JobError(f"job is not JSON: {e}", "bad-job") from None
        spec = job_spec_from_json(data)
        widest = max((t.slots for t in spec.tasks), default=1)
        largest = max((r.slots for r in self.membership.all()), default=0)
        if largest and widest > largest:
            # It could never run (until a bigger worker joins): say so now rather than
            # leave it queued with nothing said.
            raise JobError(
                f"a task needs {widest} slots; the largest worker has {largest}", "bad-job"
            )
        d = self.jobs.submit(spec)

        def acknowledged(job_id: str) -> Reply:
            self.dispatch_soon()
            return Reply({"Job": job_id, "Tasks": len(spec.tasks)})

        return d.addCallback(acknowledged)

    def _jobs(self, head: Head, payload: bytes, conn: ServerProtocol) -> Reply:
        limit = min(int(head.headers.get("limit", 100)), 10_000)
        lines = [json.dumps(job_json(v)) for v in self.jobs.jobs(limit)]
        return Reply({}, ("\n".join(lines) + "\n").encode() if lines else b"")

    def _status(self, head: Head, payload: bytes, conn: ServerProtocol) -> Reply:
        view = self.jobs.job(head.headers["job"])
        return Reply({"State": view.state}, self._status_json(view))

    def _status_json(self, view: JobView) -> bytes:
        """The status payload: the job's JSON, with why its queued tasks wait now."""
        return json.dumps(job_json(view, self.queued_reasons(view))).encode()

    def queued_reasons(self, view: JobView) -> dict[int, str]:
        """Why each queued task of ``view`` waits, by task index, as the workers are now.

        "no live worker" when no worker is alive (a suspect one gets no work, see
        :meth:`dispatch`); "a worker with N free slots (the largest live worker has M)"
        for a task wider than every live worker; else "a free slot (K tasks queued
        ahead)", or "a free slot" when the manager does not count
        (:meth:`~dsml.master.jobs.JobManager.queue_places`).  O(tasks of the job) plus
        O(workers).
        """
        if not view.counts.get("queued"):
            return {}
        places = self.jobs.queue_places(view.id)
        if not places:
            return {}
        alive = self.membership.alive()
        if not alive:
            return dict.fromkeys(places, "no live worker")
        largest = max(r.slots for r in alive)
        reasons: dict[int, str] = {}
        for index, place in places.items():
            if place.slots > largest:
                reasons[index] = (
                    f"a worker with {place.slots} free slots"
                    f" (the largest live worker has {largest})"
                )
            elif place.ahead is None:
                reasons[index] = "a free slot"
            else:
                tasks = "task" if place.ahead == 1 else "tasks"
                reasons[index] = f"a free slot ({place.ahead} {tasks} queued ahead)"
        return reasons

    def _cancel(self, head: Head, payload: bytes, conn: ServerProtocol) -> Deferred[Reply]:
        job_id = head.headers["job"]
        # Their slots, read before the cancel forgets them (see _killing).
        held = {
            a.id: (a.worker, self.jobs.slots_of(a.id))
            for t in self.jobs.job(job_id).tasks
            for a in t.attempts
            if a.state == "running"
        }
        d = self.jobs.cancel(job_id)
        for attempt, (worker, slots) in held.items():
            self._killing.setdefault(worker, {})[attempt] = slots

        def kill(attempts: list[tuple[str, int]]) -> Reply:
            for worker, attempt in attempts:
                record = self.membership.get(worker)
                if record is not None and record.live:
                    _order(record, "kill", {"Attempt": attempt})
            return Reply({"Killed": len(attempts)})

        return d.addCallback(kill)

    def _wait(self, head: Head, payload: bytes, conn: ServerProtocol) -> Deferred[Reply]:
        job_id = head.headers["job"]
        timeout = min(int(head.headers.get("timeout", 60)), WAIT_MAX)
        self.jobs.job(job_id, tasks=False)  # not-found at once
        d = self.jobs.wait_for(job_id)
        result: Deferred[Reply] = Deferred()

        def final(view: JobView) -> None:
            if timer.active():
                timer.cancel()
            if not result.called:
                full = self.jobs.job(view.id)
                result.callback(Reply({"State": full.state, "Final": 1},
                                      self._status_json(full)))

        def expired() -> None:
            if not result.called:
                view = self.jobs.job(job_id)
                result.callback(Reply({"State": view.state, "Final": 0},
                                      self._status_json(view)))

        timer = self.clock.callLater(timeout, expired)
        d.addCallback(final)
        d.addErrback(lambda f: None if result.called else result.errback(f))
        return result

    def _logs(self, head: Head, payload: bytes, conn: ServerProtocol) -> Reply:
        h = head.headers
        view = self.jobs.job(h["job"])
        task_index = int(h.get("task", 0))
        tasks = [t for t in view.tasks if t.index == task_index]
        if not tasks:
            raise JobError(f"job {view.id} has no task {task_index}", "not-found")
        attempts = tasks[0].attempts
        if "attempt" in h:
            attempts = tuple(a for a in attempts if a.id == int(h["attempt"]))
        if not attempts:
            raise JobError(f"task {task_index} of {view.id} has not run yet", "not-found")
        a = attempts[-1]
        record = self.membership.get(a.worker)
        if record is None:
            raise DsmlError(f"worker {a.worker} that ran it is unknown now", "unavailable")
        return Reply(
            {
                "Attempt": a.id,
                "Worker": f"{record.name}={record.host}:{record.port}",
                "State": a.state,
                "Live": 1 if record.live else 0,
            }
        )

    def _task_result(self, head: Head, payload: bytes, conn: ServerProtocol) -> Deferred[Reply]:
        name, incarnation = head.headers["name"], int(head.headers["incarnation"])
        waits = []
        killing = self._killing.get(name, {})
        for line in payload.splitlines():
            try:
                r = json.loads(line)
                killing.pop(int(r["attempt_id"]), None)  # ended: its slots are free
                waits.append(
                    self.jobs.finished(
                        int(r["attempt_id"]), name, incarnation,
                        exit_code=r.get("exit_code"), signal=r.get("signal"),
                        duration=float(r.get("duration", 0.0)),
                        peak_rss=int(r.get("peak_rss", 0)), reason=str(r.get("reason", "")),
                        stderr_tail=_tail(r),
                    )
                )
            except (ValueError, KeyError, TypeError):
                continue
        from twisted.internet.defer import gatherResults

        def done(results: list[bool]) -> Reply:
            return Reply({"Taken": sum(1 for r in results if r), "Refused":
                          sum(1 for r in results if not r)})

        # The manager's memory already has the results: refill the freed slots now,
        # not after the commit (the worker's acknowledgement still waits for it).
        self.dispatch_soon()
        return gatherResults(waits, consumeErrors=True).addCallback(done)


def finished_report(r: dict[str, Any]) -> FinishedReport:
    """A worker's JSON result as a FinishedReport."""
    return FinishedReport(
        int(r["attempt_id"]), r.get("exit_code"), r.get("signal"),
        float(r.get("duration", 0.0)), int(r.get("peak_rss", 0)), str(r.get("reason", "")),
        _tail(r),
    )


def _tail(r: dict[str, Any]) -> str:
    """A result's ``stderr_tail`` if it is text ("" otherwise; the manager caps it)."""
    tail = r.get("stderr_tail", "")
    return tail if isinstance(tail, str) else ""


def _order(
    record: WorkerRecord, method: str, headers: dict[str, object], payload: bytes = b""
) -> Deferred[Any]:
    conn = record.conn
    if conn is None or not getattr(conn, "connected", False):
        d: Deferred[Any] = Deferred()
        d.errback(DsmlError(f"worker {record.name} has no link", "unavailable"))
        return d
    d = conn.request(method, headers, payload)
    if method == "kill":
        d.addErrback(lambda f: None)
    return d  # type: ignore[no-any-return]
