"""The master's side of jobs: dispatch to workers, and the job operations clients ask for.

The :class:`~dsml.master.jobs.JobManager` decides (queue, attempts, fencing) and keeps
it durable; :class:`JobRouter` moves work: tasks go to a worker down its link the moment
it has free slots (after a submit, a result, a registration, a slice of a big job's
tasks reaching the queue), not at the next heartbeat, and kill orders follow a cancel.
The job methods' requests are decoded and answered by the master's request handler
(:mod:`dsml.master.requests`), which calls the router.

Bounded answers (issue 11): ``status`` and ``wait`` carry one page of a job's tasks (at
most :data:`~dsml.master.jobs.STATUS_PAGE`, the view's ``next`` saying where the next
starts), ``jobs`` one page of jobs (at most :data:`JOBS_PAGE`); a submit may be a
compact array (``"array": N`` and one task template), which the manager expands in
slices.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

from twisted.internet.defer import Deferred, gatherResults
from twisted.logger import Logger
from twisted.python.failure import Failure

from ..errors import ConnectionLost, DsmlError
from ..net.access import TOKEN_OWNER
from .cordon import Cordons
from .directory import Directory, DirectoryError
from .jobs import (
    STATUS_PAGE,
    Assignment,
    AttemptView,
    FinishedReport,
    JobError,
    JobManager,
    JobSpec,
    JobView,
    Room,
)
from .jobs.model import attempt_cause, check_job_head, check_task, parse_job_id
from .jobs.queue import data_local
from .jobs.records import AttemptRecord, TaskRecord
from .jobwire import assignment_json
from .membership import Membership, WorkerRecord

log = Logger()

#: Longest a ``wait`` request is held before it is answered with the job as it is.
WAIT_MAX = 600
#: Most jobs in one page of a ``jobs`` answer (a client asking for more follows ``Next``).
JOBS_PAGE = 1000
#: Most tasks sent to workers in one reactor turn (the rest on the next turns).
DISPATCH_PER_TURN = 128
#: Seconds a queued task with inputs waits for a worker that holds them before it is
#: given to any free worker (delay scheduling: a map over a dataset's chunks ran 60-80%
#: data-local without it, every holder busy for a moment when the non-local pass came).
#: Counted from the first time a worker without them had room for it: counted from the
#: task's queueing, a map's second wave (queued behind a first taking most of a second
#: to start Python and numpy) went elsewhere at once, 10 of 12 maps local at best.
LOCALITY_WAIT = 1.0
#: ... and one second more per this many bytes of its inputs (at most
#: :data:`LOCALITY_WAIT_MAX` more): what running elsewhere would fetch over the network
#: (about a 1 Gb/s link's rate).  A 256 MiB chunk waits 3.7 s for its holders rather than
#: 1 s: its map ran 60-80% local on four busy workers with a flat second, each remote run
#: fetching the chunk while the holder would have been free about as soon.
LOCALITY_RATE = 100_000_000
LOCALITY_WAIT_MAX = 10.0
#: A submit checks that the inputs of its first this many tasks are stored (see submit).
INPUTS_CHECKED = 1000


#: Every incarnation of a worker name (see ``JobManager.worker_lost``).
ANY_INCARNATION = 2**62


class Held(NamedTuple):
    """The workers holding a key, and its size (for data locality)."""

    workers: set[str]
    size: int


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
        self._locality_call: Any = None  # dispatch again when a locality wait ends
        self._orphan_call: Any = None
        self._orphan_grace = 0.0
        # The slots of attempts a worker was told to kill, by worker then attempt, until
        # the worker reports them ended (a result, taken or refused), re-registers (its
        # Running list is then the truth) or dies.  The manager forgets a cancelled
        # attempt at once, but the worker holds its slots until the process is gone
        # (SIGTERM, then SIGKILL after a grace period): a run order sent meanwhile would
        # be refused as busy and waste one of the task's attempts.
        self._killing: dict[str, dict[int, Room]] = {}
        membership.on_dead.append(self._worker_dead)
        # A big job's tasks reach the queue in slices, after its submit: feed them.
        jobs.on_queued.append(self.dispatch_soon)
        # Workers whose every attempt fails at once get no new task (issue 13).
        self.cordons = Cordons()
        self._lift_call: Any = None
        jobs.on_attempt_ended.append(self._attempt_ended)

    # -- events from the rest of the master --------------------------------------------

    def registered(self, record: WorkerRecord, running: list[int]) -> None:
        """A worker (re)registered with the attempts it still runs: reconcile, then feed it."""
        self.cordons.registered(record.name, record.incarnation)  # a restart: clean
        kill = self.jobs.reconcile(record.name, record.incarnation, running, [])
        killing = self._killing[record.name] = {}
        for attempt in kill:
            # Its room is unknown here if the master no longer holds it: one CPU.
            room = self.jobs.room_of(attempt)
            killing[attempt] = room if room.cpus else Room(1)
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

    def start(self, grace: float) -> None:
        """The master started: attempts its journal holds as running on a worker that
        does not register again within ``grace`` seconds are lost (requeued).  A worker
        that died while the master was down never registers, never heartbeats, and so
        is never declared dead: without this its attempts would run for ever.  While
        the master hears no worker at all (it is cut off: none could register), the
        verdict waits another ``grace``."""
        self._orphan_grace = grace
        self._orphan_call = self.clock.callLater(grace, self._lose_unregistered)

    def stop(self) -> None:
        for call in (self._orphan_call, self._lift_call):
            if call is not None and call.active():
                call.cancel()
        self._orphan_call = self._lift_call = None

    def _lose_unregistered(self) -> None:
        self._orphan_call = None
        if self.jobs.closed:
            return
        if not self.membership.heard_lately():
            self._orphan_call = self.clock.callLater(self._orphan_grace,
                                                     self._lose_unregistered)
            return
        for worker in self.jobs.workers_with_attempts():
            record = self.membership.get(worker)
            if record is not None and record.live:
                continue  # registered again (its attempts were reconciled then)
            lost = self.jobs.worker_lost(worker, ANY_INCARNATION)
            if lost:
                log.warn(
                    "worker {name} did not register again after the master started:"
                    " its {n} running attempts are lost, tasks requeued",
                    name=worker, n=len(lost),
                )
        self.dispatch_soon()

    def check_output(self, attempt_id: int, key: str, worker: str | None) -> None:
        """``fenced`` unless attempt ``attempt_id`` (on ``worker``, when the peer is a
        known worker) may place its output ``key`` now (see ``JobManager.output_refusal``)."""
        why = self.jobs.output_refusal(attempt_id, key, worker)
        if why:
            log.info("refused an output write: {why}", why=why)
            raise DsmlError(why, "fenced")

    def dispatch_soon(self) -> None:
        """Dispatch on the next reactor turn (a burst of events dispatches once)."""
        if self._dispatch_call is None or not self._dispatch_call.active():
            self._dispatch_call = self.clock.callLater(0, self.dispatch)

    def dispatch(self) -> None:
        """Offer queued tasks to every alive worker with free slots.

        A first pass offers every free worker only tasks whose inputs it holds (priority
        still first), then a second pass offers what is left: offering in worker order
        alone would give every task to the first free worker, whoever held its inputs.
        At most :data:`DISPATCH_PER_TURN` tasks go out per reactor turn (a thousand free
        workers fed at once held the reactor for a fifth of a second); the rest follow
        on the next turn, the same way.
        """
        try:
            if not self.jobs.queued:
                return
            where: dict[str, Held] = {}  # key -> who holds it, for this dispatch
            passes = (True, False) if self.jobs.queued_with_inputs else (False,)
            sent = 0
            room = self._retry_room()
            wait_local = self._locality_wait(where)
            for local_only in passes:
                for record in self.membership.alive():
                    if record.conn is None or self.cordoned(record.name):
                        continue
                    free = record.room - self.used(record.name)
                    if free.cpus > DISPATCH_PER_TURN - sent:
                        free = Room(DISPATCH_PER_TURN - sent, free.mem, free.gpus)
                    if free.cpus <= 0:
                        if sent >= DISPATCH_PER_TURN:
                            self.dispatch_soon()
                            return
                        continue
                    holds = self._holds(record.name, where)
                    for a in self.jobs.next_assignments(
                        record.name, record.incarnation, free, holds, local_only=local_only,
                        retry_room=room(record.name), wait_local=wait_local,
                        size=lambda key: self._held(key, where).size,
                    ):
                        self._send(record, a)
                        sent += 1
                    if not self.jobs.queued:
                        return
            if sent >= DISPATCH_PER_TURN:
                self.dispatch_soon()  # the last one may have had room for more
        except Exception:
            log.failure("dispatch failed")

    def used(self, worker: str) -> Room:
        """The room held by the attempts the master has running on ``worker``, and by
        those it was told to kill and has not reported ended (``nodes`` shows it)."""
        busy = self.jobs.used_on(worker)
        for room in self._killing.get(worker, {}).values():
            busy = busy + room
        return busy

    def _locality_wait(self, where: dict[str, Held]) -> Callable[[TaskRecord], bool]:
        """Whether a queued task (not local to the worker being offered it) should wait
        for a live worker it is data-local on (``data_local``: holding most of its input
        bytes): for :data:`LOCALITY_WAIT` seconds from the first such offer since it was
        (re)queued (its ``passed_over``, on the monotonic clock), plus a second per
        :data:`LOCALITY_RATE` bytes of its inputs; another dispatch comes when the first
        wait seen ends."""
        now = self.clock.seconds()
        alive = {r.name for r in self.membership.alive() if not self.cordoned(r.name)}

        def size(key: str) -> int:
            return self._held(key, where).size

        def wait(task: TaskRecord) -> bool:
            tries = len(task.attempts)
            if task.passed_over is None or task.passed_over[1] != tries:
                task.passed_over = (now, tries)  # the first offer since it was queued
            inputs = task.spec.inputs
            fetch = sum(size(key) for key, _ in inputs) / LOCALITY_RATE
            left = task.passed_over[0] + LOCALITY_WAIT + min(fetch, LOCALITY_WAIT_MAX) - now
            if left <= 0:
                return False
            holders: set[str] = set()
            for key, _ in inputs:
                holders |= self._held(key, where).workers
            if not any(data_local(inputs, self._holds(w, where), size)
                       for w in holders & alive):
                return False
            if self._locality_call is None or not self._locality_call.active():
                self._locality_call = self.clock.callLater(left, self.dispatch)
            return True

        return wait

    def _held(self, key: str, where: dict[str, Held]) -> Held:
        """Who holds ``key`` and its size, looked up once per dispatch (``where``)."""
        held = where.get(key)
        if held is None:
            try:
                replicas = self.directory.locate(key)
            except DirectoryError:
                replicas = []
            held = where[key] = Held({r.worker for r in replicas},
                                     max((r.size for r in replicas), default=0))
        return held

    def _holds(self, worker: str, where: dict[str, Held]) -> Callable[[str], bool]:
        return lambda key: worker in self._held(key, where).workers

    def _versions(self, a: Assignment) -> dict[str, tuple[int, str]]:
        """The current version of each input of ``a`` the directory knows."""
        out = {}
        for key, _ in a.spec.inputs:
            current = self.directory.current(key)
            if current is not None:
                out[key] = current
        return out

    def _send(self, record: WorkerRecord, a: Assignment) -> None:
        d = _order(
            record, "run", {"Attempt": a.attempt_id}, assignment_json(a, self._versions(a))
        )

        def refused(f: Failure) -> None:
            # The worker would not start it (busy, bad task): the attempt ends here and
            # counts; the task is retried while attempts remain.  A link that closed
            # before the answer says nothing of the attempt (the worker may be running
            # it): its end is the link's, "lost" when the worker is declared dead, or
            # settled by the worker's Running list when it registers again.
            if f.check(ConnectionLost):
                log.info("no answer to run order {attempt} before {name}'s link closed",
                         attempt=a.attempt_id, name=record.name)
                return
            why = f.value.message if isinstance(f.value, DsmlError) else f.getErrorMessage()
            self.jobs.finished(
                a.attempt_id, record.name, record.incarnation, exit_code=None, signal=None,
                duration=0.0, peak_rss=0, reason=f"could not start on {record.name}: {why}",
            ).addBoth(lambda _: self.dispatch_soon())

        d.addErrback(refused)

    # -- what clients and workers ask for ---------------------------------------------

    def submit(self, spec: JobSpec, owner: str = TOKEN_OWNER) -> Deferred[str]:
        """Queue a job of ``owner``; fires with its id once committed (then dispatches).

        Refused (``bad-job``) at once: a task that fits no worker the master knows (it
        could never run until a bigger worker joins: said now rather than left queued);
        an input key that is not stored, for a job that comes after no other (one that
        does may read what those jobs write), among the inputs of its first
        :data:`INPUTS_CHECKED` tasks (a missing one past those fails its task at staging).
        """
        missing = self._first_tasks_problem(spec)
        rooms = [r.room for r in self.membership.all()]
        if rooms:  # (none yet: a master just started, its workers still coming)
            # Distinct needs as plain tuples: a 100,000-task list makes no Room each.
            for need in {Room(*n) for n in {(t.slots, t.mem, t.gpus) for t in spec.tasks}}:
                if not any(room.holds(need) for room in rooms):
                    raise JobError(f"a task needs {need.describe()}; no worker has that much"
                                   f" ({_largest(rooms)})", "bad-job")
        if missing:
            raise JobError(f"input {missing!r} is not stored (upload it first)", "bad-job")

        def acknowledged(job_id: str) -> str:
            self.dispatch_soon()
            return job_id

        return self.jobs.submit(spec, owner).addCallback(acknowledged)

    def _first_tasks_problem(self, spec: JobSpec) -> str | None:
        """Check the job's head and its first :data:`INPUTS_CHECKED` tasks (JobError
        for a bad one: a bad path or count is said as such, not as "not stored"; the
        manager checks every task again, a big job's in slices); return the first of
        their input keys the directory does not hold, for a job that comes after no
        other, or None.  Bounded work whatever the job's size: each task expanded once."""
        check_job_head(spec)
        seen: set[str] = set()
        missing = None
        for i in range(min(spec.count, INPUTS_CHECKED)):
            task = spec.task(i)
            check_task(i, task)
            if missing is not None or spec.after:
                continue
            for key, _ in task.inputs:
                if key not in seen:
                    if self.directory.current(key) is None:
                        missing = key
                        break
                    seen.add(key)
        return missing

    def job(self, job_id: str, tasks: bool = True) -> JobView:
        """The job as it is (``not-found`` for an unknown id): with ``tasks``, its first
        page of them (:data:`STATUS_PAGE`; the view's ``next`` says where the rest
        start)."""
        return self.jobs.job(job_id, tasks=tasks, limit=STATUS_PAGE if tasks else None)

    def status(self, job_id: str, first: int = 0, limit: int = STATUS_PAGE) -> JobView:
        """One page of a job's status: its tasks from index ``first``, at most ``limit``
        (at most :data:`STATUS_PAGE`); the view's ``next`` is where the next page
        starts, None after the last.  Bounded work whatever the job's size: the counts
        are kept as tasks move, and only the page's tasks are read.
        ``bad-header`` for a ``limit`` outside 1..STATUS_PAGE."""
        if not 1 <= limit <= STATUS_PAGE:
            raise JobError(f"Limit must be from 1 to {STATUS_PAGE}", "bad-header")
        return self.jobs.job(job_id, first=first, limit=limit)

    def recent(self, limit: int, before: str | None = None) -> tuple[list[JobView], str | None]:
        """One page of the jobs, newest first: at most ``limit`` (at most
        :data:`JOBS_PAGE`) of those older than job ``before`` if given; and the id to
        ask ``before`` for the next page (None when this one is the last)."""
        limit = max(0, min(limit, JOBS_PAGE))
        seq = None
        if before is not None:
            seq = parse_job_id(before)
            if seq is None:
                raise JobError(f"Before must be a job id, not {before[:80]!r}", "bad-header")
        views = self.jobs.jobs(limit, seq)
        more = bool(views) and len(views) == limit and parse_job_id(views[-1].id) != 1
        return views, views[-1].id if more else None

    def queued_reasons(self, view: JobView) -> dict[int, str]:
        """Why each queued task of ``view`` waits, by task index, as the workers are now.

        "no live worker" when no worker is alive (a suspect one gets no work, see
        :meth:`dispatch`); "a worker with 2 CPUs, 1 GPU (no live worker has that
        much: ...)" for a task that fits no live worker; "2 CPUs, 1 GPU free on a worker
        (K tasks queued ahead)" otherwise, or without the count when the manager does
        not count
        (:meth:`~dsml.master.jobs.JobManager.queue_places`).  O(tasks of the job) plus
        O(workers).
        """
        if not view.counts.get("queued") or not view.tasks:
            return {}
        first = view.tasks[0].index
        places = self.jobs.queue_places(view.id, first, view.tasks[-1].index + 1 - first)
        if not places:
            return {}
        alive = self.membership.alive()
        if not alive:
            return dict.fromkeys(places, "no live worker")
        alive = [r for r in alive if not self.cordoned(r.name)]
        if not alive:
            return dict.fromkeys(places, "every live worker is cordoned")
        rooms = [r.room for r in alive]
        reasons: dict[int, str] = {}
        fits: dict[Room, bool] = {}
        for index, place in places.items():
            need = Room(place.slots, place.mem, place.gpus)
            fit = fits.get(need)
            if fit is None:
                fit = fits[need] = any(room.holds(need) for room in rooms)
            if not fit:
                reasons[index] = (f"a worker with {need.describe()}"
                                  f" (no live worker has that much: {_largest(rooms)})")
            elif place.ahead is None:
                reasons[index] = f"{need.describe()} free on a worker"
            else:
                tasks = "task" if place.ahead == 1 else "tasks"
                reasons[index] = (f"{need.describe()} free on a worker"
                                  f" ({place.ahead} {tasks} queued ahead)")
        return reasons

    def cancel(self, job_id: str) -> Deferred[int]:
        """Cancel a job; fires with how many running attempts were told to stop."""
        # Their room, read before the cancel forgets them (see _killing).
        self.jobs.job(job_id, tasks=False)  # not-found at once
        held = {a: (worker, room) for a, worker, room in self.jobs.running_of(job_id)}
        d = self.jobs.cancel(job_id)
        for attempt, (worker, room) in held.items():
            self._killing.setdefault(worker, {})[attempt] = room

        def kill(attempts: list[tuple[str, int]]) -> int:
            for worker, attempt in attempts:
                record = self.membership.get(worker)
                if record is not None and record.live:
                    _order(record, "kill", {"Attempt": attempt})
            return len(attempts)

        return d.addCallback(kill)

    def wait(self, job_id: str, timeout: float) -> Deferred[tuple[JobView, bool]]:
        """Fires with (the job, True) once it is final, or (the job as it is, False)
        after ``timeout`` seconds (at most WAIT_MAX).  ``not-found`` at once."""
        timeout = min(timeout, WAIT_MAX)
        self.jobs.job(job_id, tasks=False)  # not-found at once
        d = self.jobs.wait_for(job_id)
        result: Deferred[tuple[JobView, bool]] = Deferred()

        def final(view: JobView) -> None:
            if timer.active():
                timer.cancel()
            if not result.called:
                result.callback((self.job(view.id), True))

        def expired() -> None:
            if not result.called:
                result.callback((self.job(job_id), False))

        timer = self.clock.callLater(timeout, expired)
        d.addCallback(final)
        d.addErrback(lambda f: None if result.called else result.errback(f))
        return result

    def log_source(
        self, job_id: str, task_index: int, attempt_id: int | None
    ) -> tuple[AttemptView, WorkerRecord]:
        """The attempt whose logs were asked for (the last one by default) and the
        worker that ran it."""
        view = self.jobs.job(job_id, first=max(0, task_index), limit=1)
        tasks = [t for t in view.tasks if t.index == task_index]
        if not tasks:
            raise JobError(f"job {view.id} has no task {task_index}", "not-found")
        attempts: Sequence[AttemptView] = tasks[0].attempts
        if attempt_id is not None:
            attempts = tuple(a for a in attempts if a.id == attempt_id)
        if not attempts:
            raise JobError(f"task {task_index} of {view.id} has not run yet", "not-found")
        a = attempts[-1]
        record = self.membership.get(a.worker)
        if record is None:
            raise DsmlError(f"worker {a.worker} that ran it is unknown now", "unavailable")
        return a, record

    def results(
        self, worker: str, incarnation: int, reports: Sequence[FinishedReport]
    ) -> Deferred[tuple[int, int]]:
        """A worker's ended attempts; fires with (taken, refused) once committed.

        A result of an attempt that is no longer this worker's (or this incarnation's)
        is refused: exactly one attempt of a task commits.
        """
        killing = self._killing.get(worker, {})
        waits = []
        for r in reports:
            killing.pop(r.attempt_id, None)  # ended: its slots are free
            waits.append(
                self.jobs.finished(
                    r.attempt_id, worker, incarnation,
                    exit_code=r.exit_code, signal=r.signal, duration=r.duration,
                    peak_rss=r.peak_rss, reason=r.reason, stderr_tail=r.stderr_tail,
                    result=r.result,
                )
            )

        def done(results: list[bool]) -> tuple[int, int]:
            taken = sum(1 for r in results if r)
            return taken, len(results) - taken

        # The manager's memory already has the results: refill the freed slots now,
        # not after the commit (the worker's acknowledgement still waits for it).
        self.dispatch_soon()
        return gatherResults(waits, consumeErrors=True).addCallback(done)

    # -- cordons (issue 13: see dsml.master.cordon) ----------------------------------------

    def cordoned(self, worker: str) -> str:
        """Why ``worker`` is cordoned (gets no new task); "" when it is not."""
        return self.cordons.why(worker, self.clock.seconds())

    def _attempt_ended(self, a: AttemptRecord) -> None:
        # The cordons' times are the clock's (monotonic: their cool-downs are timers):
        # it ended now; it ran since it began (or, begun before the master started, for
        # as long as its wall-clock record says).
        ended = self.clock.seconds()
        if a.began is not None:
            began = a.began
        else:
            began = ended - max(0.0, (a.ended if a.ended is not None else a.started) - a.started)
        cause = attempt_cause(a.state, a.reason, a.exit_code, a.signal)
        lines = self.cordons.ended(
            a.worker, a.incarnation, a.task.job.seq, began, ended, cause, a.reason,
            lambda: self._spare(a.worker),
        )
        self._cordons_moved(lines)

    def _spare(self, worker: str) -> bool:
        """Whether a live worker with a link but ``worker`` is not cordoned."""
        return any(r.conn is not None and r.name != worker and not self.cordoned(r.name)
                   for r in self.membership.alive())

    def _lift_due(self) -> None:
        self._lift_call = None
        if not self.jobs.closed:
            self._cordons_moved(self.cordons.lift(self.clock.seconds()))

    def _cordons_moved(self, lines: list[str]) -> None:
        """Log what the cordons did, wake up at the next lift, feed a lifted worker."""
        if not lines:
            return
        for line in lines:
            log.warn("{line}", line=line)
        if self._lift_call is not None and self._lift_call.active():
            self._lift_call.cancel()
        self._lift_call = None
        when = self.cordons.next_lift()
        if when is not None:
            delay = max(0.0, when - self.clock.seconds())
            self._lift_call = self.clock.callLater(delay, self._lift_due)
        self.dispatch_soon()

    def _retry_room(self) -> Callable[[str], Room | None]:
        """For each worker, the room of another live, linked, uncordoned worker (the one
        with most CPUs; None: no other): a retried task avoids the worker its last
        attempt ran on when that one could take it (see ``TaskQueue.take``)."""
        best: Room | None = None
        second: Room | None = None
        best_name = ""
        for r in self.membership.alive():
            if r.conn is None or self.cordoned(r.name):
                continue
            room = r.room
            if best is None or room.cpus > best.cpus:
                best, best_name, second = room, r.name, best
            elif second is None or room.cpus > second.cpus:
                second = room
        return lambda name: second if name == best_name else best


def _largest(rooms: Sequence[Room]) -> str:
    """The most of each resource any one worker has: "at most 8 CPUs, 31.4 GiB, 2 GPUs
    on a worker"."""
    most = Room(max(r.cpus for r in rooms), max(r.mem for r in rooms),
                max(r.gpus for r in rooms))
    return f"at most {most.describe()} on a worker"


def _order(
    record: WorkerRecord, method: str, headers: dict[str, object], payload: bytes = b""
) -> Deferred[Any]:
    conn = record.conn
    if conn is None or not getattr(conn, "connected", False):
        d: Deferred[Any] = Deferred()
        d.errback(DsmlError(f"worker {record.name} has no link", "unavailable"))
    else:
        d = conn.request(method, headers, payload)
    if method == "kill":
        # Nobody waits for a kill: a worker without a link kills it itself when it
        # registers again and the master does not name the attempt among its own.
        d.addErrback(lambda f: None)
    return d
