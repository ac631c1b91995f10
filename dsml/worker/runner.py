"""A worker's side of jobs: ``run``/``kill`` orders in, results out, task logs served.

The :class:`~dsml.worker.tasks.TaskManager` runs the processes; this module connects it
to the master link (orders down, results up, re-sent after a reconnect until the master
acknowledges them).  Its inputs and outputs move through :mod:`dsml.worker.transfers`.
The orders and ``task_log`` are answered by :class:`TaskOrders` and :class:`TaskLogs`,
which declare who may call them.
"""

from __future__ import annotations

import base64
import json
import os
from collections.abc import Callable, Collection
from typing import Any

from twisted.logger import Logger
from twisted.python.failure import Failure

from ..errors import DsmlError
from ..net.access import DEFAULT_ADMINS, may_act_on
from ..net.connection import Connection
from ..net.responders import Reply, responder
from ..protocol.codec import Head
from ..protocol.methods import Role
from .link import MasterSession
from .tasks import AttemptResult, AttemptSpec, InputVersion, TaskError, TaskManager

log = Logger()

#: Most bytes of a task log one ``task_log`` request returns.
LOG_CHUNK = 1024 * 1024

#: Seconds a batch of results may wait before it goes to the master.
RESULT_DELAY = 0.0

#: Owners of attempts remembered for ``task_log`` (the newest; far more than the
#: finished attempt directories a worker keeps by default).
MAX_OWNERS = 50_000


def _count(name: str, value: object) -> int:
    """The ``mem`` (bytes; 0: no limit) or ``gpus`` of a run order: a non-negative
    integer (null: 0)."""
    if value is None:
        return 0
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{name} must be a non-negative integer, not {value!r}")
    return value


def spec_from_json(payload: bytes) -> AttemptSpec:
    """The AttemptSpec of a ``run`` order (``versions``, the inputs' current versions,
    may be absent: a master that does not send them makes every input a download)."""
    try:
        d = json.loads(payload)
        return AttemptSpec(
            attempt_id=int(d["attempt_id"]),
            job_id=str(d["job_id"]),
            task_index=int(d["task_index"]),
            command=tuple(str(a) for a in d["command"]),
            env=tuple((str(k), str(v)) for k, v in d.get("env", ())),
            inputs=tuple((str(k), str(p)) for k, p in d.get("inputs", ())),
            outputs=tuple((str(p), str(k)) for p, k in d.get("outputs", ())),
            slots=int(d.get("slots", 1)),
            timeout=None if d.get("timeout") is None else float(d["timeout"]),
            versions=tuple(
                (str(k), InputVersion(int(v["version"]), str(v["sha256"])))
                for k, v in dict(d.get("versions") or {}).items()
            ),
            owner=str(d.get("owner") or ""),
            mem=_count("mem", d.get("mem")),
            gpus=_count("gpus", d.get("gpus")),
            result=str(d.get("result") or ""),
        )
    except (ValueError, KeyError, TypeError) as e:
        raise DsmlError(f"malformed run order: {e}", "bad-task") from None


def result_json(r: AttemptResult) -> str:
    """One line of a ``task_result`` report (``stderr_tail`` only when there is one)."""
    d: dict[str, Any] = {
        "attempt_id": r.attempt_id,
        "exit_code": r.exit_code,
        "signal": r.signal,
        "duration": r.duration,
        "peak_rss": r.peak_rss,
        "reason": r.reason,
    }
    if r.stderr_tail:
        d["stderr_tail"] = r.stderr_tail
    if r.result:
        d["result"] = base64.b64encode(r.result).decode()
    return json.dumps(d)


#: What the task manager calls with each attempt's result.
OnResult = Callable[[AttemptResult], None]

#: Builds the task manager, given the callback for its results (production: a
#: TaskManager; the simulation: its fake one).
MakeTasks = Callable[[OnResult], TaskManager]


