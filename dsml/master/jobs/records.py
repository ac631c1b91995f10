"""The live jobs as the manager holds them in memory: one record per job, task, attempt.

A :class:`JobRecord` holds its :class:`TaskRecord` list, each task its
:class:`AttemptRecord` list, oldest first, and the one running attempt if any.  Each
record gives its reader's view and the row that stores it (the journal writes the rows;
the manager changes the fields).  Plain mutable objects with slots and identity
equality: they go in sets (dirty) and heap entries by the thousand.

States are held as the enum members of :mod:`.states` (also when loaded from disk); the
rows carry their plain text (``_value_``), which SQLite binds without an adapter lookup.
"""

from __future__ import annotations

import json
from typing import Any

import attrs
from twisted.internet.defer import Deferred

from .model import AttemptView, JobView, TaskSpec, TaskView
from .states import (
    CANCELLED,
    FAILED,
    QUEUED,
    SUCCEEDED,
    TASK_STATES,
    WAITING,
    AttemptState,
    JobState,
    TaskState,
)

__all__ = ["BLOCK", "AttemptRecord", "JobRecord", "TaskRecord"]

#: Task indexes per block of :attr:`JobRecord.queued_blocks`.
BLOCK = 1024


@attrs.define(eq=False)
class AttemptRecord:
    """One attempt of a task, as held in memory (a row of ``attempts``)."""

    id: int
    task: TaskRecord
    worker: str
    incarnation: int
    state: AttemptState
    started: float
    ended: float | None = None
    exit_code: int | None = None
    signal: int | None = None
    duration: float | None = None
    peak_rss: int | None = None
    reason: str = ""
    stderr_tail: str = ""
    #: Whether it started on a worker the directory named as holding every input of
    #: its task (None: the task has none, or the dispatcher did not say).
    local: bool | None = None
    #: When it started on the manager's clock (monotonic; ``started`` is the wall-clock
    #: record): in memory only, None for an attempt loaded from disk.
    began: float | None = None

    def view(self) -> AttemptView:
        return AttemptView(
            self.id,
            self.worker,
            self.incarnation,
            self.state,
            self.started,
            self.ended,
            self.exit_code,
            self.signal,
            self.duration,
            self.peak_rss,
            self.reason,
            self.stderr_tail,
            self.local,
        )

    def row(self) -> tuple[object, ...]:
        t = self.task
        return (
            self.id,
            t.job.seq,
            t.index,
            self.worker,
            self.incarnation,
            self.state._value_,
            self.started,
            self.ended,
            self.exit_code,
            self.signal,
            self.duration,
            self.peak_rss,
            self.reason,
            self.stderr_tail,
            None if self.local is None else int(self.local),
        )


@attrs.define(eq=False)
class TaskRecord:
    """One task of a live job, with all its attempts (a row of ``tasks``)."""

    job: JobRecord
    index: int
    spec: TaskSpec
    state: TaskState
    reason: str = ""
    #: Its attempts, oldest first: the shared empty tuple until the first
    #: (:meth:`add_attempt`), so a 100,000-task job that has not run holds no 100,000
    #: empty lists for the garbage collector to walk.
    attempts: list[AttemptRecord] | tuple[()] = ()
    #: The running attempt, if any.
    current: AttemptRecord | None = None
    #: When (monotonic) a worker that does not hold its inputs was first left without it
    #: (delay scheduling: the dispatcher's, see ``JobRouter._locality_wait``), with its
    #: number of attempts then (a new attempt's end requeues it: a new wait), else None.
    passed_over: tuple[float, int] | None = None

    def add_attempt(self, attempt: AttemptRecord) -> None:
        """Add its newest attempt."""
        if isinstance(self.attempts, tuple):
            self.attempts = [attempt]
        else:
            self.attempts.append(attempt)

    def view(self, waiting_for: str = "") -> TaskView:
        """Its view; ``waiting_for`` is its job's sentence, kept only if it is waiting."""
        return TaskView(
            self.index,
            self.state,
            self.reason,
            tuple(a.view() for a in self.attempts),
            waiting_for if self.state == WAITING else "",
            tuple(key for _, key in self.spec.outputs),
        )


