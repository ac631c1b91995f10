"""The job manager (the seed's JobManager): how jobs, tasks and attempts move.

:class:`JobManager` holds the live jobs in memory (:mod:`.records`), offers queued tasks
from the :class:`~.queue.TaskQueue`, and records every change in the
:class:`~.journal.Journal`, whose group commit acknowledges it.  The rules:

* Every offer of a task to a worker is a new attempt, bound to the worker's name and
  incarnation (fencing: see :meth:`JobManager.finished`).  A task never has two running
  attempts, so at most one attempt of a task ever succeeds.
* Every way an attempt can end without success counts against ``max_attempts``: a
  non-zero exit, a timeout, a lost worker (peer-systems §4.1 and §4.14: no endless retry
  loops).  While attempts remain the task goes back to the queue at its old place (its
  job's priority and submit order, its index), else it fails with the last attempt's
  reason.
* A job ends when all its tasks have: ``succeeded`` if all succeeded, else ``failed``.  A
  failed task does **not** stop its siblings: the rest of the job still runs and the job
  is failed at the end.  Array jobs are mostly sweeps, where the other results are
  wanted; a fail-fast option can come later.
* ``after``: a job's tasks wait until every job it names has succeeded.  If one of them
  fails or is cancelled, the job fails with reason ``dependency jN failed`` (or
  ``cancelled``) and its tasks are cancelled without ever running; this cascades down the
  chain.
* :meth:`JobManager.cancel` ends a job at once: its unfinished tasks and their running
  attempts become ``cancelled``, results arriving later are refused, and the caller is
  told which (worker, attempt) pairs to kill.

Changes take effect in memory at once; reads (:meth:`JobManager.job`,
:meth:`JobManager.jobs`) show memory, which may be one batch ahead of the disk.
:meth:`JobManager.next_assignments` returns before its attempts are committed (the worker
should start at once).  If the master dies in between, the attempt is forgotten and its
task is still queued on disk: it runs again, and the worker that got the forgotten attempt
is told to kill it when it reconciles (an unknown attempt id).  That attempt does not
count against ``max_attempts`` (nothing recorded it).

Restart: on open every job that is not final is loaded with its tasks and attempts;
queued tasks go back into the queue in their order, running attempts stay running bound
to their worker and incarnation.  Workers that come back call
:meth:`JobManager.reconcile` (running attempts re-bound to the new incarnation, results
that arrived while the master was down committed, missing ones lost); the service calls
:meth:`JobManager.worker_lost` for those that do not return within the heartbeat timeout.
Final jobs are evicted from memory once their final state is committed, and read back
from the file when asked for.

Costs: each task given is one queue pop and a scan of at most the locality window;
:meth:`JobManager.finished` is O(1) plus a queue push on a retry;
:meth:`JobManager.worker_lost` and :meth:`JobManager.reconcile` touch only that worker's
attempts; :meth:`JobManager.cancel` is O(tasks of the job), and the queue entries it
leaves behind are dropped when met or compacted in bulk.  Bounded per reactor turn
(issue 11): a submit of more than :data:`SUBMIT_AT_ONCE` tasks is checked and made
:data:`SUBMIT_SLICE` tasks per turn and queued :data:`ENQUEUE_SLICE` per turn
(:mod:`.slices`), its stored rows made with it so its commit encodes nothing on the
reactor; :meth:`JobManager.job` reads a page of tasks (the counts by state are kept as
tasks move, the queued tasks before a page are counted per block of task indexes);
:meth:`JobManager.jobs` makes views for one page of jobs; purges of finished jobs
(:mod:`.retention`) delete a bounded batch per transaction.  Still O(tasks of the
job) in one turn: a cancel, and the release or failure of a job's waiting tasks when a
job it comes after ends.

One writer: this object.  Its state changes on the reactor thread, in plain synchronous
code; every state change is checked against the tables of :mod:`.states`.

One room (some 1,050 lines, a fifth of them docstrings): every transition below moves the
same live indexes (task counts, queued counters and blocks, running attempts by worker,
dependents, dirty sets) under one set of invariants, which one class keeps in one place;
the slices' runner and the purges, which need none of them, live apart.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Final

from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from ...net.access import TOKEN_OWNER
from .journal import Journal, task_row
from .model import (
    MAX_INLINE_RESULT,
    MAX_REASON,
    MAX_TASKS,
    Assignment,
    FinishedReport,
    JobError,
    JobSpec,
    JobView,
    QueuePlace,
    Room,
    attempt_cause,
    check_io,
    check_job_head,
    check_task,
    clean_tail,
    expand_task,
    holds_nothing,
    parse_job_id,
    spec_json,
    storable,
)
from .queue import TaskQueue, data_local, queue_places
from .records import BLOCK, AttemptRecord, JobRecord, TaskRecord
from .retention import PURGE_JOBS, PURGE_TASKS, RETENTION_INTERVAL, JobRetention
from .slices import Slicer
from .states import (
    ATTEMPT_NEXT,
    CANCELLED,
    FAILED,
    FINAL,
    JOB_NEXT,
    QUEUED,
    REASON_CANCELLED,
    REASON_NOT_REPORTED,
    REASON_TIMEOUT,
    REASON_WORKER_DIED,
    RUNNING,
    SUCCEEDED,
    TASK_NEXT,
    WAITING,
    AttemptState,
    IllegalTransition,
    JobState,
    TaskState,
)

__all__ = ["ENQUEUE_SLICE", "STATUS_PAGE", "SUBMIT_AT_ONCE", "SUBMIT_SLICE", "JobManager"]

#: Tasks of a submitted job checked and made into records per reactor turn (some tens
#: of microseconds each: a slice is some ms to a few tens on a busy machine).
SUBMIT_SLICE: Final = 500
#: A job of at most this many tasks is admitted at once; a bigger one in slices (see
#: :meth:`JobManager.submit`).
SUBMIT_AT_ONCE: Final = 2000
#: Tasks of big submits being admitted at once, at most: a submit beyond is refused
#: ``busy`` (try again), so parallel big submits cannot grow the master without bound.
MAX_ADMITTING: Final = 4 * MAX_TASKS
#: Tasks of an admitted job put in the queue per reactor turn.
ENQUEUE_SLICE: Final = 5000
#: Tasks in one page of a job's view unless asked for fewer (see :meth:`JobManager.job`).
STATUS_PAGE: Final = 1000

log = Logger()

#: The job of task records made before their job is (see JobManager._materialise).
_NO_JOB: Final = JobRecord(0, "", 0, (), JobState.QUEUED, 0.0)

# The members set once or more per task, as module globals: an enum attribute costs a
# lookup each time.
_JOB_QUEUED = JobState.QUEUED
_JOB_RUNNING = JobState.RUNNING
_JOB_SUCCEEDED = JobState.SUCCEEDED
_ATTEMPT_RUNNING = AttemptState.RUNNING
_ATTEMPT_SUCCEEDED = AttemptState.SUCCEEDED
_ATTEMPT_FAILED = AttemptState.FAILED
_ATTEMPT_TIMEOUT = AttemptState.TIMEOUT


class JobManager:
    """Jobs, tasks and attempts, in memory and in SQLite; see the module docstring."""

    def __init__(
        self,
        path: Path | str,
        clock: IReactorTime,
        *,
        commit_delay: float = 0.002,
        synchronous: str = "FULL",
        run_in_thread: Callable[[Callable[[], None]], Deferred[None]] | None = None,
        now: Callable[[], float] | None = None,
    ) -> None:
        """Open (creating if needed) the job state at ``path`` and load the live jobs.

        ``path`` is the SQLite file, or an existing directory to hold ``jobs.sqlite3``.
        ``clock`` schedules the group commits; ``now`` (the wall clock, ``time.time``;
        without it ``clock.seconds``, for tests on one fake clock) gives the times
        recorded (a job's created, started, finished, an attempt's started, ended) and
        the ages retention purges by.  Changes are
        committed ``commit_delay`` seconds after the first one of a batch, at the
        ``synchronous`` level (FULL; tests may lower it).  ``run_in_thread`` runs a
        function in a thread and returns a Deferred of its end (``deferToThreadPool``):
        the group commits then run there, so the reactor goes on dispatching while one
        waits for its fsync; without it they run inline (tests, simulations).
        """
        self.clock = clock
        self.now = clock.seconds if now is None else now
        self._closed = False
        self._jobs: dict[int, JobRecord] = {}
        self._queue = TaskQueue(self._jobs)
        #: Running attempts by id (the router reads it to count a worker's busy slots).
        self._running: dict[int, AttemptRecord] = {}
        self._by_worker: dict[str, set[int]] = {}
        self._dependents: dict[int, list[JobRecord]] = {}
        #: Queued tasks, and those of them that name inputs (locality is only worth a look
        #: when some do; the router reads it too).
        self._nqueued = 0
        self._queued_inputs = 0
        #: Work done a slice per reactor turn (big submits, big enqueues).
        self._slicer = Slicer(clock)
        #: Submits being materialised: their task counts and Deferreds (failed if the
        #: manager closes).
        self._admitting: dict[int, tuple[int, Deferred[str]]] = {}
        self.submit_slice = SUBMIT_SLICE
        self.submit_at_once = SUBMIT_AT_ONCE
        self.enqueue_slice = ENQUEUE_SLICE
        #: Called when tasks reach the queue later than their submit or release (a
        #: slice of a big job): the router dispatches then.
        self.on_queued: list[Callable[[], None]] = []
        #: Called with each attempt as it ends (any way; its state, times and reason
        #: set, its task not yet moved on): the router's cordons watch them.  A hook
        #: must not call back into the manager.
        self.on_attempt_ended: list[Callable[[AttemptRecord], None]] = []
        self._journal = Journal(
            path,
            clock,
            commit_delay=commit_delay,
            synchronous=synchronous,
            run_in_thread=run_in_thread,
            on_final=self._settled,
        )
        self.path = self._journal.path
        self._retention = JobRetention(self._journal, clock, self._protected, self.now)
        try:
            self._load(self._journal.load())
        except BaseException:
            self._journal.close(flush=False)
            raise

    # -- opening -------------------------------------------------------------------------

    def _load(self, jobs: list[JobRecord]) -> None:
        """Index the live jobs read back from disk (see the package docstring)."""
        queued: list[TaskRecord] = []
        for job in jobs:
            self._jobs[job.seq] = job
            for task in job.tasks:
                a = task.current
                if a is not None:
                    self._running[a.id] = a
                    self._by_worker.setdefault(a.worker, set()).add(a.id)
                if task.state == QUEUED:
                    queued.append(task)
                    job.note_queued(task.index, 1)
                    self._nqueued += 1
                    if task.spec.inputs:
                        self._queued_inputs += 1
        self._queue.load(queued)
        # Dependencies: re-evaluated from scratch, so a crash between a job's end and its
        # dependents' release (they commit together, but be safe) heals itself.
        for job in jobs:
            if job.state in FINAL:
                continue
            if job.counts[WAITING]:
                self._wire_dependencies(job)
            elif job.done == len(job.tasks):
                self._maybe_done(job)
        log.info(
            "jobs: loaded {jobs} live jobs, {queued} queued tasks, {running} running attempts",
            jobs=len(self._jobs),
            queued=self._nqueued,
            running=len(self._running),
        )

    def _dep_state(self, job_id: str) -> str | None:
        """The state of job ``job_id`` (in memory or stored), None if unknown."""
        seq = parse_job_id(job_id)
        if seq is None:
            return None
        job = self._jobs.get(seq)
        if job is not None:
            return job.state
        return self._journal.stored_state(seq)

    def _wire_dependencies(self, job: JobRecord) -> None:
        """Make a job whose tasks wait wait for its unfinished dependencies, or end it."""
        for dep in job.after:
            state = self._dep_state(dep)
            if state is None or state in (FAILED, CANCELLED):
                self._fail_dependent(job, f"dependency {dep} {state or 'missing'}")
                return
        for dep in job.after:
            seq = parse_job_id(dep)
            assert seq is not None
            if self._dep_state(dep) != SUCCEEDED and seq not in job.pending:
                job.pending.add(seq)
                self._dependents.setdefault(seq, []).append(job)
        if not job.pending:
            self._release(job)

    # -- submitting ----------------------------------------------------------------------

    def submit(self, spec: JobSpec, owner: str = TOKEN_OWNER) -> Deferred[str]:
        """Add a job; the Deferred fires with its id once the job and its tasks are committed.

        ``owner`` is who submitted it (a user certificate's name; without TLS
        :data:`~dsml.net.access.TOKEN_OWNER`), kept with the job.

        Bad input raises :class:`JobError` at once (``bad-job``, or ``not-found`` for an
        unknown ``after`` id) and nothing is stored.  A job of more than
        :attr:`submit_at_once` tasks is checked and made in slices of
        :attr:`submit_slice`, one per reactor turn
        (each task's check, record and stored row), then admitted: its tasks are queued
        (in slices of :attr:`enqueue_slice`) and it is committed.  Until it is admitted
        it is not visible; a bad task found in a slice fails the Deferred (``bad-job``)
        with nothing stored, and so does a close meanwhile (``internal``).
        """
        self._check_open()
        check_job_head(spec)
        for dep in spec.after:
            if not isinstance(dep, str) or self._dep_state(dep) is None:
                raise JobError(f"after: no job {str(dep)[:80]!r}", "not-found")
        if not isinstance(owner, str) or not owner:
            raise JobError("a job needs an owner", "bad-job")
        n = spec.count
        d: Deferred[str] = Deferred()
        if n <= self.submit_at_once:
            tasks, rows = self._materialise(spec, 0, n)  # raises before anything is kept
            job = self._new_job(spec, owner)
            self._admit(job, spec, tasks, rows, d, sum(1 for t in tasks if t.spec.inputs))
            return d
        pending = sum(n for n, _ in self._admitting.values())
        if pending + n > MAX_ADMITTING:
            raise JobError(
                f"busy: {pending} tasks of other jobs are being admitted; try again", "busy"
            )
        job = self._new_job(spec, owner)
        self._admitting[job.seq] = (n, d)
        self._later(self._admit_in_slices(job, spec, d))
        log.info(
            "job {job} ({name!r}) of {n} tasks: being admitted in slices of {slice}",
            job=job.id, name=job.name, n=n, slice=self.submit_slice,
        )
        return d

    def _new_job(self, spec: JobSpec, owner: str) -> JobRecord:
        return JobRecord(
            self._journal.new_job_seq(), spec.name, spec.priority, spec.after, _JOB_QUEUED,
            self.now(), owner=storable(owner),
        )

    def _materialise(
        self, spec: JobSpec, start: int, end: int, job: JobRecord | None = None
    ) -> tuple[list[TaskRecord], list[tuple[object, ...]]]:
        """Check tasks ``start``..``end`` of ``spec``; their records (of ``job``, set
        later when None) in their first state, and the rows that store them."""
        first = WAITING if spec.after else QUEUED
        holder = job if job is not None else _NO_JOB
        tasks = []
        rows = []
        seq = holder.seq
        if spec.array:
            # The template's command, environment and limits were checked once
            # (check_job_head); only what {index} changes is checked per task, and a
            # template without it is shared by every task, with one stored form.
            template = spec.tasks[0]
            indexed = any("{index}" in x for pair in template.inputs for x in pair) or any(
                "{index}" in x for pair in template.outputs for x in pair
            )
            shared = None if indexed else spec_json(template)
            for i in range(start, end):
                t = expand_task(template, i) if indexed else template
                if indexed:
                    check_io(i, t)
                tasks.append(TaskRecord(holder, i, t, first))
                rows.append(
                    task_row(seq, i, t, first)
                    if shared is None
                    else (seq, i, shared, first._value_, "")
                )
            return tasks, rows
        for i in range(start, end):
            t = spec.task(i)
            check_task(i, t)
            tasks.append(TaskRecord(holder, i, t, first))
            rows.append(task_row(seq, i, t, first))
        return tasks, rows

    def _admit_in_slices(self, job: JobRecord, spec: JobSpec, d: Deferred[str]) -> Iterator[None]:
        """Materialise a big job a slice per turn, then admit it (see :meth:`submit`)."""
        tasks: list[TaskRecord] = []
        rows: list[tuple[object, ...]] = []
        with_inputs = 0
        n = spec.count
        try:
            for start in range(0, n, self.submit_slice):
                more, more_rows = self._materialise(
                    spec, start, min(n, start + self.submit_slice), job
                )
                tasks += more
                rows += more_rows
                with_inputs += sum(1 for t in more if t.spec.inputs)
                yield
        except JobError as e:
            del self._admitting[job.seq]
            log.info("job {job} refused: {why}", job=job.id, why=e.message)
            d.errback(e)
            return
        del self._admitting[job.seq]
        if self._closed:
            return
        try:
            # Its dependencies may have ended meanwhile: _admit looks at them now.
            self._admit(job, spec, tasks, rows, d, with_inputs)
        except JobError as e:
            d.errback(e)
            return
        # Its submitter has waited through the slices already: commit it now, not a
        # group-commit delay later (in the commit thread when there is one).
        self._journal.flush()

    def _admit(
        self,
        job: JobRecord,
        spec: JobSpec,
        tasks: list[TaskRecord],
        rows: list[tuple[object, ...]],
        d: Deferred[str],
        with_inputs: int,
    ) -> None:
        """Make the job live: index it, queue or hold its tasks, commit it, then ``d``."""
        for dep in spec.after:
            if self._dep_state(dep) is None:  # (purged meanwhile)
                raise JobError(f"after: no job {dep[:80]!r}", "not-found")
        if tasks and tasks[0].job is not job:  # made before the job (at once)
            for t in tasks:
                t.job = job
        if rows and rows[0][0] != job.seq:
            rows = [(job.seq, *r[1:]) for r in rows]
        job.tasks = tasks
        job.task_rows = rows
        job.with_inputs = with_inputs
        first = WAITING if spec.after else QUEUED
        job.counts[first] = len(tasks)
        journal = self._journal
        self._jobs[job.seq] = job
        journal.new_jobs.append(job)
        failed_dep = None
        for dep in spec.after:
            state = self._dep_state(dep)
            if state in (FAILED, CANCELLED):
                failed_dep = f"dependency {dep} {state}"
                break
        blocked = failed_dep is None and any(self._dep_state(x) != SUCCEEDED for x in spec.after)
        if failed_dep is not None:
            self._fail_dependent(job, failed_dep)
        elif blocked:
            self._wire_dependencies(job)
        elif first == WAITING:
            self._release(job)  # every dependency succeeded meanwhile
        else:
            self._enqueue_all(job)
        journal.acks.append((d, job.id))
        journal.schedule()
        log.info(
            "job {job} ({name!r}) submitted by {owner}: {n} tasks, priority {priority}",
            job=job.id,
            owner=job.owner,
            name=job.name,
            n=len(job.tasks),
            priority=job.priority,
        )

    # -- work in slices ------------------------------------------------------------------

    def _later(self, work: Iterator[None]) -> None:
        """Run ``work`` a slice per reactor turn (:class:`~.slices.Slicer`)."""
        self._slicer.add(work)

    @property
    def slices(self) -> int:
        """Slices of work run since open (a big submit's, a big enqueue's)."""
        return self._slicer.slices

    def _on_queued(self) -> None:
        for hook in self.on_queued:
            try:
                hook()
            except Exception:
                log.failure("jobs: an on_queued hook failed")

    @property
    def busy(self) -> bool:
        """Whether work in slices waits (a big submit being admitted or queued)."""
        return self._slicer.busy

    # -- scheduling ----------------------------------------------------------------------

    def next_assignments(
        self,
        worker: str,
        incarnation: int,
        free: Room | int,
        holds: Callable[[str], bool] = holds_nothing,
        *,
        local_only: bool = False,
        retry_room: Room | None = None,
        wait_local: Callable[[TaskRecord], bool] | None = None,
        size: Callable[[str], int] | None = None,
    ) -> list[Assignment]:
        """Give ``worker`` (at ``incarnation``) queued tasks that fit in its ``free`` room
        (a number alone: that many free CPUs, no memory or GPU to reserve).

        Highest priority first, then submit order, then task index; tasks too wide for the
        room left are skipped.  Among tasks of one priority, one data-local on the worker
        (:func:`.queue.data_local`: it holds, ``holds(key)``, most of the bytes,
        ``size(key)``, of the task's inputs) goes first, within the first
        :data:`~.queue.LOCALITY_WINDOW` queued tasks.  Each task given is a new running
        attempt, effective at once in memory and committed with the next batch.

        With ``local_only``, only such local tasks are given (never one of a lower priority
        than the first task that fits): the dispatcher offers local work to every worker
        first, so a task goes to a holder of its inputs when one is free.

        ``retry_room``: the most another worker could take (None: no other); a retried
        task whose last attempt ran on ``worker`` and fits in it is left to another.
        ``wait_local``: see :meth:`.queue.TaskQueue.take`.
        """
        self._check_open()
        if isinstance(free, int):
            free = Room(free)
        if free.cpus <= 0 or not self._nqueued:
            return []
        local = holds is not holds_nothing and self._queued_inputs > 0
        if local_only and not local:
            return []
        tasks = self._queue.take(free, holds, local, local_only, worker, retry_room,
                                 wait_local if local else None, size)
        return [self._start(task, worker, incarnation, holds, size) for task in tasks]

    def _start(self, task: TaskRecord, worker: str, incarnation: int,
               holds: Callable[[str], bool] = holds_nothing,
               size: Callable[[str], int] | None = None) -> Assignment:
        """Create a running attempt of a queued task on ``worker``; it is data-local as
        :func:`.queue.data_local` says with ``holds`` and ``size`` (the job counts it,
        local or remote: the scheduler's locality report)."""
        journal = self._journal
        aid = journal.new_attempt_id()
        now = self.now()
        a = AttemptRecord(aid, task, worker, incarnation, _ATTEMPT_RUNNING, now,
                          began=self.clock.seconds())
        job = task.job
        if task.spec.inputs and holds is not holds_nothing:
            a.local = data_local(task.spec.inputs, holds, size)
            if a.local:
                job.local += 1
            else:
                job.remote += 1
            self._job_dirty(job)
        task.add_attempt(a)
        task.current = a
        self._running[aid] = a
        self._by_worker.setdefault(worker, set()).add(aid)
        journal.dirty_attempts.add(a)
        self._set_state(task, RUNNING)
        if job.state == QUEUED:
            if _JOB_RUNNING not in JOB_NEXT[job.state]:
                raise IllegalTransition(f"job {job.id}: {job.state} -> {_JOB_RUNNING}")
            job.state = _JOB_RUNNING
            job.started = now
            self._job_dirty(job)
        return Assignment(aid, job.id, task.index, task.spec, len(task.attempts), job.owner)

    # -- results -------------------------------------------------------------------------

    def finished(
        self,
        attempt_id: int,
        worker: str,
        incarnation: int,
        *,
        exit_code: int | None,
        signal: int | None,
        duration: float,
        peak_rss: int,
        reason: str = "",
        stderr_tail: str = "",
        result: bytes = b"",
    ) -> Deferred[bool]:
        """Record the end of an attempt; fires True once committed, False if refused.

        Fencing: refused, with nothing changed, unless the attempt is running and was given
        to exactly this worker and incarnation.  Exit code 0 with no signal succeeds the
        task; anything else fails the attempt (``timeout`` when ``reason`` is "timeout")
        and requeues the task while it has attempts left, else fails it.  A worker that
        fails an attempt after a zero exit (say, an output upload failed) reports
        ``exit_code=None`` with the reason.  ``stderr_tail``, the last lines of a failed
        attempt's stderr, is kept (its last ``MAX_STDERR_TAIL`` characters, control
        characters but newline and tab replaced) unless the attempt succeeded; ``result``
        (the task's result output, at most :data:`MAX_INLINE_RESULT` bytes) only if it
        did, in the same commit (see :meth:`result`).
        """
        self._check_open()
        a = self._running.get(attempt_id)
        if a is None or a.worker != worker or a.incarnation != incarnation:
            log.debug(
                "refused result of attempt {attempt} from {worker}#{incarnation}",
                attempt=attempt_id,
                worker=worker,
                incarnation=incarnation,
            )
            return succeed(False)
        self._complete(a, exit_code, signal, duration, peak_rss, reason, stderr_tail, result)
        d: Deferred[bool] = Deferred()
        journal = self._journal
        journal.acks.append((d, True))
        journal.schedule()
        return d

    def _complete(
        self,
        a: AttemptRecord,
        exit_code: int | None,
        signal: int | None,
        duration: float,
        peak_rss: int,
        reason: str,
        stderr_tail: str = "",
        result: bytes = b"",
    ) -> None:
        """Commit a running attempt's result (already fenced)."""
        reason = storable(str(reason)[:MAX_REASON])
        a.exit_code = exit_code
        a.signal = signal
        a.duration = duration
        a.peak_rss = peak_rss
        # The worker's TaskManager says "timeout after N s"; a non-empty reason is a
        # failure even with exit code 0 (say, a declared output was missing).
        if reason == REASON_TIMEOUT or reason.startswith(REASON_TIMEOUT + " after "):
            state = _ATTEMPT_TIMEOUT
        elif exit_code == 0 and signal is None and not reason:
            state = _ATTEMPT_SUCCEEDED
        else:
            state = _ATTEMPT_FAILED
            if not reason:
                if signal is not None:
                    reason = f"killed by signal {signal}"
                elif exit_code is not None:
                    reason = f"exit code {exit_code}"
                else:
                    reason = "failed"
        if state != SUCCEEDED:
            a.stderr_tail = clean_tail(stderr_tail)
        elif result and a.task.spec.result and len(result) <= MAX_INLINE_RESULT:
            # Kept on disk only (a live job's memory holds no results): see result().
            self._journal.results.append((a.task.job.seq, a.task.index, bytes(result)))
        self._end_attempt(a, state, reason)

    def worker_lost(self, worker: str, incarnation: int) -> list[int]:
        """``worker`` at ``incarnation`` (or earlier) died: its running attempts are lost.

        Each lost attempt counts against its task's ``max_attempts``: the task is requeued
        while attempts remain, else it fails with reason "lost: worker died".  Attempts of
        a later incarnation of the same name are not touched.  Returns the lost attempt ids.
        """
        self._check_open()
        lost = sorted(
            aid
            for aid in self._by_worker.get(worker, ())
            if self._running[aid].incarnation <= incarnation
        )
        for aid in lost:
            self._end_attempt(self._running[aid], AttemptState.LOST, REASON_WORKER_DIED)
        if lost:
            log.info(
                "worker {worker}#{incarnation} lost: attempts {attempts} lost",
                worker=worker,
                incarnation=incarnation,
                attempts=lost,
            )
        return lost

    def reconcile(
        self,
        worker: str,
        incarnation: int,
        running: Iterable[int],
        finished: Iterable[FinishedReport],
    ) -> list[int]:
        """Match a (re-)registering worker's attempts with the master's; return ids to kill.

        Call it when ``worker`` registers at ``incarnation``, before it is offered work.
        For the master's running attempts on that worker name from this or an earlier
        incarnation: one the worker reports *finished* is committed as if by
        :meth:`finished`; one it reports *running* is re-bound to ``incarnation`` and stays
        running; one it does not report is lost (counting against attempts).  Attempts it
        reports running that the master does not hold as running there (cancelled, lost,
        finished, unknown) are returned: the worker should kill them.  Use
        :meth:`committed` to learn when the changes are on disk.
        """
        self._check_open()
        done: set[int] = set()
        for rep in finished:
            done.add(rep.attempt_id)
            a = self._running.get(rep.attempt_id)
            if a is not None and a.worker == worker and a.incarnation <= incarnation:
                self._complete(
                    a, rep.exit_code, rep.signal, rep.duration, rep.peak_rss, rep.reason,
                    rep.stderr_tail, rep.result,
                )
        kill: list[int] = []
        reported: set[int] = set()
        for aid in running:
            if aid in done or aid in reported:
                continue
            reported.add(aid)
            a = self._running.get(aid)
            if a is None or a.worker != worker or a.incarnation > incarnation:
                kill.append(aid)
            elif a.incarnation != incarnation:
                a.incarnation = incarnation
                self._journal.dirty_attempts.add(a)
                self._journal.schedule()
        missing = sorted(
            aid
            for aid in self._by_worker.get(worker, ())
            if aid not in reported and self._running[aid].incarnation <= incarnation
        )
        for aid in missing:
            self._end_attempt(self._running[aid], AttemptState.LOST, REASON_NOT_REPORTED)
        if kill or missing or done:
            log.info(
                "worker {worker}#{incarnation} reconciled: {n} running kept, results {done},"
                " lost {missing}, to kill {kill}",
                worker=worker,
                incarnation=incarnation,
                n=len(reported) - len(kill),
                done=sorted(done),
                missing=missing,
                kill=kill,
            )
        return sorted(kill)

    def _end_attempt(self, a: AttemptRecord, state: AttemptState, reason: str) -> None:
        """End a running attempt and move its task on (succeeded, requeued or failed)."""
        if state not in ATTEMPT_NEXT[a.state]:
            raise IllegalTransition(f"attempt {a.id}: {a.state} -> {state}")
        a.state = state
        a.ended = self.now()
        a.reason = reason
        for hook in self.on_attempt_ended:
            try:
                hook(a)
            except Exception:
                log.failure("jobs: an on_attempt_ended hook failed")
        del self._running[a.id]
        mine = self._by_worker[a.worker]
        mine.discard(a.id)
        if not mine:
            del self._by_worker[a.worker]
        self._journal.dirty_attempts.add(a)
        task = a.task
        task.current = None
        if state == CANCELLED:
            return  # the caller moves the task
        if state == SUCCEEDED:
            task.reason = ""
            self._set_state(task, SUCCEEDED)
        elif len(task.attempts) < task.spec.max_attempts and attempt_cause(
            state, reason, a.exit_code, a.signal
        ) in task.spec.retry_on:
            self._set_state(task, QUEUED)
            self._queue.push(task)
            log.debug(
                "task {job}[{index}] requeued after attempt {attempt} {state}: {reason}",
                job=task.job.id,
                index=task.index,
                attempt=a.id,
                state=state,
                reason=reason,
            )
            return
        else:
            task.reason = reason
            self._set_state(task, FAILED)
            job = task.job
            if not job.reason:
                job.reason = f"task {task.index} failed: {reason}"
            log.info(
                "task {job}[{index}] failed after {n} attempts: {reason}",
                job=job.id,
                index=task.index,
                n=len(task.attempts),
                reason=reason,
            )
        self._maybe_done(task.job)

    # -- cancelling ----------------------------------------------------------------------

    def cancel(self, job_id: str) -> Deferred[list[tuple[str, int]]]:
        """Cancel a job; fires, once committed, with the (worker, attempt id) to kill.

        Its unfinished tasks and their running attempts become ``cancelled``; results
        for those attempts are refused from now on.  Cancelling a final job changes
        nothing and fires with no attempts.  An unknown id raises ``not-found``.
        """
        self._check_open()
        seq = parse_job_id(job_id)
        job = self._jobs.get(seq) if seq is not None else None
        if job is None:
            if self._dep_state(job_id) is None:
                raise JobError(f"no job {job_id[:80]!r}", "not-found")
            return succeed([])
        if job.state in FINAL:
            return succeed([])
        kill: list[tuple[str, int]] = []
        for task in job.tasks:
            if task.state in FINAL:
                continue
            a = task.current
            if a is not None:
                kill.append((a.worker, a.id))
                self._end_attempt(a, AttemptState.CANCELLED, REASON_CANCELLED)
            task.reason = REASON_CANCELLED
            self._set_state(task, CANCELLED)
        self._end_job(job, JobState.CANCELLED, REASON_CANCELLED)
        self._queue.compact(self._nqueued)
        d: Deferred[list[tuple[str, int]]] = Deferred()
        self._journal.acks.append((d, kill))
        self._journal.schedule()
        log.info("job {job} cancelled; {n} running attempts to kill", job=job.id, n=len(kill))
        return d

    # -- job and task state --------------------------------------------------------------

    def _set_state(self, task: TaskRecord, state: TaskState) -> None:
        """Move a task to ``state``: counts, the queued counters, the dirty set."""
        old = task.state
        if state not in TASK_NEXT[old]:
            raise IllegalTransition(f"task {task.job.id}[{task.index}]: {old} -> {state}")
        job = task.job
        job.counts[old] -= 1
        job.counts[state] += 1
        if old == QUEUED:
            self._nqueued -= 1
            job.note_queued(task.index, -1)
            if task.spec.inputs:
                self._queued_inputs -= 1
            if state != RUNNING:
                self._queue.dead += 1  # its entry stays behind (see .queue)
        elif state == QUEUED:
            self._nqueued += 1
            job.note_queued(task.index, 1)
            if task.spec.inputs:
                self._queued_inputs += 1
        task.state = state
        journal = self._journal
        # Also before the job is stored: its insert rows hold the tasks' first states,
        # and the batch that inserts them applies the updates after.
        journal.dirty_tasks.add(task)
        journal.schedule()

    def _job_dirty(self, job: JobRecord) -> None:
        journal = self._journal
        if job.stored:
            journal.dirty_jobs.add(job)
        journal.schedule()

    def _enqueue_all(self, job: JobRecord) -> None:
        """Queue every task of a new job whose tasks were created queued."""
        n = len(job.tasks)
        self._nqueued += n
        # Every task is queued: whole blocks, counted without a walk.
        job.queued_blocks = [min(BLOCK, n - start) for start in range(0, n, BLOCK)]
        self._queued_inputs += job.with_inputs
        self._push(job, job.tasks)

    def _push(self, job: JobRecord, tasks: list[TaskRecord]) -> None:
        """Put ``tasks`` (counted as queued already) in the queue: at once if they are
        few, else :attr:`enqueue_slice` per reactor turn (a task cancelled before its
        turn is skipped; until then the dispatcher does not see it)."""
        if len(tasks) <= self.enqueue_slice:
            self._queue.push_all(job, tasks)
            return

        def slices() -> Iterator[None]:
            step = self.enqueue_slice
            for start in range(0, len(tasks), step):
                part = [t for t in tasks[start : start + step] if t.state == QUEUED]
                self._queue.push_all(job, part)
                self._on_queued()
                yield

        self._later(slices())

    def _release(self, job: JobRecord) -> None:
        """Every dependency of ``job`` succeeded: its waiting tasks are queued."""
        released = [task for task in job.tasks if task.state == WAITING]
        for task in released:
            self._set_state(task, QUEUED)
        self._push(job, released)
        log.debug("job {job}: dependencies succeeded, tasks queued", job=job.id)

    def _fail_dependent(self, job: JobRecord, reason: str) -> None:
        """A dependency of ``job`` will never succeed: cancel its tasks, fail the job."""
        for task in job.tasks:
            if task.state not in FINAL:
                task.reason = reason
                self._set_state(task, CANCELLED)
        self._end_job(job, JobState.FAILED, reason)

    def _maybe_done(self, job: JobRecord) -> None:
        """End ``job`` if all its tasks have ended."""
        if job.state in FINAL or job.done < len(job.tasks):
            return
        if job.counts[FAILED] or job.counts[CANCELLED]:
            self._end_job(job, JobState.FAILED, job.reason or "a task failed")
        else:
            self._end_job(job, _JOB_SUCCEEDED, "")

    def _end_job(self, job: JobRecord, state: JobState, reason: str) -> None:
        """Give ``job`` its final state and settle the jobs that come after it."""
        work = [(job, state, reason)]
        while work:
            j, s, r = work.pop()
            if j.state in FINAL:
                continue
            if s not in JOB_NEXT[j.state]:
                raise IllegalTransition(f"job {j.id}: {j.state} -> {s}")
            j.state = s
            j.reason = r
            j.finished = self.now()
            self._job_dirty(j)
            self._journal.finalized.append(j)
            log.info("job {job} {state}{why}", job=j.id, state=s, why=f": {r}" if r else "")
            for d in self._dependents.pop(j.seq, ()):
                if d.state in FINAL:
                    continue
                if s == SUCCEEDED:
                    d.pending.discard(j.seq)
                    if not d.pending:
                        self._release(d)
                else:
                    why = f"dependency {j.id} {s}"
                    for task in d.tasks:
                        if task.state not in FINAL:
                            task.reason = why
                            self._set_state(task, CANCELLED)
                    work.append((d, JobState.FAILED, why))

    def _settled(self, jobs: list[JobRecord]) -> None:
        """These jobs' final states are on disk: read them from there from now on."""
        for job in jobs:
            if self._jobs.get(job.seq) is job:
                del self._jobs[job.seq]
            waiters, job.waiters = job.waiters, []
            if waiters:
                view = job.view(True, 0, STATUS_PAGE)
                for w in waiters:
                    w.callback(view)

    # -- reading -------------------------------------------------------------------------

    def job(
        self, job_id: str, *, tasks: bool = True, first: int = 0, limit: int | None = None
    ) -> JobView:
        """The job ``job_id`` with its tasks and their attempts (``tasks=False``: without).

        ``first`` and ``limit`` make it a page: the tasks from index ``first``, at most
        ``limit`` of them, and the view's ``next`` is the index the next page starts at
        (None after the last).  Without ``limit``, every task: O(tasks), for callers
        inside the master that need them all; requests ask for pages
        (:data:`STATUS_PAGE`).  Raises ``not-found`` for an unknown id.
        """
        self._check_open()
        if first < 0 or (limit is not None and limit < 0):
            raise JobError("first and limit must not be negative", "bad-header")
        seq = parse_job_id(job_id)
        if seq is not None:
            job = self._jobs.get(seq)
            if job is not None:
                return job.view(tasks, first, limit)
            view = self._journal.stored_job(seq, tasks, first, limit)
            if view is not None:
                return view
        raise JobError(f"no job {str(job_id)[:80]!r}", "not-found")

    def result(self, job: str | JobView, index: int) -> bytes | None:
        """Task ``index`` of job ``job``'s result, as the worker of its committed attempt
        reported it (its task's ``result`` output), None if there is none (no such task,
        not succeeded, or its result too big: stored under its key).  ``job`` is its id
        (raises ``not-found`` for an unknown job) or the view a caller already has (the
        master's responder, which checked its owner on it: not read twice)."""
        view = job if isinstance(job, JobView) else self.job(job, tasks=False)
        seq = parse_job_id(view.id)
        assert seq is not None
        return self._journal.result(seq, index)

    def jobs(self, limit: int = 100, before: int | None = None) -> list[JobView]:
        """The ``limit`` most recent jobs (those numbered below ``before`` if given: the
        next page), newest first, without their tasks.  Views are made for at most
        ``limit`` live jobs and read for at most ``limit`` stored ones."""
        self._check_open()
        if limit <= 0:
            return []
        live = self._jobs
        seqs = live if before is None else (s for s in live if s < before)
        views = {seq: live[seq].view(False) for seq in heapq.nlargest(limit, seqs)}
        views.update(self._journal.stored_jobs(limit, live, before))
        return [views[seq] for seq in sorted(views, reverse=True)[:limit]]

    def wait_for(self, job_id: str) -> Deferred[JobView]:
        """Fire with the job's view (its first :data:`STATUS_PAGE` tasks) once its final
        state is committed (at once if it is)."""
        self._check_open()
        seq = parse_job_id(job_id)
        job = self._jobs.get(seq) if seq is not None else None
        if job is None:
            return succeed(self.job(job_id, limit=STATUS_PAGE))  # stored final, or not-found
        d: Deferred[JobView] = Deferred()
        job.waiters.append(d)
        return d

    def queue_places(
        self, job_id: str, first: int = 0, limit: int | None = None
    ) -> dict[int, QueuePlace]:
        """Where each queued task of a live job stands, by task index ({} for none);
        only tasks ``first`` .. ``first + limit`` (a page of a status) when asked.

        See :func:`~.queue.queue_places`: ``ahead`` is None while there are too many live
        jobs to count cheaply.
        """
        self._check_open()
        seq = parse_job_id(job_id)
        job = self._jobs.get(seq) if seq is not None else None
        if job is None or not job.counts[QUEUED]:
            return {}
        return queue_places(job, self._jobs.values(), first, limit)

    def running_of(self, job_id: str) -> list[tuple[int, str, Room]]:
        """(attempt id, worker, room held) of each running attempt of a live job ([] for
        a final or unknown one): O(tasks of the job), no views made."""
        seq = parse_job_id(job_id)
        job = self._jobs.get(seq) if seq is not None else None
        if job is None:
            return []
        return [
            (t.current.id, t.current.worker, t.spec.room)
            for t in job.tasks
            if t.current is not None
        ]

    def workers_with_attempts(self) -> list[str]:
        """The workers the master holds running attempts on."""
        return sorted(self._by_worker)

    def running_attempts(self, worker: str) -> list[int]:
        """The attempts the master holds as running on ``worker`` (any incarnation)."""
        return sorted(self._by_worker.get(worker, ()))

    def used_on(self, worker: str) -> Room:
        """The room (CPUs, memory, GPUs) the attempts the master holds as running on
        ``worker`` occupy."""
        running = self._running
        cpus = mem = gpus = 0
        for a in self._by_worker.get(worker, ()):
            spec = running[a].task.spec
            cpus, mem, gpus = cpus + spec.slots, mem + spec.mem, gpus + spec.gpus
        return Room(cpus, mem, gpus)

    @property
    def queued_with_inputs(self) -> int:
        """How many queued tasks name inputs (locality is worth a look only when some do)."""
        return self._queued_inputs

    def output_refusal(self, attempt_id: int, key: str, worker: str | None = None) -> str:
        """Why attempt ``attempt_id`` may not write ``key`` now ("" when it may).

        A task's outputs are ordinary cluster writes, placed by the worker that runs the
        attempt before it reports.  Only a running attempt may place one, and only a key
        its task declared as an output (and, when ``worker`` is known, only from the
        worker it runs on).  An attempt that was fenced (its worker declared dead and
        the task requeued, cancelled, or ended) is refused: its output can never replace
        the committed attempt's, which is placed later and so at a higher version.
        """
        a = self._running.get(attempt_id)
        if a is None:
            return (
                f"attempt {attempt_id} is not running (it ended, or was lost or cancelled):"
                f" its output {key!r} is refused"
            )
        if worker is not None and a.worker != worker:
            return f"attempt {attempt_id} runs on {a.worker}, not on {worker}"
        if all(k != key for _, k in a.task.spec.outputs):
            return f"{key!r} is not an output of attempt {attempt_id}"
        return ""

    def room_of(self, attempt_id: int) -> Room:
        """The room the running attempt ``attempt_id`` occupies (none if not running)."""
        a = self._running.get(attempt_id)
        return Room(0) if a is None else a.task.spec.room

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` was called."""
        return self._closed

    @property
    def queued(self) -> int:
        """How many tasks are queued (ready to be offered to a worker)."""
        return self._nqueued

    # -- retention -----------------------------------------------------------------------

    def purge(
        self,
        max_age: float,
        max_count: int,
        *,
        jobs: int = PURGE_JOBS,
        rows: int = PURGE_TASKS,
    ) -> Deferred[int]:
        """Delete at most ``jobs`` final jobs beyond retention (finished more than
        ``max_age`` seconds ago, or older than the newest ``max_count`` final jobs) from
        the state file, ``rows`` task indexes per transaction; fires with how many.
        See :meth:`.retention.JobRetention.purge`."""
        self._check_open()
        return self._retention.purge(max_age, max_count, jobs, rows)

    def start_retention(
        self, max_age: float, max_count: int, interval: float = RETENTION_INTERVAL
    ) -> None:
        """Purge finished jobs beyond retention every ``interval`` seconds until
        :meth:`close` (``retention.jobs_max_age`` and ``jobs_max_count``)."""
        self._check_open()
        self._retention.start(max_age, max_count, interval)

    def stop_retention(self) -> None:
        """Stop the retention loop started by :meth:`start_retention`."""
        self._retention.stop()

    def _protected(self) -> set[int]:
        """Jobs a purge must not delete: the live ones and those they come after."""
        named = {parse_job_id(dep) for job in self._jobs.values() for dep in job.after}
        return {seq for seq in named if seq is not None} | set(self._jobs)

    # -- committing ----------------------------------------------------------------------

    @property
    def commits(self) -> int:
        """Transactions committed since open (group commits and attempt-id reservations)."""
        return self._journal.commits

    @property
    def commit_delay(self) -> float:
        """Seconds from a batch's first change to its commit."""
        return self._journal.commit_delay

    @commit_delay.setter
    def commit_delay(self, value: float) -> None:
        self._journal.commit_delay = value

    def committed(self) -> Deferred[None]:
        """Fire once every change made so far is committed (at once if none is pending)."""
        return self._journal.committed()

    def flush(self) -> None:
        """Start the pending batch's commit now (the timer would, ``commit_delay`` later).

        Inline without ``run_in_thread``; with it, the commit runs in its thread (or after
        the one in progress): wait for :meth:`committed` to know it is on disk.
        """
        self._journal.flush()

    # -- closing -------------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise JobError("the job manager is closed", "internal")

    def close(self, flush: bool = True) -> None:
        """Commit what is pending and close the database; idempotent.

        ``flush=False`` drops the pending batch unacknowledged, as a crash would (for
        tests and simulations of a master dying).
        """
        if self._closed:
            return
        self.stop_retention()
        self._journal.close(flush)
        self._closed = True
        self._slicer.stop()
        admitting, self._admitting = self._admitting, {}
        for _, d in admitting.values():
            d.errback(JobError("the job manager closed before the job was stored", "internal"))