class WorkerJobs:
    """The worker's side of jobs: its task manager, and the results sent to the master.

    ``make_tasks(on_result)`` builds the task manager (without it the worker runs no
    tasks); it may report results at once (attempts adopted from an earlier process).
    Results go to the master on the current registration (:meth:`session_changed`, told
    by the worker's link) until it acknowledges them; they are sent again after the next
    registration.  The orders ``run``/``kill`` and the ``task_log`` method are answered
    by :class:`TaskOrders` and :class:`TaskLogs` over it.
    """

    def __init__(self, clock: Any, make_tasks: MakeTasks | None = None) -> None:
        self.clock = clock
        self._session: MasterSession | None = None
        self._send_call: Any = None
        self._sending: set[int] = set()
        #: Who owns each attempt started here (its job's submitter), newest last, for
        #: ``task_log``; forgotten by a restart (then the attempt's logs are the admins').
        self.owners: dict[int, str] = {}
        self.tasks: TaskManager | None = None
        if make_tasks is not None:
            self.tasks = make_tasks(self.on_result)

    def running(self) -> list[int]:
        """Attempts running here (told to the master when registering), and those that
        ended with a result the master has not acknowledged yet.

        Both are named: the master's reconcile declares every attempt it holds that is
        not named *lost*, so an attempt that ended while the master (or the link) was
        down must be named too, or it would be rerun and its result refused.  Named, it
        is kept (re-bound to the new incarnation) and its result is taken; one the master
        no longer holds is answered with a kill order, a no-op for an ended attempt.
        """
        if self.tasks is None:
            return []
        running = self.tasks.running()
        ended = [r.attempt_id for r in self.tasks.finished_results() if r.attempt_id not in running]
        return running + ended

    def started(self, attempt_id: int, owner: str) -> None:
        """Remember who owns attempt ``attempt_id`` (the last :data:`MAX_OWNERS`)."""
        owners = self.owners
        owners.pop(attempt_id, None)
        owners[attempt_id] = owner
        while len(owners) > MAX_OWNERS:
            del owners[next(iter(owners))]

    def owner_of(self, attempt_id: int) -> str | None:
        """Who owns attempt ``attempt_id``, None if not known here."""
        return self.owners.get(attempt_id) or None

    def free_slots(self) -> int:
        """Free task slots (told to the master with each heartbeat)."""
        return self.tasks.free_slots() if self.tasks is not None else 0

    # -- results ----------------------------------------------------------------------

    def session_changed(self, session: MasterSession | None) -> None:
        """The worker registered (``session``) or lost its link (None)."""
        self._session = session
        if session is not None:
            self.send_results_soon()

    def on_result(self, result: AttemptResult) -> None:
        """An attempt ended: tell the master soon (batched)."""
        self.send_results_soon()

    def send_results_soon(self) -> None:
        """Send unacknowledged results on the next occasion."""
        if self._send_call is None or not self._send_call.active():
            self._send_call = self.clock.callLater(RESULT_DELAY, self.send_results)

    def send_results(self) -> None:
        """Send every result the master has not acknowledged yet."""
        session = self._session
        if self.tasks is None or session is None:
            return  # sent again after the next registration
        results = [r for r in self.tasks.finished_results() if r.attempt_id not in self._sending]
        if not results:
            return
        ids = [r.attempt_id for r in results]
        self._sending.update(ids)
        d = session.request(
            "task_result", ("\n".join(result_json(r) for r in results) + "\n").encode()
        )

        def taken(_: object) -> None:
            # Taken or refused as stale: either way the master has decided.
            for i in ids:
                self.tasks.ack(i)  # type: ignore[union-attr]

        def failed(f: Failure) -> None:
            log.info("results not delivered ({why}); sent again later", why=f.getErrorMessage())

        d.addCallbacks(taken, failed)
        d.addBoth(lambda _: self._sending.difference_update(ids))


class TaskOrders:
    """The master's orders ``run`` and ``kill`` (down the worker's link).

    Over ``jobs`` (None: a worker that runs no tasks refuses them).
    """

    def __init__(self, jobs: WorkerJobs | None) -> None:
        self.jobs = jobs

    def _tasks(self) -> TaskManager:
        tasks = self.jobs.tasks if self.jobs is not None else None
        if tasks is None:
            raise DsmlError("this worker runs no tasks", "unknown-method")
        return tasks

    @responder("run", roles={Role.MASTER})
    def _run(self, head: Head, payload: bytes, conn: Connection) -> Reply:
        """Start an attempt (answered at once; the result comes later)."""
        spec = spec_from_json(payload)
        try:
            self._tasks().start(spec)
        except TaskError as e:
            raise DsmlError(e.message, e.code) from None
        assert self.jobs is not None
        self.jobs.started(spec.attempt_id, spec.owner)
        return Reply()

    @responder("kill", roles={Role.MASTER})
    def _kill(self, head: Head, payload: bytes, conn: Connection) -> Reply:
        """Stop an attempt's process tree (its result says "cancelled")."""
        self._tasks().cancel(int(head.headers["attempt"]))
        return Reply()


class TaskLogs:
    """The storage method ``task_log``: an attempt's stdout or stderr, from ``Offset``.

    Over ``jobs`` (None: a server that runs no tasks has no logs).  Over TLS only the
    attempt's owner (its job's submitter, from the ``run`` order) and the ``admins``
    may read them (``forbidden`` otherwise; an attempt whose owner this worker does
    not know, one from before a restart, is the admins' alone).
    """

    def __init__(
        self, jobs: WorkerJobs | None, admins: Collection[str] = DEFAULT_ADMINS
    ) -> None:
        self.jobs = jobs
        self.admins = frozenset(admins)

    @responder("task_log", roles={Role.CLIENT})
    def _task_log(self, head: Head, payload: bytes, conn: Connection) -> Reply:
        tasks = self.jobs.tasks if self.jobs is not None else None
        if tasks is None:
            raise DsmlError("this server runs no tasks", "not-found")
        h = head.headers
        stream = h["stream"]
        if stream not in ("stdout", "stderr"):
            raise DsmlError("Stream must be stdout or stderr", "bad-header")
        attempt = int(h["attempt"])
        try:
            out, err = tasks.logs(attempt)
        except TaskError as e:
            raise DsmlError(e.message, e.code) from None
        owner = self.jobs.owner_of(attempt) if self.jobs is not None else None
        if not may_act_on(conn, owner, self.admins):
            raise DsmlError(
                f"attempt {attempt} is not yours; only its owner or an admin may read its logs",
                "forbidden",
            )
        path = out if stream == "stdout" else err
        offset = int(h.get("offset", 0))
        try:
            with open(path, "rb") as f:
                size = os.fstat(f.fileno()).st_size
                f.seek(min(offset, size))
                data = f.read(LOG_CHUNK)
        except FileNotFoundError:
            size, data = 0, b""
        running = attempt in tasks.running()
        return Reply({"Size": size, "Running": 1 if running else 0}, data)