@attrs.define(eq=False)
class JobRecord:
    """A live (or just finished, not yet committed) job, with its tasks."""

    seq: int
    name: str
    priority: int
    after: tuple[str, ...]
    state: JobState
    created: float
    started: float | None = None
    finished: float | None = None
    reason: str = ""
    #: Who submitted it (see :attr:`~.model.JobView.owner`).
    owner: str = ""
    tasks: list[TaskRecord] = attrs.Factory(list)
    counts: dict[str, int] = attrs.Factory(lambda: dict.fromkeys(TASK_STATES, 0))
    #: Sequence numbers of the jobs it still waits for.
    pending: set[int] = attrs.Factory(set)
    #: True once its rows are committed (until then, a flush inserts it whole).
    stored: bool = False
    #: Deferreds of :meth:`JobManager.wait_for`.
    waiters: list[Deferred[JobView]] = attrs.Factory(list)
    #: The rows that insert its tasks (made while they are materialised, in slices, so
    #: the commit that stores the job does not encode 100,000 specs on the reactor);
    #: None once stored.  Each row holds a task's first state: later changes are dirty.
    task_rows: list[tuple[Any, ...]] | None = None
    #: Queued tasks per block of :data:`BLOCK` task indexes (kept by the manager), so
    #: a page of a status counts the job's queued tasks before it without a walk.
    queued_blocks: list[int] = attrs.Factory(list)
    #: How many of its tasks name inputs (counted as they are made).
    with_inputs: int = 0
    #: Its attempts started on a worker holding every input of their task, and those
    #: started elsewhere (tasks without inputs count in neither).
    local: int = 0
    remote: int = 0

    def note_queued(self, index: int, delta: int) -> None:
        """Task ``index`` entered (+1) or left (-1) the ``queued`` state."""
        blocks = self.queued_blocks
        b = index // BLOCK
        if b >= len(blocks):
            blocks.extend([0] * (b + 1 - len(blocks)))
        blocks[b] += delta

    def queued_before(self, index: int) -> int:
        """How many of its tasks before ``index`` are queued: O(index / BLOCK + BLOCK)."""
        b = index // BLOCK
        n = sum(self.queued_blocks[:b])
        for t in self.tasks[b * BLOCK : index]:
            if t.state == QUEUED:
                n += 1
        return n

    @property
    def id(self) -> str:
        return f"j{self.seq}"

    @property
    def done(self) -> int:
        c = self.counts
        return c[SUCCEEDED] + c[FAILED] + c[CANCELLED]

    def waiting_for(self) -> str:
        """What its waiting tasks wait for: "job j3 to succeed", "jobs j3, j5 to succeed"."""
        ids = [f"j{seq}" for seq in sorted(self.pending)] or list(self.after)
        if len(ids) == 1:
            return f"job {ids[0]} to succeed"
        return f"jobs {', '.join(ids)} to succeed"

    def view(self, tasks: bool = True, first: int = 0, limit: int | None = None) -> JobView:
        """Its view; with ``tasks``, those from index ``first``, at most ``limit``."""
        # One sentence for all its waiting tasks (they wait for the same jobs).
        why = self.waiting_for() if tasks and self.counts[WAITING] else ""
        page: list[TaskRecord] = []
        nxt = None
        if tasks:
            end = len(self.tasks) if limit is None else min(len(self.tasks), first + limit)
            page = self.tasks[first:end]
            nxt = end if end < len(self.tasks) else None
        return JobView(
            id=self.id,
            name=self.name,
            state=self.state,
            priority=self.priority,
            after=self.after,
            created=self.created,
            started=self.started,
            finished=self.finished,
            reason=self.reason,
            counts=dict(self.counts),
            done=self.done,
            total=len(self.tasks),
            tasks=tuple(t.view(why) for t in page),
            next=nxt,
            owner=self.owner,
            local=self.local,
            remote=self.remote,
        )

    def update_row(self) -> tuple[object, ...]:
        return (
            self.state._value_,
            self.started,
            self.finished,
            self.reason,
            json.dumps(self.counts, separators=(",", ":")),
            self.local,
            self.remote,
            self.seq,
        )

    def insert_row(self) -> tuple[Any, ...]:
        return (
            self.seq,
            self.name,
            self.priority,
            json.dumps(list(self.after)),
            self.state._value_,
            self.created,
            self.started,
            self.finished,
            self.reason,
            len(self.tasks),
            json.dumps(self.counts, separators=(",", ":")),
            self.owner,
            self.local,
            self.remote,
        )
