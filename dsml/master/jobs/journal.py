"""The job state on disk: one SQLite file (``state_dir/jobs.sqlite3``) written by group
commit, and read back for jobs no longer in memory.

Tables (the schema version lives in ``meta``)::

    meta(name, value)          schema version, next job number, attempt ids reserved
    jobs(seq, name, priority, after, state, created, started, finished, reason, ntasks, counts,
         owner, local, remote)
    tasks(job, idx, spec, state, reason)
    attempts(id, job, idx, worker, incarnation, state, started, ended, exit_code, signal,
             duration, peak_rss, reason, stderr_tail, local)
    results(job, idx, data)    a task's result carried by its worker's report

(:mod:`.schema` holds them, their migrations and the statements.)

Group commit: every change the manager makes (a submit, an attempt created, a result, a
lost worker, a cancel) is made in memory at once and marked dirty here (``new_jobs``,
``dirty_jobs``, ``dirty_tasks``, ``dirty_attempts``); one ``callLater(commit_delay)``
writes everything dirty in ONE transaction (``executemany``) at ``synchronous=FULL``, and
only then fires the Deferreds that acknowledge those changes (``acks``).  A burst of
thousands of submits and results is a handful of fsyncs.  If a commit fails (disk full)
the changes stay dirty and are retried after :data:`RETRY_DELAY`; nothing is
acknowledged before it is on disk.  Jobs that became final in a batch are handed back to
the manager (``on_final``) once it is on disk, to be evicted from memory.

A new job's task rows are made with its tasks (:func:`task_row`, in the manager's slices
for a big job) and kept on the job until its insert is committed; a task's later changes
are dirty updates, written after the inserts of the same batch.  :meth:`Journal.run`
runs a bounded piece of other work on the file (a purge's batch, see :mod:`.retention`)
in the commit thread, behind the same lock.

Attempt ids are reserved on disk in blocks of :data:`ATTEMPT_BLOCK` ahead of use (with a
batch when half a block is left, inline in a transaction of its own when used up), so an
id handed out before a crash is never handed out again.

One writer: the manager, on the reactor thread.  A batch's rows are taken there too; its
transaction runs in a thread when the master passes ``run_in_thread`` (one batch at a
time, the connection behind a lock), so the reactor goes on dispatching tasks and taking
results through each fsync (measured: the inline commits were a third of the master's
time under a stream of short tasks, every slot idle meanwhile).  Changes made during a
commit wait for the next batch, ``commit_delay`` after it ends.  The file is opened by
:func:`dsml.sqlitedb.open_database` (exclusive lock, WAL); a state file of an older
schema is migrated in place when opened; a job migrated from schema 2 has the owner ""
(unknown: only an admin may act on it over TLS).
"""

from __future__ import annotations

import contextlib
import json
import threading
from collections.abc import Callable, Container, Iterator
from pathlib import Path
from typing import Any, Final

import attrs
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from ...sqlitedb import open_database, sync_level, transaction
from .model import (
    AttemptView,
    JobError,
    JobView,
    TaskSpec,
    TaskView,
    output_keys,
    spec_from_json,
    spec_json,
)
from .records import AttemptRecord, JobRecord, TaskRecord
from .schema import (
    ATTEMPT_COLS,
    ATTEMPT_PAGE,
    INSERT_JOB,
    INSERT_TASK,
    JOB_COLS,
    JOBS_FILE,
    PUT_ATTEMPT,
    SCHEMA,
    SCHEMA_VERSION,
    SET_META,
    TASK_COLS,
    TASK_PAGE,
    UPDATE_JOB,
    UPDATE_TASK,
    flag,
)
from .states import CANCELLED, FAILED, RUNNING, SUCCEEDED, AttemptState, JobState, TaskState

__all__ = ["ATTEMPT_BLOCK", "JOBS_FILE", "RETRY_DELAY", "SCHEMA_VERSION", "Journal", "task_row"]

log = Logger()

#: Attempt ids reserved on disk at a time (see the module docstring).
ATTEMPT_BLOCK: Final = 10_000
#: Seconds before a failed commit is retried.
RETRY_DELAY: Final = 1.0
#: Seconds after the last commit ended from which the file counts as idle: a change then
#: is committed on the next reactor turn, not ``commit_delay`` later (a lone submit or
#: result has no batch to wait for; a stream of them still batches).
IDLE_AFTER: Final = 0.05



def task_row(seq: int, index: int, spec: TaskSpec, state: TaskState) -> tuple[Any, ...]:
    """The row that inserts a new task of job ``seq`` (its reason "")."""
    return (seq, index, spec_json(spec), state._value_, "")


def _rows_now(job: JobRecord) -> list[tuple[Any, ...]]:
    """A new job's task rows as its tasks are now (a job made without its rows)."""
    return [(job.seq, t.index, spec_json(t.spec), t.state._value_, t.reason) for t in job.tasks]


@attrs.define(eq=False)
class Batch:
    """One group commit: the objects it records (made dirty again if it fails), the
    Deferreds it acknowledges, and its rows, taken on the reactor thread."""

    new_jobs: list[JobRecord]
    dirty_jobs: set[JobRecord]
    dirty_tasks: set[TaskRecord]
    dirty_attempts: set[AttemptRecord]
    acks: list[tuple[Deferred[Any], object]]
    finalized: list[JobRecord]
    reserve: int | None
    next_job: int
    job_rows: list[tuple[Any, ...]]
    #: One list of task insert rows per new job.
    task_rows: list[list[tuple[Any, ...]]]
    job_updates: list[tuple[Any, ...]]
    task_updates: list[tuple[Any, ...]]
    attempt_rows: list[tuple[Any, ...]]
    #: (job, index, data): the results of tasks that succeeded, not kept in memory.
    results: list[tuple[int, int, bytes]] = attrs.Factory(list)
    written: bool = False


class Journal:
    """The job state file, its group commits and its reads; see the module docstring.

    The manager changes records in memory and adds them to the dirty sets (and the
    Deferreds to acknowledge to ``acks``, the jobs just made final to ``finalized``),
    then calls :meth:`schedule`.
    """

    def __init__(
        self,
        path: Path | str,
        clock: IReactorTime,
        *,
        commit_delay: float,
        synchronous: str,
        run_in_thread: Callable[[Callable[[], None]], Deferred[None]] | None,
        on_final: Callable[[list[JobRecord]], None],
    ) -> None:
        """Open (creating or migrating if needed) the state at ``path``: the SQLite file,
        or an existing directory to hold :data:`JOBS_FILE`.  ``on_final`` gets the jobs
        whose final state a batch has just put on disk."""
        synchronous = sync_level(synchronous)
        path = Path(path)
        if path.is_dir():
            path = path / JOBS_FILE
        self.path = path
        self.clock = clock
        self.commit_delay = commit_delay
        self._last_commit = float("-inf")  # when the last batch ended (clock seconds)
        self.closed = False
        self._on_final = on_final
        self._call: IDelayedCall | None = None
        self._run_in_thread = run_in_thread
        #: The batch being committed in a thread (its acks and finalized jobs), if any.
        self._in_flight: Batch | None = None
        #: Held while anyone uses the connection: a commit in its thread, or a read or
        #: reservation on the reactor thread (which then waits for the commit).
        self._db_lock = threading.Lock()

        # The next batch.
        self.new_jobs: list[JobRecord] = []
        self.dirty_jobs: set[JobRecord] = set()
        self.dirty_tasks: set[TaskRecord] = set()
        self.dirty_attempts: set[AttemptRecord] = set()
        self.acks: list[tuple[Deferred[Any], object]] = []
        self.finalized: list[JobRecord] = []
        self.results: list[tuple[int, int, bytes]] = []

        self.db, meta = open_database(
            path,
            what="job state",
            schema=SCHEMA,
            synchronous=synchronous,
            error=lambda message: JobError(message, "internal"),
            cache_kib=64 * 1024,
        )
        #: Transactions committed since open: the opening one, group commits and
        #: attempt-id reservations.
        self.commits = 1
        try:
            db = self.db
            (top_job,) = db.execute("SELECT coalesce(max(seq), 0) FROM jobs").fetchone()
            (top_attempt,) = db.execute("SELECT coalesce(max(id), 0) FROM attempts").fetchone()
            #: The number of the next job submitted.
            self.next_job: int = max(int(meta["next_job"]), top_job + 1)
            #: Every id at or below this may have been handed out before; never reuse one.
            self.reserved: int = max(int(meta["attempt_reserved"]), top_attempt)
            self.next_attempt: int = self.reserved + 1
            self.reserve_now()
        except BaseException:
            self.db.close()
            raise

    # -- numbers -------------------------------------------------------------------------

    def new_job_seq(self) -> int:
        """The number of a new job (recorded with the next batch)."""
        seq = self.next_job
        self.next_job = seq + 1
        return seq

    def new_attempt_id(self) -> int:
        """The id of a new attempt, never handed out before (reserving more if needed)."""
        aid = self.next_attempt
        if aid > self.reserved:
            self.reserve_now()
        self.next_attempt = aid + 1
        return aid

    def reserve_now(self) -> None:
        """Reserve the next block of attempt ids on disk, in a transaction of its own.

        Rare (the group commits reserve ahead); it waits for a commit in progress.
        """
        top = self.next_attempt - 1 + ATTEMPT_BLOCK
        with self._db_lock, self.transaction():
            self.db.execute(SET_META, ("attempt_reserved", top))
        self.reserved = top

    # -- reading -------------------------------------------------------------------------

    def load(self) -> list[JobRecord]:
        """Every job that is not final, with its tasks and attempts, in submit order;
        each task's running attempt is its ``current``."""
        db = self.db
        jobs = []
        live = (JobState.QUEUED.value, JobState.RUNNING.value)
        rows = list(db.execute(JOB_COLS + " WHERE state IN (?, ?) ORDER BY seq", live))
        for (seq, name, prio, after, state, created, started, finished, reason, _n, _c, owner,
             local, remote) in rows:
            job = JobRecord(
                seq,
                name,
                prio,
                tuple(json.loads(after)),
                JobState(state),
                created,
                started,
                finished,
                reason,
                owner=owner,
                stored=True,
                local=local,
                remote=remote,
            )
            counts = job.counts
            for idx, spec, tstate, treason in db.execute(TASK_COLS, (seq,)):
                task_state = TaskState(tstate)
                job.tasks.append(TaskRecord(job, idx, spec_from_json(spec), task_state, treason))
                counts[task_state] += 1
            for aid, idx, worker, inc, astate, *rest, local in db.execute(ATTEMPT_COLS, (seq,)):
                task = job.tasks[idx]
                a = AttemptRecord(aid, task, worker, inc, AttemptState(astate), *rest,
                                  local=flag(local))
                task.add_attempt(a)
                if a.state == RUNNING:
                    task.current = a
            jobs.append(job)
        return jobs

    def read(self, sql: str, args: tuple[Any, ...]) -> list[tuple[Any, ...]]:
        """Rows of a query on the reactor thread (waits for a commit in progress)."""
        with self._db_lock:
            return self.db.execute(sql, args).fetchall()

    def stored_state(self, seq: int) -> str | None:
        """The stored state of job ``seq``, None if there is no such job on disk."""
        rows = self.read("SELECT state FROM jobs WHERE seq = ?", (seq,))
        return None if not rows else str(rows[0][0])

    def result(self, seq: int, index: int) -> bytes | None:
        """Task ``index`` of job ``seq``'s result as its worker reported it, committed
        or not yet (None: none was)."""
        in_flight = self._in_flight.results if self._in_flight is not None else []
        for job, idx, data in reversed(in_flight + self.results):
            if (job, idx) == (seq, index):
                return data
        rows = self.read("SELECT data FROM results WHERE job = ? AND idx = ?", (seq, index))
        return bytes(rows[0][0]) if rows else None

    def stored_job(
        self, seq: int, tasks: bool, first: int = 0, limit: int | None = None
    ) -> JobView | None:
        """The stored view of job ``seq`` (``tasks``: with those from ``first``, at most
        ``limit``), None if there is none."""
        rows = self.read(JOB_COLS + " WHERE seq = ?", (seq,))
        return self._stored_view(rows[0], tasks, first, limit) if rows else None

    def stored_jobs(
        self, limit: int, skip: Container[int], before: int | None = None
    ) -> dict[int, JobView]:
        """Views (without tasks) of the ``limit`` newest stored jobs (numbered below
        ``before`` if given) not in ``skip``."""
        top = (1 << 62) if before is None else before
        return {
            row[0]: self._stored_view(row, False)
            for row in self.read(
                JOB_COLS + " WHERE seq < ? ORDER BY seq DESC LIMIT ?", (top, limit)
            )
            if row[0] not in skip
        }

    def _stored_view(
        self, row: tuple[Any, ...], tasks: bool, first: int = 0, limit: int | None = None
    ) -> JobView:
        (seq, name, prio, after, state, created, started, finished, reason, ntasks, counts, owner,
         local, remote) = row
        counts = json.loads(counts)
        task_views: tuple[TaskView, ...] = ()
        nxt = None
        if tasks:
            end = ntasks if limit is None else min(ntasks, first + limit)
            nxt = end if end < ntasks else None
            attempts: dict[int, list[AttemptView]] = {}
            for aid, idx, *rest, here in self.read(ATTEMPT_PAGE, (seq, first, end)):
                attempts.setdefault(idx, []).append(AttemptView(aid, *rest, local=flag(here)))
            task_views = tuple(
                TaskView(idx, tstate, treason, tuple(attempts.get(idx, ())), "",
                         output_keys(spec))
                for idx, tstate, treason, spec in self.read(TASK_PAGE, (seq, first, end))
            )
        return JobView(
            id=f"j{seq}",
            name=name,
            state=state,
            priority=prio,
            after=tuple(json.loads(after)),
            created=created,
            started=started,
            finished=finished,
            reason=reason,
            counts=counts,
            done=counts[SUCCEEDED] + counts[FAILED] + counts[CANCELLED],
            total=ntasks,
            tasks=task_views,
            next=nxt,
            owner=owner,
            local=local,
            remote=remote,
        )

    # -- purging -------------------------------------------------------------------------

    def run(self, fn: Callable[[], Any]) -> Deferred[Any]:
        """Run ``fn`` (a bounded piece of work on the file, behind the lock) in the
        commit thread if there is one, else inline; a Deferred of its result."""
        def locked() -> Any:
            with self._db_lock:
                if self.closed:
                    raise JobError("the job state is closed", "internal")
                return fn()

        if self._run_in_thread is None:
            try:
                return succeed(locked())
            except Exception:
                return fail()
        return self._run_in_thread(locked)  # type: ignore[arg-type,return-value]

    # -- committing ----------------------------------------------------------------------

    def pending(self) -> bool:
        """Whether anything waits for the next batch."""
        return bool(
            self.new_jobs
            or self.dirty_jobs
            or self.dirty_tasks
            or self.dirty_attempts
            or self.acks
            or self.finalized
            or self.results
        )

    def schedule(self) -> None:
        """Make sure a batch is written ``commit_delay`` from now, or sooner: on the
        next turn when the file is idle (:data:`IDLE_AFTER`)."""
        if self._call is None and not self.closed:
            idle = (self._in_flight is None
                    and self.clock.seconds() - self._last_commit >= IDLE_AFTER)
            self._call = self.clock.callLater(0 if idle else self.commit_delay, self._flush)

    def committed(self) -> Deferred[None]:
        """Fire once every change made so far is committed (at once if none is pending)."""
        if not self.pending():
            if self._in_flight is None:
                return succeed(None)
            d: Deferred[None] = Deferred()
            self._in_flight.acks.append((d, None))  # every change so far is in it
            return d
        d = Deferred()
        self.acks.append((d, None))
        self.schedule()
        return d

    def flush(self) -> None:
        """Start the pending batch's commit now (the timer would, ``commit_delay`` later)."""
        if self._call is not None and self._call.active():
            self._call.cancel()
        self._call = None
        self._flush()

    @contextlib.contextmanager
    def transaction(self) -> Iterator[None]:
        """One transaction: commit on success (counted), roll back on an exception."""
        with transaction(self.db):
            yield
        self.commits += 1

    def _flush(self) -> None:
        """Write the batch in one transaction, then acknowledge it.

        The rows are taken here, on the reactor thread; the transaction runs in a thread
        if there is ``run_in_thread`` (one at a time: changes made meanwhile wait for the
        next batch, ``commit_delay`` after this one ends), else inline.
        """
        self._call = None
        if self.closed or self._in_flight is not None or not self.pending():
            return
        batch = self._take_batch()
        self._in_flight = batch
        if self._run_in_thread is None:
            try:
                self._write(batch)
            except Exception:
                self._failed(batch, Failure())
            else:
                self._written(batch)
            return
        d = self._run_in_thread(lambda: self._write(batch))
        d.addCallbacks(lambda _: self._written(batch), lambda f: self._failed(batch, f))
        d.addErrback(lambda f: log.failure("jobs: acknowledging a commit failed", f))

    def _take_batch(self) -> Batch:
        """Move everything dirty into a batch, with the rows that record it."""
        new_jobs = [j for j in self.new_jobs if not j.stored]
        # Keep a block of attempt ids reserved ahead, so assignments rarely reserve inline.
        reserve = None
        if self.reserved - self.next_attempt < ATTEMPT_BLOCK // 2:
            reserve = self.next_attempt - 1 + ATTEMPT_BLOCK
        batch = Batch(
            new_jobs=new_jobs,
            dirty_jobs=self.dirty_jobs,
            dirty_tasks=self.dirty_tasks,
            dirty_attempts=self.dirty_attempts,
            acks=self.acks,
            finalized=self.finalized,
            reserve=reserve,
            next_job=self.next_job,
            job_rows=[j.insert_row() for j in new_jobs],
            # Made with the tasks (in slices for a big job); later changes are dirty.
            task_rows=[j.task_rows if j.task_rows is not None else _rows_now(j) for j in new_jobs],
            job_updates=[j.update_row() for j in self.dirty_jobs],
            task_updates=[
                (t.state._value_, t.reason, t.job.seq, t.index) for t in self.dirty_tasks
            ],
            attempt_rows=[a.row() for a in self.dirty_attempts],
            results=self.results,
        )
        self.results = []
        self.new_jobs = []
        self.dirty_jobs = set()
        self.dirty_tasks = set()
        self.dirty_attempts = set()
        self.acks = []
        self.finalized = []
        return batch

    def _write(self, batch: Batch) -> None:
        """The transaction of one batch (in a thread, or inline), unless close() wrote it
        already or the journal was closed without flushing (a crash, for tests)."""
        with self._db_lock:
            if batch.written or self.closed:
                return
            self._write_locked(batch)
            batch.written = True

    def _write_locked(self, batch: Batch) -> None:
        db = self.db
        with self.transaction():
            if batch.job_rows:
                db.executemany(INSERT_JOB, batch.job_rows)
                for rows in batch.task_rows:
                    db.executemany(INSERT_TASK, rows)
                db.execute(SET_META, ("next_job", batch.next_job))
            if batch.job_updates:
                db.executemany(UPDATE_JOB, batch.job_updates)
            if batch.task_updates:
                db.executemany(UPDATE_TASK, batch.task_updates)
            if batch.attempt_rows:
                db.executemany(PUT_ATTEMPT, batch.attempt_rows)
            if batch.results:
                db.executemany("REPLACE INTO results VALUES (?, ?, ?)", batch.results)
            if batch.reserve is not None:
                db.execute(SET_META, ("attempt_reserved", batch.reserve))

    def _failed(self, batch: Batch, failure: Failure) -> None:
        """Nothing of the batch was acknowledged: it all becomes dirty again, to retry."""
        self._in_flight = None
        self._last_commit = self.clock.seconds()
        log.failure("jobs: commit failed; retrying in {delay} s", failure, delay=RETRY_DELAY)
        self.new_jobs = batch.new_jobs + self.new_jobs
        self.dirty_jobs |= batch.dirty_jobs
        self.dirty_tasks |= batch.dirty_tasks
        self.dirty_attempts |= batch.dirty_attempts
        self.acks = batch.acks + self.acks
        self.finalized = batch.finalized + self.finalized
        self.results = batch.results + self.results
        if not self.closed and self._call is None:
            self._call = self.clock.callLater(max(RETRY_DELAY, self.commit_delay), self._flush)

    def _written(self, batch: Batch) -> None:
        """The batch is on disk: acknowledge it, and start the next one if changes wait."""
        self._in_flight = None
        self._last_commit = self.clock.seconds()
        if batch.reserve is not None:
            self.reserved = max(self.reserved, batch.reserve)
        for j in batch.new_jobs:
            j.stored = True
            j.task_rows = None
        for d, value in batch.acks:
            d.callback(value)
        if batch.finalized:
            self._on_final(batch.finalized)
        if self.pending():
            # Changes made during the commit: their batch follows commit_delay later, as
            # any batch does (at once, measured, made a commit per task or two under a
            # stream of short tasks, each some hundreds of us of SQLite CPU; a worker's
            # next results do not wait for it: task_result requests overlap).
            self.schedule()

    # -- closing -------------------------------------------------------------------------

    def close(self, flush: bool = True) -> None:
        """Commit what is pending and close the file; idempotent.

        ``flush=False`` drops the pending batch unacknowledged, as a crash would.
        """
        if self.closed:
            return
        if flush:
            # A batch handed to a thread: wait for its commit (the lock), or write it
            # here if the thread has not begun; its acknowledgement still comes from
            # the thread's end.  Then what is left, inline.
            self._run_in_thread = None
            batch, self._in_flight = self._in_flight, None
            if batch is not None:
                with self._db_lock:
                    if not batch.written:
                        try:
                            self._write_locked(batch)
                            batch.written = True
                        except Exception:
                            log.failure("jobs: the last commit failed")
            self.flush()
        if self._call is not None and self._call.active():
            self._call.cancel()
        self._call = None
        self.closed = True
        with self._db_lock:
            self.db.close()
